"""One card reader's runtime: a serial port read in its own thread.

`Reader(...).start()` opens the port through pyserial (`serial_for_url`:
a device path, a stable `/dev/serial/by-id/...` symlink, or any pyserial
URL), reads with a short timeout, feeds the bytes to the reader's `Parser`
(whose policy drops numbers outside the program's ranges), suppresses
double swipes with the `Deduplicator`, and hands each accepted read to
`sink(read)` as a `LaneRead`. `stop()` ends it within one read timeout.

The reader never writes to its port: no probing, no configuration commands.
A scanner is set up once with its own tool; hwd only listens.

Errors. Whatever goes wrong with the port (missing, unplugged, held by
another process, a bad URL) closes it, flushes the parser (a swipe cut in
half is counted as HALF_SWIPE, never delivered), marks the reader
`disconnected` with the kind of error (`ERROR_KINDS`), and retries after a
delay: exponential backoff with full jitter,
``delay = rng.random() * min(cap, base * 2**attempt)``, where `attempt`
counts the consecutive failed connections. The count starts again after a
connection that delivered bytes or stayed up for at least `cap` seconds, so
a port that opens and at once fails (a flaky cable, a half-dead USB hub)
keeps backing off instead of spinning. `sleep` and `rng` are injected: the
tests record the delays and never wait them. The default `sleep` is the
stop event's wait, so `stop()` also cuts a backoff short. A failure of the
sink (a bug, a disk error in the spool) is logged and counted, and the
reader goes on: one bad read must not stop a lane.

Nothing read from the port is ever logged: rejects are counted by reason,
state changes are logged with the error kind, reads not at all.

Read ids. ``f"{session}-{counter}"``: `session` is 128 random bits (32 hex
digits) drawn from `os.urandom` when the Reader is built, `counter` counts
that session's reads from 1. Unique across restarts without any persisted
state (a new process is a new session; a collision of two 128-bit random
values is not a practical concern), ordered within a session (which helps
reading logs), and at most 53 bytes, well inside the API's 128. The reader's
name travels in the read's own `reader` field. The injected `rng` is not
used for it: tests seed that one, and ids must not repeat across runs.
"""

import errno
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import serial

from .backoff import full_jitter
from .events import CardRead, LaneRead, Reject
from .parser import Parser

log = logging.getLogger(__name__)

CONNECTED, DISCONNECTED, STOPPED = "connected", "disconnected", "stopped"

# What kind of error disconnected a reader (health, metrics labels).
MISSING = "missing"          # no such device (not plugged in, a by-id link dangling)
BUSY = "busy"                # held by another process (exclusive lock) or EBUSY
PERMISSION = "permission"    # not allowed to open it (udev rule, group)
IO = "io"                    # a read failed on an open port: unplugged, hung up
CONFIG = "config"            # pyserial refused the URL or the line settings
ERROR = "error"              # anything else (logged with its type)
ERROR_KINDS = (MISSING, BUSY, PERMISSION, IO, CONFIG, ERROR)

_ERRNO_KINDS = {
    errno.ENOENT: MISSING, errno.ENODEV: MISSING, errno.ENXIO: MISSING,
    errno.ENOTDIR: MISSING,
    errno.EBUSY: BUSY, errno.EAGAIN: BUSY, errno.EWOULDBLOCK: BUSY,
    errno.EACCES: PERMISSION, errno.EPERM: PERMISSION,
    errno.EIO: IO, errno.EPIPE: IO,
}

PARITIES = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN,
            "odd": serial.PARITY_ODD, "mark": serial.PARITY_MARK,
            "space": serial.PARITY_SPACE}


def error_kind(exc, while_reading=False):
    """The kind (one of `ERROR_KINDS`) of a port error.

    pyserial passes the errno of a failed open or lock; a failed read
    keeps it only on the chained OSError, or has none at all ("readiness to
    read but returned no data": the device went away)."""
    if isinstance(exc, ValueError):
        return CONFIG
    for e in (exc, exc.__cause__, exc.__context__):
        code = getattr(e, "errno", None)
        if isinstance(code, int) and code in _ERRNO_KINDS:
            return _ERRNO_KINDS[code]
    port_error = isinstance(exc, (serial.SerialException, OSError))
    return IO if while_reading and port_error else ERROR


