"""The ledger's byte layouts: operations in, results out, and what is stored.

Both ledgers (the Cython kernel and the pure-Python twin) read and write
exactly these bytes, so their LMDB files are identical record for record and
one audit, one reader and one batch encoder serve both. Integers are
little-endian in values and big-endian in keys (so keys sort numerically).
"""

import struct
from enum import IntEnum

MAX_OP_ID = 128
MAX_KEY = 128
MAX_DATA = 65535  # opaque data attached to an operation (u16 n_data)
MAX_TIER = 65535
NEVER = (1 << 63) - 1  # expires_at of points that never expire
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
MAX_LOTS = 2048  # per account; keeps an account's value well under 100 KiB
MAX_HOLDS = 256
MAX_COUPONS = 16  # open at once, per account (one_per_customer keeps it to one)
VISIT_DAYS = 16   # visit days an account keeps: a regular's min_visits at most
SYSTEM = 1 << 63  # account ids with this bit are program system accounts


class Kind(IntEnum):
    PUT_PROGRAM = 1
    OPEN_ACCOUNT = 2
    SET_ACCOUNT_STATUS = 3
    LINK_CARD = 4
    BLOCK_CARD = 5
    REPLACE_CARD = 6
    EARN = 7
    SPEND = 8
    HOLD = 9
    CAPTURE = 10
    VOID = 11
    REFUND = 12
    ADJUST = 13
    TRANSFER = 14
    SWEEP = 15
    SET_PROFILE = 16
    SET_TIER = 17
    ISSUE_COUPON = 18
    REDEEM_COUPON = 19
    AWARD = 20       # a bonus counted against a member's counter, up to a limit
    VISIT = 21       # a receipt counted as a visit; the Nth earns a bonus


class Code(IntEnum):
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
    DATA_TOO_LONG = 32   # a refund's data would overflow its receipt's record
    # 40-49: linked operations and coupons
    LINKED_FAILED = 40   # another operation of its chain failed: nothing applied
    LINK_OPEN = 41       # the batch ends inside a chain: nothing of it applied
    COUPON_HELD = 42     # one per customer: the member holds an open coupon
    COUPON_NOT_FOUND = 43  # no such coupon of the member's (or revoked, merged)
    COUPON_NOT_USABLE = 44  # its window has not started (business time)
    COUPON_EXPIRED = 45  # its window has ended (business time), or it lapsed
    COUPON_REDEEMED = 46  # redeemed already
    TOO_MANY_COUPONS = 47
    LIMIT_REACHED = 48   # AWARD: the member's counter is at the limit


class Status(IntEnum):
    ACTIVE = 1
    BLOCKED = 2
    CLOSED = 3


class CardStatus(IntEnum):
    ACTIVE = 1
    BLOCKED = 2
    REPLACED = 3


class HoldState(IntEnum):
    NONE = 0
    OPEN = 1
    CAPTURED = 2
    VOIDED = 3


class CouponState(IntEnum):
    OPEN = 1       # the member's, to redeem within its window
    REDEEMED = 2
    REVOKED = 3    # the purchase that earned it was refunded below the threshold
    EXPIRED = 4    # lapsed unused: closed when its account was next touched
    MOVED = 5      # its member was merged into another (TRANSFER_ALL): it went
                   # on there, a new coupon of theirs with its value and window
    DISPLACED = 6  # closed by a merge, one per customer (TRANSFER_ONE_COUPON):
                   # the surviving member keeps a better one


class Sys(IntEnum):
    """Program system accounts; every posting has one side here or on a member."""
    ISSUED = 1
    REDEEMED = 2
    EXPIRED = 3
    ADJUSTED = 4


