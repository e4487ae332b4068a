#!/usr/bin/env python3
"""hwd end to end: pty write -> hwd -> the real Kopilka server -> a POS's WatchLane.

    .venv/bin/python benchmarks/hwd_latency.py                 # the issue's figures
    .venv/bin/python benchmarks/hwd_latency.py --swipes 200 --duration 5   # quicker

What one run does:
  1. seed: a temporary data directory with the example program
     (examples/programs/example.toml), its store 42 given lanes 1 to
     --readers, and --members-per-reader members per reader, each with a
     card (stripe cards `7789...` for the stripe readers, EAN-13 cards
     `2...` for the scanners) and points; a pos and an hwd token of store 42.
  2. the server: `kopilka.servers.app.serve` in its own process (--insecure
     on loopback, durable commits, Prometheus metrics on).
  3. hwd: `python -m kopilka.hwd run` in its own process, its config
     written here: --readers readers on pseudo-terminals, one per lane,
     alternately a magnetic stripe reader (tracks 1 and 2, LRC required,
     as `kopilka hwd simulate` sends) and a barcode scanner (EAN-13 with an
     AIM identifier); its durable spool (fsync per read) in the temporary
     directory; Prometheus metrics on.
  4. the POSes: this process opens one WatchLane stream per lane (a channel
     each, as separate tills would) with the pos token, and writes the
     swipes into the pty masters.

Phases:
  single     --swipes swipes one at a time, round robin over the readers,
             --gap-ms apart (after --warmup-swipes unmeasured ones): the
             latency from the `os.write` of the frame to the pty master to
             the WatchLane event for that card arriving here (both read on
             this process's perf_counter). The read goes through the pty, the
             hwd's reader thread and parser, its spool (an fsync), its uplink
             stream, the server's Store (dedup, a ledger lookup of the card and
             balance), and the lane's WatchLane stream.
  sustained  every reader swiped flat out for --sustain-warmup + --duration
             seconds: each lane keeps --window frames written and not yet
             seen at its POS (topped up as each event arrives), so the hwd
             always has work on every port while a lane's events never exceed
             the server's per-watcher queue (32; a POS further behind loses
             its oldest events, by design). Measured over the --duration
             window: reads acknowledged to the hwd per second (its
             `kopilka_hwd_core_acks_total`), reads the server accepted per
             second (`kopilka_card_reads_total`), and events delivered to the
             watchers here per second; then the run drains and counts reads
             lost (swiped, never shown) and double swipes.

Percentiles are nearest-rank (p99.9 of 1,000 samples is the largest but
one). Everything shares the machine: the figures carry the load average
and `uptime` at start and end, and the CPU seconds of each process.
Writes the figures to benchmarks/results/hwd-<date>-<host>.json (or --out).
"""

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque

from benchlib import percentile
from procs import Process, commit_of, free_port, kopilka_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
EXAMPLE = os.path.join(ROOT, "examples", "programs", "example.toml")
PYTHON = sys.executable
STORE = 42
SEED_POINTS = 1_000
WATCH_QUEUE = 32      # servers/lanes.py: events a watcher may have waiting



# --- seeding -----------------------------------------------------------------

def stripe_card(reader, k):
    from kopilka.hwd.simulate import luhn_complete
    return luhn_complete(f"7789{reader:03d}{k:08d}")


def barcode_card(reader, k):
    from kopilka.hwd.barcode import with_check_digit
    return with_check_digit(f"2{reader:03d}{k:08d}")


def program_text(lanes):
    """example.toml with store 42 given lanes 1..`lanes`."""
    with open(EXAMPLE) as f:
        text = f.read()
    pattern = re.compile(r"(\[\[store\]\]\s*\nid = 42\n(?:[^\[\n][^\n]*\n)*?lanes = )\[[^\]]*\]")
    text, n = pattern.subn(lambda m: m.group(1) + str(list(range(1, lanes + 1))), text)
    if n != 1:
        raise SystemExit(f"{EXAMPLE}: cannot find store 42's lanes")
    return text


