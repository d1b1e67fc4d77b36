"""The public Python API: airtrace.__all__ imports, is documented, type-hinted and listed in the README."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import airtrace

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(airtrace.__file__).resolve().parent


def _readme_api_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Python API\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Python API' section"
    return match.group(1)


def _public_callables(obj) -> list[tuple[str, object]]:
    """The object itself (functions) or its public methods, properties' getters and __init__ (classes)."""
    if not inspect.isclass(obj):
        return [(obj.__name__, obj)]
    out = []
    for name, member in vars(obj).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member):
            out.append((f"{obj.__name__}.{name}", member))
    return out


def test_all_is_unique_and_sorted_into_the_module():
    assert len(set(airtrace.__all__)) == len(airtrace.__all__)
    namespace = {}
    exec("from airtrace import *", namespace)  # noqa: S102
    assert set(airtrace.__all__) <= set(namespace)


@pytest.mark.parametrize("name", airtrace.__all__)
def test_public_name_is_documented_and_typed(name):
    obj = getattr(airtrace, name)
    assert f"`{name}`" in _readme_api_section(), f"{name} is not listed in README.md's Python API section"
    if not callable(obj):
        return  # a constant (BACKENDS): the README entry is its documentation
    assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"
    if inspect.isclass(obj):
        assert "__doc__" in vars(obj), f"{name} inherits its docstring"
    for qualname, function in _public_callables(obj):
        signature = inspect.signature(function)
        untyped = [p.name for p in signature.parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        assert not untyped, f"{qualname}: parameters without type hints {untyped}"
        if function.__name__ != "__init__":
            assert signature.return_annotation is not inspect.Parameter.empty, f"{qualname}: no return type hint"


def test_py_typed_marker_ships_with_the_package():
    assert (PACKAGE / "py.typed").is_file()


def test_custom_ops_are_registered_by_import_airtrace():
    import torch

    for name in ("project_factored", "project_dense", "project_sparse", "score_topk", "precondition",
                 "group_pool_scores"):
        op = getattr(torch.ops.airtrace, name)
        assert name in str(op.default._schema) and name in _readme_api_section()


def test_import_airtrace_stays_light():
    """No compiler stack, Triton or optional heavy dependency is imported by ``import airtrace``."""
    code = ("import sys, airtrace\n"
            "heavy = ('torch._dynamo', 'torch._inductor', 'triton', 'transformers', 'sklearn', 'scipy', "
            "'matplotlib', 'hypothesis')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
