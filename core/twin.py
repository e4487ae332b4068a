"""The pure-Python reference ledger over py-lmdb: the kernel's twin.

It is the executable specification of the ledger: the Cython kernel must give
the same result codes and write the same bytes for every batch. Clarity over
speed here; the kernel is the fast one.

How an operation is applied: its account records are decoded into memory,
changed there, and the journal entries it produces are collected. Only when
it succeeds is anything put into the write transaction, so a rejected
operation leaves no trace and does not spoil its neighbours in the batch.
"""

import hashlib
from contextlib import contextmanager

import lmdb

from . import aggregates
from .batch import Results
from .codec import (Account, Consumed, Coupon, Hold, JournalEntry, Lot, Operation,
                    encode_coupon_closed, encode_coupon_issued, encode_lots,
                    iter_ops)
from .reads import LedgerReads
from .records import (BIRTHDAY_OF_KEY, BIRTHDAY_VALUE, CARD, COUNTER_VALUE,
                      COUPON_EARNED, COUPON_GIVEN_BACK, COUPON_MOVED,
                      COUPON_ONE_PER_CUSTOMER,
                      DATABASES, DAYS_IN_MONTH, DIGEST_SIZE, EXPIRY_KEY,
                      HASH_SIZE, HEAD, I64, IDX_BIRTHDAY, IDX_BIRTHDAY_OF,
                      IDX_TIER, INT64_MAX, INT64_MIN, LINKED, MAX_COUPONS,
                      MAX_HOLDS, MAX_KEY,
                      MAX_DATA, MAX_LOTS, MAX_OP_ID, MAX_TIER,
                      LEDGER_FORMAT, MAX_UTC_OFFSET, MEMBER_INDEX_KEY, META_FORMAT, META_HEAD,
                      META_NEXT_ACCOUNT, NEVER, PROFILE_ERASE, PROGRAM,
                      PROGRAM_ALLOW_DEBT, REFUND_KEEP_COUPON, REFUND_PROPORTIONAL,
                      RELEASE_CAPTURED, RELEASE_EXPIRED, RELEASE_VOIDED,
                      RESULT, RESULT_REPLAYED, SYSTEM_KEY, TRANSFER_ALL,
                      TRANSFER_ONE_COUPON, U32,
                      U64, CardStatus, Code, CouponState, Entry, HoldState, Kind,
                      LedgerError, MapFullError, Status, Sys, external_key,
                      format_problem, system_account)

REFUNDABLE = (Kind.EARN, Kind.SPEND, Kind.CAPTURE)
COUPON_KINDS = (Kind.ISSUE_COUPON, Kind.REDEEM_COUPON)
# Their data is a profile: kept in `profiles` only, not in the ops record,
# so that deleting the profile leaves no copy of it in the ledger.
PROFILE_KINDS = (Kind.OPEN_ACCOUNT, Kind.SET_PROFILE)


class Rejected(Exception):
    """An operation is refused with `code`; nothing it did is kept."""

    def __init__(self, code):
        self.code = code


def checked(value):
    if not INT64_MIN <= value <= INT64_MAX:
        raise Rejected(Code.OVERFLOW)
    return value


def payload_digest(raw):
    return hashlib.blake2b(raw, digest_size=DIGEST_SIZE).digest()


def chain_hash(previous, body):
    return hashlib.blake2b(previous + body, digest_size=HASH_SIZE).digest()


class Ledger(LedgerReads):
    """One ledger over one LMDB environment (a directory)."""

    def __init__(self, path, *, map_size=1 << 30, sync=True):
        self.path = str(path)
        self._env = lmdb.open(self.path, map_size=map_size, max_dbs=32,
                              sync=sync, metasync=sync, readahead=False)
        try:   # as the kernel's open does: refused before anything is written
            problem = self._format_problem()
            if problem is not None:
                raise LedgerError(problem)
            self._dbs = {name.decode(): self._env.open_db(name) for name in DATABASES}
            with self._env.begin(write=True) as txn:
                if txn.get(META_FORMAT, db=self._dbs["meta"]) is None:
                    txn.put(META_FORMAT, U32.pack(LEDGER_FORMAT), db=self._dbs["meta"])
        except BaseException:
            self._env.close()
            raise

    def _format_problem(self):
        """records.format_problem of the ledger on disk (None for a new one)."""
        with self._env.begin() as txn:
            try:
                meta = self._env.open_db(b"meta", txn=txn, create=False)
            except lmdb.NotFoundError:
                return None   # nothing stored yet
            return format_problem(self.path, txn.get(META_FORMAT, db=meta),
                                  txn.get(META_HEAD, db=meta) is not None)

    def close(self):
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def apply(self, batch, now):
        """Apply a batch in one durable transaction; one result per operation."""
        ops = list(iter_ops(bytes(batch)))
        out = bytearray()
        try:
            with self._env.begin(write=True) as txn:
                state = _BatchState(txn, self._dbs, now)
                i = 0
                while i < len(ops):
                    end = i + 1  # a chain runs to its first op not linked
                    while ops[end - 1].link & LINKED and end < len(ops):
                        end += 1
                    if end - i == 1 and not ops[i].link & LINKED:
                        results = [state.apply(ops[i])]
                    else:
                        results = state.apply_chain(ops[i:end])
                    for code, flags, a, b in results:
                        out += RESULT.pack(code, flags, a, b)
                    i = end
                state.finish()
        except lmdb.MapFullError as exc:
            raise MapFullError(str(exc)) from None
        except lmdb.Error as exc:
            raise LedgerError(str(exc)) from None
        return Results(out)

    @contextmanager
    def _snapshot(self):
        try:
            txn = self._env.begin()
        except lmdb.Error as exc:
            raise LedgerError(str(exc)) from None
        with txn:
            yield _Snapshot(txn, self._dbs)

    def copy(self, path, compact=True):
        self._env.copy(str(path), compact=compact)


class _Snapshot:
    def __init__(self, txn, dbs):
        self._txn = txn
        self._dbs = dbs

    def get(self, db, key):
        try:
            return self._txn.get(key, db=self._dbs[db])
        except lmdb.Error as exc:
            raise LedgerError(str(exc)) from None

    def scan(self, db, start=b""):
        with self._txn.cursor(db=self._dbs[db]) as cursor:
            if not cursor.set_range(start):
                return
            for key, value in cursor:
                yield bytes(key), bytes(value)


