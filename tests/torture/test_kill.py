"""Promise 1 (no acknowledged operation lost, none applied twice), with 5's
hot backups and 6's feed along: the real server under load from POS tills,
killed with SIGKILL at random moments (during commits, backups and feed
streaming) and restarted; the tills retry everything unanswered with the
same ids. After each restart the audit must be clean; at the end every
acknowledged operation is in the journal exactly once and nothing else is,
balances equal the twin's replay of the answers, the feed saw every entry
once and in order, every backup is a sound prefix, the logs hold no card
number or secret.

Quick in `make test`; `make torture` (KOPILKA_TORTURE=long) runs at least
20 kills. KOPILKA_TORTURE_SEED, _KILLS, _TILLS tune a run.
"""

import os
import random
from collections import Counter

from .conftest import SUMMARIES
from .killing import Run, check_backups, check_feed, check_logs, env_int
from . import world as w

LONG = os.environ.get("KOPILKA_TORTURE") == "long"


def test_sigkill_under_load_loses_nothing_and_doubles_nothing(tmp_path):
    seed = env_int("KOPILKA_TORTURE_SEED", random.SystemRandom().randrange(1 << 32))
    run = Run(tmp_path, seed=seed,
              kills=env_int("KOPILKA_TORTURE_KILLS", 24 if LONG else 3),
              tills=env_int("KOPILKA_TORTURE_TILLS", 16 if LONG else 6),
              members_per_till=4,
              min_gap=0.5 if LONG else 0.3, max_gap=4.0 if LONG else 1.2)
    print(f"torture seed {seed} (KOPILKA_TORTURE_SEED={seed} repeats it)")
    try:
        feed, backups, head = run.go()
        figures = w.verify(run.world, run.answers(), str(tmp_path), run.members)
        check_feed(feed, run.world, head)
        whole = check_backups(backups, run.world)
        check_logs(run.world)
    except BaseException as exc:
        raise AssertionError(f"torture seed {seed}: {exc!r}") from exc
    answers = run.answers()
    tills = run.tills
    refusals = sum((p.refusals for p in tills), start=Counter())
    lines = [
        f"seed {seed}, {run.elapsed:.0f} s, {len(tills)} tills, {run.members} members",
        "kills: " + ", ".join(f"{k} {v}" for k, v in run.kill_during.items()),
        f"audits after restart: {run.audits} clean",
        f"operations acknowledged: {len(answers)} "
        f"({sum(a.kind == 'hold' for a in answers)} holds, "
        f"{sum(a.kind == 'capture' for a in answers)} captures, "
        f"{sum(a.kind == 'void' for a in answers)} voids, "
        f"{sum(a.kind == 'refund' for a in answers)} refunds)",
        f"retries after a failure: {sum(p.retries for p in tills)}; committed before "
        f"the kill and answered on retry: {sum(p.recovered for p in tills)}",
        f"refused (definitive): {dict(refusals) or 0}",
        f"lost {figures['lost']}, duplicated {figures['duplicated']}, "
        f"applied without an answer {figures['ghosts']}; journal {head} entries",
        f"feed: {len(feed.events)} events, each once and in order, "
        f"{feed.resumes} resumes from the cursor ({feed.hangups} after hanging up)",
        f"backups: {len(backups.taken)} verified (audit clean, journal a prefix); "
        f"{len(backups.interrupted)} cut short by a kill ({whole} had finished the copy: "
        "sound; the rest left no ledger file)",
    ]
    SUMMARIES.append(("torture: SIGKILL under load", lines))
    assert run.kill_during["kills"] == run.kills
