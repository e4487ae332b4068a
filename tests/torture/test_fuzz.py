"""Promise 3: bad input changes nothing. Every RPC of the API (enumerated
from the descriptors) is called with requests hypothesis builds from the
message descriptors: valid requests with hostile values put into them at
random paths (negative, zero, int64 and int32 edges, huge repeated fields,
oversized strings, unknown enum values, fields left out), bytes with invalid
UTF-8 in a string field, and deadlines already passed.

Every answer must be a defined status code (never UNKNOWN or INTERNAL for a
client's mistake), a refused call must leave the journal as it was, and
the server must stay up. Derandomized (repeatable) in `make test`; `make
torture` runs many more examples with fresh randomness (hypothesis prints
how to reproduce a failure).
"""

import os

import pytest
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_harness import (RunningServer, install_program, invoke, open_member,
                            path_of, rpcs)

LONG = os.environ.get("KOPILKA_TORTURE") == "long"
RPCS = rpcs()
WAIT = 10
DEFINED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS",
           "PERMISSION_DENIED", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
CARD = "7700000000000001"
HUGE = 8 << 20          # bytes a huge repeated field may reach

INT_EDGES = [0, 1, -1, 2, 100, 2**31 - 1, -2**31, 2**32, 2**53 + 1, 2**63 - 1, -2**63]
STRING_EDGES = ["", " ", "0", "-1", "programs/1", "programs/0", "programs/-1",
                "programs/1/members/1", "programs/1/members/999999",
                "programs/1/members/18446744073709551616", "programs/1/members/1/x",
                "stores/42/lanes/1", "stores/43/lanes/1", "stores/42/lanes/0",
                "stores/4294967296/lanes/1", "stores//lanes/", CARD, "RUB", "XXX",
                "fz-hold", "fz-capture", "a\x00b", "\u202e\u0000", "ёлка", "😀" * 40,
                "x" * 129, "x" * 70_000, "%s%n", "../../../etc/passwd"]

# Valid requests to put hostile values into (text format); the rest start empty.
TEMPLATES = {
    "Checkout/Quote": 'lane: "stores/42/lanes/1" card_number: "%s" receipt {%s}',
    "Checkout/Hold": 'operation_id: "fz-h" lane: "stores/42/lanes/1" '
                     'member: "programs/1/members/1" points: 10',
    "Checkout/Capture": 'operation_id: "fz-c" lane: "stores/42/lanes/1" '
                        'card_number: "%s" receipt {%s} spend_points: 5',
    "Checkout/Void": 'operation_id: "fz-v" lane: "stores/42/lanes/1" '
                     'hold_operation_id: "fz-hold"',
    "Checkout/Refund": 'operation_id: "fz-r" lane: "stores/42/lanes/1" '
                       'original_operation_id: "fz-capture" whole_receipt: true',
    "Checkout/Post": 'operations { hold { operation_id: "fz-p" lane: "stores/42/lanes/1"'
                     ' card_number: "%s" points: 1 } }',
    "Admin/Adjust": 'operation_id: "fz-a" member: "programs/1/members/1" points: 5 '
                    'reason: ADJUSTMENT_REASON_GOODWILL',
    "Members/EnrolMember": 'operation_id: "fz-e" parent: "programs/1" external_id: "x1"',
    "Members/IssueCard": 'operation_id: "fz-i" parent: "programs/1/members/1" '
                         'card_number: "7700000000000999"',
    "Members/GetMember": 'name: "programs/1/members/1"',
    "Feed/Subscribe": 'from_cursor: 1',
    "Store/WatchLane": 'lane: "stores/42/lanes/1"',
}
RECEIPT = ('receipt_id: "fz" business_time { seconds: 1767225600 } lines { line_number: 1 '
           'sku: "s" category: "groceries" quantity: 1 unit_price { currency_code: "RUB" '
           'minor_units: 10000 } total { currency_code: "RUB" minor_units: 10000 } }')


def template(method):
    request = message_factory.GetMessageClass(method.input_type)()
    text = TEMPLATES.get(f"{method.containing_service.name}/{method.name}")
    if text:
        text = text.replace("receipt {%s}", "receipt {" + RECEIPT + "}").replace("%s", CARD)
        text_format.Parse(text, request)
    return request


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    server = RunningServer(root / "data")
    install_program(server)
    member = open_member(server, 1, "fz-member", card=CARD, points=1_000)
    assert member == 1
    from kopilka.v1 import checkout_pb2, checkout_pb2_grpc
    pos = server.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    pos.Hold(checkout_pb2.HoldRequest(operation_id="fz-hold", lane="stores/42/lanes/1",
                                      card_number=CARD, points=10), timeout=WAIT)
    request = template(next(m for m in RPCS if path_of(m).endswith("Checkout/Capture")))
    request.operation_id = "fz-capture"
    pos.Capture(request, timeout=WAIT)
    server.backups = root / "backups"
    server.backups.mkdir()
    yield server
    server.stop()


