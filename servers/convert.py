"""Protobuf values to domain values and back: names, money, times, balances.

Parsing never trusts the wire: each parser takes the field's path and raises
`status.invalid` naming it, so every servicer reports bad input the same way.
Times are integer microseconds since the epoch inside Kopilka.
"""

import re

from google.protobuf.timestamp_pb2 import Timestamp

from kopilka.core.reads import coupon_state
from kopilka.core.records import NEVER
from kopilka.v1 import common_pb2

from .status import invalid

U32_MAX = (1 << 32) - 1
INT64_MAX = (1 << 63) - 1
_PROGRAM = re.compile(r"programs/([1-9][0-9]{0,9})")
_MEMBER = re.compile(r"programs/([1-9][0-9]{0,9})/members/([1-9][0-9]{0,18})")
_LANE = re.compile(r"stores/([1-9][0-9]{0,9})/lanes/([1-9][0-9]{0,9})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PARTNER = re.compile(r"programs/([1-9][0-9]{0,9})/partners/([1-9][0-9]{0,9})")


def _u32(text):
    value = int(text)
    return value if value <= U32_MAX else None


def parse_program(name, field):
    m = _PROGRAM.fullmatch(name)
    if not m or _u32(m[1]) is None:
        raise invalid([(field, "must be programs/{program}")])
    return int(m[1])


def parse_member(name, field):
    """(program, account) of `programs/{p}/members/{m}`."""
    m = _MEMBER.fullmatch(name)
    if not m or _u32(m[1]) is None or int(m[2]) > INT64_MAX:
        raise invalid([(field, "must be programs/{program}/members/{member}")])
    return int(m[1]), int(m[2])


_LANES = {}          # lane names parsed, the valid ones (tills are few)
_MAX_LANES = 65_536  # then forgotten all at once, and learnt again


def parse_lane(name, field="lane"):
    """(store, lane) of `stores/{store}/lanes/{lane}`."""
    found = _LANES.get(name)
    if found is not None:
        return found
    m = _LANE.fullmatch(name)
    if not m or _u32(m[1]) is None or _u32(m[2]) is None:
        raise invalid([(field, "must be stores/{store}/lanes/{lane}")])
    if len(_LANES) >= _MAX_LANES:
        _LANES.clear()
    found = _LANES[name] = (int(m[1]), int(m[2]))
    return found


def program_name(program):
    return f"programs/{program}"


def member_name(program, account):
    return f"programs/{program}/members/{account}"


def partner_name(program, partner):
    return f"programs/{program}/partners/{partner}" if partner else ""


def version_name(program, version):
    return f"programs/{program}/versions/{version}"


def coupon_code(account, number):
    """A member's coupon as the customer sees it (receipt, app): "42-3"."""
    return f"{account}-{number}"


def lane_name(store, lane):
    return f"stores/{store}/lanes/{lane}"


def operation_id(value, field="operation_id"):
    """The idempotency key's bytes: 1 to 128 bytes of UTF-8, no controls."""
    raw = value.encode()
    if not 1 <= len(raw) <= 128 or _CONTROL.search(value):
        raise invalid([(field, "must be 1 to 128 bytes of UTF-8 text without "
                               "control characters")], reason="OPERATION_ID_INVALID")
    return raw


def identifier(value, field, limit=128):
    """A card number or external id: 1 to `limit` bytes, no controls."""
    raw = value.encode()
    if not 1 <= len(raw) <= limit or _CONTROL.search(value):
        raise invalid([(field, f"must be 1 to {limit} bytes of text")],
                      reason="IDENTIFIER_INVALID")
    return raw


# --- money and time -----------------------------------------------------------

def money(value, currency):
    return common_pb2.Money(currency_code=currency, minor_units=value)


# Responses on the hot paths are built in one constructor call from plain
# dicts (`*_fields`): protobuf builds nested messages from dicts faster than
# from messages made one by one (each then copied into its parent).

def money_fields(value, currency):
    """A common.Money, as a dict for a message constructor."""
    return {"currency_code": currency, "minor_units": value}


def parse_money(message, field, currency, problems):
    """Minor units of a Money field; appends (path, why) to `problems`."""
    if message.currency_code != currency:
        problems.append((f"{field}.currency_code",
                         f"must be the program's currency {currency}"))
    if message.minor_units < 0:
        problems.append((f"{field}.minor_units", "must not be negative"))
    return message.minor_units


def timestamp(micros):
    """A Timestamp, or None for NEVER (absent in the response)."""
    if micros is None or micros >= NEVER:
        return None
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


_MIN_SECONDS = -62_135_596_800   # Timestamp's range: 0001-01-01 ...


def time_fields(micros):
    """A Timestamp as a dict for a message constructor (what `timestamp`
    makes), or None for NEVER (absent: a constructor skips None)."""
    if micros is None or micros >= NEVER:
        return None
    seconds, rest = divmod(micros, 1_000_000)
    if not _MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ValueError(f"Timestamp is not valid: {micros} microseconds")
    return {"seconds": seconds, "nanos": rest * 1000}


def set_time(message, field, micros):
    ts = timestamp(micros)
    if ts is not None:
        getattr(message, field).CopyFrom(ts)


# google.protobuf.Timestamp's own range ends with the year 9999; past it a
# time has no calendar date to print or price by.
MAX_SECONDS = 253_402_300_799


def parse_time(ts, field, problems):
    micros = ts.seconds * 1_000_000 + ts.nanos // 1000
    if ts.seconds <= 0 or not 0 <= ts.nanos < 1_000_000_000:
        problems.append((field, "must be a time after 1970"))
    elif ts.seconds > MAX_SECONDS:
        problems.append((field, "must be a time before the year 10000"))
    return micros


def member_coupon(account, coupon, currency, now):
    """common.MemberCoupon of a `core.codec.Coupon` of `account`'s, as of now."""
    out = common_pb2.MemberCoupon(
        code=coupon_code(account, coupon.number), coupon_number=coupon.number,
        state=coupon_state(coupon, now), value=money(coupon.value, currency))
    set_time(out, "usable_time", coupon.usable_from)
    set_time(out, "expire_time", coupon.expires_at)
    return out


def balances(b, now):
    """common.Balances of a `core.reads.Balances`."""
    return common_pb2.Balances(**balances_fields(b, now))


def balances_fields(b, now):
    """common.Balances of a `core.reads.Balances`, as a dict."""
    return {"available_points": b.available, "pending_points": b.pending,
            "held_points": b.held, "balance_points": b.balance,
            "debt_points": b.debt, "earned_points": b.earned,
            "spent_points": b.spent, "expired_points": b.expired,
            "as_of_time": time_fields(now)}
