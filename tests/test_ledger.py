"""Behaviour of the ledger, run once against the twin and once against the kernel.

Every operation kind: its happy path with exact numbers and every rejection
code the specification (`kopilka.core.twin`) can give it. A rejection must
leave no trace (the stored databases, journal head included, are unchanged)
and must not spoil its neighbours in a batch. Time is an injected integer
clock in microseconds.
"""

import hashlib
import re

import pytest

from kopilka.core.aggregates import month_of_day, rebuild
from kopilka.core.batch import Batch, Result
from kopilka.core.codec import Account, Consumed, Lot, decode_lots, iter_ops
from kopilka.core.records import (HASH_SIZE, I64, INT64_MAX, INT64_MIN,
                                  MAX_DATA, MAX_HOLDS, MAX_LOTS, MAX_TIER,
                                  NEVER, PROFILE_ERASE, PROGRAM, VISIT_DAYS,
                                  PROGRAM_ALLOW_DEBT, RELEASE_CAPTURED,
                                  MEMBER_DAY_KEY, MEMBER_DAY_VALUE,
                                  RELEASE_EXPIRED, RELEASE_VOIDED, SYSTEM_KEY,
                                  U32, U64, CardStatus, Code, Entry, HoldState,
                                  Kind, LEDGER_FORMAT, LedgerError, META_FORMAT,
                                  Status, Sys,
                                  system_account)

DAY = 86_400_000_000
HOUR = 3_600_000_000
T = 100 * DAY          # the usual "now" of a test
H0 = T // HOUR         # its hour: the issued_hour of lots issued at T
NUMBERS = ("available", "pending", "held", "balance", "debt", "earned",
           "spent", "expired")
ISSUED0 = system_account(Sys.ISSUED)
REDEEMED0 = system_account(Sys.REDEEMED)


# --- helpers -----------------------------------------------------------------

def run(ledger, now, method, *args, **kwargs):
    """Apply one operation (a `Batch` helper by name) in its own batch."""
    results = ledger.apply(getattr(Batch(), method)(*args, **kwargs), now)
    assert len(results) == 1
    return results[0]


def ok(ledger, now, method, *args, **kwargs):
    result = run(ledger, now, method, *args, **kwargs)
    assert result.code == Code.OK and not result.replayed, result
    return result


def stored(ledger):
    """The journal head and every record but meta's (the head is in meta,
    and a new ledger's first batch writes meta's initial values)."""
    dump = ledger.dump()
    del dump["meta"]
    return ledger.head(), dump


def rejected(ledger, now, code, method, *args, **kwargs):
    """The operation is refused with `code` and nothing stored changes:
    not the journal head, not a balance, not any other record."""
    before = stored(ledger)
    result = run(ledger, now, method, *args, **kwargs)
    assert result == Result(code), result
    assert stored(ledger) == before, "a rejected operation left a trace"
    return result


def rejected_raw(ledger, now, code, kind, op_id, **fields):
    """Like `rejected`, for an operation built field by field."""
    before = stored(ledger)
    results = ledger.apply(Batch().add(kind, op_id, **fields), now)
    assert list(results) == [Result(code)], results
    assert stored(ledger) == before, "a rejected operation left a trace"


def numbers(ledger, account, now):
    b = ledger.balances(account, now)
    return {name: getattr(b, name) for name in NUMBERS}


def expect(ledger, account, now, **fields):
    """The account's balances at `now`: the named ones, and zero for the rest."""
    wanted = dict.fromkeys(NUMBERS, 0)
    wanted.update(fields)
    assert numbers(ledger, account, now) == wanted


def entries_after(ledger, seq):
    return ledger.journal(from_seq=seq + 1)


def last_seq(ledger):
    return ledger.head()[0]


def program_sums(ledger):
    """Per program: sum of member balances plus all its system balances."""
    sums = {}
    dump = ledger.dump()
    for _, value in dump["accounts"]:
        account = Account.decode(value)
        sums[account.program] = sums.get(account.program, 0) + account.balance
    for key, value in dump["system"]:
        program = SYSTEM_KEY.unpack(key)[0]
        sums[program] = sums.get(program, 0) + I64.unpack(value)[0]
    return sums


def sys_balance(ledger, kind, partner=0, program=1):
    return ledger.system_balance(program, kind, partner)


@pytest.fixture
def members(open_program):
    """Program 1 (no debt) with two members, opened at time 0."""
    return open_program(1, 2)


@pytest.fixture
def member(members):
    return members[0]


# --- PUT_PROGRAM ---------------------------------------------------------------

def test_put_program_creates_and_updates_keeping_creation_time(ledger):
    assert ok(ledger, 5, "put_program", "p1", 7).a == 7
    assert ledger.dump()["programs"] == [(U32.pack(7), PROGRAM.pack(0, 5, 5, 0))]
    [entry] = ledger.journal()
    assert (entry.seq, entry.type, entry.program, entry.amount, entry.amount2) == (
        1, Entry.PROGRAM_PUT, 7, 0, 0)

    assert ok(ledger, 9, "put_program", "p2", 7, flags=PROGRAM_ALLOW_DEBT,
              data=b"definition v2", utc_offset_minutes=-210).a == 7
    assert ledger.dump()["programs"] == [
        (U32.pack(7), PROGRAM.pack(PROGRAM_ALLOW_DEBT, 5, 9, -210) + b"definition v2")]
    assert (ledger.journal()[-1].amount, ledger.journal()[-1].amount2) == (
        PROGRAM_ALLOW_DEBT, -210)
    [record] = ledger.programs()
    assert (record.program, record.created_at, record.updated_at, record.data,
            record.utc_offset) == (7, 5, 9, b"definition v2", -210)


def test_refund_appends_its_data_to_the_receipts(ledger, member):
    ok(ledger, T, "earn", "e1", member, 20, money=1_000, data=b"receipt")
    ok(ledger, T, "refund", "r1", "e1", money=100, claw_back=2, data=b"|one")
    ok(ledger, T, "refund", "r2", "e1", money=100, claw_back=2)
    assert ledger.operation(b"e1").data == b"receipt|one"
    assert ledger.operation(b"r1").data == b"|one"
    rejected(ledger, T, Code.DATA_TOO_LONG, "refund", "r3", "e1", money=100,
             data=b"x" * (65_535 - 10))
    assert ledger.operation(b"e1").refunded_money == 200


def test_put_program_again_changes_what_its_accounts_may_do(ledger, open_program):
    [member] = open_program(1, 1)
    ok(ledger, T, "earn", "e1", member, 20, money=100)
    ok(ledger, T, "spend", "s1", member, 20)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "refund", "r1", "e1", claw_back=20)
    ok(ledger, T, "put_program", "allow-debt", 1, flags=PROGRAM_ALLOW_DEBT)
    assert ok(ledger, T, "refund", "r1", "e1", claw_back=20).b == 20
    expect(ledger, member, T, available=-20, balance=-20, debt=20, spent=20)


def test_put_program_rejections(ledger):
    rejected(ledger, T, Code.KEY_INVALID, "put_program", "p0", 0)
    rejected(ledger, T, Code.FLAGS_INVALID, "put_program", "p2", 1, flags=2)
    rejected(ledger, T, Code.FLAGS_INVALID, "put_program", "p3", 1,
             flags=PROGRAM_ALLOW_DEBT | 4)
    # a UTC offset is less than a day either way
    for i, minutes in enumerate((1440, -1440, 2**31 - 1, -2**31)):
        rejected(ledger, T, Code.TIME_INVALID, "put_program", f"p4-{i}", 1,
                 utc_offset_minutes=minutes)
    for i, minutes in enumerate((1439, -1439)):
        ok(ledger, T, "put_program", f"p5-{i}", 1, utc_offset_minutes=minutes)
    assert ledger.programs()[0].utc_offset == -1439
    with pytest.raises(ValueError):
        Batch().put_program("p6", 1, utc_offset_minutes=2**31)
    assert ledger.head()[0] == 2


# --- OPEN_ACCOUNT --------------------------------------------------------------

def test_open_account(ledger):
    ok(ledger, 0, "put_program", "p1", 1)
    ok(ledger, 0, "put_program", "p2", 2)
    assert ok(ledger, T, "open_account", "o1", 1, "cust-1").a == 1
    assert ok(ledger, T, "open_account", "o2", 1, "cust-2").a == 2
    # external ids are per program
    assert ok(ledger, T, "open_account", "o3", 2, "cust-1").a == 3
    assert ledger.account_id(1, b"cust-1") == 1
    assert ledger.account_id(2, b"cust-1") == 3
    assert ledger.account_id(1, b"nobody") is None
    b = ledger.balances(2, T)
    assert (b.account, b.program, b.status) == (2, 1, Status.ACTIVE)
    expect(ledger, 2, T)
    assert ledger.account(3).opened_at == T
    entry = ledger.journal()[-1]
    assert (entry.type, entry.program, entry.credit, entry.data, entry.op_id) == (
        Entry.ACCOUNT_OPENED, 2, 3, b"cust-1", b"o3")
    assert ledger.balances(99, T) is None


def test_open_account_rejections(ledger):
    ok(ledger, 0, "put_program", "p1", 1)
    rejected(ledger, T, Code.PROGRAM_NOT_FOUND, "open_account", "o1", 2, "c")
    rejected(ledger, T, Code.KEY_INVALID, "open_account", "o2", 1, "")
    rejected(ledger, T, Code.KEY_INVALID, "open_account", "o3", 1, "k" * 129)
    assert ok(ledger, T, "open_account", "o4", 1, "k" * 128).a == 1
    rejected(ledger, T, Code.ACCOUNT_EXISTS, "open_account", "o5", 1, "k" * 128)
    # rejections used up no account number
    assert ok(ledger, T, "open_account", "o6", 1, "other").a == 2


# --- SET_ACCOUNT_STATUS --------------------------------------------------------

def test_block_reactivate_and_close_account(ledger, member):
    assert ok(ledger, T, "set_account_status", "s1", member, Status.BLOCKED).a == Status.BLOCKED
    assert ledger.balances(member, T).status == Status.BLOCKED
    entry = ledger.journal()[-1]
    assert (entry.type, entry.credit, entry.amount) == (
        Entry.ACCOUNT_STATUS, member, Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "earn", "e1", member, 10)
    ok(ledger, T, "set_account_status", "s2", member, Status.ACTIVE)
    ok(ledger, T, "earn", "e1", member, 10)
    ok(ledger, T, "set_account_status", "s3", member, Status.CLOSED)
    assert ledger.balances(member, T).status == Status.CLOSED
    # closed is final
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "set_account_status", "s4", member,
             Status.ACTIVE)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "earn", "e2", member, 10)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "spend", "sp", member, 10)
    # a closed account keeps its ledger history and points
    expect(ledger, member, T, available=10, balance=10, earned=10)


def test_set_account_status_rejections(ledger, member):
    rejected(ledger, T, Code.STATUS_INVALID, "set_account_status", "s1", member, 0)
    rejected(ledger, T, Code.STATUS_INVALID, "set_account_status", "s2", member, 4)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "set_account_status", "s3", 99,
             Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "set_account_status", "s4", 0,
             Status.BLOCKED)


# --- cards ---------------------------------------------------------------------

def test_link_card(ledger, members):
    a, b = members
    assert ok(ledger, T, "link_card", "l1", a, "4000-1").a == a
    ok(ledger, T, "link_card", "l2", a, "4000-2")  # a second card, same account
    assert ledger.card(b"4000-1") == (a, CardStatus.ACTIVE)
    assert ledger.card(b"4000-2") == (a, CardStatus.ACTIVE)
    assert ledger.card(b"none") is None
    entry = ledger.journal()[-1]
    assert (entry.type, entry.credit, entry.data) == (Entry.CARD_LINKED, a, b"4000-2")
    # a blocked account may still get a card; a closed one may not
    ok(ledger, T, "set_account_status", "st", b, Status.BLOCKED)
    ok(ledger, T, "link_card", "l3", b, "4000-3")


def test_link_card_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "link_card", "l1", a, "4000-1")
    rejected(ledger, T, Code.KEY_INVALID, "link_card", "x1", a, "")
    rejected(ledger, T, Code.KEY_INVALID, "link_card", "x2", a, "9" * 129)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "link_card", "x3", 99, "4000-9")
    rejected(ledger, T, Code.CARD_EXISTS, "link_card", "x4", b, "4000-1")
    rejected(ledger, T, Code.CARD_EXISTS, "link_card", "x5", a, "4000-1")
    ok(ledger, T, "set_account_status", "close", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "link_card", "x6", b, "4000-9")


def test_block_card(ledger, member):
    ok(ledger, T, "link_card", "l1", member, "4000-1")
    assert ok(ledger, T, "block_card", "b1", "4000-1").a == member
    assert ledger.card(b"4000-1") == (member, CardStatus.BLOCKED)
    entry = ledger.journal()[-1]
    assert (entry.type, entry.credit, entry.data) == (Entry.CARD_BLOCKED, member, b"4000-1")
    rejected(ledger, T, Code.CARD_BLOCKED, "block_card", "b2", "4000-1")
    rejected(ledger, T, Code.CARD_NOT_FOUND, "block_card", "b3", "4000-2")
    rejected(ledger, T, Code.KEY_INVALID, "block_card", "b4", "")
    rejected(ledger, T, Code.KEY_INVALID, "block_card", "b5", "9" * 129)


def test_replace_card_keeps_balance_with_account(ledger, member):
    ok(ledger, T, "link_card", "l1", member, "old")
    ok(ledger, T, "earn", "e1", member, 70)
    seq = last_seq(ledger)
    assert ok(ledger, T, "replace_card", "r1", "old", "new").a == member
    assert ledger.card(b"old") == (member, CardStatus.REPLACED)
    assert ledger.card(b"new") == (member, CardStatus.ACTIVE)
    assert [(e.type, e.credit, e.data) for e in entries_after(ledger, seq)] == [
        (Entry.CARD_REPLACED, member, b"old"), (Entry.CARD_LINKED, member, b"new")]
    expect(ledger, member, T, available=70, balance=70, earned=70)
    # a lost card is blocked first, then replaced
    ok(ledger, T, "block_card", "b1", "new")
    ok(ledger, T, "replace_card", "r2", "new", "newer")
    assert ledger.card(b"new") == (member, CardStatus.REPLACED)
    assert ledger.card(b"newer") == (member, CardStatus.ACTIVE)


