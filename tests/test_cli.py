"""The `kopilka` command: in process against a real server on a loopback port,
and once end to end as a newcomer runs it (init, serve and demo in
subprocesses, SIGTERM, then a restart on the same data)."""

import importlib.util
import json
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from kopilka.servers import app, cli
from kopilka.servers.auth import TokenFile
from server_harness import EXAMPLE, Clock, RunningServer, install_program


def servicers(*names):
    """Skips a test while a servicer it needs is not built yet."""
    missing = [n for n in names
               if importlib.util.find_spec(f"kopilka.servers.{n}") is None]
    return pytest.mark.skipif(bool(missing), reason=f"not built yet: {missing}")


@pytest.fixture
def srv(tmp_path):
    # wall time: the demo's receipts carry the till's (this machine's) clock
    server = RunningServer(tmp_path / "data", clock=Clock(time.time_ns() // 1000))
    install_program(server)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("KOPILKA_TOKEN", raising=False)
    monkeypatch.delenv("KOPILKA_SERVER", raising=False)


def kopilka(capsys, *argv):
    """(exit code, stdout, stderr) of `kopilka argv...` run in this process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def client(srv, role="admin"):
    return ["--server", srv.address, "--token", srv.tokens[role]]


# --- local commands --------------------------------------------------------------

def test_init_sets_up_once_and_then_changes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    code, out, _ = kopilka(capsys, "init", "--data", data)
    assert code == 0
    assert 'program 1 "Kopilka demo chain" (3 versions) put into the ledger' in out
    token_file = data / "admin.token"
    token = token_file.read_text().strip()
    assert token in out
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert TokenFile(data / "tokens.json").verify(token).role == "admin"
    ledger_before = (data / "ledger" / "data.mdb").read_bytes()

    code, out, _ = kopilka(capsys, "init", "--data", data)
    assert code == 0
    assert "nothing changed" in out and token not in out
    assert token_file.read_text().strip() == token
    assert (data / "ledger" / "data.mdb").read_bytes() == ledger_before
    assert len(json.loads((data / "tokens.json").read_text())["tokens"]) == 1


def test_init_names_every_problem_of_a_bad_program(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE_TEXT().replace("cap_bp = 1_000", "cap_bp = 20_000"))
    code, _, err = kopilka(capsys, "init", "--data", tmp_path / "data", "--program", bad)
    assert code == 1
    assert "version[1].spend.cap_bp" in err


def EXAMPLE_TEXT():
    with open(EXAMPLE) as f:
        return f.read()


def test_token_create_prints_a_working_scoped_token(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    code, out, err = kopilka(capsys, "token", "create", "--role", "pos", "--store", "42",
                             "43", "--note", "till server", "--data", data)
    assert code == 0 and "shown only now" in err
    principal = TokenFile(data / "tokens.json").verify(out.strip())
    assert principal.role == "pos" and principal.stores == {42, 43}

    code, _, err = kopilka(capsys, "token", "create", "--role", "hwd", "--data", data)
    assert code == 1 and "needs at least one store" in err
    code, _, err = kopilka(capsys, "token", "create", "--role", "admin",
                           "--data", tmp_path / "elsewhere")
    assert code == 1 and "kopilka init" in err


def test_token_create_with_an_expiry(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    code, out, err = kopilka(capsys, "token", "create", "--role", "integration",
                             "--expires-in", "2h", "--data", data)
    assert code == 0 and " until 20" in err
    token = out.strip()
    now = time.time()
    assert TokenFile(data / "tokens.json", clock=lambda: now).verify(token)
    later = TokenFile(data / "tokens.json", clock=lambda: now + 2 * 3600 + 5)
    assert later.verify(token) is None
    for bad in ("0h", "2w", "h", "-1d"):
        with pytest.raises(SystemExit):
            kopilka(capsys, "token", "create", "--role", "admin", "--expires-in", bad,
                    "--data", data)


def test_client_needs_a_token_and_a_server(tmp_path, capsys):
    code, _, err = kopilka(capsys, "stats", "--data", tmp_path)
    assert code == 1 and "no token" in err and "kopilka init" in err
    # nothing listens on port 1: the hint says how to start a server
    code, _, err = kopilka(capsys, "stats", "--server", "127.0.0.1:1", "--token", "x")
    assert code == 1 and err.startswith("error: UNAVAILABLE") and "make serve" in err
    code, _, err = kopilka(capsys, "stats", "--server", "192.0.2.1:50051",
                           "--insecure", "--token", "x")
    assert code == 1 and "loopback" in err


def test_serve_refuses_a_ledger_of_another_format(tmp_path):
    """A data directory from a Kopilka of another ledger format: one line
    saying so, exit code 1, not a traceback or a misread ledger."""
    import lmdb

    from kopilka.core.batch import Batch
    from kopilka.core.records import META_FORMAT, U32
    from kopilka.kernel import Ledger
    with Ledger(str(tmp_path / "ledger"), map_size=1 << 24) as ledger:
        ledger.apply(Batch().put_program("p", 1), 1)
    env = lmdb.open(str(tmp_path / "ledger"), max_dbs=32)
    with env.begin(write=True) as txn:
        txn.put(META_FORMAT, U32.pack(99), db=env.open_db(b"meta", txn=txn))
    env.close()
    # in its own process: serve configures the process's logging
    run = subprocess.run([sys.executable, "-m", "kopilka.servers.cli", "serve",
                          "--insecure", "--data", str(tmp_path), "--listen",
                          "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines()[-1].startswith(
        f"error: {tmp_path / 'ledger'} is in ledger format 99; this Kopilka reads")


def test_formatting_helpers():
    from kopilka.v1 import common_pb2
    assert cli.money(common_pb2.Money(currency_code="RUB", minor_units=150_000_05)) == \
        "150,000.05 RUB"
    assert cli.money(common_pb2.Money(currency_code="RUB", minor_units=-5)) == "-0.05 RUB"
    assert cli.mask_card("7001234567890123") == "700123******0123"
    assert "1234567" not in cli.mask_card("12345678")
    assert cli._size("8G") == 8 << 30 and cli._size("256MiB") == 256 << 20


# --- client commands against a real server ----------------------------------------------

def test_role_and_token_refusals_are_explained(srv, capsys):
    code, _, err = kopilka(capsys, "adjust", "1", "5", "--reason", "goodwill",
                           *client(srv, "pos"))
    assert code == 1
    assert err.startswith("error: PERMISSION_DENIED ROLE_NOT_PERMITTED: ")
    code, _, err = kopilka(capsys, "stats", "--server", srv.address, "--token", "kop_x_y")
    assert code == 1 and err.startswith("error: UNAUTHENTICATED CREDENTIALS_INVALID: ")


def test_an_unbuilt_service_is_named(tmp_path, capsys, monkeypatch):
    """A server without Feed (or with reports not written yet) says so clearly."""
    everything = app._registrations
    monkeypatch.setattr(app, "_registrations", lambda: [
        r for r in everything() if not r[2].endswith(".Feed")])
    server = RunningServer(tmp_path / "data")
    try:
        code, _, err = kopilka(capsys, "report", "points", *client(server))
    finally:
        server.stop()
    assert code == 1
    assert err.startswith("error: UNIMPLEMENTED")
    assert "does not implement kopilka.v1.Feed/GetPointsReport" in err


@servicers("programs")
def test_program_apply_creates_updates_and_lists_problems(srv, tmp_path, capsys):
    code, out, _ = kopilka(capsys, "program", "apply", EXAMPLE, *client(srv))
    assert code == 0 and "programs/1 unchanged (no new versions)" in out
    second = tmp_path / "second.toml"
    second.write_text(EXAMPLE_TEXT().replace("id = 1    ", "id = 2    ", 1))
    code, out, _ = kopilka(capsys, "program", "apply", second, *client(srv))
    assert code == 0 and out.startswith("programs/2 created")
    assert "version 3 from 2025-01-01 00:00 Europe/Moscow" in out and "<- in force" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE_TEXT().replace("cap_bp = 1_000", "cap_bp = 20_000"))
    code, _, err = kopilka(capsys, "program", "apply", bad, *client(srv))
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT PROGRAM_DEFINITION_INVALID: ")
    # each problem on its own line, by its path (the server's numbering)
    assert re.search(r"\n  (definition\.)?version\[[01]\]\.spend\.cap_bp: must be", err)
    code, out, _ = kopilka(capsys, "program", "get", "2", *client(srv))
    assert code == 0 and "stores/42" in out


@servicers("members")
def test_members_and_cards(srv, capsys):
    code, out, _ = kopilka(capsys, "member", "enrol", "crm-7", "--card", "7001000000000001",
                           *client(srv))
    assert code == 0
    member = re.search(r"programs/1/members/\d+", out)[0]
    code, out, _ = kopilka(capsys, "member", "lookup", "crm-7", "--full", *client(srv, "pos"))
    assert code == 0 and out.startswith(member) and "available" in out
    code, out, _ = kopilka(capsys, "card", "resolve", "7001000000000001", *client(srv, "pos"))
    assert code == 0 and f"-> {member} (ACTIVE)" in out
    code, out, _ = kopilka(capsys, "card", "replace", "7001000000000001",
                           "7001000000000002", *client(srv))
    assert code == 0 and "(REPLACED)" in out
    code, out, _ = kopilka(capsys, "card", "block", "7001000000000002", *client(srv))
    assert code == 0 and "(BLOCKED)" in out
    code, _, err = kopilka(capsys, "member", "get", "999", *client(srv))
    assert code == 1 and err.startswith("error: NOT_FOUND MEMBER_NOT_FOUND: ")
    code, out, _ = kopilka(capsys, "member", "award", member, "app_install",
                           *client(srv, "integration"))
    assert code == 0 and out.startswith(f"awarded 50 points to {member} for "
                                        "app_install (1 of 1)")
    code, _, err = kopilka(capsys, "member", "award", member, "app_install", *client(srv))
    assert code == 1 and err.startswith("error: FAILED_PRECONDITION ACTION_LIMIT_REACHED: ")


@servicers("members", "admin")
def test_adjust_audit_backup_stats(srv, tmp_path, capsys):
    code, out, _ = kopilka(capsys, "member", "enrol", "crm-8", *client(srv))
    member = re.search(r"programs/1/members/\d+", out)[0]
    code, out, _ = kopilka(capsys, "adjust", member, "50", "--reason", "goodwill",
                           "--note", "late delivery", *client(srv))
    assert code == 0 and out.startswith(f"credited 50 points to {member}")
    code, _, err = kopilka(capsys, "adjust", member, "5", "--reason", "other", *client(srv))
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT")
    code, out, _ = kopilka(capsys, "audit", *client(srv))
    assert code == 0 and out.startswith("clean: journal up to cursor")
    code, out, _ = kopilka(capsys, "backup", tmp_path / "copy", *client(srv))
    assert code == 0 and (tmp_path / "copy").is_dir()
    code, out, _ = kopilka(capsys, "stats", *client(srv))
    assert code == 0 and re.search(r"^head_cursor: [1-9]", out, re.MULTILINE)


@servicers("feed")
def test_feed_tail_and_reports(srv, capsys):
    code, out, _ = kopilka(capsys, "feed", "tail", "--no-follow", *client(srv, "integration"))
    assert code == 0 and "PROGRAM_PUT" in out.splitlines()[0]
    code, out, err = kopilka(capsys, "report", "points", "--by", "store",
                             *client(srv, "integration"))
    # reports may not be written yet: then the message names the RPC
    assert (code == 0 and "points report" in out) or \
        (code == 1 and "does not implement kopilka.v1.Feed/GetPointsReport" in err)
    code, out, err = kopilka(capsys, "report", "coupons", *client(srv, "integration"))
    assert code == 0 and "coupons report" in out and "all: issued_coupons=0" in out, err
    code, _, err = kopilka(capsys, "report", "points", "--by", "colour",
                           *client(srv, "integration"))
    assert code == 1 and "--by 'colour'" in err


@servicers("members", "programs")
def test_demo_runs_again_and_again_and_masks_the_card(srv, capsys):
    for _ in range(2):
        code, out, err = kopilka(capsys, "demo", *client(srv))
        assert code == 0, err
        assert "\n6. " in out and "Done: 6 steps" in out
        assert not re.search(r"\d{12}", out), "a card number printed in full"


# --- end to end, as a newcomer runs it -------------------------------------------------------

def _kopilka_process(*argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "kopilka.servers.cli", *map(str, argv)],
                            text=True, **kwargs)


class _Serving:
    """`kopilka serve` on a free loopback port (port 0, read from its log)."""

    def __init__(self, data):
        self.process = _kopilka_process(
            "serve", "--insecure", "--data", data, "--listen", "127.0.0.1:0",
            "--map-size", "256M", stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.log = []
        deadline = time.monotonic() + 30
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"no `serving` line: {self.log}") from None
            if line is None:
                raise AssertionError(f"the server exited: {self.log}")
            self.log.append(line)
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("message") == "serving":
                self.address = f"127.0.0.1:{entry['port']}"
                return

    def _drain(self):
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def terminate(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@servicers("members", "programs")
def test_init_serve_demo_sigterm_restart(tmp_path, capsys):
    data = tmp_path / "data"
    init = _kopilka_process("init", "--data", data, stdout=subprocess.PIPE)
    assert init.wait(60) == 0 and "admin token" in init.stdout.read()
    server = _Serving(data)
    try:
        demo = _kopilka_process("demo", "--server", server.address, "--data", data,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = demo.communicate(timeout=60)
        assert demo.returncode == 0, err
    finally:
        code = server.terminate()
    assert code == 0, server.log
    member = re.search(r"member (programs/1/members/\d+)", out)[1]
    final = re.findall(r"balances: (.*)", out)[-1]

    # the restart (in process, to keep the suite fast) sees what the demo left
    again = RunningServer(data, clock=Clock(time.time_ns() // 1000))
    try:
        code, shown, err = kopilka(capsys, "member", "get", member, "--server",
                                   again.address, "--data", data)
    finally:
        again.stop()
    assert code == 0, err
    assert final in shown
