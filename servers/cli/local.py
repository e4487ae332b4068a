"""`serve`, `init` and `token create` act locally on a data directory (`init`
writes the ledger directly, so it runs before the server does)."""

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from .. import logs
from ..auth import ROLES
from . import CliError
from .client import DEFAULT_SERVER, _token_path
from .commands.programs import _read_definition
from .format import _short
from .options import _group

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "programs" / "example.toml"


# --- serve --------------------------------------------------------------------

def _add_serve(sub, data):
    p = sub.add_parser("serve", parents=[data], help="run the server",
                       description="Run the server until SIGTERM or Ctrl-C; logs "
                       "are JSON lines on stderr.")
    p.add_argument("--listen", default=DEFAULT_SERVER, help="host:port to bind "
                   f"(default {DEFAULT_SERVER}; port 0 picks a free one)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS: local development on loopback only")
    p.add_argument("--tls-cert", help="the server's certificate (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--client-ca", help="require client certificates signed by "
                   "this CA (mutual TLS; role and stores from the certificate)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on "
                   "this port")
    p.add_argument("--map-size", type=_size, default=None,
                   help="most the ledger may grow to, e.g. 8G (default 8G)")
    p.add_argument("--writemap", action="store_true",
                   help="LMDB writes its pages in the map, the data file allocated "
                   "ahead (less server memory at scale, slower durable batches; "
                   "not on btrfs or ZFS)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(run=cmd_serve)


def _size(text):
    """`8G`, `512M`, `65536`: bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError("a size like 8G, 512M or 1048576") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def cmd_serve(args):
    from ..app import Config, serve
    if not args.insecure and not (args.tls_cert and args.tls_key):
        raise CliError("TLS needs --tls-cert and --tls-key; for local development "
                       "on loopback use --insecure")
    if args.client_ca and args.insecure:
        raise CliError("--client-ca needs TLS (drop --insecure)")
    logs.configure(args.log_level)
    config = Config(data=args.data, listen=args.listen, insecure=args.insecure,
                    tls_cert=args.tls_cert, tls_key=args.tls_key,
                    client_ca=args.client_ca, metrics_port=args.metrics_port,
                    writemap=args.writemap)
    if args.map_size:
        config.map_size = args.map_size
    try:
        asyncio.run(serve(config))
    except ValueError as e:       # the server refused its configuration
        raise CliError(str(e)) from None
    except RuntimeError as e:
        if "bind" not in str(e):
            raise
        raise CliError(f"cannot listen on {args.listen}: is another server "
                       "running there?") from None
    return 0


# --- init ---------------------------------------------------------------------

def _add_init(sub, data):
    p = sub.add_parser("init", parents=[data],
                       help="first run: data directory, example program, admin token",
                       description="Create the data directory and the ledger, put a "
                       "program in it and create an admin token. Running it again "
                       "changes nothing.")
    p.add_argument("--program", type=Path, default=None,
                   help=f"program definition (TOML or JSON; default {_short(EXAMPLE)})")
    p.set_defaults(run=cmd_init)


def cmd_init(args):
    from ..app import Config
    config = Config(data=args.data)
    data = Path(args.data)
    made = not data.exists()
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    program_line, program_changed = _init_program(config, args.program or EXAMPLE)
    token = _init_token(config)
    if made or program_changed or token:
        if made:
            print(f"created {data}/")
        print(program_line)
        if token:
            print(f"admin token (saved in {_token_path(args.data)}, mode 0600; keep it "
                  f"secret):\n{token}")
        else:
            print(f"admin token: unchanged, in {_token_path(args.data)}")
    else:
        print(f"{data} is already set up; nothing changed.\n{program_line}\n"
              f"admin token: in {_token_path(args.data)}")
    return 0


def _init_program(config, path):
    """Puts the program into the ledger unless it is there: (what happened, changed)."""
    from kopilka.core.batch import Batch
    from kopilka.core.program import ProgramError
    from kopilka.kernel import Ledger

    from .. import registry
    source, text = _read_definition(path)
    try:
        program = registry.parse(source, text)
    except ProgramError as e:
        problems = "\n".join(f"  {p}" for p in e.problems)
        raise CliError(f"{path}: the program definition is invalid:\n{problems}") from None
    ledger = Ledger(config.ledger_path, map_size=config.map_size)
    try:
        stored = registry.Registry.load(ledger).get(program.id)
        if stored is not None:
            note = "" if stored.text == text else (
                f"\n  ({_short(path)} differs from it; to add versions run "
                f"`kopilka program apply {_short(path)}` against the server)")
            line = (f'program {program.id} "{stored.program.name}" is in the ledger; '
                    f"left as it is{note}")
            return line, False
        batch = Batch().put_program(f"kopilka-init/program/{program.id}", program.id,
                                    flags=program.kernel_flags,
                                    utc_offset_minutes=program.utc_offset_minutes,
                                    data=registry.encode(source, text))
        result = ledger.apply(batch, time.time_ns() // 1000)[0]
        if result.code != 0:
            raise CliError(f"the ledger refused program {program.id}: "
                           f"{_code_name(result.code)}")
    finally:
        ledger.close()
    versions = len(program.versions)
    line = (f'program {program.id} "{program.name}" ({versions} version'
            f'{"s" if versions != 1 else ""}) put into the ledger from {_short(path)}')
    return line, True


def _code_name(code):
    from kopilka.core.records import Code
    try:
        return Code(code).name
    except ValueError:
        return str(code)


def _init_token(config):
    """A new admin token written to admin.token, or None when the one there
    still works (a token file deleted or replaced makes it stale)."""
    from ..auth import TokenFile
    tokens = TokenFile(config.tokens_path)
    path = Path(_token_path(config.data))
    if path.exists():
        principal = tokens.verify(path.read_text().strip())
        if principal is not None and principal.role == "admin":
            return None
    token = tokens.add("admin", note="kopilka init")
    _write_secret(path, token + "\n")
    return token


def _write_secret(path, text):
    """Writes a file only its owner may read, atomically."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- token --------------------------------------------------------------------

def _add_token(sub, data):
    actions = _group(sub, "token", "bearer tokens (written locally to <data>/tokens.json)")
    p = actions.add_parser("create", parents=[data], help="create a token and print it once",
                           description="Create a token; the server picks it up "
                           "within a second, without a restart. Only its hash is kept.")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--store", type=int, action="extend", nargs="+", default=[],
                   help="store(s) a pos or hwd token may use (required for them)")
    p.add_argument("--note", default="", help="who it is for (kept with the hash)")
    p.add_argument("--expires-in", type=_duration, default=None, metavar="DURATION",
                   help="refused after this long, e.g. 90d, 12h, 30m (default: never)")
    p.set_defaults(run=cmd_token_create)


def _duration(text):
    """`90d`, `12h`, `30m`, `45s`: seconds."""
    units = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
    text = text.strip().lower()
    try:
        value = int(text[:-1]) * units[text[-1:]]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError("a duration like 90d, 12h, 30m or 45s") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def cmd_token_create(args):
    from ..app import Config
    from ..auth import TokenFile
    if not os.path.isdir(args.data):
        raise CliError(f"no data directory at {args.data}: run `kopilka init` "
                       "first or pass --data")
    try:
        expires = None if args.expires_in is None else int(time.time()) + args.expires_in
        token = TokenFile(Config(data=args.data).tokens_path).add(
            args.role, args.store, args.note, expires)
    except ValueError as e:
        raise CliError(str(e)) from None
    stores = ", ".join(map(str, sorted(set(args.store))))
    scope = f" for store(s) {stores}" if stores else ""
    if expires is not None:
        scope += " until " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    print(f"{args.role} token{scope} (shown only now; store it safely):",
          file=sys.stderr)
    print(token)
    return 0
