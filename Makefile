# GSE in Python: the developer entry points.
#
#   make demo    install what is missing, then run a local cluster (ZooKeeper, Redis, every daemon, agents)
#   make test    install what is missing, then run the whole test suite
#
# `setup` is the one shared install step and is cheap when everything is in place: system packages are
# installed only when dpkg says one is missing, the venv is made only when it does not exist, and the
# project is reinstalled only when pyproject.toml is newer than the install stamp.

SHELL := /bin/bash

# The interpreter the venv is made from (Python 3.11 or newer).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install
# zookeeper brings java with it (it depends on default-jre); iproute2 gives the tests `ip`.
APT_PACKAGES := zookeeper redis-server iproute2
# Every benchmark script `make bench` runs, in order.
BENCHMARKS := bench/agent_attach.py bench/task_fanout.py bench/data_throughput.py bench/file_hashing.py bench/redis_output.py bench/api_latency.py bench/proc_ops.py bench/agent_rss.py
# -ra: one summary line for every test that did not pass (the closing "N passed in Ts" line comes anyway).
PYTEST_ARGS ?= -ra
# e.g. make demo DEMO_ARGS='--agents 5 --detach'
DEMO_ARGS  ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup system-packages demo test bench proto down clean

help:
	@echo "make demo     set up, then start a local cluster doing real work (Ctrl-C stops it)"
	@echo "make test     set up, then run the whole test suite"
	@echo "make setup    install ZooKeeper, Redis, iproute2 (as root) and the project into $(VENV)"
	@echo "make bench    set up, then run the benchmarks: $(BENCHMARKS)"
	@echo "make proto    regenerate gse/pb from proto/"
	@echo "make down     stop a cluster started with 'make demo DEMO_ARGS=--detach'"
	@echo "make clean    stop a detached local cluster and remove caches and build output"

setup: system-packages $(STAMP)

# Debian packages, installed only when one is missing. python3-venv is added when the interpreter cannot
# make a venv by itself (Debian's python3 without it has no ensurepip).
system-packages:
	@if ! command -v dpkg >/dev/null; then \
		echo "setup: not a Debian system; install these yourself: $(APT_PACKAGES)"; exit 0; \
	fi; \
	missing=""; \
	for p in $(APT_PACKAGES); do \
		dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ ! -x $(PY) ] && ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ]; then \
		echo "setup: missing packages:$$missing; run 'make setup' as root (or apt-get install them)" >&2; exit 1; \
	fi; \
	echo "setup: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q --no-install-recommends $$missing

$(PY): | system-packages
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "setup: $(PYTHON) is older than Python 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(VENV)/bin/gse dev up $(DEMO_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@set -e; for b in $(BENCHMARKS); do \
		echo "== $$b"; \
		$(PY) $$b $(BENCH_ARGS); \
	done

proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/gse/pb/*.proto

down:
	@if [ -x $(VENV)/bin/gse ]; then $(VENV)/bin/gse dev down; else echo "no $(VENV); nothing to stop"; fi

clean: down
	rm -rf .gse-dev .pytest_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
