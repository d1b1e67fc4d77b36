"""Per-example projected gradients of SmolLM2 on chatterbot pairs: airtrace, plain torch and peers.

Every ``featurize_<method>(setup, workdir)`` runs one method over ``setup.batches`` (the same
length-sorted, right-padded batches for all) and writes its features to ``workdir``; the caller
times the whole call. Every method differentiates the same per-example loss (summed cross-entropy
of the answer tokens) w.r.t. the same tracked layers, with k_in = k_out = ``setup.k`` per layer:

- ``airtrace``: :meth:`airtrace.attribute.Attributor.featurize` (hooks + the compiled
  ``project_factored`` kernel) into a float32 store.
- ``torch``: plain-torch hooks capturing A and G, the per-example weight gradient
  ``einsum("bto,bti->boi", G, A)`` per layer, then ``P_out^T g P_in`` with airtrace's P matrices;
  rows appended to a raw float32 file.
- ``logix``: LogIX 0.1.1 LoGra (random-init LoRA encoder/decoder of rank k around every tracked
  layer, per-example gradient of the k x k bottleneck), logs saved to its mmap files.
- ``bergson``: bergson 2.5.1 ``collect_gradients`` with ``projection_dim=k`` (per-module two-sided
  Rademacher projection), index written to disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from airtrace.attribute import Attributor
from airtrace.capture import make_projections, per_example_loss, select_layers
from airtrace import data
from airtrace.demo.run import LAYERS, loss_fn, split

MAX_LENGTH = 64
BATCH_SIZE = 16


def full_logits_loss(model, batch) -> torch.Tensor:
    """The demo's loss as a peer's user writes it: the logits of every position, then the answer tokens' summed
    cross-entropy (airtrace's ``loss_fn`` gives the same losses from the answer positions' logits only)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_loss(logits, batch["labels"], "causal_lm")


