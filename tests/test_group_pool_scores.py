"""group_pool_scores (AirRep attention pooling over groups) against float64 references."""

import functools
import math

import pytest
import torch

from airtrace.ops import bounds
from airtrace.ops.group_pool_scores import group_pool_scores, reference
from conftest import COMPILED_DTYPES, HALF_DTYPES, assert_within_bound, exceeds_bound

# (q, n, d, sizes of the random groups); every case also gets the special groups of _groups.
SHAPES = [(1, 5, 1, [2]), (3, 40, 7, [5, 0, 17]), (5, 120, 33, [40, 1, 150, 9, 0, 33]), (70, 90, 65, [70, 3, 20])]
LARGE_Q = (300, 200, 33, [150, 60, 7, 0, 90, 130])  # several query blocks on the CPU backend
# Two or more of every tile of each backend's kernel, (q, n, d, group sizes):
# - torch: the reference gathers ranges of about tile = 8192 members -> 9002 members take 2 ranges.
# - cpu (csrc/cpu/group_pool_scores.cpp): kPanel = 64, kMaxQueryBlock = 256 -> q = 300 takes 5 panels in 2 query
#   blocks; kDepth = 256 -> d = 260 takes 2 feature blocks; kTileRows = 128 -> the groups of 1100, 150 and 130
#   members span several tiles (softmax state carried over); kBlockMembers = 1024 -> the 1100-member group forms a
#   block of its own; kBlockGroups = 4096 -> the 4100 extra groups (0 or 1 member) make 2 group blocks.
# - cuda (csrc/cuda/group_pool_scores.cu): kTile = 64 -> 5 query tiles, the large groups several member tiles;
#   kDepth = 16 -> 17 steps; 4100+ groups fill the GPU (one split). test_gpu.py adds few groups (the split path:
#   a group's member tiles shared by blocks, then merged).
# - triton (kernels/group_pool_scores.py): BLOCK_Q = 64 -> 2 query blocks; BLOCK_K = 32 -> 2 steps; BLOCK_M = 32
#   -> the 70-member group takes 3 member blocks (running softmax carried over).
MANY_GROUPS = [1100, 150, 60, 7, 0, 90, 130] + [0, 1] * 2050
MULTI_TILE = {"torch": (3, 100, 5, [5000, 4000]), "cpu": (300, 1500, 260, MANY_GROUPS),
              "cuda": (300, 1500, 260, MANY_GROUPS), "triton": (65, 90, 40, [70, 3, 20, 0, 33])}


