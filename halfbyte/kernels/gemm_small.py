"""Fused 4-bit matmul for a few tokens (2 <= M <= ``MAX_M``) on the tensor cores: no weight is ever written out.

At M = 2..64 the weight stream is still the whole cost (docs/kernel-notes.md §0: the ridge point of a 4-bit weight
is M ~ 66 on an H100), yet dequantize + cuBLAS writes and re-reads the weight in 16 bits. This kernel reads each
32-bit word of 8 codes once, decodes it in registers into float16/bfloat16 pairs (the ``prmt`` tables of
``kernels.lut``, as the GEMV of ``kernels.gemv_mma``), and multiplies it with up to 8 tokens per ``mma.m16n8k16``:

* A (16 x 16): weight rows r and r + 8 of the program's 16 rows; lane group g (lanes 4g..4g+3) holds rows g and
  g + 8, and lane c of the group two consecutive words (16 k) of the current absmax group of 64 k. The A fragment
  slots of lane c are its own four decoded pairs, so the k order inside an mma is a permutation shared with B.
* B (16 x 8): the x values of token 8t + g (lane group g) at the same 16 k as lane c's words, read inside the
  assembly block (16-byte loads); tokens past M repeat the last token, whose products are never stored.
* C (16 x 8) after the group's 4 mmas: lane (g, c) holds sum_k code * x of rows g / g + 8 for tokens 8t + 2c and
  8t + 2c + 1 over exactly one absmax group. Triton multiplies it by the group's float32 absmax and accumulates,
  as the GEMV does: no weight is rounded (the codes are, to x's dtype, as bitsandbytes' GEMV table is).

Up to ``TOKENS_PER_PASS`` tokens share one decode (TT token tiles of 8 inside the block; ``default_config`` picks
16 or 32 per shape); more tokens run as more programs along the grid's third axis, each decoding again. K is split
across programs when the row tiles alone would leave the GPU idle; the splits' float32 partial sums are then added
by a second kernel in a fixed order (no atomics: the same bits on every run). The result differs from dequantize +
``F.linear`` by float32 sum order and the code rounding: tests/test_kernels.py's ``unrounded_weights`` bound, as for
the GEMV.

Layout assumption (as ``gemv_mma``): the word tile (4, 8, NG, 2) = (lane of the group, row, group, word pair) lands
dimension 0 on lane bits 0-1 and dimension 1 on lane bits 2-4, warps on the groups. ``layout_ok`` runs the kernel
once per device against the reference before it is used; if triton laid the tile out otherwise, calls keep
dequantize + cuBLAS (with a warning).

Interpreter: each element computes its own (row, group, token) dot product from table loads.
"""

import functools
import warnings

import torch
import triton
import triton.language as tl

from ..formats import fourbit as ref4
from . import lut
from .common import USE_PTX, _num_sms, compile_lock, load_absmax_inbounds, round_to
from .fourbit import absmax_args
from .gemv_mma import _word_dot, mma_tables
from .launch import launch

#: Largest token count this kernel serves (``gemm4bit`` routes 2..MAX_M here).
MAX_M = 64
#: Tokens that share one decode of the weight (token tiles of 8 in one assembly block).
TOKENS_PER_PASS = 32


