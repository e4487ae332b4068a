"""The program definition's plain-data shape: parsing it strictly, writing it.

The shape itself is documented in `program.py`. Parsing keeps going after a
problem, so whoever fixes a file sees every mistake in one pass: each value
that fails is replaced by BAD and recorded under its full key path, and the
checks between sections skip anything BAD rather than pile up consequences
of one typo. Nothing is built unless nothing was wrong.
"""

import re
from collections.abc import Mapping
from datetime import date, datetime, time

from .program import (BASIS, BONUS_KINDS, EXPIRY_PERIODS, PERIODS, ROUNDING_SCOPES,
                      ROUNDINGS, TIER_PERIODS, Action, Bonuses, CategoryRate,
                      Coupon, Discounts, Earn, Expiry, Items, Lifetime,
                      LifetimeOverride, Offer, Partner, Problem, Program,
                      ProgramError, Rate, Referral, RegularCustomer, Spend,
                      Store, Tier, Tiers, Version, VisitBonus, format_time,
                      to_micros)
from .records import VISIT_DAYS

INT64_MAX = (1 << 63) - 1
U32_MAX = (1 << 32) - 1
MAX_DAYS = 36_525       # a century; keeps day counts far from int64 microseconds
MAX_MONTHS = 1_200
MAX_TEXT = 200
MAX_NOTE = 2_000
# Shortest length of each calendar period, for "would expire before usable".
SHORTEST_DAYS = {"day": 1, "month": 28, "quarter": 89, "year": 365}

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CURRENCY = re.compile(r"[A-Z]{3}")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?"
                     r"([Zz]|[+-]\d{2}:\d{2})")

FLOAT = ("floats are not allowed: money, points and rates are integers "
         "(minor units, basis points)")
BP = " (basis points: 10000 is 100%)"
NAME_REASON = "must be a name: 1 to 64 letters, digits, '_' or '-'"
TIME_EXAMPLE = "e.g. 2024-03-01T00:00:00+03:00"

RATE_KEYS = ("percent_bp", "points", "per")
# A version's sections, in the order they are read and written. A version
# that leaves one out keeps the previous version's.
SECTIONS = ("point_value", "items", "earn", "spend", "lifetime", "tiers",
            "bonuses", "referral", "coupon", "regular_customer", "discounts")
REQUIRED_FIRST = ("point_value", "earn", "spend")
OPTIONAL = ("tiers", "referral", "coupon", "regular_customer")  # may be false
DEFAULTS = {"items": Items(), "lifetime": Lifetime(), "bonuses": Bonuses(),
            "discounts": Discounts(), **{s: None for s in OPTIONAL}}

BAD = object()       # a value that failed; later checks skip it
REQUIRED = object()  # default for keys that must be present


def _bad(*values):
    return any(v is BAD for v in values)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value):
    for types, name in ((bool, "a boolean"), (int, "an integer"),
                        (float, "a float"), (str, "a string"),
                        (Mapping, "a table"), ((list, tuple), "an array"),
                        (datetime, "a date-time"), (date, "a date"),
                        (time, "a time"), (type(None), "null")):
        if isinstance(value, types):
            return name
    return type(value).__name__


