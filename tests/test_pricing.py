"""The pricing engine: DESIGN.md's worked examples with their numbers, every
rule of the example program, bad input refused with named fields, and
property tests (allocations sum exactly, quote and settle agree, refunds
never drift or exceed, rounding never goes the wrong way).

Money is in kopecks (RUB = 100), times in microseconds. The example file's
versions: 1 from 2024-01-01 (1 bonus per 20 rubles, pay up to 10%), 2 from
2024-07-01 (5%, pay up to 30%), 3 from 2025-01-01 (10 per 100 rubles, pay
wholly), all Moscow time.
"""

import pathlib
import random
from datetime import datetime
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kopilka.core import pricing
from kopilka.core.batch import Batch
from kopilka.core.pricing import (Allocation, CouponIssue, CouponRedemption,
                                  CouponTerms, Line, Member, MemberCoupon,
                                  MemberError, Problem, Reason, Receipt,
                                  ReceiptError, Refund, SpendError, Why,
                                  quote, refund_lines, refund_referral, settle,
                                  settle_quote,
                                  split)
from kopilka.core.program import load_program, parse_program, to_micros
from kopilka.core.codec import iter_ops
from kopilka.core.records import NEVER, Code, Kind

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "programs" / "example.toml"
RUB = 100
DAY = 86_400_000_000
MINUTE = 60_000_000


def micros(text):
    return to_micros(datetime.fromisoformat(text))


V1 = micros("2024-03-05T12:00:00+03:00")
V2 = micros("2024-09-10T12:00:00+03:00")
V3 = micros("2025-02-10T12:00:00+03:00")


@pytest.fixture(scope="module", autouse=True, params=pricing.IMPLEMENTATIONS)
def implementation(request):
    """Every test here runs on the compiled engine (kopilka.core._pricing)
    and on its pure-Python twin; test_pricing_twin.py holds them to the same
    results, figure for figure."""
    previous = pricing.use(request.param)
    yield request.param
    pricing.use(previous)


@pytest.fixture(scope="module")
def example():
    return load_program(EXAMPLE)


def line(number, category="groceries", price=1000 * RUB, quantity=1, flags=()):
    return Line(number, f"sku-{number}", category, quantity, price,
                quantity * price, tuple(flags))


def receipt(*lines, t=V1, store=42, lane=1, id="r-1"):
    return Receipt(id, store, lane, t, tuple(lines))


def capture_of(settlement):
    """The capture's fields, decoded back from the batch bytes (its first
    operation; coupon operations follow it)."""
    from kopilka.core.codec import iter_ops
    return next(iter_ops(bytes(settlement.batch)))


def small(**sections):
    """A one-version program built from plain data, without stores."""
    version = {"number": 1, "effective_from": "2024-01-01T00:00:00+03:00",
               "point_value": 100,
               "items": {"categories": ["food", "books", "tobacco"],
                         "flags": ["promo", "no_points", "no_discount"]},
               "earn": {"points": 1, "per": 2000}, "spend": {"cap_bp": 1000}}
    version.update(sections)
    return parse_program({"program": {"id": 5, "name": "Small", "currency": "RUB",
                                      "time_zone": "Europe/Moscow"},
                          "version": [version]})


def food(number, price, quantity=1, flags=()):
    return line(number, "food", price, quantity, flags)


def codes(reasons):
    return [(r.code, r.name) for r in reasons]


# --- DESIGN.md's worked examples ------------------------------------------------

def test_design_3000_purchase_earns_150(example):
    """1 bonus per 20 rubles: a 3,000 purchase earns 150."""
    q = quote(example, receipt(line(1, price=3000 * RUB)), Member(), V1)
    assert (q.version.number, q.total, q.due, q.earn) == (1, 300_000, 300_000, 150)
    assert q.lines[0].earn == 150
    assert codes(q.lines[0].reasons) == [(Why.BASE_RATE, "")]


def test_design_next_order_of_2000_spends_all_150_cap_200_pays_1850(example):
    """Pay up to 10% with bonuses, 1 bonus = 1 ruble: an order of 2,000 may
    spend all 150 (the cap is 200) and the customer pays 1,850."""
    member = Member(available=150, account=1)
    r = receipt(line(1, price=1200 * RUB), line(2, "books", 800 * RUB))
    q = quote(example, r, member, V1)
    assert (q.max_spend, q.spend_bound) == (150, Why.BALANCE)
    assert codes(q.spend_limits) == [(Why.CAP, ""), (Why.BALANCE, "")]
    assert [x.amount for x in q.spend_limits] == [200, 150]
    assert str(q.spend_limits[0]) == "points may pay at most 200 points of this receipt"
    s = settle(example, r, member, 150, V1, "s42/l1/r-1")
    assert (s.spend, s.paid) == (150, 185_000)
    # earning is on the money paid: 90 points' worth spent on the groceries
    # and 60 on the books (in proportion), then 1,110 rubles / 20 + 740 at 10/100
    assert [(p.spent, p.paid, p.earn) for p in s.priced.lines] == [
        (90, 111_000, 55), (60, 74_000, 74)]
    assert s.earn == 129
    expected = Batch().capture(
        "s42/l1/r-1/capture", 1, spend=150, earn=129, activates_at=V1 + 14 * DAY,
        expires_at=micros("2026-01-01T00:00:00+03:00"), money=185_000, partner=1,
        version=1, business_time=V1, store=42, lane=1)
    # a purchase of 1,850 earns a coupon too, naming the capture
    c = s.coupon_issue
    expected.issue_coupon("s42/l1/r-1/coupon-issue", 1, 10_000, usable_from=V1 + 7 * DAY,
                          expires_at=c.expires_at, receipt="s42/l1/r-1/capture",
                          partner=1, version=1, business_time=V1, store=42, lane=1)
    assert bytes(s.batch) == bytes(expected)
    # a quote of 2,000 with enough points: the cap binds at 200
    q = quote(example, r, Member(available=1000), V1)
    assert (q.max_spend, q.spend_bound) == (200, Why.CAP)