# --- hostile values -----------------------------------------------------------------

def _scalar(field, backups):
    t = field.type
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return st.sampled_from(INT_EDGES) | st.integers(-2**63, 2**63 - 1)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.sampled_from([v for v in INT_EDGES if -2**31 <= v < 2**31]) | \
            st.integers(-2**31, 2**31 - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.sampled_from([0, 1, 2**63, 2**64 - 1])
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.sampled_from([0, 1, 2**32 - 1])
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from(known) | st.integers(-5, 1000)   # unknown values too
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64) | st.just(b"\x00" * 100_000)
    if t == F.TYPE_STRING:
        if field.name == "path":   # Admin/Backup: only ever inside our own folder
            return st.sampled_from(["", "relative", str(backups), str(backups / "x" / "y"),
                                    "\x00", "/"]) | st.uuids().map(
                                        lambda u: str(backups / str(u)))
        return (st.sampled_from(STRING_EDGES) | st.text(max_size=40)
                | st.just("7" * 1_000_000))
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e300])
    raise AssertionError(field.type)


def _put(data, message, depth, backups):
    """Puts one hostile value somewhere in `message` (a field, or a field of a
    nested message), or clears a field."""
    fields = list(message.DESCRIPTOR.fields)
    if not fields:
        return
    field = data.draw(st.sampled_from(fields))
    repeated = field.is_repeated
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return
        if repeated:
            how = data.draw(st.sampled_from(["add", "clear", "huge"]))
            container = getattr(message, field.name)
            if how == "clear":
                del container[:]
            elif how == "huge" and len(container):
                count = data.draw(st.sampled_from([1_000, 20_000]))
                room = HUGE // max(1, container[0].ByteSize())   # memory stays bounded
                for _ in range(min(count, room)):
                    container.add().CopyFrom(container[0])
            else:
                element = container.add()
                if depth < 3:
                    _put(data, element, depth + 1, backups)
            return
        if depth < 3 and data.draw(st.booleans()):
            _put(data, getattr(message, field.name), depth + 1, backups)
        else:
            message.ClearField(field.name)
        return
    value = data.draw(_scalar(field, backups))
    if repeated:
        container = getattr(message, field.name)
        count = data.draw(st.sampled_from([1, 2, 5_000]))
        size = len(value) if isinstance(value, (str, bytes)) else 8
        container.extend([value] * min(count, max(1, HUGE // max(1, size))))
    elif data.draw(st.integers(0, 9)) == 0 and field.containing_oneof is None:
        message.ClearField(field.name)
    else:
        setattr(message, field.name, value)


def _bad_utf8(data, message):
    """The message's bytes with a top-level string field set to invalid UTF-8
    (the last value of a field wins), or None if it has no string field."""
    strings = [f for f in message.DESCRIPTOR.fields
               if f.type == F.TYPE_STRING and not f.is_repeated]
    if not strings:
        return None
    field = data.draw(st.sampled_from(strings))
    junk = data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"ok\xed\xa0\x80",
                                      b"\xf8\x88\x80\x80\x80"]))
    tag = bytes([field.number << 3 | 2]) if field.number < 16 else \
        bytes([(field.number << 3 | 2) & 0x7F | 0x80, field.number >> 4])
    return message.SerializeToString() + tag + bytes([len(junk)]) + junk


@pytest.fixture(scope="module")
def channel(srv):
    srv.fuzz_channel = srv.channel()
    return srv.fuzz_channel


@pytest.mark.parametrize("method", RPCS, ids=path_of)
def test_every_rpc_answers_hostile_requests_with_a_defined_status(srv, channel, method):
    examples = 100 if LONG else 12

    @settings(max_examples=examples, derandomize=not LONG, deadline=None,
              database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def hostile(data):
        message = template(method)
        for _ in range(data.draw(st.integers(1, 3))):
            _put(data, message, 0, srv.backups)
        payload = None
        if data.draw(st.integers(0, 5)) == 0:
            payload = _bad_utf8(data, message)
        if payload is None:
            payload = message.SerializeToString()
        role = data.draw(st.sampled_from(["admin", "pos"]))
        metadata = (("authorization", f"Bearer {srv.tokens[role]}"),)
        timeout = data.draw(st.sampled_from([WAIT, WAIT, WAIT, 1e-6]))
        before = srv.server.ledger.head()
        answer = invoke(srv.fuzz_channel, method, payload, metadata, timeout)
        code, reason = ("OK", None) if answer == "OK" else answer
        assert code in DEFINED, (code, reason, message)
        if code != "OK":
            assert srv.server.ledger.head() == before, (code, reason, message)

    hostile()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert srv.server.ledger.audit() == []