def test_replace_card_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "link_card", "l1", a, "c1")
    ok(ledger, T, "link_card", "l2", b, "c2")
    rejected(ledger, T, Code.KEY_INVALID, "replace_card", "x1", "", "c9")
    rejected(ledger, T, Code.KEY_INVALID, "replace_card", "x2", "c1", "")
    rejected(ledger, T, Code.KEY_INVALID, "replace_card", "x3", "c1", "9" * 129)
    rejected(ledger, T, Code.CARD_NOT_FOUND, "replace_card", "x4", "c8", "c9")
    rejected(ledger, T, Code.CARD_EXISTS, "replace_card", "x5", "c1", "c2")
    rejected(ledger, T, Code.CARD_EXISTS, "replace_card", "x6", "c1", "c1")
    ok(ledger, T, "replace_card", "r1", "c1", "c3")
    rejected(ledger, T, Code.CARD_BLOCKED, "replace_card", "x7", "c1", "c4")
    rejected(ledger, T, Code.CARD_BLOCKED, "block_card", "x8", "c1")
    ok(ledger, T, "set_account_status", "close", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "replace_card", "x9", "c2", "c5")


# --- receipts and holds by card ------------------------------------------------

def test_receipts_and_holds_by_card(ledger, members):
    a, b = members
    ok(ledger, T, "link_card", "l1", a, "card-a")
    assert ok(ledger, T, "earn", "e1", 0, 100, card="card-a").a == 1
    assert ok(ledger, T, "spend", "s1", 0, 30, card="card-a").a == 30
    assert ok(ledger, T, "hold", "h1", 0, 20, card="card-a", expires_at=T + 60).a == 1
    r = ok(ledger, T, "capture", "c1", 0, hold="h1", spend=20, earn=3, card="card-a")
    assert (r.a, r.b) == (20, 2)
    ok(ledger, T, "earn", "e2", a, 5, card="card-a")  # the card's own account
    assert [ledger.operation(op).account for op in (b"e1", b"s1", b"h1", b"c1")] == [a] * 4
    expect(ledger, a, T, available=58, balance=58, earned=108, spent=50)
    expect(ledger, b, T)
    # a refund follows the receipt to its account
    assert ok(ledger, T, "refund", "r1", "s1", give_back=30).a == 30
    expect(ledger, a, T, available=88, balance=88, earned=108, spent=20)


def test_receipts_and_holds_by_card_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "link_card", "l1", a, "card-a")
    ok(ledger, T, "link_card", "l2", b, "card-b")
    ok(ledger, T, "earn", "e0", a, 100)
    ok(ledger, T, "hold", "h1", a, 10, expires_at=T + 60)
    rejected(ledger, T, Code.CARD_NOT_FOUND, "earn", "x1", 0, 5, card="nope")
    rejected(ledger, T, Code.CARD_NOT_FOUND, "spend", "x2", a, 5, card="nope")
    rejected(ledger, T, Code.KEY_INVALID, "hold", "x3", 0, 5, card="9" * 129,
             expires_at=T + 60)
    rejected(ledger, T, Code.KEY_INVALID, "earn", "x4", b, 5, card="card-a")
    rejected(ledger, T, Code.HOLD_NOT_FOUND, "capture", "x5", 0, hold="h1", spend=10,
             card="card-b")
    ok(ledger, T, "block_card", "blk", "card-a")
    rejected(ledger, T, Code.CARD_BLOCKED, "earn", "x6", 0, 5, card="card-a")
    rejected(ledger, T, Code.CARD_BLOCKED, "spend", "x7", a, 5, card="card-a")
    rejected(ledger, T, Code.CARD_BLOCKED, "hold", "x8", 0, 5, card="card-a",
             expires_at=T + 60)
    rejected(ledger, T, Code.CARD_BLOCKED, "capture", "x9", 0, hold="h1", spend=10,
             card="card-a")
    ok(ledger, T, "replace_card", "rep", "card-a", "card-a2")
    rejected(ledger, T, Code.CARD_BLOCKED, "spend", "x10", 0, 5, card="card-a")
    assert ok(ledger, T, "spend", "x10", 0, 5, card="card-a2").a == 5
    expect(ledger, a, T, available=85, held=10, balance=95, earned=100, spent=5)


# --- EARN ----------------------------------------------------------------------

def test_earn(ledger, member):
    r = ok(ledger, T, "earn", "e1", member, 150, money=3000, expires_at=T + 365 * DAY)
    assert (r.a, r.b) == (1, 0)  # the lot number
    expect(ledger, member, T, available=150, balance=150, earned=150)
    assert ledger.lots(member) == [Lot(1, 0, 150, 0, T + 365 * DAY, H0)]
    assert sys_balance(ledger, Sys.ISSUED) == -150
    entry, receipt = ledger.journal()[-2:]
    assert (entry.type, entry.sys, entry.debit, entry.credit, entry.amount,
            entry.ref, entry.time, entry.op_id) == (
        Entry.EARN, Sys.ISSUED, ISSUED0, member, 150, 1, T, b"e1")
    # the receipt itself, for visits and money in reports
    assert (receipt.type, receipt.credit, receipt.amount, receipt.amount2,
            receipt.ref, receipt.op_id) == (Entry.RECEIPT, member, 3000, 0, 1, b"e1")
    record = ledger.operation(b"e1")
    assert (record.kind, record.account, record.program, record.money,
            record.earned, record.earned_lot) == (Kind.EARN, member, 1, 3000, 150, 1)
    assert ok(ledger, T, "earn", "e2", member, 5).a == 2
    expect(ledger, member, T, available=155, balance=155, earned=155)


def test_earn_at_partner_posts_to_that_partners_issued_account(ledger, member):
    ok(ledger, T, "earn", "e1", member, 40, partner=7)
    ok(ledger, T, "earn", "e2", member, 2)
    assert sys_balance(ledger, Sys.ISSUED, partner=7) == -40
    assert sys_balance(ledger, Sys.ISSUED, partner=0) == -2
    assert ledger.journal()[-2].debit == system_account(Sys.ISSUED, 7)
    assert ledger.lots(member) == [Lot(1, 7, 40, 0, NEVER, H0), Lot(2, 0, 2, 0, NEVER, H0)]


def test_earned_points_are_pending_until_activation(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, activates_at=T + 14 * DAY,
       expires_at=T + 365 * DAY)
    expect(ledger, member, T, pending=100, balance=100, earned=100)
    expect(ledger, member, T + 14 * DAY - 1, pending=100, balance=100, earned=100)
    rejected(ledger, T + 14 * DAY - 1, Code.INSUFFICIENT_POINTS, "spend", "s1", member, 1)
    expect(ledger, member, T + 14 * DAY, available=100, balance=100, earned=100)
    assert ok(ledger, T + 14 * DAY, "spend", "s1", member, 100).a == 100
    expect(ledger, member, T + 14 * DAY, spent=100, earned=100)


def test_earn_rejections(ledger, members):
    a, b = members
    for op_id, points, money in (("x1", 0, 0), ("x2", -5, 0), ("x3", 10, -1)):
        rejected(ledger, T, Code.AMOUNT_INVALID, "earn", op_id, a, points, money=money)
    # an EARN that also spends is malformed
    rejected_raw(ledger, T, Code.AMOUNT_INVALID, Kind.EARN, "x4", account=a,
                 amount=1, amount2=10, expires_at=NEVER)
    rejected(ledger, T, Code.TIME_INVALID, "earn", "t1", a, 10, activates_at=-1)
    rejected(ledger, T, Code.TIME_INVALID, "earn", "t2", a, 10,
             activates_at=T + DAY, expires_at=T + DAY)
    rejected(ledger, T, Code.TIME_INVALID, "earn", "t3", a, 10,
             activates_at=T + 2 * DAY, expires_at=T + DAY)
    rejected(ledger, T, Code.TIME_INVALID, "earn", "t4", a, 10, expires_at=T)
    rejected(ledger, T, Code.TIME_INVALID, "earn", "t5", a, 10, expires_at=T - 1)
    assert ok(ledger, T, "earn", "t6", a, 10, expires_at=T + 1).a == 1
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "earn", "n1", 99, 10)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "earn", "n2", 0, 10)
    ok(ledger, T, "set_account_status", "blk", b, Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "earn", "n3", b, 10)
    ok(ledger, T, "set_account_status", "cls", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "earn", "n4", b, 10)


def test_earn_overflow_on_the_account(ledger, member):
    ok(ledger, T, "earn", "e1", member, INT64_MAX)
    expect(ledger, member, T, available=INT64_MAX, balance=INT64_MAX, earned=INT64_MAX)
    rejected(ledger, T, Code.OVERFLOW, "earn", "e2", member, 1)


def test_earn_overflow_on_the_issued_system_account(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, INT64_MAX)
    # an hour later: the report row and the cohort of e1 cannot count one more
    ok(ledger, T + HOUR, "earn", "e2", b, 1)  # issued reaches exactly int64 min
    assert sys_balance(ledger, Sys.ISSUED) == INT64_MIN
    rejected(ledger, T + HOUR, Code.OVERFLOW, "earn", "e3", b, 1)


def test_too_many_lots(ledger, open_program):
    # lots are made on small accounts and merged: 2048 earns on one account
    # would rewrite an ever larger account record 2048 times
    target, *sources = open_program(1, 34)
    per_source = MAX_LOTS // 32
    batch = Batch()
    for source in sources:
        for i in range(per_source):
            batch.earn(f"e{source}/{i}", source, 1)
    results = ledger.apply(batch, T)
    assert all(r.ok for r in results)
    batch = Batch()
    for source in sources[:32]:
        batch.transfer(f"t{source}", source, target, everything=True)
    assert [r.a for r in ledger.apply(batch, T)] == [per_source] * 32
    assert len(ledger.lots(target)) == MAX_LOTS
    rejected(ledger, T, Code.TOO_MANY_LOTS, "earn", "one-more", target, 1)
    rejected(ledger, T, Code.TOO_MANY_LOTS, "transfer", "t-last", sources[32], target,
             everything=True)
    # spending empties a lot, which makes room again
    ok(ledger, T, "spend", "s1", target, 1)
    assert ok(ledger, T, "earn", "one-more", target, 1).a == MAX_LOTS + 1
    expect(ledger, target, T, available=MAX_LOTS, balance=MAX_LOTS, earned=1, spent=1)


# --- SPEND ---------------------------------------------------------------------

def test_spend_takes_earliest_expiring_lots_first(ledger, member):
    ok(ledger, T, "earn", "never", member, 100)                          # lot 1
    ok(ledger, T, "earn", "late", member, 50, expires_at=T + 20 * DAY)   # lot 2
    ok(ledger, T, "earn", "soon", member, 30, expires_at=T + 10 * DAY)   # lot 3
    ok(ledger, T, "earn", "late2", member, 20, expires_at=T + 20 * DAY)  # lot 4
    assert ok(ledger, T, "spend", "s1", member, 90, money=900).a == 90
    assert ledger.lots(member) == [Lot(4, 0, 10, 0, T + 20 * DAY, H0),
                                   Lot(1, 0, 100, 0, NEVER, H0)]
    assert ledger.operation(b"s1").consumed == [
        Consumed(3, 0, 30, 0, T + 10 * DAY, H0), Consumed(2, 0, 50, 0, T + 20 * DAY, H0),
        Consumed(4, 0, 10, 0, T + 20 * DAY, H0)]
    expect(ledger, member, T, available=110, balance=110, earned=200, spent=90)
    assert sys_balance(ledger, Sys.REDEEMED) == 90
    entry, receipt = ledger.journal()[-2:]
    assert (entry.type, entry.sys, entry.debit, entry.credit, entry.amount) == (
        Entry.SPEND, Sys.REDEEMED, member, REDEEMED0, 90)
    assert (receipt.type, receipt.amount, receipt.amount2) == (Entry.RECEIPT, 900, 90)


def test_spend_posts_once_per_issuing_partner(ledger, member):
    ok(ledger, T, "earn", "e1", member, 30, partner=1, expires_at=T + DAY)
    ok(ledger, T, "earn", "e2", member, 40, partner=2, expires_at=T + 2 * DAY)
    seq = last_seq(ledger)
    ok(ledger, T, "spend", "s1", member, 50, partner=3)
    spends = entries_after(ledger, seq)
    assert [(e.type, e.partner, e.partner2, e.amount, e.credit) for e in spends] == [
        (Entry.SPEND, 3, 1, 30, system_account(Sys.REDEEMED, 3)),
        (Entry.SPEND, 3, 2, 20, system_account(Sys.REDEEMED, 3))]
    assert sys_balance(ledger, Sys.REDEEMED, partner=3) == 50
    # each names its lots: number, points, the hour they were issued
    assert [decode_lots(e.data) for e in spends] == [[(1, 30, H0)], [(2, 20, H0)]]


def test_a_spend_names_every_lot_it_took_from(ledger, member):
    ok(ledger, T, "earn", "e1", member, 30, partner=1, expires_at=T + DAY)
    ok(ledger, T + HOUR, "earn", "e2", member, 40, partner=1, expires_at=T + 2 * DAY)
    seq = last_seq(ledger)
    ok(ledger, T + 2 * HOUR, "spend", "s1", member, 50)
    [spend] = entries_after(ledger, seq)  # one issuing partner: one posting
    assert (spend.type, spend.partner2, spend.amount, spend.ref) == (Entry.SPEND, 1, 50, 0)
    assert decode_lots(spend.data) == [(1, 30, H0), (2, 20, H0 + 1)]


def test_spend_ignores_pending_expired_and_held_points(ledger, member):
    ok(ledger, T, "earn", "active", member, 40, expires_at=T + DAY)
    ok(ledger, T, "earn", "pending", member, 100, activates_at=T + 5 * DAY,
       expires_at=T + 9 * DAY)
    ok(ledger, T, "hold", "h1", member, 15, expires_at=T + DAY // 2)
    expect(ledger, member, T, available=25, pending=100, held=15, balance=140, earned=140)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "spend", "s1", member, 26)
    assert ok(ledger, T, "spend", "s1", member, 25).a == 25
    # the rest of the active lot expires with the day
    ok(ledger, T, "earn", "more", member, 60, expires_at=T + 3 * DAY)
    rejected(ledger, T + DAY, Code.INSUFFICIENT_POINTS, "spend", "s2", member, 61)
    assert ok(ledger, T + DAY, "spend", "s2", member, 60).a == 60
    expect(ledger, member, T + DAY, pending=100, balance=100, earned=200,
           spent=85, expired=15)


