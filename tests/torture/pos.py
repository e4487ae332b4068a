"""A POS server's till as the torture sees it: checkouts on its own members,
every request retried with the same operation id until the server gives a
definitive answer (OK or a refusal), and every acknowledged operation logged
with the figures its answer gave (what `world.replay` feeds the twin).

Only the transport's failures are retried (the server was killed, is
restarting, or missed the deadline): the request may or may not have been
committed, and the same id makes the retry safe either way.
"""

import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration

from kopilka.servers.checkout_ops import capture_id
from kopilka.v1 import checkout_pb2, checkout_pb2_grpc, common_pb2

from server_harness import error_info

RETRIED = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
CALL_TIMEOUT = 10.0
GIVE_UP_AFTER = 120.0       # a request with no definitive answer by then fails the run
HOLD_FOR = Duration(seconds=6 * 3600)


@dataclass
class Answer:
    """One acknowledged operation: what the twin needs to apply it again."""
    kind: str                # hold, capture, void, refund
    kernel_id: bytes         # the ledger's operation id (a capture's differs)
    account: int = 0
    points: int = 0          # held
    expires: int = 0         # the hold's expiry (microseconds)
    hold: bytes = b""        # captured or voided
    spent: int = 0
    earned: int = 0
    money: int = 0
    original: bytes = b""    # refunded capture
    returned: int = 0
    clawed_back: int = 0
    replayed: bool = False


class Stuck(AssertionError):
    pass


