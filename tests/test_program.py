"""The program definition: the example file, strict validation, versions,
round trips.

Refusals are checked as the exact list of (key path, reason) problems, so a
rule that stops firing, fires twice or fires somewhere else fails its test.
"""

import copy
import dataclasses
import json
import pathlib
from datetime import datetime, timezone

import pytest

from kopilka.core.program import (Expiry, Problem, ProgramError, Rate,
                                  load_program, parse_program, to_micros)
from kopilka.core.records import PROGRAM_ALLOW_DEBT

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "programs" / "example.toml"
RUBLE = 100  # kopecks
DAY = 86_400_000_000
FLOAT = ("floats are not allowed: money, points and rates are integers "
         "(minor units, basis points)")
BP = " (basis points: 10000 is 100%)"
NAME = "must be a name: 1 to 64 letters, digits, '_' or '-'"
DELETE = object()


def micros(text):
    return to_micros(datetime.fromisoformat(text))


def minimal():
    return {
        "program": {"id": 7, "name": "Test chain", "currency": "RUB",
                    "time_zone": "Europe/Moscow"},
        "version": [{
            "number": 1,
            "effective_from": "2024-01-01T00:00:00+03:00",
            "point_value": 100,
            "items": {"categories": ["books", "tobacco"], "flags": ["promo", "no_points"]},
            "earn": {"points": 1, "per": 2000},
            "spend": {"cap_bp": 1000},
        }],
    }


def put(doc, path, value):
    """Set (or with DELETE remove) the value at a dotted path; list indices
    count from 0, and one past the end appends."""
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value


def changed(changes):
    doc = minimal()
    for path, value in changes.items():
        put(doc, path, value)
    return doc


def problems(doc):
    with pytest.raises(ProgramError) as caught:
        parse_program(doc)
    return [(p.path, p.reason) for p in caught.value.problems]


V1 = "version[1]"


# --- the example file: DESIGN.md's worked examples ------------------------------

@pytest.fixture(scope="module")
def example():
    return load_program(EXAMPLE)


def test_example_identity_partners_and_stores(example):
    assert (example.id, example.name, example.currency, example.time_zone) == (
        1, "Kopilka demo chain", "RUB", "Europe/Moscow")
    assert example.allow_debt is False and example.kernel_flags == 0
    assert example.coalition
    assert [(p.id, p.name) for p in example.partners] == [(1, "Books & Co"), (2, "Corner Cafe")]
    assert example.store[42].partner == 1 and example.store[42].lanes == (1, 2, 3)
    assert example.store[77].time_zone == "Asia/Yekaterinburg"
    assert [v.number for v in example.versions] == [1, 2, 3]
    assert [v.effective_from for v in example.versions] == [
        micros("2024-01-01T00:00:00+03:00"), micros("2024-07-01T00:00:00+03:00"),
        micros("2025-01-01T00:00:00+03:00")]


def test_example_one_bonus_per_20_rubles_pay_up_to_10_percent(example):
    """A 3,000 purchase earns 150; an order of 2,000 may spend 200 (1 bonus = 1 ruble)."""
    v = example.version(1)
    assert v.point_value == 1 * RUBLE
    assert v.earn.rate == Rate(points=1, per=20 * RUBLE)
    assert v.spend.cap_bp == 1000
    num, den = v.earn.rate.fraction(v.point_value)
    assert 3000 * RUBLE * num // den == 150
    assert 2000 * RUBLE * v.spend.cap_bp // 10_000 // v.point_value == 200
    assert v.earn.exclude_flags == ("promo", "promo_price", "subscription", "course")
    assert v.earn.rounding == "down"


def test_example_five_percent_spend_at_most_30_percent(example):
    v = example.version(2)
    assert v.earn.rate == Rate(percent_bp=500)
    assert v.spend.cap_bp == 3000
    num, den = v.earn.rate.fraction(v.point_value)
    assert 1000 * RUBLE * num // den == 50
    assert v.earn.category_rates == {"books": Rate(percent_bp=1000)}


def test_example_ten_points_per_100_rubles_pay_wholly(example):
    v = example.version(3)
    assert v.earn.rate == Rate(points=10, per=100 * RUBLE)
    assert v.spend.cap_bp == 10_000
    assert v.earn.categories == ()      # earn restated whole: the books rate ended
    assert v.referral is None           # referral = false


def test_example_cashback_category_10_points_per_100_rubles(example):
    assert example.version(1).earn.category_rates == {"books": Rate(points=10, per=10_000)}


def test_example_coupon_referral_review(example):
    for v in example.versions:
        c = v.coupon
        assert (c.threshold, c.value, c.usable_after_days, c.valid_months,
                c.valid_days, c.one_per_customer) == (1500 * RUBLE, 100 * RUBLE, 7, 3,
                                                      None, True)
        assert v.bonuses.action["review"].points == 30
        assert (v.bonuses.action["review"].limit,
                v.bonuses.action["review"].limit_period) == (1, "day")
    r = example.version(1).referral
    assert (r.referrer_share_bp, r.newcomer_discount_bp, r.window_days) == (1000, 1000, 30)


