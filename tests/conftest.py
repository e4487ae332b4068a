"""Fixtures shared by the ledger tests.

`ledger` runs each test once against each implementation of the ledger
contract: the pure-Python twin (the executable specification) and the Cython
kernel. After every test the ledger must pass its own audit (double entry,
hash chain, gap-free journal, stored balances equal to the journal replayed).

For the kernel, every batch the test applied is also replayed on a fresh twin
and, batch by batch, both must give the same results and store the same
bytes: each scenario of the suite doubles as an equivalence check.
"""

import pytest

from kopilka import kernel
from kopilka.core import twin
from kopilka.core.batch import Batch

IMPLEMENTATIONS = {"twin": twin.Ledger, "kernel": kernel.Ledger}
MAP_SIZE = 1 << 28


@pytest.fixture(params=list(IMPLEMENTATIONS), ids=list(IMPLEMENTATIONS))
def ledger(request, tmp_path):
    opened = IMPLEMENTATIONS[request.param](
        tmp_path / request.param, map_size=MAP_SIZE, sync=False)
    applied = []  # (batch bytes, now, results, what was stored after it)
    apply = opened.apply

    def recording_apply(batch, now):
        results = apply(batch, now)
        if request.param == "kernel":
            applied.append((bytes(batch), now, list(results), opened.dump()))
        return results

    opened.apply = recording_apply
    try:
        yield opened
        assert opened.audit() == [], "audit found problems"
        if request.param == "kernel":
            _compare_with_twin(opened, applied, tmp_path / "reference-twin")
    finally:
        opened.close()


def _compare_with_twin(opened, applied, path):
    with twin.Ledger(path, map_size=MAP_SIZE, sync=False) as reference:
        for number, (batch, now, results, dump) in enumerate(applied):
            expected = list(reference.apply(batch, now))
            assert results == expected, (
                f"batch {number} (now={now}): kernel {results}, twin {expected}")
            assert dump == reference.dump(), (
                f"batch {number} (now={now}): kernel and twin store different bytes")


@pytest.fixture(params=list(IMPLEMENTATIONS), ids=list(IMPLEMENTATIONS))
def ledger_class(request):
    """The implementation itself, for tests that open and close ledgers."""
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def open_program(ledger):
    """open_program(program=1, members=2, flags=0, now=0) -> member account ids.

    Puts the program and opens `members` accounts in it, one batch."""

    def open_program(program=1, members=2, *, flags=0, now=0):
        batch = Batch().put_program(f"program-{program}-{flags}", program,
                                    flags=flags)
        for i in range(members):
            batch.open_account(f"open-{program}-{i}", program,
                               f"member-{program}-{i}")
        results = list(ledger.apply(batch, now))
        assert all(r.ok for r in results), results
        return [r.a for r in results[1:]]

    return open_program
