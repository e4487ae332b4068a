#!/usr/bin/env python3
"""Kopilka load generator: POS checkouts and Post batches against the real
server, beside a bare gRPC echo on the same transport.

    .venv/bin/python benchmarks/load.py --mode all --duration 20 --clients 64 \\
        --members 100000 --batch 1000 --json

What one run does:
  1. seed: a temporary data directory with the example program
     (examples/programs/example.toml) and N members, each with a card
     (`7700000000000001`, ...) and 100,000 points spendable now, written
     straight through the kernel in large batches (sync off, then one
     sync); a pos token of store 42 and an admin token in tokens.json.
  2. echo: benchmarks/echo.py in its own process (a generic handler with
     bytes in and out: no auth, no work), driven by the same client
     machinery and concurrency as the checkouts, with a payload the size of
     a Quote request. Its RPCs/s are the ceiling of Python gRPC here.
  3. unary: the real server (kopilka.servers.app.serve, in its own process,
     --insecure on loopback, durable commits) and C concurrent POS clients
     (asyncio, grpc.aio, sharing a few channels), each replaying checkouts
     at store 42, lanes 1 to 3, 5-line receipts of the program's
     categories: Quote by card number (resolves the card and prices), Hold
     some points half the time, Capture with earn (spending the held points
     when there is a hold), and a one-line Refund of 5% of the receipts one
     checkout later. Members are split between clients (a card is at one
     till at a time), so no refusal is expected: every error is reported by
     RPC, status and reason, and fails the run.
     With `--rate R` the checkouts are paced instead of back to back: they
     arrive at R a second (Poisson, spread over the tills), and each
     checkout's latency is also counted from its arrival. Back to back, C
     tills keep C requests in flight, so latency at saturation is mostly
     queueing (C / throughput); paced, it is the latency of that load.
  4. batch: `Post` requests of B operations (holds and captures of many
     members, or captures only) from a few concurrent clients: durable
     operations per second and request latency.

Latency is per RPC, measured by the client (so it includes the client's own
time on this machine, which it shares with the server); percentiles are
nearest-rank. The figures of a unary or echo phase are those of the RPCs
that completed in the measured window (after a warm-up); a batch phase
starts its window when every client has finished one warm-up request and
counts every request started in the window to its end.

`--server HOST:PORT` loads a server that is already running instead of
starting one: its data directory must have been seeded by `load.py --data
DIR --seed-only` (the tokens are read from DIR/load-tokens.json, or given
with --token). The goals the summary checks are issue 4's: unary checkout
at least 80% of the echo rate with p99 under 10 ms, and at least 150,000
durable operations per second through Post.
"""

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

from benchlib import percentile
from procs import Server, commit_of, kopilka_server

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
EXAMPLE = os.path.join(ROOT, "examples", "programs", "example.toml")
PYTHON = sys.executable

STORE, LANES = 42, (1, 2, 3)
# (category, weight): the example program's categories; tobacco and gift
# cards cannot be paid with points, books earn at their own rate in v1/v2.
CATEGORIES = (("groceries", 50), ("books", 20), ("courses", 10), ("tobacco", 12),
              ("gift_cards", 8))
SEED_POINTS = 100_000          # every member's points, spendable at once
MAX_SPEND = 500                # the most points a checkout spends
REFUND_SHARE = 0.05
HOLD_SHARE = 0.5
MAP_SIZE = 8 << 30             # the server's default (sparse)
MAX_MESSAGE = 64 << 20
GOAL_SHARE_OF_ECHO = 0.80
GOAL_P99_MS = 10.0
GOAL_BATCH_OPS = 150_000


def card_number(i):
    """Member i's card (0-based): 16 digits, like a real loyalty card."""
    return f"77{i + 1:014d}"


# --- seeding -----------------------------------------------------------------