def test_example_tiers_bonuses_discounts_carry_over(example):
    v1, v2 = example.version(1), example.version(2)
    for field in ("items", "lifetime", "tiers", "bonuses", "referral", "coupon",
                  "regular_customer", "discounts", "point_value"):
        assert getattr(v2, field) == getattr(v1, field), field
    tiers = v1.tiers
    assert tiers.period == "month"
    assert [(t.name, t.min_spend, t.discount_bp) for t in tiers.levels] == [
        ("base", 0, 0), ("silver", 1_000_000, 0), ("gold", 3_000_000, 300)]
    assert tiers.tier["gold"].rate == Rate(points=1, per=1000)
    assert tiers.tier["base"].rate is None
    assert (v1.bonuses.welcome, v1.bonuses.birthday) == (100, 200)
    assert (v1.bonuses.visits.count, v1.bonuses.visits.points) == (5, 50)
    regular = {o.name: o for o in v1.discounts.offers}["regular"]
    assert regular.additive and regular.regular and regular.percent_bp == 200
    big = {o.name: o for o in v1.discounts.offers}["big_basket"]
    assert (big.additive, big.amount, big.tiers) == (False, 50_000, ("silver", "gold"))


def test_example_lifetime_per_bonus_kind(example):
    life = example.version(1).lifetime
    assert life.for_kind("purchase").activation_days == 14
    assert life.for_kind("purchase").expiry == Expiry(end_of="year", periods_later=1)
    assert (life.for_kind("welcome").activation_days,
            life.for_kind("welcome").expiry) == (0, Expiry(days=30))
    # An override names only what it changes; the rest is the program's.
    assert (life.for_kind("action").activation_days,
            life.for_kind("action").expiry) == (0, Expiry(end_of="year", periods_later=1))
    with pytest.raises(ValueError):
        life.for_kind("gift")


# --- loading ----------------------------------------------------------------------

def test_load_from_path_str_text_and_bytes(example):
    text = EXAMPLE.read_text()
    assert load_program(str(EXAMPLE)) == example
    assert load_program(text) == example
    assert load_program(text.encode()) == example


def test_toml_syntax_error_is_a_program_error():
    with pytest.raises(ProgramError) as caught:
        load_program("[program\nid = 1\n")
    (problem,) = caught.value.problems
    assert problem.path == "" and problem.reason.startswith("not valid TOML: ")


def test_toml_float_inf_and_decimal_refused():
    text = EXAMPLE.read_text().replace("point_value = 100 ", "point_value = inf ", 1)
    text = text.replace("cap_bp = 1_000 ", "cap_bp = 0.1 ", 1)
    with pytest.raises(ProgramError) as caught:
        load_program(text)
    assert [(p.path, p.reason) for p in caught.value.problems] == [
        (f"{V1}.point_value", FLOAT), (f"{V1}.spend.cap_bp", FLOAT)]


def test_a_program_must_be_a_table():
    with pytest.raises(ProgramError) as caught:
        parse_program([1, 2])
    assert caught.value.problems == (Problem("", "a program must be a table, not an array"),)


def test_minimal_program_defaults():
    p = parse_program(minimal())
    v = p.version_at(micros("2024-01-01T00:00:00+03:00"))
    assert (v.earn.rounding, v.earn.rounding_scope) == ("down", "receipt")
    assert v.lifetime.for_kind("welcome").expiry.never
    assert (v.tiers, v.referral, v.coupon, v.regular_customer) == (None,) * 4
    assert p.stores == () and p.partners == () and not p.coalition


def test_allow_debt_maps_to_the_kernel_flag():
    p = parse_program(changed({"program.allow_debt": True}))
    assert p.kernel_flags == PROGRAM_ALLOW_DEBT


# --- refusals: one rule each, exact path and reason -------------------------------

EXPIRY_SHAPE = 'must be "never" or a table such as { days = 365 }'