def test_spend_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 50)
    rejected(ledger, T, Code.AMOUNT_INVALID, "spend", "s1", a, 0)
    rejected(ledger, T, Code.AMOUNT_INVALID, "spend", "s2", a, -1)
    rejected(ledger, T, Code.AMOUNT_INVALID, "spend", "s3", a, 10, money=-1)
    rejected_raw(ledger, T, Code.AMOUNT_INVALID, Kind.SPEND, "s4", account=a,
                 amount=10, amount2=1)  # a SPEND that also earns is malformed
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "spend", "s5", a, 51)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "spend", "s6", a, INT64_MAX)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "spend", "s7", 99, 10)
    ok(ledger, T, "earn", "e2", b, 50)
    ok(ledger, T, "set_account_status", "blk", b, Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "spend", "s8", b, 10)
    ok(ledger, T, "set_account_status", "cls", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "spend", "s9", b, 10)


# --- HOLD, CAPTURE, VOID -------------------------------------------------------

def test_hold(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    assert ok(ledger, T, "hold", "h1", member, 30, expires_at=T + 60).a == 1
    assert ok(ledger, T, "hold", "h2", member, 70, expires_at=T + 90).a == 2
    expect(ledger, member, T, available=0, held=100, balance=100, earned=100)
    entry = ledger.journal()[-1]
    assert (entry.type, entry.credit, entry.amount, entry.amount2, entry.ref) == (
        Entry.HOLD_PLACED, member, 70, T + 90, 2)
    record = ledger.operation(b"h1")
    assert (record.kind, record.hold_state, record.hold_no, record.account) == (
        Kind.HOLD, HoldState.OPEN, 1, member)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "hold", "h3", member, 1,
             expires_at=T + 60)


def test_hold_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 100)
    rejected(ledger, T, Code.AMOUNT_INVALID, "hold", "h1", a, 0, expires_at=T + 60)
    rejected(ledger, T, Code.AMOUNT_INVALID, "hold", "h2", a, -3, expires_at=T + 60)
    rejected(ledger, T, Code.TIME_INVALID, "hold", "h3", a, 10, expires_at=T)
    rejected(ledger, T, Code.TIME_INVALID, "hold", "h4", a, 10, expires_at=T - 1)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "hold", "h5", a, 101, expires_at=T + 60)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "hold", "h6", 99, 1, expires_at=T + 60)
    ok(ledger, T, "earn", "e2", b, 100)
    ok(ledger, T, "set_account_status", "blk", b, Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "hold", "h7", b, 1, expires_at=T + 60)
    ok(ledger, T, "set_account_status", "cls", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "hold", "h8", b, 1, expires_at=T + 60)


def test_too_many_holds(ledger, member):
    ok(ledger, T, "earn", "e1", member, 1000)
    batch = Batch()
    for i in range(MAX_HOLDS):
        batch.hold(f"h{i}", member, 1, expires_at=T + 60)
    assert [r.a for r in ledger.apply(batch, T)] == list(range(1, MAX_HOLDS + 1))
    rejected(ledger, T, Code.TOO_MANY_HOLDS, "hold", "one-more", member, 1,
             expires_at=T + 60)
    ok(ledger, T, "void", "v0", "h0")
    assert ok(ledger, T, "hold", "one-more", member, 1, expires_at=T + 60).a == MAX_HOLDS + 1


def test_capture_a_hold_spends_and_earns_at_once(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 40, expires_at=T + 60)
    seq = last_seq(ledger)
    r = ok(ledger, T + 10, "capture", "c1", member, hold="h1", spend=30, earn=12,
           money=1850, expires_at=T + 365 * DAY)
    assert (r.a, r.b) == (30, 2)  # spent, the new lot
    # the remaining 10 held points are released with the hold
    expect(ledger, member, T + 10, available=82, balance=82, earned=112, spent=30)
    assert ledger.lots(member) == [Lot(2, 0, 12, 0, T + 365 * DAY, H0), Lot(1, 0, 70, 0, NEVER, H0)]
    assert [(e.type, e.amount, e.amount2) for e in entries_after(ledger, seq)] == [
        (Entry.HOLD_RELEASED, 40, RELEASE_CAPTURED), (Entry.SPEND, 30, 0),
        (Entry.EARN, 12, 0), (Entry.RECEIPT, 1850, 30)]
    assert ledger.operation(b"h1").hold_state == HoldState.CAPTURED
    record = ledger.operation(b"c1")
    assert (record.hold_no, record.spent, record.earned, record.earned_lot,
            record.money) == (1, 30, 12, 2, 1850)
    assert sys_balance(ledger, Sys.ISSUED) == -112
    assert sys_balance(ledger, Sys.REDEEMED) == 30


def test_capture_may_leave_the_account_to_the_hold(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 100)
    ok(ledger, T, "hold", "h1", a, 40, expires_at=T + 60)
    ok(ledger, T, "hold", "h2", a, 40, expires_at=T + 60)
    assert ok(ledger, T, "capture", "c1", 0, hold="h1", spend=40).a == 40
    # naming the hold's own account is fine, naming another one is not
    rejected(ledger, T, Code.HOLD_NOT_FOUND, "capture", "c2", b, hold="h2", spend=40)
    assert ok(ledger, T, "capture", "c2", a, hold="h2", spend=40).a == 40
    expect(ledger, a, T, available=20, balance=20, earned=100, spent=80)


def test_capture_of_a_hold_with_nothing_to_spend_releases_it(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 40, expires_at=T + 60)
    r = ok(ledger, T, "capture", "c1", member, hold="h1")
    assert (r.a, r.b) == (0, 0)
    expect(ledger, member, T, available=100, balance=100, earned=100)
    assert ledger.operation(b"h1").hold_state == HoldState.CAPTURED


def test_capture_without_hold(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    r = ok(ledger, T, "capture", "c1", member, spend=25, earn=8, money=975)
    assert (r.a, r.b) == (25, 2)
    expect(ledger, member, T, available=83, balance=83, earned=108, spent=25)
    r = ok(ledger, T, "capture", "c2", member, earn=5, activates_at=T + DAY,
           expires_at=T + 2 * DAY)
    assert (r.a, r.b) == (0, 3)
    r = ok(ledger, T, "capture", "c3", member, spend=3)
    assert (r.a, r.b) == (3, 0)
    expect(ledger, member, T, available=80, pending=5, balance=85, earned=113, spent=28)


def test_capture_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 100)
    ok(ledger, T, "earn", "e2", b, 100)
    ok(ledger, T, "hold", "h1", a, 40, expires_at=T + 60)
    rejected(ledger, T, Code.AMOUNT_INVALID, "capture", "x1", a)
    rejected(ledger, T, Code.AMOUNT_INVALID, "capture", "x2", a, hold="h1", spend=-1)
    rejected(ledger, T, Code.AMOUNT_INVALID, "capture", "x3", a, hold="h1", earn=-1)
    rejected(ledger, T, Code.AMOUNT_INVALID, "capture", "x4", a, hold="h1", money=-1)
    rejected(ledger, T, Code.TIME_INVALID, "capture", "x5", a, hold="h1", spend=10,
             earn=5, expires_at=T)
    rejected(ledger, T, Code.KEY_INVALID, "capture", "x6", a, hold="h" * 129, spend=1)
    rejected(ledger, T, Code.HOLD_NOT_FOUND, "capture", "x7", a, hold="nope", spend=1)
    rejected(ledger, T, Code.HOLD_NOT_FOUND, "capture", "x8", a, hold="e1", spend=1)
    rejected(ledger, T, Code.CAPTURE_EXCEEDS_HOLD, "capture", "x9", a, hold="h1", spend=41)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "capture", "x10", a, spend=61)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "capture", "x11", 99, spend=1)
    ok(ledger, T, "capture", "c1", a, hold="h1", spend=40)
    rejected(ledger, T, Code.HOLD_CAPTURED, "capture", "x12", a, hold="h1", spend=1)
    ok(ledger, T, "hold", "h2", a, 10, expires_at=T + 60)
    ok(ledger, T, "void", "v2", "h2")
    rejected(ledger, T, Code.HOLD_VOIDED, "capture", "x13", a, hold="h2", spend=1)
    # the account is checked when the hold is captured
    ok(ledger, T, "hold", "h3", b, 10, expires_at=T + 60)
    ok(ledger, T, "set_account_status", "blk", b, Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "capture", "x14", b, hold="h3", spend=10)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "capture", "x15", b, spend=10)
    ok(ledger, T, "set_account_status", "cls", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "capture", "x16", b, hold="h3", spend=10)


def test_void(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 40, expires_at=T + 60)
    seq = last_seq(ledger)
    r = ok(ledger, T + 1, "void", "v1", "h1")
    assert (r.a, r.b) == (40, 0)
    expect(ledger, member, T + 1, available=100, balance=100, earned=100)
    [entry] = entries_after(ledger, seq)
    assert (entry.type, entry.credit, entry.amount, entry.amount2, entry.ref) == (
        Entry.HOLD_RELEASED, member, 40, RELEASE_VOIDED, 1)
    assert ledger.operation(b"h1").hold_state == HoldState.VOIDED
    # a blocked account's hold may still be voided
    ok(ledger, T, "hold", "h2", member, 10, expires_at=T + 60)
    ok(ledger, T, "set_account_status", "blk", member, Status.BLOCKED)
    assert ok(ledger, T, "void", "v2", "h2").a == 10
    expect(ledger, member, T, available=100, balance=100, earned=100)


def test_void_rejections(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    rejected(ledger, T, Code.KEY_INVALID, "void", "v1", "")
    rejected(ledger, T, Code.KEY_INVALID, "void", "v2", "h" * 129)
    rejected(ledger, T, Code.HOLD_NOT_FOUND, "void", "v3", "nope")
    rejected(ledger, T, Code.HOLD_NOT_FOUND, "void", "v4", "e1")
    ok(ledger, T, "hold", "h1", member, 10, expires_at=T + 60)
    ok(ledger, T, "hold", "h2", member, 10, expires_at=T + 60)
    ok(ledger, T, "void", "v5", "h1")
    rejected(ledger, T, Code.HOLD_VOIDED, "void", "v6", "h1")
    ok(ledger, T, "capture", "c1", member, hold="h2", spend=10)
    rejected(ledger, T, Code.HOLD_CAPTURED, "void", "v7", "h2")


def test_hold_times_out_and_its_points_come_back(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 40, expires_at=T + 60)
    expect(ledger, member, T + 59, available=60, held=40, balance=100, earned=100)
    ok(ledger, T + 59, "spend", "s0", member, 1)  # touched before the timeout
    rejected(ledger, T + 60, Code.HOLD_EXPIRED, "capture", "c1", member, hold="h1", spend=40)
    rejected(ledger, T + 60, Code.HOLD_EXPIRED, "void", "v1", "h1")
    seq = last_seq(ledger)
    # the next operation on the account releases the hold first
    assert ok(ledger, T + 60, "spend", "s1", member, 99).a == 99
    assert [(e.type, e.amount, e.amount2) for e in entries_after(ledger, seq)] == [
        (Entry.HOLD_RELEASED, 40, RELEASE_EXPIRED), (Entry.SPEND, 99, 0)]
    expect(ledger, member, T + 60, earned=100, spent=100)
    rejected(ledger, T + 61, Code.HOLD_EXPIRED, "capture", "c1", member, hold="h1", spend=40)


def test_sweep_releases_timed_out_holds(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 40, expires_at=T + 60)
    r = ok(ledger, T + 59, "sweep", "sw1")
    assert (r.a, r.b) == (0, 0)
    seq = last_seq(ledger)
    r = ok(ledger, T + 60, "sweep", "sw2")
    assert (r.a, r.b) == (1, 0)  # one index key, no points expired
    [entry] = entries_after(ledger, seq)
    assert (entry.type, entry.credit, entry.amount, entry.amount2, entry.ref) == (
        Entry.HOLD_RELEASED, member, 40, RELEASE_EXPIRED, 1)
    expect(ledger, member, T + 60, available=100, balance=100, earned=100)
    assert ledger.dump()["hold_expiry"] == []
    rejected(ledger, T + 60, Code.HOLD_EXPIRED, "capture", "c1", member, hold="h1", spend=1)


# --- REFUND --------------------------------------------------------------------

def test_refund_gives_spent_points_back_to_their_lots(ledger, member):
    ok(ledger, T, "earn", "soon", member, 50, expires_at=T + 10 * DAY)    # lot 1
    ok(ledger, T, "earn", "later", member, 50, expires_at=T + 20 * DAY)   # lot 2
    ok(ledger, T, "spend", "s1", member, 80, money=800)  # 50 of lot 1, 30 of lot 2
    assert ledger.lots(member) == [Lot(2, 0, 20, 0, T + 20 * DAY, H0)]
    seq = last_seq(ledger)
    r = ok(ledger, T + DAY, "refund", "r1", "s1", money=200, give_back=20)
    assert (r.a, r.b) == (20, 0)
    # last consumed first: lot 2 gets its 20 back
    assert ledger.lots(member) == [Lot(2, 0, 40, 0, T + 20 * DAY, H0)]
    r = ok(ledger, T + DAY, "refund", "r2", "s1", money=600, give_back=60)
    assert (r.a, r.b) == (60, 0)
    # then lot 2 is whole and lot 1 comes back with its own expiry
    assert ledger.lots(member) == [Lot(1, 0, 50, 0, T + 10 * DAY, H0),
                                   Lot(2, 0, 50, 0, T + 20 * DAY, H0)]
    expect(ledger, member, T + DAY, available=100, balance=100, earned=100)
    # each refund with money also journals the money given back
    returns = entries_after(ledger, seq)
    assert [(e.type, e.debit, e.credit, e.amount, e.amount2) for e in returns] == [
        (Entry.RETURN, REDEEMED0, member, 20, 0), (Entry.RECEIPT, 0, member, -200, -20),
        (Entry.RETURN, REDEEMED0, member, 60, 0), (Entry.RECEIPT, 0, member, -600, -60)]
    assert sys_balance(ledger, Sys.REDEEMED) == 0
    original = ledger.operation(b"s1")
    assert (original.refunded_money, original.returned, original.clawed) == (800, 80, 0)
    rejected(ledger, T + DAY, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "r3", "s1", give_back=1)


def test_refund_into_an_expired_lot_burns_it_again(ledger, member):
    ok(ledger, T, "earn", "e1", member, 50, expires_at=T + DAY)
    ok(ledger, T, "earn", "e2", member, 10)
    ok(ledger, T, "spend", "s1", member, 30, money=300)
    seq = last_seq(ledger)
    r = ok(ledger, T + 2 * DAY, "refund", "r1", "s1", money=300, give_back=30)
    assert (r.a, r.b) == (30, 0)
    assert [(e.type, e.amount) for e in entries_after(ledger, seq)] == [
        (Entry.EXPIRE, 20), (Entry.RETURN, 30), (Entry.RECEIPT, -300), (Entry.EXPIRE, 30)]
    expect(ledger, member, T + 2 * DAY, available=10, balance=10, earned=60, expired=50)
    assert sys_balance(ledger, Sys.EXPIRED) == 50


def test_refund_claws_back_from_the_receipts_own_lot_first(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, expires_at=T + 10 * DAY)   # lot 1
    ok(ledger, T, "earn", "e2", member, 50, money=1000,
       expires_at=T + 20 * DAY)                                        # lot 2
    seq = last_seq(ledger)
    r = ok(ledger, T, "refund", "r1", "e2", money=600, claw_back=30)
    assert (r.a, r.b) == (0, 30)
    assert ledger.lots(member) == [Lot(1, 0, 100, 0, T + 10 * DAY, H0),
                                   Lot(2, 0, 20, 0, T + 20 * DAY, H0)]
    entry, receipt = entries_after(ledger, seq)
    assert (entry.type, entry.debit, entry.credit, entry.amount, entry.ref) == (
        Entry.CLAWBACK, member, ISSUED0, 30, 2)
    assert (receipt.type, receipt.credit, receipt.amount, receipt.amount2,
            receipt.ref) == (Entry.RECEIPT, member, -600, 0, 0)
    expect(ledger, member, T, available=120, balance=120, earned=120)
    assert sys_balance(ledger, Sys.ISSUED) == -120


def test_clawback_leaves_held_points_alone(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, money=1000)
    ok(ledger, T, "hold", "h1", member, 80, expires_at=T + 60)
    # only 20 of the receipt's lot are free, and nothing else: no debt allowed
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "refund", "r1", "e1", claw_back=50)
    r = ok(ledger, T, "refund", "r2", "e1", claw_back=20)
    assert (r.a, r.b) == (0, 20)
    expect(ledger, member, T, available=0, held=80, balance=80, earned=80)
    assert ok(ledger, T, "capture", "c1", member, hold="h1", spend=80).a == 80


