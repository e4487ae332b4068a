"""`member enrol|get|lookup|award` and `card issue|resolve|block|replace`:
members, their balances, action bonuses and their loyalty cards."""

from .. import CliError
from ..client import Client, _operation_id
from ..format import _enum_name, _print_json, balances, day, when
from ..options import _group, _program_option
from .programs import _program_name


# --- members ------------------------------------------------------------------

def _add_member(sub, client, write):
    actions = _group(sub, "member", "members and their balances")
    p = actions.add_parser("enrol", parents=[client, write], help="enrol a new member")
    p.add_argument("external_id", help="the CRM's customer id")
    _program_option(p)
    p.add_argument("--card", help="a card number to link at once")
    p.add_argument("--birthday", help="MM-DD, for birthday bonuses")
    p.add_argument("--referrer", help="the referring member (id or name)")
    p.set_defaults(run=cmd_member_enrol)
    p = actions.add_parser("get", parents=[client], help="a member with balances")
    p.add_argument("member", help="member id (with --program) or "
                                  "programs/{p}/members/{m}")
    _program_option(p)
    p.add_argument("--full", action="store_true", help="also lots and holds")
    p.set_defaults(run=cmd_member_get)
    p = actions.add_parser("lookup", parents=[client], help="a member by CRM id")
    p.add_argument("external_id")
    _program_option(p)
    p.add_argument("--full", action="store_true", help="also lots and holds")
    p.set_defaults(run=cmd_member_lookup)
    p = actions.add_parser("award", parents=[client, write],
                           help="award an action's bonus (bonuses.actions)")
    p.add_argument("member", help="member id (with --program) or "
                                  "programs/{p}/members/{m}")
    p.add_argument("action", help="the action's name, e.g. review")
    _program_option(p)
    p.set_defaults(run=cmd_member_award)


def _member_name(text, program):
    if text.startswith("programs/"):
        return text
    if text.isdigit():
        return f"{_program_name(program)}/members/{text}"
    raise CliError(f"{text!r}: a member is a number (with --program) or "
                   "programs/{program}/members/{member}")


def _birthday(text):
    from google.type import date_pb2
    try:
        month, day_ = (int(x) for x in text.split("-")[-2:])
    except ValueError:
        raise CliError(f"--birthday {text!r}: use MM-DD") from None
    return date_pb2.Date(month=month, day=day_)


def cmd_member_enrol(args):
    from kopilka.v1 import members_pb2 as pb
    request = pb.EnrolMemberRequest(
        operation_id=_operation_id(args, "enrol"), parent=_program_name(args.program),
        external_id=args.external_id, card_number=args.card or "")
    if args.birthday:
        request.birthday.CopyFrom(_birthday(args.birthday))
    if args.referrer:
        request.referrer = _member_name(args.referrer, args.program)
    with Client(args) as c:
        r = c("Members.EnrolMember", request)
    if args.json:
        return _print_json(r)
    print(f"enrolled {r.member.name}{' (replayed)' if r.replayed else ''}"
          + (f", card {r.card.card_number}" if r.card.card_number else "")
          + (f", welcome bonus {r.welcome_points} points" if r.welcome_points else ""))
    print(f"  {balances(r.member.balances)}")


def member_lines(m):
    from kopilka.v1 import common_pb2
    state = _enum_name(common_pb2.MemberState, m.state, "MEMBER_STATE_")
    yield (f"{m.name}  external id {m.external_id or '(erased)'}  {state}"
           + (f"  tier {m.tier}" if m.tier else ""))
    yield f"  {balances(m.balances)}"
    extra = [f"enrolled {day(m.enrol_time)}"]
    if m.merged_into:
        extra.append(f"merged into {m.merged_into}")
    if m.HasField("birthday"):
        extra.append(f"birthday {m.birthday.month:02d}-{m.birthday.day:02d}")
    if m.referrer:
        extra.append(f"referred by {m.referrer}")
    yield "  " + ", ".join(extra)
    for lot in m.lots:
        yield (f"  lot {lot.lot_number}: {lot.remaining_points} points, spendable "
               f"from {day(lot.activate_time)}, expires {day(lot.expire_time, 'never')}")
    for hold in m.holds:
        yield f"  hold {hold.hold_number}: {hold.points} points until {when(hold.expire_time)}"


