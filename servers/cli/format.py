"""Printing helpers: money, times, balances, masked card numbers, any
message's fields as text or as JSON, and paths as the user would type them."""

import os
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ZERO_DECIMAL = {"JPY", "KRW", "VND", "CLP", "ISK", "UGX", "XOF", "XAF"}


def _print_json(message):
    from google.protobuf import json_format
    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def money(m):
    """`1,500.00 RUB` from a Money."""
    digits = 0 if m.currency_code in ZERO_DECIMAL else 2
    units = abs(m.minor_units)
    sign = "-" if m.minor_units < 0 else ""
    if not digits:
        return f"{sign}{units:,} {m.currency_code}"
    whole, part = divmod(units, 10 ** digits)
    return f"{sign}{whole:,}.{part:0{digits}d} {m.currency_code}"


def _bytes(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _set(ts):
    return ts.seconds != 0 or ts.nanos != 0


def when(ts, absent="-", zone=None):
    """A time in UTC, or in `zone` (an IANA name) where the rules count in it."""
    if not _set(ts):
        return absent
    if zone:
        try:
            local = datetime.fromtimestamp(ts.seconds, ZoneInfo(zone))
            return local.strftime(f"%Y-%m-%d %H:%M {zone}")
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def day(ts, absent="-"):
    if not _set(ts):
        return absent
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d")


def balances(b):
    text = (f"available {b.available_points}, pending {b.pending_points}, "
            f"held {b.held_points}")
    return text + (f", debt {b.debt_points}" if b.debt_points else "")


def mask_card(number):
    """Enough of a card number to tell cards apart, never all of it."""
    if len(number) > 10:
        return number[:6] + "*" * (len(number) - 10) + number[-4:]
    return "*" * max(len(number) - 2, 0) + number[-2:]


def _enum_name(enum, value, prefix):
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return str(value)


def _value(field, value):
    """One field's value as text, for generic listings (reports, stats)."""
    if field.is_repeated:
        return " ".join(_value_one(field, v) for v in value) or "-"
    return _value_one(field, value)


def _value_one(field, value):
    from google.protobuf.descriptor import FieldDescriptor
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name if \
            value in field.enum_type.values_by_number else str(value)
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        return value.hex() if isinstance(value, bytes) else str(value)
    kind = field.message_type.full_name
    if kind == "kopilka.v1.Money":
        return money(value)
    if kind == "google.protobuf.Timestamp":
        return when(value)
    if kind == "google.protobuf.Duration":
        return f"{value.ToMilliseconds()} ms"
    if kind == "google.type.Date":
        return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
    return ",".join(f"{f.name}={_value(f, v)}" for f, v in value.ListFields()) or "-"


def fields_of(message, skip=()):
    """(name, text) of every field, zeros included; absent optionals left out."""
    out = []
    for field in message.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if field.has_presence and not message.HasField(field.name):
            continue
        out.append((field.name, _value(field, getattr(message, field.name))))
    return out


def _invoked():
    """How the user ran this command (`.venv/bin/kopilka`), for hints to copy."""
    if os.path.basename(sys.argv[0]) == "kopilka":
        return _short(sys.argv[0])
    return "kopilka"


def _short(path):
    """A path relative to the working directory when that is shorter."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return relative if len(relative) < len(str(path)) else str(path)