class _Table:
    """One table being read: values by key, each failure recorded under the
    key's full path. Keys outside `keys` are reported as soon as it is made."""

    def __init__(self, problems, path, mapping, keys=None):
        self.problems, self.path, self.mapping = problems, path, mapping
        if keys is not None:
            for key in mapping:
                if key not in keys:
                    self.fail(key, f"unknown key (expected {', '.join(keys)})")

    def at(self, key):
        if key is None:
            return self.path
        return f"{self.path}.{key}" if self.path else str(key)

    def fail(self, key, reason):
        self.problems.append(Problem(self.at(key), reason))
        return BAD

    def __contains__(self, key):
        return key in self.mapping

    def _get(self, key, expected, test, default):
        """The value if present and of the right type; `default` if absent."""
        if key not in self.mapping:
            return self.fail(key, "is required") if default is REQUIRED else default
        value = self.mapping[key]
        if isinstance(value, float):
            return self.fail(key, FLOAT)
        if not test(value):
            return self.fail(key, f"must be {expected}, not {_kind(value)}")
        return value

    def integer(self, key, lo, hi=INT64_MAX, default=REQUIRED, hint=""):
        value = self._get(key, "an integer", _is_int, default)
        if key not in self.mapping or value is BAD:
            return value
        if value < lo:
            return self.fail(key, f"must be at least {lo}{hint}")
        if value > hi:
            return self.fail(key, f"must be at most {hi}{hint}")
        return value

    def boolean(self, key, default):
        return self._get(key, "true or false", lambda v: isinstance(v, bool), default)

    def text(self, key, default=REQUIRED, limit=MAX_TEXT, empty=False):
        value = self._get(key, "a string", lambda v: isinstance(v, str), default)
        if key not in self.mapping or value is BAD:
            return value
        if not empty and not value.strip():
            return self.fail(key, "must not be empty")
        if len(value) > limit:
            return self.fail(key, f"must be at most {limit} characters")
        return value

    def choice(self, key, options, default=REQUIRED):
        value = self.text(key, default)
        if key in self.mapping and value is not BAD and value not in options:
            listed = ", ".join(f'"{o}"' for o in options)
            return self.fail(key, f"must be one of {listed}")
        return value

    def name(self, key):
        value = self.text(key)
        if value is not BAD and not NAME.fullmatch(value):
            return self.fail(key, NAME_REASON)
        return value

    def array(self, key, default=()):
        return self._get(key, "an array", lambda v: isinstance(v, (list, tuple)),
                         default)

    def names(self, key, what="name"):
        """A list of distinct names."""
        values = self.array(key)
        if values is BAD:
            return BAD
        before, seen = len(self.problems), set()
        for k, value in enumerate(values, 1):
            at = f"{key}[{k}]"
            if isinstance(value, float):
                self.fail(at, FLOAT)
            elif not isinstance(value, str):
                self.fail(at, f"must be a string, not {_kind(value)}")
            elif not NAME.fullmatch(value):
                self.fail(at, NAME_REASON)
            elif value in seen:
                self.fail(at, f"duplicate {what} '{value}'")
            seen.add(value)
        return BAD if len(self.problems) > before else tuple(values)

    def table(self, key, keys, default=None):
        value = self._get(key, "a table", lambda v: isinstance(v, Mapping), default)
        if key not in self.mapping or value is BAD:
            return value
        return _Table(self.problems, self.at(key), value, keys)

    def tables(self, key, keys, default=()):
        """An array of tables (`[[key]]` in TOML)."""
        values = self.array(key, default)
        if key not in self.mapping or values is BAD:
            return values
        found = []
        for k, value in enumerate(values, 1):
            if isinstance(value, Mapping):
                found.append(_Table(self.problems, self.at(f"{key}[{k}]"), value, keys))
            else:
                self.fail(f"{key}[{k}]", f"must be a table, not {_kind(value)}")
                found.append(BAD)
        return found

    def named(self, key, keys):
        """A table of tables keyed by name: [(name, table)]."""
        outer = self.table(key, None)
        if outer is None or outer is BAD:
            return []
        found = []
        for name, value in outer.mapping.items():
            if not isinstance(name, str) or not NAME.fullmatch(name):
                outer.fail(name, "is not a valid name: use 1 to 64 letters, "
                                 "digits, '_' or '-'")
            elif isinstance(value, float):
                outer.fail(name, FLOAT)
            elif not isinstance(value, Mapping):
                outer.fail(name, f"must be a table, not {_kind(value)}")
            else:
                found.append((name, _Table(self.problems, outer.at(name), value, keys)))
        return found

    def moment(self, key):
        """RFC 3339 text or a TOML offset date-time, as microseconds."""
        if key not in self.mapping:
            return self.fail(key, "is required")
        value = self.mapping[key]
        if isinstance(value, float):
            return self.fail(key, FLOAT)
        if isinstance(value, datetime):
            if value.tzinfo is None:
                return self.fail(key, f"needs a UTC offset, {TIME_EXAMPLE}")
            return to_micros(value)
        if isinstance(value, date):
            return self.fail(key, f"needs a time and a UTC offset, {TIME_EXAMPLE}")
        reason = f"must be an RFC 3339 time with a UTC offset, {TIME_EXAMPLE}"
        if not isinstance(value, str):
            return self.fail(key, f"{reason}; not {_kind(value)}")
        if not RFC3339.fullmatch(value):
            return self.fail(key, reason)
        try:
            return to_micros(datetime.fromisoformat(value.upper()))
        except (ValueError, OverflowError):
            return self.fail(key, f"is not a real time: {value}")

    def time_zone(self, key, default=REQUIRED):
        value = self.text(key, default)
        if key in self.mapping and value is not BAD and not _zone_exists(value):
            return self.fail(key, f"unknown time zone '{value}': use an IANA "
                                  f"name such as Europe/Moscow")
        return value


