"""Members and cards: enrolment, look-ups, the profile, cards, merging.

Idempotency. Where the ledger keeps an operation's data (LINK_CARD,
BLOCK_CARD, REPLACE_CARD, TRANSFER) the client's `operation_id` carries the
request digest as data, as everywhere (backend.py). The ledger keeps no data
of profile operations (OPEN_ACCOUNT, SET_PROFILE: the profile lives in its
own table only, so an erasure leaves no copy), hence:
- EnrolMember's OPEN_ACCOUNT is a function of the request alone (its profile
  holds the request digest, no clock), so the ledger's own digest of the
  operation tells a retry (same bytes) from another request (OP_ID_REUSED).
- UpdateMember and EraseMember write the profile under the client's id and
  stamp it with that id and the request digest; a retry compares with the
  stamp. Once a later client write has replaced the stamp, a retry is
  recognised by the operation's kind and member only.

Several kernel operations per RPC. The kernel applies a batch's operations
independently, so what depends on an earlier operation is committed after it
succeeded, under ids derived from the client's (`<id>/card`, ...), each
skipped when already applied: a retry completes what a crash interrupted.
- EnrolMember: OPEN_ACCOUNT, then LINK_CARD and the welcome EARN together.
  The card is checked free before the open, so only a race (the same number
  issued meanwhile) can refuse the link after the member exists; that refusal
  is reported, and the member stays enrolled without the card.
- UpdateMember: SET_ACCOUNT_STATUS, then SET_PROFILE (the client's id).
- MergeMembers: TRANSFER of every lot and open coupon (the client's id; the
  survivor keeps one coupon at most where the program has one per
  customer), then closing the source and recording `merged_into` in its
  profile.
Profile writes read, change and write the whole blob, so they run under a
per-member lock (one server process writes the ledger).
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import weakref

from google.type import date_pb2

from kopilka.core.batch import Batch
from kopilka.core.lifetimes import lot_times
from kopilka.core.reads import balances_of
from kopilka.core.records import (CARD, CardStatus, Code, Kind,
                                  Status)
from kopilka.v1 import common_pb2, members_pb2, members_pb2_grpc

from . import awards, convert, profiles
from .backend import derived_id, pack, request_digest
from .status import ApiError, Checks, from_kernel, invalid, server, unfinished

BASIC, FULL = members_pb2.MEMBER_VIEW_BASIC, members_pb2.MEMBER_VIEW_FULL
UPDATABLE = ("state", "birthday", "referrer")
MAX_MERGE_HOPS = 16


def op_digest(batch):
    """The ledger's digest of a one-operation batch: what it stores with the
    operation and compares a retry's with (records.OPERATION `digest`)."""
    return hashlib.blake2b(bytes(batch), digest_size=16).digest()


def _fields(**names):
    return lambda code: names.get(code.name)


def _view(checks, value, field="view"):
    if value not in (members_pb2.MEMBER_VIEW_UNSPECIFIED, BASIC, FULL):
        checks.add(field, "must be MEMBER_VIEW_BASIC or MEMBER_VIEW_FULL")
    return FULL if value == FULL else BASIC


def _birthday(checks, date, field):
    problem = profiles.birthday_problem(date.month, date.day)
    if problem:
        checks.add(field, problem)
        return None
    return date.month, date.day


def _reused():
    return from_kernel(Code.OP_ID_REUSED, message="operation_id was used before "
                       "for a different request")


