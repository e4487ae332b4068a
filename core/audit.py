"""The ledger's invariants, checked over a read snapshot.

`audit(snapshot)` returns one line per problem, naming where it is: an empty
list means the ledger is sound. It trusts nothing stored: balances and tiers
are replayed from the journal and compared with what the records say, and
so are the report aggregates (rebuilt by `aggregates.Rebuild`) and the
bonus counters (from the BONUS events); what the lots of each breakage
cohort hold must not exceed its outstanding points. The member index must
list exactly the members' tiers and birthdays (the journal never holds a
birthday: its index is checked for consistency alone).
Members' coupons are replayed from their COUPON_ISSUED and COUPON_CLOSED
entries too, and must be what the accounts hold.
"""

import hashlib
import struct
from collections import defaultdict

from . import aggregates
from .codec import (Account, Coupon, JournalEntry, coupon_moved_from,
                    decode_coupon_closed, decode_coupon_issued, decode_lots)
from .records import (AGG_COHORT, BIRTHDAY_OF_KEY, BIRTHDAY_VALUE, COHORT_KEY,
                      COUNTER_VALUE, COUPON_EARNED, COUPON_GIVEN_BACK, COUPON_MOVED,
                      DAYS_IN_MONTH, EXPIRY_KEY, HASH_SIZE, HEAD, I64,
                      IDX_BIRTHDAY, IDX_BIRTHDAY_OF, IDX_TIER, MAX_COUPONS,
                      MAX_HOLDS, MAX_LOTS, MEMBER_INDEX_KEY, META_HEAD, NEVER,
                      SYSTEM, SYSTEM_KEY, U64, CouponState, Entry)

FIRST_POSTING = Entry.EARN
CLOSED = (CouponState.REDEEMED, CouponState.REVOKED, CouponState.EXPIRED,
          CouponState.MOVED, CouponState.DISPLACED)
# Postings that name the lots they touch (records.py): all of their points,
# or (CLAWBACK) at most all.
NAMING_LOTS = {Entry.SPEND: True, Entry.RETURN: True, Entry.EXPIRE: True,
               Entry.CLAWBACK: False}


def _chain(previous, body):
    return hashlib.blake2b(previous + body, digest_size=HASH_SIZE).digest()


