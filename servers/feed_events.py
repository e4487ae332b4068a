"""Journal entries as the feed's `JournalEvent`s (feed.proto's mapping).

Pure: one stored `core.codec.JournalEntry` in, one message out. How each
entry type fills the entry's generic columns (see core/twin.py):
events (type < 16) name their member in `credit` and carry `amount`,
`amount2`, `ref` and `data` per type; postings move `amount` from `debit`
to `credit`, one side a program system account, `ref` the lot concerned.
Entry types the API does not know yet pass through as their number.
"""

from kopilka.core.codec import coupon_moved_from, decode_coupon_issued
from kopilka.core.records import (COUPON_GIVEN_BACK, COUPON_MOVED, PROGRAM_ALLOW_DEBT,
                                  SYSTEM, CouponState, Entry)
from kopilka.v1 import common_pb2, feed_pb2

from . import convert

FIRST_POSTING = Entry.EARN
_PARTNER_MASK = (1 << 32) - 1


def _text(raw):
    return raw.decode("utf-8", "replace")


def ledger_account(program, account_id):
    """A posting side: a member, or a program system account."""
    if account_id & SYSTEM:
        kind = (account_id & ~SYSTEM) >> 32
        partner = account_id & _PARTNER_MASK
        return common_pb2.LedgerAccount(system=common_pb2.SystemAccount(
            kind=kind, partner=convert.partner_name(program, partner)))
    return common_pb2.LedgerAccount(member=convert.member_name(program, account_id))


def _member_of(entry):
    """The member a posting concerns: its member side (a transfer's source)."""
    if entry.debit and not entry.debit & SYSTEM:
        return entry.debit
    if entry.credit and not entry.credit & SYSTEM:
        return entry.credit
    return 0


def _details(event, entry, currency):
    t = entry.type
    if t == Entry.PROGRAM_PUT:
        event.program_put.allow_debt = bool(entry.amount & PROGRAM_ALLOW_DEBT)
    elif t == Entry.ACCOUNT_OPENED:
        event.account_opened.external_id = _text(entry.data)
    elif t == Entry.ACCOUNT_STATUS:
        event.member_state.state = entry.amount
    elif t in (Entry.CARD_LINKED, Entry.CARD_BLOCKED, Entry.CARD_REPLACED):
        event.card.card_number = _text(entry.data)
    elif t == Entry.HOLD_PLACED:
        d = event.hold_placed
        d.hold_number, d.points = entry.ref, entry.amount
        convert.set_time(d, "expire_time", entry.amount2)
    elif t == Entry.HOLD_RELEASED:
        d = event.hold_released
        d.hold_number, d.points, d.reason = entry.ref, entry.amount, entry.amount2
    elif t == Entry.RECEIPT:
        d = event.receipt
        d.paid.CopyFrom(convert.money(entry.amount, currency))
        d.spent_points, d.lot_number = entry.amount2, entry.ref
    elif t == Entry.ADJUST:
        event.adjustment.reason = entry.amount2
    elif t == Entry.BONUS:
        d = event.bonus
        d.counter, d.count = _text(entry.data), entry.amount2
        d.points, d.lot_number = entry.amount, entry.ref
    elif t == Entry.COUPON_ISSUED:
        d = event.coupon_issued
        usable_from, how = decode_coupon_issued(entry.data)
        d.coupon_number, d.given_back = entry.ref, how == COUPON_GIVEN_BACK
        if how == COUPON_MOVED:
            d.moved_from = convert.coupon_code(*coupon_moved_from(entry.data))
        d.value.CopyFrom(convert.money(entry.amount, currency))
        convert.set_time(d, "usable_time", usable_from)
        convert.set_time(d, "expire_time", entry.amount2)
    elif t == Entry.COUPON_CLOSED:
        d = event.coupon_closed
        d.coupon_number, d.state = entry.ref, entry.amount2
        if entry.amount2 == CouponState.REDEEMED:
            d.discount.CopyFrom(convert.money(entry.amount, currency))


def journal_event(entry, currency="", raw=False):
    """The JournalEvent of one entry; `currency` is its program's (receipts'
    money); `raw` adds the entry's stored, hashed bytes."""
    program = entry.program
    event = feed_pb2.JournalEvent(
        cursor=entry.seq, type=entry.type, operation_id=_text(entry.op_id),
        program=convert.program_name(program) if program else "",
        program_version=(convert.version_name(program, entry.version)
                         if entry.version else ""),
        store=f"stores/{entry.store}" if entry.store else "",
        partner=convert.partner_name(program, entry.partner), hash=entry.hash)
    convert.set_time(event, "operation_time", entry.time)
    if entry.business_time > 0:
        convert.set_time(event, "business_time", entry.business_time)
    if entry.type >= FIRST_POSTING:
        member = _member_of(entry)
        if member:
            event.member = convert.member_name(program, member)
        event.debit.CopyFrom(ledger_account(program, entry.debit))
        event.credit.CopyFrom(ledger_account(program, entry.credit))
        event.points = entry.amount
        event.lot_number = entry.ref
        if entry.type in (Entry.SPEND, Entry.RETURN):
            event.issuing_partner = convert.partner_name(program, entry.partner2)
    elif entry.credit:
        event.member = convert.member_name(program, entry.credit)
    _details(event, entry, currency)
    if raw:
        event.raw_entry = entry.body()
    return event
