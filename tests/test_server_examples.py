"""DESIGN.md's worked examples, end to end: a real server on a loopback port,
examples/programs/example.toml installed, every step a POS or CRM call.

The example program's three versions are the examples' three programs; each
test sets the server's clock inside the version it exercises (receipts are
priced by the version in force at their business time)."""

import datetime

import grpc
import pytest

from kopilka.core.batch import Batch
from kopilka.v1 import checkout_pb2 as pb
from kopilka.v1 import checkout_pb2_grpc, common_pb2, members_pb2, members_pb2_grpc

from server_harness import DAY, Clock, RunningServer, install_program, open_member

LANE = "stores/42/lanes/1"
MSK = datetime.timezone(datetime.timedelta(hours=3))
R = pb.PricingReasonCode


def at(*date):
    """Microseconds of a Moscow wall-clock time."""
    return int(datetime.datetime(*date, tzinfo=MSK).timestamp()) * 1_000_000


def rub(kopecks):
    return common_pb2.Money(currency_code="RUB", minor_units=kopecks)


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(now):
        srv = RunningServer(tmp_path / f"data{len(servers)}", clock=Clock(now))
        install_program(srv)
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.stop()


class Till:
    """A POS at store 42, lane 1: receipts stamped with the server's clock."""

    def __init__(self, srv):
        self.srv = srv
        self.pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
        self.count = 0

    def receipt(self, *lines):
        """lines: (category, kopecks[, flags])."""
        self.count += 1
        out = pb.Receipt(receipt_id=f"r{self.count}")
        out.business_time.FromMicroseconds(self.srv.clock.now)
        for i, (category, price, *flags) in enumerate(lines, 1):
            out.lines.add(line_number=i, sku=f"sku{i}", category=category, quantity=1,
                          unit_price=rub(price), total=rub(price),
                          flags=flags[0] if flags else [])
        return out

    def quote(self, card, receipt):
        return self.pos.Quote(pb.QuoteRequest(lane=LANE, card_number=card,
                                              receipt=receipt))

    def capture(self, card, receipt, spend=0):
        return self.pos.Capture(pb.CaptureRequest(
            operation_id=f"s42/l1/{receipt.receipt_id}", lane=LANE, card_number=card,
            receipt=receipt, spend_points=spend))


