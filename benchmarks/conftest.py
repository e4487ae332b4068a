"""Fixtures of the benchmarks: populated ledgers built once per session, the
batch streams, and the report printed (and saved as JSON) at the end."""

import datetime
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

import benchlib

RESULTS_DIR = Path(__file__).parent / "results"


@pytest.fixture(scope="session")
def bench_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kopilka-bench")
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Populations:
    """Populated ledger directories, built on first use and kept for the session."""

    def __init__(self, root):
        self.root = root
        self._built = {}

    def get(self, accounts):
        if accounts not in self._built:
            path = self.root / f"population-{benchlib.label(accounts)}"
            print(f"\nbuilding the {benchlib.label(accounts)}-account population "
                  f"(kernel, sync off) ...", flush=True)
            population = benchlib.build_population(accounts, path)
            print(f"  built in {population.build_seconds:.1f} s, "
                  f"{population.data_bytes / 2**20:,.0f} MiB", flush=True)
            benchlib.COLLECTOR.populations[accounts] = {
                "build_seconds": population.build_seconds,
                "data_bytes": population.data_bytes}
            self._built[accounts] = population
        return self._built[accounts]


@pytest.fixture(scope="session")
def populations(bench_root):
    return Populations(bench_root)


class Workloads:
    """The batch stream of the current (accounts, op, batch size). The kernel
    and twin cases of one key run one after the other, so only the latest
    stream is kept (a 64k stream of a kernel case is a few hundred MB)."""

    def __init__(self):
        self._key = None
        self._workload = None

    def get(self, accounts, op, size):
        key = (accounts, op, size)
        if key != self._key:
            self._key, self._workload = key, benchlib.Workload(accounts, op, size)
        return self._workload


@pytest.fixture(scope="session")
def workloads():
    return Workloads()


@pytest.fixture
def case_dir(bench_root):
    """Where a case's copy of its population lives; removed after the case,
    and the removal pushed to disk (with discard on, ext4 trims the freed
    blocks at its next journal commit) before the next case measures."""
    path = bench_root / "case"
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_terminal_summary(terminalreporter):
    collector = benchlib.COLLECTOR
    if not collector.rows:
        return
    now = datetime.datetime.now()
    host = socket.gethostname()
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"),
            "host": host, "cpus": os.cpu_count(), "commit": _commit(),
            "config": {"accounts": benchlib.BIG_ACCOUNTS,
                       "ratio_accounts": benchlib.RATIO_ACCOUNTS,
                       "kernel_seconds": benchlib.KERNEL_SECONDS,
                       "twin_seconds": benchlib.TWIN_SECONDS,
                       "quick": benchlib.QUICK, "map_size": benchlib.MAP_SIZE,
                       "sync": True}}
    summary = benchlib.summarize(collector)
    text = benchlib.render(summary, meta)
    terminalreporter.write_line("")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    RESULTS_DIR.mkdir(exist_ok=True)
    # A run with other than the default configuration (quick mode, other
    # populations or budgets) is named so that it does not replace a full run.
    # So is a run of only some cases (`-k`).
    populations = len({benchlib.RATIO_ACCOUNTS, benchlib.BIG_ACCOUNTS})
    every_case = populations * len(benchlib.OPERATIONS) * len(benchlib.BATCH_SIZES) \
        * len(benchlib.IMPLEMENTATIONS)
    complete = benchlib.DEFAULT_CONFIG and len(collector.rows) == every_case
    suffix = "" if complete else f"-{benchlib.label(benchlib.BIG_ACCOUNTS)}-dev"
    out = RESULTS_DIR / f"kernel-{meta['date']}-{host}{suffix}.json"
    out.write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n")
    terminalreporter.write_line(f"saved {out}")
