"""The group-commit writer over a real ledger: grouping, bounds, deadlines,
whole-batch failures and a draining close."""

import asyncio
import threading

import pytest

from kopilka import kernel
from kopilka.core import twin
from kopilka.core.batch import Batch
from kopilka.core.codec import iter_ops
from kopilka.core.records import Code, MapFullError
from kopilka.servers.writer import DeadlineExceeded, GroupCommitWriter, WriterClosed

T = 1_000_000
IMPLEMENTATIONS = {"twin": twin.Ledger, "kernel": kernel.Ledger}


class Gated:
    """The real ledger, with its first commit held until `release` is set,
    so that requests queue up behind it deterministically."""

    def __init__(self, ledger):
        self.ledger = ledger
        self.batches = []  # operations per commit
        self.entered = threading.Event()
        self.release = threading.Event()

    def apply(self, batch, now):
        self.batches.append(sum(1 for _ in iter_ops(batch)))
        self.entered.set()
        assert self.release.wait(10)
        return self.ledger.apply(batch, now)


@pytest.fixture(params=IMPLEMENTATIONS)
def ledger(request, tmp_path):
    with IMPLEMENTATIONS[request.param](tmp_path, sync=False) as opened:
        setup = Batch().put_program("p", 1)
        for i in range(4):
            setup.open_account(f"a{i}", 1, f"m{i}")
        assert all(r.ok for r in opened.apply(setup, T))
        yield opened


def earn(op_id, account=1, points=10):
    return bytes(Batch().earn(op_id, account, points))


async def held_first_commit(gated, writer, later):
    """Submit one request, wait until its commit is held, then submit
    `later` requests (all queue behind it), then release."""
    first = asyncio.ensure_future(writer.submit(earn("first"), 1))
    await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
    tasks = [asyncio.ensure_future(writer.submit(ops, n)) for ops, n in later]
    await asyncio.sleep(0)  # let every submit reach the queue
    gated.release.set()
    return await first, await asyncio.gather(*tasks, return_exceptions=True)


def test_concurrent_requests_share_one_commit(ledger):
    gated = Gated(ledger)
    writer = GroupCommitWriter(gated, clock=lambda: T + 1)
    try:
        first, rest = asyncio.run(held_first_commit(
            gated, writer, [(earn(f"e{i}", 1 + i % 4), 1) for i in range(200)]))
    finally:
        writer.close()
    assert first[0].ok and all(r[0].ok for r in rest)
    assert gated.batches == [1, 200]  # everything queued went in one commit
    assert sum(ledger.balances(a, T + 1).balance for a in range(1, 5)) == 201 * 10


def test_a_commit_wakes_the_callers_loop_once(ledger):
    """Every caller of a commit is answered in one wake-up of its loop, a
    late one (deadline passed) and a cancelled one included."""
    gated = Gated(ledger)
    writer = GroupCommitWriter(gated, clock=lambda: T + 1)
    wakeups = []

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            wakeups.append(callback)
            return original(callback, *args, **kwargs)
        loop.call_soon_threadsafe = counted
        first = asyncio.ensure_future(writer.submit(earn("first"), 1))
        await loop.run_in_executor(None, gated.entered.wait, 10)
        tasks = [asyncio.ensure_future(writer.submit(earn(f"e{i}"), 1))
                 for i in range(20)]
        late = asyncio.ensure_future(writer.submit(earn("late"), 1, deadline=0.0))
        gone = asyncio.ensure_future(writer.submit(earn("gone"), 1))
        await asyncio.sleep(0)
        gone.cancel()
        wakeups.clear()  # the executor's own
        gated.release.set()
        results = await asyncio.gather(first, *tasks)
        with pytest.raises(DeadlineExceeded):
            await late
        loop.call_soon_threadsafe = original
        return results
    try:
        results = asyncio.run(main())
    finally:
        writer.close()
    assert all(r[0].ok for r in results)
    assert gated.batches == [1, 21]   # "gone" was queued: it is committed
    assert len(wakeups) == 2          # one per commit


