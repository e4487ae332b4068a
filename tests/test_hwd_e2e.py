"""The hwd against the REAL Kopilka server: pty readers -> hwd -> Store -> a POS's WatchLane.

tests/test_hwd_daemon.py drives the daemon against a small test core
(tests/hwd_core.py). Here the other end is the server itself
(tests/server_harness.py: in this process, on a loopback port, with its
ledger in a temporary directory): the hwd streams to `Store.StreamCardReads`
with an hwd token of store 42, and a POS with a pos token watches the lane
with `Store.WatchLane`, as at a till. The server is then stopped while
cashiers go on swiping (the reads spool), restarted on the same port and data
directory, and every read reaches the POS once, in order.

Time. The hwd and the server share one hand-moved clock (the harness's), so
no read is ever stale and the double-swipe window never passes (every swipe
is a different card). The hwd's backoff sleeps never wait: the uplink's is a
`Gate` the test holds closed while the server is down, so the restarted
server's POS watch is in place before the hwd delivers its spool (a read the
core takes while nobody watches its lane is acknowledged but shown to no one:
see the `Gate` doc). Waiting is on the POS's stream (a queue with a deadline)
or polling the daemon's health with a deadline, never a sleep sized to let
time pass.
"""

import asyncio
import queue
import threading
import time
from unittest import mock

import grpc
import pytest
import server_harness
from hwd_core import Jitter, Pty, wait_for
from kopilka.hwd.barcode import with_check_digit
from kopilka.hwd.config import from_mapping
from kopilka.hwd.daemon import Daemon
from kopilka.hwd.simulate import luhn_complete
from kopilka.v1 import store_pb2, store_pb2_grpc
from server_harness import RunningServer, install_program, open_member

LANE = "stores/42/lanes/1"
WAIT = 5.0
STRIPES = [luhn_complete(f"77890000{i:07d}") for i in range(1, 40)]
CODES = [with_check_digit(f"2000000{i:05d}") for i in range(1, 40)]


def swipe(card):
    return f";{card}=2912101?\r".encode()


def scan(code):
    return f"]E0{code}\r".encode()


# -- the harness, on a port of our choosing ---------------------------------------------

def start_server(data, port=0, clock=None):
    """A `RunningServer` listening on 127.0.0.1:`port` (0: any free port).

    The harness always binds port 0; a core that restarts must come back
    where the hwd looks for it, so its `Config` is given our `listen`."""
    make_config = server_harness.Config

    def on_port(**fields):
        fields["listen"] = f"127.0.0.1:{port}"
        return make_config(**fields)

    with mock.patch.object(server_harness, "Config", on_port):
        return RunningServer(data, clock=clock)


def card_reads(srv, outcome):
    value = srv.server.metrics.registry.get_sample_value("kopilka_card_reads_total",
                                                         {"outcome": outcome})
    return int(value or 0)


# -- the till ---------------------------------------------------------------------------------

class Pos:
    """A POS watching one lane: WatchLane's events, read on a thread into a queue.

    Built once the watch is live (its `started` event received): from then on
    the server publishes the lane's reads to it."""

    def __init__(self, srv, lane=LANE):
        self.events = queue.Queue()
        self._call = srv.stub(store_pb2_grpc.StoreStub, "pos").WatchLane(
            store_pb2.WatchLaneRequest(lane=lane), timeout=60)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        first = self.next()
        assert first.WhichOneof("event") == "started" and first.started.lane == lane

    def _run(self):
        try:
            for event in self._call:
                self.events.put(event)
        except grpc.RpcError as e:
            self.events.put(e)
        else:
            self.events.put(None)

    def next(self, timeout=WAIT):
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no WatchLane event within {timeout} s")
        if not isinstance(item, store_pb2.WatchLaneResponse):
            pytest.fail(f"the watch ended: {item!r}")
        return item

    def ended(self, timeout=WAIT):
        """The status code the watch ended with (the server went away)."""
        item = self.events.get(timeout=timeout)
        assert not isinstance(item, store_pb2.WatchLaneResponse), item
        return item.code() if item is not None else None

    def close(self):
        self._call.cancel()
        self._thread.join(WAIT)


