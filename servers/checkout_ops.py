"""Checkout writes as prepared operations: checked, priced, encoded, then
committed by whoever holds them (one unary RPC, or many in one `Post`).

`prepare_*` does everything that can fail before the ledger is asked
(names, scope, pricing, the idempotency check) and returns a `Prepared`:
either an answer already known (a retry: the first answer, rebuilt) or the
kernel operations to commit (one, or a chain: a capture and the coupon it
redeems, a refund and the coupon it revokes or gives back, applied all or
nothing; the coupon a capture earns follows it, refused alone when one is
held meanwhile) and a `finish(result)` that builds the response. Answers
are the response's fields as a dict: a unary RPC makes its response of
them, a Post its whole response at once (one constructor call, no message
copied into another).
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
and what the answer and later refunds need (a capture's coupons: the one it
redeemed, the one it earns with the threshold and its lines' dues, so that
a refund knows when the purchase falls below the threshold). A refund also appends its data
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
from kopilka.core.lifetimes import lot_times, period_bounds
from kopilka.core.pricing import SpendError, quote, settle_quote
from kopilka.core.records import DAY, Code, HoldState, Kind

from . import auth, convert, receipts
from .convert import money_fields
from .backend import derived_id, id_base, pack, request_digest, unpack
from .status import ApiError, from_kernel, invalid

SUFFIX = "/capture"
MAX_HOLD_SECONDS = 24 * 3600


@dataclass
class Prepared:
    answer: dict | None = None            # a response's fields known already
                                          # (replay)
    batch: Batch | None = None            # the main operation first, then
                                          # its VISIT if any
    finish: Callable | None = None        # (result) -> the response's fields
    follow_up: Batch = field(default_factory=Batch)
    field_of: Callable | None = None      # kernel code -> field path


def receipt_prefix(op_id):
    """The prefix settle() derives a receipt's operation ids from: the
    client's id, or a digest of it when the suffixes would overflow 128 bytes."""
    return id_base(op_id, "/coupon-redeem").decode()  # the longest suffix


def capture_id(op_id):
    return (receipt_prefix(op_id) + SUFFIX).encode()


def redeem_id(op_id):
    """A receipt's coupon redemption: its record, when its coupon paid for
    all of it and nothing else was recorded (no capture)."""
    return (receipt_prefix(op_id) + "/coupon-redeem").encode()


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
        return Prepared(answer=_stored_hold_answer(backend, *first, replayed=True))
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
        if result.replayed:  # a racing copy of this request committed first
            record = backend.ledger.operation(op_id)
            return _stored_hold_answer(backend, record, unpack(record.data), True)
        # as just written: the card's account (a card never moves), this hold
        return _hold_answer(backend, program, account, request.points, expires_at,
                            False)
    return Prepared(batch=batch, finish=finish,
                    field_of=_fields(AMOUNT_INVALID=prefix + "points",
                                     TIME_INVALID=prefix + "hold_duration"))


def _hold_answer(backend, program, account, points, expires_at, replayed):
    return {"member": convert.member_name(program, account), "held_points": points,
            "balances": backend.balances_fields(account), "replayed": replayed,
            "expire_time": convert.time_fields(expires_at)}


def _stored_hold_answer(backend, record, answer, replayed):
    return _hold_answer(backend, record.program, record.account, answer["p"],
                        answer.get("e"), replayed)


# --- capture ------------------------------------------------------------------

