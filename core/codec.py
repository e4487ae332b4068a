"""Decoded forms of the stored records, with their exact byte encodings."""

from dataclasses import dataclass, field

from .records import (ACCOUNT, CONSUMED, ENTRY, HASH_SIZE, HOLD, LOT, OP,
                      OPERATION, Status)


@dataclass
class Lot:
    lot_no: int
    partner: int
    remaining: int
    activates_at: int
    expires_at: int

    def sort_key(self):
        return (self.expires_at, self.lot_no)


@dataclass
class Hold:
    hold_no: int
    amount: int
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
    lots: list = field(default_factory=list)    # sorted by (expires_at, lot_no)
    holds: list = field(default_factory=list)   # sorted by hold_no

    @classmethod
    def decode(cls, data):
        (program, status, n_lots, n_holds, next_lot, next_hold, balance, debt,
         held, earned, spent, expired, opened_at) = ACCOUNT.unpack_from(data)
        offset = ACCOUNT.size
        lots = []
        for _ in range(n_lots):
            lots.append(Lot(*LOT.unpack_from(data, offset)))
            offset += LOT.size
        holds = []
        for _ in range(n_holds):
            holds.append(Hold(*HOLD.unpack_from(data, offset)))
            offset += HOLD.size
        return cls(program, status, next_lot, next_hold, balance, debt, held,
                   earned, spent, expired, opened_at, lots, holds)

    def encode(self):
        parts = [ACCOUNT.pack(
            self.program, self.status, len(self.lots), len(self.holds),
            self.next_lot, self.next_hold, self.balance, self.debt, self.held,
            self.earned, self.spent, self.expired, self.opened_at)]
        parts += [LOT.pack(l.lot_no, l.partner, l.remaining, l.activates_at,
                           l.expires_at) for l in self.lots]
        parts += [HOLD.pack(h.hold_no, h.amount, h.expires_at)
                  for h in self.holds]
        return b"".join(parts)


@dataclass
class Consumed:
    """Points a spend took from one lot; a refund gives them back there."""
    lot_no: int
    partner: int
    amount: int
    activates_at: int
    expires_at: int


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
    consumed: list = field(default_factory=list)

    @classmethod
    def decode(cls, data):
        fields = OPERATION.unpack_from(data)
        consumed = []
        offset = OPERATION.size
        for _ in range(fields[-1]):
            consumed.append(Consumed(*CONSUMED.unpack_from(data, offset)))
            offset += CONSUMED.size
        return cls(*fields[:-1], consumed)

    def encode(self):
        head = OPERATION.pack(
            self.digest, self.kind, self.hold_state, self.code, self.program,
            self.account, self.a, self.b, self.money, self.spent, self.earned,
            self.earned_lot, self.hold_no, self.refunded_money, self.returned,
            self.clawed, self.partner, len(self.consumed))
        return head + b"".join(
            CONSUMED.pack(c.lot_no, c.partner, c.amount, c.activates_at,
                          c.expires_at) for c in self.consumed)


@dataclass
class JournalEntry:
    seq: int
    type: int
    sys: int
    program: int
    partner: int
    partner2: int
    version: int
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
            self.partner2, self.version, self.time, self.business_time,
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
    program: int
    partner: int
    version: int
    reason: int
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
    raw: bytes


def iter_ops(batch):
    """Decode a batch's operations; raises ValueError on a truncated batch."""
    view = memoryview(batch)
    offset = 0
    while offset < len(view):
        if offset + OP.size > len(view):
            raise ValueError("truncated operation header")
        (kind, flags, n_id, n_key, n_key2, program, partner, version, reason,
         account, account2, amount, amount2, money, activates_at, expires_at,
         business_time) = OP.unpack_from(view, offset)
        end = offset + OP.size + n_id + n_key + n_key2
        if end > len(view):
            raise ValueError("truncated operation")
        p = offset + OP.size
        op_id = bytes(view[p:p + n_id])
        key = bytes(view[p + n_id:p + n_id + n_key])
        key2 = bytes(view[p + n_id + n_key:end])
        yield Op(kind, flags, program, partner, version, reason, account,
                 account2, amount, amount2, money, activates_at, expires_at,
                 business_time, op_id, key, key2, bytes(view[offset:end]))
        offset = end

