"""Birthday bonuses: granted by the scheduler on the member's birthday.

A day's members are found by the ledger's birthday index (month-day ->
account, kept in the transaction that writes the profile), never by reading
every account. Each grant is an AWARD on the member's `birthday/{year}`
counter with limit 1, under the id `kopilka/birthday/{program}/{account}/
{year}`: once a year per member, whoever runs it and however often. Its
points, activation and expiry are the version's in force at the start of the
birthday (in the program's time zone), which is also its business time, so
a grant made late is the same operation as one made on the day.

Catching up: the scheduler remembers (in memory) the last day it granted per
program. After a restart it grants again for the last `CATCH_UP_DAYS` days,
skipping members already granted (their operation exists), so a server down
on someone's birthday pays it when it is back within that window; a longer
outage loses the older birthdays. A member enrolled, or given a birthday,
after that day's grant ran waits for next year.
"""

import logging
from datetime import timedelta

from kopilka.core.batch import Batch
from kopilka.core.bonuses import birthday_counter, birthdays_on, day_start, local_date
from kopilka.core.lifetimes import lot_times
from kopilka.core.records import Code

log = logging.getLogger("kopilka.birthdays")
CATCH_UP_DAYS = 7
BATCH = 1_000


def days_due(program, now, last_done):
    """The local dates to grant for: after `last_done` (None: the catch-up
    window) up to today."""
    today = local_date(now, program.zone)
    first = today - timedelta(days=CATCH_UP_DAYS)
    if last_done is not None:
        first = max(first, last_done + timedelta(days=1))
    return [first + timedelta(days=n) for n in range((today - first).days + 1)]


def grants(ledger, program, day, now):
    """(op id, Batch args) of the birthday bonuses due on `day` not granted yet."""
    start = day_start(day, program.zone)
    try:
        version = program.version_at(start)
    except LookupError:
        return []
    points = version.bonuses.birthday
    if not points:
        return []
    activates_at, expires_at = lot_times(version.lifetime.for_kind("birthday"),
                                         start, program.zone)
    if expires_at <= now:
        return []   # would expire before it is paid: nothing to give
    out = []
    for birthday in birthdays_on(day):
        for account in ledger.birthdays(program.id, birthday):
            op_id = f"kopilka/birthday/{program.id}/{account}/{day.year}"
            if ledger.operation(op_id.encode()) is None:
                out.append((op_id, dict(account=account, points=points,
                                        counter=birthday_counter(day.year), limit=1,
                                        activates_at=activates_at,
                                        expires_at=expires_at,
                                        version=version.number, business_time=start)))
    return out


async def grant(backend, program, day, now):
    """Grants the birthday bonuses of `day`; returns how many were granted."""
    due = grants(backend.ledger, program, day, now)
    granted = 0
    for i in range(0, len(due), BATCH):
        batch = Batch()
        for op_id, args in due[i:i + BATCH]:
            batch.award(op_id, **args)
        for (op_id, _), result in zip(due[i:i + BATCH], await backend.apply(batch, None)):
            if result.code == Code.OK and not result.replayed:
                granted += 1
            elif result.code not in (Code.OK, Code.LIMIT_REACHED, Code.ACCOUNT_BLOCKED,
                                     Code.ACCOUNT_CLOSED):
                log.warning("birthday bonus refused", extra={"fields": {
                    "operation_id": op_id, "code": result.code.name}})
    return granted
