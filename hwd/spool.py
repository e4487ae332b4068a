"""The durable, bounded spool of reads waiting for the core's acknowledgement.

Every accepted read goes into the spool before it is sent; it leaves only
when the core acknowledged it (`ack`), or when it grew too old to be worth
sending (`drop_stale`). While the core is unreachable the spool fills; on
reconnect `pending` gives the reads back oldest first, and resending one
the core already took is harmless (it de-duplicates by read id). The
uplink reads it through a cursor (`pending_after`: the reads after those
already in flight on its stream) and removes each acknowledgement
message's reads in one transaction (`ack_many`: one fsync, not one per read).

Storage: SQLite in WAL mode with ``synchronous = FULL``, one table ordered
by an AUTOINCREMENT sequence. Chosen over LMDB because the spool is a small
FIFO with a secondary key (read id) and a few counts, which SQL says in one
statement each, where LMDB would need two sub-databases kept in step by
hand and a map size to guess; and because WAL lets `kopilka hwd status`
read the spool while the daemon writes it. With synchronous = FULL a
commit returns only after the WAL is fsynced, so `put` returning means the
read survives a process kill and a power cut. Each `put` is its own
transaction: one fsync per read, a few milliseconds, far below the rate at
which cashiers swipe cards.

Bound: at most `max_reads` reads. When full, `put` refuses the new read
(returns False) and counts it in `dropped_full`: the reads already spooled
are older, so they are the ones whose points customers have been waiting
for longest, and a reader gone wild cannot push real reads out. Space comes
back as the core acknowledges or as `drop_stale` removes old reads.

Counters (`dropped_full`, `dropped_stale`) count since the spool was opened,
as Prometheus counters do; the reads themselves are what must survive.

The spool file holds card numbers (never track data): it is created
readable by its owner only. One process owns a spool; methods may be
called from any of its threads.
"""

import os
import sqlite3
import threading

from .events import LaneRead

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reads (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    read_id      TEXT NOT NULL UNIQUE,
    lane         TEXT NOT NULL,
    reader       TEXT NOT NULL,
    card_number  TEXT NOT NULL,
    source       TEXT NOT NULL,
    symbology    TEXT,
    read_time_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS reads_by_time ON reads (read_time_us);
"""
_COLUMNS = "read_id, lane, reader, card_number, source, symbology, read_time_us"


class Spool:
    """A durable FIFO of `LaneRead`s, at most `max_reads` of them (module doc)."""

    def __init__(self, path, max_reads=100_000):
        if not isinstance(max_reads, int) or max_reads < 1:
            raise ValueError("max_reads must be a positive integer")
        self.path, self.max_reads = os.fspath(path), max_reads
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"the spool needs WAL mode, SQLite gave {mode!r}")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._depth = self._db.execute("SELECT COUNT(*) FROM reads").fetchone()[0]
        self.dropped_full = 0
        self.dropped_stale = 0

    def put(self, read):
        """Append `read`; True once it is durable, False when the spool is full.

        Putting a read id already spooled is a no-op that returns True."""
        with self._lock:
            if self._depth >= self.max_reads:
                self.dropped_full += 1
                return False
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO reads ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (read.read_id, read.lane, read.reader, read.card_number, read.source,
                 read.symbology, read.read_time_us))
            self._depth += cur.rowcount
            return True

    def pending(self, limit=500):
        """The oldest `limit` unacknowledged reads, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM reads ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [LaneRead(*row) for row in rows]

    def pending_after(self, seq, limit=500):
        """[(seq, read)] of the oldest `limit` reads spooled after `seq`, oldest first.

        The uplink's cursor: reads already sent on the open stream (up to
        `seq`) stay spooled until acknowledged, and are not sent twice on it."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT seq, {_COLUMNS} FROM reads WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit)).fetchall()
        return [(row[0], LaneRead(*row[1:])) for row in rows]

    def ack_many(self, read_ids):
        """Remove acknowledged reads in one transaction (one fsync); how many went."""
        read_ids = list(read_ids)
        if not read_ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany("DELETE FROM reads WHERE read_id = ?",
                                           [(r,) for r in read_ids])
                removed = cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth -= removed
            return removed

    def oldest_read_us(self):
        """The read time of the oldest spooled read, or None when empty."""
        with self._lock:
            return self._db.execute("SELECT MIN(read_time_us) FROM reads").fetchone()[0]

    def ack(self, read_id):
        """Remove an acknowledged read; False when it was not spooled (any more)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM reads WHERE read_id = ?", (read_id,))
            self._depth -= cur.rowcount
            return cur.rowcount == 1

    def drop_stale(self, now_us, max_age_us):
        """Remove the reads older than `max_age_us` at `now_us`; how many went.

        A read exactly `max_age_us` old stays."""
        with self._lock:
            cur = self._db.execute("DELETE FROM reads WHERE read_time_us < ?",
                                   (now_us - max_age_us,))
            self._depth -= cur.rowcount
            self.dropped_stale += cur.rowcount
            return cur.rowcount

    def depth(self):
        with self._lock:
            return self._depth

    def close(self):
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
