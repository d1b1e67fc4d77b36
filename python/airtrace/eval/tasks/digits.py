"""Benchmark task: scikit-learn's bundled ``load_digits`` (8x8 images, 10 classes), nothing downloaded; imports
``airtrace.capture`` and ``airtrace.util``.

Data: the 1797 images scaled to [0, 1] (pixel / 16), float64. A seeded
permutation (``split_seed``) picks ``n_query`` held-out query images and
``n_train`` training images. With ``flip_fraction`` > 0, that fraction of the
training labels (chosen by ``flip_seed``) is replaced by a different random
class; :attr:`DigitsTask.flipped` marks them (mislabel detection).

Models (float64, trained deterministically on the CPU):

- ``"logreg"``: multinomial logistic regression ``Linear(64, 10)``. Objective
  ``mean CE + (l2 / 2) ||θ||²`` over weights *and* bias (so its Hessian is
  ``H_data + l2 I``), minimised by full-batch Newton steps (exact Hessian,
  backtracking) from zero until every gradient entry is below ``tol``: the
  solution does not depend on the seed and is converged far below the size of
  a leave-one-out change.
- ``"mlp"``: ``Linear(64, hidden) -> tanh -> Linear(hidden, 10)``, the same
  objective minimised by ``steps`` full-batch Adam steps (``lr``) from weights
  drawn from ``init_seed`` (the same start for every subset model) or, when it
  is None, from the training seed.

Measure (:meth:`DigitsTask.measure_fn`): per query, minus its cross-entropy
(higher = the query is fit better), float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from airtrace.util.checks import positive_int_fields
from airtrace.capture import per_example_loss

F64 = torch.float64
N_CLASSES = 10
N_PIXELS = 64
MODELS = ("mlp", "logreg")


@dataclass(frozen=True)
class DigitsConfig:
    """Everything that decides the split, the model and its training.

    Attributes:
        model: "mlp" or "logreg".
        n_train: training images.
        n_query: held-out query images (n_train + n_query <= 1797).
        split_seed: seed of the train / query permutation.
        flip_fraction: fraction of training labels replaced by another class (0: none).
        flip_seed: seed choosing the flipped examples and their new labels.
        l2: L2 coefficient of the objective, ``(l2 / 2) ||θ||²`` over all parameters.
        hidden: MLP hidden width.
        steps: MLP full-batch Adam steps.
        lr: MLP Adam learning rate.
        init_seed: MLP initial weights (None: the training seed).
        tol: logreg Newton tolerance (largest gradient entry).
    """

    model: str = "mlp"
    n_train: int = 1000
    n_query: int = 100
    split_seed: int = 0
    flip_fraction: float = 0.0
    flip_seed: int = 0
    l2: float = 1e-3
    hidden: int = 32
    steps: int = 300
    lr: float = 0.01
    init_seed: int | None = 0
    tol: float = 1e-12

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        positive_int_fields(self, ("n_train", "n_query", "hidden", "steps"))
        if self.n_train + self.n_query > 1797:
            raise ValueError(f"n_train + n_query must be <= 1797 digits, got {self.n_train + self.n_query}")
        if not 0 <= self.flip_fraction < 1:
            raise ValueError(f"flip_fraction must be in [0, 1), got {self.flip_fraction!r}")
        check_positive(self, ("l2", "lr", "tol"))

    def as_dict(self) -> dict:
        """JSON-able config, tagged with the task name (the cache key)."""
        return {"task": "digits", **asdict(self)}


def digits_config(model: str = "mlp", **overrides) -> DigitsConfig:
    """A :class:`DigitsConfig` for ``model`` with field overrides (logreg defaults to l2 = 1e-2)."""
    base = DigitsConfig(model=model, l2=1e-2) if model == "logreg" else DigitsConfig(model=model)
    return replace(base, **overrides)


class MLP(nn.Module):
    """``fc2(tanh(fc1(x)))``: (B, d) -> (B, c), float64 (digits: d = 64, c = 10)."""

    def __init__(self, d: int, hidden: int, c: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, dtype=F64)
        self.fc2 = nn.Linear(hidden, c, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class LogReg(nn.Module):
    """``fc(x)``: (B, d) -> (B, c) logits, float64 (digits: d = 64, c = 10)."""

    def __init__(self, d: int, c: int):
        super().__init__()
        self.fc = nn.Linear(d, c, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def check_positive(config, names: tuple[str, ...]) -> None:
    """Every field of ``config`` in ``names`` is > 0, else a ValueError naming it."""
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)!r}")


def training_rows(indices, n_train: int) -> torch.Tensor:
    """``indices`` as (n_j,) int64 unique rows in [0, n_train), else a ValueError."""
    rows = torch.as_tensor(indices, dtype=torch.long).flatten()
    if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= n_train \
            or rows.unique().numel() != rows.numel():
        raise ValueError(f"indices must be unique rows in [0, {n_train}), got {rows.numel()} entries")
    return rows


def new_model(logreg: bool, seed: int, make) -> nn.Module:
    """``make()``: a logistic regression started at zero, or an MLP with weights drawn from ``seed``."""
    if logreg:
        model = make()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        return make()


def adam(model: nn.Module, objective, steps: int, lr: float) -> None:
    """``steps`` full-batch Adam steps (``lr``) on ``objective() -> scalar`` in place."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective().backward()
        optimizer.step()


