"""Triton LLM.int8() kernels: row-wise activation quantization with outlier detection in one pass over the input,
and the int8 matmul's dequantization epilogue; bit-exact with ``formats.int8`` (bitsandbytes' CUDA bytes, §5).

``int8_vectorwise_quant``: one program per row. The first sweep over the row takes the absmax over the
non-outlier elements and flags outlier columns in an int32 (K,) array; the second sweep (the row is still in L1/L2)
writes ``rint(a * fdividef(127, absmax))``. Only the flagged columns are then zeroed across all rows (bitsandbytes
zeroes whole outlier columns when M > 1), which needs every row's flags and so runs after the kernel.

``int8_mixed_mm``: no host sync, five launches. (1) ``_flag_kernel`` marks the outlier columns in a device
workspace and ``_list_kernel`` lists them in ascending order (as the reference's ``nonzero``: the same sum order on
every run). (2) ``_quant_gather_kernel`` quantizes each row with those columns
zeroed (as bitsandbytes does for M > 1) and gathers the activations' outlier columns into ``xg``, while its other
programs gather the weight's outlier columns, dequantized, into ``wg``. (3) ``_int8_mm_kernel``: one Triton int8
GEMM (int32 accumulation on the tensor cores: exact, hence the reference's C) whose epilogue applies
``fp16(C * SCA * SCB * 6.200012e-05 + bias)`` in the reference's operation order to the tile in registers (the
int32 C never reaches memory: at 4608 x 12288 that round trip alone was 226 MB) and rounds to the activation dtype.
(4) ``_outlier_add_kernel`` adds ``xg @ wg.T`` over the ``count`` outlier columns (tensor cores, float32) to that
result and rounds once more, as the reference's ``addmm`` does; only that float32 sum's order differs from the
reference. It exits at once when no column is an outlier.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..formats import int8 as ref8
from .common import INTERPRET, USE_PTX, mul_rn, rcp_approx, rcp_table, rint, round_to
from .launch import launch

#: The gathered outlier columns (xg, wg) are zero-padded to a multiple of this, so that the outlier kernel reads
#: whole unmasked steps of ``MMConfig.oc`` columns (a divisor of it): masked column loads did not vectorize.
_OUT_PAD = 128
OUT_PAD = tl.constexpr(_OUT_PAD)
#: Launch shapes of the outlier-flag kernel and of the row quantization with gathers, from
#: bench/int8_quant_sweep.py (H200, FLUX and T5 activations, 0 and 350 outlier columns): the flag kernel scans 4 row
#: tiles per program from 2048 rows up (one below: more programs); rows are quantized in 1024-column steps by 4 warps
#: up to K = 4096, in 2048-column steps by 8 warps above (the former 4096 x 8 warps took 1.2-1.45x as long).
#: Settable for the sweep; None = by shape.
_FLAG_CONFIG: dict | None = None
_QUANT_CONFIG: dict | None = None


def _flag_config(rows: int, K: int) -> dict:
    if _FLAG_CONFIG is not None:
        return _FLAG_CONFIG
    return dict(block_m=32, block_k=256, row_iters=4 if rows >= 2048 else 1, num_warps=4)


def _quant_config(K: int) -> dict:
    if _QUANT_CONFIG is not None:
        return _QUANT_CONFIG
    return dict(block_k=1024, num_warps=4) if K <= 4096 else dict(block_k=2048, num_warps=8)


@triton.jit
def _quant_row(row, a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, pos_ptr, xg_ptr, stride_am, stride_xg, thr_h,
               thr_f, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_THR: tl.constexpr, GATHER: tl.constexpr,
               USE_PTX: tl.constexpr):
    """One row: absmax over the non-outlier elements, codes with outlier elements 0. Without GATHER, flags (K,)
    marks outlier columns. With GATHER the columns are known (``pos[k]`` = 1 + the column's place in the outlier
    list, 0 if none, ``flags_ptr[3K]`` their count): their codes are 0 in every row, the row's values there go to
    ``xg[row, pos - 1]``, and xg's columns from the count up to the next multiple of OUT_PAD are zeroed."""
    row = row.to(tl.int64)
    a_row = a_ptr + row * stride_am
    STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    run_max = tl.zeros((BLOCK_K,), tl.float32)
    for c in range(STEPS):
        k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        # bitsandbytes quantizes float16: round once to half, then compare and scale in float32
        a = tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32).to(tl.float16).to(tl.float32)
        mag = tl.abs(a)
        keep = mag == mag  # fmaxf ignores NaN
        if HAS_THR:
            outlier = mag >= thr_h  # the column/absmax test compares in half precision
            if not GATHER:
                tl.store(flags_ptr + k, tl.full((BLOCK_K,), 1, tl.int32), mask=outlier & (k < K))
            keep = keep & (mag < thr_h)
        run_max = tl.maximum(run_max, tl.where(keep, mag, 0.0))
    absmax = tl.max(run_max, axis=0)
    scale = 127.0 * rcp_approx(absmax, delta_ptr, USE_PTX)  # __fdividef(127, absmax)
    for c in range(STEPS):
        k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        raw = tl.load(a_row + k, mask=k < K, other=0.0)
        a = raw.to(tl.float32).to(tl.float16).to(tl.float32)
        q = rint(a * scale, USE_PTX)
        q = tl.where(q == q, q, 0.0)  # NaN (a NaN input, or 0 * inf in an all-zero row) converts to 0 on CUDA
        if HAS_THR:
            q = tl.where(tl.abs(a) < thr_f, q, 0.0)  # outlier elements are 0 (float32 test, as the reference)
            if GATHER:
                pos = tl.load(pos_ptr + k, mask=k < K, other=0) - 1
                q = tl.where(pos >= 0, 0.0, q)  # bitsandbytes zeroes outlier columns whole
                tl.store(xg_ptr + row * stride_xg + pos, raw, mask=pos >= 0)  # the input's own value and dtype
        tl.store(ca_ptr + row * K + k, q.to(tl.int8), mask=k < K)
    tl.store(sca_ptr + row, absmax)
    if GATHER:
        n_out = tl.load(flags_ptr + 3 * K)
        z = n_out + tl.arange(0, OUT_PAD)
        tl.store(xg_ptr + row * stride_xg + z, tl.zeros((OUT_PAD,), xg_ptr.dtype.element_ty),
                 mask=z < tl.cdiv(n_out, OUT_PAD) * OUT_PAD)


