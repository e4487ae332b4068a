"""Scheduled and counted bonuses end to end, on a real server with an
injected clock and the example program (Europe/Moscow, standard offset +3):
tier closes, birthday bonuses, action awards and visit bonuses."""

import dataclasses
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.type import date_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from kopilka.core.bonuses import visit_counter
from kopilka.core.lifetimes import lot_times
from kopilka.core.program import (Bonuses, Expiry, Lifetime, LifetimeOverride, VisitBonus,
                                  load_program)
from kopilka.core.records import Entry
from kopilka.servers.checkout_ops import visit_terms
from kopilka.servers.feed_events import journal_event
from kopilka.servers.scheduler import Scheduler
from kopilka.v1 import (checkout_pb2, checkout_pb2_grpc, common_pb2, members_pb2,
                        members_pb2_grpc)

from server_harness import RunningServer, error_info, install_program, open_member

MSK = timezone(timedelta(hours=3))
LANE = "stores/42/lanes/1"


def at(text):
    """Microseconds of a Moscow wall-clock time, e.g. "2026-01-15 12:00"."""
    moment = datetime.fromisoformat(text).replace(tzinfo=MSK)
    return int(moment.timestamp()) * 1_000_000


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    assert server.server.ledger.audit() == []
    server.stop()


def name(account):
    return f"programs/1/members/{account}"


def receipt(srv, kopecks, receipt_id="r"):
    out = checkout_pb2.Receipt(receipt_id=receipt_id)
    out.business_time.FromMicroseconds(srv.clock.now)
    money = common_pb2.Money(currency_code="RUB", minor_units=kopecks)
    out.lines.add(line_number=1, sku="sku1", category="groceries", quantity=1,
                  unit_price=money, total=money)
    return out


def capture(pos, srv, account, kopecks, op_id):
    return pos.Capture(checkout_pb2.CaptureRequest(
        operation_id=op_id, lane=LANE, member=name(account),
        receipt=receipt(srv, kopecks, op_id)))


def run_scheduler(srv, scheduler=None):
    return srv.call((scheduler or srv.server.scheduler).run_once())


def entries(srv, type_):
    return [e for e in srv.server.ledger.journal(limit=10**6) if e.type == type_]


# --- tiers ----------------------------------------------------------------------