def test_design_earn_then_spend_in_the_ledger(ledger, open_program, example):
    """The worked example end to end through the ledger: the 3,000 purchase's
    150 points activate after the 14-day return window, then pay for the
    2,000 order; refunding the second receipt restores the first's points."""
    (account,) = open_program(program=1, members=1)
    first = settle(example, receipt(line(1, price=3000 * RUB), id="r-1"),
                   Member(account=account), 0, V1, "s42/l1/r-1")
    assert [r.code for r in ledger.apply(first.batch, V1)] == [Code.OK, Code.OK]
    assert ledger.balances(account, V1).pending == 150
    later = V1 + 15 * DAY
    available = ledger.balances(account, later).available
    assert available == 150
    second_receipt = receipt(line(1, price=1200 * RUB), line(2, "books", 800 * RUB),
                             t=later, id="r-2")
    second = settle(example, second_receipt, Member(available=available, account=account),
                    150, later, "s42/l1/r-2")
    # it would earn a coupon too, but the first one is held (one per
    # customer: the ledger refuses it, the purchase stands)
    assert [r.code for r in ledger.apply(second.batch, later)] == [Code.OK,
                                                                  Code.COUPON_HELD]
    b = ledger.balances(account, later)
    assert (b.available, b.pending) == (0, 129)
    # the customer returns the books, then the groceries in two steps
    refunded, done = [], {}
    for returns in ({2: 1}, {1: 1}):
        refund = refund_lines(second.allocation, returns, done)
        batch = Batch().refund(f"s42/l1/r-2/refund-{len(refunded)}",
                               second.allocation.capture, money=refund.money,
                               give_back=refund.give_back, claw_back=refund.claw_back)
        assert [r.code for r in ledger.apply(batch, later + DAY)] == [Code.OK]
        refunded.append(refund)
        done.update(returns)
    assert refunded == [Refund(60, 74, 74_000), Refund(90, 55, 111_000)]
    b = ledger.balances(account, later + DAY)
    assert (b.available, b.pending, b.earned, b.spent) == (150, 0, 150, 0)


def test_design_5_percent_spend_at_most_30_percent(example):
    member = Member(available=1000, account=1)
    r = receipt(line(1, price=1000 * RUB), t=V2)
    q = quote(example, r, member, V2)
    assert (q.version.number, q.earn, q.max_spend, q.spend_bound) == (2, 50, 300, Why.CAP)
    s = settle(example, r, member, 300, V2, "p")
    assert (s.paid, s.earn) == (70_000, 35)
    assert capture_of(s).version == 2


def test_design_10_points_per_100_rubles_pay_wholly_or_partly(example):
    member = Member(available=5000, account=1)
    r = receipt(line(1, price=1000 * RUB), t=V3)
    q = quote(example, r, member, V3)
    assert (q.version.number, q.earn, q.max_spend, q.spend_bound) == (3, 100, 1000, Why.CAP)
    wholly = settle(example, r, member, 1000, V3, "p")
    assert (wholly.paid, wholly.earn, capture_of(wholly).money) == (0, 0, 0)
    partly = settle(example, r, member, 400, V3, "p")
    assert (partly.paid, partly.earn) == (60_000, 60)


def test_design_promo_subscription_course_lines_earn_nothing(example):
    r = receipt(line(1, flags=["promo"]), line(2, price=500 * RUB, flags=["promo_price"]),
                line(3, "courses", 2000 * RUB, flags=["course"]),
                line(4, price=300 * RUB, flags=["subscription"]),
                line(5, price=100 * RUB))
    q = quote(example, r, Member(), V1)
    assert [x.earn for x in q.lines] == [0, 0, 0, 0, 5]
    assert q.earn == 5
    assert [codes(x.reasons)[0] for x in q.lines] == [
        (Why.EARNS_NOTHING, "promo"), (Why.EARNS_NOTHING, "promo_price"),
        (Why.EARNS_NOTHING, "course"), (Why.EARNS_NOTHING, "subscription"),
        (Why.BASE_RATE, "")]
    assert str(q.lines[0].reasons[0]) == "'promo' item: earns nothing"
    assert codes(q.lines[1].reasons)[1] == (Why.NO_DISCOUNT, "promo_price")


def test_design_lines_not_payable_by_points(example):
    r = receipt(line(1), line(2, "tobacco", 500 * RUB), line(3, price=300 * RUB,
                                                             flags=["no_points"]))
    member = Member(available=1000, account=1)
    q = quote(example, r, member, V1)
    assert [x.payable for x in q.lines] == [True, False, False]
    assert codes(q.lines[1].reasons)[1:] == [(Why.NOT_PAYABLE_BY_POINTS, "tobacco")]
    assert codes(q.lines[2].reasons)[1:] == [(Why.NOT_PAYABLE_BY_POINTS, "no_points")]
    assert (q.payable, q.max_spend, q.spend_bound) == (100_000, 100, Why.CAP)
    s = settle(example, r, member, 100, V1, "p")
    assert [(p.spent, p.paid, p.earn) for p in s.priced.lines] == [
        (100, 90_000, 45), (0, 50_000, 25), (0, 30_000, 15)]
    nothing = quote(example, receipt(line(1, "tobacco")), member, V1)
    assert (nothing.max_spend, nothing.spend_bound) == (0, Why.NOTHING_PAYABLE)


def test_design_category_cashback(example):
    r = receipt(line(1, "books"), line(2))
    assert [x.earn for x in quote(example, r, Member(), V1).lines] == [100, 50]
    r2 = receipt(line(1, "books"), line(2), t=V2)
    assert [x.earn for x in quote(example, r2, Member(), V2).lines] == [100, 50]
    # version 3 restated earn without categories: books earn the base rate
    r3 = receipt(line(1, "books"), line(2), t=V3)
    assert [x.earn for x in quote(example, r3, Member(), V3).lines] == [100, 100]


def test_design_tier_rates_category_beats_tier(example):
    r = receipt(line(1, price=1500 * RUB), line(2, "books", 1500 * RUB))
    q = quote(example, r, Member(tier="silver"), V1)
    assert [x.earn for x in q.lines] == [100, 150]
    assert [codes(x.reasons)[0] for x in q.lines] == [(Why.TIER_RATE, "silver"),
                                                      (Why.CATEGORY_RATE, "books")]
    # base tier has no rate of its own: the base rate
    assert quote(example, r, Member(tier="base"), V1).lines[0].earn == 75
    # gold: 1 per 10 rubles on what is paid after its 3% discount
    gold = quote(example, receipt(line(1)), Member(tier="gold"), V1)
    assert (gold.discount, gold.due, gold.earn) == (3000, 97_000, 97)


def test_unknown_tier_is_explained_and_earns_the_base_rate(example):
    q = quote(example, receipt(line(1)), Member(tier="platinum"), V1)
    assert (q.earn, codes(q.reasons)) == (50, [(Why.TIER_UNKNOWN, "platinum")])


