"""The Feed's reports, from the ledger's aggregates (no gRPC here).

The kernel keeps, as it commits, hourly activity rows per (store, partner,
tier), hourly settlement rows per (issuing, redeeming) partner pair,
member-day rows, hourly coupon rows per (store, partner), and running
totals: members enrolled, points settled per partner pair (layout in
core/records.py). A report reads those rows and nothing else: never the
journal, never the accounts. This module has two
halves:

- pure functions (`points_rows`, `receipt_rows`, ...) that turn rows into
  report rows, given iterables of aggregate rows and a `Calendar`;
- `gather(ledger, ...)`, which reads what one report needs from a single
  LMDB read transaction (so the rows, the system balances and the cursor
  reported are one consistent snapshot) and calls the pure function.

Conventions of every report:
- An interval of operation times is rounded out to whole UTC hours (the
  activity rows are hourly): [floor(start), ceil(end)).
- Days (DAY) of the points, average receipt and breakage reports are
  calendar days in the program's time zone (zoneinfo), each hour counted in
  the day it starts in: exact for zones whose offsets are whole hours, across
  daylight saving changes too. Members' days (active members, visits) are
  the kernel's: local days by the program's *standard* UTC offset
  (`Program.utc_offset_minutes`), so in summer time they run 01:00 to 01:00;
  those reports round their interval out to whole such days.
- Money values of points use the point value of the version in force at the
  start of the hour concerned (for outstanding points: the last hour of the
  row's period).
- Tiers are the tier numbers the kernel kept (the n-th level, from 1; 0:
  none), named from the version in force at that hour; a number no level
  of that version has is shown as "#n".

No figure is summed from the beginning of time: a figure at a moment T is
the total now less what moved after T, so a report reads rows of its
interval and of the time since, never the program's whole past.
Outstanding points (the liability): double entry, the members' balances
and the program's system accounts (issued, redeemed, expired, adjusted;
one set per partner) sum to zero, so the members' total now is minus the
system accounts' sum, and the total at T is that minus the net movements
after T (activity rows from T's hour on). Per partner, though, the system
accounts book a spend at the partner where it happened, whoever issued the
points; the liability of an issuing partner is that booked figure plus
what its points' spending elsewhere has settled by T (its settlement
position: the running totals per partner pair, kept at commit like the
system accounts, less the settlement rows from T's hour on; read only when
grouping by partner). Members enrolled before an interval, likewise: the
running count of enrolments less the new members of the activity rows from
the interval's start on.
"""

import bisect
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from enum import IntEnum
from zoneinfo import ZoneInfo

from kopilka.core.reads import LedgerReads
from kopilka.core.records import DAY, HOUR, I64, MINUTE, PROGRAM, U32

HOURS_END = 1 << 32   # past any hour a u32 key holds
EPOCH_DAY = date(1970, 1, 1)
BASIS = 10_000
HISTOGRAM_BUCKETS = 10   # 1, 2, ... 9 and "10 or more"


class Dimension(IntEnum):
    """The numbers of kopilka.v1.ReportDimension."""
    STORE = 1
    PARTNER = 2
    TIER = 3
    DAY = 4


_MEMBER_DAYS_ONLY = ("{what} are counted from the kernel's member-day rows, "
                     "which record only the member and the day, not the {dim}: "
                     "only REPORT_DIMENSION_DAY (or none) can be given")
_COHORTS = ("breakage is counted from the kernel's cohort rows, which record "
            "the issuing hour and partner of points, not the {dim}: only "
            "REPORT_DIMENSION_PARTNER and REPORT_DIMENSION_DAY can be given")