class Pos:
    """One till (a lane of the store) with its own channel and members."""

    def __init__(self, address, metadata, lane, members, rng, *, program=1):
        self.channel = grpc.insecure_channel(address)
        self.stub = checkout_pb2_grpc.CheckoutStub(self.channel)
        self.metadata = metadata
        self.lane = f"stores/42/lanes/{lane}"
        self.members = members            # [(account id, card number)]
        self.program = program
        self.rng = rng
        self.answers = []                 # Answer, in the order acknowledged
        self.refusals = Counter()         # reason of each definitive refusal
        self.retries = 0                  # attempts after a transport failure
        self.recovered = 0                # retries answered "replayed": committed
        self.in_flight = threading.Event()  # a request is out (for the killer)
        self.available = {a: None for a, _ in members}
        self.refundable = []              # (capture's op id, its kernel id)
        self._n = 0

    def close(self):
        self.channel.close()

    # --- requests, retried until definitive -----------------------------------------

    def call(self, rpc, request):
        """The response, or the refusal's (code, reason) once definitive."""
        method = getattr(self.stub, rpc)
        started, attempt = time.monotonic(), 0
        while True:
            self.in_flight.set()
            try:
                response = method(request, metadata=self.metadata,
                                  timeout=CALL_TIMEOUT, wait_for_ready=attempt > 0)
                if attempt and _replayed(response):
                    self.recovered += 1
                return response
            except grpc.RpcError as err:
                code, reason, _ = error_info(err)
                if code not in RETRIED:
                    self.refusals[reason or code] += 1
                    return code, reason
            finally:
                self.in_flight.clear()
            attempt += 1
            self.retries += 1
            if time.monotonic() - started > GIVE_UP_AFTER:
                raise Stuck(f"{rpc} {request.operation_id if hasattr(request, 'operation_id') else ''}: no answer in {GIVE_UP_AFTER} s")
            time.sleep(min(0.02 * attempt, 0.25))

    # --- what a till does ---------------------------------------------------------

    def step(self):
        """One checkout (or a return, or a Post of several)."""
        r = self.rng.random()
        account, card = self.rng.choice(self.members)
        if r < 0.30:
            hold = self.hold(account, card)
            if hold:
                self.capture(account, card, hold=hold)
        elif r < 0.42:
            hold = self.hold(account, card)
            if hold:
                self.void(hold)
        elif r < 0.72:
            self.capture(account, card)
        elif r < 0.84 and self.refundable:
            self.refund(*self.refundable.pop(self.rng.randrange(len(self.refundable))))
        else:
            self.post()

    def _id(self, kind):
        self._n += 1
        return f"{self.lane}/{kind}{self._n}"

    def _customer(self, request, account, card):
        if self.rng.random() < 0.5:
            request.card_number = card
        else:
            request.member = f"programs/{self.program}/members/{account}"

    def _seen(self, account, response):
        self.available[account] = response.balances.available_points

    def _spendable(self, account, most):
        known = self.available[account]
        return most if known is None else max(0, min(known, most))

    def hold_request(self, account, card):
        points = self._spendable(account, 300)
        if points < 1:
            return None
        request = checkout_pb2.HoldRequest(
            operation_id=self._id("h"), lane=self.lane,
            points=self.rng.randint(1, points), hold_duration=HOLD_FOR)
        self._customer(request, account, card)
        return request

    def hold(self, account, card):
        request = self.hold_request(account, card)
        if request is None:
            return None
        response = self.call("Hold", request)
        if isinstance(response, tuple):
            return None
        self.took_hold(account, request, response)
        return request.operation_id

    def took_hold(self, account, request, response):
        self._seen(account, response)
        self.answers.append(Answer("hold", request.operation_id.encode(), account,
                                   points=response.held_points,
                                   expires=response.expire_time.ToMicroseconds(),
                                   replayed=response.replayed))

    def capture_request(self, account, card, hold=None):
        spend = self.rng.randint(0, self._spendable(account, 300))
        if hold is not None:
            held = next(a.points for a in reversed(self.answers)
                        if a.kernel_id == hold.encode())
            spend = self.rng.randint(0, held)
        money = spend * 100 + self.rng.randint(1, 5_000) * 100
        request = checkout_pb2.CaptureRequest(
            operation_id=self._id("c"), lane=self.lane, spend_points=spend,
            hold_operation_id=hold or "")
        self._customer(request, account, card)
        receipt = request.receipt
        receipt.receipt_id = request.operation_id
        receipt.business_time.GetCurrentTime()
        price = common_pb2.Money(currency_code="RUB", minor_units=money)
        receipt.lines.add(line_number=1, sku="sku-1", category="goods", quantity=1,
                          unit_price=price, total=price)
        return request

    def capture(self, account, card, hold=None):
        request = self.capture_request(account, card, hold)
        response = self.call("Capture", request)
        if not isinstance(response, tuple):
            self.captured(account, request, response)

    def captured(self, account, request, response):
        self._seen(account, response)
        kernel_id = capture_id(request.operation_id.encode())
        self.answers.append(Answer(
            "capture", kernel_id, account,
            hold=request.hold_operation_id.encode(), spent=response.spent_points,
            earned=response.earned_points, money=response.paid.minor_units,
            replayed=response.replayed))
        self.refundable.append((request.operation_id, kernel_id))

    def void_request(self, hold):
        return checkout_pb2.VoidRequest(operation_id=self._id("v"), lane=self.lane,
                                        hold_operation_id=hold)

    def void(self, hold):
        request = self.void_request(hold)
        response = self.call("Void", request)
        if not isinstance(response, tuple):
            self.voided(request, response)

    def voided(self, request, response):
        account = int(response.member.rsplit("/", 1)[1])
        self._seen(account, response)
        self.answers.append(Answer("void", request.operation_id.encode(), account,
                                   hold=request.hold_operation_id.encode(),
                                   replayed=response.replayed))

    def refund(self, original, kernel_id):
        request = checkout_pb2.RefundRequest(
            operation_id=self._id("r"), lane=self.lane, original_operation_id=original,
            whole_receipt=True)
        response = self.call("Refund", request)
        if not isinstance(response, tuple):
            self.refunded(request, response, kernel_id)

    def refunded(self, request, response, kernel_id):
        account = int(response.member.rsplit("/", 1)[1])
        self._seen(account, response)
        self.answers.append(Answer(
            "refund", request.operation_id.encode(), account, original=kernel_id,
            returned=response.returned_points, clawed_back=response.clawed_back_points,
            money=response.refunded.minor_units, replayed=response.replayed))

    def post(self):
        """Holds on two or three members in one Post, then their captures or
        voids in another: each operation answered on its own."""
        chosen = self.rng.sample(self.members, min(len(self.members),
                                                   self.rng.randint(2, 3)))
        holds = [(a, c, self.hold_request(a, c)) for a, c in chosen]
        holds = [h for h in holds if h[2] is not None]
        if not holds:
            return
        response = self.call("Post", checkout_pb2.PostRequest(operations=[
            checkout_pb2.PostOperation(hold=request) for _, _, request in holds]))
        if isinstance(response, tuple):
            return
        follow = []
        for (account, card, request), result in zip(holds, response.results):
            if result.status.code == 0:
                self.took_hold(account, request, result.hold)
                if self.rng.random() < 0.7:
                    follow.append((account, self.capture_request(
                        account, card, request.operation_id)))
                else:
                    follow.append((account, self.void_request(request.operation_id)))
            else:
                self.refusals[f"post:{result.status.code}"] += 1
        if not follow:
            return
        operations = [checkout_pb2.PostOperation(capture=r)
                      if isinstance(r, checkout_pb2.CaptureRequest)
                      else checkout_pb2.PostOperation(void=r) for _, r in follow]
        response = self.call("Post", checkout_pb2.PostRequest(operations=operations))
        if isinstance(response, tuple):
            return
        for (account, request), result in zip(follow, response.results):
            if result.status.code != 0:
                self.refusals[f"post:{result.status.code}"] += 1
            elif result.WhichOneof("result") == "capture":
                self.captured(account, request, result.capture)
            else:
                self.voided(request, result.void)


def _replayed(response):
    if hasattr(response, "results"):
        return any(getattr(r, r.WhichOneof("result")).replayed
                   for r in response.results if r.WhichOneof("result"))
    return getattr(response, "replayed", False)