CASES = [
    # identity
    ({"colour": "red"}, [("colour", "unknown key (expected program, partner, store, version)")]),
    ({"program": DELETE}, [("program", "is required")]),
    ({"program.id": 0}, [("program.id", "must be at least 1")]),
    ({"program.id": 1 << 32}, [("program.id", "must be at most 4294967295")]),
    ({"program.id": True}, [("program.id", "must be an integer, not a boolean")]),
    ({"program.id": "7"}, [("program.id", "must be an integer, not a string")]),
    ({"program.name": "  "}, [("program.name", "must not be empty")]),
    ({"program.name": "x" * 201}, [("program.name", "must be at most 200 characters")]),
    ({"program.currency": "rub"},
     [("program.currency", "must be an ISO 4217 code: three capital letters, e.g. RUB")]),
    ({"program.currency": "RUBL"},
     [("program.currency", "must be an ISO 4217 code: three capital letters, e.g. RUB")]),
    ({"program.time_zone": "Mars/Olympus"},
     [("program.time_zone",
       "unknown time zone 'Mars/Olympus': use an IANA name such as Europe/Moscow")]),
    ({"program.time_zone": "../etc/passwd"},
     [("program.time_zone",
       "unknown time zone '../etc/passwd': use an IANA name such as Europe/Moscow")]),
    ({"program.allow_debt": 1}, [("program.allow_debt", "must be true or false, not an integer")]),
    # partners and stores
    ({"partner": [{"id": 1, "name": "A"}, {"id": 1, "name": "B"}]},
     [("partner[2].id", "duplicate partner id 1")]),
    ({"partner": [{"id": 1, "name": "A"}, {"id": 2, "name": "A"}]},
     [("partner[2].name", "duplicate partner name 'A'")]),
    ({"partner": [{"id": 0, "name": "A"}]}, [("partner[1].id", "must be at least 1")]),
    ({"partner": {"id": 1}}, [("partner", "must be an array, not a table")]),
    ({"store": [{"id": 1, "lanes": [1]}, {"id": 1, "lanes": [1]}]},
     [("store[2].id", "duplicate store id 1")]),
    ({"store": [{"id": 1, "lanes": []}]}, [("store[1].lanes", "needs at least one lane")]),
    ({"store": [{"id": 1, "lanes": [1, 2, 1]}]}, [("store[1].lanes[3]", "duplicate lane 1")]),
    ({"store": [{"id": 1, "lanes": [0]}]},
     [("store[1].lanes[1]", "must be between 1 and 4294967295")]),
    ({"store": [{"id": 1, "lanes": ["3"]}]},
     [("store[1].lanes[1]", "must be an integer, not a string")]),
    ({"store": [{"id": 1}]}, [("store[1].lanes", "is required")]),
    ({"store": [{"id": 1, "lanes": [1], "time_zone": "Moscow"}]},
     [("store[1].time_zone", "unknown time zone 'Moscow': use an IANA name such as Europe/Moscow")]),
    ({"store": [{"id": 1, "lanes": [1], "partner": 3}]},
     [("store[1].partner", "unknown partner 3: the program has no partners")]),
    ({"partner": [{"id": 1, "name": "A"}], "store": [{"id": 1, "lanes": [1], "partner": 3}]},
     [("store[1].partner", "unknown partner 3: not among the [[partner]] ids")]),
    ({"partner": [{"id": 1, "name": "A"}], "store": [{"id": 1, "lanes": [1]}]},
     [("store[1].partner", "is required: the program has partners, so every store names one")]),
    ({"store": [{"id": 1, "lanes": [1], "till": 2}]},
     [("store[1].till", "unknown key (expected id, name, partner, time_zone, lanes)")]),
    # versions
    ({"version": []}, [("version", "needs at least one [[version]]")]),
    ({"version": DELETE}, [("version", "is required")]),
    ({"version.0": "v1"}, [("version[1]", "must be a table, not a string")]),
    ({"version.0.number": 2},
     [(f"{V1}.number", "must be 1: versions are numbered 1, 2, 3, ... in the order they appear")]),
    ({"version.0.number": DELETE}, [(f"{V1}.number", "is required")]),
    ({"version.0.effective_from": DELETE}, [(f"{V1}.effective_from", "is required")]),
    ({"version.0.effective_from": "2024-01-01T00:00:00"},
     [(f"{V1}.effective_from",
       "must be an RFC 3339 time with a UTC offset, e.g. 2024-03-01T00:00:00+03:00")]),
    ({"version.0.effective_from": datetime(2024, 1, 1)},
     [(f"{V1}.effective_from", "needs a UTC offset, e.g. 2024-03-01T00:00:00+03:00")]),
    ({"version.0.effective_from": datetime(2024, 1, 1).date()},
     [(f"{V1}.effective_from",
       "needs a time and a UTC offset, e.g. 2024-03-01T00:00:00+03:00")]),
    ({"version.0.effective_from": "2024-01-01T00:00:00.1234567Z"},
     [(f"{V1}.effective_from",
       "must be an RFC 3339 time with a UTC offset, e.g. 2024-03-01T00:00:00+03:00")]),
    ({"version.0.effective_from": "2024-02-30T00:00:00Z"},
     [(f"{V1}.effective_from", "is not a real time: 2024-02-30T00:00:00Z")]),
    ({"version.0.effective_from": 1704056400000000},
     [(f"{V1}.effective_from", "must be an RFC 3339 time with a UTC offset, "
                               "e.g. 2024-03-01T00:00:00+03:00; not an integer")]),
    ({"version.0.note": 5}, [(f"{V1}.note", "must be a string, not an integer")]),
    ({"version.0.points_value": 100},
     [(f"{V1}.points_value", "unknown key (expected number, effective_from, note, "
       "point_value, items, earn, spend, lifetime, tiers, bonuses, referral, coupon, "
       "regular_customer, discounts)")]),
    ({"version.0.point_value": 0}, [(f"{V1}.point_value", "must be at least 1")]),
    ({"version.0.point_value": DELETE},
     [(f"{V1}.point_value", "is required in the first version")]),
    ({"version.0.earn": DELETE}, [(f"{V1}.earn", "is required in the first version")]),
    ({"version.0.spend": DELETE}, [(f"{V1}.spend", "is required in the first version")]),
    ({"version.0.earn": False}, [(f"{V1}.earn", "must be a table, not a boolean")]),
    ({"version.0.coupon": True}, [(f"{V1}.coupon", "must be a table, or false to end it")]),
    # items
    ({"version.0.items.categories": ["books", "books"]},
     [(f"{V1}.items.categories[2]", "duplicate category 'books'")]),
    ({"version.0.items.flags": ["promo", "on sale"]}, [(f"{V1}.items.flags[2]", NAME)]),
    ({"version.0.items.flags": ["promo", 3]},
     [(f"{V1}.items.flags[2]", "must be a string, not an integer")]),
    ({"version.0.items.categories": "books"},
     [(f"{V1}.items.categories", "must be an array, not a string")]),
    # earn
    ({"version.0.earn": {"percent_bp": 10_001}},
     [(f"{V1}.earn.percent_bp", "must be at most 10000" + BP)]),
    ({"version.0.earn": {"percent_bp": -1}},
     [(f"{V1}.earn.percent_bp", "must be at least 0" + BP)]),
    ({"version.0.earn.percent_bp": 500},
     [(f"{V1}.earn.percent_bp", "give either percent_bp, or points and per, not both")]),
    ({"version.0.earn.per": DELETE}, [(f"{V1}.earn.per", "is required")]),
    ({"version.0.earn.per": 0}, [(f"{V1}.earn.per", "must be at least 1")]),
    ({"version.0.earn": {"rounding": "down"}},
     [(f"{V1}.earn", "needs a rate: percent_bp, or points and per")]),
    ({"version.0.earn": {"points": 3, "per": 200}},
     [(f"{V1}.earn.points",
       "earns more than the money it is earned on: 3 points worth 100 each exceed per 200")]),
    ({"version.0.earn.rounding": "nearest"},
     [(f"{V1}.earn.rounding", 'must be one of "down", "up", "half_up"')]),
    ({"version.0.earn.rounding_scope": "basket"},
     [(f"{V1}.earn.rounding_scope", 'must be one of "receipt", "line"')]),
    ({"version.0.earn.exclude_flags": ["promo", "subscription"]},
     [(f"{V1}.earn.exclude_flags[2]", "unknown flag 'subscription': not in items.flags")]),
    ({"version.0.earn.categories": {"food": {"percent_bp": 100}}},
     [(f"{V1}.earn.categories.food", "unknown category 'food': not in items.categories")]),
    ({"version.0.earn.categories": {"books": {"percent_bp": 10_001}}},
     [(f"{V1}.earn.categories.books.percent_bp", "must be at most 10000" + BP)]),
    ({"version.0.earn.categories": {"books": {}}},
     [(f"{V1}.earn.categories.books", "needs a rate: percent_bp, or points and per")]),
    ({"version.0.earn.categories": {"books": {"points": 2, "per": 100}}},
     [(f"{V1}.earn.categories.books.points",
       "earns more than the money it is earned on: 2 points worth 100 each exceed per 100")]),
    ({"version.0.earn.categories": {"sci fi": {"percent_bp": 100}}},
     [(f"{V1}.earn.categories.sci fi",
       "is not a valid name: use 1 to 64 letters, digits, '_' or '-'")]),
    ({"version.0.earn.categories": {"books": 500}},
     [(f"{V1}.earn.categories.books", "must be a table, not an integer")]),
    ({"version.0.earn.categories": {"books": {"percent": 5}}},
     [(f"{V1}.earn.categories.books.percent", "unknown key (expected percent_bp, points, per)"),
      (f"{V1}.earn.categories.books", "needs a rate: percent_bp, or points and per")]),
    # spend
    ({"version.0.spend.cap_bp": 0}, [(f"{V1}.spend.cap_bp", "must be at least 1" + BP)]),
    ({"version.0.spend.cap_bp": 10_001}, [(f"{V1}.spend.cap_bp", "must be at most 10000" + BP)]),
    ({"version.0.spend.cap_bp": DELETE}, [(f"{V1}.spend.cap_bp", "is required")]),
    ({"version.0.spend.min_balance": -5}, [(f"{V1}.spend.min_balance", "must be at least 0")]),
    ({"version.0.spend.min_receipt": 1 << 63},
     [(f"{V1}.spend.min_receipt", "must be at most 9223372036854775807")]),
    ({"version.0.spend.exclude_categories": ["alcohol"]},
     [(f"{V1}.spend.exclude_categories[1]", "unknown category 'alcohol': not in items.categories")]),
    ({"version.0.spend.exclude_flags": ["no_points", "gift"]},
     [(f"{V1}.spend.exclude_flags[2]", "unknown flag 'gift': not in items.flags")]),
    # lifetime
    ({"version.0.lifetime": {"activation_days": 14, "expiry": {"days": 14}}},
     [(f"{V1}.lifetime.expiry", "points would expire before they activate: expiry after "
                                "14 days, activation after 14 days")]),
    ({"version.0.lifetime": {"activation_days": 14, "expiry": {"end_of": "month"}}},
     [(f"{V1}.lifetime.expiry", "points earned at the end of a month would expire before "
                                "they activate after 14 days: raise periods_later")]),
    ({"version.0.lifetime": {"activation_days": 30,
                             "expiry": {"end_of": "month", "periods_later": 1}}},
     [(f"{V1}.lifetime.expiry", "points earned at the end of a month would expire before "
                                "they activate after 30 days: raise periods_later")]),
    ({"version.0.lifetime": {"activation_days": 14, "expiry": {"days": 365},
                             "birthday": {"expiry": {"days": 7}}}},
     [(f"{V1}.lifetime.birthday.expiry", "points would expire before they activate: "
                                         "expiry after 7 days, activation after 14 days")]),
    ({"version.0.lifetime": {"expiry": {"days": 30}, "welcome": {"activation_days": 30}}},
     [(f"{V1}.lifetime.welcome.activation_days", "points would expire before they activate: "
                                                 "expiry after 30 days, activation after 30 days")]),
    ({"version.0.lifetime": {"expiry": "sometimes"}}, [(f"{V1}.lifetime.expiry", EXPIRY_SHAPE)]),
    ({"version.0.lifetime": {"expiry": 365}},
     [(f"{V1}.lifetime.expiry", EXPIRY_SHAPE + ", not an integer")]),
    ({"version.0.lifetime": {"expiry": {}}},
     [(f"{V1}.lifetime.expiry", 'needs days or end_of (or write expiry = "never")')]),
    ({"version.0.lifetime": {"expiry": {"days": 30, "end_of": "year"}}},
     [(f"{V1}.lifetime.expiry", "give either days or end_of, not both")]),
    ({"version.0.lifetime": {"expiry": {"days": 30, "periods_later": 1}}},
     [(f"{V1}.lifetime.expiry.periods_later", "goes with end_of, not days")]),
    ({"version.0.lifetime": {"expiry": {"end_of": "week"}}},
     [(f"{V1}.lifetime.expiry.end_of", 'must be one of "day", "month", "quarter", "year"')]),
    ({"version.0.lifetime": {"expiry": {"days": 0}}},
     [(f"{V1}.lifetime.expiry.days", "must be at least 1")]),
    ({"version.0.lifetime": {"activation_days": 36_526}},
     [(f"{V1}.lifetime.activation_days", "must be at most 36525")]),
    ({"version.0.lifetime": {"gift": {"activation_days": 0}}},
     [(f"{V1}.lifetime.gift", "unknown key (expected activation_days, expiry, purchase, "
                              "welcome, birthday, action, visits, referral, adjustment)")]),
    # tiers
    ({"version.0.tiers": {"level": [{"name": "base", "min_spend": 100}]}},
     [(f"{V1}.tiers.level[1].min_spend",
       "must be 0 for the first tier, so every member has a tier")]),
    ({"version.0.tiers": {"level": [{"name": "a", "min_spend": 0},
                                    {"name": "b", "min_spend": 500},
                                    {"name": "c", "min_spend": 300}]}},
     [(f"{V1}.tiers.level[3].min_spend", "must be above the previous tier's min_spend "
                                         "(500): list tiers from lowest to highest")]),
    ({"version.0.tiers": {"level": [{"name": "a", "min_spend": 0},
                                    {"name": "b", "min_spend": 500},
                                    {"name": "c", "min_spend": 500}]}},
     [(f"{V1}.tiers.level[3].min_spend", "must be above the previous tier's min_spend "
                                         "(500): list tiers from lowest to highest")]),
    ({"version.0.tiers": {"level": [{"name": "a", "min_spend": 0},
                                    {"name": "a", "min_spend": 500}]}},
     [(f"{V1}.tiers.level[2].name", "duplicate tier name 'a'")]),
    ({"version.0.tiers": {"level": []}}, [(f"{V1}.tiers.level", "needs at least one tier")]),
    ({"version.0.tiers": {"period": "month"}}, [(f"{V1}.tiers.level", "is required")]),
    ({"version.0.tiers": {"period": "week", "level": [{"name": "a", "min_spend": 0}]}},
     [(f"{V1}.tiers.period", 'must be one of "month", "quarter", "year"')]),
    ({"version.0.tiers": {"level": [{"name": "a", "min_spend": 0, "discount_bp": 20_000}]}},
     [(f"{V1}.tiers.level[1].discount_bp", "must be at most 10000" + BP)]),
    ({"version.0.tiers": {"level": [{"name": "a", "min_spend": 0, "percent_bp": 0.05}]}},
     [(f"{V1}.tiers.level[1].percent_bp", FLOAT)]),
    ({"version.0.tiers": {"level": [{"name": "a", "min_spend": 0, "points": 1, "per": 50}]}},
     [(f"{V1}.tiers.level[1].points",
       "earns more than the money it is earned on: 1 points worth 100 each exceed per 50")]),
    # bonuses
    ({"version.0.bonuses": {"welcome": -100}}, [(f"{V1}.bonuses.welcome", "must be at least 0")]),
    ({"version.0.bonuses": {"actions": {"review": {"points": 0}}}},
     [(f"{V1}.bonuses.actions.review.points", "must be at least 1")]),
    ({"version.0.bonuses": {"actions": {"review": {"points": 30, "limit_period": "day"}}}},
     [(f"{V1}.bonuses.actions.review.limit_period",
       "needs limit: how many times in that period")]),
    ({"version.0.bonuses": {"actions": {"review": {"points": 30, "limit": 0}}}},
     [(f"{V1}.bonuses.actions.review.limit", "must be at least 1")]),
    ({"version.0.bonuses": {"visits": {"count": 0, "points": 50}}},
     [(f"{V1}.bonuses.visits.count", "must be at least 1")]),
    ({"version.0.bonuses": {"visits": {"count": 5, "points": 50, "period": "fortnight"}}},
     [(f"{V1}.bonuses.visits.period",
       'must be one of "day", "week", "month", "quarter", "year"')]),
    # referral
    ({"version.0.referral": {"window_days": 30}},
     [(f"{V1}.referral", "gives nothing: set newcomer_discount_bp or referrer_share_bp, "
                         "or write referral = false")]),
    ({"version.0.referral": {"window_days": 0, "referrer_share_bp": 1000}},
     [(f"{V1}.referral.window_days", "must be at least 1")]),
    ({"version.0.referral": {"window_days": 30, "referrer_share_bp": 10_001}},
     [(f"{V1}.referral.referrer_share_bp", "must be at most 10000" + BP)]),
    # coupon
    ({"version.0.coupon": {"threshold": 150_000, "value": 10_000}},
     [(f"{V1}.coupon", "needs valid_days or valid_months")]),
    ({"version.0.coupon": {"threshold": 150_000, "value": 10_000, "valid_days": 90,
                           "valid_months": 3}},
     [(f"{V1}.coupon", "give either valid_days or valid_months, not both")]),
    ({"version.0.coupon": {"threshold": 150_000, "value": 10_000, "valid_days": 7,
                           "usable_after_days": 7}},
     [(f"{V1}.coupon.usable_after_days", "must be less than the coupon's validity "
                                         "(7 days), or it expires before it can be used")]),
    ({"version.0.coupon": {"threshold": 150_000, "value": 10_000, "valid_months": 1,
                           "usable_after_days": 28}},
     [(f"{V1}.coupon.usable_after_days", "must be less than the coupon's validity "
                                         "(1 months), or it expires before it can be used")]),
    ({"version.0.coupon": {"threshold": 0, "value": 10_000, "valid_months": 3}},
     [(f"{V1}.coupon.threshold", "must be at least 1")]),
    ({"version.0.coupon": {"threshold": 150_000, "value": 10_000, "valid_months": 3,
                           "one_per_customer": "yes"}},
     [(f"{V1}.coupon.one_per_customer", "must be true or false, not a string")]),
    # regular customer
    ({"version.0.regular_customer": {"min_visits": 0, "within_days": 90}},
     [(f"{V1}.regular_customer.min_visits",
       "must be at least 1 (the ledger keeps a member's last 16 visit days)")]),
    ({"version.0.regular_customer": {"min_visits": 17, "within_days": 90}},
     [(f"{V1}.regular_customer.min_visits",
       "must be at most 16 (the ledger keeps a member's last 16 visit days)")]),
    # discounts
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 100, "amount": 500}}}},
     [(f"{V1}.discounts.offers.x", "give either percent_bp or amount, not both")]),
    ({"version.0.discounts": {"offers": {"x": {"additive": True}}}},
     [(f"{V1}.discounts.offers.x", "needs percent_bp or amount")]),
    ({"version.0.discounts": {"offers": {"x": {"amount": 0}}}},
     [(f"{V1}.discounts.offers.x.amount", "must be at least 1")]),
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 0}}}},
     [(f"{V1}.discounts.offers.x.percent_bp", "must be at least 1" + BP)]),
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 100, "when": {"tiers": ["gold"]}}}}},
     [(f"{V1}.discounts.offers.x.when.tiers[1]", "unknown tier 'gold': the version has no tiers")]),
    ({"version.0.tiers": {"level": [{"name": "base", "min_spend": 0}]},
      "version.0.discounts": {"offers": {"x": {"percent_bp": 100, "when": {"tiers": ["gold"]}}}}},
     [(f"{V1}.discounts.offers.x.when.tiers[1]", "unknown tier 'gold': not in tiers.level")]),
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 100, "when": {"tiers": []}}}}},
     [(f"{V1}.discounts.offers.x.when.tiers",
       "must name at least one tier (or leave tiers out)")]),
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 100, "when": {"regular": True}}}}},
     [(f"{V1}.discounts.offers.x.when.regular",
       "needs a regular_customer section saying who is a regular")]),
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 100, "when": {"newcomer": True}}}}},
     [(f"{V1}.discounts.offers.x.when.newcomer",
       "needs a referral section: newcomers are referred members")]),
    ({"version.0.discounts": {"offers": {"x": {"percent_bp": 100, "when": {"vip": True}}}}},
     [(f"{V1}.discounts.offers.x.when.vip", "unknown key (expected tiers, regular, newcomer)")]),
    ({"version.0.discounts": {"exclude_flags": ["sale"]}},
     [(f"{V1}.discounts.exclude_flags[1]", "unknown flag 'sale': not in items.flags")]),
]


