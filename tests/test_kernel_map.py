"""The kernel's map (MDB_WRITEMAP, the default): LMDB writes its pages in
place, so the data file must never have a hole under the map (a write into a
hole the disk cannot fill is a SIGBUS, not an error). The file is allocated
ahead of the map, which grows with the data up to the configured map size and
moves when it does; snapshots and scans held across a move read on."""

import os

import pytest

from kopilka import kernel
from kopilka.core.batch import Batch
from kopilka.core.records import MapFullError

MEMBERS = 200


def setup(ledger):
    batch = Batch().put_program("p", 1)
    for a in range(MEMBERS):
        batch.open_account(f"a{a}", 1, f"m{a}")
    assert all(r.ok for r in ledger.apply(batch, 1))


def earns(n, count=1000):
    batch = Batch()
    for i in range(count):
        batch.earn(f"b{n}/e{i}", 1 + i % MEMBERS, 1, money=100)
    return batch


def data_file(path):
    return os.stat(os.path.join(path, "data.mdb"))


def assert_allocated(ledger, path):
    """The file is the map, every byte of it allocated, the data inside."""
    info, st = ledger.info(), data_file(path)
    assert st.st_size == info["mapped"] <= info["map_size"]
    assert st.st_blocks * 512 >= st.st_size, "a hole under the map"
    assert info["used"] <= info["mapped"]


def test_the_file_is_allocated_as_the_map_grows_to_its_limit(tmp_path):
    limit = 12 << 20
    with kernel.Ledger(tmp_path, map_size=limit, sync=False, writemap=True) as ledger:
        assert ledger.info()["writemap"]
        assert ledger.info()["mapped"] < limit      # it starts small
        assert_allocated(ledger, tmp_path)
        setup(ledger)
        n = 0
        with pytest.raises(MapFullError):
            while True:
                n += 1
                before = ledger.head()
                assert all(r.ok for r in ledger.apply(earns(n), 10 + n))
                assert_allocated(ledger, tmp_path)
        info = ledger.info()
        assert info["mapped"] == limit and info["remaps"] >= 3
        assert ledger.head() == before              # the refused batch left nothing
        assert ledger.operation(f"b{n}/e0".encode()) is None
        assert ledger.audit() == []
    with kernel.Ledger(tmp_path, map_size=2 * limit, sync=False, writemap=True) as ledger:
        assert_allocated(ledger, tmp_path)
        assert all(r.ok for r in ledger.apply(earns(n), 10 + n))    # room again
        assert_allocated(ledger, tmp_path)
        assert ledger.audit() == []
        grown = ledger.info()["mapped"]
    with kernel.Ledger(tmp_path, map_size=4 * limit, sync=False, writemap=True) as ledger:
        assert ledger.info()["mapped"] == grown     # reopened: what it had, no more
        assert_allocated(ledger, tmp_path)


def test_a_scan_held_while_the_map_moves_reads_on(tmp_path):
    with kernel.Ledger(tmp_path, map_size=1 << 30, sync=False, writemap=True) as ledger:
        setup(ledger)
        ledger.apply(earns(0), 10)
        expected = ledger.dump()
        snapshot = ledger._env.read()
        rows = snapshot.scan("journal")
        seen = [next(rows) for _ in range(300)]
        remaps, n = ledger.info()["remaps"], 0
        while ledger.info()["remaps"] < remaps + 2:
            n += 1
            ledger.apply(earns(n), 10 + n)
        seen += list(rows)
        snapshot.close()
        assert seen == expected["journal"]


def test_without_writemap_the_map_is_the_configured_size(tmp_path):
    with kernel.Ledger(tmp_path, map_size=64 << 20, sync=False, writemap=False) as ledger:
        setup(ledger)
        ledger.apply(earns(1), 10)
        info = ledger.info()
        assert not info["writemap"] and info["mapped"] == 64 << 20
        assert ledger.audit() == []
    with kernel.Ledger(tmp_path, map_size=64 << 20, sync=False, writemap=True) as ledger:  # and back
        assert ledger.apply(earns(2), 11)[0].ok
        assert_allocated(ledger, tmp_path)
        assert ledger.audit() == []


def test_a_compacting_copy_after_growth_is_the_same_ledger(tmp_path):
    with kernel.Ledger(tmp_path / "live", map_size=1 << 30, sync=False, writemap=True) as ledger:
        setup(ledger)
        for n in range(4):
            ledger.apply(earns(n), 10 + n)
        assert ledger.info()["remaps"] >= 1
        (tmp_path / "copy").mkdir()
        ledger.copy(tmp_path / "copy")
        live = ledger.dump()
    assert data_file(tmp_path / "copy").st_size < data_file(tmp_path / "live").st_size
    with kernel.Ledger(tmp_path / "copy", sync=False, writemap=True) as copy:
        assert copy.dump() == live and copy.audit() == []
        assert_allocated(copy, tmp_path / "copy")