def wall_clock_us():
    """The daemon's clock: integer microseconds since the epoch."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class SerialSettings:
    """A reader's line settings, read timeout and reconnect backoff.

    Times are in seconds. `exclusive` takes an advisory lock on the port
    (flock), so two daemons never share a reader, and a port some other
    process holds that way shows as `busy`."""

    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "none"
    stopbits: int = 1
    xonxoff: bool = False
    rtscts: bool = False
    exclusive: bool = True
    read_timeout: float = 0.05
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    def __post_init__(self):
        if self.parity not in PARITIES:
            raise ValueError(f"parity: expected one of {sorted(PARITIES)}")
        if self.bytesize not in (5, 6, 7, 8) or self.stopbits not in (1, 2):
            raise ValueError("bytesize must be 5 to 8 and stopbits 1 or 2")
        if not 0 < self.read_timeout <= 1:
            raise ValueError("read_timeout must be in (0, 1] seconds: "
                             "it bounds how long stop() takes")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("backoff needs 0 < backoff_base <= backoff_cap")

    def open_kwargs(self):
        return {"baudrate": self.baudrate, "bytesize": self.bytesize,
                "parity": PARITIES[self.parity], "stopbits": self.stopbits,
                "xonxoff": self.xonxoff, "rtscts": self.rtscts,
                "exclusive": self.exclusive, "timeout": self.read_timeout}

    def backoff(self, attempt, rng):
        """The delay before connection attempt `attempt` + 1 (full jitter)."""
        return full_jitter(attempt, self.backoff_base, self.backoff_cap, rng)


@dataclass(frozen=True)
class ReaderHealth:
    """A snapshot of one reader's health (counters since the Reader was built)."""

    name: str
    lane: str
    state: str                       # CONNECTED, DISCONNECTED or STOPPED
    reads: int = 0                   # accepted reads handed to the sink
    duplicates: int = 0              # double swipes suppressed
    rejects: dict = field(default_factory=dict)   # reason -> count
    reconnects: int = 0              # connections made after an error
    last_error: str | None = None    # kind of the last error, or None
    last_read_us: int | None = None  # read time of the last accepted read
    sink_errors: int = 0             # reads the sink raised on


