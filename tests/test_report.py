"""The HTML report of a scores document: escaping, what each query shows, and the page as a real headless browser
(Debian's chromium) renders it: rows and scores in the DOM, the search box filtering, a screenshot (slow)."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from airtrace.report import load_document, render, write_report
from airtrace.scoring import METRIC_DEFINITIONS, SIGN_CONVENTION

RESULTS = Path(__file__).resolve().parent.parent / "benches" / "results" / "report"


def document(with_tokens: bool = True) -> dict:
    """Two queries; helpful and harmful rows; a code answer with line breaks; per-token scores on one row."""
    rows = [
        {"query_id": "q<1>", "order": "top", "rank": 1, "train_index": 3, "train_id": "code", "score": 2.5,
         "metric": "inner"},
        {"query_id": "q<1>", "order": "top", "rank": 2, "train_index": 0, "train_id": "t0", "score": 0.75,
         "metric": "inner"},
        {"query_id": "q<1>", "order": "bottom", "rank": 1, "train_index": 1, "train_id": "t1", "score": -1.25,
         "metric": "inner"},
        {"query_id": "q2", "order": "top", "rank": 1, "train_index": 2, "train_id": "t2", "score": 12.5,
         "metric": "inner"},
    ]
    if with_tokens:
        rows[1].update(tokens=[0.5, -0.25, 0.375], token_rest=0.125, token_strings=["Hel", "lo", " <w>"])
    return {
        "metric": "inner", "metric_definition": METRIC_DEFINITIONS["inner"], "sign": SIGN_CONVENTION,
        "order": "both", "settings": {"layers": "<all>"}, "query_ids": ["q<1>", "q2"],
        "queries": [{"id": "q<1>", "text": "Is 1 < 2 & 3 > 2?", "label": "math"}, {"id": "q2", "text": 'Say "hi"'}],
        "train": [{"id": "code", "text": "def f(x):\n    return x + 1", "label": "coding"},
                  {"id": "t0", "text": "<script>alert(0)</script>"}, {"id": "t1", "text": "plain & simple"},
                  {"id": "t2", "text": "hi"}],
        "topk": rows, "groups": None,
        "distribution": {"train_rows": [0, 1, 2, 3], "scores": [[0.75, -1.25, 0.1, 2.5], [0.0, 0.1, 12.5, -0.5]]},
    }


def test_report_escapes_text_and_shows_every_row():
    text = render(document())
    assert "<script>alert" not in text and "Is 1 &lt; 2 &amp; 3 &gt; 2?" in text and "&lt;all&gt;" in text
    assert "def f(x):\n    return x + 1" in text  # line breaks kept (pre-wrap)
    for row in document()["topk"]:
        assert f'data-train-id="{html.escape(row["train_id"])}" data-order="{row["order"]}"' in text
    assert 'class="neg"' in text and "width:100.0%" in text and text.count('<img class="dist"') == 2
    assert text.count('class="tok"') == 3 and "&lt;w&gt;" in text and html.escape(SIGN_CONVENTION) in text


def test_csv_rows_make_a_report_too(tmp_path):
    from airtrace.report import encode

    path = tmp_path / "s.csv"
    path.write_bytes(encode(document(), "csv"))
    loaded = load_document(path)
    assert [r["score"] for r in loaded["topk"]] == [r["score"] for r in document()["topk"]]
    assert loaded["topk"][1]["tokens"] == [0.5, -0.25, 0.375]
    assert "Most harmful" in render(loaded)


# ------------------------------------------------------------------ a real browser


def chromium() -> str:
    """The headless browser; a test without one skips outside CI and fails in CI (.ci/run installs it)."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def browse(page: Path, *extra: str, fragment: str = "") -> str:
    """The DOM of ``page`` after its scripts ran, as chromium dumps it."""
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           *extra, "--dump-dom", page.resolve().as_uri() + fragment],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rendered_rows(dom: str) -> list[tuple[str, str, float, bool]]:
    """(train id, order, score, hidden) of every row of the rendered page."""
    out = []
    for tag in re.findall(r'<tr class="row"[^>]*>', dom):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        out.append((html.unescape(attrs["data-train-id"]), attrs["data-order"], float(attrs["data-score"]),
                    "hidden" in attrs))
    return out


