"""The public protobuf API (proto/kopilka/v1) and its generated modules.

Structure is checked on a FileDescriptorSet compiled from the .proto files
with their comments (protoc --include_source_info), so the checks see the
sources as they are now; the generated modules must match them exactly
(else `make proto` was not run). What the API mirrors from the Python side
(the kernel's result codes and journal entry types, the pricing engine's
reason codes, the program model) is compared with that side itself.
"""

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.timestamp_pb2 import Timestamp
from kopilka.core import allocation, pricing, program, records
from kopilka.core.program import load_program, to_micros
from kopilka.hwd import events
from kopilka.servers import errors

ROOT = Path(__file__).resolve().parent.parent
FILES = ["common", "checkout", "members", "programs", "feed", "store", "admin"]

SERVICES = {
    "Checkout": {"Quote": "unary", "Hold": "unary", "Capture": "unary",
                 "Void": "unary", "Refund": "unary", "Post": "unary"},
    "Members": {"EnrolMember": "unary", "GetMember": "unary",
                "LookupMember": "unary", "UpdateMember": "unary",
                "EraseMember": "unary", "IssueCard": "unary",
                "ResolveCard": "unary", "BlockCard": "unary",
                "ReplaceCard": "unary", "MergeMembers": "unary",
                "AwardAction": "unary"},
    "Programs": {"CreateProgram": "unary", "UpdateProgram": "unary",
                 "GetProgram": "unary", "ListPrograms": "unary"},
    "Feed": {"Subscribe": "server stream", "GetPointsReport": "unary",
             "GetBreakageReport": "unary", "GetActiveMembersReport": "unary",
             "GetAverageReceiptReport": "unary",
             "GetVisitFrequencyReport": "unary",
             "GetPartnerSettlementReport": "unary", "GetCouponsReport": "unary"},
    "Store": {"StreamCardReads": "bidi stream", "WatchLane": "server stream"},
    "Admin": {"Adjust": "unary", "Audit": "unary", "Backup": "unary",
              "GetStats": "unary"},
}

# RPCs that change the ledger: their requests carry an operation_id. Post
# carries one per operation instead (checked separately).
WRITES = {"Checkout.Hold", "Checkout.Capture", "Checkout.Void",
          "Checkout.Refund", "Members.EnrolMember", "Members.UpdateMember",
          "Members.EraseMember", "Members.IssueCard", "Members.BlockCard",
          "Members.ReplaceCard", "Members.MergeMembers", "Members.AwardAction",
          "Programs.CreateProgram", "Programs.UpdateProgram", "Admin.Adjust"}
# Everything else: reads, streams keyed otherwise (card reads by read_id),
# and Admin.Backup, which writes no ledger state and refuses an existing
# destination.
OTHERS = {"Checkout.Quote", "Checkout.Post", "Members.GetMember",
          "Members.LookupMember", "Members.ResolveCard", "Programs.GetProgram",
          "Programs.ListPrograms", "Feed.Subscribe", "Feed.GetPointsReport",
          "Feed.GetBreakageReport", "Feed.GetActiveMembersReport",
          "Feed.GetAverageReceiptReport", "Feed.GetVisitFrequencyReport",
          "Feed.GetPartnerSettlementReport", "Feed.GetCouponsReport",
          "Store.StreamCardReads", "Store.WatchLane", "Admin.Audit", "Admin.Backup", "Admin.GetStats"}

F = descriptor_pb2.FieldDescriptorProto
PREFIX = ".kopilka.v1."


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fileset(tmp_path_factory):
    """The API's files compiled now, with comments: {name: FileDescriptorProto}."""
    out = tmp_path_factory.mktemp("proto") / "api.binpb"
    _gen_proto().descriptor_set(out)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {Path(f.name).stem: f for f in files}


@pytest.fixture(scope="module")
def messages(fileset):
    """Every message, nested ones too: {full name: DescriptorProto}."""
    found = {}

    def walk(prefix, message):
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for f in fileset.values():
        for message in f.message_type:
            walk("." + f.package, message)
    return found


