"""The kernel's account decoding (kopilka.kernel reads accounts with it):
the same Account as core.codec decodes, for any account value; a damaged
value is refused, never read as another account."""

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from kopilka.core.codec import Account, Coupon, Hold, Lot
from kopilka.core.records import MAX_COUPONS, VISIT_DAYS
from kopilka.core.reads import balances_of
from kopilka.kernel._ledger import account_of, balance_figures_of

I64 = st.integers(-(1 << 55), 1 << 55)  # sums of a few stay in int64
U32 = st.integers(0, (1 << 32) - 1)
TIME = st.integers(0, 1 << 60)


@st.composite
def accounts(draw):
    lots = []
    for expires_at in sorted(draw(st.lists(TIME, max_size=12))):
        lots.append(Lot(draw(U32), draw(U32), draw(I64),
                        expires_at - draw(st.integers(0, expires_at)), expires_at,
                        draw(U32)))
    holds = [Hold(n, draw(I64), draw(I64))
             for n in range(1, draw(st.integers(0, 5)) + 1)]
    days = sorted(draw(st.lists(st.integers(0, 60_000), max_size=VISIT_DAYS,
                                unique=True)), reverse=True)
    coupons = [Coupon(n, draw(st.integers(0, 3)), draw(I64), draw(I64), draw(I64))
               for n in range(1, draw(st.integers(0, MAX_COUPONS)) + 1)]
    return Account(draw(U32), draw(st.integers(0, 3)), len(lots) + 1, len(holds) + 1,
                   *(draw(I64) for _ in range(7)), draw(st.integers(0, 9)), days,
                   lots, holds, len(coupons) + 1 if coupons else draw(
                       st.sampled_from([1])), coupons)


@settings(max_examples=300, deadline=None)
@given(accounts())
def test_the_kernel_decodes_every_account_as_the_codec_does(account):
    raw = account.encode()
    assert account_of(raw) == Account.decode(raw) == account


@settings(max_examples=300, deadline=None)
@given(accounts(), st.data())
def test_a_damaged_account_value_is_refused_as_the_codec_refuses_it(account, data):
    raw = account.encode()
    cut = raw[:data.draw(st.integers(0, len(raw) - 1))]
    padded = raw + b"\x01"
    for damaged in (cut, padded):
        try:
            expected = Account.decode(damaged)
        except (ValueError, IndexError):
            with pytest.raises(ValueError):
                account_of(damaged)
        else:
            assert account_of(damaged) == expected


@settings(max_examples=300, deadline=None)
@given(accounts(), TIME)
def test_the_kernels_balances_are_the_codecs(account, now):
    b = balances_of(7, account, now)
    assert balance_figures_of(account.encode(), now) == (
        b.program, b.status, b.available, b.pending, b.held, b.balance, b.debt,
        b.earned, b.spent, b.expired, b.tier)
