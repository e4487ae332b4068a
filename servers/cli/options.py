"""The argparse pieces the commands share: parent parsers for the data
directory, the connection to the server and writes, command groups, and
`--program`."""

import argparse
import os

from .client import DEFAULT_SERVER


def _group(sub, name, help_text):
    """A command with subcommands (`program apply`, `card block`, ...)."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    return actions


def _data_parent():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", default="./data",
                   help="the data directory (default ./data)")
    return p


def _client_parent():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--server", default=os.environ.get("KOPILKA_SERVER", DEFAULT_SERVER),
                   help=f"host:port (default $KOPILKA_SERVER or {DEFAULT_SERVER})")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext, loopback only (the default for a loopback "
                        "server when no --ca-cert is given)")
    g.add_argument("--ca-cert", help="TLS: the CA that signed the server's certificate")
    g.add_argument("--tls", action="store_true",
                   help="TLS with the system's CAs (also for a loopback server)")
    g.add_argument("--client-cert", help="mutual TLS: this client's certificate")
    g.add_argument("--client-key", help="mutual TLS: its key")
    g.add_argument("--token", help="bearer token (default $KOPILKA_TOKEN, then "
                                   "<data>/admin.token)")
    g.add_argument("--data", default="./data",
                   help="where to find admin.token (default ./data)")
    g.add_argument("--timeout", type=float, default=None,
                   help="seconds per call (default 10; 600 for audit and backup)")
    g.add_argument("--json", action="store_true",
                   help="print the server's response as JSON")
    return p


def _write_parent():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--operation-id",
                   help="idempotency key; reuse it to retry safely (default: a "
                        "fresh one)")
    return p


def _program_option(p):
    p.add_argument("--program", default="1", help="program id (default 1)")
