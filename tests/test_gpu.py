"""GPU checks (``pytest -m gpu``, run by ``make gpu-check``): every op on cuda and Triton against the float64
reference under the error bound, on shapes that reach every tile and grid level of the GPU kernels; the store -> GPU
streaming path (pinned host buffers, side stream); whether results computed twice on the GPU are bit-identical.

On a machine without a GPU they are collected and skipped ("no GPU"). Run them with TRITON_INTERPRET=0 (the default
of this suite is the CPU interpreter).
"""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import test_group_pool_scores as pool_tests
import test_precondition as precondition_tests
import test_project_factored as factored_tests
import test_score_topk as score_tests
from airtrace import Attributor, unavailable_reason
from airtrace.capture import per_example_loss
from airtrace.ops import bounds
from airtrace.ops.backends import triton_interpreted
from airtrace.ops.group_pool_scores import group_pool_scores
from airtrace.ops.precondition import precondition
from airtrace.ops.project_dense import project_dense
from airtrace.ops.project_factored import project_factored
from airtrace.ops.score_topk import score_topk
from airtrace.scoring import stream_scores
from airtrace.store import Store, StoreWriter
from conftest import COMPILED_DTYPES, assert_topk_within_bound, assert_within_bound

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    if not torch.cuda.is_available():
        pytest.skip("no GPU: torch.cuda.is_available() is False")
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r}: {reason}")
    if request.param == "triton" and triton_interpreted():
        pytest.skip("TRITON_INTERPRET=1: run the GPU tests with TRITON_INTERPRET=0 to compile the Triton kernels")
    return request.param


def _needs_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: torch.cuda.is_available() is False")


# ---------------------------------------------------------------------------- every op, GPU-level tiles

# project_factored (csrc/cuda/project_factored.cu): T split over 3 blocks with atomic adds (B = 3), 2 chunks per
# block (B = 70: 280 (sample, tile) blocks, under 4 per SM on 132 SMs), T not split (B = 140).
FACTORED_SHAPES = [factored_tests.MULTI_TILE, (70, 130, 40, 36, 65, 66), (140, 130, 40, 36, 65, 66)]


