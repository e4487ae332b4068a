#!/usr/bin/env python3
"""The throughput guard CI runs (`make bench-guard`, in .ci/run): ratios
only, never absolute times, since the machines are shared and noisy.

  kernel / twin          the same batches of the comparison's operations
                         (benchmarks/workload.py) on copies of one ledger,
                         sync off: each one's own work, in CPU seconds (the
                         disk, and the CPU share other sessions leave, are
                         what varies most here); best of several tries each
  kernel / raw LMDB      durable commits of 1,000 operations against 1,000
                         random LMDB puts into as many keys as accounts,
                         alternated batch by batch so both meet the same
                         disk; the ratio of their quicker quarters (25th
                         percentile commit times)
  server unary / echo    the real server's unary RPCs against a bare gRPC
                         echo at the same concurrency, alternated: RPCs per
                         CPU second of the server process, the median of
                         the rounds (the wall-clock rates, printed too, swing
                         by 2x between rounds here: every reply of the server
                         waits for a durable commit on a disk other sessions
                         share)

The guard fails when a ratio falls below its floor in
benchmarks/guard-floors.json: 70% of what `guard.py --calibrate` measured
(the median of its runs). It needs no
PostgreSQL and takes about a minute.
"""

import argparse
import asyncio
import datetime
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kopilka_local   # noqa: E402
import kopilka_remote  # noqa: E402
import load            # noqa: E402
import lmdb_ceiling    # noqa: E402
import measure         # noqa: E402
import workload        # noqa: E402

FLOORS = os.path.join(HERE, "guard-floors.json")
FLOOR_SHARE = 0.70
ACCOUNTS = 20_000
MAP_SIZE = 4 << 30
BATCH = 1_000


def _batches(accounts, count, run_id):
    stream = workload.Stream(accounts, run=run_id)
    out = []
    for _ in range(count):
        now = time.time_ns() // 1000
        out.append((kopilka_local.encode(stream.take(BATCH), now), now))
    return out


def _apply_all(impl, path, batches, sync):
    """CPU seconds to apply batches[1:] (batches[0] warms up); all must be OK."""
    ledger = kopilka_local.open_ledger(impl, path, sync=sync, map_size=MAP_SIZE)
    apply = ledger.apply_raw if impl == "kernel" else \
        (lambda raw, now: ledger.apply(raw, now).raw)
    try:
        outs = [apply(*batches[0])]
        started = time.process_time()
        for raw, now in batches[1:]:
            outs.append(apply(raw, now))
        took = time.process_time() - started
    finally:
        ledger.close()
    for out in outs:
        ok, other = kopilka_local.count(out)
        if other:
            raise SystemExit(f"{impl}: operations refused: {other}")
    return took


def _fresh(ledger, dest):
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ledger, dest, ignore=shutil.ignore_patterns("lock.mdb"))
    return dest


def kernel_over_twin(work, ledger, rounds=4, batches=8):
    """Best of several tries for each (the same batches each time, on fresh
    copies; the kernel, 20 times quicker, gets three tries per round): the
    try least disturbed by other work shows what each can do."""
    chunk = _batches(ACCOUNTS, batches + 1, "gt")
    twin, kernel = [], []
    for _ in range(rounds):
        twin.append(_apply_all("twin", _fresh(ledger, os.path.join(work, "t")), chunk, False))
        kernel.append(min(
            _apply_all("kernel", _fresh(ledger, os.path.join(work, "k")), chunk, False)
            for _ in range(3)))
    return min(twin) / min(kernel), [t / k for t, k in zip(twin, kernel)]


def kernel_over_lmdb(work, ledger, rounds=9, batches=10):
    """Durable batches alternated; ops/s ratio of the quicker quarters (the
    inverse ratio of the 25th percentile commit times), over every round
    and per round."""
    raw = os.path.join(work, "raw")
    os.makedirs(raw, exist_ok=True)
    lmdb_ceiling.populate(raw, ACCOUNTS, MAP_SIZE)
    path = _fresh(ledger, os.path.join(work, "kl"))
    import lmdb
    import random
    env = lmdb.open(raw, map_size=MAP_SIZE, sync=True, metasync=True)
    ledger = kopilka_local.open_ledger("kernel", path, sync=True, map_size=MAP_SIZE)
    rng = random.Random(0)
    ratios, pooled = [], {"kernel": [], "lmdb": []}
    try:
        for n in range(rounds):
            chunk = _batches(ACCOUNTS, batches + 1, f"gl{n}")
            times = {"kernel": [], "lmdb": []}
            for i, (batch, now) in enumerate(chunk):
                started = time.perf_counter()
                out = ledger.apply_raw(batch, now)
                took = time.perf_counter() - started
                if kopilka_local.count(out)[1]:
                    raise SystemExit("kernel: operations refused")
                keys = [rng.randint(1, ACCOUNTS).to_bytes(8, "big") for _ in range(BATCH)]
                started = time.perf_counter()
                with env.begin(write=True) as txn:
                    for key in keys:
                        txn.put(key, lmdb_ceiling.VALUE)
                if i:   # the first pair warms up
                    times["kernel"].append(took)
                    times["lmdb"].append(time.perf_counter() - started)
            ratios.append(_quarter(times["lmdb"]) / _quarter(times["kernel"]))
            for side, values in times.items():
                pooled[side] += values
    finally:
        ledger.close()
        env.close()
    return _quarter(pooled["lmdb"]) / _quarter(pooled["kernel"]), ratios


