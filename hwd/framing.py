"""Reader framings as data: what bytes a reader sends around each card.

Every serial card reader can be set up a dozen ways (sentinels sent or not,
an LRC after each track, a preamble, CR or CRLF at the end...). Rather than
code per model, a reader's framing is a frozen dataclass built from the
reader's table in the store's TOML config, checked strictly so a typo is
caught when hwd starts, not as a stream of rejected swipes at a till. Every
problem found is reported under its full key path, all of them at once.

Byte values (preamble, terminator, prefix, ...) are written either

- as one name for the whole value: ``"none"`` (no bytes), ``"CR"``, ``"LF"``,
  ``"CRLF"``, ``"STX"``, ``"ETX"``, ``"ESC"``, ``"TAB"``;
- as text where ``<NAME>`` stands for an ASCII control character (``<CR>``,
  ``<STX>``, ``<ESC>``, ``<GS>``, ...) or ``<0xHH>`` for any byte, the way
  reader manuals write them: ``"<CR><LF>"``, ``"<ESC>"``, ``"S1<TAB>"``. A
  ``<`` that does not start such a token is an error (write ``<0x3C>``);
- or as an array of byte values: ``[2, 27]``.

Magstripe keys (``kind = "magstripe"``): ``tracks`` (the tracks the reader
sends, in order: ``[1, 2]``), ``prefer`` (which readable track gives the
card number, first wins; default track 2 then 1), ``stx_etx`` (frame wrapped
in STX ... ETX), ``lrc`` (``"absent"``, ``"optional"``, ``"required"``: an LRC
character after each end sentinel), ``preamble``, ``track_separator``,
``terminator`` (default CR), ``postamble``, ``error_marker`` (what replaces an
unreadable track's data, default ``"E"``, as in ``%E?``), ``bare_error_marker``
(the marker may also stand alone, without sentinels), ``max_frame_bytes``.
A frame is: [STX] preamble track (separator track)* terminator postamble [ETX].
With ``lrc = "optional"`` the byte after an end sentinel is the LRC when it
equals the LRC worked out from the track, or when it cannot be what comes
next (separator, next track, terminator, a new frame); otherwise it is what
comes next. Prefer ``"required"`` or ``"absent"`` once the reader's setting
is known: with nothing between tracks, a reader sending no LRC loses the rare
frame whose LRC would equal the next track's start sentinel.

Barcode keys (``kind = "barcode"``): ``prefix``, ``suffix`` (default CR; a
barcode frame needs one to end), ``aim`` (``"absent"``, ``"optional"``,
``"required"``: an AIM symbology identifier such as ``]E0`` before the data),
``symbologies`` (allowed ones by name, see `barcode.SYMBOLOGIES`; needs
``aim = "required"``), ``check_digit`` (``"auto"``: check EAN/UPC check digits
when the AIM identifier says EAN; ``"ean"``: always, every code must be an
EAN-8/UPC-A/EAN-13; ``"none"``), ``max_frame_bytes``.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from . import barcode, magstripe

STX, ETX = 0x02, 0x03

CONTROL_NAMES = {
    "NUL": 0, "SOH": 1, "STX": 2, "ETX": 3, "EOT": 4, "ENQ": 5, "ACK": 6,
    "BEL": 7, "BS": 8, "TAB": 9, "HT": 9, "LF": 10, "VT": 11, "FF": 12,
    "CR": 13, "SO": 14, "SI": 15, "DLE": 16, "DC1": 17, "DC2": 18, "DC3": 19,
    "DC4": 20, "NAK": 21, "SYN": 22, "ETB": 23, "CAN": 24, "EM": 25,
    "SUB": 26, "ESC": 27, "FS": 28, "GS": 29, "RS": 30, "US": 31, "SP": 32,
    "DEL": 127,
}
WHOLE_NAMES = {"none": b"", "CR": b"\r", "LF": b"\n", "CRLF": b"\r\n",
               "STX": b"\x02", "ETX": b"\x03", "ESC": b"\x1b", "TAB": b"\t"}
_TOKEN = re.compile(r"<(0x[0-9A-Fa-f]{2}|[A-Z0-9]{2,3})>")

LRC_MODES = ("absent", "optional", "required")
AIM_MODES = ("absent", "optional", "required")
CHECK_DIGIT_MODES = ("auto", "ean", "none")
MAX_LITERAL = 16          # longest preamble, terminator, prefix... accepted
MAX_MARKER = 8
FRAME_BYTES_RANGE = (32, 65_536)
SENTINELS = frozenset(b"%;?")


class ConfigError(ValueError):
    """Every problem found in a framing or policy table, each under its key path."""

    def __init__(self, problems):
        self.problems = list(problems)      # [(key path, message)]
        super().__init__("\n".join(f"{k}: {m}" for k, m in self.problems))


def _finish_checks(problems, max_frame_bytes):
    """The checks every framing shares, then every problem found, at once."""
    lo, hi = FRAME_BYTES_RANGE
    if not lo <= max_frame_bytes <= hi:
        problems.append(("max_frame_bytes", f"must be between {lo} and {hi}"))
    if problems:
        raise ConfigError(problems)


def parse_bytes(value):
    """Turn a byte value written in the config (see the module doc) into bytes.

    Raises ValueError with a message that does not repeat the key: callers
    put it under the key's path."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                   for v in value):
            raise ValueError("an array of byte values must hold integers 0 to 255")
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string or an array of bytes, got {_kind(value)}")
    if value in WHOLE_NAMES:
        return WHOLE_NAMES[value]
    out, i = bytearray(), 0
    while i < len(value):
        ch = value[i]
        if ch == "<":
            m = _TOKEN.match(value, i)
            name = m and m.group(1)
            if m is None or not (name.startswith("0x") or name in CONTROL_NAMES):
                raise ValueError(f"'<' at position {i} does not start a control "
                                 "name such as <CR> or <0x1B>; write a literal '<' as <0x3C>")
            out.append(int(name, 16) if name.startswith("0x") else CONTROL_NAMES[name])
            i = m.end()
            continue
        if ord(ch) > 0x7F:
            raise ValueError(f"non-ASCII character {ch!r}: write bytes above 0x7F as <0xHH>")
        out.append(ord(ch))
        i += 1
    return bytes(out)


