"""Report aggregates as a fold of the journal (layout in records.py).

The ledger keeps the `aggregates` database as it commits; this is the same
fold in plain Python, from journal entries alone: the twin uses `changes`
per entry, and `rebuild` replays a whole journal for the audit, which
demands that the stored rows equal it.
"""

from collections import namedtuple

from .codec import decode_coupon_closed, decode_coupon_issued, decode_lots
from .records import (ACTIVITY_KEY, AGG_ACTIVITY, AGG_COHORT, AGG_COUPONS,
                      AGG_MEMBER_DAY, AGG_MEMBER_MONTH, AGG_MEMBERS, AGG_SETTLED,
                      AGG_SETTLEMENT, COHORT_KEY, COUPON_AGG_KEY, COUPON_EARNED,
                      COUPON_GIVEN_BACK, DAY, HOUR, I64, MEMBER_DAY_KEY,
                      MEMBER_DAY_VALUE, MEMBER_MONTH_KEY, MEMBERS_KEY, MINUTE,
                      SETTLED_KEY, SETTLEMENT_KEY, SYSTEM, VISIT_DAYS, CouponState,
                      Entry)

COUNTERS = ("issued", "spent", "expired", "adjusted", "returned", "clawed",
            "receipts", "receipt_money", "new_members", "member_days")
Counters = namedtuple("Counters", COUNTERS)
(ISSUED, SPENT, EXPIRED, ADJUSTED, RETURNED, CLAWED, RECEIPTS, RECEIPT_MONEY,
 NEW_MEMBERS, MEMBER_DAYS) = range(len(COUNTERS))

COHORT_COUNTERS = ("issued", "spent", "expired", "clawed")


class CohortCounters(namedtuple("CohortCounters", COHORT_COUNTERS)):
    """A breakage cohort's int64s (records.py), and what is left of it."""
    __slots__ = ()

    @property
    def outstanding(self):
        return self.issued - self.spent - self.expired - self.clawed


COHORT_ISSUED, COHORT_SPENT, COHORT_EXPIRED, COHORT_CLAWED = range(4)
MONTH_COUNTERS = ("money", "receipts")
MONTH_MONEY, MONTH_RECEIPTS = range(2)
COUPON_COUNTERS = ("issued", "issued_money", "redeemed", "redeemed_money",
                   "expired", "expired_money", "revoked", "revoked_money",
                   "given_back", "given_back_money", "displaced", "displaced_money")
CouponCounters = namedtuple("CouponCounters", COUPON_COUNTERS)
# A coupon event's counter pair (its count; the money is the next int64).
_COUPON_ISSUED = {COUPON_EARNED: 0, COUPON_GIVEN_BACK: 8}
_COUPON_CLOSED = {CouponState.REDEEMED: 2, CouponState.EXPIRED: 4,
                  CouponState.REVOKED: 6, CouponState.DISPLACED: 10}
# Postings that name the lots they touch: the cohort counter, and its sign.
_COHORT = {Entry.SPEND: (COHORT_SPENT, 1), Entry.RETURN: (COHORT_SPENT, -1),
           Entry.EXPIRE: (COHORT_EXPIRED, 1), Entry.CLAWBACK: (COHORT_CLAWED, 1)}

# Entry types counted in activity rows, with their counter.
_COUNTER = {Entry.EARN: ISSUED, Entry.SPEND: SPENT, Entry.EXPIRE: EXPIRED,
            Entry.ADJUST: ADJUSTED, Entry.RETURN: RETURNED,
            Entry.CLAWBACK: CLAWED, Entry.RECEIPT: RECEIPT_MONEY,
            Entry.ACCOUNT_OPENED: NEW_MEMBERS}


def hour_of(time):
    return max(time, 0) // HOUR


def day_of(time, utc_offset):
    """The program's local day of a time (utc_offset in minutes)."""
    return max(time + utc_offset * MINUTE, 0) // DAY


def month_of_day(day):
    """The month (year * 100 + month) of a day counted from 1970-01-01:
    the proleptic Gregorian calendar in integers, for any day an int64
    time gives (datetime stops at year 9999)."""
    z = day + 719_468              # days from 0000-03-01
    era = z // 146_097
    doe = z - era * 146_097        # day of the 400-year era
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153      # months from March
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    return year * 100 + month


def member_of(entry):
    """The member an entry concerns: a posting's member side, an event's
    subject (0 when none)."""
    if entry.type >= Entry.EARN:
        return entry.debit if entry.credit & SYSTEM else entry.credit
    return entry.credit


