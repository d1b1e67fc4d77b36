"""Training the AirRep encoder against datamodel labels, with gradient caching; imports the airrep modules and
``airtrace.util``.

One optimizer step takes B dev examples and K subsets (rows of the subset
masks) and minimises :func:`airtrace.airrep.objective.ranknet_loss` of the
pooled group scores ``f(x_b, S_k)`` against the labels ``y_kb``:

1. every training example in the union U of the K subsets is encoded without
   autograd, ``E`` (|U|, d), which is then made a leaf tensor;
2. the dev examples are encoded with autograd, the loss is computed from them
   and ``E``, and backpropagated: the parameters get the dev side of the
   gradient and ``E.grad`` holds ``∂loss/∂E``;
3. U is re-encoded chunk by chunk with autograd and ``Σ E_chunk · E.grad_chunk``
   is backpropagated, which adds the training side of the gradient.

The parameter gradients equal those of one plain backward through the whole
batch, while the memory of a step holds the graph of one chunk, whatever K
and |U| are (gradient caching). The encoder must be deterministic (its
backbone stays in eval mode).

Four trainable modes: ``"all"`` fine-tunes backbone and projector on the texts;
``"projector"`` freezes the backbone, computes its pooled features once and
trains the projector on them (the CPU-friendly mode: 1000 steps in about 6 s
on one core for the chatterbot pool); ``"top"`` trains the top ``top_layers``
transformer layers and the projector, with the outputs of the frozen layers
below computed once per example and cached on disk
(:mod:`airtrace.airrep.layercache`), so a step runs only the trained layers;
``"lora"`` is the same with the top layers frozen and low-rank adapters on
their linear layers trained instead (:mod:`airtrace.airrep.lora`), folded into
the weights when training ends.
``"all"`` re-encodes the union of a step's subsets with the whole backbone
twice per step: with MiniLM-L6 on the 240-pair chatterbot pool that is 40-60 s
per step on two shared CPU cores, so it is meant for an accelerator
(``"top"`` with ``top_layers`` = L is the same training minus the embeddings).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from airtrace.util.checks import positive_int_fields
from airtrace.airrep import layercache, lora
from airtrace.airrep.encoder import Encoder
from airtrace.airrep.objective import T_MAX, T_MIN, normalize_labels, ranknet_loss
from airtrace.airrep.pooling import check_pooling, masks_to_csr, padded_members, pool
from airtrace.util.progress import progress_bar

EncodeFn = Callable[[torch.Tensor], torch.Tensor]
"""rows (r,) int64 -> their embeddings (r, d), with autograd."""

TRAINABLE = ("all", "projector", "top", "lora")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`.

    The defaults were chosen for projector training on MiniLM-L6 features of the
    chatterbot pairs, on a validation split (dev pairs and subset models kept out
    of training, never the evaluation's held-out queries or subsets): 1000 steps
    at lr 1e-3 reach a validation LDS of 0.32 against 0.26 after 300 steps
    (0.26 against 0.23 on a second split); 2000-4000 steps, lr 3e-4, larger
    batches (64 x 32) or weight decay 0.1 are within ±0.01 of it, and lr 3e-3
    is worse (0.11-0.26).

    Top-layer training ("top", ``top_layers`` 1, from the projector-trained encoder, 48 pool
    examples and 16 dev pairs x 16 subsets per step) lowered the validation LDS of the tiny
    chatterbot LM at every learning rate tried: 0.297 -> 0.292 (1e-5), 0.228 (3e-5), 0.143
    (1e-4) after 20-30 steps, and steadily to 0.277 over 100 steps at 3e-6. LoRA ("lora", rank 8
    on the top layer, same batches, projector_lr 1e-5) peaked at 0.299 after 10 steps at lr 3e-4
    and fell after (0.241 at 40); lr 1e-3 fell to 0.12-0.23, rank 1 and lr 1e-4 drifted to
    0.29. Two causes seen with the projector alone: a fresh optimizer at the projector's
    training rate undoes it (see ``projector_lr``), and sampled pools (``pool_sample`` 48 of 240)
    train another objective than whole-group pooling (40 more projector steps at 1e-4: 0.297 ->
    0.286 sampled, 0.295 unsampled), while an unsampled LoRA step costs 17 s on a loaded core
    (0.296 after 20). So "projector" stays the default.

    Attributes:
        steps: optimizer steps.
        lr: peak AdamW learning rate.
        projector_lr: the projector's peak learning rate (None: ``lr``; 0 freezes it). Continuing a
            trained projector with a fresh optimizer at its own training rate (1e-3) undoes it: 40
            projector-only steps at 1e-3 lowered the validation LDS 0.297 -> 0.19, at 1e-5 it stayed.
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps with a linear warm-up (then linear decay to 0).
        clip: gradient-norm clipping threshold.
        dev_batch: dev examples per step (B).
        subset_batch: subsets per step (K).
        chunk: training examples re-encoded per backward chunk.
        pooling: "attention", "attention-signed" or "sum" group scores.
        trainable: "all" (backbone + projector), "projector" (frozen backbone), "top" (the top
            ``top_layers`` layers + projector on cached lower-layer outputs) or "lora" (adapters on the
            top ``top_layers`` layers + projector, same cache).
        top_layers: layers trained ("top") or adapted ("lora"), in [1, L].
        lora_rank: adapter rank r ("lora").
        lora_alpha: adapter scale α, update ``(α / r) B A`` ("lora").
        lora_targets: adapted linear layers of each layer: "attention", "mlp" or "attention+mlp" ("lora").
        pool_sample: training examples drawn per step (None: all); each subset of the step is
            restricted to its members among them, so a step encodes at most this many (the pooled
            score of the sampled members estimates the whole subset's; for the top-layer and
            full modes, whose cost grows with the examples encoded per step).
        t_min: RankNet label-gap threshold.
        t_max: RankNet pair-weight cap.
        seed: draws the batches.
    """

    steps: int = 1000
    lr: float = 1e-3
    projector_lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 1.0
    dev_batch: int = 32
    subset_batch: int = 16
    chunk: int = 64
    pooling: str = "attention"
    trainable: str = "projector"
    top_layers: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "attention+mlp"
    pool_sample: int | None = None
    t_min: float = T_MIN
    t_max: float = T_MAX
    seed: int = 0

    def __post_init__(self):
        positive_int_fields(self, ("steps", "dev_batch", "subset_batch", "chunk", "top_layers"))
        check_pooling(self.pooling)
        lora.check_settings(self.lora_rank, self.lora_alpha, self.lora_targets)
        if self.pool_sample is not None:
            positive_int_fields(self, ("pool_sample",))
        if self.trainable not in TRAINABLE:
            raise ValueError(f"TrainConfig.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.projector_lr is not None and not (self.projector_lr > 0 or
                                                   (self.projector_lr == 0 and self.trainable != "projector")):
            raise ValueError(f"TrainConfig.projector_lr must be None, > 0, or 0 outside the projector mode, got "
                             f"{self.projector_lr} with trainable={self.trainable!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.warmup < 1 and self.clip > 0):
            raise ValueError(f"TrainConfig needs lr > 0, weight_decay >= 0, 0 <= warmup < 1 and clip > 0, got "
                             f"lr={self.lr}, weight_decay={self.weight_decay}, warmup={self.warmup}, clip={self.clip}")

    def record(self) -> dict:
        """The settings as a JSON-able dict."""
        return asdict(self)


def subset_scores(dev: torch.Tensor, train: torch.Tensor, masks: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pooled group scores of subsets for dev examples (differentiable).

    Args:
        dev: (B, d) dev embeddings.
        train: (u, d) training embeddings.
        masks: (K, u) bool, subset k's members among the u rows.
        pooling: "attention", "attention-signed" or "sum".

    Returns:
        (B, K): ``f(x_b, S_k)``; 0 for an empty subset.
    """
    if masks.dim() != 2 or masks.shape[1] != train.shape[0] or masks.dtype != torch.bool:
        raise ValueError(f"masks must be (K, {train.shape[0]}) bool, got {masks.dtype} {tuple(masks.shape)}")
    index, valid = padded_members(*masks_to_csr(masks))
    s = (dev @ train.T)[:, index.to(dev.device)]                     # (B, K, width)
    return pool(s, valid.to(dev.device).expand_as(s), pooling)


def _encode_chunks(encode: EncodeFn, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encode(rows[i : i + chunk]) for i in range(0, rows.numel(), chunk)])


def cached_step(encode_dev: EncodeFn, encode_train: EncodeFn, dev_rows: torch.Tensor, masks: torch.Tensor,
                labels: torch.Tensor, *, pooling: str = "attention", chunk: int = 64, t_min: float = T_MIN,
                t_max: float = T_MAX) -> float:
    """Loss of one batch and its parameter gradients (accumulated into ``.grad``) by gradient caching.

    Args:
        encode_dev: dev rows -> (r, d) embeddings with autograd.
        encode_train: training rows -> (r, d) embeddings with autograd (deterministic).
        dev_rows: (B,) int64 dev examples of the batch.
        masks: (K, n) bool subsets of the batch over all n training examples.
        labels: (B, K) labels of the dev examples for the subsets.
        pooling: "attention", "attention-signed" or "sum".
        chunk: training examples per re-encoding chunk.
        t_min, t_max: RankNet settings.

    Returns:
        The loss (float).
    """
    used = masks.any(dim=0).nonzero().flatten()
    cached = _encode_chunks(encode_train, used, chunk).requires_grad_(True)
    f = subset_scores(encode_dev(dev_rows), cached, masks[:, used], pooling)
    loss = ranknet_loss(f, labels.to(f.dtype), t_min, t_max)
    loss.backward()
    grad = cached.grad
    for i in range(0, used.numel(), chunk):
        part = encode_train(used[i : i + chunk])
        (part * grad[i : i + chunk].to(part.dtype)).sum().backward()
    return float(loss.detach())


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _top_encoders(encoder: Encoder, train_texts: Sequence[str], dev_texts: Sequence[str], config: TrainConfig,
                  progress: bool, cache_dir: str | os.PathLike | None
                  ) -> tuple[EncodeFn, EncodeFn, list[nn.Parameter]]:
    """"top" and "lora" modes: the frozen lower layers' outputs read from (or written to) the layer cache."""
    count = len(encoder.layers())
    if config.top_layers > count:
        raise ValueError(f"TrainConfig.top_layers must be in [1, {count}] for this {count}-layer backbone, "
                         f"got {config.top_layers}")
    frozen = count - config.top_layers
    top = encoder.layers()[frozen:]
    for p in encoder.backbone.parameters():
        p.requires_grad_(False)
    if config.trainable == "lora":
        trained = lora.apply(top, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed)
    else:
        trained = list(top.parameters())
        for p in trained:
            p.requires_grad_(True)
    caches = []
    for texts in (dev_texts, train_texts):
        path = None if cache_dir is None else (Path(cache_dir) / layercache.default_path(encoder, texts, frozen).name)
        caches.append(layercache.load_or_compute(encoder, texts, frozen, path, progress=progress))

    def encode(cache: layercache.LayerCache) -> EncodeFn:
        return lambda rows: layercache.embed_rows(encoder, cache, rows)

    return encode(caches[0]), encode(caches[1]), [*trained, *encoder.projector.parameters()]


def _encoders(encoder: Encoder, train_texts: Sequence[str], dev_texts: Sequence[str], config: TrainConfig,
              progress: bool, features: tuple[torch.Tensor, torch.Tensor] | None = None,
              cache_dir: str | os.PathLike | None = None) -> tuple[EncodeFn, EncodeFn, list[nn.Parameter]]:
    """(encode_dev, encode_train, trainable parameters) for ``config.trainable``."""
    if config.trainable in ("top", "lora"):
        return _top_encoders(encoder, train_texts, dev_texts, config, progress, cache_dir)
    if config.trainable == "projector":
        for p in encoder.backbone.parameters():
            p.requires_grad_(False)
        if features is None:
            pooled = encoder.pooled([*train_texts, *dev_texts], progress=progress, desc="backbone features")
            features = pooled[: len(train_texts)], pooled[len(train_texts) :]
        train_features, dev_features = features
        if train_features.shape != (len(train_texts), encoder.dim) or dev_features.shape != (len(dev_texts),
                                                                                              encoder.dim):
            raise ValueError(f"features must be ((n, d), (q, d)) = (({len(train_texts)}, {encoder.dim}), "
                             f"({len(dev_texts)}, {encoder.dim})), got {tuple(train_features.shape)} and "
                             f"{tuple(dev_features.shape)}")
        device = encoder.projector.weight.device
        return (lambda rows: encoder.projector(dev_features[rows].to(device)),
                lambda rows: encoder.projector(train_features[rows].to(device)),
                list(encoder.projector.parameters()))
    return (lambda rows: encoder.encode([dev_texts[i] for i in rows.tolist()]),
            lambda rows: encoder.encode([train_texts[i] for i in rows.tolist()]),
            [p for p in encoder.parameters() if p.requires_grad])


def _param_groups(encoder: Encoder, params: list[nn.Parameter], config: TrainConfig) -> list[dict]:
    """Optimizer groups: the projector at ``config.projector_lr`` (frozen when 0), the rest at ``config.lr``."""
    if config.projector_lr is None:
        return [{"params": params}]
    projector = {id(p) for p in encoder.projector.parameters()}
    groups = [{"params": [p for p in params if id(p) not in projector]}]
    if config.projector_lr > 0:
        groups.append({"params": [p for p in params if id(p) in projector], "lr": config.projector_lr})
    else:
        encoder.projector.requires_grad_(False)
    return [g for g in groups if g["params"]]


def train(encoder: Encoder, train_texts: Sequence[str], dev_texts: Sequence[str], masks: torch.Tensor,
          dev_outputs: torch.Tensor, config: TrainConfig | None = None, *, progress: bool = True,
          features: tuple[torch.Tensor, torch.Tensor] | None = None,
          cache_dir: str | os.PathLike | None = None, callback: Callable[[int], None] | None = None,
          every: int = 0) -> list[float]:
    """Train ``encoder`` in place on datamodel labels.

    Args:
        encoder: the encoder (its projector, top layers, or everything is trained; in "lora" mode
            the adapters are folded into the top layers' weights at the end).
        train_texts: n training-pool texts (columns of ``masks``).
        dev_texts: q dev texts (columns of ``dev_outputs``).
        masks: (m, n) bool subsets the target models were trained on.
        dev_outputs: (m, q) outputs of the dev examples under the subset models
            (higher = fit better, e.g. minus the loss); normalised per dev example into labels.
        config: :class:`TrainConfig` (default settings when None).
        progress: show a progress bar (steps/s, ETA, loss).
        features: ("projector" mode) the backbone features (n, d) and (q, d) of the training and
            dev texts from :meth:`Encoder.pooled`, when already computed.
        cache_dir: ("top" and "lora" modes) folder of the lower-layer caches (default
            ``$AIRTRACE_CACHE/airrep/layers``; see :mod:`airtrace.airrep.layercache`).
        callback: called with the number of steps done after every ``every`` steps (e.g. to
            measure a validation split; it runs with the encoder in training mode and, in "lora" mode,
            the adapters not yet folded in: :func:`airtrace.airrep.lora.merged_state_dict` gives the
            plain state).
        every: see ``callback`` (0: never).

    Returns:
        The loss of every step.

    Raises:
        ValueError: shapes that do not match the texts.
    """
    config = config or TrainConfig()
    n, q = len(train_texts), len(dev_texts)
    if masks.dim() != 2 or masks.shape[1] != n or masks.dtype != torch.bool:
        raise ValueError(f"masks must be (m, {n}) bool (one column per training text), got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    if dev_outputs.shape != (masks.shape[0], q):
        raise ValueError(f"dev_outputs must be (m, q) = ({masks.shape[0]}, {q}), got {tuple(dev_outputs.shape)}")
    labels = normalize_labels(-dev_outputs.to(torch.float64))
    encoder.train()
    encode_dev, encode_train, params = _encoders(encoder, train_texts, dev_texts, config, progress, features,
                                                 cache_dir)
    optimizer = torch.optim.AdamW(_param_groups(encoder, params, config), lr=config.lr,
                                  weight_decay=config.weight_decay)
    warmup = max(1, math.ceil(config.warmup * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    with progress_bar(config.steps, "airrep train", progress) as bar:
        bar.unit = "step"
        for _ in range(config.steps):
            dev_rows = torch.randperm(q, generator=generator)[: config.dev_batch]
            subsets = torch.randperm(masks.shape[0], generator=generator)[: config.subset_batch]
            batch_masks = masks[subsets]
            if config.pool_sample is not None:
                sample = torch.zeros(n, dtype=torch.bool)
                sample[torch.randperm(n, generator=generator)[: config.pool_sample]] = True
                batch_masks = batch_masks & sample
            optimizer.zero_grad(set_to_none=True)
            loss = cached_step(encode_dev, encode_train, dev_rows, batch_masks, labels[subsets][:, dev_rows].T,
                               pooling=config.pooling, chunk=config.chunk, t_min=config.t_min, t_max=config.t_max)
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            schedule.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if callback is not None and every > 0 and len(losses) % every == 0:
                callback(len(losses))
    if config.trainable == "lora":
        lora.merge(encoder.backbone)
    encoder.projector.requires_grad_(True)
    encoder.eval()
    return losses
