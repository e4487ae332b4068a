"""Promise 2: no double spend. Many connections at once on the same three
members: holds, captures (of holds, and straight spends), voids, refunds
and Posts racing each other over the same holds and receipts, debits by
hand, and merges (transfers of every point) into them.

Every answer showing balances must show nothing below zero (the example
program allows no debt) and no hold over-committing; at the end every open
hold is covered by active points, the audit is clean, and the state equals a
sequential replay: every operation the server committed, applied one by one
in commit order to a fresh pure-Python twin, gives the same results and the
same bytes in every database.
"""

import os
import random
import threading
from collections import Counter

import grpc

from kopilka.core import twin
from kopilka.core.codec import iter_ops
from kopilka.core.records import LINKED
from kopilka.v1 import (admin_pb2, admin_pb2_grpc, checkout_pb2, checkout_pb2_grpc,
                        common_pb2, members_pb2, members_pb2_grpc)

from server_harness import (RunningServer, error_info, install_program, open_member,
                            reason_of)

from .conftest import SUMMARIES

LONG = os.environ.get("KOPILKA_TORTURE") == "long"
WAIT = 30
LANE = "stores/42/lanes/1"
CARDS = ["7700000000000001", "7700000000000002", "7700000000000003"]
# Refusals a race may rightly end in; anything else fails the test.
EXPECTED = {"INSUFFICIENT_POINTS", "HOLD_CAPTURED", "HOLD_VOIDED", "HOLD_NOT_FOUND",
            "NOT_REFUNDABLE", "REFUND_EXCEEDS_ORIGINAL", "SPEND_ABOVE_LIMIT",
            "CAPTURE_EXCEEDS_HOLD", "TOO_MANY_HOLDS", "MEMBER_HAS_OPEN_HOLDS",
            "SPEND_BELOW_MINIMUM"}


def chains(batch):
    """A batch's operations one chain at a time (records.py: a chain of
    linked operations applies all or nothing; an unlinked one is its own)."""
    chain = b""
    for op in iter_ops(batch):
        chain += op.raw
        if not op.link & LINKED:
            yield chain
            chain = b""
    if chain:
        yield chain


class Recorder:
    """Stands in for the writer's ledger: every batch it commits, with its
    time and results, in commit order."""

    def __init__(self, ledger):
        self._ledger = ledger
        self.commits = []

    def apply(self, batch, now):
        results = self._ledger.apply(batch, now)
        self.commits.append((bytes(batch), now, results.raw))
        return results

    def __getattr__(self, name):
        return getattr(self._ledger, name)


class Till:
    def __init__(self, srv, shared, rng, number):
        self.rng, self.shared, self.n = rng, shared, number
        self.clock = srv.clock
        channel = srv.channel()
        token = (("authorization", f"Bearer {srv.tokens['admin']}"),)
        self.checkout = checkout_pb2_grpc.CheckoutStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.members = members_pb2_grpc.MembersStub(channel)
        self.metadata = token
        self.outcomes = []
        self.violations = []
        self.unexpected = []     # (request type, message) of refusals not in EXPECTED
        self._i = 0

    def _id(self, kind):
        self._i += 1
        return f"t{self.n}/{kind}{self._i}"

    def call(self, stub_method, request):
        try:
            response = stub_method(request, metadata=self.metadata, timeout=WAIT)
        except grpc.RpcError as err:
            code, reason, _ = error_info(err)
            self.outcomes.append(reason or code)
            if (reason or code) not in EXPECTED:
                self.unexpected.append((type(request).__name__, err.details()))
            return None
        self.outcomes.append("OK")
        self.check(response)
        return response

    def check(self, response):
        for part in _with_balances(response):
            b = part.balances
            if (b.available_points < 0 or b.debt_points != 0 or b.held_points < 0
                    or b.held_points > b.balance_points):
                self.violations.append(str(b))

    def receipt(self, money):
        out = checkout_pb2.Receipt(receipt_id=self._id("receipt"))
        out.business_time.FromMicroseconds(self.clock.now)
        price = common_pb2.Money(currency_code="RUB", minor_units=money)
        out.lines.add(line_number=1, sku="sku", category="groceries", quantity=1,
                      unit_price=price, total=price)
        return out

    def step(self):
        rng, shared = self.rng, self.shared
        card = rng.choice(CARDS)
        r = rng.random()
        if r < 0.3:
            request = checkout_pb2.HoldRequest(operation_id=self._id("h"), lane=LANE,
                                               card_number=card,
                                               points=rng.randint(1, 400))
            if self.call(self.checkout.Hold, request):
                shared["holds"].append((request.operation_id, card, request.points))
        elif r < 0.55 and shared["holds"]:
            hold, card, points = rng.choice(shared["holds"])
            if rng.random() < 0.7:
                self.capture(card, hold, rng.randint(0, points))
            else:
                self.call(self.checkout.Void, checkout_pb2.VoidRequest(
                    operation_id=self._id("v"), lane=LANE, hold_operation_id=hold))
        elif r < 0.7:
            self.capture(card, "", rng.randint(0, 300))
        elif r < 0.8 and shared["captures"]:
            self.call(self.checkout.Refund, checkout_pb2.RefundRequest(
                operation_id=self._id("r"), lane=LANE,
                original_operation_id=rng.choice(shared["captures"]), whole_receipt=True))
        elif r < 0.88:
            holds = [checkout_pb2.PostOperation(hold=checkout_pb2.HoldRequest(
                operation_id=self._id("ph"), lane=LANE, card_number=rng.choice(CARDS),
                points=rng.randint(1, 300))) for _ in range(rng.randint(2, 6))]
            answer = self.call(self.checkout.Post, checkout_pb2.PostRequest(
                operations=holds))
            for op, result in zip(holds, answer.results if answer else ()):
                self.outcomes.append(reason_of(result.status) or "OK")
                if result.status.code == 0:
                    shared["holds"].append((op.hold.operation_id, op.hold.card_number,
                                            op.hold.points))
        elif r < 0.94:
            credit = rng.random() < 0.6        # credits keep the members spending
            self.call(self.admin.Adjust, admin_pb2.AdjustRequest(
                operation_id=self._id("a"), member=shared["names"][card],
                points=rng.randint(1, 2_000) if credit else -rng.randint(1, 300),
                reason=common_pb2.ADJUSTMENT_REASON_GOODWILL if credit
                else common_pb2.ADJUSTMENT_REASON_FRAUD))
        elif shared["donors"]:
            donor = shared["donors"].pop()
            self.call(self.members.MergeMembers, members_pb2.MergeMembersRequest(
                operation_id=self._id("m"), name=shared["names"][card], source=donor))

    def capture(self, card, hold, spend):
        request = checkout_pb2.CaptureRequest(
            operation_id=self._id("c"), lane=LANE, card_number=card,
            receipt=self.receipt(spend * 100 + self.rng.randint(1, 3000) * 100),
            spend_points=spend, hold_operation_id=hold)
        if self.call(self.checkout.Capture, request):
            self.shared["captures"].append(request.operation_id)