def seed(data, cards):
    """The program, a member per card in `cards`, and tokens; returns the tokens."""
    from kopilka.core.batch import Batch
    from kopilka.core.records import NEVER, Code
    from kopilka.kernel import Ledger
    from kopilka.servers import registry
    from kopilka.servers.auth import TokenFile

    text = program_text(max(1, len(cards)))
    program = registry.parse("toml", text)
    os.makedirs(data, exist_ok=True)
    now = time.time_ns() // 1000
    ledger = Ledger(os.path.join(data, "ledger"), map_size=1 << 30, sync=False)
    try:
        put = Batch().put_program(f"bench/program/{program.id}", program.id,
                                  flags=program.kernel_flags,
                                  utc_offset_minutes=program.utc_offset_minutes,
                                  data=registry.encode("toml", text))
        assert ledger.apply(put, now)[0].code == Code.OK
        numbers = [card for pool in cards for card in pool]
        opens = Batch()
        for i in range(len(numbers)):
            opens.open_account(f"bench/open/{i}", program.id, f"hwd-{i}".encode())
        accounts = []
        for r in ledger.apply(opens, now):
            if r.code != Code.OK:
                raise SystemExit(f"seeding: open_account refused: {r.code.name}")
            accounts.append(r.a)
        rest = Batch()
        for i, (account, number) in enumerate(zip(accounts, numbers)):
            rest.link_card(f"bench/card/{i}", account, number.encode())
            rest.earn(f"bench/earn/{i}", account, SEED_POINTS, activates_at=0,
                      expires_at=NEVER)
        bad = [r.code.name for r in ledger.apply(rest, now) if r.code != Code.OK]
        if bad:
            raise SystemExit(f"seeding: cards or points refused: {bad[:5]}")
    finally:
        ledger.close()
    os.sync()
    tokens = TokenFile(os.path.join(data, "tokens.json"))
    return {"pos": tokens.add("pos", [STORE], note="hwd_latency.py"),
            "hwd": tokens.add("hwd", [STORE], note="hwd_latency.py")}


# --- processes ---------------------------------------------------------------

def scrape(port):
    """{(name, frozenset(labels)): value} of a Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(name, pairs)] = float(value)
    return out


def total(sample, name, **labels):
    """The sum of `name`'s series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in sample.items() if n == name and want <= ls)