class _BatchState:
    """A write transaction, the journal head, and the operation in flight."""

    def __init__(self, txn, dbs, now):
        self.txn = txn
        self.db = dbs
        self.now = now
        head = txn.get(META_HEAD, db=dbs["meta"])
        self.seq, self.hash = HEAD.unpack(head) if head else (0, bytes(HASH_SIZE))
        raw = txn.get(META_NEXT_ACCOUNT, db=dbs["meta"])
        self.next_account = U64.unpack(raw)[0] if raw else 1

    def finish(self):
        self.txn.put(META_HEAD, HEAD.pack(self.seq, self.hash), db=self.db["meta"])
        self.txn.put(META_NEXT_ACCOUNT, U64.pack(self.next_account),
                     db=self.db["meta"])

    def get(self, db, key):
        return self.txn.get(key, db=self.db[db])

    def apply(self, op):
        """Returns (code, flags, a, b) for one operation."""
        work = _Work(self)
        try:
            replayed = self._step(work, op)
        except Rejected as rejected:
            return rejected.code, 0, 0, 0
        if replayed is not None:
            return replayed
        work.commit()
        return Code.OK, 0, work.record.a, work.record.b

    def apply_chain(self, ops):
        """A chain (records.py): all of it, or nothing and LINKED_FAILED.

        Its operations share one `_Work`, so each sees what the earlier ones
        changed; each claims its id as it succeeds (so a later one may name
        it), and the claims are taken back if a later one fails."""
        failed = [(Code.LINKED_FAILED, 0, 0, 0)] * len(ops)
        if ops[-1].link & LINKED:
            return failed[:-1] + [(Code.LINK_OPEN, 0, 0, 0)]
        work, results, claimed = _Work(self), [], []
        for i, op in enumerate(ops):
            try:
                replayed = self._step(work, op)
            except Rejected as rejected:
                for op_id in claimed:
                    self.txn.delete(op_id, db=self.db["ops"])
                failed[i] = (rejected.code, 0, 0, 0)
                return failed
            if replayed is not None:
                results.append(replayed)
                continue
            self.txn.put(op.op_id, work.record.encode(), db=self.db["ops"])
            claimed.append(op.op_id)
            results.append((Code.OK, 0, work.record.a, work.record.b))
        work.commit(records=False)
        return results

    def _step(self, work, op):
        """Works out one operation into `work`: its first result when its
        id was seen before, else None; Rejected when it is refused."""
        if not 1 <= len(op.op_id) <= MAX_OP_ID:
            raise Rejected(Code.OP_ID_INVALID)
        digest = payload_digest(op.raw)
        stored = self.get("ops", op.op_id)
        if stored is not None:
            first = Operation.decode(stored)
            if first.digest != digest:
                raise Rejected(Code.OP_ID_REUSED)
            return first.code, RESULT_REPLAYED, first.a, first.b
        if op.link & ~LINKED:
            raise Rejected(Code.FLAGS_INVALID)
        handler = _HANDLERS.get(op.kind)
        if handler is None:
            raise Rejected(Code.KIND_INVALID)
        work.begin(op, digest)
        handler(work, op)
        work.fold_aggregates()
        return None


