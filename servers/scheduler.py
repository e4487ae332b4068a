"""Scheduled ledger work inside the server, through the same writer.

Expired lots and timed-out holds are also settled whenever their account is
touched; the sweep does it for accounts nobody touches, so balances, reports
and the feed show expiry on time. The kernel's SWEEP reads its expiry
indexes from the front, so a sweep with nothing due costs one read, and it
is bounded per batch: a large backlog drains over several rounds without
holding up checkouts. Each run's operation id names the moment, so a run
repeated for the same moment does nothing twice.

Each round also does the programs' calendar work, when due: a tier
period's close (tier_close.py) and the day's birthday bonuses
(birthdays.py). What was done is remembered here, in memory, so a round with
nothing due reads nothing; after a restart each is done once again, which
changes nothing already done (their operation ids name the period or the
member and year) and catches up what was missed.
"""

import asyncio
import logging

from kopilka.core.batch import Batch
from kopilka.core.records import Code

from . import birthdays, tier_close

log = logging.getLogger("kopilka.scheduler")
SWEEP_LIMIT = 5_000


class Scheduler:
    def __init__(self, backend, every_seconds):
        self.backend = backend
        self.every = every_seconds
        self._task = None
        self._closed = {}     # program id -> start of the tier period closed
        self._birthdays = {}  # program id -> last local date granted

    def start(self):
        if self.every and self.every > 0:
            self._task = asyncio.ensure_future(self._loop())

    def stop(self):
        if self._task is not None:
            self._task.cancel()

    async def _loop(self):
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduled work failed; retrying next round")
            await asyncio.sleep(self.every)

    async def run_once(self, now=None):
        """Sweeps until nothing more is due, then the programs' calendar
        work; returns the entries expired."""
        now = self.backend.clock() if now is None else now
        expired = await self.sweep(now)
        for program_id in self.backend.registry.ids():
            program = self.backend.registry.get(program_id).program
            try:
                await self.close_tiers(program, now)
                await self.grant_birthdays(program, now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("calendar work failed; retrying next round",
                              extra={"fields": {"program": program_id}})
        return expired

    async def close_tiers(self, program, now):
        """The close of the tier period holding `now`, unless done."""
        period = tier_close.current_period(program, now)
        if period is None or self._closed.get(program.id) == period[0]:
            return 0
        changed = await tier_close.close(self.backend, program, *period)
        self._closed[program.id] = period[0]
        return changed

    async def grant_birthdays(self, program, now):
        """The birthday bonuses of the days not granted yet (birthdays.py)."""
        granted = 0
        for day in birthdays.days_due(program, now, self._birthdays.get(program.id)):
            granted += await birthdays.grant(self.backend, program, day, now)
            self._birthdays[program.id] = day
        return granted

    async def sweep(self, now):
        total, round_ = 0, 0
        while True:
            round_ += 1
            op_id = f"kopilka/sweep/{now}/{round_}"
            result = (await self.backend.apply(
                Batch().sweep(op_id, SWEEP_LIMIT), None))[0]
            if result.code != Code.OK:
                log.warning("sweep refused", extra={"fields": {"code": result.code}})
                return total
            total += result.a
            if result.a < SWEEP_LIMIT:
                return total