@triton.jit
def _row_quant_kernel(a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, stride_am, thr_h, thr_f,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_THR: tl.constexpr, USE_PTX: tl.constexpr):
    _quant_row(tl.program_id(0), a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, flags_ptr, a_ptr, stride_am, 0,
               thr_h, thr_f, K, BLOCK_K, HAS_THR, False, USE_PTX)


@functools.lru_cache(maxsize=None)
def _thresholds(threshold: float) -> tuple[float, float]:
    """(threshold rounded to float16, to float32) as Python floats: the two comparisons of the reference."""
    return (float(torch.tensor(threshold, dtype=torch.float16)), float(torch.tensor(threshold, dtype=torch.float32)))


def row_quant_launch(A2: torch.Tensor, ca: torch.Tensor, sca: torch.Tensor, flags: torch.Tensor, threshold: float):
    """(fn, grid, args, kwargs) of ``_row_quant_kernel`` on (rows, K) A2 (unit column stride) into ca (rows, K)
    int8, sca (rows,) float32 and, with a threshold, the zeroed int32 flags (K,) (unread without one)."""
    rows, K = A2.shape
    thr_h, thr_f = _thresholds(threshold)
    qc = _quant_config(K)
    return (_row_quant_kernel, (rows,), (A2, ca, sca, flags, rcp_table(A2.device), A2.stride(0), thr_h, thr_f),
            dict(K=K, BLOCK_K=min(qc["block_k"], triton.next_power_of_2(K)), HAS_THR=threshold > 0,
                 USE_PTX=USE_PTX, num_warps=qc["num_warps"]))


