#!/usr/bin/env python
"""Overhead of training-time capture on the demo model: fine-tuning SmolLM2-135M on chatterbot pairs with and without
:class:`airtrace.CheckpointCapture`.

Both runs start from the same weights and take the same batches in the same order
(full fine-tuning, AdamW, learning rate 1e-5 decaying linearly, the demo's loss: the
answer tokens' cross-entropy, averaged over the batch's tokens). The capture
featurizes the training pairs with the demo's layers and projection (LoGra 16 x 16
on the last six decoder layers) at the end of the last ``--checkpoints`` epochs.
The runs alternate (plain, capture, plain, capture, ... ``--repeats`` times) in one
process and the median of each is reported: seconds per run, the overhead
``capture / plain - 1``, and one checkpoint's cost relative to one training epoch
(the overhead of any other schedule is about checkpoints x that / epochs).

    python benches/bench_capture.py --quick                 # 32 pairs, 1 epoch, writes nothing
    python benches/bench_capture.py                          # 160 pairs, 3 epochs, 1 checkpoint -> capture.csv
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from airtrace import Attributor, CheckpointCapture  # noqa: E402
from airtrace import data  # noqa: E402
from airtrace.demo import run as demo  # noqa: E402
from airtrace.demo.models import load_smollm2  # noqa: E402

COLUMNS = ("run", "seconds", "capture_seconds", "overhead_pct", "checkpoint_per_epoch_pct", "n_train", "epochs",
           "checkpoints", "repeats")


def finetune(model, batches, initial, epochs: int, capture_epochs: int, attributor, workdir: str | None
             ) -> tuple[float, float]:
    """One fine-tuning run from ``initial`` weights; (wall seconds, of which capturing)."""
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    total = epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    capture = None
    if workdir is not None:
        steps = [e * len(batches) for e in range(epochs - capture_epochs + 1, epochs + 1)]
        capture = CheckpointCapture(attributor, batches, workdir, steps=steps)
    captured, step = 0.0, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        print(f"#   epoch {epoch + 1}/{epochs} at {time.perf_counter() - start:.0f} s", flush=True)
        for _, batch in batches:
            tokens = (batch["labels"][:, 1:] != -100).sum().clamp_min(1)
            loss = demo.loss_fn(model, batch).sum() / tokens
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if capture is not None:
                tick = time.perf_counter()
                capture.step(step, scheduler.get_last_lr()[0])
                captured += time.perf_counter() - tick
    return time.perf_counter() - start, captured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 pairs, 1 epoch, 1 repeat; write no CSV")
    parser.add_argument("--train", type=int, default=160, help="training pairs (default 160)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    parser.add_argument("--checkpoints", type=int, default=1, help="capture at the end of the last N epochs (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated pairs of runs (default 2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.checkpoints, args.repeats = 32, 1, 1, 1
    head = C.header(gpu=False)
    C.print_header(head, f"bench_capture: fine-tuning SmolLM2-135M on {args.train} chatterbot pairs, "
                         f"{args.epochs} epochs, capture at the last {args.checkpoints}")
    model, tokenizer = load_smollm2(log=lambda line: print(f"# {line}"))
    _, train = demo.split(args.train)
    batches = data.batches(train, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                           batch_size=demo.BATCH_SIZE, max_length=demo.MAX_LENGTH, pad_id=tokenizer.pad_token_id)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attributor = Attributor(model, demo.LAYERS, loss_fn=demo.loss_fn, projection=demo.PROJECTION,
                            curvature="identity")
    attributor.features(batches[0][1])  # untimed warm-up of both kinds of pass
    demo.loss_fn(model, batches[0][1]).sum().backward()
    model.zero_grad(set_to_none=True)
    plain, with_capture, captured = [], [], []
    for r in range(args.repeats):
        seconds, _ = finetune(model, batches, initial, args.epochs, args.checkpoints, attributor, None)
        plain.append(seconds)
        print(f"# repeat {r + 1}: plain {seconds:.1f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="airtrace-capture-") as workdir:
            seconds, spent = finetune(model, batches, initial, args.epochs, args.checkpoints, attributor, workdir)
        with_capture.append(seconds)
        captured.append(spent)
        print(f"# repeat {r + 1}: with capture {seconds:.1f} s ({spent:.1f} s capturing)", flush=True)
    head["load_avg"] += " -> " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    base, full, spent = (statistics.median(v) for v in (plain, with_capture, captured))
    per_epoch = base / args.epochs
    common = {"n_train": args.train, "epochs": args.epochs, "checkpoints": args.checkpoints, "repeats": args.repeats}
    rows = [{"run": "fine-tuning", "seconds": base, **common},
            {"run": "fine-tuning + capture", "seconds": full, "capture_seconds": spent,
             "overhead_pct": 100 * (full / base - 1),
             "checkpoint_per_epoch_pct": 100 * spent / args.checkpoints / per_epoch, **common}]
    C.print_table(rows, COLUMNS, title="median seconds per run; overhead = with capture / plain - 1")
    print(f"# load_avg {head['load_avg']}")
    if not args.quick:
        path = C.RESULTS / C.device_slug(head) / "capture.csv"
        C.write_csv(path, rows, COLUMNS, head)
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
