"""What every servicer needs below the protobuf: the ledger, its writer, the
programs, the clock, and the idempotency rules of the API.

Idempotency. A write RPC becomes one kernel operation whose id is the
request's `operation_id`; its data (stored with the operation, in the same
commit) holds a digest of the request and the figures of the answer. A retry
is recognised before anything is priced: the same request gets the first
answer rebuilt from what was stored (`replayed`), another request under the
same id gets OPERATION_ID_REUSED. Pricing can depend on the moment (balances,
tiers, the hold's expiry), so two racing copies of one request may encode
different operations; the loser's OP_ID_REUSED is then checked against the
stored request digest too.
"""

import hashlib
import json
import logging

from kopilka.core.batch import Batch
from kopilka.core.reads import balances_of, coupon_state, is_regular, offered_coupon
from kopilka.core.receipt import Member, MemberCoupon
from kopilka.core.records import (DAY, MAX_OP_ID, CardStatus, Code, CouponState,
                                  LedgerError, MapFullError)

from . import convert, profiles
from .status import ApiError, from_kernel, invalid, server
from .writer import DeadlineExceeded, WriterClosed

log = logging.getLogger("kopilka.backend")


def request_digest(request):
    """The identity of a request for idempotency: 16 bytes, hex."""
    raw = request.SerializeToString(deterministic=True)
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def id_base(op_id, suffix):
    """What follow-up operation ids of the client's `op_id` start with: the
    id itself, or a digest of it when `suffix` would overflow 128 bytes."""
    if len(op_id) + len(suffix) <= MAX_OP_ID:
        return op_id
    return b"~" + hashlib.blake2b(op_id, digest_size=16).hexdigest().encode()


def derived_id(op_id, suffix):
    """The id of a follow-up operation of the client's `op_id`."""
    return id_base(op_id, suffix) + suffix.encode()


def main_result(results, start=0, count=None):
    """The result a request's operations answer by (`count` of `results`
    from `start`; all by default): the first's, or when they were a chain
    that failed (records.py), the code of the one that failed (the others
    say only LINKED_FAILED). Only the first is decoded when it says enough."""
    first = results[start]
    if first.code != Code.LINKED_FAILED:
        return first
    end = len(results) if count is None else start + count
    return next((r for r in map(results.__getitem__, range(start + 1, end))
                 if r.code != Code.LINKED_FAILED), first)


def _compact_encoder():
    """json.dumps(answer, separators=(",", ":")), less its cost per call:
    JSONEncoder.encode makes a new C encoder each time (half the time of a
    capture's answer); this one is made once."""
    make = json.encoder.c_make_encoder
    if make is None:  # no C accelerator: the plain way
        return json.JSONEncoder(separators=(",", ":")).encode
    encode = make(None, json.JSONEncoder().default,  # no markers: answers are trees
                  json.encoder.encode_basestring_ascii, None, ":", ",", False, False,
                  True)
    return lambda answer: "".join(encode(answer, 0))


_PACK = _compact_encoder()


def pack(answer):
    return _PACK(answer).encode()


def unpack(data):
    return json.loads(data) if data else {}


def _tier_name(version, tier):
    """Tier number `tier` (levels from 1) by name in `version`; 0 (never
    placed by a close) is the lowest level. Empty when the version has no
    tiers, or no such level."""
    tiers = version.tiers if version is not None else None
    return (tiers.name(max(tier, 1)) if tiers is not None else None) or ""