@pytest.fixture(scope="module")
def enums(fileset):
    """Every enum, nested ones too: {full name: EnumDescriptorProto}."""
    found = {}

    def walk(prefix, message):
        for enum in message.enum_type:
            found[f"{prefix}.{message.name}.{enum.name}"] = enum
        for nested in message.nested_type:
            walk(f"{prefix}.{message.name}", nested)

    for f in fileset.values():
        for enum in f.enum_type:
            found[f".{f.package}.{enum.name}"] = enum
        for message in f.message_type:
            walk("." + f.package, message)
    return found


def _methods(fileset):
    for f in fileset.values():
        for service in f.service:
            for method in service.method:
                yield f"{service.name}.{method.name}", method


def _comments(f):
    """{location path: leading comment} of one file."""
    return {tuple(loc.path): loc.leading_comments
            for loc in f.source_code_info.location}


def _module(name):
    return importlib.import_module(f"kopilka.v1.{name}")


# --- generation -------------------------------------------------------------------

def test_generated_modules_import_as_kopilka_v1():
    for name in FILES:
        pb2, pb2_grpc = _module(f"{name}_pb2"), _module(f"{name}_pb2_grpc")
        assert pb2.DESCRIPTOR.package == "kopilka.v1"
        assert pb2.DESCRIPTOR.name == f"kopilka/v1/{name}.proto"
        assert Path(pb2.__file__).parent == ROOT / "gen" / "kopilka" / "v1"
        assert Path(pb2.__file__).with_suffix(".pyi").exists()
        for service in pb2.DESCRIPTOR.services_by_name:
            for suffix in ("Stub", "Servicer"):
                assert hasattr(pb2_grpc, service + suffix)
            assert hasattr(pb2_grpc, f"add_{service}Servicer_to_server")


def test_generated_modules_match_the_sources(tmp_path):
    """Generating again from the .proto files as they are now gives exactly
    the modules in gen/: a stale generated package means `make proto` was
    skipped."""
    gen_proto = _gen_proto()
    assert gen_proto.stale() is None
    fresh = tmp_path / "kopilka" / "v1"
    gen_proto.generate(fresh)
    built = gen_proto.OUT
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in built.iterdir())
    for path in fresh.iterdir():
        assert path.read_bytes() == (built / path.name).read_bytes(), (
            f"{path.name} differs from a fresh generation: run make proto")


