"""project_dense: the implicit matrix is the same on every backend, value for value."""

import math

import pytest
import torch

from airtrace.ops import bounds
from airtrace.ops import hash as rhash
from airtrace.ops.hash import dense_entries
from airtrace.ops.project_dense import project_dense, reference
from conftest import COMPILED_DTYPES, HALF_DTYPES, assert_within_bound, exceeds_bound, few_triton_programs

M32 = 0xFFFFFFFF


def mix32_int(x: int) -> int:
    """lowbias32 on Python ints: the recipe written independently of the torch emulation."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def entry_int(seed: int, row: int, col: int, k: int) -> float:
    skey = mix32_int(seed ^ 0x9E3779B9)
    rkey = mix32_int(mix32_int(skey ^ (row >> 32)) ^ (row & M32))
    ckey = mix32_int((col * 0x9E3779B9 + 0x632BE5AB) & M32)
    return (-1.0 if mix32_int(rkey ^ ckey) >> 31 else 1.0) / math.sqrt(k)


def test_reference_hash_matches_plain_integer_recipe():
    rows = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 11]
    got = dense_entries(torch.tensor(rows), 6, seed=2**32 - 3)
    want = torch.tensor([[entry_int(2**32 - 3, r, c, 6) for c in range(6)] for r in rows], dtype=torch.float64)
    assert torch.equal(got, want)


def test_mix32_is_a_bijection_on_a_sample():
    x = torch.arange(0, 1 << 16, dtype=torch.int64) * 65537
    assert torch.unique(rhash.mix32(x)).numel() == x.numel()


def _identity_rows(p, dtype, device):
    return torch.eye(p, dtype=dtype, device=device)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("row_offset", [0, 2**31 - 3, 2**32 + 5], ids=["0", "2^31-3", "2^32+5"])
@pytest.mark.parametrize("k", [6, 7, 9])  # 1/sqrt(6), 1/sqrt(7) round differently in float and double
def test_entries_equal_reference_matrix(backend, device, kind, row_offset, k):
    """Projecting identity rows returns the matrix itself: compare entries one by one."""
    p = 6
    out = project_dense(_identity_rows(p, torch.float32, device), k, seed=12345, kind=kind, row_offset=row_offset, backend=backend)
    entries = dense_entries(torch.arange(row_offset, row_offset + p), k, 12345, kind)
    if kind == "rademacher":
        assert torch.equal(out.cpu().double(), entries.float().double())
    else:
        torch.testing.assert_close(out.cpu().double(), entries, rtol=2e-6, atol=2e-7)


def test_rows_past_2_32_are_not_aliased():
    low = dense_entries(torch.arange(5, 10), 64, 7)
    high = dense_entries(torch.arange(2**32 + 5, 2**32 + 10), 64, 7)
    assert not torch.equal(low, high)


SHAPES = [(1, 1, 1), (3, 37, 5), (4, 130, 33), (2, 300, 64)]  # (B, p, k)
# Two or more of every tile of each backend's kernel, (B, p, k):
# - torch: the reference generates rows_per_chunk = 4096 rows of R at a time -> p = 4200 takes 2 chunks.
# - cpu (csrc/cpu/project_dense.cpp): p = 400 rows split over the threads, each range in chunks of kChunkRows = 96;
#   k = 130 in blocks of kBlockCols = 64 (the last a partial Box-Muller unit of kPairUnit = 32); B = 33 rows of X
#   in several micro-kernel row blocks.
# - cuda (csrc/cuda/project_dense.cu): k = 257 -> 2 tiles of kTileCols = 256; B = 33 -> 2 batch tiles of 32;
#   p = 20000 -> 2 or more steps of kRows = 64 per block once the grid holds 8 blocks per SM (up to 264 SMs).
# - triton (kernels/project_dense.py) with PROGRAMS = 8: BLOCK_B = 32 -> 2, BLOCK_K = 64 -> 2, BLOCK_P = 32 and 2
#   row splits of 96 -> 3 row blocks per program, partial sums added.
MULTI_TILE = {"torch": (3, 4200, 7), "cpu": (33, 400, 130), "cuda": (33, 20000, 257), "triton": (33, 129, 65)}
TRITON_PROGRAMS = 8


def _x(B, p, dtype, seed=None):
    return torch.randn(B, p, generator=torch.Generator().manual_seed(p if seed is None else seed)).to(dtype)


@pytest.mark.parametrize("B,p,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_matches_float64_reference(backend, device, B, p, k, dtype, kind):
    X = _x(B, p, dtype)
    out = project_dense(X.to(device), k, seed=99, kind=kind, row_offset=17, backend=backend)
    assert out.dtype == torch.float32
    assert_within_bound(out, bounds.project_dense(X, k, 99, kind, row_offset=17))


@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_multi_tile_matches_float64_reference(backend, device, dtype, kind, monkeypatch):
    if backend == "triton":
        few_triton_programs(monkeypatch, "project_dense", TRITON_PROGRAMS)
    B, p, k = MULTI_TILE[backend]
    X = _x(B, p, dtype, seed=1)
    out = project_dense(X.to(device), k, seed=5, kind=kind, row_offset=2**32 - 50, backend=backend)
    assert_within_bound(out, bounds.project_dense(X, k, 5, kind, row_offset=2**32 - 50))


def _half(t, dtype):
    return t.to(dtype).float()


def _entries(p, k, kind):
    return dense_entries(torch.arange(17, 17 + p), k, 99, kind, dtype=torch.float32)


# Three precision bugs a kernel could have, emulated in torch; float32 math everywhere else.
MUTATIONS = {
    # the partial sums of each block of 32 rows (Triton's BLOCK_P) kept in the 16-bit input dtype
    "16-bit intermediates": lambda X, k, kind, d: sum(
        _half(X[:, i:i + 32].float() @ _entries(X.shape[1], k, kind)[i:i + 32], d) for i in range(0, X.shape[1], 32)),
    # float32 promised, the result rounded to 16 bits
    "16-bit output": lambda X, k, kind, d: _half(reference(X, k, 99, kind, 17), d),
    # the entries of R generated in the 16-bit input dtype
    "16-bit projection matrices": lambda X, k, kind, d: X.float() @ _half(_entries(X.shape[1], k, kind), d),
}


@pytest.mark.parametrize("B,p,k", SHAPES[1:], ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("bug", MUTATIONS)
def test_bound_rejects_precision_bugs(bug, dtype, B, p, k):
    """The bound fails a kernel with the bug on the shapes the backends are checked on (not SHAPES[0], a single
    product that a rounding may leave exact). Gaussian entries: Rademacher entries in 16 bits differ from float32
    only by one common scale, 1/sqrt(k) rounded, which for k = 64 is exact."""
    X = _x(B, p, dtype)
    expected = bounds.project_dense(X, k, 99, "gaussian", row_offset=17)
    assert_within_bound(reference(X, k, 99, "gaussian", 17), expected)  # the bug-free float32 computation passes
    assert exceeds_bound(MUTATIONS[bug](X, k, "gaussian", dtype), expected)


def test_blocks_equal_their_concatenation(backend, device):
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(3, p, generator=g).to(device) for p in (5, 1, 12, 7)]
    split = project_dense(blocks, 16, seed=4, backend=backend)
    whole = project_dense(torch.cat(blocks, dim=1), 16, seed=4, backend=backend)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_strided_rows_are_read_in_place(backend, device):
    X = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)).to(device)
    view = X[:, 10:30]  # row stride 50, not contiguous
    out = project_dense(view, 8, seed=1, backend=backend)
    torch.testing.assert_close(out, project_dense(view.contiguous(), 8, seed=1, backend=backend))


def test_different_seeds_give_different_matrices():
    X = torch.eye(8)
    assert not torch.equal(project_dense(X, 8, seed=1), project_dense(X, 8, seed=2))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_have_mean_zero_and_variance_one_over_k(kind):
    k = 256
    entries = dense_entries(torch.arange(4000), k, seed=11, kind=kind)  # 1,024,000 entries
    assert abs(entries.mean().item()) < 5 / math.sqrt(entries.numel()) / math.sqrt(k)
    assert entries.var().item() * k == pytest.approx(1.0, abs=0.01)
    if kind == "gaussian":  # kurtosis of a normal is 3, of a Rademacher variable 1
        z = entries * math.sqrt(k)
        assert (z**4).mean().item() == pytest.approx(3.0, abs=0.05)


def test_inner_products_preserved_within_jl_bounds():
    """Johnson-Lindenstrauss: |<Px,Py> - <x,y>| <= eps |x||y| with eps ~ 4/sqrt(k) for all pairs."""
    g = torch.Generator().manual_seed(0)
    n, p, k = 40, 2000, 1024
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    X[1] = X[0] + 0.1 * X[1]  # a correlated pair
    for kind in ("rademacher", "gaussian"):
        Y = project_dense(X, k, seed=21, kind=kind, backend="torch")
        norms = X.norm(dim=1)
        error = (Y @ Y.T - X @ X.T).abs() / torch.outer(norms, norms)
        assert error.max().item() < 4 / math.sqrt(k)
        assert error.mean().item() < 1.2 / math.sqrt(k)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be a positive int"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\^32\)"),
        (dict(seed=2**32), r"seed must be an int in \[0, 2\^32\)"),
        (dict(kind="uniform"), "kind must be one of"),
        (dict(row_offset=-2), "row_offset must be a non-negative int"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    args = dict(X=torch.randn(2, 5), k=4, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        project_dense(**args)


def test_blocks_must_share_batch_and_dtype():
    with pytest.raises(ValueError, match=r"X\[1\] must be \(B=2, p_i\)"):
        project_dense([torch.randn(2, 3), torch.randn(3, 3)], 4, seed=0)
    with pytest.raises(ValueError, match="non-empty sequence"):
        project_dense([], 4, seed=0)


def test_empty_batch_gives_zeros():
    assert project_dense(torch.randn(0, 10), 4, seed=0).shape == (0, 4)
