"""8-bit blockwise quantization over the dynamic map, and double quantization of 4-bit absmax (QLoRA §3).

Compatible with bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` as used by ``quantize_4bit(...,
compress_statistics=True)`` (docs/bnb-format.md §2): ``offset = mean(absmax)``, then ``absmax - offset`` is
quantized in blocks of 256 against the signed dynamic map, storing one uint8 code per 4-bit block plus one float32
``nested_absmax`` per 256 blocks. Reconstruction: ``code[q] * nested_absmax[j // 256] + offset``.
"""

import torch

from .codebooks import dynamic_map
from .fastmath import rcp_approx
from .fourbit import blockwise_absmax, num_blocks

NESTED_BLOCKSIZE = 256


def encode_8bit(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Scaled float32 values -> uint8 indices into the sorted 256-entry ``code``, as CUDA's ``dQuantize<0>``.

    CUDA runs a 7-step binary search (``x > code[pivot]`` moves right) from pivot 127, then picks between the
    final pivot and the neighbour on x's side by the float32 midpoint; a value exactly on that midpoint keeps the
    pivot. This differs from "ties go down" only on exact midpoints, but those occur for near-zero absmax deltas.
    """
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower_p = torch.zeros_like(pivot)
    upper_p = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_p = torch.where(right, pivot, lower_p)
        lower = torch.where(right, val, lower)
        upper_p = torch.where(right, upper_p, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    go_up = x > val
    mid_up = (upper + val) * 0.5
    mid_down = (lower + val) * 0.5
    out = torch.where(go_up, torch.where(x > mid_up, upper_p, pivot), torch.where(x < mid_down, lower_p, pivot))
    return out.to(torch.uint8)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float32 -> (uint8 codes (n,), absmax (ceil(n/blocksize),) float32) over the 8-bit ``code``."""
    code = dynamic_map(A.device) if code is None else code.to(device=A.device, dtype=torch.float32)
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    nb = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n))
    scaled = (padded.view(nb, blocksize) * rcp_approx(absmax)[:, None]).reshape(-1)[:n]
    return encode_8bit(scaled, code), absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """(n,) uint8 codes -> (n,) float32 ``code[A] * absmax[i // blocksize]``."""
    code = dynamic_map(A.device) if code is None else code.to(device=A.device, dtype=torch.float32)
    n = A.numel()
    if absmax.numel() != num_blocks(n, blocksize):
        raise ValueError(f"nested absmax has {absmax.numel()} blocks, expected {num_blocks(n, blocksize)}")
    return code[A.reshape(-1).long()] * absmax.to(torch.float32).repeat_interleave(blocksize)[:n]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit absmax (B,) float32 -> (qabsmax (B,) uint8, nested_absmax (ceil(B/256),) float32, offset (1,) float32)."""
    offset = absmax.mean().reshape(1)
    q, nested = quantize_blockwise(absmax - offset)
    return q, nested, offset


def double_dequantize(
    qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor, code: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of ``double_quantize`` -> (B,) float32 absmax."""
    return dequantize_blockwise(qabsmax, nested_absmax, code) + offset.to(torch.float32).reshape(())
