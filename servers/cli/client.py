"""The client side: the channel (plaintext only to a loopback server, TLS
otherwise), the bearer token, the Client every command calls through, and
what a refused call's status details say."""

import os
import secrets

import grpc

from . import CliError, ServerError

DEFAULT_SERVER = "127.0.0.1:50051"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Client:
    """One channel to the server; every call carries the token (optional with
    a client certificate) and a deadline."""

    def __init__(self, args, default_timeout=10.0):
        from kopilka.v1 import (admin_pb2_grpc, checkout_pb2_grpc, feed_pb2_grpc,
                                members_pb2_grpc, programs_pb2_grpc)
        self.server = args.server
        self.timeout = args.timeout if args.timeout is not None else default_timeout
        # with mutual TLS the certificate says who calls; a token is optional
        token = find_token(args, required=not args.client_cert)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = open_channel(args)
        self._stubs = {
            "Admin": admin_pb2_grpc.AdminStub(self.channel),
            "Checkout": checkout_pb2_grpc.CheckoutStub(self.channel),
            "Feed": feed_pb2_grpc.FeedStub(self.channel),
            "Members": members_pb2_grpc.MembersStub(self.channel),
            "Programs": programs_pb2_grpc.ProgramsStub(self.channel),
        }

    def __call__(self, method, request):
        """`client("Members.GetMember", request)`: the response, or ServerError."""
        service, name = method.split(".")
        try:
            return getattr(self._stubs[service], name)(
                request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServerError(e, f"kopilka.v1.{service}/{name}", self.server) from None

    def stream(self, method, request):
        """A server stream's responses, without a deadline; errors as ServerError."""
        service, name = method.split(".")
        call = getattr(self._stubs[service], name)(request, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise ServerError(e, f"kopilka.v1.{service}/{name}", self.server) from None
        finally:
            call.cancel()

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _host(target):
    return target.rsplit(":", 1)[0].strip("[]")


def open_channel(args):
    """Plaintext only to a loopback server (a token never crosses a network in
    clear); TLS otherwise, with --ca-cert or the system's CAs."""
    loopback = _host(args.server) in LOOPBACK
    tls = args.tls or args.ca_cert or args.client_cert
    if args.insecure and not loopback:
        raise CliError("--insecure talks only to a loopback server; use TLS "
                       "(--ca-cert) for anything else")
    if args.insecure or (loopback and not tls):
        return grpc.insecure_channel(args.server)
    if bool(args.client_cert) != bool(args.client_key):
        raise CliError("mutual TLS needs both --client-cert and --client-key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_bytes(args.ca_cert),
        private_key=_read_bytes(args.client_key),
        certificate_chain=_read_bytes(args.client_cert))
    return grpc.secure_channel(args.server, credentials)


def _read_bytes(path):
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None


def _token_path(data):
    return os.path.join(data, "admin.token")


def find_token(args, required=True):
    if args.token:
        return args.token.strip()
    if os.environ.get("KOPILKA_TOKEN"):
        return os.environ["KOPILKA_TOKEN"].strip()
    path = _token_path(args.data)
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        if not required:
            return None
        raise CliError(f"no token: pass --token, set KOPILKA_TOKEN, or run "
                       f"`kopilka init` (it writes {path})") from None


def rpc_details(error):
    """(message, ErrorInfo reason, [(field path, why)]) of a refused call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    message, reason, fields = error.details() or "", "", []
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    if status is None:
        return message, reason, fields
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [(v.field, v.description) for v in bad.field_violations]
    return status.message, reason, fields


def _hint(code, reason, method, server):
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        return (f"is a server running at {server}? `make serve` starts one; "
                "a server with TLS needs --ca-cert")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "check --token, $KOPILKA_TOKEN or <data>/admin.token"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not reason:
        return "no answer in time; a write may retry with the same --operation-id"
    return None


def _operation_id(args, what):
    return getattr(args, "operation_id", None) or f"cli/{what}/{secrets.token_hex(8)}"
