"""One module per curvature method (identity, fisher, lowrank, kfac, ekfac): its per-layer inverse, its builder and its
streaming fitter; reached through :mod:`airtrace.curvature`, which re-exports them; they import
``airtrace.curvature.fitted``, ``.fitting`` and the kernels layer."""