def _zone_exists(name):
    from zoneinfo import ZoneInfo
    try:
        ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        return False
    return True


def _checked(problems, build):
    """`build()`'s result, or BAD if it recorded any problem."""
    before = len(problems)
    value = build()
    return BAD if len(problems) > before else value


# --- sections ----------------------------------------------------------------

def _rate(t, required):
    given = [k for k in RATE_KEYS if k in t]
    if "percent_bp" in given and len(given) > 1:
        return t.fail("percent_bp", "give either percent_bp, or points and per, not both")
    if "percent_bp" in given:
        percent = t.integer("percent_bp", 0, BASIS, hint=BP)
        return BAD if percent is BAD else Rate(percent_bp=percent)
    if given:
        points, per = t.integer("points", 0), t.integer("per", 1)
        return BAD if _bad(points, per) else Rate(points=points, per=per)
    if required:
        return t.fail(None, "needs a rate: percent_bp, or points and per")
    return None


def _items(t):
    return Items(t.names("categories", "category"), t.names("flags", "flag"))


def _earn(t):
    rate = _rate(t, required=True)
    categories = tuple(CategoryRate(name, _rate(sub, required=True))
                       for name, sub in t.named("categories", RATE_KEYS))
    return Earn(rate, t.choice("rounding", ROUNDINGS, "down"),
                t.choice("rounding_scope", ROUNDING_SCOPES, "receipt"),
                t.names("exclude_flags", "flag"), categories)


def _spend(t):
    return Spend(t.integer("cap_bp", 1, BASIS, hint=BP),
                 t.integer("min_balance", 0, default=0),
                 t.integer("min_points", 0, default=0),
                 t.integer("min_receipt", 0, default=0),
                 t.names("exclude_flags", "flag"),
                 t.names("exclude_categories", "category"))


def _expiry(t, key, default):
    if key not in t:
        return default
    value = t.mapping[key]
    shape = 'must be "never" or a table such as { days = 365 }'
    if value == "never":
        return Expiry()
    if isinstance(value, float):
        return t.fail(key, FLOAT)
    if not isinstance(value, Mapping):
        return t.fail(key, shape if isinstance(value, str) else f"{shape}, not {_kind(value)}")
    sub = _Table(t.problems, t.at(key), value, ("days", "end_of", "periods_later"))

    def build():
        if "days" in sub and "end_of" in sub:
            return sub.fail(None, "give either days or end_of, not both")
        if "days" in sub:
            if "periods_later" in sub:
                sub.fail("periods_later", "goes with end_of, not days")
            return Expiry(days=sub.integer("days", 1, MAX_DAYS))
        if "end_of" in sub:
            return Expiry(end_of=sub.choice("end_of", EXPIRY_PERIODS),
                          periods_later=sub.integer("periods_later", 0, 100, default=0))
        return sub.fail(None, 'needs days or end_of (or write expiry = "never")')
    return _checked(t.problems, build)


def _too_short(activation, expiry):
    """Why points under this policy could expire before they activate."""
    if not activation or expiry.never:
        return None
    if expiry.days is not None:
        if expiry.days <= activation:
            return (f"points would expire before they activate: expiry after "
                    f"{expiry.days} days, activation after {activation} days")
        return None
    if expiry.periods_later * SHORTEST_DAYS[expiry.end_of] <= activation:
        return (f"points earned at the end of a {expiry.end_of} would expire "
                f"before they activate after {activation} days: raise periods_later")
    return None


