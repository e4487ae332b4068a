"""Store: card reads from a store's hwd in, what each lane's POS shows out.

Every read gets exactly one final acknowledgement, in order, on the same
stream: a read with a bad field, or for a store the caller is not scoped
to, is REJECTED with its status rather than ending the stream, because the
hwd keeps an unacknowledged read in its spool and would resend it forever.
Reads are de-duplicated by (store, read id) in memory (lanes.SeenReads: per
process), and reads older than `max_age` are STALE: the customer has gone.

An accepted read is resolved to its member through the ledger (point reads,
no write) and pushed to the lane's watchers; a lane nobody watches costs no
lookup. Watchers' queues are bounded, so a slow POS never holds up the hwd.
"""

import asyncio
import os

from kopilka.core.reads import balances_of
from kopilka.core.records import CardStatus, Status
from kopilka.v1 import common_pb2, store_pb2, store_pb2_grpc

from . import auth, convert
from .lanes import LaneHub, SeenReads
from .status import ApiError, invalid, server

MAX_READS = 500
MAX_AGE = 15 * 60 * 1_000_000      # the hwd's own default for stale reads
_SOURCES = frozenset(v.number for v in store_pb2.CardReadSource.DESCRIPTOR.values)
_OUTCOME_NAMES = {store_pb2.CARD_READ_OUTCOME_ACCEPTED: "accepted",
                  store_pb2.CARD_READ_OUTCOME_DUPLICATE: "duplicate",
                  store_pb2.CARD_READ_OUTCOME_STALE: "stale",
                  store_pb2.CARD_READ_OUTCOME_REJECTED: "rejected"}


def _text(value, field, low, high, problems, unit="bytes"):
    size = len(value.encode()) if unit == "bytes" else len(value)
    if not low <= size <= high or any(ord(c) < 32 or ord(c) == 127 for c in value):
        problems.append((field, f"must be {low} to {high} {unit} of text"
                                if low else f"must be at most {high} {unit} of text"))


def check_read(read, index):
    """(store, lane) of a well-formed read; else INVALID_ARGUMENT naming
    every bad field (`reads[i].card_number`)."""
    p = f"reads[{index}]."
    problems = []
    _text(read.read_id, p + "read_id", 1, 128, problems)
    store = lane = None
    try:
        store, lane = convert.parse_lane(read.lane, p + "lane")
    except ApiError as err:
        problems.extend(err.fields)
    _text(read.reader, p + "reader", 1, 64, problems, "characters")
    _text(read.card_number, p + "card_number", 1, 128, problems)
    if not read.HasField("read_time"):
        problems.append((p + "read_time", "required"))
    else:
        convert.parse_time(read.read_time, p + "read_time", problems)
    if read.source not in _SOURCES:
        problems.append((p + "source", "must be a CardReadSource"))
    _text(read.symbology, p + "symbology", 0, 32, problems, "characters")
    if problems:
        raise invalid(problems)
    return store, lane


def lane_event(backend, read):
    """What the lane's POS should show for an accepted read."""
    found = backend.ledger.card(read.card_number.encode())
    if found is None:
        return store_pb2.WatchLaneResponse(unknown_card=store_pb2.UnknownCard(read=read))
    account_id, card_status = found
    account = backend.ledger.account(account_id)
    member = convert.member_name(account.program, account_id)
    refused = ("CARD_BLOCKED" if card_status != CardStatus.ACTIVE
               else "MEMBER_BLOCKED" if account.status == Status.BLOCKED
               else "MEMBER_CLOSED" if account.status == Status.CLOSED else None)
    if refused:
        return store_pb2.WatchLaneResponse(card_refused=store_pb2.CardRefused(
            read=read, member=member,
            reason=common_pb2.ErrorReason.Value(refused)))
    now = backend.clock()
    b = balances_of(account_id, account, now)
    return store_pb2.WatchLaneResponse(card_presented=store_pb2.CardPresented(
        read=read, member=member, balances=convert.balances(b, now),
        tier=backend.tier_name(account.program, account.tier, now)))


def _ack(read_id, outcome, error=None):
    ack = store_pb2.CardReadAck(read_id=read_id, outcome=outcome)
    if error is not None:
        ack.status.CopyFrom(error.to_proto())
    return ack


def _seen_path(backend):
    server = getattr(backend, "server", None)
    return os.path.join(server.config.data, "seen-reads.json") if server else None


