"""The audit finds tampering and loss, and says where."""

import lmdb
import pytest

from kopilka import kernel
from kopilka.core import twin
from kopilka.core.aggregates import CohortCounters, Counters
from kopilka.core.batch import Batch
from kopilka.core.codec import Account, JournalEntry, decode_lots, encode_lots
from kopilka.core.records import (ACTIVITY_KEY, ACTIVITY_VALUE, AGG_ACTIVITY,
                                  AGG_COHORT, AGG_MEMBER_DAY, AGG_MEMBERS,
                                  AGG_SETTLED, AGG_SETTLEMENT, COHORT_KEY,
                                  COHORT_VALUE, COUNTER_VALUE, EXPIRY_KEY, HOUR,
                                  I64, IDX_BIRTHDAY, IDX_TIER, MEMBER_DAY_KEY,
                                  MEMBER_DAY_VALUE, MEMBER_INDEX_KEY, MEMBERS_KEY,
                                  SETTLED_KEY, SETTLEMENT_KEY, U64, Entry)

DAY = 86_400_000_000
IMPLEMENTATIONS = {"twin": twin.Ledger, "kernel": kernel.Ledger}


@pytest.fixture(params=IMPLEMENTATIONS)
def path(request, tmp_path):
    with IMPLEMENTATIONS[request.param](tmp_path, sync=False) as ledger:
        ledger.apply(Batch().put_program("p", 1).open_account("a1", 1, "m1")
                     .open_account("a2", 1, "m2")
                     .earn("e1", 1, 100, expires_at=30 * DAY)
                     .earn("e2", 2, 40, expires_at=20 * DAY)
                     .spend("s1", 1, 30)
                     .set_tier("t1", 1, 2)
                     .set_profile("p1", 2, b"profile"), DAY)
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



def test_a_profile_of_no_account_is_found(path):
    where, Ledger = path
    tamper(where, b"profiles", lambda txn: txn.put(U64.pack(9), b"orphan"))
    assert audit(where, Ledger) == [
        "profiles b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\t': names missing account 9"]


def test_a_tier_the_journal_never_set_is_found(path):
    where, Ledger = path

    def change(txn):
        for account_id, tier in ((1, 3), (2, 1)):
            account = Account.decode(txn.get(U64.pack(account_id)))
            account.tier = tier
            txn.put(U64.pack(account_id), account.encode())
    tamper(where, b"accounts", change)
    assert audit(where, Ledger) == ["account 1: tier 3, journal says 2",
                                    "account 2: tier 1, journal says 0"]


def test_a_tier_entry_that_does_not_follow_the_previous_one(path):
    where, Ledger = path

    def change(txn):
        key = U64.pack(7)  # the tier set
        entry = JournalEntry.decode(txn.get(key))
        assert entry.type == Entry.TIER_SET
        entry.amount2 = 1
        txn.put(key, entry.body() + entry.hash)
    tamper(where, b"journal", change)
    assert audit(where, Ledger) == ["journal seq 7: hash chain broken",
                                    "journal seq 7: tier was 0, not 1"]


