"""`kopilka hwd simulate`: the real daemon, fed by virtual readers, against a real core.

Nothing here is a mock. Each lane gets two virtual readers on
pseudo-terminals: a magnetic stripe reader sending ISO 7813 tracks 1 and 2
with LRCs, and a barcode scanner sending EAN-13 codes with an AIM
identifier, as hardware on a USB-serial cable would. The daemon opens the
ptys through pyserial like any port and streams the reads to the core
given. A swipe generator writes realistic frames into the ptys: the
store's loyalty cards (stripe numbers 7789..., Luhn-valid; EAN-13 cards
2...), and, with `noise`, what tills see too: a bank card swiped by mistake,
a half swipe, line noise, a double swipe. Every acknowledgement is printed
with its lane, masked card number and latency (swipe to ack).

The pure parts (`card_pool`, `Swipes`) decide what is swiped; `simulate`
wires ptys, daemon and generator.
"""

import os
import random
import tempfile
import threading
import time
from dataclasses import replace

from . import barcode, magstripe
from .config import CoreConfig, HwdConfig, ReaderConfig
from .daemon import Daemon
from .events import mask
from .filters import CardNumberPolicy, luhn_ok
from .framing import BarcodeFraming, MagstripeFraming
from .reader import SerialSettings

STRIPE_PREFIX, BARCODE_PREFIX = "7789", "2"
POLICY = CardNumberPolicy.from_mapping({"ranges": [
    {"prefix": STRIPE_PREFIX, "length": 16, "luhn": True, "sources": ["track1", "track2"]},
    {"prefix": BARCODE_PREFIX, "length": 13, "sources": ["barcode"]}]})
MSR = MagstripeFraming(tracks=(1, 2), lrc="required")
SCANNER = BarcodeFraming(aim="required", check_digit="auto")
BANK_CARD = {1: b"B4111111111111111^TEST/CARD^2912101", 2: b"4111111111111111=2912101"}
NAMES = ("IVANOVA/ANNA", "PETROV/IVAN", "SMIRNOVA/OLGA", "KUZNETSOV/PAVEL")
NOISE = ("bank card", "half swipe", "line noise", "double swipe")


def luhn_complete(digits):
    """`digits` with the Luhn check digit appended."""
    for d in "0123456789":
        if luhn_ok(digits + d):
            return digits + d
    raise ValueError("expected digits")


def card_pool(rng, size=20):
    """(stripe card numbers, barcode card numbers) of the simulated program."""
    stripes = [luhn_complete(STRIPE_PREFIX + "".join(rng.choice("0123456789")
                                                       for _ in range(11)))
               for _ in range(size)]
    codes = [barcode.with_check_digit(BARCODE_PREFIX + "".join(rng.choice("0123456789")
                                                               for _ in range(11)))
             for _ in range(size)]
    return stripes, codes


class Swipes:
    """What a till sees: (reader index, bytes, label) one swipe at a time (pure).

    Readers come in pairs per lane (stripe reader, scanner). A lane's next
    card is never its last one, so without noise every swipe is one read;
    `noise` is the share of swipes that are a bank card, a half swipe, line
    noise or a double swipe (scanners only see the last two)."""

    def __init__(self, lanes, rng, noise=0.0):
        self.lanes, self.rng, self.noise = lanes, rng, noise
        self.stripes, self.codes = card_pool(rng)
        self._last = {}

    def next(self):
        lane = self.rng.randrange(self.lanes)
        scanner = self.rng.random() < 0.5
        index = 2 * lane + scanner
        pool = self.codes if scanner else self.stripes
        card = self.rng.choice([c for c in pool if c != self._last.get(lane)])
        frame = self._frame(scanner, card)
        if self.rng.random() < self.noise:
            kind = self.rng.choice(NOISE if not scanner else ("line noise", "double swipe"))
            if kind == "bank card":
                return index, magstripe.encode_frame(MSR, BANK_CARD), kind
            if kind == "half swipe":             # the card pulled out half way
                return index, frame[:len(frame) // 2], kind
            if kind == "line noise":             # ends in CR, as a reader's buffer flushes
                return index, bytes(self.rng.randrange(256) for _ in range(24)) + b"\r", kind
            self._last[lane] = card              # a double swipe: one read
            return index, frame + frame, kind
        self._last[lane] = card
        return index, frame, mask(card)

    @staticmethod
    def _frame(scanner, card):
        if scanner:
            return barcode.encode_frame(SCANNER, card.encode(), aim="E0")
        name = NAMES[int(card[-1]) % len(NAMES)].encode()
        return magstripe.encode_frame(MSR, {1: b"B" + card.encode() + b"^" + name + b"^2912101",
                                            2: card.encode() + b"=2912101"})


class VirtualPort:
    """A pseudo-terminal: the daemon opens `path`, the generator writes to the master."""

    def __init__(self):
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)

    def write(self, data):
        os.write(self.master, data)

    def close(self):
        os.close(self.master)