def prepare_capture(backend, request, prefix=""):
    store, lane, op_id, digest, first = _begin(backend, request, prefix, capture_id)
    if first is None and backend.ledger.operation(redeem_id(op_id)) is not None:
        first = backend.stored(redeem_id(op_id), digest)  # paid by its coupon
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
    answer.update(_coupons(q, receipt_prefix(op_id)))

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
    # its record: the capture's, or the redemption's when the coupon paid it all
    allocation = settlement.allocation
    kernel_id = (allocation.capture or settlement.coupon_redemption.op_id).encode()

    def finish(result):  # keeps only what it needs: the quote is let go
        if result.replayed:  # a racing copy of this request committed first
            record = backend.ledger.operation(kernel_id)
            return _capture_answer(backend, _Figures.of(record), unpack(record.data),
                                   True)
        return _capture_answer(backend, figures, answer, False, allocation)
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
    counter, activates_at, expires_at = visit_terms(q.version, bt, program.zone)
    if expires_at <= now:
        return Batch()
    return Batch().visit(prefix + "/visit", prefix + SUFFIX, visits.points,
                         counter=counter, count=visits.count, activates_at=activates_at,
                         expires_at=expires_at, partner=q.partner,
                         version=q.version.number, business_time=bt,
                         store=r.store, lane=r.lane)


class _VisitDay(NamedTuple):
    version: object
    zone: object
    start: int              # the local day [start, end) these are of
    end: int
    lifetime: object        # the version's lifetime of visit bonuses
    counter: str
    expires_at: int | None  # an end-of-period expiry; None: reckoned per visit


_VISIT_DAYS = {}   # id(version) -> its last _VisitDay


def visit_terms(version, bt, zone):
    """(counter, activates_at, expires_at) of a visit at business time `bt`
    under `version` (which has visit bonuses), as visit_counter and lot_times
    reckon them. The counter and an end-of-period expiry depend on `bt`
    only through its local day (every period is whole local days), so the
    last day's are kept per version: the captures of a Post are mostly of
    one day, and the calendar is consulted once, not per capture."""
    day = _VISIT_DAYS.get(id(version))
    if (day is None or day.version is not version or day.zone is not zone
            or not day.start <= bt < day.end):
        lifetime = version.lifetime.for_kind("visits")
        start, end = period_bounds(bt, "day", zone)
        expires_at = (lot_times(lifetime, bt, zone)[1]
                      if lifetime.expiry.end_of is not None else None)
        day = _VisitDay(version, zone, start, end, lifetime,
                        visit_counter(version.bonuses.visits, bt, zone), expires_at)
        if len(_VISIT_DAYS) >= 256:  # versions of programs replaced meanwhile
            _VISIT_DAYS.clear()
        _VISIT_DAYS[id(version)] = day
    if day.expires_at is None:  # in days, or never: no calendar
        activates_at, expires_at = lot_times(day.lifetime, bt, None)
    else:
        activates_at = bt + day.lifetime.activation_days * DAY
        expires_at = day.expires_at
    return day.counter, activates_at, expires_at


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
        if record.kind == Kind.REDEEM_COUPON:  # a receipt its coupon paid in full
            return cls(record.program, record.account, record.partner, 0, 0, 0)
        return cls(record.program, record.account, record.partner, record.spent,
                   record.earned, record.money)


def _coupons(q, prefix):
    """What a capture stores of its coupons: the member's it redeems (chained
    to it: redeemed if the capture is), and the one it earns (the ledger may
    refuse that one alone: the answer reads whether it was issued), with
    what refunds need to tell when the purchase falls below the threshold."""
    out = {}
    if q.coupon:
        out["cpr"] = {"op": prefix + "/coupon-redeem", "code": q.member.coupon.code,
                      "off": q.coupon}
    if q.coupon_earned is not None:
        value, usable_from, expires_at = q.coupon_earned
        out["cpi"] = {"op": prefix + "/coupon-issue", "v": value, "u": usable_from,
                      "e": expires_at, "th": q.version.coupon.threshold,
                      "du": [line.due for line in q.lines]}
    return out


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
    visit_bonus = 0
    if allocation.capture:
        visit = backend.ledger.operation(visit_id(allocation.capture.encode()))
        visit_bonus = visit.earned if visit is not None else 0
    redeemed, earned = answer.get("cpr"), answer.get("cpi")
    issued = backend.ledger.operation(earned["op"].encode()) if earned else None
    return dict(
        member=convert.member_name(f.program, f.account),
        program_version=convert.version_name(f.program, allocation.version),
        partner=convert.partner_name(f.program, f.partner),
        replayed=replayed, spent_points=f.spent, earned_points=f.earned,
        released_points=max(0, answer["held"] - f.spent),
        paid=money_fields(f.money, cur), discount=money_fields(answer["disc"], cur),
        lines=[{"line_number": s.number, "quantity": s.quantity,
                "discount": money_fields(s.discount, cur), "spent_points": s.spent,
                "earned_points": s.earned, "paid": money_fields(s.paid, cur)}
               for s in allocation.lines],
        balances=backend.balances_fields(f.account),
        visit_bonus_points=visit_bonus,
        coupon_redeemed=None if not redeemed else {
            "code": redeemed["code"], "discount": money_fields(redeemed["off"], cur)},
        coupon_issued=None if issued is None else {
            "code": convert.coupon_code(f.account, issued.a),
            "terms": {"value": money_fields(earned["v"], cur),
                      "usable_time": convert.time_fields(earned["u"]),
                      "expire_time": convert.time_fields(earned["e"])}},
        earn_activate_time=convert.time_fields(answer["act"]) if f.earned else None,
        earn_expire_time=convert.time_fields(answer["exp"]) if f.earned else None,
        operation_time=convert.time_fields(answer["t"]))