class Members(members_pb2_grpc.MembersServicer):
    def __init__(self, backend):
        self.backend = backend
        self._locks = weakref.WeakValueDictionary()

    # --- reading ------------------------------------------------------------
    async def GetMember(self, request, context):
        checks = Checks()
        name = checks.run(convert.parse_member, request.name, "name")
        view = _view(checks, request.view)
        checks.done()
        self.backend.account(*name, field="name")
        return members_pb2.GetMemberResponse(member=self._member(name[1], view))

    async def LookupMember(self, request, context):
        checks = Checks()
        program = checks.run(convert.parse_program, request.parent, "parent")
        external = checks.run(convert.identifier, request.external_id, "external_id")
        view = _view(checks, request.view)
        checks.done()
        self.backend.program(program, "parent")
        account = self.backend.ledger.account_id(program, external)
        if account is None:
            raise ApiError("NOT_FOUND", "MEMBER_NOT_FOUND",
                           "external_id: no member has this external id")
        return members_pb2.LookupMemberResponse(member=self._member(account, view))

    async def ResolveCard(self, request, context):
        checks = Checks()
        program = checks.run(convert.parse_program, request.parent, "parent")
        card = checks.run(convert.identifier, request.card_number, "card_number")
        view = _view(checks, request.view)
        checks.done()
        account, status = self._card(program, card)
        return members_pb2.ResolveCardResponse(
            card=members_pb2.Card(card_number=request.card_number, state=status,
                                  member=convert.member_name(program, account)),
            member=self._member(self._surviving(account), view))

    def _card(self, program, card, field="card_number"):
        """(account, CardStatus) of a card of `program`; CARD_NOT_FOUND else."""
        found = self.backend.ledger.card(card)
        if found is not None:
            account = self.backend.ledger.account(found[0])
            if account is not None and account.program == program:
                return found
        raise ApiError("NOT_FOUND", "CARD_NOT_FOUND",
                       f"{field}: no card of this program has this number")

    def _surviving(self, account_id):
        """The member a merged member's points went to (followed to the end)."""
        for _ in range(MAX_MERGE_HOPS):
            merged_into = self._profile(account_id).merged_into
            if not merged_into:
                break
            account_id = merged_into
        return account_id

    def _profile(self, account_id):
        return profiles.decode(self.backend.ledger.profile(account_id))

    def _member(self, account_id, view=BASIC):
        """The Member message of an account, read now."""
        b = self.backend
        now = b.clock()
        account = b.ledger.account(account_id)
        profile = self._profile(account_id)
        program = account.program
        balances = balances_of(account_id, account, now)
        out = members_pb2.Member(
            name=convert.member_name(program, account_id),
            external_id=profile.external_id, state=account.status,
            tier=b.tier_name(program, account.tier, now),
            regular=b.regular(account, now),
            balances=convert.balances(balances, now))
        if profile.birthday:
            out.birthday.CopyFrom(date_pb2.Date(month=profile.birthday[0],
                                                day=profile.birthday[1]))
        if profile.referrer:
            out.referrer = convert.member_name(program, profile.referrer)
        if profile.merged_into:
            out.merged_into = convert.member_name(program, profile.merged_into)
        convert.set_time(out, "enrol_time", account.opened_at)
        if profile.erased_at:
            convert.set_time(out, "erase_time", profile.erased_at)
        if account.coupons:
            currency = self._currency(program)
            out.coupons.extend(convert.member_coupon(account_id, c, currency, now)
                               for c in account.coupons)
        if view == FULL:
            for lot in account.lots:
                if lot.remaining > 0 and lot.expires_at > now:
                    pb = out.lots.add(lot_number=lot.lot_no,
                                      partner=convert.partner_name(program, lot.partner),
                                      remaining_points=lot.remaining)
                    convert.set_time(pb, "activate_time", lot.activates_at)
                    convert.set_time(pb, "expire_time", lot.expires_at)
            for hold in account.holds:
                if hold.expires_at > now:
                    pb = out.holds.add(hold_number=hold.hold_no, points=hold.amount)
                    convert.set_time(pb, "expire_time", hold.expires_at)
        return out

    def _currency(self, program_id):
        entry = self.backend.registry.get(program_id)
        return entry.program.currency if entry is not None else ""

    # --- enrolment ----------------------------------------------------------
    async def EnrolMember(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        program = checks.run(convert.parse_program, request.parent, "parent")
        external = checks.run(convert.identifier, request.external_id, "external_id")
        birthday = referrer = card = None
        if request.HasField("birthday"):
            birthday = _birthday(checks, request.birthday, "birthday")
        if request.referrer:
            parsed = checks.run(convert.parse_member, request.referrer, "referrer")
            if parsed and program and parsed[0] != program:
                checks.add("referrer", "must be a member of the same program")
            referrer = parsed[1] if parsed else None
        if request.card_number:
            card = checks.run(convert.identifier, request.card_number, "card_number")
        checks.done()

        digest = request_digest(request)
        profile = profiles.Profile(external_id=request.external_id, birthday=birthday,
                                   referrer=referrer or 0, op=request.operation_id,
                                   rq=digest)
        opening = Batch().open_account(op_id, program, external, data=profile.encode(),
                                       birthday=birthday)
        record = b.ledger.operation(op_id)
        if record is not None:
            account, replayed = self._enrolled(record, opening), True
        else:
            b.program(program, "parent")
            if referrer:
                b.account(program, referrer, "referrer")
            if b.ledger.account_id(program, external) is not None:
                raise from_kernel(Code.ACCOUNT_EXISTS, message="a member with this "
                                  "external_id is already enrolled in the program")
            if card and b.ledger.card(card) is not None:
                raise from_kernel(Code.CARD_EXISTS, message="card_number: this card "
                                  "number is already issued")
            result = (await b.apply(opening, context))[0]
            if result.code == Code.OP_ID_REUSED:  # a racing copy committed first
                account, replayed = self._enrolled(b.ledger.operation(op_id),
                                                   opening), True
            elif result.code != Code.OK:
                raise b.refusal(result.code, _fields(KEY_INVALID="external_id"))
            else:
                account, replayed = result.a, result.replayed
        welcome = await self._after_enrolment(op_id, program, account, card, context)
        out = members_pb2.EnrolMemberResponse(member=self._member(account),
                                              welcome_points=welcome, replayed=replayed)
        if card:
            found = b.ledger.card(card)
            out.card.CopyFrom(members_pb2.Card(
                card_number=request.card_number, state=found[1] if found else 0,
                member=convert.member_name(program, account)))
        return out

    def _enrolled(self, record, opening):
        """The account a stored enrolment opened, if `opening` is that request."""
        if record.kind != Kind.OPEN_ACCOUNT or record.digest != op_digest(opening):
            raise _reused()
        return record.account

    async def _after_enrolment(self, op_id, program, account, card, context):
        """Links the first card and credits the welcome bonus (each once);
        returns the welcome points credited."""
        b = self.backend
        card_op, welcome_op = derived_id(op_id, "/card"), derived_id(op_id, "/welcome")
        batch, fields = Batch(), []
        if card and b.ledger.operation(card_op) is None:
            batch.link_card(card_op, account, card)
            fields.append("card_number")
        if b.ledger.operation(welcome_op) is None:
            welcome = self._welcome(program, b.ledger.account(account).opened_at)
            if welcome:
                points, version, at, (activates_at, expires_at) = welcome
                batch.earn(welcome_op, account, points, activates_at=activates_at,
                           expires_at=expires_at, version=version, business_time=at)
                fields.append(None)
        if len(batch):
            try:
                results = await b.apply(batch, context)
            except ApiError as err:
                raise unfinished(err, "the member was enrolled as "
                                 f"{convert.member_name(program, account)}",
                                 " and ".join("the card" if f else "the welcome bonus"
                                              for f in fields)) from None
            for result, field in zip(results, fields):
                if result.code != Code.OK:
                    raise from_kernel(result.code, field, message=(
                        f"the member was enrolled as "
                        f"{convert.member_name(program, account)}, but "
                        f"{'linking the card' if field else 'the welcome bonus'} "
                        f"was refused: {result.code.name.lower()}"))
        record = b.ledger.operation(welcome_op)
        return record.earned if record is not None else 0

    def _welcome(self, program_id, at):
        """(points, version, at, (activates_at, expires_at)) of the welcome
        bonus of the version in force at enrolment time `at`, or None. A
        function of that time alone, so a retry credits the same lot."""
        entry = self.backend.registry.get(program_id)
        if entry is None:
            return None
        try:
            v = entry.program.version_at(at)
        except LookupError:
            return None
        if not v.bonuses.welcome:
            return None
        times = lot_times(v.lifetime.for_kind("welcome"), at, entry.program.zone)
        return v.bonuses.welcome, v.number, at, times

    # --- the profile --------------------------------------------------------
    async def UpdateMember(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        name = checks.run(convert.parse_member, request.member.name, "member.name")
        paths = list(request.update_mask.paths)
        if not paths:
            checks.add("update_mask", "name the fields to change: state, birthday, "
                                      "referrer")
        for i, path in enumerate(paths):
            if path not in UPDATABLE:
                checks.add(f"update_mask.paths[{i}]", "must be state, birthday or "
                                                      "referrer")
        m = request.member
        state = m.state if "state" in paths else common_pb2.MEMBER_STATE_UNSPECIFIED
        if state and state not in (Status.ACTIVE, Status.BLOCKED, Status.CLOSED):
            checks.add("member.state", "must be MEMBER_STATE_ACTIVE, _BLOCKED or "
                                       "_CLOSED", "MEMBER_STATE_INVALID")
        birthday = referrer = None
        if "birthday" in paths and m.HasField("birthday"):
            birthday = _birthday(checks, m.birthday, "member.birthday")
        if "referrer" in paths and m.referrer:
            parsed = checks.run(convert.parse_member, m.referrer, "member.referrer")
            if parsed and name and parsed[0] != name[0]:
                checks.add("member.referrer", "must be a member of the same program")
            elif parsed and name and parsed == name:
                checks.add("member.referrer", "must be another member")
            referrer = parsed[1] if parsed else None
        checks.done()

        program, account = name
        digest = request_digest(request)
        async with self._lock(account):
            record = b.ledger.operation(op_id)
            if record is not None:
                self._stamped(record, request.operation_id, account, digest)
                return members_pb2.UpdateMemberResponse(member=self._member(account),
                                                        replayed=True)
            current = b.account(program, account, "member.name")
            profile = self._profile(account)
            if referrer:
                b.account(program, referrer, "member.referrer")
                self._check_no_receipt(current)
            if state and state != current.status:
                state_op = derived_id(op_id, "/state")
                if b.ledger.operation(state_op) is None:
                    result = (await b.apply(Batch().set_account_status(
                        state_op, account, state), context))[0]
                    if result.code != Code.OK:
                        raise b.refusal(result.code,
                                        _fields(STATUS_INVALID="member.state"))
            changes = {}
            if "birthday" in paths:
                changes["birthday"] = birthday
            if "referrer" in paths:
                changes["referrer"] = referrer or 0
            updated = dataclasses.replace(profile, **changes).stamped(
                request.operation_id, digest)
            await self._write_profile(op_id, account, digest, request.operation_id,
                                      Batch().set_profile(op_id, account,
                                                          updated.encode(),
                                                          birthday=updated.birthday),
                                      context)
        return members_pb2.UpdateMemberResponse(member=self._member(account))

    def _check_no_receipt(self, account):
        """A referrer may be set only before the member's first receipt: while
        nothing was spent and no receipt with money recorded (the account's
        `last_day`), whatever bonuses (welcome, actions) were earned."""
        if account.spent or account.last_day:
            raise invalid([("member.referrer",
                            "may change only before the member's first receipt")])

    async def EraseMember(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        name = checks.run(convert.parse_member, request.name, "name")
        checks.done()
        program, account = name
        digest = request_digest(request)
        async with self._lock(account):
            record = b.ledger.operation(op_id)
            if record is not None:
                profile = self._stamped(record, request.operation_id, account, digest)
                blocked = profile.blocked_cards if profile.op == request.operation_id \
                    else 0
                return members_pb2.EraseMemberResponse(
                    member=self._member(account), blocked_cards=blocked, replayed=True)
            b.account(program, account, "name")
            profile = self._profile(account)
            cards = self._active_cards(account) if request.block_cards else []
            batch = Batch()
            for i, card in enumerate(cards, 1):
                batch.block_card(derived_id(op_id, f"/block-{i}"), card)
            erased = profile.erase(b.clock(), len(cards)).stamped(
                request.operation_id, digest)
            batch.set_profile(op_id, account, erased.encode(), erase=True,
                              external_id=profile.external_id.encode())
            await self._write_profile(op_id, account, digest, request.operation_id,
                                      batch, context)
        return members_pb2.EraseMemberResponse(member=self._member(account),
                                               blocked_cards=len(cards))

    async def _write_profile(self, op_id, account, digest, client_id, batch, context):
        """Commits a batch whose last operation writes the profile under the
        client's id; its refusal is the RPC's."""
        result = (await self.backend.apply(batch, context))[-1]
        if result.code == Code.OP_ID_REUSED:
            self._stamped(self.backend.ledger.operation(op_id), client_id, account,
                          digest)
        elif result.code != Code.OK:
            raise self.backend.refusal(result.code)

    def _stamped(self, record, client_id, account, digest):
        """The profile, when `record` (the client id's operation) is this
        request's profile write; OPERATION_ID_REUSED otherwise."""
        if record.kind != Kind.SET_PROFILE or record.account != account:
            raise _reused()
        profile = self._profile(account)
        if profile.op == client_id and profile.rq != digest:
            raise _reused()
        return profile

    def _active_cards(self, account):
        """The member's active card numbers. The ledger indexes cards by number
        only, so this reads them all: fine for an erasure, which is rare."""
        found = []
        with self.backend.ledger._snapshot() as snap:
            for number, value in snap.scan("cards"):
                owner, status = CARD.unpack(value)
                if owner == account and status == CardStatus.ACTIVE:
                    found.append(number)
        return found

    def _lock(self, account):
        lock = self._locks.get(account)
        if lock is None:
            lock = self._locks[account] = asyncio.Lock()
        return lock

    # --- cards --------------------------------------------------------------
    async def IssueCard(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        name = checks.run(convert.parse_member, request.parent, "parent")
        card = checks.run(convert.identifier, request.card_number, "card_number")
        checks.done()
        program, account = name
        digest = request_digest(request)

        def build(batch):
            b.account(program, account, "parent")
            batch.link_card(op_id, account, card, data=pack({"rq": digest}))
        record, _, replayed = await b.write_one(op_id, digest, build, context,
                                                _fields(KEY_INVALID="card_number"))
        return members_pb2.IssueCardResponse(
            card=self._card_message(program, record.account, request.card_number),
            replayed=replayed)

    async def BlockCard(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        program = checks.run(convert.parse_program, request.parent, "parent")
        card = checks.run(convert.identifier, request.card_number, "card_number")
        checks.done()
        digest = request_digest(request)

        def build(batch):
            self._card(program, card)
            batch.block_card(op_id, card, data=pack({"rq": digest}))
        record, _, replayed = await b.write_one(op_id, digest, build, context,
                                                _fields(KEY_INVALID="card_number"))
        return members_pb2.BlockCardResponse(
            card=self._card_message(program, record.account, request.card_number),
            replayed=replayed)

    async def ReplaceCard(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        program = checks.run(convert.parse_program, request.parent, "parent")
        old = checks.run(convert.identifier, request.card_number, "card_number")
        new = checks.run(convert.identifier, request.new_card_number, "new_card_number")
        if old and old == new:
            checks.add("new_card_number", "must differ from card_number")
        checks.done()
        digest = request_digest(request)

        def build(batch):
            self._card(program, old)
            batch.replace_card(op_id, old, new, data=pack({"rq": digest}))
        record, _, replayed = await b.write_one(op_id, digest, build, context,
                                                _fields(KEY_INVALID="new_card_number"))
        return members_pb2.ReplaceCardResponse(
            old_card=self._card_message(program, record.account, request.card_number),
            new_card=self._card_message(program, record.account,
                                        request.new_card_number),
            replayed=replayed)

    def _card_message(self, program, account, number):
        found = self.backend.ledger.card(number.encode())
        return members_pb2.Card(card_number=number,
                                member=convert.member_name(program, account),
                                state=found[1] if found else 0)

    # --- bonuses ------------------------------------------------------------
    async def AwardAction(self, request, context):
        return await awards.award_action(self.backend, request, context)

    # --- merging ------------------------------------------------------------
    async def MergeMembers(self, request, context):
        b = self.backend
        checks = Checks()
        op_id = checks.run(convert.operation_id, request.operation_id)
        name = checks.run(convert.parse_member, request.name, "name")
        source = checks.run(convert.parse_member, request.source, "source")
        if name and name == source:
            checks.add("source", "must be another member than name", "SAME_MEMBER")
        checks.done()
        digest = request_digest(request)
        (program, target), (source_program, merged) = name, source
        async with contextlib.AsyncExitStack() as stack:
            for account in sorted((target, merged)):
                await stack.enter_async_context(self._lock(account))
            first = b.stored(op_id, digest)
            if first is not None:
                (record, _), replayed = first, True
            else:
                self._check_merge(program, target, source_program, merged)
                one = _one_coupon(b.program(program, "name").program, b.clock())
                try:
                    record, _, replayed = await b.write_one(
                        op_id, digest, lambda batch: batch.transfer(
                            op_id, merged, target, everything=True, one_coupon=one,
                            data=pack({"rq": digest})), context)
                except ApiError as err:
                    if err.reason == "INSUFFICIENT_POINTS":  # a hold placed meanwhile
                        raise _open_holds() from None
                    raise
            await self._close_merged(op_id, target, merged, context)
        return members_pb2.MergeMembersResponse(
            member=self._member(target), source=self._member(merged),
            moved_points=record.a, replayed=replayed)

    def _check_merge(self, program, target, source_program, merged):
        b = self.backend
        b.account(program, target, "name")
        source = b.account(source_program, merged, "source")
        if program != source_program:
            raise from_kernel(Code.PROGRAM_MISMATCH, message="name and source are "
                              "members of different programs")
        if source.status == Status.CLOSED:
            raise from_kernel(Code.ACCOUNT_CLOSED, message="source: the member is "
                              "closed")
        now = b.clock()
        if any(hold.expires_at > now for hold in source.holds):
            raise _open_holds()
        if source.debt > 0:
            raise from_kernel(Code.ACCOUNT_IN_DEBT, message="source: the member owes "
                              "points; they must be paid off first",
                              debt_points=source.debt)

    async def _close_merged(self, op_id, target, merged, context):
        """Closes the merged member and links it to the survivor (each once)."""
        b = self.backend
        close_op, link_op = derived_id(op_id, "/close"), derived_id(op_id, "/merged")
        batch = Batch()
        if b.ledger.operation(close_op) is None:
            batch.set_account_status(close_op, merged, Status.CLOSED)
        if b.ledger.operation(link_op) is None:
            linked = dataclasses.replace(self._profile(merged), merged_into=target)
            batch.set_profile(link_op, merged, linked.encode(), birthday=linked.birthday)
        if len(batch):
            for result in await b.apply(batch, context):
                if result.code not in (Code.OK, Code.ACCOUNT_CLOSED):
                    raise b.refusal(result.code)


def _one_coupon(program, now):
    """Whether a merge leaves the survivor one open coupon at most: the
    program's one per customer, by the version in force now (a version
    without coupons: one, the rule DESIGN.md's programs have)."""
    try:
        coupon = program.version_at(now).coupon
    except LookupError:   # before version 1
        coupon = program.versions[0].coupon
    return coupon is None or coupon.one_per_customer


def _open_holds():
    return server("MEMBER_HAS_OPEN_HOLDS", "source: the member has open holds; "
                  "capture or void them first")
