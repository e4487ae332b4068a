"""Coupons end to end: a real server on a loopback port, an injected clock.

DESIGN.md's worked example: "a purchase of at least 1,500 earns a coupon
worth 100 for the next purchase, usable no earlier than 7 days later, valid
at most 3 months, one per customer" (examples/programs/example.toml). Then
what refunds do to coupons, the feed's coupon events, and two tills racing
for one coupon. The ledger's audit must stay clean throughout.
"""

import threading
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from kopilka.core.program import to_micros
from kopilka.core.records import Entry
from kopilka.v1 import checkout_pb2 as pb
from kopilka.v1 import checkout_pb2_grpc, common_pb2, feed_pb2, feed_pb2_grpc
from kopilka.v1 import members_pb2, members_pb2_grpc

from server_harness import (DAY, EXAMPLE, START, RunningServer, error_info,
                            install_program, open_member)

LANE = "stores/42/lanes/1"
OPEN, REDEEMED, REVOKED, EXPIRED = (common_pb2.COUPON_STATE_OPEN,
                                    common_pb2.COUPON_STATE_REDEEMED,
                                    common_pb2.COUPON_STATE_REVOKED,
                                    common_pb2.COUPON_STATE_EXPIRED)
WHY = pb.PricingReasonCode


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    assert server.server.ledger.audit() == []
    server.stop()


@pytest.fixture
def pos(srv):
    return srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")


def receipt(srv, *prices, receipt_id="r"):
    """Grocery lines of these prices (kopecks), sold now."""
    out = pb.Receipt(receipt_id=receipt_id)
    out.business_time.FromMicroseconds(srv.clock.now)
    for i, price in enumerate(prices, 1):
        out.lines.add(line_number=i, sku=f"sku{i}", category="groceries", quantity=1,
                      unit_price=common_pb2.Money(currency_code="RUB", minor_units=price),
                      total=common_pb2.Money(currency_code="RUB", minor_units=price))
    return out


def quote(pos, srv, *prices):
    return pos.Quote(pb.QuoteRequest(lane=LANE, card_number="7001",
                                     receipt=receipt(srv, *prices)))


def capture(pos, srv, op_id, *prices, lane=LANE, card="7001"):
    return pos.Capture(pb.CaptureRequest(operation_id=op_id, lane=lane, card_number=card,
                                         receipt=receipt(srv, *prices, receipt_id=op_id)))


def refund(pos, op_id, original, *lines):
    """Lines: their numbers (one unit each); none: the whole receipt."""
    request = pb.RefundRequest(operation_id=op_id, lane=LANE,
                               original_operation_id=original)
    if lines:
        request.lines.returns.extend(pb.LineReturn(line_number=n, quantity=1)
                                     for n in lines)
    else:
        request.whole_receipt = True
    return pos.Refund(request)


def coupons(srv, member):
    admin = srv.stub(members_pb2_grpc.MembersStub)
    got = admin.GetMember(members_pb2.GetMemberRequest(name=f"programs/1/members/{member}"))
    return [(c.code, c.state) for c in got.member.coupons]


def reasons(q):
    return [(r.code, r.subject) for r in q.reasons]


def micros(ts):
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def to_micros_text(text):
    return to_micros(datetime.fromisoformat(text))