class Entry(IntEnum):
    """Journal entry types. Postings move points; the others record events."""
    PROGRAM_PUT = 1  # amount = flags, amount2 = UTC offset in minutes
    ACCOUNT_OPENED = 2
    ACCOUNT_STATUS = 3
    CARD_LINKED = 4
    CARD_BLOCKED = 5
    CARD_REPLACED = 6
    HOLD_PLACED = 7
    HOLD_RELEASED = 8
    RECEIPT = 9      # a receipt with money: amount = money, amount2 = points
                     # spent, ref = its lot; a refund with money journals one
                     # too: amount = -money, amount2 = -points given back,
                     # ref 0 (so money and spend sum to the net)
    PROFILE_SET = 10  # amount = flags, no data: the journal never holds a profile
    TIER_SET = 11    # amount = new tier, amount2 = previous tier
    COUPON_ISSUED = 12  # a coupon is the member's (open): amount = its value
                     # (money), amount2 = expires_at, ref = its number; data
                     # = unsigned LEB128 usable_from, then how (COUPON_EARNED:
                     # issued, COUPON_GIVEN_BACK: a refund of the receipt that
                     # redeemed it reopened it, same number and terms;
                     # COUPON_MOVED: a merge brought it from the merged
                     # member, then their account id and the coupon's number
                     # there, which a COUPON_CLOSED as MOVED just closed)
    COUPON_CLOSED = 13  # a coupon stops being open: amount = the money it
                     # took off (redeemed; 0 otherwise), amount2 = its new
                     # CouponState, ref = its number, data = unsigned LEB128
                     # its value (what lapsed, was revoked or displaced is
                     # worth that much in the coupon reports)
    BONUS = 14       # AWARD and VISIT: a member's counter counted one more;
                     # amount = points earned (0: none this time), amount2
                     # = the counter's count after, ref = the lot earned (0:
                     # none), data = the counter's name; an EARN posting of
                     # the points comes before it
    EARN = 16        # a new lot: ref = its number (issued this hour)
    SPEND = 17       # one per issuing partner (partner2); data = its lots
    EXPIRE = 18      # one lot: ref = its number, partner2 its partner; data
    ADJUST = 19      # credit: a new lot, ref = its number; debit: ref 0
    TRANSFER = 20    # between members: lots move with their issue hours
    RETURN = 21      # a refund gives spent points back; like SPEND
    CLAWBACK = 22    # a refund takes earned points back: ref = the receipt's
                     # lot, partner2 = the receipt's partner; data = what
                     # came out of that lot (empty when nothing did)


# Postings that take points out of existing lots or put them back (SPEND,
# RETURN, EXPIRE, CLAWBACK) name those lots in their entry's data, so that
# the breakage cohorts (aggregates below) are a fold of the journal alone:
# per lot, in the order they were touched, unsigned LEB128 varints
#   lot_no, points (> 0), issued_hour
# SPEND, RETURN and EXPIRE name exactly their `amount`; a CLAWBACK names the
# part its receipt's own lot gave (the rest came from the balance or became
# debt). The lots' partner is the entry's partner2. Points taken from lots
# without naming them: debt repaid from lots (on touch, not journaled), a
# CLAWBACK's part from the balance, an ADJUST debit.


# Operation flags.
PROGRAM_ALLOW_DEBT = 1   # PUT_PROGRAM: a clawback may leave the member in debt
REFUND_PROPORTIONAL = 1  # REFUND: derive points from money refunded / receipt money
REFUND_KEEP_COUPON = 2   # REFUND of a REDEEM_COUPON: note it, keep the coupon used
TRANSFER_ALL = 1         # TRANSFER: move every lot, pending included (card merge)
TRANSFER_ONE_COUPON = 2  # TRANSFER_ALL: the target keeps at most one open coupon
PROFILE_ERASE = 1        # SET_PROFILE: also delete the external id mapping `key`
COUPON_ONE_PER_CUSTOMER = 1  # ISSUE_COUPON: refused while the member holds an
                             # open coupon unexpired at the business time
LINKED = 1  # the OP header's `link`: this and the next operation are one chain

