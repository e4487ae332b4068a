"""A loyalty program's definition: who it is and the rules it prices receipts by.

A chain's operations people keep the definition in a TOML file under version
control; the server will accept the same definition as a mapping over its
API. Either way it passes `parse_program`, which refuses anything doubtful and
reports every problem at once, each under its full key path, because a
half-understood rule is how a loyalty program gives away or loses money.

The file, in brief (`examples/programs/example.toml` is a full, commented one)::

    [program]                    # identity, never versioned
    id = 1                       # the ledger's program id (u32)
    name = "Demo chain"
    currency = "RUB"             # ISO 4217
    time_zone = "Europe/Moscow"  # IANA; dates in rules (periods, birthdays,
                                 # coupon windows) are taken in this zone
    allow_debt = false           # may a refund's clawback leave a member owing?

    [[partner]]                  # coalition partners; none for a single brand
    id = 1
    name = "Books & Co"

    [[store]]
    id = 42
    partner = 1                  # required when there are partners
    time_zone = "Europe/Moscow"  # defaults to the program's
    lanes = [1, 2, 3]

    [[version]]                  # the rules; one block per change
    number = 1                   # 1, 2, 3, ... in file order, never reused
    effective_from = 2024-01-01T00:00:00+03:00   # RFC 3339, offset required
    note = "launch"
    point_value = 100            # money minor units one point is worth
    [version.items]              # vocabulary a receipt line may use
    categories = ["books", ...]
    flags = ["promo", ...]
    [version.earn]               # percent_bp = 500, or points = 1 + per = 2000
    [version.spend]              # cap_bp, min_balance, min_points, min_receipt, ...
    [version.lifetime]           # activation_days, expiry, overrides per kind
    [version.tiers]              # period + [[version.tiers.level]]
    [version.bonuses]            # welcome, birthday, actions, visits
    [version.referral]           # newcomer discount, referrer share, window
    [version.coupon]             # threshold, value, usable after, valid for
    [version.regular_customer]   # who counts as a regular (for discounts)
    [version.discounts]          # exclude_flags + [version.discounts.offers.NAME]

Conventions, the same everywhere:
- No floats, anywhere: money is integer minor units (150_000 is 1,500.00
  rubles), points are integers, shares are basis points (100 bp = 1%,
  10_000 bp = 100%). A float is refused under its key.
- A rate is written in the table that uses it, either `percent_bp` (of the
  price) or `points` and `per` ("points for every `per` money minor units").
- Names (categories, flags, tiers, actions, offers) are 1 to 64 of
  `A-Z a-z 0-9 _ -`, so they work as bare TOML keys.
- Problem paths count array positions from 1: `version[2].tiers.level[1]`.

Versions are cumulative so a change is short to write and easy to review: a
version states only the sections it changes, and each section it states
replaces the previous version's section whole (no merging inside a section).
`point_value` counts as a section. `referral = false` (also `tiers`,
`coupon`, `regular_customer`) ends that feature from this version on.
Version 1 must state `point_value`, `earn` and `spend`; other sections
default to "none" (no tiers, no bonuses, points never expire, ...).
`Program.to_dict()` writes every version out in full, so any one of them can
be read on its own.

How the rules combine is the pricing engine's business; what they mean is
recorded here so both sides read them alike:
- A line in a category of `earn.categories` earns that category's rate;
  otherwise the member's tier rate if the tier has one; otherwise the base
  rate. A line with a flag in `earn.exclude_flags` earns nothing.
- Discounts do not add up: a member gets the best one they qualify for (a
  tier's `discount_bp` and the referral newcomer discount compete as
  discounts too), plus every offer marked `additive`. Lines with a flag in
  `discounts.exclude_flags` take no discount at all.
- Days are exact 24-hour days from the sale's business time; `end_of`
  periods, visit periods and action limit periods are calendar periods in
  the program's time zone; tier periods are calendar periods of its
  standard UTC offset (the ledger's months of net spend: core/bonuses.py).
- A regular customer made purchases on at least `min_visits` days (at most
  16) among the `within_days` days ending on the receipt's day, in the
  program's standard UTC offset; the receipt being priced does not count.
- Tier numbers in the ledger are levels from 1; 0 (a member no close has
  placed) prices as the lowest level.
"""

import bisect
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property
from zoneinfo import ZoneInfo

from .records import PROGRAM_ALLOW_DEBT

BASIS = 10_000  # basis points in a whole
ROUNDINGS = ("down", "up", "half_up")
ROUNDING_SCOPES = ("receipt", "line")
PERIODS = ("day", "week", "month", "quarter", "year")
EXPIRY_PERIODS = ("day", "month", "quarter", "year")
TIER_PERIODS = ("month", "quarter", "year")
BONUS_KINDS = ("purchase", "welcome", "birthday", "action", "visits",
               "referral", "adjustment")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ProgramError(ValueError):
    """A program definition was refused; `problems` lists every reason."""

    def __init__(self, problems):
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid program ({len(self.problems)} problems):\n{lines}")


