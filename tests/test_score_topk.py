"""score_topk and merge_topk against the float64 reference."""

import pytest
import torch

from airtrace.ops.merge_topk import merge_topk
from airtrace.ops.score_topk import reference, score_topk
from conftest import COMPILED_DTYPES, TOLERANCE

SHAPES = [(1, 1, 1, 1), (3, 50, 7, 5), (5, 300, 16, 10), (2, 129, 33, 40)]  # (q, n, k, topk)


def _inputs(q, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, k, generator=g), torch.randn(n, k, generator=g).to(dtype)


def _check_topk(values, indices, Q, X, topk, normalize, dtype, index_offset=0):
    """Returned indices are a true top-k and their values are the exact scores."""
    Q64, X64 = Q.double(), X.cpu().double()
    if normalize:
        Q64 = Q64 / Q64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        X64 = X64 / X64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scores = Q64 @ X64.T  # (q, n)
    values, indices = values.cpu().double(), indices.cpu()
    n = X.shape[0]
    filled = min(topk, n)
    assert torch.all(indices[:, filled:] == -1) and torch.all(values[:, filled:] == float("-inf"))
    local = indices[:, :filled] - index_offset
    assert torch.all((local >= 0) & (local < n))
    assert all(len(set(row.tolist())) == filled for row in local), "duplicate indices"
    tol = TOLERANCE[dtype] * scores.abs().max()
    true_values = scores.gather(1, local)
    assert (values[:, :filled] - true_values).abs().max() <= tol
    kth_best = scores.topk(filled, dim=1).values
    assert torch.all(true_values >= kth_best - tol), "an index outside the true top-k was returned"
    assert torch.all(values[:, :filled].diff(dim=1) <= 0), "values not sorted descending"


@pytest.mark.parametrize("q,n,k,topk", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_matches_float64_scores(backend, device, q, n, k, topk, dtype, normalize):
    Q, X = _inputs(q, n, k, dtype)
    values, indices = score_topk(Q.to(device), X.to(device), topk, normalize, index_offset=1000, backend=backend)
    assert values.shape == (q, topk) and indices.dtype == torch.int64
    _check_topk(values, indices, Q, X, topk, normalize, dtype, index_offset=1000)


def test_equal_scores_are_ordered_by_lower_index(backend, device):
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    Q = torch.tensor([[1.0, 0.0]])
    values, indices = score_topk(Q.to(device), X.to(device), 5, backend=backend)
    assert indices.cpu().tolist() == [[1, 4, 0, 2, 5]]
    assert values.cpu().tolist() == [[2.0, 2.0, 1.0, 1.0, 1.0]]


def test_zero_rows_score_zero_under_cosine(backend, device):
    X = torch.tensor([[0.0, 0.0], [3.0, 4.0], [-1.0, 0.0]])
    values, indices = score_topk(torch.tensor([[1.0, 0.0]], device=device), X.to(device), 3, normalize=True, backend=backend)
    assert indices.cpu().tolist() == [[1, 0, 2]]
    torch.testing.assert_close(values.cpu(), torch.tensor([[0.6, 0.0, -1.0]]))


def test_large_magnitudes_keep_their_order(backend, device):
    X = torch.tensor([[1e30], [-1e30], [3e30], [1e-30]])
    values, indices = score_topk(torch.tensor([[2.0]], device=device), X.to(device), 4, backend=backend)
    assert indices.cpu().tolist() == [[2, 0, 3, 1]]


def test_reference_never_builds_the_full_matrix(monkeypatch):
    """The reference works tile by tile: no matmul ever sees more than `tile` rows."""
    seen = []
    real_topk = torch.topk

    def spy(x, *args, **kwargs):
        seen.append(x.shape[1])
        return real_topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    Q, X = _inputs(2, 1000, 4, torch.float32)
    reference(Q, X, 5, tile=128)
    assert max(seen) == 128 + 5


def test_shards_merge_to_the_whole(backend, device):
    Q, X = _inputs(4, 230, 12, torch.float32, seed=2)
    Q, X = Q.to(device), X.to(device)
    parts = [(0, 100), (100, 101), (101, 230)]
    results = [score_topk(Q, X[a:b], 8, index_offset=a, backend=backend) for a, b in parts]
    merged = merge_topk([v for v, _ in results], [i for _, i in results], 8)
    whole = score_topk(Q, X, 8, backend=backend)
    assert torch.equal(merged[1], whole[1])
    torch.testing.assert_close(merged[0], whole[0])


def test_merge_pads_when_shards_hold_fewer_than_topk():
    v, i = merge_topk([torch.tensor([[3.0]]), torch.tensor([[5.0]])], [torch.tensor([[0]]), torch.tensor([[9]])], 3)
    assert i.tolist() == [[9, 0, -1]] and v[0, :2].tolist() == [5.0, 3.0] and v[0, 2] == float("-inf")


def test_empty_store_gives_padding():
    values, indices = score_topk(torch.randn(2, 3), torch.randn(0, 3), 4)
    assert torch.all(indices == -1) and torch.all(values == float("-inf"))


@pytest.mark.parametrize(
    "Q, X, topk, message",
    [
        (torch.randn(2, 3), torch.randn(5, 4), 1, r"must share k, got Q \(2, 3\) and X \(5, 4\)"),
        (torch.randn(3), torch.randn(5, 3), 1, "Q must be 2-D"),
        (torch.randn(2, 3), torch.randn(5, 3), 0, "topk must be a positive int"),
        (torch.randn(2, 3), torch.randn(5, 3).int(), 1, "X must be a float32"),
    ],
)
def test_bad_input_names_the_argument(Q, X, topk, message):
    with pytest.raises(ValueError, match=message):
        score_topk(Q, X, topk)


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"values\[0\] and indices\[0\] must both be"):
        merge_topk([torch.zeros(2, 3)], [torch.zeros(2, 4, dtype=torch.int64)], 2)