def audit(snap):
    problems = []
    replayed = defaultdict(int)   # member account id or system key -> balance
    programs_of = {}              # member account id -> program
    tiers = {}                    # member account id -> tier, from TIER_SET
    counters = {}                 # bonus_counters key -> [count, awards]
    coupons = _Coupons()
    rebuilt = aggregates.Rebuild()

    seq, digest = 0, bytes(HASH_SIZE)
    for key, value in snap.scan("journal"):
        entry = JournalEntry.decode(value)
        if U64.unpack(key)[0] != entry.seq:
            problems.append(f"journal key {U64.unpack(key)[0]}: holds seq {entry.seq}")
        if entry.seq != seq + 1:
            problems.append(f"journal seq {entry.seq}: gap or reorder after {seq}")
        digest = _chain(digest, entry.body())
        if entry.hash != digest:
            problems.append(f"journal seq {entry.seq}: hash chain broken")
            digest = entry.hash  # report each break once
        seq = entry.seq
        if entry.type == Entry.TIER_SET:
            if entry.amount2 != tiers.get(entry.credit, 0):
                problems.append(f"journal seq {entry.seq}: tier was "
                                f"{tiers.get(entry.credit, 0)}, not {entry.amount2}")
            tiers[entry.credit] = entry.amount
        if entry.type == Entry.BONUS:
            counter = counters.setdefault(U64.pack(entry.credit) + entry.data, [0, 0])
            counter[0] += 1
            counter[1] += entry.amount > 0
            if entry.amount2 != counter[0]:
                problems.append(f"journal seq {entry.seq}: counter at "
                                f"{entry.amount2}, the journal counts {counter[0]}")
        elif entry.type in (Entry.COUPON_ISSUED, Entry.COUPON_CLOSED):
            problems += coupons.add(entry)
        try:
            rebuilt.add(entry)
        except (struct.error, ValueError, IndexError):
            # a tier, day or hour no key can hold, lots that do not decode
            problems.append(f"journal seq {entry.seq}: not foldable into the aggregates")
        if entry.type in NAMING_LOTS:
            problems += _named_lots_problems(entry, NAMING_LOTS[entry.type])
        if entry.type < FIRST_POSTING:
            continue  # an event: moves no points
        if entry.amount <= 0 or not entry.debit or not entry.credit:
            problems.append(f"journal seq {entry.seq}: malformed posting")
        for account, sign in ((entry.debit, -1), (entry.credit, 1)):
            if account & SYSTEM:
                kind, partner = (account >> 32) & 0xFF, account & 0xFFFFFFFF
                replayed[(entry.program, kind, partner)] += sign * entry.amount
            else:
                replayed[account] += sign * entry.amount
                programs_of[account] = entry.program

    raw = snap.get("meta", META_HEAD)
    head = HEAD.unpack(raw) if raw else (0, bytes(HASH_SIZE))
    if head != (seq, digest):
        problems.append(f"meta head: says seq {head[0]}, journal ends at {seq}")

    in_lots = defaultdict(int)    # cohort key -> points its lots hold
    indexed = {}                  # account -> earliest lot_expiry entry
    for key, _ in snap.scan("lot_expiry"):
        expires_at, account_id = EXPIRY_KEY.unpack(key)
        indexed.setdefault(account_id, expires_at)

    totals = defaultdict(int)     # program -> sum of every balance
    index = {key: value for key, value in snap.scan("member_index")}
    for key, value in snap.scan("accounts"):
        account_id = U64.unpack(key)[0]
        a = Account.decode(value)
        where = f"account {account_id}"
        totals[a.program] += a.balance
        if replayed.get(account_id, 0) != a.balance:
            problems.append(f"{where}: balance {a.balance}, journal says "
                            f"{replayed.get(account_id, 0)}")
        if account_id in programs_of and programs_of[account_id] != a.program:
            problems.append(f"{where}: posted under program {programs_of[account_id]}")
        lots = sum(lot.remaining for lot in a.lots)
        for lot in a.lots:
            try:
                in_lots[COHORT_KEY.pack(AGG_COHORT, a.program, lot.issued_hour,
                                        lot.partner)] += lot.remaining
            except struct.error:
                problems.append(f"{where}: lot {lot.lot_no} issued in hour "
                                f"{lot.issued_hour}, which no cohort holds")
        if a.balance != lots - a.debt:
            problems.append(f"{where}: balance {a.balance} != lots {lots} - debt {a.debt}")
        if a.held != sum(h.amount for h in a.holds):
            problems.append(f"{where}: held {a.held} != sum of holds")
        if a.debt < 0 or a.held < 0:
            problems.append(f"{where}: negative debt or held")
        if any(lot.remaining <= 0 for lot in a.lots):
            problems.append(f"{where}: empty or negative lot")
        if [l.sort_key() for l in a.lots] != sorted(l.sort_key() for l in a.lots):
            problems.append(f"{where}: lots out of expiry order")
        if len(a.lots) > MAX_LOTS or len(a.holds) > MAX_HOLDS:
            problems.append(f"{where}: too many lots or holds")
        if any(h.amount <= 0 for h in a.holds):
            problems.append(f"{where}: empty hold")
        problems += coupons.check(account_id, a, where)
        if a.tier != tiers.get(account_id, 0):
            problems.append(f"{where}: tier {a.tier}, journal says "
                            f"{tiers.get(account_id, 0)}")
        tier = tiers.get(account_id, 0)  # the journal's, as the index has it
        if tier and index.pop(MEMBER_INDEX_KEY.pack(
                IDX_TIER, a.program, tier, account_id), None) is None:
            problems.append(f"{where}: tier {tier} not in the member index")
        raw = index.pop(BIRTHDAY_OF_KEY.pack(IDX_BIRTHDAY_OF, account_id), None)
        if raw is not None:
            problems += _birthday_problems(where, a.program, account_id, raw, index)
        if a.visit_days != rebuilt.visit_days.get(account_id, []):
            problems.append(f"{where}: visit days {a.visit_days}, journal says "
                            f"{rebuilt.visit_days.get(account_id, [])}")
        if a.lots and a.lots[0].expires_at != NEVER and not (
                indexed.get(account_id, NEVER) <= a.lots[0].expires_at):
            problems.append(f"{where}: earliest expiry not in the expiry index")

    for key, value in snap.scan("system"):
        program, kind, partner = SYSTEM_KEY.unpack(key)
        balance = I64.unpack(value)[0]
        totals[program] += balance
        if replayed.get((program, kind, partner), 0) != balance:
            problems.append(f"system account {program}/{kind}/{partner}: balance "
                            f"{balance}, journal says {replayed.get((program, kind, partner), 0)}")
    for program, total in sorted(totals.items()):
        if total != 0:
            problems.append(f"program {program}: balances sum to {total}, not 0")

    for key in index:  # what no member accounted for
        problems.append(f"member index {key!r}: names no member so")
    stored = {key: value for key, value in snap.scan("bonus_counters")}
    for key in sorted(stored.keys() | counters.keys()):
        values = (list(COUNTER_VALUE.unpack(stored[key]))
                  if len(stored.get(key, b"")) == COUNTER_VALUE.size else stored.get(key))
        if values != counters.get(key):
            problems.append(f"bonus counter {key!r}: stored {values}, journal "
                            f"says {counters.get(key)}")
    problems += _aggregate_problems(snap, rebuilt.rows)
    for key, points in sorted(in_lots.items()):
        row = rebuilt.rows.get(key, [0] * 4)
        outstanding = row[0] - row[1] - row[2] - row[3]
        if points > outstanding:
            problems.append(f"aggregates {aggregates.describe(key)}: lots hold "
                            f"{points}, outstanding by the journal {outstanding}")

    for name in ("cards", "externals"):
        for key, value in snap.scan(name):
            if name == "externals":
                account_id = U64.unpack(value)[0]
            else:
                account_id = int.from_bytes(value[:8], "little")
            if snap.get("accounts", U64.pack(account_id)) is None:
                problems.append(f"{name} {key!r}: names missing account {account_id}")
    for key, _ in snap.scan("profiles"):
        account_id = U64.unpack(key)[0] if len(key) == U64.size else None
        if account_id is None or snap.get("accounts", key) is None:
            problems.append(f"profiles {key!r}: names missing account {account_id}")
    return problems


