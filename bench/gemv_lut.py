"""Exploratory: a 4-bit GEMV (M = 1) that decodes each 32-bit word of 8 codes with register byte tables (PTX
``prmt``, ``halfbyte.kernels.lut``) instead of two table loads per byte, timed against the library's GEMV and
bitsandbytes' on one GPU (graph replay, weight copies cycled past the L2).

    python bench/gemv_lut.py [--quick] [--json out.json]

Variants (NF4, blocksize 64, float32 absmax; bf16 activations unless named):
  lut      the asm returns the 8 decoded float32 weights; triton forms sum_j w_j x_j per word; the table words
           are asm inputs loaded once into registers ("lutimm": immediates, which ptxas re-materializes per use)
  lutdot   the asm also takes the 8 x values and returns the word's float32 dot product
  x pairs  ("p" suffix) x read as 32-bit (even, odd) pairs, 16 bytes per word, split in registers
Each result is checked against float64 ``x @ (code * absmax)`` within the bf16-input bound.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import bnb_gemv_ms, gemv_case, report_row, sweep, timed_graph  # noqa: E402

import halfbyte  # noqa: E402, F401  (registers the halfbyte:: ops)
from halfbyte.formats.codebooks import code_4bit  # noqa: E402
from halfbyte.kernels import gemm4bit, gemv_mma, lut  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

DEV = "cuda"


def dot_asm(decode: str) -> str:
    """``decode`` rewritten to keep the weights in registers and return sum_j w_j * x_j: $0 out (f32), $1..$8 the
    x values (f32), $9 the word."""
    body = decode.replace("$8", "$9")
    for i in range(8):
        body = body.replace(f"${i},", f"%w{i},").replace(f"${i} ", f"%w{i} ")
    lines = body.splitlines()
    assert lines[-1] == "}"
    decl = ".reg .b32 %w0, %w1, %w2, %w3, %w4, %w5, %w6, %w7;"
    tail = ["mul.rn.f32 %w0, %w0, $1;"] + [f"fma.rn.f32 %w0, %w{j}, ${j + 1}, %w0;" for j in range(1, 7)]
    tail.append("fma.rn.f32 $0, %w7, $8, %w0;")
    return "\n".join([lines[0], decl] + lines[1:-1] + tail + ["}"])


@triton.jit
def _decode(q, tab_ptr, ASM: tl.constexpr, PLANES: tl.constexpr, TIN: tl.constexpr):
    """8 float32 tensors shaped like q: the weights of each word (tables as asm inputs when TIN)."""
    if not TIN:
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [q], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    elif PLANES == 2:
        z = tl.zeros_like(q)
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 9,
            [q, z + tl.load(tab_ptr), z + tl.load(tab_ptr + 1), z + tl.load(tab_ptr + 2), z + tl.load(tab_ptr + 3),
             z + tl.load(tab_ptr + 4), z + tl.load(tab_ptr + 5), z + tl.load(tab_ptr + 6), z + tl.load(tab_ptr + 7)],
            dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        z = tl.zeros_like(q)
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 13,
            [q, z + tl.load(tab_ptr), z + tl.load(tab_ptr + 1), z + tl.load(tab_ptr + 2), z + tl.load(tab_ptr + 3),
             z + tl.load(tab_ptr + 4), z + tl.load(tab_ptr + 5), z + tl.load(tab_ptr + 6), z + tl.load(tab_ptr + 7),
             z + tl.load(tab_ptr + 8), z + tl.load(tab_ptr + 9), z + tl.load(tab_ptr + 10),
             z + tl.load(tab_ptr + 11)],
            dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return (w0.to(tl.float32, bitcast=True), w1.to(tl.float32, bitcast=True), w2.to(tl.float32, bitcast=True),
            w3.to(tl.float32, bitcast=True), w4.to(tl.float32, bitcast=True), w5.to(tl.float32, bitcast=True),
            w6.to(tl.float32, bitcast=True), w7.to(tl.float32, bitcast=True))


@triton.jit
def _x_pairs(x32, woff, NG: tl.constexpr, G: tl.constexpr):
    """x's 8 values of each word at ``woff`` (NG, G) as float32, from one 16-byte load of bf16 pairs per word."""
    xq = tl.load(x32 + 4 * woff[:, :, None] + tl.arange(0, 4)[None, None, :])
    xa, xb = tl.split(tl.reshape(xq, (NG, G, 2, 2)))
    p0, p2 = tl.split(xa)
    p1, p3 = tl.split(xb)
    return ((p0 << 16).to(tl.float32, bitcast=True), (p0 & -65536).to(tl.float32, bitcast=True),
            (p1 << 16).to(tl.float32, bitcast=True), (p1 & -65536).to(tl.float32, bitcast=True),
            (p2 << 16).to(tl.float32, bitcast=True), (p2 & -65536).to(tl.float32, bitcast=True),
            (p3 << 16).to(tl.float32, bitcast=True), (p3 & -65536).to(tl.float32, bitcast=True))


