"""Barcode scans as scanners in serial mode send them.

A scan is [prefix] [AIM identifier] data suffix. The AIM symbology
identifier (ISO/IEC 15424) is three characters, `]`, a code letter and a
modifier: `]E0` EAN-13 (and UPC-A, sent as 13 digits), `]E4` EAN-8, `]C0`
Code 128, `]C1` GS1-128, `]A0` Code 39, `]Q1` QR... It is what tells a
printed loyalty card (an EAN-13 starting with 2, say) from a product the
cashier scanned by mistake, so when the scanner sends it we strip it and
record the symbology on the read.

EAN/UPC check digits (GTIN mod 10) are checked when the identifier says
EAN, or always when the framing asks for it: a scanner in serial mode can
be set to skip that check, and a misread that slips through would credit
points to a stranger's card.
"""

from .events import BAD_CHECK_DIGIT, BAD_SYMBOLOGY

GS = 0x1D      # GS1 codes send FNC1 as GS inside the data

# AIM code letter -> symbology name; (letter, modifier) pairs that differ first.
_AIM_SPECIAL = {"E0": "ean13", "E4": "ean8", "E1": "ean-addon", "E2": "ean-addon",
                "E3": "ean-addon", "C1": "gs1-128", "d2": "gs1-datamatrix"}
_AIM_LETTER = {"A": "code39", "C": "code128", "F": "codabar", "G": "code93",
               "I": "itf", "L": "pdf417", "Q": "qr", "d": "datamatrix",
               "e": "gs1-databar", "E": "ean-addon"}
SYMBOLOGIES = tuple(sorted(set(_AIM_SPECIAL.values()) | set(_AIM_LETTER.values())
                           | {"other"}))
# Symbologies whose check digit "auto" checks, and the lengths each may have.
EAN_LENGTHS = {"ean13": (12, 13), "ean8": (8,)}


def is_data_byte(b):
    """Printable ASCII and GS: what a barcode's data may hold."""
    return 0x20 <= b <= 0x7E or b == GS


def symbology_of(aim):
    """The symbology name of an AIM identifier's two characters (e.g. "E0")."""
    return _AIM_SPECIAL.get(aim) or _AIM_LETTER.get(aim[0], "other")


def split_aim(payload):
    """(AIM code such as "E0", data) when `payload` starts with an identifier, else (None, payload)."""
    if len(payload) >= 3 and payload[0] == 0x5D and chr(payload[1]).isalpha() \
            and chr(payload[2]).isalnum() and payload[1] < 0x80 and payload[2] < 0x80:
        return payload[1:3].decode("ascii"), payload[3:]
    return None, payload


def gtin_ok(data, lengths=(8, 12, 13)):
    """Whether `data` is all digits, of one of `lengths`, with a right GTIN check digit."""
    if len(data) not in lengths or not all(0x30 <= b <= 0x39 for b in data):
        return False
    digits = [b - 0x30 for b in data]
    # Weights 3, 1, 3, ... from the digit just left of the check digit.
    total = sum(d * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits[:-1])))
    return (10 - total % 10) % 10 == digits[-1]


def classify(payload, framing):
    """(data, symbology or None) for a scan's payload, or a reject reason."""
    aim, data = split_aim(payload) if framing.aim != "absent" else (None, payload)
    if aim is None and framing.aim == "required":
        return BAD_SYMBOLOGY
    symbology = symbology_of(aim) if aim else None
    if framing.symbologies and symbology not in framing.symbologies:
        return BAD_SYMBOLOGY
    if framing.check_digit == "ean" or (framing.check_digit == "auto"
                                        and symbology in EAN_LENGTHS):
        if not gtin_ok(data, EAN_LENGTHS.get(symbology, (8, 12, 13))):
            return BAD_CHECK_DIGIT
    return data, symbology


def with_check_digit(digits):
    """`digits` (a str of 7, 11 or 12 digits) with its GTIN check digit appended."""
    for d in range(10):
        if gtin_ok((digits + str(d)).encode(), (len(digits) + 1,)):
            return digits + str(d)
    raise ValueError("expected digits only")


def encode_frame(framing, data, aim=None):
    """The bytes a scanner set up as `framing` sends for `data` (with `aim`, e.g. "E0")."""
    return framing.prefix + (b"]" + aim.encode() if aim else b"") + bytes(data) + framing.suffix
