"""What a parser hands the daemon: a card read, or a reject with its reason.

A reject never carries the bytes it rejected, only a reason code and how
many bytes it covered: track data is the card holder's (for a bank card
swiped by mistake, payment data), so it must not reach a log, a metric or
the core. A read carries only the card number the program uses, and even
its repr masks all but the last four digits, so logging an event by
accident leaks nothing useful.
"""

from dataclasses import dataclass, field

# Where a card number came from.
TRACK1, TRACK2, BARCODE = "track1", "track2", "barcode"
SOURCES = (TRACK1, TRACK2, BARCODE)

# Why bytes were rejected. Metrics count rejects by these codes.
GARBAGE = "GARBAGE"                  # bytes that are no frame (noise, a broken frame)
HALF_SWIPE = "HALF_SWIPE"            # a frame began but the next one began first, or input stopped
TOO_LONG = "TOO_LONG"                # a frame grew past max_frame_bytes without ending
BAD_LRC = "BAD_LRC"                  # a track's LRC disagrees with its characters
UNREADABLE_TRACK = "UNREADABLE_TRACK"  # the reader sent its error marker (or a blank track) for every track
BAD_CHECK_DIGIT = "BAD_CHECK_DIGIT"  # EAN/UPC check digit, or a range's Luhn check, failed
BAD_SYMBOLOGY = "BAD_SYMBOLOGY"      # no AIM identifier where required, or a symbology not allowed
NOT_A_CARD = "NOT_A_CARD"            # no card number of the program's ranges (a bank card, say)
REASONS = (GARBAGE, HALF_SWIPE, TOO_LONG, BAD_LRC, UNREADABLE_TRACK,
           BAD_CHECK_DIGIT, BAD_SYMBOLOGY, NOT_A_CARD)


def mask(card_number):
    """The card number for logs: every character but the last four replaced by '*'.

    Numbers of four characters or fewer are masked whole, since the last
    four would be all of it."""
    n = len(card_number)
    return "*" * n if n <= 4 else "*" * (n - 4) + card_number[-4:]


@dataclass(frozen=True)
class CardRead:
    card_number: str = field(repr=False)
    source: str                      # TRACK1, TRACK2 or BARCODE
    symbology: str | None = None     # barcodes with an AIM identifier: e.g. "ean13"

    def __repr__(self):
        return (f"CardRead(card_number={mask(self.card_number)!r}, "
                f"source={self.source!r}, symbology={self.symbology!r})")


@dataclass(frozen=True)
class Reject:
    reason: str                      # one of REASONS
    nbytes: int                      # how many input bytes it covers; never the bytes


Event = CardRead | Reject


@dataclass(frozen=True)
class LaneRead:
    """An accepted read as the daemon hands it on (spool, core): a `CardRead`
    given its unique read id, the lane and reader it happened at, and when.

    `lane` is the lane's resource name (`stores/{store}/lanes/{lane}`),
    `read_time_us` the hwd's clock in integer microseconds since the epoch.
    Like `CardRead`, its repr masks the card number."""

    read_id: str
    lane: str
    reader: str
    card_number: str = field(repr=False)
    source: str
    symbology: str | None
    read_time_us: int

    def __repr__(self):
        return (f"LaneRead(read_id={self.read_id!r}, lane={self.lane!r}, "
                f"reader={self.reader!r}, card_number={mask(self.card_number)!r}, "
                f"source={self.source!r}, symbology={self.symbology!r}, "
                f"read_time_us={self.read_time_us!r})")