def _quarter(values):
    return statistics.quantiles(values, n=4)[0]


async def server_over_echo(work, data, token, rounds=5, seconds=2.0, clients=16):
    """Alternated rounds; per round, the server's RPCs per CPU second over
    the echo's. Also returns the wall-clock rate ratios, for the record."""
    server = kopilka_remote.start_server(data, work, MAP_SIZE)
    ratios, rates = [], []
    try:
        for n in range(rounds):
            echo = await kopilka_remote.echo(work, clients=clients, seconds=seconds,
                                             warmup=0.5)
            unary = await kopilka_remote.unary(
                server.address, token, accounts=ACCOUNTS, variant="spread",
                clients=clients, seconds=seconds, warmup=0.5, run_id=f"ge{n}",
                server_pid=server.pid)
            if unary["rejected"]:
                raise SystemExit(f"server: refusals {unary['errors']}")
            ratios.append((unary["ops_per_s"] / unary["server_cpu"])
                          / (echo["ops_per_s"] / echo["server_cpu"]))
            rates.append(unary["ops_per_s"] / echo["ops_per_s"])
    finally:
        server.stop()
    print("  server unary / echo, wall-clock RPCs/s by round (not guarded): "
          + ", ".join(f"{r:.2f}" for r in rates))
    return statistics.median(ratios), ratios


def measure_ratios():
    work = tempfile.mkdtemp(prefix="kopilka-guard-")
    try:
        data = os.path.join(work, "data")
        tokens = load.seed(data, ACCOUNTS, points=10_000_000, map_size=MAP_SIZE)
        ledger = os.path.join(data, "ledger")
        pristine = _fresh(ledger, os.path.join(work, "pristine"))
        out = {"kernel_over_twin": kernel_over_twin(work, pristine),
               "kernel_over_lmdb_puts": kernel_over_lmdb(work, pristine),
               "server_unary_over_echo": asyncio.run(
                   server_over_echo(work, data, tokens["pos"]))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calibrate", type=int, metavar="RUNS", nargs="?", const=3,
                   help="measure RUNS times (default 3) and write the floors: "
                        f"{FLOOR_SHARE:.0%} of the median")
    args = p.parse_args(argv)
    load_before = measure.load_average()
    started = time.perf_counter()
    if args.calibrate:
        runs = [measure_ratios() for _ in range(args.calibrate)]
        floors = {"measured": {}, "floors": {}, "runs": runs,
                  "date": datetime.date.today().isoformat(), "host": socket.gethostname(),
                  "load_before": load_before, "load_after": measure.load_average(),
                  "how": f"floor = {FLOOR_SHARE:.0%} of the median of the runs' ratios"}
        for name in runs[0]:
            value = statistics.median(r[name][0] for r in runs)
            floors["measured"][name] = round(value, 3)
            floors["floors"][name] = round(value * FLOOR_SHARE, 3)
        with open(FLOORS, "w") as f:
            json.dump(floors, f, indent=1)
            f.write("\n")
        print(f"wrote {FLOORS}")
        for name, value in floors["measured"].items():
            print(f"  {name:<24} measured {value:6.2f}  floor {floors['floors'][name]:6.2f}")
        return 0
    with open(FLOORS) as f:
        floors = json.load(f)
    ratios = measure_ratios()
    failed = []
    print(f"bench-guard (ratios; load average "
          f"{load_before[0]:.1f} -> {measure.load_average()[0]:.1f}, "
          f"{time.perf_counter() - started:.0f} s)")
    for name, (value, rounds) in ratios.items():
        floor = floors["floors"][name]
        ok = value >= floor
        if not ok:
            failed.append(name)
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<24} {value:6.2f}  (floor {floor:.2f}, "
              f"measured {floors['measured'][name]:.2f} on {floors['date']}; rounds "
              + ", ".join(f"{v:.2f}" for v in rounds) + ")")
    if failed:
        print(f"bench-guard: {len(failed)} ratio(s) below the floor: {', '.join(failed)}")
        return 1
    print("bench-guard: every ratio at or above its floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
