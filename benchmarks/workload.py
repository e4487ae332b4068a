"""The operations every ledger of the comparison applies: one stream, many
systems.

A stream deals ledger operations the way tills do: earn (a receipt that
earns points), spend (points paying for a receipt that earns nothing),
capture (spend and earn on one receipt, one operation) and refund (the whole
of an earlier receipt of this stream: its spent points given back, its
earned points taken back). Every operation carries a POS-style idempotency
key, unique in the run, which every system checks and stores.

Accounts are 1..N (the populations open them in that order). Spread: every
operation picks its account uniformly. Hot: 10% of operations hit accounts
1..100, the rest are spread (a refund follows its receipt's account).

Amounts follow the example program's version 3, which the server prices:
10 points per 100 rubles of money paid, the whole receipt payable by points
(1 point = 1 ruble = 100 kopecks). A spend is at most half the receipt,
so no discount of the program's can bring the receipt below it.
"""

import random
from collections import deque
from dataclasses import dataclass

EARN, SPEND, CAPTURE, REFUND = "earn", "spend", "capture", "refund"
KINDS = (EARN, SPEND, CAPTURE, REFUND)
MIX = ((EARN, 35), (SPEND, 20), (CAPTURE, 35), (REFUND, 10))
HOT_SHARE, HOT_ACCOUNTS = 0.10, 100
STORE, LANES = 42, (1, 2, 3)   # the example program's store 42


@dataclass(frozen=True, slots=True)
class Op:
    kind: str
    op_id: str
    account: int
    money: int        # kopecks: the receipt's (a refund: the original's)
    spend: int        # points spent (a refund: points given back)
    earn: int         # points earned (a refund: points taken back)
    lane: int
    original: str = ""   # a refund's receipt


def earned(money):
    """Points a receipt of `money` kopecks earns: 10 per 100 rubles."""
    return money // 1_000


class Stream:
    """A deterministic stream of operations for one client of one run.

    `take(n)` deals the next n; a refund only names a receipt dealt by an
    earlier `take`, so whichever way a system applies one take (one batch,
    or one by one) the receipt it refunds is already durable."""

    def __init__(self, accounts, *, hot=False, run="r", client=0, seed=0):
        self.accounts, self.hot = accounts, hot
        self.prefix = f"{run}-{client}"
        self._rng = random.Random(f"{seed}/{run}/{client}/{accounts}/{hot}")
        self._kinds = [k for k, _ in MIX]
        self._weights = [w for _, w in MIX]
        self._seq = 0
        self._refundable = deque(maxlen=10_000)   # receipts of earlier takes
        self._fresh = []                          # receipts of this take

    def _account(self):
        rng = self._rng
        if self.hot and rng.random() < HOT_SHARE:
            return rng.randint(1, min(HOT_ACCOUNTS, self.accounts))
        return rng.randint(1, self.accounts)

    def take(self, n):
        self._refundable.extend(self._fresh)
        self._fresh = []
        return [self._next() for _ in range(n)]

    def _next(self):
        rng = self._rng
        self._seq += 1
        lane = rng.choice(LANES)
        op_id = f"s{STORE}/l{lane}/{self.prefix}-{self._seq}"
        kind = rng.choices(self._kinds, self._weights)[0]
        if kind == REFUND:
            if not self._refundable:
                kind = EARN
            else:
                # Oldest first: a receipt is refunded once.
                original = self._refundable.popleft()
                return Op(REFUND, op_id, original.account, original.money,
                          original.spend, original.earn, lane, original.op_id)
        account = self._account()
        money = rng.randrange(10_000, 500_000)
        if kind == EARN:
            op = Op(EARN, op_id, account, money, 0, earned(money), lane)
        elif kind == SPEND:
            op = Op(SPEND, op_id, account, money,
                    rng.randint(1, min(300, money // 200)), 0, lane)
        else:
            spend = rng.randint(1, min(300, money // 200))
            # Earns on the money paid: the receipt less the points' worth.
            op = Op(CAPTURE, op_id, account, money, spend,
                    earned(money - spend * 100), lane)
        self._fresh.append(op)
        return op
