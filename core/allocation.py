"""Splitting a receipt's figures over its lines, and refunding lines exactly.

Every figure a receipt settles with (discount, points spent, points earned,
money paid, a referrer's share) is an integer total. Lines need their own
integer shares of it, so that a return of line 3 next week reverses exactly
line 3's part, and returning every line reverses exactly the whole. Rounding
each line's share on its own would make the shares sum to a little more or
less than the total; `split` uses the largest-remainder method instead:
every line gets the floor of its proportional share, and the units left over
go to the lines with the largest remainders (ties to the earlier line), so
the shares always sum to the total and each differs from its exact
proportion by less than one unit.

A partial return (2 of 5 units of a line) takes the same care on the running
total: after r of Q units have come back, the line has returned
floor(share x r / Q) in all, so repeated partial returns never add up to
more than the line's share, and the last unit returns exactly what is left.
This is the kernel's own discipline for proportional refunds; the per-line
figures are what make it exact per line rather than per receipt.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .program import Problem
from .receipt import SpendError


def split(total, weights, weight_sum=None):
    """`total` in integer shares proportional to `weights` (non-negative
    integers), summing to `total` exactly; all zeros if every weight is 0."""
    if weight_sum is None:
        weight_sum = sum(weights)
    if not total or not weight_sum:
        return [0] * len(weights)
    if total == weight_sum:
        return list(weights)
    shares = [total * w // weight_sum for w in weights]
    left = total - sum(shares)
    if left:
        remainders = [total * w - s * weight_sum for w, s in zip(weights, shares)]
        # a stable sort: equal remainders keep receipt order
        ranked = sorted(range(len(weights)), key=remainders.__getitem__, reverse=True)
        for i in ranked[:left]:
            shares[i] += 1
    return shares


class LineShare(NamedTuple):
    """One line's part of a settled receipt (points and money minor units)."""
    number: int
    quantity: int
    discount: int    # money off the line (discounts and coupon)
    spent: int       # points that paid for part of the line
    earned: int      # points the line earned
    paid: int        # money the customer paid for the line
    referral: int    # points the referrer earned on the line


@dataclass(frozen=True)
class Allocation:
    """What a refund of a settled receipt needs; the caller stores it with
    the receipt. `capture` and `referral_op` are the operation ids a kernel
    REFUND names (`referral_op` is None when no referrer earned)."""
    capture: str
    referral_op: str | None
    version: int
    lines: tuple[LineShare, ...]

    @property
    def spent(self):
        return sum(s.spent for s in self.lines)

    @property
    def earned(self):
        return sum(s.earned for s in self.lines)

    @property
    def paid(self):
        return sum(s.paid for s in self.lines)

    @property
    def referral(self):
        return sum(s.referral for s in self.lines)

    def to_dict(self):
        """Plain data, for storing; `Allocation.from_dict(a.to_dict()) == a`."""
        return {"capture": self.capture, "referral_op": self.referral_op,
                "version": self.version, "lines": [s._asdict() for s in self.lines]}

    @classmethod
    def from_dict(cls, data):
        return cls(data["capture"], data["referral_op"], data["version"],
                   tuple(LineShare(**s) for s in data["lines"]))


class Refund(NamedTuple):
    """Amounts for the kernel's explicit REFUND of the capture: spent points
    to give back, earned points to claw back, and money to refund."""
    give_back: int
    claw_back: int
    money: int

    @property
    def empty(self):
        """Nothing to refund; the kernel refuses an all-zero REFUND."""
        return not (self.give_back or self.claw_back or self.money)


def _pairs(returns, what):
    items = returns.items() if isinstance(returns, Mapping) else returns
    out = {}
    for pair in items:
        number, quantity = pair
        if number in out:
            raise SpendError([Problem(f"{what}[{number}]", "line named twice")])
        out[number] = quantity
    return out


def _portions(allocation, returns, already):
    """(share, before, after, quantity) per returned line, after checking
    every returned line and quantity; SpendError naming each problem."""
    returns = _pairs(returns, "returns")
    already = _pairs(already or {}, "already")
    lines = {s.number: s for s in allocation.lines}
    problems = []
    for number, done in already.items():
        share = lines.get(number)
        if share is None or type(done) is not int or not 0 <= done <= share.quantity:
            problems.append(Problem(f"already[{number}]", "must be a line of the "
                                    "receipt and a quantity from 0 to the line's"))
    portions = []
    for number, quantity in returns.items():
        at = f"returns[{number}]"
        share = lines.get(number)
        if share is None:
            problems.append(Problem(at, f"line {number} is not on the receipt"))
            continue
        if type(quantity) is not int or quantity < 1:
            problems.append(Problem(at, "quantity must be a positive integer"))
            continue
        before = already.get(number, 0)
        if type(before) is int and before + quantity > share.quantity:
            problems.append(Problem(at, f"returns {quantity} of line {number}, but only "
                                        f"{share.quantity - before} of its "
                                        f"{share.quantity} are left to return"))
            continue
        portions.append((share, before, before + quantity))
    if problems:
        raise SpendError(problems)
    return portions


def _reverse(portions, field):
    total = 0
    for share, before, after in portions:
        value, q = getattr(share, field), share.quantity
        total += value * after // q - value * before // q
    return total


def refund_lines(allocation, returns, already=None):
    """The Refund for returning `returns` ({line number: units}, or pairs)
    when `already` ({line number: units}) were returned before.

    Each line gives back its own share pro rata on its running total, so
    returning every unit of every line, in any order and any steps, refunds
    exactly the settled totals and never more."""
    portions = _portions(allocation, returns, already)
    return Refund(_reverse(portions, "spent"), _reverse(portions, "earned"),
                  _reverse(portions, "paid"))


def refund_referral(allocation, returns, already=None):
    """Points to claw back from the referrer's EARN (`allocation.referral_op`)
    for the same return, on the same running totals as `refund_lines`."""
    return _reverse(_portions(allocation, returns, already), "referral")
