"""Promise 5, the full disk: when the LMDB map fills, writes are refused with
RESOURCE_EXHAUSTED (STORE_FULL) and change nothing, reads go on being
served, the audit stays clean; a restart with a larger map resumes, and the
refused request, retried with its id, then goes through once. When the disk
itself fills, a commit is refused UNAVAILABLE (STORE_WRITE_FAILED), nothing
written, and writes resume as soon as there is space again.
(Backups under load: test_kill.py.)"""

import subprocess
import sys

import grpc
import pytest

from kopilka.kernel import Ledger
from kopilka.v1 import (admin_pb2, admin_pb2_grpc, checkout_pb2, checkout_pb2_grpc,
                        common_pb2, members_pb2, members_pb2_grpc)

from server_harness import RunningServer, error_info, install_program, open_member

WAIT = 30
LANE = "stores/42/lanes/1"
CARD = "7700000000000001"
SMALL = 1 << 20


def captures(srv, first, count, cards=(CARD,)):
    """A Post of `count` captures with money (no points spent), by `cards` in turn."""
    operations = []
    for i in range(first, first + count):
        receipt = checkout_pb2.Receipt(receipt_id=f"r{i}")
        receipt.business_time.FromMicroseconds(srv.clock.now)
        price = common_pb2.Money(currency_code="RUB", minor_units=10_000 + i)
        receipt.lines.add(line_number=1, sku=f"sku{i}", category="groceries",
                          quantity=1, unit_price=price, total=price)
        operations.append(checkout_pb2.PostOperation(capture=checkout_pb2.CaptureRequest(
            operation_id=f"fill/{i}", lane=LANE, card_number=cards[i % len(cards)],
            receipt=receipt)))
    return checkout_pb2.PostRequest(operations=operations)


def codes(answer):
    return {r.status.code for r in answer.results}