# --- void ---------------------------------------------------------------------

def prepare_void(backend, request, prefix=""):
    store, lane, op_id, digest, first = _begin(backend, request, prefix)
    if first is not None:
        record, _ = first
        return Prepared(answer=_void_answer(backend, record.program, record.account,
                                            record.a, replayed=True))
    hold = convert.operation_id(request.hold_operation_id, prefix + "hold_operation_id")
    placed = backend.ledger.operation(hold)
    if placed is not None:   # a hold is voided by a till of the store that placed it
        auth.require_store(placed.store, prefix + "hold_operation_id")
    batch = Batch().void(op_id, hold, store=store, lane=lane,
                         data=pack({"rq": digest}))

    def finish(result):
        if result.replayed or placed is None:  # (the hold came meanwhile)
            record = backend.ledger.operation(op_id)
            return _void_answer(backend, record.program, record.account, record.a,
                                bool(result.replayed))
        # as just written: the hold's member, result a the points released
        return _void_answer(backend, placed.program, placed.account, result.a, False)
    return Prepared(batch=batch, finish=finish,
                    field_of=_fields(KEY_INVALID=prefix + "hold_operation_id"))


def _void_answer(backend, program, account, released, replayed):
    return {"member": convert.member_name(program, account),
            "released_points": released,
            "balances": backend.balances_fields(account), "replayed": replayed}


# --- refund -------------------------------------------------------------------

def original_of(backend, request, prefix=""):
    """(kernel id, record, capture answer, lines returned so far) of the
    capture a refund names, or of the coupon redemption that stands for a
    receipt its coupon paid in full."""
    client = convert.operation_id(request.original_operation_id,
                                  prefix + "original_operation_id")
    kernel_id = capture_id(client)
    record = backend.ledger.operation(kernel_id)
    if record is None:
        kernel_id = redeem_id(client)
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
    if original.kind == Kind.REDEEM_COUPON:
        return _coupon_paid_refund(backend, op_id, kernel_id, allocation, returns,
                                   already, answer, business_time, store, lane)
    answer.update(_coupon_refunds(backend, op_id, capture, allocation, returns, already))
    if referral and allocation.referral_op:
        answer["claw"] = {"op": derived_id(op_id, "/referral").decode(),
                          "original": allocation.referral_op, "points": referral,
                          "store": store, "lane": lane}
    batch = Batch().refund(op_id, kernel_id, money=amounts.money,
                           give_back=amounts.give_back, claw_back=amounts.claw_back,
                           version=allocation.version, business_time=business_time,
                           store=store, lane=lane,
                           data=b"\n" + pack(answer))  # a line of the receipt's data
    for name in ("rv", "gb"):  # all or nothing with the refund; never refused
        if name in answer:     # for the coupon's sake (records.py)
            batch.link().refund(answer[name][0], answer[name][1], store=store, lane=lane)

    return Prepared(batch=batch, finish=_refund_finish(backend, op_id),
                    follow_up=_clawback(answer))


