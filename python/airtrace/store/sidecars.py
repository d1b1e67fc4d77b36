"""Sidecars: files of data derived from a store's features (``sidecar-<name>.safetensors`` beside its shards), named
after the exact features they derive from; imports only ``airtrace.store.errors``.

A sidecar is not part of the manifest; ``StoreWriter(..., overwrite=True)`` deletes it
with the store. The named ones:

- ``sidecar-kfac-sums-<content key>``: the K-FAC factor sums a featurize accumulated
  while writing the whole store (see ``airtrace.attribute``);
- ``sidecar-self_influence-<key>``: the self-influence of every row under one
  curvature (see ``airtrace.scoring``).
"""

from __future__ import annotations

import os
import re

from airtrace.store.errors import SidecarError, StoreError
from airtrace.util.checked_file import load_checked

SIDECAR_RE = re.compile(r"^sidecar-[A-Za-z0-9_.\-]+\.safetensors(?:\.\d+\.tmp)?$")
"""Sidecar files and their temp files (which an overwrite deletes too)."""
SELF_INFLUENCE = "self_influence"


def sidecar_path(directory: str, name: str) -> str:
    """Path of the sidecar ``sidecar-<name>.safetensors`` of the store in ``directory``.

    Raises:
        StoreError: ``name`` holds other characters than letters, digits, '_', '.' or '-'.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise StoreError(f"sidecar name must be letters, digits, '_', '.' or '-', got {name!r}")
    return os.path.join(directory, f"sidecar-{name}.safetensors")


def kfac_sidecar(store) -> str:
    """Path of the store's K-FAC sidecar: the factor sums a featurize that wrote all of ``store`` accumulated,
    named by :meth:`airtrace.store.Store.content_key` (so it never applies to other features)."""
    return store.sidecar_path(f"kfac-sums-{store.content_key()}")


def self_influence_sidecar(store, key: str) -> str:
    """Path of the cached self-influence of ``store`` (a :class:`airtrace.store.Store`) under the curvature that
    ``key`` names."""
    return store.sidecar_path(f"{SELF_INFLUENCE}-{key}")


def verify_sidecars(directory: str) -> None:
    """Check the checksum of every sidecar in the store directory ``directory``.

    Raises:
        SidecarError: naming every bad sidecar and what is wrong with it.
    """
    problems = []
    for name in sorted(os.listdir(directory)):
        if SIDECAR_RE.match(name) and name.endswith(".safetensors"):
            try:
                load_checked(os.path.join(directory, name), None, "an airtrace sidecar")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise SidecarError("\n".join(problems) + "\nFix: delete the bad sidecar; airtrace computes its data again "
                           "when it needs it")
