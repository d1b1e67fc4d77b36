"""Data selection (airtrace.select, airtrace select): BIDS, LESS and top-k on a matrix worked by hand, random with a
seed, budgets, ties, errors, a matrix file streamed in blocks, AirRep embeddings as the scores, and the command end
to end on a matrix written by airtrace score --full-matrix and on embedding files."""

import json
import math
import os
import stat

import pytest
import torch

from airtrace import cli
from airtrace.scoring import FullMatrixWriter
from airtrace.select import budget_rows, embedding_scores, load_matrix, select
from test_cli import MODEL, N_TRAIN  # the tiny task: training rows t0 .. t19, queries q0 .. q2

# Five training rows, three queries; queries 0 and 1 belong to task "a", query 2 to task "b".
#   q0 = 10 * (3, 1, -1, -3, 0)        mean 0, population std 10 * sqrt(20 / 5) = 20 -> z (1.5, .5, -.5, -1.5, 0)
#   q1 = 10 * (3, -1, 1, 0, -3)        mean 0, std 20                            -> z (1.5, -.5, .5, 0, -1.5)
#   q2 = 5 + (-1, -1, -1, -1, 4) / 8   mean 5, std sqrt((4 / 64 + 16 / 64) / 5) = 1/4 -> z (-.5, -.5, -.5, -.5, 2)
# Task "b" scores are tiny next to task "a": only the per-query normalisation lets "b" compete.
S = torch.tensor([[30.0, 30.0, 4.875],
                  [10.0, -10.0, 4.875],
                  [-10.0, 10.0, 4.875],
                  [-30.0, 0.0, 4.875],
                  [0.0, -30.0, 5.5]], dtype=torch.float64)
TASKS = ["a", "a", "b"]
# BIDS's task-level influence B = per task the mean of the z-scores:
#   B[:, a] = (1.5, 0, 0, -.75, -.75)    B[:, b] = (-.5, -.5, -.5, -.5, 2)


def test_bids_order_by_hand():
    # Coverage sums (a, b) over the selection; the least covered task picks its best unselected row:
    #   start (0, 0): tie -> the first task, a; best on a: row 0 (1.5)      -> sums (1.5, -.5)
    #   b (-.5 < 1.5): best on b: row 4 (2)                                  -> sums (.75, 1.5)
    #   a (.75 < 1.5): rows 1 and 2 tie at 0 on a; the lower index, row 1    -> sums (.75, 1.0)
    #   a (.75 < 1.0): row 2 (0)                                             -> sums (.75, .5)
    #   b (.5 < .75): rows 4, 0, 1, 2 are taken; row 3 (-.5)
    chosen = select(S, TASKS, 5, "bids")
    assert chosen.rows == [0, 4, 1, 2, 3]
    four = select(S, TASKS, 4, "bids")
    assert four.rows == [0, 4, 1, 2]  # a prefix: each step depends only on the rows before it
    # Coverage of rows {0, 4, 1, 2}: a (1.5 - .75 + 0 + 0) / 4, b (-.5 + 2 - .5 - .5) / 4;
    # the best task of each row: a, b, a, a.
    assert four.tasks == ["a", "b"]
    assert four.coverage == {"a": {"mean_normalized": 0.1875, "best": 3}, "b": {"mean_normalized": 0.125, "best": 1}}


def test_bids_ignores_a_task_s_scale_and_offset():
    scaled = S.clone()
    scaled[:, 2] = scaled[:, 2] * 1000 - 7  # z-scores unchanged
    assert select(scaled, TASKS, 5, "bids").rows == [0, 4, 1, 2, 3]


def test_less_takes_the_max_over_task_means():
    # Task means: a = ((30+30)/2, 0, 0, -15, -15), b = (4.875, 4.875, 4.875, 4.875, 5.5);
    # max over tasks = (30, 4.875, 4.875, 4.875, 5.5) -> row 0, row 4, then the tie 1, 2, 3 by index.
    assert select(S, TASKS, 5, "less").rows == [0, 4, 1, 2, 3]
    # The max over single queries would rank row 1 (10) before row 4 (5.5): LESS averages within a task first.
    assert select(S, TASKS, 2, "less").rows == [0, 4]


def test_less_with_one_query_per_task_is_the_max_over_queries():
    scores = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    # max per row: 1, 3, 2 -> rows 1, 2, 0
    assert select(scores, ["x", "y"], 3, "less").rows == [1, 2, 0]


def test_topk_takes_the_highest_mean_over_all_queries():
    # Means: row 0 64.875 / 3, rows 1 and 2 4.875 / 3 (tie: lower index first), row 3 -25.125 / 3, row 4 -24.5 / 3.
    chosen = select(S, TASKS, 5, "topk")
    assert chosen.rows == [0, 1, 2, 4, 3]
    # Its first two rows help only task a: no selected row has b as its best task.
    assert select(S, TASKS, 2, "topk").coverage["b"]["best"] == 0


