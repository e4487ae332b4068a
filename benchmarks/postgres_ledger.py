"""The PostgreSQL ledger a chain would build instead: a balance row per
account locked with SELECT ... FOR UPDATE, an entry per movement, the
operation id as a unique key for idempotency.

`Cluster` is a throwaway PostgreSQL server: initdb in a temporary
directory, started on a loopback port with every acknowledged commit on
disk (fsync on, synchronous_commit on, full_page_writes on), stopped and
removed at the end. Run as root, it runs as the `postgres` user (PostgreSQL
refuses root). Tuned as its operators would: 1 GiB of shared buffers, WAL
large enough that no checkpoint is forced during a run.

The ledger is one PL/pgSQL function per operation, so an operation is one
round trip: lock the balance row, answer a replayed id from its stored
operation, check, update the balance, insert the entries and the operation.
A refused operation writes nothing and returns its code (no exception, so a
batch goes on past it), with the kernel's codes. Unary: one operation per
transaction (autocommit). Batch: `batch` operations per transaction, sent
pipelined, sorted by account so that concurrent batches lock rows in one
order and never deadlock.
"""

import asyncio
import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import measure
import workload
from procs import free_port

KIND = {workload.EARN: 1, workload.SPEND: 2, workload.CAPTURE: 3, workload.REFUND: 4}

SCHEMA = """
CREATE TABLE accounts (
    id          bigint PRIMARY KEY,
    external_id text NOT NULL,
    balance     bigint NOT NULL CHECK (balance >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE operations (
    op_id      text PRIMARY KEY,          -- the idempotency key
    account    bigint NOT NULL,
    kind       smallint NOT NULL,
    digest     bytea NOT NULL,            -- of the request: a reused id is refused
    money      bigint NOT NULL,
    spent      bigint NOT NULL,
    earned     bigint NOT NULL,
    returned   bigint NOT NULL DEFAULT 0, -- refunded so far
    clawed     bigint NOT NULL DEFAULT 0,
    original   text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE entries (
    id         bigserial PRIMARY KEY,
    account    bigint NOT NULL,
    op_id      text NOT NULL,
    kind       smallint NOT NULL,
    points     bigint NOT NULL,
    money      bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

INDEXES = """
CREATE UNIQUE INDEX accounts_external ON accounts (external_id);
CREATE INDEX entries_account ON entries (account, id);   -- a member's history
"""

# Codes as the kernel's (kopilka.core.records.Code).
APPLY = """
CREATE FUNCTION apply_op(p_kind int, p_op text, p_account bigint, p_money bigint,
                         p_spend bigint, p_earn bigint, p_original text,
                         p_digest bytea) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
    v_prev    operations%ROWTYPE;
    v_orig    operations%ROWTYPE;
