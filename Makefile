# Kopilka: `make test`, `make serve`, `make demo`, `make bench`. Each sets up
# what it needs on a fresh Debian machine: system packages, .venv, the Cython
# kernel (and for the benchmarks, PostgreSQL and their Python packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.bench-installed
KERNEL := kernel/_ledger.pyx kernel/_lmdb.pxi
PROTOS := $(wildcard proto/kopilka/v1/*.proto)
APT_PACKAGES := liblmdb-dev libsodium-dev gcc python3-dev python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
KOPILKA := $(BIN)/kopilka
DATA ?= ./data
LISTEN ?= 127.0.0.1:50051

.PHONY: test torture bench bench-quick bench-guard bench-kernel serve demo \
	system-deps bench-system-deps build proto clean

test: build
	$(BIN)/python -m pytest tests

# The long torture runs (minutes): at least 20 SIGKILLs under load, bigger
# contention and fuzzing runs; a summary at the end. KOPILKA_TORTURE_SEED,
# KOPILKA_TORTURE_KILLS, KOPILKA_TORTURE_TILLS tune them.
torture: build
	KOPILKA_TORTURE=long $(BIN)/python -m pytest tests/torture -p no:cacheprovider \
		$(TORTURE_ARGS)

# Kopilka side by side with PostgreSQL, SQLite and the machine's ceilings,
# then Kopilka at 10k to 10M accounts: benchmarks/results/<date>-<host>.json
# and .png (about 30 minutes; bench-quick: the same, small, in under 2).
bench: build $(BENCH_INSTALLED)
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

bench-quick: build $(BENCH_INSTALLED)
	$(BIN)/python benchmarks/suite.py --quick $(BENCH_ARGS)

# Ratios that must not fall below their floors (benchmarks/guard-floors.json);
# CI runs it. No PostgreSQL needed.
bench-guard: build
	$(BIN)/python benchmarks/guard.py

# The kernel and its twin in detail: every operation and batch size
# (pytest-benchmark; benchmarks/results/kernel-<date>-<host>.json).
bench-kernel: build
	$(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-only \
		-p no:cacheprovider -s $(BENCH_ARGS)

# First run: `kopilka init` creates $(DATA) with the example program and an
# admin token (and changes nothing when they exist), then the server runs on
# loopback without TLS until Ctrl-C or SIGTERM.
serve: build
	@$(KOPILKA) init --data $(DATA)
	@echo
	@echo "Kopilka on $(LISTEN), no TLS (--insecure: loopback, local development only)"
	@echo "  admin token  $(DATA)/admin.token"
	@echo "  try it       make demo    (in another terminal; or $(KOPILKA) demo)"
	@echo "  the CLI      $(KOPILKA) --help    (member get, card block, adjust, audit, ...)"
	@echo "  grpcurl      grpcurl -plaintext $(LISTEN) list    (server reflection)"
	@echo "               grpcurl -plaintext -H \"authorization: Bearer \$$(cat $(DATA)/admin.token)\" \\"
	@echo "                 -d '{\"name\": \"programs/1\"}' $(LISTEN) kopilka.v1.Programs/GetProgram"
	@echo "  stop         Ctrl-C: what is queued is committed first"
	@echo
	@exec $(KOPILKA) serve --insecure --data $(DATA) --listen $(LISTEN)

# A scripted checkout against the server `make serve` runs. It does not
# rebuild the kernel, which the running server has loaded.
demo: $(INSTALLED) proto
	@$(KOPILKA) demo --server $(LISTEN) --data $(DATA)

# System packages the build needs, installed only when missing.
system-deps:
	@missing=""; \
	[ -f /usr/include/lmdb.h ] || missing="$$missing liblmdb-dev"; \
	[ -f /usr/include/sodium.h ] || missing="$$missing libsodium-dev"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The PostgreSQL server the comparison starts in a temporary directory.
bench-system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
		echo "installing system packages: postgresql"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; }

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml setup.py | system-deps $(BIN)/python
	$(BIN)/pip install -q -U pip setuptools wheel cython grpcio-tools googleapis-common-protos
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	touch $@

$(BENCH_INSTALLED): pyproject.toml | bench-system-deps $(INSTALLED)
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,bench]'
	touch $@

# The public API's Python modules (kopilka.v1, in gen/), generated from
# proto/kopilka/v1/*.proto when a .proto (or the generator) changes, or when
# a .proto is added or removed; not committed.
proto: $(PROTOS) | $(INSTALLED)
	@$(BIN)/python tools/gen_proto.py --if-stale

# Rebuilds the kernel when its sources change (cythonize skips it otherwise).
build: system-deps $(INSTALLED) proto
	@$(BIN)/python setup.py -q build_ext --inplace > $(VENV)/build.log 2>&1 \
		|| { cat $(VENV)/build.log; exit 1; }

clean:
	rm -rf build *.egg-info kernel/_ledger.c kernel/*.so core/_pricing.c core/*.so gen
