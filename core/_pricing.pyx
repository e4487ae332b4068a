# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, binding=False
"""The pricing engine, compiled: the twin of pure-Python code in pricing.py
and receipt.py, which is the reference. The property tests
(tests/test_pricing_twin.py) hold the two to the same quotes, prices,
settlements (the kernel batches byte for byte) and allocations, and every
test of test_pricing.py runs on both.

`quote` and `settle_quote` follow pricing's `_quote` and `_settle_quote`
step by step. Each first makes sure its input is good by the quick checks
(those of receipt.py: `_quick_header`, `quick_lines`, `member_fine`, and
settle's checks); when anything is in doubt it answers None and pricing.py
runs the Python one, which names every problem. It answers None too for a
program whose rates or point value are beyond its integers (`_Plan.small`).

`Lines` keeps a quote's per-line figures in C arrays of 128-bit integers and
does, per line, what `_Lines` does with Python lists: the receipt check's
quick pass and the line's class (`_scan`), the discounts and the coupon
split over the lines (`_spread`), a spend split over the payable lines, the
earning and the referrer's share (`price`), and the per-line tuples
(`line_quotes`, `shares`). The results are the very types pricing.py
defines (its NamedTuples and frozen dataclasses), built directly.

Every figure is exact. Money is at most 2**63 - 1 (the receipt check makes
sure of it), and `_Plan.small` keeps rates and the scale below 2**62 and the
point value below 2**40, so every product fits in 128 bits; the one split
whose figures can exceed that (points earned, split by the exact shares,
when their sum reaches 2**63) is handed to the Python `split`, as is any
split whose total or weights are that large. Divisions are of non-negative
numbers, where C's truncation is Python's floor.

This module imports nothing of Kopilka's: pricing.py and receipt.py hand it
the types it builds and checks, and the constants it uses (`bind`).
"""

from cpython.datetime cimport (datetime_day, datetime_fold, datetime_hour,
                               datetime_microsecond, datetime_minute, datetime_month,
                               datetime_new, datetime_second, datetime_year, import_datetime,
                               timedelta_days, timedelta_microseconds, timedelta_new,
                               timedelta_seconds)