def _lifetime(t):
    activation = t.integer("activation_days", 0, MAX_DAYS, default=0)
    expiry = _expiry(t, "expiry", Expiry())
    overrides = []
    for kind in BONUS_KINDS:
        sub = t.table(kind, ("activation_days", "expiry"))
        if sub is not None and sub is not BAD:
            overrides.append((sub, LifetimeOverride(
                kind, sub.integer("activation_days", 0, MAX_DAYS, default=None),
                _expiry(sub, "expiry", None))))
    if _bad(activation, expiry, *(v for _, o in overrides
                                  for v in (o.activation_days, o.expiry))):
        return BAD
    lifetime = Lifetime(activation, expiry, tuple(o for _, o in overrides))
    reason = _too_short(activation, expiry)
    if reason:
        t.fail("expiry", reason)
    for sub, o in overrides:
        resolved = lifetime.for_kind(o.kind)
        reason = _too_short(resolved.activation_days, resolved.expiry)
        if reason and (o.activation_days is not None or o.expiry is not None):
            sub.fail("expiry" if o.expiry is not None else "activation_days", reason)
    return lifetime


def _tiers(t):
    period = t.choice("period", TIER_PERIODS, "month")
    levels = t.tables("level", ("name", "min_spend", "discount_bp") + RATE_KEYS,
                      default=REQUIRED)
    if levels is BAD:
        return BAD
    if not levels:
        return t.fail("level", "needs at least one tier")
    tiers, names, previous = [], set(), None
    for k, lt in enumerate(levels, 1):
        if lt is BAD:
            continue
        name, spend = lt.name("name"), lt.integer("min_spend", 0)
        tiers.append(Tier(name, spend, _rate(lt, required=False),
                          lt.integer("discount_bp", 0, BASIS, default=0, hint=BP)))
        if name is not BAD and name in names:
            lt.fail("name", f"duplicate tier name '{name}'")
        names.add(name)
        if spend is BAD:
            continue
        if k == 1 and spend != 0:
            lt.fail("min_spend", "must be 0 for the first tier, so every member has a tier")
        elif previous is not None and spend <= previous:
            lt.fail("min_spend", f"must be above the previous tier's min_spend "
                                 f"({previous}): list tiers from lowest to highest")
        previous = spend if previous is None else max(previous, spend)
    return Tiers(tuple(tiers), period)


def _bonuses(t):
    actions = []
    for name, sub in t.named("actions", ("points", "limit", "limit_period")):
        limit = sub.integer("limit", 1, default=None)
        period = sub.choice("limit_period", PERIODS, default=None)
        if period is not None and "limit" not in sub:
            sub.fail("limit_period", "needs limit: how many times in that period")
        actions.append(Action(name, sub.integer("points", 1), limit, period))
    visits = t.table("visits", ("count", "points", "period", "min_receipt"))
    if visits is not None and visits is not BAD:
        visits = VisitBonus(visits.integer("count", 1), visits.integer("points", 1),
                            visits.choice("period", PERIODS, "month"),
                            visits.integer("min_receipt", 0, default=0))
    return Bonuses(t.integer("welcome", 0, default=0), t.integer("birthday", 0, default=0),
                   tuple(actions), visits)


def _referral(t):
    referral = Referral(t.integer("window_days", 1, MAX_DAYS),
                        t.integer("newcomer_discount_bp", 0, BASIS, default=0, hint=BP),
                        t.integer("referrer_share_bp", 0, BASIS, default=0, hint=BP))
    if referral.newcomer_discount_bp == 0 and referral.referrer_share_bp == 0:
        t.fail(None, "gives nothing: set newcomer_discount_bp or referrer_share_bp, "
                     "or write referral = false")
    return referral


