"""Around every RPC: authenticate, count, time, and turn refusals into statuses.

Authentication needs the call's TLS context (for client certificates), which
only the handler's context offers, so each handler is wrapped rather than
decided from the method name alone. A handler raises `ApiError` for a
refusal; anything else escaping a handler is a server bug, logged with its
traceback (masked, see logs.py) and answered INTERNAL with a message that
says nothing of it.

Requests reach the wrapped handler as bytes and are parsed there, after
authentication: gRPC's own parsing would answer a malformed message (bad
wire format, invalid UTF-8 in a string) with UNKNOWN, before the caller is
even known; here it is INVALID_ARGUMENT, and only for a known caller.

The server wraps every method once, at start (`MethodTable`): a gRPC
interceptor would instead be asked for each call, and build a new handler
and closures each time. `ServerInterceptor` does the same wrapping per call,
for a server that wants an interceptor.
"""

import logging
import time

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from . import auth
from .status import ApiError, server

log = logging.getLogger("kopilka.rpc")
_perf_counter = time.perf_counter


class Guard:
    """Wraps method handlers: the caller authenticated (and bound, see
    auth.current) before the request is parsed, every call counted and timed
    by method and code, a refusal answered with its status and logged."""

    def __init__(self, authenticator, metrics):
        self._auth = authenticator
        self._metrics = metrics
        self._counters = {}   # (method, code) -> the counter's child

    def wrap(self, method, handler):
        """The guarded handler of `handler` (None stays None; the public
        health and reflection services are left as they are)."""
        if handler is None or method.startswith(auth.PUBLIC):
            return handler
        parse = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, parse),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream, parse),
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream, _each(parse)),
                response_serializer=handler.response_serializer)
        # client streaming: none in the API yet, but never let one through
        # unauthenticated (a handler returned as it is would skip the guard)
        return grpc.stream_unary_rpc_method_handler(
            self._unary(method, handler.stream_unary, _each(parse)),
            response_serializer=handler.response_serializer)

    def _unary(self, method, behavior, parse):
        check, bind = self._auth.check_call, auth.bind
        seconds = self._metrics.rpc_seconds.labels(method)

        async def wrapped(request, context):
            started = _perf_counter()
            try:
                bind(check(method, context))
                response = await behavior(_parsed(parse, request), context)
            except BaseException as exc:
                await self._end(context, method, exc, seconds, started)
                raise
            self._count(method, "OK")
            seconds.observe(_perf_counter() - started)
            return response
        return wrapped

    def _stream(self, method, behavior, parse):
        check, bind = self._auth.check_call, auth.bind
        seconds = self._metrics.rpc_seconds.labels(method)

        async def wrapped(request, context):
            started = _perf_counter()
            try:
                bind(check(method, context))
                async for response in behavior(_parsed(parse, request), context):
                    yield response
            except BaseException as exc:
                await self._end(context, method, exc, seconds, started)
                raise
            self._count(method, "OK")
            seconds.observe(_perf_counter() - started)
        return wrapped

    async def _end(self, context, method, exc, seconds, started):
        """A call that raised: counted before its status goes out (a client
        that has its answer finds it in the metrics), then refused."""
        code, bug = _ended(exc, context)
        self._count(method, code)
        seconds.observe(_perf_counter() - started)
        await self._refuse(context, method, exc, bug)

    async def _refuse(self, context, method, exc, bug):
        """Ends the call with the status of `exc`: an ApiError's (logged as a
        refusal), or for a server bug INTERNAL (not gRPC's UNKNOWN), logged
        with its traceback and telling nothing of it (it may quote the
        request: a card number). Anything else (an abort, a cancel) ends the
        call as it is."""
        if isinstance(exc, ApiError):
            principal = auth.current()
            log.info("refused", extra={"fields": {
                "method": method, "code": exc.status.name, "reason": exc.reason,
                "caller": principal.name if principal else None}})
            await context.abort_with_status(rpc_status.to_status(exc.to_proto()))
        elif bug:
            log.error("unexpected error in a handler", exc_info=exc,
                      extra={"fields": {"method": method}})
            await context.abort_with_status(rpc_status.to_status(
                server("INTERNAL_ERROR",
                       "internal error; the server logged it").to_proto()))

    def _count(self, method, code):
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[method, code] = \
                self._metrics.rpcs.labels(method, code)
        counter.inc()


class MethodTable:
    """Every method's guarded handler, built once, for the server's own
    services: `add(add_XServicer_to_server, servicer)` then `register(server)`."""

    def __init__(self, guard):
        self._guard = guard
        self.services = {}   # service name -> {method name: guarded handler}

    def add(self, add_to_server, servicer):
        collected = _Collect()
        add_to_server(servicer, collected)
        for service, handlers in collected.services.items():
            self.services.setdefault(service, {}).update(
                (name, self._guard.wrap(f"/{service}/{name}", handler))
                for name, handler in handlers.items())

    def register(self, grpc_server):
        for service, handlers in self.services.items():
            grpc_server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),))
            grpc_server.add_registered_method_handlers(service, handlers)


class _Collect:
    """Stands in for the server while generated code adds a servicer: what
    it would have registered, by service."""

    def __init__(self):
        self.services = {}

    def add_generic_rpc_handlers(self, handlers):
        pass   # the same handlers come by add_registered_method_handlers

    def add_registered_method_handlers(self, service, handlers):
        self.services.setdefault(service, {}).update(handlers)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """The guard as a gRPC interceptor (wraps each call's handler)."""

    def __init__(self, authenticator, metrics):
        self._guard = Guard(authenticator, metrics)

    async def intercept_service(self, continuation, details):
        return self._guard.wrap(details.method, await continuation(details))


def _parsed(parse, raw):
    """The request message of `raw` bytes; a malformed one is the caller's
    mistake (no field can be named: the message did not parse)."""
    if parse is None:
        return raw
    try:
        return parse(raw)
    except DecodeError as err:
        raise ApiError("INVALID_ARGUMENT", "REQUEST_INVALID",
                       f"the request is not a well-formed message: {err}") from None


def _each(parse):
    """A stream's messages parsed one by one, as the handler reads them."""
    if parse is None:
        return None

    def parse_stream(raws):
        async def messages():
            async for raw in raws:
                yield _parsed(parse, raw)
        return messages()
    return parse_stream


def _ended(exc, context):
    """(code name the call ends with on `exc`, whether it is a server bug)."""
    if isinstance(exc, ApiError):
        return exc.status.name, False
    code = _code_of(exc, context)
    return (code, False) if code is not None else ("INTERNAL", True)


def _code_of(exc, context):
    """The status an exception ends the call with (an abort, a cancel), or
    None for a bug."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if type(exc).__name__ in ("AbortError", "CancelledError"):
        return "CANCELLED"
    return None