class _Work:
    """Changes of one operation (or one chain of them), kept in memory
    until it succeeds."""

    def __init__(self, state):
        self.state = state
        self.now = state.now
        self.accounts = {}
        self.puts = []       # (db, key, value)
        self.entries = []    # JournalEntry without seq and hash
        self.folded = 0      # entries folded into the aggregates so far
        self.system = {}     # (program, kind, partner) -> new balance
        self.aggregates = {}  # key -> new row (list of ints; None: member day)
        self.next_account = state.next_account

    def begin(self, op, digest):
        """The operation in flight, and its record."""
        self.op = op
        self.record = Operation(
            digest=digest, kind=op.kind, store=op.store,
            data=b"" if op.kind in PROFILE_KINDS else op.data)

    # --- loading -----------------------------------------------------------
    def account(self, account_id):
        if account_id in self.accounts:
            return self.accounts[account_id]
        raw = self.state.get("accounts", U64.pack(account_id)) if account_id else None
        if raw is None:
            raise Rejected(Code.ACCOUNT_NOT_FOUND)
        account = Account.decode(raw)
        self.accounts[account_id] = account
        return account

    def usable_account(self, account_id):
        """An account that may earn and spend: loaded, active, touched."""
        account = self.account(account_id)
        if account.status == Status.BLOCKED:
            raise Rejected(Code.ACCOUNT_BLOCKED)
        if account.status == Status.CLOSED:
            raise Rejected(Code.ACCOUNT_CLOSED)
        self.touch(account_id)
        return account

    def resolve(self, op):
        """The account an operation names: by id, or by a card in `key2`
        (checked in the same transaction, so a card blocked a moment ago
        cannot earn or spend)."""
        if not op.key2:
            return op.account
        account_id, status = _load_card(self, _card_key(op.key2))
        if status != CardStatus.ACTIVE:
            raise Rejected(Code.CARD_BLOCKED)
        if op.account not in (0, account_id):
            raise Rejected(Code.KEY_INVALID)
        return account_id

    def program_flags(self, program):
        raw = self.state.get("programs", U32.pack(program))
        if raw is None:
            raise Rejected(Code.PROGRAM_NOT_FOUND)
        return PROGRAM.unpack_from(raw)[0]

    # --- journal -----------------------------------------------------------
    def event(self, type_, program, subject, *, amount=0, amount2=0, ref=0,
              data=b"", store=None, partner=None):
        self.entries.append(JournalEntry(
            0, type_, 0, program,
            self.op.partner if partner is None else partner, 0, self.op.version,
            self.op.store if store is None else store, self.now,
            self.op.business_time, 0, subject, amount, amount2, ref,
            self.op.op_id, data))

    def post(self, type_, program, debit, credit, amount, *, sys_kind,
             partner=0, partner2=0, amount2=0, ref=0, store=None, lots=()):
        """A double-entry posting: `amount` leaves debit and reaches credit.

        Entries carry the store of the operation that made them, except what
        no store did (expiry, hold timeouts on touch): store 0. `lots`:
        (lot_no, points, issued_hour) of the lots it took points out of or
        put them back into, kept as its data (records.py)."""
        for account_id, delta in ((debit, -amount), (credit, amount)):
            if account_id == system_account(sys_kind, partner):
                key = (program, sys_kind, partner)
                if key not in self.system:
                    raw = self.state.get("system", SYSTEM_KEY.pack(*key))
                    self.system[key] = I64.unpack(raw)[0] if raw else 0
                self.system[key] = checked(self.system[key] + delta)
        self.entries.append(JournalEntry(
            0, type_, sys_kind, program, partner, partner2, self.op.version,
            self.op.store if store is None else store, self.now,
            self.op.business_time, debit, credit, amount, amount2, ref,
            self.op.op_id, encode_lots(lots)))

    # --- lots and holds ----------------------------------------------------
    def touch(self, account_id):
        """Burn expired lots, release timed-out holds, pay debt from lots."""
        account = self.account(account_id)
        while account.lots and account.lots[0].expires_at <= self.now:
            lot = account.lots.pop(0)
            account.balance = checked(account.balance - lot.remaining)
            account.expired = checked(account.expired + lot.remaining)
            self.post(Entry.EXPIRE, account.program, account_id,
                      system_account(Sys.EXPIRED, lot.partner), lot.remaining,
                      sys_kind=Sys.EXPIRED, partner=lot.partner,
                      partner2=lot.partner, ref=lot.lot_no, store=0,
                      lots=[(lot.lot_no, lot.remaining, lot.issued_hour)])
        kept = []
        for hold in account.holds:
            if hold.expires_at <= self.now:
                account.held -= hold.amount
                self.event(Entry.HOLD_RELEASED, account.program, account_id,
                           amount=hold.amount, amount2=RELEASE_EXPIRED,
                           ref=hold.hold_no, store=0)
            else:
                kept.append(hold)
        account.holds = kept
        if account.debt > 0:
            # debt is repaid from free points only: what holds reserve stands
            free = max(0, self.active_points(account) - account.held)
            paid = self.take_active(account, min(account.debt, free))
            account.debt -= sum(c.amount for c in paid)
        for coupon in account.coupons:
            if coupon.state == CouponState.OPEN and coupon.expires_at <= self.now:
                self.close_coupon(account_id, coupon, CouponState.EXPIRED, store=0)

    def close_coupon(self, account_id, coupon, state, amount=0, store=None):
        """An open coupon of the account's is no longer: `state`; `amount`,
        the money it took off when redeemed."""
        coupon.state = state
        self.event(Entry.COUPON_CLOSED, self.account(account_id).program, account_id,
                   amount=amount, amount2=state, ref=coupon.number, store=store,
                   data=encode_coupon_closed(coupon.value))

    def active_points(self, account):
        return sum(lot.remaining for lot in account.lots
                   if lot.activates_at <= self.now < lot.expires_at)

    def available(self, account):
        return self.active_points(account) - account.held - account.debt

    def take_active(self, account, amount):
        """Take up to `amount` from active lots, earliest expiry first."""
        taken = []
        for lot in account.lots:
            if amount == 0:
                break
            if lot.activates_at > self.now:
                continue
            part = min(lot.remaining, amount)
            lot.remaining -= part
            amount -= part
            taken.append(Consumed(lot.lot_no, lot.partner, part,
                                  lot.activates_at, lot.expires_at,
                                  lot.issued_hour))
        account.lots = [lot for lot in account.lots if lot.remaining > 0]
        return taken

    def add_lot(self, account_id, lot):
        """Put points into a lot (an existing one with that number, or new)."""
        account = self.account(account_id)
        for existing in account.lots:
            if existing.lot_no == lot.lot_no:
                existing.remaining = checked(existing.remaining + lot.remaining)
                return
        if len(account.lots) >= MAX_LOTS:
            raise Rejected(Code.TOO_MANY_LOTS)
        earliest = account.lots[0].expires_at if account.lots else NEVER
        account.lots.append(lot)
        account.lots.sort(key=Lot.sort_key)
        # The expiry index holds one entry per account, at or before its
        # earliest lot's expiry (the sweep moves it on), so an earning that
        # expires after what the account has writes no index page.
        if lot.expires_at < earliest:
            self.index_expiry(account_id)

    def index_expiry(self, account_id):
        self.puts.append(("lot_expiry", EXPIRY_KEY.pack(
            self.account(account_id).lots[0].expires_at, account_id), b""))

    def new_lot(self, account_id, partner, points, activates_at, expires_at,
                issued_hour=None):
        """A lot of points issued now (their cohort: this hour), or moved
        from another account's lot, whose issued_hour it keeps."""
        account = self.account(account_id)
        lot_no = account.next_lot
        account.next_lot += 1
        if issued_hour is None:
            issued_hour = aggregates.hour_of(self.now)
        self.add_lot(account_id, Lot(lot_no, partner, points, activates_at,
                                     expires_at, issued_hour))
        return lot_no

    def check_lot_times(self, op):
        if not (0 <= op.activates_at < op.expires_at and op.expires_at > self.now):
            raise Rejected(Code.TIME_INVALID)

    def by_partner(self, consumed):
        """Consumed points per issuing partner, in order of appearance:
        (partner, points, [(lot_no, points, issued_hour)] in order)."""
        groups = {}
        for c in consumed:
            points, lots = groups.get(c.partner, (0, []))
            lots.append((c.lot_no, c.amount, c.issued_hour))
            groups[c.partner] = (points + c.amount, lots)
        return [(partner, points, lots)
                for partner, (points, lots) in groups.items()]

    def find_hold(self, key):
        """The HOLD operation named by `key` (an op id), still open."""
        if not 1 <= len(key) <= MAX_OP_ID:
            raise Rejected(Code.KEY_INVALID)
        raw = self.state.get("ops", key)
        hold = Operation.decode(raw) if raw is not None else None
        if hold is None or hold.kind != Kind.HOLD:
            raise Rejected(Code.HOLD_NOT_FOUND)
        if hold.hold_state == HoldState.CAPTURED:
            raise Rejected(Code.HOLD_CAPTURED)
        if hold.hold_state == HoldState.VOIDED:
            raise Rejected(Code.HOLD_VOIDED)
        return hold

    def release_hold(self, account_id, hold_no, reason):
        account = self.account(account_id)
        for i, hold in enumerate(account.holds):
            if hold.hold_no == hold_no:
                del account.holds[i]
                account.held -= hold.amount
                self.event(Entry.HOLD_RELEASED, account.program, account_id,
                           amount=hold.amount, amount2=reason, ref=hold_no)
                return hold.amount
        raise Rejected(Code.HOLD_EXPIRED)  # touch released it at its timeout

    def rewrite_operation(self, op_id, record):
        self.puts.append(("ops", op_id, record.encode()))

    # --- bonuses -------------------------------------------------------------
    def earn(self, account_id, op):
        """`op.amount2` points as a new lot, issued at the op's partner:
        what a receipt earns, or a bonus."""
        account = self.account(account_id)
        points = op.amount2
        account.balance = checked(account.balance + points)
        account.earned = checked(account.earned + points)
        lot_no = self.new_lot(account_id, op.partner, points, op.activates_at,
                              op.expires_at)
        self.post(Entry.EARN, account.program,
                  system_account(Sys.ISSUED, op.partner), account_id, points,
                  sys_kind=Sys.ISSUED, partner=op.partner, ref=lot_no)
        return lot_no

    def counter(self, account_id, name):
        """(count, awards) of a member's bonus counter."""
        raw = self.state.get("bonus_counters", U64.pack(account_id) + name)
        return COUNTER_VALUE.unpack(raw) if raw else (0, 0)

    def count(self, account_id, name, count, awards, points, lot_no):
        """The counter's new values, and the BONUS event that says so."""
        account = self.account(account_id)
        self.puts.append(("bonus_counters", U64.pack(account_id) + name,
                          COUNTER_VALUE.pack(count, awards)))
        self.event(Entry.BONUS, account.program, account_id, amount=points,
                   amount2=count, ref=lot_no, data=name)
        record = self.record
        record.program, record.account, record.partner = (
            account.program, account_id, self.op.partner)
        record.earned, record.earned_lot = points, lot_no
        record.a, record.b = lot_no, count

    def index_birthday(self, account_id, program, birthday):
        """Moves the member's birthday in `member_index` (0: none)."""
        of = BIRTHDAY_OF_KEY.pack(IDX_BIRTHDAY_OF, account_id)
        raw = self.state.get("member_index", of)
        old = BIRTHDAY_VALUE.unpack(raw)[0] if raw else 0
        if old == birthday:
            return
        if old:
            self.puts.append(("member_index", MEMBER_INDEX_KEY.pack(
                IDX_BIRTHDAY, program, old, account_id), None))
        if birthday:
            self.puts.append(("member_index", MEMBER_INDEX_KEY.pack(
                IDX_BIRTHDAY, program, birthday, account_id), b""))
        self.puts.append(("member_index", of, BIRTHDAY_VALUE.pack(birthday)
                          if birthday else None))

    # --- aggregates ----------------------------------------------------------
    def fold_aggregates(self):
        """The operation's entries folded into the report rows, checked like
        any other sum: an overflow rejects the operation."""
        for i in range(self.folded, len(self.entries)):
            entry = self.entries[i]
            entry.seq = self.state.seq + 1 + i  # its seq if the op commits
            if not aggregates.counted(entry):
                continue
            account = self.accounts[aggregates.member_of(entry)]
            offset = (self.utc_offset(entry.program)
                      if entry.type == Entry.RECEIPT else 0)
            deltas, account.visit_days = aggregates.changes(
                entry, account.tier, offset, account.visit_days)
            for key, index, delta in deltas:
                if index is None:  # a member-day row: its value is set
                    self.aggregates[key] = [delta]
                    continue
                if key not in self.aggregates:
                    raw = self.state.get("aggregates", key)
                    self.aggregates[key] = (
                        list(aggregates.decode_value(key, raw)) if raw
                        else [0] * aggregates.width(key))
                row = self.aggregates[key]
                row[index] = checked(row[index] + delta)
        self.folded = len(self.entries)

    def utc_offset(self, program):
        raw = self.state.get("programs", U32.pack(program))
        return PROGRAM.unpack_from(raw)[3] if raw else 0

    # --- commit ------------------------------------------------------------
    def commit(self, records=True):
        """Writes it all; `records`: the operation's record too (a chain's
        were written as each succeeded)."""
        state, txn, db = self.state, self.state.txn, self.state.db
        for account_id, account in self.accounts.items():
            txn.put(U64.pack(account_id), account.encode(), db=db["accounts"])
        for name, key, value in self.puts:
            if value is None:
                txn.delete(key, db=db[name])
            else:
                txn.put(key, value, db=db[name])
        for key, balance in self.system.items():
            txn.put(SYSTEM_KEY.pack(*key), I64.pack(balance), db=db["system"])
        for key, row in self.aggregates.items():
            txn.put(key, aggregates.encode_value(key, row), db=db["aggregates"])
        for entry in self.entries:
            state.seq += 1
            entry.seq = state.seq
            state.hash = chain_hash(state.hash, entry.body())
            txn.put(U64.pack(entry.seq), entry.body() + state.hash,
                    db=db["journal"], append=True)
        state.next_account = self.next_account
        if records:
            txn.put(self.op.op_id, self.record.encode(), db=db["ops"])