def test_clawback_of_a_spent_lot_takes_available_points(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, expires_at=T + 30 * DAY)   # lot 1
    ok(ledger, T, "earn", "e2", member, 50, expires_at=T + 10 * DAY)    # lot 2
    ok(ledger, T, "spend", "s1", member, 40)                            # from lot 2
    r = ok(ledger, T, "refund", "r1", "e2", claw_back=50)
    assert (r.a, r.b) == (0, 50)
    assert ledger.lots(member) == [Lot(1, 0, 60, 0, T + 30 * DAY, H0)]
    expect(ledger, member, T, available=60, balance=60, earned=100, spent=40)


def test_clawback_of_pending_points(ledger, member):
    ok(ledger, T, "earn", "e1", member, 10)
    ok(ledger, T, "earn", "e2", member, 100, money=2000, activates_at=T + 14 * DAY,
       expires_at=T + 365 * DAY)
    r = ok(ledger, T + DAY, "refund", "r1", "e2", money=2000, proportional=True)
    assert (r.a, r.b) == (0, 100)
    assert ledger.lots(member) == [Lot(1, 0, 10, 0, NEVER, H0)]
    expect(ledger, member, T + DAY, available=10, balance=10, earned=10)


def test_clawback_without_points_is_refused_unless_the_program_allows_debt(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, money=1000)
    ok(ledger, T, "spend", "s1", member, 100)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "refund", "r1", "e1", money=1000,
             proportional=True)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "refund", "r2", "e1", claw_back=1)
    expect(ledger, member, T, earned=100, spent=100)


def test_debt_is_repaid_by_later_earnings_once_active(ledger, open_program):
    member, other = open_program(1, 2, flags=PROGRAM_ALLOW_DEBT)
    ok(ledger, T, "earn", "e1", member, 100, money=1000)
    ok(ledger, T, "spend", "s1", member, 100)
    r = ok(ledger, T, "refund", "r1", "e1", money=1000, proportional=True)
    assert (r.a, r.b) == (0, 100)
    expect(ledger, member, T, available=-100, balance=-100, debt=100, spent=100)
    assert sys_balance(ledger, Sys.ISSUED) == 0
    # pending points do not pay debt
    ok(ledger, T, "earn", "e2", member, 30, activates_at=T + DAY)
    expect(ledger, member, T, available=-100, pending=30, balance=-70, debt=100,
           earned=30, spent=100)
    rejected(ledger, T, Code.ACCOUNT_IN_DEBT, "transfer", "t1", member, other,
             everything=True)
    rejected(ledger, T + DAY, Code.INSUFFICIENT_POINTS, "spend", "s2", member, 1)
    # active ones do, when the account is next touched
    ok(ledger, T + DAY, "earn", "e3", member, 50)
    expect(ledger, member, T + DAY, available=-20, balance=-20, debt=20,
           earned=80, spent=100)
    assert ledger.lots(member) == []
    ok(ledger, T + DAY, "earn", "e4", member, 25)
    expect(ledger, member, T + DAY, available=5, balance=5, earned=105, spent=100)
    assert ledger.lots(member) == [Lot(4, 0, 5, 0, NEVER, H0 + 24)]


def test_proportional_partial_refunds_add_up_without_drift(ledger, member):
    ok(ledger, T, "earn", "e0", member, 200)
    ok(ledger, T, "capture", "c1", member, spend=100, earn=7, money=3)
    got = []
    for i in range(3):
        r = ok(ledger, T, "refund", f"r{i}", "c1", money=1, proportional=True)
        got.append((r.a, r.b))
    assert got == [(33, 2), (33, 2), (34, 3)]
    original = ledger.operation(b"c1")
    assert (original.refunded_money, original.returned, original.clawed) == (3, 100, 7)
    expect(ledger, member, T, available=200, balance=200, earned=200)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "r3", "c1", money=1,
             proportional=True)


def test_proportional_refunds_of_an_earn_sum_to_what_it_earned(ledger, member):
    ok(ledger, T, "earn", "e1", member, 150, money=3000)
    claws = [ok(ledger, T, "refund", f"r{m}", "e1", money=m, proportional=True).b
             for m in (1000, 700, 1300)]
    assert claws == [50, 35, 65]
    expect(ledger, member, T)
    assert ledger.lots(member) == []


def test_proportional_refund_after_an_explicit_one_never_goes_negative(ledger, member):
    ok(ledger, T, "earn", "e0", member, 300)
    ok(ledger, T, "capture", "c1", member, spend=90, earn=150, money=3000)
    r = ok(ledger, T, "refund", "r1", "c1", give_back=60, claw_back=100)
    assert (r.a, r.b) == (60, 100)
    r = ok(ledger, T, "refund", "r2", "c1", money=1000, proportional=True)
    assert (r.a, r.b) == (0, 0)  # a third is 30 and 50: less than already refunded
    r = ok(ledger, T, "refund", "r3", "c1", money=2000, proportional=True)
    assert (r.a, r.b) == (30, 50)
    expect(ledger, member, T, available=300, balance=300, earned=300)


def test_proportional_refund_of_large_numbers(ledger, member):
    big = 4 * 10 ** 18
    ok(ledger, T, "earn", "e1", member, big)
    ok(ledger, T, "spend", "s1", member, big, money=INT64_MAX)
    r = ok(ledger, T, "refund", "r1", "s1", money=INT64_MAX // 3, proportional=True)
    assert r.a == big * (INT64_MAX // 3) // INT64_MAX
    expect(ledger, member, T, available=r.a, balance=r.a, earned=big, spent=big - r.a)


def test_refund_rejections(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, money=1000)
    ok(ledger, T, "spend", "s1", member, 30, money=300)
    ok(ledger, T, "hold", "h1", member, 5, expires_at=T + 60)
    rejected(ledger, T, Code.KEY_INVALID, "refund", "x1", "", money=1)
    rejected(ledger, T, Code.KEY_INVALID, "refund", "x2", "k" * 129, money=1)
    rejected_raw(ledger, T, Code.FLAGS_INVALID, Kind.REFUND, "x3", key="e1",
                 money=10, flags=2)
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x4", "e1", money=-1)
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x5", "s1", give_back=-1)
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x6", "e1", claw_back=-1)
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x7", "e1")
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x8", "e1", proportional=True)
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x9", "e1", money=10,
             claw_back=1, proportional=True)
    rejected(ledger, T, Code.OPERATION_NOT_FOUND, "refund", "x10", "nothing", money=1)
    ok(ledger, T, "refund", "r1", "e1", money=100)  # money alone is a refund too
    for original in ("h1", "r1", "program-1-0", "open-1-0"):
        rejected(ledger, T, Code.NOT_REFUNDABLE, "refund", "x11", original, money=1)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x12", "e1", money=901)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x13", "e1", claw_back=101)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x14", "e1", give_back=1)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x15", "s1", give_back=31)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x16", "s1", claw_back=1)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x17", "s1", money=301,
             proportional=True)
    ok(ledger, T, "refund", "r2", "s1", give_back=20)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "x18", "s1", give_back=11)


def test_refund_money_overflow(ledger, member):
    ok(ledger, T, "earn", "e1", member, 1, money=INT64_MAX)
    ok(ledger, T, "refund", "r1", "e1", money=INT64_MAX)
    rejected(ledger, T, Code.OVERFLOW, "refund", "r2", "e1", money=1)


# --- ADJUST --------------------------------------------------------------------

def test_adjust_up_and_down(ledger, member):
    r = ok(ledger, T, "adjust", "a1", member, 25, reason=3, expires_at=T + DAY)
    assert r.a == 1  # the new lot
    expect(ledger, member, T, available=25, balance=25)  # not counted as earned
    assert sys_balance(ledger, Sys.ADJUSTED) == -25
    entry = ledger.journal()[-1]
    assert (entry.type, entry.debit, entry.credit, entry.amount, entry.amount2,
            entry.ref) == (Entry.ADJUST, system_account(Sys.ADJUSTED), member, 25, 3, 1)
    ok(ledger, T, "adjust", "a2", member, 40, reason=1, activates_at=T + DAY)
    expect(ledger, member, T, available=25, pending=40, balance=65)
    r = ok(ledger, T, "adjust", "a3", member, -10, reason=4)
    assert r.a == 10
    expect(ledger, member, T, available=15, pending=40, balance=55)
    assert sys_balance(ledger, Sys.ADJUSTED) == -55
    entry = ledger.journal()[-1]
    assert (entry.type, entry.debit, entry.credit, entry.amount, entry.amount2) == (
        Entry.ADJUST, member, system_account(Sys.ADJUSTED), 10, 4)
    # a blocked account may still be corrected
    ok(ledger, T, "set_account_status", "blk", member, Status.BLOCKED)
    ok(ledger, T, "adjust", "a4", member, -15, reason=4)
    ok(ledger, T, "adjust", "a5", member, 5, reason=4)
    expect(ledger, member, T, available=5, pending=40, balance=45)


def test_adjust_rejections(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 30)
    rejected(ledger, T, Code.AMOUNT_INVALID, "adjust", "x1", a, 0, reason=1)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "adjust", "x2", a, -31, reason=1)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "adjust", "x3", a, INT64_MIN, reason=1)
    rejected(ledger, T, Code.TIME_INVALID, "adjust", "x4", a, 5, reason=1, expires_at=T)
    rejected(ledger, T, Code.TIME_INVALID, "adjust", "x5", a, 5, reason=1,
             activates_at=-1)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "adjust", "x6", 99, 5, reason=1)
    ok(ledger, T, "set_account_status", "cls", b, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "adjust", "x7", b, 5, reason=1)
    rejected(ledger, T, Code.OVERFLOW, "adjust", "x8", a, INT64_MAX, reason=1)


# --- TRANSFER ------------------------------------------------------------------

def test_transfer_part_moves_active_lots_with_their_expiry(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 40, expires_at=T + 10 * DAY, partner=2)  # lot 1
    ok(ledger, T, "earn", "e2", a, 100, expires_at=T + 20 * DAY)            # lot 2
    ok(ledger, T, "earn", "e3", a, 30, activates_at=T + DAY)                # lot 3
    ok(ledger, T, "earn", "e4", b, 5)                                       # b's lot 1
    seq = last_seq(ledger)
    r = ok(ledger, T, "transfer", "t1", a, b, 60)
    assert (r.a, r.b) == (60, 0)
    assert ledger.lots(a) == [Lot(2, 0, 80, 0, T + 20 * DAY, H0), Lot(3, 0, 30, T + DAY, NEVER, H0)]
    assert ledger.lots(b) == [Lot(2, 2, 40, 0, T + 10 * DAY, H0),
                              Lot(3, 0, 20, 0, T + 20 * DAY, H0), Lot(1, 0, 5, 0, NEVER, H0)]
    [entry] = entries_after(ledger, seq)
    assert (entry.type, entry.debit, entry.credit, entry.amount) == (
        Entry.TRANSFER, a, b, 60)
    expect(ledger, a, T, available=80, pending=30, balance=110, earned=170)
    expect(ledger, b, T, available=65, balance=65, earned=5)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "transfer", "t2", a, b, 81)


def test_transfer_everything_merges_all_lots_pending_included(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 40, expires_at=T + 10 * DAY)
    ok(ledger, T, "earn", "e2", a, 30, activates_at=T + DAY, expires_at=T + 5 * DAY)
    ok(ledger, T, "spend", "s1", a, 15)
    ok(ledger, T, "set_account_status", "blk", a, Status.BLOCKED)  # the lost card's account
    r = ok(ledger, T, "transfer", "t1", a, b, everything=True)
    assert r.a == 55
    assert ledger.lots(a) == []
    # new lot numbers on the target, same points, activation and expiry
    assert ledger.lots(b) == [Lot(1, 0, 30, T + DAY, T + 5 * DAY, H0),
                              Lot(2, 0, 25, 0, T + 10 * DAY, H0)]
    expect(ledger, a, T, earned=70, spent=15)
    expect(ledger, b, T, available=25, pending=30, balance=55)
    seq = last_seq(ledger)
    assert ok(ledger, T, "transfer", "t2", a, b, everything=True).a == 0
    assert last_seq(ledger) == seq  # nothing moved, nothing posted


