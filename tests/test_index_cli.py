"""Two-stage scoring through the Attributor and the command line: ``airtrace index build``, ``score --index`` /
``--airrep`` and their knobs, the sparse projection flags, and the usage errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("faiss")

from airtrace import Attributor, cli  # noqa: E402
from airtrace.index import EmbeddingCandidates, Index, IndexFileError  # noqa: E402
from airtrace.store import Store  # noqa: E402
from test_cli import MODEL, N_QUERY, N_TRAIN, loss_fn, tiny_task  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A store of the tiny task and its EK-FAC curvature, made through the CLI."""
    root = tmp_path_factory.mktemp("index-cli")
    store, curv = str(root / "store"), str(root / "curv.safetensors")
    assert cli.main(["featurize", store, "--model", MODEL, "--k-in", "3", "--k-out", "2", "--dtype", "float32",
                     "--rows-per-shard", "8", "--quiet"]) == 0
    assert cli.main(["fit", store, "--model", MODEL, "--out", curv, "--method", "ekfac", "--quiet"]) == 0
    return root, store, curv


def attributor(store, curv):
    task = tiny_task()
    at = Attributor.from_store(task.model, store, loss_fn=loss_fn)
    at.load_curvature(curv)
    return at, task


@pytest.mark.parametrize("metric", ["inner", "relative"])
def test_score_with_a_flat_index_equals_the_exact_pass(workdir, metric, capsys):
    root, store, curv = workdir
    assert cli.main(["index", "build", store, "--curvature", curv, "--metric", metric, "--type", "flat",
                     "--quiet"]) == 0
    assert "sidecar-index-flat-" + metric in capsys.readouterr().out
    output = root / f"scores-{metric}.json"
    assert cli.main(["score", store, "--model", MODEL, "--curvature", curv, "--metric", metric, "--topk", "4",
                     "--index", "flat", "--recall", "--output", str(output)]) == 0
    assert f"# stage index:flat+exact, recall@4 1.0000" in capsys.readouterr().out
    result = json.loads(output.read_text())
    at, task = attributor(store, curv)
    exact = at.score(task.queries, store, topk=4, metric=metric, progress=False)
    assert result["stage"] == "index:flat+exact" and result["recall"] == 1.0
    assert [r["train_id"] for r in result["topk"]] == [r["train_id"] for r in exact.to_rows()]
    two = at.score(task.queries, store, topk=4, metric=metric, index="flat", progress=False)
    assert two.stage == "index:flat+exact" and two.recall == 1.0  # measured unasked: the store is small
    torch.testing.assert_close(two.values, exact.values, rtol=1e-5, atol=1e-6 * float(exact.values.abs().max()))


def test_an_index_of_another_curvature_or_a_missing_one_is_refused(workdir, capsys):
    _, store, curv = workdir
    assert cli.main(["index", "build", store, "--type", "flat", "--metric", "cosine", "--quiet"]) == 0  # identity
    capsys.readouterr()
    assert cli.main(["score", store, "--model", MODEL, "--curvature", curv, "--metric", "cosine", "--index",
                     "flat", "--quiet"]) == 1
    assert "built for another curvature" in capsys.readouterr().err
    assert cli.main(["score", store, "--model", MODEL, "--index", "hnsw", "--quiet"]) == 1
    assert "airtrace index build" in capsys.readouterr().err
    at, task = attributor(store, curv)
    with pytest.raises(IndexFileError, match="another curvature"):
        Index.beside(Store.open(store), at.curvature, "cosine", "flat")


def test_an_ivfpq_index_on_a_tiny_store_is_refused_with_the_fix(workdir, capsys):
    _, store, curv = workdir
    assert cli.main(["index", "build", store, "--curvature", curv, "--type", "ivfpq", "--quiet"]) == 1
    assert "use type 'flat' for a store this small" in capsys.readouterr().err


def test_airrep_embeddings_give_candidates_aligned_by_id(workdir, capsys, tmp_path):
    """Embeddings stored in another order than the store are aligned by id; with every row a candidate the
    two-stage top-k is the exact one."""
    _, store, curv = workdir
    at, task = attributor(store, curv)
    train_ids = Store.open(store).ids
    query_ids = [i for ids, _ in task.queries for i in ids]
    g = torch.Generator().manual_seed(0)
    paths = []
    for name, ids in (("train", train_ids[::-1]), ("queries", query_ids)):
        path = tmp_path / f"{name}.safetensors"
        save_file({"embeddings": torch.randn(len(ids), 5, generator=g)}, str(path),
                  metadata={"airtrace.airrep": json.dumps({"ids": ids})})
        paths.append(str(path))
    output = tmp_path / "scores.json"
    assert cli.main(["score", store, "--model", MODEL, "--curvature", curv, "--topk", "3", "--airrep", *paths,
                     "--candidates", str(N_TRAIN), "--output", str(output), "--quiet"]) == 0
    result = json.loads(output.read_text())
    exact = at.score(task.queries, store, topk=3, progress=False)
    assert result["stage"] == "embeddings+exact" and result["recall"] == 1.0
    assert [r["train_id"] for r in result["topk"]] == [r["train_id"] for r in exact.to_rows()]
    few = at.score(task.queries, store, topk=3, index=EmbeddingCandidates(torch.randn(N_TRAIN, 5, generator=g),
                   torch.randn(N_QUERY, 5, generator=g)), candidates=3, rerank=False, progress=False)
    assert few.stage == "embeddings" and few.recall < 1.0  # 3 random candidates of 20 rows
    save_file({"embeddings": torch.randn(2, 5)}, str(tmp_path / "short.safetensors"),
              metadata={"airtrace.airrep": json.dumps({"ids": train_ids[:2]})})
    capsys.readouterr()
    assert cli.main(["score", store, "--model", MODEL, "--airrep", str(tmp_path / "short.safetensors"), paths[1],
                     "--quiet"]) == 1
    assert "no embedding for id" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--nprobe", "4"], "--nprobe apply to two-stage scoring"),
    (["--index", "flat", "--groups", "g.json"], "--groups and --full-matrix need the exact pass"),
    (["--index", "flat", "--airrep", "a", "b"], "give one"),
])
def test_two_stage_usage_errors_exit_2(workdir, argv, message, capsys):
    _, store, _ = workdir
    with pytest.raises(SystemExit) as exc:
        cli.main(["score", store, "--model", MODEL, *argv, "--quiet"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_featurize_sparse_writes_a_sparse_store(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert cli.main(["featurize", store, "--model", MODEL, "--sparse", "12", "--sparse-s", "3", "--dtype", "float32",
                     "--quiet"]) == 0
    assert Store.open(store).meta["projection"]["type"] == "sparse"
    assert Store.open(store).meta["projection"]["s"] == 3
    assert cli.main(["score", store, "--model", MODEL, "--topk", "2", "--quiet"]) == 0
    for argv, message in ((["--sparse", "8", "--dense", "8"], "give one"), (["--sparse-s", "2"], "applies to --sparse"),
                          (["--sparse", "8", "--kfac"], "not --dense / --sparse")):
        with pytest.raises(SystemExit):
            cli.main(["featurize", str(tmp_path / "other"), "--model", MODEL, *argv, "--quiet"])
        assert message in capsys.readouterr().err
    assert cli.main(["featurize", str(tmp_path / "bad"), "--model", MODEL, "--sparse", "2", "--sparse-s", "3",
                     "--quiet"]) == 1
    assert "need k >= s" in capsys.readouterr().err