def seed(data, members, chunk=50_000, *, points=SEED_POINTS, map_size=MAP_SIZE):
    """The example program, `members` members with a card and `points`
    points, and tokens, written straight through the kernel. Member i is
    account i + 1. Returns the tokens."""
    from kopilka.core.batch import Batch
    from kopilka.core.records import NEVER, Code
    from kopilka.kernel import Ledger
    from kopilka.servers import registry
    from kopilka.servers.auth import TokenFile

    with open(EXAMPLE) as f:
        text = f.read()
    program = registry.parse("toml", text)
    os.makedirs(data, exist_ok=True)
    now = time.time_ns() // 1000
    ledger = Ledger(os.path.join(data, "ledger"), map_size=map_size, sync=False)
    try:
        put = Batch().put_program(f"load/program/{program.id}", program.id,
                                  flags=program.kernel_flags,
                                  utc_offset_minutes=program.utc_offset_minutes,
                                  data=registry.encode("toml", text))
        result = ledger.apply(put, now)[0]
        if result.code != Code.OK:
            raise SystemExit(f"seeding: put_program refused: {result.code.name} "
                             "(use an empty --data directory)")
        for start in range(0, members, chunk):
            stop = min(members, start + chunk)
            opens = Batch()
            for i in range(start, stop):
                opens.open_account(f"load/open/{i}", program.id, f"load-{i}".encode())
            accounts = []
            for r in ledger.apply(opens, now):
                if r.code != Code.OK:
                    raise SystemExit(f"seeding: open_account refused: {r.code.name}")
                accounts.append(r.a)
            rest = Batch()
            for i, account in zip(range(start, stop), accounts):
                rest.link_card(f"load/card/{i}", account, card_number(i).encode())
                rest.earn(f"load/earn/{i}", account, points, activates_at=0,
                          expires_at=NEVER)
            bad = Counter(r.code.name for r in ledger.apply(rest, now)
                          if r.code != Code.OK)
            if bad:
                raise SystemExit(f"seeding: cards or points refused: {dict(bad)}")
    finally:
        ledger.close()
    os.sync()
    tokens = TokenFile(os.path.join(data, "tokens.json"))
    out = {"pos": tokens.add("pos", [STORE], note="load.py"),
           "admin": tokens.add("admin", note="load.py"), "members": members}
    path = os.path.join(data, "load-tokens.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(out, f)
    return out


# --- server processes --------------------------------------------------------

class External:
    """A server started elsewhere (`--server`)."""

    name, pid = "server", None

    def __init__(self, address):
        self.address = address

    def cpu_seconds(self):
        return float("nan")

    def main_thread_cpu_seconds(self):
        return float("nan")

    def stop(self):
        return 0


# --- measurement -------------------------------------------------------------

def latency_figures(latencies):
    ordered = sorted(latencies)

    def ms(seconds):
        return round(seconds * 1e3, 3)
    return {"count": len(ordered),
            "p50_ms": ms(percentile(ordered, 50)), "p99_ms": ms(percentile(ordered, 99)),
            "p999_ms": ms(percentile(ordered, 99.9)),
            "max_ms": ms(ordered[-1]) if ordered else float("nan"),
            "mean_ms": ms(sum(ordered) / len(ordered)) if ordered else float("nan")}


class Recorder:
    """Every RPC's (end time, latency) by kind, and every error."""

    def __init__(self):
        self.samples = defaultdict(list)
        self.errors = []       # (end, kind, code, reason)
        self.checkouts = []    # paced: (end, seconds from the checkout's arrival)

    def ok(self, kind, started, ended):
        self.samples[kind].append((ended, ended - started))

    def error(self, kind, started, ended, err):
        self.errors.append((ended, kind, err.code().name, error_reason(err)))

    def count(self, start, stop):
        """RPCs (any kind, errors too) that ended in [start, stop]."""
        return (sum(1 for v in self.samples.values() for end, _ in v
                    if start <= end <= stop)
                + sum(1 for e in self.errors if start <= e[0] <= stop))

    def window(self, start, stop):
        """Latencies by kind and errors of the RPCs that ended in [start, stop]."""
        kinds = {k: [lat for end, lat in v if start <= end <= stop]
                 for k, v in self.samples.items()}
        errors = Counter((kind, code, reason) for end, kind, code, reason in self.errors
                         if start <= end <= stop)
        return kinds, errors

    def checkout_window(self, start, stop):
        return [lat for end, lat in self.checkouts if start <= end <= stop]


def error_reason(err):
    """The ErrorInfo reason of a Kopilka status, or the status details."""
    from google.rpc import error_details_pb2, status_pb2
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return (err.details() or "")[:80]


def status_reason(status):
    """The ErrorInfo reason of a google.rpc.Status (a PostResult's)."""
    from google.rpc import error_details_pb2
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return status.message[:80]


class Usage:
    """CPU used by the client (this process) and the server over a phase:
    the whole server, and its main thread alone (the event loop, where the
    RPCs' Python work runs: the figure `*_main_us_per_*` divides)."""

    def __init__(self, server):
        self.server = server
        self.wall = time.perf_counter()
        self.client = time.process_time()
        self.server_cpu = server.cpu_seconds()
        self.server_main = server.main_thread_cpu_seconds()

    def done(self):
        self.end = time.perf_counter()
        wall = self.end - self.wall
        server = self.server.cpu_seconds() - self.server_cpu
        main = self.server.main_thread_cpu_seconds() - self.server_main
        return {"client_cpu_share": round((time.process_time() - self.client) / wall, 3),
                "server_cpu_share": None if math.isnan(server) else round(server / wall, 3),
                "server_main_cpu_share": None if math.isnan(main) else round(main / wall, 3),
                "server_main_cpu_seconds": None if math.isnan(main) else main,
                "usage_start": self.wall, "usage_end": self.end}


def per_unit_us(usage, count):
    """Server main-thread CPU microseconds per RPC (or operation), or None."""
    main = usage.get("server_main_cpu_seconds")
    if main is None or not count:
        return None
    return round(main * 1e6 / count, 1)


# --- clients -----------------------------------------------------------------

def channels(address, count):
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE),
               ("grpc.use_local_subchannel_pool", 1)]  # one connection each
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]