def _quant_rows(A2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows, K) float, unit column stride -> CA (rows, K) int8 with outlier *elements* zeroed, SCA (rows,)
    float32, flags (K,) int32 (1 = the column holds an outlier; None without threshold). No host sync."""
    rows, K = A2.shape
    ca = torch.empty((rows, K), dtype=torch.int8, device=A2.device)
    sca = torch.empty(rows, dtype=torch.float32, device=A2.device)
    has_thr = threshold > 0
    flags = torch.zeros(K if has_thr else 1, dtype=torch.int32, device=A2.device)
    fn, grid, args, kwargs = row_quant_launch(A2, ca, sca, flags, threshold)
    launch(fn, grid, *args, **kwargs)
    return ca, sca, flags if has_thr else None


@triton.jit
def _flag_kernel(a_ptr, ws_ptr, M, stride_am, thr_h, K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROW_ITERS: tl.constexpr):
    """Outlier columns (float16 |a| >= threshold in any row; NaN never is): ws[k] = 1 in the int32 workspace
    (zeroed before). A program scans ROW_ITERS x BLOCK_M rows of BLOCK_K columns. Programs that flag the same
    column store the same value: plain stores, no atomics."""
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seen = tl.zeros((BLOCK_M, BLOCK_K), tl.int1)
    for i in range(ROW_ITERS):
        rm = (tl.program_id(0) * ROW_ITERS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = (rm < M)[:, None] & (k < K)[None, :]
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * stride_am + k[None, :], mask=inside, other=0.0)
        seen = seen | (tl.abs(a.to(tl.float32).to(tl.float16).to(tl.float32)) >= thr_h)
    hit = (tl.max(seen.to(tl.int32), axis=0) > 0) & (k < K)
    tl.store(ws_ptr + k, tl.full((BLOCK_K,), 1, tl.int32), mask=hit)


@triton.jit
def _list_kernel(ws_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    """The outlier columns in ascending order, from the flags ws[:K]: ws[K + k] = 1 + column k's place in the list
    (0 if not an outlier), ws[2K:] the list, ws[3K] its length. One program per BLOCK columns; each sums the flags
    before its block itself (no chain between programs). Ascending like the reference's ``nonzero``, so the
    outlier products are summed in the same order on every run."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    base = 0
    j = 0
    while j < pid:  # a while loop: its bound is data (the interpreter's range() wants a Python int)
        base += tl.sum(tl.load(ws_ptr + j * BLOCK + r), axis=0)  # whole blocks: j * BLOCK + BLOCK <= K
        j += 1
    k = pid * BLOCK + r
    f = tl.load(ws_ptr + k, mask=k < K, other=0)
    place = base + tl.cumsum(f, axis=0)  # 1-based place of each flagged column
    tl.store(ws_ptr + K + k, tl.where(f > 0, place, 0), mask=k < K)
    tl.store(ws_ptr + 2 * K + place - 1, k, mask=f > 0)
    if pid == tl.num_programs(0) - 1:
        tl.store(ws_ptr + 3 * K, base + tl.sum(f, axis=0))


@triton.jit
def _gather_w(pid, cb_ptr, scb_ptr, cols_ptr, count_ptr, wg_ptr, N, stride_cb, stride_wg,
              BLOCK_N: tl.constexpr, OC: tl.constexpr, USE_PTX: tl.constexpr):
    """wg[n, j] = x-dtype((CB[n, cols[j]] * SCB[n]) * (1/127)) for j < count, rows of program ``pid``: the
    dequantized outlier columns of the weight, as the reference's ``int8_vectorwise_dequant(CB[:, cols],
    SCB).to(x.dtype)``; 0 from count up to the next multiple of OUT_PAD. A program's rows of CB are read once
    from memory (scattered columns share cache lines)."""
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nin = (n < N)[:, None]
    n64 = n.to(tl.int64)[:, None]
    scb = tl.load(scb_ptr + n, mask=n < N, other=0.0)[:, None]
    n_out = tl.load(count_ptr)
    n_pad = tl.cdiv(n_out, OUT_PAD) * OUT_PAD
    c0 = 0
    while c0 < n_pad:  # a while loop: its bound is data (the interpreter's range() wants a Python int)
        ci = c0 + tl.arange(0, OC)
        cin = (ci < n_out)[None, :]
        col = tl.load(cols_ptr + ci, mask=ci < n_out, other=0)[None, :]
        cb = tl.load(cb_ptr + n64 * stride_cb + col, mask=nin & cin, other=0)  # 0 past the count
        w = round_to(cb.to(tl.float32) * scb * 0.007874015718698502, wg_ptr.dtype.element_ty, USE_PTX)
        w = tl.where(cin, w, 0.0)  # exact zeros in the padding, whatever SCB holds
        tl.store(wg_ptr + n64 * stride_wg + ci[None, :], w, mask=nin & (ci < n_pad)[None, :])
        c0 += OC


