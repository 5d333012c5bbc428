"""Exploratory: an NF4 dequantize-GEMM for large M in Gluon (Hopper), warp-specialized so that the 4-bit decode
runs beside the tensor cores instead of before them. Not library code. Results: BENCHMARKS.md, session 16.

    python bench/nf4_gluon.py [--shapes ...] [--configs ...] [--json out.json]
    python bench/nf4_gluon.py --compile-only      # no GPU needed: compiles for sm_90 and prints register use

Design (docs/kernel-notes.md §2, "Gluon ... if plain Triton cannot overlap decode with MMA"): out[M, N] =
x[M, K] @ W[N, K]^T, W NF4 (bitsandbytes' packed bytes, float32 absmax per 64), bf16 x and out. Per program one
(BM x BN) output tile and a ring of STAGES shared-memory stages, each holding an x tile (BM x 64, TMA) and a
decoded weight tile (BN x 64 bf16, NVMMA-swizzled). Three partitions:
* loader (1 warp): TMA loads of x tiles;
* decoder (4 warps): loads 32-bit words of 8 codes, decodes them with the GEMV's ``prmt`` register tables into
  bf16 pairs, scales them by the bf16 absmax (``mul.rn.bf16x2``) and stores them into the stage;
* default (8 warps, two warpgroups): ``warpgroup_mma`` over the stages (both operands in shared memory), then the
  epilogue.
The weight values are bf16(bf16(code) * bf16(absmax)) -- the GEMV's rounding, not the dequantize's
bf16(code * absmax) in float32 -- so results are compared with a tolerance, not bits.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import _gemm_ring_kernel, lut  # noqa: E402

# $0..$3 the four scaled bf16 pairs of word $4; $5..$12 the pair tables; $13 the bf16 absmax in both halves: the
# decode the library's fused GEMM kept (halfbyte.kernels._gemm_ring_kernel)
DECODE_ASM, DECODE_CONSTRAINTS = _gemm_ring_kernel._WORD_ASM, _gemm_ring_kernel._WORD_CONSTRAINTS


@aggregate
class Parts:
    x_desc: tma.tensor_descriptor
    x_bufs: gl.shared_memory_descriptor
    w_bufs: gl.shared_memory_descriptor
    x_ready: gl.shared_memory_descriptor
    w_ready: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor
    STAGES: gl.constexpr
    BM: gl.constexpr
    BN: gl.constexpr
    BK: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, x_desc, x_bufs, w_bufs, x_ready, w_ready, empty, STAGES, BM, BN, BK):
        self.x_desc = x_desc
        self.x_bufs = x_bufs
        self.w_bufs = w_bufs
        self.x_ready = x_ready
        self.w_ready = w_ready
        self.empty = empty
        self.STAGES = gl.constexpr(STAGES)
        self.BM = gl.constexpr(BM)
        self.BN = gl.constexpr(BN)
        self.BK = gl.constexpr(BK)


@gluon.jit
def _loader(p, off_m, k_tiles):
    for i in range(k_tiles):
        s = i % p.STAGES
        phase = (i // p.STAGES) & 1
        mbarrier.wait(p.empty.index(s), phase ^ 1)  # a fresh barrier counts as completed phase 1: passes
        bar = p.x_ready.index(s)
        mbarrier.expect(bar, p.x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(p.x_desc, [off_m, i * p.BK], bar, p.x_bufs.index(s))


@gluon.jit
def _decoder(p, wq_ptr, absmax_ptr, tab_ptr, off_m, off_n, k_tiles, KW, KB, DEC_WARPS: gl.constexpr,
             LOAD_X: gl.constexpr):
    """wq_ptr: int32 words [N, KW]; absmax_ptr: float32 [N, KB] (KB = K / 64). LOAD_X: also issue the x tiles'
    TMA loads (no loader partition)."""
    WPR: gl.constexpr = p.BK // 8  # words per tile row
    lay: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (WPR // 4), WPR // 4], [DEC_WARPS, 1], [1, 0])
    rows = off_n + gl.arange(0, p.BN, layout=gl.SliceLayout(1, lay))
    cols = gl.arange(0, WPR, layout=gl.SliceLayout(0, lay))
    wptr = wq_ptr + rows[:, None].to(gl.int64) * KW + cols[None, :]
    aptr = absmax_ptr + rows.to(gl.int64) * KB
    z = gl.full([p.BN, WPR], 0, gl.int32, lay)
    t0 = z + gl.load(tab_ptr)
    t1 = z + gl.load(tab_ptr + 1)
    t2 = z + gl.load(tab_ptr + 2)
    t3 = z + gl.load(tab_ptr + 3)
    t4 = z + gl.load(tab_ptr + 4)
    t5 = z + gl.load(tab_ptr + 5)
    t6 = z + gl.load(tab_ptr + 6)
    t7 = z + gl.load(tab_ptr + 7)
    pair_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    # Software pipeline: the words and absmax of step i + 2 are loaded while step i decodes (one warp per
    # scheduler here, so nothing else would hide their latency).
    last = k_tiles - 1
    words = gl.load(wptr)
    am = gl.load(aptr)
    words1 = gl.load(wptr + gl.minimum(1, last) * WPR)
    am1 = gl.load(aptr + gl.minimum(1, last) * (p.BK // 64))
    for i in range(k_tiles):
        s = i % p.STAGES
        phase = (i // p.STAGES) & 1
        nxt = gl.minimum(i + 2, last)
        words2 = gl.load(wptr + nxt * WPR)
        am2 = gl.load(aptr + nxt * (p.BK // 64))
        h = am.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        scale = (h | (h << 16))[:, None] + z
        q0, q1, q2, q3 = gl.inline_asm_elementwise(DECODE_ASM, DECODE_CONSTRAINTS,
                                                   [words, t0, t1, t2, t3, t4, t5, t6, t7, scale],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32),
                                                   is_pure=True, pack=1)
        # pair 4w + j of a row is q_j of word w: (w, b, c) -> 4w + 2b + c holds q_{2b + c}
        pairs = gl.join(gl.join(q0, q2), gl.join(q1, q3)).reshape([p.BN, p.BK // 2])
        mbarrier.wait(p.empty.index(s), phase ^ 1)
        if LOAD_X:
            bar = p.x_ready.index(s)
            mbarrier.expect(bar, p.x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(p.x_desc, [off_m, i * p.BK], bar, p.x_bufs.index(s))
        p.w_bufs.index(s)._reinterpret(gl.int32, [p.BN, p.BK // 2], pair_layout).store(pairs)
        fence_async_shared()
        mbarrier.arrive(p.w_ready.index(s), count=1)
        words = words1
        am = am1
        words1 = words2
        am1 = am2


@gluon.jit
def _mma(p, k_tiles, num_warps: gl.constexpr):
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, p.BN, 16])
    acc = gl.zeros((p.BM, p.BN), dtype=gl.float32, layout=mma_layout)
    for i in range(k_tiles):
        s = i % p.STAGES
        phase = (i // p.STAGES) & 1
        mbarrier.wait(p.x_ready.index(s), phase)
        mbarrier.wait(p.w_ready.index(s), phase)
        acc = warpgroup_mma(p.x_bufs.index(s), p.w_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # the previous stage's MMA has finished reading: hand its buffers back
        mbarrier.arrive(p.empty.index((i + p.STAGES - 1) % p.STAGES), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return (acc,)


@gluon.jit
def nf4_gemm_kernel(x_desc, wq_ptr, absmax_ptr, tab_ptr, out_ptr, M, N, K, KW, KB,
                    BN: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, DEC_REGS: gl.constexpr,
                    DEC_WARPS: gl.constexpr, LOADER: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    # grouped order: GROUP_M row tiles share each weight tile while it is in L2
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BM)
    tiles_n = N // BN
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    off_m = pid_m * BM
    off_n = pid_n * BN

    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)
    x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], w_layout)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(s), count=1)
        mbarrier.init(w_ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    p = Parts(x_desc, x_bufs, w_bufs, x_ready, w_ready, empty, STAGES, BM, BN, BK)
    k_tiles = K // BK
    if LOADER:
        res = gl.warp_specialize([
            (_mma, (p, k_tiles, num_warps)),
            (_loader, (p, off_m, k_tiles)),
            (_decoder, (p, wq_ptr, absmax_ptr, tab_ptr, off_m, off_n, k_tiles, KW, KB, DEC_WARPS, False)),
        ], [1, DEC_WARPS], [24, DEC_REGS])
    else:
        res = gl.warp_specialize([
            (_mma, (p, k_tiles, num_warps)),
            (_decoder, (p, wq_ptr, absmax_ptr, tab_ptr, off_m, off_n, k_tiles, KW, KB, DEC_WARPS, True)),
        ], [DEC_WARPS], [DEC_REGS])
    acc = res[0]

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])
    rm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
    rn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
    ptrs = out_ptr + rm[:, None].to(gl.int64) * N + rn[None, :]
    gl.store(ptrs, acc.to(gl.bfloat16), mask=(rm < M)[:, None])


def nf4_gemm(x, packed, absmax, tables, BM=256, BN=128, STAGES=4, GROUP_M=8, num_warps=8, maxnreg=128,
             dec_regs=88, dec_warps=4, loader=True):
    """x (M, K) bf16, packed (N * K / 2,) or (N, K/2) uint8, absmax (N * K / 64,) float32 -> (M, N) bf16."""
    M, K = x.shape
    N = packed.numel() * 2 // K
    BK = 64
    if K % BK or N % BN:
        raise ValueError(f"nf4_gemm: needs K % 64 == 0 and N % {BN} == 0, got N={N}, K={K}")
    out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    x_layout = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    x_desc = TensorDescriptor.from_tensor(x, [BM, BK], x_layout)
    wq = packed.reshape(N, K // 2).view(torch.int32)
    grid = (triton.cdiv(M, BM) * (N // BN),)
    nf4_gemm_kernel[grid](x_desc, wq, absmax, tables, out, M, N, K, K // 8, K // 64, BN=BN, STAGES=STAGES,
                          GROUP_M=GROUP_M, DEC_REGS=dec_regs, DEC_WARPS=dec_warps, LOADER=loader, num_warps=num_warps,
                          maxnreg=maxnreg)
    return out


def compile_only(BM=256, BN=128, STAGES=4, num_warps=8, maxnreg=128, dec_regs=88, dec_warps=4, loader=True):
    """Compile for sm_90 without a GPU; print the kernel's resource use."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    layout = gl.NVMMASharedLayout.get_default_for([BM, 64], gl.bfloat16)
    sig = {"x_desc": f"tensordesc<bf16[{BM}, 64],{layout!r}>", "wq_ptr": "*i32", "absmax_ptr": "*fp32",
           "tab_ptr": "*i32", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "KB": "i32",
           "BN": "constexpr", "STAGES": "constexpr", "GROUP_M": "constexpr", "DEC_REGS": "constexpr",
           "DEC_WARPS": "constexpr", "LOADER": "constexpr", "num_warps": "constexpr"}
    constexprs = {"BN": BN, "STAGES": STAGES, "GROUP_M": 8, "DEC_REGS": dec_regs, "DEC_WARPS": dec_warps,
                  "LOADER": loader, "num_warps": num_warps}
    src = GluonASTSource(nf4_gemm_kernel, sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "maxnreg": maxnreg})
    md = k.metadata
    print(f"BM={BM} BN={BN} STAGES={STAGES}: shared {md.shared} B, warps {md.num_warps}")
    return k


