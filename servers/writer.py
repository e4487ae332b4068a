"""The group-commit writer: every write of the server goes through it.

Callers (RPC handlers on an asyncio loop) submit encoded operations and await
their results. One writer thread takes everything queued (up to a bound),
applies it as one ledger batch (one durable LMDB commit, the GIL released
while LMDB works), and only then answers each caller. Under load the queue
fills while a commit is on disk, so batches grow with load: that is how a
ledger whose every commit costs milliseconds of flushing serves many
thousands of operations a second.

Requests whose deadline passed before their batch are not applied; they fail
with `DeadlineExceeded` and change nothing.

A batch is bounded by operations (`max_operations`): requests queue for the
next one past it. A request is never split: a Post's flush (its chains, and
the all-or-nothing of a commit refused whole) is one request, and one larger
than the bound is a batch of its own.
"""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from kopilka.core.batch import Results
from kopilka.core.records import RESULT

log = logging.getLogger("kopilka.writer")


class WriterClosed(Exception):
    """The writer is shutting down and takes no more requests."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch: nothing was applied."""


@dataclass
class _Request:
    ops: bytes
    count: int
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class CommitStats:
    """What one commit did, for metrics."""
    requests: int
    operations: int
    expired: int
    seconds: float


@dataclass
class _Stop:
    done: threading.Event = field(default_factory=threading.Event)


# The bound on a batch's operations. LMDB keeps a commit's dirty pages
# (malloc'ed) for the next, so the largest batch sets the server's anonymous
# memory: at 1M accounts about 4 KiB per operation (durable commits of
# random earns: +9 MiB at 2,048, +33 MiB at 8,192, +123 MiB at 65,536). Past
# a few thousand the kernel's throughput is several times what the server's
# Python prepares (about 22,000 durable ops/s at 1M accounts in batches of
# 2,048 to 8,192, against 3,000 to 5,000 through Post), and Posts of 1,000
# holds and captures (about 2,000 operations each: a capture, its visit,
# sometimes its coupon) still merge up to four at a time under it.
MAX_OPERATIONS = 8_192


class GroupCommitWriter:
    """Applies queued requests in batches on one thread.

    `clock()` gives the operation time (integer microseconds) assigned to
    each batch: the server's clock in production, an injected one in tests.
    `on_commit(CommitStats)` is called after each commit (metrics)."""

    def __init__(self, ledger, *, clock, max_operations=MAX_OPERATIONS,
                 on_commit=None, monotonic=time.monotonic):
        self._ledger = ledger
        self._clock = clock
        self._max = max_operations
        self._on_commit = on_commit
        self._monotonic = monotonic
        self._queue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()   # nothing is queued behind the stop
        self._thread = threading.Thread(target=self._run, name="kopilka-writer",
                                         daemon=True)
        self._thread.start()

    def depth(self):
        """Requests waiting for a batch (approximate)."""
        return self._queue.qsize()

    async def submit(self, ops, count, *, deadline=None):
        """Apply `count` encoded operations; returns their `Results`.

        Raises DeadlineExceeded, WriterClosed, or the ledger's error for the
        whole batch (e.g. MapFullError: nothing of the batch was applied)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = _Request(bytes(ops), count, deadline, future, loop)
        with self._lock:   # `close` runs on another thread
            if self._closed:
                raise WriterClosed("the writer is closed")
            self._queue.put(request)
        return await future

    def close(self, timeout=None):
        """Stop taking requests, apply what is queued, stop the thread."""
        stop = None
        with self._lock:
            if not self._closed:
                self._closed = True
                stop = _Stop()
                self._queue.put(stop)
        if stop is not None:
            stop.done.wait(timeout)
        self._thread.join(timeout)

    # --- the writer thread --------------------------------------------------
    def _run(self):
        pending = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if isinstance(first, _Stop):
                first.done.set()
                return
            batch, stop = [first], None
            operations = first.count
            while operations < self._max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = item
                    break
                if operations + item.count > self._max:
                    pending = item  # starts the next batch
                    break
                batch.append(item)
                operations += item.count
            self._commit(batch)
            if stop is not None:
                pending = stop

    def _commit(self, batch):
        now = self._monotonic()
        live, expired, answers = [], 0, []
        for request in batch:
            if request.deadline is not None and request.deadline <= now:
                expired += 1
                answers.append((request, None, DeadlineExceeded(
                    "deadline passed before the request's batch")))
            else:
                live.append(request)
        started = time.perf_counter()
        operations = sum(r.count for r in live)
        if live:
            try:
                results = self._ledger.apply(b"".join(r.ops for r in live),
                                             self._clock())
            except Exception as exc:  # the whole batch was refused
                answers.extend((request, None, exc) for request in live)
            else:
                raw = results.raw
                offset = 0
                for request in live:
                    end = offset + request.count * RESULT.size
                    answers.append((request, Results(raw[offset:end]), None))
                    offset = end
        _answer_all(answers)
        if self._on_commit is not None:
            try:    # a failing hook must not stop the writer (callers would hang)
                self._on_commit(CommitStats(len(live), operations, expired,
                                            time.perf_counter() - started))
            except Exception:
                log.exception("the commit hook failed")


def _answer_all(answers):
    """Settles the futures of (request, result, exception) triples: one
    wake-up of each callers' loop for the whole commit, not one per caller."""
    by_loop = {}
    for answer in answers:
        by_loop.setdefault(answer[0].loop, []).append(answer)
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:
            pass  # the callers' loop is closed: nobody is waiting any more


def _settle(answers):
    for request, result, exception in answers:
        if request.future.done():  # the caller gave up (cancelled)
            continue
        if exception is not None:
            request.future.set_exception(exception)
        else:
            request.future.set_result(result)
