"""The member profile: the little personal data Kopilka keeps, as one blob.

The ledger stores a profile per account (OPEN_ACCOUNT's and SET_PROFILE's
data) in its own table and nowhere else, so that erasing it erases it for
good; its bytes are the server's business, defined here: compact JSON with
short keys, default values left out.

What it holds: the CRM's external id (the ledger maps external id -> account,
the profile is the way back), the birthday (month and day: the year is never
kept), the referrer, when it was erased, the member it was merged into, and
`op`/`rq`: the operation id and request digest of the last client request
that wrote it. The ledger keeps no data of a profile-writing operation, so
the profile is where a retried UpdateMember or EraseMember is told apart from
another request under the same id (see members.py).

The enrolment time is not here: the ledger keeps it with the account
(`opened_at`), and leaving it out keeps an enrolment's operation a function
of its request alone, which is what makes EnrolMember idempotent.
"""

import calendar
import json
from dataclasses import dataclass, replace

# Short keys, in the order they are written.
_KEYS = (("external_id", "x"), ("birthday", "b"), ("referrer", "r"),
         ("erased_at", "e"), ("merged_into", "m"), ("blocked_cards", "n"),
         ("op", "o"), ("rq", "q"))


@dataclass(frozen=True)
class Profile:
    external_id: str = ""                   # empty once erased
    birthday: tuple[int, int] | None = None  # (month, day)
    referrer: int = 0                        # account id; 0: none
    erased_at: int = 0                       # microseconds; 0: never
    merged_into: int = 0                     # account id; 0: not merged
    blocked_cards: int = 0                   # cards the erasure blocked
    op: str = ""                             # last client write: operation id
    rq: str = ""                             # ... and its request digest

    @property
    def erased(self):
        return self.erased_at != 0

    def stamped(self, op_id, digest):
        """This profile as written by the client request (op_id, digest)."""
        return replace(self, op=op_id, rq=digest)

    def erase(self, now, blocked_cards=0):
        """What an erasure leaves: when, and the merge link (not personal)."""
        return Profile(erased_at=self.erased_at or now, merged_into=self.merged_into,
                       blocked_cards=blocked_cards)

    def encode(self):
        out = {}
        for name, key in _KEYS:
            value = getattr(self, name)
            if value:
                out[key] = list(value) if name == "birthday" else value
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def decode(data):
    """The Profile in `data` (None or empty: an account without one)."""
    if not data:
        return Profile()
    raw = json.loads(data)
    values = {name: raw[key] for name, key in _KEYS if key in raw}
    if "birthday" in values:
        values["birthday"] = tuple(values["birthday"])
    return Profile(**values)


def birthday_problem(month, day):
    """Why (month, day) is no birthday, or None. 29 February is one."""
    if not 1 <= month <= 12:
        return "month must be 1 to 12"
    if not 1 <= day <= calendar.monthrange(2000, month)[1]:  # a leap year
        return f"day must be 1 to {calendar.monthrange(2000, month)[1]}"
    return None
