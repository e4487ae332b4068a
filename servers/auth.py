"""Who is calling, and what they may do.

Every RPC is authenticated: by a bearer token (`authorization: Bearer
kop_<id>_<secret>`), or, with mutual TLS, by the client certificate (its
subject's OU is the role, `store-<n>` entries among its OUs scope it). Tokens
are kept hashed (SHA-256 of the secret; a secret is 256 random bits, so no
slow hash is needed) in a JSON file the `kopilka token create` command
writes; the server rereads it when it changes, so a new token works without
a restart. A token may carry an expiry (`expires`, Unix seconds, by the
server's clock); past it, it is refused like a wrong one. Secrets are
compared in constant time.

Roles: `admin` (everything), `pos` and `hwd` (scoped to their stores),
`integration` (the feed, reports and action bonuses). `ALLOWED` lists, per RPC, the roles
that may call it; a store-scoped principal may only name its own stores,
which servicers check with `require_store`.
"""

import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from .status import server

log = logging.getLogger("kopilka.auth")
ROLES = ("admin", "pos", "hwd", "integration")
PUBLIC = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_POS = frozenset({"pos", "admin"})
_ADMIN = frozenset({"admin"})
_READERS = frozenset({"admin", "pos", "integration"})
_INTEGRATION = frozenset({"integration", "admin"})
ALLOWED = {
    "/kopilka.v1.Checkout/Quote": _POS,
    "/kopilka.v1.Checkout/Hold": _POS,
    "/kopilka.v1.Checkout/Capture": _POS,
    "/kopilka.v1.Checkout/Void": _POS,
    "/kopilka.v1.Checkout/Refund": _POS,
    "/kopilka.v1.Checkout/Post": _POS,
    "/kopilka.v1.Members/GetMember": _POS,
    "/kopilka.v1.Members/LookupMember": _POS,
    "/kopilka.v1.Members/ResolveCard": _POS,
    "/kopilka.v1.Members/AwardAction": _INTEGRATION,
    "/kopilka.v1.Programs/GetProgram": _READERS,
    "/kopilka.v1.Programs/ListPrograms": _READERS,
    "/kopilka.v1.Store/StreamCardReads": frozenset({"hwd", "admin"}),
    "/kopilka.v1.Store/WatchLane": _POS,
}
for _name in ("Subscribe", "GetPointsReport", "GetBreakageReport",
              "GetActiveMembersReport", "GetAverageReceiptReport",
              "GetVisitFrequencyReport", "GetPartnerSettlementReport",
              "GetCouponsReport"):
    ALLOWED[f"/kopilka.v1.Feed/{_name}"] = _INTEGRATION


def allowed(method):
    """Roles that may call `method`; admin alone for anything not listed."""
    return ALLOWED.get(method, _ADMIN)


@dataclass(frozen=True)
class Principal:
    role: str
    stores: frozenset = field(default_factory=frozenset)  # pos, hwd: theirs only
    name: str = ""   # the token id or certificate subject, for logs

    def may_use_store(self, store):
        return self.role in ("admin", "integration") or store in self.stores


_current = contextvars.ContextVar("kopilka_principal", default=None)


def current():
    return _current.get()


def bind(principal):
    return _current.set(principal)


def require_store(store, field="lane"):
    """Refuse a store-scoped caller naming another store's store or lane."""
    principal = current()
    if principal is not None and not principal.may_use_store(store):
        raise server("STORE_NOT_PERMITTED",
                     f"{field}: this caller may not use store {store}", store=store)


# --- tokens -----------------------------------------------------------------

