"""The `kopilka` command: run a server, set up a data directory, and talk to a
running server as an operator would.

`serve`, `init` and `token create` act locally on a data directory (`init`
writes the ledger directly, so it runs before the server does). Every other
command is an ordinary gRPC client of `kopilka.v1`, with a bearer token from
`--token`, `$KOPILKA_TOKEN` or `<data>/admin.token`, so what the CLI can do
any integration can do too.

Refusals are printed as `error: <STATUS> <REASON>: <message>` with each bad
field on its own line, and the exit code is 1 (2 for a usage error). Card
numbers are printed in full only where the user named the card.

The package: this module has the entry point, the parser and the error types;
`options` has the shared argparse parents, `local` runs serve/init/token,
`client` talks to the server, `format` prints, `commands` holds the client
commands (one module per service) and `demo` the scripted checkout.
"""

import argparse
import sys

import grpc

from kopilka.core.records import LedgerError


class CliError(Exception):
    """A mistake the user can fix; printed as `error: ...`, exit code 1."""


class ServerError(Exception):
    """A refused RPC, with what is needed to explain it."""

    def __init__(self, error, method, server):
        super().__init__(str(error.code()))
        self.error, self.method, self.server = error, method, server
        self.code = error.code()
        self.message, self.reason, self.fields = rpc_details(error)

    def lines(self):
        """`error: <STATUS> <REASON>: <message>`, each bad field, and a hint."""
        head = f"{self.code.name} {self.reason}" if self.reason else self.code.name
        message = self.message
        if self.code == grpc.StatusCode.UNIMPLEMENTED and not self.reason:
            message = f"the server does not implement {self.method} (yet)"
        lines = [f"error: {head}: {message}"]
        lines += [f"  {path}: {why}" for path, why in self.fields]
        hint = _hint(self.code, self.reason, self.method, self.server)
        return lines + ([f"  ({hint})"] if hint else [])


# The modules below import the error types from here, so they come after them.
from .client import _hint, rpc_details  # noqa: E402
from .commands import (_add_admin, _add_card, _add_feed, _add_member,  # noqa: E402
                       _add_program, _add_report)
from .demo import _add_demo  # noqa: E402
from .format import mask_card, money  # noqa: E402
from .local import _add_init, _add_serve, _add_token, _size  # noqa: E402
from .options import _client_parent, _data_parent, _write_parent  # noqa: E402

# what `kopilka.servers.cli` offers: the entry point, the errors, and the
# helpers tests/test_cli.py uses
__all__ = ["main", "build_parser", "CliError", "ServerError", "money", "mask_card",
           "_size"]


# --- entry point --------------------------------------------------------------

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "run", None) or getattr(args, "func", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        result = handler(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ServerError as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return 1
    except LedgerError as e:   # the ledger could not be opened (e.g. its format)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kopilka", description="Kopilka, a loyalty-points ledger: run the "
        "server, set it up, and operate it over its gRPC API.")
    sub = parser.add_subparsers(metavar="COMMAND")
    data = _data_parent()
    client = _client_parent()
    write = _write_parent()
    _add_serve(sub, data)
    _add_init(sub, data)
    _add_token(sub, data)
    _add_program(sub, client, write)
    _add_member(sub, client, write)
    _add_card(sub, client, write)
    _add_admin(sub, client, write)
    _add_report(sub, client)
    _add_feed(sub, client)
    _add_demo(sub, client)
    _add_hwd(sub)
    return parser


# --- hwd ----------------------------------------------------------------------

def _add_hwd(sub):
    """`kopilka hwd ...` comes from kopilka.hwd.cli when it exists; a broken
    module must not take the other commands down with it."""
    try:
        from kopilka.hwd import cli as hwd_cli
    except ModuleNotFoundError as e:
        if e.name in ("kopilka.hwd.cli", "kopilka.hwd"):
            return
        hwd_cli, problem = None, e
    except Exception as e:  # noqa: BLE001 - reported when `hwd` is used
        hwd_cli, problem = None, e
    if hwd_cli is not None and hasattr(hwd_cli, "register"):
        hwd_cli.register(sub)
        return
    if hwd_cli is not None:
        return
    p = sub.add_parser("hwd", help="the store hardware daemon (unavailable)")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def broken(args):
        raise CliError(f"the hwd commands failed to load: {problem!r}")
    p.set_defaults(run=broken)