def hwd_config(path, core, token, ptys, spool_dir, metrics_port):
    lines = [f"store = {STORE}", "[core]", f'address = "{core}"', f'token = "{token}"',
             "insecure = true", "backoff_base_ms = 50", "backoff_cap_ms = 1000",
             "[policy]", "ranges = [",
             '  { prefix = "7789", length = 16, luhn = true, sources = ["track1", "track2"] },',
             '  { prefix = "2", length = 13, sources = ["barcode"] },', "]",
             "[dedup]", "window_ms = 1500",
             "[spool]", f'path = "{os.path.join(spool_dir, "spool.db")}"',
             "max_reads = 100000", "stale_after_s = 900",
             "[metrics]", f'address = "127.0.0.1:{metrics_port}"']
    for i, (_, slave) in enumerate(ptys):
        scanner = i % 2 == 1
        framing = ('{ kind = "barcode", suffix = "CR", aim = "required", '
                   'check_digit = "auto" }' if scanner else
                   '{ kind = "magstripe", tracks = [1, 2], lrc = "required" }')
        lines += ["[[readers]]", f'id = "lane{i + 1}-{"scanner" if scanner else "msr"}"',
                  f'port = "{slave}"', f"lane = {i + 1}", "read_timeout_ms = 50",
                  f"framing = {framing}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


# --- the tills ---------------------------------------------------------------

def frame(scanner, card):
    from kopilka.hwd.simulate import Swipes
    return Swipes._frame(scanner, card)


class Lane:
    """One reader's pty master, its cards, and its POS's view of the lane."""

    def __init__(self, index, master, cards):
        self.index, self.master = index, master
        self.name = f"stores/{STORE}/lanes/{index + 1}"
        self.scanner = index % 2 == 1
        self.cards, self._next = cards, 0
        self.expected = deque()          # (card, write time) not yet seen here
        self.waiter = None               # a future for the single-swipe phase
        self.started = asyncio.Event()
        self.events = self.lost = self.unexpected = 0
        self.sink = None                 # (latencies list, arrival times list)
        self.on_event = None             # sustained: top up after each event

    def card(self):
        card = self.cards[self._next % len(self.cards)]
        self._next += 1
        return card

    def swipe(self, count=1):
        now = time.perf_counter()
        data = []
        for _ in range(count):
            card = self.card()
            self.expected.append((card, now))
            data.append(frame(self.scanner, card))
        os.write(self.master, b"".join(data))

    def arrived(self, card, at):
        self.events += 1
        while self.expected:
            want, written = self.expected.popleft()
            if want == card:
                latency = at - written
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(latency)
                if self.sink is not None:
                    self.sink[0].append(latency)
                    self.sink[1].append(at)
                if self.on_event is not None:
                    self.on_event(self)
                return
            self.lost += 1               # swiped, never shown here
        self.unexpected += 1


async def watch(lane, address, token):
    import grpc
    from kopilka.v1 import store_pb2, store_pb2_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        call = store_pb2_grpc.StoreStub(channel).WatchLane(
            store_pb2.WatchLaneRequest(lane=lane.name),
            metadata=(("authorization", f"Bearer {token}"),))
        try:
            async for event in call:
                at = time.perf_counter()
                kind = event.WhichOneof("event")
                if kind == "started":
                    lane.started.set()
                    continue
                read = getattr(event, kind).read
                if kind != "card_presented":
                    print(f"warning: {lane.name}: {kind} for a seeded card", flush=True)
                lane.arrived(read.card_number, at)
        except asyncio.CancelledError:
            call.cancel()
            raise


# --- measurement -------------------------------------------------------------




def latency_figures(seconds):
    ordered = sorted(seconds)

    def ms(value):
        return round(value * 1e3, 3)

    return {"count": len(ordered), "min_ms": ms(ordered[0]) if ordered else None,
            "mean_ms": ms(sum(ordered) / len(ordered)) if ordered else None,
            "p50_ms": ms(percentile(ordered, 50)), "p90_ms": ms(percentile(ordered, 90)),
            "p99_ms": ms(percentile(ordered, 99)), "p99_9_ms": ms(percentile(ordered, 99.9)),
            "max_ms": ms(ordered[-1]) if ordered else None}


class Cpu:
    """CPU seconds of the server, the hwd and this process over a phase."""

    def __init__(self, server, hwd):
        self.procs = {"server": server, "hwd": hwd}
        self.start = self._now()

    def _now(self):
        out = {name: p.cpu_seconds() for name, p in self.procs.items()}
        out["driver"] = time.process_time()
        out["wall"] = time.perf_counter()
        return out

    def done(self):
        end = self._now()
        wall = end["wall"] - self.start["wall"]
        return {f"{name}_cpu_percent": round(100 * (end[name] - self.start[name]) / wall, 1)
                for name in ("server", "hwd", "driver")}


async def phase_single(args, lanes, server, hwd):
    latencies = []
    cpu = None
    total_swipes = args.warmup_swipes + args.swipes
    for i in range(total_swipes):
        if i == args.warmup_swipes:
            cpu = Cpu(server, hwd)
        lane = lanes[i % len(lanes)]
        lane.waiter = asyncio.get_running_loop().create_future()
        lane.swipe()
        try:
            latency = await asyncio.wait_for(lane.waiter, args.timeout)
        except TimeoutError:
            raise SystemExit(f"swipe {i} on {lane.name}: no WatchLane event within "
                             f"{args.timeout} s") from None
        lane.waiter = None
        if i >= args.warmup_swipes:
            latencies.append(latency)
        if (i + 1) % 250 == 0:
            print(f"  {i + 1} of {total_swipes} swipes", flush=True)
        await asyncio.sleep(args.gap_ms / 1000)
    return {"swipes": len(latencies), "gap_ms": args.gap_ms,
            "latency": latency_figures(latencies), **cpu.done()}


async def phase_sustained(args, lanes, server, hwd):
    loop = asyncio.get_running_loop()
    latencies, arrivals = [], []
    running = True

    def top_up(lane):
        if running:
            lane.swipe()

    before = {lane.index: (lane.events, lane.lost) for lane in lanes}
    for lane in lanes:
        lane.sink = (latencies, arrivals)
        lane.on_event = top_up
    for lane in lanes:
        lane.swipe(args.window)
    await asyncio.sleep(args.sustain_warmup)
    start_hwd, start_srv = await loop.run_in_executor(
        None, lambda: (scrape(args.hwd_metrics), scrape(args.server_metrics)))
    start_at, cpu = time.perf_counter(), Cpu(server, hwd)
    mark = len(latencies)
    await asyncio.sleep(args.duration)
    end_hwd, end_srv = await loop.run_in_executor(
        None, lambda: (scrape(args.hwd_metrics), scrape(args.server_metrics)))
    end_at, cpu_figures = time.perf_counter(), cpu.done()
    window_latencies = latencies[mark:]
    running = False
    delivered = sum(1 for t in arrivals if start_at <= t < end_at)
    seconds = end_at - start_at

    # drain: every frame written is shown, or counted lost
    deadline = time.monotonic() + args.timeout
    while any(lane.expected for lane in lanes) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stuck = sum(len(lane.expected) for lane in lanes)
    final = await loop.run_in_executor(None, scrape, args.hwd_metrics)
    for lane in lanes:
        lane.sink = lane.on_event = None

    def acks(sample):
        return total(sample, "kopilka_hwd_core_acks_total")

    def accepted(sample):
        return total(sample, "kopilka_card_reads_total", outcome="accepted")

    return {
        "seconds": round(seconds, 3), "warmup_seconds": args.sustain_warmup,
        "window_per_reader": args.window, "readers": len(lanes),
        "acked_reads_per_s": round((acks(end_hwd) - acks(start_hwd)) / seconds, 1),
        "server_accepted_per_s": round((accepted(end_srv) - accepted(start_srv)) / seconds, 1),
        "delivered_to_watchers_per_s": round(delivered / seconds, 1),
        "loaded_latency": latency_figures(window_latencies),
        "events_total": sum(lane.events - before[lane.index][0] for lane in lanes),
        "lost_at_watchers": sum(lane.lost - before[lane.index][1] for lane in lanes) + stuck,
        "not_shown_after_drain": stuck,
        "hwd_double_swipes": total(final, "kopilka_hwd_reader_double_swipes_total"),
        "hwd_rejects": total(final, "kopilka_hwd_reader_rejects_total"),
        "hwd_acks": {outcome: total(final, "kopilka_hwd_core_acks_total", outcome=outcome)
                     for outcome in ("accepted", "duplicate", "stale", "rejected")},
        "hwd_spool_depth_after": total(final, "kopilka_hwd_spool_depth"),
        **cpu_figures,
    }


async def wait_hwd_ready(args, readers, hwd):
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if hwd.proc.poll() is not None:
            hwd.fail("exited")
        try:
            sample = await loop.run_in_executor(None, scrape, args.hwd_metrics)
        except OSError:
            sample = {}
        if total(sample, "kopilka_hwd_reader_up") == readers and \
                total(sample, "kopilka_hwd_core_up") == 1:
            return
        await asyncio.sleep(0.05)
    hwd.fail("did not connect its readers and the core within 30 s")


async def run(args, server, hwd, masters, cards, tokens):
    lanes = [Lane(i, master, cards[i]) for i, master in enumerate(masters)]
    watchers = [asyncio.create_task(watch(lane, server.address, tokens["pos"]))
                for lane in lanes]
    try:
        await wait_hwd_ready(args, len(lanes), hwd)
        await asyncio.wait_for(asyncio.gather(*(lane.started.wait() for lane in lanes)),
                               args.timeout)
        phases = {}
        if args.swipes:
            print(f"single: {args.swipes:,} swipes, {args.gap_ms} ms apart ...", flush=True)
            phases["single"] = await phase_single(args, lanes, server, hwd)
        if args.duration > 0:
            print(f"sustained: {len(lanes)} readers flat out for {args.duration} s ...",
                  flush=True)
            phases["sustained"] = await phase_sustained(args, lanes, server, hwd)
        return phases
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


# --- main --------------------------------------------------------------------

def fsync_probe(directory, count=200):
    """What one durable spool put costs in `directory` now: SQLite in WAL mode,
    synchronous = FULL, one insert per transaction (as hwd/spool.py)."""
    import sqlite3
    path = os.path.join(directory, "fsync-probe.db")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
        took = []
        for i in range(count):
            began = time.perf_counter()
            db.execute("INSERT INTO t (v) VALUES (?)", (f"{i:016d}",))
            took.append(time.perf_counter() - began)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass
    return latency_figures(took)


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="hwd end to end: pty write -> hwd -> real Kopilka server -> WatchLane. "
                    "Latency of single swipes, then reads/s with every reader flat out.",
        epilog="Example: hwd_latency.py --readers 16 --swipes 1000 --duration 10")
    p.add_argument("--readers", type=int, default=16,
                   help="pty readers, one per lane, alternately stripe and scanner "
                        "(default %(default)s)")
    p.add_argument("--swipes", type=int, default=1000,
                   help="measured single swipes (0: skip the phase) (default %(default)s)")
    p.add_argument("--warmup-swipes", type=int, default=32,
                   help="unmeasured swipes first (default %(default)s)")
    p.add_argument("--gap-ms", type=float, default=10.0,
                   help="pause after each single swipe's event (default %(default)s)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds flat out (0: skip the phase) (default %(default)s)")
    p.add_argument("--sustain-warmup", type=float, default=2.0,
                   help="unmeasured seconds flat out first (default %(default)s)")
    p.add_argument("--window", type=int, default=24,
                   help="frames per reader written and not yet seen at its POS while "
                        f"flat out, 1 to {WATCH_QUEUE - 1} (default %(default)s)")
    p.add_argument("--members-per-reader", type=int, default=512,
                   help="seeded members (cards) per reader; a lane cycles through its "
                        "own, so no card comes back within the 1.5 s double-swipe "
                        "window (default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for an event or the drain (default %(default)s)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the JSON (default "
                        "benchmarks/results/hwd-<date>-<host>.json)")
    p.add_argument("--spool-dir", metavar="DIR",
                   help="put the hwd's spool in DIR (default: the run's temporary "
                        "directory; /dev/shm shows what the spool's fsyncs cost)")
    p.add_argument("--keep", metavar="DIR",
                   help="keep the data, spool, configs and logs in DIR")
    args = p.parse_args(argv)
    if args.readers < 1 or args.swipes < 0 or args.members_per_reader < 2:
        p.error("--readers must be at least 1, --members-per-reader 2, --swipes 0")
    if not 1 <= args.window < WATCH_QUEUE:
        p.error(f"--window must be 1 to {WATCH_QUEUE - 1}")
    return args


