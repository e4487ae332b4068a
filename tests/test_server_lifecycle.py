"""The server's life: SIGTERM under load and the restart after it (a real
`kopilka serve` process), deadlines that pass while a request waits for the
writer, and the Prometheus figures scraped over HTTP."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kopilka.core.batch import Batch
from kopilka.core.records import NEVER
from kopilka.kernel import Ledger
from kopilka.servers.app import Config
from kopilka.servers.registry import Registry
from kopilka.v1 import (admin_pb2, admin_pb2_grpc, checkout_pb2, checkout_pb2_grpc,
                        feed_pb2, feed_pb2_grpc)

from server_harness import RunningServer, error_info, install_program, open_member

WAIT = 10
LANE = "stores/42/lanes/1"
MEMBERS = 16     # one per client: far from an account's 256 open holds
CLIENTS = 16


# --- SIGTERM and restart (a real process) ------------------------------------------

class Process:
    """`kopilka serve --insecure` on a free loopback port; its stderr (JSON
    log lines) is drained by a thread."""

    def __init__(self, data):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopilka.servers.cli", "serve", "--insecure",
             "--data", data, "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines = []
        ready = queue.Queue()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("message") == "serving":
                    ready.put(entry["port"])
            ready.put(None)
        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        self.port = ready.get(timeout=30)
        assert self.port, "".join(self.lines)
        with open(os.path.join(data, "admin.token")) as f:
            self.metadata = (("authorization", f"Bearer {f.read().strip()}"),)
        self.channels = []

    def channel(self):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.channels.append(channel)
        return channel

    def terminate(self):
        """SIGTERM; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        finally:
            for channel in self.channels:
                channel.close()
        self._drain.join(10)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _init(data):
    done = subprocess.run([sys.executable, "-m", "kopilka.servers.cli", "init",
                           "--data", data], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # members with points, straight into the ledger (the server is not running)
    config = Config(data=data)
    with Ledger(config.ledger_path, map_size=config.map_size) as ledger:
        program = Registry.load(ledger).ids()[0]
        batch = Batch()
        for i in range(MEMBERS):
            batch.open_account(f"t/open/{i}", program, f"m{i}".encode())
        opened = ledger.apply(batch, 1)
        members = [r.a for r in opened]
        batch = Batch()
        for i, account in enumerate(members):
            batch.earn(f"t/earn/{i}", account, 1_000_000, activates_at=0,
                       expires_at=NEVER)
        assert all(r.code == 0 for r in ledger.apply(batch, 1))
    return program, members


def _hold(program, member, op_id):
    return checkout_pb2.HoldRequest(operation_id=op_id, lane=LANE,
                                    member=f"programs/{program}/members/{member}",
                                    points=1)


def test_sigterm_with_holds_in_flight_loses_nothing_and_restart_resumes(tmp_path):
    data = str(tmp_path / "data")
    program, members = _init(data)
    server = Process(data)
    outcomes = {}          # op id -> (account, "OK" or the error code's name)
    lock = threading.Lock()
    enough = threading.Event()
    try:
        def client(number):
            stub = checkout_pb2_grpc.CheckoutStub(server.channel())
            account = members[number % MEMBERS]
            for i in range(10_000):
                op_id = f"c{number}/h{i}"
                try:
                    stub.Hold(_hold(program, account, op_id),
                              metadata=server.metadata, timeout=WAIT)
                    result = "OK"
                except grpc.RpcError as err:
                    result = err.code().name
                with lock:
                    outcomes[op_id] = (account, result)
                    if sum(r == "OK" for _, r in outcomes.values()) >= 100:
                        enough.set()
                if result != "OK":
                    return
        clients = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for t in clients:
            t.start()
        assert enough.wait(30)
        assert server.terminate() == 0, "".join(server.lines[-5:])
        for t in clients:
            t.join(30)
    finally:
        server.kill()
    stopped = [json.loads(line)["message"] for line in server.lines
               if line.startswith("{")]
    assert stopped[-2:] == ["stopping", "stopped"]

    answered = {op for op, (_, result) in outcomes.items() if result == "OK"}
    failed = {op: result for op, (_, result) in outcomes.items() if result != "OK"}
    assert len(failed) == CLIENTS          # each client stopped at its first failure
    assert set(failed.values()) <= {"UNAVAILABLE", "CANCELLED"}, failed
    config = Config(data=data)
    with Ledger(config.ledger_path, map_size=config.map_size) as ledger:
        assert all(ledger.operation(op.encode()) is not None for op in answered)
        head = ledger.head()[0]
        assert ledger.audit() == []

    server = Process(data)
    try:
        channel = server.channel()
        admin = admin_pb2_grpc.AdminStub(channel)
        assert admin.GetStats(admin_pb2.GetStatsRequest(), metadata=server.metadata,
                              timeout=WAIT).head_cursor == head
        audit = admin.Audit(admin_pb2.AuditRequest(), metadata=server.metadata,
                            timeout=WAIT)
        assert audit.clean and audit.head_cursor == head
        stub = checkout_pb2_grpc.CheckoutStub(channel)
        for op in sorted(failed):        # retried after the restart: they succeed
            account = outcomes[op][0]
            stub.Hold(_hold(program, account, op), metadata=server.metadata,
                      timeout=WAIT)
        for op in sorted(answered)[:5]:  # an answered one is answered again
            again = stub.Hold(_hold(program, outcomes[op][0], op),
                              metadata=server.metadata, timeout=WAIT)
            assert again.replayed
        assert server.terminate() == 0
    finally:
        server.kill()

    # every hold is in the ledger exactly once
    with Ledger(config.ledger_path, map_size=config.map_size) as ledger:
        assert ledger.audit() == []
        for account in members:
            issued = sum(1 for a, _ in outcomes.values() if a == account)
            assert len(ledger.account(account).holds) == issued
        assert all(ledger.operation(op.encode()) is not None for op in outcomes)


# --- deadlines ---------------------------------------------------------------------

class Gate:
    """Stands in for the writer's ledger: the first apply waits until
    `release` (the writer is busy), the rest go straight through."""

    def __init__(self, ledger):
        self._ledger = ledger
        self.entered, self.release = threading.Event(), threading.Event()
        self._armed = True

    def apply(self, batch, now):
        if self._armed:
            self._armed = False
            self.entered.set()
            self.release.wait(WAIT)
        return self._ledger.apply(batch, now)

    def __getattr__(self, name):
        return getattr(self._ledger, name)


class Queued:
    """The writer's queue, telling the test when a request is in it."""

    def __init__(self, inner):
        self._inner = inner
        self.put_one = threading.Event()

    def put(self, item):
        self._inner.put(item)
        self.put_one.set()

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data", metrics_port=0)
    install_program(server)
    yield server
    server.stop()


def block_writer(srv):
    """Holds the writer inside a commit (of a Hold it is given); returns
    (gate, queue watcher, the blocked Hold's future)."""
    account = open_member(srv, 1, "blocker", points=100)
    writer = srv.server.writer
    gate = Gate(writer._ledger)
    writer._ledger = gate
    pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    first = pos.Hold.future(_hold(1, account, "blocker/h"), timeout=WAIT)
    assert gate.entered.wait(WAIT)
    # the writer thread is in apply, not waiting on its queue: safe to wrap it
    queued = writer._queue = Queued(writer._queue)
    return gate, queued, first


def test_a_request_whose_deadline_passes_before_its_batch_is_not_applied(srv):
    account = open_member(srv, 1, "late", points=100)
    pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    gate, queued, first = block_writer(srv)
    late = pos.Hold.future(_hold(1, account, "late/h"), timeout=WAIT)
    assert queued.put_one.wait(WAIT)
    srv.monotonic.offset += 3600      # the writer sees the deadline long gone
    gate.release.set()
    assert first.result().held_points == 1
    with pytest.raises(grpc.RpcError) as caught:
        late.result()
    assert error_info(caught.value) == ("DEADLINE_EXCEEDED", "DEADLINE_PASSED", [])
    ledger = srv.server.ledger
    assert ledger.operation(b"late/h") is None
    assert ledger.balances(account, srv.clock.now).available == 100
    metrics = srv.server.metrics.registry.get_sample_value
    assert metrics("kopilka_deadline_expired_total") == 1
    # the same request again, in time
    again = pos.Hold(_hold(1, account, "late/h"), timeout=WAIT)
    assert (again.held_points, again.replayed) == (1, False)
    assert pos.Hold(_hold(1, account, "late/h"), timeout=WAIT).replayed
    assert ledger.balances(account, srv.clock.now).available == 99


# --- metrics -----------------------------------------------------------------------

def scrape(srv):
    port = srv.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_server_bug_is_internal_counted_and_tells_nothing(srv, monkeypatch):
    """An unexpected exception in a handler: INTERNAL (not gRPC's UNKNOWN),
    a message that quotes nothing of it, counted under its method."""
    from kopilka.servers import checkout_ops
    account = open_member(srv, 1, "m1", points=100)

    def broken(*args, **kwargs):
        raise RuntimeError("card 4000001234567899 broke it")
    monkeypatch.setattr(checkout_ops, "pack", broken)
    pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    with pytest.raises(grpc.RpcError) as caught:
        pos.Hold(_hold(1, account, "h-bug"), timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(caught.value)[:2] == ("INTERNAL", "INTERNAL_ERROR")
    assert "4000" not in caught.value.details()
    monkeypatch.undo()
    pos.Hold(_hold(1, account, "h-fine"), timeout=WAIT)
    s = scrape(srv)
    hold_method = "/kopilka.v1.Checkout/Hold"
    assert sample(s, "kopilka_rpcs_total", method=hold_method, code="INTERNAL") == 1
    assert sample(s, "kopilka_rpcs_total", method=hold_method, code="OK") == 1
    assert sample(s, "kopilka_rpc_seconds_count", method=hold_method) == 2


def test_metrics_over_http(srv):
    hold_method = "/kopilka.v1.Checkout/Hold"
    account = open_member(srv, 1, "m1", points=100)
    pos = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    for i in range(5):
        pos.Hold(_hold(1, account, f"h{i}"), timeout=WAIT)
    for role in ("pos43", None):
        stub = (srv.stub(checkout_pb2_grpc.CheckoutStub, role) if role else
                checkout_pb2_grpc.CheckoutStub(srv.channel()))
        with pytest.raises(grpc.RpcError):
            stub.Hold(_hold(1, account, "refused"), timeout=WAIT)
    with pytest.raises(grpc.RpcError):
        pos.Hold(_hold(1, account, ""), timeout=WAIT)

    s = scrape(srv)
    rpcs = "kopilka_rpcs_total"
    assert sample(s, rpcs, method=hold_method, code="OK") == 5
    assert sample(s, rpcs, method=hold_method, code="PERMISSION_DENIED") == 1
    assert sample(s, rpcs, method=hold_method, code="UNAUTHENTICATED") == 1
    assert sample(s, rpcs, method=hold_method, code="INVALID_ARGUMENT") == 1
    assert sample(s, "kopilka_rpc_seconds_count", method=hold_method) == 8
    commits = sample(s, "kopilka_batch_operations_count")
    assert commits >= 5 and sample(s, "kopilka_batch_operations_sum") >= 5 + 3
    assert sample(s, "kopilka_batch_operations_bucket", le="1.0") >= 1
    assert sample(s, "kopilka_commit_seconds_count") == commits
    assert sample(s, "kopilka_commit_seconds_bucket", le="+Inf") == commits
    assert sample(s, "kopilka_lmdb_map_size_bytes") == 256 << 20
    used = sample(s, "kopilka_lmdb_map_used_bytes")
    assert 0 < used < 256 << 20
    assert used <= sample(s, "kopilka_lmdb_file_bytes") <= 256 << 20  # the map, without writemap
    assert sample(s, "kopilka_writer_queue_depth") == 0
    assert sample(s, "kopilka_feed_subscribers") == 0

    # the map's use follows the commits
    for i in range(50):
        open_member(srv, 1, f"bulk{i}", card=f"90{i:06d}", points=10)
    assert sample(scrape(srv), "kopilka_lmdb_map_used_bytes") > used

    # a subscriber
    feed = srv.stub(feed_pb2_grpc.FeedStub, "integration").Subscribe(
        feed_pb2.SubscribeRequest(from_cursor=0), timeout=WAIT)
    next(feed)
    assert sample(scrape(srv), "kopilka_feed_subscribers") == 1
    feed.cancel()

    # a request waiting while the writer commits
    gate, queued, first = block_writer(srv)
    waiting = pos.Hold.future(_hold(1, account, "queued"), timeout=WAIT)
    assert queued.put_one.wait(WAIT)
    assert sample(scrape(srv), "kopilka_writer_queue_depth") == 1
    gate.release.set()
    first.result()
    waiting.result()
    assert sample(scrape(srv), "kopilka_writer_queue_depth") == 0

    port = srv.server.metrics_port
    srv.stop()
    srv.stop = lambda: None            # the fixture's stop: done already
    with pytest.raises(urllib.error.URLError):   # the port is closed with the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT)


def test_the_server_writes_in_the_map_only_when_told_to(tmp_path):
    data = tmp_path / "data"
    srv = RunningServer(data)
    try:
        install_program(srv)
        member = open_member(srv, 1, "m1", points=10)
        assert srv.server.ledger.info()["writemap"] is False
    finally:
        srv.stop()
    srv = RunningServer(data, writemap=True)
    try:
        info = srv.server.ledger.info()
        assert info["writemap"] and info["used"] <= info["mapped"] < info["map_size"]
        assert srv.server.ledger.balances(member, srv.clock.now).balance == 10
        assert srv.server.ledger.audit() == []
    finally:
        srv.stop()
