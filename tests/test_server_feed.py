"""The feed end to end: a real server on a loopback port, read as an
integration would read it, across pages, filters, live commits and restarts."""

import hashlib
import threading
import time

import grpc
import pytest

from kopilka.core.batch import Batch
from kopilka.core.records import Sys
from kopilka.v1 import common_pb2, feed_pb2, feed_pb2_grpc

from server_harness import (DAY, Clock, RunningServer, error_info, install_program,
                            open_member)

WAIT = 10  # seconds any single read may take before the test fails


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    server.stop()


def feed(srv, role="integration"):
    return srv.stub(feed_pb2_grpc.FeedStub, role)


def apply(srv, batch):
    results = srv.call(srv.server.backend.apply(batch, None))
    assert all(r.code == 0 for r in results), results
    return results


def history(srv, tag=""):
    """A member's life in the ledger: every kind of event and posting."""
    member = open_member(srv, 1, f"crm{tag}", card=f"70{tag}1", points=500)
    now = srv.clock.now
    apply(srv, Batch().hold(f"{tag}h1", member, 100, expires_at=now + DAY, store=42,
                            lane=1))
    apply(srv, Batch().capture(f"{tag}c1", member, hold=f"{tag}h1", spend=80, earn=25,
                               money=150_000, store=42, lane=1, version=3,
                               business_time=now - 1000))
    apply(srv, Batch().adjust(f"{tag}a1", member, 40, reason=1)
          .adjust(f"{tag}a2", member, -15, reason=5)
          .replace_card(f"{tag}r1", f"70{tag}1".encode(), f"70{tag}2".encode())
          .set_tier(f"{tag}t1", member, 2)
          .set_profile(f"{tag}p1", member, b'{"name": "never in the feed"}')
          .set_account_status(f"{tag}s1", member, 2))
    return member


