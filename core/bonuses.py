"""The bonuses rules grant by the calendar and by counting: pure functions of
a program version and a time, which the server turns into ledger operations.

- Tiers: at each tier period's start a member's tier is the highest level
  whose `min_spend` their net spend of the previous period reaches (tier
  numbers are levels from 1; the first level's `min_spend` is 0, so every
  member reaches it). Net spend is the ledger's member-month rows (receipts'
  money minus refunds'), months of the program's *standard* UTC offset, as
  the ledger counts them; so tier periods here are calendar periods of that
  offset too (in summer time they start an hour late where clocks go
  forward), and a period's rows are final once it has ended.
- Counters: every counted bonus is counted on a member's counter in the
  ledger, whose name says what and when: `action/{name}` (limited over the
  membership) or `action/{name}/{period}`, `birthday/{year}`,
  `visits/{period}`. Periods are labelled `2026-11-23` (day), `2026-W47`
  (ISO week), `2026-11`, `2026-Q4`, `2026`, in the program's time zone.
- Birthdays: a member born on 29 February celebrates on 28 February in
  years without a 29th.
"""

import calendar
from datetime import datetime, timedelta, timezone

from .lifetimes import local, period_bounds
from .program import to_micros


def period_label(t, period, zone):
    """The label of the calendar `period` holding `t` (microseconds) in `zone`."""
    d = local(t, zone).date()
    if period == "day":
        return d.isoformat()
    if period == "week":
        year, week, _ = d.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return f"{d.year}-{d.month:02d}"
    if period == "quarter":
        return f"{d.year}-Q{(d.month - 1) // 3 + 1}"
    if period == "year":
        return str(d.year)
    raise ValueError(f"unknown period {period!r}")


def action_counter(action, t, zone):
    """The counter an award of `action` (a program.Action) at `t` counts on."""
    if action.limit_period is None:
        return f"action/{action.name}"
    return f"action/{action.name}/{period_label(t, action.limit_period, zone)}"


def visit_counter(visits, t, zone):
    """The counter a visit at `t` counts on (`visits`: a program.VisitBonus)."""
    return f"visits/{period_label(t, visits.period, zone)}"


def birthday_counter(year):
    return f"birthday/{year}"


# --- tiers ----------------------------------------------------------------------

def standard_zone(program):
    """The program's standard UTC offset as a fixed zone: the ledger's months."""
    return timezone(timedelta(minutes=program.utc_offset_minutes))


def tier_period(t, period, program):
    """[start, end) of the tier `period` holding `t`, by the standard offset."""
    return period_bounds(t, period, standard_zone(program))


def months(start, end, program):
    """The ledger's month keys (year * 100 + month) of [start, end), a tier
    period by the standard offset."""
    first = local(start, standard_zone(program)).date()
    last = local(end - 1, standard_zone(program)).date()
    out, year, month = [], first.year, first.month
    while (year, month) <= (last.year, last.month):
        out.append(year * 100 + month)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def tier_of(tiers, spend):
    """The tier (level number from 1) a net `spend` of money earns."""
    number = 1
    for i, level in enumerate(tiers.levels, 1):
        if spend >= level.min_spend:
            number = i
    return number


# --- birthdays --------------------------------------------------------------------

def birthdays_on(day):
    """The birthdays (month * 100 + day) celebrated on `day` (a date)."""
    found = [day.month * 100 + day.day]
    if (day.month, day.day) == (2, 28) and not calendar.isleap(day.year):
        found.append(229)
    return found


def day_start(day, zone):
    """The first microsecond of a local date in `zone`."""
    return to_micros(datetime(day.year, day.month, day.day, tzinfo=zone))


def local_date(t, zone):
    return local(t, zone).date()

