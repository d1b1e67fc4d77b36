"""The development suite: tabular tasks (wine, diabetes), the suite registry and ceilings, scores of a damping sweep."""

import os
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from airtrace import Attributor
from airtrace.curvature import Damping
from airtrace.eval import suite
from airtrace.eval.sweep import spectral
from airtrace.eval.tasks.tabular import TabularTask, tabular_config

F64 = torch.float64


def test_wine_logreg_is_the_regularised_optimum_of_sklearn():
    from sklearn.linear_model import LogisticRegression

    task = TabularTask(tabular_config("wine", "logreg"))
    rows = torch.arange(0, task.n_train, 2)
    model = task.train_fn(rows, seed=0)
    assert torch.equal(model.fc.weight, task.train_fn(rows, seed=7).fc.weight)  # no seed dependence
    x = torch.cat([task.x_train[rows], torch.ones(len(rows), 1, dtype=F64)], dim=1)  # bias penalised like a weight
    # sklearn minimises ½‖θ‖² + C Σ CE = n C (mean CE + ‖θ‖² / (2 n C)): l2 = 1 / (n C)
    ref = LogisticRegression(C=1 / (len(rows) * task.config.l2), fit_intercept=False, tol=1e-12, max_iter=10_000)
    ref.fit(x.numpy(), task.y_train[rows].numpy())
    ours = torch.cat([model.fc.weight, model.fc.bias[:, None]], dim=1)
    torch.testing.assert_close(ours, torch.tensor(ref.coef_, dtype=F64), rtol=0, atol=1e-5)


def test_mlp_task_is_deterministic_and_seed_free_with_a_fixed_init():
    task = TabularTask(tabular_config("wine", "mlp", steps=20))
    rows = torch.arange(40)
    a, b = task.train_fn(rows, seed=0), task.train_fn(rows, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    free = TabularTask(replace(task.config, init_seed=None))
    c, d = free.train_fn(rows, seed=0), free.train_fn(rows, seed=3)
    assert not torch.equal(c.fc1.weight, d.fc1.weight)


def test_diabetes_measures_minus_squared_error_of_standardised_targets():
    task = TabularTask(tabular_config("diabetes", "mlp", steps=5))
    assert (task.n_train, len(task.y_query)) == (342, 100)
    torch.testing.assert_close(task.x_train.mean(0), torch.zeros(10, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(task.x_train.std(0), torch.ones(10, dtype=F64), rtol=0, atol=1e-12)
    assert abs(float(task.y_train.mean())) < 1e-12 and float(task.y_train.std()) == pytest.approx(1.0)
    model = task.train_fn(torch.arange(50), seed=0)
    with torch.no_grad():
        expected = -(model(task.x_query)[:, 0] - task.y_query).square()
    torch.testing.assert_close(task.measure_fn(model), expected, rtol=0, atol=0)
    batch = task.train_batches(8)[0][1]
    torch.testing.assert_close(task.loss_fn(model, batch), (model(batch["x"])[:, 0] - batch["y"]).square())


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="diabetes", model="logreg"), "model 'logreg' needs a classification dataset"),
    (dict(dataset="iris"), "dataset must be one of"),
    (dict(dataset="wine", n_query=177), "n_query must leave at least 2 training rows"),
    (dict(dataset="wine", l2=0.0), "l2 must be > 0"),
])
def test_bad_tabular_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TabularTask(tabular_config(**kwargs))


def test_bad_indices_are_refused():
    task = TabularTask(tabular_config("wine", "mlp", steps=1))
    with pytest.raises(ValueError, match=r"indices must be unique rows in \[0, 128\)"):
        task.train_fn(torch.tensor([0, 0]), seed=0)


def test_suite_registry_and_seed_free_ceiling():
    assert list(suite.TASKS) == ["digits-logreg", "digits-mlp", "wine-logreg", "wine-mlp", "diabetes-mlp", "lm"]
    with pytest.raises(ValueError, match="unknown suite task 'mnist'"):
        suite.task("mnist")
    logreg = suite.task("wine-logreg")
    assert suite.seed_free(logreg) and suite.ceiling(logreg, 5) == suite.Ceiling(1.0, {}, 5)
    mlp = suite.task("wine-mlp")
    other = suite.reinitialised(mlp, 2)
    assert other.config.init_seed == 2 and other.config_dict != mlp.config_dict
    with pytest.raises(ValueError, match=r"m \(8\) must be at most subsets \(4\)"):
        suite.ceiling(mlp, 8, subsets=4)


@pytest.mark.parametrize("method", ["fisher", "kfac", "ekfac"])
def test_sweep_scores_equal_the_attributors_at_any_damping(method, tmp_path):
    task = TabularTask(tabular_config("wine", "mlp", steps=30))
    model = task.train_fn(torch.arange(task.n_train), seed=0)
    train, queries = task.train_batches(50), task.query_batches(50)
    lams = {}
    for name, damping in (("default", None), ("other", Damping(factor=3.0))):
        at = Attributor(model, loss_fn=task.loss_fn, bias=True, projection=dict(k_in=4, k_out=3, seed=0),
                        curvature=method, damping=damping)
        store = at.featurize(train, tmp_path / name, dtype="float32", progress=False)
        fit = at.fit(train, store=store, progress=False)
        at.score(queries, store, topk=1, full_matrix_path=tmp_path / f"{name}.safetensors", progress=False)
        with safe_open(os.fspath(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            lams[name] = (fit, f.get_tensor("scores").to(F64))
    x = at.featurizer.split(torch.cat([c.features for c in store.iter_shards()]))
    q = at.featurizer.split(torch.cat([at.features(b) for _, b in queries]))
    sp = spectral(lams["default"][0], x, q)
    for fit, scores in lams.values():
        ours = sp.scores(fit.damping)
        assert float((ours - scores).abs().max()) <= 1e-5 * float(scores.abs().max())
    with pytest.raises(ValueError, match="damping must give a λ for every layer"):
        sp.scores({"fc1": 1.0})
