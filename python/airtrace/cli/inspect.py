"""``airtrace inspect``: a store's manifest summary, optionally verifying every shard; imports ``airtrace.store``."""

from __future__ import annotations

import argparse
import json
import os


def store_summary(store) -> str:
    """Human-readable manifest summary of a :class:`airtrace.store.Store`.

    The layer list of the projection record is shown with the layout (kind and
    d_out x d_in per block), not repeated under meta.
    """
    meta = json.loads(json.dumps(store.meta))
    projection = meta.get("projection") if isinstance(meta.get("projection"), dict) else {}
    specs = {spec.get("name"): spec for spec in projection.pop("layers", []) if isinstance(spec, dict)}
    sidecars = sorted(n for n in os.listdir(store.path) if n.startswith("sidecar-"))
    lines = [
        f"store        {store.path}",
        f"complete     {'yes' if store.complete else 'no (writer not closed; resume it)'}",
        f"rows         {len(store)} in {len(store.shards)} shards ({store.rows_per_shard} rows per shard)",
        f"dtype        {store.manifest['dtype']}",
        f"width        {store.width}",
        f"fingerprint  {store.fingerprint}",
        f"layout       {len(store.layout)} blocks",
        *(f"  {b.name}  {list(b.shape)}  {b.width}{_layer_text(specs.get(b.name))}" for b in store.layout),
        f"extras       {', '.join(store.extras) or 'none'}",
        f"sidecars     {', '.join(sidecars) or 'none'}",
        "meta         " + json.dumps(meta, indent=2, sort_keys=True).replace("\n", "\n             "),
    ]
    return "\n".join(lines)


def _layer_text(spec: dict | None) -> str:
    if spec is None:
        return ""
    tied = ", ".join(name for name, _ in spec.get("tied") or [])
    return (f"  ({spec.get('kind')} {spec.get('d_out')}x{spec.get('d_in')}{' +bias' if spec.get('bias') else ''}"
            f"{f', tied with {tied}' if tied else ''})")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from airtrace.store import Store

    store = Store.open(args.store, allow_incomplete=True)
    print(store_summary(store))
    if args.verify:
        store.verify()
        print(f"verified     {len(store.shards)} shards: headers, sizes, sha256 and ids match the manifest; sidecar "
              "checksums match")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace inspect``."""
    inspect = sub.add_parser("inspect", help="summarise a store's manifest; --verify checks every shard")
    inspect.add_argument("store", metavar="STORE", help="store directory")
    inspect.add_argument("--verify", action="store_true",
                         help="check every shard's header, size and sha256 and every sidecar's checksum")
    inspect.set_defaults(run=_cmd_inspect, parser=inspect)