def test_a_month_close_places_members_by_net_spend_and_quote_prices_by_the_tier(srv):
    pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    gold, silver, base, dropped, idle = (open_member(srv, 1, n) for n in "abcde")
    # January: `dropped` spends 40,000 rubles and is gold from February
    srv.clock.now = at("2026-01-10 12:00")
    capture(pos, srv, dropped, 4_000_000, "jan/d")
    srv.clock.now = at("2026-02-01 00:30")
    run_scheduler(srv)
    assert srv.server.ledger.account(dropped).tier == 3
    assert [srv.server.ledger.account(a).tier for a in (gold, silver, base, idle)] == [0] * 4
    # February: receipts and a refund; `dropped` and `idle` spend nothing
    srv.clock.now = at("2026-02-12 12:00")
    capture(pos, srv, gold, 2_000_000, "feb/a1")
    capture(pos, srv, gold, 1_500_000, "feb/a2")     # 35,000 rubles: gold
    capture(pos, srv, silver, 1_500_000, "feb/b1")   # refunded whole, then
    pos.Refund(checkout_pb2.RefundRequest(
        operation_id="feb/b1/refund", lane=LANE, original_operation_id="feb/b1",
        whole_receipt=True))
    capture(pos, srv, silver, 1_100_000, "feb/b2")   # 11,000: silver
    capture(pos, srv, base, 900_000, "feb/c1")
    srv.clock.now = at("2026-02-28 23:59")          # the month's last minute
    capture(pos, srv, base, 99_900, "feb/c2")       # 9,999: a ruble short of silver
    run_scheduler(srv)                              # nothing due yet
    assert len(entries(srv, Entry.TIER_SET)) == 1
    srv.clock.now = at("2026-03-01 00:00")
    run_scheduler(srv)
    tiers = {a: srv.server.ledger.account(a).tier
             for a in (gold, silver, base, dropped, idle)}
    assert tiers == {gold: 3, silver: 2, base: 1, dropped: 1, idle: 0}
    journaled = entries(srv, Entry.TIER_SET)
    assert [(e.credit, e.amount, e.amount2) for e in journaled[1:]] == [
        (gold, 3, 0), (silver, 2, 0), (base, 1, 0), (dropped, 1, 3)]
    assert [e.op_id for e in journaled[1:]] == [
        f"kopilka/tier/1/2026-03/{a}".encode() for a in (gold, silver, base, dropped)]
    # run again, and by a restarted server's scheduler: nothing changes
    run_scheduler(srv)
    assert srv.call(Scheduler(srv.server.backend, 0).close_tiers(
        srv.server.registry.get(1).program, srv.clock.now)) == 0
    assert len(entries(srv, Entry.TIER_SET)) == 5
    # the tier prices: gold earns 1 point per 10 rubles and takes 3% off;
    # February's big receipts also earned gold a 100-ruble coupon, usable now
    quote = pos.Quote(checkout_pb2.QuoteRequest(lane=LANE, member=name(gold),
                                                receipt=receipt(srv, 100_000)))
    assert quote.tier == "gold" and quote.discount.minor_units == 3_000
    assert quote.coupon_discount.minor_units == 10_000
    assert quote.earn_points == 87                  # on 1,000 - 30 - 100 rubles
    quote = pos.Quote(checkout_pb2.QuoteRequest(lane=LANE, member=name(silver),
                                                receipt=receipt(srv, 150_000)))
    assert quote.tier == "silver" and quote.coupon_discount.minor_units == 10_000
    assert quote.earn_points == 93                  # 1 per 15 rubles of 1,400
    quote = pos.Quote(checkout_pb2.QuoteRequest(lane=LANE, member=name(idle),
                                                receipt=receipt(srv, 150_000)))
    assert quote.tier == "base" and quote.earn_points == 150     # 10 per 100 rubles
    members = srv.stub(members_pb2_grpc.MembersStub)
    shown = members.GetMember(members_pb2.GetMemberRequest(name=name(dropped))).member
    assert shown.tier == "base"


# --- birthdays ------------------------------------------------------------------

def enrol(members, external_id, birthday=None):
    request = members_pb2.EnrolMemberRequest(operation_id=f"enrol/{external_id}",
                                             parent="programs/1", external_id=external_id)
    if birthday:
        request.birthday.CopyFrom(date_pb2.Date(month=birthday[0], day=birthday[1]))
    member = members.EnrolMember(request).member
    return int(member.name.rsplit("/", 1)[1])


def birthday_points(srv, account):
    return sum(e.amount for e in entries(srv, Entry.BONUS)
               if e.credit == account and e.data.startswith(b"birthday/"))