@triton.jit
def _quant_gather_kernel(a_ptr, ca_ptr, sca_ptr, ws_ptr, delta_ptr, xg_ptr, cb_ptr, scb_ptr, wg_ptr, M, N,
                         stride_am, stride_cb, stride_xg, stride_wg, thr_h, thr_f, K: tl.constexpr,
                         BLOCK_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, USE_PTX: tl.constexpr):
    """Programs [0, G = cdiv(N, BLOCK_N)): gather the weight's outlier columns into wg. Programs [G, G + M):
    quantize a row, zero the outlier columns, gather its outlier values into xg. One launch for both. The weight
    gathers go first: their loads are scattered and serial (latency-bound), and launched last they ran as a tail
    on a few SMs after the row programs (up to ~25 us per FLUX layer)."""
    pid = tl.program_id(0)
    G = tl.cdiv(N, BLOCK_N)
    if pid < G:
        _gather_w(pid, cb_ptr, scb_ptr, ws_ptr + 2 * K, ws_ptr + 3 * K, wg_ptr, N, stride_cb, stride_wg,
                  BLOCK_N, 32, USE_PTX)
    else:
        _quant_row(pid - G, a_ptr, ca_ptr, sca_ptr, ws_ptr, delta_ptr, ws_ptr + K, xg_ptr, stride_am, stride_xg,
                   thr_h, thr_f, K, BLOCK_K, True, True, USE_PTX)


def workspace_size(K: int) -> int:
    """int32 elements of the outlier workspace ``_flag_kernel`` fills (zeroed before it runs)."""
    return 3 * K + 1


def padded_width(K: int) -> int:
    """Columns of xg / wg: K rounded up to a multiple of OUT_PAD (room for every outlier column, zero-padded)."""
    return triton.cdiv(K, _OUT_PAD) * _OUT_PAD


def flag_launch(A2: torch.Tensor, ws: torch.Tensor, threshold: float):
    """(fn, grid, args, kwargs) of ``_flag_kernel``: A2 (rows, K), unit column stride; ws the int32 workspace
    (``workspace_size(K)``) with its first K entries zeroed."""
    rows, K = A2.shape
    fc = _flag_config(rows, K)
    bm, bk, iters = fc["block_m"], min(fc["block_k"], triton.next_power_of_2(K)), fc["row_iters"]
    return (_flag_kernel, (triton.cdiv(rows, bm * iters), triton.cdiv(K, bk)),
            (A2, ws, rows, A2.stride(0), _thresholds(threshold)[0]),
            dict(K=K, BLOCK_M=bm, BLOCK_K=bk, ROW_ITERS=iters, num_warps=fc["num_warps"]))


def list_launch(ws: torch.Tensor, K: int):
    """(fn, grid, args, kwargs) of ``_list_kernel`` on the workspace ``flag_launch`` flagged."""
    block = min(1024, triton.next_power_of_2(K))
    return _list_kernel, (triton.cdiv(K, block),), (ws,), dict(K=K, BLOCK=block, num_warps=4)


#: Rows of the weight per weight-gather program of ``_quant_gather_kernel``: many small programs, spread over the SMs.
_GATHER_ROWS = 16


def quant_gather_launch(A2, ca, sca, ws, xg, CB, SCB, wg, threshold: float):
    """(fn, grid, args, kwargs) of ``_quant_gather_kernel``: A2 (rows, K) float (unit column stride) -> ca (rows,
    K) int8, sca (rows,) float32, xg (rows, Kp) / wg (N, Kp) in A2's dtype (``padded_width``), after
    ``flag_launch`` filled ws. CB (N, K) int8 with unit column stride, SCB (N,) float32."""
    rows, K = A2.shape
    N = CB.shape[0]
    thr_h, thr_f = _thresholds(threshold)
    qc = _quant_config(K)
    return (_quant_gather_kernel, (rows + triton.cdiv(N, _GATHER_ROWS),),
            (A2, ca, sca, ws, rcp_table(A2.device), xg, CB, SCB, wg, rows, N, A2.stride(0), CB.stride(0),
             xg.stride(0), wg.stride(0), thr_h, thr_f),
            dict(K=K, BLOCK_K=min(qc["block_k"], triton.next_power_of_2(K)), BLOCK_N=_GATHER_ROWS, USE_PTX=USE_PTX,
                 num_warps=qc["num_warps"]))