def test_one_bonus_per_20_rubles_pay_up_to_10_percent(server):
    """Version 1: a 3,000 purchase earns 150; the next order of 2,000 may
    spend all 150 (the cap is 200) and the customer pays 1,850. Earning is
    credited when the order is closed, spendable after the return window."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001")
    first = till.capture("7001", till.receipt(("groceries", 300_000)))
    assert first.program_version == "programs/1/versions/1"
    assert first.earned_points == 150 and first.paid.minor_units == 300_000
    assert first.balances.pending_points == 150
    assert first.balances.available_points == 0
    srv.clock.advance(14 * DAY)                  # the return window
    assert till.quote("7001", till.receipt(("groceries", 200_000))) \
        .balances.available_points == 150
    # the 3,000 purchase also earned a 100 coupon (version 1 has coupons),
    # valid 3 months: the example's next order comes after it lapsed
    srv.clock.advance(90 * DAY)
    second = till.receipt(("groceries", 200_000))
    q = till.quote("7001", second)
    assert q.coupon_discount.minor_units == 0
    assert q.max_spend_points == 150 and q.spend_bound == R.PRICING_REASON_CODE_BALANCE
    paid = till.capture("7001", second, spend=150)
    assert paid.spent_points == 150 and paid.paid.minor_units == 185_000
    assert paid.earned_points == 92                # 1,850 / 20, rounded down
    assert paid.balances.available_points == 0


def test_the_cap_bounds_the_spend_when_the_balance_is_larger(server):
    """Version 1 again: with 1,000 points, a 2,000 order may take 200."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001", points=1_000)
    q = till.quote("7001", till.receipt(("groceries", 200_000)))
    assert q.max_spend_points == 200 and q.spend_bound == R.PRICING_REASON_CODE_CAP
    with pytest.raises(grpc.RpcError) as err:
        till.capture("7001", till.receipt(("groceries", 200_000)), spend=201)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_five_percent_of_the_price_spend_at_most_30_percent(server):
    """Version 2: 5% back, points pay at most 30% of the order."""
    srv = server(at(2024, 8, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001", points=1_000)
    r = till.receipt(("groceries", 100_000))
    q = till.quote("7001", r)
    assert q.program_version == "programs/1/versions/2"
    assert q.max_spend_points == 300 and q.spend_bound == R.PRICING_REASON_CODE_CAP
    assert q.earn_points == 50                     # 5% of 1,000 rubles
    paid = till.capture("7001", r, spend=300)
    assert paid.paid.minor_units == 70_000
    assert paid.earned_points == 35                # 5% of what was paid in money


def test_ten_points_per_100_rubles_pay_wholly_or_partly(server):
    """Version 3: 10 points per 100 rubles; the order may be paid wholly
    with points (and what points pay earns nothing)."""
    srv = server(at(2026, 2, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001", points=5_000)
    whole = till.receipt(("groceries", 200_000))
    q = till.quote("7001", whole)
    assert q.program_version == "programs/1/versions/3"
    assert q.max_spend_points == 2_000 and q.earn_points == 200
    paid = till.capture("7001", whole, spend=2_000)
    assert paid.paid.minor_units == 0 and paid.earned_points == 0
    part = till.capture("7001", till.receipt(("groceries", 200_000)), spend=500)
    assert part.paid.minor_units == 150_000 and part.earned_points == 150
    assert part.balances.available_points == 5_000 - 2_500


def test_promo_subscription_and_course_lines_earn_nothing_and_say_why(server):
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001")
    r = till.receipt(("groceries", 100_000), ("groceries", 100_000, ["promo_price"]),
                     ("books", 100_000, ["subscription"]),
                     ("courses", 100_000, ["course"]))
    q = till.quote("7001", r)
    assert [line.earn_points for line in q.lines] == [50, 0, 0, 0]
    for line in q.lines[1:]:
        [why] = [x for x in line.reasons if x.code == R.PRICING_REASON_CODE_EARNS_NOTHING]
        assert why.subject in ("promo_price", "subscription", "course") and why.text
    assert till.capture("7001", r).earned_points == 50


def test_items_points_may_not_pay_for(server):
    """A `no_points` line and the tobacco category are outside the cap."""
    srv = server(at(2024, 8, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001", points=10_000)
    r = till.receipt(("groceries", 100_000), ("groceries", 100_000, ["no_points"]),
                     ("tobacco", 100_000))
    q = till.quote("7001", r)
    assert [line.payable_by_points for line in q.lines] == [True, False, False]
    assert q.payable.minor_units == 100_000
    assert q.max_spend_points == 300               # 30% of the one payable line


def test_category_cashback_beats_the_base_and_tier_rates(server):
    """Version 1's books earn 10 points per 100 rubles; a gold member's
    groceries earn the gold rate (1 per 10 rubles), books still their own
    (both on what the lines cost after gold's 3% discount)."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    member = open_member(srv, 1, "c1", card="7001")
    r = till.receipt(("groceries", 100_000), ("books", 100_000))
    assert [line.earn_points for line in till.quote("7001", r).lines] == [50, 100]
    apply = srv.call(srv.server.backend.apply(
        Batch().set_tier("test/tier", member, 3), None))   # gold: level 3
    assert apply[0].code == 0
    q = till.quote("7001", r)
    assert q.tier == "gold"
    assert [line.earn_points for line in q.lines] == [97, 97]
    assert [x.code for x in q.lines[0].reasons] == [R.PRICING_REASON_CODE_TIER_RATE]
    assert [x.code for x in q.lines[1].reasons] == [R.PRICING_REASON_CODE_CATEGORY_RATE]


def test_the_best_discount_wins(server):
    """Gold's 3% competes with big_basket's 500 rubles off a 10,000 order:
    the larger wins, they do not add up."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    member = open_member(srv, 1, "c1", card="7001")
    srv.call(srv.server.backend.apply(Batch().set_tier("test/tier", member, 3), None))
    q = till.quote("7001", till.receipt(("groceries", 1_000_000)))
    assert q.discount.minor_units == 50_000                 # not 30,000 + 50,000
    codes = [(d.code, d.subject) for d in q.discounts]
    assert (R.PRICING_REASON_CODE_BEST_DISCOUNT, "big_basket") in codes
    small = till.quote("7001", till.receipt(("groceries", 900_000)))
    assert small.discount.minor_units == 27_000             # gold's 3%
    assert (R.PRICING_REASON_CODE_BEST_DISCOUNT, "tier:gold") in [
        (d.code, d.subject) for d in small.discounts]


def test_points_activate_after_the_window_and_expire_at_the_end_of_next_year(server):
    """Version 1: spendable 14 days after the sale; what is left burns at
    the end of the next calendar year (Moscow time), by the scheduled sweep."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    open_member(srv, 1, "c1", card="7001")
    earned = till.capture("7001", till.receipt(("groceries", 300_000)))
    assert earned.earn_activate_time.ToMicroseconds() == at(2024, 3, 15, 12)
    assert earned.earn_expire_time.ToMicroseconds() == at(2026, 1, 1)
    members = srv.stub(members_pb2_grpc.MembersStub, "admin")
    name = earned.member
    srv.clock.now = at(2025, 12, 31, 23, 59)
    assert srv.call(srv.server.scheduler.run_once()) == 0
    got = members.GetMember(members_pb2.GetMemberRequest(name=name)).member
    assert got.balances.available_points == 150
    srv.clock.now = at(2026, 1, 1)
    assert srv.call(srv.server.scheduler.run_once()) == 1
    got = members.GetMember(members_pb2.GetMemberRequest(name=name)).member
    assert got.balances.available_points == 0
    assert got.balances.expired_points == 150
    assert srv.server.ledger.audit() == []


def test_welcome_bonus_and_referral(server):
    """Version 1: a member joins with 100 welcome points; a newcomer they
    referred gets 10% off the first purchase, and the referrer earns 10% of
    what the newcomer actually paid, in points."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    crm = srv.stub(members_pb2_grpc.MembersStub, "admin")
    old = crm.EnrolMember(members_pb2.EnrolMemberRequest(
        operation_id="enrol/old", parent="programs/1", external_id="old",
        card_number="7001"))
    assert old.welcome_points == 100
    assert old.member.balances.available_points == 100
    new = crm.EnrolMember(members_pb2.EnrolMemberRequest(
        operation_id="enrol/new", parent="programs/1", external_id="new",
        card_number="7002", referrer=old.member.name))
    assert new.member.referrer == old.member.name
    r = till.receipt(("groceries", 200_000))
    q = till.quote("7002", r)
    assert q.discount.minor_units == 20_000
    paid = till.capture("7002", r)
    assert paid.paid.minor_units == 180_000
    referrer = crm.GetMember(members_pb2.GetMemberRequest(name=old.member.name))
    assert referrer.member.balances.pending_points + \
        referrer.member.balances.available_points == 100 + 180
    second = till.quote("7002", till.receipt(("groceries", 200_000)))
    assert second.discount.minor_units == 0       # the first purchase only
    assert srv.server.ledger.audit() == []


def test_a_regular_customer_gets_the_additive_discount_on_top(server):
    """Version 1: a member who bought on 4 different days of the last 90 is a
    regular; the regulars' 2% adds on top of the best other discount (gold's
    3%). Two receipts on one day are one visit; a visit older than 90 days
    no longer counts."""
    srv = server(at(2024, 3, 1, 12))
    till = Till(srv)
    member = open_member(srv, 1, "c1", card="7001")
    srv.call(srv.server.backend.apply(Batch().set_tier("test/tier", member, 3), None))
    members = srv.stub(members_pb2_grpc.MembersStub, "admin")

    def regular_now():
        name = till.quote("7001", till.receipt(("groceries", 10_000))).member
        return members.GetMember(members_pb2.GetMemberRequest(name=name)).member.regular

    def discounts():
        q = till.quote("7001", till.receipt(("groceries", 100_000)))
        return [(d.code, d.subject, d.money.minor_units) for d in q.discounts]

    gold = (R.PRICING_REASON_CODE_BEST_DISCOUNT, "tier:gold", 3_000)
    for date in ((3, 1), (3, 1), (3, 20), (4, 9)):   # three visits: twice on March 1st
        srv.clock.now = at(2024, *date, 12)
        assert till.capture("7001", till.receipt(("groceries", 20_000))).member
        assert discounts() == [gold]
    assert not regular_now()
    srv.clock.now = at(2024, 5, 20, 12)            # the fourth visit
    till.capture("7001", till.receipt(("groceries", 20_000)))
    assert regular_now()
    # 2% of the price, on top of gold's 3%
    assert discounts() == [gold, (R.PRICING_REASON_CODE_ADDITIVE_DISCOUNT, "regular", 2_000)]
    srv.clock.now = at(2024, 5, 30, 12)            # March 1st is 90 days back
    assert not regular_now()
    assert discounts() == [gold]
    assert srv.server.ledger.audit() == []
