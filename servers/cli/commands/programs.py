"""`program apply|get|list`: loyalty programs (role admin)."""

import json
import tomllib
from pathlib import Path

import grpc

from .. import CliError, ServerError
from ..client import Client, _operation_id
from ..format import _print_json, when
from ..options import _group


def _add_program(sub, client, write):
    actions = _group(sub, "program", "loyalty programs (role admin)")
    p = actions.add_parser("apply", parents=[client, write],
                           help="create a program from a file, or add its new versions",
                           description="Create the program the file defines or, if "
                           "it exists, update it (new versions appended). Problems "
                           "are listed by their key path.")
    p.add_argument("file", type=Path)
    p.add_argument("--validate-only", action="store_true",
                   help="check and echo it; change nothing")
    p.set_defaults(run=cmd_program_apply)
    p = actions.add_parser("get", parents=[client], help="a program and its versions")
    p.add_argument("program", help="program id or programs/{id}")
    p.add_argument("--full", action="store_true", help="also the definition as applied")
    p.set_defaults(run=cmd_program_get)
    p = actions.add_parser("list", parents=[client], help="every program")
    p.set_defaults(run=cmd_program_list)


def _read_definition(path):
    """(source, text) of a definition file: JSON by its suffix, else TOML."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    return ("json" if str(path).endswith(".json") else "toml"), text


def _definition_id(source, text):
    """The definition's `program.id` if it can be read at all (the server
    validates properly), else None."""
    try:
        data = json.loads(text) if source == "json" else tomllib.loads(text)
        value = data["program"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def cmd_program_apply(args):
    from kopilka.v1 import programs_pb2 as pb
    source, text = _read_definition(args.file)
    definition = pb.ProgramDefinition(**{source: text})
    op_id = _operation_id(args, "program")
    program_id = _definition_id(source, text)
    with Client(args) as c:
        try:
            r = c("Programs.CreateProgram", pb.CreateProgramRequest(
                operation_id=op_id, definition=definition,
                validate_only=args.validate_only))
            verb, added = "created", None
        except ServerError as e:
            exists = e.code == grpc.StatusCode.ALREADY_EXISTS and \
                e.reason != "OPERATION_ID_REUSED"
            if not exists or program_id is None:
                raise
            r = c("Programs.UpdateProgram", pb.UpdateProgramRequest(
                operation_id=op_id, name=f"programs/{program_id}",
                definition=definition, validate_only=args.validate_only))
            verb, added = "updated", list(r.added_versions)
    if args.json:
        return _print_json(r)
    if args.validate_only:
        verb = f"valid (nothing changed; it would be {verb})"
    elif added == []:
        verb = "unchanged (no new versions)"
    elif added:
        verb = "updated: added version" + ("s " if len(added) > 1 else " ") + \
            ", ".join(a.rsplit("/", 1)[-1] for a in added)
    print(f"{r.program.name} {verb}{' (replayed)' if r.replayed else ''}")
    print("\n".join(program_lines(r.program)))


def program_lines(p):
    yield (f'  "{p.display_name}": {p.currency_code}, {p.time_zone}, '
           f"{len(p.partners)} partner(s), {len(p.stores)} store(s)"
           + (", debt allowed" if p.allow_debt else ""))
    for v in p.versions:
        now = "  <- in force" if v.name == p.current_version else ""
        yield (f"  version {v.number} from {when(v.effective_time, zone=p.time_zone)}: "
               f"{v.note}{now}")


def _program_name(text):
    text = str(text)
    if text.startswith("programs/"):
        return text
    if text.isdigit():
        return f"programs/{text}"
    raise CliError(f"{text!r}: a program is a number or programs/{{id}}")


def cmd_program_get(args):
    from kopilka.v1 import programs_pb2 as pb
    view = pb.PROGRAM_VIEW_FULL if args.full else pb.PROGRAM_VIEW_BASIC
    with Client(args) as c:
        r = c("Programs.GetProgram", pb.GetProgramRequest(
            name=_program_name(args.program), view=view))
    if args.json:
        return _print_json(r)
    print(r.program.name)
    print("\n".join(program_lines(r.program)))
    for s in r.program.stores:
        print(f"  {s.name} {s.display_name!r}: lanes {', '.join(map(str, s.lanes))}")
    if args.full:
        which = r.program.definition.WhichOneof("source")
        if which:
            print(f"\n--- definition as applied ({which}) ---")
            print(getattr(r.program.definition, which).rstrip())


def cmd_program_list(args):
    from kopilka.v1 import programs_pb2 as pb
    token = ""
    with Client(args) as c:
        while True:
            r = c("Programs.ListPrograms", pb.ListProgramsRequest(page_size=100,
                                                                  page_token=token))
            for p in r.programs:
                if args.json:
                    _print_json(p)
                else:
                    print(f'{p.name}  "{p.display_name}"  {p.currency_code}  '
                          f"{len(p.versions)} version(s), in force: "
                          f"{p.current_version or '-'}")
            token = r.next_page_token
            if not token:
                return 0
