"""Scheduled ledger work inside the server, through the same writer.

Expired lots and timed-out holds are also settled whenever their account is
touched; the sweep does it for accounts nobody touches, so balances, reports
and the feed show expiry on time. The kernel's SWEEP reads its expiry
indexes from the front, so a sweep with nothing due costs one read, and it
is bounded per batch: a large backlog drains over several rounds without
holding up checkouts. Each run's operation id names the moment, so a run
repeated for the same moment does nothing twice.
"""

import asyncio
import logging

from kopilka.core.batch import Batch
from kopilka.core.records import Code

log = logging.getLogger("kopilka.scheduler")
SWEEP_LIMIT = 5_000


class Scheduler:
    def __init__(self, backend, every_seconds):
        self.backend = backend
        self.every = every_seconds
        self._task = None

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
        """Sweeps until nothing more is due; returns the entries expired."""
        now = self.backend.clock() if now is None else now
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