def test_transfer_rejections(ledger, open_program):
    a, b, c, d = open_program(1, 4)
    [other] = open_program(2, 1)
    ok(ledger, T, "earn", "e1", a, 50)
    rejected_raw(ledger, T, Code.FLAGS_INVALID, Kind.TRANSFER, "x1", account=a,
                 account2=b, amount=1, flags=2)
    rejected(ledger, T, Code.AMOUNT_INVALID, "transfer", "x2", a, b, 0)
    rejected(ledger, T, Code.AMOUNT_INVALID, "transfer", "x3", a, b, -1)
    rejected_raw(ledger, T, Code.AMOUNT_INVALID, Kind.TRANSFER, "x4", account=a,
                 account2=b, amount=5, flags=1)
    rejected(ledger, T, Code.SAME_ACCOUNT, "transfer", "x5", a, a, 1)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "transfer", "x6", 99, b, 1)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "transfer", "x7", a, 99, 1)
    rejected(ledger, T, Code.PROGRAM_MISMATCH, "transfer", "x8", a, other, 1)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "transfer", "x9", a, b, 51)
    ok(ledger, T, "hold", "h1", a, 1, expires_at=T + 60)
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "transfer", "x10", a, b, everything=True)
    ok(ledger, T, "set_account_status", "blk", c, Status.BLOCKED)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "transfer", "x11", a, c, 1)
    ok(ledger, T, "set_account_status", "cls", d, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "transfer", "x12", a, d, 1)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "transfer", "x13", d, a, everything=True)


def test_transfer_overflow_on_the_target(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, INT64_MAX)
    ok(ledger, T + HOUR, "earn", "e2", b, 1)  # another report row and cohort
    rejected(ledger, T, Code.OVERFLOW, "transfer", "t1", b, a, 1)
    rejected(ledger, T, Code.OVERFLOW, "transfer", "t2", b, a, everything=True)
    assert ok(ledger, T, "transfer", "t3", a, b, 5).a == 5
    expect(ledger, b, T, available=6, balance=6, earned=1)


# --- expiry and SWEEP ----------------------------------------------------------

def test_expired_lots_burn_when_the_account_is_touched(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, expires_at=T + DAY)
    expect(ledger, member, T + DAY - 1, available=100, balance=100, earned=100)
    assert ok(ledger, T + DAY - 1, "spend", "s1", member, 1).a == 1
    # due, but nothing has touched the account yet
    expect(ledger, member, T + DAY, balance=99, earned=100, spent=1)
    assert sys_balance(ledger, Sys.EXPIRED) == 0
    seq = last_seq(ledger)
    ok(ledger, T + DAY, "earn", "e2", member, 5)
    expired, earned = entries_after(ledger, seq)
    assert (expired.type, expired.sys, expired.debit, expired.credit, expired.amount,
            expired.ref) == (Entry.EXPIRE, Sys.EXPIRED, member,
                             system_account(Sys.EXPIRED), 99, 1)
    assert earned.type == Entry.EARN
    expect(ledger, member, T + DAY, available=5, balance=5, earned=105, spent=1,
           expired=99)
    assert sys_balance(ledger, Sys.EXPIRED) == 99


def test_sweep_expires_due_lots(ledger, open_program):
    a, b, c = open_program(1, 3)
    ok(ledger, T, "earn", "e1", a, 100, expires_at=T + DAY, partner=4)
    ok(ledger, T, "earn", "e2", b, 50, expires_at=T + 2 * DAY)
    ok(ledger, T, "earn", "e3", c, 70)
    assert len(ledger.dump()["lot_expiry"]) == 2
    r = ok(ledger, T + DAY, "sweep", "sw1")
    assert (r.a, r.b) == (1, 100)
    entry = ledger.journal()[-1]
    assert (entry.type, entry.debit, entry.credit, entry.amount, entry.partner) == (
        Entry.EXPIRE, a, system_account(Sys.EXPIRED, 4), 100, 4)
    assert sys_balance(ledger, Sys.EXPIRED, partner=4) == 100
    expect(ledger, a, T + DAY, earned=100, expired=100)
    r = ok(ledger, T + 3 * DAY, "sweep", "sw2")
    assert (r.a, r.b) == (1, 50)
    expect(ledger, b, T + 3 * DAY, earned=50, expired=50)
    expect(ledger, c, T + 3 * DAY, available=70, balance=70, earned=70)
    assert ledger.dump()["lot_expiry"] == []
    r = ok(ledger, T + 4 * DAY, "sweep", "sw3")
    assert (r.a, r.b) == (0, 0)
    assert sys_balance(ledger, Sys.EXPIRED) == 50
    assert program_sums(ledger) == {1: 0}


def test_sweeps_alone_expire_every_lot_of_an_account_in_turn(ledger, member):
    ok(ledger, T, "earn", "e1", member, 1, expires_at=T + DAY)
    ok(ledger, T, "earn", "e2", member, 20, expires_at=T + 3 * DAY)
    ok(ledger, T, "earn", "e3", member, 300, expires_at=T + 2 * DAY)
    ok(ledger, T, "earn", "e4", member, 4000)
    expired = [ok(ledger, T + day * DAY, "sweep", f"sw{day}").b for day in range(1, 5)]
    assert expired == [1, 300, 20, 0]
    assert [(e.type, e.amount) for e in ledger.journal()[-3:]] == [
        (Entry.EXPIRE, 1), (Entry.EXPIRE, 300), (Entry.EXPIRE, 20)]
    expect(ledger, member, T + 4 * DAY, available=4000, balance=4000, earned=4321,
           expired=321)
    assert sys_balance(ledger, Sys.EXPIRED) == 321
    assert ledger.dump()["lot_expiry"] == []


def test_sweep_respects_its_limit(ledger, open_program):
    a, b = open_program(1, 2)
    ok(ledger, T, "earn", "e1", a, 10, expires_at=T + DAY)
    ok(ledger, T, "earn", "e2", b, 20, expires_at=T + DAY + 1)
    ok(ledger, T, "hold", "h1", b, 5, expires_at=T + DAY)
    r = ok(ledger, T + 2 * DAY, "sweep", "sw1", limit=1)
    assert (r.a, r.b) == (1, 10)
    r = ok(ledger, T + 2 * DAY, "sweep", "sw2", limit=2)
    assert (r.a, r.b) == (2, 20)  # b's lot key and b's hold key
    expect(ledger, b, T + 2 * DAY, earned=20, expired=20)
    assert ledger.dump()["lot_expiry"] == ledger.dump()["hold_expiry"] == []


def test_sweep_of_a_spent_lot_expires_nothing(ledger, member):
    ok(ledger, T, "earn", "e1", member, 10, expires_at=T + DAY)
    ok(ledger, T, "spend", "s1", member, 10)
    seq = last_seq(ledger)
    r = ok(ledger, T + DAY, "sweep", "sw1")
    assert (r.a, r.b) == (1, 0)
    assert last_seq(ledger) == seq


def test_sweep_rejections(ledger):
    rejected(ledger, T, Code.AMOUNT_INVALID, "sweep", "sw1", limit=0)
    rejected(ledger, T, Code.AMOUNT_INVALID, "sweep", "sw2", limit=-1)


# --- operation ids, kinds, batches ---------------------------------------------

def test_replay_returns_the_first_result_and_applies_nothing_twice(ledger, member):
    batch = (Batch().earn("e1", member, 100, money=2000)
             .hold("h1", member, 30, expires_at=T + 60)
             .capture("c1", member, hold="h1", spend=30, earn=5))
    first = list(ledger.apply(batch, T))
    assert [(r.code, r.a, r.b, r.replayed) for r in first] == [
        (Code.OK, 1, 0, False), (Code.OK, 1, 0, False), (Code.OK, 30, 2, False)]
    state = stored(ledger)
    again = list(ledger.apply(batch, T + 5))
    assert [(r.code, r.a, r.b, r.replayed) for r in again] == [
        (Code.OK, 1, 0, True), (Code.OK, 1, 0, True), (Code.OK, 30, 2, True)]
    assert stored(ledger) == state
    expect(ledger, member, T, available=75, balance=75, earned=105, spent=30)


def test_replay_within_one_batch(ledger, member):
    batch = Batch().earn("e1", member, 10).earn("e1", member, 10)
    assert list(ledger.apply(batch, T)) == [Result(Code.OK, 1), Result(Code.OK, 1, replayed=True)]
    expect(ledger, member, T, available=10, balance=10, earned=10)


def test_op_id_reused_with_another_payload(ledger, member):
    ok(ledger, T, "earn", "e1", member, 10)
    rejected(ledger, T, Code.OP_ID_REUSED, "earn", "e1", member, 11)
    rejected(ledger, T, Code.OP_ID_REUSED, "earn", "e1", member, 10, money=1)
    rejected(ledger, T, Code.OP_ID_REUSED, "spend", "e1", member, 10)
    expect(ledger, member, T, available=10, balance=10, earned=10)


def test_op_id_invalid(ledger, member):
    rejected(ledger, T, Code.OP_ID_INVALID, "earn", "", member, 10)
    rejected(ledger, T, Code.OP_ID_INVALID, "earn", "i" * 129, member, 10)
    rejected(ledger, T, Code.OP_ID_INVALID, "put_program", "", 5)
    assert ok(ledger, T, "earn", "i" * 128, member, 10).a == 1
    assert ledger.operation(b"i" * 128).earned == 10


def test_kind_invalid(ledger, member):
    rejected_raw(ledger, T, Code.KIND_INVALID, 99, "k1", account=member, amount=1)
    rejected_raw(ledger, T, Code.KIND_INVALID, 0, "k2", account=member, amount=1)


def test_a_rejected_operation_id_is_not_used_up(ledger, member):
    rejected(ledger, T, Code.INSUFFICIENT_POINTS, "spend", "s1", member, 50)
    assert ledger.operation(b"s1") is None
    ok(ledger, T, "earn", "e1", member, 80)
    # the same id, even the same payload, is evaluated afresh
    assert ok(ledger, T, "spend", "s1", member, 50).a == 50
    expect(ledger, member, T, available=30, balance=30, earned=80, spent=50)


