"""The kill run: POS tills, a feed subscriber and hot backups against the real
server while it is killed (SIGKILL) at random moments and restarted; then
every promise is checked on what is left (see test_kill.py).

Everything random comes from one seed, printed with the summary and in any
failure, so a run can be repeated (timing still differs: the kills land
where the scheduler puts them).
"""

import os
import threading
import time
from collections import Counter

import grpc

from kopilka.kernel import Ledger
from kopilka.v1 import admin_pb2, admin_pb2_grpc, feed_pb2, feed_pb2_grpc

from . import world as w
from .pos import Pos

WAIT = 60


def env_int(name, default):
    return int(os.environ.get(name, default))


class Feed(threading.Thread):
    """A subscriber that resumes from its cursor whenever its stream breaks
    (the server killed) or it hangs up itself (now and then, at random),
    checking that every event comes exactly once and in order."""

    def __init__(self, world, rng):
        super().__init__(daemon=True)
        self.world, self.rng = world, rng
        self.hangups = 0
        self.cursor = 0
        self.events = []           # (cursor, type, operation id)
        self.resumes = 0
        self.problems = []
        self.streaming = threading.Event()
        self.done = threading.Event()
        self.error = None

    def run(self):
        try:
            self._run()
        except BaseException as exc:      # reported by the test
            self.error = exc

    def _run(self):
        channel = grpc.insecure_channel(self.world.address)
        stub = feed_pb2_grpc.FeedStub(channel)
        try:
            while not self.done.is_set():
                stream = stub.Subscribe(feed_pb2.SubscribeRequest(from_cursor=self.cursor),
                                        metadata=self.world.metadata("integration"),
                                        wait_for_ready=True, timeout=WAIT)
                self._stream = stream
                try:
                    for message in stream:
                        self.streaming.set()
                        for event in message.events:
                            if event.cursor != self.cursor + 1:
                                self.problems.append((self.cursor, event.cursor))
                            self.cursor = event.cursor
                            self.events.append((event.cursor, event.type,
                                                event.operation_id))
                        if self.done.is_set():
                            break
                        if self.rng.random() < 0.03:
                            self.hangups += 1
                            break
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                finally:
                    self.streaming.clear()
                    stream.cancel()
                if not self.done.is_set():
                    self.resumes += 1
                    time.sleep(0.05)
        finally:
            channel.close()

    def catch_up(self, head, timeout=WAIT):
        end = time.monotonic() + timeout
        while self.cursor < head and time.monotonic() < end and self.error is None:
            time.sleep(0.05)
        self.done.set()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.cancel()
        self.join(WAIT)


class Backups(threading.Thread):
    """Hot backups one after another into fresh directories."""

    def __init__(self, world, folder):
        super().__init__(daemon=True)
        self.world, self.folder = world, folder
        os.makedirs(folder, exist_ok=True)
        self.taken = []            # (path, head cursor, head hash) acknowledged
        self.interrupted = []      # paths whose backup got no answer
        self.running = threading.Event()
        self.done = threading.Event()
        self.error = None

    def run(self):
        channel = grpc.insecure_channel(self.world.address)
        stub = admin_pb2_grpc.AdminStub(channel)
        n = 0
        try:
            while not self.done.is_set():
                n += 1
                path = os.path.join(self.folder, f"backup-{n}")
                self.running.set()
                try:
                    answer = stub.Backup(admin_pb2.BackupRequest(path=path),
                                         metadata=self.world.metadata("admin"),
                                         wait_for_ready=True, timeout=WAIT)
                    self.taken.append((path, answer.head_cursor, answer.head_hash))
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.CANCELLED):
                        raise
                    self.interrupted.append(path)
                finally:
                    self.running.clear()
                self.done.wait(0.1)
        except BaseException as exc:
            self.error = exc
        finally:
            channel.close()


