"""Bit-exact CPU emulation of the approximate reciprocal that bitsandbytes' CUDA kernels use.

bitsandbytes is compiled with fast math, so ``1.0f / absmax`` in ``kQuantizeBlockwise`` and
``__fdividef(127.0f, absmax)`` in ``kInt8VectorQuant`` both run the hardware reciprocal ``rcp.approx.ftz.f32``
(MUFU.RCP), which is within one ulp of ``1/a`` but not correctly rounded. A value that sits on a code boundary
then gets another code than exact arithmetic gives (measured on an H100: thousands of FP4 bytes per 8M bf16
values; ``tests/data/probe_cuda_rcp.py``).

The hardware result depends only on the float32 mantissa (``R(a * 2**k) == R(a) * 2**-k``, checked in the probe),
so it is stored once, as the difference in ulps between ``R(m)`` and the correctly rounded ``1/m`` for each of the
2**23 mantissas ``m`` in [1, 2): 2 bits per entry, lzma-compressed (``data/rcp_approx_sm90.xz``, measured with
``libdevice.fast_dividef(1, m)`` on sm_90 by ``tests/data/probe_cuda_rcp.py``). ``__fdividef(127, a)`` is
``127 * R(a)`` rounded to float32, which the golden table of every float16 divisor confirms.
"""

import functools
import lzma
from pathlib import Path

import torch

_TABLE = Path(__file__).with_name("data") / "rcp_approx_sm90.xz"
_TINY = 2.0**-126  # ftz: subnormal inputs read as 0
_HUGE = 2.0**126  # above it the reciprocal is subnormal: flushed to 0 (1/2**126 = 2**-126 itself is normal)


@functools.lru_cache(maxsize=None)
def _delta_table() -> torch.Tensor:
    """(2**23,) int8 ulp corrections, in {-1, 0, 1}, indexed by the float32 mantissa bits."""
    packed = torch.frombuffer(bytearray(lzma.decompress(_TABLE.read_bytes())), dtype=torch.uint8)
    twobit = torch.stack([(packed >> s) & 3 for s in (6, 4, 2, 0)], dim=1).reshape(-1)
    return twobit.to(torch.int8) - 1


def rcp_approx(a: torch.Tensor) -> torch.Tensor:
    """float32 ``a`` (any shape) -> ``rcp.approx.ftz.f32(a)`` as CUDA computes it, float32, same shape."""
    a = a.to(torch.float32)
    exact = 1.0 / a
    delta = _delta_table().to(a.device)[(a.view(torch.int32) & 0x7FFFFF).long()]
    approx = (exact.view(torch.int32) + delta.to(torch.int32)).view(torch.float32)
    finite_normal = torch.isfinite(exact) & (exact != 0) & (a.abs() >= _TINY) & (a.abs() <= _HUGE)
    out = torch.where(finite_normal, approx, exact)
    out = torch.where(a.abs() < _TINY, torch.copysign(torch.full_like(a, float("inf")), a), out)
    return torch.where((a.abs() > _HUGE) & torch.isfinite(a), torch.copysign(torch.zeros_like(a), a), out)


def fdividef(x: float, a: torch.Tensor) -> torch.Tensor:
    """CUDA ``__fdividef(x, a)`` = float32 ``x * rcp.approx(a)``."""
    return x * rcp_approx(a)