def test_a_rejected_operation_does_not_spoil_its_neighbours(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e0", a, 10, expires_at=T + DAY)
    seq = last_seq(ledger)
    batch = (Batch().earn("e1", a, 100)
             .spend("s1", a, 500)                       # too much
             .earn("e2", b, 0)                          # malformed
             .spend("s2", a, 30)
             .open_account("o1", 9, "nobody")           # no such program
             .open_account("o2", 1, "newcomer")
             .earn("e3", b, 7))
    results = list(ledger.apply(batch, T + DAY))  # e0's lot is due
    assert [r.code for r in results] == [
        Code.OK, Code.INSUFFICIENT_POINTS, Code.AMOUNT_INVALID, Code.OK,
        Code.PROGRAM_NOT_FOUND, Code.OK, Code.OK]
    assert results[5].a == 3  # the failed open used no account number
    assert [(e.seq, e.type, e.op_id) for e in entries_after(ledger, seq)] == [
        (seq + 1, Entry.EXPIRE, b"e1"), (seq + 2, Entry.EARN, b"e1"),
        (seq + 3, Entry.SPEND, b"s2"), (seq + 4, Entry.ACCOUNT_OPENED, b"o2"),
        (seq + 5, Entry.EARN, b"e3")]
    expect(ledger, a, T + DAY, available=70, balance=70, earned=110, spent=30,
           expired=10)
    expect(ledger, b, T + DAY, available=7, balance=7, earned=7)
    assert ledger.operation(b"s1") is None and ledger.operation(b"e2") is None


def test_a_rejection_after_changes_to_the_same_account_keeps_them(ledger, member):
    ok(ledger, T, "earn", "e0", member, 100)
    batch = (Batch().hold("h1", member, 60, expires_at=T + 60)
             .capture("c1", member, hold="h1", spend=61)   # more than held
             .spend("s1", member, 41)                      # more than available
             .capture("c2", member, hold="h1", spend=60))
    assert ledger.apply(batch, T).codes() == [
        Code.OK, Code.CAPTURE_EXCEEDS_HOLD, Code.INSUFFICIENT_POINTS, Code.OK]
    expect(ledger, member, T, available=40, balance=40, earned=100, spent=60)


# --- double entry and the journal ----------------------------------------------

def busy_ledger(ledger, open_program):
    """Two programs, partners, every kind of posting."""
    a, b, c = open_program(1, 3, flags=PROGRAM_ALLOW_DEBT)
    [d] = open_program(2, 1)
    batch = (Batch().earn("e1", a, 100, partner=1, money=1000, expires_at=T + DAY)
             .earn("e2", a, 60, partner=2, money=500)
             .earn("e3", d, 80, money=800, activates_at=T + DAY)
             .spend("s1", a, 120, partner=3, money=400)
             .hold("h1", a, 10, expires_at=T + 100)
             .capture("c1", a, hold="h1", spend=10, earn=4, money=90, partner=1)
             .refund("r1", "s1", money=200, proportional=True)
             .refund("r2", "e2", claw_back=60)
             .adjust("a1", b, 33, reason=2)
             .adjust("a2", a, -5, reason=2)
             .transfer("t1", b, c, 13)
             .link_card("l1", c, "card"))
    results = ledger.apply(batch, T)
    assert all(r.ok for r in results), results
    batch = Batch().earn("e4", c, 9).sweep("sw").earn("e5", d, 1)
    results = ledger.apply(batch, T + 2 * DAY)
    assert all(r.ok for r in results), results
    return a, b, c, d


def test_double_entry_per_program(ledger, open_program):
    a, b, c, d = busy_ledger(ledger, open_program)
    assert program_sums(ledger) == {1: 0, 2: 0}
    members_1 = sum(ledger.balances(x, T).balance for x in (a, b, c))
    system_1 = sum(sys_balance(ledger, kind, partner)
                   for kind in Sys for partner in range(4))
    assert members_1 == -system_1 != 0
    assert ledger.balances(d, T).balance == 81 == -sys_balance(ledger, Sys.ISSUED, program=2)


def test_journal_is_gap_free_and_hash_chained(ledger, open_program):
    assert ledger.head() == (0, bytes(HASH_SIZE))
    busy_ledger(ledger, open_program)
    entries = ledger.journal(limit=10_000)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    digest = bytes(HASH_SIZE)
    for entry in entries:
        digest = hashlib.blake2b(digest + entry.body(), digest_size=HASH_SIZE).digest()
        assert entry.hash == digest
    assert ledger.head() == (entries[-1].seq, entries[-1].hash)
    assert ledger.journal(from_seq=5, limit=2) == entries[4:6]
    # the journal holds every kind of posting
    kinds = {e.type for e in entries}
    assert {Entry.EARN, Entry.SPEND, Entry.EXPIRE, Entry.ADJUST, Entry.TRANSFER,
            Entry.RETURN, Entry.CLAWBACK, Entry.HOLD_PLACED,
            Entry.HOLD_RELEASED} <= kinds


# --- opening, closing, malformed batches -------------------------------------

def test_reopened_ledger_carries_on(ledger_class, tmp_path):
    with ledger_class(tmp_path / "l", map_size=1 << 24, sync=False) as first:
        first.apply(Batch().put_program("p", 1).open_account("o1", 1, "m1")
                    .earn("e1", 1, 40), T)
        head, state = first.head(), first.dump()
    with ledger_class(tmp_path / "l", map_size=1 << 24, sync=False) as again:
        assert again.dump() == state
        batch = Batch().open_account("o2", 1, "m2").earn("e1", 1, 40)
        assert list(again.apply(batch, T)) == [Result(Code.OK, 2),
                                                Result(Code.OK, 1, replayed=True)]
        assert again.head()[0] == head[0] + 1
        assert again.audit() == []


@pytest.mark.parametrize("marker, says", [
    (None, "was written before ledger formats were recorded"),
    (U32.pack(LEDGER_FORMAT + 1), f"is in ledger format {LEDGER_FORMAT + 1}"),
    (b"\x01", "has a damaged format marker (1 bytes)")])
def test_a_ledger_of_another_format_is_refused_not_misread(ledger_class, tmp_path,
                                                          marker, says):
    """A new ledger is marked with LEDGER_FORMAT; one in use with another
    marker, or none (older than the marker), is refused on open, unchanged."""
    import lmdb
    path = tmp_path / "l"
    with ledger_class(path, map_size=1 << 24, sync=False) as first:
        first.apply(Batch().put_program("p", 1).open_account("o1", 1, "m1"), T)
        assert (META_FORMAT, U32.pack(LEDGER_FORMAT)) in first.dump()["meta"]
    env = lmdb.open(str(path), max_dbs=32)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        if marker is None:
            txn.delete(META_FORMAT, db=meta)
        else:
            txn.put(META_FORMAT, marker, db=meta)
        # a database this build has and that ledger lacks: not created either
        txn.drop(env.open_db(b"bonus_counters", txn=txn), delete=True)
    env.close()
    before = (path / "data.mdb").read_bytes()
    with pytest.raises(LedgerError, match=re.escape(f"{says}; this Kopilka reads ledger format "
                                                    f"{LEDGER_FORMAT} only")):
        ledger_class(path, map_size=1 << 24, sync=False)
    assert (path / "data.mdb").read_bytes() == before
    # and the path is not left claimed: the right marker opens it again
    env = lmdb.open(str(path), max_dbs=32)
    with env.begin(write=True) as txn:
        txn.put(META_FORMAT, U32.pack(LEDGER_FORMAT), db=env.open_db(b"meta", txn=txn))
    env.close()
    with ledger_class(path, map_size=1 << 24, sync=False) as again:
        assert again.audit() == []


def test_truncated_batch_is_refused_whole(ledger, member):
    state = stored(ledger)
    batch = bytes(Batch().earn("e1", member, 5).earn("e2", member, 5))
    with pytest.raises(ValueError):
        ledger.apply(batch[:-1], T)
    assert stored(ledger) == state


def test_closed_ledger_refuses_writes(ledger_class, tmp_path):
    opened = ledger_class(tmp_path / "l", sync=False)
    opened.close()
    with pytest.raises(LedgerError):
        opened.apply(Batch().put_program("p", 1), T)


# --- holds against debt, timed-out holds in reads, read errors --------------

def test_a_clawback_into_debt_leaves_an_open_hold_capturable(ledger, open_program):
    [member] = open_program(1, 1, flags=PROGRAM_ALLOW_DEBT)
    ok(ledger, T, "earn", "e1", member, 50, money=1000)
    ok(ledger, T, "spend", "s1", member, 50)
    ok(ledger, T, "earn", "e2", member, 100)
    ok(ledger, T, "hold", "h1", member, 100, expires_at=T + 60)
    # nothing is free: the program lets the clawback leave a debt of 50
    # (refusing the refund would do as well: either way the hold must stand)
    run(ledger, T, "refund", "r1", "e1", claw_back=50)
    held = ledger.balances(member, T).held
    assert sum(lot.remaining for lot in ledger.lots(member)) >= held == 100
    assert ok(ledger, T + 1, "capture", "c1", member, hold="h1", spend=100).a == 100


def test_balances_leave_out_timed_out_holds(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 40, expires_at=T + 60)
    expect(ledger, member, T + 60, available=100, balance=100, earned=100)


@pytest.mark.parametrize("case", ["closed ledger", "empty op id", "empty card"])
def test_failed_reads_raise_ledger_error(ledger_class, tmp_path, case):
    opened = ledger_class(tmp_path / "l", sync=False)
    opened.apply(Batch().put_program("p", 1), T)
    try:
        if case == "closed ledger":
            opened.close()
        read = {"closed ledger": lambda: opened.balances(1, T),
                "empty op id": lambda: opened.operation(b""),
                "empty card": lambda: opened.card(b"")}[case]
        with pytest.raises(LedgerError):
            read()
    finally:
        opened.close()


# --- stores and receipts without points --------------------------------------

def test_a_receipt_with_money_and_no_points_records_a_visit(ledger, member):
    head = ledger.head()[0]
    r = ledger.apply(Batch().capture("v1", member, money=4_500, store=42, lane=3), T)[0]
    assert r.ok and (r.a, r.b) == (0, 0)
    [visit] = ledger.journal(head + 1)
    assert (visit.type, visit.credit, visit.amount, visit.store) == (
        Entry.RECEIPT, member, 4_500, 42)
    assert ledger.operation(b"v1").money == 4_500
    expect(ledger, member, T)  # no points moved
    # with neither money nor points it is still nothing to record
    assert ledger.apply(Batch().capture("v2", member), T)[0].code == Code.AMOUNT_INVALID


def test_entries_carry_the_store_except_what_no_store_did(ledger, member):
    ledger.apply(Batch().earn("e1", member, 50, expires_at=T + DAY, money=500,
                              store=7, lane=2), T)
    ledger.apply(Batch().hold("h1", member, 10, expires_at=T + 60, store=8), T)
    head = ledger.head()[0]
    ledger.apply(Batch().earn("e2", member, 5, store=9), T + 2 * DAY)  # touch expires
    entries = ledger.journal(1)
    assert {(e.type, e.store) for e in entries if e.op_id == b"e1"} == {
        (Entry.EARN, 7), (Entry.RECEIPT, 7)}
    assert ledger.operation(b"h1").store == 8
    after = [(e.type, e.store) for e in ledger.journal(head + 1)]
    assert after == [(Entry.EXPIRE, 0), (Entry.HOLD_RELEASED, 0), (Entry.EARN, 9)]


def test_a_sweep_whose_total_would_overflow_is_refused(ledger, members):
    first, second = members
    for op_id, member, partner in (("e1", first, 1), ("e2", second, 2)):
        assert ledger.apply(Batch().earn(op_id, member, INT64_MAX - 1, partner=partner,
                                         expires_at=T + 100), T)[0].ok
    head = ledger.head()
    assert ledger.apply(Batch().sweep("sw", 10), T + 200)[0].code == Code.OVERFLOW
    assert ledger.head() == head


# --- data attached to operations ---------------------------------------------

def test_data_is_kept_with_the_operation_and_covered_by_its_digest(ledger, member):
    ok(ledger, T, "earn", "e1", member, 10, data=b"receipt\x00lines")
    ok(ledger, T, "earn", "e2", member, 10)
    assert ledger.operation(b"e1").data == b"receipt\x00lines"
    assert ledger.operation(b"e2").data == b""
    # a replay returns the first result and keeps the first data
    again = run(ledger, T, "earn", "e1", member, 10, data=b"receipt\x00lines")
    assert again == Result(Code.OK, 1, replayed=True)
    # the same id with other data is another payload
    rejected(ledger, T, Code.OP_ID_REUSED, "earn", "e1", member, 10, data=b"other")
    rejected(ledger, T, Code.OP_ID_REUSED, "earn", "e2", member, 10, data=b"x")
    assert ledger.operation(b"e1").data == b"receipt\x00lines"
    # never journaled
    assert all(e.data == b"" for e in ledger.journal(1) if e.op_id in (b"e1", b"e2"))


def test_data_of_every_size_round_trips(ledger, member):
    big = bytes(range(256)) * 255 + bytes(range(255))
    assert len(big) == MAX_DATA
    ok(ledger, T, "earn", "e1", member, 10, data=big)
    ok(ledger, T, "spend", "s1", member, 3, data=b"\x00")
    ok(ledger, T, "adjust", "a1", member, 4, reason=1, data=b"ticket 7")
    assert ledger.operation(b"e1").data == big
    assert ledger.operation(b"s1").data == b"\x00"
    assert ledger.operation(b"a1").data == b"ticket 7"
    with pytest.raises(ValueError):
        Batch().earn("e2", member, 1, data=big + b"!")


def test_a_refund_keeps_the_receipts_data_and_appends_its_own(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, money=1000, data=b"earned")
    ok(ledger, T, "spend", "s1", member, 40, money=500, data=b"spent")
    ok(ledger, T, "refund", "r1", "s1", money=250, proportional=True, data=b"return")
    ok(ledger, T, "refund", "r2", "e1", claw_back=10, data=b"")
    spent = ledger.operation(b"s1")
    assert (spent.data, spent.returned, len(spent.consumed)) == (b"spentreturn", 20, 1)
    assert (ledger.operation(b"e1").data, ledger.operation(b"e1").clawed) == (b"earned", 10)
    assert ledger.operation(b"r1").data == b"return"
    assert ledger.operation(b"r2").data == b""


def test_a_hold_keeps_its_data_when_captured_or_voided(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100)
    ok(ledger, T, "hold", "h1", member, 30, expires_at=T + 60, data=b"basket 1")
    ok(ledger, T, "hold", "h2", member, 30, expires_at=T + 60, data=b"basket 2")
    ok(ledger, T, "capture", "c1", member, hold="h1", spend=30, data=b"paid")
    ok(ledger, T, "void", "v2", "h2")
    h1, h2 = ledger.operation(b"h1"), ledger.operation(b"h2")
    assert (h1.hold_state, h1.data) == (HoldState.CAPTURED, b"basket 1")
    assert (h2.hold_state, h2.data) == (HoldState.VOIDED, b"basket 2")
    assert ledger.operation(b"c1").data == b"paid"


def test_batches_carry_data_after_the_keys(ledger, member):
    batch = Batch().capture("c1", member, hold="h", card="k", money=1, data=b"dd")
    [op] = iter_ops(bytes(batch))
    assert (op.op_id, op.key, op.key2, op.data) == (b"c1", b"h", b"k", b"dd")
    assert op.raw == bytes(batch)
    # data running past the end of the batch refuses the whole batch
    state = stored(ledger)
    with pytest.raises(ValueError):
        ledger.apply(bytes(Batch().earn("e1", member, 5, data=b"abc"))[:-1], T)
    assert stored(ledger) == state


# --- SET_PROFILE ------------------------------------------------------------------

def test_open_account_with_a_profile(ledger):
    ok(ledger, 0, "put_program", "p1", 1)
    assert ok(ledger, T, "open_account", "o1", 1, "cust-1", data=b"{name}").a == 1
    ok(ledger, T, "open_account", "o2", 1, "cust-2")
    assert ledger.profile(1) == b"{name}"
    assert ledger.profile(2) is None
    # the profile is stored once: not in the journal, not with the operation
    assert ledger.journal()[-2].data == b"cust-1"
    assert ledger.operation(b"o1").data == b""
    assert ledger.dump()["profiles"] == [(U64.pack(1), b"{name}")]


def test_set_profile_replaces_and_deletes(ledger, member):
    seq = last_seq(ledger)
    assert ok(ledger, T, "set_profile", "p1", member, b"first").a == member
    assert ok(ledger, T, "set_profile", "p2", member, b"second").a == member
    assert ledger.profile(member) == b"second"
    ok(ledger, T, "set_profile", "p3", member, b"")
    assert ledger.profile(member) is None
    ok(ledger, T, "set_profile", "p4", member, b"")  # nothing to delete: still fine
    entries = entries_after(ledger, seq)
    assert [(e.type, e.program, e.credit, e.amount, e.data) for e in entries] == [
        (Entry.PROFILE_SET, 1, member, 0, b"")] * 4
    assert ledger.operation(b"p1").data == b""
    assert ledger.account_id(1, b"member-1-0") == member


def test_erase_a_member_deletes_profile_and_external_id(ledger, members):
    member, other = members
    ok(ledger, T, "earn", "e1", member, 50, data=b"receipt")
    ok(ledger, T, "set_profile", "p1", member, b"Ivan Petrov, +7 900")
    ok(ledger, T, "set_profile", "p2", other, b"someone else")
    ok(ledger, T, "set_account_status", "close", member, Status.CLOSED)
    seq = last_seq(ledger)
    result = ok(ledger, T, "set_profile", "erase", member, b"", erase=True,
                external_id="member-1-0")
    assert result.a == member
    assert ledger.profile(member) is None
    assert ledger.account_id(1, b"member-1-0") is None
    [entry] = entries_after(ledger, seq)
    assert (entry.type, entry.credit, entry.amount, entry.data) == (
        Entry.PROFILE_SET, member, PROFILE_ERASE, b"")
    # nothing of the profile or the mapping is left anywhere; history stays
    dump = ledger.dump()
    assert not any(b"Ivan" in key + value for records in dump.values()
                   for key, value in records)
    assert [key for key, _ in dump["externals"]] == [U32.pack(1) + b"member-1-1"]
    assert ledger.profile(other) == b"someone else"
    assert ledger.balances(member, T).balance == 50
    assert ledger.operation(b"e1").data == b"receipt"
    # a retry replays; the freed external id may enrol someone new
    assert run(ledger, T, "set_profile", "erase", member, b"", erase=True,
               external_id="member-1-0").replayed
    assert ok(ledger, T, "open_account", "again", 1, "member-1-0").a == 3


def test_erase_without_an_external_id_deletes_the_profile_only(ledger, member):
    ok(ledger, T, "set_profile", "p1", member, b"profile")
    ok(ledger, T, "set_profile", "erase", member, b"", erase=True)
    assert ledger.profile(member) is None
    assert ledger.account_id(1, b"member-1-0") == member


def test_set_profile_rejections(ledger, members):
    member, other = members
    ok(ledger, T, "set_profile", "p0", member, b"kept")
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "set_profile", "p1", 99, b"x")
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "set_profile", "p2", 0, b"x")
    rejected_raw(ledger, T, Code.FLAGS_INVALID, Kind.SET_PROFILE, "p3",
                 account=member, flags=2)
    rejected_raw(ledger, T, Code.FLAGS_INVALID, Kind.SET_PROFILE, "p4",
                 account=member, flags=PROFILE_ERASE | 4, key="member-1-0")
    for op_id, key in (("p5", "member-1-1"),  # another member's
                       ("p6", "nobody"), ("p7", "k" * 129)):
        rejected(ledger, T, Code.KEY_INVALID, "set_profile", op_id, member, b"",
                 erase=True, external_id=key)
    ok(ledger, T, "set_profile", "erase", member, b"", erase=True,
       external_id="member-1-0")
    # already erased
    rejected(ledger, T, Code.KEY_INVALID, "set_profile", "p8", member, b"",
             erase=True, external_id="member-1-0")
    assert ledger.account_id(1, b"member-1-1") == other


