"""Triton LLM.int8() activation kernels: row-wise quantization with outlier detection, the outlier columns' list
and the gathers of the 16-bit outlier path; bit-exact with ``formats.int8`` (bitsandbytes' CUDA bytes, §5). The
int8 GEMM and the outlier products are in ``int8_mm``.

``int8_vectorwise_quant``: one program per row. The first sweep over the row takes the absmax over the
non-outlier elements; the second (the row is still in L1/L2) writes ``rint(a * fdividef(127, absmax))`` and flags
outlier columns in an int32 (K,) array. Only the flagged columns are then zeroed across all rows (bitsandbytes
zeroes whole outlier columns when M > 1), which needs every row's flags and so runs after the kernel.

The LLM.int8() matmul's activation side, no host sync, two launches: ``_flag_kernel`` marks the outlier columns and
its last program lists them in ascending order in a device workspace (as the reference's ``nonzero``: the same sum
order on every run); ``_quant_gather_kernel`` then quantizes each row with those columns zeroed (as bitsandbytes
does for M > 1) and gathers the activations' outlier columns into ``xg``, while its other programs gather the
weight's outlier columns, dequantized, into ``wg``.
"""

import functools

import torch
import triton
import triton.language as tl

from ..formats import int8 as ref8
from .common import USE_PTX, rcp_approx, rcp_table, rint_s32, round_to
from .launch import launch

#: The gathered outlier columns (xg, wg) are zero-padded to a multiple of this, so that the outlier kernel reads
#: whole unmasked steps of ``MMConfig.oc`` columns (a divisor of it): masked column loads did not vectorize.
_OUT_PAD = 128
OUT_PAD = tl.constexpr(_OUT_PAD)
#: Launch shapes of the outlier-flag kernel and of the row quantization with gathers, from
#: bench/int8_quant_sweep.py (H200, FLUX and T5 activations, 0 and 350 outlier columns): the flag kernel scans 4 row
#: steps per program from 2048 rows up (one below: more programs), 8 above K = 8192 (each program ends with a
#: barrier and an atomic: with the former tile layout 0.0756 against 0.0822 ms at 4608 x 15360, 0.0702 against
#: 0.0712 at 4608 x 12288, the same at K = 3072; H100, session 13); rows are quantized in 1024-column steps by 4 warps
#: up to K = 4096, in 2048-column steps by 8 warps above (the former 4096 x 8 warps took 1.2-1.45x as long); once
#: the outlier columns are known (``_quant_row_listed``), in 4096-column steps by 16 warps above K = 4096 (0.1437
#: against 0.1513 ms for flags and quantization at 4608 x 12288 with 350 outlier columns, 0.1351 against 0.1404
#: without; H100, session 14). Settable for the sweep; None = by shape.
_FLAG_CONFIG: dict | None = None
_QUANT_CONFIG: dict | None = None


def _flag_config(rows: int, K: int) -> dict:
    if _FLAG_CONFIG is not None:
        return _FLAG_CONFIG
    return dict(block_m=8, block_k=1024, row_iters=(8 if K > 8192 else 4) if rows >= 2048 else 1, num_warps=4)


def _quant_config(K: int, listed: bool = False) -> dict:
    if _QUANT_CONFIG is not None:
        return _QUANT_CONFIG
    if listed and K > 4096:
        return dict(block_k=4096, num_warps=16)
    return dict(block_k=1024, num_warps=4) if K <= 4096 else dict(block_k=2048, num_warps=8)


@triton.jit
def _row_absmax(a_row, thr_h, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_THR: tl.constexpr):
    """A row's absmax over its non-outlier elements (float16 |a| < threshold; NaN never counts), float32 scalar."""
    run_max = tl.zeros((BLOCK_K,), tl.float32)
    for c in range((K + BLOCK_K - 1) // BLOCK_K):
        k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        # bitsandbytes quantizes float16: round once to half, then compare and scale in float32
        mag = tl.abs(tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32).to(tl.float16).to(tl.float32))
        if HAS_THR:
            keep = mag < thr_h  # the absmax test compares in half precision; NaN fails it (fmaxf ignores NaN)
        else:
            keep = mag == mag
        run_max = tl.maximum(run_max, tl.where(keep, mag, 0.0))
    return tl.max(run_max, axis=0)