from cpython.exc cimport PyErr_Occurred
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.set cimport PySet_Contains
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New
from cpython.unicode cimport PyUnicode_CheckExact
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyObject* PyList_GET_ITEM(object l, Py_ssize_t i)
    bint PyBytes_CheckExact(object o)
    int PyObject_GenericSetAttr(object o, object name, object value) except -1

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <stdlib.h>

    typedef __int128 kp_i128;
    typedef struct { int64_t rem; Py_ssize_t idx; } kp_rem;
    #define KP_2_63 (((kp_i128)1) << 63)
    #define KP_I64_MAX ((kp_i128)INT64_MAX)

    /* Remainders largest first, ties to the earlier line (a total order). */
    static inline int kp_before(const kp_rem *x, const kp_rem *y) {
        return x->rem > y->rem || (x->rem == y->rem && x->idx < y->idx);
    }
    static int kp_rem_cmp(const void *a, const void *b) {
        const kp_rem *x = (const kp_rem *)a, *y = (const kp_rem *)b;
        return kp_before(x, y) ? -1 : (kp_before(y, x) ? 1 : 0);
    }

    static void kp_sort(kp_rem *a, Py_ssize_t n) {
        if (n > 32) { qsort(a, (size_t)n, sizeof *a, kp_rem_cmp); return; }
        for (Py_ssize_t i = 1; i < n; i++) {
            kp_rem x = a[i];
            Py_ssize_t j = i;
            while (j > 0 && kp_before(&x, &a[j - 1])) { a[j] = a[j - 1]; j--; }
            a[j] = x;
        }
    }

    /* allocation.split: `total` in shares of the non-negative weights w
       (summing to wsum), largest remainder, ties to the earlier line.
       -1 when total or wsum reach 2**63 (a product could leave 128 bits):
       the caller then asks the Python one. Products that fit in 64 bits
       (the usual case) are worked out in 64 bits; a remainder is always
       below wsum, so it does. */
    static int kp_split(kp_i128 total, const kp_i128 *w, Py_ssize_t n, kp_i128 wsum,
                        kp_i128 *out, kp_rem *scratch) {
        Py_ssize_t i, m = 0;
        kp_i128 left = total, most = 0;
        if (total == 0 || wsum == 0) { memset(out, 0, (size_t)n * sizeof *out); return 0; }
        if (total == wsum) { memcpy(out, w, (size_t)n * sizeof *out); return 0; }
        if (total < 0 || total >= KP_2_63 || wsum < 0 || wsum >= KP_2_63) return -1;
        for (i = 0; i < n; i++) if (w[i] > most) most = w[i];
        if (most * total < KP_2_63) {
            uint64_t t = (uint64_t)total, s = (uint64_t)wsum;
            for (i = 0; i < n; i++) {
                uint64_t x = t * (uint64_t)w[i], share = x / s;
                out[i] = (kp_i128)share;
                left -= (kp_i128)share;
                if (x - share * s) { scratch[m].rem = (int64_t)(x - share * s); scratch[m++].idx = i; }
            }
        } else {
            for (i = 0; i < n; i++) {
                kp_i128 x = total * w[i], share = x / wsum;
                out[i] = share;
                left -= share;
                if (x - share * wsum) {
                    scratch[m].rem = (int64_t)(x - share * wsum);
                    scratch[m++].idx = i;
                }
            }
        }
        /* only lines with a remainder can take a unit: more of them than
           units left, as each remainder is below wsum and they sum to
           left * wsum */
        if (left) {
            kp_sort(scratch, m);
            for (i = 0; i < left && i < m; i++) out[scratch[i].idx] += 1;
        }
        return 0;
    }

    /* pricing.ROUND: a / b rounded down, up or half up (a >= 0, b > 0). */
    static inline kp_i128 kp_round(kp_i128 a, kp_i128 b, int mode) {
        if (mode == 0) return a / b;
        if (mode == 1) return (a + b - 1) / b;
        return (2 * a + b) / (2 * b);
    }

    static inline int kp_fits64(kp_i128 x) { return x >= -KP_I64_MAX - 1 && x <= KP_I64_MAX; }
    static inline long long kp_hi(kp_i128 x) { return (long long)(x >> 64); }
    static inline unsigned long long kp_lo(kp_i128 x) { return (unsigned long long)x; }
    static inline kp_i128 kp_join(long long hi, unsigned long long lo) {
        return (kp_i128)(((unsigned __int128)(unsigned long long)hi << 64) | lo);
    }

    /* A new instance of a tuple subclass (a NamedTuple) of n items, to be
       filled with kp_put: what tuple.__new__(cls, items) does, without
       the intermediate tuple or the NamedTuple's Python __new__. */
    static PyObject *kp_alloc(PyObject *cls, Py_ssize_t n) {
        PyTypeObject *tp = (PyTypeObject *)cls;
        return tp->tp_alloc(tp, n);
    }
    static inline int kp_put(PyObject *t, Py_ssize_t i, PyObject *v) {
        Py_INCREF(v);
        PyTuple_SET_ITEM(t, i, v);
        return 0;
    }
    /* d[key] as a borrowed reference in *out, NULL when missing or when key
       is unhashable (a flag the full check names); -1 on other errors. */
    static int kp_lookup(PyObject *d, PyObject *key, PyObject **out) {
        *out = PyDict_GetItemWithError(d, key);
        if (*out == NULL && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) return -1;
            PyErr_Clear();
        }
        return 0;
    }
    static inline int kp_list_put(PyObject *l, Py_ssize_t i, PyObject *v) {
        Py_INCREF(v);
        PyList_SET_ITEM(l, i, v);
        return 0;
    }

    /* 1 if s (a str) is empty or all whitespace: `not s or s.isspace()`. */
    static int kp_blank(PyObject *s) {
    #if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(s) < 0) return -1;
    #endif
        Py_ssize_t n = PyUnicode_GET_LENGTH(s);
        int kind = PyUnicode_KIND(s);
        const void *data = PyUnicode_DATA(s);
        for (Py_ssize_t i = 0; i < n; i++)
            if (!Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i))) return 0;
        return 1;
    }

    static int kp_int64_cmp(const void *a, const void *b) {
        int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
        return (x > y) - (x < y);
    }

    /* 1 if two of the n positive numbers are equal (sorts them when large). */
    static int kp_repeats(int64_t *numbers, Py_ssize_t n) {
        unsigned char seen[1024];
        Py_ssize_t i;
        int small = 1;
        for (i = 0; i < n; i++) if (numbers[i] >= 8192) { small = 0; break; }
        if (small) {
            memset(seen, 0, sizeof seen);
            for (i = 0; i < n; i++) {
                int64_t x = numbers[i];
                unsigned char bit = (unsigned char)(1u << (x & 7));
                if (seen[x >> 3] & bit) return 1;
                seen[x >> 3] |= bit;
            }
            return 0;
        }
        qsort(numbers, (size_t)n, sizeof *numbers, kp_int64_cmp);
        for (i = 1; i < n; i++) if (numbers[i] == numbers[i - 1]) return 1;
        return 0;
    }

    static inline int kp_mul64(int64_t a, int64_t b, int64_t *out) {
        return __builtin_mul_overflow(a, b, out);
    }
    """
    ctypedef long long i128 "kp_i128"
    ctypedef struct kp_rem:
        int64_t rem
        Py_ssize_t idx
    int kp_split(i128 total, const i128* w, Py_ssize_t n, i128 wsum, i128* out,
                 kp_rem* scratch)
    i128 kp_round(i128 a, i128 b, int mode)
    bint kp_fits64(i128 x)
    long long kp_hi(i128 x)
    unsigned long long kp_lo(i128 x)
    i128 kp_join(long long hi, unsigned long long lo)
    object kp_alloc(object cls, Py_ssize_t n)
    int kp_put(object t, Py_ssize_t i, object v) except -1
    int kp_lookup(object d, object key, PyObject** out) except -1
    int kp_list_put(object l, Py_ssize_t i, object v) except -1
    int kp_blank(object s) except -1
    int kp_repeats(int64_t* numbers, Py_ssize_t n)
    bint kp_mul64(int64_t a, int64_t b, int64_t* out)
    int64_t KP_INT64_MAX "INT64_MAX"

cdef extern from *:
    """
    #pragma pack(push, 1)
    typedef struct {   /* records.OP, as struct packs it ("<": no padding) */
        uint8_t kind, flags, op_len, key_len, key2_len, link;
        uint16_t data_len;
        uint32_t program, partner, version, reason, store, lane;
        uint64_t account, account2;
        int64_t amount, amount2, money, activates_at, expires_at, business_time;
    } kp_op;
    #pragma pack(pop)
    """
    ctypedef struct kp_op:
        uint8_t kind, flags, op_len, key_len, key2_len, link
        uint16_t data_len
        uint32_t program, partner, version, reason, store, lane
        uint64_t account, account2
        int64_t amount, amount2, money, activates_at, expires_at, business_time

# --- what pricing.py and receipt.py hand over (bind) -------------------------

cdef object _Line = None, _Receipt = None, _Member = None, _MemberCoupon = None
cdef object _LineQuote = None, _LinePrice = None, _Priced = None, _LineShare = None
cdef object _Reason = None, _CouponTerms = None, _CouponIssue = None
cdef object _CouponRedemption = None, _Quote = None, _Settlement = None
cdef object _Allocation = None, _Batch = None, _plan_of = None, _split = None
cdef uint8_t K_EARN = 0, K_CAPTURE = 0, K_REDEEM_COUPON = 0, K_ISSUE_COUPON = 0
cdef uint8_t F_LINKED = 0, F_ONE_PER_CUSTOMER = 0
cdef Py_ssize_t LINK_AT = 5        # the `link` byte of records.OP
cdef Py_ssize_t MAX_DATA_BYTES = 0
cdef object W_TIER_UNKNOWN, W_EXPIRED_ON_ARRIVAL, W_BEST, W_ADDITIVE, W_NOT_BEST
cdef object W_NOT_YET_USABLE, W_EXPIRED, W_NOTHING_TO_COVER, W_REDEEMED, W_EARNED
cdef object W_ALREADY_HELD, W_CAP, W_BALANCE, W_MIN_BALANCE, W_MIN_POINTS
cdef object W_MIN_RECEIPT, W_NOTHING_PAYABLE
cdef object DAY = 86_400_000_000, CLOCK_SKEW = 0, NEVER = 0, EPOCH = None
cdef Py_ssize_t MAX_OP_ID = 0, LONGEST_SUFFIX = 0
cdef i128 BASIS = 10_000


# --- the checkout's input: slotted frozen dataclasses of receipt.py -----------

# Their fields are read at the slots' offsets (from the member descriptors
# the dataclasses define), or by name if a class were ever not slotted.
cdef object _UNSET = object()      # a slot never set: fails every check
LINE_FIELDS = ("number", "sku", "category", "quantity", "unit_price", "total", "flags")
RECEIPT_FIELDS = ("id", "store", "lane", "business_time", "lines")
MEMBER_FIELDS = ("available", "tier", "newcomer", "regular", "coupon", "held",
                 "account", "card", "referrer", "enrolled_at")
COUPON_FIELDS = ("code", "value", "usable_from", "expires_at", "number")
cdef enum:
    L_NUMBER, L_SKU, L_CATEGORY, L_QUANTITY, L_UNIT_PRICE, L_TOTAL, L_FLAGS
cdef enum:
    R_ID, R_STORE, R_LANE, R_BUSINESS_TIME, R_LINES
cdef enum:
    M_AVAILABLE, M_TIER, M_NEWCOMER, M_REGULAR, M_COUPON, M_HELD, M_ACCOUNT, M_CARD
    M_REFERRER, M_ENROLLED_AT
cdef enum:
    C_CODE, C_VALUE, C_USABLE_FROM, C_EXPIRES_AT, C_NUMBER
cdef Py_ssize_t LINE_AT[7]
cdef Py_ssize_t RECEIPT_AT[5]
cdef Py_ssize_t MEMBER_AT[10]
cdef Py_ssize_t COUPON_AT[5]
cdef bint line_slots = False, receipt_slots = False, member_slots = False
cdef bint coupon_slots = False


cdef bint slot_offsets(cls, names, Py_ssize_t* out):
    """The offsets of the slots `names` of `cls`, if it has them all."""
    import types
    for k, name in enumerate(names):
        d = cls.__dict__.get(name)
        if type(d) is not types.MemberDescriptorType:
            return False
        out[k] = (<PyMemberDescrObject*><PyObject*>d).d_member.offset
    return True


cdef inline object slot(object obj, Py_ssize_t offset):
    cdef PyObject* p = (<PyObject**>((<char*><PyObject*>obj) + offset))[0]
    return <object>p if p is not NULL else _UNSET


cdef inline object line_field(object line, int k):
    return slot(line, LINE_AT[k]) if line_slots else getattr(line, LINE_FIELDS[k])


cdef inline object receipt_field(object receipt, int k):
    return (slot(receipt, RECEIPT_AT[k]) if receipt_slots
            else getattr(receipt, RECEIPT_FIELDS[k]))


cdef inline object member_field(object member, int k):
    return (slot(member, MEMBER_AT[k]) if member_slots
            else getattr(member, MEMBER_FIELDS[k]))


cdef inline object coupon_field(object coupon, int k):
    return (slot(coupon, COUPON_AT[k]) if coupon_slots
            else getattr(coupon, COUPON_FIELDS[k]))


def bind(**names):
    """The types this module checks and builds, and the constants it uses:
    receipt.py binds `Line` (for quick_lines), pricing.py the rest."""
    global _Line, _Receipt, _Member, _MemberCoupon, _LineQuote, _LinePrice, _Priced
    global _LineShare, _Reason, _CouponTerms, _CouponIssue, _CouponRedemption, _Quote
    global _Settlement, _Allocation, _Batch, _plan_of, _split, DAY, CLOCK_SKEW
    global K_EARN, K_CAPTURE, K_REDEEM_COUPON, K_ISSUE_COUPON, F_LINKED, F_ONE_PER_CUSTOMER
    global MAX_DATA_BYTES
    global MAX_OP_ID, LONGEST_SUFFIX, BASIS, NEVER, EPOCH
    global W_TIER_UNKNOWN, W_EXPIRED_ON_ARRIVAL, W_BEST, W_ADDITIVE, W_NOT_BEST
    global W_NOT_YET_USABLE, W_EXPIRED, W_NOTHING_TO_COVER, W_REDEEMED, W_EARNED
    global W_ALREADY_HELD, W_CAP, W_BALANCE, W_MIN_BALANCE, W_MIN_POINTS
    global W_MIN_RECEIPT, W_NOTHING_PAYABLE
    global line_slots, receipt_slots, member_slots, coupon_slots
    if "Line" in names:
        _Line = names["Line"]
        line_slots = slot_offsets(_Line, LINE_FIELDS, LINE_AT)
    if "Quote" not in names:
        return
    _Receipt, _Member, _MemberCoupon = names["Receipt"], names["Member"], names["MemberCoupon"]
    receipt_slots = slot_offsets(_Receipt, RECEIPT_FIELDS, RECEIPT_AT)
    member_slots = slot_offsets(_Member, MEMBER_FIELDS, MEMBER_AT)
    coupon_slots = slot_offsets(_MemberCoupon, COUPON_FIELDS, COUPON_AT)
    _LineQuote, _LinePrice, _Priced = names["LineQuote"], names["LinePrice"], names["Priced"]
    _LineShare, _Reason, _CouponTerms = names["LineShare"], names["Reason"], names["CouponTerms"]
    _CouponIssue, _CouponRedemption = names["CouponIssue"], names["CouponRedemption"]
    _Quote, _Settlement, _Allocation = names["Quote"], names["Settlement"], names["Allocation"]
    _Batch, _plan_of, _split = names["Batch"], names["plan"], names["split"]
    kind = names["Kind"]
    K_EARN, K_CAPTURE = kind.EARN, kind.CAPTURE
    K_REDEEM_COUPON, K_ISSUE_COUPON = kind.REDEEM_COUPON, kind.ISSUE_COUPON
    F_LINKED, F_ONE_PER_CUSTOMER = names["LINKED"], names["COUPON_ONE_PER_CUSTOMER"]
    MAX_DATA_BYTES = names["MAX_DATA"]
    check_op_layout(names["OP"])
    DAY, CLOCK_SKEW, BASIS = names["DAY"], names["CLOCK_SKEW"], names["BASIS"]
    NEVER, EPOCH = names["NEVER"], names["EPOCH"]
    MAX_OP_ID = names["MAX_OP_ID"]
    LONGEST_SUFFIX = max(len(x.encode()) for x in names["SUFFIXES"])
    Why = names["Why"]
    W_TIER_UNKNOWN, W_EXPIRED_ON_ARRIVAL = Why.TIER_UNKNOWN, Why.EXPIRED_ON_ARRIVAL
    W_BEST, W_ADDITIVE, W_NOT_BEST = (Why.BEST_DISCOUNT, Why.ADDITIVE_DISCOUNT,
                                      Why.DISCOUNT_NOT_BEST)
    W_NOT_YET_USABLE, W_EXPIRED = Why.COUPON_NOT_YET_USABLE, Why.COUPON_EXPIRED
    W_NOTHING_TO_COVER, W_REDEEMED = Why.COUPON_NOTHING_TO_COVER, Why.COUPON_REDEEMED
    W_EARNED, W_ALREADY_HELD = Why.COUPON_EARNED, Why.COUPON_ALREADY_HELD
    W_CAP, W_BALANCE, W_MIN_BALANCE = Why.CAP, Why.BALANCE, Why.MIN_BALANCE
    W_MIN_POINTS, W_MIN_RECEIPT = Why.MIN_POINTS, Why.MIN_RECEIPT
    W_NOTHING_PAYABLE = Why.NOTHING_PAYABLE


cdef check_op_layout(op):
    """kp_op must lay an operation's header out as records.OP packs it."""
    cdef kp_op h
    cdef tuple fields = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -16, -17, -18,
                         -19, -20, -21)
    memset(&h, 0, sizeof(h))
    (h.kind, h.flags, h.op_len, h.key_len, h.key2_len, h.link, h.data_len, h.program,
     h.partner, h.version, h.reason, h.store, h.lane, h.account, h.account2, h.amount,
     h.amount2, h.money, h.activates_at, h.expires_at, h.business_time) = fields
    if op.size != sizeof(kp_op) or PyBytes_FromStringAndSize(<char*>&h, sizeof(h)) \
            != op.pack(*fields):
        raise RuntimeError("kp_op does not match records.OP: fix _pricing.pyx")