def small_asm(dtype: torch.dtype, tt: int) -> str:
    """PTX for ``tt`` token tiles of 8, ``dtype`` activations (float16 / bfloat16), pack 2. Outputs: for tile t,
    $4t,$4t+1 = rows a, tokens 8t+2c, 8t+2c+1 and $4t+2,$4t+3 = rows b, same tokens. Inputs (from b = 4tt): the two
    words of row a ($b, $b+1) and of row b ($b+2, $b+3); the addresses of token 0's x at those words ($b+4, $b+5);
    x's row stride in bytes ($b+6); M ($b+8); the 8 ``lut.pair_tables`` words ($b+10+2i)."""
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    b = 4 * tt
    tables = tuple(f"${b + 10 + 2 * i}" for i in range(8))
    lines = ["{", ".reg .b32 %g, %tk, %last;", ".reg .b64 %off, %xa0, %xa1;", ".reg .b32 %x0_<4>, %x1_<4>;"]
    for name, words in (("a", (f"${b}", f"${b + 1}")), ("b", (f"${b + 2}", f"${b + 3}"))):
        for w, reg in enumerate(words):
            outs = tuple(f"%{name}{w}_{k}" for k in range(4))
            lines.append(".reg .b32 " + ", ".join(outs) + ";")
            lines += lut.pair_decode_lines(tables, reg, outs, f"%u{name}{w}")
    lines += ["mov.u32 %g, %laneid;", "shr.u32 %g, %g, 2;", f"sub.u32 %last, ${b + 8}, 1;"]
    for t in range(tt):
        d = "{" + ", ".join(f"${4 * t + i}" for i in range(4)) + "}"
        lines += [f"add.u32 %tk, %g, {8 * t};", "min.u32 %tk, %tk, %last;",  # tokens past M repeat the last one
                  f"mul.wide.u32 %off, %tk, ${b + 6};",
                  f"add.s64 %xa0, ${b + 4}, %off;", f"add.s64 %xa1, ${b + 5}, %off;",
                  "ld.global.nc.v4.b32 {%x0_0, %x0_1, %x0_2, %x0_3}, [%xa0];",
                  "ld.global.nc.v4.b32 {%x1_0, %x1_1, %x1_2, %x1_3}, [%xa1];"]
        lines += [f"mov.f32 ${4 * t + i}, 0f00000000;" for i in range(4)]
        for w in range(2):
            for m0, m1 in ((0, 1), (2, 3)):  # A rows g (row a) and g+8 (row b); B column g = token 8t+g
                lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                             f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, {{%x{w}_{m0}, %x{w}_{m1}}}, {d};")
    lines.append("}")
    return "\n".join(lines)


@triton.jit(do_not_specialize=["M"])
def _split_sum_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      MAXM: tl.constexpr, BLOCK: tl.constexpr, USE_PTX: tl.constexpr):
    """out (M, N) = sum over the K splits of ws (SPLITS, M, N) float32, in split order (the same bits on every
    run, unlike atomics), plus the bias, rounded to out's dtype. A program owns BLOCK columns of all M <= MAXM
    rows (one tile: no loop with a run-time trip count)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.arange(0, MAXM)
    mask = (m < M)[:, None] & (cols < N)[None, :]
    offs = m[:, None] * N + cols[None, :]
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, USE_PTX), mask=mask)


def sum_launch(N: int, splits: int, has_bias: bool) -> tuple[tuple[int], dict]:
    """(grid, kwargs) of ``_split_sum_kernel``."""
    return (triton.cdiv(N, 64),), dict(SPLITS=splits, HAS_BIAS=has_bias, MAXM=MAX_M, BLOCK=64, USE_PTX=USE_PTX,
                                      num_warps=4)


def constraints(tt: int) -> str:
    """``small_asm(dtype, tt)``'s constraint string."""
    return ",".join(["=f"] * (4 * tt)) + ",r,r,r,r,l,l,r,r,r,r" + ",r" * 16


@functools.lru_cache(maxsize=None)
def _asm(dtype: torch.dtype, tt: int) -> str:
    return small_asm(dtype, tt)


