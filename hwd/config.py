"""The store's hwd configuration: one TOML file, read strictly.

A typo in a config file should stop hwd when it starts, with the key named,
not surface hours later as a lane whose swipes never arrive. So every key is
checked, unknown keys are errors, and every problem is reported at once
under its key path (`readers[1].framing.lrc: expected one of ...`), as the
framing and policy tables already are (`framing.ConfigError`). Positions in
arrays count from 0. Times are integers with their unit in the key's name
(`window_ms`, `stale_after_s`): no floats.

The shape (a full example: examples/hwd/store.toml)::

    store = 42                          # the store's id in the chain

    [core]
    address = "kopilka.example.net:443"
    token_file = "/etc/kopilka/hwd.token"   # or token = "..."; sent as
                                            # `authorization: Bearer <token>`
    ca_file = "/etc/kopilka/ca.pem"         # absent: the system's CAs
    cert_file = "..."  key_file = "..."     # a client certificate (mutual TLS)
    # insecure = true                       # plaintext: a local test core only

    [policy]                                # which card numbers are ours
    ranges = [{ prefix = "7789", length = 16, luhn = true }]

    [dedup]
    window_ms = 1500                        # a double swipe within it is one read

    [spool]
    path = "/var/lib/kopilka-hwd/spool.db"
    max_reads = 100000
    stale_after_s = 900                     # older unsent reads are dropped

    [metrics]
    address = "127.0.0.1:9464"              # Prometheus; "" turns it off

    [status]
    path = "/var/lib/kopilka-hwd/status.json"   # default: next to the spool

    [[readers]]
    id = "lane1-msr"
    port = "/dev/serial/by-id/usb-IDTECH_MSR-if00"   # or a pyserial URL
    lane = 1
    baud = 9600                             # bytesize, parity, stopbits, xonxoff, rtscts
    framing = { kind = "magstripe", tracks = [1, 2] }

Credentials: a token (or token file), a client certificate, or both; at
least one. The channel is TLS unless `insecure = true`, which refuses TLS
files (a plaintext channel cannot use them) and makes hwd warn loudly at
start. Files named here are read when hwd connects (`CoreConfig.token`,
`CoreConfig.tls_files`), not when the config is loaded, so a rotated token
is picked up at the next connection and `kopilka hwd status` need not be
able to read secrets.
"""

import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass

from .filters import CardNumberPolicy
from .framing import (ConfigError, TableReader, _kind, boolean, framing_from_mapping,
                      integer, one_of)
from .reader import PARITIES, SerialSettings

DEFAULT_PATH = "/etc/kopilka/hwd.toml"
U32_MAX = (1 << 32) - 1
READER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")   # visible ASCII: it goes in a header
DAY_S = 86_400


@dataclass(frozen=True)
class CoreConfig:
    """How to reach the core and prove who we are (see the module doc)."""

    address: str
    token_value: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    insecure: bool = False
    backoff_base_ms: int = 500
    backoff_cap_ms: int = 30_000
    connect_timeout_ms: int = 10_000
    ack_timeout_ms: int = 10_000

    def token(self):
        """The bearer token, or None; a token file is read now (rotation)."""
        if self.token_file is None:
            return self.token_value
        text = _read("core.token_file", self.token_file).decode("ascii", "replace").strip()
        if not TOKEN.fullmatch(text):
            raise ConfigError([("core.token_file", f"{self.token_file} does not hold a "
                                                   "token: one line of visible ASCII")])
        return text

    def tls_files(self):
        """(CA, certificate chain, private key) as bytes or None, read now."""
        return tuple(None if path is None else _read(f"core.{key}", path)
                     for key, path in (("ca_file", self.ca_file),
                                       ("cert_file", self.cert_file),
                                       ("key_file", self.key_file)))


@dataclass(frozen=True)
class ReaderConfig:
    """One reader: its id, port, lane, line settings and framing."""

    id: str
    port: str
    lane: int
    serial: SerialSettings
    framing: object


@dataclass(frozen=True)
class HwdConfig:
    """The whole file, checked. `lane_name(3)` is `stores/{store}/lanes/3`."""

    store: int
    core: CoreConfig
    readers: tuple
    policy: CardNumberPolicy
    dedup_window_ms: int = 1500
    spool_path: str = "/var/lib/kopilka-hwd/spool.db"
    spool_max_reads: int = 100_000
    stale_after_s: int = 900
    metrics_address: tuple | None = ("127.0.0.1", 9464)   # (host, port); None: off
    status_path: str | None = None                         # None: next to the spool

    def __post_init__(self):
        if self.status_path is None:
            object.__setattr__(self, "status_path", os.path.join(
                os.path.dirname(os.path.abspath(self.spool_path)), "status.json"))

    def lane_name(self, lane):
        return f"stores/{self.store}/lanes/{lane}"


