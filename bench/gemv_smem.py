"""Exploratory: the tensor-core 4-bit GEMV (``halfbyte.kernels.gemv_mma``) with the code table in shared memory
instead of ``prmt`` register tables, and the library's kernel under a register cap, timed against the library's
GEMV and bitsandbytes' (graph replay, weight copies cycled past the L2).

    python bench/gemv_smem.py [--dtype float16|bfloat16] [--only NAME ...] [--json out.json]

Why: the library's GEMV issues ~40 instructions per 32-bit word of 8 codes (22 of them the ``prmt`` decode) and
runs at ~1.8x the time of merely reading the weight (BENCHMARKS.md, session 8).

Variants:
  lib     the library's GEMV as routed
  bnb     bitsandbytes' ``matmul_4bit``
  mma     the library's tensor-core kernel, swept over launch shapes and ``maxnreg`` (more resident warps)
  smem    a byte -> (code, code) pair table in shared memory, 256 entries replicated per lane (entry e of lane l at
          word 32e + l, 32 KB) so the 32 lanes of a warp never share a bank: a word decodes in 4 x (shift, and/or,
          ``ld.shared``) = 12 instructions. Persistent programs (the table is built once per program) walking
          BLOCK_N-row tiles.
Every result is checked against float64 ``x @ (code * absmax)`` within the 16-bit-input bound (benchutil).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import bnb_gemv_ms, gemv_case, report_row, sweep, timed_graph  # noqa: E402

import halfbyte  # noqa: E402, F401  (registers the halfbyte:: ops)
from halfbyte.formats.codebooks import code_4bit  # noqa: E402
from halfbyte.kernels import gemm4bit, gemv_mma  # noqa: E402
from halfbyte.kernels.fourbit import absmax_args  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

DEV = "cuda"
TABLE = "hb_pairtab"


def pair256(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(256,) int32: entry b = (code[b >> 4] | code[b & 15] << 16) as ``dtype`` bits: byte b of a packed row holds
    element 2j in its high nibble and 2j+1 in its low one, and a packed pair keeps the first element low."""
    h = code.to(torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256)
    v = h[b >> 4] | (h[b & 15] << 16)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def build_asm(warps: int) -> str:
    """Declares the 32 KB table (function scope, once), fills it from $1 (the 256 pairs) and returns its shared
    address in $0 after a barrier. Must be emitted once per thread (a 1-element-per-thread tensor)."""
    return "\n".join([
        f".shared .align 16 .b32 {TABLE}[8192];",
        "{",
        ".reg .b32 %ln, %tx, %e, %v, %a, %tb;",
        ".reg .b64 %p;",
        ".reg .pred %q;",
        "mov.u32 %ln, %laneid;",
        "mov.u32 %tx, %tid.x;",
        "shr.u32 %e, %tx, 5;",
        f"mov.u32 %tb, {TABLE};",
        "shl.b32 %ln, %ln, 2;",
        "add.u32 %tb, %tb, %ln;",
        "HB_PT_LOOP:",
        "mul.wide.u32 %p, %e, 4;",
        "add.s64 %p, %p, $1;",
        "ld.global.nc.b32 %v, [%p];",
        "shl.b32 %a, %e, 7;",
        "add.u32 %a, %a, %tb;",
        "st.shared.b32 [%a], %v;",
        f"add.u32 %e, %e, {warps};",
        "setp.lt.u32 %q, %e, 256;",
        "@%q bra HB_PT_LOOP;",
        "bar.sync 0;",
        f"mov.u32 $0, {TABLE};",
        "}",
    ])


def lookup_lines(word: str, outs: tuple[str, ...], tmp: str) -> list[str]:
    """PTX: the four packed pairs of ``word`` (bytes 0..3) from the table; ``%lane4`` = laneid * 4."""
    lines = [f".reg .b32 {tmp}0, {tmp}1, {tmp}2, {tmp}3;"]
    for k, o in enumerate(outs):
        t = f"{tmp}{k}"
        lines.append(f"shl.b32 {t}, {word}, 7;" if k == 0 else f"shr.u32 {t}, {word}, {8 * k - 7};")
        lines += [f"and.b32 {t}, {t}, 0x7F80;", f"or.b32 {t}, {t}, %lane4;", f"add.u32 {t}, {t}, %tab;",
                  f"ld.shared.b32 {o}, [{t}];"]
    return lines