# --- SET_TIER -------------------------------------------------------------------------

def test_set_tier_journals_changes_only(ledger, member):
    seq = last_seq(ledger)
    assert ledger.balances(member, T).tier == 0
    assert ok(ledger, T, "set_tier", "t1", member, 2) == Result(Code.OK, 2, 0)
    assert ledger.balances(member, T).tier == 2
    head = ledger.head()
    # the same tier again (a period close run twice): no entry
    assert ok(ledger, T, "set_tier", "t2", member, 2) == Result(Code.OK, 2, 2)
    assert ledger.head() == head
    assert ok(ledger, T, "set_tier", "t3", member, MAX_TIER) == Result(Code.OK, MAX_TIER, 2)
    assert ok(ledger, T, "set_tier", "t4", member, 0) == Result(Code.OK, 0, MAX_TIER)
    entries = entries_after(ledger, seq)
    assert [(e.type, e.program, e.credit, e.amount, e.amount2) for e in entries] == [
        (Entry.TIER_SET, 1, member, 2, 0),
        (Entry.TIER_SET, 1, member, MAX_TIER, 2),
        (Entry.TIER_SET, 1, member, 0, MAX_TIER)]


def test_tier_stays_through_other_operations(ledger, member):
    ok(ledger, T, "set_tier", "t1", member, 3)
    ok(ledger, T, "earn", "e1", member, 10, expires_at=T + DAY)
    ok(ledger, T, "hold", "h1", member, 5, expires_at=T + 60)
    ok(ledger, T, "set_account_status", "b", member, Status.BLOCKED)
    assert ok(ledger, T, "set_tier", "t2", member, 4).b == 3  # blocked: allowed
    ok(ledger, T, "set_account_status", "a", member, Status.ACTIVE)
    ok(ledger, T + 2 * DAY, "sweep", "sw")
    assert ledger.account(member).tier == 4
    b = ledger.balances(member, T + 2 * DAY)
    assert (b.tier, b.balance, b.expired) == (4, 0, 10)


def test_set_tier_rejections(ledger, members):
    member, other = members
    for op_id, tier in (("t1", -1), ("t2", MAX_TIER + 1), ("t3", INT64_MIN)):
        rejected(ledger, T, Code.AMOUNT_INVALID, "set_tier", op_id, member, tier)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "set_tier", "t4", 99, 1)
    ok(ledger, T, "set_account_status", "close", other, Status.CLOSED)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "set_tier", "t5", other, 1)
    rejected(ledger, T, Code.ACCOUNT_CLOSED, "set_tier", "t6", other, 0)


# --- report aggregates -----------------------------------------------------------

ALL = (0, 2**32)  # every hour or day


def activity(ledger, program=1, hours=ALL):
    """{(hour, store, partner, tier): {counter: value}}, nonzero counters only."""
    return {(h, s, p, t): {k: v for k, v in c._asdict().items() if v}
            for h, s, p, t, c in ledger.activity(program, *hours)}


