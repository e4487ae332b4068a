"""Shared machinery of the commit-throughput benchmarks.

Configuration (environment variables, read once at import):

  KOPILKA_BENCH_ACCOUNTS        the large population (default 1,000,000)
  KOPILKA_BENCH_RATIO_ACCOUNTS  the small population, for the kernel/twin
                                ratio: a batch dirties few account pages
                                there (default 10,000)
  KOPILKA_BENCH_SECONDS         target timed seconds per kernel case (5)
  KOPILKA_BENCH_TWIN_SECONDS    target timed seconds per twin case (4)
  KOPILKA_BENCH_QUICK=1         developer mode: 100,000 accounts, ~1 s cases
                                (about 3 minutes in all)

The number of batches of a case is chosen from the time of its first
(warm-up, untimed) batch so that the case takes about its target time, within
fixed bounds per batch size. A run with other than the defaults saves its
JSON as results/kernel-<date>-<host>-<accounts>-dev.json, so it never
replaces a full run's results/kernel-<date>-<host>.json.
"""

import collections
import math
import os
import random
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field

from kopilka.core.batch import Batch, Results
from kopilka.core.records import Code

# --- configuration -----------------------------------------------------------


def _env_number(name, default, kind=int):
    raw = os.environ.get(name, "").replace("_", "")
    return kind(raw) if raw else default


QUICK = os.environ.get("KOPILKA_BENCH_QUICK", "") not in ("", "0")
BIG_ACCOUNTS = _env_number("KOPILKA_BENCH_ACCOUNTS",
                           100_000 if QUICK else 1_000_000)
RATIO_ACCOUNTS = _env_number("KOPILKA_BENCH_RATIO_ACCOUNTS", 10_000)
KERNEL_SECONDS = _env_number("KOPILKA_BENCH_SECONDS", 1.0 if QUICK else 5.0,
                             float)
TWIN_SECONDS = _env_number("KOPILKA_BENCH_TWIN_SECONDS",
                           1.0 if QUICK else 4.0, float)
DEFAULT_CONFIG = (not QUICK and BIG_ACCOUNTS == 1_000_000 and RATIO_ACCOUNTS == 10_000
                  and KERNEL_SECONDS == 5.0 and TWIN_SECONDS == 4.0)

MAP_SIZE = 16 << 30          # sparse: only what is written takes disk
BATCH_SIZES = (1_000, 8_000, 64_000)
OPERATIONS = ("earn", "spend", "capture+earn")
IMPLEMENTATIONS = ("kernel", "twin")
# Timed batches per case: at least / at most, by batch size.
MIN_BATCHES = {1_000: 20, 8_000: 5, 64_000: 3}
MAX_BATCHES = {1_000: 150, 8_000: 40, 64_000: 12}

PROGRAM = 1
INITIAL_POINTS = 1_000_000   # every account's first earn: enough for any spends
STORES, LANES = 500, 8       # 4,000 POS lanes, each numbering its receipts
N_LANES = STORES * LANES
SECOND = 1_000_000           # the ledger's clock is in microseconds
DAY = 86_400 * SECOND
EXPIRY = 365 * DAY           # points expire in 365 days, active at once
T0 = 1_748_736_000 * SECOND  # 2025-06-01 00:00 UTC: first benchmark batch
SETUP_NOW = T0 - DAY         # when the population was opened and credited
SETUP_CHUNK = 50_000


def label(n):
    """10000 -> '10k', 1000000 -> '1M'."""
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def open_ledger(impl, path, *, sync=True):
    if impl == "kernel":
        from kopilka.kernel import Ledger
    else:
        from kopilka.core.twin import Ledger
    return Ledger(str(path), map_size=MAP_SIZE, sync=sync)


def ok_count(results):
    """How many results are OK, and a Counter of the other codes."""
    codes = collections.Counter(r.code for r in results)
    ok = codes.pop(Code.OK, 0)
    return ok, codes


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def receipt_id(lane, receipt):
    """A POS op id: store, lane (till) and the lane's receipt number."""
    store, till = divmod(lane, LANES)
    return f"s{store:03d}/l{till}/r{receipt:07d}"


# --- populations -------------------------------------------------------------


