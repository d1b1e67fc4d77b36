"""project_sparse: the implicit sparse matrix is the same on every backend, value for value."""

import math

import pytest
import torch

from airtrace.ops import bounds
from airtrace.ops.hash import sparse_entries
from airtrace.ops.project_sparse import project_sparse, reference
from conftest import COMPILED_DTYPES, assert_within_bound, exceeds_bound
from test_project_dense import M32, mix32_int


def nonzeros_int(seed: int, row: int, k: int, s: int) -> dict[int, float]:
    """{column: value} of row ``row``: the recipe of hash.h written with Python ints."""
    skey = mix32_int(seed ^ 0x9E3779B9)
    rkey = mix32_int(mix32_int(skey ^ (row >> 32)) ^ (row & M32))
    out = {}
    for j in range(s):
        bits = mix32_int(rkey ^ mix32_int((j * 0x9E3779B9 + 0x632BE5AB) & M32))
        start, stop = j * k // s, (j + 1) * k // s
        out[start + (((bits & 0x7FFFFFFF) * (stop - start)) >> 31)] = (-1.0 if bits >> 31 else 1.0) / math.sqrt(s)
    return out


def dense_matrix(rows, k: int, s: int, seed: int) -> torch.Tensor:
    """The (len(rows), k) float64 matrix of ``sparse_entries``."""
    columns, values = sparse_entries(torch.as_tensor(rows), k, s, seed)
    matrix = torch.zeros(len(rows), k, dtype=torch.float64)
    return matrix.scatter_add_(1, columns, values)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_reference_hash_matches_plain_integer_recipe(s):
    rows = [0, 1, 7, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 11]
    got = dense_matrix(rows, 10, s, seed=2**32 - 3)
    want = torch.zeros(len(rows), 10, dtype=torch.float64)
    for i, r in enumerate(rows):
        for column, value in nonzeros_int(2**32 - 3, r, 10, s).items():
            want[i, column] = value
    assert torch.equal(got, want)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_every_row_has_s_nonzeros_one_per_block(s):
    k = 37
    columns, values = sparse_entries(torch.arange(5000), k, s, seed=5)
    blocks = [(j * k // s, (j + 1) * k // s) for j in range(s)]
    for j, (start, stop) in enumerate(blocks):
        assert bool(((columns[:, j] >= start) & (columns[:, j] < stop)).all())
        # every column of the block is used, roughly equally (5000 rows over <= 37 columns)
        counts = torch.bincount(columns[:, j] - start, minlength=stop - start)
        assert int(counts.min()) > 0.5 * 5000 / (stop - start)
    assert torch.equal(values.abs(), torch.full_like(values, 1 / math.sqrt(s)))
    assert abs(values.sign().mean().item()) < 5 / math.sqrt(values.numel())


@pytest.mark.parametrize("s", [1, 3])
@pytest.mark.parametrize("row_offset", [0, 2**31 - 3, 2**32 + 5], ids=["0", "2^31-3", "2^32+5"])
@pytest.mark.parametrize("k", [7, 130])
def test_entries_equal_reference_matrix(backend, device, s, row_offset, k):
    """Projecting identity rows returns the matrix itself: compare entries one by one."""
    p = 9
    out = project_sparse(torch.eye(p, device=device), k, s, seed=12345, row_offset=row_offset, backend=backend)
    want = dense_matrix(torch.arange(row_offset, row_offset + p), k, s, 12345)
    assert torch.equal(out.cpu().double(), want.float().double())


@pytest.mark.parametrize("B,p,k", [(1, 1, 4), (3, 37, 5), (4, 130, 33)], ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("s", [1, 2, 4])
def test_matches_float64_reference(backend, device, B, p, k, dtype, s):
    X = torch.randn(B, p, generator=torch.Generator().manual_seed(p)).to(dtype)
    out = project_sparse(X.to(device), k, s, seed=99, row_offset=17, backend=backend)
    assert out.dtype == torch.float32
    assert_within_bound(out, bounds.project_sparse(X, k, s, 99, row_offset=17))


def test_multi_tile_shape_matches_float64_reference(backend, device):
    """(20, 1100, 70) spans several tiles of every backend: 3 CPU chunks of 512 coordinates, 9 x 2 Triton
    programs of 16 x 128, 5 CUDA blocks of 256 coordinates by 2 batch tiles of 16."""
    X = torch.randn(20, 1100, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    out = project_sparse(X.to(device), 70, 3, seed=5, row_offset=2**32 - 600, backend=backend)
    assert_within_bound(out, bounds.project_sparse(X, 70, 3, 5, row_offset=2**32 - 600))


def test_bound_rejects_a_bfloat16_result():
    """The bound is tight enough to see a result rounded to bfloat16 (a precision bug) on a short sum."""
    X = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    expected = bounds.project_sparse(X, 33, 2, 7)
    assert_within_bound(reference(X, 33, 2, 7), expected)
    assert exceeds_bound(reference(X, 33, 2, 7).bfloat16().float(), expected)


def test_reference_equals_the_product_with_the_matrix():
    X = torch.randn(3, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = X @ dense_matrix(torch.arange(4, 54), 16, 3, 8)
    torch.testing.assert_close(reference(X, 16, 3, 8, row_offset=4, rows_per_chunk=7), want, rtol=1e-12, atol=1e-12)


def test_blocks_equal_their_concatenation(backend, device):
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(3, p, generator=g).to(device) for p in (5, 1, 12, 7)]
    split = project_sparse(blocks, 16, 2, seed=4, backend=backend)
    whole = project_sparse(torch.cat(blocks, dim=1), 16, 2, seed=4, backend=backend)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_strided_rows_are_read_in_place(backend, device):
    X = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)).to(device)
    view = X[:, 10:30]  # row stride 50, not contiguous
    out = project_sparse(view, 8, 2, seed=1, backend=backend)
    torch.testing.assert_close(out, project_sparse(view.contiguous(), 8, 2, seed=1, backend=backend))


def test_inner_products_preserved_within_jl_bounds():
    """|<Px,Py> - <x,y>| <= eps |x||y| with eps ~ 4/sqrt(k): the bound the dense projection meets, for s = 1..4."""
    g = torch.Generator().manual_seed(0)
    n, p, k = 40, 2000, 1024
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    X[1] = X[0] + 0.1 * X[1]  # a correlated pair
    norms = X.norm(dim=1)
    for s in (1, 2, 3, 4):
        Y = project_sparse(X, k, s, seed=21, backend="torch")
        error = (Y @ Y.T - X @ X.T).abs() / torch.outer(norms, norms)
        assert error.max().item() < 4 / math.sqrt(k)
        assert error.mean().item() < 1.2 / math.sqrt(k)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be a positive int"),
        (dict(s=0), r"s \(nonzeros per input coordinate\) must be an int in 1..4"),
        (dict(s=5), r"must be an int in 1..4"),
        (dict(k=2, s=3), "need k >= s"),
        (dict(seed=2**32), r"seed must be an int in \[0, 2\^32\)"),
        (dict(row_offset=-2), "row_offset must be a non-negative int"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    args = dict(X=torch.randn(2, 5), k=4, s=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        project_sparse(**args)


def test_empty_batch_gives_zeros():
    assert torch.equal(project_sparse(torch.randn(0, 10), 4, 1, seed=0), torch.zeros(0, 4))