def test_batches_are_bounded_and_each_request_gets_its_own_results(ledger):
    gated = Gated(ledger)
    writer = GroupCommitWriter(gated, clock=lambda: T + 1, max_operations=10)
    three = bytes(Batch().earn("x1", 1, 5).spend("x2", 1, 3).spend("x3", 1, 9999))
    try:
        _, rest = asyncio.run(held_first_commit(
            gated, writer, [(earn(f"e{i}"), 1) for i in range(12)] + [(three, 3)]))
    finally:
        writer.close()
    assert gated.batches == [1, 10, 5]  # 12 singles + 3: bounded at 10
    assert [r.code for r in rest[-1]] == [Code.OK, Code.OK, Code.INSUFFICIENT_POINTS]
    assert rest[-1][1].a == 3


def test_a_request_larger_than_the_bound_is_a_batch_of_its_own(ledger):
    gated = Gated(ledger)
    writer = GroupCommitWriter(gated, clock=lambda: T + 1, max_operations=4)
    big = Batch()
    for i in range(6):
        big.earn(f"big{i}", 2, 1)
    chain = bytes(Batch().earn("c1", 3, 5).link().spend("c2", 3, 99))
    try:
        _, rest = asyncio.run(held_first_commit(
            gated, writer, [(earn("s1"), 1), (bytes(big), 6), (earn("s2"), 1),
                            (chain, 2), (earn("s3"), 1)]))
    finally:
        writer.close()
    # whole requests in queue order: the 6 alone, never split; the rest to 4
    assert gated.batches == [1, 1, 6, 4]
    assert [len(r) for r in rest] == [1, 6, 1, 2, 1]
    assert all(r.ok for r in rest[1])
    assert [r.code for r in rest[3]] == [Code.LINKED_FAILED, Code.INSUFFICIENT_POINTS]
    assert ledger.operation(b"c1") is None  # the chain, all or nothing


def test_a_request_past_its_deadline_is_not_applied(ledger):
    clock = {"monotonic": 100.0}
    writer = GroupCommitWriter(ledger, clock=lambda: T + 1,
                               monotonic=lambda: clock["monotonic"])
    head = ledger.head()

    async def main():
        with pytest.raises(DeadlineExceeded):
            await writer.submit(earn("late"), 1, deadline=99.0)
        return await writer.submit(earn("in-time"), 1, deadline=101.0)
    try:
        result = asyncio.run(main())
    finally:
        writer.close()
    assert result[0].ok
    assert ledger.operation(b"late") is None
    assert ledger.head()[0] == head[0] + 1  # only the in-time earn


def test_a_refused_batch_fails_every_request_in_it_and_the_writer_goes_on(ledger):
    class FullOnce:
        def __init__(self):
            self.failed = False

        def apply(self, batch, now):
            if not self.failed:
                self.failed = True
                raise MapFullError("map full")
            return ledger.apply(batch, now)

    writer = GroupCommitWriter(FullOnce(), clock=lambda: T + 1)

    async def main():
        with pytest.raises(MapFullError):
            await writer.submit(earn("refused"), 1)
        return await writer.submit(earn("later"), 1)
    try:
        assert asyncio.run(main())[0].ok
    finally:
        writer.close()
    assert ledger.operation(b"refused") is None


def test_close_applies_what_is_queued_then_refuses(ledger):
    gated = Gated(ledger)
    writer = GroupCommitWriter(gated, clock=lambda: T + 1)

    async def main():
        first = asyncio.ensure_future(writer.submit(earn("first"), 1))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
        queued = asyncio.ensure_future(writer.submit(earn("queued"), 1))
        await asyncio.sleep(0)
        closing = asyncio.get_running_loop().run_in_executor(None, writer.close, 10)
        gated.release.set()
        await closing
        with pytest.raises(WriterClosed):
            await writer.submit(earn("after"), 1)
        return await first, await queued
    first, queued = asyncio.run(main())
    assert first[0].ok and queued[0].ok
    assert ledger.operation(b"queued") is not None