# How a COUPON_ISSUED entry came about (its data).
COUPON_EARNED = 1
COUPON_GIVEN_BACK = 2
COUPON_MOVED = 3

# Hold release reasons (journal entry `amount2` of HOLD_RELEASED).
RELEASE_CAPTURED = 1
RELEASE_VOIDED = 2
RELEASE_EXPIRED = 3


def system_account(kind, partner=0):
    return SYSTEM | (int(kind) << 32) | partner


# --- operations (the batch format) ---------------------------------------
# kind, flags, len(op_id), len(key), len(key2), link, len(data), program,
# partner, version, reason, store, lane, account, account2, amount, amount2,
# money, activates_at, expires_at, business_time; then op_id, key, key2 and
# data bytes. Data is opaque to the ledger: kept with the operation's record
# (a profile for OPEN_ACCOUNT and SET_PROFILE: kept in `profiles` only).
OP = struct.Struct("<BBBBBBHIIIIIIQQqqqqqq")

# Chains (TigerBeetle's linked events). An operation whose `link` has LINKED
# is chained to the next one; a chain ends at the first operation without
# it. A chain applies all or nothing: its operations are worked out in
# order, each seeing what the earlier ones did, and committed together only
# if every one succeeds (a replay of an id seen before counts as success and
# writes nothing). Otherwise nothing of it is kept: the failing operation
# gets its own code, every other one LINKED_FAILED. A batch ending inside a
# chain (its last operation has LINKED) applies nothing of that chain: the
# last gets LINK_OPEN, the others LINKED_FAILED. Other bits of `link`:
# FLAGS_INVALID. A checkout's capture and the coupon it redeems are one
# chain, so that a coupon redeemed meanwhile refuses the capture too.
#
# Coupons: money off a later purchase, not points (no posting, no system
# account: they leave the programs' zero sum alone). A member's coupons are
# kept in their account value (below), numbered from 1 per account.
# - ISSUE_COUPON: account, or the card `key2`; `amount` its value (money,
#   > 0); `activates_at` usable_from, `expires_at` the end of its window
#   (0 <= usable_from < expires_at, expires_at > now: else TIME_INVALID);
#   `key`, when given, the receipt that earned it (an EARN, SPEND or CAPTURE
#   of the same member, else OPERATION_NOT_FOUND); `flags`
#   COUPON_ONE_PER_CUSTOMER. Refused with COUPON_HELD when that flag is set
#   and the member holds an open coupon whose window has not ended at the
#   operation's business time; TOO_MANY_COUPONS beyond MAX_COUPONS open.
#   Result a = the coupon's number. Its record: a = number, money = value.
# - REDEEM_COUPON: account or card; `amount2` the coupon's number, `amount`
#   the money it takes off (1 to its value, else AMOUNT_INVALID); `key`,
#   when given, the receipt it pays for (as ISSUE_COUPON's). Judged at the
#   business time: COUPON_NOT_USABLE before usable_from, COUPON_EXPIRED from
#   expires_at on (or lapsed), COUPON_REDEEMED when redeemed already,
#   COUPON_NOT_FOUND when the member has no such coupon (or it was revoked,
#   moved or displaced by a merge).
#   Result a = number, b = money taken off. Its record: a, b, money = b,
#   and the coupon as its one `consumed` row (lot_no = number, amount =
#   value, activates_at = usable_from, expires_at; partner, issued_hour 0),
#   which a refund reopens it from.
# - REFUND naming an ISSUE_COUPON revokes the coupon if it is still open
#   (the earning purchase was refunded below the threshold; the server
#   decides); one naming a REDEEM_COUPON gives the coupon back (the purchase
#   that used it was refunded whole), reopened with its number and terms,
#   if its window has not ended by now and the member holds no open coupon
#   (one per customer). Either only once per coupon operation
#   (REFUND_EXCEEDS_ORIGINAL after), with no amounts and no flags
#   (AMOUNT_INVALID, FLAGS_INVALID); result a = the coupon's value when it
#   changed, 0 when it did not (a coupon used, expired, or another held):
#   such a refund never fails for the coupon's sake, so it can be chained
#   to the receipt's own refund. The coupon operation's record is marked
#   (refunded_money = its money) and takes the refund's data, as receipts do.
#   With REFUND_KEEP_COUPON (a REDEEM_COUPON only, else FLAGS_INVALID) the
#   refund is noted and nothing else: its data joins the redemption's
#   record, the coupon stays redeemed, the record is not marked (so it may
#   come again, and a refund without the flag may follow), result a = 0.
#   That is a partial return of a receipt the coupon paid in full: no
#   capture holds its lines, the redemption does (the server's rule: such a
#   receipt has nothing to give back but its coupon, which comes back when
#   the last of its lines does, as for any receipt that redeemed one).
# - TRANSFER_ALL (a merge: the source's every lot goes to the target) moves
#   the source's open coupons too, after its lots: each is closed on the
#   source as MOVED and opened on the target under the target's next
#   number, with its value and window (COUPON_ISSUED how COUPON_MOVED,
#   naming the source's coupon), in number order. TOO_MANY_COUPONS when
#   the target would hold more than MAX_COUPONS open. With
#   TRANSFER_ONE_COUPON (the program's one per customer; only with
#   TRANSFER_ALL, else FLAGS_INVALID) the target ends with one open coupon
#   at most: of the target's open ones and the source's, the one worth most
#   stays, on equal value the one whose window ends later, then the
#   target's own (a cashier already told the customer about it), then the
#   lower number; every other one is closed as DISPLACED (the target's
#   first, then the source's), and the best moves if it was the source's.
#   Nothing of this happens when the source holds no open coupon: a
#   target's own coupons are never touched by a merge that brings none.
#   Coupons are judged by `now` here (touch closed the lapsed ones), not
#   by business time: a merge is an administrative act, not a purchase.
# - A touch of an account (any operation that loads it to change it) closes
#   its open coupons whose window has ended by now (EXPIRED, journaled with
#   store 0, like expiring lots). Issuing or reopening a coupon drops the
#   closed ones from the account (the journal keeps their story).
#
# OPEN_ACCOUNT and SET_PROFILE: `reason` is the member's birthday as month *
# 100 + day (0: none; 229 is one), indexed in `member_index` so that a day's
# birthdays are found without reading every account; SET_PROFILE replaces
# it (an erasure passes 0).
# AWARD: `key` names the member's counter (1 to MAX_KEY bytes, e.g.
# b"action/review/2026-11-23"), `amount` is its limit (0: none), `amount2`
# the points (> 0) earned as a lot with activates_at and expires_at.
# VISIT: `key` names the counter, `key2` is the op id of a receipt already
# applied (EARN, SPEND or CAPTURE; its member is the one counted), `amount`
# the count (> 0) whose reaching earns `amount2` points (> 0), once per
# counter. Both journal an EARN posting (when points are earned) and a BONUS
# event; results: a = the lot (0: none), b = the counter's count after.

