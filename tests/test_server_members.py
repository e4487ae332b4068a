"""Members and cards end to end: a real server on a loopback port."""

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.type.date_pb2 import Date

from kopilka.core.batch import Batch
from kopilka.core.records import NEVER
from kopilka.v1 import common_pb2
from kopilka.v1 import members_pb2 as pb
from kopilka.v1 import members_pb2_grpc

from server_harness import (DAY, EXAMPLE, START, RunningServer, error_info,
                            install_program, open_member)

P1 = "programs/1"
WELCOME = 100           # examples/programs/example.toml: bonuses.welcome
WELCOME_DAYS = 30       # ... and its lifetime.welcome expiry


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    server.stop()


@pytest.fixture
def admin(srv):
    return srv.stub(members_pb2_grpc.MembersStub, "admin")


def refused(call, request):
    """(code, reason, fields) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return error_info(err.value)


def apply(srv, batch):
    results = srv.call(srv.server.backend.apply(batch, None))
    assert all(r.code == 0 for r in results), list(results)
    return results


def enrol(admin, external_id, op=None, **fields):
    return admin.EnrolMember(pb.EnrolMemberRequest(
        operation_id=op or f"enrol/{external_id}", parent=P1, external_id=external_id,
        **fields))


# --- enrolment ----------------------------------------------------------------

def test_enrol_links_the_card_and_credits_the_welcome_bonus(srv, admin):
    out = enrol(admin, "crm-1", card_number="7001", birthday=Date(month=2, day=29))
    m = out.member
    assert m.name.startswith("programs/1/members/") and not out.replayed
    assert m.external_id == "crm-1" and m.state == common_pb2.MEMBER_STATE_ACTIVE
    assert (m.birthday.month, m.birthday.day, m.birthday.year) == (2, 29, 0)
    assert m.enrol_time.ToMicroseconds() == START and not m.HasField("erase_time")
    # never placed by a tier close: the lowest level
    assert m.tier == "base" and m.referrer == "" and m.merged_into == ""
    assert out.welcome_points == WELCOME
    assert m.balances.available_points == WELCOME  # spendable at once
    assert out.card == pb.Card(card_number="7001", member=m.name,
                               state=common_pb2.CARD_STATE_ACTIVE)
    full = admin.GetMember(pb.GetMemberRequest(name=m.name,
                                               view=pb.MEMBER_VIEW_FULL)).member
    [lot] = full.lots
    assert lot.remaining_points == WELCOME and lot.partner == ""
    assert lot.activate_time.ToMicroseconds() == START
    assert lot.expire_time.ToMicroseconds() == START + WELCOME_DAYS * DAY
    assert not full.holds
    basic = admin.GetMember(pb.GetMemberRequest(name=m.name)).member
    assert not basic.lots and basic.balances.available_points == WELCOME


def test_an_enrolment_retried_gets_the_first_answer(srv, admin):
    first = enrol(admin, "crm-1", card_number="7001")
    srv.clock.advance(DAY)
    again = enrol(admin, "crm-1", card_number="7001")
    assert again.replayed and again.member.name == first.member.name
    assert again.welcome_points == WELCOME and again.card == first.card
    assert again.member.balances.balance_points == WELCOME  # credited once
    assert again.member.enrol_time == first.member.enrol_time


def test_an_enrolment_id_reused_for_another_request_is_refused(srv, admin):
    enrol(admin, "crm-1", op="op-1", card_number="7001")
    for other in ({"external_id": "crm-2", "card_number": "7001"},
                  {"external_id": "crm-1", "card_number": "7002"},
                  {"external_id": "crm-1"}):
        assert refused(admin.EnrolMember, pb.EnrolMemberRequest(
            operation_id="op-1", parent=P1, **other))[:2] == (
                "ALREADY_EXISTS", "OPERATION_ID_REUSED")
    # an id used for another kind of operation is refused too
    member = enrol(admin, "crm-3").member.name
    admin.IssueCard(pb.IssueCardRequest(operation_id="card-op", parent=member,
                                        card_number="7100"))
    assert refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="card-op", parent=P1, external_id="crm-4"))[1] == \
        "OPERATION_ID_REUSED"


def test_racing_copies_of_an_enrolment_make_one_member(srv, admin):
    calls = [admin.EnrolMember.future(pb.EnrolMemberRequest(
        operation_id="race", parent=P1, external_id="crm-1", card_number="7001"))
        for _ in range(8)]
    answers = [call.result() for call in calls]
    assert len({a.member.name for a in answers}) == 1
    assert sum(not a.replayed for a in answers) == 1
    assert all(a.welcome_points == WELCOME for a in answers)
    assert answers[0].member.name == admin.GetMember(pb.GetMemberRequest(
        name=answers[0].member.name)).member.name
    assert srv.server.ledger.audit() == []


def test_enrolment_names_every_bad_field(srv, admin):
    code, reason, fields = refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="", parent="programs/x", external_id="",
        birthday=Date(month=2, day=30), referrer="members/1",
        card_number="9" * 129))
    assert code == "INVALID_ARGUMENT" and reason == "OPERATION_ID_INVALID"
    assert sorted(fields) == ["birthday", "card_number", "external_id",
                              "operation_id", "parent", "referrer"]
    code, reason, fields = refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="e1", parent=P1, external_id="crm-1",
        referrer="programs/2/members/1", birthday=Date(month=13, day=1)))
    assert (code, reason) == ("INVALID_ARGUMENT", "REQUEST_INVALID")
    assert sorted(fields) == ["birthday", "referrer"]
    assert srv.server.ledger.operation(b"e1") is None


def test_enrolment_conflicts_and_missing_resources(srv, admin):
    first = enrol(admin, "crm-1", card_number="7001").member
    assert refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="again", parent=P1, external_id="crm-1"))[:2] == (
            "ALREADY_EXISTS", "MEMBER_ALREADY_EXISTS")
    # a card already issued is refused before anything is written
    assert refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="e2", parent=P1, external_id="crm-2", card_number="7001"))[:2] \
        == ("ALREADY_EXISTS", "CARD_ALREADY_EXISTS")
    assert refused(admin.LookupMember, pb.LookupMemberRequest(
        parent=P1, external_id="crm-2"))[1] == "MEMBER_NOT_FOUND"
    assert refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="e3", parent="programs/9", external_id="crm-3"))[:2] == (
            "NOT_FOUND", "PROGRAM_NOT_FOUND")
    assert refused(admin.EnrolMember, pb.EnrolMemberRequest(
        operation_id="e4", parent=P1, external_id="crm-4",
        referrer="programs/1/members/999"))[:2] == ("NOT_FOUND", "MEMBER_NOT_FOUND")
    referred = enrol(admin, "crm-5", referrer=first.name).member
    assert referred.referrer == first.name


# --- reading ------------------------------------------------------------------

def test_roles(srv, admin):
    member = enrol(admin, "crm-1", card_number="7001").member
    pos = srv.stub(members_pb2_grpc.MembersStub, "pos")  # a till of store 42
    assert refused(pos.EnrolMember, pb.EnrolMemberRequest(
        operation_id="p1", parent=P1, external_id="crm-2"))[:2] == (
            "PERMISSION_DENIED", "ROLE_NOT_PERMITTED")
    assert refused(pos.BlockCard, pb.BlockCardRequest(
        operation_id="p2", parent=P1, card_number="7001"))[1] == "ROLE_NOT_PERMITTED"
    # members are not store-scoped: any till may look them up
    assert pos.GetMember(pb.GetMemberRequest(name=member.name)).member.name == \
        member.name
    assert pos.LookupMember(pb.LookupMemberRequest(
        parent=P1, external_id="crm-1")).member.name == member.name
    assert pos.ResolveCard(pb.ResolveCardRequest(
        parent=P1, card_number="7001")).member.name == member.name
    feed = srv.stub(members_pb2_grpc.MembersStub, "integration")
    assert refused(feed.GetMember, pb.GetMemberRequest(name=member.name))[1] == \
        "ROLE_NOT_PERMITTED"
    nobody = srv.stub(members_pb2_grpc.MembersStub, None)
    assert refused(nobody.GetMember, pb.GetMemberRequest(name=member.name))[:2] == (
        "UNAUTHENTICATED", "CREDENTIALS_INVALID")


def test_look_ups_that_find_nothing(srv, admin):
    member = enrol(admin, "crm-1").member
    account = member.name.rsplit("/", 1)[1]
    assert refused(admin.GetMember, pb.GetMemberRequest(
        name="programs/1/members/999"))[:2] == ("NOT_FOUND", "MEMBER_NOT_FOUND")
    assert refused(admin.GetMember, pb.GetMemberRequest(
        name=f"programs/2/members/{account}"))[1] == "MEMBER_NOT_FOUND"
    assert refused(admin.GetMember, pb.GetMemberRequest(name="members/1", view=7))[2] \
        == ["name", "view"]
    assert refused(admin.LookupMember, pb.LookupMemberRequest(
        parent=P1, external_id="nobody"))[:2] == ("NOT_FOUND", "MEMBER_NOT_FOUND")
    assert refused(admin.LookupMember, pb.LookupMemberRequest(
        parent="programs/7", external_id="crm-1"))[1] == "PROGRAM_NOT_FOUND"
    assert refused(admin.LookupMember, pb.LookupMemberRequest(parent=P1))[:3] == (
        "INVALID_ARGUMENT", "IDENTIFIER_INVALID", ["external_id"])
    assert refused(admin.ResolveCard, pb.ResolveCardRequest(
        parent=P1, card_number="0000"))[:2] == ("NOT_FOUND", "CARD_NOT_FOUND")


def test_get_member_shows_open_holds_and_live_lots_only(srv, admin):
    account = open_member(srv, 1, "crm-1", points=500)
    apply(srv, Batch().hold("h1", account, 120, expires_at=START + 900_000_000)
          .earn("old", account, 7, activates_at=0, expires_at=START + DAY))
    name = f"programs/1/members/{account}"
    full = admin.GetMember(pb.GetMemberRequest(name=name,
                                               view=pb.MEMBER_VIEW_FULL)).member
    assert [h.points for h in full.holds] == [120]
    assert [lot.remaining_points for lot in full.lots] == [7, 500]  # earliest first
    assert not full.lots[1].HasField("expire_time")  # never expires
    assert full.balances.held_points == 120
    assert full.balances.available_points == 507 - 120
    srv.clock.advance(DAY)  # the hold timed out and the small lot expired
    full = admin.GetMember(pb.GetMemberRequest(name=name,
                                               view=pb.MEMBER_VIEW_FULL)).member
    assert not full.holds and [lot.remaining_points for lot in full.lots] == [500]


# --- the profile --------------------------------------------------------------

def update(admin, op, name, paths, **fields):
    return admin.UpdateMember(pb.UpdateMemberRequest(
        operation_id=op, member=pb.Member(name=name, **fields),
        update_mask=FieldMask(paths=paths)))


def test_update_member_honours_the_mask(srv, admin):
    name = enrol(admin, "crm-1", birthday=Date(month=5, day=1)).member.name
    other = enrol(admin, "crm-2").member.name
    out = update(admin, "u1", name, ["state"], state=common_pb2.MEMBER_STATE_BLOCKED,
                 birthday=Date(month=6, day=2), external_id="ignored")
    m = out.member
    assert m.state == common_pb2.MEMBER_STATE_BLOCKED and not out.replayed
    assert (m.birthday.month, m.birthday.day) == (5, 1)  # not in the mask
    assert m.external_id == "crm-1"
    m = update(admin, "u2", name, ["birthday", "referrer"],
               birthday=Date(month=12, day=31), referrer=other).member
    assert (m.birthday.month, m.birthday.day) == (12, 31) and m.referrer == other
    assert m.state == common_pb2.MEMBER_STATE_BLOCKED
    # a birthday in the mask but not in the member clears it
    m = update(admin, "u3", name, ["birthday", "state"],
               state=common_pb2.MEMBER_STATE_ACTIVE).member
    assert not m.HasField("birthday") and m.state == common_pb2.MEMBER_STATE_ACTIVE
    # retries get the first answer; another request under an id is refused
    again = update(admin, "u3", name, ["birthday", "state"],
                   state=common_pb2.MEMBER_STATE_ACTIVE)
    assert again.replayed and again.member.state == common_pb2.MEMBER_STATE_ACTIVE
    assert refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="u3", member=pb.Member(name=name, birthday=Date(month=1, day=1)),
        update_mask=FieldMask(paths=["birthday"])))[1] == "OPERATION_ID_REUSED"
    assert update(admin, "u1", name, ["state"], state=common_pb2.MEMBER_STATE_BLOCKED,
                  birthday=Date(month=6, day=2), external_id="ignored").replayed
    assert refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="enrol/crm-1", member=pb.Member(name=name),
        update_mask=FieldMask(paths=["birthday"])))[1] == "OPERATION_ID_REUSED"


def test_concurrent_profile_writes_lose_nothing(srv, admin):
    name = enrol(admin, "crm-1").member.name
    referrers = [enrol(admin, f"crm-r{i}").member.name for i in range(4)]
    calls = []
    for i in range(4):
        calls.append(admin.UpdateMember.future(pb.UpdateMemberRequest(
            operation_id=f"b{i}", member=pb.Member(name=name,
                                                   birthday=Date(month=i + 1, day=1)),
            update_mask=FieldMask(paths=["birthday"]))))
        calls.append(admin.UpdateMember.future(pb.UpdateMemberRequest(
            operation_id=f"r{i}", member=pb.Member(name=name, referrer=referrers[i]),
            update_mask=FieldMask(paths=["referrer"]))))
    for call in calls:
        call.result()
    m = admin.GetMember(pb.GetMemberRequest(name=name)).member
    assert m.HasField("birthday") and m.referrer in referrers


def test_update_member_names_every_bad_field(srv, admin):
    name = enrol(admin, "crm-1").member.name
    code, _, fields = refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="u1", member=pb.Member(name=name, state=9, referrer=name,
                                            birthday=Date(month=4, day=31)),
        update_mask=FieldMask(paths=["state", "tier", "birthday", "referrer"])))
    assert code == "INVALID_ARGUMENT"
    assert fields == ["update_mask.paths[1]", "member.state", "member.birthday",
                      "member.referrer"]
    assert refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="u1", member=pb.Member(name="x")))[2] == ["member.name",
                                                                "update_mask"]
    assert refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="u1", member=pb.Member(name="programs/1/members/999"),
        update_mask=FieldMask(paths=["birthday"])))[:2] == (
            "NOT_FOUND", "MEMBER_NOT_FOUND")


def test_a_referrer_only_before_the_first_receipt(srv, admin):
    name = enrol(admin, "crm-1").member.name
    other = enrol(admin, "crm-2").member.name
    account = int(name.rsplit("/", 1)[1])
    apply(srv, Batch().award("action-1", account, 30, counter="action/review"))
    update(admin, "u0", name, ["referrer"], referrer=other)  # a bonus is no receipt
    apply(srv, Batch().earn("receipt-1", account, 50, money=5_000, expires_at=NEVER))
    assert refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="u1", member=pb.Member(name=name, referrer=other),
        update_mask=FieldMask(paths=["referrer"])))[2] == ["member.referrer"]


def test_closed_members_stay_closed(srv, admin):
    name = enrol(admin, "crm-1").member.name
    closed = update(admin, "u1", name, ["state"],
                    state=common_pb2.MEMBER_STATE_CLOSED).member
    assert closed.state == common_pb2.MEMBER_STATE_CLOSED
    assert refused(admin.UpdateMember, pb.UpdateMemberRequest(
        operation_id="u2", member=pb.Member(name=name,
                                            state=common_pb2.MEMBER_STATE_ACTIVE),
        update_mask=FieldMask(paths=["state"])))[:2] == (
            "FAILED_PRECONDITION", "MEMBER_CLOSED")


def test_erase_keeps_the_ledger_and_forgets_the_person(srv, admin):
    member = enrol(admin, "crm-1", card_number="7001",
                   birthday=Date(month=3, day=8)).member
    admin.IssueCard(pb.IssueCardRequest(operation_id="c2", parent=member.name,
                                        card_number="7002"))
    admin.BlockCard(pb.BlockCardRequest(operation_id="b2", parent=P1,
                                        card_number="7002"))
    srv.clock.advance(DAY)
    out = admin.EraseMember(pb.EraseMemberRequest(operation_id="x1", name=member.name,
                                                  block_cards=True))
    m = out.member
    assert out.blocked_cards == 1 and not out.replayed  # 7002 was blocked already
    assert m.external_id == "" and not m.HasField("birthday") and m.referrer == ""
    assert m.erase_time.ToMicroseconds() == START + DAY
    assert m.balances.balance_points == WELCOME  # the ledger's side stays
    assert m.enrol_time == member.enrol_time
    assert refused(admin.LookupMember, pb.LookupMemberRequest(
        parent=P1, external_id="crm-1"))[:2] == ("NOT_FOUND", "MEMBER_NOT_FOUND")
    card = admin.ResolveCard(pb.ResolveCardRequest(parent=P1, card_number="7001")).card
    assert card.state == common_pb2.CARD_STATE_BLOCKED
    again = admin.EraseMember(pb.EraseMemberRequest(operation_id="x1",
                                                    name=member.name, block_cards=True))
    assert again.replayed and again.blocked_cards == 1
    assert refused(admin.EraseMember, pb.EraseMemberRequest(
        operation_id="x1", name=member.name))[1] == "OPERATION_ID_REUSED"
    # the external id may be enrolled afresh: a new member
    assert enrol(admin, "crm-1", op="enrol-again").member.name != member.name
    assert srv.server.ledger.audit() == []


def test_erase_refusals(srv, admin):
    assert refused(admin.EraseMember, pb.EraseMemberRequest(
        operation_id="x1", name="programs/1/members/5"))[:2] == (
            "NOT_FOUND", "MEMBER_NOT_FOUND")
    assert refused(admin.EraseMember, pb.EraseMemberRequest(
        operation_id="", name="programs/1"))[2] == ["operation_id", "name"]


# --- cards --------------------------------------------------------------------

def test_cards_issue_resolve_block_replace(srv, admin):
    name = enrol(admin, "crm-1").member.name
    issued = admin.IssueCard(pb.IssueCardRequest(operation_id="c1", parent=name,
                                                 card_number="7001"))
    assert issued.card == pb.Card(card_number="7001", member=name,
                                  state=common_pb2.CARD_STATE_ACTIVE)
    assert admin.IssueCard(pb.IssueCardRequest(operation_id="c1", parent=name,
                                               card_number="7001")).replayed
    assert refused(admin.IssueCard, pb.IssueCardRequest(
        operation_id="c1", parent=name, card_number="7002"))[1] == \
        "OPERATION_ID_REUSED"
    assert refused(admin.IssueCard, pb.IssueCardRequest(
        operation_id="c2", parent=name, card_number="7001"))[:2] == (
            "ALREADY_EXISTS", "CARD_ALREADY_EXISTS")
    resolved = admin.ResolveCard(pb.ResolveCardRequest(
        parent=P1, card_number="7001", view=pb.MEMBER_VIEW_FULL))
    assert resolved.member.name == name and len(resolved.member.lots) == 1
    blocked = admin.BlockCard(pb.BlockCardRequest(operation_id="b1", parent=P1,
                                                  card_number="7001"))
    assert blocked.card.state == common_pb2.CARD_STATE_BLOCKED
    assert admin.BlockCard(pb.BlockCardRequest(operation_id="b1", parent=P1,
                                               card_number="7001")).replayed
    assert refused(admin.BlockCard, pb.BlockCardRequest(
        operation_id="b2", parent=P1, card_number="7001"))[:2] == (
            "FAILED_PRECONDITION", "CARD_BLOCKED")
    replaced = admin.ReplaceCard(pb.ReplaceCardRequest(
        operation_id="r1", parent=P1, card_number="7001", new_card_number="7009"))
    assert replaced.old_card.state == common_pb2.CARD_STATE_REPLACED
    assert replaced.new_card == pb.Card(card_number="7009", member=name,
                                        state=common_pb2.CARD_STATE_ACTIVE)
    again = admin.ReplaceCard(pb.ReplaceCardRequest(
        operation_id="r1", parent=P1, card_number="7001", new_card_number="7009"))
    assert again.replayed and again.new_card == replaced.new_card
    # a replaced card still resolves, with its state, so a till can say why
    old = admin.ResolveCard(pb.ResolveCardRequest(parent=P1, card_number="7001"))
    assert old.card.state == common_pb2.CARD_STATE_REPLACED and old.member.name == name


def test_card_refusals_name_fields(srv, admin):
    name = enrol(admin, "crm-1", card_number="7001").member.name
    assert refused(admin.IssueCard, pb.IssueCardRequest(
        operation_id="c1", parent="programs/1/members/77", card_number="7002"))[:2] \
        == ("NOT_FOUND", "MEMBER_NOT_FOUND")
    assert refused(admin.IssueCard, pb.IssueCardRequest(
        operation_id="c1", parent="programs/1", card_number=""))[2] == [
            "parent", "card_number"]
    assert refused(admin.BlockCard, pb.BlockCardRequest(
        operation_id="b1", parent=P1, card_number="0404"))[:2] == (
            "NOT_FOUND", "CARD_NOT_FOUND")
    assert refused(admin.BlockCard, pb.BlockCardRequest(
        operation_id="b1", parent="programs/2", card_number="7001"))[1] == \
        "CARD_NOT_FOUND"  # a card of another program
    assert refused(admin.ReplaceCard, pb.ReplaceCardRequest(
        operation_id="r1", parent=P1, card_number="7001",
        new_card_number="7001"))[2] == ["new_card_number"]
    assert refused(admin.ReplaceCard, pb.ReplaceCardRequest(
        operation_id="", parent=P1, card_number="", new_card_number=""))[2] == [
            "operation_id", "card_number", "new_card_number"]
    enrol(admin, "crm-2", card_number="7002")
    assert refused(admin.ReplaceCard, pb.ReplaceCardRequest(
        operation_id="r2", parent=P1, card_number="7001",
        new_card_number="7002"))[:2] == ("ALREADY_EXISTS", "CARD_ALREADY_EXISTS")
    assert admin.ResolveCard(pb.ResolveCardRequest(
        parent=P1, card_number="7001")).card.state == common_pb2.CARD_STATE_ACTIVE
    assert name


# --- merging ------------------------------------------------------------------

def test_merge_moves_every_lot_with_its_expiry(srv, admin):
    target = enrol(admin, "crm-1", card_number="7001").member.name
    source = enrol(admin, "crm-2", card_number="7002").member.name
    src = int(source.rsplit("/", 1)[1])
    apply(srv, Batch().earn("p1", src, 40, activates_at=START + 14 * DAY,
                            expires_at=START + 400 * DAY, partner=1))
    before = admin.GetMember(pb.GetMemberRequest(name=source,
                                                 view=pb.MEMBER_VIEW_FULL)).member
    lots = sorted((lot.remaining_points, lot.partner, lot.activate_time.ToMicroseconds(),
                   lot.expire_time.ToMicroseconds()) for lot in before.lots)
    out = admin.MergeMembers(pb.MergeMembersRequest(operation_id="m1", name=target,
                                                    source=source))
    assert out.moved_points == WELCOME + 40 and not out.replayed
    assert out.source.state == common_pb2.MEMBER_STATE_CLOSED
    assert out.source.merged_into == target
    assert out.source.balances.balance_points == 0
    assert out.member.balances.available_points == 2 * WELCOME
    assert out.member.balances.pending_points == 40
    after = admin.GetMember(pb.GetMemberRequest(name=target,
                                                view=pb.MEMBER_VIEW_FULL)).member
    moved = sorted((lot.remaining_points, lot.partner, lot.activate_time.ToMicroseconds(),
                    lot.expire_time.ToMicroseconds()) for lot in after.lots)
    assert moved == sorted(lots + [(WELCOME, "", START, START + WELCOME_DAYS * DAY)])
    # the merged member's card resolves to the survivor
    resolved = admin.ResolveCard(pb.ResolveCardRequest(parent=P1, card_number="7002"))
    assert resolved.card.member == source and resolved.member.name == target
    again = admin.MergeMembers(pb.MergeMembersRequest(operation_id="m1", name=target,
                                                      source=source))
    assert again.replayed and again.moved_points == out.moved_points
    assert refused(admin.MergeMembers, pb.MergeMembersRequest(
        operation_id="m2", name=target, source=source))[:2] == (
            "FAILED_PRECONDITION", "MEMBER_CLOSED")
    assert srv.server.ledger.audit() == []


def test_merge_refusals(srv, admin, tmp_path):
    a = enrol(admin, "crm-1").member.name
    b = enrol(admin, "crm-2").member.name
    acct_b = int(b.rsplit("/", 1)[1])
    assert refused(admin.MergeMembers, pb.MergeMembersRequest(
        operation_id="m", name=a, source=a))[:3] == (
            "INVALID_ARGUMENT", "SAME_MEMBER", ["source"])
    assert refused(admin.MergeMembers, pb.MergeMembersRequest(
        operation_id="m", name="x", source=""))[2] == ["name", "source"]
    assert refused(admin.MergeMembers, pb.MergeMembersRequest(
        operation_id="m", name=a, source="programs/1/members/999"))[:2] == (
            "NOT_FOUND", "MEMBER_NOT_FOUND")
    apply(srv, Batch().hold("h1", acct_b, 10, expires_at=START + DAY))
    assert refused(admin.MergeMembers, pb.MergeMembersRequest(
        operation_id="m", name=a, source=b))[:2] == (
            "FAILED_PRECONDITION", "MEMBER_HAS_OPEN_HOLDS")
    # a member of another program
    other = tmp_path / "two.toml"
    with open(EXAMPLE) as f:
        other.write_text(f.read().replace("\nid = 1 ", "\nid = 2 ", 1))
    install_program(srv, other)
    c = admin.EnrolMember(pb.EnrolMemberRequest(
        operation_id="e-c", parent="programs/2", external_id="crm-1")).member.name
    assert refused(admin.MergeMembers, pb.MergeMembersRequest(
        operation_id="m", name=a, source=c))[:2] == (
            "FAILED_PRECONDITION", "PROGRAM_MISMATCH")
    assert srv.server.ledger.operation(b"m") is None


def test_merge_refuses_a_member_in_debt(tmp_path):
    srv = RunningServer(tmp_path / "data")
    try:
        path = tmp_path / "debt.toml"
        with open(EXAMPLE) as f:
            path.write_text(f.read().replace("allow_debt = false", "allow_debt = true"))
        install_program(srv, path)
        admin = srv.stub(members_pb2_grpc.MembersStub, "admin")
        a = enrol(admin, "crm-1").member.name
        b = enrol(admin, "crm-2").member.name
        acct_b = int(b.rsplit("/", 1)[1])
        apply(srv, Batch().earn("e1", acct_b, 50, expires_at=NEVER))
        apply(srv, Batch().spend("s1", acct_b, 150))
        apply(srv, Batch().refund("r1", "e1", claw_back=50))
        assert srv.server.ledger.account(acct_b).debt == 50
        assert refused(admin.MergeMembers, pb.MergeMembersRequest(
            operation_id="m", name=a, source=b))[:2] == (
                "FAILED_PRECONDITION", "MEMBER_IN_DEBT")
    finally:
        srv.stop()
