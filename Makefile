# Two entry points on a fresh Debian machine: `make demo` and `make test`.
# Each one installs what is missing (system packages, then a venv) and is
# quick when everything is already there.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := libcap-dev libseccomp2 qemu-system-x86 qemu-system-common qemu-utils \
                busybox-static cpio zstd xz-utils fio
PYTEST_FLAGS ?=

.PHONY: all setup system-packages demo test check e2e security bench fuzz clean

all: test

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) system-packages
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	    echo "installing python3-venv"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: system-packages $(STAMP)

demo: setup
	$(PY) -m supervisor.demo

test: setup
	$(PY) -m pytest $(PYTEST_FLAGS)

# The fast tier: unit and integration tests (real sockets, fork, jails, seccomp),
# nothing that needs a QEMU binary or boots a guest.
check: setup
	$(PY) -m pytest tests --ignore=tests/e2e -m "not e2e and not qemu" $(PYTEST_FLAGS)

e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_FLAGS)

security: setup
	$(PY) -m pytest tests/security tests/sandbox $(PYTEST_FLAGS)

# Coverage-guided fuzzing (atheris) of every parser that takes hostile input:
# each target in tests/fuzz/targets/ for FUZZ_SECONDS, two at a time, niced;
# prints exec/s, coverage and crashes per target.  `make test` only replays
# tests/fuzz/corpus and tests/fuzz/regressions.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
FUZZ_STAMP := $(VENV)/.fuzz-installed

$(FUZZ_STAMP): pyproject.toml
	$(PY) -m pip install -q 'atheris>=2.3'
	touch $(FUZZ_STAMP)

fuzz: setup $(FUZZ_STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m tests.fuzz.run $(FUZZ_TARGETS)

bench: setup
	$(PY) -m benchmarks.block
	$(PY) -m benchmarks.supervisor
	$(PY) -m benchmarks.jail
	$(PY) -m benchmarks.guest_fio

clean:
	rm -rf $(VENV) .cache build *.egg-info
