"""A ledger to torture: a seeded data directory, the real server in a child
process that can be killed (SIGKILL) and restarted on the same port and
data, and the checks run on what is left.

The program is deliberately plain (1 point per ruble, spend up to the whole
receipt, points active at once and never expiring) so that every balance
follows from the answers the clients saw, without the pricing engine:
that is what `replay` feeds the pure-Python twin.
"""

import os
import random
import signal
import sys
import time
from collections import Counter

import grpc

from kopilka.core import twin
from kopilka.core.batch import Batch
from kopilka.core.records import NEVER, Code
from kopilka.kernel import Ledger
from kopilka.servers import registry
from kopilka.servers.auth import TokenFile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import procs  # noqa: E402  (benchmarks/ is no package)

STORE = 42
LANES = 32
SEED_POINTS = 100_000
MAP_SIZE = 1 << 30
SETUP_TIME = 1_767_225_600_000_000      # the seed's operation time

PROGRAM = f"""
[program]
id = 1
name = "Torture chain"
currency = "RUB"
time_zone = "Europe/Moscow"

[[store]]
id = {STORE}
lanes = [{", ".join(str(n) for n in range(1, LANES + 1))}]

[[store]]
id = 43
lanes = [1]

[[version]]
number = 1
effective_from = 2024-01-01T00:00:00+03:00
point_value = 100

[version.items]
categories = ["goods"]

[version.earn]
points = 1
per = 100

[version.spend]
cap_bp = 10_000
"""


def card_of(account_index):
    return f"77{account_index + 1:014d}"


def seed_batches(members):
    """The seed, as batches: applied to the live ledger and to the replay twin
    alike, so both start from the same state."""
    program = registry.parse("toml", PROGRAM)
    put = Batch().put_program("seed/program", program.id, flags=program.kernel_flags,
                              utc_offset_minutes=program.utc_offset_minutes,
                              data=registry.encode("toml", PROGRAM))
    opens = Batch()
    for i in range(members):
        opens.open_account(f"seed/open/{i}", program.id, f"member-{i}".encode())
    return put, opens


def seed_points(accounts):
    batch = Batch()
    for i, account in enumerate(accounts):
        batch.link_card(f"seed/card/{i}", account, card_of(i).encode())
        batch.earn(f"seed/earn/{i}", account, SEED_POINTS, activates_at=0,
                   expires_at=NEVER)
    return batch


def apply_seed(ledger, members):
    """Applies the seed; returns the account ids, in member order."""
    put, opens = seed_batches(members)
    assert ledger.apply(put, SETUP_TIME)[0].code == Code.OK
    accounts = [r.a for r in ledger.apply(opens, SETUP_TIME)]
    assert all(r.code == Code.OK for r in ledger.apply(seed_points(accounts),
                                                       SETUP_TIME))
    return accounts


class World:
    """The data directory, its tokens and members, and the server process."""

    def __init__(self, root, members, *, map_size=MAP_SIZE):
        self.root = str(root)
        self.data = os.path.join(self.root, "data")
        self.logs = os.path.join(self.root, "logs")
        os.makedirs(self.logs, exist_ok=True)
        os.makedirs(self.data, exist_ok=True)
        self.map_size = map_size
        with Ledger(os.path.join(self.data, "ledger"), map_size=map_size) as ledger:
            self.accounts = apply_seed(ledger, members)
        tokens = TokenFile(os.path.join(self.data, "tokens.json"))
        self.tokens = {"pos": tokens.add("pos", [STORE]), "admin": tokens.add("admin"),
                       "integration": tokens.add("integration")}
        self.port = procs.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server = None
        self.starts = 0

    def metadata(self, role):
        return (("authorization", f"Bearer {self.tokens[role]}"),)

    def start(self, **config):
        """The server on this world's port (the same across restarts)."""
        self.starts += 1
        config.setdefault("map_size", self.map_size)
        self.server = procs.kopilka_server(
            "kopilka server", os.path.join(self.logs, f"server-{self.starts}.log"),
            data=self.data, listen=self.address, sweep_seconds=3600, **config)
        return self.server

    def kill(self):
        """SIGKILL: no cleanup of any kind, as a power cut is to the process."""
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.proc.wait(30)
        self.server.stop()       # closes its pipe; the process is gone already

    def stop(self):
        """SIGTERM (clean); the exit code."""
        return self.server.stop()

    def log_text(self):
        text = []
        for name in sorted(os.listdir(self.logs)):
            with open(os.path.join(self.logs, name), errors="replace") as f:
                text.append(f.read())
        return "".join(text)

    def ledger(self):
        return Ledger(os.path.join(self.data, "ledger"), map_size=self.map_size)


