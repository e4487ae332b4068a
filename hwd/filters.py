"""What happens to a card number once a frame is parsed: policy, dedup, masking.

`CardNumberPolicy` decides which numbers are the program's cards. A store's
readers see bank cards swiped by mistake, gift cards, product barcodes; only
numbers in the configured ranges go on, and anything else is dropped as
`NOT_A_CARD` without the number, so payment data never leaves the parser.

Config table (e.g. ``[policy]`` in the store's TOML)::

    ranges = [
      { prefix = "7789", length = 16, luhn = true },            # stripe cards
      { prefix = "2", length = 13, sources = ["barcode"] },      # EAN-13 cards
      { prefix = "50", length = [12, 19] },                      # a range of lengths
    ]
    extract = { track1 = "pan", track2 = "pan", barcode = "whole" }

Extraction rules: track 2 ``"pan"`` is the data before the first ``=`` (the
whole track when there is none), ``"whole"`` the whole track; track 1
``"pan"`` is the data after the format code ``B`` up to the first ``^``;
barcode ``"whole"`` is the whole scan, less any AIM identifier. A card
number must be 1 to 32 digits.

A number matching a range's prefix, length and sources but failing its Luhn
check is `BAD_CHECK_DIGIT` (most likely a misread of one of our cards), one
matching no range `NOT_A_CARD`.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from .events import (BAD_CHECK_DIGIT, BARCODE, NOT_A_CARD, SOURCES, TRACK1, TRACK2,
                     CardRead, mask)
from .framing import ConfigError, TableReader, boolean, one_of, str_list

__all__ = ["CardNumberPolicy", "Deduplicator", "NumberRange", "luhn_ok", "mask"]

MAX_DIGITS = 32
EXTRACT_RULES = {TRACK1: ("pan",), TRACK2: ("pan", "whole"), BARCODE: ("whole",)}
DEFAULT_EXTRACT = {TRACK1: "pan", TRACK2: "pan", BARCODE: "whole"}


def luhn_ok(number):
    """The Luhn (mod 10) check over a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 0x30
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_digits(data):
    return 0 < len(data) <= MAX_DIGITS and all(0x30 <= b <= 0x39 for b in data)


@dataclass(frozen=True)
class NumberRange:
    """Card numbers starting with `prefix`, of `min_length` to `max_length` digits."""

    prefix: str
    min_length: int
    max_length: int
    luhn: bool = False
    sources: frozenset = frozenset(SOURCES)

    def matches(self, number, source):
        """Prefix, length and source fit (the Luhn check is separate)."""
        return (source in self.sources and number.startswith(self.prefix)
                and self.min_length <= len(number) <= self.max_length)

    @classmethod
    def from_mapping(cls, mapping, where):
        r = TableReader(where, mapping, {"prefix", "length", "luhn", "sources"})
        for key in ("prefix", "length"):
            if key not in r.mapping and isinstance(mapping, Mapping):
                r.problem(key, "required")
        prefix = r.get("prefix", _prefix, "")
        length = r.get("length", _length, (1, MAX_DIGITS))
        r.get("luhn", boolean, False)
        r.get("sources", str_list(SOURCES), None)
        r.values.pop("length", None)
        if not r.problems and len(prefix) > length[1]:
            r.problem("prefix", "longer than the longest number the range allows")
        return r.done(lambda **v: cls(min_length=length[0], max_length=length[1], **v))


def _prefix(value):
    if not isinstance(value, str) or not value.isascii() or not (value == "" or value.isdigit()):
        raise ValueError(f"expected a string of digits, got {value!r}")
    return value


def _length(value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 1 <= value[0] <= value[1] <= MAX_DIGITS):
        raise ValueError(f"expected a length or [shortest, longest], within 1 to {MAX_DIGITS}")
    return tuple(value)