# --- integers and tuples ----------------------------------------------------------

cdef inline object box(i128 x):
    """x as a Python int."""
    if kp_fits64(x):
        return <long long>x
    return (int(kp_hi(x)) << 64) | int(kp_lo(x))


cdef i128 unbox(object value) except? -1:
    """A Python int (of at most 128 bits) as an i128."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if v == -1 and PyErr_Occurred():
        return -1
    if not overflow:
        return v
    return kp_join(<long long>(value >> 64), <unsigned long long>(value & 0xFFFFFFFFFFFFFFFF))


cdef inline i128 clip(object value) except? -1:
    """A non-negative Python int as an i128, at most 2**63: enough to compare
    with, or take the smaller of it and, money (below 2**63)."""
    if value >= KP_INT64_MAX:
        return (<i128>KP_INT64_MAX) + 1
    return unbox(value)


cdef inline object reason(object code, object name, object amount):
    """Reason(code, name, amount), without its Python __new__."""
    r = kp_alloc(_Reason, 3)
    kp_put(r, 0, code)
    kp_put(r, 1, name)
    kp_put(r, 2, amount)
    return r


cdef inline object record(object cls, dict fields):
    """An instance of the (frozen) dataclass `cls` with these fields, as its
    __init__ would make it (none of ours has __post_init__ or defaults that
    the caller leaves out)."""
    obj = cls.__new__(cls)
    PyObject_GenericSetAttr(obj, "__dict__", fields)
    return obj


cdef int split_into(i128 total, const i128* w, Py_ssize_t n, i128 wsum, i128* out,
                    kp_rem* scratch) except -1:
    """kp_split, or the Python `split` for figures beyond its reach."""
    cdef Py_ssize_t i
    if kp_split(total, w, n, wsum, out, scratch) == 0:
        return 0
    shares = _split(box(total), [box(w[i]) for i in range(n)], box(wsum))
    for i in range(n):
        out[i] = unbox(shares[i])
    return 0


cdef inline int64_t small_int(object value, int64_t low) except -2:
    """value as an int64 if it is an int from `low` to 2**63 - 1, else -1
    (low is 0 or 1, so -1 is never a valid value)."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_CheckExact(value):
        return -1
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < low:
        return -1
    return v