@pytest.mark.parametrize("changes, expected", CASES,
                         ids=[f"{i}-{'+'.join(c)}" for i, (c, _) in enumerate(CASES)])
def test_refused(changes, expected):
    assert problems(changed(changes)) == expected


FLOAT_PLACES = [
    ("program.id", 7.0, "program.id"),
    ("program.name", 1.5, "program.name"),
    ("version.0.point_value", 100.0, f"{V1}.point_value"),
    ("version.0.effective_from", 1.7e15, f"{V1}.effective_from"),
    ("version.0.earn.per", 2000.0, f"{V1}.earn.per"),
    ("version.0.earn.categories", {"books": {"percent_bp": 0.1}},
     f"{V1}.earn.categories.books.percent_bp"),
    ("version.0.earn.categories", {"books": 0.1}, f"{V1}.earn.categories.books"),
    ("version.0.spend.cap_bp", float("inf"), f"{V1}.spend.cap_bp"),
    ("version.0.spend.min_receipt", float("nan"), f"{V1}.spend.min_receipt"),
    ("version.0.items.flags", ["promo", 1.0], f"{V1}.items.flags[2]"),
    ("version.0.lifetime", {"expiry": 30.0}, f"{V1}.lifetime.expiry"),
    ("version.0.lifetime", {"expiry": {"days": 30.5}}, f"{V1}.lifetime.expiry.days"),
    ("version.0.coupon", {"threshold": 1500.00, "value": 100, "valid_days": 9},
     f"{V1}.coupon.threshold"),
    ("store", [{"id": 1, "lanes": [1.0]}], "store[1].lanes[1]"),
]


