"""The hwd's pure parts: framings from config, the frame parser, the card filters.

Frames in the hand-written tests are byte literals, so a bug shared by the
parser and `encode_frame` cannot hide; the property tests use
`encode_frame` to cover many framings. Property tests run derandomized:
the same examples every run.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kopilka.hwd import barcode, magstripe
from kopilka.hwd.events import (BAD_CHECK_DIGIT, BAD_LRC, BAD_SYMBOLOGY, BARCODE, GARBAGE,
                                HALF_SWIPE, NOT_A_CARD, TOO_LONG, TRACK1, TRACK2,
                                UNREADABLE_TRACK, CardRead, Reject, mask)
from kopilka.hwd.filters import CardNumberPolicy, Deduplicator, luhn_ok
from kopilka.hwd.framing import (BarcodeFraming, ConfigError, MagstripeFraming,
                                 framing_from_mapping, parse_bytes)
from kopilka.hwd.parser import Parser

CARD = "7789000012345676"             # the program's range, Luhn-valid
T2 = b";7789000012345676=2912101?"
# XOR of the data nibbles over ; ... ? worked out by hand: 0x6 -> '6'.
T2_LRC = b"6"
T1 = b"%B7789000012345676^IVANOVA/ANNA^2912101?"
T1_LRC = b" "                         # 6-bit XOR is 0 (convention checked by hand below)
BANK = "4111111111111111"             # a test Visa number: Luhn-valid, not ours
POLICY = CardNumberPolicy.from_mapping({
    "ranges": [{"prefix": "7789", "length": 16, "luhn": True},
               {"prefix": "2", "length": 13, "sources": ["barcode"]}]})

TRACK2_CR = MagstripeFraming(tracks=(2,))
BOTH_CR = MagstripeFraming(tracks=(1, 2))


def parse(framing, data, policy=POLICY, chunks=None):
    """All events for `data` fed whole (or in pieces of `chunks` bytes), then flushed."""
    p = Parser(framing, policy)
    events = []
    step = chunks or max(len(data), 1)
    for i in range(0, len(data), step):
        events += p.feed(data[i:i + step])
    return events + p.flush()


def reads(events):
    return [e for e in events if isinstance(e, CardRead)]


def reasons(events):
    return [e.reason for e in events if isinstance(e, Reject)]


# -- framing config -----------------------------------------------------------

def test_byte_notation():
    assert parse_bytes("CRLF") == b"\r\n"
    assert parse_bytes("none") == b""
    assert parse_bytes("<CR><LF>") == b"\r\n"
    assert parse_bytes("<ESC>S1<TAB>") == b"\x1bS1\t"
    assert parse_bytes("<0x3C>x") == b"<x"
    assert parse_bytes([2, 27]) == b"\x02\x1b"
    for bad in ("<FOO>", "a<b", [256], [True], 13, "é"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_magstripe_framing_from_mapping():
    f = framing_from_mapping({"kind": "magstripe", "tracks": [1, 2], "stx_etx": True,
                              "lrc": "required", "preamble": "<ESC>",
                              "terminator": "CRLF", "track_separator": "<CR>"})
    assert f == MagstripeFraming(tracks=(1, 2), prefer=(2, 1), stx_etx=True, lrc="required",
                                 preamble=b"\x1b", terminator=b"\r\n", track_separator=b"\r")
    assert framing_from_mapping({"kind": "magstripe", "tracks": [1]}).prefer == (1,)
    assert framing_from_mapping({"kind": "magstripe"}).terminator == b"\r"


def test_barcode_framing_from_mapping():
    f = framing_from_mapping({"kind": "barcode", "prefix": "STX", "suffix": "CRLF",
                              "aim": "required", "symbologies": ["ean13", "ean8"]})
    assert f == BarcodeFraming(prefix=b"\x02", suffix=b"\r\n", aim="required",
                               symbologies=frozenset({"ean13", "ean8"}))


@pytest.mark.parametrize("mapping, key", [
    ({"kind": "magstripe", "lrc": "sometimes"}, "framing.lrc"),
    ({"kind": "magstripe", "tracks": [3]}, "framing.tracks"),
    ({"kind": "magstripe", "tracks": [2], "prefer": [1]}, "framing.prefer"),
    ({"kind": "magstripe", "stx_etx": 1}, "framing.stx_etx"),
    ({"kind": "magstripe", "terminatr": "CR"}, "framing.terminatr"),
    ({"kind": "magstripe", "track_separator": ";"}, "framing.track_separator"),
    ({"kind": "magstripe", "lrc": "optional", "terminator": "none"}, "framing.lrc"),
    ({"kind": "magstripe", "max_frame_bytes": 10}, "framing.max_frame_bytes"),
    ({"kind": "magstripe", "error_marker": "?"}, "framing.error_marker"),
    ({"kind": "barcode", "suffix": "none"}, "framing.suffix"),
    ({"kind": "barcode", "symbologies": ["ean13"]}, "framing.symbologies"),
    ({"kind": "barcode", "symbologies": ["ean99"], "aim": "required"}, "framing.symbologies"),
    ({"kind": "barcode", "check_digit": "luhn"}, "framing.check_digit"),
    ({"kind": "barcode", "prefix": "<BOGUS>"}, "framing.prefix"),
    ({"kind": "tape"}, "framing.kind"),
])
def test_framing_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as e:
        framing_from_mapping(mapping)
    assert key in [k for k, _ in e.value.problems]
    assert str(e.value).startswith(key)


def test_every_framing_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        framing_from_mapping({"kind": "magstripe", "lrc": "x", "stx_etx": "yes", "oops": 1},
                             where="readers[3].framing")
    keys = {k for k, _ in e.value.problems}
    assert keys == {"readers[3].framing.lrc", "readers[3].framing.stx_etx",
                    "readers[3].framing.oops"}


# -- magstripe ------------------------------------------------------------------

def test_lrc_convention():
    # Track 2, 4 data bits: ; 1 2 3 4 ? -> B^1^2^3^4^F = 0 -> '0'.
    assert magstripe.TRACKS[2].lrc(b"1234") == ord("0")
    # Track 1, 6 data bits: % B 1 ^ A ? -> 05^22^11^3E^21^1F = 36 -> 0x20 + 0x36 = 'V'.
    assert magstripe.TRACKS[1].lrc(b"B1^A") == ord("V")
    assert magstripe.TRACKS[2].lrc(T2[1:-1]) == T2_LRC[0]
    assert magstripe.TRACKS[1].lrc(T1[1:-1]) == T1_LRC[0]


@pytest.mark.parametrize("stx_etx", [False, True])
def test_track2(stx_etx):
    frame = T2 + b"\r"
    if stx_etx:
        frame = b"\x02" + frame + b"\x03"
    events = parse(MagstripeFraming(tracks=(2,), stx_etx=stx_etx), frame)
    assert events == [CardRead(CARD, TRACK2)]


@pytest.mark.parametrize("stx_etx", [False, True])
def test_track1(stx_etx):
    frame = T1 + b"\r"
    if stx_etx:
        frame = b"\x02" + frame + b"\x03"
    events = parse(MagstripeFraming(tracks=(1,), stx_etx=stx_etx), frame)
    assert events == [CardRead(CARD, TRACK1)]


def test_both_tracks_prefer():
    assert parse(BOTH_CR, T1 + T2 + b"\r") == [CardRead(CARD, TRACK2)]
    prefer1 = MagstripeFraming(tracks=(1, 2), prefer=(1, 2))
    assert parse(prefer1, T1 + T2 + b"\r") == [CardRead(CARD, TRACK1)]
    sep = MagstripeFraming(tracks=(1, 2), track_separator=b"\r", terminator=b"\r\n")
    assert parse(sep, T1 + b"\r" + T2 + b"\r\n") == [CardRead(CARD, TRACK2)]


def test_stx_etx_expected_but_missing():
    # A reader sending no envelope to a framing that wants one: no read.
    assert reads(parse(MagstripeFraming(tracks=(2,), stx_etx=True), T2 + b"\r")) == []


@pytest.mark.parametrize("lrc", ["required", "optional"])
def test_lrc_right_and_wrong(lrc):
    f = MagstripeFraming(tracks=(1, 2), lrc=lrc, stx_etx=True)
    good = b"\x02" + T1 + T1_LRC + T2 + T2_LRC + b"\r\x03"
    assert parse(f, good) == [CardRead(CARD, TRACK2)]
    bad2 = b"\x02" + T1 + T1_LRC + T2 + b"7" + b"\r\x03"
    assert parse(f, bad2) == [Reject(BAD_LRC, len(bad2))]
    bad1 = b"\x02" + T1 + b"!" + T2 + T2_LRC + b"\r\x03"
    assert parse(f, bad1) == [Reject(BAD_LRC, len(bad1))]


def test_lrc_optional_accepts_frames_without():
    f = MagstripeFraming(tracks=(1, 2), lrc="optional")
    assert parse(f, T1 + T2 + b"\r") == [CardRead(CARD, TRACK2)]
    assert parse(f, T1 + T1_LRC + T2 + b"\r") == [CardRead(CARD, TRACK2)]


def test_lrc_required_but_missing_is_no_read():
    events = parse(MagstripeFraming(tracks=(2,), lrc="required"), T2 + b"\r")
    assert reads(events) == [] and reasons(events) == [GARBAGE]


def test_lrc_required_without_terminator_ends_at_lrc():
    f = MagstripeFraming(tracks=(2,), lrc="required", terminator=b"")
    p = Parser(f, POLICY)
    assert p.feed(T2) == []
    assert p.feed(T2_LRC) == [CardRead(CARD, TRACK2)]


def test_preamble_postamble_crlf():
    f = MagstripeFraming(tracks=(2,), preamble=b"\x1bR", terminator=b"\r\n", postamble=b"#")
    assert parse(f, b"\x1bR" + T2 + b"\r\n#") == [CardRead(CARD, TRACK2)]
    # CR alone where CRLF is expected: the frame does not count.
    assert reads(parse(f, b"\x1bR" + T2 + b"\r#")) == []


def test_preamble_overlapping_itself():
    # "AAB": after "AA" + "A" the match must restart one byte on, not lose the frame.
    f = MagstripeFraming(tracks=(2,), preamble=b"AAB")
    assert reads(parse(f, b"A" + b"AAB" + T2 + b"\r")) == [CardRead(CARD, TRACK2)]


def test_terminator_none():
    f = MagstripeFraming(tracks=(2,), terminator=b"")
    assert parse(f, T2) == [CardRead(CARD, TRACK2)]
    assert parse(f, T2 + T2) == [CardRead(CARD, TRACK2)] * 2


@pytest.mark.parametrize("framing, frame", [
    (TRACK2_CR, T2 + b"\r"),
    (BOTH_CR, T1 + T2 + b"\r"),
    (MagstripeFraming(tracks=(1, 2), lrc="required", stx_etx=True, terminator=b"\r\n"),
     b"\x02" + T1 + T1_LRC + T2 + T2_LRC + b"\r\n\x03"),
])
def test_split_byte_by_byte_and_merged(framing, frame):
    assert parse(framing, frame, chunks=1) == [CardRead(CARD, TRACK2)]
    assert parse(framing, frame * 5) == [CardRead(CARD, TRACK2)] * 5
    assert parse(framing, frame * 5, chunks=7) == [CardRead(CARD, TRACK2)] * 5


def test_noise_between_frames():
    data = b"\x00\xffxx" + T2 + b"\r" + b"noise=^\n" + T2 + b"\r" + b"\x7f"
    events = parse(TRACK2_CR, data)
    assert events == [Reject(GARBAGE, 4), CardRead(CARD, TRACK2), Reject(GARBAGE, 8),
                      CardRead(CARD, TRACK2), Reject(GARBAGE, 1)]
    assert parse(TRACK2_CR, data, chunks=1) == events


def test_half_swipe_then_good_swipe():
    half = b";77890000"
    assert parse(TRACK2_CR, half + T2 + b"\r") == [Reject(HALF_SWIPE, len(half)),
                                                   CardRead(CARD, TRACK2)]
    # Track 1 read, track 2 cut short, then a whole swipe.
    half = T1 + b";7789"
    assert parse(BOTH_CR, half + T1 + T2 + b"\r") == [Reject(HALF_SWIPE, len(half)),
                                                      CardRead(CARD, TRACK2)]


def test_half_swipe_at_flush():
    p = Parser(TRACK2_CR, POLICY)
    assert p.feed(b";778900001234") == []
    assert p.flush() == [Reject(HALF_SWIPE, 13)]
    assert p.feed(T2 + b"\r") == [CardRead(CARD, TRACK2)]     # fresh after flush


def test_lone_opening_at_flush_is_garbage():
    p = Parser(MagstripeFraming(tracks=(2,), stx_etx=True), POLICY)
    assert p.feed(b"\x02") == []
    assert p.flush() == [Reject(GARBAGE, 1)]
    assert p.feed(b"\x02;7789") == []
    assert p.flush() == [Reject(HALF_SWIPE, 6)]


def test_unreadable_track_marker():
    assert parse(BOTH_CR, b"%E?" + T2 + b"\r") == [CardRead(CARD, TRACK2)]
    assert parse(BOTH_CR, T1 + b";E?\r") == [CardRead(CARD, TRACK1)]
    assert parse(BOTH_CR, b"%E?;E?\r") == [Reject(UNREADABLE_TRACK, 7)]
    assert parse(TRACK2_CR, b";?\r") == [Reject(UNREADABLE_TRACK, 3)]      # blank stripe
    # With LRCs on, an unreadable track carries none.
    f = MagstripeFraming(tracks=(1, 2), lrc="required")
    assert parse(f, b"%E?" + T2 + T2_LRC + b"\r") == [CardRead(CARD, TRACK2)]
    # A bare marker, no sentinels, where the framing allows it.
    bare = MagstripeFraming(tracks=(1, 2), bare_error_marker=True, track_separator=b"\r")
    assert parse(bare, b"E\r" + T2 + b"\r") == [CardRead(CARD, TRACK2)]
    assert parse(bare, b"E\rE\r") == [Reject(UNREADABLE_TRACK, 4)]
    assert reads(parse(BOTH_CR, b"E" + T2 + b"\r")) == []        # not allowed by default


def test_marker_inside_track2_data_is_garbage():
    assert reads(parse(TRACK2_CR, b";77E89?\r")) == []


def test_flood_without_terminator():
    f = MagstripeFraming(tracks=(2,), max_frame_bytes=64)
    p = Parser(f, POLICY)
    events = []
    flood = b";" + b"1" * 5000
    for i in range(0, len(flood), 100):
        events += p.feed(flood[i:i + 100])
        assert p.buffered <= 64
    events += p.feed(T2 + b"\r")
    assert events[0] == Reject(TOO_LONG, 65)
    assert set(reasons(events[1:])) == {GARBAGE}
    assert sum(e.nbytes for e in events if isinstance(e, Reject)) == len(flood)
    assert events[-1] == CardRead(CARD, TRACK2)


def test_flood_of_noise_reported_in_bounded_runs():
    f = MagstripeFraming(tracks=(2,), max_frame_bytes=64)
    events = parse(f, b"x" * 1000)
    assert all(e == Reject(GARBAGE, 64) for e in events[:-1])
    assert sum(e.nbytes for e in events) == 1000


def test_bank_card_dropped_without_its_number():
    for framing, frame in [
            (TRACK2_CR, f";{BANK}=2912101?\r".encode()),
            (MagstripeFraming(tracks=(1,)), f"%B{BANK}^DOE/JOHN^2912101?\r".encode()),
            (BOTH_CR, f"%B{BANK}^DOE/JOHN^2912101?;{BANK}=2912101?\r".encode())]:
        events = parse(framing, frame)
        assert events == [Reject(NOT_A_CARD, len(frame))]
        text = repr(events) + str(events)
        assert BANK not in text and BANK[-4:] not in text and "DOE" not in text


def test_our_range_failing_luhn_is_bad_check_digit():
    events = parse(TRACK2_CR, b";7789000012345677=2912101?\r")
    assert reasons(events) == [BAD_CHECK_DIGIT]


def test_track1_without_format_code_b_is_not_a_card():
    f = MagstripeFraming(tracks=(1,))
    assert reasons(parse(f, b"%A7789000012345676^X^1?\r")) == [NOT_A_CARD]


def test_read_repr_masks_the_number():
    (read,) = parse(TRACK2_CR, T2 + b"\r")
    assert read.card_number == CARD
    assert CARD not in repr(read) and "************5676" in repr(read)


# -- barcodes ----------------------------------------------------------------------

EAN13 = "2000000123455"           # starts with 2, check digit right
STX_CR = BarcodeFraming(prefix=b"\x02", suffix=b"\r")


def test_gtin_check_digit():
    assert barcode.gtin_ok(b"4006381333931")
    assert barcode.gtin_ok(b"96385074")
    assert barcode.gtin_ok(EAN13.encode())
    assert not barcode.gtin_ok(b"4006381333932")
    assert not barcode.gtin_ok(b"400638133393")       # 12 digits: a UPC-A, wrong
    assert barcode.with_check_digit("200000012345") == EAN13


def test_ean13_with_aim():
    events = parse(STX_CR, b"\x02]E0" + EAN13.encode() + b"\r")
    assert events == [CardRead(EAN13, BARCODE, "ean13")]


def test_bad_ean_check_digits():
    bad = b"\x02]E02000000123456\r"
    assert parse(STX_CR, bad) == [Reject(BAD_CHECK_DIGIT, len(bad))]
    assert reasons(parse(STX_CR, b"\x02]E49638507" + b"5\r")) == [BAD_CHECK_DIGIT]
    # EAN-8 right, but not in the program's ranges.
    assert reasons(parse(STX_CR, b"\x02]E496385074\r")) == [NOT_A_CARD]
    # Without an AIM identifier nothing says EAN, unless the framing does.
    always = BarcodeFraming(prefix=b"\x02", aim="absent", check_digit="ean")
    assert reasons(parse(always, b"\x022000000123456\r")) == [BAD_CHECK_DIGIT]
    assert parse(always, b"\x02" + EAN13.encode() + b"\r") == [CardRead(EAN13, BARCODE)]
    never = BarcodeFraming(prefix=b"\x02", check_digit="none")
    any_number = CardNumberPolicy()
    assert reads(parse(never, b"\x02]E02000000123456\r", any_number))


def test_aim_identifiers():
    assert parse(STX_CR, b"\x02]C07789000012345676\r") == [CardRead(CARD, BARCODE, "code128")]
    assert reads(parse(STX_CR, b"\x02]C1" + EAN13.encode() + b"\r"))[0].symbology == "gs1-128"
    assert parse(STX_CR, b"\x02" + EAN13.encode() + b"\r") == [CardRead(EAN13, BARCODE, None)]
    required = BarcodeFraming(prefix=b"\x02", aim="required", symbologies={"ean13"})
    assert reasons(parse(required, b"\x02" + EAN13.encode() + b"\r")) == [BAD_SYMBOLOGY]
    assert reasons(parse(required, b"\x02]Q17789000012345676\r")) == [BAD_SYMBOLOGY]
    assert reads(parse(required, b"\x02]E0" + EAN13.encode() + b"\r"))
    any_aim = BarcodeFraming(prefix=b"\x02", aim="required")
    assert reasons(parse(any_aim, b"\x02" + EAN13.encode() + b"\r")) == [BAD_SYMBOLOGY]
    assert reads(parse(any_aim, b"\x02]X0" + EAN13.encode() + b"\r"))[0].symbology == "other"
    # With aim = "absent", "]E0" is data, and data must be digits.
    absent = BarcodeFraming(prefix=b"\x02", aim="absent")
    assert reasons(parse(absent, b"\x02]E0" + EAN13.encode() + b"\r")) == [NOT_A_CARD]


def test_cr_versus_crlf_suffix():
    crlf = BarcodeFraming(suffix=b"\r\n")
    scan = EAN13.encode()
    assert parse(crlf, scan + b"\r\n" + scan + b"\r\n") == [CardRead(EAN13, BARCODE)] * 2
    # A scanner sending CR only to a CRLF framing: the next scan breaks the frame.
    assert reads(parse(crlf, scan + b"\r" + scan + b"\r")) == []
    # A scanner sending CRLF to a CR framing: reads, and the LF is noise.
    cr = BarcodeFraming(suffix=b"\r")
    events = parse(cr, scan + b"\r\n" + scan + b"\r\n", chunks=1)
    assert reads(events) == [CardRead(EAN13, BARCODE)] * 2
    assert reasons(events) == [GARBAGE, GARBAGE]


def test_barcode_product_code_is_not_a_card():
    events = parse(STX_CR, b"\x02]E04006381333931\r")
    assert events == [Reject(NOT_A_CARD, 18)] and "4006381333931" not in repr(events)


def test_barcode_half_scan_and_flood():
    f = BarcodeFraming(prefix=b"\x02", max_frame_bytes=32)
    assert parse(f, b"\x02123\x02" + EAN13.encode() + b"\r") == [
        Reject(HALF_SWIPE, 4), CardRead(EAN13, BARCODE)]
    p = Parser(f, POLICY)
    events = p.feed(b"\x02" + b"9" * 1000)
    assert p.buffered <= 32 and events[0] == Reject(TOO_LONG, 33)


# -- card number policy ---------------------------------------------------------------

def test_luhn():
    assert luhn_ok("79927398713") and luhn_ok(CARD) and luhn_ok(BANK)
    assert not luhn_ok("79927398710")


def test_policy_from_mapping():
    p = CardNumberPolicy.from_mapping({
        "ranges": [{"prefix": "50", "length": [12, 19]},
                   {"prefix": "7789", "length": 16, "sources": ["track2"]}],
        "extract": {"track2": "whole"}})
    assert p.evaluate(TRACK2, b"501234567890") == CardRead("501234567890", TRACK2)
    assert p.evaluate(TRACK2, b"50123456789") == NOT_A_CARD              # too short
    assert p.evaluate(TRACK2, CARD.encode()) == CardRead(CARD, TRACK2)
    assert p.evaluate(BARCODE, CARD.encode()) == NOT_A_CARD               # source not allowed
    assert p.evaluate(TRACK2, CARD.encode() + b"=2912") == NOT_A_CARD     # "whole": '=' is no digit
    assert POLICY.evaluate(TRACK2, CARD.encode() + b"=2912") == CardRead(CARD, TRACK2)
    assert POLICY.evaluate(TRACK1, b"B" + CARD.encode() + b"^X^") == CardRead(CARD, TRACK1)
    assert POLICY.evaluate(TRACK2, b"") == NOT_A_CARD


@pytest.mark.parametrize("mapping, key", [
    ({}, "policy.ranges"),
    ({"ranges": []}, "policy.ranges"),
    ({"ranges": [{"prefix": "77a9", "length": 16}]}, "policy.ranges[0].prefix"),
    ({"ranges": [{"prefix": "7789"}]}, "policy.ranges[0].length"),
    ({"ranges": [{"prefix": "7789", "length": [16, 12]}]}, "policy.ranges[0].length"),
    ({"ranges": [{"prefix": "77891", "length": 4}]}, "policy.ranges[0].prefix"),
    ({"ranges": [{"prefix": "7", "length": 4, "luhn": "yes"}]}, "policy.ranges[0].luhn"),
    ({"ranges": [{"prefix": "7", "length": 4, "sources": ["nfc"]}]}, "policy.ranges[0].sources"),
    ({"ranges": [{"prefix": "7", "length": 4}], "extract": {"track1": "whole"}},
     "policy.extract.track1"),
    ({"ranges": [{"prefix": "7", "length": 4}], "extract": {"track3": "pan"}},
     "policy.extract.track3"),
    ({"ranges": [{"prefix": "7", "length": 4}], "colour": 1}, "policy.colour"),
])
def test_policy_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as e:
        CardNumberPolicy.from_mapping(mapping)
    assert key in [k for k, _ in e.value.problems]


# -- de-duplication, masking ------------------------------------------------------------

def test_dedupe_window_edges():
    d = Deduplicator(window_us=2_000_000)
    assert d.accept("lane1", CARD, 10_000_000)
    assert not d.accept("lane1", CARD, 10_000_000)
    assert not d.accept("lane1", CARD, 11_999_999)          # just inside the window
    assert d.accept("lane1", CARD, 12_000_000)              # exactly the window: new read


def test_dedupe_window_runs_from_last_accepted_read():
    d = Deduplicator(window_us=1000)
    assert d.accept("l", CARD, 0)
    assert not d.accept("l", CARD, 600)
    # 1000 after the accepted read, though only 400 after the last repeat.
    assert d.accept("l", CARD, 1000)
    assert not d.accept("l", CARD, 1999)


def test_dedupe_other_card_or_lane_passes():
    d = Deduplicator(window_us=1000)
    assert d.accept("l1", CARD, 0)
    assert d.accept("l2", CARD, 1)                  # another lane
    assert d.accept("l1", "7789123456789017", 2)    # another card
    assert d.accept("l1", CARD, 3)                  # the lane's last card was the other one
    assert not d.accept("l2", CARD, 4)


def test_dedupe_clock_backwards_and_zero_window():
    d = Deduplicator(window_us=1000)
    assert d.accept("l", CARD, 5000)
    assert d.accept("l", CARD, 4000)                # clock stepped back: accept
    z = Deduplicator(window_us=0)
    assert z.accept("l", CARD, 0) and z.accept("l", CARD, 0)
    with pytest.raises(ValueError):
        Deduplicator(-1)


def test_mask():
    assert mask("7789000012341234") == "************1234"
    assert mask("12345") == "*2345"
    assert mask("1234") == "****"
    assert mask("") == ""


# -- properties -----------------------------------------------------------------------------

FRAMINGS = [
    TRACK2_CR,
    BOTH_CR,
    MagstripeFraming(tracks=(1, 2), stx_etx=True, lrc="required", terminator=b"\r\n"),
    MagstripeFraming(tracks=(1, 2), lrc="optional", track_separator=b"\r",
                     preamble=b"\x1b", terminator=b"\n", bare_error_marker=True),
    MagstripeFraming(tracks=(2,), terminator=b"", lrc="required"),
    MagstripeFraming(tracks=(1,), terminator=b"", max_frame_bytes=64),
    STX_CR,
    BarcodeFraming(suffix=b"\r\n", aim="absent", check_digit="ean"),
    BarcodeFraming(prefix=b"\x02", suffix=b"\x03", aim="required"),
]
PROPERTY = settings(derandomize=True, deadline=None, max_examples=150,
                    suppress_health_check=[HealthCheck.too_slow])
SENTINELS = set(b"%;?\x02\x03")


def noise_for(framing):
    """Bytes that cannot start a frame of `framing`: no sentinels, STX/ETX, openers."""
    banned = SENTINELS | Parser(framing).opening_bytes
    return st.binary(max_size=120).map(lambda b: bytes(c for c in b if c not in banned))


def feed_in_pieces(parser, data, cuts):
    events, start = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        events += parser.feed(data[start:cut])
        start = max(start, cut)
    return events


@st.composite
def card_frames(draw, framing):
    """(frame bytes, the card number it carries) for a random card of the program."""
    digits = st.text("0123456789", min_size=1, max_size=1)
    if isinstance(framing, BarcodeFraming):
        number = barcode.with_check_digit("2" + "".join(draw(digits) for _ in range(11)))
        choices = {"required": ["E0"], "absent": [None]}.get(framing.aim, [None, "E0"])
        aim = draw(st.sampled_from(choices))
        return barcode.encode_frame(framing, number.encode(), aim), number
    body = "7789" + "".join(draw(digits) for _ in range(11))
    number = next(body + d for d in "0123456789" if luhn_ok(body + d))
    name = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ /", min_size=2, max_size=26))
    data = {1: f"B{number}^{name}^2912101".encode(), 2: f"{number}=2912101".encode()}
    tracks = {t: data[t] for t in framing.tracks}
    if len(tracks) > 1 and draw(st.booleans()):
        tracks[1] = None                        # track 1 unreadable: number from track 2
    lrc = draw(st.booleans()) if framing.lrc == "optional" else None
    return magstripe.encode_frame(framing, tracks, lrc), number


@PROPERTY
@given(st.sampled_from(FRAMINGS), st.binary(max_size=400), st.lists(st.integers(0, 400)))
def test_random_bytes_never_raise(framing, data, cuts):
    p = Parser(framing, POLICY)
    events = feed_in_pieces(p, data, cuts) + p.flush()
    assert p.buffered == 0
    assert sum(e.nbytes for e in events if isinstance(e, Reject)) <= len(data)
    assert all(isinstance(e, (CardRead, Reject)) for e in events)


@PROPERTY
@given(st.data())
def test_noise_never_reads(data):
    framing = data.draw(st.sampled_from(FRAMINGS))
    noise = data.draw(noise_for(framing))
    events = parse(framing, noise, policy=CardNumberPolicy())      # admits any digits
    assert events == [] or set(reasons(events)) == {GARBAGE}
    assert sum(e.nbytes for e in events) == len(noise)


@PROPERTY
@given(st.data())
def test_frame_in_noise_read_exactly_once(data):
    framing = data.draw(st.sampled_from(FRAMINGS))
    frame, number = data.draw(card_frames(framing))
    before, after = data.draw(noise_for(framing)), data.draw(noise_for(framing))
    cuts = data.draw(st.lists(st.integers(0, 500)))
    p = Parser(framing, POLICY)
    events = feed_in_pieces(p, before + frame + after, cuts) + p.flush()
    assert [e.card_number for e in reads(events)] == [number]


# Bytes that matter to some framing, so random strings make near-frames.
DANGEROUS = st.sampled_from(list(b"%;?=^B\x02\x03\r\n\x1bE]0123456789") + [0x00, 0xFF, 0x41])


@PROPERTY
@given(st.sampled_from(FRAMINGS), st.lists(DANGEROUS, max_size=300),
       st.lists(st.integers(0, 300)))
def test_events_do_not_depend_on_how_input_is_split(framing, data, cuts):
    data = bytes(data)
    whole = Parser(framing, POLICY)
    expected = whole.feed(data) + whole.flush()
    pieces = Parser(framing, POLICY)
    assert feed_in_pieces(pieces, data, cuts) + pieces.flush() == expected
    one_by_one = Parser(framing, POLICY)
    assert [e for b in data for e in one_by_one.feed(bytes([b]))] + one_by_one.flush() \
        == expected


@PROPERTY
@given(st.data())
def test_no_read_is_invented_from_damaged_frames_in_hostile_bytes(data):
    """Frames cut, with a byte changed, among bytes that matter to framings:
    every card number read is one the input spells out, digit for digit."""
    framing = data.draw(st.sampled_from(FRAMINGS))
    frame, _ = data.draw(card_frames(framing))
    frame = bytearray(frame)
    if data.draw(st.booleans()):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(DANGEROUS)
    frame = bytes(frame[data.draw(st.integers(0, len(frame) // 2)):])
    around = [bytes(data.draw(st.lists(DANGEROUS, max_size=60))) for _ in range(2)]
    stream = around[0] + frame + around[1]
    p = Parser(framing, POLICY)
    events = feed_in_pieces(p, stream, data.draw(st.lists(st.integers(0, 200)))) \
        + p.flush()
    for read in reads(events):
        assert read.card_number.encode() in stream