def counted(entry):
    """Whether an entry changes any aggregate row."""
    return entry.type in _COUNTER or entry.type in (Entry.COUPON_ISSUED,
                                                     Entry.COUPON_CLOSED)


def changes(entry, tier, utc_offset, visit_days):
    """What one counted entry adds, given its member's tier and visit days
    (records.py, newest first) and its program's UTC offset:
    ([(key, index, delta)], visit days after it). `index` is the int64 of the row's value to add to;
    None for a member-day row, whose value is `delta` (the account). The
    entry's seq must be the one it has (or will have) in the journal: it
    keys the member-day row."""
    if entry.type in (Entry.COUPON_ISSUED, Entry.COUPON_CLOSED):
        return coupon_changes(entry), visit_days
    program, hour = entry.program, hour_of(entry.time)
    activity = ACTIVITY_KEY.pack(AGG_ACTIVITY, program, hour, entry.store,
                                 entry.partner, tier)
    index = _COUNTER[entry.type]
    amount = entry.amount
    if entry.type == Entry.ADJUST and entry.debit == member_of(entry):
        amount = -amount
    elif entry.type == Entry.ACCOUNT_OPENED:
        amount = 1
    out = [(activity, index, amount)]
    if entry.type == Entry.ACCOUNT_OPENED:
        out.append((MEMBERS_KEY.pack(AGG_MEMBERS, program), 0, 1))
    if entry.type in (Entry.SPEND, Entry.RETURN):
        points = amount if entry.type == Entry.SPEND else -amount
        out.append((SETTLEMENT_KEY.pack(AGG_SETTLEMENT, program, hour,
                                        entry.partner2, entry.partner), 0, points))
        out.append((SETTLED_KEY.pack(AGG_SETTLED, program, entry.partner2,
                                     entry.partner), 0, points))
    if entry.type == Entry.RECEIPT:
        day = day_of(entry.time, utc_offset)
        month = MEMBER_MONTH_KEY.pack(AGG_MEMBER_MONTH, program,
                                      month_of_day(day), member_of(entry))
        out.append((month, MONTH_MONEY, amount))
        if amount > 0:
            out += [(month, MONTH_RECEIPTS, 1), (activity, RECEIPTS, 1)]
        if amount > 0 and (not visit_days or day > visit_days[0]):  # first of the day
            out.append((MEMBER_DAY_KEY.pack(AGG_MEMBER_DAY, program, day,
                                            entry.seq), None, member_of(entry)))
            out.append((activity, MEMBER_DAYS, 1))
            visit_days = [day] + visit_days[:VISIT_DAYS - 1]
    out += cohort_changes(entry)
    return out, visit_days


def coupon_changes(entry):
    """[(key, index, delta)] of a coupon event in its hour's coupon row
    (records.py); ValueError or IndexError when its data is malformed."""
    if entry.type == Entry.COUPON_ISSUED:
        index = _COUPON_ISSUED.get(decode_coupon_issued(entry.data)[1])
        money = entry.amount
    else:
        index = _COUPON_CLOSED.get(entry.amount2)
        money = (entry.amount if entry.amount2 == CouponState.REDEEMED
                 else decode_coupon_closed(entry.data))
    if index is None:  # moved by a merge: the same coupon, elsewhere
        return []
    key = COUPON_AGG_KEY.pack(AGG_COUPONS, entry.program, hour_of(entry.time),
                              entry.store, entry.partner)
    return [(key, index, 1), (key, index + 1, money)]


def cohort_changes(entry):
    """[(key, index, delta)] of the breakage cohorts a posting changes: a
    new lot's points are issued in the entry's hour at its partner; points
    of the lots a posting names count in those lots' cohorts (records.py).
    ValueError or IndexError when its lots are malformed."""
    if entry.type == Entry.EARN or (entry.type == Entry.ADJUST
                                    and not entry.credit & SYSTEM):
        return [(COHORT_KEY.pack(AGG_COHORT, entry.program, hour_of(entry.time),
                                 entry.partner), COHORT_ISSUED, entry.amount)]
    rule = _COHORT.get(entry.type)
    if rule is None:
        return []
    index, sign = rule
    return [(COHORT_KEY.pack(AGG_COHORT, entry.program, issued_hour,
                             entry.partner2), index, sign * points)
            for _, points, issued_hour in decode_lots(entry.data)]


_WIDTH = {AGG_ACTIVITY: len(COUNTERS), AGG_SETTLEMENT: 1, AGG_MEMBER_DAY: 1,
          AGG_COHORT: len(COHORT_COUNTERS), AGG_MEMBER_MONTH: len(MONTH_COUNTERS),
          AGG_COUPONS: len(COUPON_COUNTERS), AGG_MEMBERS: 1, AGG_SETTLED: 1}