def test_a_full_map_refuses_writes_serves_reads_and_a_larger_one_resumes(tmp_path):
    data = tmp_path / "data"
    srv = RunningServer(data, map_size=SMALL)
    try:
        install_program(srv)
        member = open_member(srv, 1, "m1", card=CARD, points=1_000)
        cards = [CARD] + [f"77000000001{i:05d}" for i in range(9)]
        for i, card in enumerate(cards[1:]):
            open_member(srv, 1, f"f{i}", card=card)
        pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
        n = 0
        while True:       # fill it, in Posts of 20 commits (a card comes back every 10)
            try:
                answer = pos.Post(captures(srv, n, 200, cards), timeout=WAIT)
            except grpc.RpcError as err:     # its first commit refused: nothing written
                assert error_info(err) == ("RESOURCE_EXHAUSTED", "STORE_FULL", [])
                break
            full = [i for i, r in enumerate(answer.results) if r.status.code != 0]
            for i in range(200):
                written = srv.server.ledger.operation(f"fill/{n + i}/capture".encode())
                assert (written is None) == (i in full), i
            n += 200
            if full:       # once full, every later commit of the Post is refused too
                assert full == list(range(full[0] // 10 * 10, 200))
                assert {r.status.code for r in answer.results[full[0]:]} == {
                    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
                assert "STORE_FULL" in str(answer.results[full[0]].status.details[0].value)
                break
            assert n < 100_000, "the map never filled"
        head = srv.server.ledger.head()

        # writes refused, every kind (each filling what little space is left
        # until it too is refused), and a refused one writes nothing
        admin = srv.stub(admin_pb2_grpc.AdminStub)
        members = srv.stub(members_pb2_grpc.MembersStub)
        requests = {
            "hold": (pos.Hold, lambda i: checkout_pb2.HoldRequest(
                operation_id=f"after/hold{i}", lane=LANE, card_number=CARD, points=1)),
            "enrol": (members.EnrolMember, lambda i: members_pb2.EnrolMemberRequest(
                operation_id=f"after/enrol{i}", parent="programs/1",
                external_id=f"m{i + 2}")),
            "adjust": (admin.Adjust, lambda i: admin_pb2.AdjustRequest(
                operation_id=f"after/adjust{i}", member=f"programs/1/members/{member}",
                points=5, reason=common_pb2.ADJUSTMENT_REASON_GOODWILL)),
        }
        refused, unfinished = {}, None
        for kind, (call, make) in requests.items():
            for i in range(1000):
                before = srv.server.ledger.head()
                try:
                    call(make(i), timeout=WAIT)
                except grpc.RpcError as err:
                    assert error_info(err) == ("RESOURCE_EXHAUSTED", "STORE_FULL", [])
                    if srv.server.ledger.head() != before:
                        # an enrolment's second commit (the welcome bonus):
                        # the answer must say the member is enrolled already
                        assert kind == "enrol" and "was enrolled as" in err.details()
                        assert "not written (STORE_FULL)" in err.details()
                        unfinished = make(i)
                        continue
                    refused[kind] = make(i)
                    break
        assert set(refused) == set(requests)
        head = srv.server.ledger.head()
        balance = srv.server.ledger.balances(member, srv.clock.now)

        # reads go on
        got = members.GetMember(members_pb2.GetMemberRequest(
            name=f"programs/1/members/{member}"), timeout=WAIT)
        assert got.member.balances.balance_points == balance.balance
        quote = pos.Quote(checkout_pb2.QuoteRequest(
            lane=LANE, card_number=CARD, receipt=captures(srv, 0, 1).operations[0]
            .capture.receipt), timeout=WAIT)
        assert quote.earn_points > 0
        audit = admin.Audit(admin_pb2.AuditRequest(), timeout=WAIT)
        assert audit.clean and audit.head_cursor == head[0]
    finally:
        srv.stop()

    srv = RunningServer(data, map_size=SMALL * 8)     # the map enlarged
    try:
        pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
        assert srv.server.ledger.head() == head
        hold = refused["hold"]
        first = pos.Hold(hold, timeout=WAIT)
        assert (first.held_points, first.replayed) == (1, False)
        assert pos.Hold(hold, timeout=WAIT).replayed
        assert codes(pos.Post(captures(srv, n, 200, cards), timeout=WAIT)) == {0}
        if unfinished is not None:       # the same request again completes it
            done = srv.stub(members_pb2_grpc.MembersStub).EnrolMember(unfinished,
                                                                      timeout=WAIT)
            assert done.replayed and done.welcome_points > 0
        assert srv.server.ledger.audit() == []
    finally:
        srv.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem (tmpfs), where mounting one is allowed (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_commits_and_writes_resume_once_space_is_freed(small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (1 << 20))
    srv = RunningServer(small_disk / "data", map_size=256 << 20)
    try:
        install_program(srv)
        member = open_member(srv, 1, "m1", card=CARD, points=1_000)
        cards = [f"77000000001{i:05d}" for i in range(50)]
        for i, card in enumerate(cards):
            open_member(srv, 1, f"f{i}", card=card)
        pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
        n = 0
        while True:
            try:
                answer = pos.Post(captures(srv, n, 200, cards), timeout=WAIT)
            except grpc.RpcError as err:
                refusal = error_info(err)
                break
            n += 200
            refused = [r for r in answer.results if r.status.code != 0]
            if refused:
                refusal = ("UNAVAILABLE", None, [])
                assert refused[0].status.code == grpc.StatusCode.UNAVAILABLE.value[0]
                break
            assert n < 100_000, "the disk never filled"
        assert refusal[:1] == ("UNAVAILABLE",) and refusal[1] in (None, "STORE_WRITE_FAILED")
        head = srv.server.ledger.head()
        assert srv.server.ledger.audit() == []
        got = srv.stub(members_pb2_grpc.MembersStub).GetMember(
            members_pb2.GetMemberRequest(name=f"programs/1/members/{member}"),
            timeout=WAIT)
        assert got.member.balances.balance_points >= 1_000
        hold = checkout_pb2.HoldRequest(operation_id="after/hold", lane=LANE,
                                        card_number=CARD, points=1)
        ballast.unlink()                  # space again: writes resume, no restart
        assert pos.Hold(hold, timeout=WAIT).held_points == 1
        assert srv.server.ledger.head()[0] > head[0]
        assert codes(pos.Post(captures(srv, n, 50, cards), timeout=WAIT)) == {0}
        assert srv.server.ledger.audit() == []
        head = srv.server.ledger.head()
        fill(ballast)                     # full again: a stop must still be clean
    finally:
        srv.stop()
    ballast.unlink()
    with Ledger(small_disk / "data" / "ledger", map_size=256 << 20) as ledger:
        assert ledger.head() == head and ledger.audit() == []


def fill(path):
    """Writes `path` until the disk is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65_536)
                f.flush()
        except OSError:
            pass


# The kernel alone on a full disk, in a child process: with MDB_WRITEMAP a
# write into a hole of the data file that the disk cannot fill is a SIGBUS,
# which would show here as the child's death, not as an error it reports.
KERNEL_CHILD = """
import os, sys
from kopilka.kernel import Ledger
from kopilka.core.batch import Batch
from kopilka.core.records import LedgerError, MapFullError
path, ballast = sys.argv[1], sys.argv[2]
ledger = Ledger(path, map_size=256 << 20, writemap=True)
setup = Batch().put_program("p", 1)
for a in range(50):
    setup.open_account(f"a{a}", 1, f"m{a}")
ledger.apply(setup, 1)
n = 0
while True:
    n += 1
    batch = Batch()
    for i in range(500):
        batch.earn(f"b{n}/e{i}", 1 + i % 50, 1, money=100)
    head = ledger.head()
    try:
        ledger.apply(batch, 10 + n)
    except MapFullError:
        sys.exit("the map filled, not the disk")
    except LedgerError as exc:
        print("refused:", exc, flush=True)
        break
assert ledger.head() == head and ledger.operation(f"b{n}/e0".encode()) is None
assert ledger.audit() == []
st = os.stat(os.path.join(path, "data.mdb"))
assert st.st_blocks * 512 >= st.st_size == ledger.info()["mapped"]
os.unlink(ballast)                      # room again: the same batch goes in
assert all(r.ok for r in ledger.apply(batch, 10 + n))
assert ledger.audit() == []
ledger.close()
print("ok", n, flush=True)
"""


def test_the_kernel_on_a_full_disk_refuses_a_batch_and_lives(small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (1 << 20))
    done = subprocess.run([sys.executable, "-c", KERNEL_CHILD, str(small_disk / "ledger"),
                           str(ballast)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "refused: cannot grow the ledger's file" in done.stdout
    assert "No space left on device" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("ok")