@dataclass(frozen=True)
class CardNumberPolicy:
    """Which card numbers are the program's, and where on a card to find them.

    No ranges admits any number of digits: for tests and the simulator. A
    policy read from config must name at least one range."""

    ranges: tuple = ()
    extract: Mapping = None        # source -> rule; None: DEFAULT_EXTRACT

    def __post_init__(self):
        rules = dict(DEFAULT_EXTRACT, **(self.extract or {}))
        for source, rule in rules.items():
            if rule not in EXTRACT_RULES.get(source, ()):
                raise ConfigError([(f"extract.{source}", f"unknown rule {rule!r}")])
        object.__setattr__(self, "extract", rules)
        object.__setattr__(self, "ranges", tuple(self.ranges))

    @classmethod
    def from_mapping(cls, mapping, where="policy"):
        r = TableReader(where, mapping, {"ranges", "extract"})
        raw = r.mapping.get("ranges")
        if not isinstance(raw, (list, tuple)) or not raw:
            r.problem("ranges", "expected a non-empty array of ranges: "
                                "which card numbers are the program's")
            raw = []
        ranges = []
        for i, item in enumerate(raw):
            try:
                ranges.append(NumberRange.from_mapping(item, f"{where}.ranges[{i}]"))
            except ConfigError as e:
                r.problems += e.problems
        r.values["ranges"] = tuple(ranges)
        extract = r.mapping.get("extract", {})
        er = TableReader(f"{where}.extract", extract, set(EXTRACT_RULES))
        for source, rules in EXTRACT_RULES.items():
            er.get(source, one_of(rules), None)
        r.problems += er.problems
        r.values["extract"] = er.values
        return r.done(cls)

    def card_number(self, source, data):
        """The card number the extraction rule finds in `data` (bytes), or None."""
        rule = self.extract[source]
        if source == TRACK1:                  # "pan": B<PAN>^...
            if data[:1] != b"B" or b"^" not in data:
                return None
            data = data[1:data.index(b"^")]
        elif source == TRACK2 and rule == "pan":
            data = data.split(b"=", 1)[0]
        return data.decode("ascii") if _is_digits(data) else None

    def check(self, number, source):
        """None when `number` is one of the program's cards, else the reject reason."""
        if not self.ranges:
            return None
        fitting = [r for r in self.ranges if r.matches(number, source)]
        if not fitting:
            return NOT_A_CARD
        if any(not r.luhn or luhn_ok(number) for r in fitting):
            return None
        return BAD_CHECK_DIGIT

    def evaluate(self, source, data, symbology=None):
        """A `CardRead` for the program's card in `data`, else a reject reason."""
        number = self.card_number(source, data)
        if number is None:
            return NOT_A_CARD
        reason = self.check(number, source)
        return reason or CardRead(number, source, symbology)


class Deduplicator:
    """One read per double swipe: the same card on the same lane within the window.

    The window runs from the last *accepted* read, not the last seen one: a
    cashier who swipes again and again (the first swipe seemed to fail)
    gets a new read once the window has passed since the one that counted,
    instead of extending the suppression forever. A read exactly
    `window_us` after is accepted. Each lane remembers only its last
    accepted card, so memory is bounded by the number of lanes: A, B, A on
    one lane is three reads (the customer changed card, then back). A clock
    that went backwards (now before the last accepted read) accepts: losing
    a read is worse than doubling one, and the core de-duplicates by read id
    anyway. Time is passed in (integer microseconds) so tests need no sleeps.
    """

    def __init__(self, window_us):
        if not isinstance(window_us, int) or isinstance(window_us, bool) or window_us < 0:
            raise ValueError("window_us must be a non-negative integer")
        self.window_us = window_us
        self._last = {}                # lane -> (card number, accepted at)

    def accept(self, lane, card_number, now_us):
        """True for a new read (remembered as the lane's last), False for a repeat."""
        last = self._last.get(lane)
        if last is not None and last[0] == card_number \
                and 0 <= now_us - last[1] < self.window_us:
            return False
        self._last[lane] = (card_number, now_us)
        return True
