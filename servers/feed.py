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

The report RPCs check the request here, read the kernel's aggregates on a
worker thread (one LMDB read transaction per report) and turn the rows that
`reports` computes into messages; what each figure means is in reports.py
and in feed.proto.
"""

import asyncio
import itertools

from google.type import date_pb2
from kopilka.core.records import Entry
from kopilka.v1 import feed_pb2, feed_pb2_grpc

from . import convert, reports
from .feed_events import journal_event
from .status import ApiError, invalid, server

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

    # --- reports (servers/reports.py computes them) ------------------------

    async def GetPointsReport(self, request, context):
        q = _query(request, self.backend, "points")
        rows, head = await _gather(self.backend, "points", q)
        currency = q.program.currency
        out = feed_pb2.GetPointsReportResponse(as_of_cursor=head)
        for r in rows:
            row = out.rows.add(
                key=_key(q.program_id, r.key), issued_points=r.issued,
                spent_points=r.spent, expired_points=r.expired,
                adjusted_points=r.adjusted, returned_points=r.returned,
                clawed_back_points=r.clawed)
            if r.outstanding is not None:
                row.outstanding_points = r.outstanding
                row.outstanding_value.CopyFrom(
                    convert.money(r.outstanding_value, currency))
        return out

    async def GetBreakageReport(self, request, context):
        q = _query(request, self.backend, "breakage", "issued_interval")
        rows, head = await _gather(self.backend, "breakage", q)
        out = feed_pb2.GetBreakageReportResponse(as_of_cursor=head)
        for r in rows:
            out.rows.add(key=_key(q.program_id, r.key), issued_points=r.issued,
                         spent_points=r.spent, expired_points=r.expired,
                         outstanding_points=r.outstanding,
                         breakage_bp=r.breakage_bp)
        return out

    async def GetActiveMembersReport(self, request, context):
        q = _query(request, self.backend, "active_members")
        rows, head = await _gather(self.backend, "active_members", q)
        out = feed_pb2.GetActiveMembersReportResponse(as_of_cursor=head)
        for r in rows:
            out.rows.add(key=_key(q.program_id, r.key), active_members=r.active,
                         new_members=r.new, total_members=r.total)
        return out

    async def GetAverageReceiptReport(self, request, context):
        q = _query(request, self.backend, "average_receipt",
                   default_dims=(reports.Dimension.TIER,))
        rows, head = await _gather(self.backend, "average_receipt", q)
        currency = q.program.currency
        out = feed_pb2.GetAverageReceiptReportResponse(as_of_cursor=head)
        for r in rows:
            row = out.rows.add(key=_key(q.program_id, r.key), receipts=r.receipts,
                               total_paid=convert.money(r.paid, currency))
            if r.average is not None:
                row.average_paid.CopyFrom(convert.money(r.average, currency))
        return out

    async def GetVisitFrequencyReport(self, request, context):
        q = _query(request, self.backend, "visit_frequency")
        rows, head = await _gather(self.backend, "visit_frequency", q)
        out = feed_pb2.GetVisitFrequencyReportResponse(as_of_cursor=head)
        for r in rows:
            out.rows.add(key=_key(q.program_id, r.key), active_members=r.active,
                         visits=r.visits, histogram=[
                             feed_pb2.VisitBucket(visits=n, members=m)
                             for n, m in r.histogram])
        return out

    async def GetCouponsReport(self, request, context):
        q = _query(request, self.backend, "coupons")
        rows, head = await _gather(self.backend, "coupons", q)
        currency = q.program.currency
        out = feed_pb2.GetCouponsReportResponse(as_of_cursor=head)
        for r in rows:
            row = out.rows.add(key=_key(q.program_id, r.key))
            for what, money in _COUPON_FIGURES:
                setattr(row, f"{what}_coupons", getattr(r, what))
                getattr(row, money).CopyFrom(
                    convert.money(getattr(r, f"{what}_money"), currency))
        return out

    async def GetPartnerSettlementReport(self, request, context):
        q = _query(request, self.backend, "settlement")
        rows, head = await _gather(self.backend, "settlement", q)
        currency = q.program.currency
        out = feed_pb2.GetPartnerSettlementReportResponse(as_of_cursor=head)
        for r in rows:
            out.rows.add(issuing_partner=convert.partner_name(q.program_id, r.issuing),
                         redeeming_partner=convert.partner_name(q.program_id,
                                                                r.redeeming),
                         points=r.points, value=convert.money(r.value, currency))
        return out


# --- reports -------------------------------------------------------------------

# CouponsReportRow: (figure of reports.CouponsRow, its money field)
_COUPON_FIGURES = (("issued", "issued_value"), ("redeemed", "redeemed_discount"),
                   ("expired", "expired_value"), ("revoked", "revoked_value"),
                   ("given_back", "given_back_value"),
                   ("displaced", "displaced_value"))

_DIMENSIONS = frozenset(int(d) for d in reports.Dimension)
_LAST_SECOND = 253_402_300_799   # 9999-12-31T23:59:59Z
_UNKNOWN_DIMENSION = "must be REPORT_DIMENSION_STORE, _PARTNER, _TIER or _DAY"


def _query(request, backend, report, interval_field="interval", default_dims=()):
    """A checked report request as a reports.Query: every bad field named
    at once, then the program looked up (NOT_FOUND naming `parent`)."""
    problems = []
    program_id = 0
    try:
        program_id = convert.parse_program(request.parent, "parent")
    except ApiError as err:   # naming the field
        problems.extend(err.fields)
    start = end = 0
    if not request.HasField(interval_field):
        problems.append((interval_field, "required: start_time and end_time"))
    else:
        interval = getattr(request, interval_field)
        times = []
        for part in ("start_time", "end_time"):
            path = f"{interval_field}.{part}"
            if not interval.HasField(part):
                problems.append((path, "required"))
                times.append(None)
                continue
            ts = getattr(interval, part)
            if ts.seconds > _LAST_SECOND:
                problems.append((path, "must be before the year 10000"))
                times.append(None)
                continue
            before = len(problems)
            micros = convert.parse_time(ts, path, problems)
            times.append(micros if len(problems) == before else None)
        start, end = times
        if start is not None and end is not None and end <= start:
            why = (f"must be after {interval_field}.start_time "
                   "(the interval is empty or reversed)")
            problems.append((f"{interval_field}.end_time", why))
    dims = []
    if hasattr(request, "group_by"):
        refused = reports.UNSUPPORTED[report]
        seen = {}
        for i, value in enumerate(request.group_by):
            path = f"group_by[{i}]"
            if value not in _DIMENSIONS:
                problems.append((path, _UNKNOWN_DIMENSION))
            elif value in seen:
                why = f"repeats {_dimension(value)} (group_by[{seen[value]}])"
                problems.append((path, why))
            else:
                seen[value] = i
                if value in refused:
                    problems.append((path, f"{_dimension(value)}: {refused[value]}"))
                else:
                    dims.append(reports.Dimension(value))
    if problems:
        raise invalid(problems)
    entry = backend.program(program_id, "parent")
    return reports.Query(program_id, entry.program, start, end,
                         tuple(dims) or tuple(default_dims))


def _dimension(value):
    return feed_pb2.ReportDimension.Name(value)


def _key(program_id, key):
    out = feed_pb2.ReportKey()
    if key.store:
        out.store = f"stores/{key.store}"
    if key.partner:
        out.partner = convert.partner_name(program_id, key.partner)
    if key.tier:
        out.tier = key.tier
    if key.day is not None:
        out.day.CopyFrom(date_pb2.Date(year=key.day.year, month=key.day.month,
                                       day=key.day.day))
    return out


async def _gather(backend, report, query):
    return await asyncio.get_running_loop().run_in_executor(
        None, reports.gather, backend.ledger, report, query)