def test_random_is_reproducible_with_a_seed():
    first = select(S, TASKS, 3, "random", seed=4)
    assert first.rows == select(S, TASKS, 3, "random", seed=4).rows
    assert len(set(first.rows)) == 3 and set(first.rows) <= set(range(5))
    seeds = [select(S, TASKS, 3, "random", seed=s).rows for s in range(20)]
    assert len({tuple(r) for r in seeds}) > 1  # the seed matters
    assert {select(S, TASKS, 1, "random", seed=s).rows[0] for s in range(50)} == set(range(5))  # every row can win


@pytest.mark.parametrize(("budget", "rows"), [(1, 1), (5, 5), (1.0, 5), (0.5, 3), (0.25, 1), (0.01, 1), (0.6, 3)])
def test_budget_counts_and_fractions(budget, rows):
    # 0.5 * 5 = 2.5 rounds half up to 3; 0.25 * 5 = 1.25 -> 1; 0.01 * 5 -> 0, at least 1; 0.6 * 5 = 3.
    assert budget_rows(budget, 5) == rows
    assert len(select(S, TASKS, budget, "bids").rows) == rows


@pytest.mark.parametrize("budget", [0, 6, -1, 0.0, 1.5, -0.2, math.nan, math.inf, True, "3"])
def test_budget_out_of_range_is_an_error(budget):
    with pytest.raises(ValueError, match="budget"):
        select(S, TASKS, budget, "topk")


