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
import itertools
import json
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import timed_graph  # noqa: E402

import halfbyte  # noqa: E402, F401  (registers the halfbyte:: ops)
from halfbyte.formats import fourbit as ref4  # noqa: E402
from halfbyte.formats.codebooks import code_4bit  # noqa: E402
from halfbyte.kernels import gemm4bit, lut  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

DEV = "cuda"
L2_BYTES = 50 * 2**20


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
            xq = tl.load(xw.to(tl.pointer_type(tl.int32), bitcast=True)[:, :, None] + tl.arange(0, 4)[None, None, :])
            xa, xb = tl.split(tl.reshape(xq, (NG, G, 2, 2)))
            p0, p2 = tl.split(xa)
            p1, p3 = tl.split(xb)
            x0 = (p0 << 16).to(tl.float32, bitcast=True)
            x1 = (p0 & -65536).to(tl.float32, bitcast=True)
            x2 = (p1 << 16).to(tl.float32, bitcast=True)
            x3 = (p1 & -65536).to(tl.float32, bitcast=True)
            x4 = (p2 << 16).to(tl.float32, bitcast=True)
            x5 = (p2 & -65536).to(tl.float32, bitcast=True)
            x6 = (p3 << 16).to(tl.float32, bitcast=True)
            x7 = (p3 & -65536).to(tl.float32, bitcast=True)
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
        xq = tl.load(x32 + 4 * (kw0 + woff)[:, :, None] + tl.arange(0, 4)[None, None, :])
        xa, xb = tl.split(tl.reshape(xq, (NG, G, 2, 2)))
        p0, p2 = tl.split(xa)
        p1, p3 = tl.split(xb)
        x0 = (p0 << 16).to(tl.float32, bitcast=True)
        x1 = (p0 & -65536).to(tl.float32, bitcast=True)
        x2 = (p1 << 16).to(tl.float32, bitcast=True)
        x3 = (p1 & -65536).to(tl.float32, bitcast=True)
        x4 = (p2 << 16).to(tl.float32, bitcast=True)
        x5 = (p2 & -65536).to(tl.float32, bitcast=True)
        x6 = (p3 << 16).to(tl.float32, bitcast=True)
        x7 = (p3 & -65536).to(tl.float32, bitcast=True)
        w0, w1, w2, w3, w4, w5, w6, w7 = _decode(q, tab_ptr, ASM, PLANES, TIN)
        p = (w0 * x0[None, :, :] + w1 * x1[None, :, :] + w2 * x2[None, :, :] + w3 * x3[None, :, :]
             + w4 * x4[None, :, :] + w5 * x5[None, :, :] + w6 * x6[None, :, :] + w7 * x7[None, :, :])
        acc += tl.sum(p, axis=2) * am
        if step == STEPS - 1:
            tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)
            acc = tl.zeros((BLOCK_N, NG), tl.float32)
        if PREFETCH:
            q = q_next


