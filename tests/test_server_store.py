"""The Store service end to end: an hwd's reads in on one bidirectional
stream, a POS watching its lane, through a real server on a loopback port."""

import queue

import grpc
import pytest
from google.rpc import error_details_pb2

from kopilka.core.batch import Batch
from kopilka.servers.lanes import LaneHub
from kopilka.v1 import admin_pb2, admin_pb2_grpc, common_pb2, store_pb2, store_pb2_grpc

from server_harness import RunningServer, error_info, install_program, open_member

WAIT = 10
LANE = "stores/42/lanes/1"
MINUTE = 60_000_000
S = store_pb2


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    server.stop()


class Hwd:
    """One StreamCardReads stream: `send(*reads)` returns that message's acks."""

    def __init__(self, srv, role="hwd"):
        self._requests = queue.Queue()
        stub = srv.stub(store_pb2_grpc.StoreStub, role)
        self._responses = stub.StreamCardReads(iter(self._requests.get, None),
                                               timeout=WAIT)

    def send(self, *reads):
        self._requests.put(S.StreamCardReadsRequest(reads=reads))
        return list(next(self._responses).acks)

    def close(self):
        self._requests.put(None)
        self._responses.cancel()


@pytest.fixture
def hwd(srv):
    stream = Hwd(srv)
    yield stream
    stream.close()


def read(srv, read_id, card="7001", lane=LANE, age=0, reader="lane1-msr",
         source=S.CARD_READ_SOURCE_TRACK2, **fields):
    out = S.CardRead(read_id=read_id, lane=lane, reader=reader, card_number=card,
                     source=source, **fields)
    out.read_time.FromMicroseconds(srv.clock.now - age)
    return out


def outcomes(acks):
    return [(a.read_id, S.CardReadOutcome.Name(a.outcome)) for a in acks]


def ack_error(ack):
    """(code number, reason, field paths) of a REJECTED ack's status."""
    reason, fields = None, []
    for detail in ack.status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return ack.status.code, reason, fields


def watch(srv, lane=LANE, role="pos"):
    stream = srv.stub(store_pb2_grpc.StoreStub, role).WatchLane(
        S.WatchLaneRequest(lane=lane), timeout=WAIT)
    return stream


def test_reads_are_acknowledged_in_order_and_duplicates_ignored(srv, hwd):
    acks = hwd.send(read(srv, "boot1/1"), read(srv, "boot1/2"))
    assert outcomes(acks) == [("boot1/1", "CARD_READ_OUTCOME_ACCEPTED"),
                              ("boot1/2", "CARD_READ_OUTCOME_ACCEPTED")]
    acks = hwd.send(read(srv, "boot1/2"), read(srv, "boot1/3"))
    assert outcomes(acks) == [("boot1/2", "CARD_READ_OUTCOME_DUPLICATE"),
                              ("boot1/3", "CARD_READ_OUTCOME_ACCEPTED")]
    # a reconnected hwd resending what it spooled
    again = Hwd(srv)
    try:
        assert outcomes(again.send(read(srv, "boot1/1"))) == [
            ("boot1/1", "CARD_READ_OUTCOME_DUPLICATE")]
    finally:
        again.close()
    counted = srv.server.metrics.registry.get_sample_value
    assert counted("kopilka_card_reads_total", {"outcome": "accepted"}) == 3
    assert counted("kopilka_card_reads_total", {"outcome": "duplicate"}) == 2


def test_read_ids_are_forgotten_after_a_week(srv, hwd):
    assert outcomes(hwd.send(read(srv, "old"))) == [("old", "CARD_READ_OUTCOME_ACCEPTED")]
    srv.clock.advance(7 * 24 * 60 * MINUTE + 1)
    assert outcomes(hwd.send(read(srv, "old"))) == [("old", "CARD_READ_OUTCOME_ACCEPTED")]


def test_reads_older_than_the_maximum_age_are_stale(srv, hwd):
    acks = hwd.send(read(srv, "late", age=16 * MINUTE), read(srv, "fresh", age=MINUTE))
    assert outcomes(acks) == [("late", "CARD_READ_OUTCOME_STALE"),
                              ("fresh", "CARD_READ_OUTCOME_ACCEPTED")]


