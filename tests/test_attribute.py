"""Attributor end to end: streamed scores equal brute-force float64 scores built from single-example
backward passes, explicit projections and dense (Kronecker) curvature matrices."""

import functools
import os
import socket
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from torch import nn

from airtrace import Attributor, StoreError, scoring
from airtrace.attribute.config import DENSE_MAX_BLOCK, essential, recorded_projection
from airtrace.capture import GradientCapture, make_projections, per_example_loss, response_labels, select_layers
from airtrace.curvature import damping as rules
from airtrace.ops.project_dense import project_dense
from airtrace.ops.project_sparse import project_sparse
from airtrace.store import Store
from airtrace.store.sidecars import kfac_sidecar

F64 = torch.float64
K_IN, K_OUT, SEED = 3, 4, 5
FACTORED = dict(k_in=K_IN, k_out=K_OUT, seed=SEED, exact_small=False, exact_budget=0)  # the brute force projects all
DENSE = dict(type="dense", k=16, seed=SEED, kind="gaussian")
ROWS_PER_SHARD = 5


# ------------------------------------------------------------------ models and data


class TinyLM(nn.Module):
    """Causal self-attention block + MLP; token embedding with padding_idx=0."""

    def __init__(self, vocab=13, d=6, max_len=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, attention_mask):
        B, T = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(T).expand(B, T))
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        h = h + self.o(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ self.v(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


def mlp_loss(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def lm_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return per_example_loss(logits, batch["labels"], "causal_lm")


class Setup(NamedTuple):
    """A model, its loss, train / query examples as single-example batches, and a batching rule."""

    model: nn.Module
    loss_fn: object
    train: list  # single-example batches (unpadded)
    queries: list
    collate: object  # list of single-example batches -> one batch
    batch_size: int


def batched(setup, examples, prefix):
    """(ids, batch) pairs of ``batch_size`` examples each."""
    out = []
    for start in range(0, len(examples), setup.batch_size):
        chunk = examples[start: start + setup.batch_size]
        out.append(([f"{prefix}{start + j}" for j in range(len(chunk))], setup.collate(chunk)))
    return out


@functools.cache
def mlp_setup() -> Setup:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = torch.randn(30, 5, dtype=F64), torch.randint(3, (30,))
    examples = [{"x": X[i: i + 1], "y": y[i: i + 1]} for i in range(30)]
    collate = lambda ex: {k: torch.cat([e[k] for e in ex]) for k in ex[0]}  # noqa: E731
    return Setup(model, mlp_loss, examples[:24], examples[24:], collate, 4)


def _lm_example(gen, vocab=13):
    prompt, length = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(3, 8, (1,), generator=gen))
    ids = torch.randint(1, vocab, (1, length), generator=gen)
    mask = torch.ones(1, length, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": response_labels(ids, mask, [prompt])}


def _pad_collate(examples):
    T = max(e["input_ids"].shape[1] for e in examples)
    pad = lambda t, value: nn.functional.pad(t, (0, T - t.shape[1]), value=value)  # noqa: E731
    return {"input_ids": torch.cat([pad(e["input_ids"], 0) for e in examples]),
            "attention_mask": torch.cat([pad(e["attention_mask"], 0) for e in examples]),
            "labels": torch.cat([pad(e["labels"], -100) for e in examples])}


@functools.cache
def lm_setup() -> Setup:
    torch.manual_seed(1)
    model = TinyLM().double()
    gen = torch.Generator().manual_seed(2)
    examples = [_lm_example(gen) for _ in range(20)]
    return Setup(model, lm_loss, examples[:16], examples[16:], _pad_collate, 3)


SETUPS = {"mlp": mlp_setup, "lm": lm_setup}


# ------------------------------------------------------------------ brute force (float64, dense)


def _single_example(model, loss_fn, example, layers):
    """One backward of one unpadded example: per layer (weight gradient (d_out, d_in), A (T, d_in), G (T, d_out))."""
    modules = dict(model.named_modules())
    saved, handles = {}, []

    def hook(name):
        def forward(module, inputs, output):
            x = inputs[0].detach()
            A = nn.functional.one_hot(x.reshape(-1), module.num_embeddings).to(F64) if isinstance(
                module, nn.Embedding) else x.reshape(-1, x.shape[-1])
            output.register_hook(lambda g: saved.__setitem__(name, (A, g.detach().reshape(-1, g.shape[-1]))))

        return forward

    for spec in layers:
        handles.append(modules[spec.name].register_forward_hook(hook(spec.name)))
    model.zero_grad(set_to_none=True)
    loss_fn(model, example).sum().backward()
    for h in handles:
        h.remove()
    out = {}
    for spec in layers:
        W = modules[spec.name].weight.grad
        out[spec.name] = (W.T if spec.kind == "embedding" else W, *saved[spec.name])
    model.zero_grad(set_to_none=True)
    return out


class Brute(NamedTuple):
    """Per layer: features (n, k_out, k_in), tokens a (sum T, k_in), g (sum T, k_out); flat grads (n, p)."""

    features: dict
    a: dict
    g: dict
    flat: torch.Tensor


def identity_projections(layers) -> dict:
    """P = I on both sides of every layer: features are the unprojected weight gradients."""
    return {s.name: (torch.eye(s.d_in, dtype=F64), torch.eye(s.d_out, dtype=F64)) for s in layers}


def brute_force(setup, examples, proj=None) -> Brute:
    layers = select_layers(setup.model, bias=False)
    proj = proj or make_projections(layers, K_IN, K_OUT, SEED, dtype=F64)
    feats, a, g, flat = {s.name: [] for s in layers}, {s.name: [] for s in layers}, {s.name: [] for s in layers}, []
    for example in examples:
        grads = _single_example(setup.model, setup.loss_fn, example, layers)
        flat.append(torch.cat([M.flatten() for M, _, _ in grads.values()]))
        for name, (M, A, G) in grads.items():
            P_in, P_out = proj[name]
            feats[name].append(P_out.T @ M @ P_in)
            a[name].append(A @ P_in)
            g[name].append(G @ P_out)
    stack = lambda d, f: {k: f(v) for k, v in d.items()}  # noqa: E731
    return Brute(stack(feats, torch.stack), stack(a, torch.cat), stack(g, torch.cat), torch.stack(flat))


def _vec(x):
    return x.reshape(x.shape[0], -1)


def auto_lambda(method, feats, mean_eigenvalue):
    """λ of the default "auto" rule: κ_method × ρ^½ × mean eigenvalue, ρ = ‖mean ĝ‖² / mean ‖ĝ‖² (by definition)."""
    v = _vec(feats)
    rho = float(v.mean(0).square().sum() / v.square().sum(1).mean())
    return rules.AUTO_KAPPA[method] * rho**0.5 * mean_eigenvalue


def dense_inverse(method, train: Brute, name):
    """(F + λI)⁻¹ of one layer as an explicit (n, n) matrix: identity, K-FAC or EK-FAC by definition, λ by "auto"."""
    feats = train.features[name]
    N, n = feats.shape[0], feats[0].numel()
    if method == "identity":
        return torch.eye(n, dtype=F64)
    S_A, S_G = train.a[name].T @ train.a[name] / N, train.g[name].T @ train.g[name] / N
    e_A, Q_A = torch.linalg.eigh(S_A)
    e_G, Q_G = torch.linalg.eigh(S_G)
    K = torch.kron(Q_G, Q_A)
    if method == "kfac":
        Lam = torch.kron(e_G.clamp_min(0), e_A.clamp_min(0))
    else:
        Lam = ((_vec(feats) @ K) ** 2).mean(0)
    lam = auto_lambda(method, feats, float(Lam.mean()))
    return torch.linalg.inv(K @ torch.diag(Lam) @ K.T + lam * torch.eye(n, dtype=F64))


def dense_query_train(method, train: Brute, queries: Brute):
    """Preconditioned queries (q, width) and train features (n, width), layers concatenated."""
    Qt, X = [], []
    for name in train.features:
        H_inv = dense_inverse(method, train, name)
        Qt.append(_vec(queries.features[name]) @ H_inv)
        X.append(_vec(train.features[name]))
    return torch.cat(Qt, 1), torch.cat(X, 1)


@functools.cache
def brute(kind):
    setup = SETUPS[kind]()
    return brute_force(setup, setup.train), brute_force(setup, setup.queries)


def dense_scores(kind, method, metric="inner"):
    train, queries = brute(kind)
    Qt, X = dense_query_train(method, train, queries)
    S = Qt @ X.T
    if metric == "cosine":
        return S / Qt.norm(dim=1)[:, None] / X.norm(dim=1)[None, :]
    if metric == "relative":
        self_influence = ((X @ dense_inverse_full(method, train)) * X).sum(1)
        return S / self_influence.sqrt()[None, :]
    return S


def dense_inverse_full(method, train):
    return torch.block_diag(*(dense_inverse(method, train, name) for name in train.features))


# ------------------------------------------------------------------ helpers


def attributor(kind, curvature="ekfac", projection=FACTORED, **kwargs):
    """An Attributor on all weights, biases left out (as the brute force)."""
    setup = SETUPS[kind]()
    return Attributor(setup.model, loss_fn=setup.loss_fn, projection=projection, curvature=curvature,
                      **{"bias": False, **kwargs})


def featurized(kind, path, projection=FACTORED):
    setup = SETUPS[kind]()
    at = attributor(kind, "identity", projection)
    return at.featurize(batched(setup, setup.train, "t"), path, dtype="float32", rows_per_shard=ROWS_PER_SHARD,
                        progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return {kind: featurized(kind, tmp_path_factory.mktemp(kind) / "store") for kind in SETUPS}


def fitted(kind, method, **kwargs):
    setup = SETUPS[kind]()
    at = attributor(kind, method)
    at.fit(batched(setup, setup.train, "t"), progress=False, **kwargs)
    return at


def run_score(at, kind, store, **kwargs):
    setup = SETUPS[kind]()
    return at.score(batched(setup, setup.queries, "q"), store, progress=False, **kwargs)


def assert_topk_matches(scores, S, topk):
    expected_values, expected_indices = torch.sort(S, dim=1, descending=True)
    k = min(topk, S.shape[1])
    scale = float(S.abs().max())
    torch.testing.assert_close(scores.values[:, :k].to(F64), expected_values[:, :k], rtol=1e-5, atol=1e-6 * scale)
    assert torch.equal(scores.indices[:, :k], expected_indices[:, :k])


# ------------------------------------------------------------------ tests


def test_capture_keeps_projected_tokens_whose_outer_products_sum_to_the_features():
    setup = lm_setup()
    layers = select_layers(setup.model)
    proj = make_projections(layers, K_IN, K_OUT, SEED, dtype=F64)
    batch = setup.collate(setup.train[:3])
    with GradientCapture(setup.model, layers, proj, keep_tokens=True) as cap:
        cap.set_mask(batch["attention_mask"])
        setup.loss_fn(setup.model, batch).sum().backward()
        features, (acts, grads) = cap.collect(), cap.collect_tokens()
    setup.model.zero_grad(set_to_none=True)
    for name, feats in features.items():
        torch.testing.assert_close(torch.einsum("bto,bti->boi", grads[name], acts[name]).flatten(1), feats)
        padding = batch["attention_mask"] == 0
        if acts[name].shape[1] == padding.shape[1]:
            assert not acts[name][padding].any() and not grads[name][padding].any()


@pytest.mark.parametrize("kind", ["mlp", "lm"])
@pytest.mark.parametrize("method", ["identity", "kfac", "ekfac"])
def test_streamed_topk_equals_brute_force(stores, kind, method):
    at = fitted(kind, method)
    scores = run_score(at, kind, stores[kind], topk=4)
    assert_topk_matches(scores, dense_scores(kind, method), 4)
    train_ids = stores[kind].ids
    assert scores.ids == [[train_ids[i] for i in row] for row in scores.indices.tolist()]
    assert scores.query_ids == [f"q{i}" for i in range(scores.values.shape[0])]


@pytest.mark.parametrize("method", ["identity", "ekfac"])
def test_exact_small_projection_scores_equal_the_unprojected_math(tmp_path, method):
    setup = lm_setup()
    projection = dict(k_in=16, k_out=16, seed=SEED, exact_small=True)  # wider than every layer (d <= 13)
    at = attributor("lm", method, projection)
    assert at.dims == {s.name: (s.d_out, s.d_in) for s in at.layers}
    store = featurized("lm", tmp_path / "store", projection)
    at.fit(batched(setup, setup.train, "t"), store=store, progress=False)
    n = len(setup.train)
    scores = run_score(at, "lm", store, topk=n)
    layers = select_layers(setup.model, bias=False)
    train, queries = (brute_force(setup, ex, identity_projections(layers)) for ex in (setup.train, setup.queries))
    Qt, X = dense_query_train(method, train, queries)
    assert_topk_matches(scores, Qt @ X.T, n)
    assert Attributor.from_store(setup.model, store, loss_fn=lm_loss).projection["exact_small"] is True


def test_exact_small_projects_only_the_wide_sides():
    setup = lm_setup()
    at = attributor("lm", "identity", dict(k_in=7, k_out=6, seed=SEED, exact_small=True, exact_budget=0))
    plain = attributor("lm", "identity", dict(k_in=7, k_out=6, seed=SEED, exact_small=False, exact_budget=0))
    for spec in at.layers:
        (p_in, p_out), (q_in, q_out) = at.featurizer.projections[spec.name], plain.featurizer.projections[spec.name]
        for d, k, exact, projected in ((spec.d_in, 7, p_in, q_in), (spec.d_out, 6, p_out, q_out)):
            assert torch.equal(exact, torch.eye(d, dtype=F64) if d <= k else projected), spec.name
    assert at.dims["head"] == (6, 6) and at.dims["up"] == (6, 6) and at.dims["tok"] == (6, 7)
    assert at.dims["q"] == (6, 6) and at.dims["down"] == (6, 7) and plain.dims["q"] == (6, 7)
    with pytest.raises(ValueError, match="exact_small must be a bool"):
        attributor("lm", "identity", dict(k_in=7, k_out=6, exact_small="yes"))


def test_exact_budget_keeps_whole_small_layers_and_projects_the_rest():
    sizes = sorted({s.d_out * s.d_in for s in attributor("lm", "identity").layers})
    budget = sizes[len(sizes) // 2]  # some layers within, some above
    at = attributor("lm", "identity", dict(k_in=3, k_out=2, seed=SEED, exact_small=False, exact_budget=budget))
    plain = attributor("lm", "identity", dict(k_in=3, k_out=2, seed=SEED, exact_small=False, exact_budget=0))
    kept = 0
    for spec in at.layers:
        (p_in, p_out), (q_in, q_out) = at.featurizer.projections[spec.name], plain.featurizer.projections[spec.name]
        if spec.d_out * spec.d_in <= budget:
            kept += 1
            assert torch.equal(p_in, torch.eye(spec.d_in, dtype=F64)) and torch.equal(p_out, torch.eye(spec.d_out,
                                                                                                     dtype=F64))
            assert at.dims[spec.name] == (spec.d_out, spec.d_in)
            assert at.featurizer.projections.exact_sides(spec.name) == (True, True)
        else:
            assert torch.equal(p_in, q_in) and torch.equal(p_out, q_out), spec.name  # the same draws
            assert at.dims[spec.name] == (2, 3)
    assert 0 < kept < len(at.layers)
    assert attributor("lm", "identity", None).projection["exact_budget"] == 65536  # the default
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="exact_budget must be an int >= 0"):
            attributor("lm", "identity", dict(k_in=3, k_out=2, exact_budget=bad))


def test_the_default_exact_budget_follows_the_curvatures_memory():
    setup = lm_setup()
    for method, budget in (("ekfac", 65536), ("kfac", 65536), ("identity", 65536), ("fisher", 4096),
                           ("lowrank", 4096)):
        at = Attributor(setup.model, loss_fn=lm_loss, curvature=method, projection=dict(k_in=3, k_out=2))
        assert at.projection["exact_budget"] == budget, method
    given = Attributor(setup.model, loss_fn=lm_loss, curvature="ekfac", projection=dict(exact_budget=7))
    assert given.projection["exact_budget"] == 7  # an explicit budget is kept


def test_a_dense_curvature_refuses_a_block_over_its_memory_bound():
    setup = lm_setup()
    wide = dict(type="dense", k=DENSE_MAX_BLOCK + 1, seed=0)
    with pytest.raises(ValueError, match=r"block 'dense' has p = 8193 features .*exact_budget <= 4096"):
        Attributor(setup.model, loss_fn=lm_loss, curvature="fisher", projection=wide)
    Attributor(setup.model, loss_fn=lm_loss, curvature="identity", projection=wide)  # no dense matrix: allowed
    Attributor(setup.model, loss_fn=lm_loss, curvature="fisher", projection={**wide, "k": DENSE_MAX_BLOCK})


def test_a_record_without_exact_budget_reads_as_zero():
    record = {"type": "factored", "k_in": 4, "k_out": 4, "seed": 0, "exact_small": True, "layers": []}
    assert recorded_projection(record)["exact_budget"] == 0 and essential(record)["exact_budget"] == 0


def test_ekfac_second_phase_from_the_store_equals_the_batches(stores):
    from_batches = fitted("lm", "ekfac").curvature
    from_store = fitted("lm", "ekfac", store=stores["lm"]).curvature
    for name, inverse in from_batches.inverses.items():
        torch.testing.assert_close(from_store.inverses[name].eigenvalues, inverse.eigenvalues, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "relative"])
def test_metrics_equal_dense_formulas(stores, metric):
    at = fitted("mlp", "ekfac")
    S = dense_scores("mlp", "ekfac", metric)
    assert_topk_matches(run_score(at, "mlp", stores["mlp"], topk=6, metric=metric), S, 6)


def test_relative_caches_self_influence_in_a_sidecar(tmp_path, monkeypatch):
    store = featurized("mlp", tmp_path / "store")
    at = fitted("mlp", "ekfac")
    first = run_score(at, "mlp", store, topk=3, metric="relative")
    sidecars = [n for n in os.listdir(store.path) if n.startswith("sidecar-self_influence-")]
    assert len(sidecars) == 1
    train, _ = brute("mlp")
    X = dense_query_train("ekfac", train, train)[1]
    expected = ((X @ dense_inverse_full("ekfac", train)) * X).sum(1)
    torch.testing.assert_close(at.self_influence(store, progress=False), expected, rtol=1e-5, atol=0)
    monkeypatch.setattr(scoring, "self_influence_rows", None)  # the cache must be used now
    second = run_score(at, "mlp", store, topk=3, metric="relative")
    torch.testing.assert_close(second.values, first.values)
    at.featurize(batched(mlp_setup(), mlp_setup().train, "t"), store.path, overwrite=True, progress=False)
    sidecars = [n for n in os.listdir(store.path) if n.startswith("sidecar-")]
    assert sidecars == [os.path.basename(kfac_sidecar(Store.open(store.path)))]  # the old cache went with the store


def test_groups_and_full_matrix_equal_dense(stores, tmp_path):
    at = fitted("lm", "ekfac")
    groups = [[0, 5, 6, 15], [3], [], [1, 1, 9], list(range(16))]
    path = tmp_path / "scores.safetensors"
    scores = run_score(at, "lm", stores["lm"], topk=3, groups=groups, full_matrix_path=path)
    S = dense_scores("lm", "ekfac")
    expected = torch.stack([S[:, g].sum(1) for g in groups], dim=1)
    scale = float(S.abs().max())
    torch.testing.assert_close(scores.groups, expected, rtol=1e-5, atol=1e-6 * scale)
    with safe_open(path, framework="pt") as f:
        full = f.get_tensor("scores")
    assert full.shape == S.shape and full.dtype == F64
    torch.testing.assert_close(full, S, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(ValueError, match=r"groups\[1\].*outside \[0, 16\)"):
        run_score(at, "lm", stores["lm"], groups=[[0], [16]])


def test_full_matrix_removes_partial_files_of_dead_runs_only(stores, tmp_path):
    path = tmp_path / "scores.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    left_by_dead = tmp_path / f"scores.safetensors.{host}.{dead.pid}.tmp"
    of_a_live_run = tmp_path / f"scores.safetensors.{host}.{os.getppid()}.tmp"
    other_host = tmp_path / f"scores.safetensors.elsewhere.{dead.pid}.tmp"
    for f in (left_by_dead, of_a_live_run, other_host):
        f.write_bytes(b"partial")
    run_score(fitted("lm", "identity"), "lm", stores["lm"], topk=3, full_matrix_path=path)
    assert path.exists() and not left_by_dead.exists()
    assert of_a_live_run.exists() and other_host.exists()


def test_dense_projection_with_fisher_equals_brute_force(tmp_path):
    store = featurized("mlp", tmp_path / "store", projection=DENSE)
    setup = mlp_setup()
    at = attributor("mlp", "fisher", projection=DENSE)
    at.fit(store=store, progress=False)
    scores = run_score(at, "mlp", store, topk=5)
    train, queries = brute("mlp")
    X = project_dense(train.flat, DENSE["k"], SEED, "gaussian", backend="torch")
    Q = project_dense(queries.flat, DENSE["k"], SEED, "gaussian", backend="torch")
    F = X.T @ X / X.shape[0]
    H = F + auto_lambda("fisher", X, float(F.diagonal().mean())) * torch.eye(F.shape[0], dtype=F64)
    assert_topk_matches(scores, torch.linalg.solve(H, Q.T).T @ X.T, 5)
    with pytest.raises(ValueError, match="needs the factored projection"):
        Attributor(setup.model, bias=False, loss_fn=mlp_loss, projection=DENSE, curvature="ekfac")


def test_sparse_projection_with_fisher_equals_brute_force(tmp_path):
    sparse = dict(type="sparse", k=16, s=3, seed=SEED)
    store = featurized("mlp", tmp_path / "store", projection=sparse)
    at = attributor("mlp", "fisher", projection=sparse)
    at.fit(store=store, progress=False)
    scores = run_score(at, "mlp", store, topk=5)
    train, queries = brute("mlp")
    X = project_sparse(train.flat, 16, 3, SEED, backend="torch")
    Q = project_sparse(queries.flat, 16, 3, SEED, backend="torch")
    F = X.T @ X / X.shape[0]
    H = F + auto_lambda("fisher", X, float(F.diagonal().mean())) * torch.eye(F.shape[0], dtype=F64)
    assert_topk_matches(scores, torch.linalg.solve(H, Q.T).T @ X.T, 5)
    assert Attributor.from_store(mlp_setup().model, store, loss_fn=mlp_loss, curvature="identity").projection == sparse
    assert store.layout[0].name == "sparse" and store.layout[0].shape == (1, 16)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_kept_dense_matrix_equals_the_on_the_fly_projection(monkeypatch, kind):
    setup = lm_setup()
    model = TinyLM().float()
    model.load_state_dict(setup.model.state_dict())
    projection = dict(type="dense", k=24, seed=SEED, kind=kind)
    batch = setup.collate(setup.train[:5])
    kept = Attributor(model, bias=False, loss_fn=lm_loss, projection=projection, curvature="identity").features(batch)
    monkeypatch.setattr("airtrace.attribute.featurizer.DENSE_MATRIX_MAX_ENTRIES", 0)
    on_the_fly = Attributor(model, bias=False, loss_fn=lm_loss, projection=projection, curvature="identity").features(batch)
    assert kept.dtype == on_the_fly.dtype == torch.float32
    torch.testing.assert_close(kept, on_the_fly, rtol=1e-5, atol=1e-6 * float(on_the_fly.abs().max()))


def counting_lm_loss():
    """(calls, loss_fn): lm_loss that appends each batch's size to ``calls`` (one entry per forward)."""
    calls = []

    def loss_fn(model, batch):
        calls.append(batch["input_ids"].shape[0])
        return lm_loss(model, batch)

    return calls, loss_fn


def killed_after(batches, n):
    """The first ``n`` batches, then KeyboardInterrupt, like a run killed mid-way."""
    yield from batches[:n]
    raise KeyboardInterrupt("killed")


def test_featurize_resumes_after_an_interruption_to_an_identical_store(tmp_path):
    setup = lm_setup()
    batches = batched(setup, setup.train, "t")
    calls, counting_loss = counting_lm_loss()

    at = Attributor(setup.model, bias=False, loss_fn=counting_loss, projection=FACTORED, curvature="identity")
    kwargs = dict(dtype="bfloat16", rows_per_shard=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        at.featurize(killed_after(batches, 3), tmp_path / "resumed", **kwargs)
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(tmp_path / "resumed")
    calls.clear()
    resumed = at.featurize(batches, tmp_path / "resumed", **kwargs)
    assert sum(calls) < len(setup.train)  # the committed shards were skipped
    fresh = at.featurize(batches, tmp_path / "fresh", **kwargs)
    names = sorted(os.listdir(fresh.path))
    assert names == sorted(os.listdir(resumed.path))
    for name in names:
        with open(os.path.join(fresh.path, name), "rb") as a, open(os.path.join(resumed.path, name), "rb") as b:
            assert a.read() == b.read(), name
    assert resumed.meta["curvature"] is None and resumed.meta["projection"]["k_in"] == K_IN
    assert len(resumed) == len(setup.train) and resumed.dtype == torch.bfloat16


def test_featurize_again_on_a_finished_store_returns_it_without_a_forward_pass(tmp_path):
    setup = lm_setup()
    batches = batched(setup, setup.train, "t")
    calls, counting_loss = counting_lm_loss()

    at = Attributor(setup.model, bias=False, loss_fn=counting_loss, projection=FACTORED, curvature="identity")
    kwargs = dict(dtype="bfloat16", rows_per_shard=4, progress=False)
    first = at.featurize(batches, tmp_path / "s", **kwargs)
    before = {name: (tmp_path / "s" / name).read_bytes() for name in os.listdir(first.path)}
    calls.clear()
    again = at.featurize(batches, tmp_path / "s", **kwargs)
    assert calls == [] and again.ids == first.ids
    assert {name: (tmp_path / "s" / name).read_bytes() for name in os.listdir(again.path)} == before
    with pytest.raises(StoreError, match="dtype"):
        at.featurize(batches, tmp_path / "s", **{**kwargs, "dtype": "float32"})
    with pytest.raises(StoreError, match="lacks example id 'extra'"):
        at.featurize(batches + [(["extra"], batches[0][1])], tmp_path / "s", **kwargs)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fit_reuses_the_kfac_factors_featurize_accumulated(tmp_path, method):
    setup = lm_setup()
    batches = batched(setup, setup.train, "t")
    calls, counting_loss = counting_lm_loss()

    kwargs = dict(dtype="float32", rows_per_shard=4, progress=False)
    at = Attributor(setup.model, bias=False, loss_fn=counting_loss, projection=FACTORED, curvature=method)
    store = at.featurize(batches, tmp_path / "s", **kwargs)
    calls.clear()
    reused = at.fit(batches, store=store, progress=False)
    assert calls == []  # no K-FAC pass (and EK-FAC corrects from the store)
    fresh = Attributor(setup.model, bias=False, loss_fn=counting_loss, projection=FACTORED, curvature=method)
    from_sidecar = fresh.fit(batches, store=store, progress=False)
    assert calls == []  # another Attributor (process) reads the sums featurize left in the store's sidecar
    data = open(kfac_sidecar(store), "rb").read()
    open(kfac_sidecar(store), "wb").write(data[: len(data) // 2])
    reference = fresh.fit(batches, store=store, progress=False)
    assert sum(calls) == len(setup.train)  # a damaged sidecar is ignored: the K-FAC pass runs
    for fitted_curvature in (reused, from_sidecar):
        for name, inv in reference.inverses.items():
            for key, t in inv.tensors().items():
                got = fitted_curvature.inverses[name].tensors()[key]
                if key.startswith("eigvecs"):  # eigenvectors are defined up to sign
                    got, t = got.abs(), t.abs()
                torch.testing.assert_close(got, t, rtol=1e-9, atol=1e-12)


def test_a_resumed_featurize_leaves_the_kfac_pass_to_fit(tmp_path):
    setup = lm_setup()
    batches = batched(setup, setup.train, "t")
    calls, counting_loss = counting_lm_loss()

    at = Attributor(setup.model, bias=False, loss_fn=counting_loss, projection=FACTORED, curvature="kfac")
    kwargs = dict(dtype="float32", rows_per_shard=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        at.featurize(killed_after(batches, 2), tmp_path / "s", **kwargs)
    store = at.featurize(batches, tmp_path / "s", **kwargs)
    calls.clear()
    at.fit(batches, store=store, progress=False)
    assert sum(calls) == len(setup.train)  # the K-FAC pass ran: featurize saw only part of the store


def test_a_store_of_other_weights_or_projection_is_refused(stores):
    setup = mlp_setup()
    changed = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    other = Attributor(changed, bias=False, loss_fn=mlp_loss, projection=FACTORED, curvature="identity")
    with pytest.raises(StoreError, match="fingerprint"):
        other.score(batched(setup, setup.queries, "q"), stores["mlp"], progress=False)
    reseeded = attributor("mlp", "identity", dict(FACTORED, seed=SEED + 1))
    with pytest.raises(StoreError, match="projection"):
        reseeded.score(batched(setup, setup.queries, "q"), stores["mlp"], progress=False)
    rebuilt = Attributor.from_store(setup.model, stores["mlp"], loss_fn=mlp_loss, curvature="identity")
    assert rebuilt.projection == dict(FACTORED, type="factored")
    assert rebuilt.layers == attributor("mlp").layers


def test_usage_errors_are_clear(stores, tmp_path):
    setup = mlp_setup()
    with pytest.raises(ValueError, match="call fit"):
        attributor("mlp", "ekfac").score(batched(setup, setup.queries, "q"), stores["mlp"], progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        attributor("mlp", "ekfac").fit(iter(batched(setup, setup.train, "t")), progress=False)
    with pytest.raises(ValueError, match=r"\(B,\) per-example losses"):
        Attributor(setup.model, bias=False, loss_fn=lambda m, b: mlp_loss(m, b).sum(), projection=FACTORED).features(
            setup.train[0])
    with pytest.raises(ValueError, match="metric must be one of"):
        attributor("mlp", "identity").score([], stores["mlp"], metric="dot")
    with pytest.raises(ValueError, match="unknown factored projection keys"):
        attributor("mlp", projection=dict(k_in=2, k=3, type="factored"))
    fitted("mlp", "kfac", path=tmp_path / "curv.safetensors")
    with pytest.raises(ValueError, match="curvature covers"):
        attributor("mlp", projection=dict(FACTORED, k_in=2)).load_curvature(tmp_path / "curv.safetensors")


def test_scores_to_rows_skip_empty_slots(stores):
    scores = run_score(attributor("mlp", "identity"), "mlp", stores["mlp"], topk=30)
    assert scores.values.shape == (6, 30) and (scores.indices[:, 24:] == -1).all()
    rows = scores.to_rows()
    assert len(rows) == 6 * 24
    assert rows[0] == {"query_id": "q0", "order": "top", "rank": 1, "train_index": int(scores.indices[0, 0]),
                       "train_id": scores.ids[0][0], "score": float(scores.values[0, 0]), "metric": "inner"}
