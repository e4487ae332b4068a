"""Checkout: the POS at the till. Thin: checkout_ops prepares, this commits.

Refunds of one receipt are taken one at a time (a lock per receipt): a
per-line refund is priced against the lines returned before it, so two
racing refunds of the same lines must not both see them unreturned. A Post
takes the locks of every receipt it refunds, all at once and in order (so
two Posts cannot deadlock), before it prepares anything.
"""

import asyncio
import contextlib
import weakref

from kopilka.core.batch import Batch
from kopilka.core.pricing import quote
from kopilka.core.reads import balances_of
from kopilka.core.records import Code
from kopilka.v1 import checkout_pb2, checkout_pb2_grpc

from . import auth, convert, receipts
from .backend import main_result
from .checkout_ops import (capture_id, prepare_capture, prepare_hold, prepare_refund,
                           prepare_void)
from .status import ApiError, invalid, ok_proto, unfinished

MAX_POST = 10_000


class Checkout(checkout_pb2_grpc.CheckoutServicer):
    def __init__(self, backend):
        self.backend = backend
        self._receipt_locks = weakref.WeakValueDictionary()

    async def Quote(self, request, context):
        b = self.backend
        store, lane = convert.parse_lane(request.lane)
        auth.require_store(store)
        program_id, account, card, record = b.customer(request)
        program = b.program(program_id, "member").program
        receipt = receipts.receipt(request.receipt, store, lane, program.currency)
        now = b.clock()
        member = b.member_context(account, record, card, 0, now, receipt.business_time)
        q = receipts.check(lambda: quote(program, receipt, member, now), "receipt")
        spend = request.spend_points if request.HasField("spend_points") else None
        if spend is not None and not 0 <= spend <= q.max_spend:
            raise invalid([("spend_points", f"must be from 0 to {q.max_spend}, the "
                                            "most this receipt may spend")])
        # the balances of the account as priced (read once, above)
        balances = convert.balances_fields(balances_of(account, record, now), now)
        return receipts.quote_response(q, program, account, balances, spend)

    async def Hold(self, request, context):
        return checkout_pb2.HoldResponse(
            **await self._one(prepare_hold, request, context))

    async def Capture(self, request, context):
        return checkout_pb2.CaptureResponse(
            **await self._one(prepare_capture, request, context))

    async def Void(self, request, context):
        return checkout_pb2.VoidResponse(
            **await self._one(prepare_void, request, context))

    async def Refund(self, request, context):
        async with self._refunding([request.original_operation_id]):
            return checkout_pb2.RefundResponse(
                **await self._one(prepare_refund, request, context))

    @contextlib.asynccontextmanager
    async def _refunding(self, receipts):
        """Holds the refund locks of `receipts` (original operation ids)."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(receipts)):
                lock = self._receipt_locks.setdefault(key, asyncio.Lock())
                await stack.enter_async_context(lock)
            yield

    async def _one(self, prepare, request, context):
        """The response's fields (a dict) of one prepared operation."""
        prepared = prepare(self.backend, request)
        if prepared.answer is None:
            result = main_result(await self.backend.apply(prepared.batch, context))
            if result.code != Code.OK:
                prepared = _raced(prepare, self.backend, request, "", result, prepared)
                if prepared.answer is None:
                    raise self.backend.refusal(result.code, prepared.field_of)
            else:
                prepared.answer = prepared.finish(result)
        if len(prepared.follow_up):
            await self._follow_up(prepared.follow_up, context)
        return prepared.answer

    async def _follow_up(self, batch, context):
        """A referral share or clawback: idempotent by its own id, so a retry
        of the main request applies it again harmlessly. A refusal here (the
        referrer closed meanwhile) does not undo the checkout; a commit refused
        whole is told as such, the checkout being written already."""
        try:
            await self.backend.apply(batch, context)
        except ApiError as err:
            raise unfinished(err, "the operation was committed",
                             "the referral share or clawback it pays") from None

    async def Post(self, request, context):
        """Every operation prepared, then one commit for all, results in order.

        An operation that depends on one still pending (a capture or void of
        a hold, a refund of a receipt, or any operation of a member, placed
        earlier in this request) is prepared only after what is pending is
        committed, so the request applies as if one by one. A commit refused
        whole (the store full, the deadline passed, the server stopping)
        refuses the request while nothing of it is written; once a commit of
        it is, each operation of the refused commit gets that refusal."""
        if not 1 <= len(request.operations) <= MAX_POST:
            raise invalid([("operations", f"must hold 1 to {MAX_POST} operations")])
        refunded = [op.refund.original_operation_id for op in request.operations
                    if op.WhichOneof("operation") == "refund"]
        async with self._refunding(refunded):
            return await self._post(request, context)

    async def _post(self, request, context):
        b = self.backend
        full = request.view != checkout_pb2.POST_RESULT_VIEW_STATUS
        results = [None] * len(request.operations)
        pending, batch, follow = [], Batch(), Batch()
        touched = set()  # what the pending operations change
        seen = set()
        written = False   # a commit of this request is on disk

        async def flush():
            nonlocal written
            try:
                outcome = await b.apply(batch, context)  # Results, decoded as read
                written = True
            except ApiError as err:
                if not written:
                    raise
                outcome = []
                for i, _, _ in pending:
                    results[i] = {"status": err.to_proto()}
            if not outcome:
                pending.clear()
            pending.reverse()  # answered in order, each let go once answered
            at = 0
            while pending:
                i, which, prepared = pending.pop()
                count = len(prepared.batch)
                result = main_result(outcome, at, count)
                at += count
                if result.code == Code.OK:
                    results[i] = (_result(which, prepared.finish(result)) if full
                                  else _OK_RESULT)
                    follow.extend(prepared.follow_up)
                    continue
                message = getattr(request.operations[i], which)
                try:
                    prepared = _raced(_PREPARE[which], b, message,
                                      f"operations[{i}].{which}.", result, prepared)
                except ApiError as err:
                    prepared, failure = None, err
                else:
                    failure = b.refusal(result.code, prepared.field_of)
                if prepared is not None and prepared.answer is not None:
                    results[i] = _result(which, prepared.answer) if full else _OK_RESULT
                    follow.extend(prepared.follow_up)
                else:
                    results[i] = {"status": failure.to_proto()}
            touched.clear()
            return Batch()

        for i, op in enumerate(request.operations):
            which = op.WhichOneof("operation")
            prefix = f"operations[{i}].{which}."
            keys = _keys(b, which, getattr(op, which)) if which else set()
            if pending and not keys.isdisjoint(touched):
                batch = await flush()
            try:
                if which is None:
                    raise invalid([(f"operations[{i}]", "set one operation")])
                message = getattr(op, which)
                key = (capture_id(message.operation_id.encode()) if which == "capture"
                       else message.operation_id)
                if key in seen:  # the first in the request wins, as on a retry
                    raise invalid([(prefix + "operation_id",
                                    "appears twice in this request")])
                seen.add(key)
                prepared = _PREPARE[which](b, message, prefix)
            except ApiError as err:
                results[i] = {"status": err.to_proto()}
                continue
            if prepared.answer is not None:
                results[i] = _result(which, prepared.answer) if full else _OK_RESULT
                follow.extend(prepared.follow_up)
            else:
                pending.append((i, which, prepared))
                batch.extend(prepared.batch)
                touched.update(keys)
                touched.add(("op", message.operation_id))
        if pending:
            await flush()
        if len(follow):
            await self._follow_up(follow, context)
        return checkout_pb2.PostResponse(results=results)  # built in one call


