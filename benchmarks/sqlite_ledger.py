"""The embedded alternative: the PostgreSQL ledger's tables and steps in
SQLite (WAL, synchronous=FULL: every commit's WAL frames fsynced before it
returns), applied from Python's sqlite3.

SQLite has one writer at a time: a transaction takes the write lock up
front (BEGIN IMMEDIATE) and other connections wait for it (busy timeout).
Concurrency here is threads with a connection each (sqlite3 releases the
GIL while SQLite works). Unary: one operation per transaction; batch:
`batch` per transaction.
"""

import os
import sqlite3
import threading
import time

import measure
import postgres_ledger
import workload

SCHEMA = """
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY, external_id TEXT NOT NULL,
    balance INTEGER NOT NULL CHECK (balance >= 0), updated_at INTEGER NOT NULL);
CREATE TABLE operations (
    op_id TEXT PRIMARY KEY, account INTEGER NOT NULL, kind INTEGER NOT NULL,
    digest BLOB NOT NULL, money INTEGER NOT NULL, spent INTEGER NOT NULL,
    earned INTEGER NOT NULL, returned INTEGER NOT NULL DEFAULT 0,
    clawed INTEGER NOT NULL DEFAULT 0, original TEXT,
    created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    id INTEGER PRIMARY KEY, account INTEGER NOT NULL, op_id TEXT NOT NULL,
    kind INTEGER NOT NULL, points INTEGER NOT NULL, money INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
"""
INDEXES = """
CREATE UNIQUE INDEX accounts_external ON accounts (external_id);
CREATE INDEX entries_account ON entries (account, id);
"""


def connect(path):
    conn = sqlite3.connect(path, isolation_level=None, timeout=60.0,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def populate(path, accounts):
    started = time.perf_counter()
    conn = connect(path)
    conn.execute("PRAGMA synchronous=OFF")    # setup only
    conn.executescript(SCHEMA)
    now = time.time_ns() // 1000
    points = 10_000_000
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?)",
                     ((i, f"load-{i - 1}", points, now) for i in range(1, accounts + 1)))
    conn.executemany("INSERT INTO operations (op_id, account, kind, digest, money, spent, "
                     "earned, created_at) VALUES (?, ?, 1, ?, 0, 0, ?, ?)",
                     ((f"load/earn/{i - 1}", i, b"\0" * 16, points, now)
                      for i in range(1, accounts + 1)))
    conn.executemany("INSERT INTO entries (account, op_id, kind, points, money, created_at) "
                     "VALUES (?, ?, 1, ?, 0, ?)",
                     ((i, f"load/earn/{i - 1}", points, now)
                      for i in range(1, accounts + 1)))
    conn.execute("COMMIT")
    conn.executescript(INDEXES)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    os.sync()
    return time.perf_counter() - started


def storage(path):
    conn = connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ops = conn.execute("SELECT count(*) FROM operations").fetchone()[0]
    conn.close()
    return {"tables_bytes": measure.allocated_bytes(path),
            "wal_bytes": measure.allocated_bytes(path + "-wal"), "operations": ops}


def apply(conn, op, now):
    """One operation's steps inside the caller's transaction; the kernel's
    result code (see postgres_ledger.APPLY, which this mirrors)."""
    kind, op_id, account, money, spend, earn, original, digest = \
        postgres_ledger.params(op)
    row = conn.execute("SELECT balance FROM accounts WHERE id = ?", (account,)).fetchone()
    if row is None:
        return 9
    balance = row[0]
    prev = conn.execute("SELECT digest FROM operations WHERE op_id = ?",
                        (op_id,)).fetchone()
    if prev is not None:
        return 0 if prev[0] == digest else 2
    entries = []
    if kind == 4:
        orig = conn.execute("SELECT account, spent, earned, returned, clawed FROM "
                            "operations WHERE op_id = ?", (original,)).fetchone()
        if orig is None or orig[0] != account:
            return 22
        if orig[3] + spend > orig[1] or orig[4] + earn > orig[2]:
            return 24
        if balance + spend - earn < 0:
            return 16
        conn.execute("UPDATE operations SET returned = returned + ?, clawed = clawed + ? "
                     "WHERE op_id = ?", (spend, earn, original))
        delta = spend - earn
        if spend:
            entries.append((account, op_id, 5, spend, -money, now))
        if earn:
            entries.append((account, op_id, 6, -earn, 0, now))
    else:
        if balance < spend:
            return 16
        delta = earn - spend
        if spend:
            entries.append((account, op_id, 2, -spend, money, now))
        if earn:
            entries.append((account, op_id, 1, earn, money, now))
    conn.execute("UPDATE accounts SET balance = balance + ?, updated_at = ? WHERE id = ?",
                 (delta, now, account))
    conn.executemany("INSERT INTO entries (account, op_id, kind, points, money, created_at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", entries)
    conn.execute("INSERT INTO operations (op_id, account, kind, digest, money, spent, "
                 "earned, original, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (op_id, account, kind, digest, money, spend, earn, original or None, now))
    return 0


def run(path, *, accounts, variant, mode, connections, batch, seconds, warmup, run_id):
    conns = [connect(path) for _ in range(connections)]
    size = 1 if mode == "unary" else batch
    started = time.perf_counter()
    window = (started + warmup, started + warmup + seconds)
    lock = threading.Lock()
    latencies, totals = [], {"ok": 0, "refused": {}}

    def worker(n, conn):
        stream = workload.Stream(accounts, hot=variant == "hot", run=run_id, client=n)
        while time.perf_counter() < window[1]:
            ops = stream.take(size)
            t = time.perf_counter()
            now = time.time_ns() // 1000
            conn.execute("BEGIN IMMEDIATE")
            codes = [apply(conn, op, now) for op in ops]
            conn.execute("COMMIT")
            end = time.perf_counter()
            if window[0] <= end <= window[1]:
                with lock:
                    latencies.append(end - t)
                    for code in codes:
                        if code == 0:
                            totals["ok"] += 1
                        else:
                            totals["refused"][code] = totals["refused"].get(code, 0) + 1

    threads = [threading.Thread(target=worker, args=(n, c)) for n, c in enumerate(conns)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window[0] - time.perf_counter()))
    meter = measure.Meter()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return measure.row("sqlite", mode, variant, connections, size, ok=totals["ok"],
                       rejected=sum(totals["refused"].values()), seconds=seconds,
                       latencies=latencies, meter=meter,
                       refused={str(k): v for k, v in totals["refused"].items()})