@triton.jit
def _group_dot(w_grp, xw, tok, K: tl.constexpr, code_ptr, XT: tl.constexpr):
    """Interpreter path: float32 sum over the 8 words of each element's absmax group (word pointers ``w_grp``)
    of code * x of token ``tok`` (x as int32 pairs: token 0's pairs of the group's first word at ``xw``)."""
    acc = tl.zeros(tok.shape, tl.float32)
    for w in tl.static_range(8):
        acc += _word_dot(tl.load(w_grp + w), xw + tok * (K // 2) + 4 * w, code_ptr, XT)
    return acc


@triton.jit
def _small_store(res, tok, rows, M, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                 USE_PTX: tl.constexpr):
    """Store (4, 8, 2) float32 sums: element (c, r, p) is row ``rows[r]`` of token ``tok[c, 0, p]``; as they are
    (a K split's partial sums) or with the bias, rounded to the output's dtype."""
    mask = (tok < M) & (rows < N)[None, :, None]
    ptrs = out_ptr + tok * N + rows[None, :, None]
    if PARTIAL:
        tl.store(ptrs, res, mask=mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :, None]
        tl.store(ptrs, round_to(res, out_ptr.dtype.element_ty, USE_PTX), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _mm_small_kernel(x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, tab_ptr, code_ptr, bias_ptr,
                     out_ptr, M, N, K: tl.constexpr, STEPS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, NG: tl.constexpr,
                     TT: tl.constexpr, I64: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
                     USE_PTX: tl.constexpr):
    # x is (M, K) with rows K elements apart; out is (M, N), or (splits, M, N) float32 partial sums when PARTIAL.
    rows = tl.program_id(0) * 16 + tl.arange(0, 8)  # rows a; rows b are the next 8
    rows_a = tl.where(rows < N, rows, 0)  # clamped rows load valid data; their results are dropped
    rows_b = tl.where(rows + 8 < N, rows + 8, 0)
    if I64:
        rows_a = rows_a.to(tl.int64)
        rows_b = rows_b.to(tl.int64)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    lane = tl.arange(0, 4)
    pair = tl.arange(0, 2)
    woff = (gi * 8)[None, None, :, None] + (lane * 2)[:, None, None, None] + pair[None, None, None, :]
    w32 = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    wa = w32 + rows_a[None, :, None, None] * KW
    wb = w32 + rows_b[None, :, None, None] * KW
    z = tl.zeros((4, 8, NG, 2), tl.int32)
    tok0 = tl.program_id(2) * (8 * TT)
    x_pass = x_ptr + tok0.to(tl.int64) * K
    xk = x_pass.to(tl.int64, bitcast=True) + 16 * woff.to(tl.int64) + z.to(tl.int64)
    x32 = x_pass.to(tl.pointer_type(tl.int32), bitcast=True)
    m_pass = M - tok0  # tokens of this pass, counted from its first
    blk_a = rows_a[:, None] * (K // BLOCKSIZE)
    blk_b = rows_b[:, None] * (K // BLOCKSIZE)
    acc_a = (tl.zeros((4, 8, NG, 2), tl.float32),) * TT
    acc_b = (tl.zeros((4, 8, NG, 2), tl.float32),) * TT
    kw_start = tl.program_id(1) * (STEPS * NG * 8)
    for i in range(STEPS):  # constexpr trip count: also runs under the interpreter
        kw0 = kw_start + i * (NG * 8)
        gblk = ((kw0 + gi * 8) * 8 // BLOCKSIZE)[None, :]
        am_a = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk_a + gblk, NESTED,
                                    USE_PTX)[None, :, :, None]
        am_b = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk_b + gblk, NESTED,
                                    USE_PTX)[None, :, :, None]
        if USE_PTX:
            qa = tl.load(wa + kw0 + woff, eviction_policy="evict_first")
            qb = tl.load(wb + kw0 + woff, eviction_policy="evict_first")
            ys = tl.inline_asm_elementwise(
                ASM, CONSTRAINTS,
                [qa, qb, xk + 16 * kw0, z + 2 * K, z + m_pass, z + tl.load(tab_ptr), z + tl.load(tab_ptr + 1),
                 z + tl.load(tab_ptr + 2), z + tl.load(tab_ptr + 3), z + tl.load(tab_ptr + 4),
                 z + tl.load(tab_ptr + 5), z + tl.load(tab_ptr + 6), z + tl.load(tab_ptr + 7)],
                dtype=(tl.float32,) * (2 * TT), is_pure=True, pack=2)
            new_a = ()
            new_b = ()
            for t in tl.static_range(TT):
                new_a = new_a + (acc_a[t] + ys[2 * t] * am_a,)
                new_b = new_b + (acc_b[t] + ys[2 * t + 1] * am_b,)
            acc_a = new_a
            acc_b = new_b
        else:
            grp = kw0 + (gi * 8)[None, None, :, None] + z
            new_a = ()
            new_b = ()
            for t in tl.static_range(TT):
                tok = tl.minimum(8 * t + 2 * lane[:, None, None, None] + pair[None, None, None, :] + z, m_pass - 1)
                xw = x32 + 4 * grp
                new_a = new_a + (acc_a[t] + _group_dot(wa + grp, xw, tok, K, code_ptr, x_ptr.dtype.element_ty) * am_a,)
                new_b = new_b + (acc_b[t] + _group_dot(wb + grp, xw, tok, K, code_ptr, x_ptr.dtype.element_ty) * am_b,)
            acc_a = new_a
            acc_b = new_b
    out_pass = out_ptr + tok0.to(tl.int64) * N
    if PARTIAL:
        out_pass += tl.program_id(1).to(tl.int64) * M * N
    for t in tl.static_range(TT):
        tok = 8 * t + 2 * lane[:, None, None] + pair[None, None, :]  # (4, 1, 2)
        _small_store(tl.sum(acc_a[t], axis=2), tok, rows, m_pass, N, bias_ptr, out_pass, HAS_BIAS, PARTIAL,
                     USE_PTX)
        _small_store(tl.sum(acc_b[t], axis=2), tok, rows + 8, m_pass, N, bias_ptr, out_pass, HAS_BIAS, PARTIAL,
                     USE_PTX)


def small_supported(M: int, N: int, K: int, dtype: torch.dtype, blocksize: int, *tensors: torch.Tensor) -> bool:
    """Whether this kernel serves a call of an (N, K) weight: 2 <= M <= ``max_m(N, K)`` tokens of float16 /
    bfloat16 activations, K a multiple of 64 (whole mma groups) and of the blocksize, absmax blocks of at least 64
    (an mma group must not span two), 16-byte aligned x rows (``tensors[0]``, x, contiguous with K % 8 == 0), a
    4-byte aligned weight (``tensors[1:]``), and ``layout_ok``."""
    if not 2 <= M <= max_m(N, K) or not shape_ok(K, dtype, blocksize):
        return False
    if any(t.data_ptr() % 16 for t in tensors[:1]):
        return False
    if any(t.data_ptr() % 4 for t in tensors[1:]):
        return False
    return layout_ok(tensors[0].device)


def shape_ok(K: int, dtype: torch.dtype, blocksize: int) -> bool:
    """The static part of ``small_supported`` for any token count: the dtype, K and blocksize."""
    return dtype in (torch.float16, torch.bfloat16) and blocksize >= 64 and K % 64 == 0 and K % blocksize == 0


def max_m(N: int, K: int) -> int:
    """Most tokens this kernel serves for an (N, K) weight: at 3072 x 3072 and below, dequantize + cuBLAS (whose
    dequantized weight stays in the L2) was faster from 32 tokens on (bench/gemm_small.py, H100)."""
    return 16 if N * K < 2**24 else MAX_M


def default_config(N: int, K: int, M: int) -> tuple[int, int, int, int]:
    """(groups of 64 k per K step, warps, target programs per SM, tokens per pass), from bench/gemm_small.py's
    sweep on an H100 (BENCHMARKS.md, session 10). One group per warp per K step everywhere: two (NG = 2 x warps)
    doubled the registers (134 at 32 tokens per pass) and lost up to 1.7x. Narrow weights (N <= 4096) want
    smaller programs, wide ones fewer K splits; above 16 tokens, N <= 4096 decodes twice (16 tokens per pass)
    rather than hold 32 tokens' sums."""
    if M <= 8:
        return (2, 2, 16, 32) if N <= 4096 else (4, 4, 8, 32)
    if M <= 16:
        return (4, 4, 8, 32) if N >= 16384 else (2, 2, 16, 32)
    if M <= 32:
        return (4, 4, 8, 16) if N <= 4096 else (4, 4, 8, 32) if N >= 16384 else (2, 2, 16, 32)
    return (4, 4, 8, 32) if N <= 4096 else (2, 2, 16, 32)


def small_launch(N: int, K: int, M: int, blocksize: int, nested: bool, has_bias: bool, device: torch.device,
                 dtype: torch.dtype, config: tuple[int, int, int, int] | None = None
                 ) -> tuple[tuple[int, int, int], int, bool, dict]:
    """(grid, K steps per program, partial, kwargs) of ``_mm_small_kernel`` for M tokens. A K step is NG absmax
    groups (warps split them: NG >= warps keeps the tile at least one word pair per lane, else triton would
    replicate it across lanes); K is split across programs (grid[1]) until the grid reaches the target programs
    per SM. partial: the splits write float32 partial sums into a (splits, M, N) workspace, which
    ``_split_sum_kernel`` adds up in a fixed order (with the bias): results do not vary between runs."""
    ng, warps, per_sm, tpp = config or default_config(N, K, M)
    groups = K // 64
    while groups % ng:
        ng //= 2
    warps = min(warps, ng)
    tiles = triton.cdiv(N, 16)
    k_steps = groups // ng
    tt = triton.cdiv(min(M, tpp), 8)
    tt = 1 << (tt - 1).bit_length()  # 1, 2 or 4 token tiles per pass: fewer compiled variants
    passes = triton.cdiv(M, 8 * tt)
    split = min(k_steps, max(1, triton.cdiv(per_sm * _num_sms(device), tiles * passes)))
    while k_steps % split:
        split -= 1
    kwargs = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, PARTIAL=split > 1, NG=ng, TT=tt,
                  I64=N * K >= 2**31 or M * N >= 2**31, ASM=_asm(dtype, tt), CONSTRAINTS=constraints(tt),
                  USE_PTX=USE_PTX, num_warps=warps)
    return (tiles, split, passes), k_steps // split, split > 1, kwargs


def mm_small(x: torch.Tensor, data: torch.Tensor, absmax, nested_absmax, nested_code, offset, bias, N: int, K: int,
             blocksize: int, quant_type: str, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x (M, K) contiguous float16/bfloat16, the packed weight as uint8 ``data``, bias (N,) in x's dtype or None
    -> (M, N) in x's dtype, where ``small_supported``."""
    M = x.shape[0]
    grid, steps, partial, kwargs = small_launch(N, K, M, blocksize, nested_absmax is not None, bias is not None,
                                                x.device, x.dtype, config)
    out = x.new_empty(M, N)
    ws = torch.empty(grid[1], M, N, dtype=torch.float32, device=x.device) if partial else out
    bias_arg = bias if bias is not None else out
    launch(_mm_small_kernel, grid, x, data, *absmax_args(absmax, nested_absmax, nested_code, offset, x.device),
           *mma_tables(quant_type, x.device, x.dtype), bias_arg, ws, M, N, K, steps, **kwargs)
    if partial:
        sgrid, skw = sum_launch(N, grid[1], bias is not None)
        launch(_split_sum_kernel, sgrid, ws, bias_arg, out, M, N, **skw)
    return out


def _layout_verdict(device: torch.device) -> bool:
    """One run on a 16 x 2048 weight with 11 tokens against dequantize + matmul in float64 (module doc)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(16, 2048, generator=g) / 2048**0.5
    packed, absmax = ref4.quantize_4bit(w, 64, "nf4")
    x = torch.randn(11, 2048, generator=g).to(torch.float16)
    out = mm_small(x.to(device), packed.reshape(-1).view(torch.uint8).to(device), absmax.to(device), None, None,
                   None, None, 16, 2048, 64, "nf4")
    W = ref4.dequantize_4bit(packed, absmax, 64, "nf4", (16, 2048), torch.float32).double()
    ref = x.double() @ W.T
    scale = x.double().abs() @ W.abs().T
    ok = bool(((out.double().cpu() - ref).abs() <= 2.0**-8 * scale + 1e-3).all())
    if not ok:
        warnings.warn("halfbyte: triton laid out the small-batch tensor-core kernel's tiles otherwise than it "
                      "assumes; 4-bit matmuls of 2-64 tokens use dequantize + cuBLAS on this device",
                      RuntimeWarning, stacklevel=3)
    return ok


_VERDICTS: dict[torch.device, bool] = {}


def layout_ok(device: torch.device) -> bool:
    """``_layout_verdict`` for ``device``, checked once (not while a CUDA graph is being captured: a device not
    checked yet then answers False and is checked on a later call)."""
    if device.type != "cuda":  # the interpreter's path computes each element on its own: no layout assumed
        return True
    if device not in _VERDICTS:
        if torch.cuda.is_current_stream_capturing():
            return False
        with compile_lock(("gemm_small.layout", device)):  # threads: one check, the others wait for it
            if device not in _VERDICTS:
                _VERDICTS[device] = _layout_verdict(device)
    return _VERDICTS[device]
