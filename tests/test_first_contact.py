"""First contact: the models and data pipelines people already have, written the way a user writes them, against
per-example gradients from single-example backward passes (GPT-2, Llama-family, BERT from small configs; a bare
module; DataLoaders of images and of tokens; a ``datasets.Dataset``; a compiled model; a LoRA adapter)."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from airtrace import Attributor, as_batches, per_example_loss
from airtrace.capture import ROOT, named_modules

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

F64 = torch.float64


# ------------------------------------------------------------------ the user's code


def lm_loss(model, batch):
    """Summed token loss of a Hugging Face causal LM, padding ignored."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_loss(logits, labels, "causal_lm")


def classifier_loss(model, batch):
    return per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def llama(tie=True):
    """SmolLM2's architecture (tied embeddings, grouped-query attention) at toy size."""
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=40, tie_word_embeddings=tie,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def bert():
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, vocab_size=40, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def token_batch(B=3, T=7, vocab=40, seed=0, labels=None):
    """Right-padded token ids of different lengths, with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    for b in range(B):
        mask[b, T - b:] = 0  # example b has T - b tokens
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.randint(0, labels, (B,), generator=g)
    return batch


# ------------------------------------------------------------------ brute force


def example(batch, b):
    """Example b of a padded batch, unpadded, as a batch of one."""
    n = int(batch["attention_mask"][b].sum())
    return {k: v[b: b + 1, :n] if v.dim() == 2 else v[b: b + 1] for k, v in batch.items()}


def single_example_features(attributor, batch, examples):
    """Per-example features from single-example backward passes: each tracked layer's weight gradient (shared
    weights: the one gradient of the parameter) as a (d_out, d_in) map, biases as the last column, projected."""
    model, modules = attributor.module, dict(named_modules(attributor.module))
    model.eval()
    rows = []
    for one in examples:
        model.zero_grad(set_to_none=True)
        attributor.loss_fn(model, one).sum().backward()
        parts = []
        for spec in attributor.layers:
            module = modules[spec.name]
            W = module.weight.grad
            M = W.T if spec.kind in ("conv1d", "embedding") else W.reshape(W.shape[0], -1)
            if spec.bias:
                M = torch.cat([M, module.bias.grad[:, None]], 1)
            P_in, P_out = attributor.featurizer.projections[spec.name]
            parts.append((P_out.T.to(M.dtype) @ M @ P_in.to(M.dtype)).flatten())
        rows.append(torch.cat(parts))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def assert_features_match(attributor, batch, examples, rtol=1e-9, atol=1e-11):
    expected = single_example_features(attributor, batch, examples)
    torch.testing.assert_close(attributor.features(batch), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ Hugging Face models, layers="*"


@pytest.mark.parametrize("build, tied", [(gpt2, ("transformer.wte", "lm_head")), (llama, ("model.embed_tokens",
                                                                                            "lm_head"))])
def test_causal_lms_attribute_every_layer_with_tied_weights_once(build, tied):
    torch.manual_seed(0)
    model = build().double()
    with pytest.warns(UserWarning, match=r"not attributed.*norm"):
        at = Attributor(model, "*", loss_fn=lm_loss)
    first, second = tied
    spec = next(s for s in at.layers if s.name in tied)
    assert spec.tied == ((second if spec.name == first else first, True),)  # one block for the shared weight
    assert not any(s.name == second for s in at.layers)
    batch = token_batch()
    assert_features_match(at, batch, [example(batch, b) for b in range(3)])


def test_gpt2_position_embeddings_get_one_gradient_per_example():
    """GPT-2 feeds position ids (1, T) to wpe and broadcasts: each example still gets its own gradient."""
    torch.manual_seed(1)
    model = gpt2().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at = Attributor(model, "transformer.wpe", loss_fn=lm_loss)
    batch = token_batch(B=4, T=6)
    features = at.features(batch)
    assert_features_match(at, batch, [example(batch, b) for b in range(4)])
    assert not torch.allclose(features[0], features[1])


def test_bert_classifier_with_biases_by_default():
    torch.manual_seed(2)
    model = bert().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at = Attributor(model, "*", loss_fn=classifier_loss)
    assert any(s.name == "bert.embeddings.position_embeddings" for s in at.layers)
    assert all(s.bias for s in at.layers if s.kind == "linear")  # biases attributed by default
    batch = token_batch(labels=3)
    assert_features_match(at, batch, [example(batch, b) for b in range(3)])


def test_untied_llama_has_separate_blocks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at = Attributor(llama(tie=False), "*", loss_fn=lm_loss)
    names = [s.name for s in at.layers]
    assert "lm_head" in names and "model.embed_tokens" in names and not any(s.tied for s in at.layers)


def test_layers_no_wider_than_k_keep_their_exact_gradient_by_default():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()
    loss = lambda m, b: per_example_loss(m(b[0]), b[1])  # noqa: E731
    x, y = torch.randn(5, 1, 4, 4, dtype=F64), torch.randint(0, 3, (5,))
    # conv: 4 x (9 + bias), head: 3 x (16 + bias), both within the exact budget (4096 entries): unprojected
    at = Attributor(model, loss_fn=loss)
    assert at.dims == {"0": (4, 10), "3": (3, 17)}
    assert_features_match(at, (x, y), [(x[b: b + 1], y[b: b + 1]) for b in range(5)])
    # without the budget every side no wider than 16 is exact, only 17 is projected
    at = Attributor(model, loss_fn=loss, projection=dict(exact_budget=0))
    assert at.dims == {"0": (4, 10), "3": (3, 16)}
    assert_features_match(at, (x, y), [(x[b: b + 1], y[b: b + 1]) for b in range(5)])


def test_a_bare_module_is_a_model():
    torch.manual_seed(3)
    model = nn.Linear(5, 3).double()
    at = Attributor(model, loss_fn=lambda m, b: per_example_loss(m(b["x"]), b["y"]), curvature="identity")
    assert [s.name for s in at.layers] == [ROOT] and at.layers[0].bias
    batch = {"x": torch.randn(4, 5, dtype=F64), "y": torch.tensor([0, 1, 2, 0])}
    assert_features_match(at, batch, [{"x": batch["x"][b: b + 1], "y": batch["y"][b: b + 1]} for b in range(4)])


def test_causal_lm_loss_sums_or_averages_tokens():
    logits, labels = torch.randn(2, 5, 7, dtype=F64), torch.tensor([[-100, 1, 2, 3, -100], [4, 5, -100, -100, -100]])
    summed = per_example_loss(logits, labels, "causal_lm")
    mean = per_example_loss(logits, labels, "causal_lm", reduction="mean")
    torch.testing.assert_close(mean, summed / torch.tensor([3.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        per_example_loss(logits, labels, "causal_lm", reduction="avg")


def test_queries_use_their_own_loss_when_given(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    loss = lambda m, b: per_example_loss(m(b[0]), b[1])  # noqa: E731
    data = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), batch_size=4)
    plain = Attributor(model, loss_fn=loss, curvature="identity")
    doubled = Attributor(model, loss_fn=loss, query_loss_fn=lambda m, b: 2 * loss(m, b), curvature="identity")
    store = plain.featurize(data, tmp_path / "store", dtype="float32", progress=False)
    a = plain.score(data, store, topk=3, progress=False)
    b = doubled.score(data, store, topk=3, progress=False)
    torch.testing.assert_close(b.values, 2 * a.values)


# ------------------------------------------------------------------ frozen layers, LoRA, torch.compile


def test_frozen_layers_are_skipped():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    at = Attributor(model, loss_fn=lambda m, b: per_example_loss(m(b[0]), b[1]))
    assert [s.name for s in at.layers] == ["2"]
    with pytest.raises(ValueError, match=r"'0' matches only frozen layers"):
        Attributor(model, "0", loss_fn=lambda m, b: per_example_loss(m(b[0]), b[1]))


@pytest.fixture(scope="module")
def lora_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(llama().double(), config)


def test_lora_attributes_through_the_adapter_only(lora_model):
    at = Attributor(lora_model, "*", loss_fn=lm_loss)  # the base is frozen: "*" finds the adapters
    names = [s.name for s in at.layers]
    assert len(names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert [s.name for s in Attributor(lora_model, "lora", loss_fn=lm_loss).layers] == names
    batch = token_batch()
    assert_features_match(at, batch, [example(batch, b) for b in range(3)])


def test_lora_scores_end_to_end(lora_model, tmp_path):
    at = Attributor(lora_model, "lora", loss_fn=lm_loss)
    train = [([f"t{s + b}" for b in range(3)], token_batch(seed=s)) for s in range(0, 9, 3)]
    store = at.featurize(train, tmp_path / "store", dtype="float32", progress=False)
    at.fit(train, store=store, progress=False)
    scores = at.score([(["q"], example(train[1][1], 0))], store, topk=2, metric="cosine", progress=False)
    assert scores.ids[0][0] == "t3"  # the query is that training example


def test_a_compiled_model_is_the_same_model(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    loss = lambda m, b: per_example_loss(m(b[0]), b[1])  # noqa: E731
    data = [([0, 1, 2], (torch.randn(3, 4), torch.tensor([0, 1, 2])))]
    store = Attributor(model, loss_fn=loss, curvature="identity").featurize(data, tmp_path / "s", progress=False)
    compiled = torch.compile(model)
    at = Attributor(compiled, ["_orig_mod.0", "2"], loss_fn=loss, curvature="identity")
    assert [s.name for s in at.layers] == ["0", "2"]
    from airtrace import model_fingerprint

    assert model_fingerprint(compiled) == model_fingerprint(model) == store.fingerprint
    scores = at.score(data, store, topk=1, progress=False)
    assert scores.ids == [[0], [1], [2]]


# ------------------------------------------------------------------ data pipelines


def _mlp_features(at, X, y):
    return at.features((X, y))


def test_dataloader_of_images_uses_dataset_indices_as_ids(tmp_path):
    torch.manual_seed(7)
    images, labels = torch.randn(10, 1, 6, 6), torch.randint(0, 4, (10,))
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    loss = lambda m, b: per_example_loss(m(b[0]), b[1])  # noqa: E731
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    at = Attributor(model, loss_fn=loss, curvature="identity")
    store = at.featurize(loader, tmp_path / "store", dtype="float32", progress=False)
    assert sorted(store.ids) == list(range(10)) and store.ids != list(range(10))  # shuffled, indexed
    rows, ids = store.read_rows(list(range(10)))
    expected = at.features((images[ids], labels[ids]))
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 6), (12,)], ids=["sequences", "one-token"])
def test_dataloader_of_token_tensors(shape, tmp_path):
    torch.manual_seed(8)
    tokens, labels = torch.randint(0, 30, shape), torch.randint(0, 2, (12,))
    model = nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.LazyLinear(2)) if len(shape) == 2 else \
        nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 2))
    model(tokens[:1])  # materialise the lazy layer
    loss = lambda m, b: per_example_loss(m(b[0]), b[1])  # noqa: E731
    at = Attributor(model, loss_fn=loss, curvature="identity")
    store = at.featurize(DataLoader(TensorDataset(tokens, labels), batch_size=5), tmp_path / "s", dtype="float32",
                         progress=False)
    assert store.ids == list(range(12))
    torch.testing.assert_close(store.read_rows(list(range(12)))[0], at.features((tokens, labels)),
                               rtol=1e-5, atol=1e-6)


def test_hf_dataset_with_ragged_tokens_and_an_id_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(9)
    rows = {"id": ["a", "b", "c", "d", "e"], "input_ids": [[5, 6, 7], [8, 9], [1, 2, 3, 4], [7], [3, 3, 3]]}
    ds = datasets.Dataset.from_dict(rows)
    model = llama().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at = Attributor(model, "model.layers.*", loss_fn=lm_loss, curvature="identity")
    by_index = at.featurize(ds, tmp_path / "by-index", dtype="float32", progress=False)
    assert by_index.ids == [0, 1, 2, 3, 4]
    named = at.featurize(as_batches(ds, batch_size=2, id_column="id"), tmp_path / "named", dtype="float32",
                         progress=False)
    assert named.ids == ["a", "b", "c", "d", "e"]
    singles = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.int64)}
               for r in rows["input_ids"]]
    expected = torch.cat([at.features(one) for one in singles])
    torch.testing.assert_close(named.read_rows(list(range(5)))[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_ambiguous_pairs_are_refused_with_the_fix(tmp_path):
    at = Attributor(nn.Linear(3, 2), loss_fn=lambda m, b: per_example_loss(m(b), torch.zeros(len(b), dtype=int)))
    pairs_of_tensors = [(torch.randint(0, 5, (4,)), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match=r"first element is a Tensor of shape \(4,\).*pass the DataLoader"):
        at.featurize(pairs_of_tensors, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="got a dict.*as_batches"):
        at.featurize(iter([{"x": torch.zeros(2, 3)}]), tmp_path / "b", progress=False)


def test_progress_knows_the_total_of_a_dataloader(tmp_path, monkeypatch):
    from airtrace.attribute import attributor as module

    totals = []
    real = module.progress_bar
    monkeypatch.setattr(module, "progress_bar", lambda total, *a, **k: totals.append(total) or real(total, *a, **k))
    at = Attributor(nn.Linear(3, 2), loss_fn=lambda m, b: per_example_loss(m(b[0]), b[1]), curvature="identity")
    loader = DataLoader(TensorDataset(torch.randn(11, 3), torch.randint(0, 2, (11,))), batch_size=4)
    at.featurize(loader, tmp_path / "s", progress=False)
    at.score(loader, tmp_path / "s", topk=2, progress=False)
    assert totals[0] == 11 and 11 in totals[1:]  # featurize, then the queries
