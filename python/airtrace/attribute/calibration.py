"""The calibration file: the attribution settings chosen by LDS against retrained subsets (written by
:func:`airtrace.eval.calibrate.calibrate`), read back as Attributor arguments; imports ``airtrace.attribute.attributor``
and ``airtrace.curvature``.

The file is JSON::

    {"format": "airtrace.calibration/1",
     "settings": {"layers": [...], "bias": false, "projection": {"type": "factored", "k_in": 16, ...},
                  "curvature": "ekfac", "damping": 0.1 | "auto", "metric": "inner"},
     "lds": {"mean": 0.71, "ci": [0.68, 0.74], "folds": 4, "subsets": 64, "queries": 50},
     "grid": [{"k": 16, "exact_budget": 65536, "curvature": "ekfac", "damping": 0.1, "metric": "inner", "lds": 0.70}, ...],
     "labels": "<ground-truth file>"}

``damping`` is a relative factor (``λ = factor × mean eigenvalue`` per layer) or "auto";
``lds`` is the cross-validated LDS of the selection procedure on subsets held out
from the choice, ``grid`` every candidate's LDS on all subsets (in-sample).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from airtrace.attribute.attributor import Attributor
from airtrace.attribute.config import LossFn
from airtrace.curvature import Damping

FORMAT = "airtrace.calibration/1"


@dataclass(frozen=True)
class Calibration:
    """Chosen settings with their held-out LDS and the grid searched.

    Attributes:
        settings: {"layers", "bias", "projection", "curvature", "damping" (factor or "auto"), "metric"}.
        lds: {"mean", "ci" [lo, hi], "folds", "subsets", "queries"}: cross-validated LDS on held-out subsets.
        grid: one dict per candidate: k, exact_budget, curvature, damping, metric and its in-sample LDS.
        labels: the ground-truth file the LDS was measured against.
    """

    settings: dict
    lds: dict
    grid: list
    labels: str

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file (atomically: a temporary file renamed)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, **asdict(self)}, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a calibration file.

        Raises:
            ValueError: missing, unreadable, or not a calibration file (names the file).
        """
        path = os.fspath(path)
        try:
            with open(path) as f:
                raw = json.load(f)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
            calibration = cls(raw["settings"], raw["lds"], raw["grid"], raw["labels"])
            for key in ("layers", "bias", "projection", "curvature", "damping", "metric"):
                calibration.settings[key]  # noqa: B018 (presence check)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path}: not a calibration file written by airtrace.eval.calibrate ({exc})") from None
        return calibration

    @property
    def damping(self) -> Damping | str:
        """The Attributor's ``damping`` argument: "auto" or the relative factor as a :class:`Damping`."""
        value = self.settings["damping"]
        return value if value == "auto" else Damping(factor=float(value))

    @property
    def metric(self) -> str:
        """The score metric to pass to :meth:`Attributor.score`."""
        return self.settings["metric"]

    def attributor_kwargs(self) -> dict[str, Any]:
        """``layers``, ``bias``, ``projection``, ``curvature`` and ``damping`` as Attributor arguments."""
        s = self.settings
        return {"layers": s["layers"], "bias": s["bias"], "projection": dict(s["projection"]),
                "curvature": s["curvature"], "damping": self.damping}

    def attributor(self, model: nn.Module, *, loss_fn: LossFn, **kwargs: Any) -> Attributor:
        """An Attributor with the calibrated settings (``kwargs``: device, backend, ...)."""
        return Attributor(model, loss_fn=loss_fn, **self.attributor_kwargs(), **kwargs)