def _raced(prepare, backend, request, prefix, result, prepared):
    """After OPERATION_ID_REUSED: a copy of this very request (a client's
    retry racing its original) may have committed first, its operation
    encoded a moment apart; prepared again, the request finds it and gets
    its answer. Otherwise the refusal stands (`answer` stays None)."""
    if result.code == Code.OP_ID_REUSED:
        again = prepare(backend, request, prefix)
        if again.answer is not None:
            return again
    return prepared


def _keys(backend, which, message):
    """What an operation of a Post reads that an earlier one may change: its
    member's account, and the hold or receipt it names. Best effort: what
    cannot be resolved here fails in the operation's prepare_* anyway."""
    keys = set()
    if which in ("hold", "capture"):
        customer = message.WhichOneof("customer")
        if customer == "card_number" and message.card_number:
            found = backend.ledger.card(message.card_number.encode())
            if found is not None:
                keys.add(("member", found[0]))
        elif customer == "member":
            try:
                keys.add(("member", convert.parse_member(message.member, "member")[1]))
            except ApiError:
                pass
    named = (message.hold_operation_id if which in ("capture", "void")
             else message.original_operation_id if which == "refund" else "")
    if named:
        keys.add(("op", named))
        if which != "capture":  # the account a void or refund changes
            stored = named.encode() if which == "void" else capture_id(named.encode())
            record = backend.ledger.operation(stored) if len(stored) <= 128 else None
            if record is not None:
                keys.add(("member", record.account))
    return keys


_PREPARE = {"hold": prepare_hold, "capture": prepare_capture, "void": prepare_void,
            "refund": prepare_refund}


# A PostResult as a dict, for the response's one constructor call. (A status
# message is copied in faster than one made from a dict.)
_OK = ok_proto()
_OK_RESULT = {"status": _OK}


def _result(which, answer):
    return {"status": _OK, which: answer}