@triton.jit
def _codes(a, scale, thr_f, HAS_THR: tl.constexpr, USE_PTX: tl.constexpr):
    """float32 values (already rounded to float16) -> int32 codes ``rint(a * scale)``: NaN -> 0, outlier elements
    (|a| >= threshold, a float32 test as the reference) -> 0. One ``cvt.rni.s32`` does the rounding, the conversion
    and the NaN test (before: rint, a NaN test and select, and the conversion). Only outlier elements can leave
    [-127, 127] (|a| <= absmax elsewhere), and those are zeroed."""
    q = rint_s32(a * scale, USE_PTX)
    if HAS_THR:
        q = tl.where(tl.abs(a) < thr_f, q, 0)
    return q


@triton.jit
def _quant_row(row, a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, stride_am, thr_h, thr_f, K: tl.constexpr,
               BLOCK_K: tl.constexpr, HAS_THR: tl.constexpr, USE_PTX: tl.constexpr):
    """One row: absmax over the non-outlier elements, codes with outlier elements 0; with a threshold, flags (K,)
    int32 marks the outlier columns (1)."""
    row = row.to(tl.int64)
    a_row = a_ptr + row * stride_am
    absmax = _row_absmax(a_row, thr_h, K, BLOCK_K, HAS_THR)
    scale = 127.0 * rcp_approx(absmax, delta_ptr, USE_PTX)  # __fdividef(127, absmax)
    for c in range((K + BLOCK_K - 1) // BLOCK_K):
        k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32).to(tl.float16).to(tl.float32)
        if HAS_THR:
            tl.store(flags_ptr + k, tl.full((BLOCK_K,), 1, tl.int32), mask=(tl.abs(a) >= thr_h) & (k < K))
        tl.store(ca_ptr + row * K + k, _codes(a, scale, thr_f, HAS_THR, USE_PTX).to(tl.int8), mask=k < K)
    tl.store(sca_ptr + row, absmax)