# code, flags, a, b
RESULT = struct.Struct("<HH4xqq")
RESULT_REPLAYED = 1  # the first result of an operation id seen before

# --- stored values --------------------------------------------------------
# program: flags, created_at, updated_at, utc_offset (the program's standard
# UTC offset in minutes, from PUT_PROGRAM's `reason` read as an int32: local
# days of reports); then the data of the last PUT_PROGRAM (the definition
# the server prices by)
PROGRAM = struct.Struct("<Iqqi")
MAX_UTC_OFFSET = 1439  # minutes either way: less than a day
# account: one value per account, varint-coded because account pages are
# what a durable commit mostly writes (a smaller value is fewer pages per
# batch). Unsigned LEB128 (u) and zigzag (z) varints, in this order:
#   program u, status u, n_lots u, n_holds u, next_lot u, next_hold u,
#   balance z, debt z, held z, earned z, spent z, expired z, opened_at z,
#   tier u (0: none),
#   n_days u, then that many visit days: the local days (aggregates) on
#     which the member's receipts were, newest first, at most VISIT_DAYS
#     (the first as is, each next as its distance back from the one before;
#     what the "regular customer" discount counts),
#   lots (sorted by expires_at, lot_no): lot_no u, partner u, remaining z,
#     expires_at u as the delta from the previous lot's (the first from 0),
#     expires_at - activates_at u,
#     issued_hour u: the UTC hour (time // HOUR, 0 before 1970) of the
#       operation that issued its points (EARN, a capture's earn, an ADJUST
#       credit); a TRANSFER's new lots keep their source lot's, points a
#       refund gives back go to their own lot, which keeps its hour,
#   holds (by hold_no): hold_no u, amount z, expires_at z,
#   then, only once a coupon was ever issued to the member (so every other
#   account's value ends with its holds):
#   next_coupon u (the number of the next coupon, from 2), n_coupons u,
#   coupons (by number): number u, state u (CouponState), value z,
#     usable_from z, expires_at z. Open ones, and the ones closed since a
#     coupon was last issued or reopened.
# card: account, status
CARD = struct.Struct("<QB")
# operation: digest(16), kind, hold state, code, program, account, a, b,
# money, spent, earned, earned_lot, hold_no, refunded_money, returned,
# clawed, partner, store, n_consumed, n_data; then consumed lots, then the
# operation's data (empty for OPEN_ACCOUNT and SET_PROFILE: see OP)
OPERATION = struct.Struct("<16sBBHIQqqqqqIIqqqIIHH")
# consumed lot: lot_no, partner, amount, activates_at, expires_at,
# issued_hour (so that a refund recreating the lot restores its cohort)
CONSUMED = struct.Struct("<IIqqqI")
# journal entry: seq, type, sys kind, program, partner, partner2, version,
# store (0 for what no store did: expiry, timeouts), time, business_time,
# debit, credit, amount, amount2, ref, len(op_id), len(data); then op_id,
# data, and the 32-byte BLAKE2b chain hash
ENTRY = struct.Struct("<QBB2xIIIIIqqQQqqQHH")
HASH_SIZE = 32
DIGEST_SIZE = 16
# meta head: last seq, its hash
HEAD = struct.Struct("<Q32s")

