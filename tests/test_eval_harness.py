"""airtrace.eval subsets and the resumable retraining driver, with cheap closed-form "training"."""

import pytest
import torch

from airtrace.eval import SubsetPlan, leave_one_out, load_ground_truth, retrain, sample_subsets

F64 = torch.float64
N, Q = 12, 3
VALUES = torch.arange(1.0, N + 1, dtype=F64)


class Counting:
    """train_fn: the "model" is (sum of the chosen values, seed); records every call; can fail on a call."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[tuple[list[int], int]] = []
        self.fail_on = fail_on

    def __call__(self, indices, seed):
        self.calls.append((indices.tolist(), seed))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("interrupted")
        return float(VALUES[indices].sum()), seed


def measure(model):
    total, seed = model
    return torch.tensor([total, -total, float(seed % 97)])


def test_sample_subsets_sizes_seeds_and_determinism():
    plan = sample_subsets(11, 6, fraction=0.5, seed=4)
    assert plan.masks.shape == (6, 11) and plan.masks.dtype == torch.bool
    assert plan.masks.sum(dim=1).tolist() == [6] * 6  # round(5.5) = 6
    assert len(set(plan.seeds)) == 6
    assert plan == sample_subsets(11, 6, fraction=0.5, seed=4)
    assert plan != sample_subsets(11, 6, fraction=0.5, seed=5)
    assert plan.indices(2).tolist() == plan.masks[2].nonzero().flatten().tolist()
    assert torch.all(plan.indices(2)[1:] > plan.indices(2)[:-1])
    assert sample_subsets(10, 2, fraction=0.01).masks.sum(dim=1).tolist() == [1, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1, m=2), "n must be"), (dict(n=5, m=0), "m must be"), (dict(n=5, m=2, fraction=1.0), "fraction"),
    (dict(n=5, m=2, seed=-1), "seed must be"),
])
def test_sample_subsets_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_subsets(**kwargs)


def test_plan_validation_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="bool"):
        SubsetPlan(torch.ones(2, 3), [0, 1])
    with pytest.raises(ValueError, match="one seed per subset"):
        SubsetPlan(torch.ones(2, 3, dtype=torch.bool), [0])
    with pytest.raises(ValueError, match="subset 1 of masks is empty"):
        SubsetPlan(torch.tensor([[True, False], [False, False]]), [0, 1])
    plan = sample_subsets(9, 4, seed=1)
    plan.save(tmp_path / "plan.safetensors")
    loaded = SubsetPlan.load(tmp_path / "plan.safetensors")
    assert loaded.masks.equal(plan.masks) and loaded.seeds == plan.seeds
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        SubsetPlan.load(tmp_path / "junk.safetensors")


def _expected(plan):
    totals = plan.masks.to(F64) @ VALUES
    seeds = torch.tensor([s % 97 for s in plan.seeds], dtype=F64)
    return torch.stack([totals, -totals, seeds], dim=1)


def test_retrain_outputs_and_ground_truth_file(tmp_path):
    plan = sample_subsets(N, 5, seed=0)
    outputs = retrain(plan, Counting(), measure, tmp_path / "run", progress=False)
    assert outputs.dtype == F64 and outputs.equal(_expected(plan))
    stored, stored_plan, meta = load_ground_truth(tmp_path / "run")
    assert stored.equal(outputs) and stored_plan == plan and meta["seeds"] == plan.seeds
    again = Counting()
    assert retrain(plan, again, measure, tmp_path / "run", progress=False).equal(outputs)
    assert again.calls == []  # a finished run is read back


def test_retrain_resumes_after_interruption(tmp_path):
    plan = sample_subsets(N, 6, seed=2)
    reference = retrain(plan, Counting(), measure, tmp_path / "reference", progress=False)
    first = Counting(fail_on=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        retrain(plan, first, measure, tmp_path / "run", progress=False)
    assert len(list((tmp_path / "run").glob("subset-*.safetensors"))) == 2
    assert not (tmp_path / "run" / "ground_truth.safetensors").exists()
    second = Counting()
    outputs = retrain(plan, second, measure, tmp_path / "run", progress=False)
    assert outputs.equal(reference)
    assert [seed for _, seed in second.calls] == plan.seeds[2:]  # the two finished subsets are not retrained
    assert [idx for idx, _ in second.calls] == [plan.indices(j).tolist() for j in range(2, 6)]


def test_retrain_refuses_a_folder_of_another_run(tmp_path):
    retrain(sample_subsets(N, 2, seed=0), Counting(), measure, tmp_path, progress=False, config={"lr": 1})
    with pytest.raises(ValueError, match="another out_dir"):
        retrain(sample_subsets(N, 2, seed=1), Counting(), measure, tmp_path, progress=False, config={"lr": 1})
    with pytest.raises(ValueError, match="another out_dir"):
        retrain(sample_subsets(N, 2, seed=0), Counting(), measure, tmp_path, progress=False, config={"lr": 2})


@pytest.mark.parametrize("train_fn, measure_fn, match", [
    (lambda idx, seed: None, measure, "train_fn returned None for subset 0"),
    (Counting(), lambda model: torch.zeros(2, 2), r"returned shape \(2, 2\)"),
    (Counting(), lambda model: torch.tensor(1.0), r"returned shape \(\)"),
    (Counting(), lambda model: torch.tensor([1.0, float("nan")]), "1 NaN/Inf"),
    (Counting(), lambda model: torch.zeros(1 + model[1] % 2), "earlier subsets returned q"),
])
def test_retrain_errors(tmp_path, train_fn, measure_fn, match):
    plan = SubsetPlan(torch.ones(2, N, dtype=torch.bool), [0, 1])
    with pytest.raises(ValueError, match=match):
        retrain(plan, train_fn, measure_fn, tmp_path, progress=False)


def test_leave_one_out(tmp_path):
    full, removed = leave_one_out(N, Counting(), measure, tmp_path, indices=[3, 0, 7], seed=5, progress=False)
    total = float(VALUES.sum())
    assert full.tolist() == [total, -total, 5.0]
    assert (full - removed)[:, 0].tolist() == [4.0, 1.0, 8.0]  # the removed example's value
    with pytest.raises(ValueError, match="unique ints"):
        leave_one_out(N, Counting(), measure, tmp_path / "b", indices=[1, 1], progress=False)
    with pytest.raises(ValueError, match="unique ints"):
        leave_one_out(N, Counting(), measure, tmp_path / "b", indices=[N], progress=False)


def test_retrain_redoes_a_damaged_subset_file(tmp_path):
    plan = sample_subsets(N, 3, seed=6)
    reference = retrain(plan, Counting(), measure, tmp_path, progress=False)
    (tmp_path / "ground_truth.safetensors").unlink()
    (tmp_path / "subset-00001.safetensors").write_bytes(b"\0" * 10)  # e.g. a disk that filled up
    again = Counting()
    assert retrain(plan, again, measure, tmp_path, progress=False).equal(reference)
    assert [seed for _, seed in again.calls] == [plan.seeds[1]]