@triton.jit
def _quant_row_listed(row, a_ptr, ca_ptr, sca_ptr, ws_ptr, delta_ptr, xg_ptr, stride_am, stride_xg, thr_h, thr_f,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, USE_PTX: tl.constexpr):
    """One row once the outlier columns are known (``_flag_kernel``'s workspace ws): codes as ``_quant_row``,
    the outlier columns' codes 0 (bitsandbytes zeroes them whole), and the row's values in those columns (the
    input's own) at xg[row, :count] in list order, zeros up to the next multiple of OUT_PAD.

    The codes are made in groups of 8 columns, one group per thread, so that a column's outlier bit costs a shift
    and a test of the group's byte of the bit words; the gather walks the short list (L1 hits: the row was just
    read) instead of placing every column. (Placing each column by a popcount of the words, with a predicated
    store per element, took about half of this kernel's instructions.)"""
    W: tl.constexpr = (K + 31) // 32
    G: tl.constexpr = BLOCK_K // 8
    row = row.to(tl.int64)
    a_row = a_ptr + row * stride_am
    absmax = _row_absmax(a_row, thr_h, K, BLOCK_K, True)
    scale = 127.0 * rcp_approx(absmax, delta_ptr, USE_PTX)  # __fdividef(127, absmax)
    j = tl.arange(0, 8)
    for c in range((K + BLOCK_K - 1) // BLOCK_K):
        g = c * G + tl.arange(0, G)  # groups of 8 columns: group g is byte g % 4 of bit word g // 4
        k = g[:, None] * 8 + j[None, :]
        a = tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32).to(tl.float16).to(tl.float32)
        byte = (tl.load(ws_ptr + (g >> 2), mask=g < (K + 7) // 8, other=0) >> ((g & 3) * 8)) & 0xFF
        live = (tl.abs(a) < thr_f) & (((byte[:, None] >> j[None, :]) & 1) == 0)  # as _codes, one select for both
        q = tl.where(live, rint_s32(a * scale, USE_PTX), 0)
        tl.store(ca_ptr + row * K + k, q.to(tl.int8), mask=k < K)
    tl.store(sca_ptr + row, absmax)
    n_out = tl.load(ws_ptr + 2 * W + K)
    n_pad = tl.cdiv(n_out, OUT_PAD) * OUT_PAD
    x_row = xg_ptr + row * stride_xg
    j0 = 0
    while j0 < n_pad:  # a while loop: its bound is data (the interpreter's range() wants a Python int)
        jj = j0 + tl.arange(0, OUT_PAD)
        listed = jj < n_out
        col = tl.load(ws_ptr + 2 * W + jj, mask=listed, other=0)
        tl.store(x_row + jj, tl.load(a_row + col, mask=listed, other=0.0))
        j0 += OUT_PAD


@triton.jit
def _row_quant_kernel(a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, stride_am, thr_h, thr_f,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_THR: tl.constexpr, USE_PTX: tl.constexpr):
    _quant_row(tl.program_id(0), a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, stride_am, thr_h, thr_f, K, BLOCK_K,
               HAS_THR, USE_PTX)


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
def _or(a, b):
    return a | b


@triton.jit
def _flag_kernel(a_ptr, state_ptr, ws_ptr, M, stride_am, thr_h, K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROW_ITERS: tl.constexpr, WB: tl.constexpr):
    """Outlier columns (float16 |a| >= threshold in any row; NaN never is) and their ascending list, in one launch.

    A program scans ROW_ITERS x BLOCK_M rows of BLOCK_K columns one row at a time: each thread owns a few columns
    and keeps their largest |a| (exact in float32, NaN skipped), rounded to float16 once at the end (float16
    rounding is monotonic, so that is the reference's per-element test); BLOCK_M row loads are unrolled, in flight
    at once, and no value crosses threads before the end. (The former (32, 256) tile of per-element tests, reduced
    across the warps once, took 119 registers against 54 and 1.13-1.30x this kernel's time on bfloat16 activations,
    1.0-1.12x on float32; H100, BENCHMARKS.md session 13.) Its flagged columns are or-ed as bits into the
    persistent ``state``: W = ceil(K / 32) words, then a counter of finished programs, all zero between launches.
    The last program to finish (the counter, acquire/release) writes the outlier workspace (``workspace_size``):
    ws[:W] the bit words, ws[W:2W] the set bits before each word, ws[2W:2W + K] the list of outlier columns in
    ascending order (as the reference's ``nonzero``: the outlier products are summed in the same order on every
    run), ws[2W + K] its length; and returns the state to zero. (The list was a launch of its own after a launch
    that zeroed the flags: two launches and their gaps per layer. The barrier and counter cost 0.5 us at 4608 x
    3072 and ~5 us at 4608 x 12288, relaxed or acq_rel alike; the last program's list costs nothing measurable;
    H100, BENCHMARKS.md session 13.)"""
    W: tl.constexpr = (K + 31) // 32
    NW: tl.constexpr = BLOCK_K // 32
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = tl.zeros((BLOCK_K,), tl.float32)
    for i in range(ROW_ITERS):
        r0 = (tl.program_id(0) * ROW_ITERS + i) * BLOCK_M
        for r in tl.static_range(BLOCK_M):  # BLOCK_M independent row loads in flight
            # the row test as a tensor: triton 3.9's interpreter turns "tensor & scalar bool" into an int32 mask
            inside = (k < K) & (tl.zeros_like(k) + (r0 + r) < M)
            a = tl.load(a_ptr + (r0 + r).to(tl.int64) * stride_am + k, mask=inside, other=0.0)
            a = tl.abs(a.to(tl.float32))
            m = tl.maximum(m, tl.where(a == a, a, 0.0))
    hit = (m.to(tl.float16).to(tl.float32) >= thr_h) & (k < K)
    bits = tl.reshape(hit.to(tl.int32), (NW, 32)) << tl.arange(0, 32)[None, :]
    words = tl.reduce(bits, 1, _or)
    w = tl.program_id(1) * NW + tl.arange(0, NW)
    tl.atomic_or(state_ptr + w, words, mask=(words != 0) & (w < W), sem="relaxed")
    tl.debug_barrier()  # every thread's bits are in before the release below
    done = tl.atomic_add(state_ptr + W, 1, sem="acq_rel")
    if done == tl.num_programs(0) * tl.num_programs(1) - 1:
        _list_outliers(state_ptr, ws_ptr, K, WB)


@triton.jit
def _list_outliers(state_ptr, ws_ptr, K: tl.constexpr, WB: tl.constexpr):
    """The last flag program: state's bit words -> the workspace (``_flag_kernel``); state back to zero. The
    words are read from L2 (``.cg``: other programs' atomics never pass through this SM's L1)."""
    W: tl.constexpr = (K + 31) // 32
    w = tl.arange(0, WB)
    words = tl.load(state_ptr + w, mask=w < W, other=0, cache_modifier=".cg")
    n = tl.zeros((WB,), tl.int32)
    for b in tl.static_range(32):
        n += (words >> b) & 1
    before = tl.cumsum(n, axis=0) - n
    tl.store(ws_ptr + w, words, mask=w < W)
    tl.store(ws_ptr + W + w, before, mask=w < W)
    place = before
    for b in tl.static_range(32):  # each word's b-th set bit, for every word at once
        hit = ((words >> b) & 1) != 0
        tl.store(ws_ptr + 2 * W + place, w * 32 + b, mask=hit)
        place += hit.to(tl.int32)
    tl.store(ws_ptr + 2 * W + K, tl.sum(n, axis=0))
    tl.store(state_ptr + w, tl.zeros((WB,), tl.int32), mask=w < W)
    tl.store(state_ptr + W, 0)


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
                         BLOCK_N: tl.constexpr, GATHER_COLS: tl.constexpr, USE_PTX: tl.constexpr):
    """Programs [0, G = cdiv(N, BLOCK_N)): gather the weight's outlier columns into wg. Programs [G, G + M):
    quantize a row, zero the outlier columns, gather its outlier values into xg. One launch for both. The weight
    gathers go first: their loads are scattered and serial (latency-bound), and launched last they ran as a tail
    on a few SMs after the row programs (up to ~25 us per FLUX layer)."""
    pid = tl.program_id(0)
    G = tl.cdiv(N, BLOCK_N)
    W: tl.constexpr = (K + 31) // 32
    if pid < G:
        _gather_w(pid, cb_ptr, scb_ptr, ws_ptr + 2 * W, ws_ptr + 2 * W + K, wg_ptr, N, stride_cb, stride_wg,
                  BLOCK_N, GATHER_COLS, USE_PTX)
    else:
        _quant_row_listed(pid - G, a_ptr, ca_ptr, sca_ptr, ws_ptr, delta_ptr, xg_ptr, stride_am, stride_xg, thr_h,
                          thr_f, K, BLOCK_K, USE_PTX)


def workspace_size(K: int) -> int:
    """int32 elements of the outlier workspace that ``_flag_kernel`` writes (bit words, their prefix counts, the
    list, its length; see there): nothing needs zeroing."""
    return 2 * state_size(K) - 2 + K + 1


def state_size(K: int) -> int:
    """int32 elements of ``_flag_kernel``'s persistent state (bit words, a counter): zeroed once, before the first
    launch; every launch leaves it zero. Launches that may overlap (other streams) need a state each."""
    return triton.cdiv(K, 32) + 1


def count_offset(K: int) -> int:
    """Where the workspace holds the number of outlier columns."""
    return workspace_size(K) - 1


def padded_width(K: int) -> int:
    """Columns of xg / wg: K rounded up to a multiple of OUT_PAD (room for every outlier column, zero-padded)."""
    return triton.cdiv(K, _OUT_PAD) * _OUT_PAD


def flag_launch(A2: torch.Tensor, state: torch.Tensor, ws: torch.Tensor, threshold: float):
    """(fn, grid, args, kwargs) of ``_flag_kernel``: A2 (rows, K), unit column stride; state the zeroed int32
    persistent state (``state_size(K)``), ws the int32 workspace it fills (``workspace_size(K)``)."""
    rows, K = A2.shape
    fc = _flag_config(rows, K)
    bm, bk, iters = fc["block_m"], max(32, min(fc["block_k"], triton.next_power_of_2(K))), fc["row_iters"]
    return (_flag_kernel, (triton.cdiv(rows, bm * iters), triton.cdiv(K, bk)),
            (A2, state, ws, rows, A2.stride(0), _thresholds(threshold)[0]),
            dict(K=K, BLOCK_M=bm, BLOCK_K=bk, ROW_ITERS=iters, WB=max(16, triton.next_power_of_2(triton.cdiv(K, 32))),
                 num_warps=fc["num_warps"]))


#: (rows of the weight per program, columns per step) of ``_quant_gather_kernel``'s weight gathers: many small
#: programs, spread over the SMs. Alone (a launch over no rows, for a share's later members, kernels.share) they take
#: narrower programs, wider steps and 4 warps: more loads in flight per program for these latency-bound scattered
#: reads (H100, 350 outlier columns: 0.0121 vs 0.0188 ms at N = 3072, 0.0293 vs 0.0331 at N = 12288). Beside the
#: row programs the sweep found nothing clearly better than (16, 32).
_GATHER_TILE = (16, 32)
_GATHER_ONLY_TILE = (8, 128, 4)


def quant_gather_launch(A2, ca, sca, ws, xg, CB, SCB, wg, threshold: float):
    """(fn, grid, args, kwargs) of ``_quant_gather_kernel``: A2 (rows, K) float (unit column stride) -> ca (rows,
    K) int8, sca (rows,) float32, xg (rows, Kp) / wg (N, Kp) in A2's dtype (``padded_width``), after
    ``flag_launch`` filled ws. CB (N, K) int8 with unit column stride, SCB (N,) float32. With rows = 0 only the
    weight gathers run."""
    rows, K = A2.shape
    N = CB.shape[0]
    thr_h, thr_f = _thresholds(threshold)
    qc = _quant_config(K, listed=True)
    g_rows, g_cols, warps = (*_GATHER_TILE, qc["num_warps"]) if rows else _GATHER_ONLY_TILE
    return (_quant_gather_kernel, (rows + triton.cdiv(N, g_rows),),
            (A2, ca, sca, ws, rcp_table(A2.device), xg, CB, SCB, wg, rows, N, A2.stride(0), CB.stride(0),
             xg.stride(0), wg.stride(0), thr_h, thr_f),
            dict(K=K, BLOCK_K=min(qc["block_k"], triton.next_power_of_2(K)), BLOCK_N=g_rows, GATHER_COLS=g_cols,
                 USE_PTX=USE_PTX, num_warps=warps))


def _quant_with_outliers(A2: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float,
                         return_ws: bool = False):
    """(rows, K) float, threshold > 0 -> CA (rows, K) int8 (outlier columns zeroed whole, as the reference),
    SCA (rows,) float32, and (xg, wg, count): the first ``count`` columns of xg (rows, Kp) / wg (N, Kp), A2's
    dtype, hold A2's outlier columns and the dequantized weight columns, zeros up to the next multiple of
    OUT_PAD (Kp = K rounded up to one). Two launches, no host sync. ``return_ws``: the outlier workspace too,
    fourth."""
    rows, K = A2.shape
    N = CB.shape[0]
    state = torch.zeros(state_size(K), dtype=torch.int32, device=A2.device)
    ws = torch.empty(workspace_size(K), dtype=torch.int32, device=A2.device)
    fn, grid, args, kwargs = flag_launch(A2, state, ws, threshold)
    launch(fn, grid, *args, **kwargs)
    ca = torch.empty((rows, K), dtype=torch.int8, device=A2.device)
    sca = torch.empty(rows, dtype=torch.float32, device=A2.device)
    kp = padded_width(K)
    xg = torch.empty((rows, kp), dtype=A2.dtype, device=A2.device)  # only the first columns are written
    wg = torch.empty((N, kp), dtype=A2.dtype, device=A2.device)
    fn, grid, args, kwargs = quant_gather_launch(A2, ca, sca, ws, xg, CB, SCB, wg, threshold)
    launch(fn, grid, *args, **kwargs)
    outliers = (xg, wg, ws[count_offset(K):])
    return (ca, sca, outliers, ws) if return_ws else (ca, sca, outliers)


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
