"""The kernel and its twin, driven with the same random operation sequences,
must give the same results and store the same bytes, with a clean audit.

Sequences draw ids from small pools so that replays, id reuse, blocked cards,
hold timeouts, expiry, debt and refunds of every kind happen often; time
jumps cross activation, expiry and hold timeouts. Operations carry data now
and then (kept with their records, or as a profile), and profiles are set,
deleted and erased with their external ids; tiers change and stay; programs
change their UTC offset (local days of the aggregates) now and then;
members get birthdays (indexed), bonuses counted against limits and visits
counted towards a bonus. The long sequences must produce breakage cohorts
that saw issue, spend, expiry and clawback. Coupons are issued, redeemed,
lapse and are refunded; operations are chained now and then (all or
nothing), chains fail and batches end inside them.
"""

import collections
import random
import tempfile


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kopilka.core import twin
from kopilka import kernel
from kopilka.core.aggregates import CohortCounters, Counters, CouponCounters
from kopilka.core.batch import Batch
from kopilka.core.records import (ACTIVITY_VALUE, AGG_ACTIVITY, AGG_COHORT,
                                  AGG_COUPONS, AGG_MEMBER_DAY, AGG_MEMBER_MONTH,
                                  AGG_MEMBERS, AGG_SETTLED, AGG_SETTLEMENT,
                                  COHORT_VALUE, COUPON_AGG_VALUE,
                                  INT64_MAX, INT64_MIN,
                                  MAX_TIER, NEVER, PROFILE_ERASE,
                                  PROGRAM_ALLOW_DEBT, Kind, Status)

DAY = 86_400_000_000
RECEIPTS = [f"r{i}" for i in range(24)]   # earn, spend, capture: refundable
HOLDS = [f"h{i}" for i in range(6)]
SHARED = [f"s{i}" for i in range(4)]       # reused across kinds: conflicts
CARDS = [f"card{i}" for i in range(5)]
EXTERNALS = ["m1", "m2", "m3"]             # the setup's members' external ids
DATA = [b"", b"", b"", b"", b"d", b"\x00profile", b"p" * 700]
TIERS = [0, 1, 1, 2, 3, MAX_TIER, MAX_TIER + 1, -1, INT64_MAX]
EDGE = [INT64_MAX, INT64_MIN, INT64_MAX - 1, -1, 0]
# PUT_PROGRAM's reason: UTC offsets in minutes as u32, some out of range
OFFSETS = [m & 0xFFFFFFFF for m in (0, 0, 180, -300, 1439, -1439, 1440, -2**31)]
RECEIPT_KINDS = (Kind.EARN, Kind.SPEND, Kind.CAPTURE)
# birthdays (month * 100 + day), some no date; bonus counters' names
BIRTHDAYS = [0, 0, 0, 229, 1231, 101, 1015, 230, 1301, 0x10101, 2**32 - 1]
COUNTERS = ["visits/a", "visits/b", "action/x", "", "c" * 129]
COUPON_KINDS = (Kind.ISSUE_COUPON, Kind.REDEEM_COUPON)

