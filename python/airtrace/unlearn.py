"""Unlearning by datamodel matching (DMM, Georgiev et al. 2024, "Attribute-to-Delete: Machine Unlearning via Datamodel
Matching", arXiv:2410.23232); the apps layer: it imports ``airtrace.attribute``, ``airtrace.store`` and
``airtrace.util``.

The two steps of the paper's algorithm:

1. **Predict** the outputs of the model retrained without the forget set F, on a reference set of inputs
   (F and a random sample of the retained training examples), by a linear datamodel built from attribution:
   ``f_without(x) = f(x) - scale * Σ_{i∈F} score(i, x)``, where ``score(i, x)`` is the Attributor's score of
   training example i for the query "minus output coordinate c of x" (so a score > 0 means i raises the output),
   computed for every coordinate as a streamed group sum over F (:meth:`airtrace.Attributor.score` with ``groups``).
   **Scale.** ``score(i, x) = ∇f(x)ᵀ (H + λ)⁻¹ ∇ℓ_i`` with H the curvature of the *mean* training loss; the
   one-step Newton estimate of removing F from a mean over n examples moves the weights by
   ``(1/n) (H + λ)⁻¹ Σ_{i∈F} ∇ℓ_i``, hence ``scale = 1 / n`` (n = rows of the store) when no other is given. It
   assumes a model trained to its optimum: for one that is not (early stopping, few epochs) the real change is
   smaller, and matching an overestimate moves the model further from the retrained one than doing nothing (on the
   digits MLP of ``benches/bench_unlearn.py``, 300 full-batch Adam steps, 1/n is worse than doing nothing on every
   forget set), so :func:`predict_outputs` warns when it falls back on it. :func:`fit_scale` fits the scale on
   datamodel labels instead, the outputs of models really retrained on random subsets (the labels that
   ``airtrace calibrate`` reads; the paper's datamodels are fitted on retrained models too): least squares of the
   measured outputs on the predicted effect of the examples each subset leaves out. The scale multiplies the
   predicted weight change, so one fitted on the labels' outputs (minus the loss) serves any ``outputs``.
2. **Match**: fine-tune the model for a bounded number of steps on the reference set to minimise the paper's
   matching loss, the squared error between the model's outputs and the predicted ones,
   ``L(θ) = mean_x ||f(x; θ) - f_without(x)||²`` (Adam; the model in eval mode, so dropout is off and the
   outputs matched are the outputs measured). Step t uses the reference batch at position t of a permutation
   drawn from (seed, epoch), so a run resumed from its checkpoint takes the same steps as one that was not
   stopped.

Outputs are ``outputs(model, batch) -> (B, C)``: logits of a classifier (the paper's choice), or by default
``-loss_fn(model, batch)`` (C = 1; higher = the example is fit better), which serves any task, language models
included (per-example loss).

Example::

    attributor = Attributor.from_store(model, "train.store", loss_fn=loss_fn)
    attributor.load_curvature("curvature.safetensors")
    fit = fit_scale(attributor, store, queries, labels_outputs, labels_masks)   # datamodel labels (eval.retrain)
    reference = reference_batches(train, store, forget, retain=512, seed=0)
    targets = predict_outputs(attributor, store, reference, forget, outputs=logits, scale=fit.scale)
    match_outputs(model, reference, targets, outputs=logits, config=MatchConfig(steps=100), checkpoint="run.ckpt")
    save_weights(model, "unlearned.safetensors")
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from airtrace.attribute import Attributor
from airtrace.attribute.batches import pairs, select_rows, to_device
from airtrace.store import Store, atomic_write, model_fingerprint
from airtrace.util.checks import positive_int
from airtrace.util.progress import progress_bar

OutputFn = Callable[[nn.Module, Any], torch.Tensor]
CHECKPOINT_FORMAT = 2
OTHER_RUN = ("the checkpoint belongs to another run (another model, forget set, reference set or settings); delete it "
             "to start over, or give another checkpoint path")


def minus_loss(loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> OutputFn:
    """The default output: ``-loss_fn(model, batch)`` as a (B, 1) column (higher = the example is fit better)."""

    def outputs(model: nn.Module, batch: Any) -> torch.Tensor:
        return -loss_fn(model, batch)[:, None]

    return outputs


def forget_rows(store_ids: Sequence, forget_ids: Sequence, what: str = "forget ids") -> list[int]:
    """Store rows of the forget ids (matched as text, so ``"7"`` finds the integer id 7), in the order given.

    Raises:
        ValueError: naming ``what``: no ids, an id the store does not hold, an id given twice, or every training
            example (nothing would be retained).
    """
    if len(forget_ids) == 0:
        raise ValueError(f"{what}: no ids given; list the training ids to forget, one per line")
    row_of = {str(i): r for r, i in enumerate(store_ids)}
    rows, seen = [], set()
    for fid in forget_ids:
        key = str(fid)
        if key not in row_of:
            raise ValueError(f"{what}: {fid!r} is not a training id of the store ({len(store_ids)} ids, e.g. "
                             f"{store_ids[0]!r}); give ids as the store records them (airtrace inspect shows them)")
        if key in seen:
            raise ValueError(f"{what}: {fid!r} is listed twice; give each id once")
        seen.add(key)
        rows.append(row_of[key])
    if len(rows) == len(store_ids):
        raise ValueError(f"{what}: all {len(rows)} training examples are listed; nothing would be retained "
                         "(retrain from scratch instead)")
    return rows


def reference_batches(train: Any, store: Store, forget: Sequence[int], *, retain: int = 512, seed: int = 0,
                      batch_size: int = 64) -> list[tuple[list, Any]]:
    """The reference set: the forget rows and ``retain`` retained rows drawn at random (``seed``), as (ids, batch)
    pairs of at most ``batch_size`` examples cut from the training batches, in store order.

    Args:
        train: the training batches the store was featurized from ((ids, batch) pairs, a DataLoader, a dataset).
        store: the store; its ids decide the rows.
        forget: store rows to forget (:func:`forget_rows`).
        retain: retained rows in the reference set (all of them when there are fewer).
        seed: seed of the retained sample.
        batch_size: examples per reference batch (batches are cut within each training batch).

    Raises:
        ValueError: the training batches hold an id the store does not, or miss some of its ids (not the
            training set the store was featurized from).
    """
    positive_int("retain", retain)
    positive_int("batch_size", batch_size)
    n = len(store)
    forget_set = set(forget)
    kept = torch.tensor([r for r in range(n) if r not in forget_set], dtype=torch.int64)
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))[:retain]
    wanted = forget_set | set(kept[order].tolist())
    row_of = {str(i): r for r, i in enumerate(store.ids)}
    out, found = [], set()
    for ids, batch in pairs(train, "the training batches"):
        rows = []
        for i in ids:
            if str(i) not in row_of:
                raise ValueError(f"the training batches hold id {i!r}, which the store {store.path} does not; it is "
                                 "not the training set the store was featurized from")
            rows.append(row_of[str(i)])
        found.update(rows)
        positions = [p for p, r in enumerate(rows) if r in wanted]
        for lo in range(0, len(positions), batch_size):
            chunk = positions[lo:lo + batch_size]
            out.append(([ids[p] for p in chunk], select_rows(batch, chunk, len(ids))))
    if len(found) != n:
        raise ValueError(f"the training batches hold {len(found)} of the store's {n} ids; pass the training set the "
                         f"store {store.path} was featurized from")
    return out


@dataclass
class Targets:
    """Predicted outputs of the reference set.

    Attributes:
        ids: the reference examples' training ids, in reference order.
        full: (r, C) outputs of the trained model, float32 (float64 for float64 models).
        predicted: (r, C) predicted outputs without the forget set, ``full - scale * group_scores``.
        scale: the factor applied to the summed scores.
    """

    ids: list
    full: torch.Tensor
    predicted: torch.Tensor
    scale: float


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Sequence[tuple[list, Any]], outputs: OutputFn) -> torch.Tensor:
    """(r, C) outputs of the model over the batches, in order, on the CPU (model in eval mode)."""
    model.eval()
    device = _device(model)
    rows = []
    for ids, batch in batches:
        y = outputs(model, to_device(batch, device))
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(ids):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"outputs(model, batch) must return a (B, C) = ({len(ids)}, C) tensor, got {shape}")
        rows.append(y.detach().cpu())
    return torch.cat(rows)


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def predict_outputs(attributor: Attributor, store: Store, reference: Sequence[tuple[list, Any]],
                    forget: Sequence[int], outputs: OutputFn, *, scale: float | None = None,
                    progress: bool = True) -> Targets:
    """Step 1 of DMM: the reference set's outputs predicted for the model retrained without ``forget``.

    ``predicted[x, c] = full[x, c] - scale * Σ_{i∈forget} score(i, (x, c))``, where the query (x, c) has the
    "loss" ``-outputs(model, x)[c]`` (see the module docstring for the sign and the scale).

    Args:
        attributor: an Attributor of the model for the store, its curvature fitted or loaded (identity needs none);
            it is not changed (a copy scores the output queries).
        store: the training features.
        reference: (ids, batch) pairs (:func:`reference_batches`).
        forget: store rows to forget.
        outputs: ``outputs(model, batch) -> (B, C)``.
        scale: factor on the summed scores (None: 1 / rows of the store, with a :class:`ScaleWarning`; see
            :func:`fit_scale`).
        progress: show progress bars.

    Returns:
        :class:`Targets`.

    Raises:
        StoreError: the store holds another model's features (checked before any work).
    """
    store.check_fingerprint(model_fingerprint(attributor.module))
    full = model_outputs(attributor.model, reference, outputs)
    r, C = full.shape
    if scale is None:
        scale = 1.0 / len(store)
        warnings.warn(DEFAULT_SCALE_WARNING, ScaleWarning, stacklevel=2)
    scale = float(scale)

    def coordinate_loss(model: nn.Module, item: dict) -> torch.Tensor:
        return -outputs(model, item["batch"])[:, item["coordinate"]]

    scorer = copy.copy(attributor)
    scorer.query_loss_fn = coordinate_loss
    queries, start = [], 0
    for ids, batch in reference:
        B = len(ids)
        for c in range(C):
            queries.append(([(start + j) * C + c for j in range(B)], {"batch": batch, "coordinate": c}))
        start += B
    scores = scorer.score(queries, store, topk=1, groups=[list(forget)], progress=progress)
    summed = torch.empty(r * C, dtype=scores.groups.dtype)
    summed[torch.tensor(scores.query_ids, dtype=torch.int64)] = scores.groups[:, 0].cpu()
    predicted = full - scale * summed.reshape(r, C).to(full.dtype)
    return Targets([i for ids, _ in reference for i in ids], full, predicted, scale)


class ScaleWarning(UserWarning):
    """The predicted outputs use the one-step Newton scale 1/n, not a scale fitted on retrained models."""


DEFAULT_SCALE_WARNING = (
    "unlearning with the one-step Newton scale 1/n, which overestimates the effect of the forget set on a model not "
    "trained to its optimum (matching it can leave the model further from a retrained one than doing nothing); fit "
    "the scale on datamodel labels with airtrace.unlearn.fit_scale (airtrace unlearn --scale-from LABELS), or give "
    "one (scale= / --scale)")


@dataclass(frozen=True)
class ScaleFit:
    """The scale fitted on datamodel labels (:func:`fit_scale`).

    Attributes:
        scale: the factor on summed scores for :func:`predict_outputs`.
        per_n: ``scale * n`` (1 = the one-step Newton scale 1/n).
        correlation: Pearson correlation of the predicted and the measured output changes (centred per query):
            how much of the subsets' variation the attribution explains.
        subsets: label rows (retrained models) used.
        queries: label columns (queries) used.
    """

    scale: float
    per_n: float
    correlation: float
    subsets: int
    queries: int


def _positions(ids: Sequence) -> dict[str, int]:
    """Column of each id in the labels: the id itself when the ids are the ints 0..len-1 (in any order), else its
    position (the convention of :func:`airtrace.eval.retrain`'s callers, e.g. ``airtrace calibrate``)."""
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and sorted(ids) == list(range(len(ids))):
        return {str(i): i for i in ids}
    return {str(i): p for p, i in enumerate(ids)}


def fit_scale(attributor: Attributor, store: Store, queries: Any, outputs: torch.Tensor, masks: torch.Tensor, *,
              measure: Callable[[nn.Module, Any], torch.Tensor] | None = None, source: str = "the labels",
              progress: bool = True) -> ScaleFit:
    """The scale of :func:`predict_outputs` fitted on datamodel labels: models retrained on random subsets S_j of
    the training set and measured on queries (:func:`airtrace.eval.retrain`, ``airtrace airrep label``).

    With ``G[j, q] = Σ_{i∉S_j} score(i, q)`` (the examples subset j leaves out, as one group of
    :meth:`Attributor.score`, for the query loss ``-measure``) and ``y[j, q]`` the label,
    the datamodel ``y[j, q] = a_q - scale * G[j, q]`` is fitted by least squares with a free ``a_q`` per query
    (retrained models differ from the trained one by their seeds too): ``scale = -Σ ỹ G̃ / Σ G̃²``, with ỹ and G̃
    centred over the subsets per query.

    Args:
        attributor: the Attributor :func:`predict_outputs` will use (same curvature and damping: the scale is
            the attribution's).
        store: the training features.
        queries: the labelled queries as (ids, batch) pairs; output column j is the query with id j when the ids
            are the ints 0..q-1, else the j-th query of the batches.
        outputs: (m, q) labels, ``measure`` of each retrained model on each query, any float dtype.
        masks: (m, n) bool subset membership; column j is the training example with id j when the store's ids
            are the ints 0..n-1, else store row j.
        measure: what the labels measure, ``measure(model, batch) -> (B,)`` (higher = fit better); default minus
            the attributor's query loss (``loss_fn`` unless set), the convention of :func:`airtrace.eval.retrain`.
        source: where the labels come from, for error messages.
        progress: show progress bars.

    Returns:
        :class:`ScaleFit`.

    Raises:
        ValueError: naming ``source``: labels of another training set (columns of ``masks``) or other queries
            (columns of ``outputs``), a subset holding every example or none, outputs and masks of different
            lengths, or a fit that is not positive (the measured outputs fall where the attribution predicts they
            rise: labels of another model, task or output).
        StoreError: the store holds another model's features.
    """
    store.check_fingerprint(model_fingerprint(attributor.module))
    n = len(store)
    if masks.dim() != 2 or masks.dtype != torch.bool or outputs.dim() != 2 or outputs.shape[0] != masks.shape[0]:
        raise ValueError(f"{source}: expected outputs (m, q) and bool masks (m, n) with the same m, got "
                         f"{tuple(outputs.shape)} and {masks.dtype} {tuple(masks.shape)}")
    if masks.shape[1] != n:
        raise ValueError(f"{source}: the labels' subsets cover {masks.shape[1]} training examples, the store {n}; "
                         f"they are labels of another training set (retrain them on this one)")
    sizes = masks.sum(dim=1)
    if bool(((sizes == 0) | (sizes == n)).any()):
        raise ValueError(f"{source}: a subset holds every training example or none; datamodel labels need proper "
                         "random subsets (airtrace.eval.sample_subsets)")
    query_ids = [i for ids, _ in pairs(queries, "the query batches") for i in ids]
    if outputs.shape[1] != len(query_ids):
        raise ValueError(f"{source}: the labels measure {outputs.shape[1]} queries, the query batches hold "
                         f"{len(query_ids)}; they are labels of other queries")
    column_of = _positions(list(store.ids))
    column_of_row = torch.tensor([column_of[str(i)] for i in store.ids])
    left_out = ~masks[:, column_of_row]  # (m, n) in store rows
    groups = [row.nonzero().flatten().tolist() for row in left_out]
    scorer = attributor
    if measure is not None:
        scorer = copy.copy(attributor)
        scorer.query_loss_fn = lambda model, batch: -measure(model, batch)
    scores = scorer.score(queries, store, topk=1, groups=groups, progress=progress)
    columns = _positions(query_ids)
    order = torch.tensor([columns[str(i)] for i in scores.query_ids])
    G = torch.empty(len(query_ids), len(groups), dtype=torch.float64)
    G[order] = scores.groups.to("cpu", torch.float64)
    G = G.T  # (m, q)
    y = outputs.to(torch.float64)
    G, y = G - G.mean(dim=0), y - y.mean(dim=0)
    gg, yg = float((G * G).sum()), float((y * G).sum())
    if not gg > 0:
        raise ValueError(f"{source}: the predicted group effects do not vary over the subsets (all scores zero?); "
                         "no scale can be fitted")
    scale = -yg / gg
    correlation = -yg / (gg * float((y * y).sum())) ** 0.5 if float((y * y).sum()) > 0 else 0.0
    if not scale > 0:
        raise ValueError(f"{source}: the retrained models' outputs fall where the attribution predicts they rise "
                         f"(fitted scale {scale:.3g}, correlation {correlation:.3g}); these are labels of another "
                         "model, task or output (they must be minus the query loss of this model's task), or the "
                         "attribution fails on this model")
    return ScaleFit(scale, scale * n, correlation, masks.shape[0], len(query_ids))


@dataclass(frozen=True)
class MatchConfig:
    """Step 2 of DMM: the fine-tuning that matches the predicted outputs.

    Attributes:
        steps: Adam steps (one reference batch each).
        lr: Adam learning rate.
        seed: seed of the batch order.
        checkpoint_every: steps between checkpoints (when a checkpoint path is given).
    """

    steps: int = 100
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        positive_int("checkpoint_every", self.checkpoint_every)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def batch_at(step: int, n_batches: int, seed: int) -> int:
    """Reference batch of ``step``: position ``step % n`` of the permutation of epoch ``step // n`` (seeded)."""
    epoch, position = divmod(step, n_batches)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n_batches, generator=g)[position])