def test_browser_renders_the_scores_and_the_search_filters(tmp_path):
    doc = document()
    page = write_report(tmp_path / "report.html", doc)
    dom = browse(page)
    assert [(i, o, s) for i, o, s, _ in rendered_rows(dom)] == [(r["train_id"], r["order"], r["score"])
                                                              for r in doc["topk"]]
    assert '<span id="shown">2</span>' in dom
    filtered = browse(page, fragment="#search=simple")  # the search box, filled from the URL
    assert '<span id="shown">1</span>' in filtered
    assert [(i, hidden) for i, _, _, hidden in rendered_rows(filtered)] == [
        ("code", True), ("t0", True), ("t1", False), ("t2", True)]


@pytest.mark.slow
def test_browser_report_of_a_real_run_with_a_screenshot(tmp_path):
    """A tiny LM featurized and scored through the CLI with per-token scores; the report rendered by chromium
    matches the scores file, and its screenshot is saved under benches/results/report/."""
    import torch

    from airtrace import cli

    browser = chromium()
    here = Path(__file__).resolve().parent
    store, scores = tmp_path / "store", tmp_path / "scores.json"
    common = ["--model", "test_report:tiny_lm_task"]
    cwd = os.getcwd()
    os.chdir(here)
    try:
        assert cli.main(["featurize", str(store), *common, "--quiet"]) == 0
        assert cli.main(["score", str(store), *common, "--order", "both", "--topk", "4", "--tokens", "--metric",
                         "cosine", "--output", str(scores), "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    doc = json.loads(scores.read_text())
    page = write_report(tmp_path / "report.html", doc, title="airtrace report: a tiny LM")
    dom = browse(page)
    rendered = rendered_rows(dom)
    assert [(i, o) for i, o, _, _ in rendered] == [(str(r["train_id"]), r["order"]) for r in doc["topk"]]
    for (_, _, score, _), row in zip(rendered, doc["topk"]):
        assert score == pytest.approx(row["score"], rel=1e-12)
    assert dom.count('class="tok"') == sum(len(r["tokens"]) for r in doc["topk"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    shot = RESULTS / "report.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,1400", f"--screenshot={shot}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    torch.manual_seed(0)


def tiny_lm_task():
    """A character-level LM on a few sentences, with text and token strings for the report."""
    import torch
    from torch import nn

    from airtrace import Task
    from airtrace.capture import per_example_loss

    sentences = ["the cat sat on the mat", "a dog ran in the park", "the cat ate the fish",
                 "def add(a, b):\n    return a + b", "birds fly south in winter", "the dog sat on the rug",
                 "print('hello')\nprint('world')", "cats and dogs play"]
    chars = sorted(set("".join(sentences)))
    vocab = {c: i + 1 for i, c in enumerate(chars)}
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(len(vocab) + 1, 12), nn.Linear(12, 12), nn.Linear(12, len(
                vocab) + 1)

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    def encode(texts):
        T = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), T, dtype=torch.int64)
        for b, t in enumerate(texts):
            ids[b, :len(t)] = torch.tensor([vocab[c] for c in t])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def loss(model, batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return per_example_loss(model(batch["input_ids"]), labels, "causal_lm")

    train = [(list(range(s, s + 3)), encode(sentences[s: s + 3])) for s in range(0, 6, 3)] + [
        ([6, 7], encode(sentences[6:]))]
    queries = [(["cat?", "code?"], encode(["the cat sat", "def add(a, b):\n    return a"]))]
    inverse = {i: c for c, i in vocab.items()}
    return Task(LM(), loss, train, queries, describe=lambda i: sentences[i] if isinstance(i, int) else i,
                decode=lambda ids: [inverse.get(i, "?") for i in ids])
