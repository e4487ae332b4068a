"""The comparison's ledgers do the same work: the workload's operations are
all accepted by Kopilka's kernel and twin (with identical results), and the
SQLite and PostgreSQL ledgers of benchmarks/ end with the same balance on
every account as Kopilka, refusing what Kopilka refuses (a reused id, a
second refund, a spend beyond the balance) and answering a replay without
applying it twice. PostgreSQL's part runs where its server and psycopg are
installed (`make bench` installs them)."""

import asyncio
import dataclasses
import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import kopilka_local  # noqa: E402
import load  # noqa: E402
import sqlite_ledger  # noqa: E402
import workload  # noqa: E402
from kopilka.core.batch import Results  # noqa: E402

ACCOUNTS = 60
POINTS = 10_000_000   # what every population credits each account


def _takes(hot=False, n=6, size=40):
    stream = workload.Stream(ACCOUNTS, hot=hot, run="hot" if hot else "spread")
    return [stream.take(size) for _ in range(n)]


def test_streams_are_deterministic_and_refund_only_earlier_receipts():
    a, b = _takes(), _takes()
    assert a == b
    ops = [op for take in a for op in take]
    assert len({op.op_id for op in ops}) == len(ops)
    assert {op.kind for op in ops} == set(workload.KINDS)
    seen = set()
    for take in a:
        for op in take:
            if op.kind == workload.REFUND:
                assert op.original in seen  # dealt by an earlier take
        seen |= {op.op_id for op in take}
    refunded = [op.original for op in ops if op.kind == workload.REFUND]
    assert len(refunded) == len(set(refunded))


def test_hot_streams_put_a_tenth_of_operations_on_100_accounts():
    stream = workload.Stream(1_000_000, hot=True, run="h")
    ops = [op for op in stream.take(20_000) if op.kind != workload.REFUND]
    share = sum(op.account <= workload.HOT_ACCOUNTS for op in ops) / len(ops)
    assert 0.08 < share < 0.12
    spread = workload.Stream(1_000_000, run="h").take(20_000)
    assert sum(op.account <= workload.HOT_ACCOUNTS for op in spread) < 10


@pytest.fixture(scope="module")
def kopilka_balances(tmp_path_factory):
    """Every account's balance after the takes, on the kernel; the kernel
    and the twin gave the same results, every one OK."""
    data = str(tmp_path_factory.mktemp("kopilka") / "data")
    load.seed(data, ACCOUNTS, points=POINTS, map_size=64 << 20)
    copy = data + "-twin"
    shutil.copytree(os.path.join(data, "ledger"), copy)
    kernel = kopilka_local.open_ledger("kernel", os.path.join(data, "ledger"),
                                       sync=False, map_size=64 << 20)
    twin = kopilka_local.open_ledger("twin", copy, sync=False, map_size=64 << 20)
    try:
        for hot in (False, True):
            for take in _takes(hot):
                now = time.time_ns() // 1000
                raw = kopilka_local.encode(take, now)
                out = kernel.apply_raw(raw, now)
                assert kopilka_local.count(out) == (len(take), {})
                assert list(Results(out)) == list(twin.apply(raw, now))
        now = time.time_ns() // 1000
        return {a: kernel.balances(a, now).balance for a in range(1, ACCOUNTS + 1)}
    finally:
        kernel.close()
        twin.close()


def test_sqlite_ledger_ends_where_kopilka_does(tmp_path, kopilka_balances):
    path = str(tmp_path / "ledger.db")
    sqlite_ledger.populate(path, ACCOUNTS)
    conn = sqlite_ledger.connect(path)
    for hot in (False, True):
        for take in _takes(hot):
            conn.execute("BEGIN IMMEDIATE")
            codes = [sqlite_ledger.apply(conn, op, 0) for op in take]
            conn.execute("COMMIT")
            assert codes == [0] * len(take)
    balances = dict(conn.execute("SELECT id, balance FROM accounts"))
    assert balances == kopilka_balances
    _refusals(lambda op: sqlite_ledger.apply(conn, op, 0),
              lambda a: conn.execute("SELECT balance FROM accounts WHERE id = ?",
                                     (a,)).fetchone()[0])
    conn.close()


def _refusals(apply, balance):
    """What both databases must refuse or replay, with the kernel's codes."""
    earn = workload.Op(workload.EARN, "x/earn", 1, 50_000, 0, 50, 1)
    before = balance(1)
    assert apply(earn) == 0
    assert apply(earn) == 0                        # a replay: applied once
    assert balance(1) == before + 50
    assert apply(dataclasses.replace(earn, earn=51)) == 2      # OP_ID_REUSED
    refund = workload.Op(workload.REFUND, "x/refund", 1, 50_000, 0, 50, 1, "x/earn")
    assert apply(refund) == 0
    assert apply(dataclasses.replace(refund, op_id="x/refund2")) == 24   # REFUND_EXCEEDS_ORIGINAL
    spend = workload.Op(workload.SPEND, "x/spend", 2, 50_000, balance(2) + 1, 0, 1)
    assert apply(spend) == 16                      # INSUFFICIENT_POINTS
    assert balance(1) == before


def test_postgresql_ledger_ends_where_kopilka_does(kopilka_balances):
    psycopg = pytest.importorskip("psycopg")
    import postgres_ledger as pg
    try:
        pg.bindir()
    except SystemExit:
        pytest.skip("PostgreSQL's server is not installed")
    cluster = pg.Cluster()
    try:
        pg.populate(cluster, ACCOUNTS)

        async def run():
            conn = await psycopg.AsyncConnection.connect(cluster.dsn, autocommit=True)
            for hot in (False, True):
                for take in _takes(hot):
                    # as the benchmark's batches: sorted by account
                    ops = sorted(take, key=lambda op: op.account)
                    assert await pg.apply_batch(conn, ops) == [0] * len(ops)
            await conn.close()
        asyncio.run(run())
        with pg.connect(cluster.dsn) as conn:
            balances = dict(conn.execute("SELECT id, balance FROM accounts"))
            assert balances == kopilka_balances
            _refusals(lambda op: conn.execute(pg.CALL, pg.params(op)).fetchone()[0],
                      lambda a: conn.execute("SELECT balance FROM accounts WHERE id = %s",
                                             (a,)).fetchone()[0])
        assert pg.storage(cluster)["operations"] == ACCOUNTS + 12 * 40 + 2
    finally:
        cluster.stop()
