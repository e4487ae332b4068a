"""The disk's ceiling for an LMDB ledger: raw random puts, one durable
commit per batch (py-lmdb, sync on), into a table of as many keys as the
ledger has accounts, values the size of a one-lot account (48 bytes). Every
put dirties its key's leaf page, as an operation dirties its account's: what
the kernel does beyond this (op ids, journal, aggregates, the rules) is its
own cost.
"""

import random
import time

import lmdb

import measure

VALUE = bytes(range(48))


def populate(path, keys, map_size):
    env = lmdb.open(str(path), map_size=map_size, sync=False, metasync=False)
    with env.begin(write=True) as txn:
        cursor = txn.cursor()
        cursor.putmulti(((k.to_bytes(8, "big"), VALUE) for k in range(1, keys + 1)),
                        append=True)
    env.sync(True)
    env.close()


def run(path, *, keys, batch, seconds, map_size, seed=0, max_batches=10_000):
    env = lmdb.open(str(path), map_size=map_size, sync=True, metasync=True)
    rng = random.Random(seed)
    latencies = []

    def commit():
        picks = [rng.randint(1, keys).to_bytes(8, "big") for _ in range(batch)]
        started = time.perf_counter()
        with env.begin(write=True) as txn:
            for key in picks:
                txn.put(key, VALUE)
        return time.perf_counter() - started

    try:
        commit()   # warm-up
        meter = measure.Meter()
        spent = 0.0
        while (spent < seconds or len(latencies) < 3) and len(latencies) < max_batches:
            took = commit()
            spent += took
            latencies.append(took)
    finally:
        env.close()
    return measure.row("lmdb-raw-puts", "batch", "spread", 1, batch,
                       ok=batch * len(latencies), rejected=0, seconds=spent,
                       latencies=latencies, meter=meter)