@dataclass
class Population:
    """A ledger directory with `accounts` accounts (ids 1..accounts), each
    credited INITIAL_POINTS once, built by the kernel with sync off."""
    accounts: int
    path: str
    build_seconds: float
    data_bytes: int

    def fresh_copy(self, dest):
        """A copy for one case (both implementations read the same format).

        The lock file is left behind: LMDB makes a new one on open."""
        shutil.copytree(self.path, dest,
                        ignore=shutil.ignore_patterns("lock.mdb"))
        os.sync()  # the copy's writeback must not land in the measurement
        return dest


def build_population(accounts, path):
    started = time.perf_counter()
    os.makedirs(path)
    ledger = open_ledger("kernel", path, sync=False)
    try:
        results = ledger.apply(Batch().put_program("setup/program", PROGRAM),
                               SETUP_NOW)
        assert results[0].ok, results
        for start in range(0, accounts, SETUP_CHUNK):
            stop = min(accounts, start + SETUP_CHUNK)
            opens, earns = Batch(), Batch()
            for i in range(start, stop):
                opens.open_account(f"setup/open/{i:08d}", PROGRAM,
                                   f"cust{i:08d}")
                # The initial earns are receipts of the lanes, so the ops
                # database has lane history (as an aged ledger has) and the
                # benchmark's receipts land where each lane left off.
                lane = i % N_LANES
                earns.earn(receipt_id(lane, i // N_LANES + 1), i + 1,
                           INITIAL_POINTS,
                           activates_at=SETUP_NOW,
                           expires_at=SETUP_NOW + EXPIRY)
            opened = Results(ledger.apply_raw(bytes(opens), SETUP_NOW))
            ok, bad = ok_count(opened)
            assert ok == stop - start, f"open_account failed: {bad}"
            # Accounts are numbered 1, 2, ... in opening order.
            assert opened[0].a == start + 1 and opened[-1].a == stop
            credited = Results(ledger.apply_raw(bytes(earns), SETUP_NOW))
            ok, bad = ok_count(credited)
            assert ok == stop - start, f"initial earn failed: {bad}"
    finally:
        ledger.close()
    os.sync()  # built with sync off: flush it now, not during a measurement
    return Population(accounts, str(path), time.perf_counter() - started,
                      dir_bytes(path))


# --- workloads ---------------------------------------------------------------


class Workload:
    """The deterministic stream of batches of one (population, operation,
    batch size): POS-style op ids, sequential per lane, from lanes picked at
    random; accounts uniform at random; fixed seed. Built on demand and kept,
    so the twin replays exactly the kernel's first batches on an identical
    copy of the population."""

    def __init__(self, accounts, op, size):
        self.accounts, self.op, self.size = accounts, op, size
        self._rng = random.Random(zlib.crc32(f"{accounts}/{op}/{size}".encode()))
        # Each lane goes on from its receipts in the population's history.
        self._receipts = [len(range(lane, accounts, N_LANES))
                          for lane in range(N_LANES)]
        self.batches = []          # (bytes, now)
        self.build_seconds = 0.0
        self.kernel_outputs = []   # raw results, for the twin to compare

    def take(self, n):
        """The first n batches, building the missing ones."""
        started = time.perf_counter()
        while len(self.batches) < n:
            self.batches.append(self._next_batch(len(self.batches)))
        self.build_seconds += time.perf_counter() - started
        return self.batches[:n]

    def _next_batch(self, index):
        rng, receipts = self._rng, self._receipts
        lanes, accounts = len(receipts), self.accounts
        now = T0 + index * SECOND
        expires = now + EXPIRY
        batch = Batch()
        for _ in range(self.size):
            lane = rng.randrange(lanes)
            receipts[lane] += 1
            op_id = receipt_id(lane, receipts[lane])
            account = rng.randrange(1, accounts + 1)
            money = rng.randrange(100, 500_000)   # kopecks
            if self.op == "earn":
                batch.earn(op_id, account, max(1, money // 1_000), money=money,
                           activates_at=now, expires_at=expires)
            elif self.op == "spend":
                batch.spend(op_id, account, rng.randrange(1, 500), money=money)
            else:
                batch.capture(op_id, account, spend=rng.randrange(1, 300),
                              earn=max(1, money // 1_000), money=money,
                              activates_at=now, expires_at=expires)
        return bytes(batch), now


# --- measurement -------------------------------------------------------------


def percentile(sorted_values, q):
    """Nearest-rank percentile (p99 of fewer than 100 samples is the max). The
    rank is rounded first: 99.9% of 1,000 is rank 999, though 0.999 * 1000
    is 999.0000000000001 in floating point."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(round(q / 100 * len(sorted_values), 6)))
    return sorted_values[rank - 1]


@dataclass
class Row:
    impl: str
    accounts: int
    op: str
    batch_size: int
    batches: int            # timed commits (the warm-up batch excluded)
    ops: int
    seconds: float          # sum of the timed commits
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    warmup_ms: float
    build_seconds: float = 0.0   # building this case's batches (untimed)
    cpu_share: float = 0.0       # process CPU time / commit time (rest: waits)
    extra: dict = field(default_factory=dict)
    latencies: list = field(default_factory=list, repr=False)  # seconds, in order

    @classmethod
    def from_latencies(cls, impl, accounts, op, size, latencies, warmup):
        ordered = sorted(latencies)
        total = sum(ordered)
        ops = size * len(ordered)
        return cls(impl, accounts, op, size, len(ordered), ops, total,
                   ops / total if total else float("nan"),
                   percentile(ordered, 50) * 1e3, percentile(ordered, 99) * 1e3,
                   ordered[-1] * 1e3, total / len(ordered) * 1e3,
                   warmup * 1e3, latencies=list(latencies))

    def as_dict(self):
        out = asdict(self)
        out["latencies_ms"] = [round(x * 1e3, 3) for x in out.pop("latencies")]
        return out


class Collector:
    """Rows of the session, printed and saved at its end."""

    def __init__(self):
        self.rows = []
        self.populations = {}

    def add(self, row):
        self.rows.append(row)

    def find(self, impl, accounts, op, size):
        for row in self.rows:
            if (row.impl, row.accounts, row.op, row.batch_size) == (
                    impl, accounts, op, size):
                return row
        return None


COLLECTOR = Collector()


# --- the report --------------------------------------------------------------

GOAL_EARN_PER_S = 250_000
GOAL_P99_MS = 100.0
GOAL_RATIO = 5.0


def _ratio(kernel, twin):
    """Kernel ops/s over twin ops/s on the batches both timed: the twin's
    are the kernel's first ones, from the same ledger, so the work is the
    same (the kernel's later batches meet a larger ledger)."""
    if kernel is None or twin is None:
        return None
    common = min(kernel.batches, twin.batches)
    k = sum(kernel.latencies[:common])
    t = sum(twin.latencies[:common])
    return t / k if k else None


def summarize(collector):
    """The session's numbers as one JSON-ready dict."""
    rows = sorted(collector.rows, key=lambda r: (
        r.accounts, IMPLEMENTATIONS.index(r.impl), OPERATIONS.index(r.op),
        r.batch_size))
    ratios = []
    for accounts in sorted({r.accounts for r in rows}):
        for op in OPERATIONS:
            for size in BATCH_SIZES:
                k = collector.find("kernel", accounts, op, size)
                t = collector.find("twin", accounts, op, size)
                ratio = _ratio(k, t)
                if ratio is not None:
                    ratios.append({"accounts": accounts, "op": op,
                                   "batch_size": size, "kernel_over_twin": ratio,
                                   "same_batches": min(k.batches, t.batches),
                                   "full_runs": k.ops_per_s / t.ops_per_s})
    goals = {}
    earn = [r for r in rows if r.impl == "kernel" and r.op == "earn"
            and r.accounts == BIG_ACCOUNTS]
    if earn:
        goals["kernel_earn_big"] = {
            "accounts": BIG_ACCOUNTS,
            "want": f">= {GOAL_EARN_PER_S:,} earn/s with commit p99 < {GOAL_P99_MS:g} ms",
            "by_batch_size": {
                str(r.batch_size): {
                    "ops_per_s": r.ops_per_s, "p99_ms": r.p99_ms,
                    "met": r.ops_per_s >= GOAL_EARN_PER_S and r.p99_ms < GOAL_P99_MS}
                for r in earn},
        }
        goals["kernel_earn_big"]["met"] = any(
            v["met"] for v in goals["kernel_earn_big"]["by_batch_size"].values())
    small = [x for x in ratios if x["accounts"] == RATIO_ACCOUNTS]
    if small:
        goals["ratio_small"] = {
            "accounts": RATIO_ACCOUNTS,
            "want": f"kernel >= {GOAL_RATIO:g}x twin on every op and batch size",
            "min_ratio": min(x["kernel_over_twin"] for x in small),
            "met": all(x["kernel_over_twin"] >= GOAL_RATIO for x in small),
        }
    return {"rows": [r.as_dict() for r in rows], "ratios": ratios,
            "goals": goals,
            "populations": {str(k): v for k, v in collector.populations.items()}}


def render(summary, meta):
    """The printed report: rows, ratios, goals."""
    out = []
    out.append("=" * 78)
    out.append(f"Kopilka durable commit throughput  ({meta['date']}, {meta['host']}, "
               f"{meta['cpus']} CPUs, commit {meta['commit'][:10]})")
    out.append("sync on: every batch is one durable LMDB transaction; "
               "ops/s = ops / sum of commit times")
    out.append("p50/p99/max: per-commit latency of the timed batches (nearest rank); "
               "CPU: process CPU time / commit time")
    for accounts, info in summary["populations"].items():
        out.append(f"population {label(int(accounts))}: built in "
                   f"{info['build_seconds']:.1f} s, {info['data_bytes'] / 2**20:,.0f} MiB")
    out.append("")
    head = (f"{'accounts':>8}  {'impl':<6}  {'op':<12}  {'batch':>5}  {'commits':>7}"
            f"  {'ops/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}")
    out.append(head)
    out.append("-" * len(head))
    previous = None
    for r in summary["rows"]:
        group = (r["accounts"], r["impl"])
        if previous is not None and group != previous:
            out.append("")
        previous = group
        out.append(f"{label(r['accounts']):>8}  {r['impl']:<6}  {r['op']:<12}  "
                   f"{label(r['batch_size']):>5}  {r['batches']:>7}  "
                   f"{r['ops_per_s']:>10,.0f}  {r['p50_ms']:>8.1f}  "
                   f"{r['p99_ms']:>8.1f}  {r['max_ms']:>8.1f}  {r['cpu_share']:>4.0%}")
    if summary["ratios"]:
        pops = sorted({x["accounts"] for x in summary["ratios"]})
        out.append("")
        out.append("kernel / twin, ops/s on the same batches from the same ledger "
                   "(the twin's batches: the kernel's first ones)")
        head = f"{'op':<12}  {'batch':>5}" + "".join(
            f"  {label(p) + ' accts':>11}" for p in pops)
        out.append(head)
        out.append("-" * len(head))
        table = {(x["accounts"], x["op"], x["batch_size"]): x["kernel_over_twin"]
                 for x in summary["ratios"]}
        for op in OPERATIONS:
            for size in BATCH_SIZES:
                cells = [table.get((p, op, size)) for p in pops]
                if all(c is None for c in cells):
                    continue
                out.append(f"{op:<12}  {label(size):>5}" + "".join(
                    f"  {'-' if c is None else f'{c:.1f}x':>11}" for c in cells))
    goals = summary["goals"]
    if goals:
        out.append("")
        out.append("goals")
        g = goals.get("kernel_earn_big")
        if g:
            out.append(f"  kernel earn at {label(g['accounts'])} accounts, {g['want']}: "
                       f"{'MET' if g['met'] else 'NOT MET'}")
            for size, v in sorted(g["by_batch_size"].items(), key=lambda kv: int(kv[0])):
                out.append(f"    batch {label(int(size)):>3}: {v['ops_per_s']:>10,.0f} /s, "
                           f"p99 {v['p99_ms']:.1f} ms  {'met' if v['met'] else 'not met'}")
        g = goals.get("ratio_small")
        if g:
            out.append(f"  at {label(g['accounts'])} accounts, {g['want']}: "
                       f"{'MET' if g['met'] else 'NOT MET'} (lowest {g['min_ratio']:.1f}x)")
    out.append("=" * 78)
    return "\n".join(out)