def test_stubs_work_over_a_channel():
    """The generated stubs and servicers talk to each other (no server
    logic: a stand-in servicer answers)."""
    from concurrent import futures

    from kopilka.v1 import checkout_pb2, checkout_pb2_grpc

    class Echo(checkout_pb2_grpc.CheckoutServicer):
        def Quote(self, request, context):
            return checkout_pb2.QuoteResponse(member="programs/1/members/7",
                                              max_spend_points=150)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    checkout_pb2_grpc.add_CheckoutServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = checkout_pb2_grpc.CheckoutStub(channel)
            reply = stub.Quote(checkout_pb2.QuoteRequest(lane="stores/42/lanes/3"),
                               timeout=10)
            assert reply.max_spend_points == 150
            with pytest.raises(grpc.RpcError) as failed:
                stub.Hold(checkout_pb2.HoldRequest(operation_id="x"), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


# --- shape ----------------------------------------------------------------------

def test_services_and_rpcs(fileset):
    kinds = {(False, False): "unary", (False, True): "server stream",
             (True, False): "client stream", (True, True): "bidi stream"}
    found = {}
    for f in fileset.values():
        assert f.package == "kopilka.v1"
        for service in f.service:
            assert service.name not in found, f"service {service.name} defined twice"
            found[service.name] = {m.name: kinds[m.client_streaming, m.server_streaming]
                                   for m in service.method}
    assert found == SERVICES
    assert {name for name, _ in _methods(fileset)} == WRITES | OTHERS
    assert not WRITES & OTHERS


def test_one_request_and_one_response_message_per_rpc(fileset):
    seen = {}
    for name, method in _methods(fileset):
        rpc = name.split(".")[1]
        assert method.input_type == f"{PREFIX}{rpc}Request", name
        assert method.output_type == f"{PREFIX}{rpc}Response", name
        for type_ in (method.input_type, method.output_type):
            assert type_ not in seen, f"{type_} used by {seen.get(type_)} and {name}"
            seen[type_] = name


def _undocumented(stem, f):
    """Elements of one file without a leading comment."""
    comments = _comments(f)
    missing = []

    def need(path, what):
        if not comments.get(tuple(path), "").strip():
            missing.append(f"{stem}.proto: {what}")

    def message(path, m, prefix):
        name = f"{prefix}{m.name}"
        need(path, f"message {name}")
        for i, field in enumerate(m.field):
            need(path + [2, i], f"field {name}.{field.name}")
        for i, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # proto3 `optional`
                need(path + [8, i], f"oneof {name}.{oneof.name}")
        for i, nested in enumerate(m.nested_type):
            message(path + [3, i], nested, name + ".")
        for i, e in enumerate(m.enum_type):
            enum(path + [4, i], e, name + ".")

    def enum(path, e, prefix):
        need(path, f"enum {prefix}{e.name}")
        for i, value in enumerate(e.value):
            need(path + [2, i], f"enum value {prefix}{e.name}.{value.name}")

    for i, m in enumerate(f.message_type):
        message([4, i], m, "")
    for i, e in enumerate(f.enum_type):
        enum([5, i], e, "")
    for i, service in enumerate(f.service):
        need([6, i], f"service {service.name}")
        for j, method in enumerate(service.method):
            need([6, i, 2, j], f"rpc {service.name}.{method.name}")
    return missing


def test_every_element_has_a_leading_comment(fileset):
    """Every message, field, oneof, enum, enum value, service and RPC."""
    missing = [m for stem, f in fileset.items() for m in _undocumented(stem, f)]
    assert not missing, "undocumented:\n" + "\n".join(missing)


def test_enums_start_with_unspecified_and_prefix_their_values(enums):
    for full, enum in enums.items():
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        zero = enum.value[0]
        assert zero.number == 0 and zero.name == prefix + "UNSPECIFIED", full
        assert sum(v.number == 0 for v in enum.value) == 1, full
        if enum.name != "ErrorReason":  # its value names are the reason strings
            assert all(v.name.startswith(prefix) for v in enum.value), full


def test_write_rpcs_carry_an_operation_id(fileset, messages):
    def has_operation_id(type_):
        fields = {f.name: f for f in messages[type_].field}
        return "operation_id" in fields and fields["operation_id"].type == F.TYPE_STRING

    methods = dict(_methods(fileset))
    for name in WRITES:
        assert has_operation_id(methods[name].input_type), name
    for name in OTHERS - {"Checkout.Post"}:
        assert not has_operation_id(methods[name].input_type), name
    # Post: every operation it can carry is a write request with its own id.
    operation = messages[f"{PREFIX}PostOperation"]
    carried = {f.type_name for f in operation.field}
    assert carried == {methods[f"Checkout.{rpc}"].input_type
                       for rpc in ("Hold", "Capture", "Void", "Refund")}
    assert all(has_operation_id(t) for t in carried)
    for f in operation.field:
        assert f.HasField("oneof_index"), "a Post operation is exactly one request"
    # Each operation's result is the same RPC's response, plus its status.
    result = {f.name: f.type_name for f in messages[f"{PREFIX}PostResult"].field}
    assert result.pop("status") == ".google.rpc.Status"
    assert set(result.values()) == {t.replace("Request", "Response") for t in carried}


def test_operation_id_is_documented_as_1_to_128_bytes(fileset, messages):
    methods = dict(_methods(fileset))
    requests = {methods[name].input_type.removeprefix(PREFIX) for name in WRITES}
    checked = set()
    for f in fileset.values():
        comments = _comments(f)
        for i, m in enumerate(f.message_type):
            if m.name not in requests:
                continue
            index = [field.name for field in m.field].index("operation_id")
            text = " ".join(comments[(4, i, 2, index)].split())
            assert "1 to 128 bytes" in text, f"{m.name}.operation_id"
            checked.add(m.name)
    assert checked == requests
    header = " ".join(_comments(fileset["common"])[(12,)].split())
    assert "1 to 128 bytes" in header and "OPERATION_ID_REUSED" in header


def test_checkout_requests_name_their_store_and_lane(fileset, messages):
    for name, method in _methods(fileset):
        if not name.startswith("Checkout.") or name == "Checkout.Post":
            continue
        lane = {f.name: f for f in messages[method.input_type].field}.get("lane")
        assert lane is not None and lane.type == F.TYPE_STRING, name
    lane = {f.name: f for f in messages[f"{PREFIX}CardRead"].field}["lane"]
    assert lane.type == F.TYPE_STRING


def test_amounts_and_times_have_their_types(messages):
    """Points are int64, money is Money, times are Timestamps named *_time,
    durations are Durations; no floating point anywhere."""
    for full, m in messages.items():
        for f in m.field:
            where = f"{full}.{f.name}"
            assert f.type not in (F.TYPE_FLOAT, F.TYPE_DOUBLE), where
            if (f.name.endswith("_points") or f.name == "points") and f.type != F.TYPE_BOOL:
                assert f.type == F.TYPE_INT64, where
            if f.type_name == ".google.protobuf.Timestamp":
                assert f.name.endswith("_time"), where
            if f.name.endswith("_time"):
                assert f.type_name == ".google.protobuf.Timestamp", where
            if f.type_name == ".google.protobuf.Duration":
                assert f.name.endswith("duration"), where
            if f.name.endswith("_bp"):
                assert f.type == F.TYPE_INT32, where
    money = {f.name: f.type for f in messages[f"{PREFIX}Money"].field}
    assert money == {"currency_code": F.TYPE_STRING, "minor_units": F.TYPE_INT64}


# --- what the API mirrors --------------------------------------------------------

def _values(enums, name):
    enum = enums[PREFIX + name]
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper() + "_"
    return {v.name.removeprefix(prefix): v.number for v in enum.value if v.number}


@pytest.mark.parametrize("proto, python, numbers", [
    ("EntryType", records.Entry, True),
    ("SystemAccountKind", records.Sys, True),
    ("MemberState", records.Status, True),
    ("CardState", records.CardStatus, True),
    ("CouponState", records.CouponState, True),
    ("PricingReasonCode", pricing.Why, False),
])
def test_enums_mirror_the_python_side(enums, proto, python, numbers):
    values = _values(enums, proto)
    if numbers:
        assert values == {m.name: m.value for m in python}
    else:
        assert set(values) == {m.name for m in python}


@pytest.mark.parametrize("proto, names", [
    ("HoldReleaseReason", {"CAPTURED": records.RELEASE_CAPTURED,
                           "VOIDED": records.RELEASE_VOIDED,
                           "EXPIRED": records.RELEASE_EXPIRED}),
    ("Period", program.PERIODS),
    ("Rounding", program.ROUNDINGS),
    ("RoundingScope", program.ROUNDING_SCOPES),
    ("BonusKind", program.BONUS_KINDS),
    ("CardReadSource", events.SOURCES),
])
def test_enums_mirror_the_python_constants(enums, proto, names):
    values = _values(enums, proto)
    if isinstance(names, dict):
        assert values == names
    else:
        assert set(values) == {n.upper() for n in names}


def test_kernel_codes_and_error_reasons_map_one_to_one(fileset, enums):
    codes = set(records.Code) - {records.Code.OK}
    assert set(errors.KERNEL) == codes
    kernel_reasons = [reason for _, reason in errors.KERNEL.values()]
    assert len(set(kernel_reasons)) == len(kernel_reasons), "two codes share a reason"
    assert not set(kernel_reasons) & set(errors.SERVER)

    common = fileset["common"]
    index = [e.name for e in common.enum_type].index("ErrorReason")
    enum = common.enum_type[index]
    comments = _comments(common)
    documented = {}
    for i, value in enumerate(enum.value):
        if value.number:
            text = " ".join(comments[(5, index, 2, i)].split())
            status = re.match(r"Status: ([A-Z_]+)\.", text)
            assert status, f"{value.name}: comment must start with 'Status: CODE.'"
            documented[value.name] = status.group(1)
    table = {reason: status for status, reason in errors.KERNEL.values()} | errors.SERVER
    assert documented == table
    assert errors.KERNEL[records.Code.OP_ID_REUSED] == ("ALREADY_EXISTS", "OPERATION_ID_REUSED")
    for status in table.values():
        assert status in grpc.StatusCode.__members__ and status != "OK"
        assert status != "UNKNOWN"


def test_pricing_reason_amounts_are_typed_as_the_engine_states_them(fileset):
    """PricingReason.points / .money list the codes whose amount is points /
    money; together they are exactly the codes whose text states an amount."""
    checkout = fileset["checkout"]
    comments = _comments(checkout)
    index = [m.name for m in checkout.message_type].index("PricingReason")
    fields = [f.name for f in checkout.message_type[index].field]
    listed = {}
    for kind in ("points", "money"):
        text = comments[(4, index, 2, fields.index(kind))]
        listed[kind] = set(re.findall(r"[A-Z][A-Z_]+", text))
    assert not listed["points"] & listed["money"]
    with_amount = {w.name for w, text in pricing.TEXT.items() if "{amount}" in text}
    assert listed["points"] | listed["money"] == with_amount


# Python model field -> proto field, where the names differ (units in the
# name, a oneof in place of optional alternatives, `_time` for Timestamps).
RENAMES = {
    "Program": {"id": "name", "name": "display_name", "currency": "currency_code"},
    "Version": {"effective_from": "effective_time"},
    "Store": {"id": "name", "name": "display_name"},
    "Partner": {"id": "name", "name": "display_name"},
    "Rate": {"points": "points_per", "per": "points_per"},
    "Spend": {"min_balance": "min_balance_points"},
    "Expiry": {"end_of": "end_of_period", "periods_later": "end_of_period"},
    "Bonuses": {"welcome": "welcome_points", "birthday": "birthday_points"},
    "Offer": {"amount": "money"},
}
PROTO_NAMES = {"Version": "ProgramVersion", "Store": "StoreDefinition"}


def test_program_echo_mirrors_the_program_model(messages):
    """Every field of core/program.py's model has its place in the echo."""
    model = [program.Program, program.Version, program.Partner, program.Store,
             program.Rate, program.CategoryRate, program.Items, program.Earn,
             program.Spend, program.Expiry, program.LifetimeOverride,
             program.Lifetime, program.Tier, program.Tiers, program.Action,
             program.VisitBonus, program.Bonuses, program.Referral,
             program.Coupon, program.RegularCustomer, program.Offer,
             program.Discounts]
    for cls in model:
        name = cls.__name__
        fields = {f.name for f in messages[PREFIX + PROTO_NAMES.get(name, name)].field}
        for field in dataclasses.fields(cls):
            if field.name.startswith("_"):
                continue
            target = RENAMES.get(name, {}).get(field.name, field.name)
            if name == "Tiers" and field.name == "levels":
                target = "levels"
            assert target in fields, f"{name}.{field.name} has no field in the echo"
    # The settled lines mirror allocation.LineShare (the referrer's share
    # aside: the POS never sees it).
    settled = {f.name for f in messages[f"{PREFIX}SettledLine"].field}
    renamed = {"number": "line_number", "discount": "discount", "spent": "spent_points",
               "earned": "earned_points", "paid": "paid", "quantity": "quantity"}
    assert {renamed[n] for n in allocation.LineShare._fields if n != "referral"} == settled


# --- a Quote response, from the real pricing engine -------------------------------

def _timestamp(micros):
    if micros is None or micros >= records.NEVER:
        return None
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def _quote_response(q, currency, spend):
    """core/pricing.py's Quote as the API's QuoteResponse (what the server
    will do; here to show the message holds everything the engine says)."""
    from kopilka.v1 import checkout_pb2, common_pb2

    def money(units):
        return common_pb2.Money(currency_code=currency, minor_units=units)

    money_codes = {"MIN_RECEIPT", "BEST_DISCOUNT", "ADDITIVE_DISCOUNT",
                   "DISCOUNT_NOT_BEST", "COUPON_REDEEMED", "COUPON_EARNED"}
    points_codes = {"CAP", "BALANCE", "MIN_BALANCE", "MIN_POINTS"}

    def code(why):
        return checkout_pb2.PricingReasonCode.Value(f"PRICING_REASON_CODE_{why.name}")

    def reason(r):
        out = checkout_pb2.PricingReason(code=code(r.code), subject=r.name, text=str(r))
        if r.code.name in money_codes:
            out.money.CopyFrom(money(r.amount))
        elif r.code.name in points_codes:
            out.points = r.amount
        return out

    priced = q.at(spend)
    response = checkout_pb2.QuoteResponse(
        member="programs/1/members/42",
        program_version=f"programs/1/versions/{q.version.number}",
        partner=f"programs/1/partners/{q.partner}" if q.partner else "",
        quote_time=_timestamp(q.now),
        tier=q.member.tier or "",
        balances=common_pb2.Balances(available_points=q.member.available,
                                     as_of_time=_timestamp(q.now)),
        total=money(q.total), discount=money(q.discount),
        coupon_discount=money(q.coupon), due=money(q.due), payable=money(q.payable),
        discounts=[reason(r) for r in q.discounts],
        max_spend_points=q.max_spend, min_spend_points=q.min_spend,
        spend_bound=code(q.spend_bound),
        spend_limits=[reason(r) for r in q.spend_limits],
        earn_points=q.earn,
        earn_activate_time=_timestamp(q.activates_at),
        earn_expire_time=_timestamp(q.expires_at),
        reasons=[reason(r) for r in q.reasons],
        lines=[checkout_pb2.LineQuote(
            line_number=line.number, total=money(line.total),
            discount=money(line.discount), coupon_discount=money(line.coupon),
            due=money(line.due), payable_by_points=line.payable,
            earn_points=line.earn, reasons=[reason(r) for r in line.reasons])
            for line in q.lines],
        spend_preview=checkout_pb2.SpendPreview(
            spend_points=priced.spend, paid=money(priced.paid), earn_points=priced.earn,
            lines=[checkout_pb2.LinePreview(line_number=p.number, spent_points=p.spent,
                                            paid=money(p.paid), earn_points=p.earn)
                   for p in priced.lines]),
    )
    if q.coupon_earned is not None:
        response.coupon_earned.CopyFrom(checkout_pb2.CouponTerms(
            value=money(q.coupon_earned.value),
            usable_time=_timestamp(q.coupon_earned.usable_from),
            expire_time=_timestamp(q.coupon_earned.expires_at)))
    return response


def test_quote_response_round_trip():
    from datetime import datetime, timedelta, timezone

    from kopilka.v1 import checkout_pb2

    p = load_program(ROOT / "examples" / "programs" / "example.toml")
    sale = to_micros(datetime(2024, 3, 1, 12, tzinfo=timezone(timedelta(hours=3))))
    Line = pricing.Line
    receipt = pricing.Receipt("r-88123", 42, 3, sale, (
        Line(1, "sku-book", "books", 1, 120_000, 120_000),
        Line(2, "sku-milk", "groceries", 3, 50_000, 150_000),
        Line(3, "sku-cig", "tobacco", 1, 30_000, 30_000),
        Line(4, "sku-promo", "groceries", 2, 25_000, 50_000, ("promo",)),
    ))
    member = pricing.Member(available=400, tier="silver", regular=True)
    q = pricing.quote(p, receipt, member, sale + 3_600_000_000)
    spend = q.max_spend // 2
    response = _quote_response(q, p.currency, spend)

    wire = response.SerializeToString()
    assert checkout_pb2.QuoteResponse.FromString(wire) == response
    again = json_format.Parse(json_format.MessageToJson(response), checkout_pb2.QuoteResponse())
    assert again == response

    # The engine's figures survive, with every reason code typed.
    assert response.max_spend_points == q.max_spend > 0
    assert response.spend_bound == checkout_pb2.PRICING_REASON_CODE_CAP
    assert [line.line_number for line in response.lines] == [1, 2, 3, 4]
    why = checkout_pb2.PricingReasonCode.Name
    assert [why(r.code) for r in response.lines[0].reasons] == [
        "PRICING_REASON_CODE_CATEGORY_RATE"]
    assert not response.lines[2].payable_by_points
    assert "PRICING_REASON_CODE_EARNS_NOTHING" in {why(r.code) for r in response.lines[3].reasons}
    assert {why(r.code) for r in response.spend_limits} >= {
        "PRICING_REASON_CODE_CAP", "PRICING_REASON_CODE_BALANCE"}
    cap = next(r for r in response.spend_limits if r.code == checkout_pb2.PRICING_REASON_CODE_CAP)
    assert cap.WhichOneof("amount") == "points" and cap.points == q.max_spend
    assert response.discounts and response.discounts[0].WhichOneof("amount") == "money"
    assert response.total.minor_units == 350_000 and response.total.currency_code == "RUB"
    assert response.spend_preview.spend_points == spend
    assert sum(p.spent_points for p in response.spend_preview.lines) == spend
    assert response.spend_preview.paid.minor_units == q.due - spend * 100
    assert response.earn_activate_time.ToDatetime() > response.quote_time.ToDatetime()
