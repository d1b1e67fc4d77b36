"""digest: the 128-bit row digest, bit for bit on every backend, against an independent pure-Python rendering of the
recipe in csrc/include/airtrace/digest.h."""

from __future__ import annotations

import pytest
import torch

from airtrace.ops.digest import STRIPES, digest, hexdigest, reference

M64 = (1 << 64) - 1
BLOCK = 8 * STRIPES
LENGTHS = [0, 1, 7, 8, 9, 31, 33, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 13]


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _fmix64(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    return x ^ (x >> 33)


def _python_digest(data: bytes) -> tuple[int, int]:
    """The recipe with Python integers, stripe by stripe."""
    padded = data + b"\0" * (-len(data) % 8)
    stripes = len(padded) // 8
    sum_x = sum_y = 0
    for first in range(0, stripes, STRIPES):
        P, R = [0] * 4, [0] * 4
        for t in range(min(STRIPES, stripes - first)):
            v = int.from_bytes(padded[8 * (first + t): 8 * (first + t + 1)], "little")
            lo, hi = v & 0xFFFFFFFF, v >> 32
            P[t % 4] = (P[t % 4] + (lo ^ _mix32(2 * t ^ 0x9E3779B9)) * (hi ^ _mix32((2 * t + 1) ^ 0x9E3779B9))) & M64
            R[t % 4] = (R[t % 4] + v) & M64
        b = first // STRIPES
        x, y = _fmix64(b ^ 0x243F6A8885A308D3), _fmix64(b ^ 0x13198A2E03707344)
        for c in range(4):
            x = _fmix64(_fmix64(x ^ P[c]) ^ R[c])
            y = _fmix64(_fmix64(y ^ R[c]) ^ P[c])
        sum_x, sum_y = (sum_x + x) & M64, (sum_y + y) & M64
    n = len(data)
    return _fmix64(sum_x ^ n), _fmix64(sum_y ^ _fmix64(n ^ 0xA4093822299F31D0))


def _bytes(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (rows, length), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _unsigned(lanes: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(v & M64 for v in row) for row in lanes.tolist()]


@pytest.mark.parametrize("length", LENGTHS)
def test_reference_follows_the_recipe(length):
    data = _bytes(2, length, seed=length)
    assert _unsigned(reference(data)) == [_python_digest(bytes(row.tolist())) for row in data]


@pytest.mark.parametrize("length", LENGTHS)
def test_every_backend_gives_the_same_bits(backend, device, length):
    data = _bytes(3, length, seed=length)
    got = digest(data.to(device), backend=backend)
    assert got.dtype == torch.int64 and got.device.type == device.type
    assert torch.equal(got.cpu(), reference(data))


def test_rows_at_every_alignment_and_many_rows(backend, device):
    """Rows of 13 bytes start at every offset mod 8 (the CUDA kernel's byte-wise path); 40 rows span several threads' shares."""
    data = _bytes(40, 13, seed=1)
    assert torch.equal(digest(data.to(device), backend=backend).cpu(), reference(data))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_rows_of_any_dtype_digest_their_bytes(backend, device, dtype):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = digest(x.to(device), backend=backend).cpu()
    as_bytes = x.reshape(4, -1).contiguous().view(torch.uint8)
    assert torch.equal(got, reference(as_bytes))
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(digest(strided.to(device), backend=backend).cpu(), got)


def test_any_single_change_is_seen(backend, device):
    """A flipped bit anywhere (each stripe class, each block), a swap of two stripes, one more zero byte: new digest."""
    data = _bytes(1, 2 * BLOCK + 40, seed=3)
    base = digest(data.to(device), backend=backend).cpu()
    seen = {tuple(base[0].tolist())}
    for position in (0, 5, 8, 17, 26, 8 * (STRIPES - 1) + 7, BLOCK, BLOCK + 3, 2 * BLOCK + 39):
        for bit in (0, 7):
            flipped = data.clone()
            flipped[0, position] ^= 1 << bit
            seen.add(tuple(digest(flipped.to(device), backend=backend).cpu()[0].tolist()))
    swapped = data.clone()
    swapped[0, 0:8], swapped[0, 32:40] = data[0, 32:40], data[0, 0:8]  # stripes 0 and 4: the same class
    seen.add(tuple(digest(swapped.to(device), backend=backend).cpu()[0].tolist()))
    longer = torch.cat([data, torch.zeros(1, 1, dtype=torch.uint8)], dim=1)
    seen.add(tuple(digest(longer.to(device), backend=backend).cpu()[0].tolist()))
    assert len(seen) == 1 + 9 * 2 + 2


def test_hexdigest_and_bad_input():
    lanes = torch.tensor([[-1, 1]], dtype=torch.int64)
    assert hexdigest(lanes) == ["ffffffffffffffff0000000000000001"]
    with pytest.raises(ValueError, match="x must have a leading row dimension"):
        digest(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        digest([1, 2])


def test_meta_and_torch_op():
    out = digest(torch.empty(5, 7, device="meta"))
    assert out.device.type == "meta" and out.shape == (5, 2) and out.dtype == torch.int64
    x = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(torch.ops.airtrace.digest(x), digest(x))