def per_version(build):
    """`build(version)`, remembered per Version object: what pricing derives
    from a version once (plans, vocabularies) rather than per receipt.
    Keyed by identity, as versions are immutable and not hashable; bounded."""
    memo = {}

    def cached(version):
        entry = memo.get(id(version))
        if entry is None or entry[0] is not version:
            if len(memo) > 1024:
                memo.clear()
            entry = memo[id(version)] = (version, build(version))
        return entry[1]
    return cached


# --- the rules -------------------------------------------------------------
# Built only by parse_program, which has checked every value; nothing below
# re-validates, so pricing can trust a Program it is handed.

@dataclass(frozen=True)
class Rate:
    """Earning rate: `percent_bp` of the price, or `points` per `per` money."""
    percent_bp: int | None = None
    points: int | None = None
    per: int | None = None

    def fraction(self, point_value):
        """Points per money minor unit as an exact (numerator, denominator),
        so pricing can multiply first and round once, without floats."""
        if self.percent_bp is not None:
            return self.percent_bp, BASIS * point_value
        return self.points, self.per


@dataclass(frozen=True)
class CategoryRate:
    category: str
    rate: Rate


@dataclass(frozen=True)
class Items:
    categories: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Earn:
    rate: Rate
    rounding: str = "down"
    rounding_scope: str = "receipt"
    exclude_flags: tuple[str, ...] = ()
    categories: tuple[CategoryRate, ...] = ()

    @cached_property
    def category_rates(self):
        return {c.category: c.rate for c in self.categories}


@dataclass(frozen=True)
class Spend:
    cap_bp: int
    min_balance: int = 0
    min_points: int = 0
    min_receipt: int = 0
    exclude_flags: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Expiry:
    """Never (both None), `days` after earning, or at the end of the
    calendar period `end_of`, `periods_later` periods after the earning one."""
    days: int | None = None
    end_of: str | None = None
    periods_later: int = 0

    @property
    def never(self):
        return self.days is None and self.end_of is None


@dataclass(frozen=True)
class LifetimeOverride:
    """A bonus kind's own activation and/or expiry; None keeps the program's."""
    kind: str
    activation_days: int | None = None
    expiry: Expiry | None = None


@dataclass(frozen=True)
class Lifetime:
    activation_days: int = 0
    expiry: Expiry = Expiry()
    overrides: tuple[LifetimeOverride, ...] = ()

    def for_kind(self, kind):
        """The activation and expiry points of `kind` (a BONUS_KINDS name) get."""
        if kind not in BONUS_KINDS:
            raise ValueError(f"unknown bonus kind {kind!r}")
        for o in self.overrides:
            if o.kind == kind:
                return Lifetime(
                    self.activation_days if o.activation_days is None
                    else o.activation_days,
                    self.expiry if o.expiry is None else o.expiry)
        return Lifetime(self.activation_days, self.expiry)


@dataclass(frozen=True)
class Tier:
    name: str
    min_spend: int           # money spent in the previous period, at least
    rate: Rate | None = None
    discount_bp: int = 0


@dataclass(frozen=True)
class Tiers:
    levels: tuple[Tier, ...]
    period: str = "month"

    @cached_property
    def tier(self):
        return {t.name: t for t in self.levels}

    def name(self, number):
        """The name of tier `number` as the ledger keeps it (1: the lowest
        level, 0: none), or None when this version has no such level."""
        return self.levels[number - 1].name if 1 <= number <= len(self.levels) else None


@dataclass(frozen=True)
class Action:
    name: str
    points: int
    limit: int | None = None         # times per member; None: no limit
    limit_period: str | None = None  # None: over the membership


@dataclass(frozen=True)
class VisitBonus:
    count: int
    points: int
    period: str = "month"
    min_receipt: int = 0   # smaller receipts are not visits


@dataclass(frozen=True)
class Bonuses:
    welcome: int = 0
    birthday: int = 0
    actions: tuple[Action, ...] = ()
    visits: VisitBonus | None = None

    @cached_property
    def action(self):
        return {a.name: a for a in self.actions}


@dataclass(frozen=True)
class Referral:
    window_days: int
    newcomer_discount_bp: int = 0   # off the newcomer's first purchase
    referrer_share_bp: int = 0      # of what the newcomer paid, in points' worth


@dataclass(frozen=True)
class Coupon:
    threshold: int
    value: int
    usable_after_days: int = 0
    valid_days: int | None = None     # exactly one of valid_days and
    valid_months: int | None = None   # valid_months, counted from the sale
    one_per_customer: bool = True