def test_a_bad_read_is_rejected_on_its_own_naming_its_fields(srv, hwd):
    no_time = read(srv, "r4")
    no_time.ClearField("read_time")
    acks = hwd.send(read(srv, ""), read(srv, "r2", lane="stores/42/till/1"),
                    read(srv, "r3", card="", reader="x" * 65), no_time,
                    read(srv, "r5", source=99, symbology="s" * 33),
                    read(srv, "x" * 129), read(srv, "r7"))
    assert [a.outcome for a in acks] == [S.CARD_READ_OUTCOME_REJECTED] * 6 + [
        S.CARD_READ_OUTCOME_ACCEPTED]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [ack_error(a) for a in acks[:6]] == [
        (invalid, "REQUEST_INVALID", ["reads[0].read_id"]),
        (invalid, "REQUEST_INVALID", ["reads[1].lane"]),
        (invalid, "REQUEST_INVALID", ["reads[2].reader", "reads[2].card_number"]),
        (invalid, "REQUEST_INVALID", ["reads[3].read_time"]),
        (invalid, "REQUEST_INVALID", ["reads[4].source", "reads[4].symbology"]),
        (invalid, "REQUEST_INVALID", ["reads[5].read_id"]),
    ]
    # the stream goes on
    assert outcomes(hwd.send(read(srv, "r8"))) == [("r8", "CARD_READ_OUTCOME_ACCEPTED")]


def test_an_hwd_may_only_send_reads_of_its_own_store(srv, hwd):
    acks = hwd.send(read(srv, "other", lane="stores/43/lanes/1"), read(srv, "own"))
    assert [a.outcome for a in acks] == [S.CARD_READ_OUTCOME_REJECTED,
                                         S.CARD_READ_OUTCOME_ACCEPTED]
    assert ack_error(acks[0])[:2] == (grpc.StatusCode.PERMISSION_DENIED.value[0],
                                      "STORE_NOT_PERMITTED")


