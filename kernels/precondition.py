"""K-FAC / EK-FAC preconditioning in a Kronecker eigenbasis, fused per sample."""

import torch
import triton
import triton.language as tl

from airtrace.ops.backends import dtype_code

MAX_SIDE = 128  # largest padded k_out / k_in: the program holds whole (k_out, k_in) tiles


@triton.jit
def _precondition_kernel(
    G, Q_G, Q_A, Lam, out, k_out, k_in, damping, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """out[b] = Q_G [(Q_G^T G[b] Q_A) / (Lam + damping)] Q_A^T, one sample b per program, all in registers."""
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    in_o, in_i = offs_o < k_out, offs_i < k_in
    tile = offs_o[:, None] * k_in + offs_i[None, :]
    tile_mask = in_o[:, None] & in_i[None, :]
    g = tl.load(G + b * k_out * k_in + tile, mask=tile_mask, other=0.0).to(tl.float32)
    q_g = tl.load(Q_G + offs_o[:, None] * k_out + offs_o[None, :], mask=in_o[:, None] & in_o[None, :], other=0.0)
    q_a = tl.load(Q_A + offs_i[:, None] * k_in + offs_i[None, :], mask=in_i[:, None] & in_i[None, :], other=0.0)
    lam = tl.load(Lam + tile, mask=tile_mask, other=1.0)  # padding: 0 / (1 + damping) stays 0
    rotated = tl.dot(tl.dot(tl.trans(q_g), g, input_precision="tf32x3"), q_a, input_precision="tf32x3")
    scaled = rotated / (lam + damping)
    result = tl.dot(tl.dot(q_g, scaled, input_precision="tf32x3"), tl.trans(q_a), input_precision="tf32x3")
    tl.store(out + b * k_out * k_in + tile, result, mask=tile_mask)


def precondition(
    G_hat: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor, Lam: torch.Tensor, damping: float
) -> torch.Tensor:
    """``out[b] = Q_G [(Q_Gᵀ Ĝ_b Q_A) / (Λ + λ)] Q_Aᵀ``, (B, k_out, k_in) float32.

    G_hat (B, k_out, k_in) is float32/bfloat16/float16; Q_G, Q_A and Lam are
    float32. One program per sample holds the (padded, >= 16) tiles of Ĝ_b, Q_G,
    Q_A and the rotated intermediate, so k_out and k_in are at most MAX_SIDE.
    """
    dtype_code(G_hat, "G_hat", "triton")
    B, k_out, k_in = G_hat.shape
    if max(k_out, k_in) > MAX_SIDE:
        raise ValueError(
            f"G_hat (B, k_out, k_in) = {tuple(G_hat.shape)}: backend 'triton' supports k_out, k_in <= {MAX_SIDE}; "
            "use backend='cuda' (any size) or 'torch'"
        )
    block_o = max(triton.next_power_of_2(k_out), 16)
    block_i = max(triton.next_power_of_2(k_in), 16)
    out = torch.empty(B, k_out, k_in, dtype=torch.float32, device=G_hat.device)
    _precondition_kernel[(B,)](
        G_hat, Q_G, Q_A, Lam, out, k_out, k_in, damping, BLOCK_O=block_o, BLOCK_I=block_i,
        num_warps=4 if block_o * block_i <= 32 * 32 else 8,
    )
    return out