def _read(key, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([(key, f"cannot read {path}: {e.strerror}")]) from None


# -- converters: each raises ValueError with a message that names no key ----------

def text(limit=4096, pattern=None, what=None):
    def convert(value):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_kind(value)}")
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > limit:
            raise ValueError(f"at most {limit} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError(what)
        return value
    return convert


def port_name(value):
    """A device path or a pyserial URL whose scheme pyserial knows."""
    value = text()(value)
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if not re.fullmatch(r"[a-z0-9]+", scheme) or importlib.util.find_spec(
                f"serial.urlhandler.protocol_{scheme}") is None:
            raise ValueError(f"unknown pyserial URL scheme {scheme!r} (e.g. rfc2217://, "
                             "socket://, hwgrep://)")
    elif not value.startswith("/"):
        raise ValueError("expected an absolute device path (/dev/serial/by-id/...) "
                         "or a pyserial URL")
    return value


def grpc_target(value):
    """`host:port`, `[v6]:port`, or a gRPC target with a scheme (`dns:///...`, `unix:`)."""
    value = text(limit=512)(value)
    if any(c.isspace() for c in value):
        raise ValueError("must not contain spaces")
    if ":" in value and value.split(":", 1)[0] in ("dns", "unix", "unix-abstract",
                                                     "ipv4", "ipv6"):
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65_535:
        raise ValueError("expected host:port (e.g. kopilka.example.net:443)")
    return value


def listen_address(value):
    """(host, port) from `host:port` (port 0: any free port); "" means off."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    if value == "":
        return None
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise ValueError("expected host:port (e.g. 127.0.0.1:9464), or \"\" for none")
    return host, int(port)


def path(value):
    value = text()(value)
    if "\0" in value:
        raise ValueError("must not contain NUL")
    return value


# -- tables ---------------------------------------------------------------------------

CORE_KEYS = {"address", "token", "token_file", "ca_file", "cert_file", "key_file",
             "server_name", "insecure", "backoff_base_ms", "backoff_cap_ms",
             "connect_timeout_ms", "ack_timeout_ms"}
READER_KEYS = {"id", "port", "lane", "baud", "bytesize", "parity", "stopbits", "xonxoff",
               "rtscts", "exclusive", "read_timeout_ms", "backoff_base_ms",
               "backoff_cap_ms", "framing"}
SECTIONS = {"store", "core", "policy", "dedup", "spool", "metrics", "status", "readers"}


def _core(mapping, problems):
    r = TableReader("core", mapping, CORE_KEYS)
    if "address" not in r.mapping:
        r.problem("address", "required: where the core listens (host:port)")
    r.get("address", grpc_target, None)
    r.get("token", text(4096, TOKEN, "expected one line of visible ASCII"), None)
    for key in ("token_file", "ca_file", "cert_file", "key_file"):
        r.get(key, path, None)
    r.get("server_name", text(253), None)
    r.get("insecure", boolean, False)
    r.get("backoff_base_ms", integer(1, 600_000), None)
    r.get("backoff_cap_ms", integer(1, 3_600_000), None)
    r.get("connect_timeout_ms", integer(100, 600_000), None)
    r.get("ack_timeout_ms", integer(100, 3_600_000), None)
    v = r.values
    if "token" in v and "token_file" in v:
        r.problem("token_file", "give token or token_file, not both")
    if ("cert_file" in v) != ("key_file" in v):
        r.problem("cert_file" if "key_file" in v else "key_file",
                  "a client certificate needs both cert_file and key_file")
    if not {"token", "token_file", "cert_file", "key_file"} & set(r.mapping):
        r.problems.append(("core", "no credentials: give token, token_file, or "
                                   "cert_file and key_file"))
    if v.get("insecure"):
        for key in ("ca_file", "cert_file", "key_file", "server_name"):
            if key in v:
                r.problem(key, "not with insecure = true: a plaintext channel has no TLS")
    if v.get("backoff_base_ms", 500) > v.get("backoff_cap_ms", 30_000):
        r.problem("backoff_cap_ms", "must be at least backoff_base_ms (default 500)")
    problems += r.problems
    if r.problems:
        return None
    v["token_value"] = v.pop("token", None)
    return CoreConfig(**v)


def core_from_mapping(mapping):
    """A `[core]` table on its own (the simulator builds one from its flags)."""
    problems = []
    core = _core(mapping, problems)
    if problems:
        raise ConfigError(problems)
    return core


def _reader(mapping, where, problems):
    r = TableReader(where, mapping, READER_KEYS)
    for key in ("id", "port", "lane", "framing"):
        if key not in r.mapping:
            r.problem(key, "required")
    r.get("id", text(64, READER_ID, "expected 1 to 64 letters, digits, '.', '_' or '-'"),
          None)
    r.get("port", port_name, None)
    r.get("lane", integer(1, U32_MAX), None)
    serial = {}
    for key, name, convert in (
            ("baud", "baudrate", integer(50, 4_000_000)),
            ("bytesize", "bytesize", integer(5, 8)),
            ("parity", "parity", one_of(tuple(PARITIES))),
            ("stopbits", "stopbits", integer(1, 2)),
            ("xonxoff", "xonxoff", boolean), ("rtscts", "rtscts", boolean),
            ("exclusive", "exclusive", boolean)):
        if r.get(key, convert, None) is not None:
            serial[name] = r.values[key]
    for key, name, hi in (("read_timeout_ms", "read_timeout", 1000),
                          ("backoff_base_ms", "backoff_base", 600_000),
                          ("backoff_cap_ms", "backoff_cap", 3_600_000)):
        if r.get(key, integer(1, hi), None) is not None:
            serial[name] = r.values[key] / 1000
    serial.setdefault("backoff_base", 0.2)
    serial.setdefault("backoff_cap", 5.0)
    if serial["backoff_base"] > serial["backoff_cap"]:
        r.problem("backoff_cap_ms", "must be at least backoff_base_ms (default 200)")
    framing = None
    if "framing" in r.mapping:
        try:
            framing = framing_from_mapping(r.mapping["framing"], f"{where}.framing")
        except ConfigError as e:
            r.problems += e.problems
    problems += r.problems
    if r.problems:
        return None
    return ReaderConfig(r.values["id"], r.values["port"], r.values["lane"],
                        SerialSettings(**serial), framing)


def from_mapping(mapping):
    """The `HwdConfig` a parsed TOML document describes, or `ConfigError`."""
    problems = []
    top = TableReader("", mapping, SECTIONS)
    top.problems = [(k.lstrip("."), m) for k, m in top.problems]
    problems += top.problems
    mapping = top.mapping
    values = {}
    if "store" not in mapping:
        problems.append(("store", "required: the store's id in the chain (an integer)"))
    else:
        try:
            values["store"] = integer(1, U32_MAX)(mapping["store"])
        except ValueError as e:
            problems.append(("store", str(e)))
    if "core" not in mapping:
        problems.append(("core", "required: [core] with the address and credentials"))
    else:
        values["core"] = _core(mapping["core"], problems)
    if "policy" not in mapping:
        problems.append(("policy", "required: [policy] ranges, the program's card numbers"))
    else:
        try:
            values["policy"] = CardNumberPolicy.from_mapping(mapping["policy"])
        except ConfigError as e:
            problems += e.problems

    sections = {
        "dedup": {"window_ms": ("dedup_window_ms", integer(0, 60_000))},
        "spool": {"path": ("spool_path", path),
                  "max_reads": ("spool_max_reads", integer(1, 10_000_000)),
                  "stale_after_s": ("stale_after_s", integer(1, 7 * DAY_S))},
        "metrics": {"address": ("metrics_address", listen_address)},
        "status": {"path": ("status_path", path)},
    }
    for section, keys in sections.items():
        if section not in mapping:
            continue
        r = TableReader(section, mapping[section], set(keys))
        for key, (name, convert) in keys.items():
            if key in r.mapping:
                values[name] = r.get(key, convert, None)
        problems += r.problems

    readers = mapping.get("readers")
    if readers is None:
        problems.append(("readers", "required: at least one [[readers]] table"))
    elif not isinstance(readers, list) or not readers:
        problems.append(("readers", "expected a non-empty array of tables ([[readers]])"))
    else:
        built, ids, ports = [], {}, {}
        for i, item in enumerate(readers):
            where = f"readers[{i}]"
            reader = _reader(item, where, problems)
            if reader is None:
                continue
            if reader.id in ids:
                problems.append((f"{where}.id", f"duplicate reader id {reader.id!r} "
                                                f"(also readers[{ids[reader.id]}])"))
            if reader.port in ports:
                problems.append((f"{where}.port", f"readers[{ports[reader.port]}] uses "
                                                  "the same port"))
            ids.setdefault(reader.id, i)
            ports.setdefault(reader.port, i)
            built.append(reader)
        values["readers"] = tuple(built)
    if problems:
        raise ConfigError(problems)
    return HwdConfig(**values)


def load(path):
    """Read and check the config file at `path` (`ConfigError` names every problem)."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError([("", f"cannot read {path}: {e.strerror}")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("", f"{path} is not valid TOML: {e}")]) from None
    return from_mapping(document)


def describe(error, path=None):
    """A ConfigError as the lines an operator reads: the file, then key: reason."""
    head = f"{path}: " if path else ""
    lines = [f"{head}invalid hwd config ({len(error.problems)} "
             f"problem{'s' if len(error.problems) != 1 else ''}):"]
    lines += [f"  {k}: {m}" if k else f"  {m}" for k, m in error.problems]
    return "\n".join(lines)


__all__ = ["DEFAULT_PATH", "ConfigError", "CoreConfig", "HwdConfig", "ReaderConfig",
           "core_from_mapping", "describe", "from_mapping", "load"]
