"""`adjust`, `audit`, `backup` and `stats`: the Admin service (role admin)."""

import os

from ..client import Client, _operation_id
from ..format import _bytes, _print_json, balances, fields_of
from ..options import _program_option
from .members import _member_name

ADJUST_REASONS = ("goodwill", "correction", "complaint", "migration", "fraud",
                  "promotion", "other")


def _add_admin(sub, client, write):
    p = sub.add_parser("adjust", parents=[client, write],
                       help="credit (+) or debit (-) a member's points by hand",
                       description="Credit or debit points with a reason; journaled "
                       "as an ADJUST posting.")
    p.add_argument("member")
    p.add_argument("points", type=int, help="e.g. 200 or -50")
    p.add_argument("--reason", required=True, choices=ADJUST_REASONS)
    p.add_argument("--note", default="", help="what happened (required with other)")
    _program_option(p)
    p.set_defaults(run=cmd_adjust)
    p = sub.add_parser("audit", parents=[client],
                       help="check every invariant of the ledger (exit 1 if not clean)")
    p.set_defaults(run=cmd_audit)
    p = sub.add_parser("backup", parents=[client],
                       help="a compacted copy of the ledger while it serves")
    p.add_argument("dest", help="a new directory on the server's host")
    p.set_defaults(run=cmd_backup)
    p = sub.add_parser("stats", parents=[client], help="the server's figures")
    p.set_defaults(run=cmd_stats)


def cmd_adjust(args):
    from kopilka.v1 import admin_pb2 as pb
    from kopilka.v1 import common_pb2
    reason = common_pb2.AdjustmentReason.Value(f"ADJUSTMENT_REASON_{args.reason.upper()}")
    with Client(args) as c:
        r = c("Admin.Adjust", pb.AdjustRequest(
            operation_id=_operation_id(args, "adjust"),
            member=_member_name(args.member, args.program), points=args.points,
            reason=reason, note=args.note))
    if args.json:
        return _print_json(r)
    verb = "credited" if r.points > 0 else "debited"
    print(f"{verb} {abs(r.points)} points to {r.member}"
          + (f" (lot {r.lot_number})" if r.lot_number else "")
          + (" (replayed)" if r.replayed else ""))
    print(f"  {balances(r.balances)}")


def cmd_audit(args):
    from kopilka.v1 import admin_pb2 as pb
    with Client(args, default_timeout=600) as c:
        r = c("Admin.Audit", pb.AuditRequest())
    if args.json:
        _print_json(r)
    elif r.clean:
        print(f"clean: journal up to cursor {r.head_cursor}, head hash "
              f"{r.head_hash.hex()[:16]}..., {r.duration.ToMilliseconds()} ms")
    else:
        print(f"NOT CLEAN: {len(r.problems)} problem(s) up to cursor {r.head_cursor}")
        for problem in r.problems:
            print(f"  {problem}")
    return 0 if r.clean else 1


def cmd_backup(args):
    from kopilka.v1 import admin_pb2 as pb
    dest = os.path.abspath(args.dest)
    with Client(args, default_timeout=600) as c:
        r = c("Admin.Backup", pb.BackupRequest(path=dest))
    if args.json:
        return _print_json(r)
    print(f"backup in {r.path} (on the server's host): {_bytes(r.size_bytes)}, "
          f"cursor {r.head_cursor}, head hash {r.head_hash.hex()[:16]}..., "
          f"{r.duration.ToMilliseconds()} ms")


def cmd_stats(args):
    from kopilka.v1 import admin_pb2 as pb
    with Client(args) as c:
        r = c("Admin.GetStats", pb.GetStatsRequest())
    if args.json:
        return _print_json(r)
    for name, value in fields_of(r):
        print(f"{name}: {value}")
