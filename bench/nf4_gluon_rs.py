"""Exploratory: the NF4 dequantize-GEMM of bench/nf4_gluon.py with the weight in registers (Gluon, Hopper). Not
library code. Results and reading: BENCHMARKS.md, session 16.

    python bench/nf4_gluon_rs.py [--shapes 0 1 ...] [--mnk M,N,K ...] [--configs BT,STAGES,MAXNREG,REGS,DEPTH ...]
    python bench/nf4_gluon_rs.py --compile-only     # no GPU needed: compiles for sm_90

bench/nf4_gluon.py decodes the weight into shared memory for a shared-memory wgmma; Nsight Compute put its L1 /
shared-memory traffic at 74 % (the decoded tile is written once and read by every wgmma that uses it) and the
tensor pipe at 50 %. Here the product is transposed, out^T[N, M] = W[N, K] @ x[M, K]^T, so that the decoded weight
is wgmma's register operand A (never written to shared memory) and x tiles (TMA) are operand B:
* two consumer partitions (4 warps each), one per 64 weight rows of the program's 128: each decodes its own A
  fragments (the GEMV's ``prmt`` pair decode, ``mul.bf16x2`` by the absmax) while its previous wgmma runs, then
  issues the next; the (64 x BT) fp32 accumulator leaves transposed through shared memory and a TMA store;
* the default partition (4 warps) issues the TMA loads of x.
Each lane of an A fragment holds weights (row, k) with k = 2 (lane % 4) + {0, 1} + 8 h + 16 s (h < 2, s < 4 in a
64-wide K step): byte lane % 4 of each of the row's 8 words of the step. The weight is therefore REPACKED
(``repack``: within each 32-byte chunk byte b + 4w moves to 8b + w, reversible), so that those bytes are the lane's
own two words; the decode's output is then the fragment itself (the layout conversion is one in name only). A first
version read the bitsandbytes order and gathered the bytes with three more ``prmt`` per word from four 32-bit loads
(16 loads per lane and K step instead of 4): 0.268-0.284 ms at 4608x3072x3072 against 0.168 repacked.
The decoded fragment must not be written while a wgmma still reads it: two K steps per loop iteration with two
fragment variables (``_step``); with one carried variable ptxas serialized every wgmma (warning C7513), and three
in rotation (DEPTH 3, wait(1)) need more than the 168 registers a 12-warp program may hold (C7512).
"""

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the decode of a repacked word: the library's fused GEMM (halfbyte.kernels.gemm_ring) grew out of this bench
from halfbyte.kernels._gemm_ring_kernel import _decode as _decode_repacked  # noqa: E402
from halfbyte.kernels._gemm_ring_kernel import pair_tables  # noqa: E402


def repack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The packed bytes reordered for ``REPACKED``: in each row's 32-byte chunk (64 weights) byte b + 4w moves to
    8b + w, so that the 8 bytes one A-fragment lane decodes (b, b + 4, ..., b + 28) are its two words 2b, 2b + 1.
    Reversible (a transpose of 8 x 4 bytes)."""
    return packed.reshape(N, K // 64, 8, 4).transpose(-1, -2).contiguous().reshape(-1)


@gluon.jit
def _load_words_repacked(wq_ptr, base, step, KW, layout: gl.constexpr):
    """One [64, 8] int32 tensor: element (r, 2b + t) = word 2b + t of row r's (repacked) step."""
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, layout))
    return gl.load(wq_ptr + base + rows[:, None].to(gl.int64) * KW + step * 8 + cols[None, :])


