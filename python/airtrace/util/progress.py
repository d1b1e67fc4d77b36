"""The progress bar every long pass shows (examples/s, ETA); imports nothing from airtrace."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, progress: bool, initial: int = 0) -> tqdm:
    """A tqdm bar counting examples (rate in examples/s, ETA when ``total`` is known), on stderr."""
    return tqdm(initial=initial, total=total, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