def _quant_with_outliers(A2: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float):
    """(rows, K) float, threshold > 0 -> CA (rows, K) int8 (outlier columns zeroed whole, as the reference),
    SCA (rows,) float32, and (xg, wg, count): the first ``count`` columns of xg (rows, Kp) / wg (N, Kp), A2's
    dtype, hold A2's outlier columns and the dequantized weight columns, zeros up to the next multiple of
    OUT_PAD (Kp = K rounded up to one). Three launches, no host sync."""
    rows, K = A2.shape
    N = CB.shape[0]
    ws = torch.zeros(workspace_size(K), dtype=torch.int32, device=A2.device)
    for fn, grid, args, kwargs in (flag_launch(A2, ws, threshold), list_launch(ws, K)):
        launch(fn, grid, *args, **kwargs)
    ca = torch.empty((rows, K), dtype=torch.int8, device=A2.device)
    sca = torch.empty(rows, dtype=torch.float32, device=A2.device)
    kp = padded_width(K)
    xg = torch.empty((rows, kp), dtype=A2.dtype, device=A2.device)  # only the first columns are written
    wg = torch.empty((N, kp), dtype=A2.dtype, device=A2.device)
    fn, grid, args, kwargs = quant_gather_launch(A2, ca, sca, ws, xg, CB, SCB, wg, threshold)
    launch(fn, grid, *args, **kwargs)
    return ca, sca, (xg, wg, ws[3 * K:])


