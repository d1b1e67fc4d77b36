"""What a ``--model`` factory returns for the CLI (``Task``) and how it is loaded (``load_task``); imports
``airtrace.attribute.config`` and ``.batches``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from airtrace.attribute.batches import Batches
from airtrace.attribute.config import LossFn


@dataclass
class Task:
    """What a model factory returns for the CLI (``airtrace featurize|fit|score --model pkg.module:function``).

    The factory is called with the ``--model-arg KEY=VALUE`` pairs as keyword
    arguments (none by default). It may return a Task, or a tuple
    ``(model, loss_fn, train, queries)``.

    Attributes:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        train: training batches, re-iterable (``fit`` may pass over it twice): (ids, batch)
            pairs, a DataLoader or a dataset (see :func:`airtrace.as_batches`).
        queries: query batches (the same kinds), used by ``score`` without ``--queries``.
        train_size: number of training examples, for progress ETAs (None: the length of a
            DataLoader / dataset / list when it has one).
        query_loss_fn: per-example losses of queries (default ``loss_fn``).
        format_queries: JSON records -> one batch, for ``score --queries FILE`` (a line of a
            text file becomes ``{"text": line}``); default :func:`airtrace.attribute.batches.collate_records`.
        describe: example id (training or query) -> its text, or ``{"text", "label"}``, shown in
            the scores file and the report.
        decode: token ids -> one string per token, for per-token scores (``score --tokens``).
    """

    model: nn.Module
    loss_fn: LossFn
    train: Batches
    queries: Batches | None = None
    train_size: int | None = None
    query_loss_fn: LossFn | None = None
    format_queries: Callable[[Sequence[Mapping]], Any] | None = None
    describe: Callable[[Any], Any] | None = None
    decode: Callable[[list[int]], list[str]] | None = None


def load_task(spec: str, kwargs: Mapping[str, Any] | None = None) -> Task:
    """Import ``package.module:function`` (the current directory is searched last) and call it with ``kwargs``.

    Raises:
        ValueError: malformed spec, module or function not found, arguments it does not take,
            or a result that is neither a Task nor a (model, loss_fn, train, queries) tuple.
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
    kwargs = dict(kwargs or {})
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"--model {spec!r}: the factory cannot be called with the --model-arg values {kwargs} "
                         f"({exc})") from None
    except ValueError:  # no signature (a builtin): just call it
        pass
    result = factory(**kwargs)
    if isinstance(result, tuple) and len(result) == 4:
        result = Task(*result)
    if not isinstance(result, Task):
        raise ValueError(f"--model {spec!r}: the factory must return an airtrace.Task or a tuple "
                         f"(model, loss_fn, train, queries), got {type(result).__name__}")
    return result
