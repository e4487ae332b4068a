"""Building batches of operations and reading their results.

A batch is a flat byte string of `records.OP` headers each followed by its
op id, key, key2 and data. Fields an operation does not use are zero, so the
same request always encodes to the same bytes (its idempotency digest).
"""

from dataclasses import dataclass

from .records import (COUPON_ONE_PER_CUSTOMER, LINKED, MAX_DATA, NEVER, OP,
                      PROFILE_ERASE, REFUND_KEEP_COUPON, REFUND_PROPORTIONAL,
                      RESULT, RESULT_REPLAYED, TRANSFER_ALL,
                      TRANSFER_ONE_COUPON, Code, Kind)

_LINK_AT = 5  # the `link` byte of records.OP


@dataclass(frozen=True)
class Result:
    code: Code
    a: int = 0
    b: int = 0
    replayed: bool = False

    @property
    def ok(self):
        return self.code == Code.OK


_CODES = {code.value: code for code in Code}  # Code(value), without the call


class Results:
    """One result per operation, decoded on access from the packed buffer."""

    def __init__(self, buffer):
        self._buffer = bytes(buffer)

    def __len__(self):
        return len(self._buffer) // RESULT.size

    @property
    def raw(self):
        """The packed results, `records.RESULT` each: for slicing and passing on."""
        return self._buffer

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        code, flags, a, b = RESULT.unpack_from(self._buffer, index * RESULT.size)
        code = _CODES[code] if code in _CODES else Code(code)  # (OK is falsy)
        return Result(code, a, b, bool(flags & RESULT_REPLAYED))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self):
        return f"Results({list(self)!r})"

    def codes(self):
        return [r.code for r in self]


def _bytes(value):
    return value.encode() if type(value) is str else bytes(value)


def _birthday(birthday):
    """(month, day) as the ledger's month * 100 + day; 0 for None."""
    return 0 if birthday is None else birthday[0] * 100 + birthday[1]


