"""The Admin service end to end: adjustments, audit, hot backup and stats,
through a real server on a loopback port."""

import os
import subprocess
import sys
import textwrap

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from kopilka import kernel
from kopilka.core.batch import Batch
from kopilka.v1 import admin_pb2 as pb
from kopilka.v1 import admin_pb2_grpc, common_pb2

from server_harness import DAY, RunningServer, error_info, install_program, open_member

GOODWILL = common_pb2.ADJUSTMENT_REASON_GOODWILL
FRAUD = common_pb2.ADJUSTMENT_REASON_FRAUD


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    server.stop()


@pytest.fixture
def admin(srv):
    return srv.stub(admin_pb2_grpc.AdminStub)


def at(micros):
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def test_a_credit_follows_the_programs_lifetime_and_replays(srv, admin):
    member = open_member(srv, 1, "alice")
    name = f"programs/1/members/{member}"
    request = pb.AdjustRequest(operation_id="adj/1", member=name, points=300,
                               reason=GOODWILL, note="sorry for the queue")
    first = admin.Adjust(request)
    assert (first.member, first.points, first.lot_number) == (name, 300, 1)
    # the example program's points activate after its 14-day return window
    assert first.balances.pending_points == 300
    assert first.balances.available_points == 0 and not first.replayed
    lot = srv.server.ledger.lots(member)[0]
    assert lot.activates_at == srv.clock.now + 14 * DAY
    again = admin.Adjust(request)
    assert again.replayed and again.lot_number == 1 and again.points == 300
    assert len(srv.server.ledger.lots(member)) == 1
    with pytest.raises(grpc.RpcError) as caught:
        admin.Adjust(pb.AdjustRequest(operation_id="adj/1", member=name, points=301,
                                      reason=GOODWILL))
    assert error_info(caught.value) == ("ALREADY_EXISTS", "OPERATION_ID_REUSED", [])
    record = srv.server.ledger.operation(b"adj/1")
    assert b"sorry for the queue" in record.data


def test_credits_with_times_and_debits(srv, admin):
    member = open_member(srv, 1, "bob")
    name = f"programs/1/members/{member}"
    now = srv.clock.now
    credit = admin.Adjust(pb.AdjustRequest(
        operation_id="adj/c", member=name, points=100, reason=GOODWILL,
        activate_time=at(now), expire_time=at(now + 30 * DAY)))
    assert credit.balances.available_points == 100
    assert srv.server.ledger.lots(member)[0].expires_at == now + 30 * DAY
    debit = admin.Adjust(pb.AdjustRequest(operation_id="adj/d", member=name,
                                          points=-40, reason=FRAUD))
    assert (debit.points, debit.lot_number) == (-40, 0)
    assert debit.balances.available_points == 60
    with pytest.raises(grpc.RpcError) as caught:
        admin.Adjust(pb.AdjustRequest(operation_id="adj/e", member=name, points=-61,
                                      reason=FRAUD))
    assert error_info(caught.value) == ("FAILED_PRECONDITION", "INSUFFICIENT_POINTS", [])
    metadata = dict(caught.value.trailing_metadata() or ())
    assert b"available_points" in metadata.get("grpc-status-details-bin", b"")


@pytest.mark.parametrize("fields, expected", [
    (dict(points=0), ("INVALID_ARGUMENT", "AMOUNT_INVALID", ["points"])),
    (dict(reason=0, note="n" * 501),
     ("INVALID_ARGUMENT", "REQUEST_INVALID", ["reason", "note"])),
    (dict(reason=common_pb2.ADJUSTMENT_REASON_OTHER),
     ("INVALID_ARGUMENT", "REQUEST_INVALID", ["note"])),
    (dict(points=-5, activate_time=at(1)),
     ("INVALID_ARGUMENT", "REQUEST_INVALID", ["activate_time"])),
    (dict(activate_time=at(2_000_000), expire_time=at(1_000_000)),
     ("INVALID_ARGUMENT", "TIME_INVALID", ["expire_time"])),
    (dict(expire_time=at(1_000_000)),
     ("INVALID_ARGUMENT", "TIME_INVALID", ["expire_time"])),
    (dict(member="members/1"), ("INVALID_ARGUMENT", "REQUEST_INVALID", ["member"])),
    (dict(member="programs/1/members/999"), ("NOT_FOUND", "MEMBER_NOT_FOUND", [])),
    (dict(operation_id=""),
     ("INVALID_ARGUMENT", "OPERATION_ID_INVALID", ["operation_id"])),
])
def test_bad_adjustments_are_refused(srv, admin, fields, expected):
    member = open_member(srv, 1, "carol")
    request = dict(operation_id="adj/bad", member=f"programs/1/members/{member}",
                   points=10, reason=GOODWILL)
    request.update(fields)
    with pytest.raises(grpc.RpcError) as caught:
        admin.Adjust(pb.AdjustRequest(**request))
    assert error_info(caught.value) == expected