# --- operations --------------------------------------------------------------

def _birthday(op):
    """The birthday an OPEN_ACCOUNT or SET_PROFILE carries in `reason`:
    month * 100 + day, or 0 for none."""
    month, day = divmod(op.reason, 100)
    if op.reason and not (1 <= month <= 12 and 1 <= day <= DAYS_IN_MONTH[month - 1]):
        raise Rejected(Code.TIME_INVALID)
    return op.reason


def _put_program(work, op):
    """`reason` is the program's UTC offset in minutes, an int32."""
    if op.program == 0:
        raise Rejected(Code.KEY_INVALID)
    if op.flags & ~PROGRAM_ALLOW_DEBT:
        raise Rejected(Code.FLAGS_INVALID)
    utc_offset = op.reason - (1 << 32) if op.reason >= 1 << 31 else op.reason
    if not -MAX_UTC_OFFSET <= utc_offset <= MAX_UTC_OFFSET:
        raise Rejected(Code.TIME_INVALID)
    raw = work.state.get("programs", U32.pack(op.program))
    created = PROGRAM.unpack_from(raw)[1] if raw else work.now
    work.puts.append(("programs", U32.pack(op.program),
                      PROGRAM.pack(op.flags, created, work.now, utc_offset)
                      + op.data))
    work.event(Entry.PROGRAM_PUT, op.program, 0, amount=op.flags,
               amount2=utc_offset)
    work.record.program = op.program
    work.record.a = op.program


def _open_account(work, op):
    work.program_flags(op.program)
    if not 1 <= len(op.key) <= MAX_KEY:
        raise Rejected(Code.KEY_INVALID)
    birthday = _birthday(op)
    key = external_key(op.program, op.key)
    if work.state.get("externals", key) is not None:
        raise Rejected(Code.ACCOUNT_EXISTS)
    account_id = work.next_account
    work.next_account += 1
    work.accounts[account_id] = Account(op.program, opened_at=work.now)
    work.puts.append(("externals", key, U64.pack(account_id)))
    if op.data:
        work.puts.append(("profiles", U64.pack(account_id), op.data))
    work.index_birthday(account_id, op.program, birthday)
    work.event(Entry.ACCOUNT_OPENED, op.program, account_id, data=op.key)
    work.record.program = op.program
    work.record.account = work.record.a = account_id


def _set_account_status(work, op):
    if op.amount not in (Status.ACTIVE, Status.BLOCKED, Status.CLOSED):
        raise Rejected(Code.STATUS_INVALID)
    account = work.account(op.account)
    if account.status == Status.CLOSED:
        raise Rejected(Code.ACCOUNT_CLOSED)
    account.status = op.amount
    work.event(Entry.ACCOUNT_STATUS, account.program, op.account,
               amount=op.amount)
    work.record.account = op.account
    work.record.a = op.amount


def _set_profile(work, op):
    """Store or delete a member's profile; with PROFILE_ERASE and the
    member's external id in `key`, delete that mapping too. Any status: a
    closed member's personal data can still be erased."""
    if op.flags & ~PROFILE_ERASE:
        raise Rejected(Code.FLAGS_INVALID)
    birthday = _birthday(op)
    account = work.account(op.account)
    if op.flags & PROFILE_ERASE and op.key:
        if len(op.key) > MAX_KEY:
            raise Rejected(Code.KEY_INVALID)
        key = external_key(account.program, op.key)
        raw = work.state.get("externals", key)
        if raw is None or U64.unpack(raw)[0] != op.account:
            raise Rejected(Code.KEY_INVALID)
        work.puts.append(("externals", key, None))
    work.puts.append(("profiles", U64.pack(op.account), op.data or None))
    work.index_birthday(op.account, account.program, birthday)
    work.event(Entry.PROFILE_SET, account.program, op.account, amount=op.flags)
    work.record.program = account.program
    work.record.account = work.record.a = op.account