class Reader:
    """One reader's runtime (see the module doc).

    `port` is a path or URL, or a callable returning one (asked again at
    each connection). `clock()` returns integer microseconds since the
    epoch (read times, dedup window); `sleep(seconds)` waits a backoff
    (default: interrupted by stop); `rng.random()` draws the jitter.
    `dedupe` may be shared by the readers of one lane (a stripe reader and a
    scanner): it is used under a lock."""

    _dedupe_lock = threading.Lock()

    def __init__(self, name, port, serial_settings, framing, policy, lane, dedupe, sink,
                 clock, sleep=None, rng=None, open_port=serial.serial_for_url):
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise ValueError("a reader's name is 1 to 64 characters")
        self.name, self.lane = name, lane
        self.settings = serial_settings
        self._port_source = port
        self._parser = Parser(framing, policy)
        self._dedupe, self._sink, self._clock = dedupe, sink, clock
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait
        self._rng = rng if rng is not None else random.SystemRandom()
        self._open_port = open_port
        self.session = os.urandom(16).hex()
        self._counter = 0
        self._lock = threading.Lock()
        self._state, self._reads, self._duplicates, self._sink_errors = DISCONNECTED, 0, 0, 0
        self._rejects = Counter()
        self._reconnects, self._last_error, self._last_read_us = 0, None, None
        self._thread = None

    # -- control ------------------------------------------------------------

    def start(self):
        """Run the reader in a daemon thread of its own."""
        if self._thread is not None:
            raise RuntimeError("reader already started")
        self._thread = threading.Thread(target=self.run, name=f"hwd-reader-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """Ask the reader to end and wait for it (at most `timeout` seconds).

        True when it has ended. A read returns within `read_timeout` (the
        port is not touched from this thread: cancelling a read races with
        its closing), and a backoff with the default sleep is cut short."""
        self._stop.set()
        if self._thread is None:
            with self._lock:
                self._state = STOPPED
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def health(self):
        with self._lock:
            return ReaderHealth(self.name, self.lane, self._state, self._reads,
                                self._duplicates, dict(self._rejects), self._reconnects,
                                self._last_error, self._last_read_us, self._sink_errors)

    # -- the loop -----------------------------------------------------------

    def run(self):
        """Connect, read, reconnect with backoff, until stopped."""
        attempt, had_error = 0, False
        try:
            while not self._stop.is_set():
                kind, delivered = self._session(had_error)
                if self._stop.is_set():
                    break
                if delivered:
                    attempt = 0
                had_error = True
                self._set_disconnected(kind)
                delay = self.settings.backoff(attempt, self._rng)
                attempt += 1
                self._sleep(delay)
        finally:
            with self._lock:
                self._state = STOPPED
            log.info("reader %s stopped", self.name)

    def _session(self, after_error):
        """One connection: open, read until an error or stop, close.

        Returns (error kind or None when stopped, whether the connection
        counts as having worked: it delivered bytes or lasted `cap`)."""
        try:
            url = self._port_source() if callable(self._port_source) else self._port_source
            port = self._open_port(url, **self.settings.open_kwargs())
        except Exception as e:      # noqa: BLE001 -- whatever it is, retry later
            return self._failed(e, while_reading=False), False
        began, delivered = self._clock(), False
        with self._lock:
            self._state = CONNECTED
            if after_error:
                self._reconnects += 1
        log.info("reader %s connected", self.name)
        kind = None
        try:
            while not self._stop.is_set():
                data = port.read(max(1, port.in_waiting))
                if data:
                    delivered = True
                    self._handle(self._parser.feed(data))
        except Exception as e:      # noqa: BLE001 -- a reader thread must never die
            kind = self._failed(e, while_reading=True)
        finally:
            try:
                port.close()
            except Exception as e:  # noqa: BLE001 -- the port is gone either way
                log.debug("reader %s: closing the port: %s", self.name, type(e).__name__)
            self._handle(self._parser.flush())
        lasted = self._clock() - began >= self.settings.backoff_cap * 1_000_000
        return kind, delivered or lasted

    def _failed(self, exc, while_reading):
        kind = error_kind(exc, while_reading)
        if kind in (ERROR, CONFIG) and kind != self.health().last_error:
            # Once per change, not per retry. Port errors name the port and
            # the errno, never data read from it.
            log.warning("reader %s: %s: %s", self.name, type(exc).__name__, exc)
        return kind

    def _set_disconnected(self, kind):
        with self._lock:
            changed = (self._state, self._last_error) != (DISCONNECTED, kind)
            self._state, self._last_error = DISCONNECTED, kind
        if changed:
            log.warning("reader %s disconnected: %s", self.name, kind)

    def _handle(self, events):
        for event in events:
            if isinstance(event, Reject):
                with self._lock:
                    self._rejects[event.reason] += 1
            elif isinstance(event, CardRead):
                self._accept(event)

    def _accept(self, event):
        now = self._clock()
        with self._dedupe_lock:
            new = self._dedupe.accept(self.lane, event.card_number, now)
        if not new:
            with self._lock:
                self._duplicates += 1
            return
        self._counter += 1
        read = LaneRead(f"{self.session}-{self._counter}", self.lane, self.name,
                        event.card_number, event.source, event.symbology, now)
        try:
            self._sink(read)
        except Exception as e:      # noqa: BLE001 -- one bad read must not stop the lane
            with self._lock:
                self._sink_errors += 1
            log.error("reader %s: the sink failed on read %s: %s", self.name,
                      read.read_id, type(e).__name__)
            return
        with self._lock:
            self._reads += 1
            self._last_read_us = now