class DigitsTask:
    """The digits benchmark: split, ``train_fn``, ``measure_fn``, ``loss_fn`` and batches.

    Args:
        config: a :class:`DigitsConfig` (default: the MLP).

    Attributes:
        config: the configuration.
        x_train: (n_train, 64) float64; y_train: (n_train,) int64 (after flipping).
        x_query: (n_query, 64) float64; y_query: (n_query,) int64.
        flipped: (n_train,) bool, True where the training label was flipped.
        n_train: training examples.
    """

    name = "digits"

    def __init__(self, config: DigitsConfig | None = None):
        from sklearn.datasets import load_digits

        self.config = config or DigitsConfig()
        c = self.config
        data = load_digits()
        x = torch.tensor(data.data, dtype=F64) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(c.split_seed))
        query, train = order[: c.n_query], order[c.n_query : c.n_query + c.n_train]
        self.x_query, self.y_query = x[query], y[query]
        self.x_train, self.y_train = x[train], y[train].clone()
        self.n_train = c.n_train
        self.flipped = torch.zeros(c.n_train, dtype=torch.bool)
        if c.flip_fraction > 0:
            g = torch.Generator().manual_seed(c.flip_seed)
            rows = torch.randperm(c.n_train, generator=g)[: round(c.flip_fraction * c.n_train)]
            shift = torch.randint(1, N_CLASSES, (rows.numel(),), generator=g)
            self.y_train[rows] = (self.y_train[rows] + shift) % N_CLASSES
            self.flipped[rows] = True

    @property
    def config_dict(self) -> dict:
        """JSON-able config (the cache key of the ground truth)."""
        return self.config.as_dict()

    # -- models and training

    def new_model(self, seed: int) -> nn.Module:
        """An untrained model; MLP weights drawn from ``seed``, the logistic regression starts at zero."""
        logreg = self.config.model == "logreg"
        return new_model(logreg, seed, (lambda: LogReg(N_PIXELS, N_CLASSES)) if logreg else
                         (lambda: MLP(N_PIXELS, self.config.hidden, N_CLASSES)))

    def objective(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """``mean CE over train[rows] + (l2 / 2) ||θ||²``, a float64 scalar."""
        loss = F.cross_entropy(model(self.x_train[rows]), self.y_train[rows])
        return loss + 0.5 * self.config.l2 * sum((p * p).sum() for p in model.parameters())

    def train_fn(self, indices: torch.Tensor, seed: int, init: nn.Module | None = None) -> nn.Module:
        """Train from scratch on ``train[indices]``.

        Args:
            indices: (n_j,) int64 unique rows in [0, n_train).
            seed: the MLP's initial weights when ``config.init_seed`` is None (logreg: unused).
            init: logreg only: start Newton from this model's weights (same optimum, fewer
                steps; for leave-one-out retrains warm-started from the full model).

        Returns:
            The trained model (float64, eval mode).

        Raises:
            ValueError: indices empty, out of range or repeated.
        """
        rows = training_rows(indices, self.n_train)
        c = self.config
        model = self.new_model(seed if c.init_seed is None else c.init_seed)
        if c.model == "logreg":
            self._newton(model, rows, init)
        else:
            adam(model, lambda: self.objective(model, rows), c.steps, c.lr)
        return model.eval()

    @torch.no_grad()
    def measure_fn(self, model: nn.Module) -> torch.Tensor:
        """(n_query,) float64: minus each query's cross-entropy (higher = better fit)."""
        return -F.cross_entropy(model(self.x_query), self.y_query, reduction="none")

    # -- attribution

    def loss_fn(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) per-example cross-entropy of ``{"x": (B, 64), "y": (B,)}``."""
        return per_example_loss(model(batch["x"]), batch["y"])

    def train_batches(self, batch_size: int = 256) -> list[tuple[list[int], dict]]:
        """(ids, {"x", "y"}) batches of the training set, ids = row indices."""
        return _batches(self.x_train, self.y_train, batch_size)

    def query_batches(self, batch_size: int = 256) -> list[tuple[list[int], dict]]:
        """(ids, {"x", "y"}) batches of the queries, ids = query indices."""
        return _batches(self.x_query, self.y_query, batch_size)

    def flat_gradients(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy gradients of the logistic regression, (B, 650) float64.

        Layout of :meth:`data_hessian`: ``(p - onehot(y)) ⊗ x`` (weight, row-major), then ``p - onehot(y)`` (bias).
        """
        if not isinstance(model, LogReg):
            raise ValueError(f"flat_gradients is closed-form for the logistic regression, got {type(model).__name__}")
        with torch.no_grad():
            residual = torch.softmax(model(x), dim=1) - F.one_hot(y, N_CLASSES).to(F64)  # (B, 10)
        return torch.cat([(residual[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1), residual], dim=1)

    def _newton(self, model: LogReg, rows: torch.Tensor, init: nn.Module | None) -> None:
        """Minimise the logreg objective on ``train[rows]`` in place by damped Newton steps (backtracking)."""
        c = self.config
        x = _augmented(self.x_train[rows])
        y = F.one_hot(self.y_train[rows], N_CLASSES).to(F64)
        theta = torch.zeros(N_CLASSES, N_PIXELS + 1, dtype=F64)
        if init is not None:
            theta = torch.cat([init.fc.weight.detach(), init.fc.bias.detach()[:, None]], dim=1).to(F64)

        def objective(t):
            return F.cross_entropy(x @ t.T, self.y_train[rows]) + 0.5 * c.l2 * (t * t).sum()

        for _ in range(100):
            probs = torch.softmax(x @ theta.T, dim=1)
            grad = (probs - y).T @ x / x.shape[0] + c.l2 * theta
            if float(grad.abs().max()) <= c.tol:
                break
            hessian = _softmax_hessian(x, probs) + c.l2 * torch.eye(theta.numel(), dtype=F64)
            step = torch.linalg.solve(hessian, grad.flatten()).reshape(theta.shape)
            value, t = float(objective(theta)), 1.0
            while float(objective(theta - t * step)) > value + 1e-12 * abs(value) and t > 1e-8:
                t /= 2
            theta = theta - t * step
        else:
            raise RuntimeError(f"logistic regression did not reach gradient {c.tol:g} in 100 Newton steps")
        with torch.no_grad():
            model.fc.weight.copy_(theta[:, :N_PIXELS])
            model.fc.bias.copy_(theta[:, N_PIXELS])

    def data_hessian(self, model: nn.Module) -> torch.Tensor:
        """Hessian of the mean training cross-entropy of the logistic regression, (650, 650) float64.

        Parameters are flattened as ``model.named_parameters()``: the weight (10, 64)
        row-major, then the bias (10,), the layout of :meth:`flat_gradients`.
        ``H = (1/n) Σ_i (diag(p_i) - p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ`` with ``x̃ = [x, 1]``.
        """
        if not isinstance(model, LogReg):
            raise ValueError(f"data_hessian is closed-form for the logistic regression, got {type(model).__name__}")
        x = _augmented(self.x_train)
        with torch.no_grad():
            probs = torch.softmax(model(self.x_train), dim=1)
        aug = torch.arange(N_CLASSES * (N_PIXELS + 1)).reshape(N_CLASSES, N_PIXELS + 1)
        order = torch.cat([aug[:, :N_PIXELS].flatten(), aug[:, N_PIXELS]])
        return _softmax_hessian(x, probs)[order][:, order]


def _augmented(x: torch.Tensor) -> torch.Tensor:
    """(B, 64) -> (B, 65) with a ones column (the bias input)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _softmax_hessian(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``(1/B) Σ_i (diag(p_i) - p_i p_iᵀ) ⊗ x_i x_iᵀ`` for x (B, d), probs (B, C) -> (C·d, C·d), index c·d + a."""
    B, d = x.shape
    C = probs.shape[1]
    S = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (B, C, C)
    outer = (x[:, :, None] * x[:, None, :]).reshape(B, d * d)
    H = (S.reshape(B, C * C).T @ outer / B).reshape(C, C, d, d)
    return H.permute(0, 2, 1, 3).reshape(C * d, C * d)

def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[list[int], dict]]:
    return [(list(range(start, min(start + batch_size, len(y)))),
             {"x": x[start : start + batch_size], "y": y[start : start + batch_size]})
            for start in range(0, len(y), batch_size)]
