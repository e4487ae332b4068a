"""The programs the server prices by, kept in memory, stored in the ledger.

A program's definition text is the data of its PUT_PROGRAM operation, which
the ledger keeps with the program's record, so a program and its rules are
committed together and a backup carries both. At start the registry parses
every stored definition once; a commit of a new definition replaces the
parsed program in memory (on the event loop, after the commit is durable).
"""

import json
from dataclasses import dataclass

from kopilka.core.program import ProgramError, load_program, parse_program

TOML, JSON = b"toml", b"json"


@dataclass(frozen=True)
class Entry:
    program: object        # core.program.Program
    source: str            # "toml" or "json"
    text: str              # the definition as applied
    created_at: int
    updated_at: int


def encode(source, text):
    """The stored form of a definition: its format, a newline, the text."""
    return source.encode() + b"\n" + text.encode()


def decode(data):
    source, _, text = data.partition(b"\n")
    return source.decode(), text.decode()


def parse(source, text):
    """A Program from definition text, or ProgramError naming every problem."""
    if source == "toml":
        return load_program(text if "\n" in text else text + "\n")
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        from kopilka.core.program import Problem
        raise ProgramError([Problem("", f"not valid JSON: {e}")]) from None
    return parse_program(mapping)


class Registry:
    def __init__(self):
        self._programs = {}

    @classmethod
    def load(cls, ledger):
        registry = cls()
        for record in ledger.programs():
            if record.data:
                source, text = decode(record.data)
                registry.put(record.program, parse(source, text), source, text,
                             record.created_at, record.updated_at)
        return registry

    def put(self, program_id, program, source, text, created_at, updated_at):
        self._programs[program_id] = Entry(program, source, text, created_at, updated_at)

    def get(self, program_id):
        """The Entry, or None."""
        return self._programs.get(program_id)

    def ids(self):
        return sorted(self._programs)
