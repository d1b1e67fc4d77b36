"""Reading a store (``Store``): open and validate, stream shards with prefetch, read single rows, verify; imports the
other ``airtrace.store`` modules."""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from airtrace.store.sidecars import sidecar_path, verify_sidecars
from airtrace.store.errors import IncompleteStoreError, ShardError, StoreError
from airtrace.store.files import read_header
from airtrace.store.format import EXTRA_DTYPES, FEATURES, MANIFEST, ST_NAME, STORE_DTYPES, is_int, normalize_layout
from airtrace.store.manifest import ShardInfo, config_of, load_manifest, shard_infos
from airtrace.store.prefetch import CpuTransfer, CudaTransfer, prefetched
from airtrace.store.verify import check_header_matches, load_ids, verify_shard


class _LoadedShard(NamedTuple):
    info: ShardInfo
    tensors: dict[str, torch.Tensor]


def _readinto_all(f, buf: torch.Tensor, path: str) -> None:
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ShardError([(path, f"truncated: ended after {got} of {len(view)} data bytes")])
        got += n


def _load_shard(root: str, config: Mapping, info: ShardInfo, *, verify: bool, pin: bool,
                names: Sequence[str]) -> _LoadedShard:
    """Read one shard into CPU memory (pinned if asked), checking header and optionally sha256."""
    path = os.path.join(root, info.file)
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise ShardError([(path, "missing: the manifest lists it but the file does not exist")]) from None
    with f:
        header = read_header(path, f)
        check_header_matches(path, header, config, info)
        size = os.fstat(f.fileno()).st_size
        if size != info.nbytes:
            raise ShardError([(path, f"size is {size} bytes, the manifest says {info.nbytes}: truncated or replaced")])
        buf = torch.empty(size - header.data_start, dtype=torch.uint8, pin_memory=pin)
        f.seek(header.data_start)
        _readinto_all(f, buf, path)
    if verify:
        digest = hashlib.sha256(header.raw)
        digest.update(memoryview(buf.numpy()))
        if digest.hexdigest() != info.sha256:
            raise ShardError([(path, "sha256 mismatch: the content changed since it was written (flipped bytes?)")])
    tensors = {}
    for name in names:
        code, shape, (b, e) = header.tensors[name]
        dtype = EXTRA_DTYPES[ST_NAME[code]]
        raw = buf[b:e]
        if b % torch.empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # misaligned offsets (not written by airtrace): copy to realign
        tensors[name] = raw.view(dtype).view(shape)
    return _LoadedShard(info, tensors)


class ShardChunk(NamedTuple):
    """One streamed shard.

    Attributes:
        row_offset: global index of the first row.
        features: (rows, width) on the requested device/dtype.
        ids: the rows' example ids.
    """

    row_offset: int
    features: torch.Tensor
    ids: list