@pytest.mark.parametrize("path, value, where", FLOAT_PLACES,
                         ids=[p[2] for p in FLOAT_PLACES])
def test_floats_refused_everywhere(path, value, where):
    assert problems(changed({path: value})) == [(where, FLOAT)]


def test_every_problem_reported_at_once():
    doc = changed({
        "program.currency": "rubles",
        "program.time_zone": "Moscow",
        "store": [{"id": 1, "lanes": [1, 1]}],
        "version.0.point_value": 1.0,
        "version.0.earn": {"percent_bp": 50_000, "rounding": "sideways"},
        "version.0.spend.cap_bp": 0,
        "version.0.tiers": {"level": [{"name": "a", "min_spend": 9},
                                      {"name": "b", "min_spend": 5}]},
        "version.1": {"number": 2, "effective_from": "2023-01-01T00:00:00Z"},
    })
    assert problems(doc) == [
        ("program.currency", "must be an ISO 4217 code: three capital letters, e.g. RUB"),
        ("program.time_zone", "unknown time zone 'Moscow': use an IANA name such as Europe/Moscow"),
        ("store[1].lanes[2]", "duplicate lane 1"),
        (f"{V1}.point_value", FLOAT),
        (f"{V1}.earn.percent_bp", "must be at most 10000" + BP),
        (f"{V1}.earn.rounding", 'must be one of "down", "up", "half_up"'),
        (f"{V1}.spend.cap_bp", "must be at least 1" + BP),
        (f"{V1}.tiers.level[1].min_spend", "must be 0 for the first tier, so every member has a tier"),
        (f"{V1}.tiers.level[2].min_spend", "must be above the previous tier's min_spend (9): "
                                           "list tiers from lowest to highest"),
        ("version[2].effective_from", "must be later than version 1's effective_from"),
    ]