ROW = ACTIVITY_KEY.pack(AGG_ACTIVITY, 1, DAY // HOUR, 0, 0, 0)  # the fixture's
WHERE = "aggregates activity program 1 hour 24 store 0 partner 0 tier 0"


def test_an_edited_aggregate_counter_is_found(path):
    where, Ledger = path

    def change(txn):
        counters = Counters(*ACTIVITY_VALUE.unpack(txn.get(ROW)))
        assert (counters.issued, counters.spent, counters.new_members) == (140, 30, 2)
        txn.put(ROW, ACTIVITY_VALUE.pack(*counters._replace(issued=141, receipts=1)))
    tamper(where, b"aggregates", change)
    assert audit(where, Ledger) == [f"{WHERE}: issued 141, journal says 140",
                                    f"{WHERE}: receipts 1, journal says 0"]


def test_lost_and_stray_aggregate_rows_are_found(path):
    where, Ledger = path
    settlement = SETTLEMENT_KEY.pack(AGG_SETTLEMENT, 1, 24, 0, 0)

    def change(txn):
        assert txn.get(settlement) == I64.pack(30)
        txn.delete(settlement)
        txn.put(MEMBER_DAY_KEY.pack(AGG_MEMBER_DAY, 1, 1, 2), MEMBER_DAY_VALUE.pack(2))
        txn.put(b"\x09junk", b"")
        txn.put(ROW, b"short")
    tamper(where, b"aggregates", change)
    assert audit(where, Ledger) == [
        f"{WHERE}: malformed value b'short'",
        "aggregates settlement program 1 hour 24 partner 0 to 0: missing, journal says [30]",
        "aggregates member day program 1 day 1 seq 2: stored [2], journal says none",
        "aggregates key b'\\tjunk': stored, journal says none"]


def test_edited_and_lost_running_totals_are_found(path):
    """The totals reports subtract from (members enrolled, points settled
    per partner pair) are rebuilt from the journal like the hourly rows."""
    where, Ledger = path
    members = MEMBERS_KEY.pack(AGG_MEMBERS, 1)
    settled = SETTLED_KEY.pack(AGG_SETTLED, 1, 0, 0)

    def change(txn):
        assert txn.get(members) == I64.pack(2) and txn.get(settled) == I64.pack(30)
        txn.put(members, I64.pack(3))
        txn.delete(settled)
        txn.put(SETTLED_KEY.pack(AGG_SETTLED, 1, 0, 2), I64.pack(5))
    tamper(where, b"aggregates", change)
    assert audit(where, Ledger) == [
        "aggregates members program 1: members 3, journal says 2",
        "aggregates settled program 1 partner 0 to 0: missing, journal says [30]",
        "aggregates settled program 1 partner 0 to 2: stored [5], journal says none"]


def test_edited_visit_days_are_found(path):
    where, Ledger = path

    def change(txn):
        account = Account.decode(txn.get(U64.pack(1)))
        account.visit_days = [4]
        txn.put(U64.pack(1), account.encode())
    tamper(where, b"accounts", change)
    assert audit(where, Ledger) == ["account 1: visit days [4], journal says []"]


COHORT = COHORT_KEY.pack(AGG_COHORT, 1, DAY // HOUR, 0)  # both earns, the spend
COHORT_WHERE = "aggregates cohort program 1 hour 24 partner 0"


def test_an_edited_cohort_counter_is_found(path):
    where, Ledger = path

    def change(txn):
        cohort = CohortCounters(*COHORT_VALUE.unpack(txn.get(COHORT)))
        assert cohort == (140, 30, 0, 0) and cohort.outstanding == 110
        txn.put(COHORT, COHORT_VALUE.pack(*cohort._replace(spent=20, clawed=1)))
    tamper(where, b"aggregates", change)
    assert audit(where, Ledger) == [f"{COHORT_WHERE}: spent 20, journal says 30",
                                    f"{COHORT_WHERE}: clawed 1, journal says 0"]


def test_a_lot_in_a_cohort_that_never_issued_it_is_found(path):
    where, Ledger = path

    def change(txn):
        account = Account.decode(txn.get(U64.pack(2)))
        account.lots[0].issued_hour += 1
        txn.put(U64.pack(2), account.encode())
    tamper(where, b"accounts", change)
    assert audit(where, Ledger) == [
        "aggregates cohort program 1 hour 25 partner 0: lots hold 40, "
        "outstanding by the journal 0"]


def test_a_posting_whose_lots_do_not_add_up_is_found(path):
    where, Ledger = path

    def change(txn):
        key = U64.pack(6)  # the spend
        entry = JournalEntry.decode(txn.get(key))
        assert entry.type == Entry.SPEND
        assert decode_lots(entry.data) == [(1, 30, DAY // HOUR)]
        entry.data = encode_lots([(1, 29, DAY // HOUR)])
        txn.put(key, entry.body() + entry.hash)
    tamper(where, b"journal", change)
    assert audit(where, Ledger) == [
        "journal seq 6: hash chain broken",
        "journal seq 6: lots named add up to 29, posting moves 30",
        f"{COHORT_WHERE}: spent 30, journal says 29"]


def test_the_member_index_and_bonus_counters_are_checked(path):
    where, Ledger = path
    with Ledger(where) as ledger:
        ledger.apply(Batch().open_account("a3", 1, "m3", birthday=(3, 1))
                     .award("w1", 1, 5, counter="action/x", limit=1), DAY)
        assert ledger.audit() == []

    def change(txn):
        txn.delete(MEMBER_INDEX_KEY.pack(IDX_TIER, 1, 2, 1))
        txn.put(MEMBER_INDEX_KEY.pack(IDX_TIER, 1, 5, 2), b"")
        txn.delete(MEMBER_INDEX_KEY.pack(IDX_BIRTHDAY, 1, 301, 3))
    tamper(where, b"member_index", change)
    tamper(where, b"bonus_counters", lambda txn: txn.put(
        U64.pack(1) + b"action/x", COUNTER_VALUE.pack(0, 0)))
    assert audit(where, Ledger) == [
        "account 1: tier 2 not in the member index",
        "account 3: birthday 301 not in the member index",
        f"member index {MEMBER_INDEX_KEY.pack(IDX_TIER, 1, 5, 2)!r}: names no member so",
        "bonus counter b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01action/x': stored "
        "[0, 0], journal says [1, 1]"]


def test_a_coupon_edited_or_reopened_is_found(tmp_path):
    """Coupons are replayed from their entries: an account claiming a coupon
    open that the journal redeemed, or worth more, is found."""
    with twin.Ledger(tmp_path, sync=False) as ledger:
        ledger.apply(Batch().put_program("p", 1).open_account("a1", 1, "m1")
                     .issue_coupon("c1", 1, 10_000, usable_from=DAY, expires_at=9 * DAY)
                     .redeem_coupon("r1", 1, 1, 500, business_time=2 * DAY)
                     .issue_coupon("c2", 1, 10_000, usable_from=DAY, expires_at=9 * DAY),
                     DAY)
        assert ledger.audit() == []

    def change(txn):
        account = Account.decode(txn.get(U64.pack(1)))
        account.coupons[0].value += 1
        txn.put(U64.pack(1), account.encode())
    tamper(tmp_path, b"accounts", change)
    (problem,) = audit(tmp_path, twin.Ledger)
    assert problem.startswith("account 1: coupons [Coupon(number=2, state=1, value=10001")