# --- the receipt check's quick pass over the lines -------------------------------

def quick_lines(tuple lines, categories, flags):
    """receipt.quick_lines, compiled: True if every line surely passes the
    full check (`lines` a non-empty tuple, `categories` and `flags` the
    version's vocabulary as frozensets)."""
    cdef Py_ssize_t n = PyTuple_GET_SIZE(lines), i, k, m
    cdef int64_t number, q, p, amount, product
    cdef i128 total = 0
    cdef int64_t* numbers = <int64_t*>PyMem_Malloc(max(n, 1) * sizeof(int64_t))
    cdef int contains
    if numbers is NULL:
        raise MemoryError()
    try:
        for i in range(n):
            line = <object>PyTuple_GET_ITEM(lines, i)
            if Py_TYPE(line) is not <PyTypeObject*>_Line:
                return False
            number = small_int(line_field(line, L_NUMBER), 1)
            q = small_int(line_field(line, L_QUANTITY), 1)
            p = small_int(line_field(line, L_UNIT_PRICE), 0)
            amount = small_int(line_field(line, L_TOTAL), 0)
            if number < 0 or q < 0 or p < 0 or amount < 0:
                return False
            if kp_mul64(q, p, &product) or product != amount:
                return False
            sku = line_field(line, L_SKU)
            category = line_field(line, L_CATEGORY)
            f = line_field(line, L_FLAGS)
            if not (PyUnicode_CheckExact(sku) and PyUnicode_CheckExact(category)
                    and PyTuple_CheckExact(f)):
                return False
            if kp_blank(sku) or not PySet_Contains(categories, category):
                return False
            m = PyTuple_GET_SIZE(f)
            if m:
                for k in range(m):
                    try:
                        contains = PySet_Contains(flags, <object>PyTuple_GET_ITEM(f, k))
                    except TypeError:   # unhashable: the full check names it
                        return False
                    if not contains:
                        return False
                if m > 1 and len(set(f)) != m:
                    return False
            numbers[i] = number
            total += amount
        if kp_repeats(numbers, n):
            return False
        return total <= <i128>KP_INT64_MAX
    finally:
        PyMem_Free(numbers)


# --- a quote's lines -------------------------------------------------------------