# report -> {dimension it cannot be grouped by: why (for the BadRequest)}
UNSUPPORTED = {
    "points": {},
    "average_receipt": {},
    "breakage": {d: _COHORTS.format(dim=n) for d, n in (
        (Dimension.STORE, "store"), (Dimension.TIER, "tier"))},
    "active_members": {d: _MEMBER_DAYS_ONLY.format(what="active members", dim=n)
                       for d, n in ((Dimension.STORE, "store"),
                                    (Dimension.PARTNER, "partner"),
                                    (Dimension.TIER, "tier"))},
    "visit_frequency": {d: _MEMBER_DAYS_ONLY.format(what="visits", dim=n)
                        for d, n in ((Dimension.STORE, "store"),
                                     (Dimension.PARTNER, "partner"),
                                     (Dimension.TIER, "tier"))},
    "coupons": {Dimension.TIER: "coupons are counted from the kernel's coupon rows, "
                                "which record the hour, store and partner, not the "
                                "tier: REPORT_DIMENSION_STORE, _PARTNER and _DAY "
                                "can be given"},
}


def hour_range(start, end):
    """[first hour, stop hour) of [start, end) µs, rounded out to hours."""
    return start // HOUR, -(-end // HOUR)


def day_range(start, end, utc_offset):
    """[first, stop) members' days (standard offset, minutes) that
    [start, end) µs touches."""
    shift = utc_offset * MINUTE
    return (start + shift) // DAY, -(-(end + shift) // DAY)


def member_day_hours(day_from, day_to, utc_offset):
    """[first hour, stop hour) covering members' days [day_from, day_to)."""
    shift = utc_offset * MINUTE
    return hour_range(day_from * DAY - shift, day_to * DAY - shift)