def test_birthday_bonus_on_the_day_once_29_february_and_a_catch_up(srv):
    members = srv.stub(members_pb2_grpc.MembersStub)
    leap = enrol(members, "leap", (2, 29))
    march = enrol(members, "march", (3, 5))
    moved = enrol(members, "moved", (3, 5))
    erased = enrol(members, "erased", (3, 5))
    nobody = enrol(members, "none")
    later = enrol(members, "later", (3, 6))
    update = members_pb2.UpdateMemberRequest(operation_id="move", update_mask={"paths": ["birthday"]})
    update.member.name = name(moved)
    update.member.birthday.CopyFrom(date_pb2.Date(month=7, day=1))
    members.UpdateMember(update)
    members.EraseMember(members_pb2.EraseMemberRequest(operation_id="erase",
                                                       name=name(erased)))
    srv.clock.now = at("2026-02-27 09:00")
    run_scheduler(srv)
    assert birthday_points(srv, leap) == 0
    srv.clock.now = at("2026-02-28 00:05")     # 2026 has no 29 February
    run_scheduler(srv)
    run_scheduler(srv)
    assert birthday_points(srv, leap) == 200
    b = members.GetMember(members_pb2.GetMemberRequest(name=name(leap))).member.balances
    assert b.available_points == 200           # welcome expired; spendable at once
    srv.clock.now = at("2026-03-05 08:00")
    run_scheduler(srv)
    assert [birthday_points(srv, a) for a in (leap, march, moved, erased, nobody)] == [
        200, 200, 0, 0, 0]
    # the server is down on 6 March; back on the 7th, it catches up
    srv.clock.now = at("2026-03-07 10:00")
    restarted = Scheduler(srv.server.backend, 0)
    run_scheduler(srv, restarted)
    run_scheduler(srv, restarted)
    assert [birthday_points(srv, a) for a in (leap, march, later)] == [200, 200, 200]
    bonus = [e for e in entries(srv, Entry.BONUS) if e.credit == later][0]
    assert bonus.op_id == f"kopilka/birthday/1/{later}/2026".encode()
    assert bonus.business_time == at("2026-03-06 00:00")
    event = journal_event(bonus, "RUB")
    assert event.bonus.counter == "birthday/2026" and event.bonus.count == 1
    assert event.bonus.points == 200 and event.member == name(later)
    earn = [e for e in entries(srv, Entry.EARN) if e.op_id == bonus.op_id]
    assert [e.amount for e in earn] == [200] and earn[0].ref == event.bonus.lot_number


# --- actions --------------------------------------------------------------------

def award(stub, account, action, op_id, **fields):
    return stub.AwardAction(members_pb2.AwardActionRequest(
        operation_id=op_id, name=name(account), action=action, **fields))


