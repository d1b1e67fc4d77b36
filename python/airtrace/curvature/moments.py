"""The moments of the training features that the ``"auto"`` damping rule reads (``MomentAccumulator``), streamed like a
curvature fitter; imports ``airtrace.curvature.fitting`` and ``.damping``."""

from __future__ import annotations

import torch

from airtrace.curvature.damping import FeatureMoments
from airtrace.curvature.fitting import Accumulator, Features


class MomentAccumulator(Accumulator):
    """Per layer, float64 sums of ``vec(ĝ_i)`` (k_out * k_in,) and of ``‖ĝ_i‖²`` (a 0-d tensor).

    Fed {layer: (B, k_out, k_in)} batches with :meth:`update`; its ``state`` / ``load_states``
    add the sums of several ranks like a fitter's (``airtrace.distributed.reduce_fitter``);
    :meth:`finalize` returns the :class:`airtrace.curvature.damping.FeatureMoments`.
    """

    def update(self, features: Features) -> None:
        """Add one batch of features of every layer (any float dtype, one B for all layers)."""
        for name, x in self._feature_batch(features).items():
            v = x.reshape(x.shape[0], -1)
            self._add(name, v.sum(0), v.square().sum())

    def finalize(self) -> FeatureMoments:
        """The mean feature vector and mean squared norm of every layer.

        Raises:
            ValueError: no examples were seen.
        """
        means = self._means()
        return FeatureMoments(self.n_examples, {name: mean.cpu() for name, (mean, _) in means.items()},
                              {name: float(sq) for name, (_, sq) in means.items()})
