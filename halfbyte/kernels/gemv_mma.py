"""Tensor-core 4-bit GEMV (M = 1) for 16-bit activations: ``mma.sync`` sums code * x over each absmax group.

Each lane decodes its 32-bit words of 8 codes into four packed float16 pairs with ``prmt`` register tables
(``lut.pair_decode_lines``) and feeds them, with the matching x pairs read inside the same assembly block, to
``mma.m16n8k16``: rows g / g+8 of the A fragment hold two weight rows, B holds x. An mma lane group (4 lanes) holds
the 8 words of one absmax group of one row, so the diagonal entry C[g][g] (lane 4g + g/2) is exactly that group's
``sum code * x``; that lane returns it, the others 0, and triton multiplies by the absmax and accumulates. Per word
this is ~40 instructions against ~52 for the float32 decode + FMA of ``gemv._gemv_lut_kernel`` and ~80 for the
table-load kernel (BENCHMARKS.md, "GEMV with register tables"): 1.05-1.51x bitsandbytes' speed in float16 on an
H100, where the table-load kernel was 0.9-1.0x. bfloat16 takes it where K % 2048 == 0 (``mma_supported``), where
it beat the register-table kernel.

Layout assumption: the word tiles are (4, HALF, NG, 2) = (lane of the group, row, group, word pair). Triton orders
dimensions of equal contiguity by index, so dimension 0 lands on lane bits 0-1 and the group's 4 lanes share row and
group. Were a triton version to lay the tile out otherwise the sums would mix rows, so ``layout_ok`` runs the kernel
once per device against the table-load kernel before it is used, and the GEMV keeps the table-load kernel (with a
warning) if they disagree.

Interpreter: every element computes its own word's dot product (table loads), and the sums are the same up to
float32 order.
"""

import functools
import warnings

import torch
import triton
import triton.language as tl

from ..formats import fourbit as ref4
from . import lut
from .common import USE_PTX, compile_lock, gemv_split, gemv_store, load_absmax_inbounds
from .fourbit import absmax_args
from .gemv import finish, gemv_tables
from .launch import launch


def mma_asm(dtype: torch.dtype = torch.float16) -> str:
    """The PTX block for ``dtype`` activations (float16 or bfloat16): $0,$1 / $2,$3 the f32
    results of rows a / b; $4,$5 two consecutive words of row a; $6,$7 the same words of row b; $8,$9 the 16-byte
    addresses of their x values; $10 + 2i table word i (``lut.pair_tables(code, dtype)``)."""
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    tables = tuple(f"${10 + 2 * i}" for i in range(8))
    lines = ["{", ".reg .f32 %d<4>, %ra, %rb;", ".reg .b32 %ln, %g, %c, %gh, %go;", ".reg .pred %ph, %po;",
             ".reg .b32 %x0_<4>, %x1_<4>;"]
    for w in range(2):
        lines.append(f"ld.global.nc.v4.b32 {{%x{w}_0, %x{w}_1, %x{w}_2, %x{w}_3}}, [${8 + w}];")
    for name, words in (("a", ("$4", "$5")), ("b", ("$6", "$7"))):
        for w, reg in enumerate(words):
            outs = tuple(f"%{name}{w}_{k}" for k in range(4))
            lines.append(".reg .b32 " + ", ".join(outs) + ";")
            lines += lut.pair_decode_lines(tables, reg, outs, f"%u{name}{w}")
    lines += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
    d = "{%d0, %d1, %d2, %d3}"
    for w in range(2):
        for m0, m1 in ((0, 1), (2, 3)):  # A rows g (row a) and g+8 (row b), k = this lane's 4 slots; B = x
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                         f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, {{%x{w}_{m0}, %x{w}_{m1}}}, {d};")
    # C[g][g] sits in lane 4g + g/2: register d0 (g even) or d1 (g odd); C[g+8][g] in d2 / d3 of the same lane.
    lines += ["mov.u32 %ln, %laneid;", "shr.u32 %g, %ln, 2;", "and.b32 %c, %ln, 3;", "shr.u32 %gh, %g, 1;",
              "setp.eq.u32 %ph, %c, %gh;", "and.b32 %go, %g, 1;", "setp.ne.u32 %po, %go, 0;",
              "selp.f32 %ra, %d1, %d0, %po;", "selp.f32 %rb, %d3, %d2, %po;",
              "selp.f32 $0, %ra, 0f00000000, %ph;", "selp.f32 $2, %rb, 0f00000000, %ph;",
              "mov.f32 $1, 0f00000000;", "mov.f32 $3, 0f00000000;", "}"]
    return "\n".join(lines)


