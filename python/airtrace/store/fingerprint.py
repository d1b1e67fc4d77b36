"""The model fingerprint (``model_fingerprint``) that ties a store to the weights it was written for; imports
``airtrace.store.files``."""

from __future__ import annotations

import hashlib
import json

import torch

from airtrace.store.files import tensor_bytes


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """A stable identity of a model's weights.

    sha256 over every parameter's name, shape, dtype and ``samples_per_tensor``
    values taken at an even stride through the flattened tensor (bytes as
    stored). Same weights on any device give the same fingerprint, also through
    ``torch.compile`` (its ``_orig_mod.`` name prefix is ignored); it changes
    with a different architecture, dtype or (almost surely) any training step.

    Args:
        model: the module.
        samples_per_tensor: values sampled per parameter.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu").contiguous()
        digest.update(json.dumps([name.replace("_orig_mod.", ""), list(p.shape), str(p.dtype)]).encode())
        digest.update(tensor_bytes(sample).tobytes())
    return "sha256:" + digest.hexdigest()