async def timed(recorder, kind, call, request, metadata, timeout):
    started = time.perf_counter()
    try:
        response = await call(request, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as err:
        recorder.error(kind, started, time.perf_counter(), err)
        return None
    recorder.ok(kind, started, time.perf_counter())
    return response


class Receipts:
    """5-line receipts of store 42, from a client's own random stream."""

    def __init__(self, rng):
        from kopilka.v1 import checkout_pb2, common_pb2
        self.pb, self.money = checkout_pb2, common_pb2.Money
        self.rng = rng
        self.names = [c for c, _ in CATEGORIES]
        self.weights = [w for _, w in CATEGORIES]

    def make(self, receipt_id, lines=5):
        rng, pb, money = self.rng, self.pb, self.money
        out = pb.Receipt(receipt_id=receipt_id)
        out.business_time.FromMicroseconds(time.time_ns() // 1000)
        categories = rng.choices(self.names, self.weights, k=lines)
        categories[0] = "groceries"  # points may always pay for something
        for n, category in enumerate(categories, 1):
            quantity = rng.randint(1, 3)
            price = rng.randrange(5_000, 300_000, 100)   # 50 to 3,000 rubles
            out.lines.append(pb.ReceiptLine(
                line_number=n, sku=f"{category[:3]}-{rng.randrange(100_000):05d}",
                category=category, quantity=quantity,
                unit_price=money(currency_code="RUB", minor_units=price),
                total=money(currency_code="RUB", minor_units=price * quantity),
                flags=["promo"] if rng.random() < 0.1 else []))
        return out


def lane_name(lane):
    return f"stores/{STORE}/lanes/{lane}"


async def pos_client(n, stub, members, recorder, stop_at, run, metadata, timeout,
                     interval=None):
    """One till: checkouts one after another until `stop_at`; or, paced, a
    checkout at each arrival of a Poisson process of mean `interval`
    seconds, its latency counted from its arrival to its Capture's answer
    (a till still busy makes the next one late, and that wait counts: no
    coordinated omission; the 5% that start with the one-line refund of
    the till's previous receipt count it too)."""
    from kopilka.v1 import checkout_pb2 as pb
    rng = random.Random(f"{run}/{n}")
    receipts = Receipts(rng)
    refund = None
    seq = 0
    arrival = time.perf_counter() + (rng.expovariate(1 / interval) if interval else 0)
    while time.perf_counter() < stop_at:
        if interval:
            if arrival >= stop_at:
                break
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            arrived, arrival = arrival, arrival + rng.expovariate(1 / interval)
        lane = rng.choice(LANES)
        lane_text = lane_name(lane)
        if refund is not None:  # one line of a receipt of the checkout before
            original, line = refund
            refund = None
            await timed(recorder, "refund", stub.Refund, pb.RefundRequest(
                operation_id=f"{original}/return", lane=lane_text,
                original_operation_id=original,
                lines=pb.RefundRequest.Lines(returns=[pb.LineReturn(
                    line_number=line, quantity=1)])), metadata, timeout)
        seq += 1
        op_id = f"s{STORE}/l{lane}/{run}-{n}-{seq}"
        card = card_number(rng.choice(members))
        receipt = receipts.make(op_id)
        quote = await timed(recorder, "quote", stub.Quote, pb.QuoteRequest(
            lane=lane_text, card_number=card, receipt=receipt), metadata, timeout)
        if quote is None:
            continue
        spend, hold_id = 0, ""
        if rng.random() < HOLD_SHARE and quote.max_spend_points > 0:
            points = rng.randint(1, min(MAX_SPEND, quote.max_spend_points))
            held = await timed(recorder, "hold", stub.Hold, pb.HoldRequest(
                operation_id=f"{op_id}/hold", lane=lane_text, card_number=card,
                points=points, receipt_id=op_id), metadata, timeout)
            if held is not None:
                spend, hold_id = points, f"{op_id}/hold"
        captured = await timed(recorder, "capture", stub.Capture, pb.CaptureRequest(
            operation_id=op_id, lane=lane_text, card_number=card, receipt=receipt,
            spend_points=spend, hold_operation_id=hold_id), metadata, timeout)
        if captured is not None and rng.random() < REFUND_SHARE:
            refund = (op_id, rng.randint(1, len(receipt.lines)))
        if interval and captured is not None:
            ended = time.perf_counter()
            recorder.checkouts.append((ended, ended - arrived))


async def echo_client(n, call, payload, recorder, stop_at, metadata, timeout):
    while time.perf_counter() < stop_at:
        await timed(recorder, "echo", call, payload, metadata, timeout)


def echo_payload():
    """A serialized Quote request: what the echo sends and gets back."""
    from kopilka.v1 import checkout_pb2 as pb
    receipts = Receipts(random.Random(0))
    return pb.QuoteRequest(lane=lane_name(1), card_number=card_number(0),
                           receipt=receipts.make("s42/l1/000000-0-1")).SerializeToString()


def split(members, parts):
    """Member indexes (0-based), dealt to `parts` clients in turn."""
    return [range(i, members, parts) for i in range(parts)] if members >= parts \
        else [range(members)] * parts


# --- phases ------------------------------------------------------------------

async def run_timed(args, target, make_clients):
    """Runs clients for warm-up + duration; returns (recorder, window, usage)."""
    recorder = Recorder()
    started = time.perf_counter()
    window = (started + args.warmup, started + args.warmup + args.duration)
    tasks = [asyncio.ensure_future(c) for c in make_clients(recorder, window[1])]
    await asyncio.sleep(args.warmup)
    usage = Usage(target)  # from the window's start
    await asyncio.gather(*tasks)
    return recorder, window, usage.done()


def summarize_timed(recorder, window, usage, duration):
    kinds, errors = recorder.window(*window)
    everything = [lat for v in kinds.values() for lat in v]
    # CPU is read over [window start, every client done]: the RPCs that
    # ended then are what it was spent on
    served = recorder.count(usage.pop("usage_start"), usage.pop("usage_end"))
    usage["server_main_us_per_rpc"] = per_unit_us(usage, served)
    out = {"rpcs": len(everything), "rpcs_per_s": len(everything) / duration,
           "all": latency_figures(everything), "by_rpc": {}, **usage,
           "errors": [{"rpc": k, "code": c, "reason": r, "count": n}
                      for (k, c, r), n in sorted(errors.items())]}
    for kind in ("quote", "hold", "earn", "spend", "capture", "refund", "echo"):
        if kind in kinds:
            out["by_rpc"][kind] = {**latency_figures(kinds[kind]),
                                   "per_s": len(kinds[kind]) / duration}
    return out


async def phase_echo(args, log_dir, metadata):
    server = Server("echo server", [PYTHON, os.path.join(HERE, "echo.py"),
                                     "--listen", "127.0.0.1:0"],
                     os.path.join(log_dir, "echo.log"))
    try:
        from echo import METHOD
        chans = channels(server.address, args.channels)
        calls = [c.unary_unary(METHOD) for c in chans]
        payload = echo_payload()
        await asyncio.gather(*(c.channel_ready() for c in chans))

        def clients(recorder, stop_at):
            return [echo_client(i, calls[i % len(calls)], payload, recorder, stop_at,
                                metadata, args.timeout) for i in range(args.clients)]
        recorder, window, usage = await run_timed(args, server, clients)
        for c in chans:
            await c.close()
    finally:
        server.stop()
    out = summarize_timed(recorder, window, usage, args.duration)
    out["payload_bytes"] = len(payload)
    return out


async def phase_unary(args, server, metadata, run):
    from kopilka.v1 import checkout_pb2_grpc
    chans = channels(server.address, args.channels)
    stubs = [checkout_pb2_grpc.CheckoutStub(c) for c in chans]
    await asyncio.gather(*(c.channel_ready() for c in chans))
    slices = split(args.members, args.clients)

    interval = args.clients / args.rate if args.rate else None

    def clients(recorder, stop_at):
        return [pos_client(i, stubs[i % len(stubs)], slices[i], recorder, stop_at,
                           run, metadata, args.timeout, interval)
                for i in range(args.clients)]
    recorder, window, usage = await run_timed(args, server, clients)
    for c in chans:
        await c.close()
    out = summarize_timed(recorder, window, usage, args.duration)
    out["checkouts_per_s"] = out["by_rpc"].get("capture", {}).get("per_s", 0.0)
    if args.rate:
        out["offered_checkouts_per_s"] = args.rate
        out["checkout"] = latency_figures(recorder.checkout_window(*window))
    return out


def post_request(rng, receipts, members, size, kind, run, n, seq, pending,
                 status_only=False):
    """(PostRequest, kinds of its operations, holds to capture in the next one).

    holds+captures: the captures of the holds the previous request placed
    (a hold committed earlier: the server prepares every operation of a Post
    before applying any), new holds for half the request, and captures
    spending directly to fill it. captures: captures only, half of
    them spending points directly."""
    from kopilka.v1 import checkout_pb2 as pb
    ops, kinds, holds = [], [], []
    # Distinct members in one request where the client has enough of them (a
    # Post applies as if one by one: a member met twice splits the commit).
    busy = {card for _, _, card, _, _ in pending}
    wanted = size - len(pending)
    if len(members) >= 2 * (wanted + len(busy)):
        cards = set()
        while len(cards) < wanted:
            card = card_number(rng.choice(members))
            if card not in busy:
                cards.add(card)
        pick = iter(cards).__next__
    else:
        def pick():
            return card_number(rng.choice(members))
    for op_id, lane_text, card, points, receipt in pending:
        ops.append(pb.PostOperation(capture=pb.CaptureRequest(
            operation_id=op_id, lane=lane_text, card_number=card, receipt=receipt,
            spend_points=points, hold_operation_id=f"{op_id}/hold")))
        kinds.append("capture")
    k = 0
    while len(ops) < size:
        k += 1
        lane = rng.choice(LANES)
        lane_text = lane_name(lane)
        op_id = f"s{STORE}/l{lane}/{run}-b{n}-{seq}-{k}"
        card = pick()
        receipt = receipts.make(op_id)
        if kind == "holds+captures" and len(holds) < size // 2:
            points = rng.randint(1, 50)
            ops.append(pb.PostOperation(hold=pb.HoldRequest(
                operation_id=f"{op_id}/hold", lane=lane_text, card_number=card,
                points=points, receipt_id=op_id)))
            kinds.append("hold")
            holds.append((op_id, lane_text, card, points, receipt))
        else:
            spend = rng.randint(1, 50) if rng.random() < 0.5 else 0
            ops.append(pb.PostOperation(capture=pb.CaptureRequest(
                operation_id=op_id, lane=lane_text, card_number=card, receipt=receipt,
                spend_points=spend)))
            kinds.append("capture")
    view = {"view": pb.POST_RESULT_VIEW_STATUS} if status_only else {}
    return pb.PostRequest(operations=ops, **view), kinds, holds


async def batch_client(n, stub, members, args, run, metadata, state):
    """Post requests: one warm-up, then the window's until it closes."""
    rng = random.Random(f"{run}/batch/{n}")
    receipts = Receipts(rng)
    seq = 0
    build = 0.0
    pending = []
    while True:
        seq += 1
        t = time.perf_counter()
        request, kinds, holds = post_request(rng, receipts, members, args.batch,
                                             args.batch_kind, run, n, seq, pending,
                                             args.post_view == "status")
        build += time.perf_counter() - t
        measured = seq > 1
        if measured:
            await state["open"].wait()
            if time.perf_counter() >= state["stop_at"]:
                break
        started = time.perf_counter()
        try:
            response = await stub.Post(request, timeout=args.post_timeout,
                                       metadata=metadata)
        except grpc.aio.AioRpcError as err:
            state["request_errors"][(err.code().name, error_reason(err))] += 1
            response = None
        ended = time.perf_counter()
        if not measured:
            pending = holds
            state["warm"] += 1
            if state["warm"] == state["clients"]:
                state["stop_at"] = time.perf_counter() + args.duration
                state["start"] = time.perf_counter()
                state["usage"] = Usage(state["server"])
                state["open"].set()
            continue
        pending = holds
        state["latencies"].append(ended - started)
        state["last_end"] = max(state["last_end"], ended)
        if response is None:
            continue
        state["requests"] += 1
        for result, kind in zip(response.results, kinds):
            if result.status.code == 0:
                state["ok"] += 1
            else:
                state["op_errors"][(kind, _CODES.get(result.status.code,
                                                     str(result.status.code)),
                                    status_reason(result.status))] += 1
    state["build_seconds"] += build


_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


async def phase_batch(args, server, metadata, run):
    from kopilka.v1 import checkout_pb2_grpc
    chans = channels(server.address, min(args.channels, args.batch_clients))
    stubs = [checkout_pb2_grpc.CheckoutStub(c) for c in chans]
    await asyncio.gather(*(c.channel_ready() for c in chans))
    slices = split(args.members, args.batch_clients)
    state = {"open": asyncio.Event(), "stop_at": 0.0, "start": 0.0, "last_end": 0.0,
             "warm": 0, "clients": args.batch_clients, "server": server,
             "latencies": [], "requests": 0, "ok": 0, "build_seconds": 0.0,
             "op_errors": Counter(), "request_errors": Counter()}
    await asyncio.gather(*(batch_client(i, stubs[i % len(stubs)], slices[i], args, run,
                                        metadata, state)
                           for i in range(args.batch_clients)))
    usage = state["usage"].done()
    del usage["usage_start"], usage["usage_end"]
    usage["server_main_us_per_op"] = per_unit_us(usage, state["ok"])
    for c in chans:
        await c.close()
    seconds = max(state["last_end"] - state["start"], 1e-9)
    errors = [{"rpc": "Post", "code": c, "reason": r, "count": k}
              for (c, r), k in sorted(state["request_errors"].items())]
    errors += [{"rpc": f"Post.{kind}", "code": c, "reason": r, "count": k}
               for (kind, c, r), k in sorted(state["op_errors"].items())]
    return {"batch": args.batch, "kind": args.batch_kind, "view": args.post_view,
            "clients": args.batch_clients,
            "requests": state["requests"], "seconds": seconds,
            "durable_ops": state["ok"], "durable_ops_per_s": state["ok"] / seconds,
            "requests_per_s": state["requests"] / seconds,
            "request": latency_figures(state["latencies"]),
            "client_build_seconds": round(state["build_seconds"], 3),
            **usage, "errors": errors}


# --- profiling ---------------------------------------------------------------

class Profile:
    """py-spy sampling the server during a phase (--profile): raw collapsed
    stacks by function, without pausing the server (--nonblocking)."""

    def __init__(self, directory, server, phase, seconds):
        self.path = os.path.join(directory, f"server-{phase}.txt")
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(PYTHON), "py-spy")
        self.proc = subprocess.Popen(
            [spy, "record", "--pid", str(server.pid), "--duration", str(math.ceil(seconds)),
             "--rate", "100", "--format", "raw", "--threads", "--function",
             "--nonblocking", "--output", self.path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def report(self):
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0 or not os.path.exists(self.path):
            return [f"py-spy failed: {err.decode(errors='replace')[-300:]}"]
        return profile_summary(self.path)


_PLUMBING = ("asyncio/", "threading.py", "<string>", "contextlib.py")


def profile_summary(path, top=20):
    """Self time by function, and inclusive time of the server's own
    functions (the event loop's frames left out), from py-spy raw output."""
    own, inclusive, threads, total = Counter(), Counter(), Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            count = int(count)
            frames = stack.split(";")
            total += count
            threads[frames[0].split(": ", 1)[-1]] += count
            if len(frames) > 1:
                own[frames[-1]] += count
            for frame in set(frames[1:]):
                if not any(p in frame for p in _PLUMBING):
                    inclusive[frame] += count
    if not total:
        return [f"profile: {path}: no samples"]
    def pct(count):
        return f"{100 * count / total:5.1f}%"
    lines = [f"profile: {path} ({total} samples of busy threads)",
             "  by thread: " + ", ".join(f"{t} {pct(c).strip()}"
                                         for t, c in threads.most_common(6)),
             "  self time:"]
    lines += [f"    {pct(c)}  {frame}" for frame, c in own.most_common(top)]
    lines.append("  inclusive (the server's own functions):")
    lines += [f"    {pct(c)}  {frame}" for frame, c in inclusive.most_common(top)]
    return lines


# --- the report --------------------------------------------------------------

def _rate(x):
    return f"{x:,.0f}"


def _ms(x):
    return f"{x:,.2f}"


def render_timed(title, out, extra=()):
    lines = [title]
    head = f"  {'rpc':<8} {'count':>8} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} " \
           f"{'p99.9 ms':>9} {'max ms':>8}"
    lines.append(head)
    rows = list(out["by_rpc"].items())
    if len(rows) > 1:
        rows.append(("all", {**out["all"], "per_s": out["rpcs_per_s"]}))
    for kind, f in rows:
        lines.append(f"  {kind:<8} {f['count']:>8,} {_rate(f['per_s']):>9} "
                     f"{_ms(f['p50_ms']):>8} {_ms(f['p99_ms']):>8} "
                     f"{_ms(f['p999_ms']):>9} {_ms(f['max_ms']):>8}")
    lines.extend(extra)
    lines.append(_render_usage(out))
    lines.append(_render_errors(out["errors"]))
    return lines


def _render_usage(out):
    server = out.get("server_cpu_share")
    server = f"{server:.0%}" if server is not None else "n/a"
    main = out.get("server_main_cpu_share")
    text = (f"  CPU (share of one core over the window): client {out['client_cpu_share']:.0%}, "
            f"server {server}")
    if main is not None:
        text += f" (its main thread {main:.0%})"
    for key, unit in (("server_main_us_per_rpc", "RPC"), ("server_main_us_per_op", "op")):
        if out.get(key) is not None:
            text += f"\n  server main-thread CPU per {unit}: {out[key]:,.0f} us"
    return text


def _render_errors(errors):
    if not errors:
        return "  errors: none"
    return "  errors: " + "; ".join(f"{e['rpc']} {e['code']} {e['reason']} x{e['count']}"
                                    for e in errors)


def render(result):
    meta, phases = result["meta"], result["phases"]
    a = meta["args"]
    load = " ".join(f"{x:.2f}" for x in meta["load_average_start"])
    lines = ["=" * 78,
             (f"Kopilka load  {meta['time']}  host {meta['host']}, {meta['cpus']} CPUs, "
              f"commit {meta['commit'][:10]}"),
             f"load average at start {load}; client and servers share this machine",
             f"members {a['members']:,}"
             + (f" (seeded in {meta['seed_seconds']:.1f} s)" if "seed_seconds" in meta else "")
             + f"; {a['clients']} clients over {a['channels']} channels; "
             f"{a['duration']:g} s measured after {a['warmup']:g} s warm-up",
             ""]
    if "echo" in phases:
        e = phases["echo"]
        lines += render_timed(f"echo: bare gRPC, bytes in and out ({e['payload_bytes']} "
                              "bytes), no auth, no work", e)
        lines.append("")
    if "unary" in phases:
        u = phases["unary"]
        extra = [f"  checkouts/s {_rate(u['checkouts_per_s'])}, RPCs/s {_rate(u['rpcs_per_s'])}"]
        if "checkout" in u:
            c = u["checkout"]
            extra.append(f"  paced: {u['offered_checkouts_per_s']:,g} checkouts/s offered; a "
                         f"checkout from its arrival p50 {_ms(c['p50_ms'])} ms, "
                         f"p99 {_ms(c['p99_ms'])} ms, max {_ms(c['max_ms'])} ms")
        lines += render_timed(
            "unary checkout: Quote by card, Hold (half), Capture with earn, "
            "Refund of one line (5%)", u, extra)
        lines.append("")
    if "batch" in phases:
        b = phases["batch"]
        r = b["request"]
        view = ", status-only results" if b.get("view") == "status" else ""
        lines += [(f"batch: Post of {b['batch']:,} operations ({b['kind']}{view}), "
                   f"{b['clients']} clients"),
                  (f"  durable ops/s {_rate(b['durable_ops_per_s'])}  "
                   f"({b['durable_ops']:,} ops in {b['requests']:,} requests, "
                   f"{b['seconds']:.1f} s; {b['requests_per_s']:.2f} requests/s)"),
                  (f"  request latency p50 {_ms(r['p50_ms'])} ms, p99 {_ms(r['p99_ms'])} ms, "
                   f"p99.9 {_ms(r['p999_ms'])} ms, max {_ms(r['max_ms'])} ms"),
                  f"  client time building requests {b['client_build_seconds']:.1f} s",
                  _render_usage(b), _render_errors(b["errors"]), ""]
    lines.append("summary (issue 4's goals)")
    for goal in result["goals"].values():
        lines.append(f"  {'MET    ' if goal['met'] else 'NOT MET'}  {goal['text']}")
    end = " ".join(f"{x:.2f}" for x in meta["load_average_end"])
    lines.append(f"load average at end {end}")
    return lines


RANGED = (("echo RPCs/s", "echo", "rpcs_per_s", "{:,.0f}"),
          ("echo server main-thread us/RPC", "echo", "server_main_us_per_rpc", "{:,.0f}"),
          ("unary RPCs/s", "unary", "rpcs_per_s", "{:,.0f}"),
          ("unary p99 ms", "unary", ("all", "p99_ms"), "{:,.2f}"),
          ("unary server main-thread us/RPC", "unary", "server_main_us_per_rpc",
           "{:,.0f}"),
          ("Post durable ops/s", "batch", "durable_ops_per_s", "{:,.0f}"),
          ("Post server main-thread us/op", "batch", "server_main_us_per_op", "{:,.0f}"))


def render_ranges(rounds):
    """Each figure's range over the rounds (min .. max, then every round)."""
    lines = [f"over {len(rounds)} rounds (min .. max: each round)"]

    def figure(phases, phase, key):
        value = phases.get(phase)
        for k in (key if isinstance(key, tuple) else (key,)):
            value = value.get(k) if isinstance(value, dict) else None
        return value
    rows = [(label, fmt, [figure(r["phases"], phase, key) for r in rounds])
            for label, phase, key, fmt in RANGED]
    share = [r["goals"]["unary"].get("share_of_echo") for r in rounds
             if "unary" in r["goals"]]
    if share and all(x is not None for x in share):
        rows.insert(4, ("unary share of echo %", "{:.1f}", [100 * x for x in share]))
    for label, fmt, values in rows:
        values = [v for v in values if v is not None]
        if values:
            lines.append(f"  {label:<34} {fmt.format(min(values))} .. "
                         f"{fmt.format(max(values))}: "
                         + ", ".join(fmt.format(v) for v in values))
    loads = " ".join(f"{r['load_average_start'][0]:.2f}" for r in rounds)
    lines.append(f"  load average (1 min) at each round's start: {loads}")
    return lines


def goals(phases):
    out = {}
    if "unary" in phases and "echo" in phases:
        u, e = phases["unary"], phases["echo"]
        share = u["rpcs_per_s"] / e["rpcs_per_s"] if e["rpcs_per_s"] else float("nan")
        p99 = u["all"]["p99_ms"]
        paced = (f" at {u['offered_checkouts_per_s']:,g} checkouts/s offered"
                 if "checkout" in u else "")
        out["unary"] = {
            "share_of_echo": share, "p99_ms": p99,
            "met": share >= GOAL_SHARE_OF_ECHO and p99 < GOAL_P99_MS,
            "text": f"unary checkout {_rate(u['rpcs_per_s'])} RPCs/s{paced} = {share:.1%} "
                    f"of echo ({_rate(e['rpcs_per_s'])}/s; goal >= "
                    f"{GOAL_SHARE_OF_ECHO:.0%}), p99 {_ms(p99)} ms (goal < {GOAL_P99_MS:g} ms)"}
    elif "unary" in phases:
        u = phases["unary"]
        out["unary"] = {"met": False, "text": f"unary checkout {_rate(u['rpcs_per_s'])} "
                        "RPCs/s (no echo phase to compare with)"}
    if "batch" in phases:
        b = phases["batch"]
        out["batch"] = {
            "durable_ops_per_s": b["durable_ops_per_s"],
            "met": b["durable_ops_per_s"] >= GOAL_BATCH_OPS,
            "text": f"batch {_rate(b['durable_ops_per_s'])} durable ops/s through Post "
                    f"(goal >= {GOAL_BATCH_OPS:,})"}
    return out


# --- main --------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Kopilka load generator: POS checkouts (unary) and Post batches "
                    "against the real server, beside a bare gRPC echo baseline.",
        epilog="Example: load.py --mode all --duration 20 --clients 64 --members 100000 "
               "--batch 1000 --json")
    p.add_argument("--mode", choices=("unary", "batch", "post", "echo", "all"),
                   default="all",
                   help="what to run (all: echo, then unary, then batch; post is "
                        "batch; default all)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the phases this many times, one after the other (a "
                        "fresh server each round), and report the range of each "
                        "figure (default %(default)s)")
    p.add_argument("--clients", type=int, default=32,
                   help="concurrent POS clients (and echo clients) (default %(default)s)")
    p.add_argument("--rate", type=float, default=None, metavar="CHECKOUTS_PER_S",
                   help="pace the unary phase: checkouts arrive at this mean rate "
                        "(Poisson, spread over the clients) instead of back to back, "
                        "so its latencies are those of that load, not of a queue at "
                        "saturation (default: back to back)")
    p.add_argument("--channels", type=int, default=4,
                   help="gRPC channels (connections) the clients share (default %(default)s)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds per phase (default %(default)s)")
    p.add_argument("--warmup", type=float, default=None,
                   help="unmeasured seconds before each unary/echo window "
                        "(default: a fifth of --duration, at most 2)")
    p.add_argument("--members", type=int, default=10_000,
                   help="members seeded, each with a card and points (default %(default)s)")
    p.add_argument("--batch", type=int, default=1000,
                   help="operations per Post request, 1 to 10,000 (default %(default)s)")
    p.add_argument("--batch-kind", choices=("holds+captures", "captures"),
                   default="holds+captures",
                   help="a hold and its capture per member, or captures only "
                        "(half spending directly) (default %(default)s)")
    p.add_argument("--post-view", choices=("full", "status"), default="full",
                   help="what Post returns of each operation: its full response, or "
                        "its status alone (POST_RESULT_VIEW_STATUS) (default %(default)s)")
    p.add_argument("--batch-clients", type=int, default=3,
                   help="concurrent Post clients (default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="deadline of a unary RPC, seconds (default %(default)s)")
    p.add_argument("--post-timeout", type=float, default=300.0,
                   help="deadline of a Post, seconds (default %(default)s)")
    p.add_argument("--json", nargs="?", const="auto", metavar="OUT",
                   help="write the figures as JSON to OUT (no OUT: "
                        "benchmarks/results/load-<date>-<host>.json)")
    p.add_argument("--data", metavar="DIR",
                   help="seed (if new) and keep this data directory instead of a "
                        "temporary one")
    p.add_argument("--seed-only", action="store_true",
                   help="with --data: seed it and exit (for --server)")
    p.add_argument("--server", metavar="HOST:PORT",
                   help="load a running server (its data seeded with --seed-only) "
                        "instead of starting one")
    p.add_argument("--token", help="with --server: a pos token of store 42 "
                                   "(default: from --data DIR/load-tokens.json)")
    p.add_argument("--profile", metavar="DIR",
                   help="sample the server with py-spy during the unary and batch "
                        "windows; writes DIR/server-<phase>.txt and prints the top frames")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(2.0, args.duration / 5)
    if args.mode == "post":
        args.mode = "batch"
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.rate is not None and not args.rate > 0:
        p.error("--rate must be above 0")
    if not 1 <= args.batch <= 10_000:
        p.error("--batch must be 1 to 10,000")
    if args.clients < 1 or args.channels < 1 or args.batch_clients < 1 or args.members < 1:
        p.error("--clients, --channels, --batch-clients and --members must be at least 1")
    if args.seed_only and not args.data:
        p.error("--seed-only needs --data")
    if args.server and not (args.token or args.data):
        p.error("--server needs --token or --data (the seeded directory)")
    return args


async def run(args, log_dir, server_info):
    phases = {}
    run_id = f"{time.time_ns() // 1000:x}"[-8:]   # fresh operation ids each run
    metadata = (("authorization", f"Bearer {server_info['pos']}"),)
    if args.mode in ("echo", "all"):
        print("echo ...", flush=True)
        phases["echo"] = await phase_echo(args, log_dir, metadata)
    if args.mode in ("unary", "batch", "all"):
        if args.server:
            server = External(args.server)
        else:
            print("starting the server ...", flush=True)
            server = kopilka_server("kopilka server", os.path.join(log_dir, "server.log"),
                                    data=server_info["data"], listen="127.0.0.1:0")
            print(f"  server pid {server.pid} on {server.address}", flush=True)
        try:
            if args.mode in ("unary", "all"):
                print("unary ...", flush=True)
                profile = (Profile(args.profile, server, "unary",
                                   args.warmup + args.duration)
                           if args.profile and server.pid else None)
                phases["unary"] = await phase_unary(args, server, metadata, run_id)
                if profile:
                    phases["unary"]["profile"] = profile.report()
            if args.mode in ("batch", "all"):
                print("batch ...", flush=True)
                profile = (Profile(args.profile, server, "batch",
                                   args.warmup + args.duration)
                           if args.profile and server.pid else None)
                phases["batch"] = await phase_batch(args, server, metadata, run_id)
                if profile:
                    phases["batch"]["profile"] = profile.report()
        finally:
            code = server.stop()
            if code not in (0, None):
                print(f"warning: the server exited with {code}; see {log_dir}/server.log",
                      flush=True)
    return phases


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, HERE)  # echo.py
    load_start = os.getloadavg()
    now = datetime.datetime.now()
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpus": os.cpu_count(), "commit": commit_of(),
            "load_average_start": load_start,
            "args": {**vars(args), "token": "***" if args.token else None}}
    temporary = None
    if args.data:
        data = os.path.abspath(args.data)
    else:
        temporary = tempfile.mkdtemp(prefix="kopilka-load-")
        data = os.path.join(temporary, "data")
    log_dir = temporary or data
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    try:
        tokens_path = os.path.join(data, "load-tokens.json")
        if args.server and args.token:
            info = {"pos": args.token, "members": args.members}
        elif os.path.exists(tokens_path):
            with open(tokens_path) as f:
                info = json.load(f)
            if info["members"] < args.members:
                raise SystemExit(f"{data} has {info['members']:,} members, fewer than "
                                 f"--members {args.members:,}")
        elif args.server:
            raise SystemExit(f"{tokens_path} not found: seed with --data DIR --seed-only")
        elif args.mode == "echo":
            info = {"pos": "none", "members": args.members}
        else:
            print(f"seeding {args.members:,} members in {data} ...", flush=True)
            started = time.perf_counter()
            info = seed(data, args.members)
            meta["seed_seconds"] = time.perf_counter() - started
            print(f"  seeded in {meta['seed_seconds']:.1f} s", flush=True)
        info["data"] = data
        if args.seed_only:
            print(f"seeded {data}; tokens in {tokens_path}")
            return 0
        rounds = []
        for number in range(args.rounds):
            if args.rounds > 1:
                print(f"round {number + 1} of {args.rounds}", flush=True)
            round_start = os.getloadavg()
            phases = asyncio.run(run(args, log_dir, info))
            rounds.append({"phases": phases, "goals": goals(phases),
                           "load_average_start": round_start,
                           "load_average_end": os.getloadavg()})
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    meta["load_average_end"] = os.getloadavg()
    result = {"meta": meta, "phases": rounds[0]["phases"], "goals": rounds[0]["goals"]}
    if len(rounds) > 1:
        result["rounds"] = rounds
    for number, r in enumerate(rounds):
        if len(rounds) > 1:
            print(f"\n--- round {number + 1} of {len(rounds)}")
        print("\n".join(render({"meta": {**meta, "load_average_start":
                                          r["load_average_start"],
                                          "load_average_end": r["load_average_end"]},
                                 "phases": r["phases"], "goals": r["goals"]})))
        phases = r["phases"]
        for name in ("unary", "batch"):
            for line in phases.get(name, {}).get("profile", ()):
                if line is phases[name]["profile"][0]:
                    print(f"\n{name} phase {line}")
                else:
                    print(line)
    if len(rounds) > 1:
        print("\n".join(render_ranges(rounds)))
    if args.json:
        out = args.json
        if out == "auto":
            os.makedirs(RESULTS_DIR, exist_ok=True)
            out = os.path.join(RESULTS_DIR, f"load-{meta['date']}-{meta['host']}.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"saved {out}")
    errors = sum(len(p["errors"]) for r in rounds for p in r["phases"].values())
    if errors:
        print(f"FAILED: {errors} kinds of unexpected errors (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
