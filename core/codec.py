"""Decoded forms of the stored records, with their exact byte encodings."""

from dataclasses import dataclass, field

from .records import (CONSUMED, COUPON_MOVED, ENTRY, HASH_SIZE, OP, OPERATION,
                      VISIT_DAYS, Status)


def _put_uv(out, value):
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_zz(out, value):
    _put_uv(out, ((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF)


class _VarintReader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def uv(self):
        result = shift = 0
        while True:
            byte = self.data[self.pos]  # IndexError on a truncated value
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if result >> 64:
                    raise ValueError("varint too long")
                return result
            shift += 7

    def zz(self):
        value = self.uv()
        return (value >> 1) ^ -(value & 1)


def _varints(data):
    """Every unsigned varint of `data`, decoded in one pass."""
    out, result, shift = [], 0, 0
    for byte in data:
        result |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            if result >> 64:
                raise ValueError("varint too long")
            out.append(result)
            result = shift = 0
    if shift:
        raise IndexError("truncated varint")
    return out


@dataclass
class Lot:
    lot_no: int
    partner: int
    remaining: int
    activates_at: int
    expires_at: int
    issued_hour: int   # the UTC hour its points were issued: its cohort

    def sort_key(self):
        return (self.expires_at, self.lot_no)


@dataclass
class Hold:
    hold_no: int
    amount: int
    expires_at: int


@dataclass
class Coupon:
    number: int
    state: int         # CouponState
    value: int         # money off
    usable_from: int   # usable while usable_from <= business time < expires_at
    expires_at: int


@dataclass
class Account:
    program: int
    status: int = Status.ACTIVE
    next_lot: int = 1
    next_hold: int = 1
    balance: int = 0   # sum of lots' remaining minus debt
    debt: int = 0
    held: int = 0      # sum of open holds
    earned: int = 0
    spent: int = 0
    expired: int = 0
    opened_at: int = 0
    tier: int = 0      # 0: none
    visit_days: list = field(default_factory=list)  # local days, newest first
    lots: list = field(default_factory=list)    # sorted by (expires_at, lot_no)
    holds: list = field(default_factory=list)   # sorted by hold_no
    next_coupon: int = 1   # 1 until a coupon is issued: no coupon part stored
    coupons: list = field(default_factory=list)  # Coupon, by number

    @property
    def last_day(self):
        """1 + the local day of the last receipt; 0: none yet."""
        return self.visit_days[0] + 1 if self.visit_days else 0

    def visits_in(self, first, last):
        """How many of the kept visit days are from `first` to `last`."""
        return sum(1 for d in self.visit_days if first <= d <= last)

    @classmethod
    def decode(cls, data):
        """See records.py for the layout."""
        v = _varints(data)
        program, status, n_lots, n_holds, next_lot, next_hold = v[:6]
        balance, debt, held, earned, spent, expired, opened_at = (
            (x >> 1) ^ -(x & 1) for x in v[6:13])
        tier, n_days = v[13], v[14]
        if n_days > VISIT_DAYS:
            raise ValueError("account value with too many visit days")
        visit_days, i = [], 15
        for delta in v[15:15 + n_days]:
            visit_days.append(visit_days[-1] - delta if visit_days else delta)
        i += n_days
        lots, previous = [], 0
        for _ in range(n_lots):
            lot_no, partner, remaining, delta, window, issued_hour = v[i:i + 6]
            i += 6
            expires_at = previous + delta
            lots.append(Lot(lot_no, partner, (remaining >> 1) ^ -(remaining & 1),
                            expires_at - window, expires_at, issued_hour))
            previous = expires_at
        holds = []
        for _ in range(n_holds):
            hold_no, amount, expires_at = v[i:i + 3]
            i += 3
            holds.append(Hold(hold_no, (amount >> 1) ^ -(amount & 1),
                              (expires_at >> 1) ^ -(expires_at & 1)))
        next_coupon, coupons = 1, []
        if i < len(v):
            next_coupon, n_coupons = v[i], v[i + 1]
            i += 2
            for _ in range(n_coupons):
                number, state, value, usable_from, expires_at = v[i:i + 5]
                i += 5
                coupons.append(Coupon(number, state, (value >> 1) ^ -(value & 1),
                                      (usable_from >> 1) ^ -(usable_from & 1),
                                      (expires_at >> 1) ^ -(expires_at & 1)))
        if i != len(v):
            raise ValueError("account value of the wrong size")
        return cls(program, status, next_lot, next_hold, balance, debt, held,
                   earned, spent, expired, opened_at, tier, visit_days, lots,
                   holds, next_coupon, coupons)

    def encode(self):
        out = bytearray()
        for value in (self.program, self.status, len(self.lots),
                      len(self.holds), self.next_lot, self.next_hold):
            _put_uv(out, value)
        for value in (self.balance, self.debt, self.held, self.earned,
                      self.spent, self.expired, self.opened_at):
            _put_zz(out, value)
        _put_uv(out, self.tier)
        _put_uv(out, len(self.visit_days))
        for i, day in enumerate(self.visit_days):
            _put_uv(out, self.visit_days[i - 1] - day if i else day)
        previous = 0
        for lot in self.lots:
            _put_uv(out, lot.lot_no)
            _put_uv(out, lot.partner)
            _put_zz(out, lot.remaining)
            _put_uv(out, lot.expires_at - previous)
            _put_uv(out, lot.expires_at - lot.activates_at)
            _put_uv(out, lot.issued_hour)
            previous = lot.expires_at
        for hold in self.holds:
            _put_uv(out, hold.hold_no)
            _put_zz(out, hold.amount)
            _put_zz(out, hold.expires_at)
        if self.next_coupon > 1:
            _put_uv(out, self.next_coupon)
            _put_uv(out, len(self.coupons))
            for c in self.coupons:
                _put_uv(out, c.number)
                _put_uv(out, c.state)
                _put_zz(out, c.value)
                _put_zz(out, c.usable_from)
                _put_zz(out, c.expires_at)
        return bytes(out)


@dataclass
class Consumed:
    """Points a spend took from one lot; a refund gives them back there."""
    lot_no: int
    partner: int
    amount: int
    activates_at: int
    expires_at: int
    issued_hour: int


def encode_lots(lots):
    """A posting's data naming the lots it touched (records.py): `lots` are
    (lot_no, points, issued_hour)."""
    out = bytearray()
    for lot_no, points, issued_hour in lots:
        _put_uv(out, lot_no)
        _put_uv(out, points)
        _put_uv(out, issued_hour)
    return bytes(out)


def decode_lots(data):
    """[(lot_no, points, issued_hour)] of a posting's data; ValueError or
    IndexError when malformed."""
    v = _varints(data)
    if len(v) % 3:
        raise ValueError("lots of a posting: not whole triples")
    return [tuple(v[i:i + 3]) for i in range(0, len(v), 3)]


def encode_coupon_issued(usable_from, how, *moved_from):
    """A COUPON_ISSUED entry's data (records.py); `moved_from`, for
    COUPON_MOVED: the merged member's account and coupon number."""
    out = bytearray()
    for value in (usable_from, how, *moved_from):
        _put_uv(out, value)
    return bytes(out)


def decode_coupon_issued(data):
    """(usable_from, how) of a COUPON_ISSUED entry's data; ValueError or
    IndexError when malformed. See `coupon_moved_from` for COUPON_MOVED."""
    v = _varints(data)
    if len(v) not in (2, 4) or (len(v) == 4) != (v[1] == COUPON_MOVED):
        raise ValueError("coupon issued: malformed")
    return v[0], v[1]


def encode_coupon_closed(value):
    """A COUPON_CLOSED entry's data (records.py): the coupon's value."""
    out = bytearray()
    _put_uv(out, value)
    return bytes(out)


def decode_coupon_closed(data):
    """The coupon's value a COUPON_CLOSED entry's data holds; ValueError or
    IndexError when malformed."""
    v = _varints(data)
    if len(v) != 1:
        raise ValueError("coupon closed: not one number")
    return v[0]


def coupon_moved_from(data):
    """(account, number) of the coupon a COUPON_MOVED entry's data names."""
    v = _varints(data)
    if len(v) != 4 or v[1] != COUPON_MOVED:
        raise ValueError("coupon issued: not moved")
    return v[2], v[3]


@dataclass
class Operation:
    """What the ledger remembers of an applied operation id."""
    digest: bytes
    kind: int
    hold_state: int = 0
    code: int = 0
    program: int = 0
    account: int = 0
    a: int = 0
    b: int = 0
    money: int = 0
    spent: int = 0
    earned: int = 0
    earned_lot: int = 0
    hold_no: int = 0
    refunded_money: int = 0
    returned: int = 0
    clawed: int = 0
    partner: int = 0
    store: int = 0
    consumed: list = field(default_factory=list)
    data: bytes = b""  # the operation's own data, opaque to the ledger

    @classmethod
    def decode(cls, data):
        fields = OPERATION.unpack_from(data)
        n_consumed, n_data = fields[-2], fields[-1]
        consumed = []
        offset = OPERATION.size
        for _ in range(n_consumed):
            consumed.append(Consumed(*CONSUMED.unpack_from(data, offset)))
            offset += CONSUMED.size
        if len(data) != offset + n_data:
            raise ValueError("operation record of the wrong size")
        return cls(*fields[:-2], consumed, bytes(data[offset:]))

    def encode(self):
        head = OPERATION.pack(
            self.digest, self.kind, self.hold_state, self.code, self.program,
            self.account, self.a, self.b, self.money, self.spent, self.earned,
            self.earned_lot, self.hold_no, self.refunded_money, self.returned,
            self.clawed, self.partner, self.store, len(self.consumed),
            len(self.data))
        return head + b"".join(
            CONSUMED.pack(c.lot_no, c.partner, c.amount, c.activates_at,
                          c.expires_at, c.issued_hour)
            for c in self.consumed) + self.data


@dataclass
class JournalEntry:
    seq: int
    type: int
    sys: int
    program: int
    partner: int
    partner2: int
    version: int
    store: int
    time: int
    business_time: int
    debit: int
    credit: int
    amount: int
    amount2: int
    ref: int
    op_id: bytes
    data: bytes
    hash: bytes = b""

    def body(self):
        """The bytes the chain hash covers (after the previous hash)."""
        return ENTRY.pack(
            self.seq, self.type, self.sys, self.program, self.partner,
            self.partner2, self.version, self.store, self.time, self.business_time,
            self.debit, self.credit, self.amount, self.amount2, self.ref,
            len(self.op_id), len(self.data)) + self.op_id + self.data

    @classmethod
    def decode(cls, data):
        fields = ENTRY.unpack_from(data)
        n_op, n_data = fields[-2], fields[-1]
        offset = ENTRY.size
        op_id = bytes(data[offset:offset + n_op])
        offset += n_op
        blob = bytes(data[offset:offset + n_data])
        offset += n_data
        digest = bytes(data[offset:offset + HASH_SIZE])
        return cls(*fields[:-2], op_id, blob, digest)


@dataclass
class Op:
    """One decoded operation from a batch, with its exact encoded bytes."""
    kind: int
    flags: int
    link: int
    program: int
    partner: int
    version: int
    reason: int
    store: int
    lane: int
    account: int
    account2: int
    amount: int
    amount2: int
    money: int
    activates_at: int
    expires_at: int
    business_time: int
    op_id: bytes
    key: bytes
    key2: bytes
    data: bytes
    raw: bytes


def iter_ops(batch):
    """Decode a batch's operations; raises ValueError on a truncated batch."""
    view = memoryview(batch)
    offset = 0
    while offset < len(view):
        if offset + OP.size > len(view):
            raise ValueError("truncated operation header")
        (kind, flags, n_id, n_key, n_key2, link, n_data, program, partner,
         version, reason, store, lane, account, account2, amount, amount2, money,
         activates_at, expires_at, business_time) = OP.unpack_from(view, offset)
        end = offset + OP.size + n_id + n_key + n_key2 + n_data
        if end > len(view):
            raise ValueError("truncated operation")
        p = offset + OP.size
        op_id = bytes(view[p:p + n_id])
        p += n_id
        key = bytes(view[p:p + n_key])
        p += n_key
        key2 = bytes(view[p:p + n_key2])
        data = bytes(view[p + n_key2:end])
        yield Op(kind, flags, link, program, partner, version, reason, store, lane,
                 account, account2, amount, amount2, money, activates_at,
                 expires_at, business_time, op_id, key, key2, data,
                 bytes(view[offset:end]))
        offset = end

