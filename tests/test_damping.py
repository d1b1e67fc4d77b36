"""Damping rules: GCV / LOO and OAS against closed forms and scikit-learn, feature moments, "auto" end to end."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from airtrace import Attributor, Task, cli
from airtrace import curvature as cv
from airtrace.curvature import damping as rules
from airtrace.capture import per_example_loss

F64 = torch.float64
PROJECTION = dict(k_in=3, k_out=2, seed=7)


# ------------------------------------------------------------------ cross-validation on a tiny ridge problem


def ridge_problem(n=12, p=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64)
    e, U = torch.linalg.eigh(X.T @ X / n)
    return X, y, {"w": X @ U}, {"w": e}


@pytest.mark.parametrize("lam", [1e-3, 0.1, 2.0])
def test_gcv_and_loo_equal_their_closed_forms_on_ridge(lam):
    X, y, rotated, e = ridge_problem()
    n, p = X.shape
    H = X @ torch.linalg.solve(X.T @ X + n * lam * torch.eye(p, dtype=F64), X.T)  # ridge hat matrix
    residual = y - H @ y
    gcv = float(residual.square().mean()) / (1 - float(H.trace()) / n) ** 2
    assert rules.gcv(rotated, e, {"w": lam}, y, kind="gcv") == pytest.approx(gcv, rel=1e-10)
    loo = []  # refit without each example
    for i in range(n):
        keep = torch.arange(n) != i
        w = torch.linalg.solve(X[keep].T @ X[keep] + n * lam * torch.eye(p, dtype=F64), X[keep].T @ y[keep])
        loo.append(float(y[i] - X[i] @ w) ** 2)
    assert rules.gcv(rotated, e, {"w": lam}, y, kind="loo") == pytest.approx(sum(loo) / n, rel=1e-10)


def test_loo_picks_the_alpha_of_sklearn_ridgecv():
    from sklearn.linear_model import RidgeCV

    X, y, rotated, e = ridge_problem()
    n = X.shape[0]
    lams = [10 ** (k / 4) for k in range(-16, 5)]
    ours = min(lams, key=lambda lam: rules.gcv(rotated, e, {"w": lam}, y, kind="loo"))
    theirs = RidgeCV(alphas=[n * lam for lam in lams], fit_intercept=False).fit(X.numpy(), y.numpy())
    assert theirs.alpha_ == pytest.approx(n * ours, rel=1e-12)
    assert rules.gcv(rotated, e, {"w": 1.0}, kind="loo") != rules.gcv(rotated, e, {"w": 1.0}, kind="gcv")


def test_gcv_rejects_an_unknown_kind():
    _, y, rotated, e = ridge_problem()
    with pytest.raises(ValueError, match="kind must be 'gcv' or 'loo'"):
        rules.gcv(rotated, e, {"w": 1.0}, y, kind="aic")


def test_oas_factor_is_sklearn_oas_shrinkage():
    from sklearn.covariance import OAS

    for n, p in [(40, 5), (100, 50), (8, 20)]:
        X = torch.randn(n, p, generator=torch.Generator().manual_seed(n), dtype=F64)
        s = OAS(assume_centered=True).fit(X.numpy()).shrinkage_
        e = torch.linalg.eigvalsh(X.T @ X / n)
        assert rules.oas_factor(e, n) == (pytest.approx(s / (1 - s), rel=1e-9) if s < 1 else float("inf"))
    assert rules.oas_factor(torch.ones(4, dtype=F64), 10) == float("inf")  # isotropic: shrink all the way


# ------------------------------------------------------------------ moments and the mean-gradient rule


def test_moments_ratio_on_hand_checkable_features():
    acc = cv.MomentAccumulator()
    acc.update({"a": torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), "b": torch.tensor([[[2.0]], [[2.0]]]),
                "c": torch.tensor([[[1.0]], [[-1.0]]]), "d": torch.zeros(2, 1, 1)})
    m = acc.finalize()
    assert m.n == 2
    assert m.ratio("a") == pytest.approx(0.5)  # ‖(½, ½)‖² / 1
    assert m.ratio("b") == pytest.approx(1.0) and m.ratio("c") == 0.0 and m.ratio("d") == 0.0


def test_moments_do_not_depend_on_batching():
    x = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    one, two = cv.MomentAccumulator(), cv.MomentAccumulator()
    one.update({"a": x})
    two.update({"a": x[:3]})
    two.update({"a": x[3:]})
    a, b = one.finalize(), two.finalize()
    torch.testing.assert_close(a.mean["a"], b.mean["a"], rtol=1e-14, atol=0)
    assert a.ratio("a") == pytest.approx(b.ratio("a"), rel=1e-12)


def test_moments_refuse_empty_or_inconsistent_batches():
    acc = cv.MomentAccumulator()
    with pytest.raises(ValueError, match="no examples seen"):
        acc.finalize()
    with pytest.raises(ValueError, match="same batch size B"):
        acc.update({"a": torch.ones(2, 1, 1), "b": torch.ones(3, 1, 1)})
    acc.update({"a": torch.ones(2, 1, 1)})
    with pytest.raises(ValueError, match="every batch must have the layers"):
        acc.update({"b": torch.ones(2, 1, 1)})


def test_mean_gradient_factor_and_its_floor():
    assert rules.mean_gradient_factor(0.01, 2.0, 0.5) == pytest.approx(0.2)
    assert rules.mean_gradient_factor(0.0, 2.0, 0.5) == rules.AUTO_FLOOR
    factors, ratios = rules.auto_factors("ekfac", rules.FeatureMoments(2, {"a": torch.tensor([0.3, 0.4])},
                                                                       {"a": 1.0}))
    assert ratios == {"a": pytest.approx(0.25)}
    assert factors["a"] == pytest.approx(rules.AUTO_KAPPA["ekfac"] * 0.25 ** rules.AUTO_EXPONENT)
    with pytest.raises(ValueError, match="damping 'auto' is defined for curvatures"):
        rules.auto_factors("identity", rules.FeatureMoments(1, {}, {}))


# ------------------------------------------------------------------ through the Attributor and the CLI


def tiny_task():
    """A float64 MLP classifier on random data (same weights and data on every call)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(23, 4, dtype=F64), torch.randint(3, (23,))
    batches = [(list(range(s, min(s + 6, 20))), {"x": X[s: min(s + 6, 20)], "y": y[s: min(s + 6, 20)]})
               for s in range(0, 20, 6)]
    return Task(model, lambda m, b: per_example_loss(m(b["x"]), b["y"]), batches, [([0, 1, 2], {"x": X[20:],
                                                                                               "y": y[20:]})])