def test_design_worked_example(srv, pos):
    member = open_member(srv, 1, "c1", card="7001")
    code, sold = f"{member}-1", srv.clock.now
    # a purchase of 1,500 earns a coupon worth 100: usable 7 days later,
    # valid 3 months (in the program's zone: Moscow, 2026-01-01T03:00)
    q = quote(pos, srv, 150_000)
    assert (WHY.PRICING_REASON_CODE_COUPON_EARNED, "") in reasons(q)
    terms = q.coupon_earned
    assert (terms.value.minor_units, micros(terms.usable_time), micros(terms.expire_time)) == (
        10_000, sold + 7 * DAY, to_micros_text("2026-04-01T03:00:00+03:00"))
    first = capture(pos, srv, "s42/l1/r1", 150_000)
    assert (first.coupon_issued.code, first.coupon_issued.terms) == (code, terms)
    assert not first.HasField("coupon_redeemed")
    again = capture(pos, srv, "s42/l1/r1", 150_000)
    assert again.replayed and again.coupon_issued == first.coupon_issued
    assert coupons(srv, member) == [(code, OPEN)]

    # 6 days later it cannot be used yet; one per customer: a second
    # qualifying purchase while it is held earns none
    srv.clock.advance(6 * DAY)
    q = quote(pos, srv, 150_000)
    assert q.coupon_discount.minor_units == 0 and not q.HasField("coupon_earned")
    assert reasons(q) == [(WHY.PRICING_REASON_CODE_COUPON_NOT_YET_USABLE, code),
                          (WHY.PRICING_REASON_CODE_COUPON_ALREADY_HELD, code)]
    second = capture(pos, srv, "s42/l1/r2", 150_000)
    assert second.paid.minor_units == 150_000
    assert not second.HasField("coupon_issued") and not second.HasField("coupon_redeemed")

    # 7 days after the sale it takes 100 off, in the quote and the capture
    srv.clock.advance(DAY)
    q = quote(pos, srv, 100_000)
    assert (q.coupon_discount.minor_units, q.due.minor_units) == (10_000, 90_000)
    assert (WHY.PRICING_REASON_CODE_COUPON_REDEEMED, code) in reasons(q)
    third = capture(pos, srv, "s42/l1/r3", 100_000)
    assert (third.coupon_redeemed.code, third.coupon_redeemed.discount.minor_units,
            third.paid.minor_units, third.discount.minor_units) == (code, 10_000, 90_000,
                                                                     10_000)
    again = capture(pos, srv, "s42/l1/r3", 100_000)
    assert again.replayed and again.coupon_redeemed == third.coupon_redeemed
    assert coupons(srv, member) == [(code, REDEEMED)]
    assert quote(pos, srv, 100_000).coupon_discount.minor_units == 0


def test_a_coupon_expires_after_three_months(srv, pos):
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(90 * DAY)   # 2026-04-01T00:00Z: its window has just ended
    q = quote(pos, srv, 150_000)
    assert reasons(q) == [(WHY.PRICING_REASON_CODE_COUPON_EXPIRED, f"{member}-1"),
                          (WHY.PRICING_REASON_CODE_COUPON_EARNED, "")]
    srv.clock.advance(DAY)        # three months and a day
    assert coupons(srv, member) == [(f"{member}-1", EXPIRED)]
    q = quote(pos, srv, 100_000)
    assert q.coupon_discount.minor_units == 0
    assert reasons(q) == [(WHY.PRICING_REASON_CODE_COUPON_EXPIRED, f"{member}-1")]
    # no longer held: the next qualifying purchase earns a new one, and the
    # ledger closed the old one as it went
    later = capture(pos, srv, "s42/l1/r2", 150_000)
    assert later.coupon_issued.code == f"{member}-2"
    assert coupons(srv, member) == [(f"{member}-2", OPEN)]


def test_a_refund_below_the_threshold_revokes_an_unused_coupon(srv, pos):
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 100_000, 60_000)      # 1,600: earns one
    # the 600 line comes back: 1,000 is left, below 1,500
    back = refund(pos, "s42/l1/r1/ret1", "s42/l1/r1", 2)
    assert (back.coupon_revoked, back.coupon_given_back) == (f"{member}-1", "")
    assert coupons(srv, member) == [(f"{member}-1", REVOKED)]
    again = refund(pos, "s42/l1/r1/ret1", "s42/l1/r1", 2)
    assert again.replayed and again.coupon_revoked == f"{member}-1"
    # the rest of the receipt: nothing more to take back
    rest = refund(pos, "s42/l1/r1/ret2", "s42/l1/r1")
    assert (rest.coupon_revoked, rest.refunded.minor_units) == ("", 100_000)


def test_a_used_coupon_is_not_revoked_and_a_whole_refund_gives_one_back(srv, pos):
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    used = capture(pos, srv, "s42/l1/r2", 50_000, 50_000)
    assert used.coupon_redeemed.discount.minor_units == 10_000
    # the purchase that earned it comes back: the coupon was used, it stays so
    back = refund(pos, "s42/l1/r1/ret", "s42/l1/r1")
    assert back.coupon_revoked == ""
    # part of the purchase that used it: no coupon back yet
    part = refund(pos, "s42/l1/r2/ret1", "s42/l1/r2", 1)
    assert (part.coupon_given_back, part.refunded.minor_units) == ("", 45_000)
    # all of it: the coupon is the member's again, same code, same window
    rest = refund(pos, "s42/l1/r2/ret2", "s42/l1/r2")
    assert rest.coupon_given_back == f"{member}-1"
    assert coupons(srv, member) == [(f"{member}-1", OPEN)]
    again = capture(pos, srv, "s42/l1/r3", 100_000)
    assert again.coupon_redeemed.code == f"{member}-1"


