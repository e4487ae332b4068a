"""The Feed's reports end to end: a real server on a loopback port, a small
history written through the ledger (enrolments, receipts at several stores
of two partners, a hold captured, refunds, an expiry, adjustments, tiers
renamed by a new version, a local midnight in Moscow that is not UTC's),
and every report's figures checked exactly, as an integration reads them.

The history (UTC; Moscow is UTC+3; version 2, point value 50 and tier 1
renamed "bronze", starts at Moscow's midnight of 2 January = 21:00 UTC):

    2025-12-31 10:00  enrol A and B; A tier 1, B tier 2
                      A earns 1000 at store 42 (partner 1), receipt 20,000.00
                      B earns 400 at store 77 (partner 2), receipt 8,000.00,
                        expiring 2026-01-01 12:00
    2026-01-01 09:15  enrol C (no tier)
                      A spends 300 at store 77 (partner 2), receipt 6,000.00
                      C earns 200 at store 43 (partner 1), receipt 4,000.00
    2026-01-01 12:30  the expiry sweep burns B's 400 (partner 2, no store)
    2026-01-01 20:30  A holds 100 at store 42, captures: spends 100, earns 50,
                        receipt 3,000.00
                      C +30 adjusted (no partner, no store)
    2026-01-01 21:30  (00:30 on 2 January in Moscow; version 2)
                      B earns 80 at store 77, receipt 1,600.00
                      A spends 200 at store 77, receipt 5,000.00
                      A's 09:15 spend refunded in part at store 77: 100
                        points back, 2,000.00 money
                      C's earning refunded in part at store 43: 50 points
                        back, 1,000.00 money
                      enrol D
    2026-01-02 10:00  A earns 70 at store 42, receipt 1,400.00; B -20 adjusted

Balances now: A 620, B 60, C 180, D 0 (860 in all). Points by the partner
that issued them at the end of 1 January UTC: A's 550 and C's 150 of
partner 1, B's 80 of partner 2, C's 30 adjusted without a partner.
"""

from datetime import UTC, datetime

import grpc
import pytest
from kopilka.core.batch import Batch
from kopilka.core.program import to_micros
from kopilka.v1 import feed_pb2, feed_pb2_grpc
from server_harness import DAY, RunningServer, error_info, install_program

P = "programs/1"
D = feed_pb2
STORE, PARTNER, TIER, BY_DAY = (D.REPORT_DIMENSION_STORE, D.REPORT_DIMENSION_PARTNER,
                                D.REPORT_DIMENSION_TIER, D.REPORT_DIMENSION_DAY)

PROGRAM = """
[program]
id = 1
name = "Report chain"
currency = "RUB"
time_zone = "Europe/Moscow"

[[partner]]
id = 1
name = "Books"

[[partner]]
id = 2
name = "Cafe"

[[store]]
id = 42
partner = 1
lanes = [1]

[[store]]
id = 43
partner = 1
lanes = [1]

[[store]]
id = 77
partner = 2
lanes = [1]

[[version]]
number = 1
effective_from = 2025-01-01T00:00:00+03:00
point_value = 100

[version.earn]
percent_bp = 500

[version.spend]
cap_bp = 10_000

[version.tiers]
[[version.tiers.level]]
name = "base"
min_spend = 0

[[version.tiers.level]]
name = "silver"
min_spend = 1_000_000

[[version]]
number = 2
effective_from = 2026-01-02T00:00:00+03:00
point_value = 50

[version.tiers]
[[version.tiers.level]]
name = "bronze"
min_spend = 0

[[version.tiers.level]]
name = "silver"
min_spend = 1_000_000
"""


