"""Members.AwardAction: a named action's bonus, within its per-member limit.

The limit is the ledger's to keep. An award is one AWARD operation on the
member's counter for the action (`action/{name}`, or with the limit period's
label: core/bonuses.py), and the kernel refuses it with LIMIT_REACHED once
the counter holds the limit, in the transaction that would have counted it.
The writer applies operations one after another, so concurrent awards never
exceed the limit, whatever their timing.

Idempotency as everywhere (backend.py): the operation's data holds the
request digest and the answer's figures, so a retry gets the first answer.
"""

from kopilka.core.bonuses import action_counter
from kopilka.core.lifetimes import lot_times
from kopilka.core.records import Code
from kopilka.v1 import members_pb2

from . import convert
from .backend import pack, request_digest
from .status import ApiError, Checks, from_kernel

MAX_AHEAD = 60_000_000  # an action_time at most a minute past the server's clock


def _fields(code):
    return {"KEY_INVALID": "action", "TIME_INVALID": "action_time"}.get(code.name)


async def award_action(backend, request, context):
    checks = Checks()
    op_id = checks.run(convert.operation_id, request.operation_id)
    name = checks.run(convert.parse_member, request.name, "name")
    if not request.action:
        checks.add("action", "name the action (bonuses.actions of the program)")
    now = backend.clock()
    at = now
    if request.HasField("action_time"):
        problems = []
        at = convert.parse_time(request.action_time, "action_time", problems)
        for field, why in problems:
            checks.add(field, why)
        if not problems and at > now + MAX_AHEAD:
            checks.add("action_time", "must not be in the future")
    checks.done()
    program_id, account = name
    digest = request_digest(request)
    limit = 0

    def build(batch):
        nonlocal limit
        program = backend.program(program_id, "name").program
        backend.account(program_id, account, "name")
        try:
            version = program.version_at(at)
        except LookupError as err:
            raise ApiError("INVALID_ARGUMENT", "REQUEST_INVALID", str(err),
                           fields=[("action_time", str(err))]) from None
        action = version.bonuses.action.get(request.action)
        if action is None:
            known = ", ".join(sorted(version.bonuses.action)) or "none"
            raise ApiError("INVALID_ARGUMENT", "REQUEST_INVALID",
                           f"action: '{request.action}' is no action of version "
                           f"{version.number} (it has: {known})",
                           fields=[("action", f"unknown action; the version in force "
                                              f"has: {known}")])
        activates_at, expires_at = lot_times(version.lifetime.for_kind("action"), at,
                                             program.zone)
        limit = action.limit or 0
        batch.award(op_id, account, action.points,
                    counter=action_counter(action, at, program.zone), limit=limit,
                    activates_at=activates_at, expires_at=expires_at,
                    version=version.number, business_time=at,
                    data=pack({"rq": digest, "v": version.number, "act": activates_at,
                               "exp": expires_at, "lim": limit}))

    try:
        record, answer, replayed = await backend.write_one(op_id, digest, build,
                                                           context, _fields)
    except ApiError as err:
        if err.reason == "ACTION_LIMIT_REACHED":
            raise from_kernel(Code.LIMIT_REACHED, message=(
                f"action: the member has had '{request.action}' {limit} "
                f"time(s), the most the program allows"), limit=limit) from None
        raise
    out = members_pb2.AwardActionResponse(
        member=convert.member_name(record.program, record.account),
        program_version=convert.version_name(record.program, answer["v"]),
        points=record.earned, lot_number=record.earned_lot, count=record.b,
        limit=answer["lim"], balances=backend.balances(record.account),
        replayed=replayed)
    convert.set_time(out, "activate_time", answer["act"])
    convert.set_time(out, "expire_time", answer["exp"])
    return out