def render(result):
    m, phases = result["meta"], result["phases"]
    lines = [f"hwd end to end on {m['host']} ({m['cpus']} CPUs), {m['readers']} readers",
             f"  uptime at start: {m['uptime_start']}",
             f"  uptime at end:   {m['uptime_end']}"]
    probe = m.get("spool_put_probe")
    if probe:
        lines.append(f"  a durable spool put here (SQLite WAL + fsync) before the run: p50 "
                     f"{probe['p50_ms']:.2f} ms  p99 {probe['p99_ms']:.2f} ms")
    single = phases.get("single")
    if single:
        lat = single["latency"]
        lines.append(f"single swipes ({single['swipes']:,}, {single['gap_ms']} ms apart), "
                     "pty write -> WatchLane event:")
        lines.append(f"  p50 {lat['p50_ms']:.2f} ms  p90 {lat['p90_ms']:.2f} ms  "
                     f"p99 {lat['p99_ms']:.2f} ms  p99.9 {lat['p99_9_ms']:.2f} ms  "
                     f"max {lat['max_ms']:.2f} ms")
        lines.append(f"  cpu: server {single['server_cpu_percent']}%  hwd "
                     f"{single['hwd_cpu_percent']}%  driver {single['driver_cpu_percent']}%")
    sus = phases.get("sustained")
    if sus:
        lat = sus["loaded_latency"]
        lines.append(f"sustained ({sus['readers']} readers flat out, {sus['seconds']:.1f} s):")
        lines.append(f"  acked {sus['acked_reads_per_s']:,.0f} reads/s  server accepted "
                     f"{sus['server_accepted_per_s']:,.0f}/s  delivered to watchers "
                     f"{sus['delivered_to_watchers_per_s']:,.0f}/s")
        lines.append(f"  lost at watchers {sus['lost_at_watchers']}, double swipes "
                     f"{sus['hwd_double_swipes']:.0f}, rejects {sus['hwd_rejects']:.0f}, "
                     f"acks {sus['hwd_acks']}")
        lines.append(f"  latency under load (queued in pty and spool): p50 "
                     f"{lat['p50_ms']:.0f} ms  p99 {lat['p99_ms']:.0f} ms")
        lines.append(f"  cpu: server {sus['server_cpu_percent']}%  hwd "
                     f"{sus['hwd_cpu_percent']}%  driver {sus['driver_cpu_percent']}%")
    return lines