def _rows_of(A: torch.Tensor) -> torch.Tensor:
    K = A.shape[-1]
    A2 = A.reshape(A.numel() // K, K)
    return A2 if A2.stride(1) == 1 else A2.contiguous()


def int8_vectorwise_quant(A: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``halfbyte::int8_vectorwise_quant``: (..., K) float -> CA (..., K) int8, SCA (rows,) float32,
    outlier_cols (n,) int64 ascending (empty without threshold); the bytes of ``formats.int8``."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    shape = A.shape
    K = shape[-1] if A.dim() else 1
    rows = A.numel() // K if K else 0
    if rows == 0 or K == 0:
        return ref8.int8_vectorwise_quant(A, threshold)
    ca, sca, flags = _quant_rows(_rows_of(A), threshold)
    if flags is not None:
        cols = torch.nonzero(flags).reshape(-1)  # the output's size depends on the data: one host sync
        if rows > 1 and cols.numel():
            ca[:, cols] = 0  # bitsandbytes zeroes whole outlier columns when M > 1
    else:
        cols = torch.empty(0, dtype=torch.int64, device=A.device)
    return ca.view(shape), sca, cols


@triton.jit
def _dequant_epilogue(c, sa, sb, b, HAS_BIAS: tl.constexpr, BIAS_FP16: tl.constexpr, USE_PTX: tl.constexpr):
    """float32 C (exact int32 values converted), SCA column, SCB row, float32 bias row -> float16
    ``fp16(C * SCA * SCB * 6.200012e-05 + bias)`` in the reference's operation order (``formats.int8``)."""
    v = mul_rn(c * sa * sb, 6.200012e-05, USE_PTX)  # ((C * SCA) * SCB) * 1/127^2, each product rounded
    if HAS_BIAS:
        if BIAS_FP16:
            v = (v + b).to(tl.float16)  # bitsandbytes fuses a float16 bias before its float16 rounding
        else:
            v = (v.to(tl.float16).to(tl.float32) + b).to(tl.float16)  # any other bias is added afterwards
    else:
        v = v.to(tl.float16)
    return v


@triton.jit
def _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC: tl.constexpr,
                  X_FP32: tl.constexpr, USE_PTX: tl.constexpr):
    """acc_x += xg[rows, c0:c0+OC] @ wg[cols, c0:c0+OC]^T in float32 (columns past the count hold zeros)."""
    oc = tl.multiple_of(c0, OC) + tl.arange(0, OC)
    xs = tl.load(xg_ptr + am[:, None] * stride_xg + oc[None, :])
    ws = tl.load(wg_ptr + bn[:, None] * stride_wg + oc[None, :])
    if X_FP32 or not USE_PTX:  # float32 inputs must not drop to tf32; the interpreter has no bf16 dot
        return tl.dot(xs.to(tl.float32), tl.trans(ws.to(tl.float32)), acc_x, input_precision="ieee")
    return tl.dot(xs, tl.trans(ws), acc_x)


@triton.jit
def _outlier_add_kernel(out_ptr, xg_ptr, wg_ptr, count_ptr, M, N, stride_om, stride_xg, stride_wg,
                        X_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OC: tl.constexpr,
                        STAGES: tl.constexpr, USE_PTX: tl.constexpr):
    """out[tile] = out-dtype(float32(out[tile]) + xg[rows, :count] @ wg[cols, :count]^T), the product summed in
    float32: the reference's ``addmm`` of the outlier columns onto the rounded int8 result. Nothing is read or
    written when count == 0. A kernel of its own: fused into the int8 GEMM's epilogue, its float32 accumulator
    tile raised the GEMM's register pressure so much that the GEMM took 1.43x as long even without outliers
    (bench/int8_parts.py, BENCHMARKS.md)."""
    n_out = tl.load(count_ptr)
    if n_out > 0:
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // grid_n
        pid_n = pid % grid_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        am = (rm % M).to(tl.int64)  # rows past M / N read a valid row; the store drops them
        bn = (rn % N).to(tl.int64)
        acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_PTX:  # a pipelined loop: the next steps' column loads are in flight during this step's dot
            for c0 in tl.range(0, n_out, OC, num_stages=STAGES):
                acc_x = _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC, X_FP32, USE_PTX)
        else:  # the interpreter's range() wants a Python int bound; the count is data
            c0 = 0
            while c0 < n_out:
                acc_x = _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC, X_FP32, USE_PTX)
                c0 += OC
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        offs = rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        res = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, round_to(res + acc_x, out_ptr.dtype.element_ty, USE_PTX), mask=mask)


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, sca_ptr, scb_ptr, bias_ptr, out_ptr, M, N,
                    K: tl.constexpr, stride_am, stride_bn, stride_om,
                    HAS_BIAS: tl.constexpr, BIAS_FP16: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr, USE_PTX: tl.constexpr):
    """out (M, N) = epilogue(CA (M, K) int8 @ CB (N, K) int8 ^T): int32 accumulation on the tensor cores (exact,
    so any order gives the reference's C), the float16 dequantization applied to the tile in registers. The
    outlier columns' products are added afterwards by ``_outlier_add_kernel``."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Programs walk GROUP_M row tiles per column tile, so neighbours share B tiles in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N read a valid row (results dropped by the store mask): no mask on the hot loads.
    am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M).to(tl.int64)
    bn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + bn[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kin = rk[None, :] < K - k0
            a = tl.load(a_ptrs, mask=kin, other=0)
            b = tl.load(b_ptrs, mask=kin, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(sca_ptr + rm, mask=rm < M, other=0.0)[:, None]
    sb = tl.load(scb_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    else:
        b = sb
    v = _dequant_epilogue(acc.to(tl.float32), sa, sb, b, HAS_BIAS, BIAS_FP16, USE_PTX)
    odt = out_ptr.dtype.element_ty
    res = round_to(v.to(tl.float32), odt, USE_PTX)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offs, res, mask=mask)


@dataclass(frozen=True)
class MMConfig:
    """Launch shape of ``_int8_mm_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    # The outlier kernel's tile and columns per step. 64 columns per step: with the loop fused in the GEMM's
    # epilogue, 64 took 0.83-0.87x the time of 32 and of 128 at 350 outlier columns (bench/int8_outliers.py, H200).
    out_block_m: int = 128
    out_block_n: int = 128
    oc: int = 64
    out_warps: int = 8
    out_stages: int = 3  # software-pipelined column steps (bench/int8_outliers.py)


def mm_config(M: int, N: int, K: int) -> MMConfig:
    """Launch shape by token count: the fastest of the bench/kernel_bench.py int8 sweep on an H100 (BENCHMARKS.md)."""
    if INTERPRET:
        return MMConfig(16, 16, 32, 2, 1, 1, out_block_m=16, out_block_n=16, oc=32, out_warps=1)
    if M <= 1024:
        return MMConfig(64, 128, 128, 8, 4, 4)
    return MMConfig(128, 128, 128, 8, 8, 3)


