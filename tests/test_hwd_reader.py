"""The hwd's reader runtime and spool, on real serial ports.

Readers are pseudo-terminals: the Reader opens the slave's device path
through pyserial, the test writes frames to the master, as a card reader on
a USB-serial cable would. Unplugging is closing the master (the slave's
read fails, its device node goes away); the port is reached through a
symlink the test re-points, as a `/dev/serial/by-id/` path is after a
replug. Backoff delays are recorded by an injected `sleep` that never waits
them; everything else polls with short timeouts in bounded loops.
"""

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import serial

from kopilka.hwd.events import GARBAGE, NOT_A_CARD, TRACK2, LaneRead
from kopilka.hwd.filters import CardNumberPolicy, Deduplicator
from kopilka.hwd.framing import MagstripeFraming
from kopilka.hwd.reader import (BUSY, CONFIG, CONNECTED, DISCONNECTED, IO, MISSING,
                                PERMISSION, STOPPED, Reader, SerialSettings)
from kopilka.hwd.spool import Spool

CARD = "7789000012345676"
OTHER = "7789000000000010"
SWIPE = b";7789000012345676=2912101?\r"
OTHER_SWIPE = b";7789000000000010=2912101?\r"
BANK_SWIPE = b";4111111111111111=2912101?\r"
POLICY = CardNumberPolicy.from_mapping({"ranges": [{"prefix": "7789", "length": 16,
                                                    "luhn": True}]})
FRAMING = MagstripeFraming(tracks=(2,))
LANE = "stores/42/lanes/3"
WINDOW_US = 2_000_000
SETTINGS = SerialSettings(read_timeout=0.02, backoff_base=0.1, backoff_cap=0.4)
DEADLINE = 3.0


