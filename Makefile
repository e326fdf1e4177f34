# The two commands of the README:
#   make run    install and run the node on its embedded default
#   make test   install everything the tests need and run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so that no dependency range pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= -q
# dcmtk's tools (storescu, storescp) and Orthanc, which embeds dcmtk, leave Nagle on otherwise.
export TCP_NODELAY := 1

.PHONY: run test test-pg install system-deps lint typecheck unit bench soak fuzz train-nodules clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

system-deps:
	bash deploy/install-system-deps.sh

run: install
	$(VENV)/bin/pacs-ai serve

lint: install
	$(PY) -m ruff check pacs_ai workers tests bench
	$(PY) -m ruff format --check pacs_ai workers tests bench

typecheck: install
	$(PY) -m mypy

unit: install
	$(PY) -m pytest -m "not slow"

# Two pytest-xdist workers, a test file each at a time (a file's module fixtures are made
# once), the files with the most slow tests first (tests/conftest.py): most of a test's time
# is spent waiting on the processes it starts (nodes, workers, Orthanc), so two at once take
# 12-17 minutes (README, "The two commands") where one after the other took ~20.
test: install system-deps lint typecheck
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The whole suite again with every test's database on PostgreSQL (tests/databases.py); `make
# test` covers PostgreSQL only in the tests marked postgres. Uses the server on 127.0.0.1:5432
# when it lets user postgres in without a password, PACS_AI_TEST_PG's when set, and otherwise
# starts a private throw-away one (tests/postgres_server.py).
test-pg: install system-deps
	PACS_AI_TEST_DATABASE=postgresql $(PY) -m pytest

bench: install system-deps
	$(PY) bench/ingest.py
	$(PY) bench/latency.py
	$(PY) bench/worklist.py
	$(PY) bench/scale.py

# The fault tests at larger counts (bench/soak.py), and the fuzzers with many examples.
soak: install system-deps
	$(PY) bench/soak.py

FUZZ_EXAMPLES ?= 5000
fuzz: install
	PACS_AI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_fuzz.py tests/test_dicomweb.py -k fuzz

# Retrain the lung-nodule-demo weights shipped in pacs_ai/models/weights/ (CPU, minutes).
train-nodules: install
	$(PY) -m pacs_ai.models.nodules.train --out pacs_ai/models/weights/lung_nodule_demo.pt

clean:
	rm -rf $(VENV) pacs-ai-data .pytest_cache .mypy_cache .ruff_cache
