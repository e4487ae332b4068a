"""Programs: create and version a program from its definition text; read it.

A definition arrives as the TOML file's text (or the same structure as
JSON), is parsed by the same code as `kopilka program apply`, and is
committed as the data of one PUT_PROGRAM operation, so the ledger keeps the
rules with the program and a backup carries both (registry.py). The parsed
program goes into the registry only once that commit is durable.

Updates only append: every version already applied must come back
unchanged, new versions may not take effect in the past (receipts already
priced are never re-priced), and the id, currency and time zone are fixed.
Updates of one program are taken one at a time, so two racing updates are
each checked against what the other applied.

Idempotency: PUT_PROGRAM is a function of the request alone (the program id,
its flags and the definition text), so the ledger's own digest of the
operation tells a retry from another request under the same id (see
members.op_digest).
"""

import asyncio
import base64
import re
import weakref

from google.protobuf import empty_pb2

from kopilka.core.batch import Batch
from kopilka.core.program import ProgramError
from kopilka.core.records import MAX_DATA, Code, Kind
from kopilka.v1 import common_pb2, programs_pb2, programs_pb2_grpc

from . import convert, registry
from .members import Checks, op_digest
from .status import from_kernel, invalid, server

MAX_DEFINITION = 1 << 20   # bytes of definition text
DEFAULT_PAGE, MAX_PAGE = 50, 100
BASIC, FULL = programs_pb2.PROGRAM_VIEW_BASIC, programs_pb2.PROGRAM_VIEW_FULL
INT32_MAX = (1 << 31) - 1
_POSITION = re.compile(r"\[(\d+)\]")


