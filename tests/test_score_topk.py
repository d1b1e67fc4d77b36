"""score_topk and merge_topk against the float64 reference."""

import pytest
import torch

from airtrace.ops import bounds
from airtrace.ops.merge_topk import merge_topk
from airtrace.ops.score_topk import normalized, reference, score_topk
from conftest import COMPILED_DTYPES, HALF_DTYPES, assert_topk_within_bound, few_triton_programs

SHAPES = [(1, 1, 1, 1), (3, 50, 7, 5), (5, 300, 16, 10), (2, 129, 33, 40)]  # (q, n, k, topk)
# Two or more of every tile of each backend's kernel, (q, n, k, topk):
# - torch: the reference scores tile = 8192 rows at a time -> n = 8300 takes 2 tiles.
# - cpu (csrc/cpu/score_topk.cpp): kTileRows = 192 -> 44 row tiles shared by the threads (per-thread heaps merged);
#   kDepth = 256 -> k = 260 takes 2 feature blocks; kPanel = 64 -> q = 65 takes 2 query panels.
# - cuda (csrc/cuda/score_topk.cu): kTile = 64 -> 2 query tiles and 130 row tiles; kDepth = 16 -> 17 steps;
#   kCandidates = 2048 -> 5 selection segments. test_gpu.py adds n = 260000 (2 chunks of 2^24 / q rows).
# - triton (kernels/score_topk.py) with PROGRAMS = 4: BLOCK_Q = 64 -> 2 query blocks; BLOCK_K = 32 -> 2 steps;
#   BLOCK_N = 32 and 2 chunks of 64 rows -> 2 row tiles per program, chunks merged.
MULTI_TILE = {"torch": (65, 8300, 260, 10), "cpu": (65, 8300, 260, 10), "cuda": (65, 8300, 260, 10),
              "triton": (65, 97, 33, 10)}
TRITON_PROGRAMS = 4


def _inputs(q, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, k, generator=g), torch.randn(n, k, generator=g).to(dtype)


@pytest.mark.parametrize("q,n,k,topk", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_matches_float64_scores(backend, device, q, n, k, topk, dtype, normalize):
    Q, X = _inputs(q, n, k, dtype)
    values, indices = score_topk(Q.to(device), X.to(device), topk, normalize, index_offset=1000, backend=backend)
    assert values.shape == (q, topk) and values.dtype == torch.float32 and indices.dtype == torch.int64
    assert_topk_within_bound(values, indices, bounds.scores(Q, X, normalize), index_offset=1000)


@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_multi_tile_matches_float64_scores(backend, device, dtype, normalize, monkeypatch):
    if backend == "triton":
        few_triton_programs(monkeypatch, "score_topk", TRITON_PROGRAMS)
    q, n, k, topk = MULTI_TILE[backend]
    Q, X = _inputs(q, n, k, dtype, seed=1)
    values, indices = score_topk(Q.to(device), X.to(device), topk, normalize, index_offset=7, backend=backend)
    assert_topk_within_bound(values, indices, bounds.scores(Q, X, normalize), index_offset=7)


def _half(t, dtype):
    return t.to(dtype).float()


def _top(s, topk):
    values, indices = torch.topk(s, min(topk, s.shape[1]), dim=1)
    return values, indices


# Three precision bugs a kernel could have, emulated in torch; float32 math everywhere else.
MUTATIONS = {
    # the score tile kept in the 16-bit dtype of X before the top-k
    "16-bit intermediates": lambda Q, X, topk, cos, d: _top(_half(
        (normalized(Q) if cos else Q) @ (normalized(X.float()) if cos else X.float()).T, d), topk),
    # float32 promised, the values rounded to 16 bits
    "16-bit output": lambda Q, X, topk, cos, d: (lambda v, i: (_half(v, d), i))(*reference(Q, X, topk, cos)),
    # the queries cast to X's 16-bit dtype instead of float32
    "16-bit projection matrices": lambda Q, X, topk, cos, d: reference(_half(Q, d), X, topk, cos),
}


@pytest.mark.parametrize("q,n,k,topk", SHAPES[1:] + [MULTI_TILE["cpu"]], ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("bug", MUTATIONS)
def test_bound_rejects_precision_bugs(bug, dtype, normalize, q, n, k, topk):
    """The bound fails a kernel with the bug on the shapes the backends are checked on (not SHAPES[0], one score)."""
    Q, X = _inputs(q, n, k, dtype)
    expected = bounds.scores(Q, X, normalize)
    assert bounds.topk_excess(*reference(Q, X, topk, normalize), expected) <= 1  # the bug-free float32 computation
    assert bounds.topk_excess(*MUTATIONS[bug](Q, X, topk, normalize, dtype), expected) > 1


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