def wait_serving(channel, timeout=60.0):
    grpc.channel_ready_future(channel).result(timeout)


# --- checks ------------------------------------------------------------------

def journal(ledger):
    entries, seq = [], 1
    while True:
        page = ledger.journal(seq, 5000)
        if not page:
            return entries
        entries.extend(page)
        seq = page[-1].seq + 1


def replay(path, members, answers):
    """A fresh twin given the seed and then every acknowledged operation, as
    the answers told it (figures from the responses, not from pricing)."""
    ledger = twin.Ledger(path, map_size=MAP_SIZE, sync=False)
    apply_seed(ledger, members)
    batch = Batch()
    for a in answers:
        if a.kind == "hold":
            batch.hold(a.kernel_id, a.account, a.points, expires_at=a.expires)
        elif a.kind == "capture":
            batch.capture(a.kernel_id, a.account, hold=a.hold, spend=a.spent,
                          earn=a.earned, money=a.money)
        elif a.kind == "void":
            batch.void(a.kernel_id, a.hold)
        elif a.kind == "refund":
            batch.refund(a.kernel_id, a.original, money=a.money, give_back=a.returned,
                         claw_back=a.clawed_back)
    results = ledger.apply(batch, SETUP_TIME + 1) if len(batch) else []
    refused = [(a.kernel_id, r.code.name) for a, r in zip(answers, results) if not r.ok]
    return ledger, refused


def postings(entries):
    """Per operation id, the multiset of (entry type, amount, amount2) it
    journaled: what one application of it writes."""
    out = {}
    for e in entries:
        out.setdefault(e.op_id, Counter())[(e.type, e.amount, e.amount2)] += 1
    return out


BALANCE_FIELDS = ("available", "pending", "held", "balance", "debt")


def balances(ledger, accounts, now):
    return {a: tuple(getattr(ledger.balances(a, now), f) for f in BALANCE_FIELDS)
            for a in accounts}


def verify(world, answers, workdir, members):
    """What the issue promises, on the ledger left behind: every acknowledged
    operation in the journal exactly once and nothing else, balances equal to
    the twin's replay of the answers, audit clean. Returns figures."""
    seed_ids = {e.op_id for e in _seed_journal(workdir, members)}
    acked = {a.kernel_id: a for a in answers}
    assert len(acked) == len(answers), "an operation was answered twice"
    with world.ledger() as live:
        assert live.audit() == []
        entries = journal(live)
        now = time.time_ns() // 1000 + 1
        live_balances = balances(live, world.accounts, now)
    written = postings(entries)
    ghosts = set(written) - seed_ids - set(acked)
    lost = [k for k in acked if k not in written]
    assert not ghosts, f"journaled but never acknowledged: {sorted(ghosts)[:5]}"
    assert not lost, f"acknowledged but not journaled: {lost[:5]}"
    mirror, refused = replay(os.path.join(workdir, "replay"), members, answers)
    try:
        assert refused == [], refused[:5]
        assert mirror.audit() == []
        expected = postings(journal(mirror))
        duplicated = [k for k in acked if written[k] != expected[k]]
        assert not duplicated, [(k, written[k], expected[k]) for k in duplicated[:3]]
        assert balances(mirror, world.accounts, now) == live_balances
    finally:
        mirror.close()
    return {"journal_entries": len(entries), "lost": len(lost),
            "duplicated": len(duplicated), "ghosts": len(ghosts)}


def _seed_journal(workdir, members):
    path = os.path.join(workdir, "seed")
    with twin.Ledger(path, map_size=MAP_SIZE, sync=False) as ledger:
        apply_seed(ledger, members)
        return journal(ledger)


def rng_for(seed):
    return random.Random(seed)