@dataclass
class Setup:
    """The model, tracked layers and batches shared by every method."""

    model: torch.nn.Module
    tokenizer: object
    layers: list[str]              # tracked module names (full names in model.named_modules())
    batches: list                   # (ids, {"input_ids", "attention_mask", "labels"}) pairs
    k: int
    fixed_shape: bool = False       # every batch padded to MAX_LENGTH, and run so (no length buckets)

    @property
    def n_examples(self) -> int:
        return sum(len(ids) for ids, _ in self.batches)

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens fed through the model."""
        return int(sum(int(b["attention_mask"].sum()) for _, b in self.batches))


def _pad_to(batch: dict, width: int) -> dict:
    """Right-pad a batch to ``width`` tokens (padding masked out, label -100)."""
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {key: torch.nn.functional.pad(batch[key], (0, width - batch[key].shape[1]), value=pads[key])
            for key in pads}


def make_setup(n: int, k: int = 16, with_queries: bool = False, pad_to_max: bool = False) -> Setup:
    """SmolLM2 (tracked layers trainable, everything else frozen) and ``n`` training pairs in batches.

    With ``with_queries`` the demo's held-out query pairs come first, in their own batch. With
    ``pad_to_max`` every batch is padded to MAX_LENGTH tokens (all batches the same shape, so peak
    memory cannot depend on which pairs a dataset size happens to include), and airtrace runs them
    as they are (no length buckets).
    """
    from airtrace.demo.models import load_smollm2

    model, tokenizer = load_smollm2(log=lambda _: None)
    queries, train = split(n)
    train = train[:n]
    layers = [spec.name for spec in select_layers(model, LAYERS)]
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in layers:
        modules[name].weight.requires_grad_(True)

    def tokenize(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(pairs):
        return data.batches(pairs, tokenize, batch_size=BATCH_SIZE, max_length=MAX_LENGTH,
                            pad_id=tokenizer.pad_token_id)

    batches = (encode(queries) if with_queries else []) + encode(train)
    if pad_to_max:
        batches = [(ids, _pad_to(batch, MAX_LENGTH)) for ids, batch in batches]
    return Setup(model, tokenizer, layers, batches, k, fixed_shape=pad_to_max)


def warm_up(setup: Setup) -> None:
    """One plain forward + backward on the first batch (thread pools, allocator)."""
    setup.model.zero_grad(set_to_none=True)
    loss_fn(setup.model, setup.batches[0][1]).sum().backward()
    setup.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- airtrace


def attributor(setup: Setup, **kwargs) -> Attributor:
    return Attributor(setup.model, setup.layers, loss_fn=loss_fn,
                      projection={"type": "factored", "k_in": setup.k, "k_out": setup.k, "seed": 0}, **kwargs)


def featurize_airtrace(setup: Setup, workdir: str) -> torch.Tensor | None:
    attributor(setup, trim_padding=not setup.fixed_shape).featurize(setup.batches, os.path.join(workdir, "store"),
                                                                    dtype="float32", progress=False)
    return None


def read_airtrace(workdir: str) -> tuple[list, torch.Tensor]:
    from airtrace.store import Store

    store = Store.open(os.path.join(workdir, "store"))
    return list(store.ids), torch.cat([chunk.features for chunk in store.iter_shards()])


# --------------------------------------------------------------------------- plain torch


class TorchLoGra:
    """Hooks capturing A and G; per-example einsum outer products, then the same P matrices."""

    def __init__(self, setup: Setup):
        specs = select_layers(setup.model, setup.layers)
        self.projections = make_projections(specs, setup.k, setup.k, 0)
        self.modules = {name: m for name, m in setup.model.named_modules() if name in set(setup.layers)}
        self.saved: dict[str, torch.Tensor] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._forward(name)) for name, m in self.modules.items()]

    def _forward(self, name):
        def hook(module, args, output):
            A = args[0].detach()

            def on_grad(G):
                m = self.mask[:, :, None].to(G.dtype)
                grad = torch.einsum("bto,bti->boi", G * m, A)            # (B, d_out, d_in) per example
                p_in, p_out = self.projections[name]
                self.features[name] = (p_out.T @ grad @ p_in).flatten(1)  # (B, k_out * k_in)

            output.register_hook(on_grad)

        return hook

    def batch_features(self, model, batch) -> torch.Tensor:
        self.mask = batch["attention_mask"]
        self.features = {}
        losses = full_logits_loss(model, batch)
        torch.autograd.grad(losses.sum(), [m.weight for m in self.modules.values()])
        return torch.cat([self.features[name] for name in self.modules], dim=1)

    def close(self):
        for h in self.handles:
            h.remove()


def featurize_torch(setup: Setup, workdir: str) -> None:
    cap = TorchLoGra(setup)
    ids = []
    with open(os.path.join(workdir, "features.f32"), "wb") as f:
        for batch_ids, batch in setup.batches:
            f.write(cap.batch_features(setup.model, batch).numpy().tobytes())
            ids += batch_ids
    cap.close()
    with open(os.path.join(workdir, "ids.txt"), "w") as f:
        f.write("\n".join(ids))


def read_torch(workdir: str) -> tuple[list, torch.Tensor]:
    import numpy as np

    ids = open(os.path.join(workdir, "ids.txt")).read().split("\n")
    X = torch.from_numpy(np.fromfile(os.path.join(workdir, "features.f32"), dtype=np.float32))
    return ids, X.reshape(len(ids), -1)


# --------------------------------------------------------------------------- logix


def featurize_logix(setup: Setup, workdir: str) -> None:
    from logix import LogIX
    from logix.config import LoRAConfig

    cwd = os.getcwd()
    os.chdir(workdir)  # LogIX writes under ./logix/<project>
    try:
        run = LogIX(project="bench")
        run.watch(setup.model, name_filter=setup.layers)
        run.add_lora(lora_config=LoRAConfig(init="random", rank=setup.k))
        run.setup({"grad": ["log"]})
        run.save(True)
        for ids, batch in setup.batches:
            with run(data_id=ids, mask=batch["attention_mask"]):
                setup.model.zero_grad(set_to_none=True)
                full_logits_loss(setup.model, batch).sum().backward()
        run.finalize()
    finally:
        os.chdir(cwd)


def read_logix(workdir: str, setup: Setup) -> tuple[list, torch.Tensor]:
    """LogIX's logged bottleneck gradients, layers in ``setup.layers`` order."""
    from logix.logging.log_loader import LogDataset

    dataset = LogDataset(log_dir=os.path.join(workdir, "logix", "bench"), flatten=False)
    ids, rows = [], []
    for i in range(len(dataset)):
        data_id, log = dataset[i]
        ids.append(data_id)
        blocks = []
        for name in setup.layers:
            key = next(k for k in log if k.startswith(name + ".") and k.endswith("logix_lora_B"))
            blocks.append(torch.as_tensor(log[key]["grad"]).flatten())
        rows.append(torch.cat(blocks))
    return ids, torch.stack(rows)


