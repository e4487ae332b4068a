"""Pricing a receipt: what it earns, what points may pay, and the ledger
operations that settle it. Pure functions of (program, receipt, member, now).

`quote` works out everything that does not depend on how many points the
customer spends, in this order, each step on the money the previous left:

1. Discounts, on lines that take discounts (no flag in
   `discounts.exclude_flags`). The competing discounts (a tier's
   `discount_bp`, the referral newcomer discount, offers not marked
   additive) are each worked out on this receipt and the largest wins (ties
   to the first: tier, referral, then offers in file order); every additive
   offer the member qualifies for adds on top. Each is reckoned on the lines'
   prices before any discount, so their order does not matter, and together
   they never exceed those prices. A percent discount is rounded down (never
   more than its stated share); an offer's `min_receipt` is compared with
   the receipt's total before discounts.
2. The member's coupon, if usable at the business time, on what the same
   lines still cost (a coupon is a discount too).
3. What points may pay: the lines points may pay for (no excluded flag or
   category), after discounts; at most `cap_bp` of that, in whole points,
   and no more than the member has. `min_receipt` is compared with the
   money due after discounts; a balance below `min_balance` may not spend;
   a maximum below `min_points` is no maximum at all. `Quote.spend_bound`
   says which limit bound, `Quote.spend_limits` lists them all.

`Quote.at(spend)` then splits the spent points over the payable lines in
proportion to what each still costs (largest remainder, see allocation.py),
and earns on the money actually paid, line by line: the category's rate,
else the tier's, else the base rate; nothing on lines with a flag in
`earn.exclude_flags`. Rates are exact fractions (`Rate.fraction`), brought to
one denominator per version so a receipt's points are one integer division:
rounded once per receipt (then split over the lines by their exact shares)
or once per line, as the program says. A referrer's share (of what a
newcomer pays, within the referral window) is worked out the same way.

`settle` prices with the very same code, so a quote and its settlement
cannot disagree, and turns the result into kernel operations (a CAPTURE that
spends and earns at once, the referrer's EARN), coupon data (the kernel has
no coupon operation yet), and the per-line `Allocation` that refunds of
single lines are computed from (`refund_lines`, in allocation.py).

Earned points activate `activation_days` after the business time and expire
by the program's lifetime rules for purchases (lifetimes.py); points that
would already have expired by `now` (a sale uploaded long after its
end-of-day expiry) are not earned at all, as the kernel would refuse them.

Per-line figures are NamedTuples rather than dataclasses: a checkout prices
thousands of receipts a second, and tuples are several times cheaper to
build. The per-version precomputation (`_Plan`) is kept by version object.
"""

import math
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import NamedTuple

from .allocation import (Allocation, LineShare, Refund, refund_lines,
                         refund_referral, split)
from .batch import Batch
from .lifetimes import add_months, lot_times, period_bounds
from .program import BASIS, Problem, Version, per_version
from .receipt import (DAY, Line, Member, MemberCoupon, MemberError,
                      PricingError, Receipt, ReceiptError, SpendError,
                      check_member, check_receipt)
from .records import MAX_OP_ID

__all__ = [
    # what a checkout hands in (receipt.py)
    "Receipt", "Line", "Member", "MemberCoupon",
    "PricingError", "ReceiptError", "MemberError", "SpendError", "Problem",
    # quoting
    "quote", "Quote", "LineQuote", "Priced", "LinePrice", "CouponTerms", "Reason",
    "Why", "TEXT",
    # settling
    "settle", "settle_quote", "Settlement", "CouponIssue", "CouponRedemption",
    # refunds (allocation.py)
    "Allocation", "LineShare", "Refund", "refund_lines", "refund_referral", "split",
]


