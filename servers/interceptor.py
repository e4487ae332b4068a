"""Around every RPC: authenticate, count, time, and turn refusals into statuses.

Authentication needs the call's TLS context (for client certificates), which
only the handler's context offers, so the interceptor wraps each handler
rather than deciding from the method name alone. A handler raises
`ApiError` for a refusal; anything else escaping a handler is a server bug,
logged with its traceback (masked, see logs.py) and answered INTERNAL with
a message that says nothing of it.
"""

import logging
import time

import grpc
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
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        # client streaming: none in the API yet, but never let one through
        # unauthenticated (a handler returned as it is would skip _Call)
        return grpc.stream_unary_rpc_method_handler(
            self._unary(method, handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _enter(self, method, context):
        principal = self._auth.check(method, context.invocation_metadata() or (),
                                     context.auth_context())
        auth.bind(principal)
        return principal

    def _unary(self, method, behavior):
        async def wrapped(request, context):
            async with _Call(self, method, context):
                return await behavior(request, context)
        return wrapped

    def _stream(self, method, behavior):
        async def wrapped(request, context):
            async with _Call(self, method, context):
                async for response in behavior(request, context):
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


def _code_of(exc, context):
    """The status an exception ends the call with (an abort, a cancel), or
    None for a bug."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if type(exc).__name__ in ("AbortError", "CancelledError"):
        return "CANCELLED"
    return None
