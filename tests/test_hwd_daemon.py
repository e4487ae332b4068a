"""The whole hwd: pseudo-terminal readers -> daemon -> a real gRPC core on loopback.

The daemon is built from a config (as `kopilka hwd run` builds it), its
readers open ptys through pyserial, the test writes frames to the masters as
card readers would, and a real grpc server (tests/hwd_core.py) records what
arrives. In-process daemons get a hand-moved clock and backoff sleeps that
never wait; the SIGKILL test runs the real command in a subprocess. Waiting
is on the core's condition or polling health with a deadline, never a sleep
sized to let time pass.
"""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hwd_core import TOKEN, Clock, CoreServer, Jitter, Pty, Sleeps, free_port, wait_for

from kopilka.hwd import cli, status
from kopilka.hwd.config import from_mapping
from kopilka.hwd.daemon import Daemon
from kopilka.hwd.events import GARBAGE
from kopilka.hwd.simulate import luhn_complete

ROOT = Path(__file__).resolve().parent.parent
CARDS = [luhn_complete(f"77890000{i:07d}") for i in range(1, 40)]
EAN = "2000000000015"
STALE_S = 900


def swipe(card):
    return f";{card}=2912101?\r".encode()


def scan(code):
    return f"]E0{code}\r".encode()


def reader_table(reader_id, port, lane, kind="magstripe"):
    framing = {"kind": "magstripe", "tracks": [2]} if kind == "magstripe" else \
        {"kind": "barcode", "aim": "required"}
    return {"id": reader_id, "port": port, "lane": lane, "read_timeout_ms": 20,
            "backoff_base_ms": 20, "backoff_cap_ms": 80, "framing": framing}


def config_mapping(tmp_path, address, readers, max_reads=1000, metrics="127.0.0.1:0"):
    return {
        "store": 42,
        "core": {"address": address, "token": TOKEN, "insecure": True,
                 "backoff_base_ms": 20, "backoff_cap_ms": 100},
        "policy": {"ranges": [
            {"prefix": "7789", "length": 16, "luhn": True, "sources": ["track2"]},
            {"prefix": "2", "length": 13, "sources": ["barcode"]}]},
        "dedup": {"window_ms": 1500},
        "spool": {"path": str(tmp_path / "spool.db"), "max_reads": max_reads,
                  "stale_after_s": STALE_S},
        "metrics": {"address": metrics},
        "readers": readers,
    }


class Sleep:
    """A reader's backoff sleep: yields a millisecond, never waits the delay."""

    def __call__(self, seconds):
        time.sleep(0.001)


@pytest.fixture
def ptys():
    made = []

    def make():
        made.append(Pty())
        return made[-1]

    yield make
    for p in made:
        p.unplug()


