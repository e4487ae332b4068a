"""Read-side of a ledger, shared by the kernel and the twin.

Both store the same bytes, so reads need only a snapshot that can `get` a key
and `scan` a database from a key; each ledger provides `_snapshot()`.
"""

from dataclasses import dataclass

from .audit import audit
from .codec import Account, JournalEntry, Operation
from .records import (CARD, DATABASES, HEAD, I64, META_HEAD, META_NEXT_ACCOUNT,
                      PROGRAM, SYSTEM_KEY,
                      U32, U64, CardStatus, external_key)


@dataclass(frozen=True)
class Balances:
    account: int
    program: int
    status: int
    available: int  # active, unexpired points minus holds and debt
    pending: int    # points not active yet (a return window)
    held: int       # by holds that have not timed out
    balance: int    # all points on the account, minus debt
    debt: int
    earned: int
    spent: int
    expired: int
    tier: int = 0   # 0: none; last, so positional users keep working


def balances_of(account_id, account, now):
    active = pending = 0
    held = sum(h.amount for h in account.holds if h.expires_at > now)
    for lot in account.lots:
        if lot.expires_at <= now:
            continue  # expired, burned when the account is next touched
        if lot.activates_at <= now:
            active += lot.remaining
        else:
            pending += lot.remaining
    return Balances(account_id, account.program, account.status,
                    active - held - account.debt, pending,
                    held, account.balance, account.debt,
                    account.earned, account.spent, account.expired,
                    account.tier)


@dataclass(frozen=True)
class ProgramRecord:
    program: int
    flags: int
    created_at: int
    updated_at: int
    data: bytes      # of the last PUT_PROGRAM: the definition


class LedgerReads:
    """Point reads over one read transaction each."""

    def programs(self):
        """Every program's record, by id."""
        with self._snapshot() as snap:
            return [ProgramRecord(U32.unpack(key)[0], *PROGRAM.unpack_from(value),
                                  bytes(value[PROGRAM.size:]))
                    for key, value in snap.scan("programs")]

    def account(self, account_id):
        with self._snapshot() as snap:
            raw = snap.get("accounts", U64.pack(account_id))
            return Account.decode(raw) if raw is not None else None

    def balances(self, account_id, now):
        account = self.account(account_id)
        return balances_of(account_id, account, now) if account else None

    def lots(self, account_id):
        account = self.account(account_id)
        return list(account.lots) if account else []

    def operation(self, op_id):
        with self._snapshot() as snap:
            raw = snap.get("ops", bytes(op_id))
            return Operation.decode(raw) if raw is not None else None

    def profile(self, account_id):
        """The member's profile (opaque bytes), or None."""
        with self._snapshot() as snap:
            return snap.get("profiles", U64.pack(account_id))

    def card(self, number):
        """(account id, CardStatus) of a card number, or None."""
        with self._snapshot() as snap:
            raw = snap.get("cards", bytes(number))
        if raw is None:
            return None
        account_id, status = CARD.unpack(raw)
        return account_id, CardStatus(status)

    def account_id(self, program, external_id):
        with self._snapshot() as snap:
            raw = snap.get("externals", external_key(program, bytes(external_id)))
            return U64.unpack(raw)[0] if raw is not None else None

    def system_balance(self, program, kind, partner=0):
        with self._snapshot() as snap:
            raw = snap.get("system", SYSTEM_KEY.pack(program, kind, partner))
            return I64.unpack(raw)[0] if raw is not None else 0

    def head(self):
        """(last journal sequence number, its chain hash)."""
        with self._snapshot() as snap:
            raw = snap.get("meta", META_HEAD)
        return HEAD.unpack(raw) if raw is not None else (0, bytes(32))

    def journal(self, from_seq=1, limit=1000):
        """Journal entries with seq >= from_seq, in order."""
        entries = []
        with self._snapshot() as snap:
            for _, value in snap.scan("journal", U64.pack(from_seq)):
                if len(entries) >= limit:
                    break
                entries.append(JournalEntry.decode(value))
        return entries

    def dump(self):
        """Every database's (key, value) pairs: for comparing two ledgers."""
        with self._snapshot() as snap:
            return {name.decode(): list(snap.scan(name.decode()))
                    for name in DATABASES}

    def audit(self):
        """Every invariant checked; a list of what is wrong (empty: clean)."""
        return self.audit_at_head()[0]

    def audit_at_head(self):
        """(problems, (seq, hash) of the head audited), from one snapshot."""
        with self._snapshot() as snap:
            problems = audit(snap)
            raw = snap.get("meta", META_HEAD)
        return problems, HEAD.unpack(raw) if raw is not None else (0, bytes(32))

    def accounts_opened(self):
        """Accounts ever opened: ids are given out in order from 1."""
        with self._snapshot() as snap:
            raw = snap.get("meta", META_NEXT_ACCOUNT)
        return U64.unpack(raw)[0] - 1 if raw is not None else 0