def _view(full):
    from kopilka.v1 import members_pb2 as pb
    return pb.MEMBER_VIEW_FULL if full else pb.MEMBER_VIEW_BASIC


def cmd_member_get(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.GetMember", pb.GetMemberRequest(
            name=_member_name(args.member, args.program), view=_view(args.full)))
    return _print_json(r) if args.json else print("\n".join(member_lines(r.member)))


def cmd_member_lookup(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.LookupMember", pb.LookupMemberRequest(
            parent=_program_name(args.program), external_id=args.external_id,
            view=_view(args.full)))
    return _print_json(r) if args.json else print("\n".join(member_lines(r.member)))


def cmd_member_award(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.AwardAction", pb.AwardActionRequest(
            operation_id=_operation_id(args, "award"),
            name=_member_name(args.member, args.program), action=args.action))
    if args.json:
        return _print_json(r)
    limit = f" of {r.limit}" if r.limit else ""
    print(f"awarded {r.points} points to {r.member} for {args.action} "
          f"({r.count}{limit}){' (replayed)' if r.replayed else ''}, lot "
          f"{r.lot_number}, expires {day(r.expire_time, 'never')}")
    print(f"  {balances(r.balances)}")


# --- cards --------------------------------------------------------------------

def _add_card(sub, client, write):
    actions = _group(sub, "card", "loyalty cards")
    p = actions.add_parser("issue", parents=[client, write], help="link a new card to a member")
    p.add_argument("member")
    p.add_argument("card_number")
    _program_option(p)
    p.set_defaults(run=cmd_card_issue)
    p = actions.add_parser("resolve", parents=[client], help="the card's member and balance")
    p.add_argument("card_number")
    _program_option(p)
    p.set_defaults(run=cmd_card_resolve)
    p = actions.add_parser("block", parents=[client, write], help="block a card (lost, stolen)")
    p.add_argument("card_number")
    _program_option(p)
    p.set_defaults(run=cmd_card_block)
    p = actions.add_parser("replace", parents=[client, write],
                           help="replace a card by a new number (the balance stays)")
    p.add_argument("card_number")
    p.add_argument("new_card_number")
    _program_option(p)
    p.set_defaults(run=cmd_card_replace)


def card_line(card):
    from kopilka.v1 import common_pb2
    state = _enum_name(common_pb2.CardState, card.state, "CARD_STATE_")
    return f"card {card.card_number} -> {card.member} ({state})"


def cmd_card_issue(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.IssueCard", pb.IssueCardRequest(
            operation_id=_operation_id(args, "card"),
            parent=_member_name(args.member, args.program), card_number=args.card_number))
    return _print_json(r) if args.json else print(f"issued {card_line(r.card)}")


def cmd_card_resolve(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.ResolveCard", pb.ResolveCardRequest(
            parent=_program_name(args.program), card_number=args.card_number))
    if args.json:
        return _print_json(r)
    print(card_line(r.card))
    print("\n".join(member_lines(r.member)))


def cmd_card_block(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.BlockCard", pb.BlockCardRequest(
            operation_id=_operation_id(args, "card"), parent=_program_name(args.program),
            card_number=args.card_number))
    return _print_json(r) if args.json else print(f"blocked {card_line(r.card)}")


def cmd_card_replace(args):
    from kopilka.v1 import members_pb2 as pb
    with Client(args) as c:
        r = c("Members.ReplaceCard", pb.ReplaceCardRequest(
            operation_id=_operation_id(args, "card"), parent=_program_name(args.program),
            card_number=args.card_number, new_card_number=args.new_card_number))
    if args.json:
        return _print_json(r)
    print(f"replaced {card_line(r.old_card)}\n      by {card_line(r.new_card)}")