def read_of(event):
    kind = event.WhichOneof("event")
    assert kind in ("card_presented", "unknown_card", "card_refused"), event
    return getattr(event, kind).read


# -- the hwd -------------------------------------------------------------------------------------

class Gate:
    """The uplink's backoff sleep: never waits the delay; while closed, holds
    the uplink after a failed connection until `open()`.

    The test closes it before stopping the server and opens it once the
    restarted server's POS watch is live. Without it, which comes first after
    a restart, the hwd's spool or the POS's new watch, is a race; a read the
    server takes before the lane is watched is acknowledged and shown to no
    one (the server publishes only to watchers present, by design)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open, self._waiters = True, []

    def close(self):
        with self._lock:
            self._open = False

    def open(self):
        with self._lock:
            self._open, waiters, self._waiters = True, self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    @property
    def holding(self):
        with self._lock:
            return len(self._waiters)

    async def __call__(self, seconds):
        with self._lock:
            event = None if self._open else asyncio.Event()
            if event is not None:
                self._waiters.append((asyncio.get_running_loop(), event))
        if event is None:
            await asyncio.sleep(0.002)      # yield, so a retry loop does not spin
        else:
            await event.wait()


class Sleep:
    """A reader's backoff sleep: yields a millisecond, never waits the delay."""

    def __call__(self, seconds):
        time.sleep(0.001)


def hwd_config(tmp_path, address, token, msr, scanner):
    def reader(reader_id, port, framing):
        return {"id": reader_id, "port": port, "lane": 1, "read_timeout_ms": 20,
                "backoff_base_ms": 20, "backoff_cap_ms": 80, "framing": framing}

    return from_mapping({
        "store": 42,
        "core": {"address": address, "token": token, "insecure": True,
                 "backoff_base_ms": 20, "backoff_cap_ms": 100},
        "policy": {"ranges": [
            {"prefix": "7789", "length": 16, "luhn": True, "sources": ["track2"]},
            {"prefix": "2", "length": 13, "sources": ["barcode"]}]},
        "dedup": {"window_ms": 1500},
        "spool": {"path": str(tmp_path / "spool.db"), "max_reads": 1000,
                  "stale_after_s": 900},
        "metrics": {"address": ""},
        "readers": [reader("lane1-msr", msr.path, {"kind": "magstripe", "tracks": [2]}),
                    reader("lane1-scanner", scanner.path,
                           {"kind": "barcode", "aim": "required"})],
    })


@pytest.fixture
def cleanup():
    """Stops, in reverse order, what the test registers (daemon, servers, ptys)."""
    stack = []
    yield stack.append
    errors = []
    for stop in reversed(stack):
        try:
            stop()
        except Exception as e:  # noqa: BLE001 -- stop the rest, then fail
            errors.append(e)
    assert not errors, errors


