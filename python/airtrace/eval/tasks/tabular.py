"""Benchmark tasks on scikit-learn's bundled wine (3 classes) and diabetes (regression) tables, nothing downloaded;
imports ``airtrace.capture``, ``airtrace.eval.tasks.digits`` (its models, training steps and batching) and
``airtrace.util``.

Data: ``load_wine`` (178 rows, 13 features) or ``load_diabetes`` (442 rows, 10
features, a continuous target). A seeded permutation (``split_seed``) picks
``n_query`` held-out query rows; every other row is a training row. Features
are standardised with the training rows' mean and standard deviation, and so
is the diabetes target (float64 throughout).

Models (float64, trained deterministically on the CPU):

- ``"logreg"`` (wine only): multinomial logistic regression ``Linear(13, 3)``,
  objective ``mean CE + (l2 / 2) ||θ||²`` over weights and bias, minimised by
  Newton steps on the exact autograd Hessian (backtracking) from zero until
  every gradient entry is below ``tol``: the solution does not depend on the seed.
- ``"mlp"``: ``Linear(d, hidden) -> tanh -> Linear(hidden, c)`` (c = 3 classes,
  or 1 output for diabetes), the objective ``mean loss + (l2 / 2) ||θ||²``
  minimised by ``steps`` full-batch Adam steps (``lr``) from weights drawn from
  ``init_seed`` (the same start for every subset model) or, when it is None,
  from the training seed.

Per-example loss: cross-entropy (wine), squared error ``(f(x) - y)²`` (diabetes).
Measure (:meth:`TabularTask.measure_fn`): per query, minus its loss (higher = the
query is fit better), float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from airtrace.util.checks import positive_int_fields
from airtrace.capture import per_example_loss
from airtrace.eval.tasks.digits import LogReg, MLP, _batches, adam, check_positive, new_model, training_rows

F64 = torch.float64
DATASETS = {"wine": "classification", "diabetes": "regression"}
"""Dataset name -> kind of target."""
MODELS = ("mlp", "logreg")
NEWTON_STEPS = 100


@dataclass(frozen=True)
class TabularConfig:
    """Everything that decides the split, the model and its training.

    Attributes:
        dataset: "wine" or "diabetes".
        model: "mlp", or "logreg" (wine only).
        n_query: held-out query rows (the rest are training rows).
        split_seed: seed of the train / query permutation.
        l2: L2 coefficient of the objective, ``(l2 / 2) ||θ||²`` over all parameters.
        hidden: MLP hidden width.
        steps: MLP full-batch Adam steps.
        lr: MLP Adam learning rate.
        init_seed: MLP initial weights (None: the training seed).
        tol: logreg Newton tolerance (largest gradient entry).
    """

    dataset: str = "wine"
    model: str = "mlp"
    n_query: int = 50
    split_seed: int = 0
    l2: float = 1e-3
    hidden: int = 16
    steps: int = 300
    lr: float = 0.01
    init_seed: int | None = 0
    tol: float = 1e-12

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "logreg" and DATASETS[self.dataset] != "classification":
            raise ValueError(f"model 'logreg' needs a classification dataset (wine), got {self.dataset!r}")
        positive_int_fields(self, ("n_query", "hidden", "steps"))
        check_positive(self, ("l2", "lr", "tol"))

    def as_dict(self) -> dict:
        """JSON-able config, tagged with the task name (the cache key)."""
        return {"task": "tabular", **asdict(self)}


def tabular_config(dataset: str, model: str = "mlp", **overrides) -> TabularConfig:
    """The suite's :class:`TabularConfig` of ``dataset`` / ``model`` with field overrides.

    Defaults: wine 50 queries (128 training rows), logreg l2 = 1e-2, MLP 16 hidden units;
    diabetes 100 queries (342 training rows), MLP 32 hidden units, l2 = 1e-2.
    """
    base = TabularConfig(dataset=dataset, model=model)
    if dataset == "diabetes":
        base = replace(base, n_query=100, hidden=32, l2=1e-2)
    elif model == "logreg":
        base = replace(base, l2=1e-2)
    return replace(base, **overrides)


class TabularTask:
    """A wine or diabetes benchmark: split, ``train_fn``, ``measure_fn``, ``loss_fn`` and batches.

    Args:
        config: a :class:`TabularConfig` (default: the wine MLP).

    Attributes:
        config: the configuration.
        x_train: (n_train, d) float64 standardised features; y_train: (n_train,) int64 classes
            (wine) or float64 standardised targets (diabetes).
        x_query, y_query: the same for the n_query held-out rows.
        n_train: training rows.
        n_outputs: model outputs (classes, or 1 for regression).
    """

    name = "tabular"

    def __init__(self, config: TabularConfig | None = None):
        from sklearn.datasets import load_diabetes, load_wine

        self.config = config or TabularConfig()
        c = self.config
        self.regression = DATASETS[c.dataset] == "regression"
        data = load_diabetes() if self.regression else load_wine()
        x = torch.tensor(data.data, dtype=F64)
        y = torch.tensor(data.target, dtype=F64 if self.regression else torch.long)
        if c.n_query >= len(y) - 1:
            raise ValueError(f"n_query must leave at least 2 training rows of the {len(y)} {c.dataset} rows, "
                             f"got {c.n_query}")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(c.split_seed))
        query, train = order[: c.n_query], order[c.n_query :]
        mean, std = x[train].mean(0), x[train].std(0)
        x = (x - mean) / std
        if self.regression:
            y = (y - y[train].mean()) / y[train].std()
        self.x_query, self.y_query = x[query], y[query]
        self.x_train, self.y_train = x[train], y[train]
        self.n_train = len(train)
        self.n_outputs = 1 if self.regression else int(y.max()) + 1

    @property
    def config_dict(self) -> dict:
        """JSON-able config (the cache key of the ground truth)."""
        return self.config.as_dict()

    # -- models and training

    def new_model(self, seed: int) -> nn.Module:
        """An untrained model; MLP weights drawn from ``seed``, the logistic regression starts at zero."""
        d, logreg = self.x_train.shape[1], self.config.model == "logreg"
        return new_model(logreg, seed, (lambda: LogReg(d, self.n_outputs)) if logreg else
                         (lambda: MLP(d, self.config.hidden, self.n_outputs)))

    def losses(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) per-example loss of rows x (B, d), y (B,) under ``model`` (a callable x -> (B, c)):
        cross-entropy or squared error."""
        out = model(x)
        if self.regression:
            return (out[:, 0] - y).square()
        return per_example_loss(out, y)

    def objective(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """``mean loss over train[rows] + (l2 / 2) ||θ||²``, a float64 scalar."""
        loss = self.losses(model, self.x_train[rows], self.y_train[rows]).mean()
        return loss + 0.5 * self.config.l2 * sum((p * p).sum() for p in model.parameters())

    def train_fn(self, indices: torch.Tensor, seed: int) -> nn.Module:
        """Train from scratch on ``train[indices]``.

        Args:
            indices: (n_j,) int64 unique rows in [0, n_train).
            seed: the MLP's initial weights when ``config.init_seed`` is None (logreg: unused).

        Returns:
            The trained model (float64, eval mode).

        Raises:
            ValueError: indices empty, out of range or repeated.
            RuntimeError: the logistic regression did not converge.
        """
        rows = training_rows(indices, self.n_train)
        c = self.config
        model = self.new_model(seed if c.init_seed is None else c.init_seed)
        if c.model == "logreg":
            self._newton(model, rows)
        else:
            adam(model, lambda: self.objective(model, rows), c.steps, c.lr)
        return model.eval()

    def _newton(self, model: nn.Module, rows: torch.Tensor) -> None:
        """Minimise the objective on ``train[rows]`` in place by Newton steps on the autograd Hessian."""
        params = dict(model.named_parameters())
        shapes = {name: p.shape for name, p in params.items()}
        sizes = [p.numel() for p in params.values()]

        x, y = self.x_train[rows], self.y_train[rows]

        def objective(flat: torch.Tensor) -> torch.Tensor:
            values = {name: t.reshape(shapes[name]) for name, t in zip(shapes, flat.split(sizes))}
            losses = self.losses(lambda inputs: torch.func.functional_call(model, values, (inputs,)), x, y)
            return losses.mean() + 0.5 * self.config.l2 * (flat * flat).sum()

        theta = torch.cat([p.detach().flatten() for p in params.values()])
        for _ in range(NEWTON_STEPS):
            grad = torch.autograd.functional.jacobian(objective, theta)
            if float(grad.abs().max()) <= self.config.tol:
                break
            step = torch.linalg.solve(torch.autograd.functional.hessian(objective, theta), grad)
            value, t = float(objective(theta)), 1.0
            while float(objective(theta - t * step)) > value + 1e-12 * abs(value) and t > 1e-8:
                t /= 2
            theta = theta - t * step
        else:
            raise RuntimeError(f"logistic regression did not reach gradient {self.config.tol:g} "
                               f"in {NEWTON_STEPS} Newton steps")
        with torch.no_grad():
            for p, t in zip(params.values(), theta.split(sizes)):
                p.copy_(t.reshape(p.shape))

    @torch.no_grad()
    def measure_fn(self, model: nn.Module) -> torch.Tensor:
        """(n_query,) float64: minus each query's loss (higher = better fit)."""
        return -self.losses(model, self.x_query, self.y_query)

    # -- attribution

    def loss_fn(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) per-example loss of ``{"x": (B, d), "y": (B,)}`` (the loss the attribution differentiates)."""
        return self.losses(model, batch["x"], batch["y"])

    def train_batches(self, batch_size: int = 256) -> list[tuple[list[int], dict]]:
        """(ids, {"x", "y"}) batches of the training rows, ids = row indices."""
        return _batches(self.x_train, self.y_train, batch_size)

    def query_batches(self, batch_size: int = 256) -> list[tuple[list[int], dict]]:
        """(ids, {"x", "y"}) batches of the queries, ids = query indices."""
        return _batches(self.x_query, self.y_query, batch_size)