def _birthday_problems(where, program, account_id, raw, index):
    """A member's birthday (`raw`, from its 0x03 key) must be a date and
    indexed under its program (that 0x02 key is taken out of `index`)."""
    if len(raw) != BIRTHDAY_VALUE.size:
        return [f"{where}: birthday {raw!r} malformed"]
    birthday = BIRTHDAY_VALUE.unpack(raw)[0]
    month, day = divmod(birthday, 100)
    if not (1 <= month <= 12 and 1 <= day <= DAYS_IN_MONTH[month - 1]):
        return [f"{where}: birthday {birthday} is no date"]
    if index.pop(MEMBER_INDEX_KEY.pack(IDX_BIRTHDAY, program, birthday, account_id),
                 None) is None:
        return [f"{where}: birthday {birthday} not in the member index"]
    return []


class _Coupons:
    """Members' coupons replayed from the journal (records.py): what each
    account must hold, and the numbers issued."""

    def __init__(self):
        self.held = defaultdict(dict)   # account -> {number: Coupon}
        self.issued = {}                # account -> highest number issued

    def add(self, entry):
        where = f"journal seq {entry.seq}"
        held = self.held[entry.credit]
        number = entry.ref
        if entry.type == Entry.COUPON_CLOSED:
            coupon = held.get(number)
            if coupon is None or coupon.state != CouponState.OPEN:
                return [f"{where}: closes coupon {number}, which is not open"]
            if entry.amount2 not in CLOSED:
                return [f"{where}: closes coupon {number} as {entry.amount2}"]
            coupon.state = entry.amount2
            try:
                value = decode_coupon_closed(entry.data)
            except (ValueError, IndexError):
                value = None
            if value != coupon.value:
                return [f"{where}: closes coupon {number} worth {coupon.value} as "
                        f"worth {value}"]
            redeemed = entry.amount2 == CouponState.REDEEMED
            if not (0 < entry.amount <= coupon.value if redeemed else entry.amount == 0):
                return [f"{where}: coupon {number} took {entry.amount} off"]
            return []
        try:
            usable_from, how = decode_coupon_issued(entry.data)
            moved_from = coupon_moved_from(entry.data) if how == COUPON_MOVED else None
        except (ValueError, IndexError):
            return [f"{where}: coupon issued malformed"]
        last = self.issued.get(entry.credit, 0)
        if not (how in (COUPON_EARNED, COUPON_MOVED) and number == last + 1
                or how == COUPON_GIVEN_BACK and 0 < number <= last):
            return [f"{where}: coupon {number} issued out of order"]
        if moved_from is not None:
            account, was = moved_from
            source = self.held.get(account, {}).get(was)
            if (account == entry.credit or source is None
                    or source.state != CouponState.MOVED
                    or (source.value, source.usable_from, source.expires_at)
                    != (entry.amount, usable_from, entry.amount2)):
                return [f"{where}: coupon {number} moved from account {account}'s "
                        f"coupon {was}, which was not moved so"]
        if any(c.state == CouponState.OPEN and c.number == number for c in held.values()):
            return [f"{where}: coupon {number} issued while open"]
        if how != COUPON_GIVEN_BACK:
            self.issued[entry.credit] = number
        self.held[entry.credit] = {n: c for n, c in held.items()
                                   if c.state == CouponState.OPEN}
        self.held[entry.credit][number] = Coupon(number, CouponState.OPEN, entry.amount,
                                                 usable_from, entry.amount2)
        return []

    def check(self, account_id, account, where):
        expected = sorted(self.held.get(account_id, {}).values(), key=lambda c: c.number)
        problems = []
        if account.coupons != expected:
            problems.append(f"{where}: coupons {account.coupons}, journal says {expected}")
        if account.next_coupon != self.issued.get(account_id, 0) + 1:
            problems.append(f"{where}: next coupon {account.next_coupon}, journal says "
                            f"{self.issued.get(account_id, 0) + 1}")
        if sum(c.state == CouponState.OPEN for c in account.coupons) > MAX_COUPONS:
            problems.append(f"{where}: too many open coupons")
        return problems


