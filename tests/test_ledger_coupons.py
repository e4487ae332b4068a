"""Chains of operations and coupons, against the twin and the kernel.

Chains (records.py): linked operations apply all or nothing, each seeing
what the earlier ones did. Coupons: money off a later purchase, kept in
the member's account, issued and redeemed by their own operations, judged
at the business time, closed when they lapse, revoked or given back by
refunds of the operations that issued or redeemed them. They post no
points. Every test ends with the audit (the `ledger` fixture), which
replays the coupons from the journal, and for the kernel with a byte-for-
byte comparison with the twin.
"""

import pytest

from kopilka.core.batch import Batch, Result
from kopilka.core.codec import Coupon, coupon_moved_from, decode_coupon_issued
from kopilka.core.records import (COUPON_EARNED, COUPON_GIVEN_BACK, COUPON_MOVED,
                                  MAX_COUPONS,
                                  Code, CouponState, Entry, Kind)

from test_ledger import numbers, ok, rejected, rejected_raw, run, stored

DAY = 86_400_000_000
T = 100 * DAY
OPEN, REDEEMED, REVOKED, EXPIRED = (CouponState.OPEN, CouponState.REDEEMED,
                                    CouponState.REVOKED, CouponState.EXPIRED)
WINDOW = dict(usable_from=T + 7 * DAY, expires_at=T + 90 * DAY)


@pytest.fixture
def member(ledger, open_program):
    (account, other) = open_program()
    ok(ledger, T, "earn", "earn-1", account, 100)
    ok(ledger, T, "capture", "r-1", account, money=150_000, earn=75)
    ok(ledger, T, "capture", "r-other", other, money=150_000, earn=75)
    return account


def issue(ledger, account, op_id="c-1", value=10_000, now=T, **kw):
    kw.setdefault("business_time", now)
    for name, value_ in WINDOW.items():
        kw.setdefault(name, value_)
    return run(ledger, now, "issue_coupon", op_id, account, value, **kw)


def coupons(ledger, account):
    return ledger.account(account).coupons


def last_entries(ledger, n):
    seq, _ = ledger.head()
    return ledger.journal(seq - n + 1)


# --- chains --------------------------------------------------------------------

def test_a_chain_applies_whole_and_each_sees_the_earlier(ledger, member):
    batch = (Batch().earn("e-2", member, 50).link()
             .spend("s-2", member, 150).link()     # needs the 50 just earned
             .adjust("a-2", member, 5, reason=1))
    assert list(ledger.apply(batch, T)) == [Result(Code.OK, 3), Result(Code.OK, 150),
                                             Result(Code.OK, 4)]
    assert numbers(ledger, member, T)["available"] == 175 + 50 - 150 + 5
    # each entry names the operation that made it
    ops = [e.op_id for e in last_entries(ledger, 3)]
    assert ops == [b"e-2", b"s-2", b"a-2"]
    # a retry of the whole chain: every one replayed, nothing changes
    before = stored(ledger)
    assert [(r.code, r.replayed) for r in ledger.apply(batch, T)] == [
        (Code.OK, True)] * 3
    assert stored(ledger) == before


def test_a_failing_operation_undoes_its_whole_chain_not_its_neighbours(ledger, member):
    before = numbers(ledger, member, T)
    batch = (Batch().adjust("before", member, 1, reason=1)
             .earn("e-2", member, 50).link()
             .spend("s-2", member, 1_000).link()   # more than there is
             .adjust("a-2", member, 5, reason=1)
             .adjust("after", member, 2, reason=1))
    results = list(ledger.apply(batch, T))
    assert [r.code for r in results] == [Code.OK, Code.LINKED_FAILED,
                                         Code.INSUFFICIENT_POINTS, Code.LINKED_FAILED,
                                         Code.OK]
    assert numbers(ledger, member, T)["available"] == before["available"] + 3
    for op_id in ("e-2", "s-2", "a-2"):  # no id of the chain was kept
        assert ledger.operation(op_id.encode()) is None
    # so the same chain, fixed, applies later under the same ids
    batch = Batch().earn("e-2", member, 50).link().spend("s-2", member, 10)
    assert ledger.apply(batch, T).codes() == [Code.OK, Code.OK]


def test_a_chain_fails_on_an_id_reused_and_keeps_nothing(ledger, member):
    before = stored(ledger)
    batch = Batch().earn("e-9", member, 50).link().adjust("earn-1", member, 5, reason=1)
    assert ledger.apply(batch, T).codes() == [Code.LINKED_FAILED, Code.OP_ID_REUSED]
    assert stored(ledger) == before