cdef class Lines:
    """pricing._Lines, compiled (see there for what each method does)."""

    cdef readonly object plan
    cdef readonly object point_value
    cdef public bint earns
    cdef public long long referral_bp
    cdef public object referral_times

    cdef Py_ssize_t n
    cdef i128 scale, pv, gross, base
    cdef int mode
    cdef bint per_line
    cdef void* block
    # per line: the price, discounts, coupon, what is due, what points may
    # pay of it, the rate numerator; scratch for spreading the discounts
    cdef i128* total
    cdef i128* disc
    cdef i128* coup
    cdef i128* due
    cdef i128* payw
    cdef i128* rate
    cdef i128* work
    cdef kp_rem* rem
    cdef int64_t* numbers64
    cdef char* takes
    cdef char* payable
    cdef list numbers, quantities, totals, kinds

    def __cinit__(self, plan):
        self.plan = plan
        scale, pv, mode, per_line = plan.figures
        self.scale, self.pv, self.mode, self.per_line = scale, pv, mode, per_line
        self.point_value = pv
        self.earns = True
        self.referral_bp = 0
        self.referral_times = None
        self.block = NULL
        self.n = 0

    def __dealloc__(self):
        PyMem_Free(self.block)

    cdef int _allocate(self, Py_ssize_t n) except -1:
        cdef size_t m = <size_t>(n if n > 0 else 1)
        cdef char* b
        PyMem_Free(self.block)
        self.block = PyMem_Malloc(m * (7 * sizeof(i128) + sizeof(kp_rem)
                                       + sizeof(int64_t) + 2))
        if self.block is NULL:
            raise MemoryError()
        b = <char*>self.block
        self.total = <i128*>b
        self.disc = self.total + m
        self.coup = self.disc + m
        self.due = self.coup + m
        self.payw = self.due + m
        self.rate = self.payw + m
        self.work = self.rate + m
        self.rem = <kp_rem*>(self.work + m)
        self.numbers64 = <int64_t*>(self.rem + m)
        self.takes = <char*>(self.numbers64 + m)
        self.payable = self.takes + m
        self.n = n
        return 0

    cdef bint _scan(self, tuple lines, tier, classes) except -1:
        """_Lines.scan(lines, tier, checked=False): False when in doubt."""
        cdef Py_ssize_t n = PyTuple_GET_SIZE(lines), i
        cdef int64_t number, q, p, amount, product
        cdef i128 gross = 0, base = 0
        cdef PyObject* found
        cdef list numbers, quantities, totals, kinds
        self._allocate(n)
        numbers, quantities, totals, kinds = [None] * n, [None] * n, [None] * n, [None] * n
        for i in range(n):
            line = <object>PyTuple_GET_ITEM(lines, i)
            if Py_TYPE(line) is not <PyTypeObject*>_Line:
                return False
            number_obj = line_field(line, L_NUMBER)
            q_obj = line_field(line, L_QUANTITY)
            amount_obj = line_field(line, L_TOTAL)
            number = small_int(number_obj, 1)
            q = small_int(q_obj, 1)
            p = small_int(line_field(line, L_UNIT_PRICE), 0)
            amount = small_int(amount_obj, 0)
            if number < 0 or q < 0 or p < 0 or amount < 0:
                return False
            if kp_mul64(q, p, &product) or product != amount:
                return False
            sku = line_field(line, L_SKU)
            category = line_field(line, L_CATEGORY)
            f = line_field(line, L_FLAGS)
            if not (PyUnicode_CheckExact(sku) and PyUnicode_CheckExact(category)
                    and PyTuple_CheckExact(f)):
                return False
            if kp_blank(sku):
                return False
            self.numbers64[i] = number
            kp_lookup(classes, category, &found)
            if found is not NULL:
                kp_lookup(<object>found, f, &found)
            if found is NULL:   # new, or not valid: the plan decides
                kind = self.plan.new_class(tier, category, f, False)
                if kind is None:
                    return False
            else:
                kind = <object>found
            self.rate[i] = unbox(<object>PyTuple_GET_ITEM(kind, 0))
            self.takes[i] = <object>PyTuple_GET_ITEM(kind, 1) is True
            self.payable[i] = <object>PyTuple_GET_ITEM(kind, 2) is True
            self.total[i] = amount
            gross += amount
            if self.takes[i]:
                base += amount
            numbers[i] = number_obj
            quantities[i] = q_obj
            totals[i] = amount_obj
            kinds[i] = kind
        if gross > <i128>KP_INT64_MAX or kp_repeats(self.numbers64, n):
            return False
        self.numbers, self.quantities, self.totals, self.kinds = (
            numbers, quantities, totals, kinds)
        self.gross, self.base = gross, base
        return True

    cdef i128 _spread(self, i128 d, i128 c) except? -1:
        """_Lines.spread: splits the discount and the coupon; the payable sum."""
        cdef Py_ssize_t i, n = self.n
        cdef i128 payable = 0
        cdef i128* w = self.work
        for i in range(n):
            w[i] = self.total[i] if self.takes[i] else 0
        split_into(d, w, n, self.base, self.disc, self.rem)
        if c:
            for i in range(n):
                w[i] -= self.disc[i]
            split_into(c, w, n, self.base - d, self.coup, self.rem)
        else:
            for i in range(n):
                self.coup[i] = 0
        for i in range(n):
            self.due[i] = self.total[i] - self.disc[i] - self.coup[i]
            self.payw[i] = self.due[i] if self.payable[i] else 0
            payable += self.payw[i]
        return payable

    def price(self, spend):
        """_Lines.price: the Priced of `spend` points (0..max_spend)."""
        cdef Py_ssize_t i, n = self.n, m = self.n if self.n > 0 else 1
        cdef i128 s = unbox(spend), payable = 0, paid_total = 0, earn = 0, whole = 0
        cdef i128 referral = 0
        # scratch of its own: a quote may be priced again while this runs
        cdef i128* points = <i128*>PyMem_Malloc(m * (5 * sizeof(i128) + sizeof(kp_rem)))
        if points is NULL:
            raise MemoryError()
        cdef i128* paid = points + m
        cdef i128* earned = paid + m
        cdef i128* shares = earned + m
        cdef i128* work = shares + m
        cdef kp_rem* rem = <kp_rem*>(work + m)
        try:
            if s:
                for i in range(n):
                    payable += self.payw[i]
                split_into(s, self.payw, n, payable, points, rem)
                split_into(s * self.pv, self.payw, n, payable, work, rem)
                for i in range(n):
                    paid[i] = self.due[i] - work[i]
                    paid_total += paid[i]
            else:
                for i in range(n):
                    points[i] = 0
                    paid[i] = self.due[i]
                    paid_total += paid[i]
            if not self.earns:
                for i in range(n):
                    earned[i] = 0
            elif self.per_line:
                for i in range(n):
                    earned[i] = kp_round(paid[i] * self.rate[i], self.scale, self.mode)
                    earn += earned[i]
            else:
                for i in range(n):
                    work[i] = paid[i] * self.rate[i]
                    whole += work[i]
                earn = kp_round(whole, self.scale, self.mode)
                split_into(earn, work, n, whole, earned, rem)
            if self.referral_bp and paid_total:
                referral = kp_round(paid_total * self.referral_bp, BASIS * self.pv, self.mode)
                split_into(referral, paid, n, paid_total, shares, rem)
            else:
                for i in range(n):
                    shares[i] = 0
            numbers = self.numbers
            lines = PyTuple_New(n)
            for i in range(n):
                line = kp_alloc(_LinePrice, 5)
                kp_put(line, 0, <object>PyList_GET_ITEM(numbers, i))
                kp_put(line, 1, box(points[i]))
                kp_put(line, 2, box(paid[i]))
                kp_put(line, 3, box(earned[i]))
                kp_put(line, 4, box(shares[i]))
                kp_put(lines, i, line)
            priced = kp_alloc(_Priced, 5)
            kp_put(priced, 0, spend)
            kp_put(priced, 1, box(paid_total))
            kp_put(priced, 2, box(earn))
            kp_put(priced, 3, box(referral))
            kp_put(priced, 4, lines)
            return priced
        finally:
            PyMem_Free(points)

    def line_quotes(self, priced):
        cdef Py_ssize_t i, n = self.n
        cdef bint spent_nothing = priced[0] == 0   # then each line's paid is its due
        priced_lines = priced[4]
        out = PyTuple_New(n)
        for i in range(n):
            kind = <object>PyList_GET_ITEM(self.kinds, i)
            p = <object>PyTuple_GET_ITEM(priced_lines, i)
            line = kp_alloc(_LineQuote, 8)
            kp_put(line, 0, <object>PyList_GET_ITEM(self.numbers, i))
            kp_put(line, 1, <object>PyList_GET_ITEM(self.totals, i))
            kp_put(line, 2, box(self.disc[i]))
            kp_put(line, 3, box(self.coup[i]))
            kp_put(line, 4, <object>PyTuple_GET_ITEM(p, 2) if spent_nothing
                   else box(self.due[i]))
            kp_put(line, 5, <object>PyTuple_GET_ITEM(kind, 2))
            kp_put(line, 6, <object>PyTuple_GET_ITEM(p, 3))
            kp_put(line, 7, <object>PyTuple_GET_ITEM(kind, 3))
            kp_put(out, i, line)
        return out

    def shares(self, priced):
        cdef Py_ssize_t i, n = self.n
        priced_lines = priced[4]
        out = PyTuple_New(n)
        for i in range(n):
            p = <object>PyTuple_GET_ITEM(priced_lines, i)
            line = kp_alloc(_LineShare, 7)
            kp_put(line, 0, <object>PyList_GET_ITEM(self.numbers, i))
            kp_put(line, 1, <object>PyList_GET_ITEM(self.quantities, i))
            kp_put(line, 2, box(self.disc[i] + self.coup[i]))
            kp_put(line, 3, <object>PyTuple_GET_ITEM(p, 1))
            kp_put(line, 4, <object>PyTuple_GET_ITEM(p, 3))
            kp_put(line, 5, <object>PyTuple_GET_ITEM(p, 2))
            kp_put(line, 6, <object>PyTuple_GET_ITEM(p, 4))
            kp_put(out, i, line)
        return out


# --- calendar months ------------------------------------------------------------

import_datetime()


cdef inline int month_days(int year, int month) noexcept:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month == 4 or month == 6 or month == 9 or month == 11 else 31