def _set_tier(work, op):
    """Journaled only when the tier changes: a period close run twice
    leaves one entry."""
    if not 0 <= op.amount <= MAX_TIER:
        raise Rejected(Code.AMOUNT_INVALID)
    account = work.account(op.account)
    if account.status == Status.CLOSED:
        raise Rejected(Code.ACCOUNT_CLOSED)
    previous = account.tier
    if op.amount != previous:
        account.tier = op.amount
        if previous:
            work.puts.append(("member_index", MEMBER_INDEX_KEY.pack(
                IDX_TIER, account.program, previous, op.account), None))
        if op.amount:
            work.puts.append(("member_index", MEMBER_INDEX_KEY.pack(
                IDX_TIER, account.program, op.amount, op.account), b""))
        work.event(Entry.TIER_SET, account.program, op.account,
                   amount=op.amount, amount2=previous)
    work.record.program, work.record.account = account.program, op.account
    work.record.a, work.record.b = op.amount, previous


def _card_key(key):
    if not 1 <= len(key) <= MAX_KEY:
        raise Rejected(Code.KEY_INVALID)
    return key


def _link_card(work, op):
    card = _card_key(op.key)
    account = work.account(op.account)
    if account.status == Status.CLOSED:
        raise Rejected(Code.ACCOUNT_CLOSED)
    if work.state.get("cards", card) is not None:
        raise Rejected(Code.CARD_EXISTS)
    work.puts.append(("cards", card, CARD.pack(op.account, CardStatus.ACTIVE)))
    work.event(Entry.CARD_LINKED, account.program, op.account, data=card)
    work.record.account = work.record.a = op.account


def _load_card(work, card):
    raw = work.state.get("cards", card)
    if raw is None:
        raise Rejected(Code.CARD_NOT_FOUND)
    return CARD.unpack(raw)


def _block_card(work, op):
    card = _card_key(op.key)
    account_id, status = _load_card(work, card)
    if status != CardStatus.ACTIVE:
        raise Rejected(Code.CARD_BLOCKED)
    account = work.account(account_id)
    work.puts.append(("cards", card, CARD.pack(account_id, CardStatus.BLOCKED)))
    work.event(Entry.CARD_BLOCKED, account.program, account_id, data=card)
    work.record.account = work.record.a = account_id


def _replace_card(work, op):
    old, new = _card_key(op.key), _card_key(op.key2)
    account_id, status = _load_card(work, old)
    if status == CardStatus.REPLACED:
        raise Rejected(Code.CARD_BLOCKED)
    if old == new or work.state.get("cards", new) is not None:
        raise Rejected(Code.CARD_EXISTS)
    account = work.account(account_id)
    if account.status == Status.CLOSED:
        raise Rejected(Code.ACCOUNT_CLOSED)
    work.puts.append(("cards", old, CARD.pack(account_id, CardStatus.REPLACED)))
    work.puts.append(("cards", new, CARD.pack(account_id, CardStatus.ACTIVE)))
    work.event(Entry.CARD_REPLACED, account.program, account_id, data=old)
    work.event(Entry.CARD_LINKED, account.program, account_id, data=new)
    work.record.account = work.record.a = account_id


def _receipt(work, op):
    """EARN, SPEND and CAPTURE: spend `amount`, earn `amount2`, one receipt."""
    spend, earn = op.amount, op.amount2
    if spend < 0 or earn < 0 or op.money < 0:
        raise Rejected(Code.AMOUNT_INVALID)
    if op.kind == Kind.EARN and (spend != 0 or earn == 0):
        raise Rejected(Code.AMOUNT_INVALID)
    if op.kind == Kind.SPEND and (earn != 0 or spend == 0):
        raise Rejected(Code.AMOUNT_INVALID)
    has_hold = op.kind == Kind.CAPTURE and op.key != b""
    if (op.kind == Kind.CAPTURE and not has_hold and spend == 0 and earn == 0
            and op.money == 0):
        raise Rejected(Code.AMOUNT_INVALID)  # money alone records a visit
    if earn > 0:
        work.check_lot_times(op)
    account_id = work.resolve(op)
    hold = None
    if has_hold:
        hold = work.find_hold(op.key)
        if account_id not in (0, hold.account):
            raise Rejected(Code.HOLD_NOT_FOUND)
        account_id = hold.account
    account = work.usable_account(account_id)
    record = work.record
    if hold is not None:
        held = work.release_hold(account_id, hold.hold_no, RELEASE_CAPTURED)
        if spend > held:
            raise Rejected(Code.CAPTURE_EXCEEDS_HOLD)
        hold.hold_state = HoldState.CAPTURED
        work.rewrite_operation(op.key, hold)
        record.hold_no = hold.hold_no
    if spend > 0:
        # a hold's points stand even against a debt that came after it
        free = work.active_points(account) - account.held
        if hold is None:
            free -= account.debt
        if free < spend:
            raise Rejected(Code.INSUFFICIENT_POINTS)
        record.consumed = work.take_active(account, spend)
        account.balance = checked(account.balance - spend)
        account.spent = checked(account.spent + spend)
        for partner, points, lots in work.by_partner(record.consumed):
            work.post(Entry.SPEND, account.program, account_id,
                      system_account(Sys.REDEEMED, op.partner), points,
                      sys_kind=Sys.REDEEMED, partner=op.partner,
                      partner2=partner, lots=lots)
    lot_no = work.earn(account_id, op) if earn > 0 else 0
    if op.money > 0:  # the receipt itself: visits and money, for reports
        work.event(Entry.RECEIPT, account.program, account_id, amount=op.money,
                   amount2=spend, ref=lot_no)
    work.touch(account_id)
    record.program, record.account, record.partner = (
        account.program, account_id, op.partner)
    record.money, record.spent, record.earned = op.money, spend, earn
    record.earned_lot = lot_no
    if op.kind == Kind.EARN:
        record.a = lot_no
    elif op.kind == Kind.SPEND:
        record.a = spend
    else:
        record.a, record.b = spend, lot_no