def test_design_discounts_best_wins_plus_additive_regular(example):
    everyone = Member(tier="gold", regular=True, newcomer=True)
    r = receipt(line(1, price=20_000 * RUB))
    q = quote(example, r, everyone, V1)
    # gold 3% = 600, newcomer 10% = 2,000, big basket 500: the newcomer
    # discount wins, and the regular customer's 2% (400) adds on top
    assert [(x.code, x.name, x.amount) for x in q.discounts] == [
        (Why.BEST_DISCOUNT, "referral:newcomer", 200_000),
        (Why.ADDITIVE_DISCOUNT, "regular", 40_000)]
    assert [(x.code, x.name, x.amount) for x in q.reasons if "DISCOUNT" in x.code] == [
        (Why.DISCOUNT_NOT_BEST, "tier:gold", 60_000),
        (Why.DISCOUNT_NOT_BEST, "big_basket", 50_000)]
    assert (q.discount, q.due) == (240_000, 1_760_000)
    gold = Member(tier="gold")
    assert [x.name for x in quote(example, r, gold, V1).discounts] == ["tier:gold"]
    # on 12,000 the gold 3% is 360 and the big-basket 500 off wins
    q = quote(example, receipt(line(1, price=12_000 * RUB)), gold, V1)
    assert [(x.name, x.amount) for x in q.discounts] == [("big_basket", 50_000)]
    # the big basket needs 10,000 before discounts, and a silver or gold tier
    q = quote(example, receipt(line(1, price=9_999 * RUB)), gold, V1)
    assert [x.name for x in q.discounts] == ["tier:gold"]
    # ... counted over the whole receipt, lines that take no discount too
    q = quote(example, receipt(line(1, price=9_000 * RUB),
                               line(2, price=3_000 * RUB, flags=["no_discount"])), gold, V1)
    assert [(x.name, x.amount) for x in q.discounts] == [("big_basket", 50_000)]
    assert quote(example, receipt(line(1, price=12_000 * RUB)), Member(), V1).discount == 0


def test_equal_discounts_the_first_wins_tier_then_referral_then_offers():
    p = small(tiers={"level": [{"name": "t0", "min_spend": 0},
                               {"name": "t1", "min_spend": 1, "discount_bp": 1000}]},
              referral={"window_days": 30, "newcomer_discount_bp": 1000},
              regular_customer={"min_visits": 2, "within_days": 30},
              discounts={"offers": {"ten": {"amount": 1000, "when": {"regular": True}}}})
    r = receipt(food(1, 10_000), store=1)
    everyone = Member(tier="t1", newcomer=True, regular=True)
    assert [x.name for x in quote(p, r, everyone, V1).discounts] == ["tier:t1"]
    newcomer = Member(newcomer=True, regular=True)
    assert [x.name for x in quote(p, r, newcomer, V1).discounts] == ["referral:newcomer"]


def test_discounts_skip_lines_that_take_none_and_split_exactly(example):
    r = receipt(line(1, price=333 * RUB), line(2, price=667 * RUB),
                line(3, price=500 * RUB, flags=["no_discount"]))
    q = quote(example, r, Member(regular=True, newcomer=True), V1)
    # 12% of the 1,000.00 that takes discounts: 100.00 + 20.00
    assert q.discount == 12_000
    assert [x.discount for x in q.lines] == [3996, 8004, 0]
    assert codes(q.lines[2].reasons)[1:] == [(Why.NO_DISCOUNT, "no_discount")]


def test_design_coupon_1500_earns_100(example):
    r = receipt(line(1, price=1500 * RUB))
    q = quote(example, r, Member(), V1)
    assert q.coupon_earned == CouponTerms(10_000, V1 + 7 * DAY,
                                          micros("2024-06-05T12:00:00+03:00"))
    assert (Why.COUPON_EARNED, "") in codes(q.reasons)
    s = settle(example, r, Member(account=1), 0, V1, "s42/l1/r-1")
    assert s.coupon_issue == CouponIssue("s42/l1/r-1/coupon-issue", 10_000,
                                         V1 + 7 * DAY, micros("2024-06-05T12:00:00+03:00"))
    assert s.coupon_redemption is None
    assert quote(example, receipt(line(1, price=149_999)), Member(), V1).coupon_earned is None
    # the threshold is on the purchase after discounts (1,500 - 2% = 1,470)
    assert quote(example, r, Member(regular=True), V1).coupon_earned is None


def test_settle_chains_the_redemption_to_the_capture_and_names_it(example):
    """The ledger operations of a checkout with a coupon: the capture, the
    coupon redeemed (chained: both or neither), the coupon earned (naming
    the capture; refused alone when one is held meanwhile)."""
    coupon = MemberCoupon("42-3", 10_000, V1, V1 + 90 * DAY, number=3)
    later = V1 + 8 * DAY
    r = receipt(line(1, price=1600 * RUB), t=later)
    s = settle(example, r, Member(coupon=coupon, account=42), 0, later, "p")
    capture, redeem, issue = iter_ops(bytes(s.batch))
    assert (capture.kind, capture.link, redeem.link, issue.link) == (Kind.CAPTURE, 1, 0, 0)
    assert (redeem.kind, redeem.op_id, redeem.account, redeem.amount2, redeem.amount,
            redeem.key, redeem.business_time) == (
        Kind.REDEEM_COUPON, b"p/coupon-redeem", 42, 3, 10_000, b"p/capture", later)
    assert (issue.kind, issue.op_id, issue.amount, issue.key, issue.flags,
            issue.activates_at) == (Kind.ISSUE_COUPON, b"p/coupon-issue", 10_000,
                                    b"p/capture", 1, later + 7 * DAY)
    # a receipt the coupon pays in full: the redemption alone, annotated
    small = receipt(line(1, price=80 * RUB), t=later)
    q = quote(example, small, Member(coupon=coupon, account=42), later)
    s = settle_quote(q, 0, "p", annotate=lambda allocation, referral: b"kept")
    (op,) = iter_ops(bytes(s.batch))
    assert (op.kind, op.amount, op.key, op.data) == (Kind.REDEEM_COUPON, 8_000, b"", b"kept")
    assert (s.allocation.capture, s.coupon_redemption.amount) == (None, 8_000)


