"""The import contract of pyproject.toml ([tool.importlinter]): layers only point down, no import cycles.

lint-imports analyses the installed package (what ``import airtrace`` finds), so the
contract holds for the code the rest of the suite tests. A second run on a copy with
one upward import shows that the contract catches it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import airtrace

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(PYPROJECT), "--no-cache", "--no-logo"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layers_point_down_and_no_package_has_a_cycle():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    package = tmp_path / "airtrace"
    shutil.copytree(Path(airtrace.__file__).parent, package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    registry = package / "ops" / "backends.py"
    registry.write_text(registry.read_text() + "\n\ndef _upward():\n    from airtrace.attribute import Attributor\n")
    done = _lint(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    assert "airtrace.ops.backends -> airtrace.attribute" in done.stdout, done.stdout[-4000:]