def _hold(work, op):
    if op.amount <= 0:
        raise Rejected(Code.AMOUNT_INVALID)
    if op.expires_at <= work.now:
        raise Rejected(Code.TIME_INVALID)
    account_id = work.resolve(op)
    account = work.usable_account(account_id)
    if len(account.holds) >= MAX_HOLDS:
        raise Rejected(Code.TOO_MANY_HOLDS)
    if work.available(account) < op.amount:
        raise Rejected(Code.INSUFFICIENT_POINTS)
    hold_no = account.next_hold
    account.next_hold += 1
    account.holds.append(Hold(hold_no, op.amount, op.expires_at))
    account.held = checked(account.held + op.amount)
    work.puts.append(("hold_expiry", EXPIRY_KEY.pack(op.expires_at, account_id),
                      b""))
    work.event(Entry.HOLD_PLACED, account.program, account_id,
               amount=op.amount, amount2=op.expires_at, ref=hold_no)
    record = work.record
    record.program, record.account = account.program, account_id
    record.hold_state, record.hold_no = HoldState.OPEN, hold_no
    record.a = hold_no


def _void(work, op):
    hold = work.find_hold(op.key)
    account = work.account(hold.account)
    work.touch(hold.account)
    released = work.release_hold(hold.account, hold.hold_no, RELEASE_VOIDED)
    hold.hold_state = HoldState.VOIDED
    work.rewrite_operation(op.key, hold)
    record = work.record
    record.program, record.account = account.program, hold.account
    record.hold_no = hold.hold_no
    record.a = released


def _refund(work, op):
    if not 1 <= len(op.key) <= MAX_OP_ID:
        raise Rejected(Code.KEY_INVALID)
    if op.flags & ~(REFUND_PROPORTIONAL | REFUND_KEEP_COUPON):
        raise Rejected(Code.FLAGS_INVALID)
    if op.money < 0 or op.amount < 0 or op.amount2 < 0:
        raise Rejected(Code.AMOUNT_INVALID)
    raw = work.state.get("ops", op.key)
    if raw is None:
        raise Rejected(Code.OPERATION_NOT_FOUND)
    original = Operation.decode(raw)
    if original.kind in COUPON_KINDS:
        return _refund_coupon(work, op, original)
    if original.kind not in REFUNDABLE:
        raise Rejected(Code.NOT_REFUNDABLE)
    if op.flags & REFUND_KEEP_COUPON:
        raise Rejected(Code.FLAGS_INVALID)
    if len(original.data) + len(op.data) > MAX_DATA:
        raise Rejected(Code.DATA_TOO_LONG)
    refunded_money = checked(original.refunded_money + op.money)
    if refunded_money > original.money:
        raise Rejected(Code.REFUND_EXCEEDS_ORIGINAL)
    if op.flags & REFUND_PROPORTIONAL:
        if op.money == 0 or op.amount or op.amount2:
            raise Rejected(Code.AMOUNT_INVALID)
        # on the running total, so partial refunds add up to the whole;
        # never below zero after explicit refunds of the same receipt
        give = max(0, original.spent * refunded_money // original.money
                   - original.returned)
        claw = max(0, original.earned * refunded_money // original.money
                   - original.clawed)
    else:
        give, claw = op.amount, op.amount2
        if give == 0 and claw == 0 and op.money == 0:
            raise Rejected(Code.AMOUNT_INVALID)
        if (original.returned + give > original.spent
                or original.clawed + claw > original.earned):
            raise Rejected(Code.REFUND_EXCEEDS_ORIGINAL)
    account_id = original.account
    account = work.account(account_id)
    work.touch(account_id)
    if give:
        _give_back(work, account_id, original, give)
    if claw:
        _claw_back(work, account_id, original, claw)
    if op.money > 0:  # the money given back, so receipts sum to net spend;
        # at the receipt's partner, like the refund's postings
        work.event(Entry.RECEIPT, account.program, account_id,
                   amount=-op.money, amount2=-give, partner=original.partner)
    work.touch(account_id)
    original.refunded_money = refunded_money
    original.returned += give
    original.clawed += claw
    original.data += op.data  # the receipt's record lists its refunds' data
    work.rewrite_operation(op.key, original)
    record = work.record
    record.program, record.account = account.program, account_id
    record.money, record.partner = op.money, original.partner
    record.a, record.b = give, claw


def _give_back(work, account_id, original, give):
    """Return spent points to the lots they came from, last consumed first."""
    account = work.account(account_id)
    before, after = original.returned, original.returned + give
    returned = []
    for c in reversed(original.consumed):
        # points of this lot returned before and after this refund
        old = min(c.amount, before)
        new = min(c.amount, after)
        before, after = before - old, after - new
        if new > old:
            returned.append(Consumed(c.lot_no, c.partner, new - old,
                                     c.activates_at, c.expires_at,
                                     c.issued_hour))
            # into the lot itself, or the lot made again with its cohort
            work.add_lot(account_id, Lot(c.lot_no, c.partner, new - old,
                                         c.activates_at, c.expires_at,
                                         c.issued_hour))
    account.balance = checked(account.balance + give)
    account.spent = checked(account.spent - give)
    for partner, points, lots in work.by_partner(returned):
        work.post(Entry.RETURN, account.program,
                  system_account(Sys.REDEEMED, original.partner), account_id,
                  points, sys_kind=Sys.REDEEMED, partner=original.partner,
                  partner2=partner, lots=lots)


def _claw_back(work, account_id, original, claw):
    """Take back earned points: from the receipt's own lot, then from the
    available balance, then as debt where the program allows it."""
    account = work.account(account_id)
    left = claw
    lots = []  # what the receipt's own lot gave: its cohort's clawed points
    for lot in account.lots:
        if lot.lot_no == original.earned_lot:
            part = min(lot.remaining, left)
            if lot.activates_at <= work.now:  # active: held points stay
                part = min(part, max(work.available(account), 0))
            lot.remaining -= part
            left -= part
            if part:
                lots.append((lot.lot_no, part, lot.issued_hour))
    account.lots = [lot for lot in account.lots if lot.remaining > 0]
    if left:
        free = max(work.available(account), 0)
        taken = work.take_active(account, min(free, left))
        left -= sum(c.amount for c in taken)
    if left:
        if not work.program_flags(account.program) & PROGRAM_ALLOW_DEBT:
            raise Rejected(Code.INSUFFICIENT_POINTS)
        account.debt = checked(account.debt + left)
    account.balance = checked(account.balance - claw)
    account.earned = checked(account.earned - claw)
    work.post(Entry.CLAWBACK, account.program, account_id,
              system_account(Sys.ISSUED, original.partner), claw,
              sys_kind=Sys.ISSUED, partner=original.partner,
              partner2=original.partner, ref=original.earned_lot, lots=lots)