class Why(StrEnum):
    """Reason codes a POS can show (and translate); see TEXT for English."""
    # a line: how it earns, discounts, points
    BASE_RATE = "BASE_RATE"
    CATEGORY_RATE = "CATEGORY_RATE"
    TIER_RATE = "TIER_RATE"
    EARNS_NOTHING = "EARNS_NOTHING"
    NO_DISCOUNT = "NO_DISCOUNT"
    NOT_PAYABLE_BY_POINTS = "NOT_PAYABLE_BY_POINTS"
    # the receipt: what bounds the points it may spend
    CAP = "CAP"
    BALANCE = "BALANCE"
    MIN_BALANCE = "MIN_BALANCE"
    MIN_POINTS = "MIN_POINTS"
    MIN_RECEIPT = "MIN_RECEIPT"
    NOTHING_PAYABLE = "NOTHING_PAYABLE"
    # the receipt: discounts and coupons
    BEST_DISCOUNT = "BEST_DISCOUNT"
    ADDITIVE_DISCOUNT = "ADDITIVE_DISCOUNT"
    DISCOUNT_NOT_BEST = "DISCOUNT_NOT_BEST"
    COUPON_REDEEMED = "COUPON_REDEEMED"
    COUPON_NOT_YET_USABLE = "COUPON_NOT_YET_USABLE"
    COUPON_EXPIRED = "COUPON_EXPIRED"
    COUPON_NOTHING_TO_COVER = "COUPON_NOTHING_TO_COVER"
    COUPON_EARNED = "COUPON_EARNED"
    COUPON_ALREADY_HELD = "COUPON_ALREADY_HELD"
    # the receipt: other
    TIER_UNKNOWN = "TIER_UNKNOWN"
    EXPIRED_ON_ARRIVAL = "EXPIRED_ON_ARRIVAL"


TEXT = {
    Why.BASE_RATE: "earns the base rate",
    Why.CATEGORY_RATE: "earns the '{name}' category rate",
    Why.TIER_RATE: "earns the '{name}' tier rate",
    Why.EARNS_NOTHING: "'{name}' item: earns nothing",
    Why.NO_DISCOUNT: "'{name}' item: takes no discount",
    Why.NOT_PAYABLE_BY_POINTS: "'{name}': points may not pay for it",
    Why.CAP: "points may pay at most {amount} points of this receipt",
    Why.BALANCE: "the member has {amount} points to spend",
    Why.MIN_BALANCE: "spending needs a balance of at least {amount} points",
    Why.MIN_POINTS: "at least {amount} points must be spent at once",
    Why.MIN_RECEIPT: "points pay only for receipts of at least {amount}",
    Why.NOTHING_PAYABLE: "nothing on this receipt may be paid with points",
    Why.BEST_DISCOUNT: "discount '{name}': {amount} off",
    Why.ADDITIVE_DISCOUNT: "discount '{name}' on top: {amount} off",
    Why.DISCOUNT_NOT_BEST: "discount '{name}' ({amount} off) is not the best one",
    Why.COUPON_REDEEMED: "coupon {name}: {amount} off",
    Why.COUPON_NOT_YET_USABLE: "coupon {name} is not usable yet",
    Why.COUPON_EXPIRED: "coupon {name} has expired",
    Why.COUPON_NOTHING_TO_COVER: "coupon {name}: nothing on this receipt takes it",
    Why.COUPON_EARNED: "this purchase earns a coupon worth {amount}",
    Why.COUPON_ALREADY_HELD: "no new coupon: the member holds an unused one",
    Why.TIER_UNKNOWN: "tier '{name}' is not in this version of the program",
    Why.EXPIRED_ON_ARRIVAL: "earns nothing: its points would already have expired",
}


class Reason(NamedTuple):
    code: Why
    name: str = ""    # the flag, category, tier, discount or coupon concerned
    amount: int = 0   # money minor units or points, as TEXT says

    def __str__(self):
        return TEXT[self.code].format(name=self.name, amount=self.amount)


# --- per version: the rules in the shape pricing uses --------------------------

def _down(a, b):
    return a // b