def test_a_batch_ending_inside_a_chain_applies_none_of_it(ledger, member):
    before = stored(ledger)
    batch = Batch().earn("e-2", member, 50).link().earn("e-3", member, 5).link()
    assert ledger.apply(batch, T).codes() == [Code.LINKED_FAILED, Code.LINK_OPEN]
    assert ledger.apply(Batch().earn("e-4", member, 5).link(), T).codes() == [
        Code.LINK_OPEN]
    assert stored(ledger) == before


def test_link_bits_other_than_linked_are_refused(ledger, member):
    before = stored(ledger)
    for link in (2, 3):  # alone, or in a chain of its own
        batch = bytearray(bytes(Batch().earn("e-2", member, 5).earn("e-3", member, 5)))
        batch[5] = link
        assert ledger.apply(bytes(batch), T).codes()[0] == Code.FLAGS_INVALID
        assert ledger.operation(b"e-2") is None
    assert ledger.operation(b"e-3") is not None
    assert before != stored(ledger)


# --- issuing -------------------------------------------------------------------

def test_issue_keeps_the_coupon_in_the_account_and_journals_it(ledger, member):
    before = numbers(ledger, member, T)
    issuer = ledger.system_balance(1, 1)
    assert issue(ledger, member, receipt=b"r-1", store=42) == Result(Code.OK, 1)
    assert coupons(ledger, member) == [Coupon(1, OPEN, 10_000, *WINDOW.values())]
    assert ledger.account(member).next_coupon == 2
    (entry,) = last_entries(ledger, 1)
    assert (entry.type, entry.credit, entry.amount, entry.amount2, entry.ref,
            entry.store) == (Entry.COUPON_ISSUED, member, 10_000, T + 90 * DAY, 1, 42)
    assert decode_coupon_issued(entry.data) == (T + 7 * DAY, COUPON_EARNED)
    record = ledger.operation(b"c-1")
    assert (record.kind, record.account, record.a, record.money) == (
        Kind.ISSUE_COUPON, member, 1, 10_000)
    # money, not points: no balance, no system account moves
    assert numbers(ledger, member, T) == before
    assert ledger.system_balance(1, 1) == issuer


def test_issue_is_refused_while_one_is_held_one_per_customer(ledger, member):
    issue(ledger, member)
    before = stored(ledger)
    assert issue(ledger, member, "c-2") == Result(Code.COUPON_HELD)
    assert stored(ledger) == before
    # held until its window ends at the business time; then a new one
    late = T + 90 * DAY
    assert issue(ledger, member, "c-2", business_time=late,
                 expires_at=late + DAY) == Result(Code.OK, 2)
    # a program that allows several
    assert issue(ledger, member, "c-3", one_per_customer=False,
                 expires_at=late + DAY) == Result(Code.OK, 3)


def test_issue_refusals(ledger, member):
    rejected(ledger, T, Code.AMOUNT_INVALID, "issue_coupon", "c-1", member, 0,
             usable_from=T, expires_at=T + DAY)
    rejected(ledger, T, Code.TIME_INVALID, "issue_coupon", "c-1", member, 1,
             usable_from=T + DAY, expires_at=T + DAY)
    rejected(ledger, T, Code.TIME_INVALID, "issue_coupon", "c-1", member, 1,
             usable_from=0, expires_at=T)
    rejected(ledger, T, Code.ACCOUNT_NOT_FOUND, "issue_coupon", "c-1", 99, 1,
             usable_from=T, expires_at=T + DAY)
    # the receipt named must be one of the member's
    for receipt in (b"r-other", b"nothing", b"c-0"):
        rejected(ledger, T, Code.OPERATION_NOT_FOUND, "issue_coupon", "c-1", member, 1,
                 usable_from=T, expires_at=T + DAY, receipt=receipt)
    rejected_raw(ledger, T, Code.FLAGS_INVALID, Kind.ISSUE_COUPON, "c-1",
                 account=member, amount=1, expires_at=T + DAY, flags=2)
    ok(ledger, T, "set_account_status", "block", member, 2)
    rejected(ledger, T, Code.ACCOUNT_BLOCKED, "issue_coupon", "c-1", member, 1,
             usable_from=T, expires_at=T + DAY)