# profiles: account (BE u64) -> the member's profile, opaque bytes the
# server owns. Stored nowhere else (not in the journal, not in the ops
# record), so that erasing it erases it for good.
# member_index: members found by what they are rather than by id, kept in
# the transaction that changes them; keys big-endian, first byte the kind:
#   0x01 tier: program u32, tier u16, account u64 -> b"" for every member
#     whose tier is not 0 (SET_TIER moves it), so a period's close finds
#     the members holding a tier without reading every account;
#   0x02 birthday: program u32, month * 100 + day u16, account u64 -> b"";
#   0x03 birthday of: account u64 -> month * 100 + day (u16, little-endian),
#     so a profile write finds the 0x02 key it replaces.
# bonus_counters: account u64 (big-endian) + the counter's name (AWARD and
# VISIT `key`) -> COUNTER_VALUE: count (what counted: awards, visits) and
# awards (those that earned points); a fold of the BONUS entries, which the
# audit replays.
DATABASES = (b"meta", b"programs", b"accounts", b"externals", b"cards",
             b"ops", b"journal", b"system", b"lot_expiry", b"hold_expiry",
             b"profiles", b"aggregates", b"member_index", b"bonus_counters")
META_HEAD = b"head"
META_NEXT_ACCOUNT = b"next_account"
# The layout version of everything stored (U32, big-endian), written
# when a ledger is created. A change of layout that an existing ledger would
# be misread with (a new record kind that reports rely on, a new field in
# a value) bumps it; a ledger of another format is refused, not misread.
# Ledgers from before the marker have a journal head and no format.
# 1: running totals 0x07/0x08, 16 visit days in the account value.
META_FORMAT = b"format"
LEDGER_FORMAT = 1