# --------------------------------------------------------------------------- bergson


def _bergson_inputs(setup: Setup):
    from datasets import Dataset

    rows, batches = {"input_ids": [], "labels": [], "id": []}, []
    for ids, batch in setup.batches:
        start = len(rows["id"])
        for b, example_id in enumerate(ids):
            length = int(batch["attention_mask"][b].sum())
            rows["input_ids"].append(batch["input_ids"][b, :length].tolist())
            rows["labels"].append(batch["labels"][b, :length].tolist())
            rows["id"].append(example_id)
        batches.append(list(range(start, len(rows["id"]))))
    return Dataset.from_dict(rows), batches


def featurize_bergson(setup: Setup, workdir: str) -> None:
    from bergson import GradientProcessor, IndexConfig, collect_gradients

    dataset, batches = _bergson_inputs(setup)
    prefix = setup.model.base_model_prefix + "."
    cfg = IndexConfig(run_path=os.path.join(workdir, "bergson"), projection_dim=setup.k, loss_reduction="sum",
                      projection_type="normal")
    os.makedirs(cfg.partial_run_path, exist_ok=True)
    processor = GradientProcessor(projection_dim=setup.k, projection_type="normal", projection_seed=0)
    collect_gradients(setup.model, dataset, processor, cfg, batches=batches,
                      target_modules={name.removeprefix(prefix) for name in setup.layers})


def read_bergson(workdir: str, setup: Setup) -> tuple[list, torch.Tensor]:
    from bergson import load_module_gradients

    dataset, _ = _bergson_inputs(setup)
    grads = load_module_gradients(os.path.join(workdir, "bergson.part"))  # collect_gradients leaves the run here
    prefix = setup.model.base_model_prefix + "."
    blocks = [torch.as_tensor(grads[name.removeprefix(prefix)].astype("float32")).reshape(len(dataset), -1)
              for name in setup.layers]
    return list(dataset["id"]), torch.cat(blocks, dim=1)


FEATURIZE = {"airtrace": featurize_airtrace, "torch": featurize_torch, "logix": featurize_logix,
             "bergson": featurize_bergson}


def exact_inner_products(setup: Setup, n_queries: int) -> torch.Tensor:
    """Unprojected gradient inner products sum_layers <g_q, g_x>, float64 (n_queries, n_train).

    The first ``n_queries`` examples of ``setup.batches`` are the queries (their per-layer
    weight gradients are kept, float32); every later batch is reduced against them at once.
    """
    cap = TorchLoGra(setup)
    cap.close()
    queries: dict[str, list[torch.Tensor]] = {name: [] for name in setup.layers}
    out: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            A = args[0].detach()

            def on_grad(G):
                g = torch.einsum("bto,bti->boi", G * cap.mask[:, :, None].to(G.dtype), A).flatten(1)
                if cap.in_queries:
                    queries[name].append(g)
                else:
                    out[name] = g.double() @ torch.cat(queries[name]).double().T

            output.register_hook(on_grad)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in cap.modules.items()]
    seen, blocks = 0, []
    for ids, batch in setup.batches:
        cap.mask, cap.in_queries = batch["attention_mask"], seen < n_queries
        losses = loss_fn(setup.model, batch)
        torch.autograd.grad(losses.sum(), [m.weight for m in cap.modules.values()])
        if not cap.in_queries:
            blocks.append(sum(out[name] for name in setup.layers))
        seen += len(ids)
    for h in handles:
        h.remove()
    return torch.cat(blocks).T