def _mean_eigenvalues(curvature, features):
    """Mean eigenvalue per layer of the undamped curvature: trace(F) / size for the Fisher and low rank."""
    if curvature.method in ("fisher", "lowrank"):
        return {name: float(x.reshape(x.shape[0], -1).square().sum(1).mean()) / x[0].numel()
                for name, x in features.items()}
    return {name: float(inv.eigenvalues.mean()) for name, inv in curvature.inverses.items()}


@pytest.mark.parametrize("method", ["fisher", "kfac", "ekfac"])
def test_auto_damping_is_the_default_and_the_rule_on_the_training_features(method, tmp_path):
    task = tiny_task()
    at = Attributor(task.model, loss_fn=task.loss_fn, projection=PROJECTION, curvature=method)
    assert at.damping == "auto"
    store = at.featurize(task.train, tmp_path / "store", dtype="float32", progress=False)
    fit = at.fit(task.train, tmp_path / "c.safetensors", store=store, progress=False)
    features = at.featurizer.split(torch.cat([at.features(b) for _, b in task.train]))
    acc = cv.MomentAccumulator()
    acc.update(features)
    moments, means = acc.finalize(), _mean_eigenvalues(fit, features)
    for name, x in features.items():
        rho = float(x.reshape(x.shape[0], -1).mean(0).square().sum() / x.reshape(x.shape[0], -1).square().sum(1).mean())
        assert fit.damping_rule["criterion"][name] == pytest.approx(rho, rel=1e-5)
        assert moments.ratio(name) == pytest.approx(rho, rel=1e-12)
        factor = rules.mean_gradient_factor(rho, rules.AUTO_KAPPA[method], rules.AUTO_EXPONENT)
        assert fit.damping[name] == pytest.approx(factor * means[name], rel=1e-5)
    assert fit.damping_rule["rule"] == "auto" and fit.damping_factor is None
    assert "damping_rule='auto'" in repr(fit) and "criterion={" in repr(fit)
    loaded = cv.Curvature.load(tmp_path / "c.safetensors")
    assert loaded.damping_rule == fit.damping_rule and loaded.damping == fit.damping
    with safe_open(os.fspath(tmp_path / "c.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[cv.METADATA_KEY])["damping_rule"]["rule"] == "auto"
    from_batches = Attributor(task.model, loss_fn=task.loss_fn, projection=PROJECTION, curvature=method,
                              damping="auto").fit(task.train, progress=False)
    assert from_batches.damping == pytest.approx(fit.damping, rel=1e-5)  # float32 store vs float64 features


@pytest.mark.parametrize("method", ["fisher", "lowrank", "kfac", "ekfac"])
def test_default_damping_is_the_method_factor(method, tmp_path):
    task = tiny_task()
    at = Attributor(task.model, loss_fn=task.loss_fn, projection=PROJECTION, curvature=method, rank=4, damping=None)
    store = at.featurize(task.train, tmp_path / "store", dtype="float32", progress=False)
    fit = at.fit(task.train, store=store, progress=False)
    features = at.featurizer.split(torch.cat([at.features(b) for _, b in task.train]))
    means = _mean_eigenvalues(fit, features)
    assert fit.damping_factor == rules.default_factor(method)
    assert fit.damping_rule == {"rule": "default", "factor": rules.default_factor(method), "criterion": None}
    for name, lam in fit.damping.items():
        assert lam == pytest.approx(rules.default_factor(method) * means[name], rel=1e-5)


def test_bad_damping_names_the_argument():
    task = tiny_task()
    with pytest.raises(ValueError, match="damping must be 'auto', a Damping, a number .* or None, got 'gcv'"):
        Attributor(task.model, loss_fn=task.loss_fn, damping="gcv")
    with pytest.raises(ValueError, match="damping 'auto' is chosen from the training features"):
        cv.FisherFitter("auto")
    with pytest.raises(ValueError, match=r"Damping.layer_factors\['a'\] must be a finite number > 0"):
        cv.Damping(layer_factors={"a": 0.0})
    with pytest.raises(ValueError, match="has no factor for layer 'b'"):
        cv.Damping(layer_factors={"a": 1.0}).resolve("b", 1.0, "fisher")


def test_cli_fit_damping_auto_prints_the_criterion(tmp_path, capsys):
    store, curv = str(tmp_path / "store"), str(tmp_path / "c.safetensors")
    model = "test_damping:tiny_task"
    assert cli.main(["featurize", store, "--model", model, "--k-in", "3", "--k-out", "2", "--seed", "7",
                     "--kfac", "--quiet"]) == 0
    assert cli.main(["fit", store, "--model", model, "--out", curv, "--method", "ekfac", "--damping", "auto"]) == 0
    out = capsys.readouterr().out
    fit = cv.Curvature.load(curv)
    assert fit.damping_rule["rule"] == "auto"
    for layer, lam in fit.damping.items():
        assert f"{layer}: damping {lam:.4g} (rule auto, criterion ρ = " in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", store, "--model", model, "--out", curv, "--damping", "automatic"])
    assert exc.value.code == 2 and "a finite positive number or 'auto'" in capsys.readouterr().err


def test_stationary_damping_reads_the_l2_pull_on_the_weights():
    theta = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64)  # ‖θ‖² = 25
    orthogonal = torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64)
    assert rules.stationary_damping(-0.2 * theta, theta) == pytest.approx((0.2, 1.0))
    lam, cosine = rules.stationary_damping(-0.2 * theta + orthogonal, theta)  # ⟨ḡ, θ⟩ = -5, ‖ḡ‖ = √(1 + 25)
    assert lam == pytest.approx(0.2) and cosine == pytest.approx(5 / (26 ** 0.5 * 5))
    assert rules.stationary_damping(0.1 * theta, theta)[0] == pytest.approx(-0.1)  # pushes away: no L2 to read
    assert rules.stationary_damping(theta, torch.zeros(3)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same size"):
        rules.stationary_damping(theta, torch.zeros(2))