class Calendar:
    """What a report needs of a program's definition, per hour: its local
    day, the version in force (point value, tier names)."""

    def __init__(self, program, utc_offset=None):
        self.program = program
        self.zone = ZoneInfo(program.time_zone)
        self.utc_offset = (program.utc_offset_minutes if utc_offset is None
                           else utc_offset)
        self._days = {}
        self._versions = {}
        self._tier_ranks = {}

    def day(self, hour):
        """The local calendar date an hour starts in."""
        found = self._days.get(hour)
        if found is None:
            found = self._days[hour] = datetime.fromtimestamp(
                hour * 3600, self.zone).date()
        return found

    def day_end_hour(self, day):
        """The first hour starting on or after the local midnight after `day`."""
        midnight = datetime.combine(day + timedelta(days=1), time(), tzinfo=self.zone)
        return -(-int(midnight.timestamp()) // 3600)

    def member_day(self, number):
        """The date of a members' day number."""
        return EPOCH_DAY + timedelta(days=number)

    def version(self, hour):
        found = self._versions.get(hour)
        if found is None:
            try:
                found = self.program.version_at(hour * HOUR)
            except LookupError:   # before version 1: priced by none; value by it
                found = self.program.versions[0]
            self._versions[hour] = found
        return found

    def point_value(self, hour):
        return self.version(hour).point_value

    def tier(self, hour, number):
        """The name of tier `number` at `hour` ("" for none)."""
        if not number:
            return ""
        tiers = self.version(hour).tiers
        name = (tiers.levels[number - 1].name
                if tiers is not None and number <= len(tiers.levels) else f"#{number}")
        rank = self._tier_ranks.get(name)
        if rank is None or number < rank:
            self._tier_ranks[name] = number
        return name

    def tier_rank(self, name):
        return self._tier_ranks.get(name, 0) if name else 0


@dataclass(frozen=True)
class Key:
    """What a row is about: the dimensions grouped by (None: not grouped).
    store and partner are ids (0: none), tier a name, day a date."""
    store: int | None = None
    partner: int | None = None
    tier: str | None = None
    day: date | None = None


def _keyer(dims, calendar):
    """Key of an activity row (hour, store, partner, tier) under `dims`."""
    by_store, by_partner = Dimension.STORE in dims, Dimension.PARTNER in dims
    by_tier, by_day = Dimension.TIER in dims, Dimension.DAY in dims

    def key(hour, store, partner, tier):
        return Key(store if by_store else None, partner if by_partner else None,
                   calendar.tier(hour, tier) if by_tier else None,
                   calendar.day(hour) if by_day else None)
    return key


def _sort_key(calendar):
    def order(key):
        return (key.day or date.min, -1 if key.store is None else key.store,
                -1 if key.partner is None else key.partner,
                calendar.tier_rank(key.tier), key.tier or "")
    return order


def _sorted(rows, calendar):
    order = _sort_key(calendar)
    return sorted(rows.values(), key=lambda row: order(row.key))


# --- points ---------------------------------------------------------------------

@dataclass
class PointsRow:
    key: Key
    issued: int = 0
    spent: int = 0
    expired: int = 0
    adjusted: int = 0
    returned: int = 0
    clawed: int = 0
    outstanding: int | None = None        # None: not given (store, tier)
    outstanding_value: int | None = None  # money minor units


def _booked_movement(c):
    """What an activity row changed members' balances by (at its partner)."""
    return c.issued - c.spent - c.expired + c.adjusted + c.returned - c.clawed


def _issuer_movement(c):
    """The same without spending, which settlement rows attribute to the
    partner that issued the points spent."""
    return c.issued - c.expired + c.adjusted - c.clawed


def _later(moved):
    """f(day, partner): the sum of `moved` ({(day, partner): points}) over
    that partner's days after `day`."""
    per = defaultdict(list)
    for (day, p), points in sorted(moved.items(), key=lambda kv: kv[0][0]):
        per[p].append((day, points))
    suffixes = {}
    for p, items in per.items():
        sums, running = [], 0
        for _, points in reversed(items):
            running += points
            sums.append(running)
        suffixes[p] = ([d for d, _ in items], sums[::-1] + [0])

    def later(day, p):
        days, sums = suffixes.get(p, ((), [0]))
        return sums[bisect.bisect_right(days, day)]
    return later


def points_rows(dims, calendar, hour_from, hour_to, activity, booked_now,
                settlement=(), settled_now=None):
    """Rows of the points report.

    activity: (hour, store, partner, tier, Counters) of every hour from
      hour_from on, to the journal's end (those from hour_to on are the
      movements after the interval);
    booked_now: {partner: the members' balance booked at that partner now}
      (minus the sum of its system accounts);
    settlement: (hour, issuing, redeeming, points) of every hour from
      hour_from on, to the journal's end, and settled_now: {(issuing,
      redeeming): points settled so far} (both needed only when grouping
      by partner).
    """
    dims = frozenset(dims)
    key_of = _keyer(dims, calendar)
    by_partner, by_day = Dimension.PARTNER in dims, Dimension.DAY in dims
    outstanding = Dimension.STORE not in dims and Dimension.TIER not in dims
    rows = {}
    after = defaultdict(int)   # partner (None: all) -> movement after the interval
    moved = defaultdict(int)   # (day or None, partner or None) -> movement within
    for hour, store, partner, tier, c in activity:
        p = partner if by_partner else None
        if hour >= hour_to:
            after[p] += _booked_movement(c)
            continue
        if not (c.issued or c.spent or c.expired or c.adjusted or c.returned
                or c.clawed):
            continue   # receipts' money or enrolments only: no points moved
        key = key_of(hour, store, partner, tier)
        row = rows.get(key)
        if row is None:
            row = rows[key] = PointsRow(key)
        row.issued += c.issued
        row.spent += c.spent
        row.expired += c.expired
        row.adjusted += c.adjusted
        row.returned += c.returned
        row.clawed += c.clawed
        if outstanding and by_day:
            day = calendar.day(hour)
            moved[day, p] += _issuer_movement(c) if by_partner else _booked_movement(c)
    if not dims and not rows:
        rows[Key()] = PointsRow(Key())
    if not outstanding:
        return _sorted(rows, calendar)

    # outstanding at the interval's end, per partner or in all
    at_end = defaultdict(int)
    for p, points in booked_now.items():
        at_end[p if by_partner else None] += points
    for p, points in after.items():
        at_end[p] -= points
    if by_partner:   # booked at the redeeming partner -> the issuing one's
        for (issuing, redeeming), points in (settled_now or {}).items():
            at_end[redeeming] += points
            at_end[issuing] -= points
        for hour, issuing, redeeming, points in settlement:
            if hour >= hour_to:   # settled after the interval
                at_end[redeeming] -= points
                at_end[issuing] += points
            elif by_day:
                moved[calendar.day(hour), issuing] -= points

    # per day: the end of the interval less what moved on the days after
    later = _later(moved) if by_day else None
    for row in rows.values():
        p = row.key.partner if by_partner else None
        points, hour = at_end[p], hour_to - 1
        if by_day:
            points -= later(row.key.day, p)
            hour = min(calendar.day_end_hour(row.key.day), hour_to) - 1
        row.outstanding = points
        row.outstanding_value = points * calendar.point_value(hour)
    return _sorted(rows, calendar)


# --- average receipt ----------------------------------------------------------------

@dataclass
class ReceiptRow:
    key: Key
    receipts: int = 0
    paid: int = 0                 # money minor units, net of refunds
    average: int | None = None    # paid // receipts; None without receipts


def receipt_rows(dims, calendar, activity):
    """Rows of the average receipt report from activity rows of the interval."""
    key_of = _keyer(frozenset(dims), calendar)
    rows = {}
    for hour, store, partner, tier, c in activity:
        if not (c.receipts or c.receipt_money):
            continue
        key = key_of(hour, store, partner, tier)
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReceiptRow(key)
        row.receipts += c.receipts
        row.paid += c.receipt_money
    if not dims and not rows:
        rows[Key()] = ReceiptRow(Key())
    for row in rows.values():
        row.average = row.paid // row.receipts if row.receipts else None
    return _sorted(rows, calendar)


# --- members' days: active members, visit frequency -----------------------------

@dataclass
class MembersRow:
    key: Key
    active: int = 0
    new: int = 0
    total: int = 0


def members_rows(dims, calendar, day_from, day_to, member_days, activity,
                 enrolled_now):
    """Rows of the active members report.

    member_days: (day, account) of members' days [day_from, day_to);
    activity: activity rows from the first hour covering those days on, to
      the journal's end (new members; those past the days enrolled after);
    enrolled_now: members ever enrolled (the running total)."""
    by_day = Dimension.DAY in dims
    hour_to = member_day_hours(day_from, day_to, calendar.utc_offset)[1]
    accounts, active = set(), defaultdict(int)
    for day, account in member_days:
        accounts.add(account)
        active[day] += 1
    new, later = defaultdict(int), 0
    for hour, _, _, _, c in activity:
        if not c.new_members:
            continue
        if hour >= hour_to:
            later += c.new_members
            continue
        day = min(max((hour * HOUR + calendar.utc_offset * MINUTE) // DAY,
                      day_from), day_to - 1)
        new[day] += c.new_members
    enrolled_before = enrolled_now - later - sum(new.values())
    if not by_day:
        added = sum(new.values())
        return [MembersRow(Key(), len(accounts), added, enrolled_before + added)]
    rows, total = [], enrolled_before
    for day in sorted(set(active) | set(new)):
        total += new[day]
        rows.append(MembersRow(Key(day=calendar.member_day(day)), active[day],
                               new[day], total))
    return rows


@dataclass
class VisitsRow:
    key: Key
    active: int = 0
    visits: int = 0
    histogram: list = field(default_factory=list)   # [(visits, members)], 1..10


def visits_rows(dims, calendar, member_days):
    """Rows of the visit frequency report: a visit is a members' day with a
    receipt (member_days: (day, account) of the interval's days)."""
    if Dimension.DAY in dims:
        per_day = defaultdict(int)
        for day, _ in member_days:
            per_day[day] += 1
        return [VisitsRow(Key(day=calendar.member_day(day)), n, n,
                          _histogram({1: n})) for day, n in sorted(per_day.items())]
    counts = defaultdict(int)
    for _, account in member_days:
        counts[account] += 1
    buckets = defaultdict(int)
    for n in counts.values():
        buckets[min(n, HISTOGRAM_BUCKETS)] += 1
    return [VisitsRow(Key(), len(counts), sum(counts.values()), _histogram(buckets))]


def _histogram(buckets):
    return [(n, buckets.get(n, 0)) for n in range(1, HISTOGRAM_BUCKETS + 1)]


# --- partner settlement ---------------------------------------------------------

@dataclass
class SettlementRow:
    issuing: int
    redeeming: int
    points: int = 0
    value: int = 0   # money minor units, each hour's points at its point value


def settlement_rows(calendar, settlement):
    """Pairs of different partners from settlement rows of the interval."""
    rows = {}
    for hour, issuing, redeeming, points in settlement:
        if issuing == redeeming or not points:
            continue
        row = rows.get((issuing, redeeming))
        if row is None:
            row = rows[issuing, redeeming] = SettlementRow(issuing, redeeming)
        row.points += points
        row.value += points * calendar.point_value(hour)
    return [rows[k] for k in sorted(rows) if rows[k].points or rows[k].value]


# --- breakage ---------------------------------------------------------------------

@dataclass
class BreakageRow:
    key: Key
    issued: int = 0
    spent: int = 0
    expired: int = 0
    clawed: int = 0

    @property
    def outstanding(self):
        return self.issued - self.spent - self.expired - self.clawed

    @property
    def breakage_bp(self):
        return self.expired * BASIS // self.issued if self.issued > 0 else 0


def _counter(counters, name, index):
    value = getattr(counters, name, None)
    return counters[index] if value is None else value


def breakage_rows(dims, calendar, cohorts):
    """Rows of the breakage report from cohort rows (hour issued, partner,
    counters issued/spent/expired/clawed) of the interval."""
    dims = frozenset(dims)
    by_partner, by_day = Dimension.PARTNER in dims, Dimension.DAY in dims
    rows = {}
    for hour, partner, c in cohorts:
        key = Key(partner=partner if by_partner else None,
                  day=calendar.day(hour) if by_day else None)
        row = rows.get(key)
        if row is None:
            row = rows[key] = BreakageRow(key)
        row.issued += _counter(c, "issued", 0)
        row.spent += _counter(c, "spent", 1)
        row.expired += _counter(c, "expired", 2)
        row.clawed += _counter(c, "clawed", 3)
    if not dims and not rows:
        rows[Key()] = BreakageRow(Key())
    return _sorted(rows, calendar)


# --- coupons -----------------------------------------------------------------------

@dataclass
class CouponsRow:
    """Counts and money (minor units) of what became of coupons; see
    records.py (0x06) for what each counts."""
    key: Key
    issued: int = 0
    issued_money: int = 0
    redeemed: int = 0
    redeemed_money: int = 0
    expired: int = 0
    expired_money: int = 0
    revoked: int = 0
    revoked_money: int = 0
    given_back: int = 0
    given_back_money: int = 0
    displaced: int = 0
    displaced_money: int = 0


def coupons_rows(dims, calendar, coupon_rows):
    """Rows of the coupons report from coupon rows (hour, store, partner,
    CouponCounters) of the interval."""
    key_of = _keyer(frozenset(dims), calendar)
    rows = {}
    for hour, store, partner, c in coupon_rows:
        key = key_of(hour, store, partner, 0)
        row = rows.get(key)
        if row is None:
            row = rows[key] = CouponsRow(key)
        for name, value in c._asdict().items():
            setattr(row, name, getattr(row, name) + value)
    if not dims and not rows:
        rows[Key()] = CouponsRow(Key())
    return _sorted(rows, calendar)


# --- reading: one snapshot per report -----------------------------------------------

class _Pinned(LedgerReads):
    """The ledger's reads, every one from the same read transaction."""

    def __init__(self, snapshot):
        self._snap = snapshot

    def _snapshot(self):
        return nullcontext(self._snap)

    def booked(self, program):
        """{partner: minus the sum of its system accounts}: the members'
        balances booked at each partner (all partners ever used)."""
        prefix = U32.pack(program)
        out = defaultdict(int)
        for key, value in self._snap.scan("system", prefix):
            if key[:4] != prefix:
                break
            partner = U32.unpack_from(key, 5)[0]
            out[partner] -= I64.unpack(value)[0]
        return dict(out)

    def utc_offset(self, program):
        raw = self._snap.get("programs", U32.pack(program))
        return PROGRAM.unpack_from(raw)[3] if raw is not None else None



@dataclass(frozen=True)
class Query:
    program_id: int
    program: object      # core.program.Program
    start: int           # µs, inclusive
    end: int             # µs, exclusive
    dims: tuple = ()


def gather(ledger, report, query):
    """(rows, as_of_cursor) of one report, read from one snapshot."""
    with ledger._snapshot() as snap:
        reads = _Pinned(snap)
        head = reads.head()[0]
        offset = reads.utc_offset(query.program_id)
        calendar = Calendar(query.program, offset)
        return _READERS[report](reads, calendar, query), head


def _points(reads, calendar, q):
    hour_from, hour_to = hour_range(q.start, q.end)
    settlement, settled = (), None
    if Dimension.PARTNER in q.dims and Dimension.STORE not in q.dims \
            and Dimension.TIER not in q.dims:
        settlement = reads.settlement(q.program_id, hour_from, HOURS_END)
        settled = reads.settled(q.program_id)
    return points_rows(q.dims, calendar, hour_from, hour_to,
                       reads.activity(q.program_id, hour_from, HOURS_END),
                       reads.booked(q.program_id), settlement, settled)


def _average_receipt(reads, calendar, q):
    hour_from, hour_to = hour_range(q.start, q.end)
    return receipt_rows(q.dims, calendar,
                        reads.activity(q.program_id, hour_from, hour_to))


def _active_members(reads, calendar, q):
    offset = calendar.utc_offset
    day_from, day_to = day_range(q.start, q.end, offset)
    hour_from = member_day_hours(day_from, day_to, offset)[0]
    return members_rows(q.dims, calendar, day_from, day_to,
                        reads.member_days(q.program_id, day_from, day_to),
                        reads.activity(q.program_id, hour_from, HOURS_END),
                        reads.members_enrolled(q.program_id))


def _visit_frequency(reads, calendar, q):
    day_from, day_to = day_range(q.start, q.end, calendar.utc_offset)
    return visits_rows(q.dims, calendar,
                       reads.member_days(q.program_id, day_from, day_to))


def _settlement(reads, calendar, q):
    hour_from, hour_to = hour_range(q.start, q.end)
    return settlement_rows(calendar, reads.settlement(q.program_id, hour_from, hour_to))


def _breakage(reads, calendar, q):
    hour_from, hour_to = hour_range(q.start, q.end)
    return breakage_rows(q.dims, calendar, reads.cohorts(q.program_id, hour_from, hour_to))


def _coupons(reads, calendar, q):
    hour_from, hour_to = hour_range(q.start, q.end)
    return coupons_rows(q.dims, calendar,
                        reads.coupon_rows(q.program_id, hour_from, hour_to))


_READERS = {"points": _points, "average_receipt": _average_receipt,
            "active_members": _active_members, "visit_frequency": _visit_frequency,
            "settlement": _settlement, "breakage": _breakage, "coupons": _coupons}