class Run:
    def __init__(self, root, *, seed, kills, tills, members_per_till, min_gap, max_gap):
        self.root, self.seed, self.kills = str(root), seed, kills
        self.rng = w.rng_for(seed)
        self.members = tills * members_per_till
        self.world = w.World(os.path.join(self.root, "world"), self.members)
        self.tills = []
        for t in range(tills):
            mine = [(self.world.accounts[i], w.card_of(i))
                    for i in range(t * members_per_till, (t + 1) * members_per_till)]
            self.tills.append(Pos(self.world.address, self.world.metadata("pos"), t + 1,
                                  mine, w.rng_for(seed * 1000 + t)))
        self.gaps = (min_gap, max_gap)
        self.stop = threading.Event()
        self.kill_during = Counter()
        self.audits = 0
        self.errors = []

    def till(self, pos):
        try:
            while not self.stop.is_set():
                pos.step()
        except BaseException as exc:
            self.errors.append(exc)
            self.stop.set()

    def audit(self):
        with grpc.insecure_channel(self.world.address) as channel:
            w.wait_serving(channel)
            answer = admin_pb2_grpc.AdminStub(channel).Audit(
                admin_pb2.AuditRequest(), metadata=self.world.metadata("admin"),
                timeout=WAIT)
        assert answer.clean, answer.problems[:10]
        self.audits += 1
        return answer.head_cursor

    def go(self):
        started = time.monotonic()
        self.world.start()
        feed = Feed(self.world, w.rng_for(self.seed + 1))
        backups = Backups(self.world, os.path.join(self.root, "backups"))
        threads = [threading.Thread(target=self.till, args=(p,), daemon=True)
                   for p in self.tills]
        for t in threads + [feed, backups]:
            t.start()
        try:
            for _ in range(self.kills):
                if self.stop.wait(self.rng.uniform(*self.gaps)):
                    break
                self._note_moment(feed, backups)
                self.world.kill()
                self.world.start()
                self.audit()
        finally:
            self.stop.set()
            for t in threads:
                t.join(WAIT * 3)
            backups.done.set()
            backups.join(WAIT)
        for exc in self.errors + [e for e in (feed.error, backups.error) if e]:
            raise exc
        head = self.audit()
        feed.catch_up(head)
        if feed.error:
            raise feed.error
        assert self.world.stop() == 0
        self.elapsed = time.monotonic() - started
        return feed, backups, head

    def _note_moment(self, feed, backups):
        """What the server was doing when killed."""
        self.kill_during["kills"] += 1
        if any(p.in_flight.is_set() for p in self.tills):
            self.kill_during["with writes in flight"] += 1
        if backups.running.is_set():
            self.kill_during["during a backup"] += 1
        if feed.streaming.is_set():
            self.kill_during["while streaming the feed"] += 1

    def answers(self):
        return [a for p in self.tills for a in p.answers]


def check_feed(feed, world, head):
    """Every journal entry once, in order, with its type and operation id."""
    assert feed.problems == [], feed.problems[:5]
    with world.ledger() as ledger:
        entries = w.journal(ledger)
    assert len(entries) == head
    assert [c for c, _, _ in feed.events] == list(range(1, head + 1))
    assert [(t, op) for _, t, op in feed.events] == [
        (e.type, e.op_id.decode()) for e in entries]


def check_backups(backups, world):
    """Each acknowledged backup: a sound ledger whose journal is a prefix of
    the live one. A backup cut short by a kill left an empty folder, or, when
    the kill came after the copy was renamed in, a whole backup."""
    with world.ledger() as live:
        entries = w.journal(live)

    def sound(path, cursor=None, digest=None):
        with Ledger(path, map_size=w.MAP_SIZE) as copy:
            assert copy.audit() == [], path
            head = copy.head()
            copied = w.journal(copy)
        assert cursor is None or head == (cursor, digest), path
        assert copied == entries[:head[0]], path

    for path, cursor, digest in backups.taken:
        sound(path, cursor, digest)
    whole = 0
    for path in backups.interrupted:
        if os.path.exists(path) and os.listdir(path):
            sound(path)
            whole += 1
    return whole


def check_logs(world):
    """No card number nor token secret in anything the server logged."""
    text = world.log_text()
    for i in range(len(world.accounts)):
        assert w.card_of(i) not in text
    for token in world.tokens.values():
        assert token.split("_", 2)[2] not in text