def _groups(n: int, sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR groups: an empty group first and last, a singleton, a row repeated three times,
    a copy of the first random group (overlap), and random groups (drawn with replacement)."""
    g = torch.Generator().manual_seed(seed)
    random_groups = [torch.randint(0, n, (size,), generator=g) for size in sizes]
    groups = [
        torch.tensor([], dtype=torch.int64),
        torch.tensor([n - 1]),
        torch.tensor([0, 0, 0]),
        *random_groups,
        random_groups[0].flip(0),
        torch.tensor([], dtype=torch.int64),
    ]
    offsets = torch.tensor([0] + [len(x) for x in groups]).cumsum(0)
    return offsets, torch.cat(groups)


def _inputs(q, n, d, sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(q, d, generator=g).to(dtype)
    X = torch.randn(n, d, generator=g).to(dtype)
    return (Q, X, *_groups(n, sizes, seed))


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _brute_force(Q: torch.Tensor, X: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """The formula, one query and one group at a time, in Python floats (float64)."""
    out = torch.zeros(Q.shape[0], offsets.numel() - 1, dtype=torch.float64)
    for x in range(Q.shape[0]):
        for g in range(offsets.numel() - 1):
            rows = members[offsets[g] : offsets[g + 1]].tolist()
            s = [sum(float(a) * float(b) for a, b in zip(Q[x], X[i])) for i in rows]
            if s:
                peak = max(abs(v) for v in s)
                w = [math.exp(abs(v) - peak) for v in s]
                out[x, g] = sum(wi * v for wi, v in zip(w, s)) / sum(w)
    return out


@pytest.mark.parametrize("q,n,d,sizes", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_matches_float64_reference(backend, device, q, n, d, sizes, dtype):
    Q, X, offsets, members = _inputs(q, n, d, sizes, dtype)
    out = group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend)
    assert out.dtype == torch.float32 and out.device.type == device.type
    assert_within_bound(out, bounds.group_pool_scores(Q, X, offsets, members))


@functools.lru_cache(maxsize=None)
def _multi_tile(backend: str, dtype: torch.dtype):
    """Inputs and their Expected (cached: the CPU variants share them)."""
    q, n, d, sizes = MULTI_TILE[backend]
    Q, X, offsets, members = _inputs(q, n, d, sizes, dtype, seed=6)
    return (Q, X, offsets, members), bounds.group_pool_scores(Q, X, offsets, members)


@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_multi_tile_matches_float64_reference(backend, device, dtype):
    inputs, expected = _multi_tile(backend, dtype)
    assert_within_bound(group_pool_scores(*_on(device, *inputs), backend=backend), expected)


def _half(t, dtype):
    return t.to(dtype).float()


def _pool_16bit_scores(Q, X, offsets, members, dtype):
    """The formula with each member score rounded to ``dtype`` before the softmax pooling."""
    out = torch.zeros(Q.shape[0], offsets.numel() - 1)
    for g in range(offsets.numel() - 1):
        rows = members[offsets[g] : offsets[g + 1]]
        if rows.numel():
            s = _half(Q.float() @ X[rows].float().T, dtype)
            out[:, g] = (torch.softmax(s.abs(), dim=1) * s).sum(1)
    return out


# Three precision bugs a kernel could have, emulated in torch; float32 math everywhere else.
MUTATIONS = {
    "16-bit intermediates": _pool_16bit_scores,  # the member scores kept in the 16-bit dtype of train
    # float32 promised, the result rounded to 16 bits
    "16-bit output": lambda Q, X, offsets, members, d: _half(reference(Q, X, offsets, members), d),
    # the queries cast to train's 16-bit dtype instead of float32
    "16-bit projection matrices": lambda Q, X, offsets, members, d: reference(_half(Q, d), X, offsets, members),
}


@pytest.mark.parametrize("q,n,d,sizes", SHAPES[1:], ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("bug", MUTATIONS)
def test_bound_rejects_precision_bugs(bug, dtype, q, n, d, sizes):
    """The bound fails a kernel with the bug on the shapes the backends are checked on (not SHAPES[0], d = 1)."""
    _, X, offsets, members = _inputs(q, n, d, sizes, dtype)
    Q = torch.randn(q, d, generator=torch.Generator().manual_seed(1))  # float32, as the op computes with
    expected = bounds.group_pool_scores(Q, X, offsets, members)
    assert_within_bound(reference(Q, X, offsets, members), expected)  # the bug-free float32 computation passes
    assert exceeds_bound(MUTATIONS[bug](Q, X, offsets, members, dtype), expected)


@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_many_queries_and_groups_spanning_tiles(backend, device, dtype):
    if backend == "triton" and device.type == "cpu":
        pytest.skip("too large for the Triton CPU interpreter; the small shapes cover the kernel")
    q, n, d, sizes = LARGE_Q
    Q, X, offsets, members = _inputs(q, n, d, sizes, dtype, seed=3)
    expected = bounds.group_pool_scores(Q, X, offsets, members)
    assert_within_bound(group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend), expected)


def test_many_small_groups(backend, device):
    """Enough (group, query tile) pairs to fill a GPU without splitting groups across blocks."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip("too many programs for the Triton CPU interpreter; the small shapes cover the kernel")
    g = torch.Generator().manual_seed(4)
    Q, X = torch.randn(70, 9, generator=g), torch.randn(50, 9, generator=g)
    sizes = torch.randint(0, 4, (1500,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    members = torch.randint(0, 50, (int(offsets[-1]),), generator=g)
    out = group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend)
    assert_within_bound(out, bounds.group_pool_scores(Q, X, offsets, members))


def _exact_inputs(big: float, scale: float, dtype: torch.dtype, q=4, n=60, d=5, seed=1):
    """float32 queries and `dtype` train rows whose scores s = scale * (big * a + b), a in {+-2, +-3},
    |b| <= 36, are exact in fp32 accumulation, so only the pooling itself can err: |s| ~ 3 big
    scale, with near-ties that give non-trivial weights (unless big swamps b)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randint(-3, 4, (q, d), generator=g).double()
    X = torch.randint(-3, 4, (n, d), generator=g).double()
    Q[:, 0] = big * (2 * torch.randint(0, 2, (q,), generator=g) - 1)
    X[:, 0] = torch.randint(2, 4, (n,), generator=g) * (2 * torch.randint(0, 2, (n,), generator=g) - 1)
    offsets, members = _groups(n, [12, 30, 5], seed)
    return (Q * scale).float(), X.to(dtype), offsets, members


@pytest.mark.parametrize("big,scale", [(4096.0, 1.0), (4.0, 2.0**-20), (2.0**100, 1.0)], ids=["1e4", "1e-6", "1e30"])
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_very_large_and_very_small_scores(backend, device, big, scale, dtype):
    Q, X, offsets, members = _exact_inputs(big, scale, dtype)
    expected = bounds.group_pool_scores(Q, X, offsets, members)
    assert torch.isfinite(expected.reference).all()
    out = group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend)
    assert torch.isfinite(out).all()
    assert_within_bound(out, expected)  # exact scores: the pooling's error only


def test_hand_computed_groups(backend, device):
    Q, X = torch.tensor([[1.0]]), torch.tensor([[1.0], [2.0], [-3.0]])
    offsets, members = torch.tensor([0, 2, 2, 4, 5, 8]), torch.tensor([0, 1, 2, 2, 2, 0, 1, 2])
    e = math.e
    expected = [
        (e * 1 + e**2 * 2) / (e + e**2),  # {0, 1}
        0.0,  # empty
        -3.0,  # {2, 2}: a repeated row
        -3.0,  # {2}
        (e * 1 + e**2 * 2 - e**3 * 3) / (e + e**2 + e**3),  # {0, 1, 2}
    ]
    out = group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend)
    torch.testing.assert_close(out.cpu().double(), torch.tensor([expected], dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the Triton interpreter
def test_non_finite_scores_give_nan_for_their_group_only(backend, device):
    Q, X = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [float("inf"), 1.0]])
    offsets, members = torch.tensor([0, 2, 3, 4, 5]), torch.tensor([0, 1, 0, 2, 0])
    out = group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend).cpu()
    assert torch.isnan(out[0, 0]) and torch.isnan(out[0, 2])
    assert out[0, 1] == 1.0 and out[0, 3] == 1.0


def test_reference_equals_brute_force_loop():
    Q, X, offsets, members = _inputs(3, 12, 5, [4, 7], torch.float64, seed=5)
    Q = Q * 3  # |s| up to ~30: far from uniform weights
    expected = _brute_force(Q, X, offsets, members)
    torch.testing.assert_close(reference(Q, X, offsets, members), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(group_pool_scores(Q, X, offsets, members), expected, rtol=1e-12, atol=1e-12)


def test_reference_tiles_do_not_change_the_result():
    Q, X, offsets, members = _inputs(4, 50, 6, [30, 2, 11, 0, 25], torch.float64, seed=2)
    whole = reference(Q, X, offsets, members)
    torch.testing.assert_close(reference(Q, X, offsets, members, tile=7), whole, rtol=1e-12, atol=1e-12)


def test_float64_inputs_run_on_the_reference():
    Q, X, offsets, members = _inputs(2, 10, 3, [4], torch.float64)
    out = group_pool_scores(Q, X, offsets, members)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(Q, X, offsets, members))


def test_compiled_backend_rejects_float64(backend):
    if backend == "torch":
        pytest.skip("the reference takes float64")
    Q, X, offsets, members = _inputs(2, 10, 3, [4], torch.float64)
    device = "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"
    with pytest.raises(ValueError, match="group_pool_scores: backend .* supports float32"):
        group_pool_scores(*_on(device, Q, X, offsets, members), backend=backend)


def test_degenerate_sizes_give_zeros():
    X = torch.randn(4, 3)
    assert group_pool_scores(torch.randn(0, 3), X, torch.tensor([0, 1]), torch.tensor([2])).shape == (0, 1)
    assert group_pool_scores(torch.randn(2, 3), X, torch.tensor([0]), torch.tensor([], dtype=torch.int64)).shape == (2, 0)
    out = group_pool_scores(torch.randn(2, 3), X, torch.tensor([0, 0, 0]), torch.tensor([], dtype=torch.int64))
    assert torch.equal(out, torch.zeros(2, 2))


Q3, X3 = torch.randn(2, 3), torch.randn(5, 3)


@pytest.mark.parametrize(
    "queries, train, offsets, members, message",
    [
        (Q3, X3, torch.tensor([0, 3, 2, 4]), torch.tensor([0, 1, 2, 3]),
         r"offsets must be non-decreasing, got offsets\[1\] = 3 > offsets\[2\] = 2"),
        (Q3, X3, torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2, 3]),
         r"offsets\[-1\] must equal len\(members\) = 4, got 3"),
        (Q3, X3, torch.tensor([1, 4]), torch.tensor([0, 1, 2, 3]), r"offsets\[0\] must be 0, got 1"),
        (Q3, X3, torch.tensor([], dtype=torch.int64), torch.tensor([0]), r"offsets must hold G \+ 1 >= 1 entries"),
        (Q3, X3, torch.tensor([[0, 1]]), torch.tensor([0]), r"offsets must be 1-D, got shape \(1, 2\)"),
        (Q3, X3, torch.tensor([0, 2]), torch.tensor([0, 5]),
         r"members must be row indices of train in \[0, n=5\), got values from 0 to 5"),
        (Q3, X3, torch.tensor([0, 2]), torch.tensor([-1, 2]), r"members must be row indices of train in \[0, n=5\)"),
        (Q3, X3, torch.tensor([0, 2]), torch.tensor([0.0, 1.0]),
         r"members must be an integer \(int64\) tensor, got torch.float32"),
        (Q3, torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor([0]),
         r"queries \(q, d\) and train \(n, d\) must share d, got queries \(2, 3\) and train \(5, 4\)"),
        (torch.randn(3), X3, torch.tensor([0, 1]), torch.tensor([0]), r"queries must be 2-D, got shape \(3,\)"),
        (Q3, torch.randn(5, 3, 1), torch.tensor([0, 1]), torch.tensor([0]), r"train must be 2-D, got shape \(5, 3, 1\)"),
        (Q3, X3.int(), torch.tensor([0, 1]), torch.tensor([0]), r"train must be a float32/bfloat16/float16/float64 tensor"),
    ],
    ids=["not-monotone", "last-not-nnz", "first-not-0", "empty-offsets", "offsets-2d", "member-too-large",
         "member-negative", "float-members", "dim-mismatch", "queries-1d", "train-3d", "int-train"],
)
def test_bad_input_names_the_argument(queries, train, offsets, members, message):
    with pytest.raises(ValueError, match=message):
        group_pool_scores(queries, train, offsets, members)


def test_non_tensor_offsets_are_rejected():
    with pytest.raises(TypeError, match="offsets must be a torch.Tensor, got list"):
        group_pool_scores(Q3, X3, [0, 1], torch.tensor([0]))
