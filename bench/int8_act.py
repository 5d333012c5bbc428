"""LLM.int8() activation side, two designs, one GPU (graph replay, ms):

    python bench/int8_act.py

"now": the library's launches: outlier flags (reads A), their list, then the row quantization with the outlier
columns zeroed and gathered (reads A again) and the weight's columns gathered. "rq": bitsandbytes' row statistics
are row-local (the absmax skips a row's own outlier elements; whole columns are only zeroed afterwards), so one
pass can quantize and flag together (A read once); a light fix-up pass then zeroes the outlier columns of CA and
gathers them (A read there only, likely from L2) plus the weight's columns. Variants of the quantizing pass:
``R`` rows per program, the row kept in registers (one sweep) or read twice. Outputs are checked bit for bit
against "now". Roofline references: ``A.clone()`` (read + write A) and ``A.abs().amax(1)`` (read A).
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import outlier_activations, timed_graph  # noqa: E402

from halfbyte.kernels import int8 as k8  # noqa: E402
from halfbyte.kernels.common import USE_PTX, rcp_approx, rcp_table, rint, round_to, zero_launch  # noqa: E402
from halfbyte.kernels.launch import launch  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


@triton.jit
def _rq_kernel(a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, M, stride_am, thr_h, thr_f, K: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHECK: tl.constexpr, USE_PTX: tl.constexpr):
    """BLOCK_R whole rows per program held in registers (BLOCK_K >= K): absmax without the outlier elements,
    codes with them 0, outlier columns flagged."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rin = r < M
    r64 = r.to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    m = rin[:, None] & (k < K)[None, :]
    a = tl.load(a_ptr + r64[:, None] * stride_am + k[None, :], mask=m, other=0.0)
    a = a.to(tl.float32).to(tl.float16).to(tl.float32)
    mag = tl.abs(a)
    out = mag >= thr_h
    keep = (mag == mag) & (mag < thr_h)
    absmax = tl.max(tl.where(keep, mag, 0.0), axis=1)
    hit = (tl.max(out.to(tl.int32), axis=0) > 0) & (k < K)
    if CHECK:  # many programs storing to one address serialize: store only flags not yet set
        hit = hit & (tl.load(flags_ptr + k, mask=hit, other=1) == 0)
    tl.store(flags_ptr + k, tl.full((BLOCK_K,), 1, tl.int32), mask=hit)
    scale = 127.0 * rcp_approx(absmax, delta_ptr, USE_PTX)
    q = rint(a * scale[:, None], USE_PTX)
    q = tl.where(q == q, q, 0.0)
    q = tl.where(mag < thr_f, q, 0.0)
    tl.store(ca_ptr + r64[:, None] * K + k[None, :], q.to(tl.int8), mask=m)
    tl.store(sca_ptr + r, absmax, mask=rin)


@triton.jit
def _fix_kernel(a_ptr, ca_ptr, ws_ptr, xg_ptr, cb_ptr, scb_ptr, wg_ptr, M, N, stride_am, stride_cb, stride_xg,
                stride_wg, K: tl.constexpr, BLOCK_R: tl.constexpr, OC: tl.constexpr, BLOCK_N: tl.constexpr,
                USE_PTX: tl.constexpr):
    """Programs [0, G): the weight's outlier columns into wg. Then BLOCK_R rows each: A's outlier columns into
    xg (zeros up to the padding), CA's outlier columns zeroed. Nothing to do without outlier columns."""
    pid = tl.program_id(0)
    G = tl.cdiv(N, BLOCK_N)
    if pid < G:
        k8._gather_w(pid, cb_ptr, scb_ptr, ws_ptr + 2 * K, ws_ptr + 3 * K, wg_ptr, N, stride_cb, stride_wg,
                     BLOCK_N, 32, USE_PTX)
    else:
        n_out = tl.load(ws_ptr + 3 * K)
        n_pad = tl.cdiv(n_out, k8.OUT_PAD) * k8.OUT_PAD
        r = (pid - G) * BLOCK_R + tl.arange(0, BLOCK_R)
        rin = (r < M)[:, None]
        r64 = r.to(tl.int64)[:, None]
        c0 = 0
        while c0 < n_pad:
            ci = c0 + tl.arange(0, OC)
            cin = (ci < n_out)[None, :]
            col = tl.load(ws_ptr + 2 * K + ci, mask=ci < n_out, other=0)[None, :]
            v = tl.load(a_ptr + r64 * stride_am + col, mask=rin & cin, other=0.0)
            tl.store(xg_ptr + r64 * stride_xg + ci[None, :], v, mask=rin & (ci < n_pad)[None, :])
            tl.store(ca_ptr + r64 * K + col, tl.zeros((BLOCK_R, OC), tl.int8), mask=rin & cin)
            c0 += OC