def test_issue_by_card_and_at_most_max_coupons_open(ledger, member):
    ok(ledger, T, "link_card", "card", member, b"2000001")
    for i in range(MAX_COUPONS):
        assert issue(ledger, 0, f"c-{i}", card=b"2000001",
                     one_per_customer=False).ok
    assert issue(ledger, member, "c-x", one_per_customer=False) == Result(
        Code.TOO_MANY_COUPONS)


# --- redeeming -----------------------------------------------------------------

def redeem(ledger, account, number=1, amount=10_000, op_id="rd-1", now=T + 8 * DAY,
           **kw):
    kw.setdefault("business_time", now)
    return run(ledger, now, "redeem_coupon", op_id, account, number, amount, **kw)


def test_redeem_within_the_window_by_business_time(ledger, member):
    issue(ledger, member)
    before = stored(ledger)
    # not yet usable: 6 days after; the business time decides, not now
    assert redeem(ledger, member, business_time=T + 6 * DAY) == Result(
        Code.COUPON_NOT_USABLE)
    assert redeem(ledger, member, now=T + 6 * DAY) == Result(Code.COUPON_NOT_USABLE)
    assert redeem(ledger, member, business_time=T + 90 * DAY,
                  now=T + 89 * DAY) == Result(Code.COUPON_EXPIRED)
    assert redeem(ledger, member, amount=10_001) == Result(Code.AMOUNT_INVALID)
    assert redeem(ledger, member, amount=0) == Result(Code.AMOUNT_INVALID)
    assert redeem(ledger, member, number=2) == Result(Code.COUPON_NOT_FOUND)
    assert redeem(ledger, member, receipt=b"r-other") == Result(Code.OPERATION_NOT_FOUND)
    assert stored(ledger) == before
    # 7 days after: 80 of its 100 off this receipt
    assert redeem(ledger, member, amount=8_000, receipt=b"r-1") == Result(
        Code.OK, 1, 8_000)
    assert coupons(ledger, member)[0].state == REDEEMED
    (entry,) = last_entries(ledger, 1)
    assert (entry.type, entry.amount, entry.amount2, entry.ref) == (
        Entry.COUPON_CLOSED, 8_000, REDEEMED, 1)
    record = ledger.operation(b"rd-1")
    assert (record.a, record.b, record.money, record.consumed[0].lot_no,
            record.consumed[0].amount) == (1, 8_000, 8_000, 1, 10_000)
    # once only
    assert redeem(ledger, member, op_id="rd-2") == Result(Code.COUPON_REDEEMED)


def test_a_coupon_lapses_when_its_account_is_next_touched(ledger, member):
    issue(ledger, member)
    gone = T + 90 * DAY
    ok(ledger, gone, "earn", "e-late", member, 1)
    assert coupons(ledger, member)[0].state == EXPIRED
    lapse = [e for e in last_entries(ledger, 3) if e.type == Entry.COUPON_CLOSED]
    assert [(e.amount, e.amount2, e.ref, e.store) for e in lapse] == [(0, EXPIRED, 1, 0)]
    # a late upload with a business time inside the window: expired all the same
    assert redeem(ledger, member, now=gone, business_time=T + 80 * DAY) == Result(
        Code.COUPON_EXPIRED)
    # a new coupon drops the closed one from the account
    assert issue(ledger, member, "c-2", now=gone, usable_from=gone,
                 expires_at=gone + DAY) == Result(Code.OK, 2)
    assert [c.number for c in coupons(ledger, member)] == [2]


# --- refunds -------------------------------------------------------------------

def test_refunding_the_issue_revokes_an_unused_coupon_once(ledger, member):
    issue(ledger, member, receipt=b"r-1")
    rejected(ledger, T, Code.AMOUNT_INVALID, "refund", "x", "c-1", money=1)
    rejected(ledger, T, Code.FLAGS_INVALID, "refund", "x", "c-1", money=1,
             proportional=True)
    assert run(ledger, T, "refund", "rf-1", "c-1") == Result(Code.OK, 10_000)
    assert coupons(ledger, member)[0].state == REVOKED
    (entry,) = last_entries(ledger, 1)
    assert (entry.type, entry.amount, entry.amount2) == (Entry.COUPON_CLOSED, 0, REVOKED)
    assert redeem(ledger, member) == Result(Code.COUPON_NOT_FOUND)
    rejected(ledger, T, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "rf-2", "c-1")
    # and the member may earn the next one at once
    assert issue(ledger, member, "c-2").ok