def _adjust(work, op):
    if op.amount == 0:
        raise Rejected(Code.AMOUNT_INVALID)
    account = work.account(op.account)
    if account.status == Status.CLOSED:
        raise Rejected(Code.ACCOUNT_CLOSED)
    work.touch(op.account)
    adjusted = system_account(Sys.ADJUSTED, op.partner)
    if op.amount > 0:
        work.check_lot_times(op)
        account.balance = checked(account.balance + op.amount)
        lot_no = work.new_lot(op.account, op.partner, op.amount,
                              op.activates_at, op.expires_at)
        work.post(Entry.ADJUST, account.program, adjusted, op.account,
                  op.amount, sys_kind=Sys.ADJUSTED, partner=op.partner,
                  amount2=op.reason, ref=lot_no)
        work.record.a = lot_no
    else:
        points = -op.amount
        if work.available(account) < points:
            raise Rejected(Code.INSUFFICIENT_POINTS)
        work.take_active(account, points)
        account.balance -= points
        work.post(Entry.ADJUST, account.program, op.account, adjusted,
                  points, sys_kind=Sys.ADJUSTED, partner=op.partner,
                  amount2=op.reason)
        work.record.a = points
    work.touch(op.account)
    work.record.program, work.record.account = account.program, op.account


def _transfer(work, op):
    if op.flags & ~(TRANSFER_ALL | TRANSFER_ONE_COUPON) or (
            op.flags == TRANSFER_ONE_COUPON):
        raise Rejected(Code.FLAGS_INVALID)
    everything = bool(op.flags & TRANSFER_ALL)
    if (op.amount != 0) if everything else (op.amount <= 0):
        raise Rejected(Code.AMOUNT_INVALID)
    if op.account == op.account2:
        raise Rejected(Code.SAME_ACCOUNT)
    source = work.account(op.account)
    target = work.account(op.account2)
    if source.program != target.program:
        raise Rejected(Code.PROGRAM_MISMATCH)
    if source.status == Status.CLOSED or target.status == Status.CLOSED:
        raise Rejected(Code.ACCOUNT_CLOSED)
    if target.status == Status.BLOCKED:
        raise Rejected(Code.ACCOUNT_BLOCKED)
    work.touch(op.account)
    work.touch(op.account2)
    if everything:
        if source.debt > 0:
            raise Rejected(Code.ACCOUNT_IN_DEBT)
        if source.holds:
            raise Rejected(Code.INSUFFICIENT_POINTS)
        moved = [Consumed(l.lot_no, l.partner, l.remaining, l.activates_at,
                          l.expires_at, l.issued_hour) for l in source.lots]
        source.lots = []
    else:
        if work.available(source) < op.amount:
            raise Rejected(Code.INSUFFICIENT_POINTS)
        moved = work.take_active(source, op.amount)
    total = sum(c.amount for c in moved)
    for c in moved:  # new lots of the target, in the same cohorts
        work.new_lot(op.account2, c.partner, c.amount, c.activates_at,
                     c.expires_at, c.issued_hour)
    source.balance -= total
    target.balance = checked(target.balance + total)
    if total:
        work.entries.append(JournalEntry(
            0, Entry.TRANSFER, 0, source.program, 0, 0, op.version, op.store,
            work.now, op.business_time, op.account, op.account2, total, 0, 0,
            op.op_id, b""))
    if everything:
        _merge_coupons(work, op.account, op.account2,
                       bool(op.flags & TRANSFER_ONE_COUPON))
    work.touch(op.account2)
    work.record.program, work.record.account = source.program, op.account
    work.record.a = total


def _sweep(work, op):
    """Expire lots and holds that are due, a bounded number of index keys."""
    if op.amount <= 0:
        raise Rejected(Code.AMOUNT_INVALID)
    due = []
    for name in ("lot_expiry", "hold_expiry"):
        with work.state.txn.cursor(db=work.state.db[name]) as cursor:
            if cursor.first():
                for key, _ in cursor:
                    if len(due) >= op.amount:
                        break
                    expires_at, account_id = EXPIRY_KEY.unpack(key)
                    if expires_at > work.now:
                        break
                    due.append((name, bytes(key), account_id))
    expired = 0
    for name, key, account_id in due:
        account = work.account(account_id)
        before = account.expired
        work.touch(account_id)
        expired = checked(expired + account.expired - before)
        work.puts.append((name, key, None))
        if name == "lot_expiry" and account.lots and account.lots[0].expires_at != NEVER:
            work.index_expiry(account_id)
    work.record.a, work.record.b = len(due), expired


def _award(work, op):
    """A bonus counted against the member's counter `key` (an action, a
    birthday): refused once the counter holds `amount` (0: no limit)."""
    if not 1 <= len(op.key) <= MAX_KEY:
        raise Rejected(Code.KEY_INVALID)
    if op.amount < 0 or op.amount2 <= 0:
        raise Rejected(Code.AMOUNT_INVALID)
    work.check_lot_times(op)
    work.usable_account(op.account)
    count, awards = work.counter(op.account, op.key)
    if op.amount and count >= op.amount:
        raise Rejected(Code.LIMIT_REACHED)
    lot_no = work.earn(op.account, op)
    work.count(op.account, op.key, checked(count + 1), checked(awards + 1),
               op.amount2, lot_no)
    work.touch(op.account)


def _visit(work, op):
    """Counts receipt `key2` as a visit on the member's counter `key`; the
    visit that brings the count to `amount` earns `amount2` points, once
    per counter (later visits count, earn nothing)."""
    if not 1 <= len(op.key) <= MAX_KEY or not 1 <= len(op.key2) <= MAX_OP_ID:
        raise Rejected(Code.KEY_INVALID)
    if op.amount <= 0 or op.amount2 <= 0:
        raise Rejected(Code.AMOUNT_INVALID)
    work.check_lot_times(op)
    raw = work.state.get("ops", op.key2)
    if raw is None:
        raise Rejected(Code.OPERATION_NOT_FOUND)
    receipt = Operation.decode(raw)
    if receipt.kind not in REFUNDABLE or op.account not in (0, receipt.account):
        raise Rejected(Code.KEY_INVALID)
    account_id = receipt.account
    work.usable_account(account_id)
    count, awards = work.counter(account_id, op.key)
    count = checked(count + 1)
    lot_no = points = 0
    if count >= op.amount and awards == 0:
        lot_no, points, awards = work.earn(account_id, op), op.amount2, 1
    work.count(account_id, op.key, count, awards, points, lot_no)
    work.touch(account_id)


# --- coupons ------------------------------------------------------------------

def _coupon_member(work, op):
    """(account id, Account) a coupon operation names (by id, or the card
    `key2`), usable; the receipt its `key` names, if any, must be theirs."""
    account_id = work.resolve(op)
    account = work.usable_account(account_id)
    if op.key:
        if len(op.key) > MAX_OP_ID:
            raise Rejected(Code.KEY_INVALID)
        raw = work.state.get("ops", op.key)
        receipt = Operation.decode(raw) if raw is not None else None
        if (receipt is None or receipt.kind not in REFUNDABLE
                or receipt.account != account_id):
            raise Rejected(Code.OPERATION_NOT_FOUND)
    return account_id, account