def test_coupon_one_per_customer_and_redeemed_on_a_later_purchase(example):
    coupon = MemberCoupon("C-1", 10_000, V1 + 7 * DAY, V1 + 90 * DAY)
    r = receipt(line(1, price=1500 * RUB), t=V1 + DAY)
    q = quote(example, r, Member(coupon=coupon), V1 + DAY)
    assert (q.coupon, q.coupon_earned) == (0, None)
    assert codes(q.reasons) == [(Why.COUPON_NOT_YET_USABLE, "C-1"),
                                (Why.COUPON_ALREADY_HELD, "C-1")]
    # a week later it takes 100 off, and this purchase earns the next coupon
    later = V1 + 8 * DAY
    r = receipt(line(1, price=1200 * RUB), line(2, price=400 * RUB), t=later)
    q = quote(example, r, Member(coupon=coupon), later)
    assert (q.coupon, q.due, q.earn) == (10_000, 150_000, 75)
    assert [x.coupon for x in q.lines] == [7500, 2500]
    assert q.coupon_earned is not None
    s = settle(example, r, Member(coupon=coupon, account=1), 0, later, "p")
    assert s.coupon_redemption == CouponRedemption("p/coupon-redeem", "C-1", 10_000)
    assert capture_of(s).money == 150_000
    gone = V1 + 90 * DAY   # coupon windows are on the business time
    expired = quote(example, receipt(line(1, price=1500 * RUB), t=gone),
                    Member(coupon=coupon), gone)
    assert codes(expired.reasons) == [(Why.COUPON_EXPIRED, "C-1"), (Why.COUPON_EARNED, "")]
    assert expired.coupon_earned is not None   # an expired coupon is no longer held


def test_referral_newcomer_and_referrer_share(example):
    newcomer = Member(newcomer=True, account=2, referrer=9, enrolled_at=V1 - 10 * DAY)
    r = receipt(line(1), line(2, price=500 * RUB))
    s = settle(example, r, newcomer, 0, V1, "p")
    # 10% off the first purchase, and the referrer earns 10% of the 1,350 paid
    assert (s.quote.discount, s.paid, s.referral) == (15_000, 135_000, 135)
    assert [x.referral for x in s.allocation.lines] == [90, 45]
    # a bonus, not the referrer's receipt: no money, so no visit of theirs
    assert bytes(s.after) == bytes(Batch().earn(
        "p/referral", 9, 135, activates_at=V1 + 14 * DAY,
        expires_at=micros("2026-01-01T00:00:00+03:00"), partner=1,
        version=1, business_time=V1, store=42, lane=1))
    assert s.allocation.referral_op == "p/referral"
    assert refund_referral(s.allocation, {2: 1}) == 45
    # on what the newcomer actually paid: points are not money paid
    spending = Member(newcomer=True, account=2, referrer=9, enrolled_at=V1 - 10 * DAY,
                      available=100)
    s = settle(example, r, spending, 100, V1, "p")
    assert (s.paid, s.referral) == (125_000, 125)
    late = Member(newcomer=True, account=2, referrer=9, enrolled_at=V1 - 31 * DAY)
    assert settle(example, r, late, 0, V1, "p").referral == 0
    # version 3 ends the referral programme
    assert settle(example, receipt(line(1), t=V3), newcomer, 0, V3, "p").referral == 0


# --- rounding and time --------------------------------------------------------

@pytest.mark.parametrize("rounding, scope, lines, total", [
    ("down", "receipt", [1, 1], 2), ("up", "receipt", [2, 1], 3),
    ("half_up", "receipt", [2, 1], 3),
    ("down", "line", [1, 1], 2), ("up", "line", [2, 2], 4),
    ("half_up", "line", [1, 1], 2),
])
def test_rounding_once_per_receipt_or_per_line(rounding, scope, lines, total):
    """1 point per 20 rubles on two lines of 25: 1.25 each, 2.5 in all."""
    p = small(earn={"points": 1, "per": 2000, "rounding": rounding,
                    "rounding_scope": scope})
    q = quote(p, receipt(food(1, 2500), food(2, 2500), store=1), Member(), V1)
    assert ([x.earn for x in q.lines], q.earn) == (lines, total)


def test_percent_rate_and_point_value():
    """5% of the price with 1 point = 0.50: 100.00 earns 10 points."""
    p = small(point_value=50, earn={"percent_bp": 500})
    assert quote(p, receipt(food(1, 10_000), store=1), Member(), V1).earn == 10


@pytest.mark.parametrize("expiry, expires", [
    ({"days": 365}, V1 + 365 * DAY),
    ({"end_of": "day"}, micros("2024-03-06T00:00:00+03:00")),
    ({"end_of": "month"}, micros("2024-04-01T00:00:00+03:00")),
    ({"end_of": "quarter", "periods_later": 1}, micros("2024-07-01T00:00:00+03:00")),
    ({"end_of": "year", "periods_later": 2}, micros("2027-01-01T00:00:00+03:00")),
    ("never", NEVER),
])
def test_expiry_in_days_or_at_the_end_of_a_calendar_period(expiry, expires):
    p = small(lifetime={"activation_days": 0, "expiry": expiry})
    q = quote(p, receipt(food(1, 2000), store=1), Member(), V1)
    assert (q.activates_at, q.expires_at) == (V1, expires)


def test_points_that_would_have_expired_on_arrival_are_not_earned():
    """A receipt uploaded after an outage, past the end of its own expiry."""
    p = small(lifetime={"expiry": {"end_of": "day"}})
    sold = micros("2024-03-05T23:50:00+03:00")
    r = receipt(food(1, 10_000), t=sold, store=1)
    assert quote(p, r, Member(), sold).earn == 5
    late = quote(p, r, Member(), sold + 20 * MINUTE)
    assert (late.earn, codes(late.reasons)) == (0, [(Why.EXPIRED_ON_ARRIVAL, "")])
    s = settle(p, r, Member(account=1), 0, sold + 20 * MINUTE, "p")
    # nothing earned, but the receipt is still recorded (a visit, its money)
    op = capture_of(s)
    assert (op.amount, op.amount2, op.money, s.allocation.capture) == (0, 0, 10_000, "p/capture")


@pytest.mark.parametrize("zone", ["Europe/Moscow", "America/Santiago",
                                  "Australia/Lord_Howe", "Asia/Kathmandu"])
@pytest.mark.parametrize("expiry", [{"end_of": "day"}, {"end_of": "month"},
                                    {"end_of": "quarter", "periods_later": 2},
                                    {"end_of": "year", "periods_later": 1}])