def _coupon(t):
    coupon = Coupon(t.integer("threshold", 1), t.integer("value", 1),
                    t.integer("usable_after_days", 0, MAX_DAYS, default=0),
                    t.integer("valid_days", 1, MAX_DAYS, default=None),
                    t.integer("valid_months", 1, MAX_MONTHS, default=None),
                    t.boolean("one_per_customer", True))
    if coupon.valid_days is None and coupon.valid_months is None:
        return t.fail(None, "needs valid_days or valid_months")
    if "valid_days" in t and "valid_months" in t:
        return t.fail(None, "give either valid_days or valid_months, not both")
    if _bad(coupon.usable_after_days, coupon.valid_days, coupon.valid_months):
        return BAD
    if coupon.valid_days is not None:
        shortest, validity = coupon.valid_days, f"{coupon.valid_days} days"
    else:
        shortest, validity = 28 * coupon.valid_months, f"{coupon.valid_months} months"
    if coupon.usable_after_days >= shortest:
        t.fail("usable_after_days", f"must be less than the coupon's validity "
                                    f"({validity}), or it expires before it can be used")
    return coupon


def _regular_customer(t):
    return RegularCustomer(
        t.integer("min_visits", 1, VISIT_DAYS,
                  hint=f" (the ledger keeps a member's last {VISIT_DAYS} visit days)"),
        t.integer("within_days", 1, MAX_DAYS))


def _discounts(t):
    offers = []
    for name, sub in t.named("offers", ("percent_bp", "amount", "additive",
                                        "min_receipt", "when")):
        if "percent_bp" in sub and "amount" in sub:
            sub.fail(None, "give either percent_bp or amount, not both")
        elif "percent_bp" not in sub and "amount" not in sub:
            sub.fail(None, "needs percent_bp or amount")
        when = sub.table("when", ("tiers", "regular", "newcomer"))
        tiers, regular, newcomer = (), False, False
        if when is not None and when is not BAD:
            tiers = when.names("tiers", "tier")
            if "tiers" in when and tiers == ():
                when.fail("tiers", "must name at least one tier (or leave tiers out)")
            regular, newcomer = when.boolean("regular", False), when.boolean("newcomer", False)
        offers.append(Offer(name, sub.integer("percent_bp", 1, BASIS, default=None, hint=BP),
                            sub.integer("amount", 1, default=None),
                            sub.boolean("additive", False),
                            sub.integer("min_receipt", 0, default=0),
                            tiers, regular, newcomer))
    return Discounts(t.names("exclude_flags", "flag"), tuple(offers))


PARSERS = {
    "items": (_items, ("categories", "flags")),
    "earn": (_earn, RATE_KEYS + ("rounding", "rounding_scope", "exclude_flags",
                                 "categories")),
    "spend": (_spend, ("cap_bp", "min_balance", "min_points", "min_receipt",
                       "exclude_flags", "exclude_categories")),
    "lifetime": (_lifetime, ("activation_days", "expiry") + BONUS_KINDS),
    "tiers": (_tiers, ("period", "level")),
    "bonuses": (_bonuses, ("welcome", "birthday", "actions", "visits")),
    "referral": (_referral, ("window_days", "newcomer_discount_bp", "referrer_share_bp")),
    "coupon": (_coupon, ("threshold", "value", "usable_after_days", "valid_days",
                         "valid_months", "one_per_customer")),
    "regular_customer": (_regular_customer, ("min_visits", "within_days")),
    "discounts": (_discounts, ("exclude_flags", "offers")),
}


def _section(vt, section):
    if section == "point_value":
        return vt.integer("point_value", 1)
    value = vt.mapping[section]
    if section in OPTIONAL and isinstance(value, bool):
        return None if value is False else vt.fail(
            section, "must be a table, or false to end it")
    parse, keys = PARSERS[section]
    # Counted from before the table is opened, so an unknown key in it
    # makes the section BAD too.
    before = len(vt.problems)
    sub = vt.table(section, keys)
    value = BAD if sub is BAD else parse(sub)
    return BAD if len(vt.problems) > before else value


# --- checks between sections -------------------------------------------------