class Store(store_pb2_grpc.StoreServicer):
    """`max_age` (microseconds) makes a read STALE; tests may set it."""

    max_age = MAX_AGE

    def __init__(self, backend):
        self.backend = backend
        self.seen = SeenReads(backend.clock, path=_seen_path(backend))
        self.hub = LaneHub(backend.clock)
        self.streams = 0          # hwd streams open now
        self._stopping = None     # asyncio.Event, made on the loop

    @property
    def watchers(self):
        return len(self.hub)

    def shutdown(self):
        """Ends every stream with UNAVAILABLE (SHUTTING_DOWN) when the server
        stops: hwds and POSes reconnect, instead of holding the stop open."""
        self.hub.close()
        self._stopping_event().set()
        self.seen.save()

    def _stopping_event(self):
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    # --- reads in ---------------------------------------------------------
    async def StreamCardReads(self, request_iterator, context):
        self.streams += 1
        messages = request_iterator.__aiter__()
        try:
            while True:
                message = await self._next(messages)
                if message is None:
                    return
                if len(message.reads) > MAX_READS:
                    raise invalid([("reads", f"must hold 1 to {MAX_READS} reads")])
                now = self.backend.clock()
                yield store_pb2.StreamCardReadsResponse(
                    acks=[self._take(read, i, now)
                          for i, read in enumerate(message.reads)])
        finally:
            self.streams -= 1

    async def _next(self, requests):
        """The next request message; None when the client is done; raises
        SHUTTING_DOWN when the server stops first."""
        stopping = self._stopping_event()
        if stopping.is_set():
            raise server("SHUTTING_DOWN", "the server is shutting down")
        reading = asyncio.ensure_future(requests.__anext__())
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((reading, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not reading.done():
                reading.cancel()
            # collected, so a read that ends as the call is cancelled is no
            # "exception never retrieved"
            reading.add_done_callback(lambda t: t.cancelled() or t.exception())
        if not reading.done() or reading.cancelled():
            raise server("SHUTTING_DOWN", "the server is shutting down")
        try:
            return reading.result()
        except StopAsyncIteration:
            return None

    def _take(self, read, index, now):
        """One read's acknowledgement; an accepted read is published."""
        try:
            store, lane = check_read(read, index)
            auth.require_store(store, f"reads[{index}].lane")
        except ApiError as err:
            return self._count(_ack(read.read_id, store_pb2.CARD_READ_OUTCOME_REJECTED,
                                    err))
        key = (store, read.read_id)
        if self.seen.seen(key):
            return self._count(_ack(read.read_id,
                                    store_pb2.CARD_READ_OUTCOME_DUPLICATE))
        if now - read.read_time.ToMicroseconds() > self.max_age:
            return self._count(_ack(read.read_id, store_pb2.CARD_READ_OUTCOME_STALE))
        self.seen.remember(key)
        # kept for a minute even when nobody watches: a POS reconnecting
        # after a restart still gets the card its customer swiped meanwhile
        self.hub.publish((store, lane), lane_event(self.backend, read))
        return self._count(_ack(read.read_id, store_pb2.CARD_READ_OUTCOME_ACCEPTED))

    def _count(self, ack):
        metrics = getattr(getattr(self.backend, "server", None), "metrics", None)
        if metrics is not None:
            metrics.card_reads.labels(_OUTCOME_NAMES[ack.outcome]).inc()
        return ack

    # --- lanes out --------------------------------------------------------
    async def WatchLane(self, request, context):
        store, lane = convert.parse_lane(request.lane)
        auth.require_store(store)
        self._known(store, lane)
        watcher = self.hub.watch((store, lane))
        try:
            started = store_pb2.WatchStarted(lane=request.lane)
            convert.set_time(started, "start_time", self.backend.clock())
            yield store_pb2.WatchLaneResponse(started=started)
            while True:
                event = await watcher.next()
                if event is None:
                    raise server("SHUTTING_DOWN", "the server is shutting down")
                yield event
        finally:
            self.hub.unwatch(watcher)

    def _known(self, store, lane):
        registry = self.backend.registry
        for program_id in registry.ids():
            found = registry.get(program_id).program.store.get(store)
            if found is not None and lane in found.lanes:
                return
        raise ApiError("NOT_FOUND", "LANE_NOT_FOUND",
                       f"lane: stores/{store}/lanes/{lane} is not a lane of any "
                       "program's stores")
