"""What a ``--model`` factory returns for the CLI (``Task``) and how it is loaded (``load_task``); imports
``airtrace.attribute.config`` and ``.batches``."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from torch import nn

from airtrace.attribute.batches import Batches
from airtrace.attribute.config import LossFn


@dataclass
class Task:
    """What a model factory returns for the CLI (``airtrace featurize|fit|score --model pkg.module:function``).

    The factory is called without arguments. It may return a Task, or a tuple
    ``(model, loss_fn, train, queries)``.

    Attributes:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        train: re-iterable of (ids, batch) training batches (``fit`` may pass over it twice).
        queries: iterable of (ids, batch) query batches, needed by ``score``.
        train_size: number of training examples, for progress ETAs (None: unknown).
    """

    model: nn.Module
    loss_fn: LossFn
    train: Batches
    queries: Batches | None = None
    train_size: int | None = None


def load_task(spec: str) -> Task:
    """Import ``package.module:function`` (the current directory is searched last) and call it.

    Raises:
        ValueError: malformed spec, module or function not found, or a result that is
            neither a Task nor a (model, loss_fn, train, queries) tuple.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # last, so an installed package is never shadowed by a folder here
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}")
    result = factory()
    if isinstance(result, tuple) and len(result) == 4:
        result = Task(*result)
    if not isinstance(result, Task):
        raise ValueError(f"--model {spec!r}: the factory must return an airtrace.Task or a tuple "
                         f"(model, loss_fn, train, queries), got {type(result).__name__}")
    return result