class Store:
    """Read-only view of a finished store; see the module docstring for the layout.

    Attributes:
        path: the store directory.
        manifest: the validated manifest dict.
        fingerprint: model fingerprint string the features belong to.
        layout: feature blocks (list of :class:`Block`), in column order.
        width: columns per row, ``sum(block.width)``.
        dtype: stored dtype (float32, bfloat16 or float16).
        rows_per_shard: rows in every shard but the last.
        meta: projection metadata given to the writer.
        shards: list of :class:`ShardInfo`.
    """

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.layout = normalize_layout(manifest["layout"])
        self.width: int = manifest["width"]
        self.dtype: torch.dtype = STORE_DTYPES[manifest["dtype"]]
        self.rows_per_shard: int = manifest["rows_per_shard"]
        self.meta: dict = manifest["meta"]
        self.extras: list[str] = [e["name"] for e in manifest["extras"]]
        self.complete: bool = manifest["complete"]
        self.shards = shard_infos(manifest)
        self._config = config_of(manifest)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_incomplete: bool = False) -> Store:
        """Open and validate a store (manifest only; shard files are checked when read or verified).

        Args:
            path: store directory.
            allow_incomplete: also open a store whose writer was not closed
                (only its full, committed shards are visible).

        Raises:
            ManifestError: bad manifest (names the file and field).
            IncompleteStoreError: the writer never finished and ``allow_incomplete`` is False.
        """
        path = os.fspath(path)
        manifest = load_manifest(path)
        if not manifest["complete"] and not allow_incomplete:
            raise IncompleteStoreError(
                f"{os.path.join(path, MANIFEST)}: the store is incomplete ({manifest['total_rows']} rows in "
                f"{len(manifest['shards'])} shards; its writer was not closed). Fix: resume it with StoreWriter "
                "and the same settings, or pass allow_incomplete=True to read the finished shards.")
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.manifest["total_rows"]

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, rows={len(self)}, width={self.width}, dtype={self.manifest['dtype']}, "
                f"shards={len(self.shards)}, blocks={len(self.layout)})")

    @property
    def ids(self) -> list:
        """All example ids in row order (reads ids files when there are any)."""
        return [i for info in self.shards for i in load_ids(self.path, info)]

    def content_key(self) -> str:
        """24 hex digits of sha256 over the fingerprint and every shard's sha256: names data derived from
        exactly these features (sidecar caches)."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for info in self.shards:
            digest.update(info.sha256.encode())
        return digest.hexdigest()[:24]

    def sidecar_path(self, name: str) -> str:
        """Path of the sidecar file ``sidecar-<name>.safetensors`` in the store directory.

        Sidecars hold data derived from the features (e.g. cached self-influence);
        they are not part of the manifest, and ``StoreWriter(..., overwrite=True)``
        deletes them with the store.
        """
        return sidecar_path(self.path, name)

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise :class:`StoreError` unless the store was written for ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise StoreError(f"{self.path}: the store holds features of model fingerprint {self.fingerprint!r}, "
                             f"not {fingerprint!r}. Fix: featurize this model into a new store.")

    def split(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split rows into the layout's blocks.

        Args:
            features: (..., width).

        Returns:
            name -> (..., *block.shape) views.
        """
        if features.shape[-1] != self.width:
            raise StoreError(f"features has {features.shape[-1]} columns, the store's layout has {self.width}")
        parts = torch.split(features, [b.width for b in self.layout], dim=-1)
        return {b.name: p.unflatten(-1, b.shape) for b, p in zip(self.layout, parts)}

    def verify(self) -> None:
        """Check every shard's header (dtype/shape vs manifest), size and sha256, every ids file, and every
        sidecar's checksum (the manifest's own checksum was checked on open).

        Ids are also checked to be unique across the store.

        Raises:
            ShardError: listing every bad shard or ids file (``.problems``).
            SidecarError: listing every bad sidecar (when the shards are good).
        """
        problems: list[tuple[str, str]] = []
        seen: set = set()
        for info in self.shards:
            try:
                verify_shard(self.path, self._config, info)
                ids = load_ids(self.path, info)
            except ShardError as exc:
                problems.extend(exc.problems)
                continue
            dupes = seen.intersection(ids)
            if dupes or len(set(ids)) != len(ids):
                problems.append((os.path.join(self.path, MANIFEST),
                                 f"shard {info.file} repeats example ids, e.g. {sorted(map(str, dupes))[:3]}"))
            seen.update(ids)
        if problems:
            raise ShardError(problems)
        verify_sidecars(self.path)

    def iter_shards(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, prefetch: int = 1,
                    *, verify: bool = True, extras: Sequence[str] = ()) -> Iterator[tuple]:
        """Stream the shards in order, one at a time.

        A background thread reads up to ``prefetch`` shards ahead (header check,
        sha256 when ``verify``), so about ``prefetch + 2`` shards are in memory
        at most (the one being read, the prefetched ones, and the previous one
        while the consumer's loop variable still holds it). For a CUDA ``device`` it reads into pinned memory and copies
        with ``non_blocking`` on a side stream; the consumer's current stream
        waits on that copy before the shard is yielded.

        Args:
            device: where ``features`` should live.
            dtype: convert features to this dtype (after the copy); None keeps
                the stored dtype.
            prefetch: shards to read ahead; 0 reads synchronously.
            verify: check each shard's sha256 while reading.
            extras: names of extra per-row tensors to yield as well.

        Yields:
            :class:`ShardChunk` ``(row_offset, features (rows, width), ids)``;
            with ``extras``, 4-tuples ``(row_offset, features, ids, {name: (rows, ...)})``.

        Raises:
            ShardError: a shard is missing, truncated, corrupt or foreign (names the file).
        """
        unknown = [n for n in extras if n not in self.extras]
        if unknown:
            raise StoreError(f"unknown extras {unknown}; the store holds {self.extras}")
        if not is_int(prefetch) or prefetch < 0:
            raise StoreError(f"prefetch must be an int >= 0, got {prefetch!r}")
        device = torch.device(device)
        names = (FEATURES, *extras)
        transfer = CudaTransfer(device, dtype) if device.type == "cuda" else CpuTransfer(device, dtype)
        return self._stream(transfer, prefetch, verify, names)

    def _stream(self, transfer, prefetch: int, verify: bool, names: tuple[str, ...]) -> Iterator[tuple]:
        extras = names[1:]

        def load(info: ShardInfo):
            shard = _load_shard(self.path, self._config, info, verify=verify, pin=transfer.pin, names=names)
            return info, transfer.send(shard.tensors), load_ids(self.path, info)

        items = prefetched(load, self.shards, prefetch) if prefetch else map(load, self.shards)
        for info, tensors, ids in items:
            tensors = transfer.receive(tensors)
            chunk = ShardChunk(info.row_start, tensors[FEATURES], ids)
            yield chunk if not extras else (*chunk, {n: tensors[n] for n in extras})

    def read_rows(self, indices: Sequence[int] | torch.Tensor, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, list]:
        """Read a few rows by global index, touching only those bytes (no sha256 check).

        Args:
            indices: row indices in ``[0, len(store))``.
            dtype: convert to this dtype; None keeps the stored dtype.

        Returns:
            (features (len(indices), width), ids) in the order asked.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        n = len(self)
        bad = [i for i in indices if not is_int(i) or not 0 <= i < n]
        if bad:
            raise StoreError(f"row indices out of range [0, {n}) or not ints: {bad[:5]}")
        out = torch.empty(len(indices), self.width, dtype=self.dtype)
        ids: list = [None] * len(indices)
        starts = [s.row_start for s in self.shards]
        by_shard: dict[int, list[int]] = {}
        for pos, row in enumerate(indices):
            by_shard.setdefault(bisect.bisect_right(starts, row) - 1, []).append(pos)
        row_bytes = self.width * out.element_size()
        for s, positions in by_shard.items():
            info = self.shards[s]
            path = os.path.join(self.path, info.file)
            shard_ids = load_ids(self.path, info)
            with open(path, "rb", buffering=0) as f:
                header = read_header(path, f)
                check_header_matches(path, header, self._config, info)
                base = header.data_start + header.tensors[FEATURES][2][0]
                for pos in positions:
                    local = indices[pos] - info.row_start
                    f.seek(base + local * row_bytes)
                    _readinto_all(f, out[pos].view(torch.uint8), path)
                    ids[pos] = shard_ids[local]
        return (out if dtype is None else out.to(dtype)), ids