@pytest.mark.parametrize(("scores", "tasks", "strategy", "match"), [
    (S, TASKS, "greedy", "strategy='greedy' is unknown"),
    (S[:, 0], ["a"], "topk", "2-D float tensor"),
    (S[None], TASKS, "topk", "2-D float tensor"),
    (S.to(torch.int64), TASKS, "topk", "2-D float tensor"),
    ([[1.0]], ["a"], "topk", "2-D float tensor"),
    (S[:0], TASKS, "topk", "empty"),
    (S, ["a", "b"], "bids", "tasks has 2 labels but the score matrix has 3 query columns"),
    (S, "aab", "bids", "list of one task label"),
    (S, [["a"], ["a"], ["b"]], "bids", "hashable"),
])
def test_bad_input_is_a_clear_error(scores, tasks, strategy, match):
    with pytest.raises(ValueError, match=match):
        select(scores, tasks, 2, strategy)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_are_an_error(bad):
    scores = S.clone()
    scores[3, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or inf \(first at row 3, query 1\)"):
        select(scores, TASKS, 2, "bids")


def test_a_constant_query_counts_as_no_information():
    scores = torch.cat([S, torch.full((5, 1), 2.0, dtype=torch.float64)], dim=1)
    # Task "c" is one constant query: z = 0 everywhere, so its B column is 0 and its coverage stays 0.
    chosen = select(scores, TASKS + ["c"], 5, "bids")
    assert chosen.coverage["c"]["mean_normalized"] == 0.0
    assert chosen.rows[:2] == [0, 4]


def _write_matrix(path, matrix_qn, meta):
    writer = FullMatrixWriter(path, *matrix_qn.shape, matrix_qn.dtype, meta)
    writer.write(0, matrix_qn)
    writer.close()


def test_the_matrix_file_is_read_as_train_rows(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_matrix(path, S.T.contiguous(), {"metric": "cosine", "query_ids": ["q0", "q1", "q2"]})
    loaded, meta = load_matrix(path)
    assert torch.equal(loaded, S) and meta["query_ids"] == ["q0", "q1", "q2"]
    assert select(path, TASKS, 5, "bids").rows == [0, 4, 1, 2, 3]
    (tmp_path / "bad.safetensors").write_bytes(b"not a matrix")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors score matrix"):
        select(tmp_path / "bad.safetensors", TASKS, 2)



@pytest.mark.parametrize("strategy", ["bids", "less", "topk", "random"])
def test_a_matrix_file_is_streamed_in_blocks_with_the_in_memory_result(tmp_path, monkeypatch, strategy):
    import airtrace.select as selection

    scores = torch.randn(41, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 + 1
    scores[:, 6] = 2.0  # a constant query: z-scores 0 in every block
    tasks = ["a", "b", "a", "c", "b", "a", "c"]
    path = tmp_path / "m.safetensors"
    _write_matrix(path, scores.T.contiguous(), {})
    read = []
    blocks = selection.matrix_blocks
    monkeypatch.setattr(selection, "ROWS_PER_BLOCK", 4)
    monkeypatch.setattr(selection, "matrix_blocks", lambda *a: (read.append(b.shape[0]) or b for b in blocks(*a)))
    streamed = select(path, tasks, 12, strategy, seed=3)
    assert read == [4] * 10 + [1] + [4] * 10 + [1]  # two passes, never more than 4 rows at a time
    whole = select(scores, tasks, 12, strategy, seed=3)
    assert streamed.rows == whole.rows
    for task, cover in whole.coverage.items():
        assert streamed.coverage[task]["best"] == cover["best"]
        assert streamed.coverage[task]["mean_normalized"] == pytest.approx(cover["mean_normalized"], abs=1e-12)
    scores[37, 2] = math.inf
    _write_matrix(path, scores.T.contiguous(), {})
    with pytest.raises(ValueError, match=r"NaN or inf \(first at row 37, query 2\)"):
        select(path, tasks, 2, strategy)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A store of the tiny task and its (3, 20) full cosine matrix, written through the CLI."""
    root = tmp_path_factory.mktemp("select")
    store, matrix = str(root / "store"), str(root / "matrix.safetensors")
    assert cli.main(["featurize", store, "--model", MODEL, "--k-in", "3", "--k-out", "2", "--seed", "3",
                     "--rows-per-shard", "8", "--quiet"]) == 0
    assert cli.main(["score", store, "--model", MODEL, "--metric", "cosine", "--full-matrix", matrix, "--quiet"]) == 0
    return root, store, matrix


@pytest.mark.parametrize("strategy", ["bids", "less", "topk", "random"])
def test_command_writes_store_ids_and_coverage(scored, strategy):
    root, store, matrix = scored
    tasks, out = root / "tasks.json", root / f"{strategy}.json"
    tasks.write_text(json.dumps({"q0": "x", "q1": "y", "q2": "x"}))  # by query id; the matrix records them
    assert cli.main(["select", matrix, "--tasks", str(tasks), "--budget", "0.2", "--strategy", strategy,
                     "--out", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    expected = select(matrix, ["x", "y", "x"], 0.2, strategy)
    assert doc["budget"] == round(0.2 * N_TRAIN) == 4 and doc["n_train"] == N_TRAIN and doc["ids_from"] == "store"
    assert doc["rows"] == expected.rows
    assert doc["selected"] == [f"t{r}" for r in expected.rows]  # tiny_task names train row r "t{r}"
    assert doc["coverage"] == expected.coverage and doc["tasks"] == ["x", "y"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644


def test_command_without_a_store_writes_row_indices(tmp_path, capsys):
    matrix, tasks, out = tmp_path / "m.safetensors", tmp_path / "t.json", tmp_path / "sel.json"
    _write_matrix(matrix, S.T.contiguous(), {"metric": "inner", "store": str(tmp_path / "gone")})
    tasks.write_text(json.dumps(TASKS))
    assert cli.main(["select", str(matrix), "--tasks", str(tasks), "--budget", "4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["selected"] == [0, 4, 1, 2] == doc["rows"] and doc["ids_from"] == "row index"
    captured = capsys.readouterr()
    assert "selected ids are row indices" in captured.err and "selected 4 of 5 training examples (bids)" in captured.out


def test_command_refuses_a_store_of_another_size(scored, tmp_path):
    _, store, _ = scored
    matrix, tasks = tmp_path / "m.safetensors", tmp_path / "t.json"
    _write_matrix(matrix, S.T.contiguous(), {"metric": "inner"})
    tasks.write_text(json.dumps(TASKS))
    assert cli.main(["select", str(matrix), "--tasks", str(tasks), "--budget", "2", "--store", store,
                     "--out", str(tmp_path / "o.json"), "--quiet"]) == 1
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "0"], "--budget: budget=0 rows is outside [1, 5]"),
    (["--budget", "1.5"], "--budget: budget=1.5 is not a fraction"),
    (["--budget", "lots"], "expected a row count"),
    (["--budget", "2", "--strategy", "greedy"], "invalid choice: 'greedy'"),
    (["--budget", "2", "--tasks-file-is-wrong"], "unrecognized arguments"),
])
def test_command_usage_errors_exit_2(tmp_path, capsys, args, message):
    matrix, tasks = tmp_path / "m.safetensors", tmp_path / "t.json"
    _write_matrix(matrix, S.T.contiguous(), {})
    tasks.write_text(json.dumps(TASKS))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["select", str(matrix), "--tasks", str(tasks), "--out", str(tmp_path / "o.json"), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (json.dumps(["a", "b"]), "tasks has 2 labels but the score matrix has 3"),
    ("not json", "--tasks"),
    (json.dumps({"q0": "a"}), "the matrix records no query ids"),
    (json.dumps([1.5, 2.5, 3.5]), "expected a JSON list of task labels"),
])
def test_command_bad_tasks_exit_2(tmp_path, capsys, content, message):
    matrix, tasks = tmp_path / "m.safetensors", tmp_path / "t.json"
    _write_matrix(matrix, S.T.contiguous(), {})
    tasks.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["select", str(matrix), "--tasks", str(tasks), "--budget", "2", "--out", str(tmp_path / "o.json")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_command_nan_matrix_exits_1_and_writes_nothing(tmp_path, capsys):
    matrix, tasks, out = tmp_path / "m.safetensors", tmp_path / "t.json", tmp_path / "o.json"
    bad = S.T.contiguous()
    bad[0, 2] = math.nan
    _write_matrix(matrix, bad, {})
    tasks.write_text(json.dumps(TASKS))
    assert cli.main(["select", str(matrix), "--tasks", str(tasks), "--budget", "2", "--out", str(out)]) == 1
    assert "NaN or inf (first at row 2, query 0)" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- AirRep embeddings as the scores


def test_embedding_scores_are_dot_products():
    # With the identity as the query embeddings, S[i, j] = train[i] · e_j = train[i, j]: the matrix worked by hand.
    assert torch.equal(embedding_scores(S.float(), torch.eye(3)), S)
    assert select(embedding_scores(S, torch.eye(3, dtype=torch.float64)), TASKS, 5, "bids").rows == [0, 4, 1, 2, 3]
    two = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    expected = torch.tensor([[2.5], [0.5]], dtype=torch.float64)  # (1 * .5 + 2 * 1, 3 * .5 - 1 * 1)
    assert torch.equal(embedding_scores(two, torch.tensor([[0.5, 1.0]])), expected)
    with pytest.raises(ValueError, match="train embeddings have d = 3 but queries d = 2"):
        embedding_scores(S, torch.eye(2))
    with pytest.raises(ValueError, match="train embeddings must be a non-empty 2-D float tensor"):
        embedding_scores(torch.zeros(3), torch.eye(3))


def _write_embeddings(path, ids, embeddings):
    """An embeddings file as airtrace airrep embed writes it."""
    from safetensors.torch import save_file

    from airtrace.airrep.cli import EMBEDDINGS, METADATA_KEY

    save_file({EMBEDDINGS: embeddings.contiguous()}, str(path), metadata={METADATA_KEY: json.dumps({"ids": ids})})


@pytest.fixture
def embedded(tmp_path):
    train, queries, tasks = tmp_path / "train.safetensors", tmp_path / "val.safetensors", tmp_path / "tasks.json"
    _write_embeddings(train, [f"z{i}" for i in range(5)], S.float())
    _write_embeddings(queries, ["v0", "v1", "v2"], torch.eye(3))
    tasks.write_text(json.dumps({"v0": "a", "v1": "a", "v2": "b"}))  # by query id, read from the embeddings file
    return tmp_path, str(train), str(queries), str(tasks)


def test_command_scores_by_airrep_embeddings(embedded):
    root, train, queries, tasks = embedded
    out = root / "sel.json"
    assert cli.main(["select", "--airrep", train, queries, "--tasks", tasks, "--budget", "4", "--out", str(out),
                     "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["rows"] == [0, 4, 1, 2] and doc["selected"] == ["z0", "z4", "z1", "z2"]
    assert doc["ids_from"] == "embeddings" and doc["metric"] == "airrep-dot" and "matrix" not in doc


@pytest.mark.parametrize(("args", "message"), [
    (["MATRIX"], "not both or neither"),
    (["--store", "somewhere"], "--store names the train ids of a MATRIX"),
    (["BAD"], "not an embeddings file written by airtrace airrep embed"),
    (["NARROW"], "train embeddings have d = 3 but queries d = 2"),
    (["MISSING"], "no such file"),
])
def test_command_airrep_usage_errors_exit_2(embedded, capsys, args, message):
    root, train, queries, tasks = embedded
    (root / "bad.safetensors").write_bytes(b"not safetensors")
    _write_embeddings(root / "narrow.safetensors", ["v0", "v1", "v2"], torch.eye(3)[:, :2])
    _write_matrix(root / "m.safetensors", S.T.contiguous(), {})
    swap = {"BAD": str(root / "bad.safetensors"), "NARROW": str(root / "narrow.safetensors"),
            "MISSING": str(root / "gone.safetensors")}
    second = swap.get(args[0], queries)
    extra = [str(root / "m.safetensors")] if args == ["MATRIX"] else [] if args[0] in swap else args
    with pytest.raises(SystemExit) as exit_:
        cli.main(["select", *extra, "--airrep", train, second, "--tasks", tasks, "--budget", "2",
                  "--out", str(root / "o.json")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err and not (root / "o.json").exists()


def test_command_without_scores_exits_2(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(TASKS))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["select", "--tasks", str(tmp_path / "t.json"), "--budget", "2", "--out", str(tmp_path / "o.json")])
    assert exit_.value.code == 2 and "not both or neither" in capsys.readouterr().err