def smem_mma_asm(dtype: torch.dtype) -> str:
    """``gemv_mma.mma_asm`` with the table lookups: $0..$3 results, $4,$5 / $6,$7 words of rows a / b, $8,$9 x
    addresses, $10 the build's token (orders the lookups after the table is written)."""
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    lines = ["{", ".reg .f32 %d<4>, %ra, %rb;", ".reg .b32 %ln, %g, %c, %gh, %go, %lane4, %tab;",
             ".reg .pred %ph, %po;", ".reg .b32 %x0_<4>, %x1_<4>;", "mov.u32 %ln, %laneid;", "shl.b32 %lane4, %ln, 2;",
             f"mov.u32 %tab, {TABLE};"]
    for w in range(2):
        lines.append(f"ld.global.v4.b32 {{%x{w}_0, %x{w}_1, %x{w}_2, %x{w}_3}}, [${8 + w}];")
    for name, words in (("a", ("$4", "$5")), ("b", ("$6", "$7"))):
        for w, reg in enumerate(words):
            outs = tuple(f"%{name}{w}_{k}" for k in range(4))
            lines.append(".reg .b32 " + ", ".join(outs) + ";")
            lines += lookup_lines(reg, outs, f"%u{name}{w}_")
    lines += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
    d = "{%d0, %d1, %d2, %d3}"
    for w in range(2):
        for m0, m1 in ((0, 1), (2, 3)):
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                         f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, {{%x{w}_{m0}, %x{w}_{m1}}}, {d};")
    lines += ["shr.u32 %g, %ln, 2;", "and.b32 %c, %ln, 3;", "shr.u32 %gh, %g, 1;",
              "setp.eq.u32 %ph, %c, %gh;", "and.b32 %go, %g, 1;", "setp.ne.u32 %po, %go, 0;",
              "selp.f32 %ra, %d1, %d0, %po;", "selp.f32 %rb, %d3, %d2, %po;",
              "selp.f32 $0, %ra, 0f00000000, %ph;", "selp.f32 $2, %rb, 0f00000000, %ph;",
              "mov.f32 $1, 0f00000000;", "mov.f32 $3, 0f00000000;", "}"]
    return "\n".join(lines)


