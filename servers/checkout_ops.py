"""Checkout writes as prepared operations: checked, priced, encoded, then
committed by whoever holds them (one unary RPC, or many in one `Post`).

`prepare_*` does everything that can fail before the ledger is asked
(names, scope, pricing, the idempotency check) and returns a `Prepared`:
either an answer already known (a retry: the first answer, rebuilt) or one
kernel operation to commit and a `finish(result)` that builds the response.
`follow_up` holds the referral share a capture pays, or the referrer's
clawback a refund takes: applied only once the main operation succeeded,
since the kernel applies a batch's operations independently.

Visits. A capture with money of at least the version's `visits.min_receipt`
is a visit: its batch also holds a VISIT operation naming the capture, which
the kernel applies only if the capture was (it must find it), in the same
commit. It counts the visit on the member's counter of the period, and the
visit that reaches `visits.count` earns the bonus, once per period and
member: retries replay both by their ids, concurrent captures are counted
one after the other. A refund takes neither the visit nor its bonus back (a
returned purchase was still a visit to the store).

Stored with each operation (its data, see backend.py): the request digest,
and what the answer and later refunds need. A refund also appends its data
to the capture's, so the capture's data lists, in commit order, every line
returned so far: that is what the next per-line refund prices against.
"""

import json
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from kopilka.core.allocation import (Allocation, LineShare, refund_lines,
                                     refund_referral)
from kopilka.core.batch import Batch
from kopilka.core.bonuses import visit_counter
from kopilka.core.lifetimes import lot_times
from kopilka.core.pricing import SpendError, quote, settle_quote
from kopilka.core.records import Code, HoldState
from kopilka.v1 import checkout_pb2

from . import auth, convert, receipts
from .backend import derived_id, id_base, pack, request_digest, unpack
from .status import ApiError, from_kernel, invalid

SUFFIX = "/capture"
MAX_HOLD_SECONDS = 24 * 3600


@dataclass
class Prepared:
    answer: object = None                 # a response known already (replay)
    batch: Batch | None = None            # the operation, then its VISIT if any
    finish: Callable | None = None        # (result) -> response
    follow_up: Batch = field(default_factory=Batch)
    field_of: Callable | None = None      # kernel code -> field path


def receipt_prefix(op_id):
    """The prefix settle() derives a receipt's operation ids from: the
    client's id, or a digest of it when the suffixes would overflow 128 bytes."""
    return id_base(op_id, "/coupon-redeem").decode()  # the longest suffix


def capture_id(op_id):
    return (receipt_prefix(op_id) + SUFFIX).encode()


def _fields(**names):
    return lambda code: names.get(code.name)


def _begin(backend, request, prefix, kernel_id=None):
    """(store, lane, op id, request digest, first answer or None): the checks
    every write starts with. `kernel_id(op_id)` maps the client's id to the
    operation's when they differ (a capture's)."""
    store, lane = convert.parse_lane(request.lane, prefix + "lane")
    auth.require_store(store, prefix + "lane")
    op_id = convert.operation_id(request.operation_id, prefix + "operation_id")
    digest = request_digest(request)
    first = backend.stored(kernel_id(op_id) if kernel_id else op_id, digest)
    return store, lane, op_id, digest, first


# --- hold ---------------------------------------------------------------------

def prepare_hold(backend, request, prefix=""):
    store, lane, op_id, digest, first = _begin(backend, request, prefix)
    if first is not None:
        return Prepared(answer=_hold_answer(backend, *first, replayed=True))
    if request.points <= 0:
        raise invalid([(prefix + "points", "must be more than 0")], "AMOUNT_INVALID")
    seconds = backend.hold_seconds
    if request.HasField("hold_duration"):
        d = request.hold_duration
        seconds = d.seconds + d.nanos / 1e9
        if not 0 < seconds <= MAX_HOLD_SECONDS:
            raise invalid([(prefix + "hold_duration",
                            f"must be more than 0 and at most {MAX_HOLD_SECONDS} s")],
                          "TIME_INVALID")
    program, account, card, _ = backend.customer(request, prefix)
    backend.program(program, prefix + "member")
    expires_at = backend.clock() + int(seconds * 1_000_000)
    batch = Batch().hold(op_id, 0 if card else account, request.points,
                         expires_at=expires_at, card=card, store=store, lane=lane,
                         data=pack({"rq": digest, "e": expires_at,
                                    "p": request.points}))

    def finish(result):
        record = backend.ledger.operation(op_id)
        return _hold_answer(backend, record, unpack(record.data),
                            replayed=bool(result.replayed))
    return Prepared(batch=batch, finish=finish,
                    field_of=_fields(AMOUNT_INVALID=prefix + "points",
                                     TIME_INVALID=prefix + "hold_duration"))