def matching_loss(model: nn.Module, batch: Any, target: torch.Tensor, outputs: OutputFn) -> torch.Tensor:
    """DMM's matching loss on one batch: ``mean_x ||outputs(model, x) - target(x)||²`` (a scalar)."""
    y = outputs(model, batch)
    return ((y - target.to(y.device, y.dtype)) ** 2).sum(dim=1).mean()


def run_key(model: nn.Module, targets: Targets, config: MatchConfig) -> str:
    """What a checkpoint belongs to: the starting model, the reference ids, the targets and the config."""
    h = hashlib.sha256()
    h.update(model_fingerprint(model).encode())
    h.update(json.dumps([str(i) for i in targets.ids]).encode())
    h.update(targets.predicted.double().numpy().tobytes())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    return h.hexdigest()


def match_outputs(model: nn.Module, reference: Sequence[tuple[list, Any]], targets: Targets, outputs: OutputFn,
                  config: MatchConfig = MatchConfig(), *, checkpoint: str | os.PathLike | None = None,
                  request: str = "", progress: bool = True) -> list[float]:
    """Step 2 of DMM: fine-tune ``model`` in place to match ``targets.predicted`` on the reference batches.

    Every ``config.checkpoint_every`` steps the model, the optimizer, the step and the targets are written
    (atomically) to ``checkpoint``; a run started again with the same model, targets and config resumes there and
    ends with the same weights as a run that was never stopped. :func:`checkpoint_targets` reads the targets back,
    so a resumed run need not recompute the attribution. The checkpoint is removed when the run ends.

    Args:
        model: the trained model (changed in place).
        reference: the (ids, batch) pairs the targets were predicted for, in the same order.
        targets: :func:`predict_outputs`' result.
        outputs: ``outputs(model, batch) -> (B, C)``, as for the targets.
        config: steps, learning rate, seed, checkpoint interval.
        checkpoint: the checkpoint file (None: none).
        request: what the targets were computed from (any text, e.g. a hash of the inputs), kept in the checkpoint
            for :func:`checkpoint_targets`.
        progress: show a progress bar.

    Returns:
        The matching loss of every step taken in this call (resumed runs: from the checkpoint's step on).

    Raises:
        ValueError: the reference batches do not hold the targets' examples, or the checkpoint belongs to
            another run (another model, forget set, targets or config).
    """
    ids = [i for batch_ids, _ in reference for i in batch_ids]
    if [str(i) for i in ids] != [str(i) for i in targets.ids]:
        raise ValueError("the reference batches do not hold the examples the targets were predicted for, in order")
    offsets = [0]
    for batch_ids, _ in reference:
        offsets.append(offsets[-1] + len(batch_ids))
    key = run_key(model, targets, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        start = _resume(checkpoint, key, model, optimizer)
    model.eval()
    device = _device(model)
    losses = []
    with progress_bar(config.steps, "unlearn (match outputs)", progress, initial=start) as bar:
        for step in range(start, config.steps):
            b = batch_at(step, len(reference), config.seed)
            optimizer.zero_grad()
            loss = matching_loss(model, to_device(reference[b][1], device), targets.predicted[offsets[b]:offsets[b + 1]], outputs)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            done = step + 1
            if checkpoint is not None and done < config.steps and done % config.checkpoint_every == 0:
                _save_checkpoint(checkpoint, key, done, model, optimizer, targets, request)
    if checkpoint is not None and os.path.exists(checkpoint):
        os.remove(checkpoint)
    return losses


def _save_checkpoint(path: str | os.PathLike, key: str, step: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, targets: Targets, request: str) -> None:
    buffer = io.BytesIO()
    saved_targets = {"ids": json.dumps(list(targets.ids)), "full": targets.full, "predicted": targets.predicted,
                     "scale": targets.scale}
    torch.save({"format": CHECKPOINT_FORMAT, "key": key, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "targets": saved_targets, "request": request}, buffer)
    atomic_write(os.fspath(path), [buffer.getvalue()])


def _read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable unlearning checkpoint ({exc}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an unlearning checkpoint of this version; delete it to start over")
    return state


def checkpoint_targets(path: str | os.PathLike, request: str) -> tuple[Targets, int] | None:
    """The targets and the step of the run that left the checkpoint ``path``, None when there is none.

    Args:
        path: the checkpoint of :func:`match_outputs`.
        request: what the targets must have been computed from (as given to :func:`match_outputs`).

    Raises:
        ValueError: an unreadable checkpoint, or one whose targets were computed from another request (other
            inputs: reusing its targets would unlearn something else).
    """
    if not os.path.exists(path):
        return None
    state = _read_checkpoint(path)
    if state.get("request") != request:
        raise ValueError(f"{path}: {OTHER_RUN}")
    t = state["targets"]
    return Targets(json.loads(t["ids"]), t["full"], t["predicted"], float(t["scale"])), int(state["step"])


def _resume(path: str | os.PathLike, key: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    state = _read_checkpoint(path)
    if state.get("key") != key:
        raise ValueError(f"{path}: {OTHER_RUN}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as one safetensors file, written whole (temp file + rename)."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    atomic_write(os.fspath(path), [save(tensors, metadata=metadata)])
