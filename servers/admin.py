"""Admin: manual adjustments, the ledger's audit, hot backups and figures.

Adjust is a write like any other: one kernel ADJUST operation through the
group-commit writer, idempotent by its operation id (backend.write_one), its
note and request digest kept as the operation's data. Audit and Backup read
one consistent snapshot for as long as they need, on a worker thread, while
the server keeps serving; neither changes the ledger.
"""

import asyncio
import importlib.metadata
import os

from google.protobuf.duration_pb2 import Duration

from kopilka.core.lifetimes import lot_times
from kopilka.core.records import NEVER
from kopilka.v1 import admin_pb2, admin_pb2_grpc, common_pb2

from . import backup, convert
from .backend import pack, request_digest
from .status import ApiError, invalid

MAX_NOTE = 500
MAX_PROBLEMS = 1000   # lines listed; a broken ledger could have millions
_REASONS = frozenset(v.number for v in common_pb2.AdjustmentReason.DESCRIPTOR.values
                     if v.number)
_OTHER = common_pb2.ADJUSTMENT_REASON_OTHER
_PAGE = os.sysconf("SC_PAGE_SIZE")   # LMDB's page size is the OS page size


def _version():
    try:
        return importlib.metadata.version("kopilka")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _duration(seconds):
    out = Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def _check_adjust(request):
    """Problems of an AdjustRequest's fields; (activates_at, expires_at,
    business_time), None where the request leaves it to the server."""
    if request.points == 0:
        raise invalid([("points", "must not be zero")], "AMOUNT_INVALID")
    problems = []
    if request.reason not in _REASONS:
        problems.append(("reason", "must be an AdjustmentReason"))
    note = request.note
    if len(note) > MAX_NOTE:
        problems.append(("note", f"must be at most {MAX_NOTE} characters"))
    elif request.reason == _OTHER and not note.strip():
        problems.append(("note", "required with ADJUSTMENT_REASON_OTHER"))
    times = {}
    for name in ("activate_time", "expire_time", "business_time"):
        if request.HasField(name):
            if name != "business_time" and request.points < 0:
                problems.append((name, "only for a credit (positive points)"))
                continue
            times[name] = convert.parse_time(getattr(request, name), name, problems)
    if problems:
        raise invalid(problems)
    if times.get("expire_time", 1 << 62) <= times.get("activate_time", 0):
        raise invalid([("expire_time", "must be after activate_time")], "TIME_INVALID")
    return (times.get("activate_time"), times.get("expire_time"),
            times.get("business_time", 0))


def _lot_times(entry, now, activates_at, expires_at):
    """A credit's lot times: the request's, else the program's lifetime for
    adjustments counted from now (spendable now, never expiring when the
    program's definition is not known)."""
    default = (now, NEVER)
    if entry is not None:
        try:
            lifetime = entry.program.version_at(now).lifetime.for_kind("adjustment")
            default = lot_times(lifetime, now, entry.program.zone)
        except LookupError:
            pass  # no version in force yet
    return (default[0] if activates_at is None else activates_at,
            default[1] if expires_at is None else expires_at)


class Admin(admin_pb2_grpc.AdminServicer):
    def __init__(self, backend):
        self.backend = backend
        self.start_time = backend.clock()
        self._backup = asyncio.Lock()   # one copy at a time: they share the disk

    # --- Adjust -----------------------------------------------------------
    async def Adjust(self, request, context):
        b = self.backend
        op_id = convert.operation_id(request.operation_id)
        program_id, account_id = convert.parse_member(request.member, "member")
        digest = request_digest(request)
        first = b.stored(op_id, digest)
        if first is not None:
            return self._adjusted(request, first[0], replayed=True)
        activates_at, expires_at, business_time = _check_adjust(request)
        b.account(program_id, account_id)
        now = b.clock()
        extra = {}
        if request.points > 0:
            extra["activates_at"], extra["expires_at"] = _lot_times(
                b.registry.get(program_id), now, activates_at, expires_at)
        data = pack({"rq": digest, "t": now, "note": request.note})

        def build(batch):
            batch.adjust(op_id, account_id, request.points, reason=request.reason,
                         business_time=business_time, data=data, **extra)
        try:
            record, _answer, replayed = await b.write_one(
                op_id, digest, build, context,
                lambda code: {"AMOUNT_INVALID": "points",
                              "TIME_INVALID": "expire_time"}.get(code.name))
        except ApiError as err:
            if err.reason == "INSUFFICIENT_POINTS":
                balances = b.ledger.balances(account_id, b.clock())
                err.metadata["available_points"] = str(balances.available)
            raise
        return self._adjusted(request, record, replayed)

    def _adjusted(self, request, record, replayed):
        return admin_pb2.AdjustResponse(
            member=convert.member_name(record.program, record.account),
            points=request.points, lot_number=record.a if request.points > 0 else 0,
            balances=self.backend.balances(record.account), replayed=replayed)

    # --- Audit ------------------------------------------------------------
    async def Audit(self, request, context):
        b = self.backend
        at, started = b.clock(), b.monotonic()
        problems, (seq, digest) = await asyncio.get_running_loop().run_in_executor(
            None, self._audit)
        listed = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            listed.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        out = admin_pb2.AuditResponse(clean=not problems, problems=listed,
                                      head_cursor=seq, head_hash=digest,
                                      duration=_duration(b.monotonic() - started))
        convert.set_time(out, "audit_time", at)
        return out

    def _audit(self):
        """The kernel's audit and the head, from one snapshot (so the head is
        exactly what was audited)."""
        return self.backend.ledger.audit_at_head()

    # --- Backup -----------------------------------------------------------
    async def Backup(self, request, context):
        b = self.backend
        path = backup.destination(request.path, b.ledger.path)
        async with self._backup:
            at, started = b.clock(), b.monotonic()
            size, seq, digest = await asyncio.get_running_loop().run_in_executor(
                None, backup.copy, b.ledger, path)
        out = admin_pb2.BackupResponse(path=path, size_bytes=size, head_cursor=seq,
                                       head_hash=digest,
                                       duration=_duration(b.monotonic() - started))
        convert.set_time(out, "backup_time", at)
        return out

    # --- GetStats ---------------------------------------------------------
    async def GetStats(self, request, context):
        b = self.backend
        ledger = b.ledger
        info = ledger.info()
        server = getattr(b, "server", None)
        services = getattr(server, "services", {}) or {}
        feed, store = services.get("Feed"), services.get("Store")
        commits, operations, last = _commit_figures(getattr(server, "metrics", None))
        out = admin_pb2.GetStatsResponse(
            server_version=_version(), head_cursor=ledger.head()[0],
            members=ledger.accounts_opened(), store_size_bytes=info["map_size"],
            store_used_bytes=(info["last_page"] + 1) * _PAGE,
            writer_queue_depth=b.writer.depth(), commits=commits,
            committed_operations=operations, last_commit_operations=last,
            feed_subscribers=getattr(feed, "subscribers", 0),
            lane_watchers=getattr(store, "watchers", 0),
            card_read_streams=getattr(store, "streams", 0))
        convert.set_time(out, "start_time", self.start_time)
        return out


def _commit_figures(metrics):
    """(commits, operations, operations in the last commit) since the start,
    from the writer's metrics."""
    if metrics is None:
        return 0, 0, 0
    commits = operations = 0
    for family in metrics.batch_operations.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                commits = int(sample.value)
            elif sample.name.endswith("_sum"):
                operations = int(sample.value)
    return commits, operations, getattr(metrics, "last_commit_operations", 0)
