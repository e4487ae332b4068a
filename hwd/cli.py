"""`kopilka hwd ...`: run the daemon, check its config, simulate readers, print its status.

`register(subparsers)` adds the `hwd` command group to the `kopilka`
console script's argparse parser (kopilka.servers.cli calls it); every
command sets `func`, and `args.func(args)` returns the exit code.
`main(argv)` does the same on its own, so the group also runs as
`python -m kopilka.hwd.cli hwd run --config store.toml` (or
`python -m kopilka.hwd run ...`).

Exit codes: 0 fine; 2 a bad config or command line (every problem printed,
each under its key path); `status`: 0 healthy, 1 degraded, 3 not running.
"""

import argparse
import logging
import os
import signal
import sqlite3
import sys
import threading

from . import config as hwd_config
from . import status as hwd_status
from .config import ConfigError
from .reader import wall_clock_us

BAD_CONFIG = 2


def register(subparsers):
    """Add `hwd run | check | simulate | status` to an argparse subparsers object."""
    hwd = subparsers.add_parser("hwd", help="the store hardware daemon (card readers)",
                                description="The store hardware daemon: streams loyalty "
                                            "card reads from serial readers to the core.")
    commands = hwd.add_subparsers(dest="hwd_command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon (as the systemd unit does)")
    run.add_argument("--config", required=True, metavar="FILE", help="the store's TOML config")
    _log_level(run)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="check a config file and exit")
    check.add_argument("--config", required=True, metavar="FILE")
    check.set_defaults(func=cmd_check)

    sim = commands.add_parser(
        "simulate", help="virtual readers and a swipe generator against a core",
        description="Starts virtual card readers on pseudo-terminals (a stripe reader "
                    "and a barcode scanner per lane), swipes cards into them, and runs the "
                    "daemon against the core given, printing every acknowledgement.")
    sim.add_argument("--core", default="127.0.0.1:50051", metavar="HOST:PORT",
                     help="the core's address (default: %(default)s)")
    token = sim.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (default: $KOPILKA_HWD_TOKEN)")
    token.add_argument("--token-file", metavar="FILE", help="file holding the token")
    sim.add_argument("--ca", metavar="FILE", help="CA certificate for the core's TLS")
    sim.add_argument("--cert", metavar="FILE", help="client certificate (mutual TLS)")
    sim.add_argument("--key", metavar="FILE", help="client private key (mutual TLS)")
    sim.add_argument("--insecure", action="store_true",
                     help="plaintext channel, for a local core started insecure")
    sim.add_argument("--store", type=int, default=1, help="store id (default: 1)")
    sim.add_argument("--lanes", type=int, default=2, help="lanes (default: 2)")
    sim.add_argument("--rate", type=float, default=2.0,
                     help="swipes per second, all lanes together (default: 2)")
    sim.add_argument("--count", type=int, help="stop after this many swipes")
    sim.add_argument("--noise", type=float, default=0.1,
                     help="share of bad swipes: bank cards, half swipes, noise, double "
                          "swipes (default: 0.1)")
    sim.add_argument("--seed", type=int, help="seed for repeatable swipes")
    sim.add_argument("--spool-dir", metavar="DIR", help="where to keep the spool "
                                                        "(default: a new temporary dir)")
    sim.add_argument("--metrics", default="", metavar="HOST:PORT",
                     help="serve Prometheus metrics here (default: off)")
    _log_level(sim, "warning")
    sim.set_defaults(func=cmd_simulate)

    st = commands.add_parser("status", help="print a running daemon's health")
    st.add_argument("--config", default=hwd_config.DEFAULT_PATH, metavar="FILE",
                    help="the daemon's config, to find its status file "
                         "(default: %(default)s)")
    st.add_argument("--status-file", metavar="FILE", help="read this status file instead")
    st.add_argument("--json", action="store_true", help="print the raw status document")
    st.set_defaults(func=cmd_status)
    return hwd


def _log_level(parser, default="info"):
    parser.add_argument("--log-level", default=default,
                        choices=("debug", "info", "warning", "error"))


