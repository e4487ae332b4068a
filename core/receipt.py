"""What a checkout hands the pricing engine: the receipt, and the member.

A receipt comes from a POS over the wire, so it is data to be checked, not
trusted: `check_receipt` lists every problem at once, each under its field
path (`lines[3].total`, positions counted from 1 as in program problems),
and the pricing engine refuses to price a receipt with any. The program, on
the other hand, has passed `parse_program` and is trusted as it is.

Quantities are whole units. A line's total must equal quantity x unit price
exactly, because the total is what the engine splits, earns on and refunds:
a POS that sells by weight sends the weighed item as quantity 1 with its
weighed price as the unit price (a partial refund of such a line returns
the whole line). Money is integer minor units, as everywhere in Kopilka.

The member context is what the caller read from the ledger just before
pricing (balance, tier, coupon) plus facts only the CRM knows (newcomer,
regular). The engine decides what they are worth; it never looks them up.
"""

from dataclasses import dataclass

from .program import Problem, format_time, per_version

INT64_MAX = (1 << 63) - 1
DAY = 86_400_000_000  # microseconds
# How far a receipt's business time may run ahead of the server's clock (a
# till's clock drifts); a sale further in the future is a bad receipt.
CLOCK_SKEW = 15 * 60 * 1_000_000


class PricingError(ValueError):
    """Input the pricing engine refuses; `problems` lists every reason, each
    naming its field, so a server can answer INVALID_ARGUMENT with details."""

    what = "input"

    def __init__(self, problems):
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid {self.what} ({len(self.problems)} problems):\n{lines}")


class ReceiptError(PricingError):
    what = "receipt"


class MemberError(PricingError):
    what = "member context"


class SpendError(PricingError):
    """A settlement or refund asked for more, or other, than the receipt allows."""
    what = "request"


@dataclass(frozen=True, slots=True)
class Line:
    number: int              # the POS's line number, unique in the receipt
    sku: str
    category: str            # one of the version's items.categories
    quantity: int            # whole units, > 0
    unit_price: int          # money minor units, >= 0
    total: int               # quantity * unit_price, exactly
    flags: tuple[str, ...] = ()   # from the version's items.flags


@dataclass(frozen=True, slots=True)
class Receipt:
    id: str
    store: int
    lane: int
    business_time: int       # microseconds since the epoch: when the sale happened
    lines: tuple[Line, ...]

    @property
    def total(self):
        return sum(line.total for line in self.lines)


@dataclass(frozen=True, slots=True)
class MemberCoupon:
    """The member's unused coupon, as the caller found it."""
    code: str
    value: int               # money minor units off a purchase
    usable_from: int         # microseconds; usable while
    expires_at: int          # usable_from <= business time < expires_at
    number: int = 0          # the ledger's number of it (REDEEM_COUPON names it)


@dataclass(frozen=True, slots=True)
class Member:
    """The member as the ledger and the CRM see them at checkout.

    `held` is the points already held for this very receipt (its hold is what
    `settle` captures): they are no longer in `available` but still count
    towards what the receipt may spend. `referrer` and `enrolled_at` matter
    only to a referral programme: the referrer earns a share of what this
    member pays within the programme's window after enrolment."""
    available: int = 0
    tier: str | None = None
    newcomer: bool = False   # referred, and this is their first purchase
    regular: bool = False    # a regular customer by the version's definition
    coupon: MemberCoupon | None = None
    held: int = 0
    account: int = 0         # the ledger account, or 0 with `card`
    card: bytes = b""
    referrer: int = 0        # the referrer's account, 0 if none
    enrolled_at: int | None = None


def _int(value):
    return type(value) is int   # bool is not an amount


def check_receipt(receipt, program, now):
    """The version in force at the receipt's business time, or ReceiptError
    listing every problem. Vocabulary is checked against that version.

    Receipts are nearly always good, so a quick pass that can only say
    "good" runs first; anything it doubts goes through the full check,
    which finds and names every problem."""
    version = _quick(receipt, program, now)
    return version if version is not None else _check(receipt, program, now)



@per_version
def _vocabulary(version):
    return frozenset(version.items.categories), frozenset(version.items.flags)


