"""Reports whose figures depend on everything before their interval (the
members enrolled before it; each partner's settlement position), over a
program with a past of months, on a real server. They are reckoned from
running totals and what happened since (servers/reports.py); the figures
must be those of a sum from the program's start.

The history (UTC; the program of test_server_reports, Moscow time, point
value 100, then 50 from 2 January 2026 Moscow):

    2025-03-01 10:00  enrol A, B, C
                      A earns 1000 at store 42 (partner 1)
                      B earns 500 at store 77 (partner 2)
    2025-06-01 10:00  A spends 400 at store 77: partner 1's points at partner 2
                      B spends 100 at store 42: partner 2's points at partner 1
    2025-09-01 10:00  enrol D; 100 of A's spend given back at store 77
    2026-01-01 10:00  enrol E
                      A spends 200 at store 77, B 50 at store 42
                      D earns 300 at store 43 (partner 1)
    2026-01-02 10:00  enrol F; A spends 100 at store 77
                      E earns 40 at store 77 (partner 2)
"""

import lmdb
import pytest
from kopilka import kernel
from kopilka.core.batch import Batch
from kopilka.core.records import AGG_ACTIVITY, AGG_SETTLEMENT, U32
from kopilka.servers import reports
from test_server_reports import (BY_DAY, PARTNER, apply, at, enrol, feed, key,
                                 points, request, serve)


def build_history(srv):
    a, b, c = (enrol(srv, "2025-03-01T10:00", name) for name in "abc")
    apply(srv, "2025-03-01T10:00", Batch()
          .earn("a-earn", a, 1000, money=2_000_000, store=42, lane=1, partner=1)
          .earn("b-earn", b, 500, money=1_000_000, store=77, lane=1, partner=2))
    apply(srv, "2025-06-01T10:00", Batch()
          .spend("a-spend1", a, 400, money=800_000, store=77, lane=1, partner=2)
          .spend("b-spend1", b, 100, money=200_000, store=42, lane=1, partner=1))
    d = enrol(srv, "2025-09-01T10:00", "d")
    apply(srv, "2025-09-01T10:00", Batch()
          .refund("a-refund", "a-spend1", money=200_000, give_back=100, store=77,
                  lane=1))
    e = enrol(srv, "2026-01-01T10:00", "e")
    apply(srv, "2026-01-01T10:00", Batch()
          .spend("a-spend2", a, 200, money=400_000, store=77, lane=1, partner=2)
          .spend("b-spend2", b, 50, money=100_000, store=42, lane=1, partner=1)
          .earn("d-earn", d, 300, money=600_000, store=43, lane=1, partner=1))
    enrol(srv, "2026-01-02T10:00", "f")
    apply(srv, "2026-01-02T10:00", Batch()
          .spend("a-spend3", a, 100, money=200_000, store=77, lane=1, partner=2)
          .earn("e-earn", e, 40, money=80_000, store=77, lane=1, partner=2))
    return a, b, c, d, e


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = serve(tmp_path_factory, build_history)
    yield server
    server.stop()


def members(srv, start, end, by=()):
    r = feed(srv).GetActiveMembersReport(request(
        "GetActiveMembersReportRequest", start, end, by=by))
    return [(key(row), row.active_members, row.new_members, row.total_members)
            for row in r.rows]


def test_members_enrolled_months_before_the_interval_are_counted(srv):
    day = ("2026-01-01T00:00+03:00", "2026-01-02T00:00+03:00")
    # A, B, C and D enrolled months before; E that day; A, B and D came
    assert members(srv, *day) == [((), 3, 1, 5)]
    assert members(srv, *day, by=[BY_DAY]) == [(("2026-01-01",), 3, 1, 5)]
    # long before: A, B and C, enrolled three months earlier, and no one since
    assert members(srv, "2025-06-01T00:00+03:00", "2025-06-02T00:00+03:00") == [
        ((), 2, 0, 3)]
    # an interval after everything: every member, none active
    assert members(srv, "2026-01-05T00:00+03:00", "2026-01-06T00:00+03:00") == [
        ((), 0, 0, 6)]


def by_partner(srv, start, end, by=(PARTNER,)):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest", start, end, by=by))
    return [(key(row), points(row)) for row in r.rows]