def _hold_answer(backend, record, answer, replayed):
    out = checkout_pb2.HoldResponse(
        member=convert.member_name(record.program, record.account),
        held_points=answer["p"],
        balances=backend.balances(record.account), replayed=replayed)
    convert.set_time(out, "expire_time", answer.get("e"))
    return out


# --- capture ------------------------------------------------------------------

def prepare_capture(backend, request, prefix=""):
    store, lane, op_id, digest, first = _begin(backend, request, prefix, capture_id)
    kernel_id = capture_id(op_id)
    if first is not None:
        record, answer = first
        return Prepared(answer=_capture_answer(backend, _Figures.of(record), answer,
                                               True),
                        follow_up=_referral(answer))
    if request.spend_points < 0:
        raise invalid([(prefix + "spend_points", "must not be negative")],
                      "AMOUNT_INVALID")
    program_id, account, card, record = backend.customer(request, prefix)
    entry = backend.program(program_id, prefix + "member")
    program = entry.program
    receipt = receipts.receipt(request.receipt, store, lane, program.currency,
                               prefix + "receipt")
    hold, held = None, 0
    if request.hold_operation_id:
        hold = convert.operation_id(request.hold_operation_id,
                                    prefix + "hold_operation_id")
        held = _open_hold(backend, hold, account, record)
    now = backend.clock()
    member = backend.member_context(account, record, card, held, now,
                                    receipt.business_time)
    q = receipts.check(lambda: quote(program, receipt, member, now), prefix + "receipt")
    answer = {"rq": digest, "t": now, "cur": program.currency, "held": held,
              "disc": q.discount + q.coupon, "act": q.activates_at,
              "exp": q.expires_at}

    def annotate(allocation, referral):
        answer["al"] = allocation_data(allocation)
        answer["ref"] = referral
        return pack(answer)
    try:
        settlement = settle_quote(q, request.spend_points, receipt_prefix(op_id),
                                  hold=hold, annotate=annotate)
    except SpendError as error:
        raise _spend_refused(error, q, prefix) from None
    if not len(settlement.batch):
        raise invalid([(prefix + "receipt.lines", "the receipt has no money to record "
                                                  "and spends no points")])
    figures = _Figures(program_id, account, q.partner, settlement.spend,
                       settlement.earn, settlement.paid)
    batch = Batch().extend(settlement.batch).extend(
        _visit(program, q, settlement.paid, receipt_prefix(op_id), now))

    def finish(result):
        if result.replayed:  # a racing copy of this request committed first
            record = backend.ledger.operation(kernel_id)
            return _capture_answer(backend, _Figures.of(record), unpack(record.data),
                                   True)
        return _capture_answer(backend, figures, answer, False,
                               settlement.allocation)
    return Prepared(batch=batch, finish=finish,
                    follow_up=settlement.after,
                    field_of=_fields(CAPTURE_EXCEEDS_HOLD=prefix + "spend_points"))


def _visit(program, q, paid, prefix, now):
    """The VISIT counting a capture paying `paid` towards the visit bonus
    of its version (see above); an empty Batch when it is no visit."""
    visits = q.version.bonuses.visits
    if visits is None or paid <= 0 or paid < visits.min_receipt:
        return Batch()
    r = q.receipt
    bt = r.business_time
    activates_at, expires_at = lot_times(q.version.lifetime.for_kind("visits"), bt,
                                         program.zone)
    if expires_at <= now:
        return Batch()
    return Batch().visit(prefix + "/visit", prefix + SUFFIX, visits.points,
                         counter=visit_counter(visits, bt, program.zone),
                         count=visits.count, activates_at=activates_at,
                         expires_at=expires_at, partner=q.partner,
                         version=q.version.number, business_time=bt,
                         store=r.store, lane=r.lane)


def visit_id(capture):
    """The VISIT's op id of a capture's kernel op id."""
    return capture[:-len(SUFFIX)] + b"/visit"


class _Figures(NamedTuple):
    """What a capture's answer reports: known when it is prepared, or read
    back from its stored record on a retry."""
    program: int
    account: int
    partner: int
    spent: int
    earned: int
    money: int

    @classmethod
    def of(cls, record):
        return cls(record.program, record.account, record.partner, record.spent,
                   record.earned, record.money)


def allocation_data(allocation):
    """An Allocation as compact JSON-able data: lines as rows, not objects."""
    return {"v": allocation.version, "c": allocation.capture,
            "r": allocation.referral_op, "l": [list(s) for s in allocation.lines]}