def at(text):
    """Microseconds of an ISO time (UTC unless it says otherwise)."""
    moment = datetime.fromisoformat(text)
    return to_micros(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def apply(srv, when, batch):
    srv.clock.now = at(when)
    results = srv.call(srv.server.backend.apply(batch, None))
    assert all(r.code == 0 for r in results), results
    return results


def enrol(srv, when, name, tier=0):
    account = apply(srv, when, Batch().open_account(f"open/{name}", 1, name.encode()))[0].a
    if tier:
        apply(srv, when, Batch().set_tier(f"tier/{name}", account, tier))
    return account


def build_history(srv):
    a = enrol(srv, "2025-12-31T10:00", "a", tier=1)
    b = enrol(srv, "2025-12-31T10:00", "b", tier=2)
    apply(srv, "2025-12-31T10:00", Batch()
          .earn("a-earn1", a, 1000, money=2_000_000, store=42, lane=1, partner=1)
          .earn("b-earn1", b, 400, money=800_000, store=77, lane=1, partner=2,
                expires_at=at("2026-01-01T12:00")))
    c = enrol(srv, "2026-01-01T09:15", "c")
    apply(srv, "2026-01-01T09:15", Batch()
          .spend("a-spend1", a, 300, money=600_000, store=77, lane=1, partner=2)
          .earn("c-earn1", c, 200, money=400_000, store=43, lane=1, partner=1))
    apply(srv, "2026-01-01T12:30", Batch().sweep("sweep/1"))
    apply(srv, "2026-01-01T20:30", Batch()
          .hold("a-hold", a, 100, expires_at=at("2026-01-01T20:30") + DAY, store=42,
                lane=1, partner=1))
    apply(srv, "2026-01-01T20:30", Batch()
          .capture("a-capture", a, hold="a-hold", spend=100, earn=50, money=300_000,
                   store=42, lane=1, partner=1)
          .adjust("c-adjust", c, 30, reason=1))
    apply(srv, "2026-01-01T21:30", Batch()
          .earn("b-earn2", b, 80, money=160_000, store=77, lane=1, partner=2)
          .spend("a-spend2", a, 200, money=500_000, store=77, lane=1, partner=2)
          .refund("a-refund", "a-spend1", money=200_000, give_back=100, store=77,
                  lane=1)
          .refund("c-refund", "c-earn1", money=100_000, claw_back=50, store=43,
                  lane=1))
    enrol(srv, "2026-01-01T21:40", "d")
    apply(srv, "2026-01-02T10:00", Batch()
          .earn("a-earn2", a, 70, money=140_000, store=42, lane=1, partner=1)
          .adjust("b-adjust", b, -20, reason=5))
    return a, b, c


def serve(tmp_path_factory, history):
    """A server with the program and `history(server)` written (its
    accounts in `.accounts`), its clock after it all."""
    server = RunningServer(tmp_path_factory.mktemp("reports") / "data")
    path = tmp_path_factory.mktemp("program") / "program.toml"
    path.write_text(PROGRAM)
    install_program(server, str(path))
    server.accounts = history(server)
    server.clock.now = at("2026-01-03T12:00")
    return server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = serve(tmp_path_factory, build_history)
    yield server
    server.stop()


def feed(srv, role="integration"):
    return srv.stub(feed_pb2_grpc.FeedStub, role)


def interval(message, start, end):
    message.start_time.FromMicroseconds(at(start))
    message.end_time.FromMicroseconds(at(end))


def request(kind, start="2026-01-01T00:00", end="2026-01-02T00:00", by=(), **fields):
    out = getattr(feed_pb2, kind)(parent=fields.pop("parent", P), **fields)
    if start is not None:
        interval(getattr(out, "issued_interval" if kind.startswith("GetBreakage")
                         else "interval"), start, end)
    if by is not None and hasattr(out, "group_by"):
        out.group_by.extend(by)
    return out


def key(row):
    """A row's key as a short tuple of what is set."""
    k = row.key
    out = []
    if k.store:
        out.append(k.store)
    if k.partner:
        out.append(k.partner)
    if k.tier:
        out.append(k.tier)
    if k.HasField("day"):
        out.append(f"{k.day.year:04d}-{k.day.month:02d}-{k.day.day:02d}")
    return tuple(out)


def points(row):
    """(issued, spent, expired, adjusted, returned, clawed back,
    outstanding or None, its value in minor units or None)."""
    return (row.issued_points, row.spent_points, row.expired_points,
            row.adjusted_points, row.returned_points, row.clawed_back_points,
            row.outstanding_points if row.HasField("outstanding_points") else None,
            row.outstanding_value.minor_units if row.HasField("outstanding_value")
            else None)


def head(srv):
    return srv.server.ledger.head()[0]


# --- points -------------------------------------------------------------------------

def test_points_totals_with_outstanding_at_the_end_of_a_past_interval(srv):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest"))
    assert r.as_of_cursor == head(srv)
    assert [key(row) for row in r.rows] == [()]
    # 1 January UTC: issued 200 + 50 + 80, spent 300 + 100 + 200, 400 expired,
    # +30 adjusted, 100 returned, 50 clawed back; outstanding 1400 before,
    # 810 after (860 now less the 70 earned and 20 adjusted on 2 January),
    # worth 50 kopecks a point under version 2 (in force in its last hour)
    assert points(r.rows[0]) == (330, 600, 400, 30, 100, 50, 810, 810 * 50)
    assert r.rows[0].outstanding_value.currency_code == "RUB"


def test_outstanding_now_and_before_anything_happened(srv):
    now = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                            "2026-01-02T00:00", "2026-01-03T00:00"))
    assert points(now.rows[0]) == (70, 0, 0, -20, 0, 0, 860, 860 * 50)
    balances = [srv.server.ledger.balances(a, srv.clock.now).balance
                for a in srv.accounts]
    assert balances == [620, 60, 180] and sum(balances) == 860
    before = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                               "2025-12-30T00:00", "2025-12-31T00:00"))
    # no movement: the one row of totals, nothing outstanding, version 1's value
    assert points(before.rows[0]) == (0, 0, 0, 0, 0, 0, 0, 0)
    first = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                              "2025-12-31T00:00", "2026-01-01T00:00"))
    assert points(first.rows[0]) == (1400, 0, 0, 0, 0, 0, 1400, 1400 * 100)