def _setup_logging(level):
    # No timestamps: under systemd the journal adds them.
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _load(path):
    """The config, or None after printing every problem."""
    try:
        return hwd_config.load(path)
    except ConfigError as e:
        print(hwd_config.describe(e, path), file=sys.stderr)
        return None


def cmd_check(args):
    config = _load(args.config)
    if config is None:
        return BAD_CONFIG
    print(f"{args.config}: ok: store {config.store}, {len(config.readers)} readers, "
          f"core {config.core.address}")
    return 0


def cmd_run(args):
    from .daemon import run
    _setup_logging(args.log_level)
    config = _load(args.config)
    if config is None:
        return BAD_CONFIG
    try:                        # secrets are read now too, so a typo fails at once
        config.core.token()
        config.core.tls_files()
    except ConfigError as e:
        print(hwd_config.describe(e, args.config), file=sys.stderr)
        return BAD_CONFIG
    if config.core.token_value and os.stat(args.config).st_mode & 0o077:
        logging.getLogger(__name__).warning(
            "%s holds a token and is readable by others: chmod 600 it, or use token_file",
            args.config)
    try:
        return run(config)
    except (OSError, sqlite3.Error) as e:
        # The spool's directory missing or unwritable, the metrics port taken:
        # exit 1, so systemd retries (exit 2 is kept for a bad config).
        print(f"hwd: cannot start: {type(e).__name__}: {e} (spool {config.spool_path}, "
              f"metrics {config.metrics_address})", file=sys.stderr)
        return 1


def cmd_simulate(args):
    from .simulate import simulate
    _setup_logging(args.log_level)
    problems = []
    if args.lanes < 1 or args.lanes > 64:
        problems.append("--lanes: 1 to 64")
    if not args.rate > 0:
        problems.append("--rate: must be positive")
    if not 0 <= args.noise <= 1:
        problems.append("--noise: a share between 0 and 1")
    core_table = {"address": args.core, "insecure": args.insecure,
                  "backoff_base_ms": 200, "backoff_cap_ms": 5000}
    token = args.token or (None if args.token_file else os.environ.get("KOPILKA_HWD_TOKEN"))
    for key, value in (("token", token), ("token_file", args.token_file),
                       ("ca_file", args.ca), ("cert_file", args.cert),
                       ("key_file", args.key)):
        if value:
            core_table[key] = value
    if not {"token", "token_file", "cert_file", "key_file"} & set(core_table):
        core_table["token"] = "simulator"    # a core without auth ignores it
    try:
        metrics = hwd_config.listen_address(args.metrics)
    except ValueError as e:
        problems.append(f"--metrics: {e}")
    try:
        core = hwd_config.core_from_mapping(core_table)
        core.token()
        core.tls_files()
    except ConfigError as e:
        problems += [f"{k}: {m}" for k, m in e.problems]
    if problems:
        print("hwd simulate: " + "; ".join(problems), file=sys.stderr)
        return BAD_CONFIG
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    snapshot = simulate(core, lanes=args.lanes, rate=args.rate, count=args.count,
                        noise=args.noise, seed=args.seed, store=args.store,
                        spool_dir=args.spool_dir, metrics_address=metrics, stop=stop,
                        out=lambda line: print(line, flush=True))
    text, _ = hwd_status.render(snapshot, snapshot["written_us"])
    print(text)
    return 0


def cmd_status(args):
    path = args.status_file
    if path is None:
        config = _load(args.config)
        if config is None:
            return BAD_CONFIG
        path = config.status_path
    snapshot = hwd_status.read(path)
    if args.json:
        import json
        print(json.dumps(snapshot, indent=1, sort_keys=True))
    text, code = hwd_status.render(snapshot, wall_clock_us(), path)
    if not args.json:
        print(text)
    return code


def main(argv=None):
    """`kopilka` with only the hwd group: `main(["hwd", "run", "--config", "f.toml"])`."""
    parser = argparse.ArgumentParser(prog="kopilka")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