def _cross_checks(vt, number, values, origins):
    """References from one section into another. Run for a version only when
    it states one of the two sections, so a problem is reported once, where
    it arose, not again in every later version that carries it over."""
    v = values

    def due(*sections):
        return (not _bad(*(v[s] for s in sections))
                and any(origins[s] == number for s in sections))

    def fail(path, reason, *sections):
        carried = [f"{s} from version {origins[s]}" for s in sections
                   if origins[s] != number]
        if carried:
            reason += f" ({', '.join(carried)} carried over)"
        vt.fail(path, reason)

    def known(path, values_, allowed, what, where, *sections):
        for k, value in enumerate(values_, 1):
            if value not in allowed:
                fail(f"{path}[{k}]", f"unknown {what} '{value}': not in {where}", *sections)

    items = v["items"]
    if due("earn", "items"):
        known("earn.exclude_flags", v["earn"].exclude_flags, items.flags, "flag",
              "items.flags", "earn", "items")
        for c in v["earn"].categories:
            if c.category not in items.categories:
                fail(f"earn.categories.{c.category}", f"unknown category "
                     f"'{c.category}': not in items.categories", "earn", "items")
    if due("spend", "items"):
        known("spend.exclude_flags", v["spend"].exclude_flags, items.flags, "flag",
              "items.flags", "spend", "items")
        known("spend.exclude_categories", v["spend"].exclude_categories,
              items.categories, "category", "items.categories", "spend", "items")
    if due("discounts", "items"):
        known("discounts.exclude_flags", v["discounts"].exclude_flags, items.flags,
              "flag", "items.flags", "discounts", "items")

    def worth(rate, path, section):
        value = v["point_value"]
        if rate is not None and rate.points is not None and rate.points * value > rate.per:
            fail(f"{path}.points", f"earns more than the money it is earned on: "
                 f"{rate.points} points worth {value} each exceed per {rate.per}",
                 section, "point_value")
    if due("earn", "point_value"):
        worth(v["earn"].rate, "earn", "earn")
        for c in v["earn"].categories:
            worth(c.rate, f"earn.categories.{c.category}", "earn")
    if v["tiers"] is not None and due("tiers", "point_value"):
        for k, tier in enumerate(v["tiers"].levels, 1):
            worth(tier.rate, f"tiers.level[{k}]", "tiers")

    for offer in () if _bad(v["discounts"]) else v["discounts"].offers:
        at = f"discounts.offers.{offer.name}.when"
        if due("discounts", "tiers"):
            for k, name in enumerate(offer.tiers, 1):
                if v["tiers"] is None:
                    fail(f"{at}.tiers[{k}]", f"unknown tier '{name}': the version "
                         f"has no tiers", "discounts", "tiers")
                elif name not in v["tiers"].tier:
                    fail(f"{at}.tiers[{k}]", f"unknown tier '{name}': not in "
                         f"tiers.level", "discounts", "tiers")
        if offer.regular and v["regular_customer"] is None and due("discounts", "regular_customer"):
            fail(f"{at}.regular", "needs a regular_customer section saying who "
                 "is a regular", "discounts", "regular_customer")
        if offer.newcomer and v["referral"] is None and due("discounts", "referral"):
            fail(f"{at}.newcomer", "needs a referral section: newcomers are "
                 "referred members", "discounts", "referral")


# --- the whole definition ----------------------------------------------------

def _versions(top, problems):
    tables = top.tables("version", ("number", "effective_from", "note") + SECTIONS,
                        default=REQUIRED)
    if tables is BAD:
        return BAD
    if not tables:
        return top.fail("version", "needs at least one [[version]]")
    versions, values, origins = [], {}, {}
    previous = previous_number = None  # the last valid effective_from
    for number, vt in enumerate(tables, 1):
        if vt is BAD:
            return BAD  # later versions carry sections over from this one
        given = vt.integer("number", 1, U32_MAX)
        if given is not BAD and given != number:
            vt.fail("number", f"must be {number}: versions are numbered 1, 2, 3, "
                              f"... in the order they appear")
        start = vt.moment("effective_from")
        if start is not BAD and previous is not None:
            if start == previous:
                vt.fail("effective_from", f"is the same as version {previous_number}'s: "
                                          f"each version needs its own start")
            elif start < previous:
                vt.fail("effective_from", f"must be later than version "
                                          f"{previous_number}'s effective_from")
        if start is not BAD:
            previous, previous_number = start, number
        note = vt.text("note", "", limit=MAX_NOTE, empty=True)
        for section in SECTIONS:
            if section in vt:
                values[section], origins[section] = _section(vt, section), number
            elif number == 1:
                if section in REQUIRED_FIRST:
                    vt.fail(section, "is required in the first version")
                values[section] = DEFAULTS.get(section, BAD)
                origins[section] = number
        _cross_checks(vt, number, values, origins)
        if not problems:
            versions.append(Version(number=number, effective_from=start, note=note,
                                    **values))
    return tuple(versions)