BEGIN
    SELECT balance INTO v_balance FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 9;                                   -- ACCOUNT_NOT_FOUND
    END IF;
    SELECT * INTO v_prev FROM operations WHERE op_id = p_op;
    IF FOUND THEN
        IF v_prev.digest = p_digest THEN
            RETURN 0;                               -- replayed: the first answer
        END IF;
        RETURN 2;                                   -- OP_ID_REUSED
    END IF;
    IF p_kind = 4 THEN
        SELECT * INTO v_orig FROM operations WHERE op_id = p_original FOR UPDATE;
        IF NOT FOUND OR v_orig.account <> p_account THEN
            RETURN 22;                              -- OPERATION_NOT_FOUND
        END IF;
        IF v_orig.returned + p_spend > v_orig.spent
           OR v_orig.clawed + p_earn > v_orig.earned THEN
            RETURN 24;                              -- REFUND_EXCEEDS_ORIGINAL
        END IF;
        IF v_balance + p_spend - p_earn < 0 THEN
            RETURN 16;                              -- INSUFFICIENT_POINTS
        END IF;
        UPDATE operations SET returned = returned + p_spend, clawed = clawed + p_earn
            WHERE op_id = p_original;
        UPDATE accounts SET balance = balance + p_spend - p_earn, updated_at = now()
            WHERE id = p_account;
        IF p_spend > 0 THEN
            INSERT INTO entries (account, op_id, kind, points, money)
                VALUES (p_account, p_op, 5, p_spend, -p_money);
        END IF;
        IF p_earn > 0 THEN
            INSERT INTO entries (account, op_id, kind, points, money)
                VALUES (p_account, p_op, 6, -p_earn, 0);
        END IF;
    ELSE
        IF v_balance < p_spend THEN
            RETURN 16;                              -- INSUFFICIENT_POINTS
        END IF;
        UPDATE accounts SET balance = balance - p_spend + p_earn, updated_at = now()
            WHERE id = p_account;
        IF p_spend > 0 THEN
            INSERT INTO entries (account, op_id, kind, points, money)
                VALUES (p_account, p_op, 2, -p_spend, p_money);
        END IF;
        IF p_earn > 0 THEN
            INSERT INTO entries (account, op_id, kind, points, money)
                VALUES (p_account, p_op, 1, p_earn, p_money);
        END IF;
    END IF;
    INSERT INTO operations (op_id, account, kind, digest, money, spent, earned, original)
        VALUES (p_op, p_account, p_kind, p_digest, p_money, p_spend, p_earn,
                NULLIF(p_original, ''));
    RETURN 0;
END $$;
"""

CALL = "SELECT apply_op(%s, %s, %s, %s, %s, %s, %s, %s)"
TABLES = ("accounts", "operations", "entries")


def params(op):
    digest = hashlib.blake2b(
        f"{op.kind}|{op.account}|{op.money}|{op.spend}|{op.earn}|{op.original}".encode(),
        digest_size=16).digest()
    return (KIND[op.kind], op.op_id, op.account, op.money, op.spend, op.earn,
            op.original, digest)


def bindir():
    """The PostgreSQL server programs: Debian keeps them in
    /usr/lib/postgresql/<version>/bin (the newest is taken)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise SystemExit("PostgreSQL's server is not installed (Debian: apt-get install "
                     "postgresql; `make bench` installs it)")