def test_too_many_reads_in_one_message_end_the_stream(srv, hwd):
    with pytest.raises(grpc.RpcError) as caught:
        hwd.send(*[read(srv, f"r{i}") for i in range(501)])
    assert error_info(caught.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID", ["reads"])


def test_a_watcher_sees_every_card_presented_at_its_lane(srv, hwd):
    active = open_member(srv, 1, "alice", card="7001", points=250)
    blocked_card = open_member(srv, 1, "bob", card="7002")
    blocked_member = open_member(srv, 1, "carol", card="7003")
    backend = srv.server.backend
    srv.call(backend.apply(Batch().block_card("block/7002", b"7002")
                           .set_account_status("block/carol", blocked_member, 2)
                           .set_tier("tier/alice", active, 2), None))
    lane = watch(srv)
    first = next(lane)
    assert first.WhichOneof("event") == "started" and first.started.lane == LANE
    assert first.started.start_time.ToMicroseconds() == srv.clock.now
    sent = [read(srv, "w1", card="7001"), read(srv, "w2", card="9999"),
            read(srv, "w3", card="7002"),
            read(srv, "w4", card="7001", lane="stores/42/lanes/2"),
            read(srv, "w5", card="7003"), read(srv, "w1", card="7001")]
    assert [a.outcome for a in hwd.send(*sent)] == [S.CARD_READ_OUTCOME_ACCEPTED] * 5 + [
        S.CARD_READ_OUTCOME_DUPLICATE]

    presented = next(lane)
    assert presented.WhichOneof("event") == "card_presented"
    shown = presented.card_presented
    assert shown.read == sent[0] and shown.member == f"programs/1/members/{active}"
    assert shown.balances.available_points == 250 and shown.tier == "silver"
    unknown = next(lane)
    assert unknown.unknown_card.read == sent[1]
    refused = next(lane).card_refused
    assert refused.read == sent[2] and refused.reason == common_pb2.CARD_BLOCKED
    assert refused.member == f"programs/1/members/{blocked_card}"
    # lane 2's read went to lane 2's watchers (none), the duplicate to nobody
    member_refused = next(lane).card_refused
    assert member_refused.read == sent[4]
    assert member_refused.reason == common_pb2.MEMBER_BLOCKED
    assert srv.server.services["Store"].watchers == 1
    lane.cancel()


def test_a_slow_watcher_never_holds_up_the_reads(srv, hwd):
    open_member(srv, 1, "dave", card="7004")
    lane = watch(srv)
    next(lane)                  # watching; then it reads nothing for a while
    for batch in range(4):
        acks = hwd.send(*[read(srv, f"s{batch}/{i}", card="7004") for i in range(500)])
        assert {a.outcome for a in acks} == {S.CARD_READ_OUTCOME_ACCEPTED}
    last = "s3/499"
    seen = []
    while not seen or seen[-1] != last:
        seen.append(next(lane).card_presented.read.read_id)
    assert len(seen) < 2000     # the oldest were dropped for this POS
    assert seen == sorted(seen, key=lambda r: tuple(map(int, r[1:].split("/"))))
    lane.cancel()


def test_a_lane_queue_keeps_the_newest_events():
    hub = LaneHub(lambda: 0)
    watcher = hub.watch((42, 1))
    for i in range(100):
        hub.publish((42, 1), i)
    assert watcher.dropped == 100 - 32
    assert list(watcher._queue) == list(range(68, 100))


def test_a_new_watcher_gets_the_lanes_last_minute():
    """After a restart the hwd may resend its spool before the POS is back."""
    now = [0]
    hub = LaneHub(lambda: now[0])
    hub.publish((42, 1), "old")
    now[0] += 50_000_000
    hub.publish((42, 1), "recent")
    hub.publish((42, 2), "other lane")
    now[0] += 20_000_000
    watcher = hub.watch((42, 1))
    assert list(watcher._queue) == ["recent"]


@pytest.mark.parametrize("role, lane, expected", [
    ("pos43", LANE, ("PERMISSION_DENIED", "STORE_NOT_PERMITTED", [])),
    ("pos", "stores/43/lanes/1", ("PERMISSION_DENIED", "STORE_NOT_PERMITTED", [])),
    ("pos", "stores/42/lanes/9", ("NOT_FOUND", "LANE_NOT_FOUND", [])),
    ("pos", "stores/42/lane/1", ("INVALID_ARGUMENT", "REQUEST_INVALID", ["lane"])),
    ("hwd", LANE, ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED", [])),
    ("integration", LANE, ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED", [])),
])
def test_watching_is_scoped(srv, role, lane, expected):
    with pytest.raises(grpc.RpcError) as caught:
        next(watch(srv, lane, role))
    assert error_info(caught.value) == expected


@pytest.mark.parametrize("role", ["pos", "integration"])
def test_only_hwd_and_admin_send_reads(srv, role):
    stream = Hwd(srv, role)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stream.send(read(srv, "r1"))
        assert error_info(caught.value)[:2] == ("PERMISSION_DENIED",
                                                "ROLE_NOT_PERMITTED")
    finally:
        stream.close()
    admin = Hwd(srv, "admin")
    try:   # admin is scoped to every store
        assert outcomes(admin.send(read(srv, "a1", lane="stores/43/lanes/1"))) == [
            ("a1", "CARD_READ_OUTCOME_ACCEPTED")]
    finally:
        admin.close()


def test_open_streams_are_counted_and_stopping_ends_them(srv, hwd):
    hwd.send(read(srv, "r1"))
    lane = watch(srv)
    next(lane)
    assert next(lane).WhichOneof("event") == "unknown_card"  # r1, replayed
    stats = srv.stub(admin_pb2_grpc.AdminStub).GetStats(admin_pb2.GetStatsRequest())
    assert (stats.lane_watchers, stats.card_read_streams) == (1, 1)

    async def stop():   # what the server's stop() does first
        srv.server.services["Store"].shutdown()
    srv.call(stop())
    for call in (lambda: next(lane), lambda: hwd.send(read(srv, "r2"))):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert error_info(caught.value) == ("UNAVAILABLE", "SHUTTING_DOWN", [])


def test_read_ids_survive_a_clean_restart(tmp_path):
    from kopilka.servers.lanes import SeenReads
    path = str(tmp_path / "seen.json")
    now = [1_000]
    seen = SeenReads(lambda: now[0], ttl=100, path=path)
    seen.remember((42, "a"))
    now[0] += 60
    seen.remember((42, "b"))
    seen.save()
    now[0] += 50   # "a" is now older than the ttl
    again = SeenReads(lambda: now[0], ttl=100, path=path)
    assert again.seen((42, "b")) and not again.seen((42, "a"))