def wait_for(predicate, timeout=DEADLINE, what="condition"):
    """Poll `predicate` every few milliseconds; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.003)
    raise AssertionError(f"timed out waiting for {what}")


class Pty:
    """A virtual serial port: write to `master`, the reader opens `path`."""

    def __init__(self):
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)         # the reader opens its own; the node lives with the master

    def write(self, data):
        os.write(self.master, data)

    def unplug(self):
        if self.master is not None:
            os.close(self.master)
            self.master = None


class Clock:
    """Integer microseconds the test moves by hand."""

    def __init__(self, now=1_700_000_000_000_000):
        self.now = now

    def __call__(self):
        return self.now


class Jitter:
    """rng.random() always half-way: delays are half the backoff ceiling."""

    def random(self):
        return 0.5


class Sleeps:
    """Records each backoff delay; yields the CPU for a millisecond, no more."""

    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)
        time.sleep(0.001)


def symlink_to(link, target):
    """Point `link` at `target` atomically (as udev re-points a by-id link)."""
    tmp = f"{link}.new"
    os.symlink(target, tmp)
    os.replace(tmp, link)


def unplug(pty, link):
    """As on a real unplug, the by-id link goes, then the tty.

    Removing the link also matters to the test: the kernel reuses pty
    numbers, so a reader retrying a dead /dev/pts/N could open some other
    process's new pty (a parallel test run's)."""
    os.unlink(link)
    pty.unplug()


@pytest.fixture
def make_reader():
    readers, ptys = [], []

    def make(port, name="lane3-msr", sink=None, clock=None, sleep=None, dedupe=None,
             settings=SETTINGS, start=True):
        reads = [] if sink is None else None
        reader = Reader(name, port, settings, FRAMING, POLICY, LANE,
                        dedupe or Deduplicator(WINDOW_US),
                        sink or reads.append, clock or Clock(), sleep or Sleeps(), Jitter())
        reader.reads = reads
        readers.append(reader)
        if start:
            reader.start()
        return reader

    make.ptys = ptys
    yield make
    for reader in readers:
        assert reader.stop(timeout=2.0), f"reader {reader.name} did not stop"
    for pty in ptys:
        pty.unplug()


@pytest.fixture
def pty(make_reader):
    p = Pty()
    make_reader.ptys.append(p)
    return p


def connected(reader):
    return reader.health().state == CONNECTED


# -- reads --------------------------------------------------------------------

def test_a_swipe_becomes_one_read_with_lane_reader_and_time(make_reader, pty):
    clock = Clock()
    reader = make_reader(pty.path, clock=clock)
    wait_for(lambda: connected(reader), what="connected")
    pty.write(SWIPE[:10])       # a frame split across serial reads
    time.sleep(0.03)
    pty.write(SWIPE[10:])
    wait_for(lambda: reader.reads, what="a read")
    (read,) = reader.reads
    assert isinstance(read, LaneRead)
    assert (read.card_number, read.source, read.lane, read.reader, read.read_time_us) == \
        (CARD, TRACK2, LANE, "lane3-msr", clock.now)
    assert read.read_id == f"{reader.session}-1"
    health = reader.health()
    assert (health.state, health.reads, health.last_read_us, health.rejects) == \
        (CONNECTED, 1, clock.now, {})
    assert CARD not in repr(read)


def test_a_double_swipe_within_the_window_is_one_read(make_reader, pty):
    clock = Clock()
    reader = make_reader(pty.path, clock=clock)
    wait_for(lambda: connected(reader), what="connected")
    pty.write(SWIPE + SWIPE)                     # both in one serial read
    wait_for(lambda: reader.health().duplicates == 1, what="duplicate")
    clock.now += WINDOW_US - 1
    pty.write(SWIPE)                             # still within the window
    wait_for(lambda: reader.health().duplicates == 2, what="second duplicate")
    pty.write(OTHER_SWIPE)                       # another card on the lane
    wait_for(lambda: len(reader.reads) == 2, what="two reads")
    clock.now += WINDOW_US
    pty.write(OTHER_SWIPE)                       # the window has passed
    wait_for(lambda: len(reader.reads) == 3, what="three reads")
    assert [r.card_number for r in reader.reads] == [CARD, OTHER, OTHER]
    assert len({r.read_id for r in reader.reads}) == 3
    assert reader.health().reads == 3


def test_garbage_and_a_bank_card_are_rejected_counted_and_not_logged(make_reader, pty,
                                                                     caplog):
    caplog.set_level("DEBUG", logger="kopilka.hwd")
    reader = make_reader(pty.path)
    wait_for(lambda: connected(reader), what="connected")
    pty.write(b"\x00\xffnoise 4111111111111111\r\n")
    pty.write(BANK_SWIPE)
    pty.write(SWIPE)
    wait_for(lambda: reader.reads, what="the good read after the bad ones")
    assert reader.health().rejects == {GARBAGE: 1, NOT_A_CARD: 1}
    assert [r.card_number for r in reader.reads] == [CARD]
    assert "4111" not in caplog.text and "7789" not in caplog.text


def test_read_ids_differ_across_restarts(make_reader, pty):
    first = make_reader(pty.path, start=False)
    again = make_reader(pty.path, start=False)
    assert first.session != again.session
    assert len(first.session) == 32 and int(first.session, 16) >= 0


# -- unplug, busy, independence ------------------------------------------------

def test_unplug_then_replug_reconnects_with_capped_jittered_backoff(make_reader, tmp_path):
    link = tmp_path / "usb-Acme_MSR_0001-if00"
    first = Pty()
    make_reader.ptys.append(first)
    symlink_to(link, first.path)
    sleeps = Sleeps()
    reader = make_reader(str(link), sleep=sleeps)
    wait_for(lambda: connected(reader), what="connected")
    first.write(SWIPE)
    wait_for(lambda: reader.reads, what="a read")
    first.write(OTHER_SWIPE[:12])                # a swipe cut short by the unplug
    wait_for(lambda: reader._parser.buffered == 12, what="the half swipe taken in")
    unplug(first, link)
    # The read fails (io), the half swipe is counted, the link is gone (missing).
    wait_for(lambda: len(sleeps.delays) >= 6, what="retries")
    health = reader.health()
    assert (health.state, health.last_error) == (DISCONNECTED, MISSING)
    assert health.rejects == {"HALF_SWIPE": 1}
    # Half of min(cap 0.4, base 0.1 * 2**n): 0.05, 0.1, 0.2, then capped at 0.2.
    assert sleeps.delays[:4] == pytest.approx([0.05, 0.1, 0.2, 0.2])
    assert sleeps.delays[3:] == pytest.approx([0.2] * len(sleeps.delays[3:]))

    second = Pty()
    make_reader.ptys.append(second)
    symlink_to(link, second.path)                # plugged back in: a new tty
    wait_for(lambda: connected(reader), what="reconnected")
    assert reader.health().reconnects == 1
    second.write(OTHER_SWIPE)
    wait_for(lambda: len(reader.reads) == 2, what="a read after the replug")
    assert reader.reads[1].read_id == f"{reader.session}-2"


def test_a_read_error_while_connected_is_io(make_reader, pty, tmp_path):
    # The read on the open port fails (io); the next open finds nothing (missing).
    link = tmp_path / "usb-Acme_MSR_0002-if00"
    symlink_to(link, pty.path)
    seen = []

    def sleep(seconds):
        seen.append(reader.health().last_error)
        time.sleep(0.001)

    reader = make_reader(str(link), sleep=sleep, start=False)
    reader.start()
    wait_for(lambda: connected(reader), what="connected")
    unplug(pty, link)
    wait_for(lambda: len(seen) >= 2, what="retries")
    assert seen[0] == IO and seen[1] == MISSING


HOLDER = """
import serial, sys
port = serial.Serial(sys.argv[1], exclusive=True)   # flock(LOCK_EX), as another hwd would
print("held", flush=True)
sys.stdin.read()
"""


def test_a_port_held_by_another_process_is_busy_until_released(make_reader, pty):
    with subprocess.Popen([sys.executable, "-c", HOLDER, pty.path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            sleeps = Sleeps()
            reader = make_reader(pty.path, sleep=sleeps)
            wait_for(lambda: len(sleeps.delays) >= 3, what="retries while busy")
            health = reader.health()
            assert (health.state, health.last_error, health.reconnects) == \
                (DISCONNECTED, BUSY, 0)
            holder.stdin.close()                 # the other process lets go
            assert holder.wait(timeout=DEADLINE) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
    wait_for(lambda: connected(reader), what="connected once released")
    assert reader.health().reconnects == 1
    pty.write(SWIPE)
    wait_for(lambda: reader.reads, what="a read")


def test_one_broken_reader_does_not_stop_another(make_reader, pty, tmp_path):
    sink, dedupe = [], Deduplicator(WINDOW_US)
    broken = make_reader(str(tmp_path / "no-such-port"), name="lane3-scanner",
                         sink=sink.append, dedupe=dedupe)
    working = make_reader(pty.path, name="lane3-msr", sink=sink.append, dedupe=dedupe)
    wait_for(lambda: connected(working), what="connected")
    for card_swipe in (SWIPE, OTHER_SWIPE):
        pty.write(card_swipe)
    wait_for(lambda: len(sink) == 2, what="reads from the working reader")
    assert {r.reader for r in sink} == {"lane3-msr"}
    assert broken.health().state == DISCONNECTED
    assert broken.health().last_error == MISSING


def test_open_errors_are_told_apart(make_reader, pty):
    # pyserial's own errors, through an injected open_port: each kind shows in
    # the health, and the reader goes on trying until the port opens.
    failures = [serial.SerialException(errno.EACCES, "could not open port"),
                ValueError("invalid URL"),
                serial.SerialException(errno.EBUSY, "could not open port")]
    kinds = []

    def open_port(url, **kwargs):
        if failures:
            raise failures.pop(0)
        return serial.serial_for_url(url, **kwargs)

    def sleep(seconds):
        kinds.append(reader.health().last_error)

    reader = Reader("lane3-msr", pty.path, SETTINGS, FRAMING, POLICY, LANE,
                    Deduplicator(WINDOW_US), lambda read: None, Clock(), sleep, Jitter(),
                    open_port)
    reader.start()
    try:
        wait_for(lambda: connected(reader), what="connected after three failures")
        assert kinds == [PERMISSION, CONFIG, BUSY]
        assert reader.health().reconnects == 1
    finally:
        assert reader.stop(timeout=2.0)


def test_stop_is_prompt_even_in_a_long_backoff(tmp_path):
    reader = Reader("lane1-msr", str(tmp_path / "absent"),
                    SerialSettings(backoff_base=30.0, backoff_cap=60.0), FRAMING, POLICY,
                    LANE, Deduplicator(WINDOW_US), lambda read: None, Clock())
    reader.start()                               # real sleep, real jitter
    wait_for(lambda: reader.health().last_error == MISSING, what="a failed open")
    began = time.monotonic()
    assert reader.stop(timeout=2.0)
    assert time.monotonic() - began < 1.0
    assert reader.health().state == STOPPED


def test_a_failing_sink_is_counted_and_the_reader_goes_on(make_reader, pty):
    delivered = []

    def sink(read):
        if not delivered:
            delivered.append(None)
            raise OSError("disk full")
        delivered.append(read)

    reader = make_reader(pty.path, sink=sink)
    wait_for(lambda: connected(reader), what="connected")
    pty.write(SWIPE + OTHER_SWIPE)
    wait_for(lambda: len(delivered) == 2, what="the second read")
    health = reader.health()
    assert (health.sink_errors, health.reads, health.state) == (1, 1, CONNECTED)


# -- spool --------------------------------------------------------------------

def lane_read(i, time_us=1_000_000):
    return LaneRead(f"s-{i}", LANE, "lane3-msr", CARD, TRACK2, None, time_us + i)


def test_spool_keeps_order_and_removes_only_acknowledged_reads(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        for i in range(5):
            assert spool.put(lane_read(i))
        assert spool.put(lane_read(2))           # the same read id again: a no-op
        assert spool.depth() == 5
        assert spool.pending(3) == [lane_read(0), lane_read(1), lane_read(2)]
        assert spool.ack("s-1") and spool.ack("s-0")
        assert not spool.ack("s-1") and not spool.ack("never")
        assert [r.read_id for r in spool.pending(10)] == ["s-2", "s-3", "s-4"]
        assert spool.depth() == 3
    with Spool(tmp_path / "spool.db") as spool:  # reopened: the same reads, in order
        assert [r.read_id for r in spool.pending(10)] == ["s-2", "s-3", "s-4"]
        assert spool.depth() == 3
        assert os.stat(tmp_path / "spool.db").st_mode & 0o077 == 0


def test_spool_refuses_new_reads_when_full(tmp_path):
    with Spool(tmp_path / "spool.db", max_reads=3) as spool:
        assert all(spool.put(lane_read(i)) for i in range(3))
        assert not spool.put(lane_read(3))
        assert not spool.put(lane_read(4))
        assert (spool.depth(), spool.dropped_full) == (3, 2)
        assert [r.read_id for r in spool.pending(10)] == ["s-0", "s-1", "s-2"]
        spool.ack("s-0")
        assert spool.put(lane_read(5))
        assert [r.read_id for r in spool.pending(10)] == ["s-1", "s-2", "s-5"]


def test_spool_drops_and_counts_stale_reads(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        for i in range(5):                       # read at 1_000_000 + i
            spool.put(lane_read(i))
        # At now = 1_000_103 with max age 100: reads before 1_000_003 are stale.
        assert spool.drop_stale(1_000_103, 100) == 3
        assert [r.read_id for r in spool.pending(10)] == ["s-3", "s-4"]
        assert spool.drop_stale(1_000_103, 100) == 0
        assert (spool.depth(), spool.dropped_stale) == (2, 3)


SPOOL_CHILD = """
import sys
from kopilka.hwd.events import LaneRead
from kopilka.hwd.spool import Spool
spool = Spool(sys.argv[1])
i = 0
while True:
    spool.put(LaneRead(f"r-{i}", "stores/42/lanes/3", "msr", "7789000012345676",
                       "track2", None, i))
    print(i, flush=True)          # reported only once put has returned
    i += 1
"""


def test_spooled_reads_survive_sigkill(tmp_path):
    path, wanted = tmp_path / "spool.db", 50
    with subprocess.Popen([sys.executable, "-c", SPOOL_CHILD, str(path)],
                          stdout=subprocess.PIPE, text=True) as child:
        try:
            reported = [int(child.stdout.readline()) for _ in range(wanted)]
        finally:
            child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    assert reported == list(range(wanted))
    with Spool(path) as spool:
        ids = [r.read_id for r in spool.pending(100_000)]
    # Every read put before the kill is there, in order; a few more may be
    # (put, not yet reported), never a gap.
    assert ids == [f"r-{i}" for i in range(len(ids))]
    assert len(ids) >= wanted


def test_the_spool_is_thread_safe_under_concurrent_puts(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        def put_many(k):
            for i in range(20):
                spool.put(lane_read(k * 100 + i))
        threads = [threading.Thread(target=put_many, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert spool.depth() == 80
        assert len({r.read_id for r in spool.pending(1000)}) == 80
