"""In-memory state of the Store service: read ids seen, and lane watchers.

Both live in memory. Read ids are remembered for a week (the API's promise)
within a bound, saved to a file when the server stops and reloaded when it
starts; after a crash they are lost, and an hwd's resend of a read the core
took but did not acknowledge is shown at its lane once more (the same card,
a moment later). With several core processes behind a balancer a store's
hwd stream and its POS watchers must reach the same process (route by
store).

A lane keeps its last events for a minute and gives them to a POS that
starts watching: after a restart the hwd may resend its spool before the
POS is back, and the reads a customer swiped meanwhile must still reach the
till (each carries its read id and time, so the POS can tell what it has
shown).

Watchers are never allowed to hold up the reads: each has a small bounded
queue; a POS that does not keep up loses its oldest events (a card shown
seconds ago is of no use to it any more), and the reader stream goes on.
"""

import asyncio
import contextlib
import json
import logging
import os
from collections import OrderedDict, deque

log = logging.getLogger("kopilka.lanes")

WEEK = 7 * 86_400_000_000
MAX_REMEMBERED = 1_000_000
WATCH_QUEUE = 32
RECENT = 60_000_000   # a lane's events replayed to a new watcher, microseconds


class SeenReads:
    """Read ids taken in the last `ttl` microseconds (by `clock`), at most
    `limit` of them: the oldest are forgotten first."""

    def __init__(self, clock, ttl=WEEK, limit=MAX_REMEMBERED, path=None):
        self._clock = clock
        self._ttl = ttl
        self._limit = limit
        self._seen = OrderedDict()    # key -> when taken, oldest first
        self._path = path
        if path and os.path.exists(path):
            with open(path) as f:
                for store, read_id, taken in json.load(f):
                    self._seen[(store, read_id)] = taken

    def save(self):
        """Writes what is remembered (atomically) for the next start."""
        if not self._path:
            return
        self._expire()
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump([[k[0], k[1], t] for k, t in self._seen.items()], f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except OSError as exc:   # a full disk must not stop the server's stop
            log.warning("card reads taken could not be saved: an hwd resending "
                        "them after the restart is not told DUPLICATE",
                        extra={"fields": {"path": self._path, "error": str(exc)}})
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def __len__(self):
        return len(self._seen)

    def seen(self, key):
        self._expire()
        return key in self._seen

    def remember(self, key):
        self._seen[key] = self._clock()
        self._seen.move_to_end(key)
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def _expire(self):
        horizon = self._clock() - self._ttl
        while self._seen:
            key, taken = next(iter(self._seen.items()))
            if taken > horizon:
                return
            del self._seen[key]


class Watcher:
    """One WatchLane stream's queue of events."""

    def __init__(self, lane, limit=WATCH_QUEUE):
        self.lane = lane
        self.dropped = 0
        self._queue = deque(maxlen=limit)
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, event):
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1       # deque drops the oldest
        self._queue.append(event)
        self._ready.set()

    def close(self):
        self.closed = True
        self._ready.set()

    async def next(self):
        """The next event, or None once closed."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()


class LaneHub:
    """Watchers by lane; publishing never waits."""

    def __init__(self, clock):
        self._clock = clock
        self._lanes = {}              # (store, lane) -> set of Watchers
        self._recent = {}             # (store, lane) -> deque of (time, event)
        self.closed = False

    def __len__(self):
        return sum(len(w) for w in self._lanes.values())

    def watching(self, lane):
        return bool(self._lanes.get(lane))

    def watch(self, lane):
        watcher = Watcher(lane)
        if self.closed:
            watcher.close()
        horizon = self._clock() - RECENT
        for at, event in self._recent.get(lane, ()):
            if at > horizon:
                watcher.put(event)
        self._lanes.setdefault(lane, set()).add(watcher)
        return watcher

    def unwatch(self, watcher):
        watchers = self._lanes.get(watcher.lane)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._lanes[watcher.lane]

    def publish(self, lane, event):
        recent = self._recent.get(lane)
        if recent is None:
            recent = self._recent[lane] = deque(maxlen=WATCH_QUEUE)
        recent.append((self._clock(), event))
        for watcher in self._lanes.get(lane, ()):
            watcher.put(event)

    def close(self):
        """Ends every watch (the server is stopping)."""
        self.closed = True
        for watchers in self._lanes.values():
            for watcher in watchers:
                watcher.close()
