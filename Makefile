# Two entry points on a fresh Debian machine: `make demo` and `make test`.
# Each one installs what is missing (system packages, then a venv) and is
# quick when everything is already there.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := libcap-dev libseccomp2 qemu-system-x86 qemu-system-common qemu-utils \
                busybox-static cpio zstd xz-utils fio iproute2 dpdk-dev librte-net-virtio23 librte-mempool-ring23
PYTEST_FLAGS ?=

.PHONY: all setup system-packages demo test check conformance e2e security host-test fuzz bench blkio-client bench-matrix clean

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

# Everything: QEMU's qtest suite, the booted-systemd host test, then pytest
# (unit, integration, security catalog, fuzz replay, QEMU end-to-end).
test: setup conformance host-test
	$(PY) -m pytest $(PYTEST_FLAGS)

# The fast tier: unit and integration tests (real sockets, fork, jails, seccomp),
# nothing that needs a QEMU binary or boots a guest; the security catalog
# (make security) and the wheel test (network) are left to make test.
check: setup
	$(PY) -m pytest tests --ignore=tests/e2e --ignore=tests/host --ignore=tests/security/test_catalog.py --ignore=tests/packaging -m "not e2e and not qemu" $(PYTEST_FLAGS)

# QEMU's own vhost-user-blk qtest suite, unmodified, against our block device
# (through conformance/qsd-shim) and against qemu-storage-daemon.  The first
# run builds QEMU's qtest binaries for the installed QEMU (cached under
# /var/cache/vhost-supervisor, reused afterwards); see conformance/README.md.
conformance: setup
	$(PY) conformance/run.py

e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_FLAGS)

# The package under a real systemd: a cached Debian 12 root (debootstrap, cached in
# /var/cache/vhost-supervisor/host-test), booted under QEMU with systemd as PID 1
# on cgroup v2; five checks inside (tests/host).  About 2 minutes with the base
# cached (image rebuilt for the current sources, boot, checks).
host-test: setup
	@command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
	$(PY) -m tests.host.harness

# The attack catalog against a temporary supervisor on this host (also run by
# `make test` through tests/security); the report is what a reviewer files.
security: setup
	$(PY) -m supervisor.cli security-check --json security-report.json

# libblkio client (Debian 13's libblkio unpacked, not installed; cached in
# ~/.cache/vhost-supervisor/blkio): see benchmarks/blkio/fetch.sh.
blkio-client:
	@command -v gcc >/dev/null && command -v curl >/dev/null || { \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev curl >/dev/null; }
	sh benchmarks/blkio/fetch.sh

bench-matrix: setup blkio-client
	$(PY) -m benchmarks.block_matrix

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

bench: setup blkio-client
	$(PY) -m benchmarks.block
	$(PY) -m benchmarks.block_matrix
	$(PY) -m benchmarks.supervisor
	$(PY) -m benchmarks.jail
	$(PY) -m benchmarks.guest_fio
	$(PY) -m benchmarks.net

clean:
	rm -rf $(VENV) .cache build *.egg-info