def test_reads_reach_the_pos_through_the_real_server_and_survive_its_restart(
        tmp_path, cleanup):
    data = tmp_path / "data"
    clock = server_harness.Clock()
    srv = start_server(data, clock=clock)
    running = [srv]                 # stopped at the end unless the test stopped it
    cleanup(lambda: running and running.pop().stop())
    port = srv.port
    install_program(srv)
    alice = open_member(srv, 1, "alice", card=STRIPES[0], points=250)
    bob = open_member(srv, 1, "bob", card=CODES[0], points=40)
    members = {STRIPES[0]: (f"programs/1/members/{alice}", 250),
               CODES[0]: (f"programs/1/members/{bob}", 40)}

    msr, scanner = Pty(), Pty()
    cleanup(msr.unplug)
    cleanup(scanner.unplug)
    readers = {  # port -> (frame, reader id, source)
        msr: (swipe, "lane1-msr", store_pb2.CARD_READ_SOURCE_TRACK2),
        scanner: (scan, "lane1-scanner", store_pb2.CARD_READ_SOURCE_BARCODE)}
    gate = Gate()
    daemon = Daemon(hwd_config(tmp_path, srv.address, srv.tokens["hwd"], msr, scanner),
                    clock=clock, reader_sleep=Sleep(), uplink_sleep=gate, rng=Jitter(),
                    status_interval=0.05)

    def stop_daemon():
        gate.open()
        assert daemon.stop(timeout=3.0), "the daemon did not stop"

    cleanup(stop_daemon)
    daemon.start()
    pos = Pos(srv)
    cleanup(pos.close)
    wait_for(lambda: all(r.health().state == "connected" for r in daemon.readers)
             and daemon.uplink.health().state == "connected", what="readers and core up")

    def present(port_, card):
        frame = readers[port_][0]
        port_.write(frame(card))

    def check(event, port_, card):
        """The event is this swipe's: the member and balance, or an unknown card."""
        _, reader, source = readers[port_]
        read = read_of(event)
        assert (read.lane, read.reader, read.card_number, read.source) == \
            (LANE, reader, card, source)
        assert read.symbology == ("ean13" if port_ is scanner else "")
        if card in members:
            member, points = members[card]
            assert event.WhichOneof("event") == "card_presented", event
            assert event.card_presented.member == member
            assert event.card_presented.balances.available_points == points
        else:
            assert event.WhichOneof("event") == "unknown_card", event
        return read.read_id

    # -- live: each swipe on the POS's screen, a member with their balance, or unknown
    delivered = []
    live = [(msr, STRIPES[0]), (scanner, CODES[0]), (msr, STRIPES[1]), (scanner, CODES[1])]
    for port_, card in live:
        present(port_, card)
        delivered.append(check(pos.next(), port_, card))
    wait_for(lambda: daemon.spool.depth() == 0, what="every live read acknowledged")
    assert daemon.uplink.health().acks == {"accepted": 4}
    assert (card_reads(srv, "accepted"), card_reads(srv, "duplicate")) == (4, 0)

    # -- the core goes down; the POS's watch ends, cashiers go on swiping
    gate.close()
    running.pop().stop()
    assert pos.ended() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    wait_for(lambda: daemon.uplink.health().state == "disconnected" and gate.holding,
             what="the uplink down, held at the gate")
    clock.advance(2_000_000)        # past the double-swipe window: alice and bob again
    down = [(msr, STRIPES[0]), (scanner, CODES[2]), (msr, STRIPES[2]), (scanner, CODES[0]),
            (msr, STRIPES[3]), (scanner, CODES[3]), (msr, STRIPES[4]), (msr, STRIPES[5])]
    for i, (port_, card) in enumerate(down):
        present(port_, card)
        wait_for(lambda i=i: daemon.spool.depth() == i + 1, what=f"read {i} spooled")
    spooled = [read.read_id for read in daemon.spool.pending(100)]
    assert len(set(spooled)) == len(down)

    # -- the core comes back on the same port and data; the POS watches again
    srv = start_server(data, port=port, clock=clock)
    running.append(srv)
    assert srv.port == port
    pos = Pos(srv)
    cleanup(pos.close)
    gate.open()                     # now the hwd may reconnect and send its spool
    for read_id, (port_, card) in zip(spooled, down):
        assert check(pos.next(), port_, card) == read_id     # in order
        delivered.append(read_id)
    wait_for(lambda: daemon.spool.depth() == 0, what="the spool delivered")

    # a last swipe: the next event on the lane is that one, so nothing came twice
    present(scanner, CODES[4])
    delivered.append(check(pos.next(), scanner, CODES[4]))
    wait_for(lambda: daemon.spool.depth() == 0, what="the last read acknowledged")
    assert pos.events.empty()

    reads = sum(r.health().reads for r in daemon.readers)
    assert len(delivered) == len(set(delivered)) == reads == len(live) + len(down) + 1
    assert daemon.uplink.health().acks == {"accepted": reads}
    assert daemon.uplink.health().reconnects == 1
    assert (card_reads(srv, "accepted"), card_reads(srv, "duplicate")) == \
        (len(down) + 1, 0)