def format_problem(path, stored, journal_started):
    """Why the ledger at `path` cannot be opened by this Kopilka, or None.

    `stored`: the meta format value (bytes) or None; `journal_started`:
    whether it has a journal head (a ledger in use)."""
    if stored is None:
        if not journal_started:
            return None   # a new ledger: the caller writes LEDGER_FORMAT
        found = "was written before ledger formats were recorded"
    elif len(stored) != 4:
        found = f"has a damaged format marker ({len(stored)} bytes)"
    elif U32.unpack(stored)[0] == LEDGER_FORMAT:
        return None
    else:
        found = f"is in ledger format {U32.unpack(stored)[0]}"
    return (f"{path} {found}; this Kopilka reads ledger format {LEDGER_FORMAT} "
            f"only. Open it with the Kopilka that wrote it (its journal and "
            f"Feed stay readable there), or start a new data directory")

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
IDX_TIER, IDX_BIRTHDAY, IDX_BIRTHDAY_OF = 1, 2, 3
MEMBER_INDEX_KEY = struct.Struct(">BIHQ")  # kind, program, tier or birthday, account
BIRTHDAY_OF_KEY = struct.Struct(">BQ")
BIRTHDAY_VALUE = struct.Struct("<H")
COUNTER_VALUE = struct.Struct("<qq")
DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # 29 Feb is one
EXPIRY_KEY = struct.Struct(">QQ")  # expires_at, account
SYSTEM_KEY = struct.Struct(">IBI")  # program, kind, partner
I64 = struct.Struct("<q")