class Programs(programs_pb2_grpc.ProgramsServicer):
    def __init__(self, backend):
        self.backend = backend
        self._locks = weakref.WeakValueDictionary()

    async def CreateProgram(self, request, context):
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        source, text = _definition(checks, request.definition)
        checks.done()
        program = _parse(source, text)
        batch = _put(op_id, program, source, text)
        async with self._lock(program.id):
            if not request.validate_only and self._replayed(op_id, batch):
                return programs_pb2.CreateProgramResponse(
                    program=self._message(program.id, FULL), replayed=True)
            if self.backend.registry.get(program.id) is not None:
                raise server("PROGRAM_ALREADY_EXISTS", f"program {program.id} exists; "
                             "use UpdateProgram", program=program.id)
            if request.validate_only:
                return programs_pb2.CreateProgramResponse(
                    program=program_message(program, FULL, self.backend.clock(),
                                            source, text))
            await self._commit(op_id, batch, program, source, text, context)
        return programs_pb2.CreateProgramResponse(program=self._message(program.id, FULL))

    async def UpdateProgram(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        program_id = checks.run(convert.parse_program, request.name, "name")
        source, text = _definition(checks, request.definition)
        checks.done()
        program = _parse(source, text)
        if program.id != program_id:
            raise server("PROGRAM_CHANGE_NOT_ALLOWED", f"the definition is of program "
                         f"{program.id}, not {program_id}: a program's id is fixed")
        batch = _put(op_id, program, source, text)
        async with self._lock(program_id):
            if not request.validate_only and self._replayed(op_id, batch):
                # Which versions the first call added is not stored: those
                # not yet in force when the program was last applied (exact
                # unless an earlier update had scheduled one ahead too).
                entry = b.registry.get(program.id)
                added = [v for v in entry.program.versions
                         if v.effective_from >= entry.updated_at]
                return programs_pb2.UpdateProgramResponse(
                    program=self._message(program.id, FULL), replayed=True,
                    added_versions=[convert.version_name(program.id, v.number)
                                    for v in added])
            entry = b.program(program_id, "name")
            now = b.clock()
            added = _appended(entry.program, program, now)
            names = [convert.version_name(program.id, v.number) for v in added]
            if request.validate_only:
                out = program_message(program, FULL, now, source, text)
                convert.set_time(out, "create_time", entry.created_at)
                return programs_pb2.UpdateProgramResponse(program=out,
                                                          added_versions=names)
            await self._commit(op_id, batch, program, source, text, context)
        return programs_pb2.UpdateProgramResponse(
            program=self._message(program.id, FULL), added_versions=names)

    async def GetProgram(self, request, context):
        checks = Checks()
        program_id = checks.run(convert.parse_program, request.name, "name")
        view = _view(checks, request.view)
        checks.done()
        self.backend.program(program_id, "name")
        return programs_pb2.GetProgramResponse(program=self._message(program_id, view))

    async def ListPrograms(self, request, context):
        checks = Checks()
        size = request.page_size or DEFAULT_PAGE
        if not 1 <= size <= MAX_PAGE:
            checks.add("page_size", f"must be 0 (for {DEFAULT_PAGE}) to {MAX_PAGE}")
        after = checks.run(_page_after, request.page_token)
        view = _view(checks, request.view)
        checks.done()
        ids = [i for i in self.backend.registry.ids() if i > after]
        out = programs_pb2.ListProgramsResponse(
            programs=[self._message(i, view) for i in ids[:size]])
        if len(ids) > size:
            out.next_page_token = _page_token(ids[size - 1])
        return out

    # --- helpers ------------------------------------------------------------
    def _lock(self, program_id):
        lock = self._locks.get(program_id)
        if lock is None:
            lock = self._locks[program_id] = asyncio.Lock()
        return lock

    def _replayed(self, op_id, batch):
        """True for a retry of a committed request; OPERATION_ID_REUSED when
        the id was used for anything else."""
        record = self.backend.ledger.operation(op_id)
        if record is None:
            return False
        if record.kind != Kind.PUT_PROGRAM or record.digest != op_digest(batch):
            raise from_kernel(Code.OP_ID_REUSED, message="operation_id was used "
                              "before for a different request")
        return True

    async def _commit(self, op_id, batch, program, source, text, context):
        b = self.backend
        result = (await b.apply(batch, context))[0]
        if result.code == Code.OP_ID_REUSED:
            self._replayed(op_id, batch)  # raises unless a racing copy won
        elif result.code != Code.OK:
            raise b.refusal(result.code)
        record = next(r for r in b.ledger.programs() if r.program == program.id)
        b.registry.put(program.id, program, source, text, record.created_at,
                       record.updated_at)

    def _message(self, program_id, view):
        entry = self.backend.registry.get(program_id)
        out = program_message(entry.program, view, self.backend.clock(),
                              entry.source, entry.text)
        convert.set_time(out, "create_time", entry.created_at)
        convert.set_time(out, "update_time", entry.updated_at)
        return out


def _put(op_id, program, source, text):
    return Batch().put_program(op_id, program.id, flags=program.kernel_flags,
                               utc_offset_minutes=program.utc_offset_minutes,
                               data=registry.encode(source, text))


def _definition(checks, definition):
    """(source, text) of a ProgramDefinition."""
    source = definition.WhichOneof("source")
    if source is None:
        checks.add("definition", "set toml or json")
        return None, None
    text = getattr(definition, source)
    if not text.strip():
        checks.add(f"definition.{source}", "is empty")
    elif len(text.encode()) > MAX_DEFINITION:
        checks.add(f"definition.{source}", f"must be at most {MAX_DEFINITION} bytes")
    elif len(registry.encode(source, text)) > MAX_DATA:
        checks.add(f"definition.{source}", f"must be at most {MAX_DATA - 5} bytes "
                                           "(what the ledger stores with a program)")
    return source, text


def _parse(source, text):
    """The Program, or PROGRAM_DEFINITION_INVALID naming every problem by its
    path in the API's way (`definition.version[1].earn.per`: from 0)."""
    try:
        return registry.parse(source, text)
    except ProgramError as error:
        raise invalid([(api_path(p.path, source), p.reason) for p in error.problems],
                      "PROGRAM_DEFINITION_INVALID") from None


def api_path(path, source):
    """A definition's problem path (positions from 1) as a request field path
    (positions from 0); the whole text when the problem has no path."""
    if not path:
        return f"definition.{source}"
    return "definition." + _POSITION.sub(lambda m: f"[{int(m[1]) - 1}]", path)


def _appended(old, new, now):
    """The versions `new` adds to `old`; PROGRAM_CHANGE_NOT_ALLOWED when it
    changes what is fixed."""
    def refuse(message, **metadata):
        return server("PROGRAM_CHANGE_NOT_ALLOWED", message, **metadata)
    for what, before, after in (("currency", old.currency, new.currency),
                                ("time zone", old.time_zone, new.time_zone)):
        if before != after:
            raise refuse(f"the program's {what} is {before} and cannot change")
    if len(new.versions) < len(old.versions):
        raise refuse(f"versions 1 to {len(old.versions)} were applied and must "
                     "all be kept", version=len(new.versions) + 1)
    for before, after in zip(old.versions, new.versions):
        if before != after:
            raise refuse(f"version {before.number} was applied and cannot change; "
                         "add a new version instead", version=before.number)
    added = new.versions[len(old.versions):]
    for v in added:
        if v.effective_from < now:
            raise refuse(f"version {v.number} would take effect in the past",
                         version=v.number)
    return added


def _view(checks, value):
    if value not in (programs_pb2.PROGRAM_VIEW_UNSPECIFIED, BASIC, FULL):
        checks.add("view", "must be PROGRAM_VIEW_BASIC or PROGRAM_VIEW_FULL")
    return FULL if value == FULL else BASIC


def _page_token(last_id):
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode()


def _page_after(token):
    """The last program id of the previous page (0: the first page)."""
    if not token:
        return 0
    try:
        kind, _, last = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "after" and last.isdigit():
            return int(last)
    except (ValueError, UnicodeError):
        pass
    raise invalid([("page_token", "is not a token this server gave")])


# --- Program -> protobuf -----------------------------------------------------

def program_message(p, view, now, source=None, text=None):
    """The Program message of a core Program (every version in full, as
    Program.to_dict() writes them; rules only in PROGRAM_VIEW_FULL)."""
    out = programs_pb2.Program(
        name=convert.program_name(p.id), display_name=p.name, currency_code=p.currency,
        time_zone=p.time_zone, allow_debt=p.allow_debt,
        partners=[programs_pb2.Partner(name=convert.partner_name(p.id, x.id),
                                       display_name=x.name) for x in p.partners],
        stores=[programs_pb2.StoreDefinition(
            name=f"stores/{s.id}", display_name=s.name,
            partner=convert.partner_name(p.id, s.partner), time_zone=s.time_zone,
            lanes=[_i32(lane) for lane in s.lanes]) for s in p.stores])
    try:
        out.current_version = convert.version_name(p.id, p.version_at(now).number)
    except LookupError:
        pass  # no version in force yet
    for v in p.versions:
        pv = out.versions.add(name=convert.version_name(p.id, v.number),
                              number=v.number, note=v.note)
        convert.set_time(pv, "effective_time", v.effective_from)
        if view == FULL:
            _version_rules(pv, v, _Money(p.currency))
    if view == FULL and source:
        setattr(out.definition, source, text)
    return out


def _i32(value):
    """int32 proto fields whose definition values may be larger (lanes,
    limits, counts): saturated rather than failing the whole answer."""
    return min(value, INT32_MAX)


class _Money:
    def __init__(self, currency):
        self.currency = currency

    def __call__(self, minor_units):
        return common_pb2.Money(currency_code=self.currency, minor_units=minor_units)


def _enum(enum, prefix, name):
    return enum.Value(f"{prefix}_{name.upper()}") if name else 0


def _period(name):
    return _enum(programs_pb2.Period, "PERIOD", name)


def _rate(rate, money):
    if rate.percent_bp is not None:
        return programs_pb2.Rate(percent_bp=rate.percent_bp)
    return programs_pb2.Rate(points_per=programs_pb2.PointsPer(points=rate.points,
                                                               per=money(rate.per)))


def _expiry(expiry):
    if expiry.days is not None:
        return programs_pb2.Expiry(days=expiry.days)
    if expiry.end_of is not None:
        return programs_pb2.Expiry(end_of_period=programs_pb2.PeriodEnd(
            period=_period(expiry.end_of), periods_later=expiry.periods_later))
    return programs_pb2.Expiry(never=empty_pb2.Empty())


def _version_rules(pv, v, money):
    pv.point_value.CopyFrom(money(v.point_value))
    pv.items.CopyFrom(programs_pb2.Items(categories=v.items.categories,
                                         flags=v.items.flags))
    e = v.earn
    pv.earn.CopyFrom(programs_pb2.Earn(
        rate=_rate(e.rate, money),
        rounding=_enum(programs_pb2.Rounding, "ROUNDING", e.rounding),
        rounding_scope=_enum(programs_pb2.RoundingScope, "ROUNDING_SCOPE",
                             e.rounding_scope),
        exclude_flags=e.exclude_flags,
        categories=[programs_pb2.CategoryRate(category=c.category,
                                              rate=_rate(c.rate, money))
                    for c in e.categories]))
    s = v.spend
    pv.spend.CopyFrom(programs_pb2.Spend(
        cap_bp=s.cap_bp, min_balance_points=s.min_balance, min_points=s.min_points,
        min_receipt=money(s.min_receipt), exclude_flags=s.exclude_flags,
        exclude_categories=s.exclude_categories))
    lt = v.lifetime
    pv.lifetime.CopyFrom(programs_pb2.Lifetime(
        activation_days=lt.activation_days, expiry=_expiry(lt.expiry)))
    for o in lt.overrides:
        po = pv.lifetime.overrides.add(
            kind=_enum(programs_pb2.BonusKind, "BONUS_KIND", o.kind))
        if o.activation_days is not None:
            po.activation_days = o.activation_days
        if o.expiry is not None:
            po.expiry.CopyFrom(_expiry(o.expiry))
    if v.tiers is not None:
        pv.tiers.period = _period(v.tiers.period)
        for t in v.tiers.levels:
            pt = pv.tiers.levels.add(name=t.name, min_spend=money(t.min_spend),
                                     discount_bp=t.discount_bp)
            if t.rate is not None:
                pt.rate.CopyFrom(_rate(t.rate, money))
    bo = v.bonuses
    pv.bonuses.CopyFrom(programs_pb2.Bonuses(welcome_points=bo.welcome,
                                             birthday_points=bo.birthday))
    for a in bo.actions:
        pa = pv.bonuses.actions.add(name=a.name, points=a.points,
                                    limit_period=_period(a.limit_period))
        if a.limit is not None:
            pa.limit = _i32(a.limit)
    if bo.visits is not None:
        pv.bonuses.visits.CopyFrom(programs_pb2.VisitBonus(
            count=_i32(bo.visits.count), points=bo.visits.points,
            period=_period(bo.visits.period), min_receipt=money(bo.visits.min_receipt)))
    if v.referral is not None:
        r = v.referral
        pv.referral.CopyFrom(programs_pb2.Referral(
            window_days=r.window_days, newcomer_discount_bp=r.newcomer_discount_bp,
            referrer_share_bp=r.referrer_share_bp))
    if v.coupon is not None:
        c = v.coupon
        pv.coupon.CopyFrom(programs_pb2.Coupon(
            threshold=money(c.threshold), value=money(c.value),
            usable_after_days=c.usable_after_days, one_per_customer=c.one_per_customer))
        if c.valid_days is not None:
            pv.coupon.valid_days = c.valid_days
        if c.valid_months is not None:
            pv.coupon.valid_months = c.valid_months
    if v.regular_customer is not None:
        pv.regular_customer.CopyFrom(programs_pb2.RegularCustomer(
            min_visits=_i32(v.regular_customer.min_visits),
            within_days=v.regular_customer.within_days))
    pv.discounts.exclude_flags.extend(v.discounts.exclude_flags)
    for o in v.discounts.offers:
        po = pv.discounts.offers.add(name=o.name, additive=o.additive,
                                     min_receipt=money(o.min_receipt), tiers=o.tiers,
                                     regular=o.regular, newcomer=o.newcomer)
        if o.percent_bp is not None:
            po.percent_bp = o.percent_bp
        else:
            po.money.CopyFrom(money(o.amount))