def mma_asm(code_values: tuple, dtype: torch.dtype, tables_in: bool = False) -> str:
    """One ``mma.sync`` per word: $0,$1 / $2,$3 the outputs of rows a / b (f32), $4,$5 two words of row a,
    $6,$7 the same words of row b, $8.. the x pairs X_m of word w at $(8 + 2m + w). The four lanes of an mma
    lane group hold the 8 words of one absmax group; the group's sum of code * x lands on the diagonal of the
    accumulator, in lane 4g + g/2, which returns it (others return 0)."""
    tables = tuple(f"${16 + 2 * i}" for i in range(8)) if tables_in else lut.pair_tables(code_values, dtype)
    ty = "bf16" if dtype == torch.bfloat16 else "f16"
    L = ["{", ".reg .f32 %d<4>, %ra, %rb;", ".reg .b32 %ln, %g, %c, %gh, %go;", ".reg .pred %ph, %po;"]
    for name, words in (("a", ("$4", "$5")), ("b", ("$6", "$7"))):
        for w, reg in enumerate(words):
            outs = tuple(f"%{name}{w}_{k}" for k in range(4))
            L.append(".reg .b32 " + ", ".join(outs) + ";")
            L += lut.pair_decode_lines(tables, reg, outs, f"%u{name}{w}")
    L += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
    d = "{%d0, %d1, %d2, %d3}"
    for w in range(2):
        for half in range(2):
            m0, m1 = 2 * half, 2 * half + 1
            L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                     f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, "
                     f"{{${8 + 2 * m0 + w}, ${8 + 2 * m1 + w}}}, {d};")
    L += ["mov.u32 %ln, %laneid;", "shr.u32 %g, %ln, 2;", "and.b32 %c, %ln, 3;", "shr.u32 %gh, %g, 1;",
          "setp.eq.u32 %ph, %c, %gh;", "and.b32 %go, %g, 1;", "setp.ne.u32 %po, %go, 0;",
          "selp.f32 %ra, %d1, %d0, %po;", "selp.f32 %rb, %d3, %d2, %po;",
          "selp.f32 $0, %ra, 0f00000000, %ph;", "selp.f32 $2, %rb, 0f00000000, %ph;",
          "mov.f32 $1, 0f00000000;", "mov.f32 $3, 0f00000000;", "}"]
    return "\n".join(L)


