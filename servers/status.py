"""Refusals as rich gRPC statuses: a code, an ErrorInfo reason, bad fields.

Servicers raise `ApiError`; the server's interceptor turns it into a status
with google.rpc details (ErrorInfo always, BadRequest when fields are named),
so a client switches on a stable reason and never sees UNKNOWN for its own
mistake. `Post` embeds the same `google.rpc.Status` per operation.
"""

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from . import errors

_CODES = {code.name: code for code in grpc.StatusCode}


class ApiError(Exception):
    """A refusal with everything the client needs to act on it."""

    def __init__(self, status, reason, message, *, fields=(), metadata=None):
        super().__init__(message)
        self.status = _CODES[status] if isinstance(status, str) else status
        self.reason = reason
        self.message = message
        self.fields = tuple(fields)           # (field path, description)
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    def to_proto(self):
        """The google.rpc.Status, details packed."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=errors.DOMAIN,
                                           metadata=self.metadata)
        details = [_pack(info)]
        if self.fields:
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.fields])))
        return status_pb2.Status(code=self.status.value[0], message=self.message,
                                 details=details)


def _pack(message):
    box = any_pb2.Any()
    box.Pack(message)
    return box


def invalid(fields, reason="REQUEST_INVALID"):
    """INVALID_ARGUMENT naming each bad field: `fields` is (path, why) pairs."""
    fields = list(fields)
    summary = "; ".join(f"{f}: {d}" for f, d in fields[:5])
    more = f" (and {len(fields) - 5} more)" if len(fields) > 5 else ""
    return ApiError("INVALID_ARGUMENT", reason, f"invalid request: {summary}{more}",
                    fields=fields)


class Checks:
    """Collects every bad field of a request before refusing it (the reason
    is the first bad field's)."""

    def __init__(self):
        self.fields, self.reason = [], None

    def run(self, parse, *args):
        try:
            return parse(*args)
        except ApiError as err:
            if err.status.name != "INVALID_ARGUMENT":
                raise
            self.fields.extend(err.fields)
            self.reason = self.reason or err.reason
            return None

    def add(self, field, why, reason="REQUEST_INVALID"):
        self.fields.append((field, why))
        self.reason = self.reason or reason

    def done(self):
        if self.fields:
            raise invalid(self.fields, self.reason)


def unfinished(err, done, rest):
    """`err`, a commit refused whole (the store full, the deadline passed, the
    server stopping), told truly when an earlier commit of the same request
    was written: what was (`done`), what was not (`rest`), and that the same
    request again (its operation id) completes it."""
    return ApiError(err.status, err.reason,
                    f"{done}; {rest}: not written ({err.reason}); the same "
                    "request again completes it",
                    fields=err.fields, metadata={**err.metadata, "unfinished": "true"})


def server(reason, message, **metadata):
    """A refusal of the server's own (see errors.SERVER)."""
    return ApiError(errors.SERVER[reason], reason, message, metadata=metadata)


def from_kernel(code, field=None, message=None, **metadata):
    """The ledger's result code as the API's status; `field` names the
    request field at fault for INVALID_ARGUMENT codes."""
    status, reason = errors.KERNEL[code]
    text = message or reason.lower().replace("_", " ")
    fields = [(field, text)] if field and status == "INVALID_ARGUMENT" else ()
    return ApiError(status, reason, text, fields=fields, metadata=metadata)


def ok_proto():
    return status_pb2.Status(code=code_pb2.OK)
