"""Benchmark task: a small GPT-style causal LM trained from scratch on chatterbot-corpus Q -> A pairs; imports
``airtrace.capture``, ``airtrace.data`` and ``airtrace.util``.

Data: the pairs of the ``chatterbot-corpus`` package without verbatim repeats
(:func:`airtrace.data.unique`), in the instruction format of
:mod:`airtrace.data` ("Question: <q>\\nAnswer: <a>", loss on the answer
tokens only). A seeded permutation splits them into ``n_query`` held-out query
pairs and a training pool of ``n_train`` pairs.

Tokenizer: :class:`WordTokenizer`, lower-cased words, numbers and punctuation
marks (regex ``[a-z0-9]+|[^a-z0-9\\s]``); the vocabulary holds every token seen
at least ``min_count`` times in the whole corpus, ordered by count then text, so
it is the same on every machine and nothing is downloaded.

Model: :class:`GPT`, token + position embeddings, ``n_layer`` pre-norm blocks
(causal self-attention with ``attn.qkv`` / ``attn.proj`` and an MLP with
``mlp.fc`` / ``mlp.proj``, all nn.Linear), a final LayerNorm and an untied
``lm_head``; no dropout, so a model in eval mode treats examples independently.

Training (:meth:`LMTask.train_fn`): AdamW, linear warm-up then cosine decay,
``epochs`` passes over the chosen pairs; the batch loss is the sum of
answer-token cross-entropies over the number of answer tokens in the batch, so
every example enters it through its summed answer loss (:meth:`LMTask.loss_fn`,
the loss the attribution differentiates). The initial weights come from
``init_seed`` and the example order from ``order_seed`` when they are set (the
same start and the same relative order of shared examples for every subset
model: less training noise in the ground truth), else from the training seed.
Every epoch draws a permutation of the whole pool and keeps the chosen pairs.
Training runs in float32 on one CPU thread (a model this small gains nothing
from intra-op threads, and the result does not depend on the thread count)
with seeded generators: an (indices, seed) pair gives the same weights every
time in one environment.

Measure (:meth:`LMTask.measure_fn`): per query pair the negative mean
answer-token loss (higher = the query is fit better), float64.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from airtrace.util.checks import positive_int_fields
from airtrace.capture import IGNORE_INDEX, per_example_loss
from airtrace import data
from airtrace.data import Pair

PAD, UNK = "<pad>", "<unk>"
TOKEN_PATTERN = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
INIT_STD = 0.02
EVAL_BATCH = 128

SIZES = {
    "tiny": dict(d_model=32, n_layer=1, n_head=2, epochs=8, n_train=240, n_query=64),
    "default": {},
    "large": dict(d_model=128, n_layer=4, n_head=4, epochs=16),
}
"""Size presets for :func:`lm_config`: overrides of the :class:`LMConfig` defaults."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LMConfig:
    """Everything that decides the task's data split, model and training run.

    Attributes:
        n_train: training pool size (pairs).
        n_query: held-out query pairs.
        split_seed: seed of the permutation that picks the queries and the pool.
        min_count: a token enters the vocabulary when it occurs this often in the corpus.
        max_length: most tokens per example (prompt keeps at most half).
        d_model: embedding width.
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``d_model``).
        mlp_ratio: MLP hidden width over ``d_model``.
        epochs: passes over the training pairs.
        batch_size: pairs per optimizer step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup: fraction of the steps with a linear learning-rate warm-up.
        init_seed: seed of the initial weights for every model; None draws them
            from the training seed.
        order_seed: seed of the example order of every model; None draws it
            from the training seed.
        seed: training seed of the full-data model.
    """

    n_train: int = 800
    n_query: int = 64
    split_seed: int = 0
    min_count: int = 2
    max_length: int = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    init_seed: int | None = 0
    order_seed: int | None = 0
    seed: int = 0

    def __post_init__(self):
        positive_int_fields(self, ("n_train", "n_query", "min_count", "max_length", "d_model", "n_layer",
                                   "n_head", "mlp_ratio", "epochs", "batch_size"))
        if self.max_length < 4:
            raise ValueError(f"LMConfig.max_length must be >= 4, got {self.max_length}")
        if self.d_model % self.n_head:
            raise ValueError(f"LMConfig.d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.warmup < 1):
            raise ValueError(f"LMConfig needs lr > 0, weight_decay >= 0 and 0 <= warmup < 1, got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, warmup={self.warmup}")

    def as_dict(self) -> dict:
        """JSON-able config, tagged with the task name (the cache key)."""
        return {"task": "lm", **asdict(self)}


def lm_config(size: str = "default", **overrides) -> LMConfig:
    """An :class:`LMConfig` from a size preset of :data:`SIZES` plus field overrides.

    Raises:
        ValueError: unknown size or field.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    fields = set(LMConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LMConfig fields {unknown}; fields: {sorted(fields)}")
    return LMConfig(**{**SIZES[size], **overrides})


# --------------------------------------------------------------------------- tokenizer


def words(text: str) -> list[str]:
    """Lower-cased word, number and punctuation tokens of ``text``."""
    return TOKEN_PATTERN.findall(text.lower())


@dataclass
class WordTokenizer:
    """Word-level tokenizer with a vocabulary built from texts; id 0 pads, id 1 is unknown.

    Attributes:
        vocab: tokens by id; ``vocab[0] = "<pad>"``, ``vocab[1] = "<unk>"``.
    """

    vocab: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        if self.vocab[:2] != [PAD, UNK]:
            raise ValueError(f"vocab must start with {PAD!r}, {UNK!r}, got {self.vocab[:2]}")
        self.index = {token: i for i, token in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """Tokens seen at least ``min_count`` times, most frequent first (ties by text)."""
        counts = Counter(token for text in texts for token in words(text))
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls([PAD, UNK, *kept])

    @property
    def pad_id(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str) -> list[int]:
        """Token ids of ``text`` (unknown tokens -> 1)."""
        return [self.index.get(token, 1) for token in words(text)]


# --------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``proj(softmax(q k^T / sqrt(d_h) + causal) v)``."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        heads = [t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """``proj(gelu(fc(x)))``."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT: ``lm_head(ln_f(blocks(wte[ids] + wpe[positions])))``.

    Args:
        vocab_size: tokens in the vocabulary.
        max_length: longest sequence (position embeddings).
        d_model: width.
        n_layer: blocks.
        n_head: attention heads.
        mlp_ratio: MLP hidden width over ``d_model``.
        generator: draws the initial weights, N(0, 0.02) for matrices and
            embeddings (residual output projections scaled by 1/sqrt(2 n_layer)),
            zero biases, LayerNorms at (1, 0).
    """

    def __init__(self, vocab_size: int, max_length: int, d_model: int, n_layer: int, n_head: int,
                 mlp_ratio: int = 4, generator: torch.Generator | None = None):
        super().__init__()
        self.max_length = max_length
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, mlp_ratio) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 2:
                    std = INIT_STD / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else INIT_STD
                    p.normal_(0.0, std, generator=generator)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, d_model) float32 of ids (B, T) int64, T <= max_length (before ``lm_head``)."""
        B, T = input_ids.shape
        if T > self.max_length:
            raise ValueError(f"input_ids has {T} tokens, the model takes at most {self.max_length}")
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) float32 of ids (B, T) int64, T <= max_length."""
        return self.lm_head(self.hidden(input_ids))


# --------------------------------------------------------------------------- the task


def answer_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer-token cross-entropy (B,) and answer-token counts (B,) of one encoded batch."""
    losses = per_example_loss(model(batch["input_ids"]), batch["labels"], "causal_lm")
    return losses, (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


class LMTask:
    """The chatterbot causal-LM benchmark: data split, tokenizer, ``train_fn`` and ``measure_fn``.

    Args:
        config: an :class:`LMConfig` (default: the "default" size).
        pairs: the corpus; default :func:`airtrace.data.chatterbot_pairs` without repeats.

    Attributes:
        config: the configuration.
        tokenizer: the :class:`WordTokenizer` built from every pair of the corpus.
        train: the training pool, ``n_train`` pairs (index i is training example i).
        queries: the ``n_query`` held-out query pairs.

    Raises:
        ValueError: the corpus has fewer than ``n_train + n_query`` pairs.
    """

    name = "lm"

    def __init__(self, config: LMConfig | None = None, pairs: Sequence[Pair] | None = None):
        self.config = config or LMConfig()
        pairs = data.unique(data.chatterbot_pairs() if pairs is None else pairs)
        need = self.config.n_train + self.config.n_query
        if len(pairs) < need:
            raise ValueError(f"the corpus has {len(pairs)} distinct pairs, n_train + n_query = {need}")
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.config.split_seed)).tolist()
        self.queries = [pairs[i] for i in order[: self.config.n_query]]
        self.train = [pairs[i] for i in order[self.config.n_query : need]]
        texts = (text for pair in pairs for text in data.format_example(pair["question"], pair["answer"]))
        self.tokenizer = WordTokenizer.build(texts, self.config.min_count)
        self._train_encoded = self._encode_each(self.train)

    @property
    def n_train(self) -> int:
        """Training pool size."""
        return len(self.train)

    @property
    def config_dict(self) -> dict:
        """JSON-able config (the cache key of the ground truth)."""
        return self.config.as_dict()

    # -- data

    def _encode_each(self, pairs: Sequence[Pair]) -> list[tuple[list[int], int]]:
        """(token ids, prompt length) of every pair."""
        return [data.tokens(pair, self.tokenizer, self.config.max_length) for pair in pairs]

    def encode(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (B, T) int64 of pairs (:func:`airtrace.data.encode`)."""
        return data.encode(pairs, self.tokenizer, max_length=self.config.max_length, pad_id=self.tokenizer.pad_id)

    def batches(self, pairs: Sequence[Pair], batch_size: int = 32) -> list[tuple[list[int], dict]]:
        """``(ids, encoded batch)`` pairs for :class:`airtrace.Attributor`; ids are positions in ``pairs``.

        Examples are grouped by token count (little padding); the order is deterministic.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(pairs)), key=lambda i: len(data.tokens(pairs[i], self.tokenizer,
                                                                          self.config.max_length)[0]))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [(chunk, self.encode([pairs[i] for i in chunk])) for chunk in chunks]

    def train_batches(self, batch_size: int = 32) -> list[tuple[list[int], dict]]:
        """Batches of the training pool for the Attributor; ids = rows of :attr:`train`."""
        return self.batches(self.train, batch_size)

    def query_batches(self, batch_size: int = 32) -> list[tuple[list[int], dict]]:
        """Batches of the queries for the Attributor; ids = rows of :attr:`queries`."""
        return self.batches(self.queries, batch_size)

    def _collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Encoded batch of training examples ``rows`` (right-padded)."""
        encoded = [self._train_encoded[i] for i in rows]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, prompt) in enumerate(encoded):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, prompt : len(ids)] = input_ids[b, prompt : len(ids)]
        return {"input_ids": input_ids, "labels": labels}

    # -- model and training

    def new_model(self, seed: int) -> GPT:
        """An untrained :class:`GPT` with weights drawn from ``seed``."""
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        return GPT(len(self.tokenizer), c.max_length, c.d_model, c.n_layer, c.n_head, c.mlp_ratio, generator)

    def train_fn(self, indices: torch.Tensor | Sequence[int], seed: int) -> GPT:
        """Train a model from scratch on ``train[indices]``.

        Args:
            indices: (n_j,) int64 rows of :attr:`train`, unique.
            seed: draws the example order when ``config.order_seed`` is None and
                the initial weights when ``config.init_seed`` is None; with both set
                (the default) the model depends on the subset only.

        Returns:
            The trained :class:`GPT`, float32, in eval mode.

        Raises:
            ValueError: indices out of range, repeated or empty.
        """
        rows = torch.as_tensor(indices, dtype=torch.long).flatten()
        n = len(self.train)
        if rows.numel() == 0 or rows.min() < 0 or rows.max() >= n or rows.unique().numel() != rows.numel():
            raise ValueError(f"indices must be unique rows of the {n} training pairs, got {rows.numel()} indices "
                             f"in [{rows.min().item() if rows.numel() else None}, "
                             f"{rows.max().item() if rows.numel() else None}]")
        with _one_thread():
            return self._train(rows, seed)

    def _train(self, rows: torch.Tensor, seed: int) -> GPT:
        """AdamW over ``epochs`` passes of ``train[rows]`` (see the module docstring)."""
        n, c = len(self.train), self.config
        model = self.new_model(seed if c.init_seed is None else c.init_seed)
        model.train()
        decay = [p for p in model.parameters() if p.dim() == 2]
        other = [p for p in model.parameters() if p.dim() != 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                       {"params": other, "weight_decay": 0.0}], lr=c.lr)
        steps = c.epochs * math.ceil(rows.numel() / c.batch_size)
        warmup = max(1, round(c.warmup * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps))
        generator = torch.Generator().manual_seed(seed if c.order_seed is None else c.order_seed)
        member = torch.zeros(n, dtype=torch.bool)
        member[rows] = True
        for _ in range(c.epochs):
            pool_order = torch.randperm(n, generator=generator)
            order = pool_order[member[pool_order]].tolist()
            for start in range(0, len(order), c.batch_size):
                loss = _mean_answer_loss(model, self._collate(order[start : start + c.batch_size]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()

    # -- losses

    def loss_fn(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) summed answer-token losses: the per-example loss for :class:`airtrace.Attributor`."""
        return answer_losses(model, batch)[0]

    @torch.no_grad()
    def example_losses(self, model: nn.Module, pairs: Sequence[Pair], reduction: str = "mean") -> torch.Tensor:
        """Answer-token loss of each pair under ``model``.

        Args:
            model: a :class:`GPT` of this task (put in eval mode).
            pairs: examples with ``question`` and ``answer``.
            reduction: "mean" (per answer token) or "sum".

        Returns:
            (len(pairs),) float64.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        model.eval()
        out = []
        for start in range(0, len(pairs), EVAL_BATCH):
            losses, counts = answer_losses(model, self.encode(pairs[start : start + EVAL_BATCH]))
            out.append(losses.double() / (counts.clamp_min(1).double() if reduction == "mean" else 1.0))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def measure_fn(self, model: nn.Module) -> torch.Tensor:
        """(n_query,) float64: minus the mean answer-token loss of each query (higher = better fit)."""
        return -self.example_losses(model, self.queries)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (the previous count is restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mean_answer_loss(model: GPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Answer-token cross-entropy summed over the batch / answer tokens; the head runs on answer positions only."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(model.hidden(batch["input_ids"])[:, :-1][keep])
    return F.cross_entropy(logits, targets[keep], reduction="sum") / keep.sum().clamp_min(1)


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