_NAMES = {AGG_ACTIVITY: COUNTERS, AGG_SETTLEMENT: ("points",),
          AGG_MEMBER_DAY: ("account",), AGG_COHORT: COHORT_COUNTERS,
          AGG_MEMBER_MONTH: MONTH_COUNTERS, AGG_COUPONS: COUPON_COUNTERS,
          AGG_MEMBERS: ("members",), AGG_SETTLED: ("points",)}


def width(key):
    """How many 8-byte numbers a row's value holds (0: an unknown kind)."""
    return _WIDTH.get(key[0], 0) if key else 0


def names(key):
    """The names of a row's numbers, for the audit's problems."""
    return _NAMES.get(key[0], ()) if key else ()


def decode_value(key, value):
    """A row's value as a tuple of ints; ValueError when malformed."""
    n = width(key)
    if len(value) != 8 * n:
        raise ValueError("aggregate value of the wrong size")
    if key[0] == AGG_MEMBER_DAY:
        return MEMBER_DAY_VALUE.unpack(value)
    return tuple(I64.unpack_from(value, 8 * i)[0] for i in range(n))


def encode_value(key, values):
    if key[0] == AGG_MEMBER_DAY:
        return MEMBER_DAY_VALUE.pack(*values)
    return b"".join(I64.pack(v) for v in values)


def describe(key):
    """A row's key in words, for the audit's problems."""
    try:
        if key[0] == AGG_ACTIVITY:
            _, program, hour, store, partner, tier = ACTIVITY_KEY.unpack(key)
            return (f"activity program {program} hour {hour} store {store} "
                    f"partner {partner} tier {tier}")
        if key[0] == AGG_SETTLEMENT:
            _, program, hour, issuing, redeeming = SETTLEMENT_KEY.unpack(key)
            return (f"settlement program {program} hour {hour} partner "
                    f"{issuing} to {redeeming}")
        if key[0] == AGG_MEMBER_DAY:
            _, program, day, seq = MEMBER_DAY_KEY.unpack(key)
            return f"member day program {program} day {day} seq {seq}"
        if key[0] == AGG_COHORT:
            _, program, hour, partner = COHORT_KEY.unpack(key)
            return f"cohort program {program} hour {hour} partner {partner}"
        if key[0] == AGG_MEMBER_MONTH:
            _, program, month, account = MEMBER_MONTH_KEY.unpack(key)
            return f"member month program {program} month {month} account {account}"
        if key[0] == AGG_COUPONS:
            _, program, hour, store, partner = COUPON_AGG_KEY.unpack(key)
            return (f"coupons program {program} hour {hour} store {store} "
                    f"partner {partner}")
        if key[0] == AGG_MEMBERS:
            return f"members program {MEMBERS_KEY.unpack(key)[1]}"
        if key[0] == AGG_SETTLED:
            _, program, issuing, redeeming = SETTLED_KEY.unpack(key)
            return f"settled program {program} partner {issuing} to {redeeming}"
    except Exception:  # a malformed key: shown as it is
        pass
    return f"key {key!r}"


class Rebuild:
    """The fold over a whole journal, entry by entry, in order."""

    def __init__(self):
        self.rows = {}        # key -> list of ints
        self.tiers = {}       # member -> tier, from TIER_SET
        self.visit_days = {}  # member -> visit days, newest first
        self.offsets = {}     # program -> UTC offset, from PROGRAM_PUT

    def add(self, entry):
        if entry.type == Entry.PROGRAM_PUT:
            self.offsets[entry.program] = entry.amount2
        elif entry.type == Entry.TIER_SET:
            self.tiers[entry.credit] = entry.amount
        if not counted(entry):
            return
        member = member_of(entry)
        deltas, self.visit_days[member] = changes(
            entry, self.tiers.get(member, 0), self.offsets.get(entry.program, 0),
            self.visit_days.get(member, []))
        for key, index, delta in deltas:
            if index is None:
                self.rows[key] = [delta]
                continue
            row = self.rows.setdefault(key, [0] * width(key))
            row[index] += delta

    def encoded(self):
        return {key: encode_value(key, row)
                for key, row in sorted(self.rows.items())}


def rebuild(entries):
    """{key: value} of every aggregate row, as the ledger stores them."""
    fold = Rebuild()
    for entry in entries:
        fold.add(entry)
    return fold.encoded()
