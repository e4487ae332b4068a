"""Read-side of a ledger, shared by the kernel and the twin.

Both store the same bytes, so reads need only a snapshot that can `get` a key
and `scan` a database from a key; each ledger provides `_snapshot()`.
"""

from dataclasses import dataclass

from .aggregates import CohortCounters, Counters, CouponCounters, day_of
from .audit import audit
from .codec import Account, JournalEntry, Operation
from .records import (ACTIVITY_KEY, ACTIVITY_VALUE, AGG_ACTIVITY, AGG_COHORT,
                      AGG_COUPONS, AGG_MEMBER_DAY, AGG_MEMBER_MONTH, AGG_MEMBERS,
                      AGG_SETTLED, AGG_SETTLEMENT, MEMBERS_KEY, SETTLED_KEY,
                      CARD, COHORT_KEY, COHORT_VALUE, COUNTER_VALUE,
                      COUPON_AGG_KEY, COUPON_AGG_VALUE, DATABASES, HEAD,
                      I64, IDX_BIRTHDAY, IDX_TIER, MEMBER_DAY_VALUE,
                      MEMBER_INDEX_KEY, MEMBER_MONTH_KEY, MEMBER_MONTH_VALUE,
                      META_HEAD, META_NEXT_ACCOUNT, PROGRAM, SETTLEMENT_KEY,
                      SYSTEM_KEY, U32, U64, CardStatus, CouponState,
                      external_key)


@dataclass(frozen=True)
class Balances:
    account: int
    program: int
    status: int
    available: int  # active, unexpired points minus holds and debt
    pending: int    # points not active yet (a return window)
    held: int       # by holds that have not timed out
    balance: int    # all points on the account, minus debt
    debt: int
    earned: int
    spent: int
    expired: int
    tier: int = 0   # 0: none; last, so positional users keep working


def balances_of(account_id, account, now):
    active = pending = 0
    held = sum(h.amount for h in account.holds if h.expires_at > now)
    for lot in account.lots:
        if lot.expires_at <= now:
            continue  # expired, burned when the account is next touched
        if lot.activates_at <= now:
            active += lot.remaining
        else:
            pending += lot.remaining
    return Balances(account_id, account.program, account.status,
                    active - held - account.debt, pending,
                    held, account.balance, account.debt,
                    account.earned, account.spent, account.expired,
                    account.tier)


def coupon_state(coupon, now):
    """A coupon's state as of `now`: an open one whose window has ended is
    expired, though the ledger closes it only when it next touches the
    account."""
    if coupon.state == CouponState.OPEN and coupon.expires_at <= now:
        return CouponState.EXPIRED
    return coupon.state


def offered_coupon(account, now):
    """The member's coupon a checkout prices with (pricing takes one): of
    the open ones not lapsed by `now`, the one usable now that expires
    first, else the one usable soonest; with none open, the last one that
    expired (for the quote to say so), else None."""
    held = [c for c in account.coupons if coupon_state(c, now) == CouponState.OPEN]
    usable = [c for c in held if c.usable_from <= now]
    if usable:
        return min(usable, key=lambda c: (c.expires_at, c.number))
    if held:
        return min(held, key=lambda c: (c.usable_from, c.number))
    expired = [c for c in account.coupons if coupon_state(c, now) == CouponState.EXPIRED]
    return max(expired, key=lambda c: c.number, default=None)


def is_regular(account, regular_customer, at, utc_offset):
    """Whether the member is a regular customer (core/program.py) for a
    receipt at business time `at`, by the visit days the account keeps."""
    if regular_customer is None:
        return False
    last = day_of(at, utc_offset)
    first = last - regular_customer.within_days + 1
    return account.visits_in(first, last) >= regular_customer.min_visits


@dataclass(frozen=True)
class ProgramRecord:
    program: int
    flags: int
    created_at: int
    updated_at: int
    data: bytes      # of the last PUT_PROGRAM: the definition
    utc_offset: int = 0  # minutes; last, so positional users keep working


_CARD_STATUS = {status.value: status for status in CardStatus}  # without the Enum call