def _partners(top):
    partners, ids, names = [], set(), set()
    tables = top.tables("partner", ("id", "name"))
    for t in () if tables is BAD else tables:
        if t is BAD:
            continue
        partner = Partner(t.integer("id", 1, U32_MAX), t.text("name"))
        if partner.id is not BAD and partner.id in ids:
            t.fail("id", f"duplicate partner id {partner.id}")
        if partner.name is not BAD and partner.name in names:
            t.fail("name", f"duplicate partner name '{partner.name}'")
        ids.add(partner.id)
        names.add(partner.name)
        partners.append(partner)
    return tuple(partners), ids


def _stores(top, program_zone, partner_ids):
    stores, ids = [], set()
    tables = top.tables("store", ("id", "name", "partner", "time_zone", "lanes"))
    for t in () if tables is BAD else tables:
        if t is BAD:
            continue
        store_id = t.integer("id", 1, U32_MAX)
        if store_id is not BAD and store_id in ids:
            t.fail("id", f"duplicate store id {store_id}")
        ids.add(store_id)
        partner = t.integer("partner", 1, U32_MAX, default=0)
        if partner_ids and "partner" not in t:
            t.fail("partner", "is required: the program has partners, so every "
                              "store names one")
        elif partner and partner is not BAD and partner not in partner_ids:
            t.fail("partner", f"unknown partner {partner}: " + (
                "not among the [[partner]] ids" if partner_ids
                else "the program has no partners"))
        lanes = t.array("lanes", REQUIRED)
        if lanes is not BAD:
            if not lanes:
                t.fail("lanes", "needs at least one lane")
            seen = set()
            for k, lane in enumerate(lanes, 1):
                at = f"lanes[{k}]"
                if isinstance(lane, float):
                    t.fail(at, FLOAT)
                elif not _is_int(lane):
                    t.fail(at, f"must be an integer, not {_kind(lane)}")
                elif not 1 <= lane <= U32_MAX:
                    t.fail(at, f"must be between 1 and {U32_MAX}")
                elif lane in seen:
                    t.fail(at, f"duplicate lane {lane}")
                seen.add(lane)
            lanes = tuple(lanes)
        stores.append(Store(store_id, t.time_zone("time_zone", program_zone),
                            lanes, partner, t.text("name", "")))
    return tuple(stores)


def parse(mapping):
    problems = []
    if not isinstance(mapping, Mapping):
        raise ProgramError([Problem("", f"a program must be a table, not {_kind(mapping)}")])
    top = _Table(problems, "", mapping, ("program", "partner", "store", "version"))
    head = top.table("program", ("id", "name", "currency", "time_zone", "allow_debt"),
                     default=REQUIRED)
    zone = BAD
    if head is not BAD:
        program_id, name = head.integer("id", 1, U32_MAX), head.text("name")
        currency = head.text("currency")
        if currency is not BAD and not CURRENCY.fullmatch(currency):
            currency = head.fail("currency", "must be an ISO 4217 code: three "
                                             "capital letters, e.g. RUB")
        zone = head.time_zone("time_zone")
        allow_debt = head.boolean("allow_debt", False)
    partners, partner_ids = _partners(top)
    stores = _stores(top, zone, partner_ids)
    versions = _versions(top, problems)
    if problems:
        raise ProgramError(problems)
    return Program(program_id, name, currency, zone, versions, allow_debt,
                   partners, stores)


# --- writing -------------------------------------------------------------------

def _rate_dict(rate):
    if rate.percent_bp is not None:
        return {"percent_bp": rate.percent_bp}
    return {"points": rate.points, "per": rate.per}