@pytest.mark.parametrize("shape", FACTORED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_project_factored(gpu_backend, shape, dtype):
    A, G, P_in, P_out, mask = factored_tests._inputs(shape, dtype, CUDA, seed=3)
    out = project_factored(A, G, P_in, P_out, mask, backend=gpu_backend)
    assert_within_bound(out, bounds.project_factored(A, G, P_in, P_out, mask))


# project_dense (csrc/cuda/project_dense.cu): 2 column tiles, 2 batch tiles, 2+ row steps per block.
@pytest.mark.parametrize("shape", [(33, 20000, 257)], ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_dense(gpu_backend, shape, dtype, kind):
    B, p, k = shape
    X = torch.randn(B, p, generator=torch.Generator().manual_seed(4)).to(dtype).to(CUDA)
    out = project_dense(X, k, seed=9, kind=kind, row_offset=2**33 + 1, backend=gpu_backend)
    assert_within_bound(out, bounds.project_dense(X, k, 9, kind, row_offset=2**33 + 1))


# score_topk (csrc/cuda/score_topk.cu): the multi-tile shape, and 2 chunks of 2^24 / q rows (n = 260000, q = 65);
# topk = 300 merges candidate runs longer than one block of select threads.
@pytest.mark.parametrize("shape", [score_tests.MULTI_TILE["cuda"], (65, 260000, 33, 10), (3, 5000, 64, 300)], ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_score_topk(gpu_backend, shape, dtype, normalize):
    q, n, k, topk = shape
    Q, X = score_tests._inputs(q, n, k, dtype, seed=5)
    Q, X = Q.to(CUDA), X.to(CUDA)
    values, indices = score_topk(Q, X, topk, normalize, index_offset=11, backend=gpu_backend)
    assert_topk_within_bound(values, indices, bounds.scores(Q, X, normalize), index_offset=11)


# precondition (csrc/cuda/precondition.cu): 2 x 2 tiles; opt-in shared memory; the spill path; more samples than
# blocks (grid-stride) with k = 16 and on the spill path.
PRECONDITION_SHAPES = [precondition_tests.MULTI_TILE, (2, 100, 130), (2, 256, 256), (5000, 16, 16), (600, 256, 256)]


@pytest.mark.parametrize("shape", PRECONDITION_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_precondition(gpu_backend, shape, dtype):
    if gpu_backend == "triton" and max(shape[1:]) > 128:
        pytest.skip("backend 'triton' holds whole tiles: k_out, k_in <= 128")
    G_hat, Q_G, Q_A, Lam = precondition_tests._inputs(shape, dtype, CUDA, seed=6)
    out = precondition(G_hat, Q_G, Q_A, Lam, precondition_tests.DAMPING, backend=gpu_backend)
    assert_within_bound(out, bounds.precondition(G_hat, Q_G, Q_A, Lam, precondition_tests.DAMPING))


# group_pool_scores (csrc/cuda/group_pool_scores.cu): thousands of groups (one split per group) and few groups
# whose member tiles are shared by several blocks and merged (a 2500-member group over 18 splits).
POOL_SHAPES = [pool_tests.MULTI_TILE["cuda"], (130, 3000, 40, [2500, 70, 3, 0, 33])]


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: f"q{s[0]}-n{s[1]}-d{s[2]}-G{len(s[3])}")
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_group_pool_scores(gpu_backend, shape, dtype):
    Q, X, offsets, members = pool_tests._inputs(*shape, dtype, seed=7)
    Q, X, offsets, members = (t.to(CUDA) for t in (Q, X, offsets, members))
    out = group_pool_scores(Q, X, offsets, members, backend=gpu_backend)
    assert_within_bound(out, bounds.group_pool_scores(Q, X, offsets, members))


# ---------------------------------------------------------------------------- determinism


def _repeatable_call(op: str, backend: str):
    """A call of ``op`` on fixed GPU inputs large enough to split its sums over several blocks."""
    g = torch.Generator().manual_seed(8)
    if op == "project_factored":
        args = factored_tests._inputs((3, 1000, 64, 64, 16, 16), torch.bfloat16, CUDA)
        return lambda: project_factored(*args, backend=backend)
    if op == "project_dense":
        X = torch.randn(8, 10**5, generator=g).to(CUDA)
        return lambda: project_dense(X, 512, 3, backend=backend)
    if op == "score_topk":
        Q, X = (t.to(CUDA) for t in score_tests._inputs(64, 50000, 256, torch.bfloat16))
        return lambda: score_topk(Q, X, 10, backend=backend)[0]
    if op == "precondition":
        args = precondition_tests._inputs((512, 64, 64), torch.float32, CUDA)
        return lambda: precondition(*args, 0.01, backend=backend)
    args = [t.to(CUDA) for t in pool_tests._inputs(64, 3000, 128, [2500, 300, 20], torch.float32)]
    return lambda: group_pool_scores(*args, backend=backend)


@pytest.mark.parametrize("op", ["project_factored", "project_dense", "score_topk", "precondition",
                                "group_pool_scores"])
def test_an_op_computed_twice_is_bit_identical(gpu_backend, op):
    """Float atomics whose order varies from run to run show up here as last-bit differences."""
    call = _repeatable_call(op, gpu_backend)
    first = call()
    torch.cuda.synchronize()
    second = call()
    diff = float((first.double() - second.double()).abs().max())
    assert torch.equal(first, second), f"{op} on {gpu_backend}: two runs differ by up to {diff:.3g}"


class TokenMLP(nn.Module):
    """Two linear layers applied to every token of a (B, T, 64) batch."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 10)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _token_loss(model, batch):
    return per_example_loss(model(batch["x"]).flatten(0, 1), batch["y"].flatten()).view(batch["x"].shape[:2]).sum(1)


def test_features_computed_twice_are_bit_identical(tmp_path):
    """The README promises that a killed featurize resumes to a byte-identical store. That needs the GPU to compute the
    same features twice: if this fails, the README must say that the promise holds on the CPU only."""
    _needs_gpu()
    torch.manual_seed(0)
    model = TokenMLP().to(CUDA)
    g = torch.Generator().manual_seed(1)
    batches = [([f"e{i}-{j}" for j in range(4)], {"x": torch.randn(4, 300, 64, generator=g),
                                                   "y": torch.randint(0, 10, (4, 300), generator=g)}) for i in range(6)]
    at = Attributor(model, "*", loss_fn=_token_loss, projection=dict(k_in=16, k_out=16, seed=0), curvature="identity")
    stores = [at.featurize(batches, tmp_path / name, dtype="float32", rows_per_shard=8, progress=False)
              for name in ("first", "second")]
    names = sorted(os.listdir(stores[0].path))
    assert names == sorted(os.listdir(stores[1].path))
    differ = [n for n in names if (Path(stores[0].path) / n).read_bytes() != (Path(stores[1].path) / n).read_bytes()]
    assert not differ, (
        f"featurize on {torch.cuda.get_device_name()} wrote different bytes twice ({differ}): the README's promise of "
        "byte-identical resumes does not hold for CUDA; say so there (CPU only) or make the kernels deterministic")


# ---------------------------------------------------------------------------- store -> GPU streaming


def test_store_streams_to_the_gpu_through_pinned_memory(tmp_path, monkeypatch):
    _needs_gpu()
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(1000, 96, generator=g).to(torch.bfloat16)
    with StoreWriter(tmp_path / "s", "gpu-stream-test", 96, "bfloat16", 128, {"test": True}) as writer:
        for start in range(0, 1000, 100):
            writer.append(rows[start:start + 100], [str(i) for i in range(start, start + 100)])
    store = Store.open(tmp_path / "s")

    pinned = []
    real_empty = torch.empty

    def spy_empty(*args, **kwargs):
        pinned.append(bool(kwargs.get("pin_memory", False)))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy_empty)
    for prefetch in (0, 1, 2):
        pinned.clear()
        chunks = list(store.iter_shards(CUDA, prefetch=prefetch))
        assert pinned and all(pinned), f"prefetch={prefetch}: shard buffers were not pinned"
        assert all(c.features.device.type == "cuda" for c in chunks)
        assert torch.equal(torch.cat([c.features.cpu() for c in chunks]), rows)
    monkeypatch.undo()
    Q = torch.randn(8, 96, generator=g)
    on_gpu = stream_scores(Q.to(CUDA), store, topk=7, progress=False)
    assert_topk_within_bound(*on_gpu, bounds.scores(Q, rows))
    assert torch.equal(on_gpu[1].cpu(), stream_scores(Q, store, topk=7, progress=False)[1])
