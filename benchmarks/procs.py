"""Child processes for the benchmark scripts (load.py, hwd_latency.py) and
the torture tests: start one, wait for the line that says it is ready,
measure its CPU, stop it."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit_of():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Process:
    """A child process logging to a file; `ready` (a line prefix on stdout), if
    given, is waited for, and the line kept as `line`."""

    def __init__(self, name, argv, log_path, ready=None, timeout=60.0):
        self.name, self.log_path = name, log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                         cwd=ROOT, env=env)
        self.pid = self.proc.pid
        self.line = self._wait(ready, timeout) if ready else None

    def _wait(self, prefix, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().decode()
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
        self.fail(f"did not start (waiting for {prefix!r})")

    def fail(self, why):
        self.stop()
        with open(self.log_path, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace")
        raise SystemExit(f"{self.name} {why}; its log:\n{tail}")

    def cpu_seconds(self):
        """CPU time (user + system, every thread) the process has used."""
        return _stat_cpu(f"/proc/{self.pid}/stat")

    def main_thread_cpu_seconds(self):
        """CPU time of the process's main thread alone (where a Python
        server's event loop runs, with the GIL most of the time)."""
        return _stat_cpu(f"/proc/{self.pid}/task/{self.pid}/stat")

    def stop(self, timeout=30.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


def _stat_cpu(path):
    """utime + stime, seconds, of a /proc stat file; nan when it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


class Server(Process):
    """A server process that prints `READY <port>` once it listens."""

    def __init__(self, name, argv, log_path, timeout=60.0):
        super().__init__(name, argv, log_path, ready="READY ", timeout=timeout)
        self.port = int(self.line.split()[1])
        self.address = f"127.0.0.1:{self.port}"


SERVER = r"""
import asyncio, json, sys
from kopilka.servers import logs
from kopilka.servers.app import Config, serve
logs.configure(sys.argv[2])
config = Config(insecure=True, **json.loads(sys.argv[1]))
asyncio.run(serve(config, lambda s: print(f"READY {s.port}", flush=True)))
"""


def kopilka_server(name, log_path, *, log_level="INFO", timeout=60.0, **config):
    """The real server (`kopilka.servers.app.serve`) in its own process,
    without TLS (loopback); `config` are `Config` fields (data, listen, ...)."""
    return Server(name, [sys.executable, "-c", SERVER, json.dumps(config), log_level],
                  log_path, timeout=timeout)
