"""Kopilka in process: the Cython kernel (or its pure-Python twin) applying
the comparison's operations in batches, one durable LMDB commit each.

One writer, as in the server (its group-commit writer is one thread).
Throughput is operations over the time spent in `apply` (building a batch's
bytes is the caller's work, done before the clock starts); the latency of
an operation is its batch's commit.
"""

import time

from kopilka.core.batch import Batch, Results
from kopilka.core.records import Code

import measure
import workload

YEAR = 365 * 86_400_000_000


def open_ledger(impl, path, *, sync=True, map_size):
    if impl == "kernel":
        from kopilka.kernel import Ledger
    else:
        from kopilka.core.twin import Ledger
    return Ledger(str(path), map_size=map_size, sync=sync)


def encode(ops, now):
    """The kernel batch of workload operations (store 42, their lanes)."""
    batch = Batch()
    expires = now + YEAR
    for op in ops:
        where = {"store": workload.STORE, "lane": op.lane}
        if op.kind == workload.EARN:
            batch.earn(op.op_id, op.account, op.earn, money=op.money,
                       activates_at=now, expires_at=expires, **where)
        elif op.kind == workload.SPEND:
            batch.spend(op.op_id, op.account, op.spend, money=op.money, **where)
        elif op.kind == workload.CAPTURE:
            batch.capture(op.op_id, op.account, spend=op.spend, earn=op.earn,
                          money=op.money, activates_at=now, expires_at=expires,
                          **where)
        else:
            batch.refund(op.op_id, op.original, money=op.money,
                         give_back=op.spend, claw_back=op.earn, **where)
    return bytes(batch)


def databases(path):
    """Entries and bytes (pages in use) of each database of the ledger at
    `path`, and its data file's high-water mark as "_file"."""
    import lmdb

    from kopilka.core.records import DATABASES
    env = lmdb.open(str(path), max_dbs=16, readonly=True)
    out = {}
    try:
        with env.begin() as txn:
            for name in DATABASES:
                s = txn.stat(env.open_db(name, txn=txn, create=False))
                pages = s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                out[name.decode()] = {"entries": s["entries"], "bytes": pages * s["psize"]}
        out["_file"] = {"entries": 0, "bytes": (env.info()["last_pgno"] + 1)
                        * env.stat()["psize"]}
    finally:
        env.close()
    return out


def used_bytes(path):
    """The bytes of the ledger's data file its data takes: LMDB's pages up to
    the last one in use (free ones among them). Not the file's allocated
    size: the kernel allocates its file ahead of the data (it grows by up to
    a quarter at a time), which that would count as if used."""
    return databases(path)["_file"]["bytes"]


def stored_ops(path):
    """How many operations the ledger has recorded (refused ones leave none)."""
    return databases(path)["ops"]["entries"]


def count(raw):
    """(OK, {code name: count of the others}) of packed results."""
    ok, other = 0, {}
    for r in Results(raw):
        if r.code == Code.OK:
            ok += 1
        else:
            other[r.code.name] = other.get(r.code.name, 0) + 1
    return ok, other


def run(impl, path, *, accounts, variant, batch, seconds, run_id, map_size,
        sync=True, max_batches=10_000):
    """Batches of `batch` operations for about `seconds` of commit time (at
    least 3 after one warm-up); the run's row."""
    ledger = open_ledger(impl, path, sync=sync, map_size=map_size)
    apply = ledger.apply_raw if impl == "kernel" else \
        (lambda raw, now: ledger.apply(raw, now).raw)
    stream = workload.Stream(accounts, hot=variant == "hot", run=run_id)
    latencies, ok, refused = [], 0, {}
    try:
        now = time.time_ns() // 1000
        apply(encode(stream.take(batch), now), now)       # warm-up
        meter = measure.Meter()
        spent = 0.0
        while (spent < seconds or len(latencies) < 3) and len(latencies) < max_batches:
            now = time.time_ns() // 1000
            raw = encode(stream.take(batch), now)
            started = time.perf_counter()
            out = apply(raw, now)
            took = time.perf_counter() - started
            spent += took
            latencies.append(took)
            n_ok, other = count(out)
            ok += n_ok
            for name, n in other.items():
                refused[name] = refused.get(name, 0) + n
    finally:
        ledger.close()
    return measure.row(f"kopilka-{impl}", "batch", variant, 1, batch,
                       ok=ok, rejected=sum(refused.values()), seconds=spent,
                       latencies=latencies, meter=meter, refused=refused,
                       sync=sync)
