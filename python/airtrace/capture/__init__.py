"""Gradient capture (hooks on layers -> per-example projected weight gradients), layer selection, projections and
per-example losses; re-exports the names of its modules, which import the kernels layer, ``airtrace.profiling`` and
``airtrace.util``."""

from airtrace.capture.hooks import GradientCapture
from airtrace.capture.layers import (
    PRESETS,
    ROOT,
    LayerSpec,
    layer_kind,
    named_modules,
    select_layers,
    tracked_parameters,
    unwrap,
)
from airtrace.capture.losses import IGNORE_INDEX, causal_lm_losses, per_example_loss, response_labels
from airtrace.capture.projections import LAYER_SEED_STRIDE, MAX_SEED, Projections, layer_seed, make_projections

__all__ = [
    "GradientCapture",
    "IGNORE_INDEX",
    "LAYER_SEED_STRIDE",
    "LayerSpec",
    "MAX_SEED",
    "PRESETS",
    "ROOT",
    "Projections",
    "layer_kind",
    "layer_seed",
    "make_projections",
    "causal_lm_losses",
    "named_modules",
    "per_example_loss",
    "response_labels",
    "select_layers",
    "tracked_parameters",
    "unwrap",
]