def test_the_feed_tells_coupons_issued_and_closed(srv, pos):
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    capture(pos, srv, "s42/l1/r2", 100_000)
    last = srv.server.ledger.head()[0]
    stream = srv.stub(feed_pb2_grpc.FeedStub, "integration").Subscribe(
        feed_pb2.SubscribeRequest(from_cursor=0, types=[
            feed_pb2.ENTRY_TYPE_COUPON_ISSUED, feed_pb2.ENTRY_TYPE_COUPON_CLOSED]),
        timeout=10)
    events = []
    while len(events) < 2:
        events.extend(next(stream).events)
    stream.cancel()
    issued, closed = events
    assert issued.member == closed.member == f"programs/1/members/{member}"
    assert (issued.operation_id, issued.coupon_issued.coupon_number,
            issued.coupon_issued.value.minor_units, issued.coupon_issued.given_back) == (
        "s42/l1/r1/coupon-issue", 1, 10_000, False)
    assert (closed.operation_id, closed.coupon_closed.state,
            closed.coupon_closed.discount.minor_units, closed.store) == (
        "s42/l1/r2/coupon-redeem", REDEEMED, 10_000, "stores/42")
    assert closed.cursor <= last


class _Gate:
    """The writer's ledger, holding its first commit until let go."""

    def __init__(self, ledger):
        self.ledger, self.open, self.entered = ledger, threading.Event(), threading.Event()

    def apply(self, batch, now):
        self.entered.set()
        self.open.wait(10)
        return self.ledger.apply(batch, now)


def test_two_tills_cannot_redeem_one_coupon_twice(srv, pos):
    """Both captures are priced with the coupon before either commits; the
    ledger redeems it once, and refuses the other capture whole."""
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    writer = srv.server.writer
    gate = writer._ledger = _Gate(writer._ledger)
    outcomes = {}

    def till(lane):
        try:
            outcomes[lane] = capture(pos, srv, f"s42/l{lane}/r9", 100_000,
                                     lane=f"stores/42/lanes/{lane}")
        except grpc.RpcError as err:
            outcomes[lane] = error_info(err)
    threads = [threading.Thread(target=till, args=(lane,)) for lane in (1, 2)]
    threads[0].start()
    assert gate.entered.wait(10)      # the first is committing, held
    threads[1].start()
    deadline = time.monotonic() + 10  # the second priced and queued behind it
    while writer.depth() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    gate.open.set()
    for thread in threads:
        thread.join(10)
    writer._ledger = gate.ledger
    assert outcomes[1].coupon_redeemed.code == f"{member}-1"
    assert outcomes[2] == ("FAILED_PRECONDITION", "COUPON_REDEEMED", [])
    assert srv.server.ledger.operation(b"s42/l2/r9/capture") is None
    # quoted again, the second till sells without the coupon
    retry = capture(pos, srv, "s42/l2/r9", 100_000, lane="stores/42/lanes/2")
    assert not retry.HasField("coupon_redeemed") and retry.paid.minor_units == 100_000


def test_post_answers_each_capture_with_its_coupons(srv, pos):
    """A Post of captures whose coupon operations ride along: each answer
    reads its own, in order."""
    member = open_member(srv, 1, "c1", card="7001")
    other = open_member(srv, 1, "c2", card="7002")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    out = pos.Post(pb.PostRequest(operations=[
        pb.PostOperation(capture=pb.CaptureRequest(
            operation_id="p1", lane=LANE, card_number="7001",
            receipt=receipt(srv, 160_000, receipt_id="p1"))),
        pb.PostOperation(capture=pb.CaptureRequest(
            operation_id="p2", lane=LANE, card_number="7002",
            receipt=receipt(srv, 150_000, receipt_id="p2")))]))
    first, second = (r.capture for r in out.results)
    # 1,600 less the coupon is 1,500: it redeems one and earns the next
    assert (first.coupon_redeemed.code, first.coupon_issued.code) == (
        f"{member}-1", f"{member}-2")
    assert (second.coupon_issued.code, second.HasField("coupon_redeemed")) == (
        f"{other}-1", False)