class Backend:
    def __init__(self, ledger, writer, registry, clock, monotonic, *,
                 hold_seconds=900):
        self.ledger = ledger
        self.writer = writer
        self.registry = registry
        self.clock = clock            # integer microseconds (the ledger's time)
        self.monotonic = monotonic    # seconds, for deadlines
        self.hold_seconds = hold_seconds

    # --- writing ----------------------------------------------------------------
    def deadline(self, context):
        remaining = context.time_remaining() if context is not None else None
        return None if remaining is None else self.monotonic() + remaining

    async def apply(self, batch, context):
        """Results of a batch committed through the group-commit writer."""
        try:
            return await self.writer.submit(bytes(batch), len(batch),
                                            deadline=self.deadline(context))
        except DeadlineExceeded:
            raise server("DEADLINE_PASSED", "the deadline passed before the request "
                         "was committed; nothing was applied") from None
        except WriterClosed:
            raise server("SHUTTING_DOWN", "the server is shutting down") from None
        except MapFullError:
            raise server("STORE_FULL", "the ledger's storage is full; nothing was "
                         "written") from None
        except LedgerError as exc:     # the disk refused the commit (ENOSPC, EIO)
            log.error("commit failed: nothing written", extra={"fields": {
                "error": str(exc)}})
            raise server("STORE_WRITE_FAILED", "the ledger could not write to its "
                         "disk; nothing was written") from None

    def stored(self, op_id, digest):
        """The stored answer of an earlier request with this id, or None;
        OPERATION_ID_REUSED if that request was another one."""
        record = self.ledger.operation(op_id)
        if record is None:
            return None
        answer = unpack(record.data)
        if answer.get("rq") != digest:
            raise from_kernel(Code.OP_ID_REUSED, message="operation_id was used "
                              "before for a different request")
        return record, answer

    async def write_one(self, op_id, digest, build, context, field_of=None):
        """Applies the single operation `build(batch)` adds, idempotently.

        Returns (record, answer, replayed). A refusal raises ApiError;
        `field_of(code)` names the request field a kernel code is about."""
        first = self.stored(op_id, digest)
        if first is not None:
            return first[0], first[1], True
        batch = Batch()
        build(batch)
        result = (await self.apply(batch, context))[0]
        if result.code == Code.OP_ID_REUSED:
            first = self.stored(op_id, digest)  # a racing copy won
            if first is not None:
                return first[0], first[1], True
        if result.code != Code.OK:
            raise self.refusal(result.code, field_of)
        record = self.ledger.operation(op_id)
        return record, unpack(record.data), bool(result.replayed)

    def refusal(self, code, field_of=None, **metadata):
        return from_kernel(code, field_of(code) if field_of else None, **metadata)

    # --- reading ----------------------------------------------------------------
    def program(self, program_id, field="program"):
        entry = self.registry.get(program_id)
        if entry is None:
            raise ApiError("NOT_FOUND", "PROGRAM_NOT_FOUND",
                           f"{field}: program {program_id} does not exist")
        return entry

    def account(self, program, account_id, field="member"):
        account = self.ledger.account(account_id)
        if account is None or account.program != program:
            raise ApiError("NOT_FOUND", "MEMBER_NOT_FOUND",
                           f"{field}: no such member")
        return account

    def customer(self, request, field_prefix=""):
        """(program, account id, card bytes, Account) of a request's
        `customer` oneof, read once for the whole request.

        A card is resolved here for pricing; the kernel checks it again in
        the operation's own transaction (a card blocked meanwhile fails)."""
        which = request.WhichOneof("customer")
        if which == "member":
            field = field_prefix + "member"
            program, account_id = convert.parse_member(request.member, field)
            return program, account_id, b"", self.account(program, account_id, field)
        if which == "card_number":
            field = field_prefix + "card_number"
            card = convert.identifier(request.card_number, field)
            found = self.ledger.card(card)
            if found is None:
                raise ApiError("NOT_FOUND", "CARD_NOT_FOUND",
                               f"{field}: no card has this number")
            account_id, status = found
            if status != CardStatus.ACTIVE:
                raise from_kernel(Code.CARD_BLOCKED)
            account = self.ledger.account(account_id)
            return account.program, account_id, card, account
        raise invalid([(field_prefix + "customer", "set member or card_number")])

    def balances(self, account_id, now=None):
        now = self.clock() if now is None else now
        b = self.ledger.balances(account_id, now)
        return convert.balances(b, now) if b is not None else None

    def balances_fields(self, account_id, now=None):
        """`balances` as a dict, for a response built in one call."""
        now = self.clock() if now is None else now
        b = self.ledger.balances(account_id, now)
        return convert.balances_fields(b, now) if b is not None else None

    def version_at(self, program_id, at):
        """The program version in force at `at`, or None (no such program,
        or none in force yet)."""
        entry = self.registry.get(program_id)
        try:
            return entry.program.version_at(at) if entry is not None else None
        except LookupError:
            return None

    def tier_name(self, program_id, tier, at):
        """The name of tier number `tier` in the version in force at `at`."""
        return _tier_name(self.version_at(program_id, at), tier)

    def regular(self, account, at):
        """Whether the member is a regular customer at `at` (core/program.py)."""
        return self._regular(account, self.version_at(account.program, at), at)

    def _regular(self, account, version, at):
        if version is None:
            return False
        offset = self.registry.get(account.program).program.utc_offset_minutes
        return is_regular(account, version.regular_customer, at, offset)

    def member_context(self, account_id, account, card=b"", held=0, now=None,
                       at=None):
        """The pricing engine's view of a member (its Account as read), for a
        receipt of business time `at` (default: now).

        A referral matters only within its window after enrolment, so the
        profile (with the referrer) is read only then: the newcomer's first
        purchase takes the newcomer discount, and the referrer earns a share.
        The coupon is the one a checkout prices with (`reads.offered_coupon`);
        whether the member is a regular, by the visit days the account keeps."""
        now = self.clock() if now is None else now
        at = now if at is None else at
        b = balances_of(account_id, account, now)
        version = self.version_at(account.program, at)
        tier = _tier_name(version, account.tier) or None
        regular = self._regular(account, version, at)
        referrer = 0
        referral = version.referral if version is not None else None
        if referral is not None and at < account.opened_at + referral.window_days * DAY:
            referrer = profiles.decode(self.ledger.profile(account_id)).referrer
        c = offered_coupon(account, now) if account.coupons else None
        coupon = None
        if c is not None:
            window = (c.usable_from, c.expires_at)
            if coupon_state(c, now) == CouponState.EXPIRED:
                # lapsed by now: expired for any business time, a late
                # upload's too, as the ledger closes it whatever the receipt
                window = (0, 0)
            coupon = MemberCoupon(convert.coupon_code(account_id, c.number), c.value,
                                  *window, c.number)
        return Member(available=b.available, held=held, account=account_id,
                      card=card, tier=tier, regular=regular, referrer=referrer,
                      newcomer=bool(referrer) and account.last_day == 0,
                      enrolled_at=account.opened_at if referrer else None,
                      coupon=coupon)