def test_error_message_lists_every_problem():
    with pytest.raises(ProgramError) as caught:
        parse_program(changed({"program.id": 0, "version.0.spend.cap_bp": 0}))
    assert str(caught.value) == (
        "invalid program (2 problems):\n"
        "  program.id: must be at least 1\n"
        "  version[1].spend.cap_bp: must be at least 1 (basis points: 10000 is 100%)")


# --- versions ---------------------------------------------------------------------

def two_versions(**second):
    return changed({"version.1": {"number": 2, "effective_from": "2024-07-01T00:00:00+03:00",
                                  **second}})


def test_versions_out_of_order_or_duplicated_refused():
    doc = changed({"version.1": {"number": 2, "effective_from": "2023-12-31T20:59:59Z"}})
    assert problems(doc) == [
        ("version[2].effective_from", "must be later than version 1's effective_from")]
    doc = changed({"version.1": {"number": 2, "effective_from": "2023-12-31T21:00:00Z"}})
    assert problems(doc) == [
        ("version[2].effective_from",
         "is the same as version 1's: each version needs its own start")]
    doc = changed({"version.1": {"number": 1, "effective_from": "2024-07-01T00:00:00Z"}})
    assert problems(doc) == [
        ("version[2].number",
         "must be 2: versions are numbered 1, 2, 3, ... in the order they appear")]