def allocation_of(data):
    return Allocation(data["c"], data["r"], data["v"],
                      tuple(LineShare(*row) for row in data["l"]))


def _open_hold(backend, hold, account_id, account):
    """Points the hold reserves; the hold's own refusal when it is not open."""
    record = backend.ledger.operation(hold)
    if record is None or record.kind != 9:  # Kind.HOLD
        raise from_kernel(Code.HOLD_NOT_FOUND, message="hold_operation_id: no hold "
                          "was placed under this id")
    auth.require_store(record.store, "hold_operation_id")
    if record.hold_state == HoldState.CAPTURED:
        raise from_kernel(Code.HOLD_CAPTURED)
    if record.hold_state == HoldState.VOIDED:
        raise from_kernel(Code.HOLD_VOIDED)
    if record.account != account_id:
        raise invalid([("hold_operation_id", "the hold is another member's")])
    held = next((h.amount for h in account.holds if h.hold_no == record.hold_no), 0)
    if not held:
        raise from_kernel(Code.HOLD_EXPIRED)
    return held


def _spend_refused(error, q, prefix):
    text = "; ".join(p.reason for p in error.problems)
    paths = {p.path for p in error.problems}
    if "spend" in paths:
        if 0 < q.min_spend and "below" in text:
            return ApiError("FAILED_PRECONDITION", "SPEND_BELOW_MINIMUM",
                            f"{prefix}spend_points: {text}",
                            metadata={"min_spend_points": q.min_spend})
        return ApiError("FAILED_PRECONDITION", "SPEND_ABOVE_LIMIT",
                        f"{prefix}spend_points: {text}",
                        metadata={"max_spend_points": q.max_spend,
                                  "bound": f"PRICING_REASON_CODE_{q.spend_bound.value}"})
    return receipts.refused(error, prefix.rstrip(".") or "request")


def _referral(answer):
    """The referrer's EARN a stored capture pays (again, idempotently)."""
    batch = Batch()
    r = answer.get("ref")
    if r:
        batch.earn(r["op"], r["account"], r["points"], activates_at=r["act"],
                   expires_at=r["exp"], partner=r["partner"], version=r["version"],
                   business_time=r["bt"], store=r["store"], lane=r["lane"])
    return batch


def _capture_answer(backend, f, answer, replayed, allocation=None):
    cur = answer["cur"]
    allocation = allocation or allocation_of(answer["al"])
    out = checkout_pb2.CaptureResponse(
        member=convert.member_name(f.program, f.account),
        program_version=convert.version_name(f.program, allocation.version),
        partner=convert.partner_name(f.program, f.partner),
        replayed=replayed, spent_points=f.spent, earned_points=f.earned,
        released_points=max(0, answer["held"] - f.spent),
        paid=convert.money(f.money, cur), discount=convert.money(answer["disc"], cur),
        lines=[checkout_pb2.SettledLine(
            line_number=s.number, quantity=s.quantity,
            discount=convert.money(s.discount, cur), spent_points=s.spent,
            earned_points=s.earned, paid=convert.money(s.paid, cur))
            for s in allocation.lines],
        balances=backend.balances(f.account))
    if allocation.capture:
        visit = backend.ledger.operation(visit_id(allocation.capture.encode()))
        out.visit_bonus_points = visit.earned if visit is not None else 0
    if f.earned:
        convert.set_time(out, "earn_activate_time", answer["act"])
        convert.set_time(out, "earn_expire_time", answer["exp"])
    convert.set_time(out, "operation_time", answer["t"])
    return out


# --- void ---------------------------------------------------------------------

def prepare_void(backend, request, prefix=""):
    store, lane, op_id, digest, first = _begin(backend, request, prefix)
    if first is not None:
        return Prepared(answer=_void_answer(backend, *first, replayed=True))
    hold = convert.operation_id(request.hold_operation_id, prefix + "hold_operation_id")
    placed = backend.ledger.operation(hold)
    if placed is not None:   # a hold is voided by a till of the store that placed it
        auth.require_store(placed.store, prefix + "hold_operation_id")
    batch = Batch().void(op_id, hold, store=store, lane=lane,
                         data=pack({"rq": digest}))

    def finish(result):
        record = backend.ledger.operation(op_id)
        return _void_answer(backend, record, unpack(record.data), bool(result.replayed))
    return Prepared(batch=batch, finish=finish,
                    field_of=_fields(KEY_INVALID=prefix + "hold_operation_id"))


def _void_answer(backend, record, answer, replayed):
    return checkout_pb2.VoidResponse(
        member=convert.member_name(record.program, record.account),
        released_points=record.a, balances=backend.balances(record.account),
        replayed=replayed)


# --- refund -------------------------------------------------------------------