class LedgerReads:
    """Point reads over one read transaction each (`_get`: a ledger may
    read single keys more cheaply)."""

    def _get(self, db, key):
        """The value of `key` in database `db` as of the last commit, or None."""
        with self._snapshot() as snap:
            return snap.get(db, key)

    def programs(self):
        """Every program's record, by id."""
        with self._snapshot() as snap:
            records = []
            for key, value in snap.scan("programs"):
                flags, created_at, updated_at, utc_offset = PROGRAM.unpack_from(value)
                records.append(ProgramRecord(
                    U32.unpack(key)[0], flags, created_at, updated_at,
                    bytes(value[PROGRAM.size:]), utc_offset))
            return records

    def account(self, account_id):
        raw = self._get("accounts", U64.pack(account_id))
        return Account.decode(raw) if raw is not None else None

    def balances(self, account_id, now):
        account = self.account(account_id)
        return balances_of(account_id, account, now) if account else None

    def lots(self, account_id):
        account = self.account(account_id)
        return list(account.lots) if account else []

    def operation(self, op_id):
        raw = self._get("ops", bytes(op_id))
        return Operation.decode(raw) if raw is not None else None

    def profile(self, account_id):
        """The member's profile (opaque bytes), or None."""
        return self._get("profiles", U64.pack(account_id))

    def card(self, number):
        """(account id, CardStatus) of a card number, or None."""
        raw = self._get("cards", bytes(number))
        if raw is None:
            return None
        account_id, status = CARD.unpack(raw)
        return account_id, (_CARD_STATUS[status] if status in _CARD_STATUS
                            else CardStatus(status))

    def account_id(self, program, external_id):
        with self._snapshot() as snap:
            raw = snap.get("externals", external_key(program, bytes(external_id)))
            return U64.unpack(raw)[0] if raw is not None else None

    def system_balance(self, program, kind, partner=0):
        with self._snapshot() as snap:
            raw = snap.get("system", SYSTEM_KEY.pack(program, kind, partner))
            return I64.unpack(raw)[0] if raw is not None else 0

    def head(self):
        """(last journal sequence number, its chain hash)."""
        with self._snapshot() as snap:
            raw = snap.get("meta", META_HEAD)
        return HEAD.unpack(raw) if raw is not None else (0, bytes(32))

    def journal(self, from_seq=1, limit=1000):
        """Journal entries with seq >= from_seq, in order."""
        entries = []
        with self._snapshot() as snap:
            for _, value in snap.scan("journal", U64.pack(from_seq)):
                if len(entries) >= limit:
                    break
                entries.append(JournalEntry.decode(value))
        return entries

    # Report aggregates (layout in records.py). Each is a generator over one
    # snapshot, held until it is exhausted or closed: consume it promptly.

    def activity(self, program, hour_from, hour_to):
        """(hour, store, partner, tier, Counters) of the program's activity
        rows with hour_from <= hour < hour_to, in key order."""
        for key, value in self._aggregates(AGG_ACTIVITY, program, hour_from, hour_to):
            _, _, hour, store, partner, tier = ACTIVITY_KEY.unpack(key)
            yield hour, store, partner, tier, Counters(*ACTIVITY_VALUE.unpack(value))

    def settlement(self, program, hour_from, hour_to):
        """(hour, issuing partner, redeeming partner, points), same range."""
        for key, value in self._aggregates(AGG_SETTLEMENT, program, hour_from, hour_to):
            _, _, hour, issuing, redeeming = SETTLEMENT_KEY.unpack(key)
            yield hour, issuing, redeeming, I64.unpack(value)[0]

    def members_enrolled(self, program):
        """Members ever enrolled in the program (its running total)."""
        raw = self._get("aggregates", MEMBERS_KEY.pack(AGG_MEMBERS, program))
        return I64.unpack(raw)[0] if raw is not None else 0

    def settled(self, program):
        """{(issuing partner, redeeming partner): points} settled so far,
        every pair ever used (running totals: settlement rows of every hour)."""
        return {SETTLED_KEY.unpack(key)[2:]: I64.unpack(value)[0]
                for key, value in self._aggregates(AGG_SETTLED, program, 0, 1 << 32)}

    def member_days(self, program, day_from, day_to):
        """(local day, account) of members with a receipt that day, for
        day_from <= day < day_to: by day, then in the order of the members'
        first receipts of the day (one each)."""
        for key, value in self._aggregates(AGG_MEMBER_DAY, program, day_from, day_to):
            yield U32.unpack_from(key, 5)[0], MEMBER_DAY_VALUE.unpack(value)[0]

    def cohorts(self, program, hour_from, hour_to):
        """(issue hour, issuing partner, CohortCounters) of the program's
        breakage cohorts issued in hour_from <= hour < hour_to, in key order.
        `.outstanding` of the counters: issued minus spent, expired and
        clawed back (records.py says what does not count)."""
        for key, value in self._aggregates(AGG_COHORT, program, hour_from, hour_to):
            _, _, hour, partner = COHORT_KEY.unpack(key)
            yield hour, partner, CohortCounters(*COHORT_VALUE.unpack(value))

    def coupon_rows(self, program, hour_from, hour_to):
        """(hour, store, partner, CouponCounters) of the program's coupon
        rows with hour_from <= hour < hour_to, in key order."""
        for key, value in self._aggregates(AGG_COUPONS, program, hour_from, hour_to):
            _, _, hour, store, partner = COUPON_AGG_KEY.unpack(key)
            yield hour, store, partner, CouponCounters(*COUPON_AGG_VALUE.unpack(value))

    def member_months(self, program, month_from, month_to):
        """(month, account, net money, receipts) of every member with a
        receipt or refund in a local month (year * 100 + month) with
        month_from <= month < month_to: by month, then by account."""
        for key, value in self._aggregates(AGG_MEMBER_MONTH, program, month_from,
                                           month_to):
            _, _, month, account = MEMBER_MONTH_KEY.unpack(key)
            yield (month, account) + MEMBER_MONTH_VALUE.unpack(value)

    # The member index (records.py): generators over one snapshot, as above.

    def tiered(self, program, lowest=1):
        """(tier, account) of the program's members whose tier is `lowest`
        or above, by tier, then account."""
        yield from self._indexed(IDX_TIER, program, lowest, 1 << 16)

    def birthdays(self, program, birthday):
        """Accounts of the program's members born on `birthday` (month *
        100 + day), in order."""
        for _, account in self._indexed(IDX_BIRTHDAY, program, birthday, birthday + 1):
            yield account

    def _indexed(self, kind, program, first, stop):
        head = bytes([kind]) + U32.pack(program)
        start = MEMBER_INDEX_KEY.pack(kind, program, first, 0)
        with self._snapshot() as snap:
            for key, _ in snap.scan("member_index", start):
                if key[:5] != head or len(key) != MEMBER_INDEX_KEY.size:
                    return
                _, _, value, account = MEMBER_INDEX_KEY.unpack(key)
                if value >= stop:
                    return
                yield value, account

    def counter(self, account_id, name):
        """(count, awards) of a member's bonus counter; (0, 0) when new."""
        with self._snapshot() as snap:
            raw = snap.get("bonus_counters", U64.pack(account_id) + bytes(name))
        return COUNTER_VALUE.unpack(raw) if raw is not None else (0, 0)

    def _aggregates(self, kind, program, first, stop):
        """Rows of one kind and program whose u32 after the program (hour,
        day, month; a settled row's issuing partner) is in [first, stop)."""
        head = bytes([kind]) + U32.pack(program)
        with self._snapshot() as snap:
            for key, value in snap.scan("aggregates", head + U32.pack(first)):
                if key[:5] != head or U32.unpack_from(key, 5)[0] >= stop:
                    return
                yield key, value

    def dump(self):
        """Every database's (key, value) pairs: for comparing two ledgers."""
        with self._snapshot() as snap:
            return {name.decode(): list(snap.scan(name.decode()))
                    for name in DATABASES}

    def audit(self):
        """Every invariant checked; a list of what is wrong (empty: clean)."""
        return self.audit_at_head()[0]

    def audit_at_head(self):
        """(problems, (seq, hash) of the head audited), from one snapshot."""
        with self._snapshot() as snap:
            problems = audit(snap)
            raw = snap.get("meta", META_HEAD)
        return problems, HEAD.unpack(raw) if raw is not None else (0, bytes(32))

    def accounts_opened(self):
        """Accounts ever opened: ids are given out in order from 1."""
        with self._snapshot() as snap:
            raw = snap.get("meta", META_NEXT_ACCOUNT)
        return U64.unpack(raw)[0] - 1 if raw is not None else 0