@gluon.jit
def _step(acc, cur, nxt_frag, w, am, i, x_bufs, x_ready, empty, wq_ptr, base, arow, KW, last, t0, t1, t2, t3, t4, t5,
          t6, t7, a_layout: gl.constexpr, g_layout: gl.constexpr, STAGES: gl.constexpr, OUTSTANDING: gl.constexpr):
    """Issue step i's wgmma on fragment ``cur``, decode step i + 1 into ``nxt_frag``'s place while it runs, load
    the words of step i + 2, wait until OUTSTANDING wgmmas remain and release the stage of the one retired."""
    s = i % STAGES
    mbarrier.wait(x_ready.index(s), (i // STAGES) & 1)
    acc = warpgroup_mma(cur, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
    nxt_frag = _decode_repacked(w, t0, t1, t2, t3, t4, t5, t6, t7, am, a_layout)
    n2 = gl.minimum(i + 2, last)
    w = _load_words_repacked(wq_ptr, base, n2, KW, g_layout)
    am = gl.load(arow + n2)
    acc, cur = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(acc, cur))
    done = i - OUTSTANDING
    mbarrier.arrive(empty.index((done + STAGES) % STAGES), count=1, pred=done >= 0)
    return acc, cur, nxt_frag, w, am


@gluon.jit
def _consumer(x_bufs, x_ready, empty, out_desc, wq_ptr, absmax_ptr, tab_ptr, off_m, off_n, k_tiles, KW, KB,
              WG: gl.constexpr, BT: gl.constexpr, STAGES: gl.constexpr, DEPTH: gl.constexpr):
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BT, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    # (row, 2b + t): registers row + 8, t; lanes b (bits 0-1), row (bits 2-4); warps row + 16, + 32
    g_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[8, 0], [0, 1]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 8])
    row0 = off_n + 64 * WG
    base = row0.to(gl.int64) * KW
    t0, t1, t2, t3, t4, t5, t6, t7 = pair_tables(tab_ptr, gl.zeros([64, 8], gl.int32, g_layout))
    arow = absmax_ptr + (row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, g_layout))).to(gl.int64) * KB
    last = k_tiles - 1

    w = _load_words_repacked(wq_ptr, base, 0, KW, g_layout)
    am = gl.load(arow)
    a = _decode_repacked(w, t0, t1, t2, t3, t4, t5, t6, t7, am, a_layout)
    w = _load_words_repacked(wq_ptr, base, gl.minimum(1, last), KW, g_layout)
    am = gl.load(arow + gl.minimum(1, last))
    acc = gl.zeros((64, BT), dtype=gl.float32, layout=mma_layout)
    b_frag = a  # placeholders: each is decoded into before a wgmma reads it
    c_frag = a
    if DEPTH == 2:
        # Two K steps per iteration with two fragment variables: the decode of one step writes registers that no
        # wgmma in flight reads (one variable carried around the loop made LLVM write step i + 1 into step i's
        # registers while its wgmma ran, and ptxas serialized every wgmma: warning C7513).
        for i in range(0, k_tiles, 2):
            acc, a, b_frag, w, am = _step(acc, a, b_frag, w, am, i, x_bufs, x_ready, empty, wq_ptr, base, arow, KW,
                                          last, t0, t1, t2, t3, t4, t5, t6, t7, a_layout, g_layout, STAGES, 0)
            acc, b_frag, a, w, am = _step(acc, b_frag, a, w, am, i + 1, x_bufs, x_ready, empty, wq_ptr, base, arow,
                                          KW, last, t0, t1, t2, t3, t4, t5, t6, t7, a_layout, g_layout, STAGES, 0)
    else:
        # Three fragments in rotation: a wgmma may stay in flight while the next is issued (wait(1)).
        for i in range(0, k_tiles, 3):
            acc, a, b_frag, w, am = _step(acc, a, b_frag, w, am, i, x_bufs, x_ready, empty, wq_ptr, base, arow, KW,
                                          last, t0, t1, t2, t3, t4, t5, t6, t7, a_layout, g_layout, STAGES, 1)
            acc, b_frag, c_frag, w, am = _step(acc, b_frag, c_frag, w, am, i + 1, x_bufs, x_ready, empty, wq_ptr,
                                               base, arow, KW, last, t0, t1, t2, t3, t4, t5, t6, t7, a_layout,
                                               g_layout, STAGES, 1)
            acc, c_frag, a, w, am = _step(acc, c_frag, a, w, am, i + 2, x_bufs, x_ready, empty, wq_ptr, base, arow,
                                          KW, last, t0, t1, t2, t3, t4, t5, t6, t7, a_layout, g_layout, STAGES, 1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    # out[m, n] = acc[n, m]: transposed in registers, through shared memory, out by TMA
    c_smem = gl.allocate_shared_memory(gl.bfloat16, [BT, 64], out_desc.layout)
    c_smem.store(acc.to(gl.bfloat16).permute((1, 0)))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [off_m, row0], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _loader(x_desc, x_bufs, x_ready, empty, off_m, k_tiles, STAGES: gl.constexpr):
    BK: gl.constexpr = x_desc.block_type.shape[1]
    for i in range(k_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        bar = x_ready.index(s)
        mbarrier.expect(bar, x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, i * BK], bar, x_bufs.index(s))


@gluon.jit
def nf4_gemm_rs_kernel(x_desc, out_desc, wq_ptr, absmax_ptr, tab_ptr, M, N, K, KW, KB, STAGES: gl.constexpr,
                       GROUP_M: gl.constexpr, CONS_REGS: gl.constexpr, DEPTH: gl.constexpr):
    BT: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BT)
    tiles_n = N // 128
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    off_m = pid_m * BT
    off_n = pid_n * 128

    x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, BK], x_desc.layout)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release a stage
    k_tiles = K // BK
    gl.warp_specialize([
        (_loader, (x_desc, x_bufs, x_ready, empty, off_m, k_tiles, STAGES)),
        (_consumer, (x_bufs, x_ready, empty, out_desc, wq_ptr, absmax_ptr, tab_ptr, off_m, off_n, k_tiles, KW, KB,
                     0, BT, STAGES, DEPTH)),
        (_consumer, (x_bufs, x_ready, empty, out_desc, wq_ptr, absmax_ptr, tab_ptr, off_m, off_n, k_tiles, KW, KB,
                     1, BT, STAGES, DEPTH)),
    ], [4, 4], [CONS_REGS, CONS_REGS])