def _with_balances(response):
    parts = ([getattr(r, r.WhichOneof("result")) for r in response.results
              if r.WhichOneof("result")] if hasattr(response, "results") else [response])
    return [p for p in parts
            if "balances" in p.DESCRIPTOR.fields_by_name and p.HasField("balances")]


def test_racing_checkouts_never_double_spend_and_equal_a_sequential_replay(tmp_path):
    seed = int(os.environ.get("KOPILKA_TORTURE_SEED", random.SystemRandom().randrange(1 << 32)))
    tills, steps = (16, 150) if LONG else (12, 40)
    srv = RunningServer(tmp_path / "data")
    recorder = srv.server.writer._ledger = Recorder(srv.server.writer._ledger)
    try:
        install_program(srv)
        accounts = [open_member(srv, 1, f"shared{i}", card=card, points=10_000)
                    for i, card in enumerate(CARDS)]
        donors = [open_member(srv, 1, f"donor{i}", points=500) for i in range(tills)]
        shared = {"holds": [], "captures": [],
                  "names": {c: f"programs/1/members/{a}" for c, a in zip(CARDS, accounts)},
                  "donors": [f"programs/1/members/{d}" for d in donors]}
        workers = [Till(srv, shared, random.Random(seed * 100 + n), n)
                   for n in range(tills)]
        start = threading.Barrier(tills)

        def work(till):
            start.wait()
            for _ in range(steps):
                till.step()
        threads = [threading.Thread(target=work, args=(t,)) for t in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        ledger = srv.server.ledger
        now = srv.clock.now
        for account in accounts:
            state = ledger.account(account)
            active = sum(lot.remaining for lot in state.lots
                         if lot.activates_at <= now < lot.expires_at)
            assert sum(h.amount for h in state.holds) <= active, account
            assert min([lot.remaining for lot in state.lots] or [0]) >= 0
            assert state.debt == 0
        assert ledger.audit() == []
        live = ledger.dump()
    finally:
        srv.stop()
    outcomes = [o for t in workers for o in t.outcomes]
    unexpected = {o for o in outcomes if o != "OK"} - EXPECTED
    assert not unexpected, (seed, [u for t in workers for u in t.unexpected][:5])
    assert [v for t in workers for v in t.violations] == [], seed
    assert outcomes.count("OK") > len(outcomes) // 4, (seed, Counter(outcomes))

    sequential = twin.Ledger(tmp_path / "replay", map_size=256 << 20, sync=False)
    try:
        for raw, now, results in recorder.commits:
            got = b"".join(sequential.apply(chain, now).raw for chain in chains(raw))
            assert got == results, seed
        assert sequential.dump() == live, seed
    finally:
        sequential.close()
    operations = sum(len(list(iter_ops(raw))) for raw, _, _ in recorder.commits)
    SUMMARIES.append(("torture: racing checkouts on three members", [
        f"seed {seed}, {tills} connections x {steps} steps",
        f"answers: {dict(Counter(outcomes).most_common())}",
        f"{len(recorder.commits)} commits of {operations} operations replayed one by "
        "one: same results, same bytes; nothing below zero, no hold over-committed"]))
