"""Checkout end to end: a real server on a loopback port, called as a POS would."""

import threading

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from kopilka.v1 import checkout_pb2 as pb
from kopilka.v1 import checkout_pb2_grpc, common_pb2

from server_harness import (RunningServer, error_info, install_program, reason_of,
                            open_member)

LANE = "stores/42/lanes/1"


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    server.stop()


@pytest.fixture
def pos(srv):
    return srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")


def rub(kopecks):
    return common_pb2.Money(currency_code="RUB", minor_units=kopecks)


def receipt(srv, *lines, receipt_id="r1"):
    """lines: (category, quantity, unit price in kopecks[, flags])."""
    out = pb.Receipt(receipt_id=receipt_id)
    out.business_time.FromMicroseconds(srv.clock.now)
    for i, (category, quantity, price, *flags) in enumerate(lines, 1):
        out.lines.add(line_number=i, sku=f"sku{i}", category=category,
                      quantity=quantity, unit_price=rub(price),
                      total=rub(quantity * price), flags=flags[0] if flags else [])
    return out


def test_quote_hold_capture_refund(srv, pos):
    member = open_member(srv, 1, "c1", card="7001", points=500)
    assert srv.server.ledger.programs()[0].utc_offset == 180  # Europe/Moscow
    r = receipt(srv, ("groceries", 2, 50_000), ("books", 1, 100_000))
    q = pos.Quote(pb.QuoteRequest(lane=LANE, card_number="7001", receipt=r))
    assert q.member == f"programs/1/members/{member}"
    assert q.total.minor_units == 200_000
    # version 3 lets points pay the whole receipt: the balance is the bound
    assert q.program_version == "programs/1/versions/3"
    assert q.max_spend_points == 500
    assert q.spend_bound == pb.PRICING_REASON_CODE_BALANCE
    hold = pos.Hold(pb.HoldRequest(operation_id="s42/l1/r1/hold", lane=LANE,
                                   card_number="7001", points=150))
    assert hold.held_points == 150 and hold.balances.available_points == 350
    cap = pos.Capture(pb.CaptureRequest(operation_id="s42/l1/r1", lane=LANE,
                                        card_number="7001", receipt=r,
                                        spend_points=120,
                                        hold_operation_id="s42/l1/r1/hold"))
    assert cap.spent_points == 120 and cap.released_points == 30
    assert cap.paid.minor_units == 200_000 - 12_000
    assert sum(line.earned_points for line in cap.lines) == cap.earned_points > 0
    assert cap.balances.available_points == 380
    # a retry gets the first answer
    again = pos.Capture(pb.CaptureRequest(operation_id="s42/l1/r1", lane=LANE,
                                          card_number="7001", receipt=r,
                                          spend_points=120,
                                          hold_operation_id="s42/l1/r1/hold"))
    assert again.replayed and again.spent_points == 120
    assert again.earned_points == cap.earned_points
    # return one of the two grocery units, then the rest of the receipt
    part = pos.Refund(pb.RefundRequest(
        operation_id="s42/l1/r1/ret1", lane=LANE, original_operation_id="s42/l1/r1",
        lines=pb.RefundRequest.Lines(returns=[pb.LineReturn(line_number=1,
                                                             quantity=1)])))
    rest = pos.Refund(pb.RefundRequest(
        operation_id="s42/l1/r1/ret2", lane=LANE, original_operation_id="s42/l1/r1",
        whole_receipt=True))
    assert part.returned_points + rest.returned_points == 120
    assert part.clawed_back_points + rest.clawed_back_points == cap.earned_points
    assert (part.refunded.minor_units + rest.refunded.minor_units
            == cap.paid.minor_units)
    assert rest.balances.available_points == 500
    with pytest.raises(grpc.RpcError) as err:
        pos.Refund(pb.RefundRequest(
            operation_id="s42/l1/r1/ret3", lane=LANE,
            original_operation_id="s42/l1/r1", whole_receipt=True))
    assert error_info(err.value)[:2] == ("FAILED_PRECONDITION",
                                        "REFUND_EXCEEDS_ORIGINAL")