small = st.integers(1, 60)
amounts = st.one_of(*[small] * 8, st.integers(0, 400), st.sampled_from(EDGE))
accounts = st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(0, 5))
offsets = st.integers(-2, 40).map(lambda d: d * DAY // 4)
mostly_zero = st.sampled_from([0, 0, 0, 0, 0, 1, 2])


@st.composite
def operations(draw):
    """One operation's fields, or a marker to repeat an earlier operation."""
    if draw(st.integers(0, 9)) == 0:
        return {"repeat": draw(st.integers(0, 1000))}
    kind = draw(st.sampled_from(list(Kind)))
    pool = (RECEIPTS if kind in RECEIPT_KINDS else HOLDS if kind == Kind.HOLD
            else [f"{kind.name}{i}" for i in range(8)])
    op_id = draw(st.sampled_from(pool + SHARED[:1]))
    if draw(st.integers(0, 40)) == 0:
        op_id = draw(st.sampled_from(["", "x" * 129]))
    key = draw(st.sampled_from(CARDS))
    # references: mostly to an earlier operation of the right kind
    if kind in (Kind.CAPTURE, Kind.VOID):
        key = draw(st.one_of(st.tuples(st.just(Kind.HOLD), st.integers(0, 99)),
                             st.sampled_from(["", "", "nohold", "r1"])))
    elif kind == Kind.REFUND:
        key = draw(st.one_of(*[st.tuples(st.just(Kind.EARN), st.integers(0, 99))] * 3,
                             st.tuples(st.just(Kind.ISSUE_COUPON), st.integers(0, 99)),
                             st.sampled_from(["h0", "nothing", "", "k" * 129])))
    elif kind in COUPON_KINDS:
        key = draw(st.one_of(st.tuples(st.just(Kind.EARN), st.integers(0, 99)),
                             st.sampled_from(["", "", "nothing"])))
    fields = dict(
        kind=kind, op_id=op_id, flags=draw(mostly_zero),
        program=draw(st.sampled_from([1, 1, 2, 0, 3])),
        partner=draw(mostly_zero),
        account=draw(accounts), account2=draw(accounts),
        amount=draw(amounts), amount2=draw(amounts),
        money=draw(st.one_of(*[st.integers(0, 5000)] * 8, st.sampled_from(EDGE))),
        reason=draw(st.integers(0, 3)), store=draw(st.sampled_from([0, 5])),
        activates_at=draw(offsets), expires_at=draw(offsets),
        key=key, key2=draw(st.sampled_from(CARDS)),
        data=draw(st.sampled_from(DATA)),
        link=draw(st.sampled_from([0] * 8 + [1, 1, 2])),
    )
    if kind in (Kind.EARN, Kind.ADJUST, Kind.CAPTURE):
        fields["expires_at"] = draw(st.sampled_from([NEVER, fields["activates_at"] + DAY]))
    if kind == Kind.EARN:
        fields["amount"] = 0
    if kind == Kind.CAPTURE and isinstance(key, tuple) and draw(st.booleans()):
        fields["account"] = 0  # the hold names the account
    if kind == Kind.SPEND:
        fields["amount2"] = 0
    if kind == Kind.REFUND and draw(st.booleans()):
        fields["amount"] = fields["amount2"] = 0
        fields["flags"] = 1  # proportional
    if kind == Kind.SET_ACCOUNT_STATUS:
        fields["amount"] = draw(st.sampled_from(
            [Status.ACTIVE] * 4 + [Status.BLOCKED] * 2 + [Status.CLOSED, 0, 7]))
    if kind == Kind.PUT_PROGRAM:
        fields["flags"] = draw(st.sampled_from([0, PROGRAM_ALLOW_DEBT]))
        fields["reason"] = draw(st.sampled_from(OFFSETS))
    if kind == Kind.SWEEP:
        fields["amount"] = draw(st.sampled_from([1, 2, 100, 0]))
    if kind == Kind.SET_PROFILE:
        fields["flags"] = draw(st.sampled_from([0, 0, PROFILE_ERASE, PROFILE_ERASE, 2]))
        fields["key"] = draw(st.sampled_from(EXTERNALS + ["", "m9", "card1"]))
    if kind == Kind.SET_TIER:
        fields["amount"] = draw(st.sampled_from(TIERS))
    if kind in (Kind.OPEN_ACCOUNT, Kind.SET_PROFILE):
        fields["reason"] = draw(st.sampled_from(BIRTHDAYS))
    if kind in (Kind.AWARD, Kind.VISIT):
        fields["key"] = draw(st.sampled_from(COUNTERS))
        fields["amount"] = draw(st.sampled_from([0, 1, 2, 3, -1]))
        fields["expires_at"] = draw(st.sampled_from([NEVER, fields["activates_at"] + DAY]))
    if kind == Kind.VISIT:
        fields["key2"] = draw(st.one_of(st.tuples(st.just(Kind.EARN), st.integers(0, 99)),
                                        st.sampled_from(["", "nothing", "h0"])))
    if kind == Kind.ISSUE_COUPON:
        fields["flags"] = draw(st.sampled_from([0, 1, 1, 2]))
        fields["business_time"] = draw(offsets)
    if kind == Kind.REDEEM_COUPON:
        fields["amount2"] = draw(st.integers(0, 4))
        fields["business_time"] = draw(offsets)
    if kind == Kind.REFUND and draw(st.integers(0, 3)) == 0:
        fields["amount"] = fields["amount2"] = fields["money"] = fields["flags"] = 0
    return fields


batches = st.lists(st.tuples(st.integers(0, 3 * DAY),
                             st.lists(operations(), min_size=1, max_size=8)),
                   min_size=1, max_size=12)

SETUP = (Batch().put_program("setup-p1", 1, utc_offset_minutes=-600)
         .put_program("setup-p2", 2, flags=PROGRAM_ALLOW_DEBT, utc_offset_minutes=330)
         .open_account("setup-a1", 1, "m1").open_account("setup-a2", 1, "m2")
         .open_account("setup-a3", 2, "m3", data=b"profile-3")
         .link_card("setup-c1", 1, "card0")
         .earn("setup-e1", 1, 100, expires_at=40 * DAY, money=2000)
         .earn("setup-e2", 2, 50, activates_at=2 * DAY, expires_at=30 * DAY)
         .earn("setup-e3", 3, 70, expires_at=10 * DAY))


def build(ops, base, history):
    """A batch from drawn fields; `history` holds earlier ops for repeats."""
    batch = Batch()
    for f in ops:
        if "repeat" in f:
            if not history:
                continue
            f = history[f["repeat"] % len(history)]
        else:
            f = dict(f)
            for name in ("key", "key2"):
                if isinstance(f.get(name), tuple):
                    kinds = {Kind.EARN: RECEIPT_KINDS, Kind.HOLD: (Kind.HOLD,),
                             Kind.ISSUE_COUPON: COUPON_KINDS}[f[name][0]]
                    earlier = [h["op_id"] for h in history if h["kind"] in kinds]
                    f[name] = earlier[f[name][1] % len(earlier)] if earlier else "none"
            for name in ("activates_at", "expires_at", "business_time"):
                if f.get(name, 0) != NEVER and name in f:
                    f[name] = max(0, base + f[name])
            history.append(f)
        fields = dict(f)
        link = fields.pop("link", 0)
        batch.add(fields.pop("kind"), fields.pop("op_id"), **fields)
        if link:
            set_link(batch, link)
    return batch


def set_link(batch, link):
    """Sets the last operation's `link` byte (LINKED, or a bad bit)."""
    batch.link()
    if link != 1:
        batch._buffer[batch._last + 5] = link


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches)
def test_kernel_matches_twin(steps):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        left = twin.Ledger(a, sync=False)
        right = kernel.Ledger(b, sync=False)
        try:
            now, history = DAY, []
            assert left.apply(SETUP, now).codes() == right.apply(SETUP, now).codes()
            for delta, ops in steps:
                now += delta
                batch = build(ops, now, history)
                expected, got = list(left.apply(batch, now)), list(right.apply(batch, now))
                assert got == expected, (now, ops)
            assert left.dump() == right.dump()
            assert left.audit() == []
            assert right.audit() == []
        finally:
            left.close()
            right.close()


