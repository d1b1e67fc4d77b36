"""First contact from the shell: a factory with arguments, queries from a file, helpful and harmful rows, CSV /
Parquet / JSON output read back by pandas, the report, --profile, --quiet, --version and files written 0644."""

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from airtrace import Attributor, Task, cli, per_example_loss
from airtrace.report import load_document, render, scores_document

pd = pytest.importorskip("pandas")

N_TRAIN = 18
CALLS: list[dict] = []


def loss_fn(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def build(n_train: int = N_TRAIN, width: int = 5):
    """A factory that takes arguments: an MLP on random data, train as a DataLoader of dicts."""
    CALLS.append({"n_train": n_train, "width": width})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))
    X, y = torch.randn(n_train, 3), torch.randint(0, 2, (n_train,))
    data = [{"x": X[i], "y": y[i]} for i in range(n_train)]
    train = DataLoader(data, batch_size=4)
    queries = [(["qa", "qb"], {"x": X[:2] + 0.01, "y": y[:2]})]
    return Task(model, loss_fn, train, queries, describe=lambda i: f"example {i}\nline two")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    path = str(root / "store")
    assert cli.main(["featurize", path, "--model", "test_first_contact_cli:build", "--model-arg", "width=6",
                     "--dtype", "float32", "--quiet"]) == 0
    return root, path


def _python_scores(store_path, queries, **kwargs):
    task = build(width=6)
    at = Attributor.from_store(task.model, store_path, loss_fn=loss_fn, curvature="identity")
    return at.score(queries, store_path, progress=False, **kwargs)


def test_factory_arguments_and_the_store(store):
    _, path = store
    assert CALLS[-1] == {"n_train": N_TRAIN, "width": 6}
    with pytest.raises(SystemExit) as exc:
        cli.main(["featurize", path + "2", "--model", "test_first_contact_cli:build", "--model-arg", "depth=3"])
    assert exc.value.code == 2


