"""The compiled pricing engine (kopilka.core._pricing) against its
pure-Python twin (core/pricing.py, core/receipt.py): for random programs
using every rule, receipts and members, good and bad, both must give the
same quote (every field, every line, every reason), the same price at every
spend, the same settlement (the kernel batches byte for byte, the coupons,
what `annotate` is handed) and the same allocation; or both must refuse
the input with the same problems.

test_pricing.py runs each of its tests on both as well; this file is the
figure-for-figure comparison, over a wider space of programs and inputs
(coalition stores, several versions, every kind of expiry, rounding per
line, money near 2**63, programs whose rates the compiled engine leaves to
the twin).
"""

import dataclasses
import hashlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kopilka.core import pricing, receipt as receipt_module
from kopilka.core.pricing import (Line, Member, MemberCoupon, PricingError, Receipt,
                                  quote, settle_quote)
from kopilka.core.program import ProgramError, parse_program
from test_pricing import V1, doubtful_receipts, small

pytestmark = pytest.mark.skipif("compiled" not in pricing.IMPLEMENTATIONS,
                                reason="kopilka.core._pricing is not built")

DAY = 86_400_000_000
INT64_MAX = (1 << 63) - 1
CATEGORIES = ["a", "b", "c", "d"]
FLAGS = ["f1", "f2", "f3", "f4"]
TIERS = ["t0", "t1", "t2"]
CASES = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def on(implementation, work):
    """work() priced by `implementation`: ("ok", value) or ("refused", the
    error's type and problems)."""
    previous = pricing.use(implementation)
    try:
        return "ok", work()
    except PricingError as e:
        return "refused", type(e), e.problems
    finally:
        pricing.use(previous)


def both(work):
    compiled, python = on("compiled", work), on("python", work)
    assert compiled == python
    return compiled


# --- what is compared --------------------------------------------------------------

def quote_figures(q, spends):
    """Everything a quote says, and its prices at `spends`."""
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name != "_calc"}
    return fields, q.lines, q.spent_nothing, q.earn, [q.at(s) for s in spends]


def settlement_figures(s, annotated):
    return (s.priced, s.spend, s.earn, s.paid, s.referral, bytes(s.batch), len(s.batch),
            bytes(s.after), len(s.after), s.allocation, s.allocation.to_dict(),
            s.coupon_issue, s.coupon_redemption, annotated)


def every_spend(q, limit=120):
    """0..max_spend when few, else both ends, the minimum and a spread."""
    top = q.max_spend
    if top <= limit:
        return list(range(top + 1))
    step = top // limit
    return sorted({0, 1, q.min_spend, top - 1, top, *range(0, top + 1, step)})


# --- programs, receipts, members ---------------------------------------------------

