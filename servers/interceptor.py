"""Around every RPC: authenticate, count, time, and turn refusals into statuses.

Authentication needs the call's TLS context (for client certificates), which
only the handler's context offers, so the interceptor wraps each handler
rather than deciding from the method name alone. A handler raises
`ApiError` for a refusal; anything else escaping a handler is a server bug,
logged with its traceback (masked, see logs.py) and answered INTERNAL with
a message that says nothing of it.

Requests reach the wrapped handler as bytes and are parsed there, after
authentication: gRPC's own parsing would answer a malformed message (bad
wire format, invalid UTF-8 in a string) with UNKNOWN, before the caller is
even known; here it is INVALID_ARGUMENT, and only for a known caller.
"""

import logging
import time

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from . import auth
from .status import ApiError, server

log = logging.getLogger("kopilka.rpc")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator, metrics):
        self._auth = authenticator
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(auth.PUBLIC):
            return handler
        method = details.method
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
        # unauthenticated (a handler returned as it is would skip _Call)
        return grpc.stream_unary_rpc_method_handler(
            self._unary(method, handler.stream_unary, _each(parse)),
            response_serializer=handler.response_serializer)

    def _enter(self, method, context):
        principal = self._auth.check(method, context.invocation_metadata() or (),
                                     context.auth_context())
        auth.bind(principal)
        return principal

    def _unary(self, method, behavior, parse):
        async def wrapped(request, context):
            async with _Call(self, method, context):
                return await behavior(_parsed(parse, request), context)
        return wrapped

    def _stream(self, method, behavior, parse):
        async def wrapped(request, context):
            async with _Call(self, method, context):
                async for response in behavior(_parsed(parse, request), context):
                    yield response
        return wrapped

    async def _abort(self, context, method, err):
        principal = auth.current()
        log.info("refused", extra={"fields": {
            "method": method, "code": err.status.name, "reason": err.reason,
            "caller": principal.name if principal else None}})
        await context.abort_with_status(rpc_status.to_status(err.to_proto()))

    def _count(self, method, code, started):
        self._metrics.rpcs.labels(method, code).inc()
        self._metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)


class _Call:
    """One RPC: authenticated on entry; on exit counted and timed, and an
    ApiError turned into its status."""

    def __init__(self, interceptor, method, context):
        self.interceptor, self.method, self.context = interceptor, method, context

    async def __aenter__(self):
        self.started = time.perf_counter()
        try:
            self.interceptor._enter(self.method, self.context)
        except ApiError as err:  # no __aexit__ for a failed __aenter__
            await self.__aexit__(type(err), err, None)
            raise

    async def __aexit__(self, kind, exc, tb):
        code = "OK"
        try:
            if isinstance(exc, ApiError):
                code = exc.status.name
                await self.interceptor._abort(self.context, self.method, exc)
            elif exc is not None:
                code = _code_of(exc, self.context)
                if code is None:   # a server bug
                    code = "INTERNAL"
                    log.error("unexpected error in a handler", exc_info=exc,
                              extra={"fields": {"method": self.method}})
                    # INTERNAL, not gRPC's UNKNOWN, and nothing of the error
                    # (it may quote the request: a card number) to the client
                    await self.context.abort_with_status(rpc_status.to_status(
                        server("INTERNAL_ERROR",
                               "internal error; the server logged it").to_proto()))
        finally:
            self.interceptor._count(self.method, code, self.started)
        return False


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


def _code_of(exc, context):
    """The status an exception ends the call with (an abort, a cancel), or
    None for a bug."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if type(exc).__name__ in ("AbortError", "CancelledError"):
        return "CANCELLED"
    return None
