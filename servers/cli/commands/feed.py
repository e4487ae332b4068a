"""`report ...` (reports from the journal) and `feed tail` (the journal as a
stream): the Feed service, for role integration or admin."""

from datetime import UTC, datetime, timedelta

from .. import CliError
from ..client import Client
from ..format import _enum_name, _print_json, fields_of, mask_card, money, when
from ..options import _group, _program_option
from .programs import _program_name


# --- reports ------------------------------------------------------------------

# command: (rpc, request message, interval field, takes group_by)
REPORTS = {
    "points": ("GetPointsReport", "GetPointsReportRequest", "interval", True),
    "breakage": ("GetBreakageReport", "GetBreakageReportRequest", "issued_interval", True),
    "active-members": ("GetActiveMembersReport", "GetActiveMembersReportRequest",
                       "interval", True),
    "average-receipt": ("GetAverageReceiptReport", "GetAverageReceiptReportRequest",
                        "interval", True),
    "visit-frequency": ("GetVisitFrequencyReport", "GetVisitFrequencyReportRequest",
                        "interval", True),
    "coupons": ("GetCouponsReport", "GetCouponsReportRequest", "interval", True),
    "partner-settlement": ("GetPartnerSettlementReport",
                           "GetPartnerSettlementReportRequest", "interval", False),
}


def _add_report(sub, client):
    actions = _group(sub, "report", "reports from the journal (role integration or admin)")
    for name, (rpc, _, _, grouped) in REPORTS.items():
        p = actions.add_parser(name, parents=[client], help=f"Feed.{rpc}")
        _program_option(p)
        p.add_argument("--from", dest="start", help="start, YYYY-MM-DD or RFC 3339 "
                       "(default 30 days ago)")
        p.add_argument("--to", dest="end", help="end, exclusive (default now)")
        if grouped:
            p.add_argument("--by", default="", help="comma-separated: store, partner, "
                           "tier, day")
        p.set_defaults(run=cmd_report, report=name)


def _time(text, field):
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{field} {text!r}: use YYYY-MM-DD or RFC 3339") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_report(args):
    from kopilka.v1 import feed_pb2 as pb
    rpc, request_name, interval_field, _ = REPORTS[args.report]
    end = _time(args.end, "--to") if args.end else datetime.now(UTC)
    start = _time(args.start, "--from") if args.start else end - timedelta(days=30)
    request = getattr(pb, request_name)(parent=_program_name(args.program))
    interval = getattr(request, interval_field)
    interval.start_time.FromDatetime(start)
    interval.end_time.FromDatetime(end)
    for dimension in filter(None, (d.strip() for d in getattr(args, "by", "").split(","))):
        try:
            request.group_by.append(pb.ReportDimension.Value(
                f"REPORT_DIMENSION_{dimension.upper()}"))
        except ValueError:
            raise CliError(f"--by {dimension!r}: one of store, partner, tier, day") from None
    with Client(args, default_timeout=120) as c:
        r = c(f"Feed.{rpc}", request)
    if args.json:
        return _print_json(r)
    print(f"{args.report} report, {request.parent}, {start:%Y-%m-%d %H:%M} to "
          f"{end:%Y-%m-%d %H:%M} UTC, as of cursor {r.as_of_cursor}")
    for row in r.rows:
        values = ", ".join(f"{n}={v}" for n, v in fields_of(row, ("key",)))
        if "key" not in row.DESCRIPTOR.fields_by_name:   # settlement: no key
            print(f"  {values}")
            continue
        key = fields_of(row.key) if row.HasField("key") else []
        label = " ".join(v for _, v in key if v not in ("", "-")) if key else ""
        print(f"  {label or 'all'}: {values}")
    if not r.rows:
        print("  (no rows)")


# --- the feed -----------------------------------------------------------------

def _add_feed(sub, client):
    actions = _group(sub, "feed", "the journal as a stream (role integration or admin)")
    p = actions.add_parser("tail", parents=[client], help="print journal events as "
                           "they commit (Ctrl-C stops)")
    p.add_argument("--from", dest="cursor", type=int, default=0,
                   help="the last cursor already seen (default 0: from the start)")
    p.add_argument("--program", default="", help="only this program's events")
    p.add_argument("--no-follow", action="store_true",
                   help="stop once caught up with the journal's head")
    p.add_argument("--limit", type=int, default=0, help="stop after this many events")
    p.set_defaults(run=cmd_feed_tail)


def cmd_feed_tail(args):
    from kopilka.v1 import feed_pb2 as pb
    request = pb.SubscribeRequest(from_cursor=args.cursor,
                                  program=_program_name(args.program) if args.program else "")
    seen, last = 0, args.cursor
    with Client(args) as c:
        try:
            for response in c.stream("Feed.Subscribe", request):
                for event in response.events:
                    if args.json:
                        _print_json(event)
                    else:
                        print(event_line(event), flush=True)
                    seen, last = seen + 1, event.cursor
                    if args.limit and seen >= args.limit:
                        return 0
                # caught up: the head reached, or a heartbeat (nothing new)
                if args.no_follow and (last >= response.head_cursor or not response.events):
                    return 0
        except KeyboardInterrupt:
            return 0
    return 0


def event_line(e):
    """One journal event on one line; card numbers masked."""
    from kopilka.v1 import common_pb2, feed_pb2
    kind = _enum_name(feed_pb2.EntryType, e.type, "ENTRY_TYPE_")
    parts = [f"{e.cursor:>8}", when(e.operation_time), f"{kind:<15}"]
    parts += [x for x in (e.member, e.store) if x]
    if e.points:
        parts.append(f"{e.points} points")
    detail = e.WhichOneof("details")
    if detail == "card":
        parts.append(f"card {mask_card(e.card.card_number)}")
    elif detail == "receipt":
        parts.append(f"paid {money(e.receipt.paid)}, spent {e.receipt.spent_points}")
    elif detail == "hold_placed":
        parts.append(f"hold {e.hold_placed.hold_number} of {e.hold_placed.points}")
    elif detail == "hold_released":
        reason = _enum_name(feed_pb2.HoldReleaseReason, e.hold_released.reason,
                            "HOLD_RELEASE_REASON_")
        parts.append(f"hold {e.hold_released.hold_number} {reason.lower()}")
    elif detail == "adjustment":
        parts.append(_enum_name(common_pb2.AdjustmentReason, e.adjustment.reason,
                                "ADJUSTMENT_REASON_").lower())
    elif detail == "member_state":
        parts.append(_enum_name(common_pb2.MemberState, e.member_state.state,
                                "MEMBER_STATE_"))
    parts.append(f"op {e.operation_id}")
    return "  ".join(parts)