def _quick(receipt, program, now):
    """The version if every check surely passes, else None (no verdict).
    Only ever stricter than `_check`."""
    version = _quick_header(receipt, program, now)
    if version is None:
        return None
    categories, flags = _vocabulary(version)
    return version if _quick_lines(receipt.lines, categories, flags) else None


def _quick_header(receipt, program, now):
    """`_quick` of everything but the lines' own fields: the version, or None.
    The lines are then a non-empty tuple."""
    if type(receipt) is not Receipt:
        return None
    rid, store, lane, t, lines = (receipt.id, receipt.store, receipt.lane,
                                  receipt.business_time, receipt.lines)
    if not (type(rid) is str and rid and not rid.isspace()
            and type(store) is int and store >= 1 and type(lane) is int and lane >= 1
            and type(t) is int and t <= now + CLOCK_SKEW
            and type(lines) is tuple and lines):
        return None
    if program.stores:
        known = program.store.get(store)
        if known is None or lane not in known.lanes:
            return None
    try:
        return program.version_at(t)
    except LookupError:
        return None


def quick_lines(lines, categories, flags):
    """True if every line (of a non-empty tuple) surely passes `_check`:
    the per-line part of `_quick`. `_pricing.quick_lines` is its compiled
    twin, used when built."""
    numbers = set()
    total = 0
    for line in lines:
        if type(line) is not Line:
            return False
        number, q, p, amount, sku, f = (line.number, line.quantity, line.unit_price,
                                        line.total, line.sku, line.flags)
        if not (type(number) is int and number >= 1 and number not in numbers
                and type(q) is int and type(p) is int and type(amount) is int
                and 0 < q <= INT64_MAX and 0 <= p <= INT64_MAX
                and amount == q * p and amount <= INT64_MAX
                and type(sku) is str and sku and not sku.isspace()
                and type(line.category) is str and line.category in categories
                and type(f) is tuple):
            return False
        if f:
            try:
                if not (flags.issuperset(f) and len(set(f)) == len(f)):
                    return False
            except TypeError:   # an unhashable flag: the full check names it
                return False
        numbers.add(number)
        total += amount
    return total <= INT64_MAX


try:
    from . import _pricing
except ImportError:   # not built: the pure-Python twin does it all
    _pricing = None
    _quick_lines = quick_lines
else:
    _pricing.bind(Line=Line)
    _quick_lines = _pricing.quick_lines


