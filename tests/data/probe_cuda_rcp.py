"""Probe how bitsandbytes' CUDA 4-bit quantizer scales a block: ``x * (1/absmax)`` with which reciprocal?

Run on a GPU with bitsandbytes 0.50.2. Compares bnb's bytes on large random inputs with halfbyte's reference
using (a) the correctly rounded reciprocal and (b) the approximate ``rcp`` of ``div.approx`` (Triton
``libdevice.fast_dividef(1, a)``), and writes the approximate reciprocal of every float32 mantissa in [1, 2).
"""

import sys

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

import halfbyte.formats.fourbit as fb


@triton.jit
def _rcp(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m)
    tl.store(out_ptr + offs, libdevice.fast_dividef(1.0, a), mask=m)


def fast_rcp(a: torch.Tensor) -> torch.Tensor:
    a = a.contiguous()
    out = torch.empty_like(a)
    _rcp[(triton.cdiv(a.numel(), 1024),)](a, out, a.numel(), BLOCK=1024)
    return out


def main(out_path: str) -> None:
    import bitsandbytes.functional as F

    mant = torch.arange(0, 1 << 23, dtype=torch.int32, device="cuda") | (127 << 23)
    a = mant.view(torch.float32)
    r = fast_rcp(a)
    exact = 1.0 / a
    d = r.view(torch.int32) - exact.view(torch.int32)
    print("rcp - correctly rounded 1/a over [1,2), ulp histogram:", torch.unique(d, return_counts=True))
    torch.save({"delta": d.to(torch.int8).cpu()}, out_path)
    # scale invariance: R(a * 2^k) == R(a) * 2^-k ?
    for k in (-20, -3, 5, 30):
        ak = a * (2.0**k)
        ok = torch.equal(fast_rcp(ak), r * (2.0 ** (-k)))
        print(f"R(a*2^{k}) == R(a)*2^{-k}:", ok)
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = (torch.randn(1 << 24, generator=g, device="cuda") * 0.05).to(dt)
        for qt in ("nf4", "fp4"):
            for bs in (64, 256):
                ref, qs = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=False)
                ref = ref.reshape(-1)
                fb.SCALE = lambda am: 1.0 / am
                p_exact, _ = fb.quantize_4bit(x, bs, qt)
                fb.SCALE = fast_rcp
                p_fast, _ = fb.quantize_4bit(x, bs, qt)
                print(dt, qt, bs, "mismatching bytes: exact rcp", (p_exact != ref).sum().item(),
                      "fast rcp", (p_fast != ref).sum().item())


if __name__ == "__main__":
    main(sys.argv[1])