def _aggregate_problems(snap, expected):
    """One problem per aggregate row stored unlike the journal's rebuild."""
    problems = []
    stored = dict(snap.scan("aggregates"))
    for key in sorted(stored.keys() | expected.keys()):
        where = f"aggregates {aggregates.describe(key)}"
        if key not in stored:
            says = f", journal says {expected[key]}" if expected[key] else ""
            problems.append(f"{where}: missing{says}")
            continue
        try:
            values = aggregates.decode_value(key, stored[key])
        except (ValueError, IndexError):
            problems.append(f"{where}: malformed value {stored[key]!r}")
            continue
        if key not in expected:
            shown = f" {list(values)}" if values else ""
            problems.append(f"{where}: stored{shown}, journal says none")
            continue
        for name, value, wanted in zip(aggregates.names(key), values,
                                       expected[key]):
            if value != wanted:
                problems.append(f"{where}: {name} {value}, journal says {wanted}")
    return problems


def _named_lots_problems(entry, whole):
    """A posting's named lots must decode, each with points, and add up
    to its amount (`whole`) or at most to it."""
    try:
        lots = decode_lots(entry.data)
    except (ValueError, IndexError):
        return [f"journal seq {entry.seq}: lots named malformed"]
    named = sum(points for _, points, _ in lots)
    if any(points <= 0 for _, points, _ in lots) or (
            named != entry.amount if whole else named > entry.amount):
        return [f"journal seq {entry.seq}: lots named add up to {named}, "
                f"posting moves {entry.amount}"]
    return []
