"""Programs end to end: definitions in, parsed programs out, through a real server."""

import json

import grpc
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from kopilka.core.program import load_program
from kopilka.v1 import common_pb2, members_pb2, members_pb2_grpc
from kopilka.v1 import programs_pb2 as pb
from kopilka.v1 import programs_pb2_grpc

from server_harness import DAY, EXAMPLE, RunningServer, error_info

with open(EXAMPLE) as _f:
    TEXT = _f.read()

# A fourth version, a month after the harness clock's start (2026-01-01).
VERSION_4 = """
[[version]]
number = 4
effective_from = 2026-02-01T00:00:00+03:00
note = "Spring: welcome bonus doubled"

[version.bonuses]
welcome = 200
birthday = 200
"""


def with_id(program_id, text=TEXT):
    return text.replace("\nid = 1 ", f"\nid = {program_id} ", 1)


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    yield server
    server.stop()


@pytest.fixture
def admin(srv):
    return srv.stub(programs_pb2_grpc.ProgramsStub, "admin")


def refused(call, request):
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return error_info(err.value)


def metadata(call, request):
    """The ErrorInfo metadata of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    for detail in rpc_status.from_call(err.value).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


def create(admin, op="create/1", text=TEXT, **fields):
    return admin.CreateProgram(pb.CreateProgramRequest(
        operation_id=op, definition=pb.ProgramDefinition(toml=text), **fields))


def update(admin, op, text, name="programs/1", **fields):
    return admin.UpdateProgram(pb.UpdateProgramRequest(
        operation_id=op, name=name, definition=pb.ProgramDefinition(toml=text),
        **fields))


def test_create_then_get(srv, admin):
    out = create(admin)
    p = out.program
    assert not out.replayed
    assert (p.name, p.display_name, p.currency_code, p.time_zone, p.allow_debt) == (
        "programs/1", "Kopilka demo chain", "RUB", "Europe/Moscow", False)
    assert [x.name for x in p.partners] == ["programs/1/partners/1",
                                            "programs/1/partners/2"]
    store = p.stores[0]
    assert (store.name, store.display_name, store.partner, list(store.lanes)) == (
        "stores/42", "Tverskaya 7", "programs/1/partners/1", [1, 2, 3])
    assert [v.name for v in p.versions] == [f"programs/1/versions/{n}"
                                            for n in (1, 2, 3)]
    assert p.current_version == "programs/1/versions/3"
    assert p.definition.toml == TEXT
    assert p.create_time.ToMicroseconds() == srv.clock.now == \
        p.update_time.ToMicroseconds()
    # the registry prices by it at once
    assert srv.server.registry.get(1).program == load_program(TEXT)

    basic = admin.GetProgram(pb.GetProgramRequest(name="programs/1")).program
    v1 = basic.versions[0]
    assert v1.number == 1 and v1.note.startswith("Launch")
    assert v1.effective_time.ToJsonString() == "2023-12-31T21:00:00Z"
    assert not v1.HasField("earn") and not basic.HasField("definition")
    full = admin.GetProgram(pb.GetProgramRequest(name="programs/1",
                                                 view=pb.PROGRAM_VIEW_FULL)).program
    assert full == p


def test_the_full_view_mirrors_every_rule(srv, admin):
    p = create(admin).program
    v1, v2, v3 = p.versions
    assert v1.point_value == common_pb2.Money(currency_code="RUB", minor_units=100)
    assert v1.earn.rate.points_per.points == 1
    assert v1.earn.rate.points_per.per.minor_units == 2_000
    assert v1.earn.rounding == pb.ROUNDING_DOWN
    assert v1.earn.rounding_scope == pb.ROUNDING_SCOPE_RECEIPT
    assert [(c.category, c.rate.points_per.points) for c in v1.earn.categories] == [
        ("books", 10)]
    assert v1.spend.cap_bp == 1_000 and list(v1.spend.exclude_categories) == [
        "tobacco", "gift_cards"]
    assert v1.lifetime.activation_days == 14
    assert v1.lifetime.expiry.end_of_period == pb.PeriodEnd(
        period=pb.PERIOD_YEAR, periods_later=1)
    welcome = {o.kind: o for o in v1.lifetime.overrides}[pb.BONUS_KIND_WELCOME]
    assert welcome.HasField("activation_days") and welcome.activation_days == 0
    assert welcome.expiry.days == 30
    action = {o.kind: o for o in v1.lifetime.overrides}[pb.BONUS_KIND_ACTION]
    assert not action.HasField("expiry")
    assert v1.tiers.period == pb.PERIOD_MONTH
    assert [(t.name, t.min_spend.minor_units, t.discount_bp) for t in v1.tiers.levels] \
        == [("base", 0, 0), ("silver", 1_000_000, 0), ("gold", 3_000_000, 300)]
    assert not v1.tiers.levels[0].HasField("rate")
    assert v1.bonuses.welcome_points == 100 and v1.bonuses.birthday_points == 200
    review = {a.name: a for a in v1.bonuses.actions}["review"]
    assert (review.points, review.limit, review.limit_period) == (30, 1, pb.PERIOD_DAY)
    install = {a.name: a for a in v1.bonuses.actions}["app_install"]
    assert install.limit_period == pb.PERIOD_UNSPECIFIED
    assert v1.bonuses.visits.count == 5 and v1.bonuses.visits.min_receipt.minor_units \
        == 50_000
    assert v1.referral.referrer_share_bp == 1_000 and v1.referral.window_days == 30
    assert v1.coupon.valid_months == 3 and v1.coupon.WhichOneof("validity") == \
        "valid_months"
    assert v1.regular_customer == pb.RegularCustomer(min_visits=4, within_days=90)
    offers = {o.name: o for o in v1.discounts.offers}
    assert offers["regular"].percent_bp == 200 and offers["regular"].additive
    assert offers["big_basket"].money.minor_units == 50_000
    assert list(offers["big_basket"].tiers) == ["silver", "gold"]
    assert v2.earn.rate.percent_bp == 500 and v2.spend.cap_bp == 3_000
    assert v2.tiers == v1.tiers  # carried over: each version in full
    assert not v3.HasField("referral") and v3.spend.cap_bp == 10_000


def test_create_is_idempotent_and_once_only(srv, admin):
    first = create(admin, op="c1")
    again = create(admin, op="c1")
    assert again.replayed and again.program == first.program
    assert refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="c1", definition=pb.ProgramDefinition(toml=with_id(2))))[:2] == (
            "ALREADY_EXISTS", "OPERATION_ID_REUSED")
    assert refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="c2", definition=pb.ProgramDefinition(toml=TEXT)))[:2] == (
            "ALREADY_EXISTS", "PROGRAM_ALREADY_EXISTS")


def test_update_appends_a_version(srv, admin):
    create(admin)
    out = update(admin, "u1", TEXT + VERSION_4)
    assert list(out.added_versions) == ["programs/1/versions/4"] and not out.replayed
    assert len(out.program.versions) == 4
    assert out.program.current_version == "programs/1/versions/3"
    assert out.program.versions[3].bonuses.welcome_points == 200
    again = update(admin, "u1", TEXT + VERSION_4)
    assert again.replayed and list(again.added_versions) == ["programs/1/versions/4"]
    assert refused(admin.UpdateProgram, pb.UpdateProgramRequest(
        operation_id="u1", name="programs/1",
        definition=pb.ProgramDefinition(toml=TEXT)))[1] == "OPERATION_ID_REUSED"
    # applying the same definition again adds nothing, and is allowed
    assert list(update(admin, "u2", TEXT + VERSION_4).added_versions) == []
    srv.clock.advance(31 * DAY)
    got = admin.GetProgram(pb.GetProgramRequest(name="programs/1")).program
    assert got.current_version == "programs/1/versions/4"
    assert got.update_time.ToMicroseconds() < srv.clock.now
    # members enrolled now get the new version's welcome bonus
    members = srv.stub(members_pb2_grpc.MembersStub, "admin")
    assert members.EnrolMember(members_pb2.EnrolMemberRequest(
        operation_id="e1", parent="programs/1", external_id="crm-1")).welcome_points \
        == 200


def test_update_may_not_change_what_is_fixed(srv, admin):
    create(admin)
    changed = TEXT.replace("cap_bp = 3_000 ", "cap_bp = 2_500 ")
    assert changed != TEXT
    request = pb.UpdateProgramRequest(operation_id="u", name="programs/1",
                                      definition=pb.ProgramDefinition(toml=changed))
    assert refused(admin.UpdateProgram, request)[:2] == (
        "FAILED_PRECONDITION", "PROGRAM_CHANGE_NOT_ALLOWED")
    assert metadata(admin.UpdateProgram, request) == {"version": "2"}
    past = VERSION_4.replace("2026-02-01", "2025-12-01")
    assert metadata(admin.UpdateProgram, pb.UpdateProgramRequest(
        operation_id="u", name="programs/1",
        definition=pb.ProgramDefinition(toml=TEXT + past))) == {"version": "4"}
    dropped = TEXT[:TEXT.index("# Version 3")].rstrip("# =\n") + "\n"
    assert refused(admin.UpdateProgram, pb.UpdateProgramRequest(
        operation_id="u", name="programs/1",
        definition=pb.ProgramDefinition(toml=dropped)))[1] == \
        "PROGRAM_CHANGE_NOT_ALLOWED"
    for old, new in (('currency = "RUB"', 'currency = "EUR"'),
                     ('time_zone = "Europe/Moscow"     #',
                      'time_zone = "Europe/Berlin"     #')):
        assert refused(admin.UpdateProgram, pb.UpdateProgramRequest(
            operation_id="u", name="programs/1",
            definition=pb.ProgramDefinition(toml=TEXT.replace(old, new, 1))))[1] == \
            "PROGRAM_CHANGE_NOT_ALLOWED"
    assert refused(admin.UpdateProgram, pb.UpdateProgramRequest(
        operation_id="u", name="programs/2",
        definition=pb.ProgramDefinition(toml=TEXT)))[1] == "PROGRAM_CHANGE_NOT_ALLOWED"
    assert refused(admin.UpdateProgram, pb.UpdateProgramRequest(
        operation_id="u", name="programs/2",
        definition=pb.ProgramDefinition(toml=with_id(2))))[:2] == (
            "NOT_FOUND", "PROGRAM_NOT_FOUND")
    assert srv.server.ledger.operation(b"u") is None
    assert len(srv.server.registry.get(1).program.versions) == 3


def test_a_bad_definition_lists_every_problem_from_0(srv, admin):
    bad = (TEXT.replace("lanes = [1, 2, 3]", "lanes = [1, 2, 2]")
               .replace("percent_bp = 500                #", "percent_bp = 50_000 #")
               .replace("per = 2_000                     #", "per = 0 #"))
    code, reason, fields = refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="c", definition=pb.ProgramDefinition(toml=bad)))
    assert (code, reason) == ("INVALID_ARGUMENT", "PROGRAM_DEFINITION_INVALID")
    assert fields == ["definition.store[0].lanes[2]", "definition.version[0].earn.per",
                      "definition.version[1].earn.percent_bp"]
    assert refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="c", definition=pb.ProgramDefinition(toml="[program\n")))[2] == [
            "definition.toml"]
    assert refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="c", definition=pb.ProgramDefinition(json="{")))[2] == [
            "definition.json"]
    assert refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="", definition=pb.ProgramDefinition()))[2] == [
            "operation_id", "definition"]
    huge = TEXT + "#" * (1 << 20)
    assert refused(admin.CreateProgram, pb.CreateProgramRequest(
        operation_id="c", definition=pb.ProgramDefinition(toml=huge)))[2] == [
            "definition.toml"]
    assert srv.server.registry.ids() == []


def test_json_definitions_and_validate_only(srv, admin):
    mapping = load_program(TEXT).to_dict()
    text = json.dumps(mapping)
    checked = admin.CreateProgram(pb.CreateProgramRequest(
        operation_id="c", definition=pb.ProgramDefinition(json=text),
        validate_only=True))
    assert checked.program.definition.json == text and len(checked.program.versions) == 3
    assert refused(admin.GetProgram, pb.GetProgramRequest(name="programs/1"))[:2] == (
        "NOT_FOUND", "PROGRAM_NOT_FOUND")
    assert srv.server.ledger.operation(b"c") is None
    created = admin.CreateProgram(pb.CreateProgramRequest(
        operation_id="c", definition=pb.ProgramDefinition(json=text))).program
    assert created.versions == checked.program.versions
    assert srv.server.registry.get(1).source == "json"
    mapping["version"].append({"number": 4, "effective_from": "2026-03-01T00:00:00Z",
                               "bonuses": {"welcome": 5}})
    out = admin.UpdateProgram(pb.UpdateProgramRequest(
        operation_id="u", name="programs/1", validate_only=True,
        definition=pb.ProgramDefinition(json=json.dumps(mapping))))
    assert list(out.added_versions) == ["programs/1/versions/4"]
    assert len(admin.GetProgram(pb.GetProgramRequest(name="programs/1"))
               .program.versions) == 3


def test_list_pages_through_programs(srv, admin):
    for program_id in (3, 1, 2):
        create(admin, op=f"c{program_id}", text=with_id(program_id))
    first = admin.ListPrograms(pb.ListProgramsRequest(page_size=2))
    assert [p.name for p in first.programs] == ["programs/1", "programs/2"]
    assert not first.programs[0].versions[0].HasField("earn")
    rest = admin.ListPrograms(pb.ListProgramsRequest(
        page_size=2, page_token=first.next_page_token, view=pb.PROGRAM_VIEW_FULL))
    assert [p.name for p in rest.programs] == ["programs/3"]
    assert rest.next_page_token == "" and rest.programs[0].HasField("definition")
    everything = admin.ListPrograms(pb.ListProgramsRequest())
    assert len(everything.programs) == 3 and everything.next_page_token == ""
    assert refused(admin.ListPrograms, pb.ListProgramsRequest(
        page_size=101, page_token="nonsense", view=9))[2] == [
            "page_size", "page_token", "view"]


def test_roles_and_lookups(srv, admin):
    create(admin)
    pos = srv.stub(programs_pb2_grpc.ProgramsStub, "pos")
    assert pos.GetProgram(pb.GetProgramRequest(name="programs/1")).program.name == \
        "programs/1"
    feed = srv.stub(programs_pb2_grpc.ProgramsStub, "integration")
    assert len(feed.ListPrograms(pb.ListProgramsRequest()).programs) == 1
    for stub in (pos, feed):
        assert refused(stub.CreateProgram, pb.CreateProgramRequest(
            operation_id="x", definition=pb.ProgramDefinition(toml=with_id(2))))[:2] \
            == ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED")
        assert refused(stub.UpdateProgram, pb.UpdateProgramRequest(
            operation_id="x", name="programs/1",
            definition=pb.ProgramDefinition(toml=TEXT)))[1] == "ROLE_NOT_PERMITTED"
    assert refused(admin.GetProgram, pb.GetProgramRequest(name="programs/0"))[:3] == (
        "INVALID_ARGUMENT", "REQUEST_INVALID", ["name"])


def test_programs_survive_a_restart(tmp_path):
    srv = RunningServer(tmp_path / "data")
    try:
        create(srv.stub(programs_pb2_grpc.ProgramsStub), text=TEXT)
        update(srv.stub(programs_pb2_grpc.ProgramsStub), "u1", TEXT + VERSION_4)
    finally:
        srv.stop()
    srv = RunningServer(tmp_path / "data")
    try:
        got = srv.stub(programs_pb2_grpc.ProgramsStub).GetProgram(pb.GetProgramRequest(
            name="programs/1", view=pb.PROGRAM_VIEW_FULL)).program
        assert got.definition.toml == TEXT + VERSION_4 and len(got.versions) == 4
    finally:
        srv.stop()