def test_points_by_day_splits_at_moscow_midnight_not_utc(srv):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest", by=[BY_DAY]))
    assert [(key(row), points(row)) for row in r.rows] == [
        # 03:00 to 24:00 in Moscow on 1 January: UTC 00:00 to 21:00
        (("2026-01-01",), (250, 400, 400, 30, 0, 0, 880, 880 * 100)),
        # 21:30 UTC on 1 January is 00:30 on 2 January in Moscow; the row's
        # outstanding is at the interval's end (03:00 Moscow), under version 2
        (("2026-01-02",), (80, 200, 0, 0, 100, 50, 810, 810 * 50)),
    ]


def test_points_by_partner_track_outstanding_by_the_issuing_partner(srv):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest", by=[PARTNER]))
    assert [(key(row), points(row)) for row in r.rows] == [
        ((), (0, 0, 0, 30, 0, 0, 30, 30 * 50)),   # C's adjustment: no partner
        # partner 1 issued A's 1000 (500 left after 300 + 100 + 200 spent and
        # 100 returned) and 50, and C's 200 (50 clawed back)
        (("programs/1/partners/1",), (250, 100, 0, 0, 0, 50, 700, 700 * 50)),
        # partner 2 booked spends of partner 1's points; its own: B's 80
        (("programs/1/partners/2",), (80, 500, 400, 0, 100, 0, 80, 80 * 50)),
    ]
    assert sum(row.outstanding_points for row in r.rows) == 810


def test_points_by_partner_and_day(srv):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                          by=[BY_DAY, PARTNER]))
    assert [(key(row), points(row)) for row in r.rows] == [
        (("2026-01-01",), (0, 0, 0, 30, 0, 0, 30, 30 * 100)),
        (("programs/1/partners/1", "2026-01-01"), (250, 100, 0, 0, 0, 0, 850, 85_000)),
        (("programs/1/partners/2", "2026-01-01"), (0, 300, 400, 0, 0, 0, 0, 0)),
        (("programs/1/partners/1", "2026-01-02"), (0, 0, 0, 0, 0, 50, 700, 35_000)),
        (("programs/1/partners/2", "2026-01-02"), (80, 200, 0, 0, 100, 0, 80, 4_000)),
    ]


def test_points_by_store_and_by_tier_leave_outstanding_out(srv):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest", by=[STORE]))
    assert [(key(row), points(row)) for row in r.rows] == [
        ((), (0, 0, 400, 30, 0, 0, None, None)),   # the sweep, the adjustment
        (("stores/42",), (50, 100, 0, 0, 0, 0, None, None)),
        (("stores/43",), (200, 0, 0, 0, 0, 50, None, None)),
        (("stores/77",), (80, 500, 0, 0, 100, 0, None, None)),
    ]
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest", by=[TIER]))
    # tier 1 is "base" under version 1 and "bronze" under version 2
    assert [(key(row), points(row)) for row in r.rows] == [
        ((), (200, 0, 0, 30, 0, 50, None, None)),
        (("base",), (50, 400, 0, 0, 0, 0, None, None)),
        (("bronze",), (0, 200, 0, 0, 100, 0, None, None)),
        (("silver",), (80, 0, 400, 0, 0, 0, None, None)),
    ]
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                          by=[STORE, TIER, PARTNER, BY_DAY]))
    assert (("stores/77", "programs/1/partners/2", "base", "2026-01-01")
            in [key(row) for row in r.rows])
    assert sum(row.spent_points for row in r.rows) == 600