def test_remembered_period_expiry_equals_the_calendar(zone, expiry):
    """The plan keeps the last period's bounds; across DST changes (Santiago
    moves its clocks at midnight) it must give what the calendar gives."""
    from kopilka.core.lifetimes import lot_times
    from kopilka.core.pricing import _plan
    data = {"program": {"id": 5, "name": "S", "currency": "RUB", "time_zone": zone},
            "version": [{"number": 1, "effective_from": "2020-01-01T00:00:00Z",
                         "point_value": 1, "earn": {"percent_bp": 100},
                         "spend": {"cap_bp": 100},
                         "lifetime": {"activation_days": 0, "expiry": expiry}}]}
    p = parse_program(data)
    plan, lifetime = _plan(p.versions[0]), p.versions[0].lifetime.for_kind("purchase")
    rng = random.Random(zone + str(expiry))
    start = micros("2024-01-01T00:00:00+00:00")
    times = sorted(start + rng.randrange(366 * DAY) for _ in range(400))
    times += [start + rng.randrange(366 * DAY) for _ in range(400)]
    times += [t + d for t in times[:50] for d in (-1, 0, 1, 3_600_000_000)]
    # right around the end of each period, after a time inside it
    from kopilka.core.lifetimes import period_bounds
    for t in times[:100]:
        end = period_bounds(t, expiry["end_of"], p.zone)[1]
        times += [t, end - 1, end, end + 1]
    for t in times:
        assert plan.lot_times("purchase", t, p) == lot_times(lifetime, t, p.zone), t


# --- spend limits ------------------------------------------------------------------

def test_spend_limits_min_balance_min_points_min_receipt():
    p = small(spend={"cap_bp": 1000, "min_balance": 500, "min_points": 50,
                     "min_receipt": 30_000})
    r = receipt(food(1, 100_000), store=1)
    q = quote(p, r, Member(available=499), V1)
    assert (q.max_spend, q.spend_bound) == (0, Why.MIN_BALANCE)
    assert [(x.code, x.amount) for x in q.spend_limits] == [
        (Why.CAP, 100), (Why.BALANCE, 499), (Why.MIN_RECEIPT, 30_000),
        (Why.MIN_BALANCE, 500), (Why.MIN_POINTS, 50)]
    q = quote(p, r, Member(available=500), V1)
    assert (q.max_spend, q.min_spend, q.spend_bound) == (100, 50, Why.CAP)
    # a cap of 40 points is below the fewest that may be spent
    q = quote(p, receipt(food(1, 40_000), store=1), Member(available=500), V1)
    assert (q.max_spend, q.spend_bound) == (0, Why.MIN_POINTS)
    q = quote(p, receipt(food(1, 29_999), store=1), Member(available=500), V1)
    assert (q.max_spend, q.spend_bound) == (0, Why.MIN_RECEIPT)
    with pytest.raises(SpendError) as caught:
        settle(p, r, Member(available=500, account=1), 49, V1, "p")
    assert caught.value.problems == (Problem(
        "spend", "49 is below the fewest points that may be spent at once, 50"),)


def test_spend_above_the_quote_is_refused_naming_spend(example):
    r = receipt(line(1, price=2000 * RUB))
    member = Member(available=150, account=1)
    with pytest.raises(SpendError) as caught:
        settle(example, r, member, 151, V1, "p")
    assert caught.value.problems == (Problem(
        "spend", "151 is above the most this receipt may spend, 150 (BALANCE)"),)
    with pytest.raises(SpendError) as caught:
        settle(example, r, member, -1, V1, "x" * 200)
    assert [p.path for p in caught.value.problems] == ["spend", "op_id_prefix"]
    with pytest.raises(MemberError):
        settle(example, r, Member(available=150), 10, V1, "p")


def test_capture_from_a_hold(example):
    """The held points are no longer available but still pay for the receipt."""
    member = Member(available=0, held=150, account=1)
    r = receipt(line(1, price=2000 * RUB))
    assert quote(example, r, member, V1).max_spend == 150
    s = settle(example, r, member, 100, V1, "p", hold="s42/l1/r-1/hold")
    op = capture_of(s)
    assert (op.key, op.amount, op.amount2) == (b"s42/l1/r-1/hold", 100, 95)
    with pytest.raises(SpendError) as caught:
        settle(example, r, Member(available=50, held=100, account=1), 120, V1, "p",
               hold="h")
    assert caught.value.problems == (Problem("spend", "120 is more than the 100 points held"),)
    # held points can only be spent through their hold
    with pytest.raises(SpendError) as caught:
        settle(example, r, Member(available=50, held=100, account=1), 120, V1, "p")
    assert caught.value.problems == (Problem(
        "spend", "120 is more than the 50 points available; the rest is held, so "
                 "settle with the hold"),)


def test_settle_by_card_at_a_coalition_partners_store(example):
    """Store 77 is partner 2's (in Yekaterinburg; the program's dates are
    still Moscow's): the capture names the partner and the card."""
    r = receipt(line(1), store=77, lane=1)
    s = settle(example, r, Member(available=100, card=b"2770001"), 100, V1, "s77/l1/r-1")
    op = capture_of(s)
    assert (op.account, op.key2, op.partner, op.amount) == (0, b"2770001", 2, 100)
    with pytest.raises(SpendError) as caught:
        quote(example, r, Member(available=100), V1).at(101)
    assert caught.value.problems == (Problem("spend", "must be from 0 to 100"),)


def test_a_receipt_that_moves_no_points_still_records_the_visit(example):
    s = settle(example, receipt(line(1, flags=["promo"])), Member(account=1), 0, V1, "p")
    op = capture_of(s)
    assert (op.amount, op.amount2, op.money, op.store, op.lane) == (0, 0, 100_000, 42, 1)
    assert (s.allocation.capture, s.paid) == ("p/capture", 100_000)


def test_a_free_receipt_makes_no_capture(example):
    s = settle(example, receipt(line(1, price=0)), Member(account=1), 0, V1, "p")
    assert (len(s.batch), s.allocation.capture, s.paid) == (0, None, 0)


# --- bad receipts ---------------------------------------------------------------

def problems(program, r, now=V1):
    with pytest.raises(ReceiptError) as caught:
        quote(program, r, Member(), now)
    return [(p.path, p.reason) for p in caught.value.problems]