@triton.jit
def _gemv_lut(x_ptr, w_ptr, absmax_ptr, tab_ptr, out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
              BLOCK_N: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, MODE: tl.constexpr,
              XP: tl.constexpr, ATOMIC: tl.constexpr, PLANES: tl.constexpr = 2, TIN: tl.constexpr = False):
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.where(rows < N, rows, 0)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    woff = gi[:, None] * G + tl.arange(0, G)[None, :]  # (NG, G) word offsets inside one step
    w_rows = w_ptr + rows_c[:, None, None] * KW
    am_rows = absmax_ptr + rows_c[:, None] * (KW // G)
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    kw_start = tl.program_id(1) * (STEPS * NG * G)
    for i in range(STEPS):
        kw0 = kw_start + i * (NG * G)
        q = tl.load(w_rows + (kw0 + woff)[None, :, :], eviction_policy="evict_first")  # (BLOCK_N, NG, G) int32
        am = tl.load(am_rows + (kw0 // G + gi)[None, :])
        xw = x_ptr + 8 * (kw0 + woff)
        if XP:
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_pairs(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True),
                                                      kw0 + woff, NG, G)
        else:
            x0 = tl.load(xw + 0).to(tl.float32)
            x1 = tl.load(xw + 1).to(tl.float32)
            x2 = tl.load(xw + 2).to(tl.float32)
            x3 = tl.load(xw + 3).to(tl.float32)
            x4 = tl.load(xw + 4).to(tl.float32)
            x5 = tl.load(xw + 5).to(tl.float32)
            x6 = tl.load(xw + 6).to(tl.float32)
            x7 = tl.load(xw + 7).to(tl.float32)
        if MODE == 0:
            w0, w1, w2, w3, w4, w5, w6, w7 = _decode(q, tab_ptr, ASM, PLANES, TIN)
            p = (w0 * x0[None, :, :] + w1 * x1[None, :, :] + w2 * x2[None, :, :] + w3 * x3[None, :, :]
                 + w4 * x4[None, :, :] + w5 * x5[None, :, :] + w6 * x6[None, :, :] + w7 * x7[None, :, :])
        else:
            shape: tl.constexpr = (BLOCK_N, NG, G)
            p = tl.inline_asm_elementwise(
                ASM, "=f,f,f,f,f,f,f,f,f,r",
                [tl.broadcast_to(x0[None, :, :], shape), tl.broadcast_to(x1[None, :, :], shape),
                 tl.broadcast_to(x2[None, :, :], shape), tl.broadcast_to(x3[None, :, :], shape),
                 tl.broadcast_to(x4[None, :, :], shape), tl.broadcast_to(x5[None, :, :], shape),
                 tl.broadcast_to(x6[None, :, :], shape), tl.broadcast_to(x7[None, :, :], shape), q],
                dtype=tl.float32, is_pure=True, pack=1)
        acc += tl.sum(p, axis=2) * am
    res = tl.sum(acc, axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, res, mask=rows < N)
    else:
        tl.store(out_ptr + rows, res.to(out_ptr.dtype.element_ty), mask=rows < N)


def dotx_asm(code_values: tuple, dtype: torch.dtype) -> str:
    """Decode + x load + dot in one block: $0 the word's float32 sum_j w_j x_j, $1 the word, $2 the address of
    its 8 x values (16 bytes), $3..$(2 + 4 * planes) the table words. x is read with ``ld.global.nc`` inside the
    block, so triton never moves x between layouts (no shared-memory round trip per step)."""
    planes = lut.planes_for(dtype)
    dec = lut.decode_asm(code_values, planes, True)

    def ren(m):
        i = int(m.group(1))
        if i < 8:
            return f"%w{i}"
        return "$1" if i == 8 else f"${i - 6}"

    body = re.sub(r"\$(\d+)", ren, dec).splitlines()
    assert body[-1] == "}"
    L = [body[0], ".reg .b32 %w<8>, %x<4>;", ".reg .f32 %f<8>, %acc;"]
    if dtype == torch.float16:
        L.append(".reg .b16 %h<8>;")
    L += body[1:-1]
    L.append("ld.global.nc.v4.b32 {%x0, %x1, %x2, %x3}, [$2];")
    for m in range(4):
        if dtype == torch.bfloat16:
            L += [f"shl.b32 %f{2 * m}, %x{m}, 16;", f"and.b32 %f{2 * m + 1}, %x{m}, 0xFFFF0000;"]
        else:
            L += [f"mov.b32 {{%h{2 * m}, %h{2 * m + 1}}}, %x{m};", f"cvt.f32.f16 %f{2 * m}, %h{2 * m};",
                  f"cvt.f32.f16 %f{2 * m + 1}, %h{2 * m + 1};"]
    L.append("mul.rn.f32 %acc, %w0, %f0;")
    L += [f"fma.rn.f32 %acc, %w{j}, %f{j}, %acc;" for j in range(1, 7)]
    L += ["fma.rn.f32 $0, %w7, %f7, %acc;", "}"]
    return "\n".join(L)


@triton.jit
def _gemv_x(x_ptr, w_ptr, absmax_ptr, tab_ptr, out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
            BLOCK_N: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, PLANES: tl.constexpr,
            ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.where(rows < N, rows, 0)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    woff = gi[:, None] * G + tl.arange(0, G)[None, :]
    w_rows = w_ptr + rows_c[:, None, None] * KW
    am_rows = absmax_ptr + rows_c[:, None] * (KW // G)
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    z = tl.zeros((BLOCK_N, NG, G), tl.int32)
    t0 = z + tl.load(tab_ptr)
    t1 = z + tl.load(tab_ptr + 1)
    t2 = z + tl.load(tab_ptr + 2)
    t3 = z + tl.load(tab_ptr + 3)
    t4 = z + tl.load(tab_ptr + 4)
    t5 = z + tl.load(tab_ptr + 5)
    t6 = z + tl.load(tab_ptr + 6)
    t7 = z + tl.load(tab_ptr + 7)
    xbase = x_ptr.to(tl.int64, bitcast=True) + 16 * woff.to(tl.int64)[None, :, :] + z.to(tl.int64)
    kw_start = tl.program_id(1) * (STEPS * NG * G)
    for i in range(STEPS):
        kw0 = kw_start + i * (NG * G)
        q = tl.load(w_rows + (kw0 + woff)[None, :, :], eviction_policy="evict_first")
        am = tl.load(am_rows + (kw0 // G + gi)[None, :])
        xa = xbase + 16 * kw0
        if PLANES == 2:
            p = tl.inline_asm_elementwise(ASM, "=f,r,l" + ",r" * 8, [q, xa, t0, t1, t2, t3, t4, t5, t6, t7],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            p = tl.inline_asm_elementwise(ASM, "=f,r,l" + ",r" * 12,
                                          [q, xa, t0, t1, t2, t3, t4, t5, t6, t7, z + tl.load(tab_ptr + 8),
                                           z + tl.load(tab_ptr + 9), z + tl.load(tab_ptr + 10),
                                           z + tl.load(tab_ptr + 11)],
                                          dtype=tl.float32, is_pure=True, pack=1)
        acc += tl.sum(p, axis=2) * am
    res = tl.sum(acc, axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, res, mask=rows < N)
    else:
        tl.store(out_ptr + rows, res.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _gemv_pp(x_ptr, w_ptr, absmax_ptr, tab_ptr, out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
             BLOCK_N: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, PLANES: tl.constexpr,
             TIN: tl.constexpr, PREFETCH: tl.constexpr):
    """lutp over a persistent grid: program p takes row tiles p, p + P, ... and loads the next step's words
    before decoding the current ones (PREFETCH)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles = tl.cdiv(N, BLOCK_N)
    total = ((tiles - pid + nprog - 1) // nprog) * STEPS
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    woff = gi[:, None] * G + tl.arange(0, G)[None, :]
    ar = tl.arange(0, BLOCK_N)
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    rows = pid * BLOCK_N + ar
    rows_c = tl.where(rows < N, rows, 0)
    q = tl.load(w_ptr + rows_c[:, None, None] * KW + woff[None, :, :], eviction_policy="evict_first")
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    for j in range(total):
        step = j % STEPS
        rows = (pid + (j // STEPS) * nprog) * BLOCK_N + ar
        rows_c = tl.where(rows < N, rows, 0)
        kw0 = step * (NG * G)
        if PREFETCH:
            jn = tl.minimum(j + 1, total - 1)
            rows_n = (pid + (jn // STEPS) * nprog) * BLOCK_N + ar
            rows_n = tl.where(rows_n < N, rows_n, 0)
            q_next = tl.load(w_ptr + rows_n[:, None, None] * KW + ((jn % STEPS) * (NG * G) + woff)[None, :, :],
                             eviction_policy="evict_first")
        else:
            q = tl.load(w_ptr + rows_c[:, None, None] * KW + (kw0 + woff)[None, :, :], eviction_policy="evict_first")
        am = tl.load(absmax_ptr + rows_c[:, None] * (KW // G) + (kw0 // G + gi)[None, :])
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_pairs(x32, kw0 + woff, NG, G)
        w0, w1, w2, w3, w4, w5, w6, w7 = _decode(q, tab_ptr, ASM, PLANES, TIN)
        p = (w0 * x0[None, :, :] + w1 * x1[None, :, :] + w2 * x2[None, :, :] + w3 * x3[None, :, :]
             + w4 * x4[None, :, :] + w5 * x5[None, :, :] + w6 * x6[None, :, :] + w7 * x7[None, :, :])
        acc += tl.sum(p, axis=2) * am
        if step == STEPS - 1:
            tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)
            acc = tl.zeros((BLOCK_N, NG), tl.float32)
        if PREFETCH:
            q = q_next


# (BLOCK_N, words per step, warps)
CONFIGS = [(16, 64, 4), (32, 64, 4), (64, 32, 4), (32, 32, 4), (16, 128, 4), (64, 64, 8), (32, 128, 8), (8, 128, 4),
           (128, 16, 4), (64, 16, 4)]
MMA_CONFIGS = [(8, 128, 4), (16, 64, 4), (8, 64, 2), (16, 128, 4), (4, 128, 2), (8, 256, 8), (16, 128, 8),
                (32, 64, 8), (4, 256, 4), (32, 32, 4), (64, 32, 8)]
PP_CONFIGS = [(8, 128, 4), (16, 64, 4), (8, 64, 2), (16, 128, 4), (4, 128, 2), (32, 64, 8)]
QUICK = [(16, 64, 4), (32, 64, 4), (64, 32, 4), (32, 128, 8)]


def _split(N: int, K: int, bn: int, wps: int, sms: int) -> tuple[int, int, int]:
    """(tiles, K splits, K steps) as the library's launches choose them."""
    tiles, steps = triton.cdiv(N, bn), (K // 8) // wps
    split = 1
    if tiles < sms:
        split = max(1, min(triton.cdiv(2 * sms, tiles), steps // 2 if steps >= 4 else 1))
        while steps % split:
            split -= 1
    return tiles, split, steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all; 'none': the library and bnb)")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dt}")
    code = code_4bit("nf4", torch.device(DEV))
    ctup = tuple(code.tolist())
    planes = lut.planes_for(dt)
    dec = lut.decode_asm(ctup, planes)
    asms = {(0, False): dec, (1, False): dot_asm(dec), (0, True): lut.decode_asm(ctup, planes, True)}
    tab = torch.tensor(lut.table_words(ctup, planes), dtype=torch.int32, device=DEV)
    lut_variants = {"lut": (0, False, True), "lutimm": (0, False, False), "lutdot": (1, False, False)}
    if dt == torch.bfloat16:
        lut_variants.update({"lutp": (0, True, True), "lutdotp": (1, True, False)})
    wanted = (lambda name: not args.only or name in args.only)  # noqa: E731
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for N, K in ((18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072), (10240, 4096), (3072, 12288)):
        ws, x, check, row, nbytes, copies = gemv_case(N, K, dt)
        lib = lambda pa: gemm4bit.gemv(x, pa[0], pa[1], None, None, None, None, N, K, 64, "nf4")  # noqa: E731
        check("lib", lib(ws[0]))
        row["lib"] = timed_graph(lambda: [lib(pa) for pa in ws]) / copies
        if bnb is not None:
            row["bnb"] = bnb_gemv_ms(bnb, ws, x)

        def grid_call(kernel, cfg, **kw):
            """A call of a (rows, K split)-grid bench kernel at cfg = (BLOCK_N, words per step, warps)."""
            bn, wps, warps = cfg
            if (K // 8) % wps:
                return None
            tiles, split, steps = _split(N, K, bn, wps, sms)
            out = torch.zeros(1, N, dtype=torch.float32 if split > 1 else dt, device=DEV)

            def call(pa):
                if split > 1:
                    out.zero_()
                kernel[(tiles, split)](x, pa[0].view(torch.int32), pa[1], tab, out, N, K, steps // split,
                                       BLOCK_N=bn, NG=wps // 8, G=8, ATOMIC=split > 1, num_warps=warps, **kw)
                return out
            return call

        for name, (mode, xp, tin) in lut_variants.items():
            if wanted(name):
                sweep(row, name, QUICK if args.quick else CONFIGS,
                      lambda cfg, mode=mode, xp=xp, tin=tin: grid_call(
                          _gemv_lut, cfg, ASM=asms[mode, tin], MODE=mode, XP=xp, PLANES=planes, TIN=tin),
                      check, ws, copies)
        if dt != torch.float32 and wanted("lutx"):
            xasm = dotx_asm(ctup, dt)
            sweep(row, "lutx", CONFIGS + [(8, 64, 2), (4, 128, 2), (8, 256, 8), (4, 256, 4)],
                  lambda cfg: grid_call(_gemv_x, cfg, ASM=xasm, PLANES=planes), check, ws, copies)
        for name, prefetch in ({"pp": True, "ppnof": False} if dt == torch.bfloat16 else {}).items():
            if not wanted(name):
                continue

            def make_pp(cfg, prefetch=prefetch):
                bn, wps, warps, per_sm = cfg
                if (K // 8) % wps:
                    return None
                nprog = min(triton.cdiv(N, bn), per_sm * sms)
                out = torch.empty(1, N, dtype=dt, device=DEV)

                def call(pa):
                    _gemv_pp[(nprog,)](x, pa[0].view(torch.int32), pa[1], tab, out, N, K, (K // 8) // wps,
                                       BLOCK_N=bn, NG=wps // 8, G=8, ASM=asms[0, True], PLANES=planes, TIN=True,
                                       PREFETCH=prefetch, num_warps=warps)
                    return out
                return call
            sweep(row, name, [c + (s,) for c in PP_CONFIGS for s in (4, 8, 16)], make_pp, check, ws, copies)
        if dt != torch.float32 and wanted("mma"):  # the library's tensor-core GEMV at other launch shapes

            def make_mma(cfg):
                bn, wps, warps = cfg
                if (K // 8) % wps or bn // 2 * wps < 64 * warps:
                    return None
                return lambda pa: gemv_mma.gemv_mma(x, pa[0].view(torch.uint8).reshape(-1), pa[1], None, None, None,
                                                    None, N, K, 64, "nf4", cfg)
            sweep(row, "mma", MMA_CONFIGS, make_mma, check, ws, copies)
        report_row(row, nbytes, results)
        ws = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
