"""The spool's reads to the core, over `Store.StreamCardReads`, acknowledged one by one.

Every accepted read is put in the durable spool first (`submit`); the
uplink sends what the spool holds, oldest first, on one long-lived
bidirectional stream, and removes a read from the spool only when the core
acknowledged it. Every outcome (ACCEPTED, DUPLICATE, STALE, REJECTED) is
final: the read leaves the spool, and the outcome is counted. Whatever
breaks the stream (the core down, a restart, a network cut, a read left
unacknowledged for `ack_timeout_ms`), the uplink closes the channel, waits
a capped, fully jittered backoff, connects again, and sends the spool again
from its oldest read: a read the core took but whose ack was lost is sent
twice, and the core answers DUPLICATE (it de-duplicates by read id).

Flow. A live read goes out alone, within a millisecond of its `put`; a
backlog (after an outage) goes out in messages of up to `MAX_BATCH` reads.
At most `window` reads are in flight (sent, not acknowledged) on a stream,
so a spool of 100,000 reads is not pushed at a core that has just come back
faster than it acknowledges them.

Stale reads. A read is useful while the customer is at the till: reads
older than `stale_after_us` are dropped from the spool (and counted) each
time the sender looks at the spool, so a stale read is never sent.

Time. `clock()` (integer microseconds, injected) dates sends, acks, stale
ages and the ack timeout; backoff delays come from the injected `rng` and
are waited with the injected async `sleep`, so tests know every delay
without waiting it. Only the connect timeout is real time: it bounds a
network handshake.

Threads. The uplink is a task on the process's grpc.aio loop (`grpc_loop`,
one thread). `submit` is called from the readers' threads: the spool is
thread-safe, and the task is woken with `call_soon_threadsafe`.

Authentication: `authorization: Bearer <token>` metadata on the call when
the config has a token (re-read from its file at each connection), and a
TLS channel (with a client certificate when configured) unless the config
says `insecure = true`.
"""

import asyncio
import concurrent.futures
import logging
import random
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kopilka.v1 import store_pb2, store_pb2_grpc

from .backoff import full_jitter
from .events import BARCODE, TRACK1, TRACK2
from .framing import ConfigError

log = logging.getLogger(__name__)

MAX_BATCH = 500          # reads per message, as the API allows
WINDOW = 2_000           # reads in flight on one stream
TICK_S = 1.0             # the sender looks at the spool at least this often

CONNECTING, CONNECTED, DISCONNECTED, STOPPED = ("connecting", "connected",
                                               "disconnected", "stopped")
# Why a connection ended, besides a gRPC status code's name in lower case
# ("unavailable", "unauthenticated", "permission_denied", ...).
UNREACHABLE = "unreachable"      # no connection within the connect timeout
ACK_TIMEOUT = "ack_timeout"      # a read sent and not acknowledged in time
CLOSED = "closed"                # the core ended the stream without an error
CREDENTIALS = "credentials"      # our token or TLS files cannot be read
ERROR = "error"                  # a bug or a local failure (the spool's disk)

SOURCES = {TRACK1: store_pb2.CARD_READ_SOURCE_TRACK1,
           TRACK2: store_pb2.CARD_READ_SOURCE_TRACK2,
           BARCODE: store_pb2.CARD_READ_SOURCE_BARCODE}
OUTCOMES = {store_pb2.CARD_READ_OUTCOME_ACCEPTED: "accepted",
            store_pb2.CARD_READ_OUTCOME_DUPLICATE: "duplicate",
            store_pb2.CARD_READ_OUTCOME_STALE: "stale",
            store_pb2.CARD_READ_OUTCOME_REJECTED: "rejected"}
UNSPECIFIED = "unspecified"
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
REFUSED = ("unauthenticated", "permission_denied")


def to_proto(read):
    """A spooled `LaneRead` as the API's `CardRead`."""
    when = Timestamp()
    when.FromMicroseconds(read.read_time_us)
    return store_pb2.CardRead(read_id=read.read_id, lane=read.lane, reader=read.reader,
                              card_number=read.card_number, read_time=when,
                              source=SOURCES.get(read.source, 0),
                              symbology=read.symbology or "")


