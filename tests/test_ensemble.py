"""Ensembles: score_ensemble is the (weighted) sum of each member's own score matrix, rows matched by id, and refuses
members that disagree."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from airtrace import Attributor
from airtrace.attribute import score_ensemble
from airtrace.capture import per_example_loss

N, Q, D, C = 18, 4, 5, 3
PROJECTION = dict(k_in=3, k_out=2, seed=4)


def loss_fn(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N + Q, D, generator=g), torch.randint(C, (N + Q,), generator=g)


def batches(x, y, order, prefix="t"):
    return [([f"{prefix}{i}" for i in order[s: s + 5]], {"x": x[order[s: s + 5]], "y": y[order[s: s + 5]]})
            for s in range(0, len(order), 5)]


def member(seed, tmp_path, order, curvature="ekfac"):
    """An Attributor on an MLP from ``seed`` with its curvature fitted, and its store written in row ``order``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))
    x, y = data()
    at = Attributor(model, loss_fn=loss_fn, projection=PROJECTION, curvature=curvature)
    train = batches(x, y, order)
    store = at.featurize(train, tmp_path / f"store-{seed}", dtype="float32", progress=False)
    if curvature != "identity":
        at.fit(train, store=store, progress=False)
    return at, store


def matrix(at, store, queries, tmp_path, name):
    """The member's own (q, n) scores, columns by training id."""
    at.score(queries, store, topk=1, full_matrix_path=tmp_path / name, progress=False)
    return {i: col for i, col in zip(store.ids, load_file(str(tmp_path / name))["scores"].double().T)}


def test_the_ensemble_is_the_weighted_sum_of_its_members_matched_by_id(tmp_path):
    x, y = data()
    queries = batches(x, y, list(range(N, N + Q)), prefix="q")
    shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
    members = [member(0, tmp_path, list(range(N))), member(1, tmp_path, shuffled),
               member(2, tmp_path, list(range(N)), "identity")]
    own = [matrix(at, store, queries, tmp_path, f"m{k}.safetensors") for k, (at, store) in enumerate(members)]
    ids = members[0][1].ids
    for weights in (None, [0.5, -2.0, 3.0]):
        w = weights or [1 / 3] * 3
        expected = torch.stack([sum(wk * m[i] for wk, m in zip(w, own)) for i in ids], dim=1)  # (q, n)
        scores = score_ensemble(members, queries, topk=N, weights=weights, full_matrix_path=tmp_path / "e.safetensors",
                                progress=False)
        combined = load_file(str(tmp_path / "e.safetensors"))["scores"]
        torch.testing.assert_close(combined, expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(scores.values, expected.sort(dim=1, descending=True).values, rtol=1e-6, atol=1e-9)
        assert scores.ids[0][0] == ids[int(expected[0].argmax())] and scores.query_ids == [f"q{i}" for i in
                                                                                            range(N, N + Q)]
    # each member's own top-1 differs from the ensemble's somewhere: the average is not one member's ranking
    assert any(int(torch.stack([own[0][i] for i in ids], 1)[q].argmax()) != int(expected[q].argmax())
               or int(torch.stack([own[1][i] for i in ids], 1)[q].argmax()) != int(expected[q].argmax())
               for q in range(Q))


def test_members_that_disagree_are_refused(tmp_path):
    x, y = data()
    queries = batches(x, y, list(range(N, N + Q)), prefix="q")
    a = member(0, tmp_path, list(range(N)), "identity")
    b_model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))
    b = Attributor(b_model, loss_fn=loss_fn, projection=PROJECTION, curvature="identity")
    fewer = b.featurize(batches(x, y, list(range(N - 1))), tmp_path / "fewer", progress=False)
    with pytest.raises(ValueError, match="member 1: the store .* holds other training examples"):
        score_ensemble([a, (b, fewer)], queries, progress=False)
    with pytest.raises(ValueError, match="weights must be 1 finite numbers"):
        score_ensemble([a], queries, weights=[1.0, 2.0], progress=False)
    with pytest.raises(ValueError, match="members must hold at least one"):
        score_ensemble([], queries, progress=False)