def test_an_interval_is_rounded_out_to_whole_hours(srv):
    r = feed(srv).GetPointsReport(request("GetPointsReportRequest",
                                          "2026-01-01T09:20", "2026-01-01T09:40"))
    # the hour 09:00-10:00 whole: A's spend of 300 and C's 200 at 09:15
    assert points(r.rows[0])[:6] == (200, 300, 0, 0, 0, 0)
    assert r.rows[0].outstanding_points == 1300


# --- receipts and members ----------------------------------------------------------

def receipts(r):
    return [(key(row), row.receipts, row.total_paid.minor_units,
             row.average_paid.minor_units if row.HasField("average_paid") else None)
            for row in r.rows]


def test_average_receipt_by_tier_by_default(srv):
    r = feed(srv).GetAverageReceiptReport(request("GetAverageReceiptReportRequest"))
    assert r.as_of_cursor == head(srv)
    assert receipts(r) == [
        ((), 1, 300_000, 300_000),            # C: 4,000 less 1,000 refunded
        (("base",), 2, 900_000, 450_000),     # A, version 1
        (("bronze",), 1, 300_000, 300_000),   # A, version 2: 5,000 less 2,000
        (("silver",), 1, 160_000, 160_000),   # B
    ]
    assert all(row.total_paid.currency_code == "RUB" for row in r.rows)


def test_average_receipt_by_store_partner_and_day(srv):
    stub = feed(srv)
    assert receipts(stub.GetAverageReceiptReport(request(
        "GetAverageReceiptReportRequest", by=[STORE]))) == [
        (("stores/42",), 1, 300_000, 300_000),
        (("stores/43",), 1, 300_000, 300_000),
        (("stores/77",), 3, 1_060_000, 353_333),   # rounded down
    ]
    assert receipts(stub.GetAverageReceiptReport(request(
        "GetAverageReceiptReportRequest", by=[PARTNER]))) == [
        (("programs/1/partners/1",), 2, 600_000, 300_000),
        (("programs/1/partners/2",), 3, 1_060_000, 353_333),
    ]
    assert receipts(stub.GetAverageReceiptReport(request(
        "GetAverageReceiptReportRequest", by=[BY_DAY]))) == [
        (("2026-01-01",), 3, 1_300_000, 433_333),
        (("2026-01-02",), 2, 360_000, 180_000),
    ]


MOSCOW_DAYS = ("2026-01-01T00:00+03:00", "2026-01-03T00:00+03:00")


def test_active_members(srv):
    stub = feed(srv)
    r = stub.GetActiveMembersReport(request("GetActiveMembersReportRequest",
                                            *MOSCOW_DAYS))
    assert r.as_of_cursor == head(srv)
    # A, B and C had receipts; C and D enrolled; A and B before
    assert [(key(row), row.active_members, row.new_members, row.total_members)
            for row in r.rows] == [((), 3, 2, 4)]
    r = stub.GetActiveMembersReport(request("GetActiveMembersReportRequest",
                                            *MOSCOW_DAYS, by=[BY_DAY]))
    assert [(key(row), row.active_members, row.new_members, row.total_members)
            for row in r.rows] == [(("2026-01-01",), 2, 1, 3),
                                   (("2026-01-02",), 2, 1, 4)]
    # a UTC day touches two Moscow days: both are counted whole
    r = stub.GetActiveMembersReport(request("GetActiveMembersReportRequest"))
    assert [(row.active_members, row.new_members) for row in r.rows] == [(3, 2)]
    r = stub.GetActiveMembersReport(request("GetActiveMembersReportRequest",
                                            "2025-12-31T00:00+03:00",
                                            "2026-01-01T00:00+03:00"))
    assert [(row.active_members, row.new_members, row.total_members)
            for row in r.rows] == [(2, 2, 2)]