@triton.jit
def _x_f32(p, shift: tl.constexpr, XT: tl.constexpr):
    """The ``XT`` (float16 / bfloat16) half of 32-bit pairs ``p`` (low half when shift is 0, high when 16) ->
    float32."""
    return ((p >> shift) & 0xFFFF).to(tl.int16).to(XT, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(q, xw, code_ptr, XT: tl.constexpr):
    """Interpreter path: float32 sum_j code[q_j] * x_j of each word of q, x at int32 pair pointers ``xw``."""
    acc = tl.zeros(q.shape, tl.float32)
    for m in tl.static_range(4):
        p = tl.load(xw + m)
        acc += tl.load(code_ptr + ((q >> (8 * m + 4)) & 15)) * _x_f32(p, 0, XT)
        acc += tl.load(code_ptr + ((q >> (8 * m)) & 15)) * _x_f32(p, 16, XT)
    return acc


@triton.jit
def _gemv_mma_kernel(x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, tab_ptr, code_ptr, bias_ptr,
                     out_ptr, N, K: tl.constexpr, STEPS: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_N: tl.constexpr, NG: tl.constexpr, I64: tl.constexpr, ASM: tl.constexpr,
                     USE_PTX: tl.constexpr):
    HALF: tl.constexpr = BLOCK_N // 2  # rows a: the program's first HALF rows, rows b: the next HALF
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, HALF)
    rows_a = tl.where(rows < N, rows, 0)  # clamped rows load valid data; their results are dropped
    rows_b = tl.where(rows + HALF < N, rows + HALF, 0)
    if I64:
        rows_a = rows_a.to(tl.int64)
        rows_b = rows_b.to(tl.int64)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    # (4, 1, NG, 2) word offsets in a K step: lane of the mma lane group, -, absmax group, word of the lane
    woff = ((gi * 8)[None, None, :, None] + (tl.arange(0, 4) * 2)[:, None, None, None]
            + tl.arange(0, 2)[None, None, None, :])
    w32 = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    wa = w32 + rows_a[None, :, None, None] * KW
    wb = w32 + rows_b[None, :, None, None] * KW
    shape: tl.constexpr = (4, HALF, NG, 2)
    z = tl.zeros(shape, tl.int32)
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    xbase = x_ptr.to(tl.int64, bitcast=True) + 16 * woff.to(tl.int64) + z.to(tl.int64)
    blk_a = rows_a[:, None] * (K // BLOCKSIZE)
    blk_b = rows_b[:, None] * (K // BLOCKSIZE)
    acc_a = tl.zeros(shape, tl.float32)
    acc_b = tl.zeros(shape, tl.float32)
    kw_start = tl.program_id(1) * (STEPS * NG * 8)
    for i in range(STEPS):  # constexpr trip count: also runs under the interpreter
        kw0 = kw_start + i * (NG * 8)
        qa = tl.load(wa + kw0 + woff, eviction_policy="evict_first")
        qb = tl.load(wb + kw0 + woff, eviction_policy="evict_first")
        gblk = ((kw0 + gi * 8) * 8 // BLOCKSIZE)[None, :]
        am_a = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk_a + gblk, NESTED, USE_PTX)
        am_b = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk_b + gblk, NESTED, USE_PTX)
        if USE_PTX:
            ya, yb = tl.inline_asm_elementwise(
                ASM, "=f,=f,=f,=f,r,r,r,r,l,l" + ",r" * 16,
                [qa, qb, xbase + 16 * kw0, z + tl.load(tab_ptr), z + tl.load(tab_ptr + 1), z + tl.load(tab_ptr + 2),
                 z + tl.load(tab_ptr + 3), z + tl.load(tab_ptr + 4), z + tl.load(tab_ptr + 5),
                 z + tl.load(tab_ptr + 6), z + tl.load(tab_ptr + 7)],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
        else:
            xw = x32 + 4 * (kw0 + woff) + z
            ya = _word_dot(qa, xw, code_ptr, x_ptr.dtype.element_ty)
            yb = _word_dot(qb, xw, code_ptr, x_ptr.dtype.element_ty)
        acc_a += ya * am_a[None, :, :, None]
        acc_b += yb * am_b[None, :, :, None]
    res_a = tl.sum(tl.sum(tl.sum(acc_a, axis=3), axis=2), axis=0)  # (HALF,)
    res_b = tl.sum(tl.sum(tl.sum(acc_b, axis=3), axis=2), axis=0)
    gemv_store(res_a, rows, N, bias_ptr, out_ptr, HAS_BIAS, ATOMIC, USE_PTX)
    gemv_store(res_b, rows + HALF, N, bias_ptr, out_ptr, HAS_BIAS, ATOMIC, USE_PTX)


@functools.lru_cache(maxsize=None)
def mma_tables(quant_type: str, device: torch.device,
               dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(8,) int32 ``prmt`` table words of the codes rounded to ``dtype``, and (16,) float32 of the same values
    (the interpreter's table). Cached: a call does no host-to-device copy."""
    code = ref4.code_4bit(quant_type, torch.device("cpu"))
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in lut.pair_tables(tuple(code.tolist()), dtype)]
    return (torch.tensor(words, dtype=torch.int32, device=device), code.to(dtype).to(torch.float32).to(device))


def mma_supported(dtype: torch.dtype, K: int, blocksize: int, *tensors: torch.Tensor) -> bool:
    """Whether this kernel serves a GEMV: float16 activations with K % 512 == 0, bfloat16 with K % 2048 == 0;
    absmax groups of at least 64 (an mma lane group covers 64 weights of one row); 4-byte aligned weight and x; and
    ``layout_ok`` on the device. A K step under 512 leaves the tile smaller than the warps, triton then replicates
    elements across lanes, and that breaks the lane-group assumption (measured: illegal addresses). In bfloat16 this
    kernel beat the register-table one (``gemv._gemv_lut_kernel``) by 8-19 % where K % 2048 == 0 and lost at
    K = 3072 (bench/gemv_lut.py --only mma, bench/gemv_smem.py; H100), so bfloat16 takes it only at those widths."""
    if not shape_ok(dtype, K, blocksize) or any(t.data_ptr() % 4 for t in tensors):
        return False
    return layout_ok(tensors[0].device)


def shape_ok(dtype: torch.dtype, K: int, blocksize: int) -> bool:
    """The static part of ``mma_supported``: the dtype, K and blocksize."""
    need = {torch.float16: 512, torch.bfloat16: 2048}.get(dtype)
    return need is not None and blocksize >= 64 and K % need == 0


def _layout_verdict(device: torch.device) -> bool:
    """One run of the kernel on a 16 x 2048 weight against the table-load kernel's result (see the module doc)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(16, 2048, generator=g) / 2048**0.5
    packed, absmax = ref4.quantize_4bit(w, 64, "nf4")
    packed, absmax = packed.to(device), absmax.to(device)
    x = torch.randn(1, 2048, generator=g).to(torch.float16).to(device)
    data = packed.reshape(-1).view(torch.uint8)
    out = gemv_mma(x, data, absmax, None, None, None, None, 16, 2048, 64, "nf4")
    ref = gemv_tables(x, data, absmax, None, None, None, None, 16, 2048, 64, "nf4")
    W = ref4.dequantize_4bit(packed, absmax, 64, "nf4", (16, 2048), torch.float32)
    scale = x.float().abs() @ W.abs().T
    ok = bool(((out.float() - ref.float()).abs() <= 2.0**-8 * scale + 1e-3).all())
    if not ok:
        warnings.warn("halfbyte: triton laid out the tensor-core GEMV's tiles otherwise than it assumes; GEMVs "
                      "use the register-table or table-load kernels on this device", RuntimeWarning, stacklevel=3)
    return ok


_VERDICTS: dict[torch.device, bool] = {}


def layout_ok(device: torch.device) -> bool:
    """``_layout_verdict`` for ``device``, checked once; while a CUDA graph is being captured the check cannot run,
    so a device not checked yet answers False (the table-load kernel serves) and is checked on a later call."""
    if device not in _VERDICTS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        with compile_lock(("gemv_mma.layout", device)):  # threads: one check, the others wait for it
            if device not in _VERDICTS:
                _VERDICTS[device] = _layout_verdict(device)
    return _VERDICTS[device]


def default_config(K: int) -> tuple[int, int, int]:
    """(BLOCK_N, words per K step, warps), from bench/gemv_lut.py's sweep on an H100 ("mma2"): 4 rows x 256 words
    where K's words allow it, else 4 rows x 128 words on 2 warps."""
    return (4, 256, 4) if (K // 8) % 256 == 0 else (4, 128, 2)


def mma_launch(N: int, K: int, blocksize: int, nested: bool, has_bias: bool, device: torch.device,
               config: tuple[int, int, int] | None = None,
               dtype: torch.dtype = torch.float16) -> tuple[tuple[int, int], int, bool, dict]:
    """(grid, K steps per program, atomic, kwargs) of ``_gemv_mma_kernel`` for ``dtype`` activations, as
    ``gemv.gemv_launch``."""
    block_n, words, warps = config or default_config(K)
    while (K // 8) % words:  # mma_supported: K % 512 == 0, so this stops at 64 words or more
        words //= 2
    if block_n // 2 * words < 64 * warps:  # each lane needs a whole word pair of each of its two rows
        raise ValueError(f"gemv_mma: a {block_n}-row x {words}-word step is smaller than {warps} warps x 32 lanes "
                         f"x 2 words; triton would replicate it across lanes (measured: illegal addresses)")
    tiles = triton.cdiv(N, block_n)
    k_steps = (K // 8) // words
    split = gemv_split(tiles, k_steps, device)
    kwargs = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, ATOMIC=split > 1, BLOCK_N=block_n,
                  NG=words // 8, I64=N * K >= 2**31, ASM=_asm(dtype), USE_PTX=USE_PTX, num_warps=warps)
    return (tiles, split), k_steps // split, split > 1, kwargs


@functools.lru_cache(maxsize=None)
def _asm(dtype: torch.dtype) -> str:
    return mma_asm(dtype)


def gemv_mma(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``gemm4bit.gemv``'s contract for float16 (or, for the benches, bfloat16) x (1, K) and the packed weight as
    uint8 ``data``, where ``mma_supported``."""
    grid, steps, atomic, kwargs = mma_launch(N, K, blocksize, nested_absmax is not None, bias is not None,
                                             x.device, config, x.dtype)
    out = torch.zeros(1, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(1, N)
    launch(_gemv_mma_kernel, grid, x, data, *absmax_args(absmax, nested_absmax, nested_code, offset, x.device),
           *mma_tables(quant_type, x.device, x.dtype), bias if bias is not None else out, out, N, K, steps,
           **kwargs)
    return finish(out, atomic, bias, x.dtype)