def per_query_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of rows of a and b (q, n) -> (q,)."""
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))




# --------------------------------------------------------------------------- EK-FAC pipelines (fit + score)


def ekfac_airtrace(setup: Setup, workdir: str, n_queries: int) -> torch.Tensor:
    """airtrace LoGra + EK-FAC: featurize the training batches, fit (K-FAC pass + eigenvalue
    correction over the store), score the queries; returns the (q, n) influence matrix."""
    query_batches, train_batches = _split_batches(setup, n_queries)
    att = attributor(setup, curvature="ekfac")
    store = att.featurize(train_batches, os.path.join(workdir, "store"), dtype="float32", progress=False)
    att.fit(train_batches, store=store, progress=False)
    n = len(store)
    scores = att.score(query_batches, store, topk=n, progress=False)
    full = torch.empty(scores.values.shape[0], n, dtype=torch.float64)
    full.scatter_(1, scores.indices, scores.values.double())
    return full


def _split_batches(setup: Setup, n_queries: int) -> tuple[list, list]:
    seen, cut = 0, 0
    while seen < n_queries:
        seen += len(setup.batches[cut][0])
        cut += 1
    if seen != n_queries:
        raise ValueError(f"the first batches hold {seen} examples, not the {n_queries} queries")
    return setup.batches[:cut], setup.batches[cut:]


class _Examples(torch.utils.data.Dataset):
    """One example per item (unpadded), in the order of the batches."""

    def __init__(self, batches):
        self.items = []
        for _, batch in batches:
            for b in range(batch["input_ids"].shape[0]):
                length = int(batch["attention_mask"][b].sum())
                self.items.append({key: batch[key][b, :length] for key in ("input_ids", "attention_mask", "labels")})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pad_collate(items):
    """Right-pad to the longest item, as :func:`airtrace.data.encode` does."""
    width = max(item["input_ids"].shape[0] for item in items)
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {key: torch.stack([torch.nn.functional.pad(item[key], (0, width - item[key].shape[0]), value=value)
                              for item in items]) for key, value in pads.items()}


def ekfac_kronfluence(setup: Setup, workdir: str, n_queries: int, strategy: str = "ekfac") -> torch.Tensor:
    """kronfluence 1.0.1 EK-FAC (full, unprojected layer space; empirical Fisher as airtrace;
    damping None = 0.1 x mean eigenvalue): fit_all_factors, then compute_pairwise_scores; (q, n)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    layers = setup.layers

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return full_logits_loss(model, batch).sum()

        def compute_measurement(self, batch, model):
            return full_logits_loss(model, batch).sum()

        def get_influence_tracked_modules(self):
            return layers

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    query_batches, train_batches = _split_batches(setup, n_queries)
    task = LMTask()
    model = prepare_model(setup.model, task)
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, output_dir=workdir,
                        disable_tqdm=True, disable_model_save=True)
    loader = DataLoaderKwargs(collate_fn=_pad_collate, num_workers=0)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True)
    train, queries = _Examples(train_batches), _Examples(query_batches)
    analyzer.fit_all_factors("f", train, per_device_batch_size=BATCH_SIZE, dataloader_kwargs=loader,
                             factor_args=factor_args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=len(queries),
                                     per_device_train_batch_size=BATCH_SIZE, dataloader_kwargs=loader,
                                     score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("s")["all_modules"].double()
