"""A small real core for the hwd tests: `Store.StreamCardReads` on a loopback port.

(And the few helpers the hwd's runtime tests share: `wait_for`, a hand-moved
`Clock`, a fixed `Jitter`, async backoff `Sleeps` that never wait, `Pty`.)

It does what the API promises and nothing more: checks the bearer token,
records each read the first time its read id is seen, answers DUPLICATE to
a read id seen before, and acknowledges every message's reads in order. It
can stop acknowledging (reads taken, acks lost), refuse reads by card
number (REJECTED), and be stopped and started again on the same port, as a
core that restarts. It is a real grpc server, so the hwd goes through
connection setup, HTTP/2 and the generated stubs as it would in a store.
"""

import asyncio
import os
import threading
import time
from concurrent import futures

import grpc

from kopilka.v1 import store_pb2, store_pb2_grpc

TOKEN = "hwd-test-token"


class Core(store_pb2_grpc.StoreServicer):
    """What the core saw: `accepted` (CardRead messages, in the order first
    seen), `duplicates`, `messages` (reads per request message), `streams`."""

    def __init__(self, token=TOKEN, ack=True, reject=()):
        self.token, self.ack, self.reject = token, ack, set(reject)
        self.cond = threading.Condition()
        self.accepted, self.seen, self.messages = [], set(), []
        self.duplicates = self.streams = self.refused_auth = 0
        self.arrivals = []           # (read_id, time.monotonic()) of first arrivals

    def StreamCardReads(self, request_iterator, context):
        if self.token is not None and \
                dict(context.invocation_metadata()).get("authorization") != \
                f"Bearer {self.token}":
            with self.cond:
                self.refused_auth += 1
                self.cond.notify_all()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        with self.cond:
            self.streams += 1
            self.cond.notify_all()
        for request in request_iterator:
            acks = []
            with self.cond:
                self.messages.append(len(request.reads))
                for read in request.reads:
                    if read.read_id in self.seen:
                        self.duplicates += 1
                        outcome = store_pb2.CARD_READ_OUTCOME_DUPLICATE
                    elif read.card_number in self.reject:
                        outcome = store_pb2.CARD_READ_OUTCOME_REJECTED
                    else:
                        self.seen.add(read.read_id)
                        self.accepted.append(read)
                        self.arrivals.append((read.read_id, time.monotonic()))
                        outcome = store_pb2.CARD_READ_OUTCOME_ACCEPTED
                    ack = store_pb2.CardReadAck(read_id=read.read_id, outcome=outcome)
                    if outcome == store_pb2.CARD_READ_OUTCOME_REJECTED:
                        ack.status.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    acks.append(ack)
                self.cond.notify_all()
                ack_now = self.ack
            if ack_now:
                yield store_pb2.StreamCardReadsResponse(acks=acks)

    def wait_for(self, predicate, timeout=5.0, what="condition"):
        """Wait (on the condition, no polling) until `predicate(self)` holds."""
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"core: timed out waiting for {what}")

    def ids(self):
        with self.cond:
            return [r.read_id for r in self.accepted]


class CoreServer:
    """Runs a `Core` on 127.0.0.1; `stop()` and `start()` again keep the port."""

    def __init__(self, core=None, port=0, credentials=None):
        self.core = core or Core()
        self.port, self.credentials, self._server = port, credentials, None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                             options=[("grpc.so_reuseport", 0)])
        store_pb2_grpc.add_StoreServicer_to_server(self.core, server)
        target = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(target)
        else:
            self.port = server.add_secure_port(target, self.credentials)
        server.start()
        self._server = server
        return self

    def stop(self):
        if self._server is not None:
            self._server.stop(grace=None).wait(5.0)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def free_port():
    """A port nothing listens on now (a core that is down)."""
    server = CoreServer().start()
    port = server.port
    server.stop()
    return port


# -- shared helpers ----------------------------------------------------------------

DEADLINE = 5.0


def wait_for(predicate, timeout=DEADLINE, what="condition"):
    """Poll `predicate` every few milliseconds; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.003)
    raise AssertionError(f"timed out waiting for {what}")


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
    """The uplink's backoff sleep: records each delay, waits none of it."""

    def __init__(self):
        self.delays = []

    async def __call__(self, seconds):
        self.delays.append(seconds)
        await asyncio.sleep(0.002)      # yield, so a retry loop does not spin


class Pty:
    """A virtual serial port: write to `master`, the reader opens `path`."""

    def __init__(self):
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)

    def write(self, data):
        os.write(self.master, data)

    def unplug(self):
        if self.master is not None:
            os.close(self.master)
            self.master = None
