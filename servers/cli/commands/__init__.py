"""The commands that talk to a running server, one module per gRPC service
they call: `programs`, `members` (members and cards), `admin` (adjust, audit,
backup, stats) and `feed` (reports and `feed tail`)."""

from .admin import _add_admin
from .feed import _add_feed, _add_report
from .members import _add_card, _add_member
from .programs import _add_program

__all__ = ["_add_admin", "_add_card", "_add_feed", "_add_member", "_add_program",
           "_add_report"]