def nf4_gemm_rs(x, packed, absmax, tables, BT=256, STAGES=4, GROUP_M=8, maxnreg=168, cons_regs=232, depth=2):
    """x (M, K) bf16, packed (N * K / 2,) uint8 as ``repack`` leaves it, absmax (N * K / 64,) float32 -> (M, N)
    bf16."""
    M, K = x.shape
    N = packed.numel() * 2 // K
    if K % (64 * depth) or N % 128:
        raise ValueError(f"nf4_gemm_rs: needs K % {64 * depth} == 0 and N % 128 == 0, got N={N}, K={K}")
    out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([BT, 64], gl.bfloat16)
    x_desc = TensorDescriptor.from_tensor(x, [BT, 64], layout)
    out_desc = TensorDescriptor.from_tensor(out, [BT, 64], layout)
    wq = packed.reshape(N, K // 2).view(torch.int32)
    grid = (triton.cdiv(M, BT) * (N // 128),)
    nf4_gemm_rs_kernel[grid](x_desc, out_desc, wq, absmax, tables, M, N, K, K // 8, K // 64, STAGES=STAGES,
                             GROUP_M=GROUP_M, CONS_REGS=cons_regs, DEPTH=depth, num_warps=4, maxnreg=maxnreg)
    return out


def compile_only(BT=256, STAGES=4, maxnreg=168, cons_regs=232, depth=2):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    layout = gl.NVMMASharedLayout.get_default_for([BT, 64], gl.bfloat16)
    desc = f"tensordesc<bf16[{BT}, 64],{layout!r}>"
    sig = {"x_desc": desc, "out_desc": desc, "wq_ptr": "*i32", "absmax_ptr": "*fp32", "tab_ptr": "*i32", "M": "i32",
           "N": "i32", "K": "i32", "KW": "i32", "KB": "i32",
           "STAGES": "constexpr", "GROUP_M": "constexpr", "CONS_REGS": "constexpr", "DEPTH": "constexpr"}
    src = GluonASTSource(nf4_gemm_rs_kernel, sig, constexprs={"STAGES": STAGES, "GROUP_M": 8,
                                                              "CONS_REGS": cons_regs, "DEPTH": depth})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})
    print(f"BT={BT} STAGES={STAGES}: shared {k.metadata.shared} B")
    return k


def _config(text: str) -> dict:
    """"BT,STAGES,MAXNREG,CONSUMER_REGS,DEPTH" -> nf4_gemm_rs keyword arguments."""
    bt, st, mr, cr, d = (int(v) for v in text.split(","))
    return dict(BT=bt, STAGES=st, maxnreg=mr, cons_regs=cr, depth=d)


def main():
    from nf4_gluon import SHAPES, bench_cases

    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--configs", nargs="*", default=["256,4,168,232,2", "128,4,168,232,2"],
                    help="BT,STAGES,maxnreg,consumer registers,DEPTH")
    ap.add_argument("--shapes", nargs="*", type=int, help="indices into nf4_gluon.SHAPES (default: all)")
    ap.add_argument("--mnk", nargs="*", default=[], help="extra shapes M,N,K")
    ap.add_argument("--once", action="store_true", help="one call per config, no timing (for ncu)")
    ap.add_argument("--json")
    args = ap.parse_args()
    configs = {c: _config(c) for c in args.configs}
    if args.compile_only:
        for kw in configs.values():
            ptx = compile_only(**kw).asm["ptx"]
            print("  wgmma:", ptx.count("wgmma.mma_async"), "prmt:", ptx.count("prmt.b32"), "shfl:",
                  ptx.count("shfl."), "st.shared:", ptx.count("st.shared"), "ld.shared:", ptx.count("ld.shared"))
        return
    cases = [SHAPES[i] for i in (args.shapes if args.shapes is not None else range(len(SHAPES)))]
    cases += [(*(int(v) for v in t.split(",")), "extra") for t in args.mnk]
    variants = {"rs " + key: (lambda x, p, a, t, kw=kw: nf4_gemm_rs(x, p, a, t, **kw)) for key, kw in configs.items()}
    bench_cases(cases, variants, args.once, args.json, prepare=repack)


if __name__ == "__main__":
    main()