@triton.jit
def _gemv_smem(x_ptr, w_ptr, absmax_ptr, pair_ptr, out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
               BLOCK_N: tl.constexpr, NG: tl.constexpr, NW: tl.constexpr, BUILD: tl.constexpr, ASM: tl.constexpr,
               UNROLL: tl.constexpr = 0):
    tok = tl.inline_asm_elementwise(BUILD, "=r,l", [pair_ptr + tl.zeros((32 * NW,), tl.int32)],
                                    dtype=tl.int32, is_pure=False, pack=1)
    tok = tl.max(tok, 0)
    HALF: tl.constexpr = BLOCK_N // 2
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    woff = ((gi * 8)[None, None, :, None] + (tl.arange(0, 4) * 2)[:, None, None, None]
            + tl.arange(0, 2)[None, None, None, :])
    shape: tl.constexpr = (4, HALF, NG, 2)
    z = tl.zeros(shape, tl.int32)
    w32 = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    xbase = x_ptr.to(tl.int64, bitcast=True) + 16 * woff.to(tl.int64) + z.to(tl.int64)
    tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        rows = tile * BLOCK_N + tl.arange(0, HALF)
        rows_a = tl.where(rows < N, rows, 0)
        rows_b = tl.where(rows + HALF < N, rows + HALF, 0)
        wa = w32 + rows_a[None, :, None, None] * KW
        wb = w32 + rows_b[None, :, None, None] * KW
        acc_a = tl.zeros(shape, tl.float32)
        acc_b = tl.zeros(shape, tl.float32)
        for i in tl.range(STEPS, loop_unroll_factor=UNROLL if UNROLL else None):
            kw0 = i * (NG * 8)
            qa = tl.load(wa + kw0 + woff, eviction_policy="evict_first")
            qb = tl.load(wb + kw0 + woff, eviction_policy="evict_first")
            gblk = ((kw0 + gi * 8) // 8)[None, :]
            am_a = tl.load(absmax_ptr + rows_a[:, None] * (K // 64) + gblk)
            am_b = tl.load(absmax_ptr + rows_b[:, None] * (K // 64) + gblk)
            ya, yb = tl.inline_asm_elementwise(ASM, "=f,=f,=f,=f,r,r,r,r,l,l,r,r",
                                               [qa, qb, xbase + 16 * kw0, z + tok],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
            acc_a += ya * am_a[None, :, :, None]
            acc_b += yb * am_b[None, :, :, None]
        res_a = tl.sum(tl.sum(tl.sum(acc_a, axis=3), axis=2), axis=0)
        res_b = tl.sum(tl.sum(tl.sum(acc_b, axis=3), axis=2), axis=0)
        tl.store(out_ptr + rows, res_a.to(out_ptr.dtype.element_ty), mask=rows < N)
        tl.store(out_ptr + rows + HALF, res_b.to(out_ptr.dtype.element_ty), mask=rows + HALF < N)


SMEM_CONFIGS = ([(bn, w, 4, per, reg) for bn, w in ((8, 128), (4, 256)) for per in (4, 6, 7) for reg in (0, 64, 72)]
                + [(bn, w, 8, per, reg) for bn, w, per in ((8, 256, 2), (8, 256, 3), (16, 128, 3)) for reg in (0, 64)]
                + [(4, 128, 2, 7, reg) for reg in (64, 96)])
MMA_CONFIGS = [(bn, w, nw, reg) for bn, w, nw in ((4, 128, 2), (4, 256, 4), (8, 128, 4), (8, 64, 2))
               for reg in (0, 32, 40, 48)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    wanted = (lambda name: not args.only or name in args.only)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dt}")
    pairs = pair256(code_4bit("nf4", torch.device("cpu")), dt).to(DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    asm = smem_mma_asm(dt)
    results = []
    for N, K in ((18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072), (10240, 4096), (3072, 12288)):
        ws, x, check, row, nbytes, copies = gemv_case(N, K, dt)
        lib = lambda pa: gemm4bit.gemv(x, pa[0], pa[1], None, None, None, None, N, K, 64, "nf4")  # noqa: E731
        check("lib", lib(ws[0]))
        row["lib"] = timed_graph(lambda: [lib(pa) for pa in ws]) / copies
        if bnb is not None and wanted("bnb"):
            row["bnb"] = bnb_gemv_ms(bnb, ws, x)

        if wanted("mma"):
            def make_mma(cfg):
                bn, wps, warps, reg = cfg
                if (K // 8) % wps or bn // 2 * wps < 64 * warps:
                    return None
                grid, steps, atomic, kw = gemv_mma.mma_launch(N, K, 64, False, False, x.device, (bn, wps, warps), dt)
                if reg:
                    kw["maxnreg"] = reg
                out = torch.zeros(1, N, dtype=torch.float32 if atomic else dt, device=DEV)

                def call(pa):
                    if atomic:
                        out.zero_()
                    gemv_mma._gemv_mma_kernel[grid](
                        x, pa[0].view(torch.uint8).reshape(-1), *absmax_args(pa[1], None, None, None, x.device),
                        *gemv_mma.mma_tables("nf4", x.device, dt), out, out, N, K, steps, **kw)
                    return out
                return call
            sweep(row, "mma", MMA_CONFIGS, make_mma, check, ws, copies)

        if wanted("smem"):
            def make_smem(cfg):
                bn, wps, warps, per, reg = cfg
                if (K // 8) % wps or bn // 2 * wps < 64 * warps:
                    return None
                opts = {"maxnreg": reg} if reg else {}
                nprog = min(triton.cdiv(N, bn), per * sms)
                out = torch.empty(1, N, dtype=dt, device=DEV)

                def call(pa):
                    _gemv_smem[(nprog,)](x, pa[0].view(torch.int32), pa[1], pairs, out, N, K, (K // 8) // wps,
                                         BLOCK_N=bn, NG=wps // 8, NW=warps, BUILD=build_asm(warps), ASM=asm,
                                         num_warps=warps, **opts)
                    return out
                return call
            sweep(row, "smem", SMEM_CONFIGS, make_smem, check, ws, copies)
        report_row(row, nbytes, results)
        ws = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