def test_a_receipt_the_coupon_pays_in_full(srv, pos):
    """Nothing to pay and no points: the redemption alone records it, and a
    retry gets its answer."""
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    free = capture(pos, srv, "s42/l1/r2", 8_000)
    assert (free.coupon_redeemed.code, free.coupon_redeemed.discount.minor_units,
            free.paid.minor_units, free.earned_points) == (f"{member}-1", 8_000, 0, 0)
    again = capture(pos, srv, "s42/l1/r2", 8_000)
    assert again.replayed and again.coupon_redeemed == free.coupon_redeemed
    assert coupons(srv, member) == [(f"{member}-1", REDEEMED)]


def balances(srv, member):
    admin = srv.stub(members_pb2_grpc.MembersStub)
    got = admin.GetMember(members_pb2.GetMemberRequest(name=f"programs/1/members/{member}"))
    return got.member.balances


def journal_types(srv, after):
    return [e.type for e in srv.server.ledger.journal(after + 1)]


def refused(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return error_info(err.value)[:2]


def test_a_refund_of_a_receipt_the_coupon_paid_in_full_gives_it_back(srv, pos):
    """Nothing was charged nor earned: the whole refund gives the coupon
    back (as for any receipt refunded whole) and changes nothing else."""
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    capture(pos, srv, "s42/l1/r2", 3_000, 5_000)
    before, seq = balances(srv, member), srv.server.ledger.head()[0]
    back = refund(pos, "s42/l1/r2/ret", "s42/l1/r2")
    assert (back.coupon_given_back, back.coupon_revoked, back.returned_points,
            back.clawed_back_points, back.refunded.minor_units) == (
        f"{member}-1", "", 0, 0, 0)
    assert [(l.line_number, l.quantity, l.returned_points, l.clawed_back_points,
             l.refunded.minor_units) for l in back.lines] == [(1, 1, 0, 0, 0),
                                                               (2, 1, 0, 0, 0)]
    assert back.member == f"programs/1/members/{member}"
    assert back.balances == before == balances(srv, member)
    assert journal_types(srv, seq) == [Entry.COUPON_ISSUED]   # given back, and no more
    assert coupons(srv, member) == [(f"{member}-1", OPEN)]
    again = refund(pos, "s42/l1/r2/ret", "s42/l1/r2")
    assert again.replayed and again.coupon_given_back == f"{member}-1"
    assert refused(lambda: refund(pos, "s42/l1/r2/ret2", "s42/l1/r2")) == (
        "FAILED_PRECONDITION", "REFUND_EXCEEDS_ORIGINAL")
    assert refused(lambda: refund(pos, "s42/l1/r2/ret3", "s42/l1/r2", 1)) == (
        "FAILED_PRECONDITION", "REFUND_EXCEEDS_ORIGINAL")
    # usable again
    assert capture(pos, srv, "s42/l1/r3", 100_000).coupon_redeemed.code == f"{member}-1"


def test_a_line_of_a_receipt_the_coupon_paid_in_full_comes_back(srv, pos):
    """Per line, the rule of any receipt that redeemed a coupon: each line
    gives back its share (here nothing) and the coupon comes back with the
    last line."""
    member = open_member(srv, 1, "c1", card="7001")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(7 * DAY)
    capture(pos, srv, "s42/l1/r2", 3_000, 5_000)
    seq = srv.server.ledger.head()[0]
    part = refund(pos, "s42/l1/r2/ret1", "s42/l1/r2", 1)
    assert (part.coupon_given_back, part.returned_points, part.refunded.minor_units,
            [(l.line_number, l.quantity) for l in part.lines]) == ("", 0, 0, [(1, 1)])
    assert journal_types(srv, seq) == []
    assert coupons(srv, member) == [(f"{member}-1", REDEEMED)]
    assert refund(pos, "s42/l1/r2/ret1", "s42/l1/r2", 1).replayed
    assert refused(lambda: refund(pos, "s42/l1/r2/ret2", "s42/l1/r2", 1)) == (
        "FAILED_PRECONDITION", "REFUND_EXCEEDS_ORIGINAL")
    rest = refund(pos, "s42/l1/r2/ret3", "s42/l1/r2", 2)
    assert (rest.coupon_given_back, [(l.line_number, l.quantity) for l in rest.lines]) == (
        f"{member}-1", [(2, 1)])
    assert coupons(srv, member) == [(f"{member}-1", OPEN)]


def coupon_events(srv, after, n):
    stream = srv.stub(feed_pb2_grpc.FeedStub, "integration").Subscribe(
        feed_pb2.SubscribeRequest(from_cursor=after, types=[
            feed_pb2.ENTRY_TYPE_COUPON_ISSUED, feed_pb2.ENTRY_TYPE_COUPON_CLOSED]),
        timeout=10)
    events = []
    while len(events) < n:
        events.extend(next(stream).events)
    stream.cancel()
    return events


def merge(srv, survivor, duplicate, op_id="m1"):
    admin = srv.stub(members_pb2_grpc.MembersStub)
    return admin.MergeMembers(members_pb2.MergeMembersRequest(
        operation_id=op_id, name=f"programs/1/members/{survivor}",
        source=f"programs/1/members/{duplicate}"))


def test_a_merge_moves_the_coupon_to_the_survivor(srv, pos):
    survivor = open_member(srv, 1, "c1", card="7001")
    duplicate = open_member(srv, 1, "c2", card="7002")
    capture(pos, srv, "s42/l1/r1", 150_000, card="7002")
    seq = srv.server.ledger.head()[0]
    out = merge(srv, survivor, duplicate)
    assert [(c.code, c.state) for c in out.member.coupons] == [(f"{survivor}-1", OPEN)]
    assert [(c.code, c.state) for c in out.source.coupons] == [
        (f"{duplicate}-1", common_pb2.COUPON_STATE_MOVED)]
    closed, issued = coupon_events(srv, seq, 2)
    assert (closed.member, closed.coupon_closed.coupon_number,
            closed.coupon_closed.state) == (f"programs/1/members/{duplicate}", 1,
                                            common_pb2.COUPON_STATE_MOVED)
    assert (issued.member, issued.coupon_issued.coupon_number,
            issued.coupon_issued.moved_from, issued.coupon_issued.value.minor_units,
            issued.operation_id) == (f"programs/1/members/{survivor}", 1,
                                     f"{duplicate}-1", 10_000, "m1")
    assert merge(srv, survivor, duplicate).replayed
    # the survivor redeems it with their own card
    srv.clock.advance(7 * DAY)
    assert capture(pos, srv, "s42/l1/r2", 100_000).coupon_redeemed.code == f"{survivor}-1"


def test_one_per_customer_a_merge_keeps_the_better_coupon(srv, pos):
    """Both members hold one, of equal value: the duplicate's was earned a
    day later, so its window ends later; it stays, the survivor's own is
    closed as DISPLACED, and the feed tells both."""
    survivor = open_member(srv, 1, "c1", card="7001")
    duplicate = open_member(srv, 1, "c2", card="7002")
    capture(pos, srv, "s42/l1/r1", 150_000)
    srv.clock.advance(DAY)
    later = capture(pos, srv, "s42/l1/r2", 150_000, card="7002").coupon_issued.terms
    seq = srv.server.ledger.head()[0]
    out = merge(srv, survivor, duplicate)
    assert [(c.code, c.state, c.expire_time) for c in out.member.coupons] == [
        (f"{survivor}-2", OPEN, later.expire_time)]
    displaced, moved, issued = coupon_events(srv, seq, 3)
    assert (displaced.member, displaced.coupon_closed.coupon_number,
            displaced.coupon_closed.state) == (f"programs/1/members/{survivor}", 1,
                                               common_pb2.COUPON_STATE_DISPLACED)
    assert (moved.member, moved.coupon_closed.state) == (
        f"programs/1/members/{duplicate}", common_pb2.COUPON_STATE_MOVED)
    assert (issued.coupon_issued.coupon_number, issued.coupon_issued.moved_from) == (
        2, f"{duplicate}-1")
    # the displaced one is gone: the moved one pays
    srv.clock.advance(7 * DAY)
    assert capture(pos, srv, "s42/l1/r3", 100_000).coupon_redeemed.code == f"{survivor}-2"


def coupons_report(srv, *by, start=0, days=120):
    request = feed_pb2.GetCouponsReportRequest(parent="programs/1", group_by=by)
    request.interval.start_time.FromMicroseconds(START + start * DAY)
    request.interval.end_time.FromMicroseconds(START + days * DAY)
    return srv.stub(feed_pb2_grpc.FeedStub, "integration").GetCouponsReport(request)


def figures(row):
    return (row.issued_coupons, row.issued_value.minor_units, row.redeemed_coupons,
            row.redeemed_discount.minor_units, row.expired_coupons,
            row.expired_value.minor_units, row.revoked_coupons,
            row.revoked_value.minor_units, row.given_back_coupons,
            row.given_back_value.minor_units, row.displaced_coupons,
            row.displaced_value.minor_units)


def test_the_coupons_report_counts_what_became_of_coupons(srv, pos):
    """Issued, redeemed, revoked, given back and expired, counts and money,
    from the kernel's coupon rows; the audit (fixture) rebuilds those rows
    from the journal and finds them equal."""
    assert srv.clock.now == START
    first = open_member(srv, 1, "c1", card="7001")
    open_member(srv, 1, "c2", card="7002")
    capture(pos, srv, "s42/l1/r1", 150_000)                       # issued
    capture(pos, srv, "s42/l1/r2", 100_000, 60_000, card="7002")  # issued
    refund(pos, "s42/l1/r2/ret", "s42/l1/r2", 2)                  # revoked
    srv.clock.advance(7 * DAY)
    capture(pos, srv, "s42/l1/r3", 100_000)                       # redeemed, 100 off
    refund(pos, "s42/l1/r3/ret", "s42/l1/r3")                     # given back
    srv.clock.advance(91 * DAY)
    capture(pos, srv, "s42/l1/r4", 1_000)                         # it had lapsed
    assert coupons(srv, first) == [(f"{first}-1", EXPIRED)]
    (total,) = coupons_report(srv).rows
    assert figures(total) == (2, 20_000, 1, 10_000, 1, 10_000, 1, 10_000, 1, 10_000, 0, 0)
    by_day = [(key.day.month, key.day.day, figures(row)[:10:2]) for row, key in
              ((r, r.key) for r in coupons_report(srv, feed_pb2.REPORT_DIMENSION_DAY).rows)]
    assert by_day == [(1, 1, (2, 0, 0, 1, 0)), (1, 8, (0, 1, 0, 0, 1)),
                      (4, 9, (0, 0, 1, 0, 0))]
    by_store = {r.key.store: figures(r)[:10:2]
                for r in coupons_report(srv, feed_pb2.REPORT_DIMENSION_STORE).rows}
    assert by_store == {"stores/42": (2, 1, 0, 1, 1), "": (0, 0, 1, 0, 0)}
    # an interval is a window on when things happened
    (later,) = coupons_report(srv, start=7, days=8).rows
    assert figures(later)[:10:2] == (0, 1, 0, 0, 1)
    with pytest.raises(grpc.RpcError) as err:
        coupons_report(srv, feed_pb2.REPORT_DIMENSION_TIER)
    assert error_info(err.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID", ["group_by[0]"])


def test_without_one_per_customer_a_merge_moves_every_coupon(tmp_path):
    """A program whose coupons are not one per customer: the survivor keeps
    its own and gets the duplicate's."""
    text = Path(EXAMPLE).read_text().replace("one_per_customer = true",
                                       "one_per_customer = false")
    assert "one_per_customer = false" in text
    (tmp_path / "program.toml").write_text(text)
    server = RunningServer(tmp_path / "data")
    try:
        install_program(server, tmp_path / "program.toml")
        pos = server.stub(checkout_pb2_grpc.CheckoutStub, "pos")
        survivor = open_member(server, 1, "c1", card="7001")
        duplicate = open_member(server, 1, "c2", card="7002")
        capture(pos, server, "s42/l1/r1", 150_000)
        capture(pos, server, "s42/l1/r2", 150_000, card="7002")
        out = merge(server, survivor, duplicate)
        assert [(c.code, c.state) for c in out.member.coupons] == [
            (f"{survivor}-1", OPEN), (f"{survivor}-2", OPEN)]
        assert server.server.ledger.audit() == []
    finally:
        server.stop()