def _check(receipt, program, now):
    problems = []

    def fail(path, reason):
        problems.append(Problem(path, reason))

    if not isinstance(receipt, Receipt):
        raise ReceiptError([Problem("", f"must be a Receipt, not {type(receipt).__name__}")])
    if not isinstance(receipt.id, str) or not receipt.id.strip():
        fail("id", "must be a non-empty string")
    store = None
    if not _int(receipt.store) or receipt.store < 1:
        fail("store", "must be a positive integer")
    elif program.stores:
        store = program.store.get(receipt.store)
        if store is None:
            fail("store", f"unknown store {receipt.store}: not among the program's stores")
    if not _int(receipt.lane) or receipt.lane < 1:
        fail("lane", "must be a positive integer")
    elif store is not None and receipt.lane not in store.lanes:
        fail("lane", f"unknown lane {receipt.lane} of store {store.id}")

    version = None
    t = receipt.business_time
    if not _int(t):
        fail("business_time", "must be integer microseconds since the epoch")
    elif t > now + CLOCK_SKEW:
        fail("business_time", f"is in the future: {format_time(t, program.time_zone)}, "
                              f"now is {format_time(now, program.time_zone)}")
    else:
        try:
            version = program.version_at(t)
        except LookupError as e:
            fail("business_time", str(e))

    lines = receipt.lines
    if not isinstance(lines, (tuple, list)):
        fail("lines", "must be a sequence of Line")
        raise ReceiptError(problems)
    if not lines:
        fail("lines", "a receipt needs at least one line")
    categories = flags = None
    if version is not None:
        categories, flags = set(version.items.categories), set(version.items.flags)
    seen, total = {}, 0
    for k, line in enumerate(lines, 1):
        at = f"lines[{k}]"
        if not isinstance(line, Line):
            fail(at, f"must be a Line, not {type(line).__name__}")
            continue
        if not _int(line.number) or line.number < 1:
            fail(f"{at}.number", "must be a positive integer")
        elif line.number in seen:
            fail(f"{at}.number", f"duplicate line number {line.number} "
                                 f"(also lines[{seen[line.number]}])")
        else:
            seen[line.number] = k
        if not isinstance(line.sku, str) or not line.sku.strip():
            fail(f"{at}.sku", "must be a non-empty string")
        if not isinstance(line.category, str):
            fail(f"{at}.category", "must be a string")
        elif categories is not None and line.category not in categories:
            fail(f"{at}.category", f"unknown category '{line.category}': not in "
                                   f"items.categories of version {version.number}")
        good = True
        for name, low in (("quantity", 1), ("unit_price", 0), ("total", 0)):
            value = getattr(line, name)
            if not _int(value):
                fail(f"{at}.{name}", "must be an integer"
                     + (" (whole units)" if name == "quantity" else " (money minor units)"))
                good = False
            elif value < low:
                fail(f"{at}.{name}", "must be positive; a return is a refund of the "
                                     "original receipt" if low else "must not be negative")
                good = False
            elif value > INT64_MAX:
                fail(f"{at}.{name}", "is too large")
                good = False
        if good:
            if line.total != line.quantity * line.unit_price:
                fail(f"{at}.total", f"is {line.total} but quantity {line.quantity} x "
                                    f"unit_price {line.unit_price} is "
                                    f"{line.quantity * line.unit_price}")
            total += line.total
        if not isinstance(line.flags, (tuple, list)):
            fail(f"{at}.flags", "must be a tuple of flag names")
            continue
        named = set()
        for f, flag in enumerate(line.flags, 1):
            if not isinstance(flag, str):
                fail(f"{at}.flags[{f}]", "must be a string")
            elif flag in named:
                fail(f"{at}.flags[{f}]", f"duplicate flag '{flag}'")
            elif flags is not None and flag not in flags:
                fail(f"{at}.flags[{f}]", f"unknown flag '{flag}': not in "
                                         f"items.flags of version {version.number}")
            named.add(flag)
    if total > INT64_MAX:
        fail("lines", "the receipt's total is too large")
    if problems:
        raise ReceiptError(problems)
    return version


def member_fine(m):
    """True if `check_member` surely passes (its quick pass)."""
    if type(m) is not Member:
        return False
    a, h, account, referrer, c = m.available, m.held, m.account, m.referrer, m.coupon
    if not (type(a) is int and a >= 0 and type(h) is int and h >= 0
            and type(account) is int and account >= 0
            and type(referrer) is int and referrer >= 0
            and (m.tier is None or type(m.tier) is str)
            and (m.enrolled_at is None or type(m.enrolled_at) is int)
            and type(m.card) in (bytes, str)):
        return False
    return c is None or (type(c) is MemberCoupon and type(c.value) is int and c.value >= 1
                         and type(c.usable_from) is int and type(c.expires_at) is int
                         and type(c.number) is int and c.number >= 0)


def check_member(member):
    """MemberError unless the context is usable (amounts whole, not negative)."""
    if member_fine(member):
        return
    problems = []
    if not isinstance(member, Member):
        raise MemberError([Problem("", f"must be a Member, not {type(member).__name__}")])
    for name in ("available", "held", "account", "referrer"):
        value = getattr(member, name)
        if not _int(value) or value < 0:
            problems.append(Problem(name, "must be an integer, not negative"))
    if member.tier is not None and not isinstance(member.tier, str):
        problems.append(Problem("tier", "must be a tier name or None"))
    if member.enrolled_at is not None and not _int(member.enrolled_at):
        problems.append(Problem("enrolled_at", "must be integer microseconds or None"))
    if not isinstance(member.card, (bytes, str)):
        problems.append(Problem("card", "must be bytes"))
    c = member.coupon
    if c is not None:
        if not isinstance(c, MemberCoupon):
            problems.append(Problem("coupon", "must be a MemberCoupon or None"))
        else:
            if not _int(c.value) or c.value < 1:
                problems.append(Problem("coupon.value", "must be a positive integer"))
            if not _int(c.usable_from) or not _int(c.expires_at):
                problems.append(Problem("coupon", "times must be integer microseconds"))
            if not _int(c.number) or c.number < 0:
                problems.append(Problem("coupon.number", "must be an integer, not negative"))
    if problems:
        raise MemberError(problems)