def test_activity_counts_what_each_operation_did(ledger, members):
    a, b = members  # opened at time 0: hour 0
    H = T // HOUR
    ok(ledger, T, "earn", "e1", a, 100, money=1_000, store=3, expires_at=T + DAY)
    ok(ledger, T, "spend", "s1", a, 30, money=500, store=3)
    ok(ledger, T, "hold", "h1", a, 20, expires_at=T + 60, store=4)
    ok(ledger, T, "capture", "c1", a, hold="h1", spend=20, earn=5, money=2_000, store=4)
    ok(ledger, T, "refund", "r1", "c1", money=500, give_back=10, store=4)
    ok(ledger, T, "adjust", "j1", b, 7, reason=1)
    ok(ledger, T, "adjust", "j2", b, -2, reason=1)
    ok(ledger, T, "set_tier", "t1", b, 2)
    ok(ledger, T, "earn", "e2", b, 10, money=300, store=3)
    ok(ledger, T, "refund", "r2", "e2", money=100, claw_back=4, store=3)
    ok(ledger, T, "transfer", "x1", a, b, 1)  # between members: not counted
    ok(ledger, T + DAY, "sweep", "sw1")  # lot 1's 60 expire: no store did it
    assert activity(ledger) == {
        (0, 0, 0, 0): {"new_members": 2},
        (H, 3, 0, 0): {"issued": 100, "spent": 30, "receipts": 2,
                       "receipt_money": 1_500, "member_days": 1},
        (H, 4, 0, 0): {"issued": 5, "spent": 20, "returned": 10, "receipts": 1,
                       "receipt_money": 1_500},
        (H, 0, 0, 0): {"adjusted": 5},
        (H, 3, 0, 2): {"issued": 10, "clawed": 4, "receipts": 1,
                       "receipt_money": 200, "member_days": 1},
        (H + 24, 0, 0, 0): {"expired": 59},
        (H + 24, 0, 0, 2): {"expired": 1},  # the point b had from a
    }
    assert activity(ledger, hours=(H, H + 1)).keys() == {
        (H, 3, 0, 0), (H, 4, 0, 0), (H, 0, 0, 0), (H, 3, 0, 2)}
    assert list(ledger.activity(1, H + 1, H + 24)) == []
    assert list(ledger.activity(2, *ALL)) == []
    assert list(ledger.settlement(1, *ALL)) == [(H, 0, 0, 40)]
    assert list(ledger.member_days(1, *ALL)) == [(T // DAY, a), (T // DAY, b)]
    assert ledger.account(a).last_day == T // DAY + 1
    # the running totals: what the hourly rows sum to over every hour
    assert ledger.members_enrolled(1) == 2 and ledger.members_enrolled(2) == 0
    assert ledger.settled(1) == {(0, 0): 40} and ledger.settled(2) == {}


def test_aggregates_are_the_journal_rebuilt(ledger, open_program):
    a, b = open_program(1, 2)
    ok(ledger, T, "put_program", "tz", 1, utc_offset_minutes=300)
    ok(ledger, T, "earn", "e1", a, 100, money=1_000, partner=1, store=1)
    ok(ledger, T + HOUR, "spend", "s1", a, 60, money=600, partner=2, store=2)
    ok(ledger, T + HOUR, "refund", "r1", "s1", money=600, proportional=True, store=2)
    ok(ledger, T + 2 * HOUR, "set_tier", "t1", b, 1)
    ok(ledger, T + 2 * HOUR, "capture", "v1", b, money=50)
    stored = dict(ledger.dump()["aggregates"])
    assert rebuild(ledger.journal(limit=10**6)) == stored
    # new members, activity, settlement, member days, e1's cohort, member
    # months (a's money and its refund in one row, b's); the running totals
    # of members and of partner 1's points spent at partner 2 (all returned)
    assert len(stored) == 1 + 3 + 1 + 2 + 1 + 2 + 2
    assert ledger.members_enrolled(1) == 2 and ledger.settled(1) == {(1, 2): 0}
    assert list(ledger.member_months(1, 0, 1 << 32)) == [
        (month_of_day(T // DAY), a, 1_000, 2), (month_of_day(T // DAY), b, 50, 1)]


def test_member_days_are_local_days_of_the_programs_offset(ledger, open_program):
    [a] = open_program(2, 1)
    [b] = open_program(3, 1)
    ok(ledger, 0, "put_program", "msk", 2, utc_offset_minutes=180)
    ok(ledger, 0, "put_program", "nyc", 3, utc_offset_minutes=-300)
    day = T // DAY  # T is midnight UTC
    for op_id, when in (("a1", T - 4 * HOUR),    # 23:00 local: day - 1
                        ("a2", T - 2 * HOUR),    # 01:00 local: day
                        ("a3", T + 20 * HOUR)):  # 23:00 local: still day
        ok(ledger, when, "earn", op_id, a, 1, money=100)
    for op_id, when in (("b1", T + 2 * HOUR),    # 21:00 local: day - 1
                        ("b2", T + 5 * HOUR)):   # midnight local: day
        ok(ledger, when, "earn", op_id, b, 1, money=100)
    assert list(ledger.member_days(2, *ALL)) == [(day - 1, a), (day, a)]
    assert list(ledger.member_days(3, *ALL)) == [(day - 1, b), (day, b)]
    assert list(ledger.member_days(2, day, day + 1)) == [(day, a)]
    # counted in the hour of the day's first receipt
    days = {key[0]: c["member_days"] for key, c in activity(ledger, 2).items()
            if "member_days" in c}
    assert days == {T // HOUR - 4: 1, T // HOUR - 2: 1}
    assert ledger.account(a).last_day == day + 1
    assert ledger.account(a).visit_days == [day, day - 1]
    # a refund's money is no visit; an earlier day once a later one counted
    # is not looked back on (operation time is the server's clock)
    ok(ledger, T + 30 * HOUR, "refund", "r1", "a1", money=100)
    ok(ledger, T - DAY, "earn", "a4", a, 1, money=100)
    assert list(ledger.member_days(2, *ALL)) == [(day - 1, a), (day, a)]
    # a new offset moves the days of what follows
    ok(ledger, T, "put_program", "msk2", 2, utc_offset_minutes=-180)
    ok(ledger, T + 46 * HOUR, "earn", "a5", a, 1, money=100)  # 19:00 on day + 1
    assert list(ledger.member_days(2, day + 1, 2**32)) == [(day + 1, a)]  # not + 2
    assert ledger.account(a).visit_days == [day + 1, day, day - 1]


def test_an_account_keeps_its_newest_visit_days(ledger, open_program):
    """What the "regular customer" discount counts: one day per day with a
    receipt, newest first, the oldest dropped past VISIT_DAYS."""
    [a] = open_program(1, 1)
    day = T // DAY
    for n in range(VISIT_DAYS + 4):  # every other day, twice on each
        for twice in "ab":
            ok(ledger, T + 2 * n * DAY + HOUR, "earn", f"e{n}{twice}", a, 1, money=100)
    kept = ledger.account(a).visit_days
    assert kept == [day + 2 * n for n in reversed(range(4, VISIT_DAYS + 4))]
    last = day + 2 * (VISIT_DAYS + 3)
    assert ledger.account(a).visits_in(last - 4, last) == 3
    assert ledger.account(a).visits_in(last - 4, last - 1) == 2
    assert Account.decode(ledger.account(a).encode()) == ledger.account(a)


def cohorts(ledger, program=1, hours=ALL):
    """{(issue hour, partner): (issued, spent, expired, clawed)}."""
    return {(h, p): tuple(c) for h, p, c in ledger.cohorts(program, *hours)}


def test_cohorts_through_earn_spend_refund_expiry_and_clawback(ledger, member):
    ok(ledger, T, "earn", "e1", member, 100, partner=1, expires_at=T + 10 * DAY)  # lot 1
    ok(ledger, T + HOUR, "earn", "e2", member, 50, partner=2, money=1_000,
       expires_at=T + 20 * DAY)                                                   # lot 2
    ok(ledger, T + 2 * HOUR, "adjust", "j1", member, 7, reason=1)                 # lot 3
    ok(ledger, T + 2 * HOUR, "capture", "c1", member, earn=3, money=300)          # lot 4
    assert cohorts(ledger) == {(H0, 1): (100, 0, 0, 0), (H0 + 1, 2): (50, 0, 0, 0),
                               (H0 + 2, 0): (10, 0, 0, 0)}
    # across two cohorts: all of lot 1, then 20 of lot 2
    ok(ledger, T + 3 * HOUR, "spend", "s1", member, 120, partner=3, money=1_200)
    assert ledger.operation(b"s1").consumed == [
        Consumed(1, 1, 100, 0, T + 10 * DAY, H0), Consumed(2, 2, 20, 0, T + 20 * DAY, H0 + 1)]
    assert cohorts(ledger) == {(H0, 1): (100, 100, 0, 0), (H0 + 1, 2): (50, 20, 0, 0),
                               (H0 + 2, 0): (10, 0, 0, 0)}
    # given back last consumed first: 20 to lot 2, 10 to lot 1, made again
    # in its cohort (spent points returned count off spent)
    seq = last_seq(ledger)
    ok(ledger, T + 4 * HOUR, "refund", "r1", "s1", give_back=30)
    assert [(e.type, e.partner2, e.amount, decode_lots(e.data))
            for e in entries_after(ledger, seq)] == [
        (Entry.RETURN, 2, 20, [(2, 20, H0 + 1)]), (Entry.RETURN, 1, 10, [(1, 10, H0)])]
    assert ledger.lots(member)[0] == Lot(1, 1, 10, 0, T + 10 * DAY, H0)
    assert cohorts(ledger)[H0, 1] == (100, 90, 0, 0)
    assert cohorts(ledger)[H0 + 1, 2] == (50, 0, 0, 0)
    # clawed back from the receipt's own lot
    seq = last_seq(ledger)
    ok(ledger, T + 4 * HOUR, "refund", "r2", "e2", claw_back=25)
    [claw] = entries_after(ledger, seq)
    assert (claw.type, claw.ref, claw.partner, claw.partner2, claw.amount,
            decode_lots(claw.data)) == (Entry.CLAWBACK, 2, 2, 2, 25, [(2, 25, H0 + 1)])
    # lot 1's 10 expire
    seq = last_seq(ledger)
    ok(ledger, T + 11 * DAY, "sweep", "sw")
    [expiry] = entries_after(ledger, seq)
    assert (expiry.type, expiry.ref, expiry.partner2, decode_lots(expiry.data)) == (
        Entry.EXPIRE, 1, 1, [(1, 10, H0)])
    assert cohorts(ledger) == {(H0, 1): (100, 90, 10, 0), (H0 + 1, 2): (50, 0, 0, 25),
                               (H0 + 2, 0): (10, 0, 0, 0)}
    [(hour, partner, counters)] = ledger.cohorts(1, H0 + 1, H0 + 2)
    assert (hour, partner, counters.clawed, counters.outstanding) == (H0 + 1, 2, 25, 25)
    # outstanding is what the cohorts' lots hold
    held = {}
    for lot in ledger.lots(member):
        key = lot.issued_hour, lot.partner
        held[key] = held.get(key, 0) + lot.remaining
    assert held == {(H0 + 1, 2): 25, (H0 + 2, 0): 10}
    assert [c.outstanding for _, _, c in ledger.cohorts(1, *ALL)] == [0, 25, 10]
    assert list(ledger.cohorts(2, *ALL)) == []


def test_a_card_merge_leaves_the_cohorts_as_they_were(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, 40, partner=1, expires_at=T + 10 * DAY)
    ok(ledger, T + HOUR, "earn", "e2", a, 30, activates_at=T + DAY)  # pending
    ok(ledger, T + HOUR, "spend", "s1", a, 15)
    ok(ledger, T + 2 * HOUR, "earn", "e3", b, 5)
    before = cohorts(ledger)
    ok(ledger, T + 3 * HOUR, "transfer", "t1", a, b, everything=True)
    assert cohorts(ledger) == before
    # b's new lots are a's, in their cohorts; spending them counts there
    assert ledger.lots(b) == [Lot(2, 1, 25, 0, T + 10 * DAY, H0),
                              Lot(1, 0, 5, 0, NEVER, H0 + 2),
                              Lot(3, 0, 30, T + DAY, NEVER, H0 + 1)]
    ok(ledger, T + 3 * HOUR, "spend", "s2", b, 27)
    assert cohorts(ledger) == {(H0, 1): (40, 40, 0, 0), (H0 + 1, 0): (30, 0, 0, 0),
                               (H0 + 2, 0): (5, 2, 0, 0)}
    # a part transfer too
    ok(ledger, T + DAY, "transfer", "t2", b, a, 20)
    assert ledger.lots(a) == [Lot(3, 0, 3, 0, NEVER, H0 + 2),
                              Lot(4, 0, 17, T + DAY, NEVER, H0 + 1)]
    assert cohorts(ledger) == {(H0, 1): (40, 40, 0, 0), (H0 + 1, 0): (30, 0, 0, 0),
                               (H0 + 2, 0): (5, 2, 0, 0)}


def test_debt_repayment_and_clawback_from_the_balance_leave_cohorts_alone(ledger, open_program):
    [member] = open_program(1, 1, flags=PROGRAM_ALLOW_DEBT)
    ok(ledger, T, "earn", "e1", member, 100, expires_at=T + 30 * DAY)                 # lot 1
    ok(ledger, T + HOUR, "earn", "e2", member, 50, money=500, expires_at=T + 10 * DAY)  # lot 2
    ok(ledger, T + HOUR, "spend", "s1", member, 40)  # from lot 2
    seq = last_seq(ledger)
    ok(ledger, T + HOUR, "refund", "r1", "e2", claw_back=50)
    [claw] = entries_after(ledger, seq)
    # 10 from the receipt's own lot (named), 40 from the balance (lot 1: not)
    assert (claw.amount, claw.ref, decode_lots(claw.data)) == (50, 2, [(2, 10, H0 + 1)])
    assert ledger.lots(member) == [Lot(1, 0, 60, 0, T + 30 * DAY, H0)]
    assert cohorts(ledger) == {(H0, 0): (100, 0, 0, 0), (H0 + 1, 0): (50, 40, 0, 10)}
    # a clawback of what is gone: debt, repaid from a later lot, unnamed
    ok(ledger, T + 2 * HOUR, "earn", "e3", member, 10, money=100)  # lot 3
    ok(ledger, T + 2 * HOUR, "spend", "s2", member, 70)
    ok(ledger, T + 2 * HOUR, "refund", "r2", "e3", claw_back=10)
    assert ledger.balances(member, T).debt == 10
    ok(ledger, T + 3 * HOUR, "adjust", "j1", member, 15, reason=1)  # repays 10
    assert ledger.lots(member) == [Lot(4, 0, 5, 0, NEVER, H0 + 3)]
    assert cohorts(ledger) == {(H0, 0): (100, 60, 0, 0), (H0 + 1, 0): (50, 40, 0, 10),
                               (H0 + 2, 0): (10, 10, 0, 0), (H0 + 3, 0): (15, 0, 0, 0)}


def test_member_day_rows_are_appended_in_journal_order(ledger, open_program):
    a, b, c = open_program(1, 3)
    day = T // DAY
    ok(ledger, T, "earn", "c1", c, 1, money=100)
    results = ledger.apply(Batch().earn("b1", b, 1, money=100)
                           .earn("c2", c, 1, money=100)  # c's second: no row
                           .earn("a1", a, 1, money=100), T + HOUR)
    assert all(r.ok for r in results)
    ok(ledger, T + 2 * HOUR, "capture", "b2", b, money=50)
    assert list(ledger.member_days(1, *ALL)) == [(day, c), (day, b), (day, a)]
    rows = [(key, value) for key, value in ledger.dump()["aggregates"] if key[0] == 3]
    # keyed by the seq of the RECEIPT that made each, the account its value
    for (key, value), account in zip(rows, (c, b, a)):
        _, program, row_day, seq = MEMBER_DAY_KEY.unpack(key)
        [receipt] = ledger.journal(from_seq=seq, limit=1)
        assert (program, row_day, MEMBER_DAY_VALUE.unpack(value)[0]) == (1, day, account)
        assert (receipt.seq, receipt.type, receipt.credit) == (seq, Entry.RECEIPT, account)
    seqs = [MEMBER_DAY_KEY.unpack(key)[3] for key, _ in rows]
    assert seqs == sorted(seqs) and len(rows) == 3


def test_settlement_between_partners(ledger, member):
    H = T // HOUR
    ok(ledger, T, "earn", "e1", member, 100, partner=1, expires_at=T + DAY)
    ok(ledger, T, "earn", "e2", member, 50, partner=2, expires_at=T + 2 * DAY)
    # spent at partner 2: partner 1's lot first (earliest expiry), then its own
    ok(ledger, T + HOUR, "spend", "s1", member, 120, partner=2, money=1_200, store=7)
    assert list(ledger.settlement(1, *ALL)) == [(H + 1, 1, 2, 100), (H + 1, 2, 2, 20)]
    # a refund gives the last consumed back first: 20 to partner 2's lot
    ok(ledger, T + 2 * HOUR, "refund", "r1", "s1", money=300, give_back=30, store=7)
    assert list(ledger.settlement(1, *ALL)) == [
        (H + 1, 1, 2, 100), (H + 1, 2, 2, 20), (H + 2, 1, 2, -10), (H + 2, 2, 2, -20)]
    assert list(ledger.settlement(1, H + 2, H + 3)) == [(H + 2, 1, 2, -10),
                                                        (H + 2, 2, 2, -20)]
    # the refund's money and points count at the receipt's partner
    assert activity(ledger, hours=(H + 2, H + 3)) == {
        (H + 2, 7, 2, 0): {"returned": 30, "receipt_money": -300}}
    assert activity(ledger, hours=(H, H + 1)) == {
        (H, 0, 1, 0): {"issued": 100}, (H, 0, 2, 0): {"issued": 50}}


def test_a_refund_with_money_journals_the_money_given_back(ledger, member):
    ok(ledger, T, "capture", "c1", member, earn=50, money=5_000, partner=3,
       store=1, expires_at=NEVER)
    ok(ledger, T, "spend", "s1", member, 20, money=2_000, partner=3, store=1)
    seq = last_seq(ledger)
    ok(ledger, T, "refund", "r1", "s1", money=1_000, proportional=True,
       store=9, lane=4, version=5, business_time=T - 60)
    ok(ledger, T, "refund", "r2", "c1", claw_back=5, store=9)  # no money: no receipt
    ok(ledger, T, "refund", "r3", "c1", money=1, store=9)      # money alone
    receipts = [e for e in entries_after(ledger, seq) if e.type == Entry.RECEIPT]
    assert [(e.credit, e.amount, e.amount2, e.ref, e.store, e.partner, e.version,
             e.business_time, e.op_id) for e in receipts] == [
        (member, -1_000, -10, 0, 9, 3, 5, T - 60, b"r1"),
        (member, -1, 0, 0, 9, 3, 0, 0, b"r3")]


def test_a_report_counter_that_would_overflow_refuses_the_operation(ledger, members):
    a, b = members
    ok(ledger, T, "earn", "e1", a, INT64_MAX, money=1)
    ok(ledger, T, "refund", "r1", "e1", claw_back=INT64_MAX)
    # the balances allow it; the hour's issued points would not fit an int64
    rejected(ledger, T, Code.OVERFLOW, "earn", "e2", b, 1)
    ok(ledger, T + HOUR, "earn", "e3", b, 1)
    # another store's activity row, but e1's cohort (its hour and partner)
    rejected(ledger, T, Code.OVERFLOW, "earn", "e4", b, 1, store=1)
    ok(ledger, T, "earn", "e4", b, 1, store=1, partner=1)
    rejected(ledger, T, Code.OVERFLOW, "capture", "v1", b, money=INT64_MAX)


# --- bonuses: counters, visits, the member index ---------------------------------

def test_award_counts_on_the_members_counter_up_to_its_limit(ledger, open_program):
    a, b = open_program(1, 2)
    first = ok(ledger, T, "award", "w1", a, 30, counter="action/review", limit=2)
    assert (first.a, first.b) == (1, 1)          # lot 1, counted once
    ok(ledger, T, "award", "w2", a, 30, counter="action/review", limit=2)
    rejected(ledger, T, Code.LIMIT_REACHED, "award", "w3", a, 30,
             counter="action/review", limit=2)
    ok(ledger, T, "award", "w4", b, 30, counter="action/review", limit=2)
    ok(ledger, T, "award", "w5", a, 5, counter="action/other")   # no limit
    assert run(ledger, T, "award", "w1", a, 30, counter="action/review",
               limit=2).replayed
    assert ledger.counter(a, b"action/review") == (2, 2)
    expect(ledger, a, T, available=65, balance=65, earned=65)
    earn, bonus = entries_after(ledger, 3)[:2]    # after the program and members
    assert (earn.type, earn.amount, earn.ref) == (Entry.EARN, 30, 1)
    assert (bonus.type, bonus.credit, bonus.amount, bonus.amount2, bonus.ref,
            bonus.data) == (Entry.BONUS, a, 30, 1, 1, b"action/review")
    for code, fields in ((Code.KEY_INVALID, dict(counter="")),
                         (Code.AMOUNT_INVALID, dict(limit=-1)),
                         (Code.TIME_INVALID, dict(counter="x", expires_at=T))):
        rejected(ledger, T, code, "award", "w6", a, 30, **{"counter": "x", **fields})
    rejected(ledger, T, Code.AMOUNT_INVALID, "award", "w6", a, 0, counter="x")
    assert ledger.audit() == []


def test_a_visit_counts_a_committed_receipt_and_the_nth_earns_once(ledger, open_program):
    a, b = open_program(1, 2)
    batch = Batch()
    for i in range(4):
        batch.capture(f"c{i}", a, money=1_000)
        batch.visit(f"c{i}/visit", f"c{i}", 50, counter="visits/m", count=3)
    batch.capture("bad", a, spend=1_000, money=1_000)   # too few points: refused
    batch.visit("bad/visit", "bad", 50, counter="visits/m", count=3)
    batch.visit("other", "c0", 50, counter="visits/m", count=3, account=b)
    results = list(ledger.apply(batch, T))
    assert [(r.code, r.a, r.b) for r in results[1::2]] == [
        (Code.OK, 0, 1), (Code.OK, 0, 2), (Code.OK, 1, 3), (Code.OK, 0, 4),
        (Code.OPERATION_NOT_FOUND, 0, 0)]
    assert results[-1].code == Code.KEY_INVALID  # c0 is a's receipt, not b's
    assert ledger.counter(a, b"visits/m") == (4, 1)
    assert ledger.operation(b"c2/visit").earned == 50
    ok(ledger, T, "adjust", "adj", a, 5, reason=1)
    rejected(ledger, T, Code.KEY_INVALID, "visit", "v9", "adj", 50, counter="visits/m",
             count=3)  # an operation, but no receipt
    rejected(ledger, T, Code.OPERATION_NOT_FOUND, "visit", "v9", "nothing", 50,
             counter="visits/m", count=3)
    assert ledger.audit() == []


def test_the_member_index_follows_tiers_and_birthdays(ledger, open_program):
    [a] = open_program(1, 1)
    ok(ledger, T, "open_account", "o2", 1, "m2", birthday=(2, 29))
    ok(ledger, T, "open_account", "o3", 1, "m3", birthday=(2, 29))
    rejected(ledger, T, Code.TIME_INVALID, "open_account", "o4", 1, "m4",
             birthday=(2, 30))
    assert list(ledger.birthdays(1, 229)) == [2, 3]
    ok(ledger, T, "set_profile", "p1", 2, b"x", birthday=(12, 31))
    ok(ledger, T, "set_profile", "p2", 3, b"", erase=True, external_id="m3")
    assert list(ledger.birthdays(1, 229)) == [] and list(ledger.birthdays(1, 1231)) == [2]
    for op_id, account, tier in (("t1", a, 2), ("t2", 2, 3), ("t3", a, 1), ("t4", 3, 2),
                                 ("t5", 3, 0)):
        ok(ledger, T, "set_tier", op_id, account, tier)
    assert list(ledger.tiered(1)) == [(1, a), (3, 2)]
    assert list(ledger.tiered(1, 2)) == [(3, 2)]
    assert ledger.audit() == []


def test_point_reads_see_every_commit_from_any_thread(ledger, open_program):
    """Account, operation, card and profile reads see the last commit, read
    after read (the kernel keeps one transaction for them), and work from
    another thread between commits; a closed ledger refuses them."""
    import threading
    account = open_program()[0]
    ok(ledger, 1, "link_card", "c1", account, b"7700")
    for i in range(1, 4):
        assert ledger.account(account).balance == 10 * (i - 1)
        ok(ledger, 1, "earn", f"e{i}", account, 10, activates_at=0, expires_at=NEVER)
        assert ledger.account(account).balance == 10 * i
        assert ledger.operation(f"e{i}".encode()).account == account
        assert ledger.operation(f"e{i + 1}".encode()) is None
    ok(ledger, 1, "block_card", "b1", b"7700")
    assert ledger.card(b"7700") == (account, CardStatus.BLOCKED)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(ledger.account(account).balance))
    thread.start()
    thread.join()
    assert seen == [30]
    ok(ledger, 1, "earn", "e9", account, 5, activates_at=0, expires_at=NEVER)
    assert ledger.account(account).balance == 35 and ledger.profile(account) is None


def test_point_reads_refuse_a_closed_ledger(ledger_class, tmp_path):
    ledger = ledger_class(tmp_path / "closed", sync=False)
    assert ledger.account(1) is None
    ledger.close()
    with pytest.raises(Exception):
        ledger.account(1)
