"""The K-FAC factor sums a featurize keeps beside its store (the store's K-FAC sidecar), saved from and loaded into a
fitter; imports ``airtrace.curvature`` and ``airtrace.store``."""

from __future__ import annotations

import logging
import os

from airtrace import curvature as cv
from airtrace.store import Store
from airtrace.store.sidecars import kfac_sidecar

log = logging.getLogger("airtrace")


def save_kfac_sums(store: Store, fitter: cv.KFACFitter) -> None:
    """Keep the sums beside the store, so that a later fit (another process, the CLI) skips the K-FAC pass."""
    try:
        fitter.save_state(kfac_sidecar(store))
    except OSError as exc:
        log.warning("airtrace: could not save the K-FAC sums in %s (%s); fit will run its own K-FAC pass",
                    store.path, exc)


def load_kfac_sums(store: Store, *, float32_products: bool) -> cv.KFACFitter | None:
    """The sums of the store's K-FAC sidecar as a fitter without damping (the caller sets it;
    ``float32_products``: they were summed from float32 products, i.e. the model is not float64);
    None when there is none (a bad one is ignored)."""
    path = kfac_sidecar(store)
    if not os.path.exists(path):
        return None
    fitter = cv.KFACFitter()
    fitter.float32_products = float32_products
    try:
        fitter.load_states([cv.KFACFitter.read_state(path)])
    except ValueError as exc:
        log.warning("airtrace: ignoring %s", exc)
        return None
    return fitter
