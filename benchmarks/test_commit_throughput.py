"""Durable commit throughput of the Cython kernel and its pure-Python twin.

`make bench-kernel` runs these. For each population (10k accounts, where a batch
dirties few pages and kernel/twin measures the kernels' own work; and 1M
accounts, where the disk is a bound), each operation (earn, spend, a capture
that spends and earns) and each batch size (1k, 8k, 64k), the kernel and then
the twin apply the same stream of batches, each on a fresh copy of the same
populated ledger, with sync on: one durable LMDB transaction per batch.

Only `apply` is timed, batch by batch, for the commit latency p50/p99; the
batches are built beforehand. Every result must be OK, and the twin's results
must equal the kernel's for the batches both applied.

Quick mode for development: `KOPILKA_BENCH_QUICK=1 make bench-kernel` (see
benchlib.py for the other knobs); `make bench-kernel BENCH_ARGS='-k 10k'` runs
a subset.
"""

import gc
import time

import pytest

import benchlib
from benchlib import (BATCH_SIZES, IMPLEMENTATIONS, MAX_BATCHES, MIN_BATCHES,
                      OPERATIONS, Results, Row, label, ok_count, open_ledger)

POPULATIONS = list(dict.fromkeys((benchlib.RATIO_ACCOUNTS, benchlib.BIG_ACCOUNTS)))
CASES = [(accounts, op, size, impl)
         for accounts in POPULATIONS
         for op in OPERATIONS
         for size in BATCH_SIZES
         for impl in IMPLEMENTATIONS]


def _case_id(case):
    accounts, op, size, impl = case
    return f"{label(accounts)}-{op}-{label(size)}-{impl}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_commit_throughput(benchmark, populations, workloads, case_dir, case):
    accounts, op, size, impl = case
    if benchmark.disabled:
        pytest.skip("benchmarks run with --benchmark-enable (make bench-kernel)")
    population = populations.get(accounts)
    workload = workloads.get(accounts, op, size)
    budget = benchlib.KERNEL_SECONDS if impl == "kernel" else benchlib.TWIN_SECONDS

    ledger = open_ledger(impl, population.fresh_copy(case_dir))
    # The kernel returns packed bytes; the twin has no raw entry point, its
    # apply packs the same bytes and wraps them in a lazy Results.
    apply = ledger.apply_raw if impl == "kernel" else ledger.apply
    latencies, cpu, outputs = [], [], []
    try:
        # Warm-up: batch 0, applied but not in the statistics; its time sets
        # how many batches fit the case's budget.
        (raw, now), = workload.take(1)
        started = time.perf_counter()
        outputs.append(apply(raw, now))
        warmup = time.perf_counter() - started
        rounds = min(MAX_BATCHES[size],
                     max(MIN_BATCHES[size], round(budget / warmup)))
        batches = workload.take(1 + rounds)
        upcoming = iter(batches[1:])

        def setup():
            return next(upcoming), {}

        def commit(raw, now):
            cpu_started = time.process_time()
            started = time.perf_counter()
            out = apply(raw, now)
            latencies.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
            outputs.append(out)

        gc.collect()
        benchmark.group = f"{label(accounts)} accounts, {op}, batch {label(size)}"
        benchmark.pedantic(commit, setup=setup, rounds=rounds, iterations=1)
    finally:
        ledger.close()

    # Outside the timed part: every operation of every batch must be OK.
    decoded = [Results(out) if impl == "kernel" else out for out in outputs]
    assert [len(r) for r in decoded] == [size] * (1 + rounds)
    ok, bad = 0, {}
    for results in decoded:
        n_ok, n_bad = ok_count(results)
        ok += n_ok
        for code, n in n_bad.items():
            bad[code.name] = bad.get(code.name, 0) + n
    assert not bad and ok == size * (1 + rounds), f"{ok} OK, others: {bad}"

    # The twin is the kernel's specification: same batches from the same
    # ledger must give the same results.
    if impl == "kernel":
        workload.kernel_outputs = outputs
    else:
        reference = workload.kernel_outputs
        for index, (mine, theirs) in enumerate(zip(decoded, reference)):
            assert list(mine) == list(Results(theirs)), (
                f"twin and kernel differ on batch {index}")

    row = Row.from_latencies(impl, accounts, op, size, latencies, warmup)
    row.build_seconds = workload.build_seconds
    row.cpu_share = sum(cpu) / row.seconds
    row.extra["data_bytes_after"] = benchlib.dir_bytes(case_dir)
    benchlib.COLLECTOR.add(row)
    benchmark.extra_info.update(ops_per_s=round(row.ops_per_s),
                                p50_ms=round(row.p50_ms, 2),
                                p99_ms=round(row.p99_ms, 2), ops=row.ops)
    print(f"\n  {_case_id(case)}: {row.batches} commits, {row.ops_per_s:,.0f} ops/s, "
          f"p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms, "
          f"CPU {row.cpu_share:.0%} of commit time "
          f"(warm-up {row.warmup_ms:.1f} ms)", flush=True)
