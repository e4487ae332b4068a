"""Magnetic stripe tracks (ISO/IEC 7811, 7813) as serial readers send them.

On the card, track 1 holds 7-bit characters (6 data bits and a parity bit),
track 2 5-bit ones (4 data bits and parity). A reader in ASCII mode turns
each character's data bits into ASCII by adding a base: 0x20 on track 1
(`%` start sentinel, `^` field separator, `?` end sentinel), 0x30 on track 2
(`;` start sentinel, `=` separator, `?` end sentinel). Track 1 of a payment
card reads `%B<PAN>^<NAME>^<YYMM><service code><discretionary>?`, track 2
`;<PAN>=<YYMM><service code><discretionary>?`.

The LRC. ISO 7811 ends each track with a longitudinal redundancy check
character: each data bit of the LRC is the XOR of that bit over every
character from the start sentinel to the end sentinel, both included; the
LRC's own parity bit is then computed over the LRC alone (so it is not the
XOR of the parity bits). Readers that pass the LRC on (IDTech's "send LRC",
MagTek's LRC flag) send "the unmodified LRC from the track data", that is,
the LRC's data bits shown in the track's own character set. So the
convention implemented here is:

    track 2: chr(0x30 + XOR of (c - 0x30) & 0x0F over ; ... ?)
    track 1: chr(0x20 + XOR of (c - 0x20) & 0x3F over % ... ?)

The parity bits do not exist in ASCII, so they are neither checked nor
needed. Equivalently, for track 2 the low nibble of the XOR of the ASCII
bytes. An unreadable track (`%E?`) carries no LRC: there was nothing to
check. Readers that compute a block check over their whole message instead
(a BCC over STX...ETX) are not covered; such a reader is set to send no LRC.

Sentinels (`%`, `;`, `?`) never appear inside track data; the parser relies
on that to find tracks and to notice a half swipe.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from .events import TRACK1, TRACK2, UNREADABLE_TRACK

END_SENTINEL = 0x3F
SENTINEL_BYTES = frozenset(b"%;?")


@dataclass(frozen=True)
class Track:
    number: int
    source: str            # events.TRACK1 / TRACK2
    start: int             # start sentinel byte
    base: int              # ASCII code of the character whose data bits are 0
    bits: int              # data bits per character

    @property
    def top(self):
        """Largest data value: characters are base .. base + top."""
        return (1 << self.bits) - 1

    def is_data(self, b):
        """Whether byte `b` may appear between the sentinels."""
        return self.base <= b <= self.base + self.top and b not in SENTINEL_BYTES

    def is_lrc(self, b):
        """Whether byte `b` can be an LRC character (any character of the set)."""
        return self.base <= b <= self.base + self.top

    def value(self, b):
        return (b - self.base) & self.top

    def lrc(self, data):
        """The LRC byte for the track whose characters between the sentinels are `data`."""
        acc = self.value(self.start) ^ self.value(END_SENTINEL)
        for b in data:
            acc ^= self.value(b)
        return self.base + acc


TRACKS = {1: Track(1, TRACK1, 0x25, 0x20, 6), 2: Track(2, TRACK2, 0x3B, 0x30, 4)}


def choose_track(contents, prefer):
    """Which track gives the card number: (track number, data) or a reject reason.

    `contents` maps each track read to its data between the sentinels, or to
    None when the reader marked it unreadable. The first readable track in
    `prefer` wins; an empty track (`;?`, a blank stripe) counts as unreadable.
    """
    for number in prefer:
        data = contents.get(number)
        if data:
            return number, data
    return UNREADABLE_TRACK


def encode_frame(framing, tracks, lrc=None):
    """The bytes a reader set up as `framing` sends for one swipe.

    `tracks` maps each track of `framing.tracks` to its data between the
    sentinels, or None for an unreadable track (sent as its error marker).
    `lrc` says whether to send LRCs (default: unless the framing has none).
    For the simulator and the tests; the daemon only ever parses.
    """
    if not isinstance(tracks, Mapping) or set(tracks) != set(framing.tracks):
        raise ValueError(f"give data (or None) for exactly tracks {framing.tracks}")
    send_lrc = framing.lrc != "absent" if lrc is None else lrc
    parts = []
    for number in framing.tracks:
        track, data = TRACKS[number], tracks[number]
        if data is None:
            parts.append(bytes([track.start]) + framing.error_marker + b"?")
        else:
            data = bytes(data)
            if not all(track.is_data(b) for b in data):
                raise ValueError(f"track {number} data has characters outside its set")
            parts.append(bytes([track.start]) + data + b"?"
                         + (bytes([track.lrc(data)]) if send_lrc else b""))
    return b"".join([b"\x02" if framing.stx_etx else b"", framing.preamble,
                     framing.track_separator.join(parts), framing.terminator,
                     framing.postamble, b"\x03" if framing.stx_etx else b""])
