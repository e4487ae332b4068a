"""Hot backups: LMDB's compacting copy of the live ledger into a new directory.

The copy reads one consistent snapshot while writers go on, so the server
keeps serving. The destination must not exist: it is created here with
`mkdir`, which fails if anything is there, so a retried or concurrent backup
can never overwrite or mix into another copy. A failed copy removes what it
created. Blocking: run it on a worker thread.

The ledger file is written in a hidden sibling folder, synced, and only then
renamed into the destination: a server killed mid-copy leaves an empty
destination and a `.<name>.partial-*` folder, never a truncated `data.mdb`
where a backup is expected (LMDB opens one without complaint, then the
process dies of SIGBUS on the first page past its end).
"""

import os
import shutil
import tempfile

import lmdb

from kopilka.core.records import HASH_SIZE, HEAD, META_HEAD, LedgerError

from .status import invalid, server


def _unusable(path, why):
    return server("BACKUP_DESTINATION_UNUSABLE", f"path: {path} {why}", path=path)


def destination(path, ledger_path):
    """The normalised destination, checked as far as can be without creating it."""
    if not path:
        raise invalid([("path", "required: an absolute path that does not exist yet")])
    if "\0" in path or not os.path.isabs(path):
        raise _unusable(path, "is not an absolute path")
    path = os.path.normpath(path)
    ledger = os.path.realpath(ledger_path)
    parent = os.path.realpath(os.path.dirname(path))
    if parent == ledger or parent.startswith(ledger + os.sep):
        raise _unusable(path, "is inside the ledger's own directory")
    return path


def copy(ledger, path):
    """(bytes, head sequence, head hash) of a compacted copy made at `path`."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise _unusable(path, "exists already") from None
    except FileNotFoundError:
        raise _unusable(path, "has no parent directory") from None
    except OSError as exc:
        raise _unusable(path, f"cannot be created ({exc.strerror})") from None
    partial = None
    try:
        parent, name = os.path.split(path)
        partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
        ledger.copy(partial, compact=True)
        for entry in os.scandir(partial):
            _sync(entry.path)
            os.rename(entry.path, os.path.join(path, entry.name))
        _sync(path)
        os.rmdir(partial)
        size = sum(entry.stat().st_size for entry in os.scandir(path)
                   if entry.is_file())
        seq, digest = head_of(path)
    except (LedgerError, OSError, lmdb.Error) as exc:
        shutil.rmtree(path, ignore_errors=True)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise _unusable(path, f"could not be written ({exc})") from None
    return size, seq, digest


def _sync(path):
    """fsync a file or a folder (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def head_of(path):
    """The journal head stored in a ledger copy, read without writing to it
    (read-only, no lock file)."""
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=16)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(db=meta) as txn:
            raw = txn.get(META_HEAD)
    finally:
        env.close()
    return HEAD.unpack(raw) if raw is not None else (0, bytes(HASH_SIZE))