def random_operation(rng, history):
    """One operation with a realistic mix: mostly valid, references to
    operations applied earlier (`history`), some edge values and garbage."""
    kind = rng.choices(list(Kind),
                       weights=[1, 3, 1, 2, 1, 1, 12, 6, 6, 6, 3, 6, 3, 3, 2, 2, 2,
                                5, 6, 3, 4])[0]
    receipts = [h["op_id"] for h in history if h["kind"] in RECEIPT_KINDS]
    coupon_ops = [h["op_id"] for h in history if h["kind"] in COUPON_KINDS]
    holds = [h["op_id"] for h in history if h["kind"] == Kind.HOLD]
    edge = rng.random() < 0.03
    points = rng.choice(EDGE) if edge else rng.randint(1, 80)
    f = dict(kind=kind, op_id=f"{kind.name}-{rng.getrandbits(48)}", flags=0,
             program=rng.choice([1, 1, 1, 2, 3]), partner=rng.choice([0, 0, 1]),
             account=rng.choice([1, 1, 2, 2, 3, 4, 5, 9]),
             account2=rng.choice([1, 2, 3, 4, 5]), amount=0, amount2=0,
             money=rng.randint(0, 5000), reason=0, activates_at=0,
             expires_at=NEVER, key=rng.choice(CARDS), key2=rng.choice(CARDS),
             store=rng.choice([0, 1, 42]), lane=rng.randint(0, 3))
    lot_times = dict(activates_at=rng.choice([0, 0, rng.randint(0, 4 * DAY)]),
                     expires_at=rng.choice([NEVER, rng.randint(1, 20 * DAY)]))
    if kind == Kind.PUT_PROGRAM:
        f.update(flags=rng.choice([0, PROGRAM_ALLOW_DEBT]), reason=rng.choice(OFFSETS))
    elif kind == Kind.SET_ACCOUNT_STATUS:
        f["amount"] = rng.choice([1, 1, 1, 2, 2, 3, 9])
    elif kind == Kind.EARN:
        f.update(amount2=points, **lot_times)
    elif kind == Kind.SPEND:
        f.update(amount=points)
    elif kind == Kind.HOLD:
        f.update(amount=points, expires_at=rng.choice([0, rng.randint(1, 6 * DAY)]))
    elif kind == Kind.CAPTURE:
        f.update(amount=rng.randint(0, 60), amount2=rng.choice([0, points]),
                 money=rng.choice([0, f["money"]]), **lot_times)
        if holds and rng.random() < 0.8:
            f.update(key=rng.choice(holds), account=rng.choice([0, 0, f["account"]]))
        else:
            f["key"] = ""
    elif kind == Kind.VOID:
        f["key"] = rng.choice(holds) if holds and rng.random() < 0.9 else "nohold"
    elif kind == Kind.REFUND and coupon_ops and rng.random() < 0.2:
        f.update(key=rng.choice(coupon_ops), money=0,  # revoke, give back, or
                 flags=rng.choice([0, 0, 0, 2]))         # (a redemption's) note
    elif kind == Kind.REFUND:
        f["key"] = rng.choice(receipts) if receipts and rng.random() < 0.9 else "none"
        if rng.random() < 0.5:
            f.update(flags=1, money=rng.randint(0, 3000))
        else:
            f.update(amount=rng.randint(0, 40), amount2=rng.randint(0, 40),
                     money=rng.randint(0, 1000))
    elif kind == Kind.ADJUST:
        negated = -points if points != INT64_MIN else points  # -INT64_MIN is no int64
        f.update(amount=rng.choice([points, negated]), reason=rng.randint(1, 5), **lot_times)
    elif kind == Kind.TRANSFER:
        if rng.random() < 0.3:  # a merge, one coupon kept or every one moved
            f["flags"] = rng.choice([1, 3, 3, 2])
        else:
            f["amount"] = points
    elif kind == Kind.SWEEP:
        f["amount"] = rng.choice([1, 3, 1000])
    elif kind == Kind.SET_PROFILE:
        if rng.random() < 0.3:  # erase: the member's own external id, mostly
            own = EXTERNALS[f["account"] - 1] if f["account"] <= 3 else ""
            f.update(flags=PROFILE_ERASE, data=b"",
                     key=rng.choice([own] * 4 + EXTERNALS + CARDS + [""]))
        else:
            f.update(flags=rng.choice([0, 0, 0, 2]),
                     data=rng.choice([b"", rng.randbytes(rng.randint(1, 400))]))
    elif kind == Kind.SET_TIER:
        f["amount"] = rng.choice(TIERS[:5] + TIERS)
    elif kind in (Kind.AWARD, Kind.VISIT):
        f.update(key=rng.choice(COUNTERS[:3] * 5 + COUNTERS), amount2=points,
                 amount=rng.choice([0, 1, 2, 3, 3, 5]), money=0, **lot_times)
        if kind == Kind.VISIT:
            f.update(account=rng.choice([0, 0, 0, f["account"]]),
                     key2=rng.choice(receipts) if receipts and rng.random() < 0.9
                     else rng.choice(["none", ""] + holds[:1]))
    elif kind == Kind.ISSUE_COUPON:  # windows relative to now, like lots
        f.update(amount=rng.choice([1_000, 10_000, points]), flags=rng.choice([0, 1, 1]),
                 activates_at=rng.choice([0, rng.randint(DAY, 4 * DAY)]),
                 expires_at=rng.randint(1, 20 * DAY), business_time=rng.randint(-DAY, 0),
                 key=_receipt_of(rng, history, f["account"]))
    elif kind == Kind.REDEEM_COUPON:
        issued = [h["_number"] for h in history[-40:] if "_number" in h
                  and h["account"] == f["account"]]
        f.update(amount=rng.choice([1, 500, 10_000, points]),
                 amount2=rng.choice(issued) if issued and rng.random() < 0.8
                 else rng.randint(0, 3),
                 business_time=rng.randint(-DAY, 3 * DAY),
                 key=_receipt_of(rng, history, f["account"]))
    if kind in (Kind.OPEN_ACCOUNT, Kind.SET_PROFILE):
        f["reason"] = rng.choice(BIRTHDAYS)
    if kind not in (Kind.SET_PROFILE,) and rng.random() < 0.15:
        f["data"] = rng.randbytes(rng.choice([1, 16, 2000]))
    if rng.random() < 0.08:
        f["link"] = rng.choice([1, 1, 1, 1, 2])
    if kind in (Kind.EARN, Kind.SPEND, Kind.HOLD, Kind.CAPTURE, *COUPON_KINDS) and rng.random() < 0.3:
        f.update(account=rng.choice([0, 0, 1]), key2=rng.choice(CARDS))  # by card
    elif kind not in (Kind.REPLACE_CARD, Kind.VISIT):
        f["key2"] = ""
    if rng.random() < 0.05 and history:  # a retry, or an id reused with another payload
        f = dict(rng.choice(history)) if rng.random() < 0.7 else dict(f, op_id=rng.choice(history)["op_id"])
    return f