@triton.jit
def _gemv_mma(x_ptr, w_ptr, absmax_ptr, tab_ptr, out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
              BLOCK_N: tl.constexpr, NG: tl.constexpr, ASM: tl.constexpr, ATOMIC: tl.constexpr, TIN: tl.constexpr,
              XL: tl.constexpr):
    HALF: tl.constexpr = BLOCK_N // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, HALF)
    rows_a = tl.where(rows < N, rows, 0)
    rows_b = tl.where(rows + HALF < N, rows + HALF, 0)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    # (NG, 4, 2) word offsets in a step: group, lane of the mma lane group, word of the lane
    woff = (gi * 8)[:, None, None] + (tl.arange(0, 4) * 2)[:, None][None, :, :] + tl.arange(0, 2)[None, None, :]
    wa = w_ptr + rows_a[:, None, None, None] * KW
    wb = w_ptr + rows_b[:, None, None, None] * KW
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    t0 = tl.load(tab_ptr)
    t1 = tl.load(tab_ptr + 1)
    t2 = tl.load(tab_ptr + 2)
    t3 = tl.load(tab_ptr + 3)
    t4 = tl.load(tab_ptr + 4)
    t5 = tl.load(tab_ptr + 5)
    t6 = tl.load(tab_ptr + 6)
    t7 = tl.load(tab_ptr + 7)
    acc_a = tl.zeros((HALF, NG, 4, 2), tl.float32)
    acc_b = tl.zeros((HALF, NG, 4, 2), tl.float32)
    kw_start = tl.program_id(1) * (STEPS * NG * 8)
    for i in range(STEPS):
        kw0 = kw_start + i * (NG * 8)
        qa = tl.load(wa + (kw0 + woff)[None], eviction_policy="evict_first")
        qb = tl.load(wb + (kw0 + woff)[None], eviction_policy="evict_first")
        am_a = tl.load(absmax_ptr + rows_a[:, None] * (KW // 8) + (kw0 // 8 + gi)[None, :])
        am_b = tl.load(absmax_ptr + rows_b[:, None] * (KW // 8) + (kw0 // 8 + gi)[None, :])
        if XL:  # four 4-byte loads per word, straight into the words' layout
            xw = x32 + 4 * (kw0 + woff)
            x0 = tl.load(xw)
            x1 = tl.load(xw + 1)
            x2 = tl.load(xw + 2)
            x3 = tl.load(xw + 3)
        else:  # one 16-byte load per word, split in registers
            xq = tl.load(x32 + 4 * (kw0 + woff)[:, :, :, None] + tl.arange(0, 4)[None, None, None, :])
            xe, xo = tl.split(tl.reshape(xq, (NG, 4, 2, 2, 2)))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
        shape: tl.constexpr = (HALF, NG, 4, 2)
        if TIN:
            z = tl.zeros(shape, tl.int32)
            ya, yb = tl.inline_asm_elementwise(
                ASM, "=f,=f,=f,=f" + ",r" * 28,
                [qa, qb, tl.broadcast_to(x0[None], shape), tl.broadcast_to(x1[None], shape),
                 tl.broadcast_to(x2[None], shape), tl.broadcast_to(x3[None], shape),
                 z + t0, z + t1, z + t2, z + t3, z + t4, z + t5, z + t6, z + t7],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
        else:
            ya, yb = tl.inline_asm_elementwise(
                ASM, "=f,=f,=f,=f" + ",r" * 12,
                [qa, qb, tl.broadcast_to(x0[None], shape), tl.broadcast_to(x1[None], shape),
                 tl.broadcast_to(x2[None], shape), tl.broadcast_to(x3[None], shape)],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
        acc_a += ya * am_a[:, :, None, None]
        acc_b += yb * am_b[:, :, None, None]
    res_a = tl.sum(tl.sum(tl.sum(acc_a, axis=3), axis=2), axis=1)
    res_b = tl.sum(tl.sum(tl.sum(acc_b, axis=3), axis=2), axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, res_a, mask=rows < N)
        tl.atomic_add(out_ptr + rows + HALF, res_b, mask=rows + HALF < N)
    else:
        tl.store(out_ptr + rows, res_a.to(out_ptr.dtype.element_ty), mask=rows < N)
        tl.store(out_ptr + rows + HALF, res_b.to(out_ptr.dtype.element_ty), mask=rows + HALF < N)


def mma2_asm(dtype: torch.dtype, code_values: tuple | None = None) -> str:
    """``mma_asm`` with x read inside the block and the tables as operands: $0,$1 / $2,$3 rows a / b (f32);
    $4,$5 two consecutive words of row a; $6,$7 the same words of row b; $8,$9 their x addresses (16 bytes each);
    $10 + 2i the table word i (``lut.pair_tables``)."""
    tables = (tuple(f"${10 + 2 * i}" for i in range(8)) if code_values is None
              else lut.pair_tables(code_values, dtype))  # immediates: the operands $10.. are then unused
    ty = "bf16" if dtype == torch.bfloat16 else "f16"
    L = ["{", ".reg .f32 %d<4>, %ra, %rb;", ".reg .b32 %ln, %g, %c, %gh, %go;", ".reg .pred %ph, %po;",
         ".reg .b32 %x0_<4>, %x1_<4>;"]
    for w in range(2):
        L.append(f"ld.global.nc.v4.b32 {{%x{w}_0, %x{w}_1, %x{w}_2, %x{w}_3}}, [${8 + w}];")
    for name, words in (("a", ("$4", "$5")), ("b", ("$6", "$7"))):
        for w, reg in enumerate(words):
            outs = tuple(f"%{name}{w}_{k}" for k in range(4))
            L.append(".reg .b32 " + ", ".join(outs) + ";")
            L += lut.pair_decode_lines(tables, reg, outs, f"%u{name}{w}")
    L += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
    d = "{%d0, %d1, %d2, %d3}"
    for w in range(2):
        for half in range(2):
            m0, m1 = 2 * half, 2 * half + 1
            L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                     f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, {{%x{w}_{m0}, %x{w}_{m1}}}, {d};")
    L += ["mov.u32 %ln, %laneid;", "shr.u32 %g, %ln, 2;", "and.b32 %c, %ln, 3;", "shr.u32 %gh, %g, 1;",
          "setp.eq.u32 %ph, %c, %gh;", "and.b32 %go, %g, 1;", "setp.ne.u32 %po, %go, 0;",
          "selp.f32 %ra, %d1, %d0, %po;", "selp.f32 %rb, %d3, %d2, %po;",
          "selp.f32 $0, %ra, 0f00000000, %ph;", "selp.f32 $2, %rb, 0f00000000, %ph;",
          "mov.f32 $1, 0f00000000;", "mov.f32 $3, 0f00000000;", "}"]
    return "\n".join(L)


@triton.jit
def _gemv_mma2(x_ptr, w_ptr, absmax_ptr, tab_ptr, out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
               BLOCK_N: tl.constexpr, NG: tl.constexpr, ASM: tl.constexpr, ATOMIC: tl.constexpr,
               NS: tl.constexpr = 1):
    """Tiles (4, HALF, NG, 2): dim 0 (the lane of an mma lane group) comes first so that triton's layout puts it
    on lane bits 0-1 (ties in contiguity keep dimension order), i.e. the 4 lanes of a group share row and
    absmax group."""
    HALF: tl.constexpr = BLOCK_N // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, HALF)
    rows_a = tl.where(rows < N, rows, 0)
    rows_b = tl.where(rows + HALF < N, rows + HALF, 0)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    woff = ((gi * 8)[None, None, :, None] + (tl.arange(0, 4) * 2)[:, None, None, None]
            + tl.arange(0, 2)[None, None, None, :])  # (4, 1, NG, 2)
    w32 = w_ptr
    wa = w32 + rows_a[None, :, None, None] * KW
    wb = w32 + rows_b[None, :, None, None] * KW
    z = tl.zeros((4, HALF, NG, 2), tl.int32)
    t0 = z + tl.load(tab_ptr)
    t1 = z + tl.load(tab_ptr + 1)
    t2 = z + tl.load(tab_ptr + 2)
    t3 = z + tl.load(tab_ptr + 3)
    t4 = z + tl.load(tab_ptr + 4)
    t5 = z + tl.load(tab_ptr + 5)
    t6 = z + tl.load(tab_ptr + 6)
    t7 = z + tl.load(tab_ptr + 7)
    xbase = x_ptr.to(tl.int64, bitcast=True) + 16 * woff.to(tl.int64) + z.to(tl.int64)
    acc_a = tl.zeros((4, HALF, NG, 2), tl.float32)
    acc_b = tl.zeros((4, HALF, NG, 2), tl.float32)
    kw_start = tl.program_id(1) * (STEPS * NG * 8)
    for i in tl.range(STEPS, num_stages=NS):
        kw0 = kw_start + i * (NG * 8)
        qa = tl.load(wa + kw0 + woff, eviction_policy="evict_first")
        qb = tl.load(wb + kw0 + woff, eviction_policy="evict_first")
        am_a = tl.load(absmax_ptr + rows_a[:, None] * (KW // 8) + (kw0 // 8 + gi)[None, :])
        am_b = tl.load(absmax_ptr + rows_b[:, None] * (KW // 8) + (kw0 // 8 + gi)[None, :])
        ya, yb = tl.inline_asm_elementwise(
            ASM, "=f,=f,=f,=f" + ",r" * 4 + ",l,l" + ",r" * 16,
            [qa, qb, xbase + 16 * kw0, t0, t1, t2, t3, t4, t5, t6, t7],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
        acc_a += ya * am_a[None, :, :, None]
        acc_b += yb * am_b[None, :, :, None]
    res_a = tl.sum(tl.sum(tl.sum(acc_a, axis=3), axis=2), axis=0)
    res_b = tl.sum(tl.sum(tl.sum(acc_b, axis=3), axis=2), axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, res_a, mask=rows < N)
        tl.atomic_add(out_ptr + rows + HALF, res_b, mask=rows + HALF < N)
    else:
        tl.store(out_ptr + rows, res_a.to(out_ptr.dtype.element_ty), mask=rows < N)
        tl.store(out_ptr + rows + HALF, res_b.to(out_ptr.dtype.element_ty), mask=rows + HALF < N)


# (BLOCK_N, words per step, warps)
CONFIGS = [(16, 64, 4), (32, 64, 4), (64, 32, 4), (32, 32, 4), (16, 128, 4), (64, 64, 8), (32, 128, 8), (8, 128, 4),
           (128, 16, 4), (64, 16, 4)]
MMA2_CONFIGS = [(8, 128, 4), (16, 64, 4), (8, 64, 2), (16, 128, 4), (4, 128, 2), (8, 256, 8), (16, 128, 8),
                (32, 64, 8), (4, 256, 4), (32, 32, 4), (64, 32, 8)]
PP_CONFIGS = [(8, 128, 4), (16, 64, 4), (8, 64, 2), (16, 128, 4), (4, 128, 2), (32, 64, 8)]
MMA_CONFIGS = [(8, 128, 4), (16, 128, 4), (16, 64, 4), (32, 64, 4), (4, 256, 4), (8, 256, 8), (16, 256, 8),
               (32, 128, 8), (8, 64, 2), (64, 32, 4), (4, 128, 2)]
QUICK = [(16, 64, 4), (32, 64, 4), (64, 32, 4), (32, 128, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--shapes", default="all", choices=["all", "big"])
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dt}")
    code = code_4bit("nf4", torch.device(DEV))
    planes = lut.planes_for(dt)
    dec = lut.decode_asm(tuple(code.tolist()), planes)
    asms = {(0, False): dec, (1, False): dot_asm(dec), (0, True): lut.decode_asm(tuple(code.tolist()), planes, True)}
    tab = torch.tensor(lut.table_words(tuple(code.tolist()), planes), dtype=torch.int32, device=DEV)
    variants = {"lut": (0, False, True), "lutimm": (0, False, False), "lutdot": (1, False, False)}
    if dt == torch.bfloat16:
        variants.update({"lutp": (0, True, True), "lutdotp": (1, True, False)})
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    mma_variants = {"mma": (True, False), "mmaimm": (False, False), "mmaxl": (True, True)}
    if args.only:
        mma_variants = {k: v for k, v in mma_variants.items() if k in args.only}
    mma_asms = {tin: mma_asm(tuple(code.tolist()), dt, tin) for tin in (False, True)} if dt != torch.float32 else {}
    ptab = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in lut.pair_tables(tuple(code.tolist()), dt)],
                        dtype=torch.int32, device=DEV) if dt != torch.float32 else None
    results = []
    for N, K in ((18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072), (10240, 4096), (3072, 12288)):
        copies = max(2, -(-3 * L2_BYTES // (N * K // 2)))
        ws = []
        for _ in range(copies):
            w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dt)
            p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
            ws.append((p, a, w))
        x = torch.randn(1, K, device=DEV, dtype=dt)
        p0, a0, _ = ws[0]
        deq = ref4.dequantize_4bit(p0, a0, 64, "nf4", (N, K), torch.float32).double()
        exact = (x.double() @ deq.T).reshape(-1)
        bound = (x.double().abs() @ deq.abs().T).reshape(-1) * 2 ** -8 + 1e-6
        nbytes = N * K // 2 + N * K // 64 * 4
        row = {"N": N, "K": K, "copies": copies}

        def check(name, out):
            err = (out.double().reshape(-1) - exact).abs()
            ok = bool((err <= bound * 2).all())
            row[name + "_ok"] = ok
            if not ok:
                print(f"  {name}: WRONG, max err / bound {float((err / bound).max()):.2f}")

        lib = lambda pa: gemm4bit.gemv(x, pa[0], pa[1], None, None, None, None, N, K, 64, "nf4")  # noqa: E731
        check("lib", lib(ws[0]))
        row["lib"] = timed_graph(lambda: [lib(pa) for pa in ws]) / copies
        if bnb is not None:
            bq = [bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
                  for _, _, w in ws]
            row["bnb"] = timed_graph(lambda: [bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in bq]) / copies
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for name, (mode, xp, tin) in variants.items():
            best = None
            for bn, wps, warps in (QUICK if args.quick else CONFIGS):
                if (K // 8) % wps:
                    continue
                tiles = triton.cdiv(N, bn)
                steps = (K // 8) // wps
                split = 1
                if tiles < sms:
                    split = max(1, min(triton.cdiv(2 * sms, tiles), steps // 2 if steps >= 4 else 1))
                    while steps % split:
                        split -= 1
                atomic = split > 1
                out = torch.zeros(1, N, dtype=torch.float32 if atomic else dt, device=DEV)

                def call(pa, bn=bn, wps=wps, warps=warps, out=out, split=split, atomic=atomic, steps=steps,
                         mode=mode, xp=xp, tin=tin):
                    if atomic:
                        out.zero_()
                    _gemv_lut[(tiles, split)](x, pa[0].view(torch.int32), pa[1], tab, out, N, K, steps // split,
                                              BLOCK_N=bn, NG=wps // 8, G=8, ASM=asms[mode, tin], MODE=mode, XP=xp,
                                              ATOMIC=atomic, PLANES=planes, TIN=tin, num_warps=warps)
                    return out
                try:
                    check(f"{name}", call(ws[0]))
                    ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} {bn},{wps},{warps}: failed {type(e).__name__}: {str(e)[:300]}")
                    continue
                row[f"{name}/{bn},{wps},{warps}"] = ms
                if best is None or ms < best[0]:
                    best = (ms, (bn, wps, warps, split))
            if best:
                row[name] = best[0]
                row[name + "_cfg"] = best[1]
        if dt != torch.float32 and (not args.only or "lutx" in args.only):
            best = None
            xasm = dotx_asm(tuple(code.tolist()), dt)
            for bn, wps, warps in CONFIGS + [(8, 64, 2), (4, 128, 2), (8, 256, 8), (4, 256, 4)]:
                if (K // 8) % wps:
                    continue
                tiles = triton.cdiv(N, bn)
                steps = (K // 8) // wps
                split = 1
                if tiles < sms:
                    split = max(1, min(triton.cdiv(2 * sms, tiles), steps // 2 if steps >= 4 else 1))
                    while steps % split:
                        split -= 1
                atomic = split > 1
                out = torch.zeros(1, N, dtype=torch.float32 if atomic else dt, device=DEV)

                def call(pa, bn=bn, wps=wps, warps=warps, out=out, split=split, atomic=atomic, steps=steps,
                         tiles=tiles):
                    if atomic:
                        out.zero_()
                    _gemv_x[(tiles, split)](x, pa[0].view(torch.int32), pa[1], tab, out, N, K, steps // split,
                                            BLOCK_N=bn, NG=wps // 8, G=8, ASM=xasm, PLANES=planes, ATOMIC=atomic,
                                            num_warps=warps)
                    return out
                try:
                    check("lutx", call(ws[0]))
                    ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  lutx {bn},{wps},{warps}: failed {type(e).__name__}: {str(e)[:300]}")
                    continue
                row[f"lutx/{bn},{wps},{warps}"] = ms
                if best is None or ms < best[0]:
                    best = (ms, (bn, wps, warps, split))
            if best:
                row["lutx"] = best[0]
                row["lutx_cfg"] = best[1]
        m2variants = {"mma2": (None, 1), "mma2imm": (tuple(code.tolist()), 1), "mma2s2": (None, 2),
                      "mma2s3": (None, 3)}
        for m2name, (m2code, ns) in (m2variants.items() if dt != torch.float32 else ()):
            if args.only and m2name not in args.only:
                continue
            best = None
            m2asm = mma2_asm(dt, m2code)
            for bn, wps, warps in MMA2_CONFIGS if not args.quick else [(16, 128, 4), (4, 256, 4), (8, 256, 8),
                                                                       (4, 128, 2), (8, 128, 4)]:
                if (K // 8) % wps:
                    continue
                tiles = triton.cdiv(N, bn)
                steps = (K // 8) // wps
                split = 1
                if tiles < sms:
                    split = max(1, min(triton.cdiv(2 * sms, tiles), steps // 2 if steps >= 4 else 1))
                    while steps % split:
                        split -= 1
                atomic = split > 1
                out = torch.zeros(1, N, dtype=torch.float32 if atomic else dt, device=DEV)

                def call(pa, bn=bn, wps=wps, warps=warps, out=out, split=split, atomic=atomic, steps=steps,
                         tiles=tiles, m2asm=m2asm, ns=ns):
                    if atomic:
                        out.zero_()
                    _gemv_mma2[(tiles, split)](x, pa[0].view(torch.int32), pa[1], ptab, out, N, K, steps // split,
                                               BLOCK_N=bn, NG=wps // 8, ASM=m2asm, ATOMIC=atomic, NS=ns,
                                               num_warps=warps)
                    return out
                try:
                    check(m2name, call(ws[0]))
                    ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  {m2name} {bn},{wps},{warps}: failed {type(e).__name__}: {str(e)[:300]}")
                    continue
                row[f"{m2name}/{bn},{wps},{warps}"] = ms
                if best is None or ms < best[0]:
                    best = (ms, (bn, wps, warps, split))
            if best:
                row[m2name] = best[0]
                row[m2name + "_cfg"] = best[1]
        for name, prefetch in ({"pp": True, "ppnof": False} if dt == torch.bfloat16 else {}).items():
            if args.only and name not in args.only:
                continue
            best = None
            for (bn, wps, warps), per_sm in itertools.product(PP_CONFIGS, (4, 8, 16)):
                if (K // 8) % wps:
                    continue
                nprog = min(triton.cdiv(N, bn), per_sm * sms)
                out = torch.empty(1, N, dtype=dt, device=DEV)

                def call(pa, bn=bn, wps=wps, warps=warps, out=out, nprog=nprog, prefetch=prefetch):
                    _gemv_pp[(nprog,)](x, pa[0].view(torch.int32), pa[1], tab, out, N, K, (K // 8) // wps,
                                       BLOCK_N=bn, NG=wps // 8, G=8, ASM=asms[0, True], PLANES=planes, TIN=True,
                                       PREFETCH=prefetch, num_warps=warps)
                    return out
                try:
                    check(f"{name}", call(ws[0]))
                    ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} {bn},{wps},{warps}: failed {type(e).__name__}: {str(e)[:300]}")
                    continue
                row[f"{name}/{bn},{wps},{warps},{per_sm}"] = ms
                if best is None or ms < best[0]:
                    best = (ms, (bn, wps, warps, per_sm))
            if best:
                row[name] = best[0]
                row[name + "_cfg"] = best[1]
        for name, (tin, xl) in (mma_variants if mma_asms else {}).items():
            best = None
            for bn, wps, warps in MMA_CONFIGS:
                if (K // 8) % wps:
                    continue
                tiles = triton.cdiv(N, bn)
                steps = (K // 8) // wps
                split = 1
                if tiles < sms:
                    split = max(1, min(triton.cdiv(2 * sms, tiles), steps // 2 if steps >= 4 else 1))
                    while steps % split:
                        split -= 1
                atomic = split > 1
                out = torch.zeros(1, N, dtype=torch.float32 if atomic else dt, device=DEV)

                def call(pa, bn=bn, wps=wps, warps=warps, out=out, split=split, atomic=atomic, steps=steps,
                         tin=tin, xl=xl, tiles=tiles):
                    if atomic:
                        out.zero_()
                    _gemv_mma[(tiles, split)](x, pa[0].view(torch.int32), pa[1], ptab, out, N, K, steps // split,
                                              BLOCK_N=bn, NG=wps // 8, ASM=mma_asms[tin], ATOMIC=atomic, TIN=tin,
                                              XL=xl, num_warps=warps)
                    return out
                try:
                    check(f"{name}", call(ws[0]))
                    ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} {bn},{wps},{warps}: failed {type(e).__name__}: {str(e)[:300]}")
                    continue
                row[f"{name}/{bn},{wps},{warps}"] = ms
                if best is None or ms < best[0]:
                    best = (ms, (bn, wps, warps, split))
            if best:
                row[name] = best[0]
                row[name + "_cfg"] = best[1]
        cells = " ".join(f"{k}={v:.4f}ms({nbytes / v / 1e9:.2f}TB/s)" for k, v in row.items()
                         if isinstance(v, float) and "/" not in k)
        print(f"{N}x{K}: {cells}")
        print("   best cfgs:", {k: v for k, v in row.items() if k.endswith("_cfg")})
        print("   all:", " ".join(f"{k}={v:.4f}" for k, v in row.items() if "/" in k))
        results.append(row)
        ws = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
