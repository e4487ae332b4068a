"""Faults: a process killed mid-batch, and a full LMDB map."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kopilka import kernel
from kopilka.core import twin
from kopilka.core.batch import Batch
from kopilka.core.records import MapFullError

IMPLEMENTATIONS = {"twin": twin.Ledger, "kernel": kernel.Ledger}

# The child prints "ack N" only after batch N's apply() returned, i.e. after
# its commit is durable; then it starts the next batch at once.
OPS = 1000
CHILD = f"OPS = {OPS}\n" + textwrap.dedent("""
    import sys
    from kopilka import kernel
    from kopilka.core import twin
    from kopilka.core.batch import Batch
    Ledger = {"twin": twin.Ledger, "kernel": kernel.Ledger}[sys.argv[1]]
    ledger = Ledger(sys.argv[2], map_size=1 << 30)
    start = int(sys.argv[3])
    if start == 0:
        setup = Batch().put_program("p", 1)
        for a in range(50):
            setup.open_account(f"a{a}", 1, f"m{a}")
        ledger.apply(setup, 1)
    n = start
    while True:
        n += 1
        batch = Batch()
        for i in range(OPS):
            batch.earn(f"b{n}/e{i}", 1 + i % 50, 1 + i % 7, money=100)
        ledger.apply(batch, 1000 + n)
        print("ack", n, flush=True)
""")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sigkill_mid_batch_keeps_every_acknowledged_commit(impl, tmp_path):
    path = str(tmp_path / "ledger")
    acked = 0
    for kill in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, impl, path, str(acked)],
                                 stdout=subprocess.PIPE, text=True)
        # kill after a few acknowledged batches, while the next one is applying
        for _ in range(2 + kill):
            line = child.stdout.readline()
            assert line.startswith("ack"), line
            acked = int(line.split()[1])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        leftover = child.stdout.read().split()
        if leftover:  # acks printed before the kill landed still count
            acked = int(leftover[-1])
        child.stdout.close()
        with IMPLEMENTATIONS[impl](path) as ledger:
            assert ledger.audit() == []
            for n in range(1, acked + 1):
                assert ledger.operation(f"b{n}/e{OPS - 1}".encode()) is not None, n
            points = sum(1 + i % 7 for i in range(OPS))
            # every acknowledged batch is in; at most the one in flight more
            balance = sum(ledger.balances(a, 10**9).balance for a in range(1, 51))
            assert balance in (acked * points, (acked + 1) * points)
            if balance == (acked + 1) * points:
                acked += 1  # committed, but killed before it could say so


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_full_map_refuses_the_whole_batch_and_keeps_serving(impl, tmp_path):
    path = tmp_path / "ledger"
    Ledger = IMPLEMENTATIONS[impl]
    small = 256 * 1024
    with Ledger(path, map_size=small, sync=False) as ledger:
        ledger.apply(Batch().put_program("p", 1).open_account("a", 1, "m"), 1)
        n = 0
        with pytest.raises(MapFullError):
            while True:
                n += 1
                batch = Batch()
                for i in range(200):
                    batch.earn(f"b{n}/e{i}", 1, 1, money=100)
                before = ledger.head()
                ledger.apply(batch, 10 + n)
        # the refused batch left nothing; what was committed is intact
        assert ledger.head() == before
        assert ledger.operation(f"b{n}/e0".encode()) is None
        assert ledger.balances(1, 100).balance == (n - 1) * 200
        assert ledger.audit() == []
    with Ledger(path, map_size=small * 8, sync=False) as ledger:  # enlarged
        result = ledger.apply(Batch().earn("after", 1, 5), 10_000)
        assert result[0].ok
        assert ledger.balances(1, 10_001).balance == (n - 1) * 200 + 5
        assert ledger.audit() == []


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_compacting_copy_is_the_same_ledger(impl, tmp_path):
    Ledger = IMPLEMENTATIONS[impl]
    with Ledger(tmp_path / "live", sync=False) as ledger:
        batch = Batch().put_program("p", 1).open_account("a", 1, "m")
        for i in range(300):
            batch.earn(f"e{i}", 1, 1 + i % 5, money=100)
        ledger.apply(batch, 1)
        (tmp_path / "copy").mkdir()
        ledger.copy(tmp_path / "copy")
        live = ledger.dump()
    with Ledger(tmp_path / "copy") as copy:
        assert copy.dump() == live
        assert copy.audit() == []