def test_refunding_the_issue_of_a_used_coupon_changes_nothing(ledger, member):
    issue(ledger, member)
    redeem(ledger, member)
    before = ledger.account(member).coupons
    assert run(ledger, T + 8 * DAY, "refund", "rf-1", "c-1") == Result(Code.OK, 0)
    assert ledger.account(member).coupons == before
    assert ledger.operation(b"c-1").refunded_money == 10_000


def test_refunding_the_redemption_gives_the_coupon_back(ledger, member):
    issue(ledger, member)
    redeem(ledger, member, amount=6_000)
    later = T + 20 * DAY
    assert run(ledger, later, "refund", "rf-1", "rd-1", data=b"why") == Result(
        Code.OK, 10_000)
    assert coupons(ledger, member) == [Coupon(1, OPEN, 10_000, *WINDOW.values())]
    (entry,) = last_entries(ledger, 1)
    assert (entry.type, entry.amount, entry.ref) == (Entry.COUPON_ISSUED, 10_000, 1)
    assert decode_coupon_issued(entry.data) == (T + 7 * DAY, COUPON_GIVEN_BACK)
    assert ledger.operation(b"rd-1").data == b"why"
    # usable again, under its own number
    assert redeem(ledger, member, op_id="rd-2", now=later).ok
    rejected(ledger, later, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "rf-2", "rd-1")


def test_a_coupon_is_not_given_back_expired_or_beside_another(ledger, member):
    issue(ledger, member)
    redeem(ledger, member)
    issue(ledger, member, "c-2", now=T + 8 * DAY)   # held now
    assert run(ledger, T + 9 * DAY, "refund", "rf-1", "rd-1") == Result(Code.OK, 0)
    assert [(c.number, c.state) for c in coupons(ledger, member)] == [(2, OPEN)]
    issue(ledger, member, "c-3", now=T + 9 * DAY, one_per_customer=False)
    redeem(ledger, member, number=3, op_id="rd-3", now=T + 10 * DAY)
    run(ledger, T + 10 * DAY, "refund", "rf-2", "c-2")   # revoke the held one
    gone = T + 90 * DAY
    assert run(ledger, gone, "refund", "rf-3", "rd-3") == Result(Code.OK, 0)
    assert all(c.state != OPEN for c in coupons(ledger, member))


def test_a_checkout_chain_cannot_redeem_one_coupon_twice(ledger, member):
    """Two receipts racing for one coupon: the capture and its redemption
    are one chain, so the second receipt is refused whole."""
    issue(ledger, member)
    now = T + 8 * DAY
    ok(ledger, now, "earn", "top-up", member, 1_000)

    def checkout(name):
        return (Batch().capture(f"{name}/capture", member, spend=10, money=140_000,
                                business_time=now).link()
                .redeem_coupon(f"{name}/coupon-redeem", member, 1, 10_000,
                               receipt=f"{name}/capture", business_time=now))
    results = ledger.apply(checkout("a").extend(checkout("b")), now)
    assert results.codes() == [Code.OK, Code.OK, Code.LINKED_FAILED,
                               Code.COUPON_REDEEMED]
    assert ledger.operation(b"b/capture") is None
    assert numbers(ledger, member, now)["spent"] == 10


def test_a_redemption_refund_may_be_noted_keeping_the_coupon_used(ledger, member):
    """REFUND_KEEP_COUPON: a part of a receipt the coupon paid in full comes
    back; the redemption notes it (its data) and the coupon stays used, as
    often as parts come back, until a refund without the flag gives it back."""
    issue(ledger, member)
    redeem(ledger, member)
    later = T + 9 * DAY
    rejected(ledger, later, Code.FLAGS_INVALID, "refund", "x", "c-1", keep_coupon=True)
    rejected(ledger, later, Code.FLAGS_INVALID, "refund", "x", "r-1", money=1,
             keep_coupon=True)
    rejected(ledger, later, Code.AMOUNT_INVALID, "refund", "x", "rd-1", money=1,
             keep_coupon=True)
    seq, _ = ledger.head()
    assert run(ledger, later, "refund", "part-1", "rd-1", keep_coupon=True,
               data=b"a") == Result(Code.OK, 0)
    assert run(ledger, later, "refund", "part-2", "rd-1", keep_coupon=True,
               data=b"b") == Result(Code.OK, 0)
    assert ledger.head()[0] == seq   # nothing journaled
    assert coupons(ledger, member)[0].state == REDEEMED
    record = ledger.operation(b"rd-1")
    assert (record.data, record.refunded_money) == (b"ab", 0)
    assert run(ledger, later, "refund", "rest", "rd-1", data=b"c") == Result(
        Code.OK, 10_000)
    assert coupons(ledger, member)[0].state == OPEN
    assert ledger.operation(b"rd-1").data == b"abc"
    rejected(ledger, later, Code.REFUND_EXCEEDS_ORIGINAL, "refund", "more", "rd-1",
             keep_coupon=True)


