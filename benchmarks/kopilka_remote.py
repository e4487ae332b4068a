"""Kopilka over gRPC: the real server in its own process on loopback
(durable commits, its group-commit writer), sent the comparison's
operations as unary Checkout RPCs or as Post requests; and the bare gRPC
echo beside it, driven by the same client machinery.

The operations as a POS sends them, each receipt one line of groceries of
the operation's money at store 42: earn is a Capture spending nothing;
spend a Capture of a promotional line (it earns nothing) spending points;
capture a Capture spending points and earning on the rest; refund a Refund
of the whole earlier receipt. Members are named by card. The server prices
every receipt (the example program) and keeps its allocation with the
operation: it does more per operation than the ledgers it is compared with.
"""

import asyncio
import os
import sys
import time
from collections import Counter
from types import SimpleNamespace

import grpc

import load
import measure
import workload
from procs import kopilka_server

PYTHON = sys.executable


def start_server(data, log_dir, map_size, *, writemap=False):
    return kopilka_server("kopilka server", os.path.join(log_dir, "server.log"),
                          timeout=300, data=data, listen="127.0.0.1:0",
                          map_size=map_size, writemap=writemap)


class Requests:
    """Protobuf requests of workload operations."""

    def __init__(self):
        from kopilka.v1 import checkout_pb2, common_pb2
        self.pb, self.money = checkout_pb2, common_pb2.Money

    def _lane(self, op):
        return f"stores/{workload.STORE}/lanes/{op.lane}"

    def _receipt(self, op):
        pb = self.pb
        price = self.money(currency_code="RUB", minor_units=op.money)
        receipt = pb.Receipt(receipt_id=op.op_id, lines=[pb.ReceiptLine(
            line_number=1, sku="gro-00001", category="groceries", quantity=1,
            unit_price=price, total=price,
            flags=["promo"] if op.kind == workload.SPEND else [])])
        receipt.business_time.FromMicroseconds(time.time_ns() // 1000)
        return receipt

    def capture_or_refund(self, op):
        """("capture" or "refund", the request)."""
        if op.kind == workload.REFUND:
            return "refund", self.pb.RefundRequest(
                operation_id=op.op_id, lane=self._lane(op),
                original_operation_id=op.original, whole_receipt=True)
        return "capture", self.pb.CaptureRequest(
            operation_id=op.op_id, lane=self._lane(op),
            card_number=load.card_number(op.account - 1),
            receipt=self._receipt(op), spend_points=op.spend)

    def post(self, ops):
        pb = self.pb
        out = []
        for op in ops:
            which, request = self.capture_or_refund(op)
            out.append(pb.PostOperation(**{which: request}))
        return pb.PostRequest(operations=out)


async def unary(address, token, *, accounts, variant, clients, seconds, warmup,
                run_id, server_pid, timeout=30.0, channels=4):
    """`clients` tills, each sending one operation at a time."""
    from kopilka.v1 import checkout_pb2_grpc
    chans = load.channels(address, min(channels, clients))
    stubs = [checkout_pb2_grpc.CheckoutStub(c) for c in chans]
    await asyncio.gather(*(c.channel_ready() for c in chans))
    requests, recorder = Requests(), load.Recorder()
    metadata = (("authorization", f"Bearer {token}"),)
    started = time.perf_counter()
    window = (started + warmup, started + warmup + seconds)

    async def till(n):
        stream = workload.Stream(accounts, hot=variant == "hot", run=run_id, client=n)
        stub = stubs[n % len(stubs)]
        while time.perf_counter() < window[1]:
            op, = stream.take(1)
            which, request = requests.capture_or_refund(op)
            call = stub.Refund if which == "refund" else stub.Capture
            await load.timed(recorder, op.kind, call, request, metadata, timeout)

    tasks = [asyncio.ensure_future(till(n)) for n in range(clients)]
    await asyncio.sleep(warmup)
    meter = measure.Meter(lambda: [server_pid])
    await asyncio.gather(*tasks)
    meter.done()
    for c in chans:
        await c.close()
    kinds, errors = recorder.window(*window)
    latencies = [x for v in kinds.values() for x in v]
    return measure.row(
        "kopilka-server", "unary", variant, clients, 1, ok=len(latencies),
        rejected=sum(errors.values()), seconds=seconds, latencies=latencies,
        meter=meter, errors=_errors(errors))


async def post(address, token, *, accounts, variant, clients, batch, seconds,
               run_id, server_pid, timeout=600.0):
    """`clients` senders of Post requests of `batch` operations each; the
    window opens when each has had one request answered."""
    from kopilka.v1 import checkout_pb2_grpc
    chans = load.channels(address, clients)
    stubs = [checkout_pb2_grpc.CheckoutStub(c) for c in chans]
    await asyncio.gather(*(c.channel_ready() for c in chans))
    requests = Requests()
    metadata = (("authorization", f"Bearer {token}"),)
    opened = asyncio.Event()
    state = {"warm": 0, "start": 0.0, "stop_at": 0.0, "last_end": 0.0, "ok": 0,
             "latencies": [], "refused": Counter(), "meter": None}

    async def sender(n):
        stream = workload.Stream(accounts, hot=variant == "hot", run=run_id, client=n)
        stub = stubs[n]
        measured = False
        while True:
            request = requests.post(stream.take(batch))
            if measured:
                if time.perf_counter() >= state["stop_at"]:
                    return
            sent = time.perf_counter()
            try:
                response = await stub.Post(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                state["refused"][("Post", err.code().name, load.error_reason(err))] += batch
                response = None
            ended = time.perf_counter()
            if not measured:
                measured = True
                state["warm"] += 1
                if state["warm"] == clients:
                    state["start"] = time.perf_counter()
                    state["stop_at"] = state["start"] + seconds
                    state["meter"] = measure.Meter(lambda: [server_pid])
                    opened.set()
                await opened.wait()
                continue
            state["latencies"].append(ended - sent)
            state["last_end"] = max(state["last_end"], ended)
            for result in response.results if response is not None else ():
                if result.status.code == 0:
                    state["ok"] += 1
                else:
                    state["refused"][("Post." + (result.WhichOneof("result") or "op"),
                                      str(result.status.code),
                                      load.status_reason(result.status))] += 1

    await asyncio.gather(*(sender(n) for n in range(clients)))
    state["meter"].done()
    for c in chans:
        await c.close()
    took = max(state["last_end"] - state["start"], 1e-9)
    return measure.row(
        "kopilka-server", "batch", variant, clients, batch, ok=state["ok"],
        rejected=sum(state["refused"].values()), seconds=took,
        latencies=state["latencies"], meter=state["meter"],
        errors=_errors(state["refused"]))


def _errors(counter):
    return [{"rpc": k, "code": c, "reason": r, "count": n}
            for (k, c, r), n in sorted(counter.items())]


async def echo(log_dir, *, clients, seconds, warmup):
    """The bare gRPC echo (benchmarks/echo.py) at `clients` concurrent
    callers: the ceiling of Python gRPC here."""
    args = SimpleNamespace(channels=min(4, clients), clients=clients, timeout=30.0,
                           warmup=warmup, duration=seconds)
    meter = measure.Meter()
    out = await load.phase_echo(args, log_dir, ())
    r = measure.row("grpc-echo", "unary", "-", clients, 1, ok=out["rpcs"], rejected=0,
                    seconds=seconds, latencies=[], meter=meter,
                    payload_bytes=out["payload_bytes"])
    f = out["all"]
    r.update(p50_ms=f["p50_ms"], p99_ms=f["p99_ms"], p999_ms=f["p999_ms"],
             max_ms=f["max_ms"], acks=f["count"], server_cpu=out["server_cpu_share"])
    return r