def main(argv=None):
    args = parse_args(argv)
    now = datetime.datetime.now()
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpus": os.cpu_count(), "commit": commit_of(),
            "readers": args.readers, "load_average_start": os.getloadavg(),
            "uptime_start": uptime(), "args": vars(args)}
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="kopilka-hwd-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    ptys, server, hwd, cleanup = [], None, None, []
    try:
        cards = [[(barcode_card if i % 2 else stripe_card)(i, k)
                  for k in range(args.members_per_reader)] for i in range(args.readers)]
        print(f"seeding {args.readers * args.members_per_reader:,} members in {data} ...",
              flush=True)
        tokens = seed(data, cards)
        args.server_metrics, args.hwd_metrics = free_port(), free_port()
        server = kopilka_server("the server", os.path.join(work, "server.log"),
                                log_level="WARNING", data=data, listen="127.0.0.1:0",
                                metrics_port=args.server_metrics)
        for _ in range(args.readers):
            master, slave = os.openpty()
            ptys.append((master, os.ttyname(slave)))
            os.close(slave)
        config = os.path.join(work, "hwd.toml")
        spool_dir = work
        if args.spool_dir:
            spool_dir = tempfile.mkdtemp(prefix="kopilka-hwd-spool-", dir=args.spool_dir)
            cleanup.append(spool_dir)
        hwd_config(config, server.address, tokens["hwd"], ptys, spool_dir, args.hwd_metrics)
        meta["spool_put_probe"] = fsync_probe(spool_dir)
        hwd = Process("hwd", [PYTHON, "-m", "kopilka.hwd", "run", "--config", config,
                              "--log-level", "warning"], os.path.join(work, "hwd.log"))
        print(f"  server pid {server.pid} on {server.address}, hwd pid {hwd.pid}, "
              f"{args.readers} ptys", flush=True)
        phases = asyncio.run(run(args, server, hwd, [m for m, _ in ptys], cards, tokens))
    finally:
        for proc in (hwd, server):
            if proc is not None:
                code = proc.stop()
                if code not in (0, None):
                    print(f"warning: {proc.name} exited with {code}; see {proc.log_path}",
                          flush=True)
        for master, _ in ptys:
            os.close(master)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["load_average_end"] = os.getloadavg()
    meta["uptime_end"] = uptime()
    result = {"meta": meta, "phases": phases}
    print("\n".join(render(result)))
    out = args.out or os.path.join(RESULTS_DIR, f"hwd-{meta['date']}-{meta['host']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(out, ROOT) if out.startswith(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