def _up(a, b):
    return -(-a // b)


def _half_up(a, b):
    return (2 * a + b) // (2 * b)


ROUND = {"down": _down, "up": _up, "half_up": _half_up}


def _first(flags, among):
    """The first of a line's flags in `among`, or None."""
    for f in flags:
        if f in among:
            return f
    return None


class _Plan:
    """A version's rules, precomputed once: every earning rate as an integer
    numerator over one common denominator `scale`, the exclusion sets, and
    memos of what a kind of line is (by category, flags and tier) and of
    when points earned in a calendar period expire."""

    def __init__(self, v):
        pv = v.point_value
        tiers = v.tiers.levels if v.tiers is not None else ()
        rates = ([v.earn.rate] + [c.rate for c in v.earn.categories]
                 + [t.rate for t in tiers if t.rate is not None])
        self.scale = math.lcm(*(r.fraction(pv)[1] for r in rates))

        def k(rate):
            num, den = rate.fraction(pv)
            return num * (self.scale // den)

        self.base = (k(v.earn.rate), Reason(Why.BASE_RATE))
        self.category = {c.category: (k(c.rate), Reason(Why.CATEGORY_RATE, c.category))
                         for c in v.earn.categories}
        self.tiers = {t.name: t for t in tiers}
        self.tier_rate = {t.name: (k(t.rate), Reason(Why.TIER_RATE, t.name))
                          for t in tiers if t.rate is not None}
        self.earn_excluded = frozenset(v.earn.exclude_flags)
        self.discount_excluded = frozenset(v.discounts.exclude_flags)
        self.spend_flags = frozenset(v.spend.exclude_flags)
        self.spend_categories = frozenset(v.spend.exclude_categories)
        self.round = ROUND[v.earn.rounding]
        self.per_line = v.earn.rounding_scope == "line"
        self.lifetimes = {kind: v.lifetime.for_kind(kind) for kind in ("purchase", "referral")}
        self._classes = {}
        self._periods = {}

    def line_class(self, category, flags, tier):
        """(rate numerator, takes discounts, payable by points, reasons) of a
        line; the same few kinds of line recur on every receipt."""
        key = (category, flags, tier)
        found = self._classes.get(key)
        if found is None:
            if len(self._classes) > 4096:
                self._classes.clear()
            found = self._classes[key] = self._classify(category, flags, tier)
        return found

    def _classify(self, category, flags, tier):
        hit = _first(flags, self.earn_excluded)
        if hit is not None:
            k, reason = 0, Reason(Why.EARNS_NOTHING, hit)
        else:
            k, reason = self.category.get(category) or self.tier_rate.get(tier) or self.base
        why = [reason]
        hit = _first(flags, self.discount_excluded)
        if hit is not None:
            why.append(Reason(Why.NO_DISCOUNT, hit))
        takes_discount = hit is None
        hit = category if category in self.spend_categories else _first(flags, self.spend_flags)
        if hit is not None:
            why.append(Reason(Why.NOT_PAYABLE_BY_POINTS, hit))
        return k, takes_discount, hit is None, tuple(why)

    def lot_times(self, kind, t, program):
        """(activates_at, expires_at) of `kind` points earned at `t`. An
        end-of-period expiry is the same for every `t` in one period, so the
        last period's bounds are kept and the calendar is consulted only when
        `t` leaves it."""
        lifetime = self.lifetimes[kind]
        expiry = lifetime.expiry
        if expiry.end_of is None:
            return lot_times(lifetime, t, None)
        zone = program.time_zone
        low, high, expires, memo_zone = self._periods.get(kind, (0, -1, 0, None))
        if not (low <= t < high and memo_zone == zone):
            low, high = period_bounds(t, expiry.end_of, program.zone)
            expires = lot_times(lifetime, t, program.zone)[1]
            self._periods[kind] = (low, high, expires, zone)
        return t + lifetime.activation_days * DAY, expires


_plan = per_version(_Plan)


# --- the quote ------------------------------------------------------------------

class LineQuote(NamedTuple):
    number: int
    total: int       # the line's price (quantity x unit price)
    discount: int    # money off by discounts
    coupon: int      # money off by the coupon
    due: int         # what is left to pay, by money or points
    payable: bool    # may points pay for it
    earn: int        # points it earns when no points are spent
    reasons: tuple   # Reasons: its rate, and what it is excluded from


class LinePrice(NamedTuple):
    number: int
    spent: int       # points paying for part of the line
    paid: int        # money paid for it
    earn: int        # points it earns
    referral: int    # points the referrer earns on it


class Priced(NamedTuple):
    """A receipt priced for one choice of points to spend."""
    spend: int
    paid: int        # money the customer pays
    earn: int
    referral: int
    lines: tuple     # LinePrice, in receipt order


class CouponTerms(NamedTuple):
    """A coupon this purchase earns."""
    value: int
    usable_from: int
    expires_at: int


class _Calc(NamedTuple):
    """Per-line working figures a quote keeps for pricing a spend."""
    plan: _Plan
    point_value: int
    numbers: list
    totals: list
    discounts: list
    coupons: list
    dues: list
    payable: list        # may points pay for the line
    pay_weights: list    # the line's due if points may pay for it, else 0
    rates: list          # earning numerators over plan.scale (0: earns nothing)
    why: list            # each line's reasons
    earns: bool          # False when the points would expire on arrival
    referral_bp: int
    referral_times: tuple | None


@dataclass(frozen=True, eq=False)
class Quote:
    receipt: Receipt
    member: Member
    now: int
    version: Version       # the program version that priced it
    partner: int           # the store's partner (0 without coalition)
    total: int             # before discounts
    discount: int
    coupon: int            # money off by the member's coupon
    due: int               # after discounts and coupon: to pay by money or points
    payable: int           # the part of `due` points may pay for
    discounts: tuple       # Reasons: BEST_DISCOUNT and ADDITIVE_DISCOUNT applied
    max_spend: int         # the most points this receipt may spend
    min_spend: int         # the fewest, when any (program's min_points)
    spend_bound: Why       # the limit that set max_spend
    spend_limits: tuple    # Reasons: every limit considered, with its points
    activates_at: int      # of the points it earns
    expires_at: int
    coupon_earned: CouponTerms | None
    reasons: tuple         # Reasons about the whole receipt
    _calc: _Calc = field(repr=False)

    # Worked out when first asked for: `settle` needs neither.
    @cached_property
    def spent_nothing(self):
        """The receipt priced with no points spent."""
        return _price(self._calc, 0)

    @cached_property
    def lines(self):
        """LineQuote per line, in receipt order (earn: with no points spent)."""
        c = self._calc
        return tuple(map(LineQuote, c.numbers, c.totals, c.discounts, c.coupons, c.dues,
                         c.payable, [p.earn for p in self.spent_nothing.lines], c.why))

    @property
    def earn(self):
        """Points earned when no points are spent."""
        return self.spent_nothing.earn

    def at(self, spend):
        """This receipt priced with `spend` points (0..max_spend)."""
        if type(spend) is not int or not 0 <= spend <= self.max_spend:
            raise SpendError([Problem("spend", f"must be from 0 to {self.max_spend}")])
        if spend == 0:
            return self.spent_nothing
        return _price(self._calc, spend)


def _price(c, spend):
    """Split `spend` over the payable lines and earn on the money left to pay."""
    plan, dues, weights = c.plan, c.dues, c.pay_weights
    n = len(dues)
    if spend:
        payable = sum(weights)
        points = split(spend, weights, payable)
        covered = split(spend * c.point_value, weights, payable)
        paid = [d - x for d, x in zip(dues, covered)]
    else:
        points, paid = [0] * n, dues
    paid_total = sum(paid)
    rnd, scale = plan.round, plan.scale
    if not c.earns:
        earned, earn = [0] * n, 0
    elif plan.per_line:
        earned = [rnd(p * k, scale) for p, k in zip(paid, c.rates)]
        earn = sum(earned)
    else:
        exact = [p * k for p, k in zip(paid, c.rates)]
        whole = sum(exact)
        earn = rnd(whole, scale)
        earned = split(earn, exact, whole)
    if c.referral_bp and paid_total:
        referral = rnd(paid_total * c.referral_bp, BASIS * c.point_value)
        shares = split(referral, paid, paid_total)
    else:
        referral, shares = 0, [0] * n
    return Priced(spend, paid_total, earn, referral,
                  tuple(map(LinePrice, c.numbers, points, paid, earned, shares)))


def _discounts(v, plan, member, tier, gross, base):
    """The discounts applied (Reasons, best first) and the ones that lost."""
    competing, additive = [], []
    if tier is not None and plan.tiers[tier].discount_bp:
        competing.append((f"tier:{tier}", base * plan.tiers[tier].discount_bp // BASIS))
    if member.newcomer and v.referral is not None and v.referral.newcomer_discount_bp:
        competing.append(("referral:newcomer",
                          base * v.referral.newcomer_discount_bp // BASIS))
    for o in v.discounts.offers:
        if (gross < o.min_receipt or (o.tiers and tier not in o.tiers)
                or (o.regular and not member.regular)
                or (o.newcomer and not member.newcomer)):
            continue
        amount = base * o.percent_bp // BASIS if o.percent_bp else min(o.amount, base)
        (additive if o.additive else competing).append((o.name, amount))
    best = None
    for i, (name, amount) in enumerate(competing):
        if amount and (best is None or amount > competing[best][1]):
            best = i
    lost = [Reason(Why.DISCOUNT_NOT_BEST, name, amount)
            for i, (name, amount) in enumerate(competing) if i != best and amount]
    chosen = ([(Why.BEST_DISCOUNT, competing[best])] if best is not None else []) + [
        (Why.ADDITIVE_DISCOUNT, a) for a in additive]
    applied, left = [], base
    for code, (name, amount) in chosen:
        amount = min(amount, left)
        if amount:
            left -= amount
            applied.append(Reason(code, name, amount))
    return applied, lost


def quote(program, receipt, member, now):
    """Price `receipt` for `member` at the version in force at its business
    time, with no points spent; `Quote.at(spend)` prices a chosen spend.
    ReceiptError or MemberError (every problem, each naming its field) on
    bad input. Writes nothing."""
    v = check_receipt(receipt, program, now)
    check_member(member)
    plan = _plan(v)
    bt = receipt.business_time
    reasons = []
    tier = member.tier
    if tier is not None and tier not in plan.tiers:
        reasons.append(Reason(Why.TIER_UNKNOWN, tier))
        tier = None

    lines = receipt.lines
    line_class = plan.line_class
    classes = [line_class(line.category, line.flags if type(line.flags) is tuple
                          else tuple(line.flags), tier) for line in lines]
    totals = [line.total for line in lines]
    gross = sum(totals)

    # 1. discounts, on the lines that take them
    weights = [t if c[1] else 0 for t, c in zip(totals, classes)]
    base = sum(weights)
    applied, lost = _discounts(v, plan, member, tier, gross, base)
    reasons += lost
    discount = sum(r.amount for r in applied)
    off = split(discount, weights, base)

    # 2. the member's coupon, on what those lines still cost
    coupon, held = 0, member.coupon
    if held is not None:
        weights = [w - d for w, d in zip(weights, off)]
        left = sum(weights)
        if bt < held.usable_from:
            reasons.append(Reason(Why.COUPON_NOT_YET_USABLE, held.code))
        elif bt >= held.expires_at:
            reasons.append(Reason(Why.COUPON_EXPIRED, held.code))
        elif not left:
            reasons.append(Reason(Why.COUPON_NOTHING_TO_COVER, held.code))
        else:
            coupon = min(held.value, left)
            reasons.append(Reason(Why.COUPON_REDEEMED, held.code, coupon))
    coupon_off = split(coupon, weights, None) if coupon else [0] * len(lines)
    dues = [t - d - c for t, d, c in zip(totals, off, coupon_off)]
    due = gross - discount - coupon

    # 3. what points may pay
    payable_lines = [c[2] for c in classes]
    pay_weights = [d if ok else 0 for d, ok in zip(dues, payable_lines)]
    payable = sum(pay_weights)
    max_spend, min_spend, bound, limits = _spend_limits(v, member, due, payable)

    activates_at, expires_at = plan.lot_times("purchase", bt, program)
    earns = expires_at > now
    if not earns:
        reasons.append(Reason(Why.EXPIRED_ON_ARRIVAL))
    coupon_earned = _coupon_earned(v.coupon, held, coupon, due, bt, program, reasons)
    referral_bp, referral_times = 0, None
    r = v.referral
    if (r is not None and r.referrer_share_bp and member.referrer
            and member.enrolled_at is not None
            and member.enrolled_at <= bt < member.enrolled_at + r.window_days * DAY):
        referral_times = plan.lot_times("referral", bt, program)
        if referral_times[1] > now:
            referral_bp = r.referrer_share_bp

    calc = _Calc(plan, v.point_value, [line.number for line in lines], totals, off,
                 coupon_off, dues, payable_lines, pay_weights, [c[0] for c in classes],
                 [c[3] for c in classes], earns, referral_bp, referral_times)
    return Quote(receipt, member, now, v, _partner(program, receipt.store), gross,
                 discount, coupon, due, payable, tuple(applied), max_spend, min_spend,
                 bound, limits, activates_at, expires_at, coupon_earned, tuple(reasons),
                 calc)


def _coupon_earned(terms, held, redeemed, due, bt, program, reasons):
    """The coupon this purchase earns, if any (`reasons` says why not)."""
    if terms is None or due < terms.threshold:
        return None
    holds = held is not None and bt < held.expires_at and not redeemed
    if terms.one_per_customer and holds:
        reasons.append(Reason(Why.COUPON_ALREADY_HELD, held.code))
        return None
    until = (bt + terms.valid_days * DAY if terms.valid_days is not None
             else add_months(bt, terms.valid_months, program.zone))
    reasons.append(Reason(Why.COUPON_EARNED, "", terms.value))
    return CouponTerms(terms.value, bt + terms.usable_after_days * DAY, until)


def _partner(program, store):
    if not program.stores:
        return 0
    return program.store[store].partner


def _spend_limits(v, member, due, payable):
    """(max_spend, min_spend, the bound, every limit as a Reason)."""
    s = v.spend
    balance = member.available + member.held
    cap = payable * s.cap_bp // (BASIS * v.point_value)
    limits = [Reason(Why.CAP, "", cap), Reason(Why.BALANCE, "", balance)]
    gate = None
    if s.min_receipt:
        limits.append(Reason(Why.MIN_RECEIPT, "", s.min_receipt))
        if due < s.min_receipt:
            gate = Why.MIN_RECEIPT
    if s.min_balance:
        limits.append(Reason(Why.MIN_BALANCE, "", s.min_balance))
        if balance < s.min_balance and gate is None:
            gate = Why.MIN_BALANCE
    if s.min_points:
        limits.append(Reason(Why.MIN_POINTS, "", s.min_points))
    if gate is not None:
        return 0, 0, gate, tuple(limits)
    if not payable:
        return 0, 0, Why.NOTHING_PAYABLE, tuple(limits)
    most, bound = (cap, Why.CAP) if cap <= balance else (balance, Why.BALANCE)
    if most and most < s.min_points:
        return 0, 0, Why.MIN_POINTS, tuple(limits)
    return most, s.min_points if most else 0, bound, tuple(limits)


# --- settlement ----------------------------------------------------------------

class CouponIssue(NamedTuple):
    op_id: str
    value: int
    usable_from: int
    expires_at: int


class CouponRedemption(NamedTuple):
    op_id: str
    code: str
    amount: int      # money it took off this receipt (at most its value)


SUFFIXES = ("/capture", "/referral", "/coupon-issue", "/coupon-redeem")


@dataclass(frozen=True, eq=False)
class Settlement:
    """A checkout, priced: the ledger operations and what a refund needs.

    `batch` holds the CAPTURE (spend and earn as one operation; with no
    points either way it still records the receipt's money, a visit; empty
    only for a receipt with no money, no points and no hold, which the
    kernel refuses; `allocation.capture` is then None).
    `after` holds the referrer's EARN: apply it only once the capture (if
    any) succeeded, since the kernel applies a batch's operations
    independently and a refused capture must not leave the referrer paid.

    The kernel has no coupon operation yet, so coupons issued and redeemed
    are data here (`coupon_issue`, `coupon_redemption`) for the caller to
    record, under their op ids, once the capture is committed. A refund does
    not take an earned coupon back (nothing to reverse it with yet)."""
    quote: Quote
    priced: Priced
    batch: Batch
    after: Batch
    allocation: Allocation
    coupon_issue: CouponIssue | None
    coupon_redemption: CouponRedemption | None

    @property
    def spend(self):
        return self.priced.spend

    @property
    def earn(self):
        return self.priced.earn

    @property
    def paid(self):
        return self.priced.paid

    @property
    def referral(self):
        return self.priced.referral


def settle(program, receipt, member, spend, now, op_id_prefix, *, hold=None):
    """The kernel operations for a checkout spending `spend` points, priced
    exactly as `quote` (the same code) prices them. `hold` is the op id of
    the hold placed for this receipt (`member.held` its points), or None to
    spend directly. SpendError naming `spend`, `hold` or `op_id_prefix`
    when the request does not fit the receipt."""
    return settle_quote(quote(program, receipt, member, now), spend, op_id_prefix,
                        hold=hold)


def settle_quote(q, spend, op_id_prefix, *, hold=None, annotate=None):
    """`settle` for a quote already in hand (same process, same inputs).

    `annotate(allocation, referral)`, when given, returns the data the
    capture carries into the ledger (a server keeps there what refunds and
    retries need); `referral` is the referrer's EARN as plain data, or None."""
    member, receipt, v = q.member, q.receipt, q.version
    problems = []
    if type(spend) is not int or spend < 0:
        problems.append(Problem("spend", "must be a whole number of points, not negative"))
    elif spend > q.max_spend:
        problems.append(Problem("spend", f"{spend} is above the most this receipt may "
                                         f"spend, {q.max_spend} ({q.spend_bound})"))
    elif 0 < spend < q.min_spend:
        problems.append(Problem("spend", f"{spend} is below the fewest points that may "
                                         f"be spent at once, {q.min_spend}"))
    elif hold is not None and spend > member.held:
        problems.append(Problem("spend", f"{spend} is more than the {member.held} "
                                         f"points held"))
    elif hold is None and spend > member.available:
        problems.append(Problem("spend", f"{spend} is more than the {member.available} "
                                         f"points available; the rest is held, so "
                                         f"settle with the hold"))
    if hold is not None and (not isinstance(hold, (str, bytes)) or not hold
                             or len(_bytes(hold)) > MAX_OP_ID):
        problems.append(Problem("hold", "must be the hold's operation id"))
    if not isinstance(op_id_prefix, str) or not op_id_prefix:
        problems.append(Problem("op_id_prefix", "must be a non-empty string"))
    elif len((op_id_prefix + max(SUFFIXES, key=len)).encode()) > MAX_OP_ID:
        problems.append(Problem("op_id_prefix", f"is too long: operation ids are at "
                                                f"most {MAX_OP_ID} bytes"))
    if problems:
        raise SpendError(problems)
    if not member.account and not member.card and hold is None:
        raise MemberError([Problem("account", "settling needs the member's account "
                                              "or card")])

    priced = q.at(spend)
    bt, capture = receipt.business_time, op_id_prefix + "/capture"
    if not (hold is not None or spend or priced.earn or priced.paid):
        capture = None  # no money, no points, no hold: nothing to record
    after, referral_op, referral = Batch(), None, None
    if priced.referral:
        referral_op = op_id_prefix + "/referral"
        activates_at, expires_at = q._calc.referral_times
        # a bonus, not the referrer's receipt: no money (no visit of theirs)
        referral = {"op": referral_op, "account": member.referrer,
                    "points": priced.referral, "act": activates_at, "exp": expires_at,
                    "partner": q.partner, "version": v.number, "bt": bt,
                    "store": receipt.store, "lane": receipt.lane}
        after.earn(referral_op, member.referrer, priced.referral,
                   activates_at=activates_at, expires_at=expires_at,
                   partner=q.partner, version=v.number, business_time=bt,
                   store=receipt.store, lane=receipt.lane)
    c, lines = q._calc, priced.lines
    allocation = Allocation(capture, referral_op, v.number, tuple(map(
        LineShare, c.numbers, [line.quantity for line in receipt.lines],
        [d + k for d, k in zip(c.discounts, c.coupons)], [p.spent for p in lines],
        [p.earn for p in lines], [p.paid for p in lines], [p.referral for p in lines])))
    batch = Batch()
    if capture is not None:
        # with no points either way it still records the visit and its money
        batch.capture(capture, member.account, hold=hold or b"", spend=spend,
                      earn=priced.earn, activates_at=q.activates_at,
                      expires_at=q.expires_at, money=priced.paid, partner=q.partner,
                      version=v.number, business_time=bt, card=member.card,
                      store=receipt.store, lane=receipt.lane,
                      data=annotate(allocation, referral) if annotate else b"")
    issue = redemption = None
    if q.coupon_earned is not None:
        issue = CouponIssue(op_id_prefix + "/coupon-issue", *q.coupon_earned)
    if q.coupon:
        redemption = CouponRedemption(op_id_prefix + "/coupon-redeem",
                                      member.coupon.code, q.coupon)
    return Settlement(q, priced, batch, after, allocation, issue, redemption)


def _bytes(value):
    return value.encode() if isinstance(value, str) else value