SHAPES = [(4608, 3072, 3072, "FLUX attn"), (4608, 12288, 3072, "FLUX MLP up"), (4608, 3072, 12288, "FLUX MLP down"),
          (4608, 18432, 3072, "FLUX single in"), (512, 10240, 4096, "T5 MLP up"), (1024, 3072, 3072, "1k tokens")]


def _config(text: str) -> dict:
    """"BM,BN,STAGES,DEC_REGS,DEC_WARPS,LOADER,MAXNREG" -> nf4_gemm keyword arguments."""
    bm, bn, st, dr, dw, ld, mr = (int(v) for v in text.split(","))
    return dict(BM=bm, BN=bn, STAGES=st, dec_regs=dr, dec_warps=dw, loader=bool(ld), maxnreg=mr,
                num_warps=8 if bm == 256 or bn == 256 else 4)


def nf4_tables(device="cuda") -> torch.Tensor:
    """The 8 ``prmt`` pair-table words of the NF4 codes rounded to bf16 (int32, on ``device``)."""
    from halfbyte.formats import fourbit as ref4

    code = ref4.code_4bit("nf4", torch.device("cpu"))
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in lut.pair_tables(tuple(code.tolist()), torch.bfloat16)]
    return torch.tensor(words, dtype=torch.int32, device=device)