def test_version_at_boundaries():
    doc = two_versions(spend={"cap_bp": 3000})
    put(doc, "version.2", {"number": 3, "effective_from": "2025-01-01T00:00:00.000001+03:00",
                           "spend": {"cap_bp": 10_000}})
    p = parse_program(doc)
    first, second, third = (micros("2024-01-01T00:00:00+03:00"),
                            micros("2024-07-01T00:00:00+03:00"),
                            micros("2025-01-01T00:00:00.000001+03:00"))
    assert p.version_at(first).number == 1
    assert p.version_at(second - 1).number == 1
    assert p.version_at(second).number == 2
    assert p.version_at(second).spend.cap_bp == 3000
    assert p.version_at(third - 1).number == 2
    assert p.version_at(third).number == 3
    assert p.version_at((1 << 63) - 1).number == 3
    with pytest.raises(LookupError, match="no version in force at 2023-12-31T23:59:59.999999"):
        p.version_at(first - 1)
    with pytest.raises(TypeError):
        p.version_at(float(second))
    assert p.version(2) is p.versions[1]
    with pytest.raises(LookupError):
        p.version(4)
    with pytest.raises(LookupError):
        p.version(0)


def test_a_version_keeps_the_sections_it_leaves_out():
    p = parse_program(two_versions(spend={"cap_bp": 3000}))
    first, second = p.versions
    assert second.spend.cap_bp == 3000 and first.spend.cap_bp == 1000
    assert second.earn == first.earn and second.items == first.items
    assert second.point_value == 100