class Outbox:
    """What one stream sent and the core has not acknowledged yet (pure).

    `last_seq` is the spool cursor: the stream sends reads after it, so a
    read is sent once per stream; a new stream starts a new Outbox and so
    sends every unacknowledged read again."""

    def __init__(self, window=WINDOW):
        self.window, self.last_seq = window, 0
        self._sent = OrderedDict()          # read_id -> (read, sent at us)

    def __len__(self):
        return len(self._sent)

    def room(self):
        """How many reads the next message may carry."""
        return max(0, min(MAX_BATCH, self.window - len(self._sent)))

    def sent(self, rows, now_us):
        for seq, read in rows:
            self._sent[read.read_id] = (read, now_us)
            self.last_seq = max(self.last_seq, seq)

    def acked(self, read_id):
        """The read acknowledged, or None when this stream did not send it."""
        entry = self._sent.pop(read_id, None)
        return entry and entry[0]

    def oldest_sent_us(self):
        """When the oldest unacknowledged read was sent, or None."""
        return next(iter(self._sent.values()))[1] if self._sent else None


_grpc_loop, _grpc_loop_lock = None, threading.Lock()


def grpc_loop():
    """The one asyncio loop this process runs grpc.aio on (started on first use).

    grpc.aio binds its completion queue to the loop it was first used on, so
    every uplink of a process (tests and the simulator make several) shares
    one loop, which runs for the life of the process in a daemon thread."""
    global _grpc_loop
    with _grpc_loop_lock:
        if _grpc_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="hwd-grpc", daemon=True).start()
            _grpc_loop = loop
        return _grpc_loop


def open_channel(core):
    """The grpc.aio channel the config describes: TLS unless `insecure`."""
    options = [("grpc.keepalive_time_ms", 300_000), ("grpc.enable_retries", 0),
               ("grpc.max_reconnect_backoff_ms", core.backoff_cap_ms)]
    if core.insecure:
        return grpc.aio.insecure_channel(core.address, options=options)
    ca, cert, key = core.tls_files()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                               certificate_chain=cert)
    if core.server_name:
        options.append(("grpc.ssl_target_name_override", core.server_name))
    return grpc.aio.secure_channel(core.address, credentials, options=options)


@dataclass(frozen=True)
class UplinkHealth:
    """A snapshot of the link to the core (counters since the Uplink was built)."""

    address: str
    state: str                             # CONNECTING, CONNECTED, DISCONNECTED, STOPPED
    last_error: str | None = None          # why the last connection ended
    connected_since_us: int | None = None
    last_contact_us: int | None = None     # last connection made or ack received
    sent: int = 0                          # reads sent (resends included)
    acks: dict = field(default_factory=dict)   # outcome -> count
    in_flight: int = 0
    reconnects: int = 0                    # connections made after a failure


class AckTimeout(Exception):
    pass


class StreamClosed(Exception):
    pass