def test_visit_frequency(srv):
    stub = feed(srv)
    r = stub.GetVisitFrequencyReport(request("GetVisitFrequencyReportRequest",
                                             *MOSCOW_DAYS))
    assert r.as_of_cursor == head(srv)
    (row,) = r.rows
    # A came on both days (three receipts on the 1st count as one visit), B
    # and C on one each
    assert (key(row), row.active_members, row.visits) == ((), 3, 4)
    assert [(b.visits, b.members) for b in row.histogram] == \
        [(1, 2), (2, 1)] + [(n, 0) for n in range(3, 11)]
    r = stub.GetVisitFrequencyReport(request("GetVisitFrequencyReportRequest",
                                             *MOSCOW_DAYS, by=[BY_DAY]))
    assert [(key(row), row.active_members, row.visits, row.histogram[0].members)
            for row in r.rows] == [(("2026-01-01",), 2, 2, 2), (("2026-01-02",), 2, 2, 2)]


# --- settlement and breakage ---------------------------------------------------------

def test_partner_settlement(srv):
    r = feed(srv).GetPartnerSettlementReport(request(
        "GetPartnerSettlementReportRequest"))
    assert r.as_of_cursor == head(srv)
    # partner 1's points spent at partner 2: 300 at 1.00, 200 less 100 given
    # back at 0.50 (version 2); partner 1's own spend at store 42 is no row
    assert [(row.issuing_partner, row.redeeming_partner, row.points,
             row.value.minor_units, row.value.currency_code) for row in r.rows] == [
        ("programs/1/partners/1", "programs/1/partners/2", 400, 35_000, "RUB")]
    r = feed(srv).GetPartnerSettlementReport(request(
        "GetPartnerSettlementReportRequest", "2026-01-01T21:00", "2026-01-01T22:00"))
    assert [(row.points, row.value.minor_units) for row in r.rows] == [(100, 5_000)]


def test_breakage(srv):
    stub = feed(srv)

    def rows(*by):
        r = stub.GetBreakageReport(request("GetBreakageReportRequest",
                                           "2025-12-31T00:00", "2026-01-01T12:00",
                                           by=by))
        assert r.as_of_cursor == head(srv)
        return [(key(row), row.issued_points, row.spent_points, row.expired_points,
                 row.outstanding_points, row.breakage_bp) for row in r.rows]

    # issued: A's 1000 (500 spent net of the 100 given back), B's 400 (all
    # expired), C's 200 (50 clawed back)
    assert rows() == [((), 1600, 500, 400, 650, 2500)]
    assert rows(PARTNER) == [(("programs/1/partners/1",), 1200, 500, 0, 650, 0),
                             (("programs/1/partners/2",), 400, 0, 400, 0, 10_000)]
    assert rows(BY_DAY) == [(("2025-12-31",), 1400, 500, 400, 500, 2857),
                            (("2026-01-01",), 200, 0, 0, 150, 0)]


# --- bad requests and roles ------------------------------------------------------------

REPORTS = [("GetPointsReport", "GetPointsReportRequest"),
           ("GetBreakageReport", "GetBreakageReportRequest"),
           ("GetActiveMembersReport", "GetActiveMembersReportRequest"),
           ("GetAverageReceiptReport", "GetAverageReceiptReportRequest"),
           ("GetVisitFrequencyReport", "GetVisitFrequencyReportRequest"),
           ("GetPartnerSettlementReport", "GetPartnerSettlementReportRequest"),
           ("GetCouponsReport", "GetCouponsReportRequest")]


def refusal(srv, rpc, message, role="integration"):
    with pytest.raises(grpc.RpcError) as caught:
        getattr(feed(srv, role), rpc)(message)
    return error_info(caught.value)


@pytest.mark.parametrize("rpc, kind", REPORTS)
def test_bad_intervals_and_programs_name_the_field(srv, rpc, kind):
    field = "issued_interval" if rpc == "GetBreakageReport" else "interval"
    invalid = ("INVALID_ARGUMENT", "REQUEST_INVALID")
    assert refusal(srv, rpc, request(kind, "2026-01-02T00:00", "2026-01-01T00:00")) == \
        (*invalid, [f"{field}.end_time"])
    assert refusal(srv, rpc, request(kind, "2026-01-01T00:00", "2026-01-01T00:00")) == \
        (*invalid, [f"{field}.end_time"])
    assert refusal(srv, rpc, request(kind, None)) == (*invalid, [field])
    empty_start = request(kind)
    getattr(empty_start, field).ClearField("start_time")
    assert refusal(srv, rpc, empty_start) == (*invalid, [f"{field}.start_time"])
    assert refusal(srv, rpc, request(kind, parent="programs/x")) == (*invalid, ["parent"])
    code, reason, _ = refusal(srv, rpc, request(kind, parent="programs/9"))
    assert (code, reason) == ("NOT_FOUND", "PROGRAM_NOT_FOUND")