def eventually(condition, timeout=WAIT):
    """Waits for `condition()` (something another thread does), or fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def head(srv):
    return srv.server.ledger.head()[0]


def read_until(stream, cursor):
    """Events of the stream up to and including `cursor`."""
    events = []
    while not events or events[-1].cursor < cursor:
        events.extend(next(stream).events)
    return events


def test_subscribe_from_zero_gets_every_entry_in_order(srv):
    member = history(srv)
    last = head(srv)
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(
        from_cursor=0, include_raw_entries=True, max_events_per_response=4),
        timeout=WAIT)
    responses = []
    while sum(len(r.events) for r in responses) < last:
        responses.append(next(stream))
    stream.cancel()
    events = [e for r in responses for e in r.events]
    assert [e.cursor for e in events] == list(range(1, last + 1))
    assert all(1 <= len(r.events) <= 4 and r.head_cursor == last for r in responses)
    stored = srv.server.ledger.journal(1, 1000)
    assert [e.type for e in events] == [s.type for s in stored]
    # the raw bytes let a subscriber check the hash chain on its own
    previous = bytes(32)
    for event in events:
        assert hashlib.blake2b(previous + event.raw_entry,
                               digest_size=32).digest() == event.hash
        previous = event.hash

    name = f"programs/1/members/{member}"
    by_type = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    T = feed_pb2
    assert by_type[T.ENTRY_TYPE_PROGRAM_PUT][0].program == "programs/1"
    opened = by_type[T.ENTRY_TYPE_ACCOUNT_OPENED][0]
    assert opened.member == name and opened.account_opened.external_id == "crm"
    assert by_type[T.ENTRY_TYPE_CARD_LINKED][0].card.card_number == "701"
    assert by_type[T.ENTRY_TYPE_CARD_REPLACED][0].card.card_number == "701"
    assert by_type[T.ENTRY_TYPE_CARD_LINKED][1].card.card_number == "702"
    placed = by_type[T.ENTRY_TYPE_HOLD_PLACED][0]
    assert (placed.hold_placed.hold_number, placed.hold_placed.points) == (1, 100)
    assert placed.hold_placed.expire_time.ToMicroseconds() == srv.clock.now + DAY
    assert placed.store == "stores/42" and placed.operation_id == "h1"
    released = by_type[T.ENTRY_TYPE_HOLD_RELEASED][0].hold_released
    assert released.reason == T.HOLD_RELEASE_REASON_CAPTURED
    spend = by_type[T.ENTRY_TYPE_SPEND][0]
    assert spend.points == 80 and spend.debit.member == name
    assert spend.credit.system.kind == Sys.REDEEMED == common_pb2.SYSTEM_ACCOUNT_KIND_REDEEMED
    earn = by_type[T.ENTRY_TYPE_EARN][1]   # the first is open_member's
    assert earn.points == 25 and earn.credit.member == name and earn.lot_number == 2
    assert earn.debit.system.kind == common_pb2.SYSTEM_ACCOUNT_KIND_ISSUED
    assert earn.program_version == "programs/1/versions/3"
    assert earn.operation_time.ToMicroseconds() == srv.clock.now
    assert earn.business_time.ToMicroseconds() == srv.clock.now - 1000
    receipt = by_type[T.ENTRY_TYPE_RECEIPT][0].receipt
    assert receipt.paid == common_pb2.Money(currency_code="RUB", minor_units=150_000)
    assert (receipt.spent_points, receipt.lot_number) == (80, 2)
    credit, debit = by_type[T.ENTRY_TYPE_ADJUST]
    assert credit.adjustment.reason == common_pb2.ADJUSTMENT_REASON_GOODWILL
    assert credit.credit.member == name and credit.lot_number == 3
    assert debit.debit.member == name and debit.points == 15
    assert debit.credit.system.kind == common_pb2.SYSTEM_ACCOUNT_KIND_ADJUSTED
    assert debit.adjustment.reason == common_pb2.ADJUSTMENT_REASON_FRAUD
    state = by_type[T.ENTRY_TYPE_ACCOUNT_STATUS][0]
    assert state.member_state.state == common_pb2.MEMBER_STATE_BLOCKED
    assert not by_type[T.ENTRY_TYPE_EARN][0].HasField("business_time")
    # entry types without details of their own still name their member
    assert by_type[T.ENTRY_TYPE_TIER_SET][0].member == name
    profile = by_type[T.ENTRY_TYPE_PROFILE_SET][0]
    assert profile.member == name and b"never" not in profile.raw_entry


def test_resume_after_restart_has_no_gap_and_no_duplicate(tmp_path):
    clock = Clock()
    first = RunningServer(tmp_path / "data", clock=clock)
    try:
        install_program(first)
        history(first, "a")
        stream = feed(first).Subscribe(feed_pb2.SubscribeRequest(
            max_events_per_response=5), timeout=WAIT)
        seen = list(next(stream).events) + list(next(stream).events)
        stream.cancel()
        cursor = seen[-1].cursor
        assert [e.cursor for e in seen] == list(range(1, 11))
    finally:
        first.stop()
    second = RunningServer(tmp_path / "data", clock=clock)
    try:
        history(second, "b")
        last = head(second)
        stream = feed(second).Subscribe(feed_pb2.SubscribeRequest(from_cursor=cursor),
                                        timeout=WAIT)
        rest = read_until(stream, last)
        stream.cancel()
        assert [e.cursor for e in seen + rest] == list(range(1, last + 1))
        assert rest[0].hash == second.server.ledger.journal(cursor + 1, 1)[0].hash
    finally:
        second.stop()


def test_live_events_arrive_after_subscribing(srv):
    member = open_member(srv, 1, "live", points=10)
    start = head(srv)
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(from_cursor=start),
                                 timeout=WAIT)
    apply(srv, Batch().earn("live/1", member, 5))
    events = read_until(stream, start + 1)
    assert [e.cursor for e in events] == [start + 1]
    assert events[0].type == feed_pb2.ENTRY_TYPE_EARN and events[0].points == 5
    apply(srv, Batch().earn("live/2", member, 6).earn("live/3", member, 7))
    events = read_until(stream, start + 3)
    assert [(e.cursor, e.points) for e in events] == [(start + 2, 6), (start + 3, 7)]
    stream.cancel()


def test_a_commit_notification_wakes_subscribers_without_polling(srv):
    service = srv.server.services["Feed"]
    service.poll_seconds = service.wired_poll_seconds = 3600  # no polling at all
    member = open_member(srv, 1, "woken", points=10)
    start = head(srv)
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(from_cursor=start),
                                 timeout=WAIT)
    apply(srv, Batch().earn("woken/1", member, 5))
    # as the writer's on_commit does, on a thread of its own; whether the
    # subscriber was reading or already waiting, it must see the commit
    threading.Thread(target=service.notifier.notify).start()
    assert [e.cursor for e in read_until(stream, start + 1)] == [start + 1]
    stream.cancel()


@pytest.fixture
def quick_heartbeat(srv):
    srv.server.services["Feed"].heartbeat_seconds = 0.05


def test_heartbeat_carries_the_head_while_nothing_commits(srv, quick_heartbeat):
    open_member(srv, 1, "quiet")
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(from_cursor=head(srv)),
                                 timeout=WAIT)
    beat = next(stream)
    assert beat.events == [] and beat.head_cursor == head(srv)
    stream.cancel()


def test_filters_by_program_and_type(srv):
    history(srv)
    wanted = [feed_pb2.ENTRY_TYPE_EARN, feed_pb2.ENTRY_TYPE_SPEND]
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(
        program="programs/1", types=wanted, max_events_per_response=1), timeout=WAIT)
    stored = [s for s in srv.server.ledger.journal(1, 1000) if s.type in wanted]
    events = read_until(stream, stored[-1].seq)
    stream.cancel()
    assert [e.cursor for e in events] == [s.seq for s in stored]
    assert len(events) == 3 and not any(e.raw_entry for e in events)


def test_a_cursor_beyond_the_head_is_out_of_range(srv):
    last = head(srv)
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(from_cursor=last + 1),
                                 timeout=WAIT)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert error_info(caught.value) == ("OUT_OF_RANGE", "CURSOR_AHEAD", [])


@pytest.mark.parametrize("request_, fields", [
    (feed_pb2.SubscribeRequest(from_cursor=-1), ["from_cursor"]),
    (feed_pb2.SubscribeRequest(max_events_per_response=10_001),
     ["max_events_per_response"]),
    (feed_pb2.SubscribeRequest(types=[feed_pb2.ENTRY_TYPE_EARN, 0, 99]),
     ["types[1]", "types[2]"]),
    (feed_pb2.SubscribeRequest(program="programs/x"), ["program"]),
])
def test_bad_requests_name_the_field(srv, request_, fields):
    with pytest.raises(grpc.RpcError) as caught:
        next(feed(srv).Subscribe(request_, timeout=WAIT))
    assert error_info(caught.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID", fields)


def test_an_unknown_program_is_not_found(srv):
    with pytest.raises(grpc.RpcError) as caught:
        next(feed(srv).Subscribe(feed_pb2.SubscribeRequest(program="programs/9"),
                                 timeout=WAIT))
    assert error_info(caught.value)[:2] == ("NOT_FOUND", "PROGRAM_NOT_FOUND")


@pytest.mark.parametrize("role", ["pos", "hwd"])
def test_only_integration_and_admin_subscribe(srv, role):
    with pytest.raises(grpc.RpcError) as caught:
        next(feed(srv, role).Subscribe(feed_pb2.SubscribeRequest(), timeout=WAIT))
    assert error_info(caught.value)[:2] == ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED")
    stream = feed(srv, "admin").Subscribe(feed_pb2.SubscribeRequest(), timeout=WAIT)
    assert next(stream).events[0].cursor == 1
    stream.cancel()


def test_subscribers_are_counted_and_their_lag_measured(srv):
    history(srv)
    metrics = srv.server.metrics
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(max_events_per_response=2),
                                 timeout=WAIT)
    read_until(stream, head(srv))
    assert srv.server.services["Feed"].subscribers == 1
    assert metrics.registry.get_sample_value("kopilka_feed_subscribers") == 1
    assert metrics.registry.get_sample_value("kopilka_feed_lag_entries") == 0
    stream.cancel()
    eventually(lambda: srv.server.services["Feed"].subscribers == 0)
    assert metrics.registry.get_sample_value("kopilka_feed_subscribers") == 0


def test_stopping_ends_streams_with_unavailable(srv):
    stream = feed(srv).Subscribe(feed_pb2.SubscribeRequest(), timeout=WAIT)
    assert next(stream).events[0].cursor == 1

    async def stop():   # what the server's stop() does first
        srv.server.services["Feed"].shutdown()
    srv.call(stop())
    with pytest.raises(grpc.RpcError) as caught:
        while True:
            next(stream)
    assert error_info(caught.value) == ("UNAVAILABLE", "SHUTTING_DOWN", [])
