"""Exploratory: GEMV (M = 1) kernel variants for the 4-bit weight, timed against the library's GEMV and
bitsandbytes' on one GPU (graph replay, weight copies cycled past the L2). Not library code: a variant that wins
moves into ``halfbyte/kernels/gemm4bit.py`` with its tests.

    python bench/gemv_variants.py [--json out.json]

Variants (NF4, blocksize 64, plain float32 absmax, bf16 activations):
  lib     halfbyte's ``gemm4bit.gemv`` (until session 5: code * absmax rounded to bf16 per element, as the
          reference; sessions 5-7 the "fact" variant below, with "fact+xs" for N <= 4096; since session 8 the
          register-table kernel of bench/gemv_lut.py, "lutp")
  am      no per-element rounding: (code[hi] * x_even + code[lo] * x_odd) * absmax, float32
  fact    absmax factored out of each 64-element block: sum over the block first, one multiply per block
  fact+xs fact, x loaded as contiguous (even, odd) pairs and split in registers
  pair    fact+xs with one gather per byte from a 256-entry table of (code[hi], code[lo]) float16 pairs
Each variant's result is checked against float64 ``x @ (code * absmax)`` within the bf16-input bound.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import bnb_gemv_ms, gemv_case, timed_graph  # noqa: E402

import halfbyte  # noqa: E402, F401  (registers the halfbyte:: ops)
from halfbyte.formats.codebooks import code_4bit  # noqa: E402
from halfbyte.kernels import gemm4bit  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

DEV, DT = "cuda", torch.bfloat16


@triton.jit
def _gemv_var(x_ptr, w_ptr, absmax_ptr, code_ptr, pair_ptr, out_ptr, N, K: tl.constexpr,
              BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GB: tl.constexpr, VARIANT: tl.constexpr,
              XSPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.where(rows < N, rows, 0)
    KB: tl.constexpr = K // 2
    STEPS: tl.constexpr = KB // (GROUPS * GB)
    g = tl.arange(0, GROUPS)
    boff = g[:, None] * GB + tl.arange(0, GB)[None, :]
    w_rows = w_ptr + rows_c[:, None, None] * KB
    blk_rows = rows_c[:, None] * (K // 64)
    if VARIANT == 1:
        acc = tl.zeros((BLOCK_N, GROUPS, GB), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
    for i in range(STEPS):
        kb0 = i * (GROUPS * GB)
        byte = tl.load(w_rows + (kb0 + boff)[None, :, :], eviction_policy="evict_first").to(tl.int32)
        blk = blk_rows + ((kb0 + g * GB) * 2 // 64)[None, :]
        am = tl.load(absmax_ptr + blk)  # (BLOCK_N, GROUPS)
        if XSPLIT:
            x2 = tl.load(x_ptr + 2 * (kb0 + boff)[:, :, None] + tl.arange(0, 2)[None, None, :]).to(tl.float32)
            xe, xo = tl.split(x2)
        else:
            xe = tl.load(x_ptr + 2 * (kb0 + boff)).to(tl.float32)
            xo = tl.load(x_ptr + 2 * (kb0 + boff) + 1).to(tl.float32)
        if VARIANT == 3:
            v = tl.load(pair_ptr + byte)  # int32: fp16 code[hi] in the high half, code[lo] in the low half
            hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            hi = tl.load(code_ptr + (byte >> 4))
            lo = tl.load(code_ptr + (byte & 15))
        p = hi * xe[None, :, :] + lo * xo[None, :, :]
        if VARIANT == 1:
            acc += p * am[:, :, None]
        else:
            acc += tl.sum(p, axis=2) * am
    if VARIANT == 1:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        res = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows, res.to(out_ptr.dtype.element_ty), mask=rows < N)


VARIANTS = {"am": (1, False), "fact": (2, False), "fact+xs": (2, True), "pair": (3, True)}
CONFIGS = [(16, 256, 4), (8, 512, 4), (32, 128, 4), (16, 512, 8), (32, 256, 8), (64, 128, 8), (16, 256, 2)]


def pair_table(device) -> torch.Tensor:
    code = code_4bit("nf4", torch.device("cpu")).to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    b = torch.arange(256)
    return ((code[b >> 4] << 16) | code[b & 15]).to(torch.int32).to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--lib-only", action="store_true", help="only the library's GEMV and bitsandbytes'")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    code = code_4bit("nf4", torch.device(DEV))
    pairs = pair_table(DEV)
    results = []
    for N, K in ((18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072), (10240, 4096)):
        ws, x, check, row, nbytes, copies = gemv_case(N, K, DT)
        lib = lambda pa: gemm4bit.gemv(x, pa[0], pa[1], None, None, None, None, N, K, 64, "nf4")  # noqa: E731
        check("lib", lib(ws[0]))
        row["lib"] = timed_graph(lambda: [lib(pa) for pa in ws]) / copies
        if bnb is not None:
            row["bnb"] = bnb_gemv_ms(bnb, ws, x)
        for name, (variant, xsplit) in ({} if args.lib_only else VARIANTS).items():
            best = None
            for bn, kstep, warps in CONFIGS:
                gb = 32
                if (K // 2) % kstep:
                    continue
                out = torch.empty(1, N, dtype=DT, device=DEV)

                def call(pa, bn=bn, kstep=kstep, warps=warps, out=out):
                    _gemv_var[(triton.cdiv(N, bn),)](x, pa[0], pa[1], code, pairs, out, N, K, BLOCK_N=bn,
                                                     GROUPS=kstep // gb, GB=gb, VARIANT=variant, XSPLIT=xsplit,
                                                     num_warps=warps)
                    return out
                try:
                    check(f"{name}", call(ws[0]))
                    ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} {bn},{kstep},{warps}: failed {type(e).__name__}: {str(e)[:100]}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, (bn, kstep, warps))
            if best:
                row[name] = best[0]
                row[name + "_cfg"] = best[1]
        cells = " ".join(f"{k}={v:.4f}ms({nbytes / v / 1e9:.2f}TB/s)" for k, v in row.items()
                         if isinstance(v, float))
        print(f"{N}x{K}: {cells}")
        print("   best cfgs:", {k: v for k, v in row.items() if k.endswith("_cfg")})
        results.append(row)
        ws = None  # frees the copies before the next shape
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
