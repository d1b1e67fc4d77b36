"""The model fingerprint (``model_fingerprint``) that ties a store to the model it was written for; imports the digest
op of the kernels layer and ``airtrace.util``."""

from __future__ import annotations

import hashlib
import json

import torch

from airtrace.ops.digest import digest, hexdigest
from airtrace.util.compiled import unwrap

PREFIX = "fp2:"
"""Names this fingerprint's recipe; a store whose fingerprint lacks it was written by an older airtrace."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """An identity of everything in a model that its per-example gradients depend on.

    sha256 over the module tree (every submodule's name, class and ``extra_repr()``,
    e.g. an activation's class, BatchNorm's eps, GELU's approximation) and, for every
    parameter and buffer (BatchNorm running statistics included), its name, dtype,
    shape and the 128-bit :func:`airtrace.digest` of all its bytes, computed on the
    tensor's own device (a model on a GPU is hashed there, not copied to the host).
    The same modules and bytes give the same fingerprint on any device or backend; a
    change of any byte, buffer, dtype or module class gives another. A
    ``torch.compile``d model is hashed as the module it wraps (the same model).

    Args:
        model: the module.

    Returns:
        ``"fp2:<64 hex digits>"``.

    Raises:
        ValueError: a parameter or buffer on the meta device (it has no bytes to hash).
    """
    model = unwrap(model)
    h = hashlib.sha256()
    for name, module in model.named_modules():
        cls = type(module)
        h.update(json.dumps(["module", name, f"{cls.__module__}.{cls.__qualname__}", module.extra_repr()]).encode())
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            if t.device.type == "meta":
                raise ValueError(f"model_fingerprint: model {kind} {name!r} is on the meta device, it has no values "
                                 "to identify. Fix: load the weights (e.g. model.to_empty(...) and load_state_dict) "
                                 "first")
            lanes = digest(t.detach().reshape(1, -1))
            h.update(json.dumps([kind, name, str(t.dtype), list(t.shape), hexdigest(lanes)[0]]).encode())
    return PREFIX + h.hexdigest()