class Cluster:
    """A PostgreSQL server of its own, in a temporary directory."""

    SETTINGS = {
        "listen_addresses": "127.0.0.1", "fsync": "on", "synchronous_commit": "on",
        "full_page_writes": "on", "wal_sync_method": "fdatasync",
        "shared_buffers": "1GB", "max_wal_size": "16GB", "checkpoint_timeout": "30min",
        "max_connections": "300", "logging_collector": "off",
    }

    def __init__(self):
        self.bin = bindir()
        # Its own directory in the system's (world-traversable) temporary
        # directory, so the postgres user can reach it.
        self.root = tempfile.mkdtemp(prefix="kopilka-pg-",
                                     dir=os.environ.get("KOPILKA_BENCH_DIR"))
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:   # initdb and postgres refuse to run as root
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", self.data, "-U", "bench", "--auth=trust",
                  "-E", "UTF8", "--locale=C")
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            for key, value in {**self.SETTINGS, "port": str(self.port),
                               "unix_socket_directories": self.root}.items():
                f.write(f"{key} = '{value}'\n")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start")
        self.dsn = f"host=127.0.0.1 port={self.port} user=bench dbname=postgres"

    def _run(self, program, *args):
        result = subprocess.run([os.path.join(self.bin, program), *args], user=self.user,
                                capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            raise SystemExit(f"{program} failed: {result.stderr[-2000:]}")

    def pids(self):
        """The server's processes: the postmaster and its children."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                main = int(f.readline())
        except (OSError, ValueError):
            return []
        out = [main]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == main:
                            out.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return out

    def stop(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def connect(dsn, **kw):
    import psycopg
    return psycopg.connect(dsn, autocommit=True, **kw)


def populate(cluster, accounts):
    """The schema, and `accounts` accounts each credited once (an operation
    and an entry), loaded with COPY; then indexes, VACUUM ANALYZE and a
    checkpoint. Returns seconds taken."""
    started = time.perf_counter()
    with connect(cluster.dsn) as conn:
        conn.execute(SCHEMA)
        conn.execute(APPLY)
        digest = b"\0" * 16
        points = 10_000_000
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY accounts (id, external_id, balance) FROM STDIN") as copy:
                for i in range(1, accounts + 1):
                    copy.write_row((i, f"load-{i - 1}", points))
            with cur.copy("COPY operations (op_id, account, kind, digest, money, spent, "
                          "earned) FROM STDIN") as copy:
                for i in range(1, accounts + 1):
                    copy.write_row((f"load/earn/{i - 1}", i, 1, digest, 0, 0, points))
            with cur.copy("COPY entries (account, op_id, kind, points, money) "
                          "FROM STDIN") as copy:
                for i in range(1, accounts + 1):
                    copy.write_row((i, f"load/earn/{i - 1}", 1, points, 0))
        conn.execute(INDEXES)
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def storage(cluster):
    """Bytes of the ledger's tables with their indexes (and TOAST), of the
    WAL directory, and how many operations are stored."""
    with connect(cluster.dsn) as conn:
        by_table = {t: conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                                    (t,)).fetchone()[0] for t in TABLES}
        ops = conn.execute("SELECT count(*) FROM operations").fetchone()[0]
    wal = measure.allocated_bytes(os.path.join(cluster.data, "pg_wal"))
    return {"tables_bytes": sum(by_table.values()), "by_table": by_table,
            "wal_bytes": wal, "operations": ops}


async def apply_batch(conn, ops):
    """Result codes of `ops` applied in one transaction, pipelined."""
    async with conn.transaction():
        cur = conn.cursor()
        await cur.executemany(CALL, [params(op) for op in ops], returning=True)
        codes = []
        while True:
            codes.append((await cur.fetchone())[0])
            if not cur.nextset():
                return codes


async def run(cluster, *, accounts, variant, mode, connections, batch, seconds,
              warmup, run_id):
    """`connections` concurrent connections for warm-up + `seconds`, each
    applying its own stream: one operation per transaction (unary) or
    `batch` per transaction."""
    import psycopg
    conns = [await psycopg.AsyncConnection.connect(cluster.dsn, autocommit=True)
             for _ in range(connections)]
    started = time.perf_counter()
    window = (started + warmup, started + warmup + seconds)
    latencies, totals = [], {"ok": 0, "refused": {}}

    def tally(codes, took, end):
        if window[0] <= end <= window[1]:
            latencies.append(took)
            for code in codes:
                if code == 0:
                    totals["ok"] += 1
                else:
                    totals["refused"][code] = totals["refused"].get(code, 0) + 1

    async def one_by_one(n, conn):
        stream = workload.Stream(accounts, hot=variant == "hot", run=run_id, client=n)
        while time.perf_counter() < window[1]:
            op, = stream.take(1)
            t = time.perf_counter()
            cur = await conn.execute(CALL, params(op))
            code = (await cur.fetchone())[0]
            end = time.perf_counter()
            tally((code,), end - t, end)

    async def batches(n, conn):
        stream = workload.Stream(accounts, hot=variant == "hot", run=run_id, client=n)
        while time.perf_counter() < window[1]:
            ops = sorted(stream.take(batch), key=lambda op: op.account)
            t = time.perf_counter()
            codes = await apply_batch(conn, ops)
            end = time.perf_counter()
            tally(codes, end - t, end)

    work = one_by_one if mode == "unary" else batches
    tasks = [asyncio.ensure_future(work(n, c)) for n, c in enumerate(conns)]
    await asyncio.sleep(warmup)
    meter = measure.Meter(cluster.pids)
    await asyncio.gather(*tasks)
    meter.done()
    for c in conns:
        await c.close()
    return measure.row("postgresql", mode, variant, connections,
                       1 if mode == "unary" else batch, ok=totals["ok"],
                       rejected=sum(totals["refused"].values()), seconds=seconds,
                       latencies=latencies, meter=meter,
                       refused={str(k): v for k, v in totals["refused"].items()})
