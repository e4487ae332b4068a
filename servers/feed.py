"""Feed: the journal as an ordered, resumable stream of events.

A subscriber is a reader of the journal and nothing else: it reads pages of
entries after its cursor (each page one short LMDB read transaction, on a
worker thread so decoding never stalls the event loop), sends them, and
reads on. gRPC flow control suspends the stream while the client is slow,
so a slow subscriber holds no transaction, buffers nothing beyond one page,
and never slows the writer; it simply falls behind and catches up.

Once caught up it waits for the next commit: `CommitNotifier.notify()`,
called after each commit, wakes every waiting subscriber at once; a short
poll is the fallback while nothing calls it (and its safety net after).
The cursor is the entry's journal sequence number, so resuming after a
disconnect or a restart continues exactly after the last event processed.

The report RPCs are left to the base class (UNIMPLEMENTED) until the
kernel's aggregates exist.
"""

import asyncio
import itertools

from kopilka.core.records import Entry
from kopilka.v1 import feed_pb2, feed_pb2_grpc

from . import convert
from .feed_events import journal_event
from .status import invalid, server

DEFAULT_EVENTS = 1000
MAX_EVENTS = 10_000
_TYPES = frozenset(int(t) for t in Entry) | frozenset(
    v.number for v in feed_pb2.EntryType.DESCRIPTOR.values if v.number)


class CommitNotifier:
    """Wakes waiting subscribers when the writer commits.

    `notify()` may be called from any thread (the writer's on_commit runs on
    the writer thread); wake-ups are coalesced, so a burst of commits costs
    one callback on the loop. `arm()` returns the event the next commit
    sets: a subscriber takes it *before* reading the journal, so a commit
    landing between its read and its wait is never missed."""

    def __init__(self):
        self.wired = False        # notify() was called: polling can relax
        self._loop = None
        self._event = None
        self._scheduled = False

    def arm(self):
        if self._event is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        return self._event

    def notify(self):
        self.wired = True
        if self._loop is None or self._scheduled:
            return
        self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._fire)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _fire(self):
        self._scheduled = False
        self.wake()

    def wake(self):
        """Wakes every waiting subscriber now (on the loop's thread)."""
        if self._event is not None:
            event, self._event = self._event, asyncio.Event()
            event.set()


class _Options:
    """A checked SubscribeRequest."""

    def __init__(self, request, backend):
        problems = []
        if request.from_cursor < 0:
            problems.append(("from_cursor", "must not be negative"))
        self.program = 0
        if request.program:
            self.program = convert.parse_program(request.program, "program")
        self.types = frozenset(request.types)
        for i, value in enumerate(request.types):
            if value not in _TYPES:
                problems.append((f"types[{i}]", "must be an EntryType"))
        limit = request.max_events_per_response or DEFAULT_EVENTS
        if not 1 <= limit <= MAX_EVENTS:
            problems.append(("max_events_per_response",
                             f"must be from 1 to {MAX_EVENTS} (0: {DEFAULT_EVENTS})"))
        if problems:
            raise invalid(problems)
        if self.program:
            backend.program(self.program, "program")
        self.limit = limit
        self.page = max(limit, DEFAULT_EVENTS)   # entries read per transaction
        self.raw = request.include_raw_entries

    def wants(self, entry):
        return ((not self.program or entry.program == self.program)
                and (not self.types or entry.type in self.types))


class Feed(feed_pb2_grpc.FeedServicer):
    """`poll_seconds` bounds a wait for commits while `notifier` is not
    wired (`wired_poll_seconds` once it is); `heartbeat_seconds` is how long
    a stream stays silent before an empty message. Tests may set them."""

    poll_seconds = 0.05
    wired_poll_seconds = 1.0
    heartbeat_seconds = 5.0

    def __init__(self, backend):
        self.backend = backend
        self.notifier = CommitNotifier()
        self._lags = {}           # subscriber number -> entries behind
        self._numbers = itertools.count(1)
        self._closing = False

    @property
    def subscribers(self):
        return len(self._lags)

    def shutdown(self):
        """Ends every stream with UNAVAILABLE (SHUTTING_DOWN): called when the
        server stops, so subscribers resume elsewhere or after the restart
        instead of holding the graceful stop open."""
        self._closing = True
        self.notifier.wake()

    async def Subscribe(self, request, context):
        b = self.backend
        options = _Options(request, b)
        head = b.ledger.head()[0]
        if request.from_cursor > head:
            raise server("CURSOR_AHEAD", f"from_cursor {request.from_cursor} is "
                         f"beyond the journal's last entry {head}", head_cursor=head)
        number = next(self._numbers)
        self._lags[number] = head - request.from_cursor
        self._gauges()
        try:
            async for response in self._follow(options, request.from_cursor, number):
                yield response
        finally:
            del self._lags[number]
            self._gauges()

    async def _follow(self, options, cursor, number):
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + self.heartbeat_seconds
        while True:
            if self._closing:
                raise server("SHUTTING_DOWN", "the server is shutting down; "
                             "subscribe again from your last cursor")
            commit = self.notifier.arm()
            events, cursor, head, full = await loop.run_in_executor(
                None, self._page, options, cursor)
            self._lags[number] = head - cursor
            self._gauges()
            for start in range(0, len(events), options.limit):
                yield feed_pb2.SubscribeResponse(
                    events=events[start:start + options.limit], head_cursor=head)
            if not events and loop.time() >= quiet_until:
                yield feed_pb2.SubscribeResponse(head_cursor=head)  # a heartbeat
            if events or loop.time() >= quiet_until:
                quiet_until = loop.time() + self.heartbeat_seconds
            if full:
                continue  # more to read (a filter may have skipped a page)
            poll = (self.wired_poll_seconds if self.notifier.wired
                    else self.poll_seconds)
            try:
                await asyncio.wait_for(commit.wait(),
                                       min(poll, quiet_until - loop.time()))
            except TimeoutError:
                pass

    def _page(self, options, cursor):
        """(events, last cursor read, head, whether the page was full): one
        read transaction for the entries, one for the head (read after, so
        the head is never behind the events)."""
        ledger = self.backend.ledger
        entries = ledger.journal(cursor + 1, options.page)
        head = ledger.head()[0]
        currency = {}
        events = []
        for entry in entries:
            if not options.wants(entry):
                continue
            if entry.program not in currency:
                found = self.backend.registry.get(entry.program)
                currency[entry.program] = found.program.currency if found else ""
            events.append(journal_event(entry, currency[entry.program], options.raw))
        last = entries[-1].seq if entries else cursor
        return events, last, max(head, last), len(entries) == options.page

    def _gauges(self):
        metrics = getattr(getattr(self.backend, "server", None), "metrics", None)
        if metrics is not None:
            metrics.subscribers.set(len(self._lags))
            metrics.feed_lag.set(max(self._lags.values(), default=0))