# --- merges ----------------------------------------------------------------------

def merge(ledger, source, target, now=T + 2 * DAY, op_id="merge", **kw):
    return run(ledger, now, "transfer", op_id, source, target, everything=True, **kw)


def states(ledger, account):
    return [(c.number, c.state, c.value) for c in coupons(ledger, account)]


def test_a_merge_moves_the_open_coupon_under_the_target_next_number(ledger, member):
    other = member + 1
    issue(ledger, member, receipt=b"r-1", value=7_000)
    issue(ledger, other, "c-o1", receipt=b"r-other")
    redeem(ledger, other, op_id="rd-o1")
    seq, _ = ledger.head()
    assert merge(ledger, member, other, now=T + 9 * DAY).ok
    assert states(ledger, member) == [(1, CouponState.MOVED, 7_000)]
    # the target's redeemed one is dropped from its account as the moved one opens
    assert coupons(ledger, other) == [Coupon(2, OPEN, 7_000, *WINDOW.values())]
    closed, issued = [e for e in ledger.journal(seq + 1)
                      if e.type in (Entry.COUPON_CLOSED, Entry.COUPON_ISSUED)]
    assert (closed.type, closed.credit, closed.ref, closed.amount2) == (
        Entry.COUPON_CLOSED, member, 1, CouponState.MOVED)
    assert (issued.type, issued.credit, issued.ref, issued.amount) == (
        Entry.COUPON_ISSUED, other, 2, 7_000)
    assert decode_coupon_issued(issued.data) == (T + 7 * DAY, COUPON_MOVED)
    assert coupon_moved_from(issued.data) == (member, 1)
    # redeemed at the survivor under its new number
    assert redeem(ledger, other, number=2, amount=7_000, op_id="rd-o2",
                  now=T + 9 * DAY).ok


def test_one_per_customer_the_better_coupon_stays_the_other_is_displaced(ledger, member):
    other = member + 1
    issue(ledger, member, value=5_000)
    issue(ledger, other, "c-o1", value=8_000)
    assert merge(ledger, member, other, one_coupon=True).ok
    assert states(ledger, member) == [(1, CouponState.DISPLACED, 5_000)]
    assert states(ledger, other) == [(1, OPEN, 8_000)]
    (closed,) = [e for e in last_entries(ledger, 3) if e.type == Entry.COUPON_CLOSED]
    assert (closed.credit, closed.amount2) == (member, CouponState.DISPLACED)


def test_one_per_customer_a_better_source_coupon_displaces_the_target_s(ledger, member):
    other = member + 1
    issue(ledger, member, value=8_000, expires_at=T + 30 * DAY)
    issue(ledger, other, "c-o1", value=8_000, expires_at=T + 20 * DAY)  # ends sooner
    assert merge(ledger, member, other, one_coupon=True).ok
    assert states(ledger, member) == [(1, CouponState.MOVED, 8_000)]
    assert coupons(ledger, other) == [Coupon(2, OPEN, 8_000, T + 7 * DAY, T + 30 * DAY)]
    kinds = [(e.type, e.credit, e.amount2 if e.type == Entry.COUPON_CLOSED else e.ref)
             for e in last_entries(ledger, 3)]
    assert kinds == [(Entry.COUPON_CLOSED, other, CouponState.DISPLACED),
                     (Entry.COUPON_CLOSED, member, CouponState.MOVED),
                     (Entry.COUPON_ISSUED, other, 2)]


def test_one_per_customer_on_a_tie_the_target_keeps_its_own(ledger, member):
    other = member + 1
    issue(ledger, member)
    issue(ledger, other, "c-o1")
    assert merge(ledger, member, other, one_coupon=True).ok
    assert states(ledger, member) == [(1, CouponState.DISPLACED, 10_000)]
    assert states(ledger, other) == [(1, OPEN, 10_000)]


def test_without_one_per_customer_every_open_coupon_moves(ledger, member):
    other = member + 1
    issue(ledger, member, value=1_000, one_per_customer=False)
    issue(ledger, member, "c-2", value=2_000, one_per_customer=False)
    issue(ledger, other, "c-o1", value=3_000)
    assert merge(ledger, member, other).ok
    assert states(ledger, other) == [(1, OPEN, 3_000), (2, OPEN, 1_000), (3, OPEN, 2_000)]
    assert states(ledger, member) == [(1, CouponState.MOVED, 1_000),
                                      (2, CouponState.MOVED, 2_000)]