@triton.jit
def _fix_rows(prog, a_ptr, ca_ptr, ws_ptr, xg_ptr, M, stride_am, stride_xg, n_out, K: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [prog * BLOCK_R, +BLOCK_R) swept whole and in order (coalesced loads of A): xg and CA written where
    ``pos`` (ws[K:2K]) marks an outlier column, column blocks without any skipped, xg's padding zeroed."""
    if n_out > 0:
        r = prog * BLOCK_R + tl.arange(0, BLOCK_R)
        rin = (r < M)[:, None]
        r64 = r.to(tl.int64)[:, None]
        STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        for c in range(STEPS):
            k = c * BLOCK_K + tl.arange(0, BLOCK_K)
            pos = tl.load(ws_ptr + K + k, mask=k < K, other=0) - 1
            if tl.max(pos, axis=0) >= 0:
                m = rin & (pos >= 0)[None, :]
                v = tl.load(a_ptr + r64 * stride_am + k[None, :], mask=m, other=0.0)
                tl.store(xg_ptr + r64 * stride_xg + pos[None, :], v, mask=m)
                tl.store(ca_ptr + r64 * K + k[None, :], tl.zeros((BLOCK_R, BLOCK_K), tl.int8), mask=m)
        z = n_out + tl.arange(0, k8.OUT_PAD)
        zm = rin & (z < tl.cdiv(n_out, k8.OUT_PAD) * k8.OUT_PAD)[None, :]
        tl.store(xg_ptr + r64 * stride_xg + z[None, :], tl.zeros((BLOCK_R, k8.OUT_PAD), xg_ptr.dtype.element_ty),
                 mask=zm)


@triton.jit
def _fix2_kernel(a_ptr, ca_ptr, ws_ptr, xg_ptr, cb_ptr, scb_ptr, wg_ptr, M, N, stride_am, stride_cb, stride_xg,
                 stride_wg, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 USE_PTX: tl.constexpr):
    """As ``_fix_kernel``, but row tiles are swept whole and in order (coalesced loads of A; xg and CA written
    where ``pos`` (ws[K:2K]) marks an outlier column); column blocks without any outlier column are skipped."""
    pid = tl.program_id(0)
    G = tl.cdiv(N, BLOCK_N)
    if pid < G:
        k8._gather_w(pid, cb_ptr, scb_ptr, ws_ptr + 2 * K, ws_ptr + 3 * K, wg_ptr, N, stride_cb, stride_wg,
                     BLOCK_N, 32, USE_PTX)
    else:
        _fix_rows(pid - G, a_ptr, ca_ptr, ws_ptr, xg_ptr, M, stride_am, stride_xg, tl.load(ws_ptr + 3 * K), K,
                  BLOCK_R, BLOCK_K)


@triton.jit
def _fix3_kernel(a_ptr, ca_ptr, ws_ptr, xg_ptr, cb_ptr, scb_ptr, wg_ptr, M, N, stride_am, stride_cb, stride_xg,
                 stride_wg, K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 WR: tl.constexpr, PART: tl.constexpr, USE_PTX: tl.constexpr):
    """``_fix2_kernel`` with the weight gather spread over (WR rows x OUT_PAD columns) programs, one dependent
    load pair each; programs past the padded count exit at once. PART 1 / 2: only the weight / row programs."""
    pid = tl.program_id(0)
    CH: tl.constexpr = KP // 128
    G = tl.cdiv(N, WR) * CH
    n_out = tl.load(ws_ptr + 3 * K)
    if pid < G:
        if PART != 2:
            ch = pid % CH
            c0 = ch * 128
            if c0 < n_out:
                n = (pid // CH) * WR + tl.arange(0, WR)
                nin = (n < N)[:, None]
                n64 = n.to(tl.int64)[:, None]
                ci = c0 + tl.arange(0, 128)
                cin = (ci < n_out)[None, :]
                col = tl.load(ws_ptr + 2 * K + ci, mask=ci < n_out, other=0)[None, :]
                scb = tl.load(scb_ptr + n, mask=n < N, other=0.0)[:, None]
                cb = tl.load(cb_ptr + n64 * stride_cb + col, mask=nin & cin, other=0)
                w = round_to(cb.to(tl.float32) * scb * 0.007874015718698502, wg_ptr.dtype.element_ty, USE_PTX)
                tl.store(wg_ptr + n64 * stride_wg + ci[None, :], tl.where(cin, w, 0.0), mask=nin)
    else:
        if PART != 1:
            _fix_rows(pid - G, a_ptr, ca_ptr, ws_ptr, xg_ptr, M, stride_am, stride_xg, n_out, K, BLOCK_R, BLOCK_K)


def _zero(t):
    fn, grid, args, kw = zero_launch(t)
    launch(fn, grid, *args, **kw)


def now(A, CB, SCB, ws, ca, sca, xg, wg):
    _zero(ws)
    for fn, grid, args, kw in (k8.flag_launch(A, ws, 6.0), k8.list_launch(ws, A.shape[1]),
                               k8.quant_gather_launch(A, ca, sca, ws, xg, CB, SCB, wg, 6.0)):
        launch(fn, grid, *args, **kw)


def rq(A, CB, SCB, ws, ca, sca, xg, wg, R, W, FR, FK, FW, check=True, fix2=True, wr=0, part=0, quant=True):
    M, K = A.shape
    N = CB.shape[0]
    if quant:
        _zero(ws)
        launch(_rq_kernel, (triton.cdiv(M, R),), A, ca, sca, ws, rcp_table(A.device), M, A.stride(0), 6.0, 6.0,
               K=K, BLOCK_R=R, BLOCK_K=triton.next_power_of_2(K), CHECK=check, USE_PTX=USE_PTX, num_warps=W)
        fn, grid, args, kw = k8.list_launch(ws, K)
        launch(fn, grid, *args, **kw)
    if wr:
        kp = k8.padded_width(K)
        launch(_fix3_kernel, (triton.cdiv(N, wr) * (kp // 128) + triton.cdiv(M, FR),), A, ca, ws, xg, CB, SCB, wg,
               M, N, A.stride(0), CB.stride(0), xg.stride(0), wg.stride(0), K=K, KP=kp, BLOCK_R=FR,
               BLOCK_K=min(FK, triton.next_power_of_2(K)), WR=wr, PART=part, USE_PTX=USE_PTX, num_warps=FW)
    elif fix2:
        launch(_fix2_kernel, (triton.cdiv(N, 16) + triton.cdiv(M, FR),), A, ca, ws, xg, CB, SCB, wg, M, N,
               A.stride(0), CB.stride(0), xg.stride(0), wg.stride(0), K=K, BLOCK_R=FR,
               BLOCK_K=min(FK, triton.next_power_of_2(K)), BLOCK_N=16, USE_PTX=USE_PTX, num_warps=FW)
    else:
        launch(_fix_kernel, (triton.cdiv(N, 16) + triton.cdiv(M, FR),), A, ca, ws, xg, CB, SCB, wg, M, N,
               A.stride(0), CB.stride(0), xg.stride(0), wg.stride(0), K=K, BLOCK_R=FR, OC=FK, BLOCK_N=16,
               USE_PTX=USE_PTX, num_warps=FW)


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for M, N, K in ((4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360),
                    (512, 10240, 4096), (4096, 3072, 3072)):
        for cols in (0, 4, 350):
            A = outlier_activations(M, K, cols)
            CB = torch.randint(-127, 128, (N, K), device=DEV, dtype=torch.int8)
            SCB = torch.rand(N, device=DEV) + 0.5
            kp = k8.padded_width(K)

            def bufs():
                return (torch.empty(k8.workspace_size(K), dtype=torch.int32, device=DEV),
                        torch.empty(M, K, dtype=torch.int8, device=DEV), torch.empty(M, device=DEV),
                        torch.zeros(M, kp, dtype=DT, device=DEV), torch.zeros(N, kp, dtype=DT, device=DEV))
            b0 = bufs()
            t_now = timed_graph(lambda: now(A, CB, SCB, *b0))
            n = int(b0[0][3 * K])
            t_clone = timed_graph(lambda: A.clone())
            t_amax = timed_graph(lambda: A.abs().amax(1))
            print(f"\nM={M} N={N} K={K} outlier cols {n}: now {t_now:.4f}  (A.clone {t_clone:.4f}, "
                  f"abs.amax {t_amax:.4f})")
            res = []
            r0 = 2 if K <= 4096 else 1
            w0 = 8 if K <= 4096 else 16
            variants = [(r0, w0, FR, FK, FW, True, True, wr) for FR, FK, FW in ((1, 1024, 4), (2, 1024, 4))
                        for wr in (0, 64)]
            for R, W, FR, FK, FW, check, fix2, wr in variants:
                if R * triton.next_power_of_2(K) // (32 * W) > 64:
                    continue
                cfg = (R, W, FR, FK, FW, check, fix2, wr)
                b1 = bufs()
                try:
                    rq(A, CB, SCB, *b1, *cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print(f"  {cfg}: failed {type(e).__name__} {str(e).splitlines()[0][:100]}")
                    continue
                same = all(torch.equal(x, y) for x, y in ((b0[1], b1[1]), (b0[2], b1[2]),
                                                            (b0[3][:, :kp], b1[3][:, :kp]),
                                                            (b0[4][:, :n], b1[4][:, :n]),
                                                            (b0[0][2 * K:], b1[0][2 * K:])))
                t = timed_graph(lambda b1=b1, cfg=cfg: rq(A, CB, SCB, *b1, *cfg))
                ws = b1[0]
                t_q = timed_graph(lambda b1=b1, R=R, W=W, check=check: launch(
                    _rq_kernel, (triton.cdiv(M, R),), A, b1[1], b1[2], ws, rcp_table(A.device), M, A.stride(0),
                    6.0, 6.0, K=K, BLOCK_R=R, BLOCK_K=triton.next_power_of_2(K), CHECK=check, USE_PTX=USE_PTX,
                    num_warps=W))
                parts = ""
                if wr:
                    t_w = timed_graph(lambda b1=b1, cfg=cfg: rq(A, CB, SCB, *b1, *cfg, part=1, quant=False))
                    t_r = timed_graph(lambda b1=b1, cfg=cfg: rq(A, CB, SCB, *b1, *cfg, part=2, quant=False))
                    parts = f", weight gather {t_w:.4f}, row fix {t_r:.4f}"
                name = (f"R{R} w{W} {'check' if check else 'nocheck'} {'fix2' if fix2 else 'fix1'} R{FR} k{FK} "
                        f"w{FW} wr{wr}: quant pass {t_q:.4f}{parts}")
                res.append((t, name, same))
            res.sort()
            for t, name, same in res:
                print(f"  rq {t:.4f} ({t / t_now:.3f}x now)  {name}{'' if same else '  MISMATCH'}")
            if any(not s for _, _, s in res):
                print("  MISMATCH in", [nm for _, nm, s in res if not s])


if __name__ == "__main__":
    main()
