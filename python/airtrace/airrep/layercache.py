"""Cached outputs of the AirRep encoder's frozen lower layers, keyed by the encoder's identity and the texts; imports
``airtrace.airrep.encoder``, the store's model fingerprint and ``airtrace.util``.

Training only the top ``L − f`` transformer layers (and the projector) of an
``L``-layer encoder leaves ``h_f(x)``, the hidden states after the embeddings
and the first ``f`` layers, fixed. They are computed once per example and kept
unpadded: tensor ``hidden`` (Σ_i T_i, d) with the T_i tokens of example i at
rows ``offsets[i] : offsets[i + 1]`` (``offsets`` (n + 1,) int64). A training
step pads the rows it needs back into a (B, T, d) block and runs only the top
layers on it (:meth:`airtrace.airrep.encoder.Encoder.top_embed`).

The file is a checked safetensors file (:mod:`airtrace.util.checked_file`)
named ``<encoder key>-<texts key>.safetensors`` under
``$AIRTRACE_CACHE/airrep/layers`` (or any path given). The encoder key is
sha256 over the fingerprint of the embeddings and the frozen layers
(:func:`airtrace.store.model_fingerprint`: module classes and every weight's
bytes), ``f``, ``max_tokens`` and the tokenizer's vocabulary; the texts key is
sha256 over the texts. A file whose keys differ from the encoder and texts at
hand (stale weights, other texts, another tokenizer) is refused, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from airtrace.airrep.encoder import Encoder
from airtrace.store.fingerprint import model_fingerprint
from airtrace.util.cache import cache_root
from airtrace.util.checked_file import load_checked, save_checked
from airtrace.util.progress import progress_bar

KEY = "airtrace.airrep.layercache"
FORMAT = 1
PADDED_TOKENS = 4096
"""Most padded tokens (rows x longest row) per forward pass of the top layers."""


def encoder_key(encoder: Encoder, frozen: int) -> str:
    """sha256 hex identifying what ``h_frozen(x)`` depends on: frozen weights and modules, ``frozen``, truncation
    and the tokenizer's vocabulary."""
    encoder.check_frozen(frozen)
    lower = nn.ModuleDict({"embeddings": encoder.backbone.embeddings,
                           "layers": nn.ModuleList(encoder.layers()[:frozen])})
    vocab = sorted(encoder.tokenizer.get_vocab().items())
    record = [FORMAT, model_fingerprint(lower), frozen, encoder.max_tokens, type(encoder.tokenizer).__name__,
              hashlib.sha256(json.dumps(vocab).encode()).hexdigest()]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def texts_key(texts: Sequence[str]) -> str:
    """sha256 hex over the texts (in order)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def default_path(encoder: Encoder, texts: Sequence[str], frozen: int) -> Path:
    """``cache_root("airrep") / "layers" / "<encoder key>-<texts key>.safetensors"`` (16 hex digits of each)."""
    return cache_root("airrep") / "layers" / f"{encoder_key(encoder, frozen)[:16]}-{texts_key(texts)[:16]}.safetensors"


class LayerCache:
    """Frozen lower-layer outputs of n texts.

    Args:
        hidden: (Σ T_i, d) hidden states after ``frozen`` layers, unpadded, in the encoder's dtype.
        offsets: (n + 1,) int64 row boundaries of each text's tokens.
        frozen: layers run (0 = the embeddings' output).
    """

    def __init__(self, hidden: torch.Tensor, offsets: torch.Tensor, frozen: int):
        if hidden.dim() != 2 or offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[-1]) != hidden.shape[0]:
            raise ValueError(f"hidden (N, d) and offsets (n + 1,) ending at N do not fit: {tuple(hidden.shape)}, "
                             f"{tuple(offsets.shape)}")
        self.hidden, self.offsets, self.frozen = hidden, offsets.to(torch.long), frozen

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the cached hidden states and offsets."""
        return self.hidden.numel() * self.hidden.element_size() + self.offsets.numel() * 8

    def lengths(self, rows: torch.Tensor) -> torch.Tensor:
        """Token counts (B,) int64 of ``rows`` (B,)."""
        return self.offsets[rows + 1] - self.offsets[rows]

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded hidden states (B, T, d) (zeros at padding) and attention mask (B, T) int64 of ``rows`` (B,)."""
        rows = rows.tolist()
        starts, stops = self.offsets[rows].tolist(), self.offsets[[r + 1 for r in rows]].tolist()
        width = max(b - a for a, b in zip(starts, stops))
        hidden = self.hidden.new_zeros(len(rows), width, self.hidden.shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (a, b) in enumerate(zip(starts, stops)):
            hidden[i, : b - a], mask[i, : b - a] = self.hidden[a:b], 1
        return hidden.to(device), mask.to(device)


@torch.no_grad()
def compute(encoder: Encoder, texts: Sequence[str], frozen: int, *, batch_size: int = 64,
            progress: bool = False) -> LayerCache:
    """Run the embeddings and the first ``frozen`` layers once over ``texts`` (batches of similar length)."""
    encoder.check_frozen(frozen)
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts: list[torch.Tensor | None] = [None] * len(texts)
    with progress_bar(len(texts), f"lower {frozen} layers", progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tokens = encoder._tokens([texts[i] for i in rows])
            hidden = encoder.lower_hidden(tokens["input_ids"], tokens["attention_mask"], frozen).cpu()
            for j, i in enumerate(rows):
                parts[i] = hidden[j, : int(tokens["attention_mask"][j].sum())].clone()
            bar.update(len(rows))
    lengths = torch.tensor([p.shape[0] for p in parts], dtype=torch.long)
    offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    hidden = torch.cat(parts) if parts else torch.zeros(0, encoder.dim, dtype=encoder.projector.weight.dtype)
    return LayerCache(hidden, offsets, frozen)


def load_or_compute(encoder: Encoder, texts: Sequence[str], frozen: int, path: str | os.PathLike | None = None, *,
                    progress: bool = False) -> LayerCache:
    """The lower-layer outputs of ``texts``: read from ``path`` when it exists, else computed and written there.

    Args:
        encoder: the encoder (its embeddings and first ``frozen`` layers are what is cached).
        texts: n texts.
        frozen: lower layers cached, in [0, L).
        path: the cache file (default :func:`default_path`).
        progress: progress bar while computing.

    Raises:
        ValueError: the file at ``path`` was written for another encoder, ``frozen`` or texts, or is damaged; the
            message names the file and the fix (delete it, or pass another path).
    """
    ekey, tkey = encoder_key(encoder, frozen), texts_key(texts)
    path = Path(path) if path is not None else default_path(encoder, texts, frozen)
    if path.exists():
        tensors, record = load_checked(path, KEY, "an AirRep layer cache")
        mismatch = [name for name, want in (("format", FORMAT), ("encoder", ekey), ("frozen", frozen), ("texts", tkey))
                    if record.get(name) != want]
        if mismatch:
            raise ValueError(f"{path}: a layer cache of another {' and '.join(mismatch)} (stale or foreign). Fix: "
                             "delete the file or pass another cache path")
        return LayerCache(tensors["hidden"], tensors["offsets"], frozen)
    cache = compute(encoder, texts, frozen, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checked({"hidden": cache.hidden, "offsets": cache.offsets}, path, KEY,
                 {"format": FORMAT, "encoder": ekey, "frozen": frozen, "texts": tkey, "n": len(texts)})
    return cache


def embed_rows(encoder: Encoder, cache: LayerCache, rows: torch.Tensor, *,
               padded_tokens: int = PADDED_TOKENS) -> torch.Tensor:
    """Embeddings (B, d) of cached ``rows`` (B,) int64 through the top layers, with autograd, in the order given.

    Rows run sorted by length in passes of at most ``padded_tokens`` padded tokens (one long row does not pad a
    whole batch to its length); the result equals one :meth:`Encoder.top_embed` over all rows.
    """
    lengths = cache.lengths(rows)
    order = torch.argsort(lengths, stable=True)
    device = encoder.projector.weight.device
    parts, start = [], 0
    while start < rows.numel():
        stop = start + 1
        while stop < rows.numel() and int(lengths[order[stop]]) * (stop + 1 - start) <= padded_tokens:
            stop += 1
        parts.append(encoder.top_embed(*cache.batch(rows[order[start:stop]], device), cache.frozen))
        start = stop
    out = torch.cat(parts)
    return out[torch.argsort(order).to(out.device)]