def bench_cases(cases, variants: dict, once: bool = False, json_path=None, prepare=None) -> list[dict]:
    """Per (M, N, K, name) case: bf16 ``F.linear``, the library's dequantize + cuBLAS and each variant
    (name -> fn(x, packed, absmax, tables)), CUDA-graph replay, ms; every variant's output checked against float64
    within 2^-7 of |x| @ |W|^T (bf16 output plus the bf16 roundings of code and absmax). ``prepare(packed, N, K)``
    gives the packed bytes the variants take (a repacked order); ``once``: one call each, no timing (for ncu)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchutil import timed_graph

    import halfbyte  # noqa: F401
    from halfbyte.kernels import fourbit

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    tables = nf4_tables()
    rows = []
    for M, N, K, name in cases:
        w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
        packed, absmax = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
        vp = prepare(packed, N, K) if prepare else packed
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        if once:
            for fn in variants.values():
                fn(x, vp, absmax, tables)
            torch.cuda.synchronize()
            continue

        def deq():
            return fourbit.dequantize(packed, absmax, None, None, None, 64, "nf4", N * K, torch.bfloat16).view(N, K)

        W = deq()
        exact = x.double() @ W.double().T
        bound = (x.double().abs() @ W.double().abs().T) * 2 ** -7 + 1e-6
        r = {"shape": f"{M}x{N}x{K}", "layer": name}
        r["bf16"] = timed_graph(lambda: torch.nn.functional.linear(x, w), rep=200)
        r["dequant+cublas"] = timed_graph(lambda: torch.nn.functional.linear(x, deq()), rep=200)
        for key, fn in variants.items():
            try:
                out = fn(x, vp, absmax, tables)
                torch.cuda.synchronize()
                ratio = float(((out.double() - exact).abs() / bound).max())
                r[key + " ok"] = ratio <= 1
                if ratio > 1:
                    print(f"  {name} {key}: WRONG, max err/bound {ratio:.2f}")
                r[key] = timed_graph(lambda: fn(x, vp, absmax, tables), rep=200)
            except Exception as e:  # a config that does not compile or run: report and go on
                print(f"  {name} {key}: {type(e).__name__}: {str(e)[:300]}")
        rows.append(r)
        print(json.dumps(r))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--configs", nargs="*", default=["256,128,4,88,4,1,128", "128,256,4,88,4,0,168"],
                    help="BM,BN,STAGES,decoder registers,decoder warps,loader partition (0/1),maxnreg")
    ap.add_argument("--shapes", nargs="*", type=int, help="indices into SHAPES (default: all)")
    ap.add_argument("--once", action="store_true", help="one call per config, no timing (for ncu)")
    ap.add_argument("--json")
    args = ap.parse_args()
    configs = {c: _config(c) for c in args.configs}
    if args.compile_only:
        for kw in configs.values():
            ptx = compile_only(**kw).asm["ptx"]
            print("  wgmma:", ptx.count("wgmma.mma_async"), "prmt:", ptx.count("prmt.b32"),
                  "setmaxnreg:", ptx.count("setmaxnreg"))
        return
    cases = [SHAPES[i] for i in (args.shapes if args.shapes is not None else range(len(SHAPES)))]
    variants = {key: (lambda x, p, a, t, kw=kw: nf4_gemm(x, p, a, t, **kw)) for key, kw in configs.items()}
    bench_cases(cases, variants, args.once, args.json)


if __name__ == "__main__":
    main()
