"""Random training subsets with recorded seeds (the datamodel / LDS sampling plan); imports nothing from airtrace.

A :class:`SubsetPlan` is a boolean membership matrix ``masks`` (m, n) — row j
marks the training examples of subset j — and one training seed per subset.
:func:`sample_subsets` draws m subsets of exactly ``round(fraction * n)``
examples each from a seeded ``torch.Generator``, so a (n, m, fraction, seed)
quadruple gives the same plan on every machine. Plans built by hand (leave-one-
out, top-k removal) use the same class.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

METADATA_KEY = "airtrace.subsets"
MAX_SEED = 2**31


def _check_int(name: str, value, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
    return value


@dataclass(frozen=True)
class SubsetPlan:
    """m training subsets of n examples and the seed each one is trained with.

    Args:
        masks: (m, n) bool; ``masks[j, i]`` is True when example i is in subset j.
        seeds: m ints in [0, 2^31), the training seed of each subset.

    Raises:
        ValueError: masks not a 2-D bool tensor, an empty subset, or seeds of the wrong length / range.
    """

    masks: torch.Tensor
    seeds: list[int]

    def __post_init__(self) -> None:
        masks = self.masks
        if not isinstance(masks, torch.Tensor) or masks.dim() != 2 or masks.dtype != torch.bool:
            shape = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"masks must be a (m, n) bool tensor, got {shape}")
        if masks.shape[0] < 1 or masks.shape[1] < 1:
            raise ValueError(f"masks must have at least one subset and one example, got shape {tuple(masks.shape)}")
        empty = (~masks.any(dim=1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"subset {int(empty[0])} of masks is empty; every subset needs one example or more")
        seeds = list(self.seeds)
        if len(seeds) != masks.shape[0]:
            raise ValueError(f"seeds must hold one seed per subset ({masks.shape[0]}), got {len(seeds)}")
        for j, s in enumerate(seeds):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < MAX_SEED:
                raise ValueError(f"seeds[{j}] must be an int in [0, 2^31), got {s!r}")
        object.__setattr__(self, "masks", masks.cpu().contiguous())
        object.__setattr__(self, "seeds", seeds)

    @property
    def m(self) -> int:
        """Number of subsets."""
        return self.masks.shape[0]

    @property
    def n(self) -> int:
        """Number of training examples."""
        return self.masks.shape[1]

    def indices(self, j: int) -> torch.Tensor:
        """(n_j,) int64 sorted training indices of subset j."""
        if isinstance(j, bool) or not isinstance(j, int) or not -self.m <= j < self.m:
            raise ValueError(f"subset index must be an int in [0, {self.m}), got {j!r}")
        return self.masks[j].nonzero().flatten()

    @property
    def digest(self) -> str:
        """16 hex digits of sha256 over the masks and the seeds: the plan's identity."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.masks.shape), self.seeds]).encode())
        h.update(self.masks.to(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, SubsetPlan) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write ``masks`` (m, n) bool and the seeds (metadata) to a safetensors file, atomically.

        Args:
            path: the file.
            metadata: extra string metadata entries kept beside the plan's own.
        """
        path = os.fspath(path)
        meta = {**(metadata or {}), METADATA_KEY: json.dumps({"seeds": self.seeds, "digest": self.digest})}
        tmp = f"{path}.tmp"
        save_file({"masks": self.masks}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubsetPlan:
        """Read a plan written by :meth:`save`.

        Raises:
            ValueError: not a readable safetensors file, no plan metadata, or inconsistent contents.
        """
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                masks = f.get_tensor("masks") if "masks" in f.keys() else None
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        if raw is None or masks is None:
            raise ValueError(f"{path}: not an airtrace subset plan (no 'masks' tensor or {METADATA_KEY!r} metadata)")
        try:
            seeds = json.loads(raw)["seeds"]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: malformed {METADATA_KEY!r} metadata ({exc!r})") from exc
        try:
            return cls(masks, seeds)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def sample_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> SubsetPlan:
    """m random subsets of ``round(fraction * n)`` of n training examples each.

    Subset j is the first ``round(fraction * n)`` entries of a random
    permutation; its training seed is drawn from the same generator, seeded
    with ``seed``.

    Args:
        n: training examples (>= 2).
        m: subsets (>= 1).
        fraction: subset size / n, in (0, 1); the size is at least 1 and at most n - 1.
        seed: generator seed, an int in [0, 2^63).

    Returns:
        A :class:`SubsetPlan` with masks (m, n) bool and m seeds in [0, 2^31).

    Raises:
        ValueError: bad n, m, fraction or seed.
    """
    _check_int("n", n, 2)
    _check_int("m", m, 1)
    _check_int("seed", seed, 0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    size = min(max(round(fraction * n), 1), n - 1)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(m, n, dtype=torch.bool)
    seeds = []
    for j in range(m):
        masks[j, torch.randperm(n, generator=generator)[:size]] = True
        seeds.append(int(torch.randint(0, MAX_SEED, (1,), generator=generator)))
    return SubsetPlan(masks, seeds)