def simulated_config(core, ports, store, spool_dir, metrics_address=None):
    """An `HwdConfig` for the virtual readers (stripe, scanner per lane)."""
    readers = []
    for i, port in enumerate(ports):
        lane, scanner = i // 2 + 1, i % 2
        readers.append(ReaderConfig(f"lane{lane}-{'scanner' if scanner else 'msr'}",
                                    port.path, lane,
                                    SerialSettings(read_timeout=0.02, backoff_base=0.1,
                                                   backoff_cap=1.0),
                                    SCANNER if scanner else MSR))
    return HwdConfig(store=store, core=core, readers=tuple(readers), policy=POLICY,
                     spool_path=os.path.join(spool_dir, "spool.db"),
                     metrics_address=metrics_address)


def simulate(core, *, lanes=2, rate=2.0, count=None, noise=0.1, seed=None, store=1,
             spool_dir=None, metrics_address=None, stop=None, out=print):
    """Run readers, daemon and swipe generator until `count` swipes are
    acknowledged (or `stop` is set); returns the daemon's last snapshot."""
    if not isinstance(core, CoreConfig):
        raise TypeError("core: a CoreConfig")
    stop = stop or threading.Event()
    rng = random.Random(seed)
    scratch = None
    if spool_dir is None:       # the simulated cards' spool goes when we do
        scratch = tempfile.TemporaryDirectory(prefix="kopilka-hwd-sim-")
        spool_dir = scratch.name
    ports = [VirtualPort() for _ in range(2 * lanes)]
    config = simulated_config(replace(core), ports, store, spool_dir, metrics_address)
    swipes = Swipes(lanes, rng, noise)
    acked = threading.Semaphore(0)

    def on_ack(read, outcome, now_us):
        if read is not None:
            out(f"{read.lane}  {read.reader:<14} {mask(read.card_number):>16}  {read.source:<7}"
                f" -> {outcome} in {(now_us - read.read_time_us) / 1000:.1f} ms")
        acked.release()

    daemon = Daemon(config, on_ack=on_ack).start()
    out(f"simulating {len(ports)} readers on {lanes} lanes of store {store} "
        f"({', '.join(p.path for p in ports)}), core {core.address}")
    try:
        _wait_connected(daemon, stop)
        swiped = expected = 0
        while not stop.is_set() and (count is None or swiped < count):
            index, frame, label = swipes.next()
            ports[index].write(frame)
            if label in NOISE:
                out(f"   ({config.readers[index].id}: {label})")
            expected += label not in NOISE or label == "double swipe"
            swiped += 1
            if count is None or swiped < count:
                stop.wait(rng.expovariate(rate))
        # Until every read swiped is acknowledged, or stopped, or the core
        # has not acknowledged anything for a while.
        while not stop.is_set() and _acks(daemon) < expected:
            if not acked.acquire(timeout=ACK_PATIENCE_S):
                out(f"gave up waiting: {_acks(daemon)} of {expected} reads acknowledged")
                break
        return daemon.snapshot()
    finally:
        daemon.stop()
        for port in ports:
            port.close()
        if scratch is not None:
            scratch.cleanup()


ACK_PATIENCE_S = 10.0


def _acks(daemon):
    return sum(daemon.uplink.health().acks.values())


def _wait_connected(daemon, stop, timeout=5.0):
    """Give the readers a moment to open their ptys before the first swipe."""
    end = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < end and any(
            r.health().state != "connected" for r in daemon.readers):
        stop.wait(0.01)
