"""When earned points (and issued coupons) start and stop counting.

Days are exact 24-hour days from the sale's business time. Calendar periods
("the end of next year", "valid 3 months") are taken in the program's time
zone, as `program.py` records: the end of a period is the first microsecond
of the next one, because the ledger treats a lot as alive while
`now < expires_at`.
"""

from datetime import datetime

from .program import EPOCH, MICROSECOND, to_micros
from .receipt import DAY
from .records import NEVER

_MONTHS_PER = {"month": 1, "quarter": 3, "year": 12}


def local(t, zone):
    """Microseconds as an aware datetime in `zone`."""
    return (EPOCH + t * MICROSECOND).astimezone(zone)


def _month_start(month_index, zone):
    """Local midnight starting month number `month_index` (year * 12 + month - 1)."""
    year, month = divmod(month_index, 12)
    return to_micros(datetime(year, month + 1, 1, tzinfo=zone))


def _period_start(t, period, offset, zone):
    """The start of the calendar `period` `offset` periods after the one holding `t`."""
    moment = local(t, zone)
    if period == "day":
        day = datetime.fromordinal(moment.date().toordinal() + offset)
        return to_micros(day.replace(tzinfo=zone))
    step = _MONTHS_PER[period]
    index = moment.year * 12 + moment.month - 1
    index -= index % step  # first month of the period (quarters start Jan, Apr, ...)
    return _month_start(index + step * offset, zone)


def period_end(t, period, periods_later, zone):
    """The end of the calendar `period` holding `t`, `periods_later` periods on."""
    return _period_start(t, period, periods_later + 1, zone)


def period_bounds(t, period, zone):
    """[start, end) of the calendar `period` holding `t`."""
    return _period_start(t, period, 0, zone), _period_start(t, period, 1, zone)


def add_months(t, months, zone):
    """The same local time `months` calendar months later, the day clamped to
    the month's last (31 January + 1 month is 28 or 29 February)."""
    moment = local(t, zone)
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    following = datetime(year + month // 12, month % 12 + 1, 1)
    last_day = (following - datetime(year, month, 1)).days
    shifted = moment.replace(year=year, month=month, day=min(moment.day, last_day),
                             tzinfo=None).replace(tzinfo=zone)
    return to_micros(shifted)


def lot_times(lifetime, t, zone):
    """(activates_at, expires_at) of points earned at `t` under `lifetime`
    (a `Lifetime` already resolved for the bonus kind)."""
    activates_at = t + lifetime.activation_days * DAY
    expiry = lifetime.expiry
    if expiry.days is not None:
        return activates_at, t + expiry.days * DAY
    if expiry.end_of is not None:
        return activates_at, period_end(t, expiry.end_of, expiry.periods_later, zone)
    return activates_at, NEVER