def _digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(role, stores=(), note="", expires=None):
    """(token text to hand out once, record to store); `expires` (Unix
    seconds) ends its use."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role in ("pos", "hwd") and not stores:
        raise ValueError(f"a {role} token needs at least one store")
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = {"id": token_id, "role": role, "stores": sorted(set(stores)),
              "sha256": _digest(secret), "note": note, "created": int(time.time())}
    if expires is not None:
        record["expires"] = int(expires)
    return f"kop_{token_id}_{secret}", record


class TokenFile:
    """The hashed tokens, reread when the file changes (checked once a second)."""

    def __init__(self, path, *, monotonic=time.monotonic, clock=time.time):
        self.path = os.fspath(path)
        self._monotonic = monotonic
        self._clock = clock          # seconds, for expiries
        self._checked = -1e9
        self._stamp = None
        self._tokens = {}
        self._verified = {}   # token text -> (record, Principal), of _tokens

    def add(self, role, stores=(), note="", expires=None):
        """Creates a token, stores its hash; returns the token text."""
        text, record = new_token(role, stores, note, expires)
        records = self._read()
        records.append(record)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"tokens": records}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return text

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)["tokens"]
        except FileNotFoundError:
            return []

    def _refresh(self):
        now = self._monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._tokens = self._load()
            self._verified = {}

    def _load(self):
        """The usable records by id. An unreadable file accepts no token (fail
        closed: a revocation by hand-editing must never be silently ignored);
        a malformed record is skipped. Both are logged."""
        try:
            records = self._read()
            if not isinstance(records, list):
                raise ValueError("tokens must be a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("tokens file unreadable: no token is accepted until it is "
                      "fixed", extra={"fields": {"path": self.path, "error": str(e)}})
            return {}
        tokens = {}
        for number, r in enumerate(records):
            if _usable(r):
                tokens[r["id"]] = r
            else:
                log.error("tokens file: record skipped (malformed)", extra={
                    "fields": {"path": self.path, "record": number}})
        return tokens

    def verify(self, text):
        """The Principal of a token text, or None.

        A token verified once is remembered (its Principal) until the file
        changes; its expiry is checked at every call."""
        self._refresh()
        known = self._verified.get(text)
        if known is None:
            parts = text.split("_", 2)
            if len(parts) != 3 or parts[0] != "kop":
                return None
            record = self._tokens.get(parts[1])
            if record is None or not hmac.compare_digest(record["sha256"],
                                                         _digest(parts[2])):
                return None
            known = (record, Principal(record["role"], frozenset(record["stores"]),
                                       record["id"]))
            if len(self._verified) >= 4096:   # bounded: forget, verify again
                self._verified = {}
            self._verified[text] = known
        record, principal = known
        if record.get("expires") is not None and self._clock() >= record["expires"]:
            return None
        return principal


_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_STORE_OU = re.compile(r"store-([1-9][0-9]{0,9})")


def _usable(record):
    """Whether a tokens-file record has what `verify` relies on."""
    return (isinstance(record, dict) and isinstance(record.get("id"), str)
            and record.get("role") in ROLES
            and isinstance(record.get("sha256"), str)
            and _SHA256.fullmatch(record["sha256"]) is not None
            and isinstance(record.get("stores"), list)
            and all(isinstance(s, int) and not isinstance(s, bool)
                    for s in record["stores"])
            and (record.get("expires") is None
                 or (isinstance(record["expires"], int)
                     and not isinstance(record["expires"], bool))))


def subject_attributes(subject):
    """(type, value) pairs of an RFC 2253 distinguished name (what gRPC gives
    as `x509_subject`), escapes honoured: `CN=till\\, OU=admin` is one
    common name, never an OU. Raises ValueError when it cannot be parsed."""
    if isinstance(subject, str):
        subject = subject.encode()
    pairs, key, value, i = [], None, bytearray(), 0
    while i < len(subject):
        c = subject[i:i + 1]
        if c == b"\\":
            pair = subject[i + 1:i + 3]
            if len(pair) == 2 and set(pair) <= _HEX:
                value.append(int(pair, 16))
                i += 3
            elif pair:
                value += pair[:1]
                i += 2
            else:
                raise ValueError("a subject ends in a lone backslash")
            continue
        if key is None:
            if c == b"=":
                key, value = value.decode().strip(), bytearray()
            elif c in (b",", b"+", b";"):
                raise ValueError("an attribute without a type")
            else:
                value += c
        elif c in (b",", b"+", b";"):
            pairs.append((key, value.decode()))
            key, value = None, bytearray()
        else:
            value += c
        i += 1
    if key is None:
        if value.strip():
            raise ValueError("an attribute without a type")
    else:
        pairs.append((key, value.decode()))
    return pairs


def from_certificate(auth_context):
    """The Principal of a verified client certificate (mutual TLS), or None.

    The subject's OU entries carry the role and `store-<n>` scopes, e.g. a
    till server's certificate `CN=pos-42, OU=pos, OU=store-42`. A subject
    naming no role or several, or a pos or hwd certificate without a store,
    gives no principal."""
    subjects = auth_context.get("x509_subject") or []
    if len(subjects) != 1:
        return None
    try:
        attributes = subject_attributes(subjects[0])
    except ValueError:
        return None
    roles, stores = set(), set()
    for key, value in attributes:
        if key.upper() not in ("OU", "2.5.4.11"):
            continue
        if value in ROLES:
            roles.add(value)
        elif m := _STORE_OU.fullmatch(value):
            stores.add(int(m[1]))
    if len(roles) != 1:
        return None
    role = roles.pop()
    if role in ("pos", "hwd") and not stores:
        return None
    return Principal(role, frozenset(stores),
                     subjects[0].decode(errors="replace"))


class Authenticator:
    """Decides the Principal of a call from its metadata and TLS context."""

    def __init__(self, tokens, *, client_certificates=False):
        self.tokens = tokens
        self.client_certificates = client_certificates

    def principal(self, metadata, auth_context):
        if self.client_certificates:
            principal = from_certificate(auth_context)
            if principal is not None:
                return principal
        for key, value in metadata:
            if key == "authorization" and value.startswith("Bearer "):
                return self.tokens.verify(value[7:].strip())
        return None

    def check_call(self, method, context):
        """`check` of a call's context; its TLS context is asked for only
        when client certificates are in use."""
        return self.check(method, context.invocation_metadata() or (),
                          context.auth_context() if self.client_certificates else {})

    def check(self, method, metadata, auth_context):
        """The caller's Principal; raises ApiError when it may not call."""
        principal = self.principal(metadata, auth_context)
        if principal is None:
            raise server("CREDENTIALS_INVALID", "missing or invalid credentials")
        if principal.role not in allowed(method):
            raise server("ROLE_NOT_PERMITTED",
                         f"role {principal.role} may not call {method}",
                         role=principal.role)
        return principal
