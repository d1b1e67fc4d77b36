"""The Attributor's settings: curvature methods, projection configs (``projection_config``) and the parts of a
projection record that decide the features; imports ``airtrace.capture``, ``airtrace.ops.hash``,
``airtrace.ops.project_sparse`` and ``airtrace.util``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from airtrace.capture import LayerSpec, select_layers
from airtrace.ops.hash import KINDS, MAX_SEED
from airtrace.ops.project_sparse import check_sparsity
from airtrace.util.checks import positive_int


CURVATURES = ("ekfac", "kfac", "fisher", "lowrank", "identity", "exact")
DENSE_CURVATURES = ("fisher", "lowrank")
"""Curvatures that hold a dense (p, p) matrix per layer block of p = k_out * k_in features."""
EXACT_BUDGET = 4096
"""``exact_budget`` of the factored projection for the dense curvatures (:data:`DENSE_CURVATURES`): a layer whose
gradient has at most this many entries (d_out * d_in, bias column included) is kept unprojected; its Fisher is a
(4096, 4096) float64 matrix, 128 MiB."""
KRONECKER_EXACT_BUDGET = 65536
"""``exact_budget`` for every other curvature (the default EK-FAC, K-FAC, identity, exact): their per-layer state is
d_in² + d_out² Kronecker factors plus d_out * d_in eigenvalues, so the bound is the store's width (65536 entries,
256 KiB per example in float32). Chosen by leave-one-task-out LDS (``benches/bench_projection.py``); below SmolLM2's
smallest layer (576 x 192), whose store it leaves unchanged."""
DENSE_MAX_BLOCK = 8192
"""Most features in one block (k_out * k_in) that a dense curvature takes: its (p, p) float64 matrix is 512 MiB."""
FACTORED = {"type": "factored", "k_in": 16, "k_out": 16, "seed": 0, "exact_small": True,
            "exact_budget": KRONECKER_EXACT_BUDGET}
DENSE = {"type": "dense", "k": 1024, "seed": 0, "kind": "rademacher"}
SPARSE = {"type": "sparse", "k": 1024, "s": 2, "seed": 0}
PROJECTIONS = {"factored": FACTORED, "dense": DENSE, "sparse": SPARSE}
DENSE_BLOCK = "dense"
"""The one feature block of a dense projection ("sparse" for the sparse one: the block is named after the type)."""

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_exact_budget(curvature: str) -> int:
    """The factored projection's default ``exact_budget`` for ``curvature``: :data:`EXACT_BUDGET` for the dense
    curvatures (fisher, lowrank), :data:`KRONECKER_EXACT_BUDGET` for the others."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return EXACT_BUDGET if curvature in DENSE_CURVATURES else KRONECKER_EXACT_BUDGET