def original_of(backend, request, prefix=""):
    """(kernel id, record, capture answer, lines returned so far) of the
    capture a refund names."""
    client = convert.operation_id(request.original_operation_id,
                                  prefix + "original_operation_id")
    kernel_id = capture_id(client)
    record = backend.ledger.operation(kernel_id)
    if record is None:
        raise ApiError("NOT_FOUND", "ORIGINAL_OPERATION_NOT_FOUND",
                       f"{prefix}original_operation_id: no receipt was captured "
                       "under this id")
    parts = record.data.split(b"\n")
    capture, already = json.loads(parts[0]), {}
    for part in parts[1:]:
        for number, quantity in json.loads(part)["r"]:
            already[number] = already.get(number, 0) + quantity
    return kernel_id, record, capture, already


def prepare_refund(backend, request, prefix=""):
    store, lane, op_id, digest, first = _begin(backend, request, prefix)
    if first is not None:
        record, answer = first
        return Prepared(answer=_refund_answer(backend, record, answer, True),
                        follow_up=_clawback(answer))
    kernel_id, original, capture, already = original_of(backend, request, prefix)
    allocation = allocation_of(capture["al"])
    scope = request.WhichOneof("scope")
    if scope == "lines":
        returns = []
        for i, r in enumerate(request.lines.returns):
            if r.quantity <= 0:
                raise invalid([(f"{prefix}lines.returns[{i}].quantity",
                                "must be more than 0")])
            returns.append((r.line_number, r.quantity))
        if not returns:
            raise invalid([(prefix + "lines.returns", "name at least one line")])
    elif scope == "whole_receipt" and request.whole_receipt:
        returns = [(s.number, s.quantity - already.get(s.number, 0))
                   for s in allocation.lines if s.quantity > already.get(s.number, 0)]
        if not returns:
            raise from_kernel(Code.REFUND_EXCEEDS_ORIGINAL, message="every line of "
                              "the receipt was refunded already")
    else:
        raise invalid([(prefix + "scope", "set whole_receipt or lines")])
    try:
        amounts = refund_lines(allocation, returns, already)
        referral = refund_referral(allocation, returns, already)
    except SpendError as error:
        if any("left to return" in p.reason for p in error.problems):
            raise ApiError("FAILED_PRECONDITION", "REFUND_EXCEEDS_ORIGINAL",
                           "; ".join(p.reason for p in error.problems)) from None
        raise invalid([(prefix + "lines.returns", p.reason)
                       for p in error.problems]) from None
    business_time = 0
    if request.HasField("business_time"):
        problems = []
        business_time = convert.parse_time(request.business_time,
                                           prefix + "business_time", problems)
        if problems:
            raise invalid(problems)
    lines = _refunded_lines(allocation, returns, already)
    answer = {"rq": digest, "r": returns, "cur": capture["cur"], "lines": lines}
    if referral and allocation.referral_op:
        answer["claw"] = {"op": derived_id(op_id, "/referral").decode(),
                          "original": allocation.referral_op, "points": referral,
                          "store": store, "lane": lane}
    batch = Batch().refund(op_id, kernel_id, money=amounts.money,
                           give_back=amounts.give_back, claw_back=amounts.claw_back,
                           version=allocation.version, business_time=business_time,
                           store=store, lane=lane,
                           data=b"\n" + pack(answer))  # a line of the receipt's data

    def finish(result):
        record = backend.ledger.operation(op_id)
        return _refund_answer(backend, record, unpack(record.data), bool(result.replayed))
    return Prepared(batch=batch, finish=finish, follow_up=_clawback(answer))


def _refunded_lines(allocation, returns, already):
    out = []
    for number, quantity in returns:
        one = refund_lines(allocation, [(number, quantity)], already)
        out.append([number, quantity, one.give_back, one.claw_back, one.money])
    return out


def _clawback(answer):
    batch = Batch()
    c = answer.get("claw")
    if c:
        batch.refund(c["op"], c["original"], claw_back=c["points"],
                     store=c["store"], lane=c["lane"])
    return batch


def _refund_answer(backend, record, answer, replayed):
    cur = answer["cur"]
    balances = backend.balances(record.account)
    return checkout_pb2.RefundResponse(
        member=convert.member_name(record.program, record.account),
        returned_points=record.a, clawed_back_points=record.b,
        refunded=convert.money(record.money, cur),
        lines=[checkout_pb2.RefundedLine(
            line_number=n, quantity=q, returned_points=g, clawed_back_points=c,
            refunded=convert.money(m, cur)) for n, q, g, c, m in answer["lines"]],
        debt_points=balances.debt_points, balances=balances, replayed=replayed)
