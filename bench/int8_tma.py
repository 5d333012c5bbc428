"""The int8 GEMM (+ bitsandbytes' dequantization epilogue) with TMA loads, against the library's pointer-load kernel,
bf16 ``F.linear`` and cuBLAS ``_int_mm``, at FLUX / T5 shapes, one GPU (H100/H200).

    python bench/int8_tma.py [--sweep]

Variants: "ptr" = ``int8_mm._int8_mm_kernel`` at its default launch shape; "tma" = the same kernel with A / B tiles
loaded by TMA descriptors (one tile per program); "tma-p" = persistent (one program per SM looping over tiles, the
next tile's loads overlapping this tile's epilogue); "+ws" = triton's warp specialization of that loop. Each
variant's output is checked bit for bit against "ptr" (integer accumulation is exact: any order gives the same
bits). Times: median ms of ``triton.testing.do_bench``.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import int8_mm as km  # noqa: E402
from halfbyte.kernels.common import USE_PTX, round_to  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
SHAPES = ((4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360), (4608, 9216, 3072),
          (512, 10240, 4096), (512, 4096, 10240))


@triton.jit
def _tma_kernel(a_desc, b_desc, sca_ptr, scb_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                HAS_BIAS: tl.constexpr, BIAS_FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, WS: tl.constexpr,
                FLATTEN: tl.constexpr, USE_PTX: tl.constexpr):
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = grid_m * grid_n
    width = GROUP_M * grid_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WS):
        first_m = (tile // width) * GROUP_M
        group_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % group_m
        pid_n = (tile % width) // group_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        sa = tl.load(sca_ptr + rm, mask=rm < M, other=0.0)[:, None]
        sb = tl.load(scb_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            bb = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        else:
            bb = sb
        v = km._dequant_epilogue(acc.to(tl.float32), sa, sb, bb, HAS_BIAS, BIAS_FP16, USE_PTX)
        res = round_to(v.to(tl.float32), out_ptr.dtype.element_ty, USE_PTX)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], res, mask=mask)


def tma_mm(CA, CB, SCA, SCB, bias, out, bm, bn, bk, warps, stages, persistent, ws, flatten=True, group_m=8):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = CA.shape
    N = CB.shape[0]
    a_desc = TensorDescriptor.from_tensor(CA, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(CB, [bn, bk])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    progs = min(tiles, torch.cuda.get_device_properties(CA.device).multi_processor_count) if persistent else tiles
    _tma_kernel[(progs,)](a_desc, b_desc, SCA, SCB, bias if bias is not None else SCB, out, M, N, K, out.stride(0),
                          HAS_BIAS=bias is not None, BIAS_FP16=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                          GROUP_M=group_m, NUM_PROGS=progs, WS=ws, FLATTEN=flatten and persistent, USE_PTX=USE_PTX,
                          num_warps=warps, num_stages=stages)
    return out


def timed(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    tiles = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (256, 128, 128, 8, 3),
             (128, 128, 128, 4, 4), (64, 256, 128, 4, 4), (128, 128, 64, 8, 5)]
    if not args.sweep:
        tiles = tiles[:3]
    for M, N, K in SHAPES:
        CA = torch.randint(-127, 128, (M, K), device=DEV, dtype=torch.int8)
        CB = torch.randint(-127, 128, (N, K), device=DEV, dtype=torch.int8)
        SCA = torch.rand(M, device=DEV) + 0.5
        SCB = torch.rand(N, device=DEV) + 0.5
        bias = torch.randn(N, device=DEV, dtype=DT)
        x = torch.randn(M, K, device=DEV, dtype=DT)
        w = torch.randn(N, K, device=DEV, dtype=DT)
        ref = km.int8_mm(CA, CB, SCA, SCB, bias, DT)
        t_bf16 = timed(lambda: torch.nn.functional.linear(x, w, bias))
        t_ptr = timed(lambda: km.int8_mm(CA, CB, SCA, SCB, bias, DT))
        t_int = timed(lambda: torch._int_mm(CA, CB.t()))
        print(f"\nM={M} N={N} K={K}: bf16 {t_bf16:.4f}  _int_mm {t_int:.4f}  ptr {t_ptr:.4f} "
              f"({t_ptr / t_bf16:.3f}x bf16)")
        res = []
        for bm, bn, bk, warps, stages in tiles:
            for persistent, ws in ((False, False), (True, False), (True, True)):
                name = f"{'tma-p' if persistent else 'tma'}{'+ws' if ws else ''} {bm}x{bn}x{bk} w{warps} s{stages}"
                out = torch.empty(M, N, device=DEV, dtype=DT)
                try:
                    tma_mm(CA, CB, SCA, SCB, bias, out, bm, bn, bk, warps, stages, persistent, ws)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - shared memory / register limits, unsupported ws
                    print(f"  {name}: failed {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                exact = torch.equal(out, ref)
                cfg = (bm, bn, bk, warps, stages, persistent, ws)
                ms = timed(lambda cfg=cfg, out=out: tma_mm(CA, CB, SCA, SCB, bias, out, *cfg))
                res.append((ms, name, exact))
        res.sort()
        for ms, name, exact in res[:6]:
            tops = 2 * M * N * K / ms / 1e9
            print(f"  {ms:.4f} ms  {ms / t_bf16:.3f}x bf16  {ms / t_ptr:.3f}x ptr  {tops:.0f} TOP/s"
                  f"  {name}{'' if exact else '  NOT BIT-EXACT'}")
        bad = [n for _, n, e in res if not e]
        if bad:
            print("  not bit-exact:", bad)


if __name__ == "__main__":
    main()