def _open_coupon(work, account_id, coupon, how, moved_from=()):
    """Makes `coupon` the member's (open), dropping their closed ones;
    `moved_from`: (account, number) of the coupon a merge moves."""
    account = work.account(account_id)
    account.coupons = [c for c in account.coupons if c.state == CouponState.OPEN]
    account.coupons.append(coupon)
    account.coupons.sort(key=lambda c: c.number)
    work.event(Entry.COUPON_ISSUED, account.program, account_id,
               amount=coupon.value, amount2=coupon.expires_at, ref=coupon.number,
               data=encode_coupon_issued(coupon.usable_from, how, *moved_from))


def _merge_coupons(work, source_id, target_id, one):
    """TRANSFER_ALL: the source's open coupons go to the target, or with
    `one` (TRANSFER_ONE_COUPON) the best of both members' (records.py)."""
    source, target = work.account(source_id), work.account(target_id)
    moving = [c for c in source.coupons if c.state == CouponState.OPEN]
    if not moving:
        return
    held = [c for c in target.coupons if c.state == CouponState.OPEN]
    if one:
        best = None
        for c in held + moving:  # the target's first: they win ties
            if best is None or (c.value, c.expires_at) > (best.value, best.expires_at):
                best = c
        for account_id, coupons in ((target_id, held), (source_id, moving)):
            for c in coupons:
                if c is not best:
                    work.close_coupon(account_id, c, CouponState.DISPLACED)
        moving = [c for c in moving if c is best]
    elif len(held) + len(moving) > MAX_COUPONS:
        raise Rejected(Code.TOO_MANY_COUPONS)
    for c in moving:
        work.close_coupon(source_id, c, CouponState.MOVED)
        number = target.next_coupon
        target.next_coupon += 1
        _open_coupon(work, target_id, Coupon(number, CouponState.OPEN, c.value,
                                             c.usable_from, c.expires_at),
                     COUPON_MOVED, (source_id, c.number))


def _issue_coupon(work, op):
    if op.flags & ~COUPON_ONE_PER_CUSTOMER:
        raise Rejected(Code.FLAGS_INVALID)
    if op.amount <= 0:
        raise Rejected(Code.AMOUNT_INVALID)
    work.check_lot_times(op)
    account_id, account = _coupon_member(work, op)
    held = [c for c in account.coupons if c.state == CouponState.OPEN]
    if op.flags & COUPON_ONE_PER_CUSTOMER and any(
            op.business_time < c.expires_at for c in held):
        raise Rejected(Code.COUPON_HELD)
    if len(held) >= MAX_COUPONS:
        raise Rejected(Code.TOO_MANY_COUPONS)
    number = account.next_coupon
    account.next_coupon += 1
    _open_coupon(work, account_id, Coupon(number, CouponState.OPEN, op.amount,
                                          op.activates_at, op.expires_at),
                 COUPON_EARNED)
    record = work.record
    record.program, record.account, record.partner = account.program, account_id, op.partner
    record.a, record.money = number, op.amount


def _redeem_coupon(work, op):
    if op.flags:
        raise Rejected(Code.FLAGS_INVALID)
    if op.amount <= 0:
        raise Rejected(Code.AMOUNT_INVALID)
    account_id, account = _coupon_member(work, op)
    coupon = next((c for c in account.coupons if c.number == op.amount2), None)
    if coupon is None or coupon.state in (CouponState.REVOKED, CouponState.MOVED,
                                          CouponState.DISPLACED):
        raise Rejected(Code.COUPON_NOT_FOUND)
    if coupon.state == CouponState.REDEEMED:
        raise Rejected(Code.COUPON_REDEEMED)
    if coupon.state == CouponState.EXPIRED or op.business_time >= coupon.expires_at:
        raise Rejected(Code.COUPON_EXPIRED)
    if op.business_time < coupon.usable_from:
        raise Rejected(Code.COUPON_NOT_USABLE)
    if op.amount > coupon.value:
        raise Rejected(Code.AMOUNT_INVALID)
    work.close_coupon(account_id, coupon, CouponState.REDEEMED, op.amount)
    record = work.record
    record.program, record.account, record.partner = account.program, account_id, op.partner
    record.a = coupon.number
    record.b = record.money = op.amount
    record.consumed = [Consumed(coupon.number, 0, coupon.value, coupon.usable_from,
                                coupon.expires_at, 0)]


def _refund_coupon(work, op, original):
    """A REFUND of a coupon operation: revoke the coupon it issued, or give
    back the one it redeemed, where that still can be; with
    REFUND_KEEP_COUPON only note it (records.py)."""
    keep = op.flags == REFUND_KEEP_COUPON and original.kind == Kind.REDEEM_COUPON
    if op.flags and not keep:
        raise Rejected(Code.FLAGS_INVALID)
    if op.money or op.amount or op.amount2:
        raise Rejected(Code.AMOUNT_INVALID)
    if len(original.data) + len(op.data) > MAX_DATA:
        raise Rejected(Code.DATA_TOO_LONG)
    if original.refunded_money:
        raise Rejected(Code.REFUND_EXCEEDS_ORIGINAL)
    account_id = original.account
    account = work.account(account_id)
    work.touch(account_id)
    changed = 0
    if original.kind == Kind.ISSUE_COUPON:
        for coupon in account.coupons:
            if coupon.number == original.a and coupon.state == CouponState.OPEN:
                work.close_coupon(account_id, coupon, CouponState.REVOKED)
                changed = coupon.value
    elif not keep:
        c = original.consumed[0]
        if c.expires_at > work.now and not any(
                x.state == CouponState.OPEN for x in account.coupons):
            _open_coupon(work, account_id, Coupon(c.lot_no, CouponState.OPEN, c.amount,
                                                  c.activates_at, c.expires_at),
                         COUPON_GIVEN_BACK)
            changed = c.amount
    if not keep:
        original.refunded_money = original.money
    original.data += op.data
    work.rewrite_operation(op.key, original)
    record = work.record
    record.program, record.account = account.program, account_id
    record.partner, record.a = original.partner, changed


_HANDLERS = {
    Kind.PUT_PROGRAM: _put_program,
    Kind.OPEN_ACCOUNT: _open_account,
    Kind.SET_ACCOUNT_STATUS: _set_account_status,
    Kind.LINK_CARD: _link_card,
    Kind.BLOCK_CARD: _block_card,
    Kind.REPLACE_CARD: _replace_card,
    Kind.EARN: _receipt,
    Kind.SPEND: _receipt,
    Kind.CAPTURE: _receipt,
    Kind.HOLD: _hold,
    Kind.VOID: _void,
    Kind.REFUND: _refund,
    Kind.ADJUST: _adjust,
    Kind.TRANSFER: _transfer,
    Kind.SWEEP: _sweep,
    Kind.SET_PROFILE: _set_profile,
    Kind.SET_TIER: _set_tier,
    Kind.ISSUE_COUPON: _issue_coupon,
    Kind.REDEEM_COUPON: _redeem_coupon,
    Kind.AWARD: _award,
    Kind.VISIT: _visit,
}
