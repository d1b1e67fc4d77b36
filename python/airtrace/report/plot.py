"""The small score-distribution plot of a query (``distribution_png``): a histogram of sampled scores with the listed
rows marked, as base64 PNG for embedding; imports nothing from airtrace (matplotlib, Agg backend)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence


def distribution_png(scores: Sequence[float], marked: Sequence[float] = (), *, width: float = 3.2,
                     height: float = 1.3, dpi: int = 80) -> str:
    """Histogram of ``scores`` (a sample of one query's scores over the training set), with a tick at each of
    ``marked`` (the listed rows: blue helpful, red harmful) and the zero line; base64 PNG text.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (names the pip command).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the report's plots need matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    try:
        ax.hist(list(scores), bins=30, color="#9aa7b5")
        ax.axvline(0.0, color="#444", lw=0.6)
        for value in marked:
            ax.axvline(value, ymax=0.25, color="#3a7bd5" if value >= 0 else "#d5533a", lw=0.8)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title("score distribution (sample of the training set)", fontsize=7)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.tight_layout(pad=0.2)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()