def test_false_ends_an_optional_section():
    doc = changed({"version.0.referral": {"window_days": 30, "referrer_share_bp": 1000}})
    put(doc, "version.1", {"number": 2, "effective_from": "2024-07-01T00:00:00+03:00",
                           "referral": False})
    first, second = parse_program(doc).versions
    assert first.referral.referrer_share_bp == 1000
    assert second.referral is None


def test_reference_broken_by_a_later_version_names_what_was_carried():
    doc = changed({"version.0.earn.categories": {"books": {"percent_bp": 100}}})
    put(doc, "version.1", {"number": 2, "effective_from": "2024-07-01T00:00:00+03:00",
                           "items": {"categories": ["tobacco"], "flags": ["promo"]}})
    assert problems(doc) == [
        ("version[2].earn.categories.books",
         "unknown category 'books': not in items.categories (earn from version 1 carried over)")]


def test_problem_in_a_carried_section_is_reported_once():
    doc = changed({"version.0.earn.exclude_flags": ["gift"]})
    put(doc, "version.1", {"number": 2, "effective_from": "2024-07-01T00:00:00+03:00",
                           "spend": {"cap_bp": 3000}})
    assert problems(doc) == [
        (f"{V1}.earn.exclude_flags[1]", "unknown flag 'gift': not in items.flags")]


# --- round trip -------------------------------------------------------------------

def test_round_trip_example(example):
    data = example.to_dict()
    assert parse_program(data) == example
    assert parse_program(json.loads(json.dumps(data))) == example  # API-shaped


def test_to_dict_writes_every_version_in_full(example):
    second = example.to_dict()["version"][1]
    assert second["effective_from"] == "2024-07-01T00:00:00+03:00"
    assert second["tiers"]["level"][2] == {"name": "gold", "min_spend": 3_000_000,
                                           "points": 1, "per": 1000, "discount_bp": 300}
    assert second["coupon"]["valid_months"] == 3
    assert example.to_dict()["version"][2]["referral"] is False
    # Each version stands alone: parsed as the only version, it is the same.
    alone = parse_program({**example.to_dict(), "version": [{**second, "number": 1}]})
    assert alone.versions[0] == dataclasses.replace(example.version(2), number=1)


def test_round_trip_minimal_and_microseconds():
    doc = changed({"version.0.effective_from": "2024-01-01T00:00:00.000123Z",
                   "store": [{"id": 3, "lanes": [2]}]})
    p = parse_program(doc)
    assert p.versions[0].effective_from == micros("2024-01-01T00:00:00.000123+00:00")
    assert p.stores[0].time_zone == "Europe/Moscow"  # the program's, when not given
    assert parse_program(p.to_dict()) == p
    assert p.to_dict()["version"][0]["effective_from"] == "2024-01-01T03:00:00.000123+03:00"


def test_round_trip_keeps_every_optional_form():
    doc = changed({
        "version.0.earn": {"percent_bp": 0, "rounding": "half_up", "rounding_scope": "line"},
        "version.0.lifetime": {"expiry": "never", "welcome": {}, "visits": {"expiry": "never"}},
        "version.0.bonuses": {"actions": {"a": {"points": 1}, "b": {"points": 2, "limit": 3}}},
        "version.0.coupon": {"threshold": 1, "value": 1, "valid_days": 1,
                             "one_per_customer": False},
        "version.0.discounts": {"offers": {"x": {"amount": 5}}},
    })
    p = parse_program(doc)
    assert p.versions[0].lifetime.overrides[0].expiry is None
    assert parse_program(p.to_dict()) == p


def test_parse_does_not_change_its_input():
    doc = minimal()
    before = copy.deepcopy(doc)
    parse_program(doc)
    assert doc == before


def test_parsed_times_are_utc_instants():
    p = parse_program(changed({"version.0.effective_from": "2024-01-01T00:00:00+03:00"}))
    assert p.versions[0].effective_from == to_micros(
        datetime(2023, 12, 31, 21, tzinfo=timezone.utc))
    assert p.versions[0].effective_from % DAY == 21 * 3600 * 1_000_000


def test_order_is_checked_against_the_last_valid_start():
    doc = changed({})
    put(doc, "version.1", {"number": 2, "effective_from": "not a time"})
    put(doc, "version.2", {"number": 3, "effective_from": "2023-06-01T00:00:00Z"})
    assert problems(doc) == [
        ("version[2].effective_from",
         "must be an RFC 3339 time with a UTC offset, e.g. 2024-03-01T00:00:00+03:00"),
        ("version[3].effective_from", "must be later than version 1's effective_from")]