# aggregates: what reports need, kept by every commit as a pure fold of the
# journal entries it appends (plus each member's tier at the time, from
# TIER_SET entries), so that no report scans the journal; `audit` rebuilds
# it (core/aggregates.py). Keys big-endian, first byte the row kind; hour =
# entry time // HOUR (UTC); day = (entry time + program UTC offset) // DAY,
# the program's local day; times before 1970 count in hour and day 0.
#   0x01 activity: program u32, hour u32, store u32 (0: expiry and hold
#     timeouts), partner u32 (the entry's), tier u16 (the member's) ->
#     ACTIVITY_VALUE, int64s: issued (EARN), spent (SPEND), expired (EXPIRE),
#     adjusted (ADJUST: + credit, - debit), returned (RETURN), clawed
#     (CLAWBACK), receipts (RECEIPT with amount > 0: +1), receipt_money
#     (RECEIPT amount: refunds subtract), new_members (ACCOUNT_OPENED),
#     member_days (a receipt on a local day that had none of the member's
#     before). TRANSFER moves nothing between program and members: not
#     counted, nor are the other events.
#   0x02 settlement: program u32, hour u32, issuing partner u32 (SPEND's and
#     RETURN's partner2: the lot's), redeeming partner u32 (their partner:
#     the receipt's) -> int64 points, SPEND adds and RETURN subtracts; every
#     pair, equal ones too (reports filter).
#   0x03 member day: program u32, day u32, seq u64 (the journal seq of the
#     RECEIPT entry that made it) -> account (u64, little-endian like every
#     value): the member had a receipt with amount > 0 that day, and this
#     was their first of the day (the account's last_day says so, so one row
#     per member and day). Keyed by seq so that a day's rows are appended
#     in the order they happen, not scattered over the day's pages.
#   0x04 cohort: program u32, issue hour u32 (the lots' issued_hour),
#     partner u32 (the partner that issued them) -> COHORT_VALUE, int64s:
#     issued (EARN, ADJUST credit: new lots), spent (SPEND's named lots;
#     RETURN's named lots subtract), expired (EXPIRE), clawed (a CLAWBACK's
#     named lot). Outstanding = issued - spent - expired - clawed. Debt
#     repaid from lots, a CLAWBACK's part from the balance and an ADJUST
#     debit take points from lots without counting here (see the postings
#     above), so outstanding is at least what the cohort's lots hold; the
#     audit checks that. A TRANSFER changes no cohort.
#   0x05 member month: program u32, month u32 (year * 100 + month of the
#     entry's local day, as member days count them: by operation time, so
#     a month once past never changes), account u64 -> MEMBER_MONTH_VALUE,
#     int64s: money (RECEIPT amounts: refunds subtract) and receipts
#     (RECEIPT with amount > 0). What a tier period's close reads: the
#     net spend of each member with a receipt (or refund) in the period.
#   0x06 coupons: program u32, hour u32, store u32 (0: expiry, merges and
#     what no store did), partner u32 (the entry's) -> COUPON_AGG_VALUE,
#     int64s in pairs, a count then money (minor units): issued
#     (COUPON_ISSUED how COUPON_EARNED; money its value), redeemed
#     (COUPON_CLOSED REDEEMED; the money it took off), expired (EXPIRED; its
#     value), revoked (REVOKED; its value), given back (COUPON_ISSUED how
#     COUPON_GIVEN_BACK; its value: open again, while what it took off
#     stays in redeemed), displaced (DISPLACED; its value). A coupon a merge
#     moves (COUPON_CLOSED MOVED and COUPON_ISSUED COUPON_MOVED) is the same
#     coupon going on elsewhere: not counted.
#   Running totals: rows without an hour, so a report about a moment T
#   reads the total now and subtracts what the hourly rows say happened
#   after T (the time since T), never every hour from the program's start:
#   0x07 members: program u32 -> int64 members enrolled (ACCOUNT_OPENED:
#     +1), ever: the sum of new_members over every 0x01 row of the program.
#   0x08 settled: program u32, issuing partner u32, redeeming partner u32
#     -> int64 points: the sum of that pair's 0x02 rows over every hour
#     (SPEND adds, RETURN subtracts; equal partners too).
#   Folded with the rows they sum, by the same entries, in the same write
#   transaction; the audit rebuilds them like any other row. A ledger
#   written before they existed has no format marker (LEDGER_FORMAT 1 came
#   with them), so this build refuses to open it rather than misread it.
# A row exists once an entry counted in it, whatever its values since.
# Counter overflow rejects the operation (OVERFLOW), as anywhere else.
AGG_ACTIVITY, AGG_SETTLEMENT, AGG_MEMBER_DAY, AGG_COHORT = 1, 2, 3, 4
AGG_MEMBER_MONTH = 5
AGG_COUPONS = 6
AGG_MEMBERS, AGG_SETTLED = 7, 8
ACTIVITY_KEY = struct.Struct(">BIIIIH")
ACTIVITY_VALUE = struct.Struct("<10q")
SETTLEMENT_KEY = struct.Struct(">BIIII")
MEMBER_DAY_KEY = struct.Struct(">BIIQ")
MEMBER_DAY_VALUE = struct.Struct("<Q")
COHORT_KEY = struct.Struct(">BIII")
COHORT_VALUE = struct.Struct("<4q")
MEMBER_MONTH_KEY = struct.Struct(">BIIQ")
MEMBER_MONTH_VALUE = struct.Struct("<2q")
COUPON_AGG_KEY = struct.Struct(">BIIII")
COUPON_AGG_VALUE = struct.Struct("<12q")
MEMBERS_KEY = struct.Struct(">BI")
SETTLED_KEY = struct.Struct(">BIII")
HOUR = 3_600_000_000      # microseconds
DAY = 86_400_000_000
MINUTE = 60_000_000


def external_key(program, external_id):
    return U32.pack(program) + external_id


class MapFullError(Exception):
    """The LMDB map is full: the whole batch was refused, nothing written.

    Reopen the ledger with a larger map_size and retry the batch."""


class LedgerError(Exception):
    """LMDB refused an operation for a reason other than a full map."""
