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
spends and earns at once; the member's coupon redeemed, chained to it; the
coupon it earns; the referrer's EARN), and the per-line `Allocation` that
refunds of single lines are computed from (`refund_lines`, in allocation.py).

Earned points activate `activation_days` after the business time and expire
by the program's lifetime rules for purchases (lifetimes.py); points that
would already have expired by `now` (a sale uploaded long after its
end-of-day expiry) are not earned at all, as the kernel would refuse them.

Per-line figures are NamedTuples rather than dataclasses: a checkout prices
thousands of receipts a second, and tuples are several times cheaper to
build. The per-version precomputation (`_Plan`) is kept by version object.

The engine is compiled (core/_pricing.pyx, built as `kopilka.core._pricing`
by setup.py): `quote` and `settle_quote` ask it first, and it prices every
receipt its quick checks find good, with the per-line loops over C arrays;
anything in doubt it leaves to the Python code here (`_quote`,
`_settle_quote`, `_Lines`), which is its twin and the reference: the same
rules, step by step, and the same results, which tests/test_pricing_twin.py
checks figure for figure. Without the build, the Python code does it all;
`use("python")` makes it do so in a process that has the build.
"""

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from .allocation import (Allocation, LineShare, Refund, refund_lines,
                         refund_referral, split)
from .batch import Batch
from .lifetimes import add_months, lot_times, period_bounds
from .program import BASIS, EPOCH, Problem, Version, per_version
from . import receipt as _receipt
from .receipt import (CLOCK_SKEW, DAY, INT64_MAX, Line, Member, MemberCoupon, MemberError,
                      PricingError, Receipt, ReceiptError, SpendError, _pricing,
                      _quick_header, check_member, check_receipt, member_fine,
                      quick_lines)
from .records import (COUPON_ONE_PER_CUSTOMER, LINKED, MAX_DATA, MAX_OP_ID, NEVER, OP,
                      Kind)

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
    memos of what a kind of line is (by tier, category and flags) and of
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

        self.point_value = pv
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
        self.categories = frozenset(v.items.categories)
        self.flags = frozenset(v.items.flags)
        self.round = ROUND[v.earn.rounding]
        self.per_line = v.earn.rounding_scope == "line"
        # what the compiled Lines reads of the plan, at once
        self.figures = (self.scale, pv, ("down", "up", "half_up").index(v.earn.rounding),
                        self.per_line)
        self.lifetimes = {kind: v.lifetime.for_kind(kind) for kind in ("purchase", "referral")}
        # The compiled per-line loops hold rates, the scale and money times
        # the point value in 128-bit integers: true of any real program.
        numerators = ([self.base[0]] + [x[0] for x in self.category.values()]
                      + [x[0] for x in self.tier_rate.values()])
        self.small = self.scale < 1 << 62 and max(numerators) < 1 << 62 and pv < 1 << 40
        self._classes = {}      # tier -> category -> flags -> line class
        self._class_count = 0
        self._periods = {}
        self._until = {}
        # what the compiled quote reads of the version, gathered once
        self.rules = _pricing.Rules(self, v) if _pricing is not None and self.small else None

    def classes(self, tier):
        """The memo of line classes for a member of `tier` (a valid tier or
        None): {category: {flags: (rate numerator, takes discounts, payable
        by points, reasons)}}; `new_class` adds to it. The same few kinds of
        line recur on every receipt."""
        found = self._classes.get(tier)
        if found is None:
            found = self._classes[tier] = {}
        return found

    def new_class(self, tier, category, flags, checked):
        """The class of a line not yet in `classes(tier)`, remembered there;
        or None when `checked` is false and the category or flags are not
        the version's vocabulary (or the flags repeat), which the full
        receipt check then names. Only valid lines are ever remembered, so a
        line found in the memo has a known category and known flags."""
        if not checked:
            try:
                if not (category in self.categories and self.flags.issuperset(flags)
                        and len(set(flags)) == len(flags)):
                    return None
            except TypeError:   # an unhashable flag
                return None
        if self._class_count >= 4096:
            self._classes.clear()
            self._class_count = 0
        found = self._classify(category, flags, tier)
        self.classes(tier).setdefault(category, {})[flags] = found
        self._class_count += 1
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

    def coupon_until(self, t, months, program):
        """`add_months(t, months, zone)`: when a coupon earned at `t` expires.
        Remembered by business time, as a checkout prices its receipt twice
        (the quote the POS shows, then the settlement)."""
        key = (t, months, program.time_zone)
        found = self._until.get(key)
        if found is None:
            if len(self._until) >= 256:
                self._until.clear()
            found = self._until[key] = add_months(t, months, program.zone)
        return found


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


class _Lines:
    """A quote's per-line figures and the loops over them: reading and
    classifying the lines (with the receipt check's quick pass), spreading
    the discounts and the coupon, pricing a spend, and the per-line tuples.

    This is the pure-Python twin of the compiled `_pricing.Lines` (the same
    steps, the same results, which the property tests hold them to), used
    by `_quote`: when that is not built, for input the compiled quote's quick
    checks doubt, and for a program whose rates or point value it cannot hold
    in its 128-bit integers (`_Plan.small`)."""

    __slots__ = ("plan", "point_value", "earns", "referral_bp", "referral_times",
                 "numbers", "quantities", "totals", "takes", "discounts", "coupons",
                 "dues", "payable", "pay_weights", "rates", "why")

    def __init__(self, plan):
        self.plan = plan
        self.point_value = plan.point_value
        self.earns = True            # False when the points would expire on arrival
        self.referral_bp = 0         # the referrer's share, when one earns
        self.referral_times = None   # (activates_at, expires_at) of the referrer's points

    def scan(self, lines, tier, checked):
        """Reads and classifies the lines for a member of `tier`: (the
        receipt's total, the part of it that takes discounts). Unless
        `checked` (the receipt passed `check_receipt`), it is also the
        receipt check's quick pass over the lines, returning None when in
        doubt (the full check decides)."""
        plan = self.plan
        classes = plan.classes(tier)
        numbers, quantities, totals, found = [], [], [], []
        seen = set()
        gross = base = 0
        for line in lines:
            if checked:
                number, q, amount, category, f = (line.number, line.quantity, line.total,
                                                  line.category, line.flags)
                if type(f) is not tuple:
                    f = tuple(f)
            else:
                if type(line) is not Line:
                    return None
                number, q, p, amount, sku, category, f = (
                    line.number, line.quantity, line.unit_price, line.total, line.sku,
                    line.category, line.flags)
                if not (type(number) is int and number >= 1 and number not in seen
                        and type(q) is int and type(p) is int and type(amount) is int
                        and 0 < q <= INT64_MAX and 0 <= p <= INT64_MAX
                        and amount == q * p and amount <= INT64_MAX
                        and type(sku) is str and sku and not sku.isspace()
                        and type(category) is str and type(f) is tuple):
                    return None
                seen.add(number)
            try:
                kind = classes[category][f]
            except (KeyError, TypeError):   # new, or not valid (TypeError: unhashable)
                kind = plan.new_class(tier, category, f, checked)
                if kind is None:
                    return None
            numbers.append(number)
            quantities.append(q)
            totals.append(amount)
            found.append(kind)
            gross += amount
            if kind[1]:
                base += amount
        if not checked and gross > INT64_MAX:
            return None
        self.numbers, self.quantities, self.totals = numbers, quantities, totals
        self.rates = [k[0] for k in found]
        self.takes = [k[1] for k in found]
        self.payable = [k[2] for k in found]
        self.why = [k[3] for k in found]
        return gross, base

    def spread(self, discount, coupon):
        """Splits `discount` over the lines that take discounts, then
        `coupon` over what they still cost; returns the part of what is left
        to pay that points may pay for."""
        totals = self.totals
        weights = [t if ok else 0 for t, ok in zip(totals, self.takes)]
        off = split(discount, weights)
        if coupon:
            coupon_off = split(coupon, [w - d for w, d in zip(weights, off)])
        else:
            coupon_off = [0] * len(totals)
        dues = [t - d - c for t, d, c in zip(totals, off, coupon_off)]
        pay_weights = [d if ok else 0 for d, ok in zip(dues, self.payable)]
        self.discounts, self.coupons, self.dues = off, coupon_off, dues
        self.pay_weights = pay_weights
        return sum(pay_weights)

    def price(self, spend):
        """Priced: `spend` points split over the payable lines in proportion
        to what each still costs, and earning on the money actually paid."""
        plan, dues, weights = self.plan, self.dues, self.pay_weights
        n = len(dues)
        if spend:
            payable = sum(weights)
            points = split(spend, weights, payable)
            covered = split(spend * self.point_value, weights, payable)
            paid = [d - x for d, x in zip(dues, covered)]
        else:
            points, paid = [0] * n, dues
        paid_total = sum(paid)
        rnd, scale = plan.round, plan.scale
        if not self.earns:
            earned, earn = [0] * n, 0
        elif plan.per_line:
            earned = [rnd(p * k, scale) for p, k in zip(paid, self.rates)]
            earn = sum(earned)
        else:
            exact = [p * k for p, k in zip(paid, self.rates)]
            whole = sum(exact)
            earn = rnd(whole, scale)
            earned = split(earn, exact, whole)
        if self.referral_bp and paid_total:
            referral = rnd(paid_total * self.referral_bp, BASIS * self.point_value)
            shares = split(referral, paid, paid_total)
        else:
            referral, shares = 0, [0] * n
        return Priced(spend, paid_total, earn, referral,
                      tuple(map(LinePrice, self.numbers, points, paid, earned, shares)))

    def line_quotes(self, priced):
        """LineQuote per line; `priced` (no points spent) gives their earn."""
        return tuple(map(LineQuote, self.numbers, self.totals, self.discounts,
                         self.coupons, self.dues, self.payable,
                         [p.earn for p in priced.lines], self.why))

    def shares(self, priced):
        """LineShare per line of the receipt settled as `priced`."""
        lines = priced.lines
        return tuple(map(LineShare, self.numbers, self.quantities,
                         [d + k for d, k in zip(self.discounts, self.coupons)],
                         [p.spent for p in lines], [p.earn for p in lines],
                         [p.paid for p in lines], [p.referral for p in lines]))


class _once:
    """A value worked out on first use and kept in the instance (as
    functools.cached_property, which in Python 3.11 takes a lock each time)."""

    def __init__(self, work):
        self.work, self.__doc__ = work, work.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.work(instance)
        return value


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
    _calc: _Lines = field(repr=False)   # or the compiled _pricing.Lines

    # Worked out when first asked for: `settle` needs neither.
    @_once
    def spent_nothing(self):
        """The receipt priced with no points spent."""
        return self._calc.price(0)

    @_once
    def lines(self):
        """LineQuote per line, in receipt order (earn: with no points spent)."""
        return self._calc.line_quotes(self.spent_nothing)

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
        return self._calc.price(spend)


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
    if _compiled is not None:
        q = _compiled.quote(program, receipt, member, now)
        if q is not None:
            return q
    return _quote(program, receipt, member, now)


def _quote(program, receipt, member, now):
    """`quote` in Python: the twin of `_pricing.quote`, which answers None
    (then this runs) for input its quick checks doubt."""
    # The checks' quick passes first (the lines' one is part of reading
    # them); anything they doubt goes through the full checks.
    v = _quick_header(receipt, program, now)
    found = None
    if v is not None and member_fine(member):
        plan = _plan(v)
        tier = member.tier
        known = tier is None or tier in plan.tiers
        c = _Lines(plan)
        found = c.scan(receipt.lines, tier if known else None, False)
    if found is None:
        v = check_receipt(receipt, program, now)
        check_member(member)
        plan = _plan(v)
        tier = member.tier
        known = tier is None or tier in plan.tiers
        c = _Lines(plan)
        found = c.scan(receipt.lines, tier if known else None, True)
    gross, base = found
    if known:
        reasons = []
    else:
        reasons = [Reason(Why.TIER_UNKNOWN, tier)]
        tier = None
    bt = receipt.business_time

    # 1. discounts, on the lines that take them
    applied, lost = _discounts(v, plan, member, tier, gross, base)
    if lost:
        reasons += lost
    discount = sum(r.amount for r in applied)

    # 2. the member's coupon, on what those lines still cost
    coupon, held = 0, member.coupon
    if held is not None:
        left = base - discount
        if bt < held.usable_from:
            reasons.append(Reason(Why.COUPON_NOT_YET_USABLE, held.code))
        elif bt >= held.expires_at:
            reasons.append(Reason(Why.COUPON_EXPIRED, held.code))
        elif not left:
            reasons.append(Reason(Why.COUPON_NOTHING_TO_COVER, held.code))
        else:
            coupon = min(held.value, left)
            reasons.append(Reason(Why.COUPON_REDEEMED, held.code, coupon))
    payable = c.spread(discount, coupon)
    due = gross - discount - coupon

    # 3. what points may pay
    max_spend, min_spend, bound, limits = _spend_limits(v, member, due, payable)

    activates_at, expires_at = plan.lot_times("purchase", bt, program)
    if expires_at <= now:
        c.earns = False
        reasons.append(Reason(Why.EXPIRED_ON_ARRIVAL))
    coupon_earned = _coupon_earned(v.coupon, held, coupon, due, bt, program, plan,
                                   reasons)
    r = v.referral
    if (r is not None and r.referrer_share_bp and member.referrer
            and member.enrolled_at is not None
            and member.enrolled_at <= bt < member.enrolled_at + r.window_days * DAY):
        c.referral_times = plan.lot_times("referral", bt, program)
        if c.referral_times[1] > now:
            c.referral_bp = r.referrer_share_bp

    return Quote(receipt, member, now, v, _partner(program, receipt.store), gross,
                 discount, coupon, due, payable, tuple(applied), max_spend, min_spend,
                 bound, limits, activates_at, expires_at, coupon_earned, tuple(reasons),
                 c)


def _coupon_earned(terms, held, redeemed, due, bt, program, plan, reasons):
    """The coupon this purchase earns, if any (`reasons` says why not)."""
    if terms is None or due < terms.threshold:
        return None
    holds = held is not None and bt < held.expires_at and not redeemed
    if terms.one_per_customer and holds:
        reasons.append(Reason(Why.COUPON_ALREADY_HELD, held.code))
        return None
    until = (bt + terms.valid_days * DAY if terms.valid_days is not None
             else plan.coupon_until(bt, terms.valid_months, program))
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

    `batch` also holds the coupon operations (`_coupon_ops`):
    `coupon_redemption` (REDEEM_COUPON, chained to the capture) and
    `coupon_issue` (ISSUE_COUPON naming the capture), whose ids and figures
    these are. A receipt its coupon pays in full has no capture: its batch
    is the redemption alone, carrying the annotation."""
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

    `annotate(allocation, referral)`, when given, returns the data (bytes)
    the capture carries into the ledger (a server keeps there what refunds
    and retries need); `referral` is the referrer's EARN as plain data, or
    None. It must have no side effects: when the compiled engine cannot
    encode what it returned, the Python one calls it again."""
    if _compiled is not None:
        s = _compiled.settle_quote(q, spend, op_id_prefix, hold, annotate)
        if s is not None:
            return s
    return _settle_quote(q, spend, op_id_prefix, hold, annotate)


def _settle_quote(q, spend, op_id_prefix, hold, annotate):
    """`settle_quote` in Python: the twin of `_pricing.settle_quote`, which
    answers None (then this runs, and names the problems) for a request its
    quick checks doubt."""
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
    allocation = Allocation(capture, referral_op, v.number, q._calc.shares(priced))
    batch = Batch()
    data = (annotate(allocation, referral)
            if annotate and (capture is not None or q.coupon) else b"")
    if capture is not None:
        # with no points either way it still records the visit and its money
        batch.capture(capture, member.account, hold=hold or b"", spend=spend,
                      earn=priced.earn, activates_at=q.activates_at,
                      expires_at=q.expires_at, money=priced.paid, partner=q.partner,
                      version=v.number, business_time=bt, card=member.card,
                      store=receipt.store, lane=receipt.lane, data=data)
    issue, redemption = _coupon_ops(batch, q, capture, op_id_prefix, data)
    return Settlement(q, priced, batch, after, allocation, issue, redemption)


def _coupon_ops(batch, q, capture, prefix, data):
    """Adds a settlement's coupon operations after its capture (the
    compiled engine encodes the same in `_pricing.settlement`): the member's coupon redeemed, chained to the
    capture so that a coupon redeemed meanwhile (another till) refuses the
    capture too; then the coupon this purchase earns, naming the capture
    but not chained to it (held meanwhile, the purchase stands and earns
    none). Without a capture (the coupon paid the receipt in full) the
    redemption carries `data`. Returns (CouponIssue, CouponRedemption),
    each None when there is none."""
    member, receipt, v = q.member, q.receipt, q.version
    where = dict(partner=q.partner, version=v.number,
                 business_time=receipt.business_time, card=member.card,
                 store=receipt.store, lane=receipt.lane)
    issue = redemption = None
    if q.coupon:
        redemption = CouponRedemption(prefix + "/coupon-redeem", member.coupon.code,
                                      q.coupon)
        if capture is not None:
            batch.link()
        batch.redeem_coupon(redemption.op_id, member.account, member.coupon.number,
                            q.coupon, receipt=capture or b"",
                            data=b"" if capture is not None else data, **where)
    if q.coupon_earned is not None:
        issue = CouponIssue(prefix + "/coupon-issue", *q.coupon_earned)
        batch.issue_coupon(issue.op_id, member.account, issue.value,
                           usable_from=issue.usable_from, expires_at=issue.expires_at,
                           one_per_customer=v.coupon.one_per_customer,
                           receipt=capture, **where)
    return issue, redemption


def _bytes(value):
    return value.encode() if isinstance(value, str) else value


# --- the compiled twin ----------------------------------------------------------

if _pricing is not None:
    _pricing.bind(Receipt=Receipt, Member=Member, MemberCoupon=MemberCoupon,
                  LineQuote=LineQuote, LinePrice=LinePrice, Priced=Priced,
                  LineShare=LineShare, Reason=Reason, CouponTerms=CouponTerms,
                  CouponIssue=CouponIssue, CouponRedemption=CouponRedemption,
                  Quote=Quote, Settlement=Settlement, Allocation=Allocation,
                  Batch=Batch, plan=_plan, split=split, Why=Why, DAY=DAY,
                  CLOCK_SKEW=CLOCK_SKEW, BASIS=BASIS, MAX_OP_ID=MAX_OP_ID,
                  SUFFIXES=SUFFIXES, NEVER=NEVER, EPOCH=EPOCH, OP=OP, Kind=Kind,
                  LINKED=LINKED, COUPON_ONE_PER_CUSTOMER=COUPON_ONE_PER_CUSTOMER,
                  MAX_DATA=MAX_DATA)
_compiled = _pricing   # the module `quote` and `settle_quote` ask first, or None
# What `use` accepts here: "compiled" only when it is built.
IMPLEMENTATIONS = ("compiled", "python") if _pricing is not None else ("python",)


def use(implementation):
    """Price with the compiled engine (`"compiled"`, the default when
    `kopilka.core._pricing` is built) or its pure-Python twin (`"python"`)
    in this process; returns the one in use before. For the tests and
    benchmarks that hold the two to the same results."""
    global _compiled
    previous = "python" if _compiled is None else "compiled"
    if implementation == "compiled":
        if _pricing is None:
            raise RuntimeError("kopilka.core._pricing is not built "
                               "(setup.py build_ext --inplace)")
        _compiled, _receipt._quick_lines = _pricing, _pricing.quick_lines
    elif implementation == "python":
        _compiled, _receipt._quick_lines = None, quick_lines
    else:
        raise ValueError(f"implementation is 'compiled' or 'python', not {implementation!r}")
    return previous