def test_audit_is_clean_and_names_the_head(srv, admin):
    member = open_member(srv, 1, "dave", card="7001", points=50)
    admin.Adjust(pb.AdjustRequest(operation_id="adj/1", member=f"programs/1/members/"
                                  f"{member}", points=5, reason=GOODWILL))
    report = admin.Audit(pb.AuditRequest())
    seq, digest = srv.server.ledger.head()
    assert report.clean and list(report.problems) == []
    assert (report.head_cursor, report.head_hash) == (seq, digest)
    assert report.audit_time.ToMicroseconds() == srv.clock.now
    assert report.duration.ToNanoseconds() >= 0


def test_backup_is_a_sound_copy_and_never_overwrites(srv, admin, tmp_path):
    member = open_member(srv, 1, "erin", card="7001", points=75)
    srv.call(srv.server.backend.apply(Batch().spend("s1", member, 25), None))
    destination = tmp_path / "backups" / "first"
    destination.parent.mkdir()
    done = admin.Backup(pb.BackupRequest(path=str(destination)))
    seq, digest = srv.server.ledger.head()
    assert done.path == str(destination) and done.size_bytes > 0
    assert (done.head_cursor, done.head_hash) == (seq, digest)
    assert done.size_bytes == sum(f.stat().st_size for f in destination.iterdir())
    with kernel.Ledger(destination, map_size=256 << 20, sync=False) as copy:
        assert copy.audit() == []
        assert copy.head() == (seq, digest)
        assert copy.balances(member, srv.clock.now).available == 50
    for path, expected in [
        (str(destination), "BACKUP_DESTINATION_UNUSABLE"),     # exists
        ("relative/dir", "BACKUP_DESTINATION_UNUSABLE"),
        (str(tmp_path / "missing" / "dir"), "BACKUP_DESTINATION_UNUSABLE"),
        (str(tmp_path / "data" / "ledger" / "inside"), "BACKUP_DESTINATION_UNUSABLE"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            admin.Backup(pb.BackupRequest(path=path))
        assert error_info(caught.value) == ("FAILED_PRECONDITION", expected, [])
    with pytest.raises(grpc.RpcError) as caught:
        admin.Backup(pb.BackupRequest(path=""))
    assert error_info(caught.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID", ["path"])
    assert not (tmp_path / "data" / "ledger" / "inside").exists()


# The server dies (SIGKILL) the moment the ledger's bytes are written, before
# anything else of the backup happens.
KILLED_MID_BACKUP = textwrap.dedent("""
    import os, signal, sys
    from kopilka.core.batch import Batch
    from kopilka.kernel import Ledger
    from kopilka.servers import backup
    ledger = Ledger(sys.argv[1], map_size=1 << 24, sync=False)
    ledger.apply(Batch().put_program("p", 1).open_account("a", 1, "m"), 1)
    real = ledger.copy
    def copy_then_die(path, compact=True):
        real(path, compact)
        os.kill(os.getpid(), signal.SIGKILL)
    ledger.copy = copy_then_die
    backup.copy(ledger, sys.argv[2])
""")


def test_a_backup_cut_short_leaves_no_ledger_file_where_the_backup_goes(tmp_path):
    """A truncated data.mdb opens, then kills its reader with SIGBUS: what a
    killed backup leaves must never look like a backup."""
    destination = tmp_path / "backups" / "b1"
    destination.parent.mkdir()
    child = subprocess.run([sys.executable, "-c", KILLED_MID_BACKUP,
                            str(tmp_path / "live"), str(destination)], timeout=60)
    assert child.returncode == -9
    assert os.listdir(destination) == []
    partial = [p.name for p in destination.parent.iterdir() if p.name != "b1"]
    assert len(partial) == 1 and partial[0].startswith(".b1.partial-")


def test_stats(srv, admin):
    for name in ("f1", "f2", "f3"):
        open_member(srv, 1, name, points=10)
    stats = admin.GetStats(pb.GetStatsRequest())
    assert stats.head_cursor == srv.server.ledger.head()[0]
    assert stats.members == 3
    assert stats.store_size_bytes == 256 << 20
    assert 0 < stats.store_used_bytes <= stats.store_size_bytes
    assert stats.commits >= 4 and stats.committed_operations >= 7
    assert stats.writer_queue_depth == 0
    assert stats.start_time.ToMicroseconds() == srv.clock.now
    assert stats.server_version
    assert (stats.feed_subscribers, stats.lane_watchers, stats.card_read_streams) == (
        0, 0, 0)


@pytest.mark.parametrize("role", ["pos", "hwd", "integration", None])
def test_only_admin_may_call_admin(srv, role):
    stub = srv.stub(admin_pb2_grpc.AdminStub, role)
    calls = [(stub.Adjust, pb.AdjustRequest(operation_id="x", member="programs/1/"
                                            "members/1", points=1, reason=GOODWILL)),
             (stub.Audit, pb.AuditRequest()), (stub.Backup, pb.BackupRequest(path="/x")),
             (stub.GetStats, pb.GetStatsRequest())]
    expected = (("UNAUTHENTICATED", "CREDENTIALS_INVALID") if role is None
                else ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED"))
    for method, request in calls:
        with pytest.raises(grpc.RpcError) as caught:
            method(request)
        assert error_info(caught.value)[:2] == expected