def test_queries_from_a_jsonl_file_both_orders_as_csv_for_pandas(store, capsys):
    root, path = store
    queries = root / "queries.jsonl"
    queries.write_text('{"id": "first", "x": [0.5, -1.0, 2.0], "y": 1}\n\n{"id": "second", "x": [0, 0, 1], "y": 0}\n')
    out = root / "scores.csv"
    assert cli.main(["score", path, "--model", "test_first_contact_cli:build", "--model-arg", "width=6",
                     "--queries", str(queries), "--order", "both", "--topk", "3", "--output", str(out),
                     "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    frame = pd.read_csv(out)
    assert list(frame.columns[:7]) == ["query_id", "order", "rank", "train_index", "train_id", "score", "metric"]
    batch = {"x": torch.tensor([[0.5, -1.0, 2.0], [0, 0, 1]]), "y": torch.tensor([1, 0])}
    want = _python_scores(path, [(["first", "second"], batch)], topk=3, order="both")
    assert len(frame) == 2 * 2 * 3
    assert frame["score"].tolist() == pytest.approx([r["score"] for r in want.to_rows()], rel=1e-6)
    helpful = frame[frame.order == "top"].groupby("query_id")["score"].apply(list)
    harmful = frame[frame.order == "bottom"].groupby("query_id")["score"].apply(list)
    assert all(s == sorted(s, reverse=True) for s in helpful) and all(s == sorted(s) for s in harmful)
    assert (frame[frame.order == "bottom"]["score"] < frame[frame.order == "top"]["score"].min()).all()
    assert os.stat(out).st_mode & 0o777 == 0o644


def test_parquet_and_json_outputs_hold_the_same_rows(store):
    root, path = store
    common = ["score", path, "--model", "test_first_contact_cli:build", "--model-arg", "width=6", "--quiet",
              "--order", "both", "--topk", "2"]
    assert cli.main([*common, "--output", str(root / "s.parquet")]) == 0
    assert cli.main([*common, "--output", str(root / "s.json")]) == 0
    parquet = pd.read_parquet(root / "s.parquet")
    document = json.loads((root / "s.json").read_text())
    assert parquet.to_dict(orient="records") == [{k: r[k] for k in parquet.columns} for r in document["topk"]]
    assert document["sign"].startswith("score > 0: the training example lowers the query's loss")
    assert document["train"][0]["text"].endswith("\nline two")
    assert len(document["distribution"]["scores"]) == 2 and len(document["distribution"]["train_rows"]) == N_TRAIN
    assert load_document(root / "s.parquet")["topk"][0]["train_id"] == document["topk"][0]["train_id"]


def test_output_is_checked_before_any_work(store, capsys):
    root, path = store
    CALLS.clear()
    with pytest.raises(SystemExit) as exc:
        cli.main(["score", path, "--model", "test_first_contact_cli:build", "--output",
                  str(root / "missing" / "s.csv")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err and CALLS == []
    with pytest.raises(SystemExit):
        cli.main(["fit", path, "--model", "test_first_contact_cli:build", "--out", str(root)])
    assert "is a folder" in capsys.readouterr().err and CALLS == []


def test_version_and_metric_help(capsys):
    for argv in (["--version"], ["score", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("airtrace 0.")
    for words in ("lowers the query's loss", "inner:", "cosine:", "relative:"):
        assert words in out


def test_profile_prints_a_stage_table_and_reads_a_trace_back(store, capsys):
    root, path = store
    trace = root / "trace.json"
    assert cli.main(["featurize", str(root / "p"), "--model", "test_first_contact_cli:build", "--model-arg",
                     "width=6", "--quiet", "--profile", str(trace)]) == 0
    err = capsys.readouterr().err
    assert "rows/s" in err and "capture" in err and "store_write" in err
    capture = next(line for line in err.splitlines() if line.startswith("capture"))
    assert int(capture.split()[1]) == -(-N_TRAIN // 4)  # one capture range per batch
    assert cli.main(["profile", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "airtrace stage ranges" in out and capture.split()[:2] == next(
        line for line in out.splitlines() if line.startswith("capture")).split()[:2]


def test_report_of_any_scores(store, tmp_path):
    root, path = store
    assert cli.main(["score", path, "--model", "test_first_contact_cli:build", "--model-arg", "width=6", "--quiet",
                     "--order", "both", "--topk", "3", "--output", str(root / "r.json")]) == 0
    html = tmp_path / "report.html"
    assert cli.main(["report", str(root / "r.json"), "--out", str(html), "--quiet"]) == 0
    text = html.read_text()
    document = json.loads((root / "r.json").read_text())
    for row in document["topk"]:
        assert f'data-train-id="{row["train_id"]}" data-order="{row["order"]}"' in text
    assert text.count('<img class="dist"') == 2 and 'id="search"' in text and "line two" in text
    assert os.stat(html).st_mode & 0o777 == 0o644


TAGGER_VOCAB = 20


class _Tagger(nn.Module):
    """Token ids (B, T) and mask -> (B, 3) logits: per-token layers, then a pooled head with no token axis."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(TAGGER_VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        h = torch.tanh(self.mix(self.emb(ids)))
        return self.head((h * mask[..., None]).sum(1))


def _tagger_loss(model, batch):
    return per_example_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def test_per_token_scores_sum_to_the_score(tmp_path):
    """Token parts plus the rest equal each listed row's score, for every metric."""
    torch.manual_seed(1)
    vocab, T, Tagger, loss = TAGGER_VOCAB, 6, _Tagger, _tagger_loss

    ids = torch.randint(1, vocab, (12, T))
    mask = (torch.arange(T)[None] < torch.randint(2, T + 1, (12,))[:, None]).long()
    data = TensorDataset(ids, mask, torch.randint(0, 3, (12,)))
    loader = DataLoader(data, batch_size=5, collate_fn=lambda rows: {
        "input_ids": torch.stack([r[0] for r in rows]), "attention_mask": torch.stack([r[1] for r in rows]),
        "labels": torch.stack([r[2] for r in rows])})
    at = Attributor(Tagger(), loss_fn=loss, projection=dict(k_in=4, k_out=4, seed=1), curvature="ekfac")
    store = at.featurize(loader, tmp_path / "s", dtype="float32", progress=False)
    at.fit(loader, store=store, progress=False)
    for metric in ("inner", "relative", "cosine"):
        scores = at.score(loader, store, topk=3, order="both", metric=metric, token_batches=loader, progress=False)
        rows = scores.to_rows()
        assert len(rows) == 12 * 6 and all("tokens" in r for r in rows)
        for r in rows:
            assert len(r["tokens"]) == int(mask[r["train_id"]].sum()) and len(r["input_ids"]) == len(r["tokens"])
            assert sum(r["tokens"]) + r["token_rest"] == pytest.approx(r["score"], rel=2e-4, abs=1e-5)
            assert r["token_rest"] != 0  # the pooled head has no token axis


def test_full_matrix_in_memory_matches_the_rankings(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss = lambda m, b: per_example_loss(m(b[0]), b[1])  # noqa: E731
    loader = DataLoader(TensorDataset(torch.randn(9, 3), torch.randint(0, 2, (9,))), batch_size=4)
    at = Attributor(model, loss_fn=loss, curvature="identity")
    store = at.featurize(loader, tmp_path / "s", dtype="float32", rows_per_shard=4, progress=False)
    scores = at.score(loader, store, topk=2, order="both", matrix=True, progress=False)
    S = scores.matrix
    assert S.shape == (9, 9)
    top, bottom = S.topk(2, dim=1), (-S).topk(2, dim=1)
    torch.testing.assert_close(scores.values, top.values)
    torch.testing.assert_close(scores.bottom_values, -bottom.values)
    assert scores.indices.tolist() == top.indices.tolist() and scores.bottom_indices.tolist() == bottom.indices.tolist()
    torch.testing.assert_close(scores.sample, S[:, scores.sample_rows])
    document = scores_document(scores, settings={"run": "test"}, order="both")
    assert "Most harmful" in render(document)


def test_per_token_scores_from_the_kept_tokens_match_a_second_pass(tmp_path):
    """featurize(keep_tokens=True): score's per-token parts come from the featurize pass (no batch is run again:
    empty token_batches suffice) and equal those of a second forward/backward, on padded, length-bucketed batches."""
    torch.manual_seed(3)
    vocab, T, loss = TAGGER_VOCAB, 7, _tagger_loss

    lengths = torch.randint(1, T + 1, (11,))
    ids = torch.randint(1, vocab, (11, T))
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (11,))
    batches = [(list(range(i, min(i + 4, 11))), {"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4],
                                                 "labels": labels[i:i + 4]}) for i in range(0, 11, 4)]
    model = _Tagger()
    results = []
    for keep in (True, False):
        at = Attributor(model, loss_fn=loss, projection=dict(k_in=4, k_out=4, seed=1), curvature="ekfac")
        store = at.featurize(batches, tmp_path / f"s{keep}", dtype="float32", keep_tokens=keep, progress=False)
        at.fit(batches, store=store, progress=False)
        results.append(at.score(batches, store, topk=4, order="both", metric="relative",
                                token_batches=[] if keep else batches, progress=False))
    kept, rerun = results
    assert kept.tokens.keys() == rerun.tokens.keys() and len(kept.tokens) == 11 * 8
    for key, ours in kept.tokens.items():
        theirs = rerun.tokens[key]
        assert ours.input_ids == theirs.input_ids and len(ours.scores) == int(lengths[key[1]])
        torch.testing.assert_close(torch.tensor(ours.scores + [ours.rest]), torch.tensor(theirs.scores + [theirs.rest]),
                                   rtol=1e-5, atol=1e-7)