def test_action_limits_hold_under_concurrent_awards(srv):
    integration = srv.stub(members_pb2_grpc.MembersStub, "integration")
    account = open_member(srv, 1, "m1")
    outcomes, start = [], threading.Barrier(8)

    def one(i):
        start.wait()
        try:
            outcomes.append(award(integration, account, "app_install", f"install/{i}").points)
        except grpc.RpcError as err:
            outcomes.append(error_info(err)[:2])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(50) == 1
    assert outcomes.count(("FAILED_PRECONDITION", "ACTION_LIMIT_REACHED")) == 7
    assert srv.server.ledger.counter(account, b"action/app_install") == (1, 1)
    # one review a day; a retry is the first answer
    first = award(integration, account, "review", "review/1")
    assert (first.points, first.count, first.limit) == (30, 1, 1)
    assert first.program_version == "programs/1/versions/3"
    assert first.balances.available_points == 80   # action points activate at once
    again = award(integration, account, "review", "review/1")
    assert again.replayed and again.lot_number == first.lot_number
    with pytest.raises(grpc.RpcError) as refused:
        award(integration, account, "review", "review/2")
    assert error_info(refused.value)[:2] == ("FAILED_PRECONDITION", "ACTION_LIMIT_REACHED")
    srv.clock.advance(86_400_000_000)
    assert award(integration, account, "review", "review/3").count == 1
    # an unknown action names the field; a POS may not award
    with pytest.raises(grpc.RpcError) as refused:
        award(integration, account, "selfie", "selfie/1")
    assert error_info(refused.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID", ["action"])
    with pytest.raises(grpc.RpcError) as refused:
        award(srv.stub(members_pb2_grpc.MembersStub, "pos"), account, "review", "r/4")
    assert error_info(refused.value)[:2] == ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED")
    assert srv.server.ledger.balances(account, srv.clock.now).balance == 110


# --- visits ---------------------------------------------------------------------

def test_the_fifth_visit_of_the_month_earns_the_visit_bonus_once(srv):
    pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    account = open_member(srv, 1, "m1")
    srv.clock.now = at("2026-01-10 12:00")
    for i in range(4):
        assert capture(pos, srv, account, 60_000, f"v{i}").visit_bonus_points == 0
    assert capture(pos, srv, account, 40_000, "small").visit_bonus_points == 0
    assert srv.server.ledger.counter(account, b"visits/2026-01") == (4, 0)
    # three captures at once: one of them is the fifth visit
    outcomes, start = [], threading.Barrier(3)

    def one(i):
        start.wait()
        outcomes.append((f"c{i}", capture(pos, srv, account, 70_000, f"c{i}")))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    earned = [(op_id, out) for op_id, out in outcomes if out.visit_bonus_points]
    assert len(earned) == 1 and earned[0][1].visit_bonus_points == 50
    assert srv.server.ledger.counter(account, b"visits/2026-01") == (7, 1)
    # the retried capture replays, bonus included, and counts nothing again
    op_id, first = earned[0]
    retry = capture(pos, srv, account, 70_000, op_id)
    assert retry.replayed and retry.visit_bonus_points == 50
    assert srv.server.ledger.counter(account, b"visits/2026-01") == (7, 1)
    bonuses = [e for e in entries(srv, Entry.EARN) if e.op_id.endswith(b"/visit")]
    assert [e.amount for e in bonuses] == [50]
    # a refund takes nothing back; February counts afresh
    pos.Refund(checkout_pb2.RefundRequest(
        operation_id=f"{op_id}/refund", lane=LANE, original_operation_id=op_id,
        whole_receipt=True))
    assert srv.server.ledger.counter(account, b"visits/2026-01") == (7, 1)
    srv.clock.now = at("2026-02-01 10:00")
    capture(pos, srv, account, 60_000, "feb/1")
    assert srv.server.ledger.counter(account, b"visits/2026-02") == (1, 0)


_EXAMPLE = load_program(Path(__file__).parents[1] / "examples/programs/example.toml")
_EXPIRIES = [Expiry(), Expiry(days=30), Expiry(end_of="day"), Expiry(end_of="month"),
             Expiry(end_of="quarter", periods_later=1), Expiry(end_of="year", periods_later=2)]
_ZONES = ["Europe/Moscow", "Europe/Berlin", "America/Santiago", "Australia/Lord_Howe",
          "Pacific/Chatham", "UTC"]
_2026 = 1_767_225_600_000_000
_HOUR = 3_600_000_000


def _clock_changes():
    """Hours after _2026 at which one of _ZONES changes its offset in 2026."""
    from zoneinfo import ZoneInfo
    hours = set()
    for name in _ZONES:
        zone, previous = ZoneInfo(name), None
        for hour in range(366 * 24):
            moment = datetime.fromtimestamp(_2026 // 1_000_000 + hour * 3600, zone)
            if previous is not None and moment.utcoffset() != previous:
                hours.add(hour)
            previous = moment.utcoffset()
    return sorted(hours)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(("day", "week", "month", "quarter", "year")),
       st.sampled_from(_EXPIRIES), st.integers(0, 3), st.sampled_from(_ZONES),
       st.integers(0, 2 * 365 * 24)
       | st.sampled_from(_clock_changes()).map(lambda hour: hour - 25), st.lists(st.integers(-50 * _HOUR, 50 * _HOUR),
                                              min_size=1, max_size=30))
def test_visit_terms_remembered_by_day_are_those_reckoned_each_time(
        period, expiry, activation, zone_name, start_hour, steps):
    """Visits at nearby times (a Post's captures: mostly of one day, some
    across midnight or a clock change) get the counter and lot times that
    visit_counter and lot_times give each of them."""
    base = dataclasses.replace(_EXAMPLE, time_zone=zone_name)
    visits = VisitBonus(count=5, points=50, period=period)
    lifetime = Lifetime(overrides=(LifetimeOverride("visits", activation, expiry),))
    version = dataclasses.replace(base.versions[0], lifetime=lifetime,
                                  bonuses=Bonuses(visits=visits))
    zone, bt = base.zone, _2026 + start_hour * _HOUR
    for step in steps:
        bt += step
        reckoned = (visit_counter(visits, bt, zone),
                    *lot_times(lifetime.for_kind("visits"), bt, zone))
        assert visit_terms(version, bt, zone) == reckoned
