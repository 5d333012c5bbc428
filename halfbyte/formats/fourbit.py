"""4-bit blockwise NF4 / FP4 quantization (QLoRA, Dettmers et al. 2023), byte-compatible with bitsandbytes.

Reference implementation in pure PyTorch; it writes the bytes that bitsandbytes' CUDA kernel
``kQuantizeBlockwise<T, bs, ..., NF4|FP4>`` writes (docs/bnb-format.md §1):

* The tensor is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (a block may
  straddle two rows). ``absmax[b]`` = float32 max of ``|x|`` over the block.
* Each element is scaled as ``x * rcp(absmax)`` in float32, ``rcp`` being CUDA's approximate reciprocal
  (``fastmath.rcp_approx``; the correctly rounded one changes FP4 ties on bf16 weights), and mapped
  to a code with strict ``>`` comparisons against the CUDA thresholds: NF4 on the signed value (a tie goes to the
  lower code), FP4 on ``|x|`` with the sign bit set iff ``x < 0`` (a tie goes to the smaller magnitude).
* Two codes per byte, the even element in the high nibble; an odd length is padded with one zero element.

Non-finite inputs and empty blocks follow the CUDA kernel, which the golden tests pin:
* NaN elements are ignored by the block max (``fmaxf``) and get code 0; an all-NaN block has absmax ``-FLT_MAX``.
* ``±inf`` gives ``absmax = inf``; the other elements of that block scale to ±0 and the inf itself to NaN (code 0).
* An all-zero block has absmax 0; ``0 * (1/0)`` is NaN, so every element gets code 0 (NF4 byte 0x00, FP4 0x00).
"""

import torch

from .codebooks import (
    BLOCKSIZES_4BIT,
    FP4_MAG_CODES,
    FP4_THRESHOLDS,
    NF4_THRESHOLDS,
    QUANT_TYPES,
    code_4bit,
)
from .fastmath import rcp_approx

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLT_MAX = torch.finfo(torch.float32).max


def check_4bit_args(blocksize: int, quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT} for 4-bit quantization, got {blocksize}")


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def packed_numel(n: int) -> int:
    """Bytes of packed 4-bit data for ``n`` elements: ``(n + 1) // 2``."""
    return (n + 1) // 2


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) float32 -> (ceil(n/blocksize),) float32 max of |x| per block; NaN ignored as CUDA's fmaxf does."""
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    a = flat.abs()
    a = torch.where(torch.isnan(a), torch.full_like(a, -_FLT_MAX), a)
    # Padding of the last block is 0, as the CUDA block load fills missing items with 0.
    a = torch.nn.functional.pad(a, (0, nb * blocksize - n), value=0.0)
    return a.view(nb, blocksize).amax(dim=1)


def encode_4bit(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Scaled float32 values in [-1, 1] -> uint8 codes 0..15 (one per element), CUDA decision rules."""
    if quant_type == "nf4":
        t = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32, device=x.device)
        code = torch.bucketize(x, t, right=False, out_int32=True)  # code k iff t[k-1] < x <= t[k]
    else:
        t = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=x.device)
        mag = torch.tensor(FP4_MAG_CODES, dtype=torch.uint8, device=x.device)
        code = mag[torch.bucketize(x.abs(), t, right=False, out_int32=True)] | ((x < 0).to(torch.uint8) << 3)
    # NaN fails every comparison in the CUDA decision tree, which then returns code 0.
    return code.to(torch.uint8).masked_fill_(torch.isnan(x), 0)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(2m,) uint8 codes -> (m,) uint8, element 2j in the high nibble of byte j."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """((n+1)//2,) uint8 -> (n,) uint8 codes (inverse of ``pack_nibbles``)."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)
    return codes[:n]


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of any-shape ``A`` (fp16/bf16/fp32).

    Returns ``packed``: ((n+1)//2,) uint8 and ``absmax``: (ceil(n/blocksize),) float32, with n = A.numel().
    """
    check_4bit_args(blocksize, quant_type)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float16, bfloat16 or float32 tensors, got {A.dtype}")
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=A.device), torch.empty(0, device=A.device)
    absmax = blockwise_absmax(flat, blocksize)
    nb = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n))
    # An odd length keeps one padding element (value 0, scaled like its block: NF4 0x7, FP4 0x0, NaN -> 0).
    scaled = (padded.view(nb, blocksize) * rcp_approx(absmax)[:, None]).reshape(-1)[: n + n % 2]
    return pack_nibbles(encode_4bit(scaled, quant_type)), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of ``quantize_4bit``: ``code[q] * absmax[block]`` in float32, cast once to ``dtype``, in ``shape``.

    ``packed``: uint8 bytes (any shape, or another dtype viewed as uint8); ``absmax``: (ceil(n/blocksize),) float32.
    """
    check_4bit_args(blocksize, quant_type)
    n = 1
    for s in shape:
        n *= int(s)
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    if data.numel() != packed_numel(n):
        raise ValueError(f"packed 4-bit data has {data.numel()} bytes, expected {packed_numel(n)} for shape "
                         f"{tuple(shape)}")
    if absmax.numel() != num_blocks(n, blocksize):
        raise ValueError(f"absmax has {absmax.numel()} blocks, expected {num_blocks(n, blocksize)} for shape "
                         f"{tuple(shape)} and blocksize {blocksize}")
    codes = unpack_nibbles(data, n).long()
    values = code_4bit(quant_type, data.device)[codes]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).view(shape)
