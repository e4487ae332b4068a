"""benchmarks/load.py end to end, briefly: it seeds a ledger, starts the
echo server and the real server, drives every phase, and prints the figures."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_script_runs_every_phase():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "load.py"), "--mode", "all",
         "--duration", "1", "--clients", "4", "--members", "200",
         "--batch", "200"],  # Posts of 1,000 take seconds on a busy machine
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for figure in ("echo: bare gRPC", "unary checkout:", "batch: Post of 200",
                   "checkouts/s", "durable ops/s", "% of echo", "p99.9 ms"):
        assert figure in out, out
    for rpc in ("quote", "hold", "capture", "echo"):
        assert f"\n  {rpc} " in out, out
    assert "errors: none" in out and "FAILED" not in out, out


def test_load_script_rounds_and_server_cpu_per_rpc():
    """--mode post is the batch phase; --rounds repeats it and reports each
    figure's range; the server's main-thread CPU is given per operation."""
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "load.py"), "--mode", "post",
         "--rounds", "2", "--duration", "0.5", "--members", "100", "--batch", "20",
         "--post-view", "status"],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert out.count("batch: Post of 20 operations (holds+captures, status-only "
                     "results)") == 2, out
    assert "unary checkout:" not in out and "echo: bare gRPC" not in out, out
    for figure in ("server main-thread CPU per op:", "over 2 rounds",
                   "Post durable ops/s", "Post server main-thread us/op"):
        assert figure in out, out


def test_load_script_paced_unary(tmp_path):
    """--rate paces the checkouts (Poisson arrivals over the tills) and
    reports each checkout's latency from its arrival beside the RPCs'."""
    out_json = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "load.py"), "--mode", "unary",
         "--duration", "1", "--clients", "4", "--members", "100", "--rate", "20",
         "--json", str(out_json)],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "paced: 20 checkouts/s offered; a checkout from its arrival p50" in run.stdout
    unary = json.loads(out_json.read_text())["phases"]["unary"]
    assert unary["offered_checkouts_per_s"] == 20
    checkout = unary["checkout"]
    assert checkout["count"] >= 1
    assert checkout["p50_ms"] <= checkout["p99_ms"] <= checkout["max_ms"]
    # a checkout (quote, maybe a hold, capture) takes at least its capture
    assert checkout["p50_ms"] >= unary["by_rpc"]["capture"]["p50_ms"] * 0.5