@pytest.mark.parametrize("rpc, kind", [r for r in REPORTS
                                       if r[0] != "GetPartnerSettlementReport"])
def test_bad_dimensions_name_the_field(srv, rpc, kind):
    invalid = ("INVALID_ARGUMENT", "REQUEST_INVALID")
    assert refusal(srv, rpc, request(kind, by=[BY_DAY, 9])) == (*invalid, ["group_by[1]"])
    assert refusal(srv, rpc, request(kind, by=[0])) == (*invalid, ["group_by[0]"])
    assert refusal(srv, rpc, request(kind, by=[BY_DAY, BY_DAY])) == \
        (*invalid, ["group_by[1]"])
    # everything at once, each by its path
    assert refusal(srv, rpc, request(kind, "2026-01-02T00:00", "2026-01-01T00:00",
                                     by=[BY_DAY, 7], parent="nope")) == \
        (*invalid, ["parent", f"{'issued_' if 'Breakage' in rpc else ''}interval.end_time",
                    "group_by[1]"])


@pytest.mark.parametrize("rpc, kind, refused", [
    ("GetActiveMembersReport", "GetActiveMembersReportRequest", [STORE, PARTNER, TIER]),
    ("GetVisitFrequencyReport", "GetVisitFrequencyReportRequest", [STORE, PARTNER, TIER]),
    ("GetBreakageReport", "GetBreakageReportRequest", [STORE, TIER]),
])
def test_dimensions_the_aggregates_cannot_give_are_refused_with_why(srv, rpc, kind,
                                                                     refused):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    for dimension in refused:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(feed(srv), rpc)(request(kind, by=[BY_DAY, dimension]))
        assert error_info(caught.value) == ("INVALID_ARGUMENT", "REQUEST_INVALID",
                                            ["group_by[1]"])
        status = rpc_status.from_call(caught.value)
        bad = error_details_pb2.BadRequest()
        for detail in status.details:
            if detail.Is(bad.DESCRIPTOR):
                detail.Unpack(bad)
        why = bad.field_violations[0].description
        assert D.ReportDimension.Name(dimension) in why
        assert "not the" in why and "only REPORT_DIMENSION" in why


@pytest.mark.parametrize("role", ["pos", "hwd", None])
@pytest.mark.parametrize("rpc, kind", REPORTS)
def test_only_integration_and_admin_read_reports(srv, rpc, kind, role):
    code, reason, _ = refusal(srv, rpc, request(kind), role)
    assert (code, reason) == (("UNAUTHENTICATED", "CREDENTIALS_INVALID") if role is None
                              else ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED"))


@pytest.mark.parametrize("role", ["integration", "admin"])
def test_integration_and_admin_may(srv, role):
    r = feed(srv, role).GetPointsReport(request("GetPointsReportRequest"))
    assert r.rows[0].issued_points == 330


# --- the command line --------------------------------------------------------------------

def test_the_cli_prints_real_rows(srv, capsys, monkeypatch):
    from kopilka.servers import cli
    monkeypatch.delenv("KOPILKA_TOKEN", raising=False)
    monkeypatch.delenv("KOPILKA_SERVER", raising=False)
    argv = ["--server", srv.address, "--token", srv.tokens["integration"],
            "--from", "2026-01-01", "--to", "2026-01-02"]
    assert cli.main(["report", "points", "--by", "day", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith("points report, programs/1, 2026-01-01 00:00 to 2026-01-02 00:00 UTC")
    lines = out.splitlines()
    assert lines[1].startswith("  2026-01-01: issued_points=250, spent_points=400, "
                               "expired_points=400, adjusted_points=30")
    assert "outstanding_points=880, outstanding_value=880.00 RUB" in lines[1]
    assert "outstanding_points=810, outstanding_value=405.00 RUB" in lines[2]
    assert cli.main(["report", "partner-settlement", *argv]) == 0
    out = capsys.readouterr().out
    assert ("issuing_partner=programs/1/partners/1, redeeming_partner="
            "programs/1/partners/2, points=400, value=350.00 RUB") in out
    assert cli.main(["report", "average-receipt", *argv]) == 0
    assert "  base: receipts=2, total_paid=9,000.00 RUB, average_paid=4,500.00 RUB" \
        in capsys.readouterr().out
    assert cli.main(["report", "active-members", "--by", "store", *argv]) == 1
    assert "group_by[0]" in capsys.readouterr().err
