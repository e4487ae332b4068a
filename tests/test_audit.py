"""The audit finds tampering and loss, and says where."""

import lmdb
import pytest

from kopilka import kernel
from kopilka.core import twin
from kopilka.core.batch import Batch
from kopilka.core.codec import Account, JournalEntry
from kopilka.core.records import EXPIRY_KEY, U64

DAY = 86_400_000_000
IMPLEMENTATIONS = {"twin": twin.Ledger, "kernel": kernel.Ledger}


@pytest.fixture(params=IMPLEMENTATIONS)
def path(request, tmp_path):
    with IMPLEMENTATIONS[request.param](tmp_path, sync=False) as ledger:
        ledger.apply(Batch().put_program("p", 1).open_account("a1", 1, "m1")
                     .open_account("a2", 1, "m2")
                     .earn("e1", 1, 100, expires_at=30 * DAY)
                     .earn("e2", 2, 40, expires_at=20 * DAY)
                     .spend("s1", 1, 30), DAY)
        assert ledger.audit() == []
    return tmp_path, IMPLEMENTATIONS[request.param]


def tamper(where, db, change):
    env = lmdb.open(str(where), max_dbs=16)
    handle = env.open_db(db)
    with env.begin(write=True, db=handle) as txn:
        change(txn)
    env.close()


def audit(where, Ledger):
    with Ledger(where) as ledger:
        return ledger.audit()


def test_edited_journal_amount_breaks_the_chain_and_the_balances(path):
    where, Ledger = path

    def change(txn):
        key = U64.pack(4)  # the first earn
        entry = JournalEntry.decode(txn.get(key))
        entry.amount += 1
        txn.put(key, entry.body() + entry.hash)
    tamper(where, b"journal", change)
    problems = audit(where, Ledger)
    assert "journal seq 4: hash chain broken" in problems
    assert any(p.startswith("account 1: balance 70, journal says 71") for p in problems)


def test_lost_journal_entry_is_a_gap(path):
    where, Ledger = path
    tamper(where, b"journal", lambda txn: txn.delete(U64.pack(4)))
    problems = audit(where, Ledger)
    assert "journal seq 5: gap or reorder after 3" in problems


def test_edited_balance_breaks_the_zero_sum(path):
    where, Ledger = path

    def change(txn):
        account = Account.decode(txn.get(U64.pack(2)))
        account.balance += 5
        account.lots[0].remaining += 5
        txn.put(U64.pack(2), account.encode())
    tamper(where, b"accounts", change)
    problems = audit(where, Ledger)
    assert "account 2: balance 45, journal says 40" in problems
    assert "program 1: balances sum to 5, not 0" in problems


def test_lost_expiry_index_entry_is_found(path):
    where, Ledger = path
    tamper(where, b"lot_expiry",
           lambda txn: txn.delete(EXPIRY_KEY.pack(20 * DAY, 2)))
    assert audit(where, Ledger) == [
        "account 2: earliest expiry not in the expiry index"]


def test_lots_that_disagree_with_the_balance(path):
    where, Ledger = path

    def change(txn):
        account = Account.decode(txn.get(U64.pack(1)))
        account.lots[0].remaining -= 1
        txn.put(U64.pack(1), account.encode())
    tamper(where, b"accounts", change)
    assert audit(where, Ledger) == ["account 1: balance 70 != lots 69 - debt 0"]