def add_months(t, int months, zone):
    """lifetimes.add_months, compiled: the same local time `months` calendar
    months after `t` (microseconds) in `zone`, the day clamped to the
    month's last; the same steps with the datetime C API."""
    cdef long long micros = t, day_us = 86_400_000_000, days, rest
    cdef int year, month, index, day
    # local(t): EPOCH + t microseconds, in the zone (floor division)
    days = micros // day_us
    rest = micros - days * day_us
    if rest < 0:
        days -= 1
        rest += day_us
    moment = (EPOCH + timedelta_new(<int>days, <int>(rest // 1_000_000),
                                    <int>(rest % 1_000_000))).astimezone(zone)
    index = datetime_year(moment) * 12 + datetime_month(moment) - 1 + months
    year, month = index // 12, index % 12 + 1
    day = min(datetime_day(moment), month_days(year, month))
    shifted = datetime_new(year, month, day, datetime_hour(moment), datetime_minute(moment),
                           datetime_second(moment), datetime_microsecond(moment), zone,
                           datetime_fold(moment))
    # to_micros(shifted)
    delta = shifted - EPOCH
    return (<long long>timedelta_days(delta) * day_us
            + <long long>timedelta_seconds(delta) * 1_000_000
            + <long long>timedelta_microseconds(delta))


# --- a version's rules, as the compiled quote reads them ---------------------------

cdef enum:
    MAX_COMPETING = 64
    PURCHASE = 0
    REFERRAL = 1
    NEVER_EXPIRES = 0
    IN_DAYS = 1
    END_OF = 2

KINDS = ("purchase", "referral")

ctypedef struct Offer:
    i128 percent_bp        # 0: a fixed amount
    i128 amount            # at most 2**63
    i128 min_receipt       # at most 2**63
    bint additive
    bint regular
    bint newcomer


cdef class Rules:
    """What `quote` reads of a version, gathered once per version by its
    `_Plan` (which keeps it as `plan.rules`)."""

    cdef object plan, tiers, tier_discounts, offer_names, offer_tiers, static_limits
    cdef dict classes
    # per kind of points (PURCHASE, REFERRAL): activation delay, expiry
    # (NEVER_EXPIRES, IN_DAYS or END_OF a period) and the plan's last period
    cdef list activation_us, days_us, period_zone, period_expires
    cdef i128 period_low[2]
    cdef i128 period_high[2]
    cdef int expiry[2]
    cdef object min_balance, min_points, min_receipt
    cdef object coupon, threshold, coupon_value, one_per_customer, valid_days_us
    cdef object valid_months, usable_after_us, share_bp, window_us
    cdef object until_zone, until       # the last coupon expiry worked out
    cdef i128 until_bt
    cdef i128 newcomer_bp, cap_bp, pv
    cdef Py_ssize_t n_offers
    cdef Offer* offers

    def __cinit__(self, plan, v):
        cdef Py_ssize_t k
        cdef int kind
        self.plan = plan
        self.tiers = plan.tiers
        self.classes = plan._classes
        self.activation_us, self.days_us = [None, None], [None, None]
        self.period_zone, self.period_expires = [None, None], [None, None]
        for kind, name in enumerate(KINDS):
            lifetime = plan.lifetimes[name]
            self.activation_us[kind] = lifetime.activation_days * DAY
            self.expiry[kind] = (END_OF if lifetime.expiry.end_of is not None
                                 else IN_DAYS if lifetime.expiry.days is not None
                                 else NEVER_EXPIRES)
            self.days_us[kind] = (lifetime.expiry.days * DAY if self.expiry[kind] == IN_DAYS
                                  else None)
            self.period_zone[kind] = self.period_expires[kind] = None
            self.period_low[kind], self.period_high[kind] = 0, -1
        self.tier_discounts = {name: (f"tier:{name}", t.discount_bp)
                               for name, t in plan.tiers.items() if t.discount_bp}
        r = v.referral
        self.newcomer_bp = r.newcomer_discount_bp if r is not None else 0
        self.share_bp = r.referrer_share_bp if r is not None else 0
        self.window_us = r.window_days * DAY if r is not None else 0
        offers = v.discounts.offers
        self.n_offers = len(offers)
        self.offers = <Offer*>PyMem_Malloc(max(self.n_offers, 1) * sizeof(Offer))
        if self.offers is NULL:
            raise MemoryError()
        self.offer_names = tuple(o.name for o in offers)
        self.offer_tiers = tuple(o.tiers for o in offers)
        for k, o in enumerate(offers):
            self.offers[k].percent_bp = o.percent_bp or 0
            self.offers[k].amount = clip(o.amount or 0)
            self.offers[k].min_receipt = clip(o.min_receipt)
            self.offers[k].additive = bool(o.additive)
            self.offers[k].regular = bool(o.regular)
            self.offers[k].newcomer = bool(o.newcomer)
        s = v.spend
        self.cap_bp, self.pv = s.cap_bp, v.point_value
        self.min_balance, self.min_points, self.min_receipt = (
            s.min_balance, s.min_points, s.min_receipt)
        limits = []
        if s.min_receipt:
            limits.append(reason(W_MIN_RECEIPT, "", s.min_receipt))
        if s.min_balance:
            limits.append(reason(W_MIN_BALANCE, "", s.min_balance))
        if s.min_points:
            limits.append(reason(W_MIN_POINTS, "", s.min_points))
        self.static_limits = tuple(limits)
        c = self.coupon = v.coupon
        if c is not None:
            self.threshold, self.coupon_value = c.threshold, c.value
            self.one_per_customer = c.one_per_customer
            self.valid_days_us = c.valid_days * DAY if c.valid_days is not None else None
            self.valid_months = c.valid_months
            self.usable_after_us = c.usable_after_days * DAY

    def __dealloc__(self):
        PyMem_Free(self.offers)

    cdef object coupon_until(self, object t, i128 t64, object program):
        """plan.coupon_until(t, valid_months, program), compiled; the last
        one is kept (a checkout prices its receipt twice)."""
        zone = program.time_zone
        if self.until is not None and t64 == self.until_bt and (
                zone is self.until_zone or zone == self.until_zone):
            return self.until
        until = add_months(t, self.valid_months, program.zone)
        self.until, self.until_bt, self.until_zone = until, t64, zone
        return until

    cdef tuple lot_times(self, int kind, object t, i128 t64, object program):
        """plan.lot_times(KINDS[kind], t, program), remembering the plan's
        last period here too."""
        activates_at = t + self.activation_us[kind]
        if self.expiry[kind] == IN_DAYS:
            return activates_at, t + self.days_us[kind]
        if self.expiry[kind] == NEVER_EXPIRES:
            return activates_at, NEVER
        zone = program.time_zone
        if (self.period_low[kind] <= t64 < self.period_high[kind]
                and (zone is self.period_zone[kind] or zone == self.period_zone[kind])):
            return activates_at, self.period_expires[kind]
        found = self.plan.lot_times(KINDS[kind], t, program)
        low, high, expires, memo_zone = self.plan._periods[KINDS[kind]]
        self.period_low[kind], self.period_high[kind] = clip(low), clip(high)
        self.period_expires[kind], self.period_zone[kind] = expires, memo_zone
        return found


# --- quote and settle, compiled ------------------------------------------------------

# The version (and its plan) of the last receipt priced: the next is nearly
# always of the same program and version.
cdef object _last_program = None, _last_version = None, _last_plan = None
cdef i128 _last_from = 0, _last_until = -1


cdef object version_of(object program, object t, i128 t64):
    """(program.version_at(t), its plan), or None when there is none."""
    global _last_program, _last_version, _last_plan, _last_from, _last_until
    cdef i128 start, until
    cdef Py_ssize_t k, n
    if program is _last_program and _last_from <= t64 < _last_until:
        return _last_version, _last_plan
    try:
        v = program.version_at(t)
    except LookupError:
        return None
    plan = _plan_of(v)
    # remembered while t is from its effective_from to the next one's (when
    # the versions start in order, as parse_program makes sure)
    starts = [clip(x.effective_from) for x in program.versions]
    n = len(starts)
    start, until = 0, -1
    for k in range(n):
        if k and starts[k] <= starts[k - 1]:
            start, until = 0, -1
            break
        if program.versions[k] is v:
            start = starts[k]
            until = starts[k + 1] if k + 1 < n else (<i128>KP_INT64_MAX) + 1
    _last_program, _last_version, _last_plan = program, v, plan
    _last_from, _last_until = start, until
    return v, plan


def quote(program, receipt, member, now):
    """pricing._quote, compiled: the same Quote, or None when the input is
    not surely good (or the program's figures are beyond the compiled
    ones), and the caller then runs the Python one, which names every
    problem. See pricing.py for the rules; this follows it step by step."""
    cdef Rules rules
    cdef Lines c
    cdef Offer* o
    cdef i128 gross, base, left, amount, discount, coupon = 0, due, payable, cap
    cdef int overflow = 0
    cdef long long bt64
    cdef i128 competing[MAX_COMPETING]
    cdef i128 additive[MAX_COMPETING]
    cdef Py_ssize_t nc = 0, na = 0, k, best = -1
    cdef bint known, newcomer, regular

    # the receipt (receipt._quick_header) and the member (member_fine)
    if Py_TYPE(receipt) is not <PyTypeObject*>_Receipt:
        return None
    rid, store = receipt_field(receipt, R_ID), receipt_field(receipt, R_STORE)
    lane = receipt_field(receipt, R_LANE)
    bt, lines = receipt_field(receipt, R_BUSINESS_TIME), receipt_field(receipt, R_LINES)
    if not (PyUnicode_CheckExact(rid) and PyLong_CheckExact(store)
            and PyLong_CheckExact(lane) and PyLong_CheckExact(bt)
            and PyTuple_CheckExact(lines) and PyTuple_GET_SIZE(lines)
            and store >= 1 and lane >= 1 and bt <= now + CLOCK_SKEW):
        return None
    if kp_blank(rid):
        return None
    bt64 = PyLong_AsLongLongAndOverflow(bt, &overflow)
    if overflow:
        return None
    partner = 0
    if program.stores:
        known_store = program.store.get(store)
        if known_store is None or lane not in known_store.lanes:
            return None
        partner = known_store.partner
    found = version_of(program, bt, bt64)
    if found is None:
        return None
    v, plan = found
    if Py_TYPE(member) is not <PyTypeObject*>_Member:
        return None
    available = member_field(member, M_AVAILABLE)
    held_points = member_field(member, M_HELD)
    account = member_field(member, M_ACCOUNT)
    referrer = member_field(member, M_REFERRER)
    tier = member_field(member, M_TIER)
    enrolled_at = member_field(member, M_ENROLLED_AT)
    held = member_field(member, M_COUPON)
    card = member_field(member, M_CARD)
    newcomer_obj = member_field(member, M_NEWCOMER)
    regular_obj = member_field(member, M_REGULAR)
    if newcomer_obj is _UNSET or regular_obj is _UNSET:
        return None
    if not (PyLong_CheckExact(available) and PyLong_CheckExact(held_points)
            and PyLong_CheckExact(account) and PyLong_CheckExact(referrer)
            and available >= 0 and held_points >= 0 and account >= 0 and referrer >= 0
            and (tier is None or PyUnicode_CheckExact(tier))
            and (enrolled_at is None or PyLong_CheckExact(enrolled_at))
            and (PyBytes_CheckExact(card) or PyUnicode_CheckExact(card))):
        return None
    if held is not None:
        if Py_TYPE(held) is not <PyTypeObject*>_MemberCoupon:
            return None
        code, coupon_value = coupon_field(held, C_CODE), coupon_field(held, C_VALUE)
        usable_from = coupon_field(held, C_USABLE_FROM)
        coupon_expires = coupon_field(held, C_EXPIRES_AT)
        coupon_number = coupon_field(held, C_NUMBER)
        if not (PyLong_CheckExact(coupon_value) and coupon_value >= 1
                and PyLong_CheckExact(coupon_number) and coupon_number >= 0
                and PyLong_CheckExact(usable_from) and PyLong_CheckExact(coupon_expires)
                and code is not _UNSET):
            return None
    rules = plan.rules
    if rules is None or rules.n_offers + 2 > MAX_COMPETING:
        return None
    known = tier is None or tier in rules.tiers
    if not known:
        tier = None
    classes = rules.classes.get(tier)
    if classes is None:
        classes = plan.classes(tier)
    c = Lines.__new__(Lines, plan)
    if not c._scan(lines, tier, classes):
        return None
    reasons = [] if known else [reason(W_TIER_UNKNOWN, member_field(member, M_TIER), 0)]
    gross, base = c.gross, c.base
    newcomer, regular = newcomer_obj, regular_obj

    # 1. discounts: the best competing one, and every additive one
    names = []
    if tier is not None:
        found = rules.tier_discounts.get(tier)
        if found is not None:
            names.append(found[0])
            competing[nc] = base * unbox(found[1]) / BASIS
            nc += 1
    if newcomer and rules.newcomer_bp:
        names.append("referral:newcomer")
        competing[nc] = base * rules.newcomer_bp / BASIS
        nc += 1
    additive_names = []
    for k in range(rules.n_offers):
        o = &rules.offers[k]
        if gross < o.min_receipt:
            continue
        offer_tiers = rules.offer_tiers[k]
        if (offer_tiers and tier not in offer_tiers) or (o.regular and not regular) \
                or (o.newcomer and not newcomer):
            continue
        amount = base * o.percent_bp / BASIS if o.percent_bp else min(o.amount, base)
        if o.additive:
            additive_names.append(rules.offer_names[k])
            additive[na] = amount
            na += 1
        else:
            names.append(rules.offer_names[k])
            competing[nc] = amount
            nc += 1
    for k in range(nc):
        if competing[k] and (best < 0 or competing[k] > competing[best]):
            best = k
    for k in range(nc):
        if k != best and competing[k]:
            reasons.append(reason(W_NOT_BEST, names[k], box(competing[k])))
    applied = []
    left = base
    if best >= 0:
        amount = min(competing[best], left)
        if amount:
            left -= amount
            applied.append(reason(W_BEST, names[best], box(amount)))
    for k in range(na):
        amount = min(additive[k], left)
        if amount:
            left -= amount
            applied.append(reason(W_ADDITIVE, additive_names[k], box(amount)))
    discount = base - left

    # 2. the member's coupon, on what those lines still cost
    coupon_obj = 0
    if held is not None:
        if bt < usable_from:
            reasons.append(reason(W_NOT_YET_USABLE, code, 0))
        elif bt >= coupon_expires:
            reasons.append(reason(W_EXPIRED, code, 0))
        elif not left:
            reasons.append(reason(W_NOTHING_TO_COVER, code, 0))
        else:
            coupon = min(clip(coupon_value), left)
            coupon_obj = box(coupon)
            reasons.append(reason(W_REDEEMED, code, coupon_obj))
    payable = c._spread(discount, coupon)
    due = gross - discount - coupon
    due_obj, payable_obj = box(due), box(payable)

    # 3. what points may pay (pricing._spend_limits)
    balance = available + held_points
    cap_obj = box(payable * rules.cap_bp / (BASIS * rules.pv))
    limits = (reason(W_CAP, "", cap_obj), reason(W_BALANCE, "", balance)) \
        + rules.static_limits
    bound = None
    if rules.min_receipt and due_obj < rules.min_receipt:
        bound = W_MIN_RECEIPT
    if rules.min_balance and balance < rules.min_balance and bound is None:
        bound = W_MIN_BALANCE
    max_spend = min_spend = 0
    if bound is None:
        if not payable:
            bound = W_NOTHING_PAYABLE
        else:
            if cap_obj <= balance:
                most, bound = cap_obj, W_CAP
            else:
                most, bound = balance, W_BALANCE
            if most and most < rules.min_points:
                bound = W_MIN_POINTS
            else:
                max_spend = most
                min_spend = rules.min_points if most else 0

    activates_at, expires_at = rules.lot_times(PURCHASE, bt, bt64, program)
    if expires_at <= now:
        c.earns = False
        reasons.append(reason(W_EXPIRED_ON_ARRIVAL, "", 0))

    # the coupon this purchase earns (pricing._coupon_earned)
    coupon_earned = None
    if rules.coupon is not None and due_obj >= rules.threshold:
        if (rules.one_per_customer and held is not None and bt < coupon_expires
                and not coupon):
            reasons.append(reason(W_ALREADY_HELD, code, 0))
        else:
            if rules.valid_days_us is not None:
                until = bt + rules.valid_days_us
            else:
                until = rules.coupon_until(bt, bt64, program)
            reasons.append(reason(W_EARNED, "", rules.coupon_value))
            coupon_earned = kp_alloc(_CouponTerms, 3)
            kp_put(coupon_earned, 0, rules.coupon_value)
            kp_put(coupon_earned, 1, bt + rules.usable_after_us)
            kp_put(coupon_earned, 2, until)

    # the referrer's share
    if (rules.share_bp and referrer and enrolled_at is not None
            and enrolled_at <= bt < enrolled_at + rules.window_us):
        c.referral_times = rules.lot_times(REFERRAL, bt, bt64, program)
        if c.referral_times[1] > now:
            c.referral_bp = rules.share_bp

    return record(_Quote, {
        "receipt": receipt, "member": member, "now": now, "version": v,
        "partner": partner, "total": box(gross), "discount": box(discount),
        "coupon": coupon_obj, "due": due_obj, "payable": payable_obj,
        "discounts": tuple(applied), "max_spend": max_spend, "min_spend": min_spend,
        "spend_bound": bound, "spend_limits": limits, "activates_at": activates_at,
        "expires_at": expires_at, "coupon_earned": coupon_earned,
        "reasons": tuple(reasons), "_calc": c})


def settle_quote(q, spend, op_id_prefix, hold, annotate):
    """pricing._settle_quote, compiled: the same Settlement, or None when
    the request is not surely good, and the caller then runs the Python
    one, which names every problem."""
    cdef Py_ssize_t size
    if Py_TYPE(q) is not <PyTypeObject*>_Quote:
        return None
    member = q.member
    if not PyLong_CheckExact(spend) or spend < 0 or spend > q.max_spend \
            or 0 < spend < q.min_spend:
        return None
    if hold is not None:
        if spend > member.held or not (PyUnicode_CheckExact(hold) or PyBytes_CheckExact(hold)):
            return None
        if PyUnicode_CheckExact(hold):
            try:
                size = len((<str>hold).encode())
            except UnicodeError:
                return None
        else:
            size = len(<bytes>hold)
        if size == 0 or size > MAX_OP_ID:
            return None
    elif spend > member.available:
        return None
    if not PyUnicode_CheckExact(op_id_prefix) or not op_id_prefix:
        return None
    try:
        size = len((<str>op_id_prefix).encode())
    except UnicodeError:
        return None
    if size + LONGEST_SUFFIX > MAX_OP_ID:
        return None
    if not member.account and not member.card and hold is None:
        return None

    card = member.card
    if PyUnicode_CheckExact(card):
        try:
            card = (<str>card).encode()
        except UnicodeError:
            return None
    if not PyBytes_CheckExact(card) or len(<bytes>card) > 255:
        return None

    calc = q._calc
    priced = q.spent_nothing if spend == 0 else calc.price(spend)
    number = q.version.number
    earn, paid, referral = priced[2], priced[1], priced[3]
    capture = op_id_prefix + "/capture"
    if not (hold is not None or spend or earn or paid):
        capture = None  # no money, no points, no hold: nothing to record
        if q.coupon_earned is not None:
            return None  # an issue naming no capture: Python's answer, whatever it is
    referral_op, referral_data = None, None
    if referral:
        referral_op = op_id_prefix + "/referral"
        if annotate:
            activates_at, expires_at = calc.referral_times
            receipt = q.receipt
            referral_data = {"op": referral_op, "account": member.referrer,
                             "points": referral, "act": activates_at, "exp": expires_at,
                             "partner": q.partner, "version": number,
                             "bt": receipt.business_time, "store": receipt.store,
                             "lane": receipt.lane}
    allocation = record(_Allocation, {"capture": capture, "referral_op": referral_op,
                                      "version": number, "lines": calc.shares(priced)})
    data = (annotate(allocation, referral_data)
            if annotate and (capture is not None or q.coupon) else b"")
    if not PyBytes_CheckExact(data) or len(<bytes>data) > MAX_DATA_BYTES:
        return None
    try:
        return settlement(q, priced, spend, allocation, op_id_prefix, capture,
                          referral_op, hold, card, data)
    except OverflowError:
        return None   # a figure beyond its field: Python's Batch names it


# --- a settlement's operations, encoded --------------------------------------------
# settle_quote writes its operations' bytes itself, exactly as Batch.add
# would (records.OP, then the op id, key, key2 and data): through Batch.add
# they took a third of a settlement's time. `bind` holds the layout to
# records.OP. Every length was checked by the caller.

cdef Py_ssize_t put_op(bytearray out, kp_op* h, bytes op_id, bytes key, bytes key2,
                       bytes data) except -1:
    """Appends one operation to `out`; its offset there."""
    cdef Py_ssize_t at = len(out)
    h.op_len, h.key_len, h.key2_len = len(op_id), len(key), len(key2)
    h.data_len = len(data)
    out += PyBytes_FromStringAndSize(<char*>h, sizeof(kp_op))
    out += op_id
    out += key
    out += key2
    out += data
    return at


cdef object settlement(q, priced, spend, allocation, str prefix, capture, referral_op,
                       hold, bytes card, bytes data):
    """The Settlement of settle_quote, its batches encoded here."""
    cdef kp_op h
    cdef bytearray ops = bytearray()
    cdef Py_ssize_t count = 0, last = -1
    member, receipt, v = q.member, q.receipt, q.version
    cdef bytes hold_key = b"" if hold is None else (
        (<str>hold).encode() if PyUnicode_CheckExact(hold) else hold)
    cdef bytes receipt_key = b"" if capture is None else (<str>capture).encode()

    memset(&h, 0, sizeof(h))   # the fields every operation here has
    h.partner, h.version, h.business_time = q.partner, v.number, receipt.business_time
    h.store, h.lane = receipt.store, receipt.lane

    after = _Batch()
    if referral_op is not None:
        h.kind, h.account, h.amount2 = K_EARN, member.referrer, priced[3]
        h.activates_at, h.expires_at = q._calc.referral_times
        referral = bytearray()
        put_op(referral, &h, (<str>referral_op).encode(), b"", b"", b"")
        after = _Batch.encoded(referral, 1, 0)

    h.account = member.account
    if capture is not None:
        h.kind, h.amount, h.amount2, h.money = K_CAPTURE, spend, priced[2], priced[1]
        h.activates_at, h.expires_at = q.activates_at, q.expires_at
        last = put_op(ops, &h, receipt_key, hold_key, card, data)
        count += 1
    h.amount2 = h.money = h.activates_at = h.expires_at = 0

    issue = redemption = None   # as pricing._coupon_ops
    if q.coupon:
        coupon = member.coupon
        redemption = _CouponRedemption(prefix + "/coupon-redeem", coupon.code, q.coupon)
        if last >= 0:
            ops[last + LINK_AT] |= F_LINKED
        h.kind, h.amount, h.amount2 = K_REDEEM_COUPON, q.coupon, coupon.number
        last = put_op(ops, &h, (<str>redemption[0]).encode(), receipt_key, card,
                      b"" if capture is not None else data)
        count += 1
    if q.coupon_earned is not None:
        value, usable_from, expires_at = q.coupon_earned
        issue = _CouponIssue(prefix + "/coupon-issue", value, usable_from,
                             expires_at)
        h.kind, h.amount, h.amount2 = K_ISSUE_COUPON, value, 0
        h.activates_at, h.expires_at = usable_from, expires_at
        h.flags = F_ONE_PER_CUSTOMER if v.coupon.one_per_customer else 0
        last = put_op(ops, &h, (<str>issue[0]).encode(), receipt_key, card, b"")
        count += 1
    return record(_Settlement, {"quote": q, "priced": priced,
                                "batch": _Batch.encoded(ops, count, last),
                                "after": after, "allocation": allocation,
                                "coupon_issue": issue, "coupon_redemption": redemption})