def _kind(value):
    for types, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                        (str, "a string"), (Mapping, "a table"),
                        ((list, tuple), "an array")):
        if isinstance(value, types):
            return name
    return type(value).__name__


class TableReader:
    """Reads one table: each key's failure recorded under its path, unknown keys
    reported, nothing built unless nothing was wrong (see `done`)."""

    def __init__(self, where, mapping, keys):
        self.where, self.problems, self.values = where, [], {}
        if not isinstance(mapping, Mapping):
            self.problems.append((where, f"expected a table, got {_kind(mapping)}"))
            mapping = {}
        self.mapping = mapping
        for key in mapping:
            if key not in keys:
                self.problem(key, "unknown key; expected one of " + ", ".join(sorted(keys)))

    def problem(self, key, message):
        self.problems.append((f"{self.where}.{key}", message))

    def get(self, key, convert, default):
        """The converted value, the default when absent; records a failure."""
        if key not in self.mapping:
            return default
        try:
            value = convert(self.mapping[key])
        except ValueError as e:
            self.problem(key, str(e))
            return default
        self.values[key] = value
        return value

    def done(self, build):
        """Build the object; its own checks name keys relative to this table."""
        if not self.problems:
            try:
                return build(**self.values)
            except ConfigError as e:
                self.problems += [(f"{self.where}.{k}", m) for k, m in e.problems]
        raise ConfigError(self.problems)


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def integer(lo, hi):
    def convert(value):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value
    return convert


def one_of(choices):
    def convert(value):
        if value not in choices or not isinstance(value, str):
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    return convert


def int_list(allowed):
    def convert(value):
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("expected a non-empty array")
        for v in value:
            if v not in allowed or isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected values among {sorted(allowed)}, got {v!r}")
        if len(set(value)) != len(value):
            raise ValueError("values must not repeat")
        return tuple(value)
    return convert


def str_list(allowed):
    def convert(value):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected an array, got {_kind(value)}")
        for v in value:
            if v not in allowed:
                raise ValueError(f"unknown {v!r}; expected among {', '.join(sorted(allowed))}")
        if len(set(value)) != len(value):
            raise ValueError("values must not repeat")
        return frozenset(value)
    return convert


def _literal(value):
    data = parse_bytes(value)
    if len(data) > MAX_LITERAL:
        raise ValueError(f"at most {MAX_LITERAL} bytes, got {len(data)}")
    return data


def _check_kind(reader, kind):
    if reader.mapping.get("kind", kind) != kind:
        reader.problem("kind", f"expected {kind!r}, got {reader.mapping['kind']!r}")