@pytest.fixture
def daemon_for(tmp_path):
    """daemon_for(address, readers, ...) -> a started in-process Daemon."""
    made = []

    def make(address, readers, clock=None, **kwargs):
        config = from_mapping(config_mapping(tmp_path, address, readers, **kwargs))
        d = Daemon(config, clock=clock or Clock(time.time_ns() // 1000),
                   reader_sleep=Sleep(), uplink_sleep=Sleeps(), rng=Jitter(),
                   status_interval=0.05)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        if not d._stopping.is_set():
            assert d.stop(timeout=3.0), "the daemon did not stop"


def reader_state(daemon, index):
    return daemon.readers[index].health().state


def all_connected(daemon):
    return all(r.health().state == "connected" for r in daemon.readers) and \
        daemon.uplink.health().state == "connected"


def scrape(daemon):
    port = daemon.metrics_server.server_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def run_cli(*argv, capsys):
    code = cli.main(["hwd", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- reads end to end ------------------------------------------------------------------

def test_reads_flow_from_ptys_to_the_core_with_status_and_metrics(daemon_for, ptys, capsys):
    msr, scanner = ptys(), ptys()
    with CoreServer() as server:
        daemon = daemon_for(server.address, [reader_table("lane1-msr", msr.path, 1),
                                             reader_table("lane2-scanner", scanner.path, 2,
                                                          "barcode")])
        wait_for(lambda: all_connected(daemon), what="readers and core connected")
        msr.write(b"\x00noise\xff" + swipe(CARDS[0]))
        server.core.wait_for(lambda c: len(c.accepted) == 1, what="the swipe")
        scanner.write(scan(EAN))
        server.core.wait_for(lambda c: len(c.accepted) == 2, what="the scan")
        first, second = server.core.accepted
        assert (first.lane, first.reader, first.card_number) == \
            ("stores/42/lanes/1", "lane1-msr", CARDS[0])
        assert (second.lane, second.card_number, second.symbology) == \
            ("stores/42/lanes/2", EAN, "ean13")
        wait_for(lambda: daemon.spool.depth() == 0, what="an empty spool")

        daemon.write_status()
        snap = status.read(daemon.config.status_path)
        assert snap["readers"][0]["reads"] == 1 and snap["readers"][0]["rejects"] == \
            {GARBAGE: 1}
        assert snap["core"]["acks"] == {"accepted": 2} and snap["spool"]["depth"] == 0
        assert CARDS[0] not in Path(daemon.config.status_path).read_text()

        metrics = scrape(daemon)
        assert 'kopilka_hwd_reader_reads_total{lane="1",reader="lane1-msr"} 1.0' in metrics
        assert ('kopilka_hwd_reader_rejects_total{lane="1",reader="lane1-msr",'
                'reason="GARBAGE"} 1.0') in metrics
        assert "kopilka_hwd_spool_depth 0.0" in metrics
        assert "kopilka_hwd_core_up 1.0" in metrics
        assert 'kopilka_hwd_core_acks_total{outcome="accepted"} 2.0' in metrics
        assert CARDS[0] not in metrics

        code, out, _ = run_cli("status", "--status-file", daemon.config.status_path,
                               capsys=capsys)
        assert code == status.OK, out
        assert "hwd store 42" in out and "lane1-msr" in out and "rejects: GARBAGE 1" in out
        assert daemon.stop()
    code, out, _ = run_cli("status", "--status-file", daemon.config.status_path, capsys=capsys)
    assert code == status.NOT_RUNNING and "the daemon stopped" in out


def test_a_double_swipe_on_a_lane_is_one_read_whichever_reader(daemon_for, ptys):
    msr, other = ptys(), ptys()
    with CoreServer() as server:
        daemon = daemon_for(server.address, [reader_table("lane1-msr", msr.path, 1),
                                             reader_table("lane1-msr2", other.path, 1)])
        wait_for(lambda: all_connected(daemon), what="connected")
        msr.write(swipe(CARDS[0]) + swipe(CARDS[0]))
        wait_for(lambda: daemon.readers[0].health().duplicates == 1, what="a double swipe")
        other.write(swipe(CARDS[0]))             # the lane's other reader, same card
        wait_for(lambda: daemon.readers[1].health().duplicates == 1, what="suppressed")
        other.write(swipe(CARDS[1]))
        server.core.wait_for(lambda c: len(c.accepted) == 2, what="two reads")
        assert [r.card_number for r in server.core.accepted] == CARDS[:2]


# -- readers that misbehave ---------------------------------------------------------------

def test_unplug_and_replug_while_the_other_reader_goes_on(daemon_for, ptys, tmp_path):
    link = str(tmp_path / "usb-Acme_MSR_0001-if00")
    first, steady = ptys(), ptys()
    os.symlink(first.path, link)
    with CoreServer() as server:
        daemon = daemon_for(server.address, [reader_table("lane1-msr", link, 1),
                                             reader_table("lane2-msr", steady.path, 2)])
        wait_for(lambda: all_connected(daemon), what="connected")
        first.write(swipe(CARDS[0]))
        server.core.wait_for(lambda c: len(c.accepted) == 1, what="a read")
        os.unlink(link)                          # unplugged: link gone, tty hung up
        first.unplug()
        wait_for(lambda: reader_state(daemon, 0) == "disconnected", what="disconnected")
        steady.write(swipe(CARDS[1]))            # the other lane does not notice
        server.core.wait_for(lambda c: len(c.accepted) == 2, what="the other lane")
        second = ptys()
        os.symlink(second.path, link)            # plugged back in: a new tty
        wait_for(lambda: reader_state(daemon, 0) == "connected", what="reconnected")
        second.write(swipe(CARDS[2]))
        server.core.wait_for(lambda c: len(c.accepted) == 3, what="a read after replug")
        assert [r.card_number for r in server.core.accepted] == CARDS[:3]
        health = daemon.readers[0].health()
        assert (health.reconnects, health.reads) == (1, 2)


HOLDER = """
import serial, sys
port = serial.Serial(sys.argv[1], exclusive=True)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_port_held_by_another_process_is_busy_and_the_rest_works(daemon_for, ptys):
    held, free = ptys(), ptys()
    with CoreServer() as server, subprocess.Popen(
            [sys.executable, "-c", HOLDER, held.path], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            daemon = daemon_for(server.address, [reader_table("lane1-msr", held.path, 1),
                                                 reader_table("lane2-msr", free.path, 2)])
            wait_for(lambda: daemon.readers[0].health().last_error == "busy", what="busy")
            wait_for(lambda: reader_state(daemon, 1) == "connected", what="the free one")
            free.write(swipe(CARDS[0]))
            server.core.wait_for(lambda c: len(c.accepted) == 1, what="a read")
            daemon.write_status()
            text, code = status.render(status.read(daemon.config.status_path),
                                       daemon.clock())
            assert code == status.DEGRADED and "disconnected (busy)" in text
            holder.stdin.close()                 # the other process lets go
            assert holder.wait(timeout=5) == 0
            wait_for(lambda: reader_state(daemon, 0) == "connected", what="released")
            held.write(swipe(CARDS[1]))
            server.core.wait_for(lambda c: len(c.accepted) == 2, what="a read once freed")
        finally:
            if holder.poll() is None:
                holder.kill()


def test_a_reader_flooding_garbage_is_bounded_and_stops_no_one(daemon_for, ptys):
    noisy, quiet = ptys(), ptys()
    with CoreServer() as server:
        daemon = daemon_for(server.address, [reader_table("lane1-msr", noisy.path, 1),
                                             reader_table("lane2-msr", quiet.path, 2)])
        wait_for(lambda: all_connected(daemon), what="connected")
        rng = random.Random(5)
        for i in range(16):                      # 64 KiB of noise, sentinels included
            noisy.write(bytes(rng.randrange(256) for _ in range(4096)))
            if i == 8:
                quiet.write(swipe(CARDS[0]))
            assert daemon.readers[0]._parser.buffered <= 512
        noisy.write(b"\r" + swipe(CARDS[1]))     # the flood ends; a real swipe
        server.core.wait_for(lambda c: len(c.accepted) == 2, what="both reads")
        assert sorted(r.card_number for r in server.core.accepted) == sorted(CARDS[:2])
        rejects = daemon.readers[0].health().rejects
        assert rejects.get(GARBAGE, 0) > 10 and daemon.readers[1].health().rejects == {}
        assert reader_state(daemon, 0) == "connected"


# -- the core away -------------------------------------------------------------------------

def test_core_down_reads_arrive_then_all_delivered_in_order_once(daemon_for, ptys):
    port = free_port()
    one, two = ptys(), ptys()
    daemon = daemon_for(f"127.0.0.1:{port}", [reader_table("lane1-msr", one.path, 1),
                                              reader_table("lane2-msr", two.path, 2)])
    wait_for(lambda: reader_state(daemon, 0) == reader_state(daemon, 1) == "connected",
             what="readers connected")
    for i in range(6):
        (one if i % 2 else two).write(swipe(CARDS[i]))
        wait_for(lambda i=i: daemon.spool.depth() == i + 1, what=f"read {i} spooled")
    assert daemon.uplink.health().state == "disconnected"
    with CoreServer(port=port) as server:
        server.core.wait_for(lambda c: len(c.accepted) == 6, what="the backlog")
        wait_for(lambda: daemon.spool.depth() == 0, what="an empty spool")
        assert [r.card_number for r in server.core.accepted] == CARDS[:6]
        assert server.core.duplicates == 0
        server.stop()                            # down again, mid-day
        two.write(swipe(CARDS[6]))
        wait_for(lambda: daemon.spool.depth() == 1, what="spooled while down")
        server.start()
        server.core.wait_for(lambda c: len(c.accepted) == 7, what="the read after")
        assert len({r.read_id for r in server.core.accepted}) == 7


def test_stale_reads_are_dropped_counted_and_shown(daemon_for, ptys):
    port = free_port()
    pty = ptys()
    clock = Clock(time.time_ns() // 1000)
    daemon = daemon_for(f"127.0.0.1:{port}", [reader_table("lane1-msr", pty.path, 1)],
                        clock=clock)
    wait_for(lambda: reader_state(daemon, 0) == "connected", what="connected")
    pty.write(swipe(CARDS[0]) + swipe(CARDS[1]))
    wait_for(lambda: daemon.spool.depth() == 2, what="two reads spooled")
    clock.now += STALE_S * 1_000_000 + 1         # the customers have long gone
    pty.write(swipe(CARDS[2]))
    wait_for(lambda: daemon.spool.dropped_stale == 2, what="stale reads dropped")
    assert 'kopilka_hwd_spool_dropped_total{reason="stale"} 2.0' in scrape(daemon)
    with CoreServer(port=port) as server:
        server.core.wait_for(lambda c: len(c.accepted) == 1, what="the fresh read")
        wait_for(lambda: daemon.spool.depth() == 0, what="an empty spool")
        assert server.core.accepted[0].card_number == CARDS[2]


def test_a_full_spool_drops_new_reads_and_says_so(daemon_for, ptys):
    port = free_port()
    pty = ptys()
    daemon = daemon_for(f"127.0.0.1:{port}", [reader_table("lane1-msr", pty.path, 1)],
                        max_reads=2)
    wait_for(lambda: reader_state(daemon, 0) == "connected", what="connected")
    pty.write(swipe(CARDS[0]) + swipe(CARDS[1]) + swipe(CARDS[2]))
    wait_for(lambda: daemon.spool.dropped_full == 1, what="a read dropped")
    assert daemon.spool.depth() == 2
    daemon.write_status()
    text, code = status.render(status.read(daemon.config.status_path), daemon.clock())
    assert code == status.DEGRADED and "dropped: full 1" in text
    with CoreServer(port=port) as server:
        server.core.wait_for(lambda c: len(c.accepted) == 2, what="the spooled reads")
        assert [r.card_number for r in server.core.accepted] == CARDS[:2]


# -- the real command -----------------------------------------------------------------------

def _write_config(tmp_path, address, readers):
    lines = ["store = 42", "[core]", f'address = "{address}"', f'token = "{TOKEN}"',
             "insecure = true", "backoff_base_ms = 20", "backoff_cap_ms = 100",
             "[policy]", 'ranges = [{ prefix = "7789", length = 16, luhn = true }]',
             "[spool]", f'path = "{tmp_path / "spool.db"}"', "[metrics]", 'address = ""']
    for reader_id, port, lane in readers:
        lines += ["[[readers]]", f'id = "{reader_id}"', f'port = "{port}"', f"lane = {lane}",
                  "backoff_base_ms = 20", "backoff_cap_ms = 80",
                  'framing = { kind = "magstripe", tracks = [2] }']
    path = tmp_path / "store.toml"
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def _spooled(path):
    """Rows in a spool file, read as `kopilka hwd status` could (WAL readers never block)."""
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM reads").fetchone()[0]
        except sqlite3.OperationalError:         # the daemon is creating it
            return 0


def _hwd(config):
    return subprocess.Popen([sys.executable, "-m", "kopilka.hwd", "run", "--config",
                             str(config), "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_sigkill_with_reads_spooled_then_restart_loses_nothing(tmp_path, ptys):
    port = free_port()
    pty = ptys()
    config = _write_config(tmp_path, f"127.0.0.1:{port}", [("lane1-msr", pty.path, 1)])
    spool = tmp_path / "spool.db"
    hwd = _hwd(config)
    try:
        for i in range(5):                       # the core is down: reads spool up
            wait_for(lambda i=i: _spooled(spool) == i and _reader_up(tmp_path),
                     timeout=10, what=f"ready for swipe {i}")
            pty.write(swipe(CARDS[i]))
        wait_for(lambda: _spooled(spool) == 5, what="five reads spooled")
    finally:
        hwd.send_signal(signal.SIGKILL)
        hwd.wait(timeout=5)
        hwd.stderr.close()
    assert hwd.returncode == -signal.SIGKILL
    assert _spooled(spool) == 5

    with CoreServer(port=port) as server:
        hwd = _hwd(config)                       # restarted, now the core is up
        try:
            server.core.wait_for(lambda c: len(c.accepted) == 5, timeout=10,
                                 what="the spooled reads")
            wait_for(lambda: _spooled(spool) == 0, what="an empty spool")
            assert [r.card_number for r in server.core.accepted] == CARDS[:5]
            assert server.core.duplicates == 0
        finally:
            hwd.send_signal(signal.SIGTERM)      # a clean stop
            assert hwd.wait(timeout=10) == 0, hwd.stderr.read()
            hwd.stderr.close()
    snap = status.read(tmp_path / "status.json")
    assert snap["state"] == "stopped" and snap["spool"]["depth"] == 0


def _reader_up(tmp_path):
    snap = status.read(tmp_path / "status.json")
    return snap is not None and snap["readers"][0]["state"] == "connected"


def test_simulate_streams_virtual_swipes_to_the_core(tmp_path):
    with CoreServer() as server:
        result = subprocess.run(
            [sys.executable, "-m", "kopilka.hwd", "simulate", "--core", server.address,
             "--insecure", "--token", TOKEN, "--count", "6", "--rate", "200", "--noise", "0",
             "--seed", "7", "--lanes", "2", "--spool-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("-> accepted") == 6, result.stdout
        assert len(server.core.accepted) == 6
        lanes = {r.lane for r in server.core.accepted}
        assert lanes <= {"stores/1/lanes/1", "stores/1/lanes/2"}
        for read in server.core.accepted:       # printed masked, never whole
            assert read.card_number not in result.stdout


# -- the command line -----------------------------------------------------------------------

def test_bad_configs_stop_the_command_naming_the_key(tmp_path, capsys):
    config = _write_config(tmp_path, "127.0.0.1:1", [("lane1-msr", "/dev/ttyUSB0", 1)])
    config.write_text(config.read_text().replace("lane = 1", "lane = 0"))
    for command in ("check", "run"):
        code, _, err = run_cli(command, "--config", str(config), capsys=capsys)
        assert code == 2
        assert "readers[0].lane: must be between 1" in err
    code, out, _ = run_cli("status", "--status-file", str(tmp_path / "none.json"),
                           capsys=capsys)
    assert code == status.NOT_RUNNING and "not running" in out
    token_file = _write_config(tmp_path, "127.0.0.1:1", [("lane1-msr", "/dev/ttyUSB0", 1)])
    token_file.write_text(token_file.read_text().replace(
        f'token = "{TOKEN}"', f'token_file = "{tmp_path / "absent"}"'))
    code, _, err = run_cli("run", "--config", str(token_file), capsys=capsys)
    assert code == 2 and "core.token_file: cannot read" in err
