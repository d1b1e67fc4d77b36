"""Featurize does only the work attribution needs: padded batches run as length buckets (same features, same store
rows and ids), the causal-LM loss computes logits only at labelled positions (same losses and features), opt-in
bfloat16 autocast; on a Llama-family toy model against the plain pass."""

import pytest
import torch

from airtrace import Attributor, causal_lm_losses, per_example_loss
from airtrace.attribute.buckets import bucket_batch, length_buckets, row_lengths
from airtrace.store import Store

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FEATURE_RTOL = 1e-6  # the exact mode's bound: float32 round-off of the changed shapes is ~1e-7 of the largest entry
LENGTHS = (12, 3, 7, 4, 12, 5, 9, 3)


def llama(tie=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, tie_word_embeddings=tie,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def qa_batch(lengths=LENGTHS, T=12, prompt=2, seed=0):
    """Right-padded prompt + answer rows: labels on the answer tokens only (-100 on the prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    labels = (ids * mask).masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_loss(logits, batch["labels"], "causal_lm")


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ length buckets


def test_length_buckets_hand_worked():
    # one group: 4 x 10 + 2 = 42; {3, 4} {10, 10}: 2 x 4 + 2 + 2 x 10 + 2 = 32; {3} {4} {10, 10}: 5 + 6 + 22 = 33
    assert length_buckets([3, 10, 10, 4], group_cost=2) == [([0, 3], 4), ([1, 2], 10)]
    # a large fixed cost keeps one group
    assert length_buckets([3, 10, 10, 4], group_cost=100) == [([0, 3, 1, 2], 10)]
    # every row alone when calls cost nothing
    assert length_buckets([5, 2], group_cost=0) == [([1], 2), ([0], 5)]


def test_row_lengths_trailing_padding_only():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    assert row_lengths(mask).tolist() == [2, 3, 0, 4, 3]


def test_bucket_batch_cuts_sequence_tensors_and_selects_rows():
    batch = qa_batch(lengths=(12, 3, 12, 4), T=12)
    batch["weights"] = torch.tensor([1, 2, 3, 4])
    batch["hidden"] = torch.randn(4, 12, 5)
    batch["text"] = ["a", "b", "c", "d"]
    batch["scale"] = 2.0
    buckets = bucket_batch(batch, group_cost=4)
    assert [rows for rows, _ in buckets] == [[1, 3], [0, 2]]
    rows, part = buckets[0]
    assert part["input_ids"].shape == (2, 4) and part["hidden"].shape == (2, 4, 5)
    assert torch.equal(part["input_ids"], batch["input_ids"][[1, 3], :4])
    assert torch.equal(part["labels"], batch["labels"][[1, 3], :4])
    assert torch.equal(part["hidden"], batch["hidden"][[1, 3], :4])
    assert part["weights"].tolist() == [2, 4] and part["text"] == ["b", "d"] and part["scale"] == 2.0
    assert bucket_batch(qa_batch(lengths=(12, 12), T=12)) is None  # no trailing padding
    assert bucket_batch({"x": torch.randn(3, 4)}) is None  # no attention mask


def test_buckets_same_features_store_rows_and_scores(tmp_path):
    model = llama()
    batches = [(["a", "b", "c", "d"], qa_batch((48, 5, 6, 7), T=48, seed=1)),
               ([10, 11, 12, 13], qa_batch((30, 8, 5, 4), T=48, seed=2))]
    queries = [(["q0", "q1"], qa_batch((6, 11), seed=3))]
    results = {}
    for trim in (False, True):
        att = Attributor(model, "model.layers.*", loss_fn=full_logits_loss, trim_padding=trim)
        seen = []
        handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(tuple(k["input_ids"].shape)),
                                                 with_kwargs=True)
        store = att.featurize(batches, tmp_path / f"store-{trim}", dtype="float32", progress=False)
        handle.remove()
        att.fit(batches, store=store, progress=False)
        scores = att.score(queries, store, topk=8, progress=False)
        X = torch.cat([chunk.features for chunk in Store.open(store.path).iter_shards()])
        results[trim] = (seen, list(store.ids), X, scores)
    (seen0, ids0, X0, s0), (seen1, ids1, X1, s1) = results[False], results[True]
    assert seen0 == [(4, 48), (4, 48)]
    assert seen1 == [(3, 7), (1, 48), (3, 8), (1, 30)]  # buckets cut to their own longest row
    assert ids1 == ids0 == ["a", "b", "c", "d", 10, 11, 12, 13]
    assert max_rel(X1, X0) <= FEATURE_RTOL
    assert s1.ids == s0.ids
    assert max_rel(s1.values, s0.values) <= 1e-5  # EK-FAC solves amplify the features' round-off


def test_buckets_off_for_unpadded_and_features_equal_per_batch():
    model = llama()
    batch = qa_batch()
    on = Attributor(model, "model.layers.*", loss_fn=full_logits_loss).features(batch)
    off = Attributor(model, "model.layers.*", loss_fn=full_logits_loss, trim_padding=False).features(batch)
    assert max_rel(on, off) <= FEATURE_RTOL


# ------------------------------------------------------------------ logits at loss positions only


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_causal_lm_losses_equal_full_logits(reduction):
    model = llama().requires_grad_(False)  # a trainable output layer gets every position (next test)
    batch = qa_batch()
    batch["labels"][3, :] = -100  # an example without labelled tokens: loss 0
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    with torch.no_grad():
        fast = causal_lm_losses(model, batch, reduction=reduction)
    handle.remove()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = per_example_loss(logits, batch["labels"], "causal_lm", reduction=reduction)
    assert widths == [int((batch["labels"][:, 1:] != -100).sum(1).max())] and widths[0] < 12
    assert fast[3] == 0
    assert max_rel(fast, full.detach()) <= FEATURE_RTOL


def test_loss_positions_same_features():
    model = llama(tie=True)  # SmolLM2's tied output layer, not tracked
    batch = qa_batch()
    fast = Attributor(model, "model.layers.*", loss_fn=causal_lm_losses).features(batch)
    full = Attributor(model, "model.layers.*", loss_fn=full_logits_loss).features(batch)
    assert max_rel(fast, full) <= FEATURE_RTOL


def test_tracked_output_layer_gets_every_position():
    model = llama()
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    batch = qa_batch(lengths=(12, 12, 12))
    fast = Attributor(model, "*", loss_fn=causal_lm_losses).features(batch)
    handle.remove()
    full = Attributor(model, "*", loss_fn=full_logits_loss).features(batch)
    assert widths == [12]  # the head's weight requires grad under the capture: no gathering
    assert max_rel(fast, full) <= FEATURE_RTOL


def test_causal_lm_losses_model_without_output_embeddings():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids))

    model, batch = Tiny(), qa_batch()
    expected = per_example_loss(model(batch["input_ids"]), batch["labels"], "causal_lm")
    assert torch.equal(causal_lm_losses(model, batch), expected)

    class TwoHeads(Tiny):  # runs its output layer twice: which logits are which cannot be told
        def get_output_embeddings(self):
            return self.out

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            self.first = self.out(h)
            return self.out(h)

    with pytest.raises(ValueError, match="output layer 2 times"):
        causal_lm_losses(TwoHeads().requires_grad_(False), batch)


# ------------------------------------------------------------------ opt-in bfloat16 autocast


def test_bfloat16_autocast_close_to_exact_and_recorded(tmp_path):
    model = llama()
    batch = qa_batch()
    exact = Attributor(model, "model.layers.*", loss_fn=causal_lm_losses).features(batch)
    att = Attributor(model, "model.layers.*", loss_fn=causal_lm_losses, autocast="bfloat16")
    fast = att.features(batch)
    assert fast.dtype == torch.float32
    # bfloat16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding): 3e-3 to 6e-3 measured over three seeds
    assert 1e-4 < max_rel(fast, exact) < 5e-2
    store = att.featurize([(list(range(8)), batch)], tmp_path / "bf16", progress=False)
    assert store.meta["autocast"] == "bfloat16"
    with pytest.raises(ValueError, match="autocast must be one of"):
        Attributor(model, "model.layers.*", loss_fn=causal_lm_losses, autocast="int8")