@st.composite
def programs(draw):
    pv = draw(st.sampled_from([1, 7, 100, 1000] * 3 + [1 << 41]))   # 1 << 41: left to the twin

    def rate():
        if draw(st.booleans()):
            return {"percent_bp": draw(st.integers(0, 10_000))}
        per = draw(st.sampled_from([(1 << 61) - 1, (1 << 31) - 1, 10 ** 12])
                   if draw(st.sampled_from([False] * 9 + [True])) else st.integers(1, 50_000))
        return {"points": draw(st.integers(0, per // pv)), "per": per}

    def subset(names, most=2):
        return draw(st.lists(st.sampled_from(names), unique=True, max_size=most))

    def lifetime():
        activation = draw(st.integers(0, 3))
        kind = draw(st.sampled_from(["never", "days", "end_of"]))
        if kind == "never":
            expiry = "never"
        elif kind == "days":
            expiry = {"days": draw(st.integers(activation + 1, 400))}
        else:
            end_of = draw(st.sampled_from(["day", "month", "quarter", "year"]))
            later = draw(st.integers(0, 2)) + (1 if activation else 0) \
                + (activation if end_of == "day" else 0)
            expiry = {"end_of": end_of, "periods_later": later}
        return {"activation_days": activation, "expiry": expiry}

    def offer():
        when = {}
        if draw(st.booleans()):
            when["regular"] = True
        if draw(st.booleans()):
            when["newcomer"] = True
        if draw(st.booleans()):
            when["tiers"] = subset(TIERS[1:], 2) or ["t1"]
        return {**({"percent_bp": draw(st.integers(1, 10_000))} if draw(st.booleans())
                   else {"amount": draw(st.sampled_from([1, 999, 100_000, 10 ** 19]))}),
                "additive": draw(st.booleans()),
                "min_receipt": draw(st.sampled_from([0, 50_000, 10 ** 19])),
                **({"when": when} if when else {})}

    def version(number, start):
        v = {"number": number, "effective_from": start, "point_value": pv,
             "items": {"categories": CATEGORIES, "flags": FLAGS},
             "earn": {**rate(), "rounding": draw(st.sampled_from(["down", "up", "half_up"])),
                      "rounding_scope": draw(st.sampled_from(["receipt", "line"])),
                      "exclude_flags": subset(FLAGS),
                      "categories": {c: rate() for c in subset(CATEGORIES)}},
             "spend": {"cap_bp": draw(st.sampled_from([1, 1000, 3000, 10_000])),
                       "min_points": draw(st.sampled_from([0, 0, 5, 50])),
                       "min_balance": draw(st.sampled_from([0, 0, 100])),
                       "min_receipt": draw(st.sampled_from([0, 0, 5000])),
                       "exclude_flags": subset(FLAGS),
                       "exclude_categories": subset(CATEGORIES)},
             "regular_customer": {"min_visits": 2, "within_days": 30},
             "discounts": {"exclude_flags": subset(FLAGS),
                           "offers": {f"o{k}": offer()
                                      for k in range(draw(st.integers(0, 4)))}},
             "lifetime": {**lifetime(),
                          **({"referral": lifetime()} if draw(st.booleans()) else {})}}
        if draw(st.booleans()):
            v["tiers"] = {"level": [
                {"name": "t0", "min_spend": 0},
                {"name": "t1", "min_spend": 1, **rate(),
                 "discount_bp": draw(st.integers(0, 2000))},
                {"name": "t2", "min_spend": 2, "discount_bp": draw(st.integers(0, 3000))}]}
        if draw(st.booleans()):
            v["coupon"] = {"threshold": draw(st.integers(1, 200_000)),
                           "value": draw(st.sampled_from([1, 5_000, 10 ** 19])),
                           "usable_after_days": draw(st.integers(0, 3)),
                           "one_per_customer": draw(st.booleans()),
                           **({"valid_days": draw(st.integers(1, 90))} if draw(st.booleans())
                              else {"valid_months": draw(st.integers(1, 13))})}
        if draw(st.booleans()):
            v["referral"] = {"window_days": draw(st.integers(1, 60)),
                             "newcomer_discount_bp": draw(st.integers(0, 3000)),
                             "referrer_share_bp": draw(st.integers(1, 10_000))}
        return v

    versions = [version(1, "2024-01-01T00:00:00+03:00")]
    if draw(st.booleans()):
        versions.append(version(2, "2024-03-01T00:00:00+03:00"))
    data = {"program": {"id": 1, "name": "P", "currency": "RUB",
                        "time_zone": draw(st.sampled_from(["Europe/Moscow",
                                                           "America/Santiago"]))},
            "version": versions}
    if draw(st.booleans()):   # a coalition: the store names its partner
        data["partner"] = [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}]
        data["store"] = [{"id": 1, "name": "S1", "partner": 1, "lanes": [1, 2]},
                         {"id": 2, "name": "S2", "partner": 2, "lanes": [1]}]
    try:
        return parse_program(data)
    except ProgramError:
        assume(False)


@st.composite
def lines(draw):
    n = draw(st.integers(1, 25))
    numbers = draw(st.lists(st.integers(1, 99), min_size=n, max_size=n, unique=True))
    huge = draw(st.sampled_from([False] * 9 + [True]))     # money near 2**63 in all
    out = []
    for number in numbers:
        quantity = draw(st.integers(1, 5))
        if huge:
            price = draw(st.integers(0, INT64_MAX // (quantity * n)))
        else:
            price = draw(st.one_of(st.integers(0, 300), st.integers(0, 200_000)))
        flags = tuple(draw(st.lists(st.sampled_from(FLAGS), unique=True, max_size=3)))
        out.append(Line(number, f"sku-{number}", draw(st.sampled_from(CATEGORIES)),
                        quantity, price, quantity * price, flags))
    return out


def spoil(draw, found):
    """Now and then a fault, which both must refuse (or take) alike."""
    fault = draw(st.sampled_from(["none"] * 50 + ["category", "flag", "twice", "total",
                                                  "number", "list", "flags_list",
                                                  "overflow", "sku"]))
    k = draw(st.integers(0, len(found) - 1))
    line = found[k]
    if fault == "category":
        found[k] = dataclasses.replace(line, category="zz")
    elif fault == "flag":
        found[k] = dataclasses.replace(line, flags=line.flags + (line.flags[:1] or ("f9",)))
    elif fault == "twice":
        found.append(dataclasses.replace(line, sku="again"))
    elif fault == "total":
        found[k] = dataclasses.replace(line, total=line.total + 1)
    elif fault == "number":
        found[k] = dataclasses.replace(line, number=draw(st.sampled_from([0, -1, 10 ** 20])))
    elif fault == "flags_list":
        found[k] = dataclasses.replace(line, flags=list(line.flags))
    elif fault == "overflow":
        found[k] = dataclasses.replace(line, quantity=2, unit_price=INT64_MAX // 2 + 1,
                                       total=2 * (INT64_MAX // 2 + 1))
    elif fault == "sku":
        found[k] = dataclasses.replace(line, sku=draw(st.sampled_from([" ", "\u2003", ""])))
    return fault == "list"


@st.composite
def cases(draw):
    p = draw(programs())
    found = draw(lines())
    as_list = spoil(draw, found)
    bt = draw(st.sampled_from([V1] * 4 + [V1 - 30 * DAY, V1 + 40 * DAY, V1 - 400 * DAY]))
    now = bt + draw(st.sampled_from([0] * 6 + [-60_000_000, 100 * DAY, 800 * DAY,
                                               -20 * 60_000_000]))
    r = Receipt(draw(st.sampled_from(["r-1"] * 8 + [" ", "квитанция"])),
                draw(st.sampled_from([1] * 6 + [2, 3])), draw(st.sampled_from([1] * 6 + [2])),
                bt, list(found) if as_list else tuple(found))
    coupon = None
    if draw(st.booleans()):
        coupon = MemberCoupon("C-1", draw(st.sampled_from([1, 3_000, 50_000, 10 ** 19])),
                              bt + draw(st.sampled_from([-DAY, 0, DAY])),
                              bt + draw(st.sampled_from([0, DAY, 60 * DAY])))
    balance = draw(st.one_of(st.integers(0, 100_000), st.just(10 ** 20)))
    held = draw(st.sampled_from([0, 0, 50, balance]))
    member = Member(available=balance, tier=draw(st.sampled_from([None, *TIERS, "zz"])),
                    newcomer=draw(st.booleans()), regular=draw(st.booleans()),
                    coupon=coupon, held=held,
                    account=draw(st.sampled_from([1, 1, 0])),
                    card=draw(st.sampled_from([b"", b"card-1"])),
                    referrer=draw(st.sampled_from([0, 9, 9])),
                    enrolled_at=draw(st.sampled_from([None, bt - DAY, bt - DAY, bt - 90 * DAY])))
    if draw(st.sampled_from([False] * 30 + [True])):
        member = dataclasses.replace(member, available=draw(st.sampled_from([-1, 1.5, True])))
    return p, r, member, now


def annotator():
    """An `annotate` that keeps what it is handed, and returns a digest of it."""
    seen = []

    def annotate(allocation, referral):
        seen.append((allocation, allocation.to_dict(), referral))
        return hashlib.sha256(repr(seen[-1]).encode()).digest()
    return annotate, seen


def settle_with(program, r, member, now, spend, hold, annotated, prefix="s1/l1/r-1"):
    q = quote(program, r, member, now)
    if annotated:
        annotate, seen = annotator()
        s = settle_quote(q, spend, prefix, hold=hold, annotate=annotate)
        return settlement_figures(s, seen)
    return settlement_figures(settle_quote(q, spend, prefix, hold=hold), None)


# --- the properties -------------------------------------------------------------------

@CASES
@given(cases(), st.randoms(use_true_random=False))
def test_property_compiled_and_python_price_and_settle_alike(case, rnd):
    p, r, member, now = case
    found = both(lambda: quote_figures(quote(p, r, member, now), []))
    if found[0] != "ok":
        return
    q = quote(p, r, member, now)
    # the price at every spend (or a spread of them, when there are many)
    both(lambda: quote_figures(quote(p, r, member, now), every_spend(q)))
    # settlements: any allowed spend, from a hold or not, annotated or not
    spends = [0, q.max_spend, q.min_spend, rnd.randint(0, q.max_spend)]
    for spend in dict.fromkeys(spends):
        hold = rnd.choice([None, "s1/l1/r-1/hold", b"hold"])
        annotated = rnd.random() < 0.5
        both(lambda: settle_with(p, r, member, now, spend, hold, annotated))
    # and requests the settlement must refuse, alike
    for spend, hold, prefix in [(q.max_spend + 1, None, "p"), (-1, None, "p"),
                                (1.0, None, "p"), (0, "", "p"), (0, None, ""),
                                (0, None, "x" * 120), (0, "h" * 200, "p")]:
        both(lambda: settle_with(p, r, member, now, spend, hold, False, prefix))


@settings(max_examples=500, deadline=None)
@given(doubtful_receipts())
def test_property_the_compiled_quick_check_is_the_pythons(r):
    """The receipt check's quick pass over the lines, compiled and not:
    the same verdict on receipts with a few wrong fields (and `quote`
    refuses or prices them alike)."""
    from kopilka.core._pricing import quick_lines as compiled
    p = small()
    version = p.version_at(V1)
    categories, flags = receipt_module._vocabulary(version)
    if type(r.lines) is tuple and r.lines:
        assert compiled(r.lines, categories, flags) == receipt_module.quick_lines(
            r.lines, categories, flags)
    both(lambda: quote_figures(quote(p, r, Member(available=10), V1), [0]))


def test_both_are_in_use_and_the_compiled_one_prices_the_example():
    """The switch works, and a good receipt is priced by compiled code (not
    handed to the twin), which builds the very types the twin builds."""
    from kopilka.core import _pricing
    from test_pricing import EXAMPLE, line, receipt
    from kopilka.core.program import load_program
    example = load_program(EXAMPLE)
    r = receipt(*(line(n, flags=["promo"] if n % 3 == 0 else []) for n in range(1, 21)))
    member = Member(available=500, tier="gold", account=1)
    assert pricing.use("compiled") == "compiled"
    try:
        assert _pricing.quote(example, r, member, V1) is not None
        q = quote(example, r, member, V1)
        assert type(q._calc) is _pricing.Lines
        assert type(q.lines[0]) is pricing.LineQuote and type(q.spent_nothing) is pricing.Priced
        assert pricing.use("python") == "compiled"
        assert type(quote(example, r, member, V1)._calc) is pricing._Lines
    finally:
        pricing.use("compiled")
    with pytest.raises(ValueError):
        pricing.use("cython")


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(["Europe/Moscow", "America/Santiago", "Australia/Lord_Howe",
                        "Asia/Kathmandu", "Europe/London", "UTC", "Pacific/Chatham"]),
       st.one_of(st.integers(-(10 ** 15), 3 * 10 ** 15),
                 st.sampled_from([V1, V1 - 1, 1_711_846_800_000_000, 1_711_846_799_999_999,
                                  1_706_659_200_000_000, 1_743_300_000_000_000])),
       st.integers(0, 5) | st.integers(0, 121))
def test_property_compiled_calendar_months_are_the_pythons(zone, t, months):
    """A coupon valid for N months: _pricing.add_months is lifetimes.add_months,
    across DST changes (Santiago at midnight, Lord Howe by half an hour),
    month ends and leap years."""
    from zoneinfo import ZoneInfo
    from kopilka.core import _pricing
    from kopilka.core.lifetimes import add_months
    assert _pricing.add_months(t, months, ZoneInfo(zone)) == add_months(t, months,
                                                                        ZoneInfo(zone))