@dataclass(frozen=True)
class MagstripeFraming:
    """How a magnetic stripe reader frames a swipe (keys: see the module doc)."""

    kind: ClassVar[str] = "magstripe"
    tracks: tuple = (1, 2)
    prefer: tuple = None           # None: track 2 then track 1, those in `tracks`
    stx_etx: bool = False
    lrc: str = "absent"
    preamble: bytes = b""
    track_separator: bytes = b""
    terminator: bytes = b"\r"
    postamble: bytes = b""
    error_marker: bytes = b"E"
    bare_error_marker: bool = False
    max_frame_bytes: int = 512

    def __post_init__(self):
        object.__setattr__(self, "tracks", tuple(self.tracks))
        object.__setattr__(self, "prefer", tuple(t for t in (2, 1) if t in self.tracks)
                           if self.prefer is None else tuple(self.prefer))
        problems = []
        if not self.tracks or any(t not in magstripe.TRACKS for t in self.tracks) \
                or len(set(self.tracks)) != len(self.tracks):
            problems.append(("tracks", "expected distinct tracks among 1 and 2"))
        if not self.prefer or any(t not in self.tracks for t in self.prefer) \
                or len(set(self.prefer)) != len(self.prefer):
            problems.append(("prefer", "expected distinct tracks, each listed in `tracks`"))
        if self.lrc not in LRC_MODES:
            problems.append(("lrc", f"expected one of {LRC_MODES}"))
        for key in ("preamble", "track_separator", "terminator", "postamble"):
            if SENTINELS & set(getattr(self, key)):
                problems.append((key, "must not contain the track sentinels % ; ? "
                                      "(they are how the parser finds tracks)"))
        marker = self.error_marker
        if not 1 <= len(marker) <= MAX_MARKER or SENTINELS & set(marker) \
                or any(not 0x20 < b < 0x7F for b in marker):
            problems.append(("error_marker", f"expected 1 to {MAX_MARKER} printable "
                                             "characters, no sentinels"))
        if self.lrc == "optional" and not (self.stx_etx or self.terminator or self.postamble):
            problems.append(("lrc", "'optional' needs a terminator, a postamble or "
                                    "stx_etx: otherwise a byte after the last end "
                                    "sentinel could be an LRC or the next swipe"))
        _finish_checks(problems, self.max_frame_bytes)

    @classmethod
    def from_mapping(cls, mapping, where="framing"):
        keys = {"kind", "tracks", "prefer", "stx_etx", "lrc", "preamble",
                "track_separator", "terminator", "postamble", "error_marker",
                "bare_error_marker", "max_frame_bytes"}
        r = TableReader(where, mapping, keys)
        _check_kind(r, cls.kind)
        r.get("tracks", int_list(magstripe.TRACKS), None)
        r.get("prefer", int_list(magstripe.TRACKS), None)
        r.get("stx_etx", boolean, None)
        r.get("lrc", one_of(LRC_MODES), None)
        for key in ("preamble", "track_separator", "terminator", "postamble"):
            r.get(key, _literal, None)
        r.get("error_marker", parse_bytes, None)
        r.get("bare_error_marker", boolean, None)
        r.get("max_frame_bytes", integer(*FRAME_BYTES_RANGE), None)
        return r.done(cls)


@dataclass(frozen=True)
class BarcodeFraming:
    """How a barcode scanner in serial mode frames a scan (keys: see the module doc)."""

    kind: ClassVar[str] = "barcode"
    prefix: bytes = b""
    suffix: bytes = b"\r"
    aim: str = "optional"
    symbologies: frozenset = frozenset()   # empty: any
    check_digit: str = "auto"
    max_frame_bytes: int = 256

    def __post_init__(self):
        problems = []
        object.__setattr__(self, "symbologies", frozenset(self.symbologies))
        if not self.suffix:
            problems.append(("suffix", "a barcode frame needs a suffix (e.g. CR) to end it"))
        if self.aim not in AIM_MODES:
            problems.append(("aim", f"expected one of {AIM_MODES}"))
        unknown = set(self.symbologies) - set(barcode.SYMBOLOGIES)
        if unknown:
            problems.append(("symbologies", f"unknown {sorted(unknown)}"))
        elif self.symbologies and self.aim != "required":
            problems.append(("symbologies", "allowed symbologies can only be checked "
                                            "with aim = \"required\""))
        if self.check_digit not in CHECK_DIGIT_MODES:
            problems.append(("check_digit", f"expected one of {CHECK_DIGIT_MODES}"))
        _finish_checks(problems, self.max_frame_bytes)

    @classmethod
    def from_mapping(cls, mapping, where="framing"):
        keys = {"kind", "prefix", "suffix", "aim", "symbologies", "check_digit",
                "max_frame_bytes"}
        r = TableReader(where, mapping, keys)
        _check_kind(r, cls.kind)
        r.get("prefix", _literal, None)
        r.get("suffix", _literal, None)
        r.get("aim", one_of(AIM_MODES), None)
        r.get("symbologies", str_list(set(barcode.SYMBOLOGIES)), None)
        r.get("check_digit", one_of(CHECK_DIGIT_MODES), None)
        r.get("max_frame_bytes", integer(*FRAME_BYTES_RANGE), None)
        return r.done(cls)


FRAMINGS = {"magstripe": MagstripeFraming, "barcode": BarcodeFraming}


def framing_from_mapping(mapping, where="framing"):
    """The framing a reader's config table describes, by its `kind`."""
    kind = mapping.get("kind") if isinstance(mapping, Mapping) else None
    if kind not in FRAMINGS:
        raise ConfigError([(f"{where}.kind",
                            f"expected \"magstripe\" or \"barcode\", got {kind!r}")])
    return FRAMINGS[kind].from_mapping(mapping, where)
