"""Bytes in, card reads and rejects out: the incremental frame parser.

`Parser(framing, policy).feed(data)` takes whatever a serial read returned
(one byte, half a frame, three frames and some noise) and returns the events
completed by it; `flush()` ends input (a reader gone quiet, unplugged) and
reports what was left open. It is pure: no I/O, no clock, no threads; the
same bytes give the same events however they are split across `feed` calls.

How it works. A framing compiles into a list of elements (fixed literals
such as STX, a preamble or a terminator; tracks; a barcode payload), matched
one byte at a time, so each byte costs O(1) and nothing is re-scanned. Idle,
the parser skips bytes until one can open a frame (STX, the first byte of
the preamble or prefix, a start sentinel...). When a byte does not fit the
frame being matched, the frame fails and that same byte is looked at again
as a possible start: a half swipe followed by a good swipe loses only the
half swipe. Failing while still in the opening literals (a preamble that
only partly matched) replays those few bytes after the first, so an opening
that overlaps itself is not missed; track data is never replayed.

What is rejected, and how it is counted. Skipped bytes and frames broken by
a byte that starts nothing are GARBAGE, counted in runs: one reject when
the run ends (before the next event), when it reaches max_frame_bytes, or
on flush. A frame broken by a byte that starts a new frame is a
HALF_SWIPE, and so is a frame still open at flush once its data began (a
lone STX or preamble is garbage). A frame longer than
max_frame_bytes is TOO_LONG, and parsing starts over with the next byte: a
reader flooding bytes can never grow memory past max_frame_bytes. A
complete frame is then checked (LRC, unreadable tracks, symbology, check
digit) and its card number extracted and checked by the policy.

Track data lives in the parser only from its start sentinel to the end of
its frame, is never put in an event, and is dropped when the frame is
decided.
"""

from . import barcode, magstripe
from .events import BAD_LRC, BARCODE, GARBAGE, HALF_SWIPE, TOO_LONG, CardRead, Reject
from .filters import CardNumberPolicy
from .framing import ETX, STX, BarcodeFraming, MagstripeFraming

# What an element says about one byte.
TAKEN = 0      # the byte belongs to the element, which wants more
DONE = 1       # the byte belongs to the element, which is complete
PASS = 2       # the element is complete without the byte: offer it to the next
FAIL = 3       # the byte does not fit here: the frame is broken


class Literal:
    """Fixed bytes: STX, ETX, a preamble, a separator, a terminator, a prefix..."""

    def __init__(self, data):
        self.data, self.openers, self._at = data, frozenset(data[:1]), 0

    def reset(self):
        self._at = 0

    def step(self, b):
        if b != self.data[self._at]:
            return FAIL
        self._at += 1
        return DONE if self._at == len(self.data) else TAKEN


class TrackElement:
    """One magstripe track: start sentinel, data, end sentinel, maybe an LRC.

    Or the reader's error marker, between the sentinels (`%E?`) or, when the
    framing allows it, alone. After `DONE`, `data` is the track's data (None
    for an unreadable track) and `lrc_ok` True, False or None (no LRC sent).
    """

    START, BARE, DATA, LRC = range(4)

    def __init__(self, track, framing):
        self.track, self.marker, self.lrc_mode = track, framing.error_marker, framing.lrc
        self.bare = framing.bare_error_marker
        self.openers = frozenset([track.start] + ([self.marker[0]] if self.bare else []))
        self.follow = frozenset()      # bytes that may come right after; set by the parser
        self._buf = bytearray()
        self.reset()

    def reset(self):
        self._buf.clear()
        self._phase, self._acc, self._at = self.START, 0, 0
        self.data, self.lrc_ok = None, None

    def step(self, b):
        track = self.track
        if self._phase == self.START:
            if b == track.start:
                self._phase, self._acc = self.DATA, track.value(b)
                return TAKEN
            if self.bare and b == self.marker[0]:
                self._phase, self._at = self.BARE, 0
                return self._bare(b)
            return FAIL
        if self._phase == self.BARE:
            return self._bare(b)
        if self._phase == self.DATA:
            if b == magstripe.END_SENTINEL:
                return self._end(b)
            if track.is_data(b) or b in self.marker:
                self._buf.append(b)
                self._acc ^= track.value(b)
                return TAKEN
            return FAIL
        # LRC: the byte after the end sentinel.
        expected = track.base + self._acc
        if b == expected:
            self.lrc_ok = True
            return DONE
        if self.lrc_mode == "optional" and b in self.follow:
            return PASS                 # no LRC sent: the byte is what comes next
        if track.is_lrc(b):
            self.lrc_ok = False
            return DONE
        return FAIL

    def _bare(self, b):
        if b != self.marker[self._at]:
            return FAIL
        self._at += 1
        return DONE if self._at == len(self.marker) else TAKEN

    def _end(self, b):
        if self._buf == self.marker:
            return DONE                 # unreadable: data stays None, no LRC follows
        if not all(self.track.is_data(c) for c in self._buf):
            return FAIL                 # marker characters inside real data
        self.data = bytes(self._buf)
        self._acc ^= self.track.value(b)
        if self.lrc_mode == "absent":
            return DONE
        self._phase = self.LRC
        return TAKEN


class PayloadElement:
    """A barcode's data, up to the first byte of the suffix (which it takes)."""

    def __init__(self, end):
        self.end = end
        self.openers = frozenset(b for b in range(256) if barcode.is_data_byte(b))
        self.follow = frozenset()
        self._buf = bytearray()

    def reset(self):
        self._buf.clear()

    @property
    def data(self):
        return bytes(self._buf)

    def step(self, b):
        if b == self.end:
            return DONE
        if barcode.is_data_byte(b):
            self._buf.append(b)
            return TAKEN
        return FAIL


