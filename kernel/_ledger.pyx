# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ledger kernel: batches of priced operations applied over LMDB's C API.

A faithful port of `kopilka.core.twin` (the specification): same checks in
the same order, same result codes, same bytes stored. A whole batch runs with
the GIL released in one write transaction, committed durably. Each operation
(or chain of linked operations) is worked out in scratch memory first and
written only if it succeeds.
"""

cimport cython
from libc.stdint cimport (uint8_t, uint16_t, uint32_t, uint64_t, int32_t,
                          int64_t, INT64_MIN)
from libc.string cimport memcpy, memset, memcmp, memmove
from libc.stdlib cimport malloc, realloc, free
from libc.errno cimport ENOSPC, EDQUOT
from posix.types cimport off_t
from posix.unistd cimport usleep
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock,
                               PyThread_free_lock, WAIT_LOCK)

cdef extern from "fcntl.h" nogil:
    int posix_fallocate(int fd, off_t offset, off_t len)

include "_lmdb.pxi"

from kopilka.core.records import (LEDGER_FORMAT, META_FORMAT, U32, LedgerError,
                                  MapFullError, format_problem)

cdef extern from *:
    """
    typedef __int128 k_int128;
    static inline int k_add(int64_t a, int64_t b, int64_t *r) {
        int64_t t;  /* r may point into a packed record: copy, don't store */
        int overflow = __builtin_add_overflow(a, b, &t);
        memcpy(r, &t, sizeof t);
        return overflow;
    }
    static inline uint64_t k_be64(uint64_t v) { return __builtin_bswap64(v); }
    static inline uint32_t k_be32(uint32_t v) { return __builtin_bswap32(v); }
    static inline uint16_t k_be16(uint16_t v) { return __builtin_bswap16(v); }
    """
    ctypedef long long int128 "k_int128"
    int k_add(int64_t a, int64_t b, int64_t *r) nogil
    uint64_t k_be64(uint64_t v) nogil
    uint32_t k_be32(uint32_t v) nogil
    uint16_t k_be16(uint16_t v) nogil

cdef extern from "sodium.h" nogil:
    ctypedef struct crypto_generichash_state:
        pass
    int sodium_init()
    int crypto_generichash(unsigned char *out, size_t outlen,
                           const unsigned char *inp, unsigned long long inlen,
                           const unsigned char *key, size_t keylen)
    int crypto_generichash_init(crypto_generichash_state *state,
                                const unsigned char *key, size_t keylen,
                                size_t outlen)
    int crypto_generichash_update(crypto_generichash_state *state,
                                  const unsigned char *inp,
                                  unsigned long long inlen)
    int crypto_generichash_final(crypto_generichash_state *state,
                                 unsigned char *out, size_t outlen)

if sodium_init() < 0:
    raise ImportError("libsodium failed to initialise")

# --- constants (kopilka.core.records) ----------------------------------------
cdef enum:
    MAX_OP_ID = 128
    MAX_KEY = 128
    MAX_LOTS = 2048
    MAX_HOLDS = 256
    MAX_COUPONS = 16
    VISIT_DAYS = 16
    HASH_SIZE = 32
    DIGEST_SIZE = 16
    MAX_TIER = 65535
    MAX_DATA = 65535
    MAX_UTC_OFFSET = 1439
    NDB = 14
cdef int64_t NEVER = 0x7FFFFFFFFFFFFFFF
cdef int64_t HOUR = 3600000000LL
cdef int64_t DAY = 86400000000LL
cdef int64_t MINUTE = 60000000LL
cdef uint64_t SYSTEM = 1ULL << 63
cdef const char *META_HEAD_KEY = b"head"
cdef const char *META_NEXT_ACCOUNT_KEY = b"next_account"

# databases, in records.DATABASES order
cdef enum:
    DB_META = 0
    DB_PROGRAMS = 1
    DB_ACCOUNTS = 2
    DB_EXTERNALS = 3
    DB_CARDS = 4
    DB_OPS = 5
    DB_JOURNAL = 6
    DB_SYSTEM = 7
    DB_LOT_EXPIRY = 8
    DB_HOLD_EXPIRY = 9
    DB_PROFILES = 10
    DB_AGGREGATES = 11
    DB_MEMBER_INDEX = 12
    DB_BONUS_COUNTERS = 13
DB_NAMES = (b"meta", b"programs", b"accounts", b"externals", b"cards",
            b"ops", b"journal", b"system", b"lot_expiry", b"hold_expiry",
            b"profiles", b"aggregates", b"member_index", b"bonus_counters")

# kinds
cdef enum:
    K_PUT_PROGRAM = 1
    K_OPEN_ACCOUNT = 2
    K_SET_ACCOUNT_STATUS = 3
    K_LINK_CARD = 4
    K_BLOCK_CARD = 5
    K_REPLACE_CARD = 6
    K_EARN = 7
    K_SPEND = 8
    K_HOLD = 9
    K_CAPTURE = 10
    K_VOID = 11
    K_REFUND = 12
    K_ADJUST = 13
    K_TRANSFER = 14
    K_SWEEP = 15
    K_SET_PROFILE = 16
    K_SET_TIER = 17
    K_ISSUE_COUPON = 18
    K_REDEEM_COUPON = 19
    K_AWARD = 20
    K_VISIT = 21

# codes
    OK = 0
    OP_ID_INVALID = 1
    OP_ID_REUSED = 2
    KIND_INVALID = 3
    AMOUNT_INVALID = 4
    TIME_INVALID = 5
    KEY_INVALID = 6
    FLAGS_INVALID = 7
    PROGRAM_NOT_FOUND = 8
    ACCOUNT_NOT_FOUND = 9
    ACCOUNT_EXISTS = 10
    ACCOUNT_BLOCKED = 11
    ACCOUNT_CLOSED = 12
    CARD_NOT_FOUND = 13
    CARD_EXISTS = 14
    CARD_BLOCKED = 15
    INSUFFICIENT_POINTS = 16
    HOLD_NOT_FOUND = 17
    HOLD_CAPTURED = 18
    HOLD_VOIDED = 19
    HOLD_EXPIRED = 20
    CAPTURE_EXCEEDS_HOLD = 21
    OPERATION_NOT_FOUND = 22
    NOT_REFUNDABLE = 23
    REFUND_EXCEEDS_ORIGINAL = 24
    OVERFLOW = 25
    PROGRAM_MISMATCH = 26
    SAME_ACCOUNT = 27
    ACCOUNT_IN_DEBT = 28
    TOO_MANY_LOTS = 29
    TOO_MANY_HOLDS = 30
    STATUS_INVALID = 31
    DATA_TOO_LONG = 32
    LINKED_FAILED = 40
    LINK_OPEN = 41
    COUPON_HELD = 42
    COUPON_NOT_FOUND = 43
    COUPON_NOT_USABLE = 44
    COUPON_EXPIRED = 45
    COUPON_REDEEMED = 46
    TOO_MANY_COUPONS = 47
    LIMIT_REACHED = 48
    FATAL = -1  # LMDB or memory failure: the whole batch is aborted

    ST_ACTIVE = 1
    ST_BLOCKED = 2
    ST_CLOSED = 3
    CARD_ACTIVE = 1
    CARD_BLOCKED_ST = 2
    CARD_REPLACED = 3
    HOLD_OPEN = 1
    HOLD_ST_CAPTURED = 2
    HOLD_ST_VOIDED = 3
    SYS_ISSUED = 1
    SYS_REDEEMED = 2
    SYS_EXPIRED = 3
    SYS_ADJUSTED = 4
    E_PROGRAM_PUT = 1
    E_ACCOUNT_OPENED = 2
    E_ACCOUNT_STATUS = 3
    E_CARD_LINKED = 4
    E_CARD_BLOCKED = 5
    E_CARD_REPLACED = 6
    E_HOLD_PLACED = 7
    E_HOLD_RELEASED = 8
    E_RECEIPT = 9
    E_PROFILE_SET = 10
    E_TIER_SET = 11
    E_COUPON_ISSUED = 12
    E_COUPON_CLOSED = 13
    E_BONUS = 14
    E_EARN = 16
    E_SPEND = 17
    E_EXPIRE = 18
    E_ADJUST = 19
    E_TRANSFER = 20
    E_RETURN = 21
    E_CLAWBACK = 22
    PROGRAM_ALLOW_DEBT = 1
    REFUND_PROPORTIONAL = 1
    REFUND_KEEP_COUPON = 2
    TRANSFER_ALL = 1
    TRANSFER_ONE_COUPON = 2
    PROFILE_ERASE = 1
    COUPON_ONE_PER_CUSTOMER = 1
    LINKED = 1
    COUPON_EARNED = 1
    COUPON_GIVEN_BACK = 2
    COUPON_MOVED = 3
    CP_OPEN = 1
    CP_REDEEMED = 2
    CP_REVOKED = 3
    CP_EXPIRED = 4
    CP_MOVED = 5
    CP_DISPLACED = 6
    RELEASE_CAPTURED = 1
    RELEASE_VOIDED = 2
    RELEASE_EXPIRED = 3
    RESULT_REPLAYED = 1
    # aggregates: row kinds, the int64s of an activity row (records.py)
    AGG_ACTIVITY = 1
    AGG_SETTLEMENT = 2
    AGG_MEMBER_DAY = 3
    AGG_COHORT = 4
    AGG_MEMBER_MONTH = 5
    AGG_COUPONS = 6
    AGG_MEMBERS = 7     # running totals (no hour): members enrolled
    AGG_SETTLED = 8     # ... points settled per partner pair
    AGG_KEY_MAX = 19
    N_COUNTERS = 10
    C_ISSUED = 0
    C_SPENT = 1
    C_EXPIRED = 2
    C_ADJUSTED = 3
    C_RETURNED = 4
    C_CLAWED = 5
    C_RECEIPTS = 6
    C_RECEIPT_MONEY = 7
    C_NEW_MEMBERS = 8
    C_MEMBER_DAYS = 9
    N_COHORT = 4        # a cohort row's int64s
    CO_ISSUED = 0
    CO_SPENT = 1
    CO_EXPIRED = 2
    CO_CLAWED = 3
    N_MONTH = 2         # a member-month row's int64s: money, receipts
    N_COUPON_AGG = 12   # a coupons row's int64s: count and money, six pairs
    CA_ISSUED = 0       # ... the pairs' first int64s
    CA_REDEEMED = 2
    CA_EXPIRED = 4
    CA_REVOKED = 6
    CA_GIVEN_BACK = 8
    CA_DISPLACED = 10
    AGG_WIDTH = 12      # the widest row's int64s
    IDX_TIER = 1        # member_index key kinds
    IDX_BIRTHDAY = 2
    IDX_BIRTHDAY_OF = 3

# --- stored layouts (little-endian, packed: records.py's struct formats) ---
cdef packed struct OpHead:          # records.OP
    uint8_t kind, flags, n_id, n_key, n_key2
    uint8_t link
    uint16_t n_data
    uint32_t program, partner, version, reason, store, lane
    uint64_t account, account2
    int64_t amount, amount2, money, activates_at, expires_at, business_time

cdef packed struct ResultRec:       # records.RESULT
    uint16_t code, flags
    uint32_t pad
    int64_t a, b

cdef packed struct AccountHead:     # an account's scalars, in memory only
    uint32_t program
    uint8_t status, pad1
    uint16_t n_lots, n_holds
    uint8_t pad2[2]
    uint32_t next_lot, next_hold
    int64_t balance, debt, held, earned, spent, expired, opened_at
    uint64_t tier, last_day
    uint32_t next_coupon

cdef packed struct LotRec:          # a lot, and records.CONSUMED
    uint32_t lot_no, partner
    int64_t remaining, activates_at, expires_at
    uint32_t issued_hour

cdef packed struct HoldRec:         # records.HOLD
    uint32_t hold_no, pad
    int64_t amount, expires_at

cdef struct CouponRec:              # codec.Coupon, in memory only
    uint32_t number
    uint8_t state
    int64_t value, usable_from, expires_at

cdef packed struct CardRec:         # records.CARD
    uint64_t account
    uint8_t status

cdef packed struct ProgramRec:      # records.PROGRAM, then the definition
    uint32_t flags
    int64_t created_at, updated_at
    int32_t utc_offset

cdef packed struct OperationRec:    # records.OPERATION
    uint8_t digest[16]
    uint8_t kind, hold_state
    uint16_t code
    uint32_t program
    uint64_t account
    int64_t a, b, money, spent, earned
    uint32_t earned_lot, hold_no
    int64_t refunded_money, returned, clawed
    uint32_t partner, store
    uint16_t n_consumed, n_data

cdef packed struct EntryHead:       # records.ENTRY
    uint64_t seq
    uint8_t type, sys
    uint8_t pad[2]
    uint32_t program, partner, partner2, version, store
    int64_t time, business_time
    uint64_t debit, credit
    int64_t amount, amount2
    uint64_t ref
    uint16_t n_op, n_data

cdef packed struct HeadRec:         # records.HEAD
    uint64_t seq
    uint8_t hash[32]

cdef packed struct ExpiryKey:       # records.EXPIRY_KEY (big-endian)
    uint64_t expires_at, account

cdef packed struct SystemKey:       # records.SYSTEM_KEY (big-endian)
    uint32_t program
    uint8_t kind
    uint32_t partner

cdef packed struct ActivityKey:     # records.ACTIVITY_KEY (big-endian)
    uint8_t kind
    uint32_t program, hour, store, partner
    uint16_t tier

cdef packed struct SettlementKey:   # records.SETTLEMENT_KEY (big-endian)
    uint8_t kind
    uint32_t program, hour, issuing, redeeming

cdef packed struct MembersKey:      # records.MEMBERS_KEY (big-endian)
    uint8_t kind
    uint32_t program

cdef packed struct SettledKey:      # records.SETTLED_KEY (big-endian)
    uint8_t kind
    uint32_t program, issuing, redeeming

cdef packed struct MemberDayKey:    # records.MEMBER_DAY_KEY (big-endian)
    uint8_t kind
    uint32_t program, day
    uint64_t seq

cdef packed struct CohortKey:       # records.COHORT_KEY (big-endian)
    uint8_t kind
    uint32_t program, hour, partner

cdef packed struct CouponAggKey:    # records.COUPON_AGG_KEY (big-endian)
    uint8_t kind
    uint32_t program, hour, store, partner

cdef packed struct MemberMonthKey:  # records.MEMBER_MONTH_KEY (big-endian)
    uint8_t kind
    uint32_t program, month
    uint64_t account

cdef packed struct MemberIndexKey:  # records.MEMBER_INDEX_KEY (big-endian)
    uint8_t kind
    uint32_t program
    uint16_t value
    uint64_t account

cdef packed struct BirthdayOfKey:   # records.BIRTHDAY_OF_KEY (big-endian)
    uint8_t kind
    uint64_t account

# --- scratch of one operation ---------------------------------------------
cdef struct LotBuf:
    LotRec *items
    uint32_t n, cap

cdef struct DataBuf:
    char *p
    uint32_t n, cap

cdef struct Acct:
    uint64_t id
    AccountHead h
    LotBuf lots
    HoldRec *holds
    uint32_t n_holds, cap_holds
    CouponRec *coupons
    uint32_t n_coupons, cap_coupons
    uint32_t n_days                  # visit days kept, most recent first
    uint32_t days[VISIT_DAYS]

cdef struct EntryRec:
    EntryHead h
    const char *op_id    # of the operation that made it (a chain has several)
    const char *data     # an event's data (the operation's bytes), or
    uint32_t lots_off    # with `names_lots`: at w.lots_named + lots_off
    int names_lots

cdef struct PutRec:
    MDB_dbi dbi
    size_t key_off, key_len, val_off, val_len
    int delete

cdef struct SysRec:
    uint32_t program, partner
    uint8_t kind
    uint8_t changed      # batch table: an operation that succeeded posted here
    int64_t balance

cdef struct AggRow:                 # an aggregate row, as of the batch's last success
    uint8_t key[AGG_KEY_MAX]
    uint8_t key_len, width, changed
    int64_t v[AGG_WIDTH]

cdef struct AggStaged:              # a row as the operation in flight leaves it
    uint32_t row
    int64_t v[AGG_WIDTH]

cdef struct ProgramOffset:
    uint32_t program
    int32_t utc_offset

cdef struct Work:
    MDB_txn *txn
    MDB_dbi *dbi
    int64_t now
    int fatal
    # journal head and counters, as of the last successful operation
    uint64_t seq
    uint8_t hash[32]
    uint64_t next_account
    # the operation in flight
    const OpHead *op
    const char *op_id
    const char *key
    const char *key2
    const char *data
    uint64_t next_account_op
    uint32_t entry_store # store on the entries being made (0 inside touch)
    uint32_t folded      # entries folded into the aggregates (a chain's earlier ops')
    int programs_changed # a PUT_PROGRAM is among the changes: offsets go stale
    uint8_t coupon_data[32]  # a coupon event's data
    OperationRec rec
    LotBuf consumed      # rec's consumed lots
    LotBuf scratch_lots  # transfers' moved lots, loaded records' consumed
    DataBuf lots_named   # the data of the postings that name lots
    DataBuf loaded_data  # the data of the operation record loaded (hold, refund)
    Acct *accts
    uint32_t n_accts, n_slots, cap_accts
    EntryRec *entries
    uint32_t n_entries, cap_entries
    PutRec *puts
    uint32_t n_puts, cap_puts
    char *arena
    size_t arena_len, arena_cap
    SysRec *sys          # staged by the operation in flight
    uint32_t n_sys, cap_sys
    SysRec *batch_sys    # as of the last successful operation of the batch
    uint32_t n_batch_sys, cap_batch_sys
    char *buf            # encoding scratch
    size_t buf_cap
    ExpiryKey *due
    uint32_t n_due, cap_due
    AggRow *agg_rows     # rows read or written in this batch, written at its end
    uint32_t n_agg_rows, cap_agg_rows
    uint32_t *agg_index  # open addressing over agg_rows: row + 1, 0 empty
    uint32_t agg_index_cap
    AggStaged *agg_staged
    uint32_t n_agg_staged, cap_agg_staged
    ProgramOffset *offsets  # programs' UTC offsets read in this batch
    uint32_t n_offsets, cap_offsets


cdef int grow(void **items, uint32_t *cap, uint32_t need, size_t size) noexcept nogil:
    cdef uint32_t new_cap
    cdef void *p
    if need <= cap[0]:
        return 0
    new_cap = cap[0] * 2 if cap[0] else 8
    while new_cap < need:
        new_cap *= 2
    p = realloc(items[0], new_cap * size)
    if p == NULL:
        return -1
    items[0] = p
    cap[0] = new_cap
    return 0


cdef int fail(Work *w, int rc) noexcept nogil:
    if w.fatal == 0:
        w.fatal = rc
    return FATAL


cdef char *need_buf(Work *w, size_t size) noexcept nogil:
    cdef char *p
    if size > w.buf_cap:
        p = <char *>realloc(w.buf, size)
        if p == NULL:
            return NULL
        w.buf = p
        w.buf_cap = size
    return w.buf


# --- LMDB access --------------------------------------------------------------
cdef int db_get(Work *w, int db, const void *key, size_t klen, MDB_val *out) noexcept nogil:
    """0 found, 1 not found, FATAL on an LMDB error."""
    cdef MDB_val k
    cdef int rc
    k.mv_size = klen
    k.mv_data = <void *>key
    rc = mdb_get(w.txn, w.dbi[db], &k, out)
    if rc == MDB_SUCCESS:
        return 0
    if rc == MDB_NOTFOUND:
        return 1
    return fail(w, rc)


cdef int db_put(Work *w, MDB_dbi dbi, const void *key, size_t klen,
                const void *val, size_t vlen, unsigned int flags) noexcept nogil:
    cdef MDB_val k, v
    cdef int rc
    k.mv_size = klen
    k.mv_data = <void *>key
    v.mv_size = vlen
    v.mv_data = <void *>val
    rc = mdb_put(w.txn, dbi, &k, &v, flags)
    if rc != MDB_SUCCESS:
        return fail(w, rc)
    return 0


cdef int queue_put(Work *w, int db, const void *key, size_t klen,
                   const void *val, size_t vlen, int delete) noexcept nogil:
    """Remember a put (or delete) to make if the operation succeeds."""
    cdef PutRec *p
    cdef char *arena
    cdef size_t need = w.arena_len + klen + vlen
    if grow(<void **>&w.puts, &w.cap_puts, w.n_puts + 1, sizeof(PutRec)):
        return fail(w, 12)
    if need > w.arena_cap:
        arena = <char *>realloc(w.arena, need * 2)
        if arena == NULL:
            return fail(w, 12)
        w.arena = arena
        w.arena_cap = need * 2
    p = &w.puts[w.n_puts]
    w.n_puts += 1
    p.dbi = w.dbi[db]
    p.delete = delete
    p.key_off = w.arena_len
    p.key_len = klen
    memcpy(w.arena + w.arena_len, key, klen)
    w.arena_len += klen
    p.val_off = w.arena_len
    p.val_len = vlen
    if vlen:
        memcpy(w.arena + w.arena_len, val, vlen)
        w.arena_len += vlen
    return 0


cdef inline uint32_t be32(uint32_t v) noexcept nogil:
    return k_be32(v)


cdef inline uint64_t be64(uint64_t v) noexcept nogil:
    return k_be64(v)


cdef inline uint64_t system_account(int kind, uint32_t partner) noexcept nogil:
    return SYSTEM | (<uint64_t>kind << 32) | partner


cdef inline int64_t min64(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


# --- operation records -----------------------------------------------------------
cdef int load_operation(Work *w, const char *op_id, size_t n, OperationRec *rec,
                        LotBuf *consumed, DataBuf *data) noexcept nogil:
    """0 found (copied out: consumed lots and data where asked), 1 not
    found, FATAL."""
    cdef MDB_val v
    cdef size_t lots_size
    cdef int rc = db_get(w, DB_OPS, op_id, n, &v)
    if rc:
        return rc
    if v.mv_size < sizeof(OperationRec):
        return fail(w, MDB_CORRUPTED)
    memcpy(rec, v.mv_data, sizeof(OperationRec))
    lots_size = rec.n_consumed * sizeof(LotRec)
    if v.mv_size != sizeof(OperationRec) + lots_size + rec.n_data:
        return fail(w, MDB_CORRUPTED)
    if consumed != NULL:
        if grow(<void **>&consumed.items, &consumed.cap, rec.n_consumed, sizeof(LotRec)):
            return fail(w, 12)
        memcpy(consumed.items, <char *>v.mv_data + sizeof(OperationRec), lots_size)
        consumed.n = rec.n_consumed
    if data != NULL:
        if grow(<void **>&data.p, &data.cap, rec.n_data, 1):
            return fail(w, 12)
        if rec.n_data:
            memcpy(data.p, <char *>v.mv_data + sizeof(OperationRec) + lots_size,
                   rec.n_data)
        data.n = rec.n_data
    return 0


cdef int queue_operation(Work *w, const char *op_id, size_t n, OperationRec *rec,
                         LotBuf *consumed, DataBuf *data) noexcept nogil:
    """Rewrite a loaded record (a hold captured or voided, a receipt
    refunded), keeping its consumed lots and data."""
    cdef size_t size, lots_size
    cdef char *buf
    rec.n_consumed = consumed.n if consumed != NULL else 0
    rec.n_data = data.n
    lots_size = rec.n_consumed * sizeof(LotRec)
    size = sizeof(OperationRec) + lots_size + rec.n_data
    buf = need_buf(w, size)
    if buf == NULL:
        return fail(w, 12)
    memcpy(buf, rec, sizeof(OperationRec))
    if lots_size:
        memcpy(buf + sizeof(OperationRec), consumed.items, lots_size)
    if rec.n_data:
        memcpy(buf + sizeof(OperationRec) + lots_size, data.p, rec.n_data)
    return queue_put(w, DB_OPS, op_id, n, buf, size, 0)


# --- accounts ------------------------------------------------------------------
cdef Acct *new_slot(Work *w, uint64_t account_id) noexcept nogil:
    """A scratch account; slots keep their lot and hold buffers across ops."""
    cdef Acct *a
    cdef LotBuf lots
    cdef HoldRec *holds
    cdef CouponRec *coupons
    cdef uint32_t cap_holds, cap_coupons
    if w.n_accts == w.n_slots:
        if grow(<void **>&w.accts, &w.cap_accts, w.n_slots + 1, sizeof(Acct)):
            return NULL
        memset(&w.accts[w.n_slots], 0, sizeof(Acct))
        w.n_slots += 1
    a = &w.accts[w.n_accts]
    w.n_accts += 1
    lots, holds, cap_holds = a.lots, a.holds, a.cap_holds
    coupons, cap_coupons = a.coupons, a.cap_coupons
    memset(a, 0, sizeof(Acct))
    a.lots.items, a.lots.cap = lots.items, lots.cap
    a.holds, a.cap_holds = holds, cap_holds
    a.coupons, a.cap_coupons = coupons, cap_coupons
    a.id = account_id
    return a


# --- varint account records (layout in records.py) ------------------------
cdef struct Reader:
    const uint8_t *p
    size_t size, pos
    int bad


cdef inline size_t put_uv(uint8_t *p, uint64_t v) noexcept nogil:
    cdef size_t n = 0
    while v >= 0x80:
        p[n] = <uint8_t>((v & 0x7F) | 0x80)
        v >>= 7
        n += 1
    p[n] = <uint8_t>v
    return n + 1


cdef inline size_t put_zz(uint8_t *p, int64_t v) noexcept nogil:
    return put_uv(p, (<uint64_t>v << 1) ^ <uint64_t>(v >> 63))


cdef inline uint64_t get_uv(Reader *r) noexcept nogil:
    cdef uint64_t result = 0, b
    cdef int shift = 0
    while r.pos < r.size and shift <= 63:
        b = r.p[r.pos]
        r.pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
    r.bad = 1
    return 0


cdef inline int64_t get_zz(Reader *r) noexcept nogil:
    cdef uint64_t v = get_uv(r)
    return <int64_t>(v >> 1) ^ -<int64_t>(v & 1)


cdef int decode_account(Work *w, Acct *a, const void *data, size_t size) noexcept nogil:
    cdef Reader r
    cdef uint32_t i
    cdef uint64_t n
    cdef uint64_t previous = 0, expires_at
    cdef LotRec *lot
    r.p = <const uint8_t *>data
    r.size = size
    r.pos = 0
    r.bad = 0
    a.h.program = <uint32_t>get_uv(&r)
    a.h.status = <uint8_t>get_uv(&r)
    a.h.n_lots = <uint16_t>get_uv(&r)
    a.h.n_holds = <uint16_t>get_uv(&r)
    a.h.next_lot = <uint32_t>get_uv(&r)
    a.h.next_hold = <uint32_t>get_uv(&r)
    a.h.balance = get_zz(&r)
    a.h.debt = get_zz(&r)
    a.h.held = get_zz(&r)
    a.h.earned = get_zz(&r)
    a.h.spent = get_zz(&r)
    a.h.expired = get_zz(&r)
    a.h.opened_at = get_zz(&r)
    a.h.tier = get_uv(&r)
    n = get_uv(&r)
    if n > VISIT_DAYS:
        return fail(w, MDB_CORRUPTED)
    a.n_days = <uint32_t>n
    for i in range(a.n_days):  # the first as is, the others back from it
        a.days[i] = <uint32_t>(get_uv(&r) if i == 0 else a.days[i - 1] - get_uv(&r))
    a.h.last_day = a.days[0] + 1 if a.n_days else 0
    if grow(<void **>&a.lots.items, &a.lots.cap, a.h.n_lots + 1, sizeof(LotRec)):
        return fail(w, 12)
    if grow(<void **>&a.holds, &a.cap_holds, a.h.n_holds + 1, sizeof(HoldRec)):
        return fail(w, 12)
    for i in range(a.h.n_lots):
        lot = &a.lots.items[i]
        lot.lot_no = <uint32_t>get_uv(&r)
        lot.partner = <uint32_t>get_uv(&r)
        lot.remaining = get_zz(&r)
        expires_at = previous + get_uv(&r)
        lot.expires_at = <int64_t>expires_at
        lot.activates_at = <int64_t>(expires_at - get_uv(&r))
        lot.issued_hour = <uint32_t>get_uv(&r)
        previous = expires_at
    a.lots.n = a.h.n_lots
    for i in range(a.h.n_holds):
        a.holds[i].hold_no = <uint32_t>get_uv(&r)
        a.holds[i].pad = 0
        a.holds[i].amount = get_zz(&r)
        a.holds[i].expires_at = get_zz(&r)
    a.n_holds = a.h.n_holds
    a.h.next_coupon = 1
    a.n_coupons = 0
    if r.pos < size:  # a member who was ever issued a coupon
        a.h.next_coupon = <uint32_t>get_uv(&r)
        n = get_uv(&r)
        if n > MAX_COUPONS or r.bad:  # never: open ones are capped
            return fail(w, MDB_CORRUPTED)
        if grow(<void **>&a.coupons, &a.cap_coupons, <uint32_t>n + 1, sizeof(CouponRec)):
            return fail(w, 12)
        for i in range(<uint32_t>n):
            a.coupons[i].number = <uint32_t>get_uv(&r)
            a.coupons[i].state = <uint8_t>get_uv(&r)
            a.coupons[i].value = get_zz(&r)
            a.coupons[i].usable_from = get_zz(&r)
            a.coupons[i].expires_at = get_zz(&r)
        a.n_coupons = <uint32_t>n
    if r.bad or r.pos != size:
        return fail(w, MDB_CORRUPTED)
    return OK


cdef void remember_visit(Acct *a, uint32_t day) noexcept nogil:
    """Put `day` first in the account's visit days, keeping the newest
    VISIT_DAYS (the pricing engine's "regular customer" counts them)."""
    cdef uint32_t i
    if a.n_days < VISIT_DAYS:
        a.n_days += 1
    i = a.n_days - 1
    while i > 0:
        a.days[i] = a.days[i - 1]
        i -= 1
    a.days[0] = day


cdef size_t encode_account(Acct *a, uint8_t *p) noexcept nogil:
    """Needs 15 * 10 + 5 per visit day + 50 per lot (at most 45) + 30 per
    hold + 20 + 50 per coupon bytes at most."""
    cdef size_t n = 0
    cdef uint32_t i
    cdef uint64_t previous = 0
    cdef LotRec *lot
    n += put_uv(p + n, a.h.program)
    n += put_uv(p + n, a.h.status)
    n += put_uv(p + n, a.lots.n)
    n += put_uv(p + n, a.n_holds)
    n += put_uv(p + n, a.h.next_lot)
    n += put_uv(p + n, a.h.next_hold)
    n += put_zz(p + n, a.h.balance)
    n += put_zz(p + n, a.h.debt)
    n += put_zz(p + n, a.h.held)
    n += put_zz(p + n, a.h.earned)
    n += put_zz(p + n, a.h.spent)
    n += put_zz(p + n, a.h.expired)
    n += put_zz(p + n, a.h.opened_at)
    n += put_uv(p + n, a.h.tier)
    n += put_uv(p + n, a.n_days)
    for i in range(a.n_days):
        n += put_uv(p + n, a.days[i] if i == 0 else a.days[i - 1] - a.days[i])
    for i in range(a.lots.n):
        lot = &a.lots.items[i]
        n += put_uv(p + n, lot.lot_no)
        n += put_uv(p + n, lot.partner)
        n += put_zz(p + n, lot.remaining)
        n += put_uv(p + n, <uint64_t>lot.expires_at - previous)
        n += put_uv(p + n, <uint64_t>lot.expires_at - <uint64_t>lot.activates_at)
        n += put_uv(p + n, lot.issued_hour)
        previous = <uint64_t>lot.expires_at
    for i in range(a.n_holds):
        n += put_uv(p + n, a.holds[i].hold_no)
        n += put_zz(p + n, a.holds[i].amount)
        n += put_zz(p + n, a.holds[i].expires_at)
    if a.h.next_coupon > 1:
        n += put_uv(p + n, a.h.next_coupon)
        n += put_uv(p + n, a.n_coupons)
        for i in range(a.n_coupons):
            n += put_uv(p + n, a.coupons[i].number)
            n += put_uv(p + n, a.coupons[i].state)
            n += put_zz(p + n, a.coupons[i].value)
            n += put_zz(p + n, a.coupons[i].usable_from)
            n += put_zz(p + n, a.coupons[i].expires_at)
    return n


cdef int load_account(Work *w, uint64_t account_id, Acct **out) noexcept nogil:
    cdef uint32_t i
    cdef MDB_val v
    cdef uint64_t key
    cdef Acct *a
    cdef int rc
    for i in range(w.n_accts):
        if w.accts[i].id == account_id:
            out[0] = &w.accts[i]
            return OK
    if account_id == 0:
        return ACCOUNT_NOT_FOUND
    key = be64(account_id)
    rc = db_get(w, DB_ACCOUNTS, &key, 8, &v)
    if rc == 1:
        return ACCOUNT_NOT_FOUND
    if rc:
        return rc
    a = new_slot(w, account_id)
    if a == NULL:
        return fail(w, 12)
    rc = decode_account(w, a, v.mv_data, v.mv_size)
    if rc:
        return rc
    out[0] = a
    return OK


cdef int usable_account(Work *w, uint64_t account_id, Acct **out) noexcept nogil:
    cdef int rc = load_account(w, account_id, out)
    if rc:
        return rc
    if out[0].h.status == ST_BLOCKED:
        return ACCOUNT_BLOCKED
    if out[0].h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    return touch(w, out[0])


cdef int load_card(Work *w, const char *card, size_t n, CardRec *out) noexcept nogil:
    cdef MDB_val v
    cdef int rc = db_get(w, DB_CARDS, card, n, &v)
    if rc == 1:
        return CARD_NOT_FOUND
    if rc:
        return rc
    if v.mv_size != sizeof(CardRec):
        return fail(w, MDB_CORRUPTED)
    memcpy(out, v.mv_data, sizeof(CardRec))
    return OK


cdef int resolve(Work *w, uint64_t *account_id) noexcept nogil:
    """The account an operation names: by id, or by a card in `key2`."""
    cdef CardRec card
    cdef int rc
    account_id[0] = w.op.account
    if w.op.n_key2 == 0:
        return OK
    if w.op.n_key2 > MAX_KEY:
        return KEY_INVALID
    rc = load_card(w, w.key2, w.op.n_key2, &card)
    if rc:
        return rc
    if card.status != CARD_ACTIVE:
        return CARD_BLOCKED
    if w.op.account != 0 and w.op.account != card.account:
        return KEY_INVALID
    account_id[0] = card.account
    return OK


cdef int program_flags(Work *w, uint32_t program, uint32_t *flags) noexcept nogil:
    cdef uint32_t key = be32(program)
    cdef MDB_val v
    cdef int rc = db_get(w, DB_PROGRAMS, &key, 4, &v)
    if rc == 1:
        return PROGRAM_NOT_FOUND
    if rc:
        return rc
    if v.mv_size < sizeof(ProgramRec):
        return fail(w, MDB_CORRUPTED)
    flags[0] = (<ProgramRec *>v.mv_data).flags
    return OK


# --- journal -------------------------------------------------------------------
cdef EntryRec *new_entry(Work *w, int type_, int sys, uint32_t program,
                         uint32_t partner, uint32_t partner2, uint64_t debit,
                         uint64_t credit, int64_t amount, int64_t amount2,
                         uint64_t ref) noexcept nogil:
    cdef EntryRec *e
    if grow(<void **>&w.entries, &w.cap_entries, w.n_entries + 1, sizeof(EntryRec)):
        fail(w, 12)
        return NULL
    e = &w.entries[w.n_entries]
    w.n_entries += 1
    memset(e, 0, sizeof(EntryRec))
    e.h.type = type_
    e.h.sys = sys
    e.h.program = program
    e.h.partner = partner
    e.h.partner2 = partner2
    e.h.version = w.op.version
    e.h.store = w.entry_store
    e.h.time = w.now
    e.h.business_time = w.op.business_time
    e.h.debit = debit
    e.h.credit = credit
    e.h.amount = amount
    e.h.amount2 = amount2
    e.h.ref = ref
    e.h.n_op = w.op.n_id
    e.op_id = w.op_id
    return e


cdef int event(Work *w, int type_, uint32_t program, uint64_t subject,
               int64_t amount, int64_t amount2, uint64_t ref,
               const char *data, uint16_t n_data) noexcept nogil:
    cdef EntryRec *e = new_entry(w, type_, 0, program, w.op.partner, 0, 0,
                                 subject, amount, amount2, ref)
    if e == NULL:
        return FATAL
    e.data = data
    e.h.n_data = n_data
    return OK


cdef SysRec *find_sys(SysRec *table, uint32_t n, uint32_t program, int kind,
                      uint32_t partner) noexcept nogil:
    cdef uint32_t i
    for i in range(n):
        if (table[i].program == program and table[i].kind == kind
                and table[i].partner == partner):
            return &table[i]
    return NULL


cdef int sys_add(Work *w, uint32_t program, int kind, uint32_t partner,
                 int64_t delta) noexcept nogil:
    """Stage a system account's new balance for the operation in flight.

    System balances are read once per batch and written once at its end
    (`batch_sys`): every posting touches one, so per-operation gets and puts
    of the same few keys would be most of an earn's B-tree work."""
    cdef SysRec *s = find_sys(w.sys, w.n_sys, program, kind, partner)
    cdef SysRec *b
    cdef SystemKey key
    cdef MDB_val v
    cdef int rc
    if s == NULL:
        b = find_sys(w.batch_sys, w.n_batch_sys, program, kind, partner)
        if b == NULL:
            if grow(<void **>&w.batch_sys, &w.cap_batch_sys, w.n_batch_sys + 1,
                    sizeof(SysRec)):
                return fail(w, 12)
            b = &w.batch_sys[w.n_batch_sys]
            w.n_batch_sys += 1
            b.program = program
            b.kind = kind
            b.partner = partner
            b.changed = 0
            key.program = be32(program)
            key.kind = kind
            key.partner = be32(partner)
            rc = db_get(w, DB_SYSTEM, &key, sizeof(SystemKey), &v)
            if rc == 0 and v.mv_size != 8:
                return fail(w, MDB_CORRUPTED)
            if rc == 0:
                memcpy(&b.balance, v.mv_data, 8)
            elif rc == 1:
                b.balance = 0
            else:
                return rc
        if grow(<void **>&w.sys, &w.cap_sys, w.n_sys + 1, sizeof(SysRec)):
            return fail(w, 12)
        s = &w.sys[w.n_sys]
        w.n_sys += 1
        s[0] = b[0]
    if k_add(s.balance, delta, &s.balance):
        return OVERFLOW
    return OK


cdef int write_batch_sys(Work *w) noexcept nogil:
    cdef uint32_t i
    cdef SystemKey key
    for i in range(w.n_batch_sys):
        if not w.batch_sys[i].changed:
            continue
        key.program = be32(w.batch_sys[i].program)
        key.kind = w.batch_sys[i].kind
        key.partner = be32(w.batch_sys[i].partner)
        if db_put(w, w.dbi[DB_SYSTEM], &key, sizeof(SystemKey),
                  &w.batch_sys[i].balance, 8, 0):
            return FATAL
    return OK


cdef int post(Work *w, int type_, uint32_t program, uint64_t debit,
              uint64_t credit, int64_t amount, int sys_kind, uint32_t partner,
              uint32_t partner2, int64_t amount2, uint64_t ref) noexcept nogil:
    """A double-entry posting: `amount` leaves debit and reaches credit."""
    cdef uint64_t sys_id = system_account(sys_kind, partner)
    cdef int rc
    if debit == sys_id:
        rc = sys_add(w, program, sys_kind, partner, -amount)
        if rc:
            return rc
    if credit == sys_id:
        rc = sys_add(w, program, sys_kind, partner, amount)
        if rc:
            return rc
    if new_entry(w, type_, sys_kind, program, partner, partner2, debit, credit,
                 amount, amount2, ref) == NULL:
        return FATAL
    return OK


cdef int name_lot(Work *w, LotRec *lot, int64_t points) noexcept nogil:
    """Name a lot in the data of the posting just made (records.py): its
    number, the points moved, its issued hour. A posting names at most
    MAX_LOTS lots, 19 bytes each at most: its data stays under 64 KiB."""
    cdef EntryRec *e = &w.entries[w.n_entries - 1]
    cdef uint8_t *p
    cdef size_t n
    if not e.names_lots:
        e.names_lots = 1
        e.lots_off = w.lots_named.n
    if grow(<void **>&w.lots_named.p, &w.lots_named.cap, w.lots_named.n + 32, 1):
        return fail(w, 12)
    p = <uint8_t *>w.lots_named.p + w.lots_named.n
    n = put_uv(p, lot.lot_no)
    n += put_uv(p + n, <uint64_t>points)
    n += put_uv(p + n, lot.issued_hour)
    w.lots_named.n += <uint32_t>n
    e.h.n_data += <uint16_t>n
    return OK


cdef inline const char *entry_data(Work *w, EntryRec *e) noexcept nogil:
    if e.names_lots:
        return w.lots_named.p + e.lots_off
    return e.data


# --- lots and holds ------------------------------------------------------------
cdef void drop_empty_lots(Acct *a) noexcept nogil:
    cdef uint32_t i, j = 0
    for i in range(a.lots.n):
        if a.lots.items[i].remaining > 0:
            if i != j:
                a.lots.items[j] = a.lots.items[i]
            j += 1
    a.lots.n = j


cdef int take_active(Work *w, Acct *a, int64_t amount, LotBuf *taken,
                     int64_t *total) noexcept nogil:
    """Take up to `amount` from active lots, earliest expiry first."""
    cdef uint32_t i
    cdef int64_t part
    cdef LotRec *lot
    total[0] = 0
    for i in range(a.lots.n):
        if amount == 0:
            break
        lot = &a.lots.items[i]
        if lot.activates_at > w.now:
            continue
        part = min64(lot.remaining, amount)
        lot.remaining -= part
        amount -= part
        total[0] += part
        if taken != NULL:
            if grow(<void **>&taken.items, &taken.cap, taken.n + 1, sizeof(LotRec)):
                return fail(w, 12)
            taken.items[taken.n].lot_no = lot.lot_no
            taken.items[taken.n].partner = lot.partner
            taken.items[taken.n].remaining = part
            taken.items[taken.n].activates_at = lot.activates_at
            taken.items[taken.n].expires_at = lot.expires_at
            taken.items[taken.n].issued_hour = lot.issued_hour
            taken.n += 1
    drop_empty_lots(a)
    return OK


cdef int touch(Work *w, Acct *a) noexcept nogil:
    """Burn expired lots, release timed-out holds, pay debt from lots.

    What it journals no store did: its entries carry store 0."""
    cdef uint32_t store = w.entry_store
    cdef int rc
    w.entry_store = 0
    rc = touch_account(w, a)
    w.entry_store = store
    return rc


cdef int touch_account(Work *w, Acct *a) noexcept nogil:
    cdef uint32_t i, n, j
    cdef LotRec lot
    cdef HoldRec *hold
    cdef int rc
    cdef int64_t paid
    cdef int128 free_points
    n = 0
    while n < a.lots.n and a.lots.items[n].expires_at <= w.now:
        lot = a.lots.items[n]
        if k_add(a.h.balance, -lot.remaining, &a.h.balance):
            return OVERFLOW
        if k_add(a.h.expired, lot.remaining, &a.h.expired):
            return OVERFLOW
        rc = post(w, E_EXPIRE, a.h.program, a.id,
                  system_account(SYS_EXPIRED, lot.partner), lot.remaining,
                  SYS_EXPIRED, lot.partner, lot.partner, 0, lot.lot_no)
        if rc:
            return rc
        rc = name_lot(w, &lot, lot.remaining)
        if rc:
            return rc
        n += 1
    if n:
        memmove(a.lots.items, a.lots.items + n, (a.lots.n - n) * sizeof(LotRec))
        a.lots.n -= n
    j = 0
    for i in range(a.n_holds):
        hold = &a.holds[i]
        if hold.expires_at <= w.now:
            a.h.held -= hold.amount
            rc = event(w, E_HOLD_RELEASED, a.h.program, a.id, hold.amount,
                       RELEASE_EXPIRED, hold.hold_no, NULL, 0)
            if rc:
                return rc
        else:
            if i != j:
                a.holds[j] = a.holds[i]
            j += 1
    a.n_holds = j
    if a.h.debt > 0:
        # debt is repaid from free points only: what holds reserve stands
        free_points = active_points(w, a) - a.h.held
        if free_points > a.h.debt:
            free_points = a.h.debt
        if free_points > 0:
            rc = take_active(w, a, <int64_t>free_points, NULL, &paid)
            if rc:
                return rc
            a.h.debt -= paid
    for i in range(a.n_coupons):
        if a.coupons[i].state == CP_OPEN and a.coupons[i].expires_at <= w.now:
            rc = close_coupon(w, a, &a.coupons[i], CP_EXPIRED, 0)
            if rc:
                return rc
    return OK


cdef int close_coupon(Work *w, Acct *a, CouponRec *coupon, int state,
                      int64_t amount) noexcept nogil:
    """An open coupon of the account's is no longer: `state`; `amount`,
    the money it took off when redeemed."""
    coupon.state = state
    return coupon_entry(w, E_COUPON_CLOSED, a, amount, state, coupon.number,
                        put_uv(w.coupon_data, <uint64_t>coupon.value))


cdef int128 active_points(Work *w, Acct *a) noexcept nogil:
    cdef int128 total = 0
    cdef uint32_t i
    for i in range(a.lots.n):
        if a.lots.items[i].activates_at <= w.now < a.lots.items[i].expires_at:
            total += a.lots.items[i].remaining
    return total


cdef int128 available(Work *w, Acct *a) noexcept nogil:
    return active_points(w, a) - a.h.held - a.h.debt


cdef int add_lot(Work *w, Acct *a, LotRec *lot) noexcept nogil:
    """Put points into a lot (an existing one with that number, or new)."""
    cdef uint32_t i, pos
    cdef int64_t earliest
    for i in range(a.lots.n):
        if a.lots.items[i].lot_no == lot.lot_no:
            if k_add(a.lots.items[i].remaining, lot.remaining, &a.lots.items[i].remaining):
                return OVERFLOW
            return OK
    if a.lots.n >= MAX_LOTS:
        return TOO_MANY_LOTS
    earliest = a.lots.items[0].expires_at if a.lots.n else NEVER
    if grow(<void **>&a.lots.items, &a.lots.cap, a.lots.n + 1, sizeof(LotRec)):
        return fail(w, 12)
    pos = a.lots.n
    while pos > 0 and (a.lots.items[pos - 1].expires_at > lot.expires_at or (
            a.lots.items[pos - 1].expires_at == lot.expires_at
            and a.lots.items[pos - 1].lot_no > lot.lot_no)):
        pos -= 1
    memmove(a.lots.items + pos + 1, a.lots.items + pos,
            (a.lots.n - pos) * sizeof(LotRec))
    a.lots.items[pos] = lot[0]
    a.lots.n += 1
    # One index entry per account, at or before its earliest lot's expiry.
    if lot.expires_at < earliest:
        return index_expiry(w, a)
    return OK


cdef int index_expiry(Work *w, Acct *a) noexcept nogil:
    cdef ExpiryKey key
    key.expires_at = be64(<uint64_t>a.lots.items[0].expires_at)
    key.account = be64(a.id)
    return queue_put(w, DB_LOT_EXPIRY, &key, sizeof(ExpiryKey), NULL, 0, 0)


cdef inline uint32_t hour_of(int64_t t) noexcept nogil:
    """The UTC hour of a time (0 before 1970): aggregates.hour_of."""
    return <uint32_t>(t // HOUR) if t > 0 else 0


cdef int new_lot(Work *w, Acct *a, uint32_t partner, int64_t points,
                 int64_t activates_at, int64_t expires_at, uint32_t issued_hour,
                 uint32_t *lot_no) noexcept nogil:
    """A lot of points issued in `issued_hour` (now's, or a transfer's
    source lot's)."""
    cdef LotRec lot
    lot.lot_no = a.h.next_lot
    a.h.next_lot += 1
    lot.partner = partner
    lot.remaining = points
    lot.activates_at = activates_at
    lot.expires_at = expires_at
    lot.issued_hour = issued_hour
    lot_no[0] = lot.lot_no
    return add_lot(w, a, &lot)


cdef int check_lot_times(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    if not (0 <= op.activates_at < op.expires_at and op.expires_at > w.now):
        return TIME_INVALID
    return OK


cdef uint32_t group_by_partner(LotBuf *lots, uint32_t *partners, int64_t *sums,
                               uint32_t max_groups) noexcept nogil:
    """Sum points per issuing partner, in order of first appearance."""
    cdef uint32_t i, g, n = 0
    for i in range(lots.n):
        for g in range(n):
            if partners[g] == lots.items[i].partner:
                sums[g] += lots.items[i].remaining
                break
        else:
            partners[n] = lots.items[i].partner
            sums[n] = lots.items[i].remaining
            n += 1
    return n


cdef int post_by_partner(Work *w, LotBuf *lots, int type_, Acct *a,
                         uint32_t op_partner, bint to_member) noexcept nogil:
    """SPEND (member -> redeemed) or RETURN (redeemed -> member) postings, one
    per issuing partner of the lots involved, each naming its lots."""
    cdef uint32_t g, n, i
    cdef uint32_t *partners
    cdef int64_t *sums
    cdef int rc = OK
    cdef uint64_t sys_id = system_account(SYS_REDEEMED, op_partner)
    if lots.n == 0:
        return OK
    partners = <uint32_t *>malloc(lots.n * sizeof(uint32_t))
    sums = <int64_t *>malloc(lots.n * sizeof(int64_t))
    if partners == NULL or sums == NULL:
        free(partners)
        free(sums)
        return fail(w, 12)
    n = group_by_partner(lots, partners, sums, lots.n)
    for g in range(n):
        if to_member:
            rc = post(w, type_, a.h.program, sys_id, a.id, sums[g],
                      SYS_REDEEMED, op_partner, partners[g], 0, 0)
        else:
            rc = post(w, type_, a.h.program, a.id, sys_id, sums[g],
                      SYS_REDEEMED, op_partner, partners[g], 0, 0)
        if rc:
            break
        for i in range(lots.n):
            if lots.items[i].partner == partners[g]:
                rc = name_lot(w, &lots.items[i], lots.items[i].remaining)
                if rc:
                    break
        if rc:
            break
    free(partners)
    free(sums)
    return rc


cdef int find_hold(Work *w, const char *key, size_t n, OperationRec *hold) noexcept nogil:
    """The HOLD operation named by `key` (an op id), still open."""
    cdef int rc
    if n < 1 or n > MAX_OP_ID:
        return KEY_INVALID
    rc = load_operation(w, key, n, hold, NULL, &w.loaded_data)
    if rc == 1 or (rc == 0 and hold.kind != K_HOLD):
        return HOLD_NOT_FOUND
    if rc:
        return rc
    if hold.hold_state == HOLD_ST_CAPTURED:
        return HOLD_CAPTURED
    if hold.hold_state == HOLD_ST_VOIDED:
        return HOLD_VOIDED
    return OK


cdef int release_hold(Work *w, Acct *a, uint32_t hold_no, int reason,
                      int64_t *released) noexcept nogil:
    cdef uint32_t i
    cdef int64_t amount
    for i in range(a.n_holds):
        if a.holds[i].hold_no == hold_no:
            amount = a.holds[i].amount
            memmove(a.holds + i, a.holds + i + 1, (a.n_holds - i - 1) * sizeof(HoldRec))
            a.n_holds -= 1
            a.h.held -= amount
            released[0] = amount
            return event(w, E_HOLD_RELEASED, a.h.program, a.id, amount, reason,
                         hold_no, NULL, 0)
    return HOLD_EXPIRED  # touch released it at its timeout


# --- report aggregates (layout in records.py) ---------------------------------
# The rows an operation's entries change are staged (`agg_staged`), so an
# overflow rejects it like any other sum; on success they go into the batch's
# rows (`agg_rows`, read once per batch like system balances), written once
# at the batch's end. Member-day rows are plain puts of the operation.

cdef uint32_t agg_hash(const uint8_t *key, size_t n) noexcept nogil:
    cdef uint32_t h = 2166136261u  # FNV-1a
    cdef size_t i
    for i in range(n):
        h = (h ^ key[i]) * 16777619u
    return h


cdef int agg_reindex(Work *w, uint32_t cap) noexcept nogil:
    cdef uint32_t *index = <uint32_t *>malloc(cap * sizeof(uint32_t))
    cdef uint32_t i, h
    if index == NULL:
        return fail(w, 12)
    memset(index, 0, cap * sizeof(uint32_t))
    for i in range(w.n_agg_rows):
        h = agg_hash(w.agg_rows[i].key, w.agg_rows[i].key_len) & (cap - 1)
        while index[h]:
            h = (h + 1) & (cap - 1)
        index[h] = i + 1
    free(w.agg_index)
    w.agg_index = index
    w.agg_index_cap = cap
    return OK


cdef int agg_row(Work *w, const void *key, uint8_t key_len, uint8_t width,
                 uint32_t *out) noexcept nogil:
    """The batch's row of `key`, read from the database on first use."""
    cdef uint32_t h
    cdef AggRow *r
    cdef MDB_val v
    cdef int rc
    if (w.n_agg_rows + 1) * 2 > w.agg_index_cap:
        rc = agg_reindex(w, w.agg_index_cap * 2 if w.agg_index_cap else 64)
        if rc:
            return rc
    h = agg_hash(<const uint8_t *>key, key_len) & (w.agg_index_cap - 1)
    while w.agg_index[h]:
        r = &w.agg_rows[w.agg_index[h] - 1]
        if r.key_len == key_len and memcmp(r.key, key, key_len) == 0:
            out[0] = w.agg_index[h] - 1
            return OK
        h = (h + 1) & (w.agg_index_cap - 1)
    if grow(<void **>&w.agg_rows, &w.cap_agg_rows, w.n_agg_rows + 1, sizeof(AggRow)):
        return fail(w, 12)
    r = &w.agg_rows[w.n_agg_rows]
    memset(r, 0, sizeof(AggRow))
    memcpy(r.key, key, key_len)
    r.key_len = key_len
    r.width = width
    rc = db_get(w, DB_AGGREGATES, key, key_len, &v)
    if rc == 0:
        if v.mv_size != width * sizeof(int64_t):
            return fail(w, MDB_CORRUPTED)
        memcpy(r.v, v.mv_data, v.mv_size)
    elif rc != 1:
        return rc
    w.agg_index[h] = w.n_agg_rows + 1
    out[0] = w.n_agg_rows
    w.n_agg_rows += 1
    return OK


cdef int agg_add(Work *w, const void *key, uint8_t key_len, uint8_t width,
                 int index, int64_t delta) noexcept nogil:
    """Add `delta` to one int64 of a row, for the operation in flight."""
    cdef uint32_t row = 0, i
    cdef AggStaged *s = NULL
    cdef int rc = agg_row(w, key, key_len, width, &row)
    if rc:
        return rc
    for i in range(w.n_agg_staged):  # an operation changes a few rows
        if w.agg_staged[i].row == row:
            s = &w.agg_staged[i]
            break
    if s == NULL:
        if grow(<void **>&w.agg_staged, &w.cap_agg_staged, w.n_agg_staged + 1,
                sizeof(AggStaged)):
            return fail(w, 12)
        s = &w.agg_staged[w.n_agg_staged]
        w.n_agg_staged += 1
        s.row = row
        memcpy(s.v, w.agg_rows[row].v, sizeof(s.v))
    if k_add(s.v[index], delta, &s.v[index]):
        return OVERFLOW
    return OK


cdef int utc_offset_of(Work *w, uint32_t program, int32_t *out) noexcept nogil:
    """A program's UTC offset, read once per batch (forgotten when a
    PUT_PROGRAM commits)."""
    cdef uint32_t i, key = be32(program)
    cdef MDB_val v
    cdef int rc
    for i in range(w.n_offsets):
        if w.offsets[i].program == program:
            out[0] = w.offsets[i].utc_offset
            return OK
    rc = db_get(w, DB_PROGRAMS, &key, 4, &v)
    if rc == 0 and v.mv_size < sizeof(ProgramRec):
        return fail(w, MDB_CORRUPTED)
    if rc == 0:
        out[0] = (<ProgramRec *>v.mv_data).utc_offset
    elif rc == 1:
        out[0] = 0
    else:
        return rc
    if grow(<void **>&w.offsets, &w.cap_offsets, w.n_offsets + 1, sizeof(ProgramOffset)):
        return fail(w, 12)
    w.offsets[w.n_offsets].program = program
    w.offsets[w.n_offsets].utc_offset = out[0]
    w.n_offsets += 1
    return OK


cdef inline int counter_of(int type_) noexcept nogil:
    """The activity counter an entry type adds to; -1: not counted."""
    if type_ == E_EARN:
        return C_ISSUED
    if type_ == E_SPEND:
        return C_SPENT
    if type_ == E_EXPIRE:
        return C_EXPIRED
    if type_ == E_ADJUST:
        return C_ADJUSTED
    if type_ == E_RETURN:
        return C_RETURNED
    if type_ == E_CLAWBACK:
        return C_CLAWED
    if type_ == E_RECEIPT:
        return C_RECEIPT_MONEY
    if type_ == E_ACCOUNT_OPENED:
        return C_NEW_MEMBERS
    return -1


cdef uint32_t month_of_day(uint64_t day) noexcept nogil:
    """year * 100 + month of a day from 1970-01-01 (aggregates.month_of_day)."""
    cdef int64_t z = <int64_t>day + 719468
    cdef int64_t era = z // 146097
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int64_t month = mp + 3 if mp < 10 else mp - 9
    cdef int64_t year = yoe + era * 400 + (1 if month <= 2 else 0)
    return <uint32_t>(year * 100 + month)


cdef int fold_aggregates(Work *w) noexcept nogil:
    """The operation's entries folded into the report rows, in entry order
    (the twin's `aggregates.changes`); its members' tiers and last days are
    in its account slots."""
    cdef uint32_t i, j
    cdef EntryHead *e
    cdef Acct *a = NULL
    cdef uint64_t member, day
    cdef int64_t amount, points
    cdef int128 local
    cdef int32_t utc_offset = 0
    cdef int index, rc
    cdef ActivityKey act
    cdef SettlementKey st
    cdef SettledKey sd
    cdef MembersKey mk
    cdef MemberDayKey md
    cdef MemberMonthKey mm
    for i in range(w.folded, w.n_entries):
        e = &w.entries[i].h
        if e.type == E_COUPON_ISSUED or e.type == E_COUPON_CLOSED:
            rc = fold_coupon(w, &w.entries[i])
            if rc:
                return rc
            continue
        index = counter_of(e.type)
        if index < 0:
            continue
        member = e.credit
        if e.type >= E_EARN and e.credit & SYSTEM:
            member = e.debit
        if a == NULL or a.id != member:  # an operation's entries run by account
            a = NULL
            for j in range(w.n_accts):
                if w.accts[j].id == member:
                    a = &w.accts[j]
                    break
            if a == NULL:  # never: every counted entry's member is loaded
                return fail(w, MDB_CORRUPTED)
        amount = e.amount
        if e.type == E_ADJUST and e.debit == member:
            amount = -amount
        elif e.type == E_ACCOUNT_OPENED:
            amount = 1
        act.kind = AGG_ACTIVITY
        act.program = be32(e.program)
        act.hour = be32(hour_of(e.time))
        act.store = be32(e.store)
        act.partner = be32(e.partner)
        act.tier = k_be16(<uint16_t>a.h.tier)
        rc = agg_add(w, &act, sizeof(ActivityKey), N_COUNTERS, index, amount)
        if rc:
            return rc
        if e.type == E_ACCOUNT_OPENED:
            mk.kind = AGG_MEMBERS
            mk.program = act.program
            rc = agg_add(w, &mk, sizeof(MembersKey), 1, 0, 1)
            if rc:
                return rc
        if e.type == E_SPEND or e.type == E_RETURN:
            points = amount if e.type == E_SPEND else -amount
            st.kind = AGG_SETTLEMENT
            st.program = act.program
            st.hour = act.hour
            st.issuing = be32(e.partner2)
            st.redeeming = act.partner
            rc = agg_add(w, &st, sizeof(SettlementKey), 1, 0, points)
            if rc:
                return rc
            sd.kind = AGG_SETTLED
            sd.program = act.program
            sd.issuing = st.issuing
            sd.redeeming = st.redeeming
            rc = agg_add(w, &sd, sizeof(SettledKey), 1, 0, points)
            if rc:
                return rc
        if e.type == E_RECEIPT:
            rc = utc_offset_of(w, e.program, &utc_offset)
            if rc:
                return rc
            local = <int128>e.time + <int128>utc_offset * MINUTE
            day = <uint64_t>(local // DAY) if local > 0 else 0
            mm.kind = AGG_MEMBER_MONTH
            mm.program = act.program
            mm.month = be32(month_of_day(day))
            mm.account = be64(member)
            rc = agg_add(w, &mm, sizeof(MemberMonthKey), N_MONTH, 0, amount)
            if rc:
                return rc
        if e.type == E_RECEIPT and amount > 0:
            rc = agg_add(w, &mm, sizeof(MemberMonthKey), N_MONTH, 1, 1)
            if rc:
                return rc
            rc = agg_add(w, &act, sizeof(ActivityKey), N_COUNTERS, C_RECEIPTS, 1)
            if rc:
                return rc
            if day + 1 > a.h.last_day:  # the member's first receipt of the day
                # keyed by the seq the entry gets when the operation commits
                md.kind = AGG_MEMBER_DAY
                md.program = act.program
                md.day = be32(<uint32_t>day)
                md.seq = be64(w.seq + 1 + i)
                rc = queue_put(w, DB_AGGREGATES, &md, sizeof(MemberDayKey),
                               &member, 8, 0)
                if rc:
                    return rc
                rc = agg_add(w, &act, sizeof(ActivityKey), N_COUNTERS, C_MEMBER_DAYS, 1)
                if rc:
                    return rc
                a.h.last_day = day + 1
                remember_visit(a, <uint32_t>day)
        rc = fold_cohorts(w, &w.entries[i], act.hour)
        if rc:
            return rc
    w.folded = w.n_entries
    return OK


cdef int fold_coupon(Work *w, EntryRec *entry) noexcept nogil:
    """A coupon event in its hour's coupon row (`aggregates.coupon_changes`):
    a count and money, by what became of the coupon; moves not counted."""
    cdef EntryHead *e = &entry.h
    cdef CouponAggKey key
    cdef Reader r
    cdef uint64_t how, value
    cdef int64_t money = e.amount
    cdef int index = -1
    cdef int rc
    r.p = <const uint8_t *>entry_data(w, entry)
    r.size = e.n_data
    r.pos = 0
    r.bad = 0
    if e.type == E_COUPON_ISSUED:
        get_uv(&r)  # usable_from
        how = get_uv(&r)
        if how == COUPON_EARNED:
            index = CA_ISSUED
        elif how == COUPON_GIVEN_BACK:
            index = CA_GIVEN_BACK
    else:
        value = get_uv(&r)
        if e.amount2 == CP_REDEEMED:
            index = CA_REDEEMED
        else:
            money = <int64_t>value
            if e.amount2 == CP_EXPIRED:
                index = CA_EXPIRED
            elif e.amount2 == CP_REVOKED:
                index = CA_REVOKED
            elif e.amount2 == CP_DISPLACED:
                index = CA_DISPLACED
    if r.bad:  # never: the kernel wrote it a moment ago
        return fail(w, MDB_CORRUPTED)
    if index < 0:
        return OK
    key.kind = AGG_COUPONS
    key.program = be32(e.program)
    key.hour = be32(hour_of(e.time))
    key.store = be32(e.store)
    key.partner = be32(e.partner)
    rc = agg_add(w, &key, sizeof(CouponAggKey), N_COUPON_AGG, index, 1)
    if rc:
        return rc
    return agg_add(w, &key, sizeof(CouponAggKey), N_COUPON_AGG, index + 1, money)


cdef int fold_cohorts(Work *w, EntryRec *entry, uint32_t hour_be) noexcept nogil:
    """The breakage cohorts a posting changes (`aggregates.cohort_changes`):
    a new lot's points are issued in the entry's hour at its partner; the
    points of the lots a posting names count in those lots' cohorts."""
    cdef EntryHead *e = &entry.h
    cdef CohortKey key
    cdef Reader r
    cdef int index, rc
    cdef int64_t sign = 1, points
    key.kind = AGG_COHORT
    key.program = be32(e.program)
    if e.type == E_EARN or (e.type == E_ADJUST and not e.credit & SYSTEM):
        key.hour = hour_be
        key.partner = be32(e.partner)
        return agg_add(w, &key, sizeof(CohortKey), N_COHORT, CO_ISSUED, e.amount)
    if e.type == E_SPEND:
        index = CO_SPENT
    elif e.type == E_RETURN:
        index = CO_SPENT
        sign = -1
    elif e.type == E_EXPIRE:
        index = CO_EXPIRED
    elif e.type == E_CLAWBACK:
        index = CO_CLAWED
    else:
        return OK
    key.partner = be32(e.partner2)
    r.p = <const uint8_t *>entry_data(w, entry)
    r.size = e.n_data
    r.pos = 0
    r.bad = 0
    while r.pos < r.size:
        get_uv(&r)  # the lot's number
        points = <int64_t>get_uv(&r)
        key.hour = be32(<uint32_t>get_uv(&r))
        if r.bad:  # never: the kernel wrote it a moment ago
            return fail(w, MDB_CORRUPTED)
        rc = agg_add(w, &key, sizeof(CohortKey), N_COHORT, index, sign * points)
        if rc:
            return rc
    return OK


cdef int write_batch_aggregates(Work *w) noexcept nogil:
    cdef uint32_t i
    cdef AggRow *r
    for i in range(w.n_agg_rows):
        r = &w.agg_rows[i]
        if r.changed and db_put(w, w.dbi[DB_AGGREGATES], r.key, r.key_len, r.v,
                                r.width * sizeof(int64_t), 0):
            return FATAL
    return OK


# --- commit of one operation -------------------------------------------------
cdef int commit_work(Work *w) noexcept nogil:
    cdef uint32_t i
    cdef Acct *a
    cdef PutRec *p
    cdef EntryRec *e
    cdef MDB_val k, v
    cdef uint64_t key
    cdef SysRec *b
    cdef size_t size
    cdef char *buf
    cdef int rc
    cdef crypto_generichash_state hs
    for i in range(w.n_accts):
        a = &w.accts[i]
        buf = need_buf(w, 15 * 10 + VISIT_DAYS * 5 + a.lots.n * 50
                       + a.n_holds * 30 + 20 + a.n_coupons * 50)
        if buf == NULL:
            return fail(w, 12)
        size = encode_account(a, <uint8_t *>buf)
        key = be64(a.id)
        if db_put(w, w.dbi[DB_ACCOUNTS], &key, 8, buf, size, 0):
            return FATAL
    for i in range(w.n_puts):
        p = &w.puts[i]
        k.mv_size = p.key_len
        k.mv_data = w.arena + p.key_off
        if p.delete:
            rc = mdb_del(w.txn, p.dbi, &k, NULL)
            if rc != MDB_SUCCESS and rc != MDB_NOTFOUND:
                return fail(w, rc)
        else:
            v.mv_size = p.val_len
            v.mv_data = w.arena + p.val_off
            rc = mdb_put(w.txn, p.dbi, &k, &v, 0)
            if rc != MDB_SUCCESS:
                return fail(w, rc)
    for i in range(w.n_sys):
        b = find_sys(w.batch_sys, w.n_batch_sys, w.sys[i].program, w.sys[i].kind,
                     w.sys[i].partner)
        b.balance = w.sys[i].balance
        b.changed = 1
    for i in range(w.n_agg_staged):
        memcpy(w.agg_rows[w.agg_staged[i].row].v, w.agg_staged[i].v,
               sizeof(w.agg_staged[i].v))
        w.agg_rows[w.agg_staged[i].row].changed = 1
    if w.programs_changed:
        w.n_offsets = 0  # a UTC offset may have changed
    for i in range(w.n_entries):
        e = &w.entries[i]
        w.seq += 1
        e.h.seq = w.seq
        size = sizeof(EntryHead) + e.h.n_op + e.h.n_data
        buf = need_buf(w, size + HASH_SIZE)
        if buf == NULL:
            return fail(w, 12)
        memcpy(buf, &e.h, sizeof(EntryHead))
        memcpy(buf + sizeof(EntryHead), e.op_id, e.h.n_op)
        if e.h.n_data:
            memcpy(buf + sizeof(EntryHead) + e.h.n_op, entry_data(w, e), e.h.n_data)
        crypto_generichash_init(&hs, NULL, 0, HASH_SIZE)
        crypto_generichash_update(&hs, w.hash, HASH_SIZE)
        crypto_generichash_update(&hs, <unsigned char *>buf, size)
        crypto_generichash_final(&hs, w.hash, HASH_SIZE)
        memcpy(buf + size, w.hash, HASH_SIZE)
        key = be64(w.seq)
        if db_put(w, w.dbi[DB_JOURNAL], &key, 8, buf, size + HASH_SIZE, MDB_APPEND):
            return FATAL
    w.next_account = w.next_account_op
    return OK


cdef int claim_op_id(Work *w, OperationRec *first) noexcept nogil:
    """Store the operation's record unless its id is taken: 0 stored, 1 taken
    (the first record copied out), FATAL. Done before anything else of the
    operation is written, so the id costs one B-tree search, not two.

    The operation's data is kept with it, except a profile's (OPEN_ACCOUNT,
    SET_PROFILE): that lives in `profiles` alone, so deleting it leaves no
    copy behind."""
    cdef size_t lots_size = w.consumed.n * sizeof(LotRec)
    cdef uint16_t n_data = w.op.n_data
    cdef size_t size
    cdef char *buf
    cdef MDB_val k, v
    cdef int rc
    if w.op.kind == K_OPEN_ACCOUNT or w.op.kind == K_SET_PROFILE:
        n_data = 0
    size = sizeof(OperationRec) + lots_size + n_data
    buf = need_buf(w, size)
    if buf == NULL:
        return fail(w, 12)
    w.rec.n_consumed = w.consumed.n
    w.rec.n_data = n_data
    memcpy(buf, &w.rec, sizeof(OperationRec))
    memcpy(buf + sizeof(OperationRec), w.consumed.items, lots_size)
    if n_data:
        memcpy(buf + sizeof(OperationRec) + lots_size, w.data, n_data)
    k.mv_size = w.op.n_id
    k.mv_data = <void *>w.op_id
    v.mv_size = size
    v.mv_data = buf
    rc = mdb_put(w.txn, w.dbi[DB_OPS], &k, &v, MDB_NOOVERWRITE)
    if rc == MDB_KEYEXIST:
        if v.mv_size < sizeof(OperationRec):
            return fail(w, MDB_CORRUPTED)
        memcpy(first, v.mv_data, sizeof(OperationRec))
        return 1
    if rc != MDB_SUCCESS:
        return fail(w, rc)
    return 0


# --- member index (records.py) ------------------------------------------------
cdef int check_birthday(uint32_t code) noexcept nogil:
    """OK for 0 (none) or month * 100 + day of a real date (29 Feb too)."""
    cdef uint32_t month = code // 100, day = code % 100, days = 31
    if code == 0:
        return OK
    if month == 2:
        days = 29
    elif month == 4 or month == 6 or month == 9 or month == 11:
        days = 30
    if month < 1 or month > 12 or day < 1 or day > days:
        return TIME_INVALID
    return OK


cdef int index_birthday(Work *w, uint64_t account_id, uint32_t program,
                        uint16_t birthday) noexcept nogil:
    """Moves the member's birthday in `member_index` (0: none)."""
    cdef BirthdayOfKey of
    cdef MemberIndexKey key
    cdef uint16_t old = 0
    cdef MDB_val v
    cdef int rc
    of.kind = IDX_BIRTHDAY_OF
    of.account = be64(account_id)
    rc = db_get(w, DB_MEMBER_INDEX, &of, sizeof(BirthdayOfKey), &v)
    if rc == 0:
        if v.mv_size != 2:
            return fail(w, MDB_CORRUPTED)
        memcpy(&old, v.mv_data, 2)
    elif rc != 1:
        return rc
    if old == birthday:
        return OK
    key.kind = IDX_BIRTHDAY
    key.program = be32(program)
    key.account = be64(account_id)
    if old:
        key.value = k_be16(old)
        rc = queue_put(w, DB_MEMBER_INDEX, &key, sizeof(MemberIndexKey), NULL, 0, 1)
        if rc:
            return rc
    if birthday:
        key.value = k_be16(birthday)
        rc = queue_put(w, DB_MEMBER_INDEX, &key, sizeof(MemberIndexKey), NULL, 0, 0)
        if rc:
            return rc
    return queue_put(w, DB_MEMBER_INDEX, &of, sizeof(BirthdayOfKey), &birthday,
                     2 if birthday else 0, birthday == 0)


cdef int index_tier(Work *w, Acct *a, uint64_t tier, int delete) noexcept nogil:
    cdef MemberIndexKey key
    key.kind = IDX_TIER
    key.program = be32(a.h.program)
    key.value = k_be16(<uint16_t>tier)
    key.account = be64(a.id)
    return queue_put(w, DB_MEMBER_INDEX, &key, sizeof(MemberIndexKey), NULL, 0, delete)


# --- operations ------------------------------------------------------------------
cdef int op_put_program(Work *w) noexcept nogil:
    """Creates or updates a program; its data (the definition the server
    prices by) is kept with the program's record, replacing the last one.
    `reason` is its UTC offset in minutes, an int32."""
    cdef const OpHead *op = w.op
    cdef uint32_t key = be32(op.program)
    cdef int32_t utc_offset = <int32_t>op.reason
    cdef ProgramRec rec
    cdef MDB_val v
    cdef char *buf
    cdef int rc
    if op.program == 0:
        return KEY_INVALID
    if op.flags & ~PROGRAM_ALLOW_DEBT:
        return FLAGS_INVALID
    if utc_offset < -MAX_UTC_OFFSET or utc_offset > MAX_UTC_OFFSET:
        return TIME_INVALID
    rc = db_get(w, DB_PROGRAMS, &key, 4, &v)
    if rc == 0 and v.mv_size < sizeof(ProgramRec):
        return fail(w, MDB_CORRUPTED)
    if rc == 0:
        rec.created_at = (<ProgramRec *>v.mv_data).created_at
    elif rc == 1:
        rec.created_at = w.now
    else:
        return rc
    rec.flags = op.flags
    rec.updated_at = w.now
    rec.utc_offset = utc_offset
    buf = need_buf(w, sizeof(ProgramRec) + op.n_data)
    if buf == NULL:
        return fail(w, 12)
    memcpy(buf, &rec, sizeof(ProgramRec))
    if op.n_data:
        memcpy(buf + sizeof(ProgramRec), w.data, op.n_data)
    rc = queue_put(w, DB_PROGRAMS, &key, 4, buf, sizeof(ProgramRec) + op.n_data, 0)
    if rc:
        return rc
    rc = event(w, E_PROGRAM_PUT, op.program, 0, op.flags, utc_offset, 0, NULL, 0)
    w.programs_changed = 1
    w.rec.program = op.program
    w.rec.a = op.program
    return rc


cdef int op_open_account(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef uint32_t flags
    cdef char key[4 + MAX_KEY]
    cdef uint32_t program_be
    cdef MDB_val v
    cdef uint64_t account_id, id_be
    cdef Acct *a
    cdef int rc = program_flags(w, op.program, &flags)
    if rc:
        return rc
    if op.n_key < 1 or op.n_key > MAX_KEY:
        return KEY_INVALID
    rc = check_birthday(op.reason)
    if rc:
        return rc
    program_be = be32(op.program)
    memcpy(key, &program_be, 4)
    memcpy(key + 4, w.key, op.n_key)
    rc = db_get(w, DB_EXTERNALS, key, 4 + op.n_key, &v)
    if rc == 0:
        return ACCOUNT_EXISTS
    if rc != 1:
        return rc
    account_id = w.next_account_op
    w.next_account_op += 1
    a = new_slot(w, account_id)
    if a == NULL:
        return fail(w, 12)
    a.h.program = op.program
    a.h.status = ST_ACTIVE
    a.h.next_lot = 1
    a.h.next_hold = 1
    a.h.opened_at = w.now
    id_be = be64(account_id)
    rc = queue_put(w, DB_EXTERNALS, key, 4 + op.n_key, &id_be, 8, 0)
    if rc:
        return rc
    if op.n_data:
        rc = queue_put(w, DB_PROFILES, &id_be, 8, w.data, op.n_data, 0)
        if rc:
            return rc
    rc = index_birthday(w, account_id, op.program, <uint16_t>op.reason)
    if rc:
        return rc
    rc = event(w, E_ACCOUNT_OPENED, op.program, account_id, 0, 0, 0, w.key, op.n_key)
    w.rec.program = op.program
    w.rec.account = account_id
    w.rec.a = <int64_t>account_id
    return rc


cdef int op_set_account_status(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef int rc
    if op.amount != ST_ACTIVE and op.amount != ST_BLOCKED and op.amount != ST_CLOSED:
        return STATUS_INVALID
    rc = load_account(w, op.account, &a)
    if rc:
        return rc
    if a.h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    a.h.status = <uint8_t>op.amount
    rc = event(w, E_ACCOUNT_STATUS, a.h.program, op.account, op.amount, 0, 0, NULL, 0)
    w.rec.account = op.account
    w.rec.a = op.amount
    return rc


cdef int op_set_profile(Work *w) noexcept nogil:
    """Store or delete a profile; with PROFILE_ERASE and the member's
    external id in `key`, delete that mapping too. Any status: a closed
    member's personal data can still be erased."""
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef char key[4 + MAX_KEY]
    cdef uint32_t program_be
    cdef uint64_t id_be, mapped
    cdef MDB_val v
    cdef int rc
    if op.flags & ~PROFILE_ERASE:
        return FLAGS_INVALID
    rc = check_birthday(op.reason)
    if rc:
        return rc
    rc = load_account(w, op.account, &a)
    if rc:
        return rc
    if op.flags & PROFILE_ERASE and op.n_key:
        if op.n_key > MAX_KEY:
            return KEY_INVALID
        program_be = be32(a.h.program)
        memcpy(key, &program_be, 4)
        memcpy(key + 4, w.key, op.n_key)
        rc = db_get(w, DB_EXTERNALS, key, 4 + op.n_key, &v)
        if rc == 1:
            return KEY_INVALID
        if rc:
            return rc
        if v.mv_size != 8:
            return fail(w, MDB_CORRUPTED)
        memcpy(&mapped, v.mv_data, 8)
        if be64(mapped) != op.account:
            return KEY_INVALID
        rc = queue_put(w, DB_EXTERNALS, key, 4 + op.n_key, NULL, 0, 1)
        if rc:
            return rc
    id_be = be64(op.account)
    rc = queue_put(w, DB_PROFILES, &id_be, 8, w.data, op.n_data, op.n_data == 0)
    if rc:
        return rc
    rc = index_birthday(w, op.account, a.h.program, <uint16_t>op.reason)
    if rc:
        return rc
    rc = event(w, E_PROFILE_SET, a.h.program, op.account, op.flags, 0, 0, NULL, 0)
    w.rec.program = a.h.program
    w.rec.account = op.account
    w.rec.a = <int64_t>op.account
    return rc


cdef int op_set_tier(Work *w) noexcept nogil:
    """Journaled only when the tier changes: a period close run twice
    leaves one entry."""
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef uint64_t previous
    cdef int rc
    if op.amount < 0 or op.amount > MAX_TIER:
        return AMOUNT_INVALID
    rc = load_account(w, op.account, &a)
    if rc:
        return rc
    if a.h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    previous = a.h.tier
    if <uint64_t>op.amount != previous:
        a.h.tier = <uint64_t>op.amount
        if previous:
            rc = index_tier(w, a, previous, 1)
            if rc:
                return rc
        if op.amount:
            rc = index_tier(w, a, a.h.tier, 0)
            if rc:
                return rc
        rc = event(w, E_TIER_SET, a.h.program, op.account, op.amount,
                   <int64_t>previous, 0, NULL, 0)
        if rc:
            return rc
    w.rec.program = a.h.program
    w.rec.account = op.account
    w.rec.a = op.amount
    w.rec.b = <int64_t>previous
    return OK


cdef int card_exists(Work *w, const char *card, size_t n) noexcept nogil:
    """CARD_EXISTS, OK when absent, or FATAL."""
    cdef MDB_val v
    cdef int rc = db_get(w, DB_CARDS, card, n, &v)
    if rc == 0:
        return CARD_EXISTS
    if rc == 1:
        return OK
    return rc


cdef int op_link_card(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef CardRec card
    cdef int rc
    if op.n_key < 1 or op.n_key > MAX_KEY:
        return KEY_INVALID
    rc = load_account(w, op.account, &a)
    if rc:
        return rc
    if a.h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    rc = card_exists(w, w.key, op.n_key)
    if rc:
        return rc
    card.account = op.account
    card.status = CARD_ACTIVE
    rc = queue_put(w, DB_CARDS, w.key, op.n_key, &card, sizeof(CardRec), 0)
    if rc:
        return rc
    rc = event(w, E_CARD_LINKED, a.h.program, op.account, 0, 0, 0, w.key, op.n_key)
    w.rec.account = op.account
    w.rec.a = <int64_t>op.account
    return rc


cdef int op_block_card(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef CardRec card
    cdef int rc
    if op.n_key < 1 or op.n_key > MAX_KEY:
        return KEY_INVALID
    rc = load_card(w, w.key, op.n_key, &card)
    if rc:
        return rc
    if card.status != CARD_ACTIVE:
        return CARD_BLOCKED
    rc = load_account(w, card.account, &a)
    if rc:
        return rc
    card.status = CARD_BLOCKED_ST
    rc = queue_put(w, DB_CARDS, w.key, op.n_key, &card, sizeof(CardRec), 0)
    if rc:
        return rc
    rc = event(w, E_CARD_BLOCKED, a.h.program, card.account, 0, 0, 0, w.key, op.n_key)
    w.rec.account = card.account
    w.rec.a = <int64_t>card.account
    return rc


cdef int op_replace_card(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef CardRec card
    cdef int rc
    if op.n_key < 1 or op.n_key > MAX_KEY or op.n_key2 < 1 or op.n_key2 > MAX_KEY:
        return KEY_INVALID
    rc = load_card(w, w.key, op.n_key, &card)
    if rc:
        return rc
    if card.status == CARD_REPLACED:
        return CARD_BLOCKED
    if op.n_key == op.n_key2 and memcmp(w.key, w.key2, op.n_key) == 0:
        return CARD_EXISTS
    rc = card_exists(w, w.key2, op.n_key2)
    if rc:
        return rc
    rc = load_account(w, card.account, &a)
    if rc:
        return rc
    if a.h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    card.status = CARD_REPLACED
    rc = queue_put(w, DB_CARDS, w.key, op.n_key, &card, sizeof(CardRec), 0)
    if rc:
        return rc
    card.status = CARD_ACTIVE
    rc = queue_put(w, DB_CARDS, w.key2, op.n_key2, &card, sizeof(CardRec), 0)
    if rc:
        return rc
    rc = event(w, E_CARD_REPLACED, a.h.program, card.account, 0, 0, 0, w.key, op.n_key)
    if rc:
        return rc
    rc = event(w, E_CARD_LINKED, a.h.program, card.account, 0, 0, 0, w.key2, op.n_key2)
    w.rec.account = card.account
    w.rec.a = <int64_t>card.account
    return rc


cdef int earn_points(Work *w, Acct *a, uint32_t *lot_no) noexcept nogil:
    """`amount2` points as a new lot, issued at the op's partner: what a
    receipt earns, or a bonus."""
    cdef const OpHead *op = w.op
    cdef int rc
    if k_add(a.h.balance, op.amount2, &a.h.balance) or k_add(a.h.earned, op.amount2,
                                                            &a.h.earned):
        return OVERFLOW
    rc = new_lot(w, a, op.partner, op.amount2, op.activates_at, op.expires_at,
                 hour_of(w.now), lot_no)
    if rc:
        return rc
    return post(w, E_EARN, a.h.program, system_account(SYS_ISSUED, op.partner),
                a.id, op.amount2, SYS_ISSUED, op.partner, 0, 0, lot_no[0])


cdef int op_receipt(Work *w) noexcept nogil:
    """EARN, SPEND and CAPTURE: spend `amount`, earn `amount2`, one receipt."""
    cdef const OpHead *op = w.op
    cdef int64_t spend = op.amount, earn = op.amount2, held, taken
    cdef bint has_hold
    cdef uint64_t account_id
    cdef OperationRec hold
    cdef Acct *a
    cdef uint32_t lot_no = 0
    cdef int128 free_points
    cdef int rc
    if spend < 0 or earn < 0 or op.money < 0:
        return AMOUNT_INVALID
    if op.kind == K_EARN and (spend != 0 or earn == 0):
        return AMOUNT_INVALID
    if op.kind == K_SPEND and (earn != 0 or spend == 0):
        return AMOUNT_INVALID
    has_hold = op.kind == K_CAPTURE and op.n_key != 0
    if (op.kind == K_CAPTURE and not has_hold and spend == 0 and earn == 0
            and op.money == 0):
        return AMOUNT_INVALID  # money alone records a visit
    if earn > 0:
        rc = check_lot_times(w)
        if rc:
            return rc
    rc = resolve(w, &account_id)
    if rc:
        return rc
    if has_hold:
        rc = find_hold(w, w.key, op.n_key, &hold)
        if rc:
            return rc
        if account_id != 0 and account_id != hold.account:
            return HOLD_NOT_FOUND
        account_id = hold.account
    rc = usable_account(w, account_id, &a)
    if rc:
        return rc
    if has_hold:
        rc = release_hold(w, a, hold.hold_no, RELEASE_CAPTURED, &held)
        if rc:
            return rc
        if spend > held:
            return CAPTURE_EXCEEDS_HOLD
        hold.hold_state = HOLD_ST_CAPTURED
        rc = queue_operation(w, w.key, op.n_key, &hold, NULL, &w.loaded_data)
        if rc:
            return rc
        w.rec.hold_no = hold.hold_no
    if spend > 0:
        # a hold's points stand even against a debt that came after it
        free_points = active_points(w, a) - a.h.held
        if not has_hold:
            free_points -= a.h.debt
        if free_points < spend:
            return INSUFFICIENT_POINTS
        rc = take_active(w, a, spend, &w.consumed, &taken)
        if rc:
            return rc
        if k_add(a.h.balance, -spend, &a.h.balance) or k_add(a.h.spent, spend, &a.h.spent):
            return OVERFLOW
        rc = post_by_partner(w, &w.consumed, E_SPEND, a, op.partner, False)
        if rc:
            return rc
    if earn > 0:
        rc = earn_points(w, a, &lot_no)
        if rc:
            return rc
    if op.money > 0:  # the receipt itself: visits and money, for reports
        rc = event(w, E_RECEIPT, a.h.program, account_id, op.money, spend,
                   lot_no, NULL, 0)
        if rc:
            return rc
    rc = touch(w, a)
    if rc:
        return rc
    w.rec.program = a.h.program
    w.rec.account = account_id
    w.rec.partner = op.partner
    w.rec.money = op.money
    w.rec.spent = spend
    w.rec.earned = earn
    w.rec.earned_lot = lot_no
    if op.kind == K_EARN:
        w.rec.a = lot_no
    elif op.kind == K_SPEND:
        w.rec.a = spend
    else:
        w.rec.a = spend
        w.rec.b = lot_no
    return OK


cdef int op_hold(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef uint32_t hold_no
    cdef ExpiryKey key
    cdef uint64_t account_id
    cdef int rc
    if op.amount <= 0:
        return AMOUNT_INVALID
    if op.expires_at <= w.now:
        return TIME_INVALID
    rc = resolve(w, &account_id)
    if rc:
        return rc
    rc = usable_account(w, account_id, &a)
    if rc:
        return rc
    if a.n_holds >= MAX_HOLDS:
        return TOO_MANY_HOLDS
    if available(w, a) < op.amount:
        return INSUFFICIENT_POINTS
    hold_no = a.h.next_hold
    a.h.next_hold += 1
    if grow(<void **>&a.holds, &a.cap_holds, a.n_holds + 1, sizeof(HoldRec)):
        return fail(w, 12)
    a.holds[a.n_holds].hold_no = hold_no
    a.holds[a.n_holds].pad = 0
    a.holds[a.n_holds].amount = op.amount
    a.holds[a.n_holds].expires_at = op.expires_at
    a.n_holds += 1
    if k_add(a.h.held, op.amount, &a.h.held):
        return OVERFLOW
    key.expires_at = be64(<uint64_t>op.expires_at)
    key.account = be64(account_id)
    rc = queue_put(w, DB_HOLD_EXPIRY, &key, sizeof(ExpiryKey), NULL, 0, 0)
    if rc:
        return rc
    rc = event(w, E_HOLD_PLACED, a.h.program, account_id, op.amount,
               op.expires_at, hold_no, NULL, 0)
    w.rec.program = a.h.program
    w.rec.account = account_id
    w.rec.hold_state = HOLD_OPEN
    w.rec.hold_no = hold_no
    w.rec.a = hold_no
    return rc


cdef int op_void(Work *w) noexcept nogil:
    cdef OperationRec hold
    cdef Acct *a
    cdef int64_t released
    cdef int rc = find_hold(w, w.key, w.op.n_key, &hold)
    if rc:
        return rc
    rc = load_account(w, hold.account, &a)
    if rc:
        return rc
    rc = touch(w, a)
    if rc:
        return rc
    rc = release_hold(w, a, hold.hold_no, RELEASE_VOIDED, &released)
    if rc:
        return rc
    hold.hold_state = HOLD_ST_VOIDED
    rc = queue_operation(w, w.key, w.op.n_key, &hold, NULL, &w.loaded_data)
    w.rec.program = a.h.program
    w.rec.account = hold.account
    w.rec.hold_no = hold.hold_no
    w.rec.a = released
    return rc


cdef int give_back(Work *w, Acct *a, OperationRec *orig, LotBuf *consumed,
                   int64_t give) noexcept nogil:
    """Return spent points to the lots they came from, last consumed first."""
    cdef int64_t before = orig.returned, after = orig.returned + give
    cdef int64_t old, new
    cdef int i
    cdef LotRec lot
    cdef LotBuf returned
    cdef int rc = OK
    returned.items = NULL
    returned.n = returned.cap = 0
    for i in range(<int>consumed.n - 1, -1, -1):
        lot = consumed.items[i]
        old = min64(lot.remaining, before)
        new = min64(lot.remaining, after)
        before -= old
        after -= new
        if new > old:
            lot.remaining = new - old
            if grow(<void **>&returned.items, &returned.cap, returned.n + 1, sizeof(LotRec)):
                rc = fail(w, 12)
                break
            returned.items[returned.n] = lot
            returned.n += 1
            rc = add_lot(w, a, &lot)
            if rc:
                break
    if rc == OK:
        if k_add(a.h.balance, give, &a.h.balance) or k_add(a.h.spent, -give, &a.h.spent):
            rc = OVERFLOW
    if rc == OK:
        rc = post_by_partner(w, &returned, E_RETURN, a, orig.partner, True)
    free(returned.items)
    return rc


cdef int claw_back(Work *w, Acct *a, OperationRec *orig, int64_t claw) noexcept nogil:
    """Take back earned points: from the receipt's own lot, then from the
    available balance, then as debt where the program allows it."""
    cdef int64_t left = claw, part, taken, from_lot = 0
    cdef int128 free_points
    cdef uint32_t i, flags
    cdef LotRec own
    cdef int rc
    for i in range(a.lots.n):
        if a.lots.items[i].lot_no == orig.earned_lot:
            part = min64(a.lots.items[i].remaining, left)
            if a.lots.items[i].activates_at <= w.now:  # active: held points stay
                free_points = available(w, a)
                if free_points < 0:
                    free_points = 0
                if free_points < part:
                    part = <int64_t>free_points
            a.lots.items[i].remaining -= part
            left -= part
            own = a.lots.items[i]  # what it gave: its cohort's clawed points
            from_lot += part
    drop_empty_lots(a)
    if left:
        free_points = available(w, a)
        if free_points < 0:
            free_points = 0
        if free_points > left:
            free_points = left
        rc = take_active(w, a, <int64_t>free_points, NULL, &taken)
        if rc:
            return rc
        left -= taken
    if left:
        rc = program_flags(w, a.h.program, &flags)
        if rc:
            return rc
        if not flags & PROGRAM_ALLOW_DEBT:
            return INSUFFICIENT_POINTS
        if k_add(a.h.debt, left, &a.h.debt):
            return OVERFLOW
    if k_add(a.h.balance, -claw, &a.h.balance) or k_add(a.h.earned, -claw, &a.h.earned):
        return OVERFLOW
    rc = post(w, E_CLAWBACK, a.h.program, a.id,
              system_account(SYS_ISSUED, orig.partner), claw, SYS_ISSUED,
              orig.partner, orig.partner, 0, orig.earned_lot)
    if rc == OK and from_lot:
        rc = name_lot(w, &own, from_lot)
    return rc


# --- coupons (records.py) --------------------------------------------------------
cdef int named_receipt(Work *w, uint64_t account_id) noexcept nogil:
    """A coupon operation's `key`, when given: a receipt of the member."""
    cdef OperationRec receipt
    cdef int rc
    if w.op.n_key == 0:
        return OK
    if w.op.n_key > MAX_OP_ID:
        return KEY_INVALID
    rc = load_operation(w, w.key, w.op.n_key, &receipt, NULL, NULL)
    if rc == 1 or (rc == 0 and (receipt.kind != K_EARN and receipt.kind != K_SPEND
                                and receipt.kind != K_CAPTURE
                                or receipt.account != account_id)):
        return OPERATION_NOT_FOUND
    return rc


cdef int coupon_member(Work *w, Acct **a) noexcept nogil:
    """The member a coupon operation names (by id, or the card `key2`),
    usable, and the receipt it names, if any, theirs."""
    cdef uint64_t account_id
    cdef int rc = resolve(w, &account_id)
    if rc:
        return rc
    rc = usable_account(w, account_id, a)
    if rc:
        return rc
    return named_receipt(w, account_id)


cdef int open_coupon(Work *w, Acct *a, CouponRec *coupon, int how,
                     uint64_t from_account, uint64_t from_number) noexcept nogil:
    """Makes `coupon` the member's (open), dropping their closed ones;
    COUPON_MOVED: `from_account` and `from_number` name the coupon a merge
    moves."""
    cdef uint32_t i, j = 0
    cdef size_t n
    for i in range(a.n_coupons):
        if a.coupons[i].state == CP_OPEN:
            a.coupons[j] = a.coupons[i]
            j += 1
    if grow(<void **>&a.coupons, &a.cap_coupons, j + 1, sizeof(CouponRec)):
        return fail(w, 12)
    i = j  # by number: a new one goes last, one given back where it was
    while i > 0 and a.coupons[i - 1].number > coupon.number:
        a.coupons[i] = a.coupons[i - 1]
        i -= 1
    a.coupons[i] = coupon[0]
    a.n_coupons = j + 1
    n = put_uv(w.coupon_data, <uint64_t>coupon.usable_from)
    n += put_uv(w.coupon_data + n, how)
    if how == COUPON_MOVED:
        n += put_uv(w.coupon_data + n, from_account)
        n += put_uv(w.coupon_data + n, from_number)
    return coupon_entry(w, E_COUPON_ISSUED, a, coupon.value, coupon.expires_at,
                        coupon.number, n)


cdef int coupon_entry(Work *w, int type_, Acct *a, int64_t amount, int64_t amount2,
                      uint64_t ref, size_t n) noexcept nogil:
    """A coupon event of the account's whose data is w.coupon_data[:n]."""
    if grow(<void **>&w.lots_named.p, &w.lots_named.cap, w.lots_named.n + <uint32_t>n, 1):
        return fail(w, 12)
    memcpy(w.lots_named.p + w.lots_named.n, w.coupon_data, n)
    if new_entry(w, type_, 0, a.h.program, w.op.partner, 0, 0, a.id,
                 amount, amount2, ref) == NULL:
        return FATAL
    w.entries[w.n_entries - 1].names_lots = 1  # its data is kept with the named lots'
    w.entries[w.n_entries - 1].lots_off = w.lots_named.n
    w.entries[w.n_entries - 1].h.n_data = <uint16_t>n
    w.lots_named.n += <uint32_t>n
    return OK


cdef int op_issue_coupon(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef uint32_t i, held = 0
    cdef CouponRec coupon
    cdef Acct *a
    cdef int rc
    if op.flags & ~COUPON_ONE_PER_CUSTOMER:
        return FLAGS_INVALID
    if op.amount <= 0:
        return AMOUNT_INVALID
    rc = check_lot_times(w)
    if rc:
        return rc
    rc = coupon_member(w, &a)
    if rc:
        return rc
    for i in range(a.n_coupons):
        if a.coupons[i].state == CP_OPEN:
            held += 1
            if (op.flags & COUPON_ONE_PER_CUSTOMER
                    and op.business_time < a.coupons[i].expires_at):
                return COUPON_HELD
    if held >= MAX_COUPONS:
        return TOO_MANY_COUPONS
    coupon.number = a.h.next_coupon
    coupon.state = CP_OPEN
    coupon.value = op.amount
    coupon.usable_from = op.activates_at
    coupon.expires_at = op.expires_at
    a.h.next_coupon += 1
    rc = open_coupon(w, a, &coupon, COUPON_EARNED, 0, 0)
    w.rec.program = a.h.program
    w.rec.account = a.id
    w.rec.partner = op.partner
    w.rec.a = coupon.number
    w.rec.money = op.amount
    return rc


cdef int op_redeem_coupon(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef uint32_t i
    cdef CouponRec *coupon = NULL
    cdef Acct *a
    cdef int rc
    if op.flags:
        return FLAGS_INVALID
    if op.amount <= 0:
        return AMOUNT_INVALID
    rc = coupon_member(w, &a)
    if rc:
        return rc
    for i in range(a.n_coupons):
        if <int64_t>a.coupons[i].number == op.amount2:
            coupon = &a.coupons[i]
    if coupon == NULL or coupon.state == CP_REVOKED or coupon.state == CP_MOVED \
            or coupon.state == CP_DISPLACED:
        return COUPON_NOT_FOUND
    if coupon.state == CP_REDEEMED:
        return COUPON_REDEEMED
    if coupon.state == CP_EXPIRED or op.business_time >= coupon.expires_at:
        return COUPON_EXPIRED
    if op.business_time < coupon.usable_from:
        return COUPON_NOT_USABLE
    if op.amount > coupon.value:
        return AMOUNT_INVALID
    rc = close_coupon(w, a, coupon, CP_REDEEMED, op.amount)
    if rc:
        return rc
    # the coupon, as the record's consumed row, for a refund to reopen it
    if grow(<void **>&w.consumed.items, &w.consumed.cap, 1, sizeof(LotRec)):
        return fail(w, 12)
    w.consumed.items[0].lot_no = coupon.number
    w.consumed.items[0].partner = 0
    w.consumed.items[0].remaining = coupon.value
    w.consumed.items[0].activates_at = coupon.usable_from
    w.consumed.items[0].expires_at = coupon.expires_at
    w.consumed.items[0].issued_hour = 0
    w.consumed.n = 1
    w.rec.program = a.h.program
    w.rec.account = a.id
    w.rec.partner = op.partner
    w.rec.a = coupon.number
    w.rec.b = op.amount
    w.rec.money = op.amount
    return OK


cdef int refund_coupon(Work *w, OperationRec *orig) noexcept nogil:
    """A REFUND of a coupon operation: revoke the coupon it issued, or give
    back the one it redeemed, where that still can be; with
    REFUND_KEEP_COUPON only note it (records.py)."""
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef uint32_t i
    cdef int64_t changed = 0
    cdef bint open_one = False
    cdef bint keep = op.flags == REFUND_KEEP_COUPON and orig.kind == K_REDEEM_COUPON
    cdef CouponRec coupon
    cdef LotRec *c
    cdef int rc
    if op.flags and not keep:
        return FLAGS_INVALID
    if op.money or op.amount or op.amount2:
        return AMOUNT_INVALID
    if <size_t>w.loaded_data.n + op.n_data > MAX_DATA:
        return DATA_TOO_LONG
    if orig.refunded_money:
        return REFUND_EXCEEDS_ORIGINAL
    rc = load_account(w, orig.account, &a)
    if rc:
        return rc
    rc = touch(w, a)
    if rc:
        return rc
    if orig.kind == K_ISSUE_COUPON:
        for i in range(a.n_coupons):
            if <int64_t>a.coupons[i].number == orig.a and a.coupons[i].state == CP_OPEN:
                rc = close_coupon(w, a, &a.coupons[i], CP_REVOKED, 0)
                if rc:
                    return rc
                changed = a.coupons[i].value
    elif not keep:
        if w.scratch_lots.n != 1:  # never: a redemption names its coupon
            return fail(w, MDB_CORRUPTED)
        c = &w.scratch_lots.items[0]
        for i in range(a.n_coupons):
            if a.coupons[i].state == CP_OPEN:
                open_one = True
        if c.expires_at > w.now and not open_one:
            coupon.number = c.lot_no
            coupon.state = CP_OPEN
            coupon.value = c.remaining
            coupon.usable_from = c.activates_at
            coupon.expires_at = c.expires_at
            rc = open_coupon(w, a, &coupon, COUPON_GIVEN_BACK, 0, 0)
            if rc:
                return rc
            changed = c.remaining
    if not keep:
        orig.refunded_money = orig.money
    if op.n_data:  # the refund's data is appended to the operation's
        if grow(<void **>&w.loaded_data.p, &w.loaded_data.cap,
                w.loaded_data.n + op.n_data, 1):
            return fail(w, 12)
        memcpy(w.loaded_data.p + w.loaded_data.n, w.data, op.n_data)
        w.loaded_data.n += op.n_data
    rc = queue_operation(w, w.key, op.n_key, orig, &w.scratch_lots, &w.loaded_data)
    w.rec.program = a.h.program
    w.rec.account = orig.account
    w.rec.partner = orig.partner
    w.rec.a = changed
    return rc


cdef int op_refund(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef OperationRec orig
    cdef int64_t refunded_money, give, claw
    cdef int128 g, c
    cdef Acct *a
    cdef int rc
    if op.n_key < 1 or op.n_key > MAX_OP_ID:
        return KEY_INVALID
    if op.flags & ~(REFUND_PROPORTIONAL | REFUND_KEEP_COUPON):
        return FLAGS_INVALID
    if op.money < 0 or op.amount < 0 or op.amount2 < 0:
        return AMOUNT_INVALID
    w.scratch_lots.n = 0
    rc = load_operation(w, w.key, op.n_key, &orig, &w.scratch_lots, &w.loaded_data)
    if rc == 1:
        return OPERATION_NOT_FOUND
    if rc:
        return rc
    if orig.kind == K_ISSUE_COUPON or orig.kind == K_REDEEM_COUPON:
        return refund_coupon(w, &orig)
    if orig.kind != K_EARN and orig.kind != K_SPEND and orig.kind != K_CAPTURE:
        return NOT_REFUNDABLE
    if op.flags & REFUND_KEEP_COUPON:
        return FLAGS_INVALID
    if <size_t>w.loaded_data.n + op.n_data > MAX_DATA:
        return DATA_TOO_LONG
    if k_add(orig.refunded_money, op.money, &refunded_money):
        return OVERFLOW
    if refunded_money > orig.money:
        return REFUND_EXCEEDS_ORIGINAL
    if op.flags & REFUND_PROPORTIONAL:
        if op.money == 0 or op.amount or op.amount2:
            return AMOUNT_INVALID
        g = <int128>orig.spent * refunded_money / orig.money - orig.returned
        c = <int128>orig.earned * refunded_money / orig.money - orig.clawed
        give = <int64_t>g if g > 0 else 0
        claw = <int64_t>c if c > 0 else 0
    else:
        give = op.amount
        claw = op.amount2
        if give == 0 and claw == 0 and op.money == 0:
            return AMOUNT_INVALID
        if (<int128>orig.returned + give > orig.spent
                or <int128>orig.clawed + claw > orig.earned):
            return REFUND_EXCEEDS_ORIGINAL
    rc = load_account(w, orig.account, &a)
    if rc:
        return rc
    rc = touch(w, a)
    if rc:
        return rc
    if give:
        rc = give_back(w, a, &orig, &w.scratch_lots, give)
        if rc:
            return rc
    if claw:
        rc = claw_back(w, a, &orig, claw)
        if rc:
            return rc
    if op.money > 0:  # the money given back, so receipts sum to net spend;
        # at the receipt's partner, like the refund's postings
        if new_entry(w, E_RECEIPT, 0, a.h.program, orig.partner, 0, 0,
                     orig.account, -op.money, -give, 0) == NULL:
            return FATAL
    rc = touch(w, a)
    if rc:
        return rc
    orig.refunded_money = refunded_money
    orig.returned += give
    orig.clawed += claw
    if op.n_data:  # the refund's data is appended to the receipt's
        if grow(<void **>&w.loaded_data.p, &w.loaded_data.cap,
                w.loaded_data.n + op.n_data, 1):
            return fail(w, 12)
        memcpy(w.loaded_data.p + w.loaded_data.n, w.data, op.n_data)
        w.loaded_data.n += op.n_data
    rc = queue_operation(w, w.key, op.n_key, &orig, &w.scratch_lots, &w.loaded_data)
    w.rec.program = a.h.program
    w.rec.account = orig.account
    w.rec.money = op.money
    w.rec.partner = orig.partner
    w.rec.a = give
    w.rec.b = claw
    return rc


cdef int op_adjust(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef uint64_t adjusted = system_account(SYS_ADJUSTED, op.partner)
    cdef uint32_t lot_no
    cdef int64_t points, taken
    cdef int rc
    if op.amount == 0:
        return AMOUNT_INVALID
    rc = load_account(w, op.account, &a)
    if rc:
        return rc
    if a.h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    rc = touch(w, a)
    if rc:
        return rc
    if op.amount > 0:
        rc = check_lot_times(w)
        if rc:
            return rc
        if k_add(a.h.balance, op.amount, &a.h.balance):
            return OVERFLOW
        rc = new_lot(w, a, op.partner, op.amount, op.activates_at, op.expires_at,
                     hour_of(w.now), &lot_no)
        if rc:
            return rc
        rc = post(w, E_ADJUST, a.h.program, adjusted, op.account, op.amount,
                  SYS_ADJUSTED, op.partner, 0, op.reason, lot_no)
        if rc:
            return rc
        w.rec.a = lot_no
    else:
        if op.amount == INT64_MIN:
            return INSUFFICIENT_POINTS  # -(int64 min) is no int64: never affordable
        points = -op.amount
        if available(w, a) < points:
            return INSUFFICIENT_POINTS
        rc = take_active(w, a, points, NULL, &taken)
        if rc:
            return rc
        a.h.balance -= points
        rc = post(w, E_ADJUST, a.h.program, op.account, adjusted, points,
                  SYS_ADJUSTED, op.partner, 0, op.reason, 0)
        if rc:
            return rc
        w.rec.a = points
    rc = touch(w, a)
    w.rec.program = a.h.program
    w.rec.account = op.account
    return rc


cdef inline bint better_coupon(CouponRec *c, CouponRec *best) noexcept nogil:
    """Worth more, or as much with a window that ends later."""
    return best == NULL or c.value > best.value or (
        c.value == best.value and c.expires_at > best.expires_at)


cdef int displace_coupons(Work *w, Acct *a, CouponRec *best) noexcept nogil:
    """Closes every open coupon of the account's but `best` as DISPLACED."""
    cdef uint32_t i
    cdef int rc
    for i in range(a.n_coupons):
        if a.coupons[i].state == CP_OPEN and &a.coupons[i] != best:
            rc = close_coupon(w, a, &a.coupons[i], CP_DISPLACED, 0)
            if rc:
                return rc
    return OK


cdef int merge_coupons(Work *w, Acct *source, Acct *target, bint one) noexcept nogil:
    """TRANSFER_ALL: the source's open coupons go to the target, or with
    `one` (TRANSFER_ONE_COUPON) the best of both members' (records.py)."""
    cdef uint32_t i, n_moving = 0, n_held = 0
    cdef CouponRec *best = NULL
    cdef CouponRec *c
    cdef CouponRec moved
    cdef int rc
    for i in range(source.n_coupons):
        if source.coupons[i].state == CP_OPEN:
            n_moving += 1
    if n_moving == 0:
        return OK
    for i in range(target.n_coupons):  # the target's first: they win ties
        if target.coupons[i].state == CP_OPEN:
            n_held += 1
            if better_coupon(&target.coupons[i], best):
                best = &target.coupons[i]
    if one:
        for i in range(source.n_coupons):
            if source.coupons[i].state == CP_OPEN and better_coupon(
                    &source.coupons[i], best):
                best = &source.coupons[i]
        rc = displace_coupons(w, target, best)
        if rc:
            return rc
        rc = displace_coupons(w, source, best)
        if rc:
            return rc
    elif n_held + n_moving > MAX_COUPONS:
        return TOO_MANY_COUPONS
    for i in range(source.n_coupons):  # what is still open moves, by number
        c = &source.coupons[i]
        if c.state != CP_OPEN:
            continue
        rc = close_coupon(w, source, c, CP_MOVED, 0)
        if rc:
            return rc
        moved = c[0]
        moved.number = target.h.next_coupon
        moved.state = CP_OPEN
        target.h.next_coupon += 1
        rc = open_coupon(w, target, &moved, COUPON_MOVED, source.id, c.number)
        if rc:
            return rc
    return OK


cdef int op_transfer(Work *w) noexcept nogil:
    cdef const OpHead *op = w.op
    cdef bint everything
    cdef Acct *source
    cdef Acct *target
    cdef LotBuf *moved = &w.scratch_lots
    cdef int64_t total = 0, taken
    cdef uint32_t i, lot_no
    cdef EntryRec *e
    cdef int rc
    if (op.flags & ~(TRANSFER_ALL | TRANSFER_ONE_COUPON)
            or op.flags == TRANSFER_ONE_COUPON):
        return FLAGS_INVALID
    everything = op.flags & TRANSFER_ALL
    if (op.amount != 0) if everything else (op.amount <= 0):
        return AMOUNT_INVALID
    if op.account == op.account2:
        return SAME_ACCOUNT
    rc = load_account(w, op.account, &source)
    if rc:
        return rc
    rc = load_account(w, op.account2, &target)
    if rc:
        return rc
    load_account(w, op.account, &source)  # again: loading target may move slots
    if source.h.program != target.h.program:
        return PROGRAM_MISMATCH
    if source.h.status == ST_CLOSED or target.h.status == ST_CLOSED:
        return ACCOUNT_CLOSED
    if target.h.status == ST_BLOCKED:
        return ACCOUNT_BLOCKED
    rc = touch(w, source)
    if rc:
        return rc
    rc = touch(w, target)
    if rc:
        return rc
    moved.n = 0
    if everything:
        if source.h.debt > 0:
            return ACCOUNT_IN_DEBT
        if source.n_holds:
            return INSUFFICIENT_POINTS
        if grow(<void **>&moved.items, &moved.cap, source.lots.n, sizeof(LotRec)):
            return fail(w, 12)
        memcpy(moved.items, source.lots.items, source.lots.n * sizeof(LotRec))
        moved.n = source.lots.n
        source.lots.n = 0
    else:
        if available(w, source) < op.amount:
            return INSUFFICIENT_POINTS
        rc = take_active(w, source, op.amount, moved, &taken)
        if rc:
            return rc
    for i in range(moved.n):
        total += moved.items[i].remaining
    for i in range(moved.n):  # new lots of the target, in the same cohorts
        rc = new_lot(w, target, moved.items[i].partner, moved.items[i].remaining,
                     moved.items[i].activates_at, moved.items[i].expires_at,
                     moved.items[i].issued_hour, &lot_no)
        if rc:
            return rc
    source.h.balance -= total
    if k_add(target.h.balance, total, &target.h.balance):
        return OVERFLOW
    if total:
        e = new_entry(w, E_TRANSFER, 0, source.h.program, 0, 0, op.account,
                      op.account2, total, 0, 0)
        if e == NULL:
            return FATAL
    if everything:
        rc = merge_coupons(w, source, target, op.flags & TRANSFER_ONE_COUPON)
        if rc:
            return rc
    rc = touch(w, target)
    w.rec.program = source.h.program
    w.rec.account = op.account
    w.rec.a = total
    return rc


cdef int collect_due(Work *w, int db, int64_t limit) noexcept nogil:
    cdef MDB_cursor *cur
    cdef MDB_val k, v
    cdef int rc
    cdef ExpiryKey *key
    rc = mdb_cursor_open(w.txn, w.dbi[db], &cur)
    if rc:
        return fail(w, rc)
    rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)
    while rc == MDB_SUCCESS:
        if w.n_due >= limit:
            break
        key = <ExpiryKey *>k.mv_data
        if <int64_t>be64(key.expires_at) > w.now:
            break
        if grow(<void **>&w.due, &w.cap_due, w.n_due + 1, sizeof(ExpiryKey)):
            mdb_cursor_close(cur)
            return fail(w, 12)
        w.due[w.n_due] = key[0]
        w.n_due += 1
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)
    mdb_cursor_close(cur)
    if rc != MDB_SUCCESS and rc != MDB_NOTFOUND:
        return fail(w, rc)
    return OK


cdef int op_sweep(Work *w) noexcept nogil:
    """Expire lots and holds that are due, a bounded number of index keys."""
    cdef uint32_t i, lots_due
    cdef int64_t expired = 0, before
    cdef Acct *a
    cdef int rc
    if w.op.amount <= 0:
        return AMOUNT_INVALID
    w.n_due = 0
    rc = collect_due(w, DB_LOT_EXPIRY, w.op.amount)
    if rc:
        return rc
    lots_due = w.n_due
    rc = collect_due(w, DB_HOLD_EXPIRY, w.op.amount)
    if rc:
        return rc
    for i in range(w.n_due):
        rc = load_account(w, be64(w.due[i].account), &a)
        if rc:
            return rc
        before = a.h.expired
        rc = touch(w, a)
        if rc:
            return rc
        if k_add(expired, a.h.expired - before, &expired):
            return OVERFLOW
        rc = queue_put(w, DB_LOT_EXPIRY if i < lots_due else DB_HOLD_EXPIRY,
                       &w.due[i], sizeof(ExpiryKey), NULL, 0, 1)
        if rc:
            return rc
        if i < lots_due and a.lots.n and a.lots.items[0].expires_at != NEVER:
            rc = index_expiry(w, a)
            if rc:
                return rc
    w.rec.a = w.n_due
    w.rec.b = expired
    return OK


# --- bonuses -------------------------------------------------------------------
cdef size_t counter_key(Work *w, uint64_t account_id, char *key) noexcept nogil:
    """bonus_counters' key of the op's counter (`key`) for a member."""
    cdef uint64_t id_be = be64(account_id)
    memcpy(key, &id_be, 8)
    memcpy(key + 8, w.key, w.op.n_key)
    return 8 + w.op.n_key


cdef int load_counter(Work *w, uint64_t account_id, int64_t *value) noexcept nogil:
    """(count, awards) of the op's counter for a member, zeros when new."""
    cdef char key[8 + MAX_KEY]
    cdef MDB_val v
    cdef int rc = db_get(w, DB_BONUS_COUNTERS, key, counter_key(w, account_id, key), &v)
    value[0] = value[1] = 0
    if rc == 1:
        return OK
    if rc:
        return rc
    if v.mv_size != 2 * sizeof(int64_t):
        return fail(w, MDB_CORRUPTED)
    memcpy(value, v.mv_data, 2 * sizeof(int64_t))
    return OK


cdef int count_bonus(Work *w, Acct *a, int64_t *value, int64_t points,
                     uint32_t lot_no) noexcept nogil:
    """The counter's new values, and the BONUS event that says so."""
    cdef char key[8 + MAX_KEY]
    cdef int rc = queue_put(w, DB_BONUS_COUNTERS, key, counter_key(w, a.id, key),
                            value, 2 * sizeof(int64_t), 0)
    if rc:
        return rc
    rc = event(w, E_BONUS, a.h.program, a.id, points, value[0], lot_no, w.key,
               w.op.n_key)
    w.rec.program = a.h.program
    w.rec.account = a.id
    w.rec.partner = w.op.partner
    w.rec.earned = points
    w.rec.earned_lot = lot_no
    w.rec.a = lot_no
    w.rec.b = value[0]
    return rc


cdef int op_award(Work *w) noexcept nogil:
    """A bonus counted against the member's counter `key` (an action, a
    birthday): refused once the counter holds `amount` (0: no limit)."""
    cdef const OpHead *op = w.op
    cdef Acct *a
    cdef int64_t value[2]
    cdef uint32_t lot_no = 0
    cdef int rc
    if op.n_key < 1 or op.n_key > MAX_KEY:
        return KEY_INVALID
    if op.amount < 0 or op.amount2 <= 0:
        return AMOUNT_INVALID
    rc = check_lot_times(w)
    if rc:
        return rc
    rc = usable_account(w, op.account, &a)
    if rc:
        return rc
    rc = load_counter(w, op.account, value)
    if rc:
        return rc
    if op.amount and value[0] >= op.amount:
        return LIMIT_REACHED
    rc = earn_points(w, a, &lot_no)
    if rc:
        return rc
    if k_add(value[0], 1, &value[0]) or k_add(value[1], 1, &value[1]):
        return OVERFLOW
    rc = count_bonus(w, a, value, op.amount2, lot_no)
    if rc:
        return rc
    return touch(w, a)


cdef int op_visit(Work *w) noexcept nogil:
    """Counts receipt `key2` as a visit on the member's counter `key`; the
    visit that brings the count to `amount` earns `amount2` points, once
    per counter (later visits count, earn nothing)."""
    cdef const OpHead *op = w.op
    cdef OperationRec receipt
    cdef Acct *a
    cdef int64_t value[2]
    cdef int64_t points = 0
    cdef uint32_t lot_no = 0
    cdef int rc
    if op.n_key < 1 or op.n_key > MAX_KEY or op.n_key2 < 1 or op.n_key2 > MAX_OP_ID:
        return KEY_INVALID
    if op.amount <= 0 or op.amount2 <= 0:
        return AMOUNT_INVALID
    rc = check_lot_times(w)
    if rc:
        return rc
    rc = load_operation(w, w.key2, op.n_key2, &receipt, NULL, NULL)
    if rc == 1:
        return OPERATION_NOT_FOUND
    if rc:
        return rc
    if ((receipt.kind != K_EARN and receipt.kind != K_SPEND and receipt.kind != K_CAPTURE)
            or (op.account != 0 and op.account != receipt.account)):
        return KEY_INVALID
    rc = usable_account(w, receipt.account, &a)
    if rc:
        return rc
    rc = load_counter(w, receipt.account, value)
    if rc:
        return rc
    if k_add(value[0], 1, &value[0]):
        return OVERFLOW
    if value[0] >= op.amount and value[1] == 0:
        rc = earn_points(w, a, &lot_no)
        if rc:
            return rc
        points = op.amount2
        value[1] = 1
    rc = count_bonus(w, a, value, points, lot_no)
    if rc:
        return rc
    return touch(w, a)


cdef int dispatch(Work *w) noexcept nogil:
    cdef uint8_t kind = w.op.kind
    if w.op.link & ~LINKED:
        return FLAGS_INVALID
    if kind == K_EARN or kind == K_SPEND or kind == K_CAPTURE:
        return op_receipt(w)
    if kind == K_HOLD:
        return op_hold(w)
    if kind == K_VOID:
        return op_void(w)
    if kind == K_REFUND:
        return op_refund(w)
    if kind == K_ADJUST:
        return op_adjust(w)
    if kind == K_TRANSFER:
        return op_transfer(w)
    if kind == K_SWEEP:
        return op_sweep(w)
    if kind == K_PUT_PROGRAM:
        return op_put_program(w)
    if kind == K_OPEN_ACCOUNT:
        return op_open_account(w)
    if kind == K_SET_ACCOUNT_STATUS:
        return op_set_account_status(w)
    if kind == K_LINK_CARD:
        return op_link_card(w)
    if kind == K_BLOCK_CARD:
        return op_block_card(w)
    if kind == K_REPLACE_CARD:
        return op_replace_card(w)
    if kind == K_SET_PROFILE:
        return op_set_profile(w)
    if kind == K_SET_TIER:
        return op_set_tier(w)
    if kind == K_ISSUE_COUPON:
        return op_issue_coupon(w)
    if kind == K_REDEEM_COUPON:
        return op_redeem_coupon(w)
    if kind == K_AWARD:
        return op_award(w)
    if kind == K_VISIT:
        return op_visit(w)
    return KIND_INVALID


cdef void reset_changes(Work *w) noexcept nogil:
    """Forget what the last operation (or chain) worked out."""
    w.n_accts = 0
    w.n_entries = 0
    w.folded = 0
    w.n_puts = 0
    w.arena_len = 0
    w.n_sys = 0
    w.n_agg_staged = 0
    w.lots_named.n = 0
    w.programs_changed = 0
    w.next_account_op = w.next_account


cdef void begin_op(Work *w, const OpHead *op) noexcept nogil:
    """The operation in flight: its fields, and a fresh record."""
    cdef const char *p = <const char *>op + sizeof(OpHead)
    w.op = op
    w.op_id = p
    w.key = p + op.n_id
    w.key2 = p + op.n_id + op.n_key
    w.data = w.key2 + op.n_key2
    w.consumed.n = 0
    w.scratch_lots.n = 0
    w.loaded_data.n = 0
    memset(&w.rec, 0, sizeof(OperationRec))
    w.entry_store = op.store
    w.rec.store = op.store
    w.rec.kind = op.kind
    crypto_generichash(w.rec.digest, DIGEST_SIZE, <const unsigned char *>op,
                       sizeof(OpHead) + op.n_id + op.n_key + op.n_key2 + op.n_data,
                       NULL, 0)


cdef inline size_t op_size(const OpHead *op) noexcept nogil:
    return sizeof(OpHead) + op.n_id + op.n_key + op.n_key2 + op.n_data


cdef int apply_op(Work *w, const OpHead *op, ResultRec *out) noexcept nogil:
    """Apply one operation; FATAL aborts the batch."""
    cdef OperationRec first
    cdef int rc, found
    memset(out, 0, sizeof(ResultRec))
    if op.n_id < 1 or op.n_id > MAX_OP_ID:
        out.code = OP_ID_INVALID
        return OK
    reset_changes(w)
    begin_op(w, op)
    # Worked out first, written only if it succeeds; an id applied before
    # wins either way (its first result, or OP_ID_REUSED), as in the twin.
    rc = dispatch(w)
    if rc == OK:
        rc = fold_aggregates(w)
    if rc == FATAL or w.fatal:
        return FATAL
    if rc != OK:
        found = load_operation(w, w.op_id, op.n_id, &first, NULL, NULL)
        if found == 0:
            return replay(w, &first, out)
        if found == FATAL:
            return FATAL
        out.code = rc
        return OK
    found = claim_op_id(w, &first)
    if found == 1:
        return replay(w, &first, out)
    if found == FATAL or commit_work(w):
        return FATAL
    out.a = w.rec.a
    out.b = w.rec.b
    return OK


cdef int apply_chain(Work *w, const char *start, uint32_t n, bint open_,
                     ResultRec *out) noexcept nogil:
    """A chain of `n` operations (records.py): all of them, or nothing and
    LINKED_FAILED. They share the scratch changes, so each sees what the
    earlier ones did; each claims its id as it succeeds (a later one may
    name it), and the claims are deleted again if a later one fails. An id
    seen before is checked first: its replay writes nothing."""
    cdef const OpHead *op
    cdef const char *p = start
    cdef OperationRec first
    cdef MDB_val k
    cdef uint32_t i, failed = n
    cdef int rc = OK, found
    memset(out, 0, n * sizeof(ResultRec))
    if open_:
        for i in range(n):
            out[i].code = LINKED_FAILED
        out[n - 1].code = LINK_OPEN
        return OK
    reset_changes(w)
    for i in range(n):
        op = <const OpHead *>p
        p += op_size(op)
        if op.n_id < 1 or op.n_id > MAX_OP_ID:
            rc = OP_ID_INVALID
            failed = i
            break
        begin_op(w, op)
        found = load_operation(w, w.op_id, op.n_id, &first, NULL, NULL)
        if found == FATAL:
            return FATAL
        if found == 0:
            replay(w, &first, &out[i])
            if out[i].code == OP_ID_REUSED:
                rc = OP_ID_REUSED
                failed = i
                break
            continue
        rc = dispatch(w)
        if rc == OK:
            rc = fold_aggregates(w)
        if rc == FATAL or w.fatal:
            return FATAL
        if rc != OK:
            failed = i
            break
        if claim_op_id(w, &first) != 0:  # 1 never: its id was looked up
            return fail(w, MDB_CORRUPTED)
        out[i].a = w.rec.a
        out[i].b = w.rec.b
    if failed == n:
        return commit_work(w)
    p = start
    for i in range(failed):  # take back the ids its operations claimed
        op = <const OpHead *>p
        p += op_size(op)
        if out[i].flags & RESULT_REPLAYED:
            continue
        k.mv_size = op.n_id
        k.mv_data = <void *>(<const char *>op + sizeof(OpHead))
        found = mdb_del(w.txn, w.dbi[DB_OPS], &k, NULL)
        if found != MDB_SUCCESS:
            return fail(w, found)
    for i in range(n):
        out[i].code = LINKED_FAILED
        out[i].flags = 0
        out[i].a = out[i].b = 0
    out[failed].code = rc
    return OK


cdef int replay(Work *w, OperationRec *first, ResultRec *out) noexcept nogil:
    if memcmp(first.digest, w.rec.digest, DIGEST_SIZE) != 0:
        out.code = OP_ID_REUSED
    else:
        out.code = first.code
        out.flags = RESULT_REPLAYED
        out.a = first.a
        out.b = first.b
    return OK


cdef void free_work(Work *w) noexcept nogil:
    cdef uint32_t i
    for i in range(w.n_slots):
        free(w.accts[i].lots.items)
        free(w.accts[i].holds)
        free(w.accts[i].coupons)
    free(w.accts)
    free(w.entries)
    free(w.puts)
    free(w.arena)
    free(w.sys)
    free(w.batch_sys)
    free(w.buf)
    free(w.due)
    free(w.agg_rows)
    free(w.agg_index)
    free(w.agg_staged)
    free(w.offsets)
    free(w.consumed.items)
    free(w.scratch_lots.items)
    free(w.loaded_data.p)
    free(w.lots_named.p)


cdef int run_batch(MDB_env *env, MDB_dbi *dbi, const char *batch, size_t size,
                   int64_t now, ResultRec *results) noexcept nogil:
    """The whole batch in one write transaction. Returns an LMDB error or 0."""
    cdef Work w
    cdef MDB_val k, v
    cdef HeadRec head
    cdef uint64_t next_be
    cdef size_t offset = 0
    cdef const OpHead *op
    cdef uint32_t i = 0, n
    cdef size_t end
    cdef bint chained
    cdef int rc
    memset(&w, 0, sizeof(Work))
    w.dbi = dbi
    w.now = now
    rc = mdb_txn_begin(env, NULL, 0, &w.txn)
    if rc:
        return rc
    k.mv_size = 4
    k.mv_data = <void *>META_HEAD_KEY
    rc = mdb_get(w.txn, dbi[DB_META], &k, &v)
    if rc == MDB_SUCCESS and v.mv_size != sizeof(HeadRec):
        fail(&w, MDB_CORRUPTED)
    elif rc == MDB_SUCCESS:
        memcpy(&head, v.mv_data, sizeof(HeadRec))
        w.seq = head.seq
        memcpy(w.hash, head.hash, HASH_SIZE)
    elif rc != MDB_NOTFOUND:
        fail(&w, rc)
    k.mv_size = 12
    k.mv_data = <void *>META_NEXT_ACCOUNT_KEY
    w.next_account = 1
    rc = mdb_get(w.txn, dbi[DB_META], &k, &v)
    if rc == MDB_SUCCESS and v.mv_size != 8:
        fail(&w, MDB_CORRUPTED)
    elif rc == MDB_SUCCESS:
        memcpy(&next_be, v.mv_data, 8)
        w.next_account = be64(next_be)
    elif rc != MDB_NOTFOUND:
        fail(&w, rc)
    while offset < size and w.fatal == 0:
        op = <const OpHead *>(batch + offset)
        if op.link & LINKED:  # a chain: to its first operation not linked
            end = offset
            n = 0
            while True:
                chained = (<const OpHead *>(batch + end)).link & LINKED
                end += op_size(<const OpHead *>(batch + end))
                n += 1
                if not chained or end >= size:
                    break
            if apply_chain(&w, batch + offset, n, chained, &results[i]):
                break
            offset = end
            i += n
            continue
        if apply_op(&w, op, &results[i]):
            break
        offset += op_size(op)
        i += 1
    if w.fatal == 0:
        write_batch_sys(&w)
    if w.fatal == 0:
        write_batch_aggregates(&w)
    if w.fatal == 0:
        head.seq = w.seq
        memcpy(head.hash, w.hash, HASH_SIZE)
        k.mv_size = 4
        k.mv_data = <void *>META_HEAD_KEY
        v.mv_size = sizeof(HeadRec)
        v.mv_data = &head
        rc = mdb_put(w.txn, dbi[DB_META], &k, &v, 0)
        if rc:
            fail(&w, rc)
    if w.fatal == 0:
        next_be = be64(w.next_account)
        k.mv_size = 12
        k.mv_data = <void *>META_NEXT_ACCOUNT_KEY
        v.mv_size = 8
        v.mv_data = &next_be
        rc = mdb_put(w.txn, dbi[DB_META], &k, &v, 0)
        if rc:
            fail(&w, rc)
    free_work(&w)
    if w.fatal:
        mdb_txn_abort(w.txn)
        return w.fatal
    return mdb_txn_commit(w.txn)


cdef _raise(int rc):
    message = mdb_strerror(rc).decode()
    if rc == MDB_MAP_FULL:
        raise MapFullError(message)
    raise LedgerError(message)


cdef size_t count_ops(const char *batch, size_t size) except? 0:
    cdef size_t offset = 0, n = 0
    cdef const OpHead *op
    while offset < size:
        if offset + sizeof(OpHead) > size:
            raise ValueError("truncated operation header")
        op = <const OpHead *>(batch + offset)
        offset += sizeof(OpHead) + op.n_id + op.n_key + op.n_key2 + op.n_data
        if offset > size:
            raise ValueError("truncated operation")
        n += 1
    return n


_OPEN_PATHS = set()  # environments open in this process, by real path
_ACCOUNT_TYPES = None  # (Account, Lot, Hold, Coupon) of kopilka.core.codec


def account_types(account, lot, hold, coupon):
    """The classes `account_of` builds (core/codec.py's): set once by
    kopilka.kernel, so the kernel itself imports nothing of core."""
    global _ACCOUNT_TYPES
    _ACCOUNT_TYPES = (account, lot, hold, coupon)


def balance_figures_of(bytes data, int64_t now):
    """(program, status, available, pending, held, balance, debt, earned,
    spent, expired, tier) of an account value as of `now`: what
    core.reads.balances_of reckons, with no Account built."""
    cdef Work w
    cdef Acct a
    cdef int64_t active = 0, pending = 0, held = 0
    cdef uint32_t i
    cdef LotRec *lot
    memset(&w, 0, sizeof(Work))
    memset(&a, 0, sizeof(Acct))
    try:
        if decode_account(&w, &a, PyBytes_AS_STRING(data), len(data)):
            raise ValueError("account value of the wrong size or layout")
        for i in range(a.n_holds):
            if a.holds[i].expires_at > now:
                held += a.holds[i].amount
        for i in range(a.lots.n):
            lot = &a.lots.items[i]
            if lot.expires_at <= now:
                continue  # expired, burned when the account is next touched
            if lot.activates_at <= now:
                active += lot.remaining
            else:
                pending += lot.remaining
        return (a.h.program, a.h.status, active - held - a.h.debt, pending, held,
                a.h.balance, a.h.debt, a.h.earned, a.h.spent, a.h.expired, a.h.tier)
    finally:
        free(a.lots.items)
        free(a.holds)
        free(a.coupons)


def account_of(bytes data):
    """An account value (records.py) as a codec.Account, decoded in C as the
    kernel reads it: what codec.Account.decode returns, much faster."""
    cdef Work w
    cdef Acct a
    cdef int rc
    cdef uint32_t i
    cdef LotRec *lot
    if _ACCOUNT_TYPES is None:
        raise LedgerError("account_types() was not called")
    account, lot_type, hold_type, coupon_type = _ACCOUNT_TYPES
    memset(&w, 0, sizeof(Work))
    memset(&a, 0, sizeof(Acct))
    try:
        rc = decode_account(&w, &a, PyBytes_AS_STRING(data), len(data))
        if rc:
            raise ValueError("account value of the wrong size or layout")
        lots = []
        for i in range(a.lots.n):
            lot = &a.lots.items[i]
            lots.append(lot_type(lot.lot_no, lot.partner, lot.remaining,
                                 lot.activates_at, lot.expires_at, lot.issued_hour))
        holds = [hold_type(a.holds[i].hold_no, a.holds[i].amount, a.holds[i].expires_at)
                 for i in range(a.n_holds)]
        coupons = [coupon_type(a.coupons[i].number, a.coupons[i].state,
                               a.coupons[i].value, a.coupons[i].usable_from,
                               a.coupons[i].expires_at) for i in range(a.n_coupons)]
        days = [a.days[i] for i in range(a.n_days)]
        return account(a.h.program, a.h.status, a.h.next_lot, a.h.next_hold,
                       a.h.balance, a.h.debt, a.h.held, a.h.earned, a.h.spent,
                       a.h.expired, a.h.opened_at, a.h.tier, days, lots, holds,
                       a.h.next_coupon, coupons)
    finally:
        free(a.lots.items)
        free(a.holds)
        free(a.coupons)

# With MDB_WRITEMAP the map is the data file's size and every byte of it is
# allocated on disk first (posix_fallocate), so that LMDB never writes into a
# hole: a hole the file system cannot fill (a full disk) would raise SIGBUS in
# the middle of a page copy and kill the process. The map starts small and
# grows by a quarter (1 MiB .. 256 MiB at a time) up to the configured map
# size: the file takes what the data needs plus that headroom, not the map.
cdef size_t MIB = 1 << 20
cdef size_t GROW_MIN = MIB
cdef size_t GROW_MAX = 256 * MIB


cdef size_t round_up(size_t n, size_t unit) noexcept nogil:
    return (n + unit - 1) // unit * unit


cdef class Environment:
    """One LMDB environment (a directory) and the kernel's databases in it.

    LMDB must not be closed under a transaction: `close()` aborts the
    snapshots still open and refuses while a batch or a copy is running on
    another thread (they run with the GIL released).

    With `writemap` (off by default: durable commits are slower) LMDB writes
    its pages in place in the map (no malloc'd copy of each dirty page, which
    LMDB keeps on a free list for good: the process's memory would grow with the most pages one batch ever
    touched). The map then grows with the data (see GROW_MIN) and moves when it
    does: only inside `apply()` (one writer at a time, `write_lock`), with the
    GIL held (every read of the map by a snapshot runs with the GIL), no copy
    running, and scans reposition their cursor after a move (`remaps`)."""
    cdef MDB_env *env
    cdef MDB_dbi dbi[NDB]
    cdef readonly str path
    cdef readonly int busy  # apply() and copy() calls inside LMDB right now
    cdef readonly bint writemap
    cdef readonly size_t map_limit  # the configured map size: the most it may take
    cdef readonly size_t mapped     # the map's size now (writemap: the file's, allocated)
    cdef readonly unsigned long remaps  # times the map moved to grow
    cdef int copying  # copy() calls reading the map with the GIL released
    cdef int fd
    cdef PyThread_type_lock write_lock
    cdef object readers  # the ReadTxns still open
    cdef MDB_txn *point  # get()'s read-only transaction, reset between reads

    def __cinit__(self, path, size_t map_size=1 << 30, bint sync=True,
                  bint writemap=False):
        cdef MDB_txn *txn
        cdef MDB_envinfo info
        cdef int rc
        cdef unsigned int flags = MDB_NOTLS | MDB_NORDAHEAD
        cdef size_t start = map_size
        import os
        import weakref
        self.write_lock = PyThread_allocate_lock()
        if self.write_lock == NULL:
            raise MemoryError()
        self.readers = weakref.WeakSet()
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        self.path = os.path.realpath(self.path)
        if self.path in _OPEN_PATHS:  # LMDB: never two handles in one process
            raise LedgerError(f"{self.path} is already open in this process")
        self.map_limit = map_size
        self.writemap = writemap
        if not sync:
            flags |= MDB_NOSYNC | MDB_NOMETASYNC
        if writemap:
            flags |= MDB_WRITEMAP
            try:  # what an earlier run allocated (LMDB sets the file to the map)
                start = os.stat(os.path.join(self.path, "data.mdb")).st_size
            except FileNotFoundError:
                start = 0
            start = min(map_size, max(start, GROW_MIN))
        rc = mdb_env_create(&self.env)
        if rc:
            _raise(rc)
        mdb_env_set_mapsize(self.env, start)
        mdb_env_set_maxdbs(self.env, 32)
        encoded = self.path.encode()
        rc = mdb_env_open(self.env, encoded, flags, 0o664)
        if rc:
            mdb_env_close(self.env)
            self.env = NULL
            _raise(rc)
        problem = self._format_problem()   # before anything is written
        if problem is not None:
            mdb_env_close(self.env)
            self.env = NULL
            raise LedgerError(problem)
        mdb_env_info(self.env, &info)
        self.mapped = info.me_mapsize
        if writemap:
            mdb_env_get_fd(self.env, &self.fd)
            self._allocate_at_open()
        while True:
            rc = mdb_txn_begin(self.env, NULL, 0, &txn)
            if rc:
                _raise(rc)
            for i, name in enumerate(DB_NAMES):
                rc = mdb_dbi_open(txn, name, MDB_CREATE, &self.dbi[i])
                if rc:
                    mdb_txn_abort(txn)
                    break
            else:
                rc = self._mark_format(txn)
                if rc:
                    mdb_txn_abort(txn)
                else:
                    rc = mdb_txn_commit(txn)
            if rc == MDB_MAP_FULL and self.writemap and self._grow():
                continue
            if rc:
                _raise(rc)
            break
        _OPEN_PATHS.add(self.path)

    cdef object _format_problem(self):
        """records.format_problem of the ledger on disk (None for a new
        one), read in a read-only transaction: a refused ledger is left
        as it was."""
        cdef MDB_txn *txn
        cdef MDB_dbi meta
        cdef MDB_val k, v
        cdef int rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &txn)
        if rc:
            mdb_env_close(self.env)
            self.env = NULL
            _raise(rc)
        try:
            rc = mdb_dbi_open(txn, DB_NAMES[DB_META], 0, &meta)
            if rc == MDB_NOTFOUND:
                return None   # nothing stored yet
            if rc:
                _raise(rc)
            k.mv_size, k.mv_data = len(META_FORMAT), <char *>META_FORMAT
            rc = mdb_get(txn, meta, &k, &v)
            if rc == MDB_SUCCESS:
                return format_problem(self.path, PyBytes_FromStringAndSize(
                    <char *>v.mv_data, v.mv_size), True)
            if rc != MDB_NOTFOUND:
                _raise(rc)
            k.mv_size, k.mv_data = 4, <void *>META_HEAD_KEY
            rc = mdb_get(txn, meta, &k, &v)
            if rc != MDB_SUCCESS and rc != MDB_NOTFOUND:
                _raise(rc)
            return format_problem(self.path, None, rc == MDB_SUCCESS)
        finally:
            mdb_txn_abort(txn)

    cdef int _mark_format(self, MDB_txn *txn):
        """Writes LEDGER_FORMAT into a ledger that has no marker (a new one:
        `_format_problem` refused the others); an LMDB error code, or 0."""
        cdef MDB_val k, v
        cdef bytes marker = U32.pack(LEDGER_FORMAT)
        k.mv_size, k.mv_data = len(META_FORMAT), <char *>META_FORMAT
        cdef int rc = mdb_get(txn, self.dbi[DB_META], &k, &v)
        if rc != MDB_NOTFOUND:
            return rc
        v.mv_size, v.mv_data = len(marker), <char *>marker
        return mdb_put(txn, self.dbi[DB_META], &k, &v, 0)

    cdef size_t _used(self):
        """Bytes of the data file LMDB's last commit uses (its pages up to
        the last one, free ones among them)."""
        cdef MDB_envinfo info
        cdef MDB_stat stat
        mdb_env_info(self.env, &info)
        mdb_env_stat(self.env, &stat)
        return (info.me_last_pgno + 1) * stat.ms_psize

    cdef int _allocate_at_open(self) except -1:
        """The file allocated to the whole map before anything is written
        through it; on a disk too full for that, the map shrinks to what is
        written already (the next batch will try to grow it)."""
        cdef MDB_envinfo info
        cdef int rc
        with nogil:
            rc = posix_fallocate(self.fd, 0, <off_t>self.mapped)
        if rc == ENOSPC or rc == EDQUOT:
            rc = mdb_env_set_mapsize(self.env, self._used())
            if rc:
                _raise(rc)
            mdb_env_info(self.env, &info)
            self.mapped = info.me_mapsize
            with nogil:
                rc = posix_fallocate(self.fd, 0, <off_t>self.mapped)
        if rc:
            import os
            raise LedgerError(f"cannot allocate the ledger's file: {os.strerror(rc)}")
        return 0

    cdef int _grow(self) except -1:
        """Allocates more of the file and moves the map over it: 1 when it
        grew, 0 when the map is at its limit (MDB_MAP_FULL stands). Raises
        LedgerError when the disk has no room (nothing written: the batch
        that needed it was aborted). The caller holds `write_lock` and has
        no transaction open."""
        cdef size_t step, want = 0
        cdef int rc = 0
        cdef MDB_envinfo info
        if self.mapped >= self.map_limit:
            return 0
        step = min(max(self.mapped // 4, GROW_MIN), GROW_MAX)
        for want in (min(self.map_limit, round_up(self.mapped + step, MIB)),
                     min(self.map_limit, self.mapped + GROW_MIN)):
            with nogil:
                rc = posix_fallocate(self.fd, 0, <off_t>want)
            if rc != ENOSPC and rc != EDQUOT:
                break
        if rc:
            import os
            raise LedgerError(f"cannot grow the ledger's file to {want} bytes: "
                              f"{os.strerror(rc)}")
        while self.copying:  # a copy reads the map without the GIL
            with nogil:
                usleep(1000)
        # The GIL is held from here to the end: no snapshot reads the map
        # while it moves.
        rc = mdb_env_set_mapsize(self.env, want)
        if rc:  # the map could not be made again: nothing may touch it
            self._close_env()
            _raise(rc)
        mdb_env_info(self.env, &info)
        self.mapped = info.me_mapsize
        self.remaps += 1
        return 1

    def close(self):
        if self.env == NULL:
            return
        if self.busy:
            raise LedgerError("the ledger is applying a batch or copying: "
                              "close it once that returns")
        self._close_env()

    cdef _close_env(self):
        for txn in list(self.readers):
            txn.close()
        if self.point != NULL:
            mdb_txn_abort(self.point)
            self.point = NULL
        mdb_env_close(self.env)
        self.env = NULL
        _OPEN_PATHS.discard(self.path)

    def __dealloc__(self):
        if self.env != NULL:  # nothing can be busy or reading any more
            if self.point != NULL:
                mdb_txn_abort(self.point)
                self.point = NULL
            mdb_env_close(self.env)
            self.env = NULL
            if _OPEN_PATHS is not None:  # None while the interpreter shuts down
                _OPEN_PATHS.discard(self.path)
        if self.write_lock != NULL:
            PyThread_free_lock(self.write_lock)
            self.write_lock = NULL

    def _check_open(self):
        if self.env == NULL:
            raise LedgerError("ledger is closed")

    def apply(self, batch, int64_t now):
        """Apply a batch (bytes) durably; returns the packed results."""
        self._check_open()
        cdef bytes data = bytes(batch)
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef size_t size = len(data)
        cdef size_t n = count_ops(p, size)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n * sizeof(ResultRec))
        cdef ResultRec *results = <ResultRec *>PyBytes_AS_STRING(out)
        cdef int rc
        self.busy += 1
        try:
            with nogil:
                PyThread_acquire_lock(self.write_lock, WAIT_LOCK)
            try:
                while True:  # a batch the map had no room for: again, in a larger one
                    self._check_open()
                    memset(results, 0, n * sizeof(ResultRec))
                    with nogil:
                        rc = run_batch(self.env, self.dbi, p, size, now, results)
                    if not (rc == MDB_MAP_FULL and self.writemap and self._grow()):
                        break
            finally:
                PyThread_release_lock(self.write_lock)
        finally:
            self.busy -= 1
        if rc:
            _raise(rc)
        return out

    def read(self):
        self._check_open()
        return ReadTxn(self)

    def balance_figures(self, uint64_t account_id, int64_t now):
        """`balance_figures_of` the account's stored value, or None."""
        cdef uint64_t key = be64(account_id)
        raw = self.get(DB_ACCOUNTS, PyBytes_FromStringAndSize(<char *>&key, 8))
        return balance_figures_of(raw, now) if raw is not None else None

    def get(self, int db, bytes key):
        """The value (bytes) of `key` in database number `db` (DB_NAMES), or
        None, as of the last commit.

        One read-only transaction serves every such point read: renewed for
        the read (it then sees the last commit) and reset after it, which
        costs much less than a transaction begun and aborted each time. The
        GIL is held throughout, so no two threads ever use it at once."""
        cdef MDB_val k, v
        cdef int rc
        cdef object out = None
        if self.env == NULL:
            raise LedgerError("ledger is closed")
        if not 0 <= db < NDB:
            raise ValueError(f"no database number {db}")
        if self.point == NULL:
            rc = mdb_txn_begin(self.env, NULL, MDB_RDONLY, &self.point)
        else:
            rc = mdb_txn_renew(self.point)
        if rc:
            _raise(rc)
        k.mv_size = len(key)
        k.mv_data = <void *>PyBytes_AS_STRING(key)
        rc = mdb_get(self.point, self.dbi[db], &k, &v)
        if rc == MDB_SUCCESS:
            out = PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size)
        mdb_txn_reset(self.point)
        if rc != MDB_SUCCESS and rc != MDB_NOTFOUND:
            _raise(rc)
        return out

    def copy(self, path, bint compact=True):
        """A consistent copy of the environment into an empty directory."""
        self._check_open()
        cdef bytes encoded = str(path).encode()
        cdef const char *p = encoded
        cdef int rc
        self.busy += 1
        self.copying += 1
        try:
            with nogil:
                rc = mdb_env_copy2(self.env, p, MDB_CP_COMPACT if compact else 0)
        finally:
            self.copying -= 1
            self.busy -= 1
        if rc:
            _raise(rc)

    def info(self):
        """map_size: the configured limit; mapped: the map now (with
        writemap, the data file's size, all of it allocated); used: the
        bytes of the file the data takes (pages up to the last one)."""
        cdef MDB_envinfo info
        self._check_open()
        mdb_env_info(self.env, &info)
        return {"map_size": self.map_limit, "mapped": info.me_mapsize,
                "used": self._used(), "writemap": bool(self.writemap),
                "remaps": self.remaps, "last_page": info.me_last_pgno,
                "last_txn": info.me_last_txnid, "readers": info.me_numreaders}


@cython.no_gc_clear
cdef class ReadTxn:
    """A read-only snapshot: `get` a key, `scan` a database from a key."""
    cdef MDB_txn *txn
    cdef Environment env
    cdef object __weakref__

    def __cinit__(self, Environment env):
        cdef int rc = mdb_txn_begin(env.env, NULL, MDB_RDONLY, &self.txn)
        if rc:
            _raise(rc)
        self.env = env
        env.readers.add(self)

    def _db(self, name):
        cdef int index = DB_NAMES.index(name.encode())
        return self.env.dbi[index]

    def get(self, str db, bytes key):
        cdef MDB_val k, v
        cdef int rc
        if self.txn == NULL:
            raise LedgerError("snapshot is closed")
        k.mv_size = len(key)
        k.mv_data = <void *>PyBytes_AS_STRING(key)
        rc = mdb_get(self.txn, self._db(db), &k, &v)
        if rc == MDB_NOTFOUND:
            return None
        if rc:
            _raise(rc)
        return PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size)

    def scan(self, str db, bytes start=b""):
        cdef MDB_cursor *cur = NULL
        cdef MDB_val k, v
        cdef int rc
        cdef unsigned long remaps
        cdef MDB_dbi dbi = self._db(db)
        if self.txn == NULL:
            raise LedgerError("snapshot is closed")
        rc = mdb_cursor_open(self.txn, dbi, &cur)
        if rc:
            _raise(rc)
        remaps = self.env.remaps
        try:
            if len(start):
                k.mv_size = len(start)
                k.mv_data = <void *>PyBytes_AS_STRING(start)
                rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE)
            else:
                rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)
            while rc == MDB_SUCCESS:
                key = PyBytes_FromStringAndSize(<char *>k.mv_data, k.mv_size)
                yield (key, PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size))
                if self.txn == NULL:  # closed while the caller held the generator
                    raise LedgerError("snapshot is closed")
                if self.env.remaps != remaps:
                    # the map moved (it grew) while the caller held the
                    # generator: the cursor's pages are gone; find the key
                    # again in the same snapshot, and go on after it
                    mdb_cursor_close(cur)
                    cur = NULL
                    rc = mdb_cursor_open(self.txn, dbi, &cur)
                    if rc:
                        _raise(rc)
                    remaps = self.env.remaps
                    k.mv_size = len(key)
                    k.mv_data = <void *>PyBytes_AS_STRING(key)
                    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE)
                    if (rc == MDB_SUCCESS and k.mv_size == <size_t>len(key) and
                            memcmp(k.mv_data, PyBytes_AS_STRING(key), k.mv_size) == 0):
                        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)
                    continue
                rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)
            if rc != MDB_NOTFOUND:
                _raise(rc)
        finally:
            if cur != NULL:
                mdb_cursor_close(cur)

    def close(self):
        if self.txn != NULL:
            mdb_txn_abort(self.txn)
            self.txn = NULL

    def __dealloc__(self):
        self.close()
