"""What every run of the comparison records, in one shape.

A run is one system applying one workload at one concurrency for a while.
Its figures: operations acknowledged durably per second, the latency of an
acknowledgement (of an operation, or of the batch that carried it), what was
refused, the CPU each side used, and the machine's load average before and
after (the machine is shared: a figure means little without it).
"""

import os
import time

from benchlib import percentile


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def cpu_of(pids):
    """CPU seconds (user + system, all threads) each process has used."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def memory_of(pid):
    """The process's resident memory by kind, bytes: anonymous (its own
    heap), file (mapped files, LMDB's map among them), and the peak."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def allocated_bytes(*paths):
    """Bytes the files take on disk (allocated blocks, so sparse files count
    what they hold), directories walked."""
    total = 0
    for path in paths:
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
                    except FileNotFoundError:
                        pass
        elif os.path.exists(path):
            total += os.lstat(path).st_blocks * 512
    return total


class Meter:
    """Wall time, this process's CPU, the other side's CPU (`pids`, a
    callable returning its processes) and the load average over a run.
    `done()` ends the run (call it before the other side's processes
    exit: a process gone takes its CPU time with it); later calls return
    the same figures."""

    def __init__(self, pids=None):
        self.pids = pids
        self.load_before = load_average()
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.other = cpu_of(pids()) if pids else None
        self._done = None

    def done(self):
        if self._done is None:
            wall = time.perf_counter() - self.wall
            out = {"wall_seconds": round(wall, 3),
                   "client_cpu": round((time.process_time() - self.cpu) / wall, 3),
                   "load_before": self.load_before, "load_after": load_average()}
            if self.pids:
                now = cpu_of(self.pids())
                used = sum(t - self.other.get(pid, 0.0) for pid, t in now.items())
                out["server_cpu"] = round(used / wall, 3)
            self._done = out
        return self._done


def row(system, mode, variant, concurrency, batch, *, ok, rejected, seconds,
        latencies, meter, **extra):
    """One run's figures. `seconds`: the time the throughput is over;
    `latencies`: seconds, one per acknowledgement (an operation's, or a
    batch's when the ops of a batch are acknowledged together)."""
    ordered = sorted(latencies)

    def ms(q):
        return round(percentile(ordered, q) * 1e3, 3) if ordered else None
    return {"system": system, "mode": mode, "variant": variant,
            "concurrency": concurrency, "batch": batch,
            "ops": ok, "rejected": rejected, "seconds": round(seconds, 3),
            "ops_per_s": round(ok / seconds, 1) if seconds else 0.0,
            "p50_ms": ms(50), "p99_ms": ms(99), "p999_ms": ms(99.9),
            "max_ms": round(ordered[-1] * 1e3, 3) if ordered else None,
            "acks": len(ordered), **meter.done(), **extra}


def describe(r):
    """One line for the console."""
    p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:,.1f}"
    p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:,.1f}"
    rejected = f", {r['rejected']:,} refused" if r["rejected"] else ""
    server = f", server CPU {r['server_cpu']:.0%}" if r.get("server_cpu") is not None else ""
    tries = r.get("tries_ops_per_s", ())
    tries = ("; tries " + ", ".join(f"{t:,.0f}" for t in tries)) if len(tries) > 1 else ""
    return (f"  {r['system']:<16} {r['mode']:<6} {r['variant']:<6} "
            f"c={r['concurrency']:<3} b={r['batch']:<6} {r['ops_per_s']:>10,.0f} ops/s  "
            f"p50 {p50} ms  p99 {p99} ms  ({r['ops']:,} ops{rejected}; "
            f"client CPU {r['client_cpu']:.0%}{server}; load "
            f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}{tries})")