def mm_launch(CA, CB, SCA, SCB, bias, out, cfg: MMConfig):
    """(fn, grid, args, kwargs) of ``_int8_mm_kernel``: CA (M, K) int8, CB (N, K) int8 (unit column strides), SCA
    (M,), SCB (N,) float32, bias (N,) in out's dtype or None, into out (M, N)."""
    M, K = CA.shape
    N = CB.shape[0]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    return (_int8_mm_kernel, grid,
            (CA, CB, SCA, SCB, bias if bias is not None else SCB, out, M, N, K, CA.stride(0), CB.stride(0),
             out.stride(0)),
            dict(HAS_BIAS=bias is not None, BIAS_FP16=bias is not None and bias.dtype == torch.float16,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                 EVEN_K=K % cfg.block_k == 0, USE_PTX=USE_PTX, num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def outlier_launch(out, xg, wg, count, cfg: MMConfig):
    """(fn, grid, args, kwargs) of ``_outlier_add_kernel``: out (M, N) += xg (M, Kp) @ wg (N, Kp).T over the
    ``count`` (int32 (1,)) outlier columns."""
    if _OUT_PAD % cfg.oc:
        raise ValueError(f"MMConfig.oc must divide {_OUT_PAD} (the outlier columns' padding), got {cfg.oc}")
    M, N = out.shape
    grid = (triton.cdiv(M, cfg.out_block_m) * triton.cdiv(N, cfg.out_block_n),)
    return (_outlier_add_kernel, grid, (out, xg, wg, count, M, N, out.stride(0), xg.stride(0), wg.stride(0)),
            dict(X_FP32=out.dtype == torch.float32, BLOCK_M=cfg.out_block_m, BLOCK_N=cfg.out_block_n, OC=cfg.oc,
                 STAGES=cfg.out_stages, USE_PTX=USE_PTX, num_warps=cfg.out_warps))


def int8_mm(CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
            out_dtype: torch.dtype, config: MMConfig | None = None,
            outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CA (M, K) int8, CB (N, K) int8, SCA (M,), SCB (N,) float32, bias (N,) or None -> (M, N) ``out_dtype``:
    ``out_dtype(fp16(CA @ CB.T * SCA * SCB * 6.200012e-05 + bias))``, bit-identical to ``formats.int8``.

    ``outliers = (xg (M, Kp), wg (N, Kp), count (1,) int32)`` from ``_quant_with_outliers`` (CA's outlier columns
    already zero): adds ``X[:, cols] @ dequant(CB[:, cols]).T`` in out_dtype (module doc)."""
    M, K = CA.shape
    N = CB.shape[0]
    cfg = config or mm_config(M, N, K)
    out = torch.empty((M, N), dtype=out_dtype, device=CA.device)
    fn, grid, args, kwargs = mm_launch(CA, CB, SCA, SCB, bias, out, cfg)
    launch(fn, grid, *args, **kwargs)
    if outliers is not None:
        fn, grid, args, kwargs = outlier_launch(out, *outliers, cfg)
        launch(fn, grid, *args, **kwargs)
    return out


def int8_mixed_mm(A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
                  threshold: float, config: MMConfig | None = None) -> torch.Tensor:
    """LLM.int8() linear on CUDA, launched directly (``int8_plan.int8_mixed_mm``, the op's CUDA kernel, runs the
    same launches through cached plans and comes here for everything else): A (..., K) float, CB (N, K) int8, SCB
    (N,) float32 ->
    (..., N) in A's dtype: ``formats.int8.int8_linear``, bit-identical without outliers (integer GEMM is exact);
    with outlier columns the float32 sum of their products may be ordered differently (at most one rounding
    apart; the same on every run). No host sync; five launches (outlier flags; their list; row quantization +
    gathers; GEMM; outlier products), two without a threshold."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    shape = A.shape
    N, K = CB.shape
    M = A.numel() // K if K else 0
    if M == 0 or K == 0 or N == 0:
        return ref8.int8_linear(A, CB, SCB, bias, threshold)
    if CB.stride(1) != 1:
        CB = CB.contiguous()
    bias = None if bias is None else bias.to(A.dtype)
    A2 = _rows_of(A)
    if threshold > 0:
        CA, SCA, outliers = _quant_with_outliers(A2, CB, SCB, threshold)
    else:
        (CA, SCA, _), outliers = _quant_rows(A2, threshold), None
    out = int8_mm(CA, CB, SCA, SCB, bias, A.dtype, config, outliers)
    return out.view(*shape[:-1], N)