def _receipt_of(rng, history, account):
    """What a coupon operation names as its receipt: mostly none, else one
    of the member's receipts, now and then anyone's."""
    if rng.random() < 0.6:
        return ""
    receipts = [h["op_id"] for h in history if h["kind"] in RECEIPT_KINDS
                and (h["account"] == account or rng.random() < 0.1)]
    return rng.choice(receipts) if receipts else ""


SEEDS = range(12)


def label(f, result):
    """The kind's name, told apart for the paths the counts must see."""
    if f["kind"] == Kind.SET_PROFILE and f["flags"] == PROFILE_ERASE and f["key"]:
        return "SET_PROFILE/erase"
    if f["kind"] == Kind.SET_TIER and result.ok and result.a == result.b:
        return "SET_TIER/unchanged"
    if f["kind"] == Kind.VISIT and result.ok and result.a:
        return "VISIT/earned"
    return Kind(f["kind"]).name


def run_sequence(seed, path, codes):
    rng = random.Random(seed)
    left = twin.Ledger(path / "twin", sync=False)
    right = kernel.Ledger(path / "kernel", sync=False)
    try:
        now, history = DAY, []
        assert left.apply(SETUP, now).codes() == right.apply(SETUP, now).codes()
        for step in range(60):
            now += rng.choice([0, 0, DAY // 24, DAY // 2, DAY, 3 * DAY])
            ops = []
            for _ in range(rng.randint(1, 12)):
                f = random_operation(rng, history)
                for name in ("activates_at", "expires_at"):
                    if f[name] != NEVER and not f.get("_abs"):
                        f[name] += now
                if f["kind"] in COUPON_KINDS and not f.get("_abs"):
                    f["business_time"] = max(0, f["business_time"] + now)
                f["_abs"] = True
                ops.append(f)
            batch = Batch()
            for f in ops:
                fields = {k: v for k, v in f.items()
                          if k not in ("kind", "op_id", "_abs", "link", "_number")}
                batch.add(f["kind"], f["op_id"], **fields)
                if f.get("link"):
                    set_link(batch, f["link"])
            expected, got = list(left.apply(batch, now)), list(right.apply(batch, now))
            assert got == expected, f"seed {seed} step {step}"
            codes.update((label(f, r), r.code.name) for f, r in zip(ops, expected))
            for f, r in zip(ops, expected):
                if r.ok and f["kind"] == Kind.ISSUE_COUPON and not r.replayed:
                    f["_number"] = r.a  # for redemptions to name
            history += [f for f, r in zip(ops, expected) if r.ok]
        assert left.dump() == right.dump(), f"seed {seed}"
        assert left.audit() == [] and right.audit() == [], f"seed {seed}"
        return right.dump()["aggregates"]
    finally:
        left.close()
        right.close()


def test_kernel_matches_twin_long_sequences(tmp_path):
    codes = collections.Counter()
    rows = []
    for seed in SEEDS:
        (tmp_path / str(seed)).mkdir()
        rows += run_sequence(seed, tmp_path / str(seed), codes)
    # every kind of aggregate row, settlement between partners, refunds' money
    assert {key[0] for key, _ in rows} == {AGG_ACTIVITY, AGG_SETTLEMENT,
                                           AGG_MEMBER_DAY, AGG_COHORT,
                                           AGG_MEMBER_MONTH, AGG_COUPONS,
                                           AGG_MEMBERS, AGG_SETTLED}
    # coupon rows that saw the fates of coupons (a merge of two members
    # both holding one is rare here: test_ledger_coupons has it)
    coupon_rows = [CouponCounters(*COUPON_AGG_VALUE.unpack(value))
                   for key, value in rows if key[0] == AGG_COUPONS]
    for counter in CouponCounters._fields[:10]:
        assert sum(getattr(c, counter) for c in coupon_rows) > 0, counter
    # breakage cohorts that saw every movement, of more than one partner
    cohorts = [CohortCounters(*COHORT_VALUE.unpack(value))
               for key, value in rows if key[0] == AGG_COHORT]
    for counter in ("issued", "spent", "expired", "clawed"):
        assert sum(getattr(c, counter) > 0 for c in cohorts) >= 3, counter
    assert all(c.outstanding >= 0 for c in cohorts)
    assert len({key[9:13] for key, _ in rows if key[0] == AGG_COHORT}) > 1
    assert any(key[0] == AGG_SETTLEMENT and key[9:13] != key[13:17] for key, _ in rows)
    assert any(key[0] == AGG_SETTLED and key[5:9] != key[9:13] for key, _ in rows)
    assert any(key[0] == AGG_ACTIVITY and Counters(*ACTIVITY_VALUE.unpack(value)).receipt_money < 0
               for key, value in rows)
    # the mix exercised the paths that matter, not only rejections
    for kind in [k.name for k in Kind] + ["SET_PROFILE/erase", "SET_TIER/unchanged",
                                          "VISIT/earned"]:
        assert codes[(kind, "OK")] > 0, (kind, codes)
    for code in ("INSUFFICIENT_POINTS", "HOLD_EXPIRED", "HOLD_CAPTURED", "CARD_BLOCKED",
                 "REFUND_EXCEEDS_ORIGINAL", "OP_ID_REUSED", "TIME_INVALID",
                 "LIMIT_REACHED", "LINKED_FAILED", "LINK_OPEN", "COUPON_HELD",
                 "COUPON_NOT_USABLE", "COUPON_EXPIRED", "COUPON_REDEEMED",
                 "COUPON_NOT_FOUND"):
        assert any(c == code for _, c in codes), code