def test_partner_positions_count_spending_across_partners_before_and_within(srv):
    # at the end of 1 January: partner 1 issued A's 1000 (400 - 100 + 200
    # spent at partner 2) and D's 300; partner 2 issued B's 500 (100 + 50
    # spent at partner 1); A's 100 and E's 40 on 2 January come after
    p1, p2 = "programs/1/partners/1", "programs/1/partners/2"
    assert by_partner(srv, "2026-01-01T00:00", "2026-01-02T00:00") == [
        ((p1,), (300, 50, 0, 0, 0, 0, 800, 800 * 50)),
        ((p2,), (0, 200, 0, 0, 0, 0, 350, 350 * 50)),
    ]
    assert by_partner(srv, "2026-01-01T00:00", "2026-01-02T00:00",
                      by=(PARTNER, BY_DAY)) == [
        ((p1, "2026-01-01"), (300, 50, 0, 0, 0, 0, 800, 800 * 100)),
        ((p2, "2026-01-01"), (0, 200, 0, 0, 0, 0, 350, 350 * 100)),
    ]
    # the day of the first spending across partners
    assert by_partner(srv, "2025-06-01T00:00", "2025-06-02T00:00") == [
        ((p1,), (0, 100, 0, 0, 0, 0, 600, 600 * 100)),
        ((p2,), (0, 400, 0, 0, 0, 0, 400, 400 * 100)),
    ]
    # A's 100 given back at partner 2: booked there, partner 1's points
    assert by_partner(srv, "2025-09-01T00:00", "2025-09-02T00:00") == [
        ((p2,), (0, 0, 0, 0, 100, 0, 400, 400 * 100))]
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                          "2026-01-02T00:00", "2026-01-03T00:00"))
    assert points(r.rows[0])[6] == 1090   # A 400, B 350, D 300, E 40


BOUNDS = ("2025-02-28", "2025-03-01", "2025-03-02", "2025-06-01", "2025-06-02",
          "2025-09-01", "2025-09-02", "2026-01-01", "2026-01-02", "2026-01-03",
          "2026-01-04")
HOUR = 3_600_000_000


def test_every_interval_agrees_with_sums_from_the_program_start(srv):
    """Intervals between days around every event, each figure against sums
    of the hourly rows from hour 0 (no expiry, debt or clawback here, so a
    partner's outstanding points are what it issued less what of them was
    spent, net of returns, wherever)."""
    ledger = srv.server.ledger

    def enrolled(end):
        return sum(c.new_members for *_, c in ledger.activity(1, 0, end // HOUR))

    def outstanding(partner, end):
        hour = end // HOUR
        return (sum(c.issued for _, _, p, _, c in ledger.activity(1, 0, hour)
                    if p == partner)
                - sum(points for _, issuing, _, points in ledger.settlement(1, 0, hour)
                      if issuing == partner))

    def day_end(row_key):   # the end of a Moscow day (members' days too: UTC+3)
        return at(f"{row_key[-1]}T00:00+03:00") + 24 * HOUR

    checked = 0
    for i, first in enumerate(BOUNDS):
        for last in BOUNDS[i + 1:]:
            start, end = f"{first}T00:00+03:00", f"{last}T00:00+03:00"
            assert [row[3] for row in members(srv, start, end)] == [enrolled(at(end))]
            for row in members(srv, start, end, by=[BY_DAY]):
                assert row[3] == enrolled(day_end(row[0]))
            for row_key, figures in by_partner(srv, first, last):
                assert figures[6] == outstanding(int(row_key[0][-1]), at(last))
                checked += 1
            for row_key, figures in by_partner(srv, first, last, by=(PARTNER, BY_DAY)):
                when = min(day_end(row_key), at(last))
                assert figures[6] == outstanding(int(row_key[0][-1]), when)
                checked += 1
    assert checked > 100


def test_an_interval_reads_nothing_from_before_it(srv, tmp_path):
    """A copy of the ledger without the hourly activity and settlement rows
    of the months before 1 January 2026 reports that day and the next as
    the ledger does: they start from running totals and take off what
    happened since, and add up nothing of the past."""
    srv.server.ledger.copy(tmp_path)
    first = at("2026-01-01T00:00+03:00") // HOUR   # the members' day starts
    env = lmdb.open(str(tmp_path), max_dbs=16)
    with env.begin(write=True, db=env.open_db(b"aggregates")) as txn:
        past = [key for key, _ in txn.cursor()
                if key[0] in (AGG_ACTIVITY, AGG_SETTLEMENT)
                and U32.unpack_from(key, 5)[0] < first]
        for key in past:
            txn.delete(key)
    env.close()
    assert len(past) == 7 + 3   # activity rows of 3 days, settlement of 2
    program = srv.server.registry.get(1).program
    cases = [("active_members", "2026-01-01T00:00+03:00", "2026-01-02T00:00+03:00", dims)
             for dims in ((), (reports.Dimension.DAY,))]
    cases += [("points", start, end, dims)
              for start, end in (("2026-01-01T00:00", "2026-01-02T00:00"),
                                 ("2026-01-02T00:00", "2026-01-03T00:00"))
              for dims in ((), (reports.Dimension.PARTNER,),
                           (reports.Dimension.PARTNER, reports.Dimension.DAY))]
    with kernel.Ledger(tmp_path, sync=False) as copy:
        for report, start, end, dims in cases:
            q = reports.Query(1, program, at(start), at(end), dims)
            rows = reports.gather(copy, report, q)[0]
            assert rows and rows == reports.gather(srv.server.ledger, report, q)[0]