def _expiry_dict(expiry):
    if expiry.never:
        return "never"
    if expiry.days is not None:
        return {"days": expiry.days}
    return {"end_of": expiry.end_of, "periods_later": expiry.periods_later}


def _without_none(mapping):
    return {k: v for k, v in mapping.items() if v is not None}


def _version_dict(v, zone):
    lifetime = {"activation_days": v.lifetime.activation_days,
                "expiry": _expiry_dict(v.lifetime.expiry)}
    for o in v.lifetime.overrides:
        lifetime[o.kind] = _without_none({
            "activation_days": o.activation_days,
            "expiry": None if o.expiry is None else _expiry_dict(o.expiry)})
    out = {
        "number": v.number,
        "effective_from": format_time(v.effective_from, zone),
        "note": v.note,
        "point_value": v.point_value,
        "items": {"categories": list(v.items.categories), "flags": list(v.items.flags)},
        "earn": {**_rate_dict(v.earn.rate), "rounding": v.earn.rounding,
                 "rounding_scope": v.earn.rounding_scope,
                 "exclude_flags": list(v.earn.exclude_flags),
                 "categories": {c.category: _rate_dict(c.rate) for c in v.earn.categories}},
        "spend": {"cap_bp": v.spend.cap_bp, "min_balance": v.spend.min_balance,
                  "min_points": v.spend.min_points, "min_receipt": v.spend.min_receipt,
                  "exclude_flags": list(v.spend.exclude_flags),
                  "exclude_categories": list(v.spend.exclude_categories)},
        "lifetime": lifetime,
        "tiers": False if v.tiers is None else {
            "period": v.tiers.period,
            "level": [{"name": t.name, "min_spend": t.min_spend,
                       **({} if t.rate is None else _rate_dict(t.rate)),
                       "discount_bp": t.discount_bp} for t in v.tiers.levels]},
        "bonuses": {
            "welcome": v.bonuses.welcome, "birthday": v.bonuses.birthday,
            "actions": {a.name: _without_none({"points": a.points, "limit": a.limit,
                                               "limit_period": a.limit_period})
                        for a in v.bonuses.actions},
            **({} if v.bonuses.visits is None else {"visits": {
                "count": v.bonuses.visits.count, "points": v.bonuses.visits.points,
                "period": v.bonuses.visits.period,
                "min_receipt": v.bonuses.visits.min_receipt}})},
        "referral": False if v.referral is None else {
            "window_days": v.referral.window_days,
            "newcomer_discount_bp": v.referral.newcomer_discount_bp,
            "referrer_share_bp": v.referral.referrer_share_bp},
        "coupon": False if v.coupon is None else _without_none({
            "threshold": v.coupon.threshold, "value": v.coupon.value,
            "usable_after_days": v.coupon.usable_after_days,
            "valid_days": v.coupon.valid_days, "valid_months": v.coupon.valid_months,
            "one_per_customer": v.coupon.one_per_customer}),
        "regular_customer": False if v.regular_customer is None else {
            "min_visits": v.regular_customer.min_visits,
            "within_days": v.regular_customer.within_days},
        "discounts": {
            "exclude_flags": list(v.discounts.exclude_flags),
            "offers": {o.name: _without_none({
                "percent_bp": o.percent_bp, "amount": o.amount,
                "additive": o.additive, "min_receipt": o.min_receipt,
                "when": {**({"tiers": list(o.tiers)} if o.tiers else {}),
                         "regular": o.regular, "newcomer": o.newcomer}})
                for o in v.discounts.offers}},
    }
    return out


def dump(program):
    out = {"program": {"id": program.id, "name": program.name,
                       "currency": program.currency, "time_zone": program.time_zone,
                       "allow_debt": program.allow_debt}}
    if program.partners:
        out["partner"] = [{"id": p.id, "name": p.name} for p in program.partners]
    if program.stores:
        out["store"] = [{"id": s.id, **({"name": s.name} if s.name else {}),
                         **({"partner": s.partner} if s.partner else {}),
                         "time_zone": s.time_zone, "lanes": list(s.lanes)}
                        for s in program.stores]
    out["version"] = [_version_dict(v, program.time_zone) for v in program.versions]
    return out