def test_a_merge_without_open_coupons_leaves_the_target_s_alone(ledger, member):
    other = member + 1
    issue(ledger, member, one_per_customer=False)
    issue(ledger, other, "c-o1", value=1_000, one_per_customer=False)
    issue(ledger, other, "c-o2", value=2_000, one_per_customer=False)
    run(ledger, T, "refund", "rv", "c-1")          # the source's is revoked
    assert merge(ledger, member, other, one_coupon=True).ok
    assert states(ledger, other) == [(1, OPEN, 1_000), (2, OPEN, 2_000)]


def test_merge_refusals_for_coupons(ledger, member):
    other = member + 1
    rejected(ledger, T, Code.FLAGS_INVALID, "transfer", "x", member, other, 1,
             one_coupon=True)
    for i in range(MAX_COUPONS):
        issue(ledger, other, f"c-o{i}", one_per_customer=False)
    issue(ledger, member, one_per_customer=False)
    rejected(ledger, T, Code.TOO_MANY_COUPONS, "transfer", "x", member, other,
             everything=True)
    assert merge(ledger, member, other, one_coupon=True, now=T).ok
    assert sum(c.state == OPEN for c in coupons(ledger, other)) == 1


def test_a_coupon_moved_or_displaced_is_not_found_at_the_merged_member(ledger, member):
    other = member + 1
    issue(ledger, member, value=5_000, one_per_customer=False)
    issue(ledger, member, "c-2", value=9_000, one_per_customer=False)
    assert merge(ledger, member, other, one_coupon=True).ok
    assert states(ledger, member) == [(1, CouponState.DISPLACED, 5_000),
                                      (2, CouponState.MOVED, 9_000)]
    for number in (1, 2):
        assert redeem(ledger, member, number=number, amount=1) == Result(
            Code.COUPON_NOT_FOUND)


# --- report aggregates -------------------------------------------------------------

def test_coupon_rows_count_every_fate_of_a_coupon(ledger, member):
    """Per hour, store and partner: issued, redeemed (the money taken off),
    expired, revoked, given back and displaced (their values); a move by a
    merge is the same coupon and counts nowhere. The audit (at the end of
    every test) rebuilds these rows from the journal."""
    other = member + 1
    hour = T // (DAY // 24)
    assert issue(ledger, member, store=42, partner=1).ok           # 10,000
    assert redeem(ledger, member, amount=6_000, now=T + 8 * DAY, store=7).ok
    ok(ledger, T + 9 * DAY, "refund", "back", "rd-1", store=7)    # given back
    assert issue(ledger, other, "c-o1", value=3_000, store=42, partner=1).ok
    ok(ledger, T, "refund", "rv", "c-o1")                          # revoked
    assert issue(ledger, other, "c-o2", value=2_000, usable_from=T,
                 expires_at=T + DAY).ok
    ok(ledger, T + 2 * DAY, "adjust", "touch", other, 1, reason=1)  # it lapsed
    assert issue(ledger, other, "c-o3", value=1_000, now=T + 2 * DAY).ok
    assert merge(ledger, member, other, now=T + 10 * DAY, one_coupon=True).ok
    rows = {(h - hour, store, partner): c for h, store, partner, c
            in ledger.coupon_rows(1, 0, 1 << 32)}
    assert rows[0, 42, 1].issued == 2 and rows[0, 42, 1].issued_money == 13_000
    assert (rows[0, 0, 0].issued, rows[0, 0, 0].revoked,
            rows[0, 0, 0].revoked_money) == (1, 1, 3_000)
    assert (rows[8 * 24, 7, 0].redeemed, rows[8 * 24, 7, 0].redeemed_money) == (1, 6_000)
    assert (rows[9 * 24, 7, 0].given_back,
            rows[9 * 24, 7, 0].given_back_money) == (1, 10_000)
    assert (rows[2 * 24, 0, 0].expired, rows[2 * 24, 0, 0].expired_money,
            rows[2 * 24, 0, 0].issued) == (1, 2_000, 1)
    assert (rows[10 * 24, 0, 0].displaced,
            rows[10 * 24, 0, 0].displaced_money) == (1, 1_000)
    assert sum(c.issued for c in rows.values()) == 4   # the move counted nowhere
