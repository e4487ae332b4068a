"""The Kopilka server: the ledger, its writer, and the gRPC services over them.

`Server(config)` owns everything a running node has; `start()` binds the
port and `stop()` shuts down in order: health says NOT_SERVING, no new RPCs
are accepted, RPCs in flight finish (their writes are committed by the
writer), the writer commits what is queued, the ledger closes. SIGTERM runs
the same `stop()` (see `run`), so a restart resumes exactly where it was.
"""

import asyncio
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kopilka.kernel import Ledger
from kopilka.v1 import (admin_pb2, checkout_pb2, checkout_pb2_grpc, feed_pb2,
                        members_pb2, programs_pb2, store_pb2)

from .auth import Authenticator, TokenFile
from .backend import Backend
from .checkout import Checkout
from .interceptor import Guard, MethodTable
from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler
from .writer import MAX_OPERATIONS, GroupCommitWriter

log = logging.getLogger("kopilka.server")
MAX_MESSAGE = 64 << 20   # a Post of 10,000 receipts fits


@dataclass
class Config:
    data: str = "./data"
    listen: str = "127.0.0.1:50051"
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None      # set: mutual TLS, client certificates required
    map_size: int = 8 << 30
    metrics_port: int | None = None
    hold_seconds: int = 900
    sweep_seconds: float = 60.0
    max_batch: int = MAX_OPERATIONS   # operations in one commit at most
    sync: bool = True
    writemap: bool = False            # True: LMDB writes pages in the map (see README)
    clock: object = None              # () -> microseconds; tests inject one
    monotonic: object = time.monotonic

    @property
    def ledger_path(self):
        return os.path.join(self.data, "ledger")

    @property
    def tokens_path(self):
        return os.path.join(self.data, "tokens.json")


def wall_clock():
    return time.time_ns() // 1000


def _registrations():
    """(add_to_server, servicer factory, full service name) of every service
    present; servicers of services not built yet are simply absent."""
    found = [(checkout_pb2_grpc.add_CheckoutServicer_to_server, Checkout,
              checkout_pb2.DESCRIPTOR.services_by_name["Checkout"].full_name)]
    for module, name, attr in (("members", "Members", members_pb2),
                               ("programs", "Programs", programs_pb2),
                               ("feed", "Feed", feed_pb2),
                               ("store", "Store", store_pb2),
                               ("admin", "Admin", admin_pb2)):
        try:
            servicer_module = __import__(f"kopilka.servers.{module}", fromlist=[name])
        except ModuleNotFoundError:
            continue
        grpc_module = __import__(f"kopilka.v1.{module}_pb2_grpc", fromlist=["x"])
        found.append((getattr(grpc_module, f"add_{name}Servicer_to_server"),
                      getattr(servicer_module, name),
                      attr.DESCRIPTOR.services_by_name[name].full_name))
    return found


class Server:
    def __init__(self, config):
        self.config = config
        self.metrics = Metrics()
        self.clock = config.clock or wall_clock
        self.port = None
        self._server = None
        self._stopped = asyncio.Event()
        self._done = asyncio.Event()

    async def start(self):
        c = self.config
        _check_listen(c)
        os.makedirs(c.data, exist_ok=True)
        self.ledger = Ledger(c.ledger_path, map_size=c.map_size, sync=c.sync,
                             writemap=c.writemap)
        self.registry = Registry.load(self.ledger)
        self.writer = GroupCommitWriter(self.ledger, clock=self.clock,
                                        max_operations=c.max_batch,
                                        on_commit=self._on_commit,
                                        monotonic=c.monotonic)
        self.backend = Backend(self.ledger, self.writer, self.registry, self.clock,
                               c.monotonic, hold_seconds=c.hold_seconds)
        self.backend.server = self
        self.metrics.watch_writer(self.writer)
        self.metrics.on_ledger(self.ledger.info())
        self.tokens = TokenFile(c.tokens_path, monotonic=c.monotonic,
                                clock=lambda: self.clock() / 1e6)
        authenticator = Authenticator(self.tokens,
                                      client_certificates=bool(c.client_ca))
        self._server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)])
        names = []
        self.services = {}
        methods = MethodTable(Guard(authenticator, self.metrics))
        for add, factory, name in _registrations():
            servicer = factory(self.backend)
            self.services[factory.__name__] = servicer
            methods.add(add, servicer)
            names.append(name)
        methods.register(self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                     reflection.SERVICE_NAME], self._server)
        self.port = self._bind(c)
        await self._server.start()
        for name in names + [""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.scheduler = Scheduler(self.backend, c.sweep_seconds)
        self.scheduler.start()
        self.metrics_port = None
        if c.metrics_port is not None:
            self.metrics_http = self.metrics.serve(c.metrics_port)
            self.metrics_port = self.metrics_http.server_port
        log.info("serving", extra={"fields": {
            "listen": c.listen, "port": self.port, "data": c.data,
            "metrics_port": self.metrics_port,
            "tls": not c.insecure, "mutual_tls": bool(c.client_ca),
            "writemap": c.writemap,
            "programs": self.registry.ids()}})
        return self.port

    def _on_commit(self, stats):
        """The writer's hook, on the writer thread: metrics, then wake the
        feed's subscribers."""
        self.metrics.on_commit(stats)
        if stats.operations:
            self.metrics.on_ledger(self.ledger.info())
        feed = getattr(self, "services", {}).get("Feed")
        if feed is not None and stats.operations:
            feed.notifier.notify()

    def _bind(self, c):
        if c.insecure:
            return self._server.add_insecure_port(c.listen)
        with open(c.tls_key, "rb") as f:
            key = f.read()
        with open(c.tls_cert, "rb") as f:
            cert = f.read()
        root = None
        if c.client_ca:
            with open(c.client_ca, "rb") as f:
                root = f.read()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=root, require_client_auth=bool(root))
        return self._server.add_secure_port(c.listen, credentials)

    async def stop(self, grace=10.0):
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        self.scheduler.stop()
        for servicer in self.services.values():  # end open streams: UNAVAILABLE
            if hasattr(servicer, "shutdown"):
                servicer.shutdown()
        await self._server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
        self.ledger.close()
        if getattr(self, "metrics_http", None) is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()   # the port, too
        log.info("stopped")
        self._done.set()

    async def wait(self):
        """Returns once the server has stopped completely."""
        await self._done.wait()


def _check_listen(c):
    host = c.listen.rsplit(":", 1)[0].strip("[]")
    if c.insecure:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("--insecure serves only on loopback (127.0.0.1, ::1); "
                             "use TLS to serve on a network")
        log.warning("INSECURE: no TLS; for local development only", extra={
            "fields": {"listen": c.listen}})
    elif not (c.tls_cert and c.tls_key):
        raise ValueError("TLS needs --tls-cert and --tls-key (or --insecure for "
                         "local development on loopback)")


# The cyclic garbage collector's first threshold, for the server process.
# A Post keeps a few dozen tracked objects per operation alive (quotes,
# closures, batches) until its commit answers, so with Python's default (700) the
# collector ran about 2,000 times per 30,000 operations and its full
# collections walked every Post in flight: a quarter of the event loop's CPU.
# The request paths make no reference cycles (a run collects a few hundred
# objects in all), so letting young objects reach 50,000 before a collection
# costs no memory.
GC_THRESHOLD = 50_000


def tune_gc():
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)


async def serve(config, ready=None):
    """Runs until SIGTERM or SIGINT, then stops cleanly."""
    tune_gc()
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    if ready is not None:
        ready(server)
    await server.wait()