def test_bad_lines_are_refused_naming_each_field(example):
    r = receipt(Line(1, "a", "groceries", -1, 100, 100),
                Line(2, "b", "cheese", 1, 100, 100),
                Line(2, "c", "groceries", 3, 100, 301),
                Line(4, "d", "groceries", 1, 100, 100, ("promo", "vip", "promo")),
                Line(5, "", "groceries", 1.5, 100, 150))
    assert problems(example, r) == [
        ("lines[1].quantity", "must be positive; a return is a refund of the original receipt"),
        ("lines[2].category", "unknown category 'cheese': not in items.categories of version 1"),
        ("lines[3].number", "duplicate line number 2 (also lines[2])"),
        ("lines[3].total", "is 301 but quantity 3 x unit_price 100 is 300"),
        ("lines[4].flags[2]", "unknown flag 'vip': not in items.flags of version 1"),
        ("lines[4].flags[3]", "duplicate flag 'promo'"),
        ("lines[5].sku", "must be a non-empty string"),
        ("lines[5].quantity", "must be an integer (whole units)"),
    ]


def test_bad_receipt_fields_are_refused(example):
    assert problems(example, receipt()) == [("lines", "a receipt needs at least one line")]
    assert problems(example, receipt(line(1), store=5, lane=1, id="")) == [
        ("id", "must be a non-empty string"),
        ("store", "unknown store 5: not among the program's stores")]
    assert problems(example, receipt(line(1), lane=9)) == [
        ("lane", "unknown lane 9 of store 42")]
    assert problems(example, receipt(line(1, price=-5))) == [
        ("lines[1].unit_price", "must not be negative"),
        ("lines[1].total", "must not be negative")]
    early = micros("2023-12-31T23:00:00+03:00")
    (path, reason), = problems(example, receipt(line(1), t=early), now=V1)
    assert path == "business_time" and "has no version in force" in reason
    (path, reason), = problems(example, receipt(line(1), t=V1 + DAY), now=V1)
    assert path == "business_time" and reason.startswith("is in the future")


def test_vocabulary_is_the_version_in_force():
    data = {"program": {"id": 5, "name": "S", "currency": "RUB", "time_zone": "UTC"},
            "version": [
                {"number": 1, "effective_from": "2024-01-01T00:00:00Z", "point_value": 1,
                 "items": {"categories": ["food"]}, "earn": {"percent_bp": 100},
                 "spend": {"cap_bp": 100}},
                {"number": 2, "effective_from": "2024-03-01T00:00:00Z",
                 "items": {"categories": ["food", "toys"]}}]}
    p = parse_program(data)
    toys = receipt(line(1, "toys"), store=1, t=micros("2024-02-01T00:00:00+00:00"))
    assert problems(p, toys, now=V1) == [
        ("lines[1].category", "unknown category 'toys': not in items.categories of version 1")]
    later = receipt(line(1, "toys"), store=1, t=micros("2024-03-01T00:00:00+00:00"))
    assert quote(p, later, Member(), V1).version.number == 2


GOOD_LINE = {"number": 1, "sku": "x", "category": "food", "quantity": 2,
             "unit_price": 150, "flags": ("promo",)}
BAD_VALUES = {"number": [0, -1, "3", True, 1, 2],
              "sku": ["", " ", None],
              "category": ["zzz", 3, "books"],
              "quantity": [0, -1, 1.5, True, "2", 10**19],
              "unit_price": [-1, 2.0, None, 0, 10**19],
              "total": [-1, 1, 301, 2.0, None],
              "flags": [("promo", "promo"), ("vip",), ["promo"], (3,), (), "promo"]}


@st.composite
def doubtful_receipts(draw):
    """Receipts that are good but for a few wrong fields, so that every
    single fault is tried against otherwise valid receipts."""
    lines = []
    for k in range(draw(st.integers(0, 4))):
        fields = dict(GOOD_LINE, number=k + 1)
        for name in draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), max_size=2)):
            fields[name] = draw(st.sampled_from(BAD_VALUES[name]))
        if "total" not in fields:
            try:
                fields["total"] = fields["quantity"] * fields["unit_price"]
            except (TypeError, OverflowError):   # e.g. "2" * 10**19
                fields["total"] = 0
        lines.append(Line(**fields))
    def mostly(good, *bad):
        return draw(st.sampled_from([good] * 8 + list(bad)))

    return Receipt(mostly("r", "", " "), mostly(1, 0, "1"), 1,
                   mostly(V1, V1 + DAY, 1.0, V1 - 400 * DAY), mostly(tuple, list)(lines))


@settings(max_examples=1000, deadline=None)
@given(doubtful_receipts())
def test_property_the_quick_check_never_passes_a_bad_receipt(r):
    """Good receipts take a quick path; whatever it passes, the full check
    (which names every problem) must pass too, and quote refuses exactly
    what the full check refuses."""
    from kopilka.core.receipt import _check, _quick
    p = small()
    try:
        _check(r, p, V1)
        full = True
    except ReceiptError:
        full = False
    if _quick(r, p, V1) is not None:
        assert full
    assert quote_ok(p, r) == full


def quote_ok(p, r):
    try:
        quote(p, r, Member(), V1)
        return True
    except ReceiptError:
        return False


def test_bad_member_context_is_refused(example):
    with pytest.raises(MemberError) as caught:
        quote(example, receipt(line(1)), Member(available=-1, tier=3), V1)
    assert [p.path for p in caught.value.problems] == ["available", "tier"]


# --- refunds ---------------------------------------------------------------------

def test_refund_lines_whole_partial_and_too_many(example):
    r = receipt(line(1, price=333 * RUB, quantity=3), line(2, "books", 1001 * RUB))
    s = settle(example, r, Member(available=200, account=1), 200, V1, "p")
    a = s.allocation
    # 200 points split 99.9 : 100.1 -> 100 : 100 (largest remainder), their
    # 200.00 rubles 99.90 : 100.10; earned 44.955 + 90.09 = 135.045 -> 135,
    # split by the exact shares 44.94 : 90.06 -> 45 : 90
    assert [(x.spent, x.earned, x.paid) for x in a.lines] == [
        (100, 45, 89_910), (100, 90, 90_090)]
    # a line of 3 returned one unit at a time: floor on the running total
    steps = [refund_lines(a, {1: 1}), refund_lines(a, {1: 1}, {1: 1}),
             refund_lines(a, {1: 1}, {1: 2})]
    assert steps == [Refund(33, 15, 29_970), Refund(33, 15, 29_970), Refund(34, 15, 29_970)]
    assert refund_lines(a, {1: 3, 2: 1}) == Refund(200, 135, 180_000) == Refund(
        s.spend, s.earn, s.paid)
    with pytest.raises(SpendError) as caught:
        refund_lines(a, {1: 2, 3: 1}, {1: 2})
    assert caught.value.problems == (
        Problem("returns[1]", "returns 2 of line 1, but only 1 of its 3 are left to return"),
        Problem("returns[3]", "line 3 is not on the receipt"))
    assert Allocation.from_dict(a.to_dict()) == a


