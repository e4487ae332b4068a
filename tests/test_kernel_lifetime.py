"""The kernel's Python-facing objects against LMDB's lifetime rules: no
transaction outlives its environment, nothing is closed under a batch, and a
damaged record is an error, never a read past its end."""

import threading
import time

import lmdb
import pytest

from kopilka import kernel
from kopilka.core.batch import Batch
from kopilka.core.codec import Operation
from kopilka.core.records import LedgerError


@pytest.fixture
def ledger(tmp_path):
    opened = kernel.Ledger(tmp_path, sync=False)
    opened.apply(Batch().put_program("p", 1).open_account("a", 1, "m")
                 .earn("e", 1, 100).spend("s", 1, 10), 1)
    yield opened
    opened.close()


def test_closing_the_ledger_ends_open_snapshots(ledger):
    snapshot = ledger._env.read()
    rows = snapshot.scan("journal")
    next(rows)
    ledger.close()
    with pytest.raises(LedgerError):
        snapshot.get("meta", b"head")
    with pytest.raises(LedgerError):
        next(rows)
    snapshot.close()  # harmless now


def test_a_scan_outliving_its_snapshot_stops(ledger):
    snapshot = ledger._env.read()
    rows = snapshot.scan("journal")
    next(rows)
    snapshot.close()
    with pytest.raises(LedgerError):
        list(rows)
    assert ledger.audit() == []


def test_the_ledger_is_not_closed_under_a_running_batch(ledger):
    setup = Batch()
    for a in range(2, 52):
        setup.open_account(f"a{a}", 1, f"m{a}")
    ledger.apply(setup, 1)
    batch = Batch()
    for i in range(50_000):
        batch.earn(f"big/{i}", 2 + i % 50, 1)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (ledger.apply(batch, 2), done.set()))
    worker.start()
    deadline = time.monotonic() + 10
    while not ledger._env.busy and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.001)  # until the batch is inside LMDB
    assert ledger._env.busy, "the batch finished before the test could try"
    with pytest.raises(LedgerError, match="applying a batch"):
        ledger.close()
    worker.join()
    assert done.is_set()  # the batch finished and was applied
    assert ledger.balances(2, 3).balance == 1_000 and ledger.audit() == []


def test_a_damaged_operation_record_is_an_error_not_a_crash(ledger, tmp_path):
    ledger.close()
    env = lmdb.open(str(tmp_path), max_dbs=16)
    ops = env.open_db(b"ops")
    with env.begin(write=True, db=ops) as txn:
        record = Operation.decode(txn.get(b"s"))
        txn.put(b"s", record.encode()[:-32] + bytes(8))  # lost its consumed lot
    env.close()
    with kernel.Ledger(tmp_path, sync=False) as reopened:
        head = reopened.head()
        with pytest.raises(LedgerError, match="MDB_CORRUPTED"):
            reopened.apply(Batch().refund("r", "s", give_back=5), 3)
        assert reopened.head() == head  # the batch was refused whole


def test_one_environment_is_opened_once_per_process(ledger, tmp_path):
    with pytest.raises(LedgerError, match="already open"):
        kernel.Ledger(tmp_path / ".." / tmp_path.name)
    ledger.close()
    with kernel.Ledger(tmp_path) as again:  # closed: may be opened anew
        assert again.audit() == []