class Batch:
    """Operations to apply in one durable transaction, in order."""

    def __init__(self):
        self._buffer = bytearray()
        self.count = 0
        self._last = None  # offset of the last operation added

    @classmethod
    def encoded(cls, buffer, count, last):
        """A batch of `count` operations already encoded in `buffer` (a
        bytearray, taken over), the last one at offset `last`: what
        core._pricing builds a settlement's operations into."""
        batch = cls()
        batch._buffer, batch.count = buffer, count
        batch._last = last if count else None
        return batch

    def __len__(self):
        return self.count

    def __bytes__(self):
        return bytes(self._buffer)

    def add(self, kind, op_id, *, key=b"", key2=b"", data=b"", flags=0,
            program=0, partner=0, version=0, reason=0, store=0, lane=0,
            account=0, account2=0, amount=0,
            amount2=0, money=0, activates_at=0, expires_at=0,
            business_time=0):
        """Append one raw operation; the named helpers below are the usual way.

        Lengths are clamped into the header's byte so that an oversized id
        is still encoded and the ledger, not the encoder, rejects it. `data`
        (up to MAX_DATA bytes) is opaque to the ledger: it is kept with the
        operation's record, or is the profile of OPEN_ACCOUNT and
        SET_PROFILE."""
        op_id, key, key2 = _bytes(op_id), _bytes(key), _bytes(key2)
        data = _bytes(data)
        if len(op_id) > 255 or len(key) > 255 or len(key2) > 255:
            name = "op_id" if len(op_id) > 255 else "key" if len(key) > 255 else "key2"
            raise ValueError(f"{name} longer than 255 bytes")
        if len(data) > MAX_DATA:
            raise ValueError(f"data longer than {MAX_DATA} bytes")
        buffer = self._buffer
        self._last = len(buffer)
        buffer += OP.pack(
            kind, flags, len(op_id), len(key), len(key2), 0, len(data), program,
            partner, version, reason, store, lane, account, account2, amount,
            amount2, money, activates_at, expires_at, business_time)
        buffer += op_id
        buffer += key
        buffer += key2
        buffer += data
        self.count += 1
        return self

    def extend(self, other):
        """Appends another batch's operations, in order."""
        if other._last is not None:
            self._last = len(self._buffer) + other._last
        self._buffer += other._buffer
        self.count += other.count
        return self

    def link(self):
        """Chains the last operation added to the next one: they apply all
        or nothing (records.py, chains). The next one must follow."""
        if self._last is None:
            raise ValueError("no operation to link")
        self._buffer[self._last + _LINK_AT] |= LINKED
        return self

    def put_program(self, op_id, program, *, flags=0, data=b"",
                    utc_offset_minutes=0):
        """`data` is kept with the program's record (its definition);
        `utc_offset_minutes`, the program's standard UTC offset (less than a
        day either way), sets its local days in the aggregates."""
        if not -(1 << 31) <= utc_offset_minutes < 1 << 31:
            raise ValueError("utc_offset_minutes is no int32")
        return self.add(Kind.PUT_PROGRAM, op_id, program=program, flags=flags,
                        data=data, reason=utc_offset_minutes & 0xFFFFFFFF)

    def open_account(self, op_id, program, external_id, *, data=b"",
                     birthday=None):
        """`data`, when given, is the new member's profile (see set_profile);
        `birthday` (month, day) is indexed so that the day finds the member."""
        return self.add(Kind.OPEN_ACCOUNT, op_id, program=program,
                        key=external_id, data=data, reason=_birthday(birthday))

    def set_account_status(self, op_id, account, status, *, data=b""):
        return self.add(Kind.SET_ACCOUNT_STATUS, op_id, account=account,
                        amount=int(status), data=data)

    def link_card(self, op_id, account, card, *, data=b""):
        return self.add(Kind.LINK_CARD, op_id, account=account, key=card, data=data)

    def block_card(self, op_id, card, *, data=b""):
        return self.add(Kind.BLOCK_CARD, op_id, key=card, data=data)

    def replace_card(self, op_id, old_card, new_card, *, data=b""):
        return self.add(Kind.REPLACE_CARD, op_id, key=old_card, key2=new_card,
                        data=data)

    # Receipts and holds name the account by id, or by `card` (then the card
    # must be active: checked in the same transaction).

    def earn(self, op_id, account, points, *, activates_at=0,
             expires_at=NEVER, money=0, partner=0, version=0,
             business_time=0, card=b"", store=0, lane=0, data=b""):
        return self.add(Kind.EARN, op_id, account=account, amount2=points,
                        key2=card, store=store, lane=lane, data=data,
                        activates_at=activates_at, expires_at=expires_at,
                        money=money, partner=partner, version=version,
                        business_time=business_time)

    def spend(self, op_id, account, points, *, money=0, partner=0, version=0,
              business_time=0, card=b"", store=0, lane=0, data=b""):
        return self.add(Kind.SPEND, op_id, account=account, amount=points,
                        key2=card, store=store, lane=lane, data=data,
                        money=money, partner=partner, version=version,
                        business_time=business_time)

    def hold(self, op_id, account, points, *, expires_at, partner=0, card=b"",
             store=0, lane=0, data=b""):
        return self.add(Kind.HOLD, op_id, account=account, amount=points,
                        expires_at=expires_at, partner=partner, key2=card,
                        store=store, lane=lane, data=data)

    def capture(self, op_id, account, *, hold=b"", spend=0, earn=0,
                activates_at=0, expires_at=NEVER, money=0, partner=0,
                version=0, business_time=0, card=b"", store=0, lane=0,
                data=b""):
        """Spend (from `hold`, the hold's op id, when given) and earn, at once.

        With neither (no hold, nothing spent or earned) and `money`, it
        records a receipt that moved no points: a visit, money for tiers."""
        return self.add(Kind.CAPTURE, op_id, key=hold, key2=card, account=account,
                        store=store, lane=lane, data=data,
                        amount=spend, amount2=earn, activates_at=activates_at,
                        expires_at=expires_at, money=money, partner=partner,
                        version=version, business_time=business_time)

    def void(self, op_id, hold, *, store=0, lane=0, data=b""):
        return self.add(Kind.VOID, op_id, key=hold, store=store, lane=lane, data=data)

    def refund(self, op_id, original, *, money=0, give_back=0, claw_back=0,
               proportional=False, keep_coupon=False, version=0,
               business_time=0, store=0, lane=0, data=b""):
        """Refund part or all of `original` (an earn, spend or capture op id).

        Proportional: points follow `money` / the receipt's money, rounded
        down on the running total so partial refunds never drift. Otherwise
        `give_back` spent points and `claw_back` earned points, as priced.
        A coupon operation's refund has no amounts (records.py); with
        `keep_coupon`, one of a redemption is only noted."""
        return self.add(Kind.REFUND, op_id, key=original, money=money,
                        amount=give_back, amount2=claw_back,
                        flags=(REFUND_PROPORTIONAL if proportional else 0)
                        | (REFUND_KEEP_COUPON if keep_coupon else 0),
                        version=version, business_time=business_time,
                        store=store, lane=lane, data=data)

    def adjust(self, op_id, account, points, *, reason, activates_at=0,
               expires_at=NEVER, business_time=0, data=b""):
        return self.add(Kind.ADJUST, op_id, account=account, amount=points,
                        reason=reason, activates_at=activates_at,
                        expires_at=expires_at, business_time=business_time,
                        data=data)

    def transfer(self, op_id, source, target, points=0, *, everything=False,
                 one_coupon=False, data=b""):
        """`points` from `source` to `target`, or `everything` (a merge: every
        lot and open coupon; `one_coupon`: the target keeps one at most)."""
        flags = (TRANSFER_ALL if everything else 0) | (
            TRANSFER_ONE_COUPON if one_coupon else 0)
        return self.add(Kind.TRANSFER, op_id, account=source, account2=target,
                        amount=points, flags=flags, data=data)

    def sweep(self, op_id, limit=10_000):
        return self.add(Kind.SWEEP, op_id, amount=limit)

    def set_profile(self, op_id, account, data, *, erase=False, external_id=b"",
                    birthday=None):
        """Store the member's profile (`data`; empty deletes it) and its
        `birthday` (month, day), which replaces the one indexed (None: none).

        `erase` also deletes the external id mapping `external_id` (it must
        be this account's); with no external id only the profile goes. The
        profile is kept in `profiles` alone, never in the journal or the
        operation's record, so deleting it leaves no copy behind."""
        return self.add(Kind.SET_PROFILE, op_id, account=account, data=data,
                        key=external_id, flags=PROFILE_ERASE if erase else 0,
                        reason=_birthday(birthday))

    # Coupons (records.py): money off a later purchase, kept per member.

    def issue_coupon(self, op_id, account, value, *, usable_from, expires_at,
                     one_per_customer=True, receipt=b"", partner=0, version=0,
                     business_time=0, card=b"", store=0, lane=0, data=b""):
        """A coupon worth `value` (money) usable from `usable_from` until
        `expires_at`; `receipt`, the op id of the purchase that earned it."""
        return self.add(Kind.ISSUE_COUPON, op_id, account=account, amount=value,
                        activates_at=usable_from, expires_at=expires_at,
                        flags=COUPON_ONE_PER_CUSTOMER if one_per_customer else 0,
                        key=receipt, key2=card, partner=partner, version=version,
                        business_time=business_time, store=store, lane=lane,
                        data=data)

    def redeem_coupon(self, op_id, account, number, amount, *, receipt=b"",
                      partner=0, version=0, business_time=0, card=b"", store=0,
                      lane=0, data=b""):
        """Coupon `number` of the member takes `amount` (money) off the
        purchase `receipt` (its op id), judged at `business_time`."""
        return self.add(Kind.REDEEM_COUPON, op_id, account=account, amount=amount,
                        amount2=number, key=receipt, key2=card, partner=partner,
                        version=version, business_time=business_time,
                        store=store, lane=lane, data=data)

    def set_tier(self, op_id, account, tier):
        """The member's tier (0: none, up to MAX_TIER), e.g. at a period's close."""
        return self.add(Kind.SET_TIER, op_id, account=account, amount=tier)

    def award(self, op_id, account, points, *, counter, limit=0,
              activates_at=0, expires_at=NEVER, partner=0, version=0,
              business_time=0, store=0, lane=0, data=b""):
        """`points` for the member, counted on their counter named `counter`
        (e.g. "action/review/2026-11-23"); LIMIT_REACHED once it holds
        `limit` (0: no limit)."""
        return self.add(Kind.AWARD, op_id, account=account, key=counter,
                        amount=limit, amount2=points, activates_at=activates_at,
                        expires_at=expires_at, partner=partner, version=version,
                        business_time=business_time, store=store, lane=lane,
                        data=data)

    def visit(self, op_id, receipt, points, *, counter, count, account=0,
              activates_at=0, expires_at=NEVER, partner=0, version=0,
              business_time=0, store=0, lane=0):
        """Counts `receipt` (the op id of an earn, spend or capture already
        applied, e.g. earlier in this batch) as a visit of its member on
        the counter `counter`; the visit that makes it `count` earns
        `points`, once per counter."""
        return self.add(Kind.VISIT, op_id, account=account, key=counter,
                        key2=receipt, amount=count, amount2=points,
                        activates_at=activates_at, expires_at=expires_at,
                        partner=partner, version=version,
                        business_time=business_time, store=store, lane=lane)