@dataclass(frozen=True)
class RegularCustomer:
    min_visits: int
    within_days: int


@dataclass(frozen=True)
class Offer:
    name: str
    percent_bp: int | None = None    # exactly one of percent_bp and amount
    amount: int | None = None
    additive: bool = False
    min_receipt: int = 0
    tiers: tuple[str, ...] = ()      # conditions; all given must hold
    regular: bool = False
    newcomer: bool = False


@dataclass(frozen=True)
class Discounts:
    exclude_flags: tuple[str, ...] = ()
    offers: tuple[Offer, ...] = ()


@dataclass(frozen=True)
class Version:
    number: int
    effective_from: int              # microseconds since the epoch
    point_value: int
    earn: Earn
    spend: Spend
    note: str = ""
    items: Items = Items()
    lifetime: Lifetime = Lifetime()
    tiers: Tiers | None = None
    bonuses: Bonuses = Bonuses()
    referral: Referral | None = None
    coupon: Coupon | None = None
    regular_customer: RegularCustomer | None = None
    discounts: Discounts = Discounts()


@dataclass(frozen=True)
class Partner:
    id: int
    name: str


@dataclass(frozen=True)
class Store:
    id: int
    time_zone: str
    lanes: tuple[int, ...]
    partner: int = 0   # 0: the program itself (no coalition)
    name: str = ""


@dataclass(frozen=True)
class Program:
    id: int
    name: str
    currency: str
    time_zone: str
    versions: tuple[Version, ...]
    allow_debt: bool = False
    partners: tuple[Partner, ...] = ()
    stores: tuple[Store, ...] = ()
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_starts",
                           tuple(v.effective_from for v in self.versions))

    @property
    def kernel_flags(self):
        """Flags for the kernel's PUT_PROGRAM operation."""
        return PROGRAM_ALLOW_DEBT if self.allow_debt else 0

    @property
    def coalition(self):
        return bool(self.partners)

    @cached_property   # a frozen dataclass: reckoned once (checkouts ask each time)
    def zone(self):
        return ZoneInfo(self.time_zone)

    @cached_property
    def utc_offset_minutes(self):
        """The zone's standard offset (the smaller of winter's and summer's:
        daylight saving adds), which the ledger counts members' days by."""
        zone = self.zone
        return min(int(datetime(2025, month, 1, tzinfo=zone).utcoffset().total_seconds())
                   // 60 for month in (1, 7))

    def version_at(self, t):
        """The version in force at `t` (microseconds): the latest one whose
        effective_from is not after it. Receipts are priced by their business
        time, so a sale uploaded late is priced as it was then."""
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"time must be integer microseconds, not {type(t).__name__}")
        index = bisect.bisect_right(self._starts, t) - 1
        if index < 0:
            raise LookupError(
                f"program {self.id} has no version in force at "
                f"{format_time(t, self.time_zone)}: version 1 starts at "
                f"{format_time(self._starts[0], self.time_zone)}")
        return self.versions[index]

    def version(self, number):
        """The version the journal names (refunds, audits of old receipts)."""
        if not 1 <= number <= len(self.versions):
            raise LookupError(f"program {self.id} has no version {number}")
        return self.versions[number - 1]

    @cached_property
    def store(self):
        return {s.id: s for s in self.stores}

    @cached_property
    def partner(self):
        return {p.id: p for p in self.partners}

    def to_dict(self):
        """The definition as plain data in the file's shape, every version in
        full; `parse_program(p.to_dict()) == p`."""
        from .program_schema import dump
        return dump(self)


def to_micros(moment):
    """An aware datetime as integer microseconds since the epoch."""
    return (moment - EPOCH) // MICROSECOND


def format_time(micros, time_zone="UTC"):
    """RFC 3339 text for a time in microseconds, in `time_zone`'s offset."""
    moment = (EPOCH + micros * MICROSECOND).astimezone(ZoneInfo(time_zone))
    if moment.utcoffset() % timedelta(minutes=1):
        moment = moment.astimezone(timezone.utc)  # RFC 3339 offsets are whole minutes
    return moment.isoformat()


def parse_program(mapping):
    """A Program from plain data (parsed TOML or an API payload), or
    ProgramError listing every problem."""
    from .program_schema import parse
    return parse(mapping)


def load_program(source):
    """A Program from a TOML file or TOML text.

    `source` is a path (pathlib.Path, or a str without a newline), TOML text
    (a str with at least one newline), or bytes of TOML."""
    import os
    import tomllib

    if isinstance(source, bytes):
        text = source.decode("utf-8")
    elif isinstance(source, str) and "\n" in source:
        text = source
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            text = f.read().decode("utf-8")
    else:
        raise TypeError(f"expected a path or TOML text, not {type(source).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProgramError([Problem("", f"not valid TOML: {e}")]) from None
    return parse_program(data)