# --- property tests --------------------------------------------------------------

CATEGORIES = ["a", "b", "c", "d"]
FLAGS = ["f1", "f2", "f3", "f4"]


@st.composite
def programs(draw):
    pv = draw(st.sampled_from([1, 7, 100, 1000]))

    def rate():
        if draw(st.booleans()):
            return {"percent_bp": draw(st.integers(0, 10_000))}
        per = draw(st.integers(1, 50_000))
        return {"points": draw(st.integers(0, per // pv)), "per": per}

    def subset(names):
        return draw(st.lists(st.sampled_from(names), unique=True, max_size=2))

    version = {
        "number": 1, "effective_from": "2024-01-01T00:00:00+03:00", "point_value": pv,
        "items": {"categories": CATEGORIES, "flags": FLAGS},
        "earn": {**rate(), "rounding": draw(st.sampled_from(["down", "up", "half_up"])),
                 "rounding_scope": draw(st.sampled_from(["receipt", "line"])),
                 "exclude_flags": subset(FLAGS),
                 "categories": {c: rate() for c in subset(CATEGORIES)}},
        "spend": {"cap_bp": draw(st.integers(1, 10_000)),
                  "min_points": draw(st.sampled_from([0, 0, 0, 5])),
                  "exclude_flags": subset(FLAGS),
                  "exclude_categories": subset(CATEGORIES)},
        "regular_customer": {"min_visits": 2, "within_days": 30},
        "discounts": {"exclude_flags": subset(FLAGS), "offers": {
            f"o{k}": {**({"percent_bp": draw(st.integers(1, 10_000))} if draw(st.booleans())
                         else {"amount": draw(st.integers(1, 100_000))}),
                      "additive": draw(st.booleans()),
                      "min_receipt": draw(st.sampled_from([0, 50_000])),
                      "when": {"regular": draw(st.booleans())}}
            for k in range(draw(st.integers(0, 3)))}},
        "tiers": {"level": [{"name": "t0", "min_spend": 0},
                            {"name": "t1", "min_spend": 1, **rate(),
                             "discount_bp": draw(st.integers(0, 2000))}]},
        "lifetime": {"activation_days": 7},
    }
    if draw(st.booleans()):
        version["coupon"] = {"threshold": draw(st.integers(1, 200_000)), "value": 5_000,
                             "usable_after_days": 1, "valid_days": 30}
    if draw(st.booleans()):
        version["referral"] = {"window_days": 30,
                               "newcomer_discount_bp": draw(st.integers(0, 3000)),
                               "referrer_share_bp": draw(st.integers(1, 3000))}
    return parse_program({"program": {"id": 1, "name": "P", "currency": "RUB",
                                      "time_zone": "Europe/Moscow"},
                          "version": [version]})


@st.composite
def receipts(draw):
    n = draw(st.integers(1, 12))
    numbers = draw(st.lists(st.integers(1, 99), min_size=n, max_size=n, unique=True))
    lines = []
    for number in numbers:
        quantity = draw(st.integers(1, 5))
        price = draw(st.one_of(st.integers(0, 300), st.integers(0, 200_000)))
        flags = draw(st.lists(st.sampled_from(FLAGS), unique=True, max_size=2))
        lines.append(Line(number, "x", draw(st.sampled_from(CATEGORIES)), quantity,
                          price, quantity * price, tuple(flags)))
    return receipt(*lines, store=1)


@st.composite
def members(draw):
    coupon = None
    if draw(st.booleans()):
        coupon = MemberCoupon("C", draw(st.integers(1, 50_000)),
                              V1 - draw(st.integers(-DAY, DAY)), V1 + DAY)
    return Member(available=draw(st.integers(0, 100_000)),
                  tier=draw(st.sampled_from([None, "t0", "t1"])),
                  newcomer=draw(st.booleans()), regular=draw(st.booleans()),
                  coupon=coupon, account=1, referrer=draw(st.sampled_from([0, 9])),
                  enrolled_at=V1 - DAY)


def choose_spend(q, rnd):
    """Any spend the quote allows: 0, or from min_spend to max_spend."""
    if not q.max_spend or rnd.random() < 0.2:
        return 0
    return rnd.choice([q.max_spend, rnd.randint(max(1, q.min_spend), q.max_spend)])


CASES = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


def exact_earn(program, q, priced):
    """The points each line's paid money is worth at its rate, as exact
    fractions, worked out independently of the engine from the program."""
    v = q.version
    tier = v.tiers.tier.get(q.member.tier) if v.tiers and q.member.tier else None
    out = []
    for source, p in zip(q.receipt.lines, priced.lines):
        if set(source.flags) & set(v.earn.exclude_flags):
            out.append(Fraction(0))
            continue
        rate = v.earn.category_rates.get(source.category) or (
            tier.rate if tier is not None and tier.rate is not None else v.earn.rate)
        num, den = rate.fraction(v.point_value)
        out.append(Fraction(p.paid * num, den))
    return out


ROUNDED = {"down": lambda x: x.numerator // x.denominator,
           "up": lambda x: -(-x.numerator // x.denominator),
           "half_up": lambda x: (x + Fraction(1, 2)).numerator // (x + Fraction(1, 2)).denominator}


@CASES
@given(programs(), receipts(), members(), st.randoms(use_true_random=False))
def test_property_allocations_sum_exactly_and_rounding_is_exact(p, r, member, rnd):
    q = quote(p, r, member, V1)
    spend = choose_spend(q, rnd)
    priced = q.at(spend)
    assert sum(x.discount for x in q.lines) == q.discount
    assert sum(x.coupon for x in q.lines) == q.coupon
    assert sum(x.due for x in q.lines) == q.due == q.total - q.discount - q.coupon
    assert sum(x.spent for x in priced.lines) == spend
    assert sum(x.paid for x in priced.lines) == priced.paid == q.due - spend * q.version.point_value
    assert sum(x.earn for x in priced.lines) == priced.earn
    assert sum(x.referral for x in priced.lines) == priced.referral
    for lq, lp in zip(q.lines, priced.lines):
        assert 0 <= lq.discount + lq.coupon <= lq.total
        assert 0 <= lp.paid <= lq.due
        if not lq.payable:
            assert (lp.spent, lp.paid) == (0, lq.due)
    # limits: never above the cap of the payable amount, nor the balance
    v = q.version
    assert q.max_spend * v.point_value * 10_000 <= q.payable * v.spend.cap_bp
    assert q.max_spend <= member.available
    # earning: exactly the program's rounding of the exact figure, per
    # receipt or per line, so never the wrong way
    exact = exact_earn(p, q, priced)
    rounded = ROUNDED[v.earn.rounding]
    if v.earn.rounding_scope == "line":
        assert [x.earn for x in priced.lines] == [rounded(e) for e in exact]
    else:
        assert priced.earn == rounded(sum(exact))
        for e, x in zip(exact, priced.lines):
            assert abs(x.earn - e * priced.earn / (sum(exact) or 1)) < 1
    if v.earn.rounding == "down":
        assert priced.earn <= sum(exact)


@CASES
@given(programs(), receipts(), members(), st.randoms(use_true_random=False))
def test_property_quote_and_settle_agree(p, r, member, rnd):
    q = quote(p, r, member, V1)
    spend = choose_spend(q, rnd)
    s = settle(p, r, member, spend, V1, "s/l/r")
    assert s.priced == q.at(spend)
    assert (s.spend, s.earn, s.paid, s.referral) == (
        spend, q.at(spend).earn, q.due - spend * q.version.point_value, q.at(spend).referral)
    a = s.allocation
    assert (a.spent, a.earned, a.paid, a.referral) == (s.spend, s.earn, s.paid, s.referral)
    if spend or s.earn or s.paid:
        op = capture_of(s)
        assert (op.amount, op.amount2, op.money, op.version, op.business_time) == (
            spend, s.earn, s.paid, 1, V1)
        assert (op.activates_at, op.expires_at) == (V1 + 7 * DAY, NEVER)
        # then the coupon redeemed (chained to it) and the one earned
        kinds = [o.kind for o in iter_ops(bytes(s.batch))][1:]
        assert kinds == [Kind.REDEEM_COUPON] * bool(q.coupon) + [
            Kind.ISSUE_COUPON] * (q.coupon_earned is not None)
    elif q.coupon:   # the coupon paid for it all: the redemption alone
        (op,) = iter_ops(bytes(s.batch))
        assert (op.kind, op.amount, op.key) == (Kind.REDEEM_COUPON, q.coupon, b"")
    else:
        assert len(s.batch) == 0
    with pytest.raises(SpendError):
        settle(p, r, member, q.max_spend + 1, V1, "s/l/r")


@CASES
@given(programs(), receipts(), members(), st.randoms(use_true_random=False))
def test_property_refunds_in_any_order_and_steps_return_exactly_the_totals(p, r, member, rnd):
    q = quote(p, r, member, V1)
    s = settle(p, r, member, choose_spend(q, rnd), V1, "s/l/r")
    a = s.allocation
    left = {x.number: x.quantity for x in a.lines}
    done = {n: 0 for n in left}
    given_back = clawed = money = referral = 0
    while any(left.values()):
        open_lines = [n for n, q_ in left.items() if q_]
        picked = rnd.sample(open_lines, rnd.randint(1, len(open_lines)))
        returns = {n: rnd.randint(1, left[n]) for n in picked}
        refund = refund_lines(a, returns, done)
        referral += refund_referral(a, returns, done)
        given_back += refund.give_back
        clawed += refund.claw_back
        money += refund.money
        for n, k in returns.items():
            left[n] -= k
            done[n] += k
        # never more than the receipt, at any step
        assert given_back <= s.spend and clawed <= s.earn and money <= s.paid
        assert referral <= s.referral
    assert (given_back, clawed, money, referral) == (s.spend, s.earn, s.paid, s.referral)


@given(st.integers(0, 10**12), st.lists(st.integers(0, 10**9), min_size=1, max_size=30))
def test_property_split_sums_exactly_within_one_of_proportion(total, weights):
    shares = split(total, weights)
    if not sum(weights):
        assert shares == [0] * len(weights)
        return
    assert sum(shares) == total
    for share, w in zip(shares, weights):
        assert abs(Fraction(share) - Fraction(total * w, sum(weights))) < 1
        assert w or share == 0


def test_split_gives_leftovers_to_the_largest_remainders_then_earliest():
    assert split(10, [1, 1, 1]) == [4, 3, 3]
    assert split(5, [1, 2, 2, 0]) == [1, 2, 2, 0]
    assert split(7, [3, 1, 0, 3]) == [3, 1, 0, 3]
    assert split(2, [0, 0]) == [0, 0]


def test_reasons_read_as_text_for_a_pos(example):
    r = receipt(line(1), line(2, "tobacco"), line(3, flags=["promo"]))
    q = quote(example, r, Member(available=10), V1)
    assert [[str(x) for x in lq.reasons] for lq in q.lines] == [
        ["earns the base rate"],
        ["earns the base rate", "'tobacco': points may not pay for it"],
        ["'promo' item: earns nothing"]]
    assert Reason(Why.CAP, "", 5)._asdict() == {"code": "CAP", "name": "", "amount": 5}


def test_random_receipts_against_the_example_program(example):
    """A few hundred mixed receipts of the example program settle with every
    figure consistent (a cheap smoke run across all its rules)."""
    rng = random.Random(7)
    categories = ["groceries", "books", "tobacco", "gift_cards", "courses"]
    flags = ["promo", "promo_price", "subscription", "course", "no_points", "no_discount"]
    for k in range(300):
        t = rng.choice([V1, V2, V3])
        lines = [line(n, rng.choice(categories), rng.randint(1, 500_000), rng.randint(1, 3),
                      rng.sample(flags, rng.randint(0, 2))) for n in range(1, rng.randint(2, 20))]
        member = Member(available=rng.randint(0, 5000), tier=rng.choice([None, "silver", "gold"]),
                        regular=rng.random() < 0.5, newcomer=rng.random() < 0.2, account=1,
                        referrer=9, enrolled_at=t - DAY)
        r = receipt(*lines, t=t, id=f"r-{k}")
        q = quote(example, r, member, t)
        s = settle(example, r, member, choose_spend(q, rng), t, f"s42/l1/r-{k}")
        assert refund_lines(s.allocation, {x.number: x.quantity for x in r.lines}) == (
            s.spend, s.earn, s.paid)