def _refund_finish(backend, op_id):
    def finish(result):
        record = backend.ledger.operation(op_id)
        return _refund_answer(backend, record, unpack(record.data), bool(result.replayed))
    return finish


def _coupon_paid_refund(backend, op_id, redemption, allocation, returns, already,
                        answer, business_time, store, lane):
    """A refund of a receipt its coupon paid in full: nothing was charged
    or earned, so there is nothing to give back but the coupon, and that
    by the rule of every receipt that redeemed one: once every line has
    come back. The refund is the redemption's own (there is no capture):
    until then only noted (its lines join the redemption's data, so that
    they are not returned twice), then giving the coupon back."""
    whole = _whole(allocation, _after(returns, already))
    answer["cp"] = 1
    if whole:
        answer["gb"] = (op_id.decode(), redemption.decode())
    batch = Batch().refund(op_id, redemption, keep_coupon=not whole,
                           version=allocation.version, business_time=business_time,
                           store=store, lane=lane, data=b"\n" + pack(answer))
    return Prepared(batch=batch, finish=_refund_finish(backend, op_id))


def _after(returns, already):
    """{line number: units returned} once `returns` are, after `already`."""
    after = dict(already)
    for number, quantity in returns:
        after[number] = after.get(number, 0) + quantity
    return after


def _whole(allocation, after):
    """Whether every unit of every line is back, `after` returned."""
    return all(after.get(s.number, 0) == s.quantity for s in allocation.lines)


def _coupon_refunds(backend, op_id, capture, allocation, returns, already):
    """The coupon operations a refund reverses, as {"rv": revoke, "gb": give
    back} pairs of (refund op id, coupon op id): the coupon the receipt
    earned once what is left of the purchase (its lines' dues, each less its
    returned units' share, as refund_lines reckons) is below the threshold
    that earned it; the coupon it redeemed when every line has come back.
    Each once: a coupon operation refunded before is left alone."""
    after = _after(returns, already)
    out = {}
    earned, redeemed = capture.get("cpi"), capture.get("cpr")
    if earned and not _refunded(backend, earned["op"]):
        kept = sum(due - due * after.get(s.number, 0) // s.quantity
                   for due, s in zip(earned["du"], allocation.lines))
        if kept < earned["th"]:
            out["rv"] = (derived_id(op_id, "/coupon-revoke").decode(), earned["op"])
    if redeemed and _whole(allocation, after) and not _refunded(backend, redeemed["op"]):
        out["gb"] = (derived_id(op_id, "/coupon-back").decode(), redeemed["op"])
    return out


def _refunded(backend, coupon_op):
    """Whether a coupon operation is gone or was refunded already (issued:
    the ledger may have refused it)."""
    record = backend.ledger.operation(coupon_op.encode())
    return record is None or record.refunded_money != 0


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
    balances = backend.balances_fields(record.account)
    # the refund of a receipt its coupon paid: its result a is the coupon's value
    returned, clawed = (0, 0) if answer.get("cp") else (record.a, record.b)
    coupons = {}
    for name in ("rv", "gb"):  # changed: the coupon refund's result a, its value
        if name in answer:
            done = backend.ledger.operation(answer[name][0].encode())
            coupon = backend.ledger.operation(answer[name][1].encode())
            if done is not None and done.a:
                coupons[name] = convert.coupon_code(record.account, coupon.a)
    return dict(
        coupon_revoked=coupons.get("rv", ""), coupon_given_back=coupons.get("gb", ""),
        member=convert.member_name(record.program, record.account),
        returned_points=returned, clawed_back_points=clawed,
        refunded=money_fields(record.money, cur),
        lines=[{"line_number": n, "quantity": q, "returned_points": g,
                "clawed_back_points": c, "refunded": money_fields(m, cur)}
               for n, q, g, c, m in answer["lines"]],
        debt_points=balances["debt_points"], balances=balances, replayed=replayed)