def test_bad_receipt_names_fields(srv, pos):
    open_member(srv, 1, "c1", card="7001")
    r = receipt(srv, ("groceries", 2, 50_000), ("nonsense", 1, 100))
    r.lines[0].total.minor_units = 99
    with pytest.raises(grpc.RpcError) as err:
        pos.Capture(pb.CaptureRequest(operation_id="x1", lane=LANE,
                                      card_number="7001", receipt=r))
    code, reason, fields = error_info(err.value)
    assert (code, reason) == ("INVALID_ARGUMENT", "REQUEST_INVALID")
    assert "receipt.lines[0].total" in fields
    assert "receipt.lines[1].category" in fields
    assert srv.server.ledger.operation(b"x1/capture") is None


@pytest.mark.parametrize("seconds", [253_402_300_800, 2**40, 2**63 - 1])
def test_a_business_time_past_the_year_9999_is_invalid(srv, pos, seconds):
    """Once INTERNAL: the refusal's own message failed to print the time."""
    open_member(srv, 1, "c1", card="7001")
    r = receipt(srv, ("groceries", 1, 50_000))
    r.business_time.seconds = seconds
    for call in (lambda: pos.Quote(pb.QuoteRequest(lane=LANE, card_number="7001",
                                                   receipt=r)),
                 lambda: pos.Capture(pb.CaptureRequest(
                     operation_id="x1", lane=LANE, card_number="7001", receipt=r))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert error_info(err.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID",
                                         ["receipt.business_time"])


def test_spend_above_limit_and_store_scope(srv, pos):
    open_member(srv, 1, "c1", card="7001", points=1_000)
    r = receipt(srv, ("groceries", 1, 100_000))
    with pytest.raises(grpc.RpcError) as err:
        pos.Capture(pb.CaptureRequest(operation_id="x2", lane=LANE,
                                      card_number="7001", receipt=r, spend_points=1_500))
    assert error_info(err.value)[:2] == ("FAILED_PRECONDITION", "SPEND_ABOVE_LIMIT")
    other = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos43")
    with pytest.raises(grpc.RpcError) as err:
        other.Quote(pb.QuoteRequest(lane=LANE, card_number="7001", receipt=r))
    assert error_info(err.value)[:2] == ("PERMISSION_DENIED", "STORE_NOT_PERMITTED")
    anonymous = srv.stub(checkout_pb2_grpc.CheckoutStub, None)
    with pytest.raises(grpc.RpcError) as err:
        anonymous.Quote(pb.QuoteRequest(lane=LANE, card_number="7001", receipt=r))
    assert error_info(err.value)[:2] == ("UNAUTHENTICATED", "CREDENTIALS_INVALID")


def test_operation_id_reused_and_hold_expiry(srv, pos):
    open_member(srv, 1, "c1", card="7001", points=100)
    pos.Hold(pb.HoldRequest(operation_id="h1", lane=LANE, card_number="7001",
                            points=60, hold_duration=Duration(seconds=60)))
    with pytest.raises(grpc.RpcError) as err:
        pos.Hold(pb.HoldRequest(operation_id="h1", lane=LANE, card_number="7001",
                                points=61))
    assert error_info(err.value)[:2] == ("ALREADY_EXISTS", "OPERATION_ID_REUSED")
    srv.clock.advance(61 * 1_000_000)
    r = receipt(srv, ("groceries", 1, 100_000))
    with pytest.raises(grpc.RpcError) as err:
        pos.Capture(pb.CaptureRequest(operation_id="c1", lane=LANE, card_number="7001",
                                      receipt=r, spend_points=10,
                                      hold_operation_id="h1"))
    assert error_info(err.value)[:2] == ("FAILED_PRECONDITION", "HOLD_EXPIRED")


def test_concurrent_double_spend(srv, pos):
    """100 concurrent captures against a balance that affords 10."""
    open_member(srv, 1, "c1", card="7001", points=100)
    r = receipt(srv, ("groceries", 1, 1_000_000))
    outcomes = []

    def capture(i):
        try:
            pos.Capture(pb.CaptureRequest(operation_id=f"dbl/{i}", lane=LANE,
                                          card_number="7001", receipt=r,
                                          spend_points=10))
            outcomes.append("ok")
        except grpc.RpcError as e:
            outcomes.append(error_info(e)[1])
    threads = [threading.Thread(target=capture, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 10
    assert set(outcomes) - {"ok"} <= {"INSUFFICIENT_POINTS", "SPEND_ABOVE_LIMIT"}
    assert srv.server.ledger.audit() == []


def test_a_line_is_refunded_once_between_refund_and_post(srv, pos):
    """A unary Refund and a Post refunding the same line of a receipt, sent
    at once: one of them refunds it, the other is refused."""
    admin = srv.stub(checkout_pb2_grpc.CheckoutStub, "admin")
    open_member(srv, 1, "c1", card="7001")
    r = receipt(srv, ("groceries", 1, 100_000), ("books", 1, 100_000))
    outcomes = []

    def refund(i, kind):
        request = pb.RefundRequest(
            operation_id=f"race/{i}/{kind}", lane=LANE,
            original_operation_id=f"race/{i}",
            lines=pb.RefundRequest.Lines(returns=[pb.LineReturn(line_number=1,
                                                                 quantity=1)]))
        try:
            if kind == "unary":
                answer = pos.Refund(request)
            else:
                result = admin.Post(pb.PostRequest(
                    operations=[pb.PostOperation(refund=request)])).results[0]
                if result.status.code:
                    outcomes.append((i, result.status.code))
                    return
                answer = result.refund
            outcomes.append((i, [line.line_number for line in answer.lines]))
        except grpc.RpcError as e:
            outcomes.append((i, e.code().value[0]))
    for i in range(12):
        pos.Capture(pb.CaptureRequest(operation_id=f"race/{i}", lane=LANE,
                                      card_number="7001", receipt=r))
    threads = [threading.Thread(target=refund, args=(i, kind))
               for i in range(12) for kind in ("unary", "post")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    for i in range(12):
        got = [o for n, o in outcomes if n == i]
        assert len(got) == 2 and [1] in got and refused in got, (i, got)
    assert srv.server.ledger.audit() == []


def _mixed_post(prefix, r):
    """A hold, a hold beyond the balance, a capture, a void of no hold."""
    return [pb.PostOperation(hold=pb.HoldRequest(operation_id=f"{prefix}/h1", lane=LANE,
                                                 card_number="7001", points=50)),
            pb.PostOperation(hold=pb.HoldRequest(operation_id=f"{prefix}/h2", lane=LANE,
                                                 card_number="7001", points=500)),
            pb.PostOperation(capture=pb.CaptureRequest(
                operation_id=f"{prefix}/c1", lane=LANE, card_number="7001", receipt=r)),
            pb.PostOperation(void=pb.VoidRequest(operation_id=f"{prefix}/v1", lane=LANE,
                                                 hold_operation_id="nope"))]


def test_post_applies_each_operation_on_its_own(srv):
    admin = srv.stub(checkout_pb2_grpc.CheckoutStub, "admin")
    open_member(srv, 1, "c1", card="7001", points=100)
    r = receipt(srv, ("groceries", 1, 100_000))
    ops = _mixed_post("p", r)
    out = admin.Post(pb.PostRequest(operations=ops))
    codes = [res.status.code for res in out.results]
    assert codes == [0, grpc.StatusCode.FAILED_PRECONDITION.value[0], 0,
                     grpc.StatusCode.NOT_FOUND.value[0]]
    assert out.results[0].hold.held_points == 50
    assert out.results[2].capture.earned_points == 100  # 10 per 100 rubles
    again = admin.Post(pb.PostRequest(operations=ops[:1]))
    assert again.results[0].hold.replayed


def test_post_status_view_returns_each_status_alone(srv):
    """POST_RESULT_VIEW_STATUS: the same operations applied, the same
    statuses, no responses; a retry (of either view) finds them applied."""
    admin = srv.stub(checkout_pb2_grpc.CheckoutStub, "admin")
    open_member(srv, 1, "c1", card="7001", points=100)
    r = receipt(srv, ("groceries", 1, 100_000))
    ops = _mixed_post("s", r)
    status_only = pb.PostRequest(operations=ops, view=pb.POST_RESULT_VIEW_STATUS)
    out = admin.Post(status_only)
    codes = [res.status.code for res in out.results]
    assert codes == [0, grpc.StatusCode.FAILED_PRECONDITION.value[0], 0,
                     grpc.StatusCode.NOT_FOUND.value[0]]
    assert [res.WhichOneof("result") for res in out.results] == [None] * 4
    assert reason_of(out.results[1].status) == "INSUFFICIENT_POINTS"
    assert admin.Post(status_only).results[0].status.code == 0   # a retry
    again = admin.Post(pb.PostRequest(operations=ops[:3:2]))
    assert again.results[0].hold.replayed and again.results[1].capture.replayed
    assert again.results[1].capture.earned_points == 100
    assert srv.server.ledger.audit() == []


def test_post_applies_in_order_as_if_one_by_one(srv):
    """A capture may name a hold placed earlier in the same Post, a refund a
    receipt captured earlier in it, and a member's later receipts are priced
    against what the earlier ones left."""
    admin = srv.stub(checkout_pb2_grpc.CheckoutStub, "admin")
    open_member(srv, 1, "c1", card="7001", points=100)
    r = receipt(srv, ("groceries", 1, 100_000))
    ops = [pb.PostOperation(hold=pb.HoldRequest(operation_id="q/h1", lane=LANE,
                                                card_number="7001", points=60)),
           pb.PostOperation(capture=pb.CaptureRequest(
               operation_id="q/c1", lane=LANE, card_number="7001", receipt=r,
               spend_points=50, hold_operation_id="q/h1")),
           pb.PostOperation(capture=pb.CaptureRequest(
               operation_id="q/c2", lane=LANE, card_number="7001", receipt=r,
               spend_points=50)),
           pb.PostOperation(refund=pb.RefundRequest(
               operation_id="q/r1", lane=LANE, original_operation_id="q/c1",
               whole_receipt=True))]
    out = admin.Post(pb.PostRequest(operations=ops))
    codes = [res.status.code for res in out.results]
    assert codes == [0, 0, 0, 0], [res.status.message for res in out.results]
    assert out.results[1].capture.spent_points == 50
    assert out.results[1].capture.released_points == 10
    assert out.results[2].capture.balances.available_points == 0
    assert out.results[3].refund.returned_points == 50
    assert out.results[3].refund.balances.available_points == 50
    assert srv.server.ledger.audit() == []


def test_a_retry_racing_its_original_gets_the_first_answer(srv, pos):
    """A copy of the request commits between this one's encoding and its
    commit, with other bytes (the hold's expiry comes from the clock): this
    one is refused by the ledger as a reused id, and answers with the
    copy's result instead of OPERATION_ID_REUSED."""
    from kopilka.core.batch import Batch
    from kopilka.servers.backend import pack, request_digest
    open_member(srv, 1, "c1", card="7001", points=100)
    request = pb.HoldRequest(operation_id="race/h1", lane=LANE, card_number="7001",
                             points=30)
    backend = srv.server.backend
    apply = backend.apply
    copy = Batch().hold("race/h1", 0, 30, expires_at=srv.clock.now + 1, card=b"7001",
                        store=42, lane=1, data=pack({"rq": request_digest(request),
                                                     "e": srv.clock.now + 1, "p": 30}))

    async def racing(batch, context):
        backend.apply = apply
        assert (await apply(copy, None))[0].code == 0
        return await apply(batch, context)
    backend.apply = racing
    answer = pos.Hold(request)
    assert answer.replayed and answer.held_points == 30
    assert answer.balances.available_points == 70


def test_a_hold_is_voided_only_by_its_own_store(srv, pos):
    open_member(srv, 1, "c1", card="7001", points=100)
    pos.Hold(pb.HoldRequest(operation_id="h42", lane=LANE, card_number="7001",
                            points=10))
    other = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos43")
    with pytest.raises(grpc.RpcError) as err:
        other.Void(pb.VoidRequest(operation_id="v43", lane="stores/43/lanes/1",
                                  hold_operation_id="h42"))
    assert error_info(err.value)[:2] == ("PERMISSION_DENIED", "STORE_NOT_PERMITTED")
    assert srv.server.ledger.balances(1, srv.clock.now).held == 10