def _elements(framing):
    """The framing as a list of elements, in the order their bytes arrive."""
    def lit(data):
        return [Literal(data)] if data else []
    if isinstance(framing, MagstripeFraming):
        envelope = framing.stx_etx
        body = []
        for i, number in enumerate(framing.tracks):
            if i:
                body += lit(framing.track_separator)
            body.append(TrackElement(magstripe.TRACKS[number], framing))
        return (lit(bytes([STX]) if envelope else b"") + lit(framing.preamble) + body
                + lit(framing.terminator) + lit(framing.postamble)
                + lit(bytes([ETX]) if envelope else b""))
    if isinstance(framing, BarcodeFraming):
        return (lit(framing.prefix) + [PayloadElement(framing.suffix[0])]
                + lit(framing.suffix[1:]))
    raise TypeError(f"not a framing: {framing!r}")


class Parser:
    """Incremental parser for one reader: see the module doc.

    `policy` says which card numbers are the program's; without one any
    number of digits is read (the simulator, tests): the daemon always
    passes the store's configured policy."""

    def __init__(self, framing, policy=None):
        self.framing = framing
        self.policy = policy if policy is not None else CardNumberPolicy()
        self._elements = _elements(framing)
        self._first_data = next(i for i, e in enumerate(self._elements)
                                if not isinstance(e, Literal))
        self.opening_bytes = self._elements[0].openers
        for here, after in zip(self._elements, self._elements[1:] + [None]):
            here.follow = (after.openers if after else frozenset()) | self.opening_bytes
        self._max = framing.max_frame_bytes
        self._at = None                # index of the element being matched; None: idle
        self._nbytes = 0               # bytes taken by the open frame
        self._opening = bytearray()    # bytes taken by its opening literals (never track data)
        self._garbage = 0              # bytes of the current garbage run
        self._out = []

    @property
    def buffered(self):
        """Bytes held for the frame being matched (at most max_frame_bytes)."""
        return self._nbytes

    def feed(self, data):
        """The events that `data` (any bytes-like) completes."""
        for b in bytes(data):
            self._byte(b)
        out, self._out = self._out, []
        return out

    def flush(self):
        """End of input for now: report the garbage run and any frame left open."""
        if self._at is not None:
            if self._nbytes == len(self._opening):   # only an opening (a lone STX...)
                self._add_garbage(self._nbytes)
            else:
                self._emit(Reject(HALF_SWIPE, self._nbytes))
            self._close()
        self._end_garbage()
        out, self._out = self._out, []
        return out

    # -- matching -----------------------------------------------------------

    def _byte(self, b):
        if self._at is None:
            if b not in self.opening_bytes:
                self._add_garbage(1)
                return
            self._open()
        while True:
            result = self._elements[self._at].step(b)
            if result == FAIL:
                self._fail(b)
                return
            if result == PASS:
                self._at += 1           # the next element gets the same byte
                if self._at < len(self._elements):
                    continue
                self._complete()
                self._byte(b)
                return
            self._nbytes += 1
            if self._at < self._first_data:
                self._opening.append(b)
            if result == DONE:
                self._at += 1
                if self._at == len(self._elements):
                    self._complete()
                    return
            if self._nbytes > self._max:
                self._emit(Reject(TOO_LONG, self._nbytes))
                self._close()
            return

    def _open(self):
        self._at, self._nbytes = 0, 0   # elements were reset when the last frame closed

    def _close(self):
        self._at, self._nbytes = None, 0
        self._opening.clear()
        for element in self._elements:
            element.reset()

    def _fail(self, b):
        if self._opening and self._nbytes == len(self._opening):
            # Broken in the opening literals: only the first byte is garbage,
            # the rest may begin a frame of their own.
            replay = bytes(self._opening[1:])
            self._close()
            self._add_garbage(1)
            for r in replay:
                self._byte(r)
        else:
            nbytes = self._nbytes
            self._close()
            if b in self.opening_bytes:
                self._emit(Reject(HALF_SWIPE, nbytes))
            else:
                self._add_garbage(nbytes)
        self._byte(b)

    def _complete(self):
        nbytes = self._nbytes
        event = self._decide()
        self._close()
        self._emit(event if isinstance(event, CardRead) else Reject(event, nbytes))

    def _decide(self):
        """The read, or the reject reason, for the frame just completed."""
        if isinstance(self.framing, BarcodeFraming):
            payload = next(e for e in self._elements if isinstance(e, PayloadElement))
            found = barcode.classify(payload.data, self.framing)
            if isinstance(found, str):
                return found
            return self.policy.evaluate(BARCODE, found[0], found[1])
        tracks = [e for e in self._elements if isinstance(e, TrackElement)]
        if any(t.lrc_ok is False for t in tracks):
            return BAD_LRC      # line noise: the whole frame is suspect
        chosen = magstripe.choose_track({t.track.number: t.data for t in tracks},
                                        self.framing.prefer)
        if isinstance(chosen, str):
            return chosen
        number, data = chosen
        return self.policy.evaluate(magstripe.TRACKS[number].source, data)

    # -- events ---------------------------------------------------------------

    def _add_garbage(self, n):
        self._garbage += n
        if self._garbage >= self._max:
            self._end_garbage()

    def _end_garbage(self):
        if self._garbage:
            self._out.append(Reject(GARBAGE, self._garbage))
            self._garbage = 0

    def _emit(self, event):
        self._end_garbage()          # keep events in input order
        self._out.append(event)