class Uplink:
    """Sends the spool to the core (see the module doc).

    `on_ack(read, outcome, now_us)`, when given, is called on the uplink's
    thread for every acknowledgement (the simulator prints them); `read` is
    None for an ack of a read this stream did not send."""

    def __init__(self, core, spool, clock, stale_after_us, *, sleep=None, rng=None,
                 window=WINDOW, tick=TICK_S, on_ack=None, channel_factory=open_channel):
        self.core, self.spool, self._clock = core, spool, clock
        self.stale_after_us = stale_after_us
        self._sleep = sleep or asyncio.sleep
        self._rng = rng if rng is not None else random.SystemRandom()
        self.window, self.tick, self._on_ack = window, tick, on_ack
        self._channel_factory = channel_factory
        self._lock = threading.Lock()
        self._state, self._last_error = DISCONNECTED, None
        self._connected_since = self._last_contact = None
        self._sent, self._acks, self._reconnects = 0, Counter(), 0
        self._outbox = None
        self._full = False
        self._loop = self._main = self._wakeup = self._future = None
        self._ready = threading.Event()
        self._stopping = False

    # -- from any thread ------------------------------------------------------

    def submit(self, read):
        """Spool `read` durably, then wake the sender; False when the spool is full."""
        ok = self.spool.put(read)
        if ok != (not self._full):
            self._full = not ok
            if self._full:
                log.warning("the spool is full (%d reads): new reads are dropped until "
                            "the core takes some", self.spool.max_reads)
            else:
                log.info("the spool has room again")
        if ok:
            self.wake()
        return ok

    def wake(self):
        """Have the sender look at the spool now (new reads, a clock moved on)."""
        loop, event = self._loop, self._wakeup
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    def start(self):
        if self._future is not None:
            raise RuntimeError("uplink already started")
        if self.core.insecure:
            log.warning("INSECURE: the link to the core at %s is plaintext (insecure = "
                        "true); card numbers and the token cross the network unencrypted",
                        self.core.address)
        self._loop = grpc_loop()
        self._future = asyncio.run_coroutine_threadsafe(self._main_task(), self._loop)
        self._ready.wait(5.0)
        return self

    def stop(self, timeout=5.0):
        """End the stream; True when it has ended. Unacknowledged reads stay in
        the spool for the next start."""
        self._stopping = True
        if self._future is None:
            with self._lock:
                self._state = STOPPED
            return True
        main = self._main
        if main is not None:
            self._loop.call_soon_threadsafe(main.cancel)
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        except concurrent.futures.CancelledError:
            pass
        return True

    def health(self):
        with self._lock:
            outbox = self._outbox
            return UplinkHealth(self.core.address, self._state, self._last_error,
                                self._connected_since, self._last_contact, self._sent,
                                dict(self._acks), len(outbox) if outbox else 0,
                                self._reconnects)

    # -- the loop -------------------------------------------------------------------

    async def _main_task(self):
        self._wakeup = asyncio.Event()
        self._main = asyncio.current_task()
        self._ready.set()
        try:
            if not self._stopping:
                await self._connect_forever()
        except asyncio.CancelledError:
            pass
        finally:
            with self._lock:
                self._state = STOPPED
            log.info("uplink stopped")

    async def _connect_forever(self):
        attempt, had_error = 0, False
        while not self._stopping:
            try:
                self._drop_stale()
                kind, worked = await self._session(had_error)
            except Exception as e:      # noqa: BLE001 -- the uplink must never die
                log.error("uplink: %s: %s", type(e).__name__, e, exc_info=e)
                kind, worked = ERROR, False
            if worked:
                attempt = 0
            had_error = True
            self._set_disconnected(kind)
            delay = full_jitter(attempt, self.core.backoff_base_ms / 1000,
                                self.core.backoff_cap_ms / 1000, self._rng)
            attempt += 1
            await self._sleep(delay)

    async def _session(self, after_error):
        """One connection and its stream, until it breaks.

        Returns (why it ended, whether it worked: it got an ack or lasted
        the backoff cap, so the backoff starts over)."""
        if not after_error:                 # retries stay "disconnected"
            with self._lock:
                self._state = CONNECTING
        try:
            token = self.core.token()
            channel = self._channel_factory(self.core)
        except ConfigError as e:
            if self._last_error != CREDENTIALS:
                log.error("cannot connect to the core: %s", e)
            return CREDENTIALS, False
        began, acked_before = self._clock(), self._acked_total()
        try:
            if not await self._connect(channel):
                return UNREACHABLE, False
            self._set_connected(after_error)
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            call = store_pb2_grpc.StoreStub(channel).StreamCardReads(metadata=metadata)
            outbox = Outbox(self.window)
            with self._lock:
                self._outbox = outbox
            try:
                kind = await self._stream(call, outbox)
            finally:
                call.cancel()
                with self._lock:
                    self._outbox = None
            lasted = self._clock() - began >= self.core.backoff_cap_ms * 1000
            return kind, lasted or self._acked_total() > acked_before
        finally:
            await channel.close(grace=None)

    async def _connect(self, channel):
        """Whether the channel got READY before failing or the connect timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.core.connect_timeout_ms / 1000
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                         grpc.ChannelConnectivity.SHUTDOWN):
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await channel.wait_for_state_change(state)
            except TimeoutError:
                return False
            state = channel.get_state(try_to_connect=True)
        return True

    async def _stream(self, call, outbox):
        """Run sender and receiver until either ends; why the stream ended."""
        # The receiver first: when both failed, its error carries the status.
        tasks = [asyncio.create_task(self._receive(call, outbox)),
                 asyncio.create_task(self._send(call, outbox))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        exc = next(t for t in tasks if t in done).exception()
        if isinstance(exc, grpc.aio.AioRpcError):
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                log.error("the core ended the read stream: %s: %s", exc.code().name,
                          exc.details())
            return exc.code().name.lower()
        if isinstance(exc, AckTimeout):
            log.warning("no acknowledgement from the core within %d ms: reconnecting",
                        self.core.ack_timeout_ms)
            return ACK_TIMEOUT
        if isinstance(exc, StreamClosed):
            return CLOSED
        log.error("uplink: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return ERROR

    async def _send(self, call, outbox):
        while True:
            self._wakeup.clear()        # before looking, so no wake-up is lost
            now = self._clock()
            oldest = outbox.oldest_sent_us()
            if oldest is not None and now - oldest >= self.core.ack_timeout_ms * 1000:
                raise AckTimeout()
            self._drop_stale(now)
            room = outbox.room()
            rows = self.spool.pending_after(outbox.last_seq, room) if room else []
            if rows:
                with self._lock:            # before the write: its ack may come first
                    outbox.sent(rows, now)
                    self._sent += len(rows)
                await call.write(store_pb2.StreamCardReadsRequest(
                    reads=[to_proto(read) for _, read in rows]))
                continue                # more may be waiting
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can
                # lose a cancellation, and then stop() waits forever.
                async with asyncio.timeout(self.tick):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _receive(self, call, outbox):
        async for response in call:
            self.spool.ack_many(ack.read_id for ack in response.acks)
            now = self._clock()
            for ack in response.acks:
                read = outbox.acked(ack.read_id)
                outcome = OUTCOMES.get(ack.outcome, UNSPECIFIED)
                if outcome == "rejected":
                    log.warning("the core refused read %s: %s", ack.read_id,
                                STATUS_NAMES.get(ack.status.code, ack.status.code))
                elif outcome == UNSPECIFIED or read is None:
                    log.warning("odd acknowledgement for read %s (%s%s)", ack.read_id,
                                outcome, "" if read else ", not sent on this stream")
                with self._lock:
                    self._acks[outcome] += 1
                if self._on_ack is not None:
                    self._on_ack(read, outcome, now)
            with self._lock:
                self._last_contact = now
            self._wakeup.set()          # the window has room again
        raise StreamClosed()

    # -- bookkeeping ------------------------------------------------------------------

    def _drop_stale(self, now=None):
        dropped = self.spool.drop_stale(self._clock() if now is None else now,
                                        self.stale_after_us)
        if dropped:
            log.warning("dropped %d stale reads (older than %d s) from the spool",
                        dropped, self.stale_after_us // 1_000_000)

    def _acked_total(self):
        with self._lock:
            return sum(self._acks.values())

    def _set_connected(self, after_error):
        now = self._clock()
        with self._lock:
            self._state, self._connected_since, self._last_contact = CONNECTED, now, now
            if after_error:
                self._reconnects += 1
        # A core that lets us connect, then refuses the stream (a bad token),
        # would log this at every retry: say it once.
        (log.debug if self._last_error in REFUSED else log.info)(
            "connected to the core at %s", self.core.address)

    def _set_disconnected(self, kind):
        with self._lock:
            # Logged once per change, not per retry.
            changed = kind != self._last_error or self._connected_since is not None
            self._state, self._last_error, self._connected_since = DISCONNECTED, kind, None
        if changed:
            log.warning("no stream to the core at %s: %s", self.core.address, kind)
