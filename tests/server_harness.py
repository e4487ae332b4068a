"""A real Kopilka server on a loopback port, for end-to-end tests.

The server runs in this process, on its own thread and event loop, behind a
real socket: tests call it through ordinary gRPC channels and stubs, exactly
as a POS would. Its clock is injected (`clock.now`, microseconds, moved by
the test), the ledger is a temporary directory, and `tokens` holds one token
per role (pos and hwd scoped to store 42).
"""

import asyncio
import os
import threading

import grpc

from kopilka.servers.app import Config, Server
from kopilka.servers.auth import TokenFile

START = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000_000


class Clock:
    def __init__(self, now=START):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, micros):
        self.now += micros


class Monotonic:
    """Deadline time for the writer: real time unless a test moves it."""

    def __init__(self):
        import time
        self._real = time.monotonic
        self.offset = 0.0

    def __call__(self):
        return self._real() + self.offset


class RunningServer:
    def __init__(self, data, *, clock=None, sync=False, **config):
        self.data = str(data)
        self.clock = clock or Clock()
        self.monotonic = Monotonic()
        os.makedirs(self.data, exist_ok=True)
        tokens = TokenFile(os.path.join(self.data, "tokens.json"))
        self.tokens = {
            "admin": tokens.add("admin"),
            "pos": tokens.add("pos", [42]),
            "pos43": tokens.add("pos", [43]),
            "hwd": tokens.add("hwd", [42]),
            "integration": tokens.add("integration"),
        }
        self.config = Config(data=self.data, listen="127.0.0.1:0", insecure=True,
                             clock=self.clock, monotonic=self.monotonic, sync=sync,
                             map_size=config.pop("map_size", 256 << 20),
                             sweep_seconds=config.pop("sweep_seconds", 0), **config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = Server(self.config)
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        self._channels = []

    def call(self, coroutine, timeout=30):
        """Runs a coroutine on the server's loop (start, stop, scheduler)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def channel(self):
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def stub(self, stub_class, role="admin"):
        """A stub whose calls carry `role`'s token (None: no credentials)."""
        channel = self.channel()
        if role is not None:
            channel = grpc.intercept_channel(channel, _Bearer(self.tokens[role]))
        return stub_class(channel)

    def stop(self):
        for channel in self._channels:
            channel.close()
        try:
            self.call(self.server.stop(grace=1.0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self._metadata
        return _Details(details.method, details.timeout, metadata,
                        details.credentials, getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready,
                 compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def error_info(error):
    """(status code name, ErrorInfo reason, BadRequest field paths) of an RpcError."""
    from grpc_status import rpc_status
    status = rpc_status.from_call(error)
    return (error.code().name, reason_of(status) if status else None,
            fields_of(status) if status else [])


def reason_of(status):
    """The ErrorInfo reason of a google.rpc.Status (a call's, a PostResult's)."""
    from google.rpc import error_details_pb2
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def fields_of(status):
    """The BadRequest field paths of a google.rpc.Status."""
    from google.rpc import error_details_pb2
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    return []


def rpcs():
    """Every RPC of the API (method descriptors), from the generated modules,
    so a new RPC is covered the day it is added."""
    import importlib
    import pkgutil

    import kopilka.v1
    found = []
    for module in pkgutil.iter_modules(kopilka.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"kopilka.v1.{module.name}").DESCRIPTOR
            for service in descriptor.services_by_name.values():
                found.extend(service.methods)
    return found


def path_of(method):
    return f"/{method.containing_service.full_name}/{method.name}"


def invoke(channel, method, request, metadata=(), timeout=10):
    """Calls `method` with `request` (a message, or its bytes as they are):
    "OK" or (code name, ErrorInfo reason). A stream counts as answered at
    its first message (or its clean end)."""
    from google.protobuf import message_factory
    response_class = message_factory.GetMessageClass(method.output_type)
    serialize = bytes if isinstance(request, bytes) else type(request).SerializeToString
    kind = ("stream" if method.client_streaming else "unary") + "_" + (
        "stream" if method.server_streaming else "unary")
    callable_ = getattr(channel, kind)(path_of(method), request_serializer=serialize,
                                       response_deserializer=response_class.FromString)
    argument = iter([request]) if method.client_streaming else request
    call = None
    try:
        if method.server_streaming:
            call = callable_(argument, metadata=metadata, timeout=timeout)
            next(call, None)
        else:
            callable_(argument, metadata=metadata, timeout=timeout)
        return "OK"
    except grpc.RpcError as err:
        return error_info(err)[:2]
    finally:
        if call is not None:
            call.cancel()


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "programs",
                       "example.toml")


def install_program(srv, path=EXAMPLE):
    """Puts a program definition straight into the ledger and the registry
    (the Programs service's tests cover the API way)."""
    from kopilka.core.batch import Batch
    from kopilka.servers import registry
    with open(path) as f:
        text = f.read()
    program = registry.parse("toml", text)
    batch = Batch().put_program(f"test/program/{program.id}", program.id,
                                flags=program.kernel_flags,
                                utc_offset_minutes=program.utc_offset_minutes,
                                data=registry.encode("toml", text))
    result = srv.call(srv.server.backend.apply(batch, None))[0]
    assert result.code == 0, result
    srv.server.registry.put(program.id, program, "toml", text, srv.clock.now,
                            srv.clock.now)
    return program


def open_member(srv, program, external_id, *, card=None, points=0):
    """An account (with a card, and points spendable now); returns its id."""
    from kopilka.core.batch import Batch
    from kopilka.core.records import NEVER
    backend = srv.server.backend
    result = srv.call(backend.apply(Batch().open_account(
        f"test/open/{external_id}", program, external_id.encode()), None))[0]
    assert result.code == 0, result
    account = result.a
    batch = Batch()
    if card:
        batch.link_card(f"test/card/{card}", account, card.encode())
    if points:
        batch.earn(f"test/earn/{external_id}", account, points,
                   activates_at=0, expires_at=NEVER)
    if len(batch):
        assert all(r.code == 0 for r in srv.call(backend.apply(batch, None)))
    return account
