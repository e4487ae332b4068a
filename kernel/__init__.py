"""The ledger kernel: Cython over the LMDB C API, same contract as the twin.

`Ledger(path)` opens (or creates) a ledger; `apply(batch, now)` applies a
`kopilka.core.batch.Batch` in one durable transaction and returns one result
per operation; reads and `audit()` come from `kopilka.core.reads`.
"""

from contextlib import contextmanager

from kopilka.core.batch import Results
from kopilka.core.codec import Account, Coupon, Hold, Lot
from kopilka.core.reads import Balances, LedgerReads
from kopilka.core.records import U64

from ._ledger import DB_NAMES, Environment, account_of, account_types

account_types(Account, Lot, Hold, Coupon)

_DB = {name.decode(): number for number, name in enumerate(DB_NAMES)}
_ACCOUNTS = _DB["accounts"]


class Ledger(LedgerReads):
    def __init__(self, path, *, map_size=1 << 30, sync=True, writemap=False):
        self.path = str(path)
        self._env = Environment(self.path, map_size, sync, writemap)

    def apply(self, batch, now):
        return Results(self._env.apply(bytes(batch), now))

    def apply_raw(self, batch, now):
        """The packed results as bytes: for callers that decode lazily."""
        return self._env.apply(batch, now)

    def _get(self, db, key):
        return self._env.get(_DB[db], key)

    def account(self, account_id):
        raw = self._env.get(_ACCOUNTS, U64.pack(account_id))
        return account_of(raw) if raw is not None else None

    def balances(self, account_id, now):
        figures = self._env.balance_figures(account_id, now)
        return Balances(account_id, *figures) if figures is not None else None

    @contextmanager
    def _snapshot(self):
        txn = self._env.read()
        try:
            yield txn
        finally:
            txn.close()

    def copy(self, path, compact=True):
        self._env.copy(path, compact)

    def info(self):
        return self._env.info()

    def close(self):
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