def check_dense_blocks(curvature: str, dims: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a dense curvature (fisher, lowrank) on a block wider than :data:`DENSE_MAX_BLOCK` features.

    Raises:
        ValueError: naming the block, the matrix's size and the projection that fits.
    """
    if curvature not in DENSE_CURVATURES:
        return
    wide = {name: k_out * k_in for name, (k_out, k_in) in dims.items() if k_out * k_in > DENSE_MAX_BLOCK}
    if wide:
        name, p = max(wide.items(), key=lambda item: item[1])
        raise ValueError(f"curvature {curvature!r} holds a dense (p, p) matrix per block; block {name!r} has "
                         f"p = {p} features ({p * p * 8 / 2**30:.1f} GiB in float64), the most is {DENSE_MAX_BLOCK}: "
                         f"featurize with projection exact_budget <= {EXACT_BUDGET} (the default for {curvature!r}) "
                         f"and k_out * k_in <= {DENSE_MAX_BLOCK}, or use curvature 'ekfac'")


def projection_config(projection: Mapping | str | None, curvature: str = "ekfac") -> dict:
    """Normalise a projection spec to a full config dict.

    Args:
        projection: None or "factored" (k_in = k_out = 16, seed 0, exact_small, exact_budget by ``curvature``); "dense"
            (k = 1024, seed 0, rademacher); "sparse" (k = 1024, s = 2, seed 0); or a dict with
            ``type`` ("factored", "dense" or "sparse"; default "sparse" when it has ``s``, "dense"
            when it has ``k``, else "factored") and any of ``k_in, k_out, seed, exact_small, exact_budget``
            (factored; ``exact_small`` (default True) keeps a layer side no wider than its k unprojected,
            ``exact_budget`` (default :func:`default_exact_budget` of ``curvature``) a layer with at most that many
            gradient entries, see :func:`airtrace.capture.make_projections`), ``k, seed, kind`` (dense) or
            ``k, s, seed`` (sparse: s nonzeros per gradient coordinate, 1..4, see
            :func:`airtrace.ops.project_sparse.project_sparse`).
        curvature: the curvature the features are for; decides the default ``exact_budget``.

    Returns:
        ``{"type": "factored", "k_in", "k_out", "seed", "exact_small", "exact_budget"}``,
        ``{"type": "dense", "k", "seed", "kind"}`` or ``{"type": "sparse", "k", "s", "seed"}``.

    Raises:
        ValueError: unknown type or key, or a non-positive dimension / bad seed / kind / s.
    """
    if projection is None or isinstance(projection, str):
        projection = {"type": projection or "factored"}
    if not isinstance(projection, Mapping):
        raise ValueError(f"projection must be a dict, 'factored', 'dense' or 'sparse', got {projection!r}")
    kind = projection.get("type", "sparse" if "s" in projection else "dense" if "k" in projection else "factored")
    if kind not in PROJECTIONS:
        raise ValueError(f"projection type must be one of {tuple(PROJECTIONS)}, got {kind!r}")
    defaults = PROJECTIONS[kind]
    if kind == "factored":
        defaults = {**defaults, "exact_budget": default_exact_budget(curvature)}
    unknown = sorted(set(projection) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} projection keys {unknown}; allowed: {sorted(defaults)}")
    config = {**defaults, **projection, "type": kind}
    for key in ("k_in", "k_out") if kind == "factored" else ("k",):
        positive_int(f"projection {key}", config[key])
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int) or not 0 <= config["seed"] < MAX_SEED:
        raise ValueError(f"projection seed must be an int in [0, 2^32), got {config['seed']!r}")
    if kind == "factored" and not isinstance(config["exact_small"], bool):
        raise ValueError(f"projection exact_small must be a bool, got {config['exact_small']!r}")
    if kind == "factored" and (isinstance(config["exact_budget"], bool) or not isinstance(config["exact_budget"], int)
                               or config["exact_budget"] < 0):
        raise ValueError(f"projection exact_budget must be an int >= 0 (gradient entries of a layer kept "
                         f"unprojected; 0 projects every layer), got {config['exact_budget']!r}")
    if kind == "dense" and config["kind"] not in KINDS:
        raise ValueError(f"dense projection kind must be one of {KINDS}, got {config['kind']!r}")
    if kind == "sparse":
        try:
            check_sparsity(config["s"], config["k"])
        except ValueError as exc:
            raise ValueError(f"sparse projection: {exc}") from None
    return config


def exact_projection(layers: Sequence[LayerSpec], seed: int = 0) -> dict:
    """The factored projection that keeps every layer of ``layers`` unprojected: ``exact_small`` with k_in / k_out
    the widest d_in / d_out (features are the weight and bias gradients themselves)."""
    return {"type": "factored", "k_in": max(spec.d_in for spec in layers), "k_out": max(spec.d_out for spec in layers),
            "seed": seed, "exact_small": True}


def layer_specs(model: nn.Module, layers, exclude, bias: bool) -> list[LayerSpec]:
    """LayerSpecs as given, or selected by name patterns."""
    if isinstance(layers, Sequence) and not isinstance(layers, str) and layers and all(
            isinstance(spec, LayerSpec) for spec in layers):
        return list(layers)
    return select_layers(model, layers, exclude, bias=bias)


def recorded_projection(record: Mapping) -> dict:
    """The projection config of a store's projection record (``exact_small`` False and ``exact_budget`` 0 in
    records written before the options existed)."""
    if record["type"] == "factored":
        return {**{key: record.get(key, default) for key, default in FACTORED.items()},
                "exact_small": record.get("exact_small", False), "exact_budget": record.get("exact_budget", 0)}
    return {key: record.get(key, default) for key, default in PROJECTIONS[record["type"]].items()}


def essential(record: Mapping) -> dict:
    """The parts of a projection record that decide the features (not provenance)."""
    keys = ("type", "k_in", "k_out", "seed", "exact_small", "exact_budget", "k", "kind", "s", "layers")
    essential = {key: record[key] for key in keys if key in record}
    if essential.get("type") == "factored":  # records written before the options existed
        essential.setdefault("exact_small", False)
        essential.setdefault("exact_budget", 0)
    if "layers" in record:  # as LayerSpecs read them (fields added since have their defaults)
        essential["layers"] = json.loads(json.dumps([asdict(LayerSpec(**spec)) for spec in record["layers"]]))
    return essential
