"""The daemon's health as one JSON document: written by hwd, read by `kopilka hwd status`.

The running daemon writes its snapshot (`Daemon.snapshot`) to a small file
every second, atomically (a temporary file renamed over the old one), so a
reader never sees half a document and no socket or port has to be opened
to ask a daemon how it is. The same snapshot feeds the Prometheus
collector, so the file and the metrics never disagree. It holds counts,
states and times, never a card number.

`render(snapshot, now_us)` is pure: the text `kopilka hwd status` prints and
its exit code, as for `systemctl status`: 0 all well, 1 degraded (a reader or
the core disconnected, reads dropped from a full spool), 3 not running (no
file, a file left by a stopped daemon, or one not rewritten for
`STALE_AFTER_US`).
"""

import json
import os
import tempfile

FORMAT = 1
STALE_AFTER_US = 10_000_000
OK, DEGRADED, NOT_RUNNING = 0, 1, 3


def write(path, snapshot):
    """Replace the file at `path` with `snapshot` as JSON, atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".status-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(snapshot, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)         # no secrets in it; operators may read it
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read(path):
    """The snapshot at `path`, or None when there is none (or it is unreadable)."""
    try:
        with open(path) as f:
            snapshot = json.load(f)
    except (OSError, ValueError):
        return None
    return snapshot if isinstance(snapshot, dict) and snapshot.get("format") == FORMAT \
        else None


def _duration(us):
    s = max(0, us // 1_000_000)
    if s < 60:
        return f"{s}s"
    if s < 3_600:
        return f"{s // 60}m {s % 60}s"
    if s < 86_400:
        return f"{s // 3_600}h {s % 3_600 // 60}m"
    return f"{s // 86_400}d {s % 86_400 // 3_600}h"


def _ago(now_us, then_us):
    return "never" if then_us is None else f"{_duration(now_us - then_us)} ago"


def _counts(mapping):
    return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items())) or "none"


def render(snapshot, now_us, path=None):
    """(text to print, exit code) for a snapshot read at `now_us`; see the module doc."""
    where = f" ({path})" if path else ""
    if snapshot is None:
        return f"hwd: not running: no status file{where}", NOT_RUNNING
    written = snapshot.get("written_us", 0)
    lines = [f"hwd store {snapshot['store']}, pid {snapshot['pid']}, "
             f"{snapshot['state']}, started {_ago(now_us, snapshot['started_us'])}, "
             f"status written {_ago(now_us, written)}"]
    core, spool = snapshot["core"], snapshot["spool"]
    lines.append(f"core    {core['address']}: {core['state']}"
                 + (f" ({core['last_error']})" if core["last_error"]
                    and core["state"] != "connected" else "")
                 + f", last contact {_ago(now_us, core['last_contact_us'])}, "
                 f"sent {core['sent']}, in flight {core['in_flight']}, "
                 f"reconnects {core['reconnects']}, acks: {_counts(core['acks'])}")
    lines.append(f"spool   {spool['depth']} of {spool['max_reads']} reads"
                 + (f", oldest {_ago(now_us, spool['oldest_read_us'])}"
                    if spool["oldest_read_us"] is not None else "")
                 + f"; dropped: full {spool['dropped_full']}, "
                 f"stale {spool['dropped_stale']}")
    width = max((len(r["id"]) for r in snapshot["readers"]), default=0)
    for r in snapshot["readers"]:
        state = r["state"] + (f" ({r['last_error']})" if r["state"] != "connected"
                              and r["last_error"] else "")
        lines.append(f"reader  {r['id']:<{width}}  lane {r['lane']}  {state}, "
                     f"reads {r['reads']}, double swipes {r['duplicates']}, "
                     f"reconnects {r['reconnects']}, last read "
                     f"{_ago(now_us, r['last_read_us'])}, rejects: {_counts(r['rejects'])}")
    if snapshot["state"] != "running":
        lines.append(f"not running: the daemon stopped{where}")
        return "\n".join(lines), NOT_RUNNING
    if now_us - written > STALE_AFTER_US:
        lines.append(f"not running: the status file{where} has not been rewritten "
                     f"for {(now_us - written) // 1_000_000}s (daemon killed or hung?)")
        return "\n".join(lines), NOT_RUNNING
    degraded = core["state"] != "connected" or spool["dropped_full"] or any(
        r["state"] != "connected" for r in snapshot["readers"])
    return "\n".join(lines), DEGRADED if degraded else OK
