"""Exploratory: bench/nf4_gluon_rs.py's register-operand NF4 GEMM with its weight fed by TMA, persistent. Not
library code. Results and reading: BENCHMARKS.md, session 22.

    python bench/nf4_gluon_tma.py [--shapes 0 1 ...] [--mnk M,N,K ...] [--rs] [--repeat N]
                                  [--configs BT,STAGES,REGS,GROUP_M,SPLIT[,REPACKED] ...]
    python bench/nf4_gluon_tma.py --compile-only     # no GPU needed: compiles for sm_90

Session 16's register design (out^T = W x^T, the decoded weight is wgmma's register operand A) reached 1.24-1.27x
bf16's time within whole waves; Nsight Compute put 45 % of its warps' stall samples on long-scoreboard waits: each
consumer loaded its weight words and absmax from global memory one K step ahead of their decode, so every step
waited on a DRAM round trip that one wgmma step (~0.8 us) does not cover. Here:
* the loader partition (the default, 4 warps; one thread issues) streams each K step's x tile (BT x 64 bf16), the
  weight words of the program's 128 rows (128 x 8 int32) and their absmax (128 x 4 float32: TMA's minimum box
  row is 16 bytes, so the absmax of 4 steps, re-read at each of them) into a ring of STAGES shared-memory
  stages: the consumers wait on shared memory only;
* the program is persistent (one per SM): every program runs the same number of whole tiles (tiles pid,
  pid + grid, ..., GROUP_M token tiles per group), then the tiles left over (fewer than a round) are split along
  K into S pieces, one per program. Each piece writes its float32 partial to a workspace; the last of a tile's
  pieces to arrive (a per-tile counter, acq_rel) adds the S partials in piece order -- the same bits whatever
  the arrival order -- and stores the tile; it resets the counter for the next call;
* each consumer warpgroup (64 weight rows) decodes step k + 1's fragment from the stage while step k's wgmma runs
  (two fragment variables, as nf4_gluon_rs's DEPTH 2; one wgmma in flight: with two, ptxas serialized them all,
  C7512, for want of registers at 12 warps; a 9-warp program cannot launch: triton pads it to 12);
* the epilogue adds the bias in float32 and stores the transposed tile through shared memory (stmatrix) by TMA;
* REPACKED (default) reads nf4_gluon_rs's repacked byte order; REPACKED=0 reads bitsandbytes' order and does the
  same transpose on the way to registers: each lane loads its rows' 8 words (32 bytes, shared by the row's four
  lanes) and picks its bytes with 3 prmt per word (+96 prmt and 2x the shared-memory loads per tile step).
Numerics as nf4_gluon_rs: bf16(bf16(code) * bf16(absmax)) per weight, checked against float64 within 2^-7.
``FusedNF4Linear`` puts the kernel under bench/step.py's ``hb-nf4-fused`` variants.
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
from nf4_gluon_rs import _decode_repacked, repack  # noqa: E402

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _tile(t, tiles_m, tiles_n, GROUP_M: gl.constexpr):
    """Tile t's (m, n) tile indices, GROUP_M token tiles per group so that a group's weight tiles stay in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % per_group) % size_m, (t % per_group) // size_m


@gluon.jit
def _item(j, full_rounds, tiles_m, tiles_n, k_steps, S: gl.constexpr, GROUP_M: gl.constexpr):
    """The program's j-th work item: (m tile, n tile, first K step, end K step, tail piece or -1). Items below
    ``full_rounds`` are whole tiles pid + j * grid; the one after is piece pid % S of tail tile pid // S (the
    tiles past full_rounds * grid, each split along K into S ranges of whole step pairs)."""
    P = gl.num_programs(0)
    pid = gl.program_id(0)
    tail = (j >= full_rounds).to(gl.int32)
    t = pid + j * P + tail * (full_rounds * P + pid // S - pid - j * P)
    r = pid % S
    pairs = k_steps // 2
    kb = tail * 2 * ((r * pairs) // S)
    ke = k_steps + tail * (2 * (((r + 1) * pairs) // S) - k_steps)
    pm, pn = _tile(t, tiles_m, tiles_n, GROUP_M)
    return pm, pn, kb, ke, tail * (pid + 1) - 1


@gluon.jit
def _tail(full_rounds, n_tiles, S: gl.constexpr):
    """How many programs run a tail item (a piece when S > 1, else a whole tile)."""
    return (n_tiles - full_rounds * gl.num_programs(0)) * S


@gluon.jit
def _n_items(full_rounds, n_tiles, S: gl.constexpr):
    return full_rounds + (gl.program_id(0) < _tail(full_rounds, n_tiles, S)).to(gl.int32)


@gluon.jit
def _loader(x_desc, w_desc, a_desc, x_bufs, w_bufs, a_bufs, ready, empty, n_tiles, full_rounds, tiles_m, tiles_n,
            k_steps, S: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    BT: gl.constexpr = x_desc.block_type.shape[0]
    nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes + a_desc.block_type.nbytes
    i = 0
    for j in range(_n_items(full_rounds, n_tiles, S)):
        pm, pn, kb, ke, piece = _item(j, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        for k in range(kb, ke):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            _tma_load(x_desc, [pm * BT, k * 64], bar, x_bufs.index(s))
            _tma_load(w_desc, [pn * 128, k * 8], bar, w_bufs.index(s))
            _tma_load(a_desc, [pn * 128, (k // 4) * 4], bar, a_bufs.index(s))
            i += 1


# prmt selectors: $8 picks byte b of $4 and of $5 into bytes 0-1 (and of $6, $7); 0x5410 joins the two halves
_GATHER_ASM = gl.constexpr("""{
.reg .b32 %lo, %hi;
prmt.b32 %lo, $4, $5, $8;
prmt.b32 %hi, $6, $7, $8;
prmt.b32 $0, %lo, %hi, 0x5410;
mov.b32 $1, 0;
mov.b32 $2, 0;
mov.b32 $3, 0;
}""")


@gluon.jit
def _gather_words(wbuf, WG: gl.constexpr, g_layout: gl.constexpr):
    """The repacked words of this warpgroup's bitsandbytes-order rows (``repack``'s transpose, done on the
    way to registers): element (r, 2b + t) of the result (g_layout) holds byte b of the row's words 4t .. 4t + 3.
    Each lane loads its rows' 8 words (the four lanes b of a row read the same 32 bytes) and picks its bytes
    with three prmt."""
    # [64 rows, 4 b, 2 t, 4 j] (word 4t + j): j, t and row + 8 in registers, b and rows on the lanes
    L4: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [8, 0, 0, 0]],
        lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[16, 0, 0, 0], [32, 0, 0, 0]], block_bases=[], shape=[64, 4, 2, 4])
    z4 = gl.zeros([64, 4, 2, 4], gl.int32, L4)
    rows = wbuf.reshape([128, 2, 4]).slice(64 * WG, 64, 0)  # this warpgroup's rows of the stage's (128, 8)
    words = gl.expand_dims(rows.load(gl.SliceLayout(1, L4)), 1) + z4
    b = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(b | ((b + 4) << 4), 0), 2), 3) + z4
    g = gl.inline_asm_elementwise(_GATHER_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [words, sel], dtype=gl.int32,
                                  is_pure=True, pack=4)
    g0, _ = gl.split(g.reshape([64, 4, 2, 2, 2]))  # j = 0 (the other three are zeros)
    g0, _ = gl.split(g0)
    return gl.convert_layout(g0.reshape([64, 8]), g_layout)


@gluon.jit
def _frag(i, k, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG: gl.constexpr, STAGES: gl.constexpr,
          g_layout: gl.constexpr, am_layout: gl.constexpr, a_layout: gl.constexpr, REPACKED: gl.constexpr):
    """Step i's (the tile's K step k) A fragment of this warpgroup's 64 rows, decoded from the stage."""
    s = i % STAGES
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    if REPACKED:
        w = w_bufs.index(s).slice(64 * WG, 64, 0).load(g_layout)
    else:
        w = _gather_words(w_bufs.index(s), WG, g_layout)
    a4 = a_bufs.index(s).slice(64 * WG, 64, 0).load(am_layout)
    col = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, am_layout)), 0)
    am = gl.sum(gl.where(col == k % 4, a4, 0.0), axis=1)
    am = gl.convert_layout(am, gl.SliceLayout(1, g_layout))
    return _decode_repacked(w, t0, t1, t2, t3, t4, t5, t6, t7, am, a_layout)


@gluon.jit
def _release(empty, i, STAGES: gl.constexpr):
    mbarrier.arrive(empty.index(i % STAGES), count=1)


@gluon.jit
def _fence(like):
    """fence.acq_rel.gpu in every thread (``like``: a tensor with one element per thread)."""
    return gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [like], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _mainloop(i, kb, ke, acc, x_bufs, w_bufs, a_bufs, ready, empty, t0, t1, t2, t3, t4, t5, t6, t7,
              WG: gl.constexpr, STAGES: gl.constexpr, g_layout: gl.constexpr,
              am_layout: gl.constexpr, a_layout: gl.constexpr, REPACKED: gl.constexpr):
    """acc += this warpgroup's rows of W[:, 64 kb: 64 ke] @ x^T from the stages i, i + 1, ...; ke - kb even."""
    fa = _frag(i, kb, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES, g_layout, am_layout,
               a_layout, REPACKED)
    n = ke - kb
    # two fragment variables (the decode of the next step must not write the registers a wgmma in flight
    # reads); each wgmma retires before the next issues, the other warpgroup's fill the tensor cores meanwhile
    for k in range(0, n - 2, 2):
        acc = warpgroup_mma(fa, x_bufs.index((i + k) % STAGES).permute((1, 0)), acc, is_async=True)
        fb = _frag(i + k + 1, kb + k + 1, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES,
                   g_layout, am_layout, a_layout, REPACKED)
        acc, fa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fa))
        _release(empty, i + k, STAGES)
        acc = warpgroup_mma(fb, x_bufs.index((i + k + 1) % STAGES).permute((1, 0)), acc, is_async=True)
        fa = _frag(i + k + 2, kb + k + 2, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES,
                   g_layout, am_layout, a_layout, REPACKED)
        acc, fb = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fb))
        _release(empty, i + k + 1, STAGES)
    acc = warpgroup_mma(fa, x_bufs.index((i + n - 2) % STAGES).permute((1, 0)), acc, is_async=True)
    fb = _frag(i + n - 1, ke - 1, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES, g_layout,
               am_layout, a_layout, REPACKED)
    acc, fa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fa))
    _release(empty, i + n - 2, STAGES)
    acc = warpgroup_mma(fb, x_bufs.index((i + n - 1) % STAGES).permute((1, 0)), acc, is_async=True)
    acc, fb = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fb))
    _release(empty, i + n - 1, STAGES)
    return acc


@gluon.jit
def _add_bias(acc, bias_ptr, pn, WG: gl.constexpr, layout: gl.constexpr, HAS_BIAS: gl.constexpr):
    """acc (64 weight rows, tokens) + the rows' bias, in float32 (as cuBLAS's epilogue adds it)."""
    if HAS_BIAS:
        rows = pn * 128 + 64 * WG + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        acc = acc + gl.expand_dims(gl.load(bias_ptr + rows).to(gl.float32), 1)
    return acc


@gluon.jit
def _store_tile(acc, c_smem, out_desc, pm, pn, WG: gl.constexpr, BT: gl.constexpr):
    """out[m, n] = acc[n, m] through shared memory by TMA; the previous tile's store must have left c_smem."""
    tma.store_wait(pendings=0)
    c_smem.store(acc.to(gl.bfloat16).permute((1, 0)))
    fence_async_shared()
    _tma_store(out_desc, [pm * BT, pn * 128 + 64 * WG], c_smem)


@gluon.jit
def _store_piece(acc, piece, pm, pn, ws_ptr, cnt_ptr, out_ptr, bias_ptr, M, N, S: gl.constexpr, WG: gl.constexpr,
                 BT: gl.constexpr, mma_layout: gl.constexpr, HAS_BIAS: gl.constexpr):
    """A K range of a tail tile: the partial sum to the workspace (per piece (BT, 128) float32, token-major);
    the last of the tile's S pieces to arrive adds the S partials in piece order (the same bits whatever the
    arrival order), CW tokens at a time (the S loads of a chunk in flight together), and stores them."""
    tile = piece // S
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, mma_layout))
    cols = gl.arange(0, BT, layout=gl.SliceLayout(0, mma_layout))
    offs = gl.expand_dims(cols, 0) * 128 + gl.expand_dims(rows, 1) + 64 * WG
    gl.store(ws_ptr + piece.to(gl.int64) * (128 * BT) + offs, acc)
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    _fence(gl.zeros([128], gl.int32, L1))
    gl.thread_barrier()
    arrived = gl.atomic_add(cnt_ptr + tile * 2 + WG, 1, sem="acq_rel", scope="gpu")
    if arrived == S - 1:
        _fence(gl.zeros([128], gl.int32, L1))
        CW: gl.constexpr = 64 if S <= 3 else 32
        CL: gl.constexpr = gl.BlockedLayout([2, CW // 4], [32, 1], [1, 4], [0, 1])  # [64 rows, CW tokens]
        n = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(1, CL)), 1)
        m = gl.expand_dims(gl.arange(0, CW, layout=gl.SliceLayout(0, CL)), 0)
        base = ws_ptr + (tile * S).to(gl.int64) * (128 * BT)
        for c in gl.static_range(BT // CW):
            o = (m + c * CW) * 128 + n + 64 * WG
            part = gl.load(base + o)
            for r in gl.static_range(1, S):
                part += gl.load(base + r * (128 * BT) + o)
            part = _add_bias(part, bias_ptr, pn, WG, CL, HAS_BIAS)
            tok = pm * BT + c * CW + m
            gl.store(out_ptr + tok.to(gl.int64) * N + pn * 128 + 64 * WG + n, part.to(gl.bfloat16),
                     mask=(tok < M) & (n >= 0))
        gl.store(cnt_ptr + tile * 2 + WG, 0)  # ready for the next call


@gluon.jit
def _consumer(x_bufs, w_bufs, a_bufs, ready, empty, c_smem, out_desc, out_ptr, bias_ptr, M, N, tab_ptr, ws_ptr,
              cnt_ptr, n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S: gl.constexpr, WG: gl.constexpr,
              BT: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              HAS_BIAS: gl.constexpr, REPACKED: gl.constexpr):
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BT, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    # (row, 2b + t): registers row + 8, t; lanes b (bits 0-1), row (bits 2-4); warps row + 16, + 32
    g_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[8, 0], [0, 1]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 8])
    # the rows as g_layout's, the 4 steps' absmax of a row in registers
    am_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[8, 0], [0, 1], [0, 2]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 4])
    z = gl.zeros([64, 8], gl.int32, g_layout)
    t0 = z + gl.load(tab_ptr)
    t1 = z + gl.load(tab_ptr + 1)
    t2 = z + gl.load(tab_ptr + 2)
    t3 = z + gl.load(tab_ptr + 3)
    t4 = z + gl.load(tab_ptr + 4)
    t5 = z + gl.load(tab_ptr + 5)
    t6 = z + gl.load(tab_ptr + 6)
    t7 = z + gl.load(tab_ptr + 7)
    i = 0
    # whole tiles (with S == 1 the tail tiles too); a split tail piece after the loop, so that nothing of its
    # epilogue is hoisted into the loop's registers
    n_whole = _n_items(full_rounds, n_tiles, S)
    if S > 1:
        n_whole = full_rounds
    for j in range(n_whole):
        pm, pn, kb, ke, piece = _item(j, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        acc = gl.zeros((64, BT), dtype=gl.float32, layout=mma_layout)
        acc = _mainloop(i, kb, ke, acc, x_bufs, w_bufs, a_bufs, ready, empty, t0, t1, t2, t3, t4, t5, t6, t7, WG,
                        STAGES, g_layout, am_layout, a_layout, REPACKED)
        i += ke - kb
        acc = _add_bias(acc, bias_ptr, pn, WG, mma_layout, HAS_BIAS)
        _store_tile(acc, c_smem, out_desc, pm, pn, WG, BT)
    if S > 1:
        if gl.program_id(0) < _tail(full_rounds, n_tiles, S):
            pm, pn, kb, ke, piece = _item(full_rounds, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
            acc = gl.zeros((64, BT), dtype=gl.float32, layout=mma_layout)
            acc = _mainloop(i, kb, ke, acc, x_bufs, w_bufs, a_bufs, ready, empty, t0, t1, t2, t3, t4, t5, t6, t7,
                            WG, STAGES, g_layout, am_layout, a_layout, REPACKED)
            _store_piece(acc, piece, pm, pn, ws_ptr, cnt_ptr, out_ptr, bias_ptr, M, N, S, WG, BT, mma_layout,
                         HAS_BIAS)
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["M", "N", "n_tiles", "full_rounds", "tiles_m", "tiles_n", "k_steps"])
def nf4_gemm_tma_kernel(x_desc, w_desc, a_desc, out_desc, out_ptr, bias_ptr, M, N, tab_ptr, ws_ptr, cnt_ptr,
                        n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S: gl.constexpr, STAGES: gl.constexpr,
                        GROUP_M: gl.constexpr, CONS_REGS: gl.constexpr,
                        HAS_BIAS: gl.constexpr = False,
                        REPACKED: gl.constexpr = True):
    BT: gl.constexpr = x_desc.block_type.shape[0]
    x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, 64], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, 128, 8], w_desc.layout)
    a_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 128, 4], a_desc.layout)
    c_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, BT, 64], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a stage
    # the loader is the default partition (4 warps): 12 warps, 168 registers each at launch
    gl.warp_specialize([
        (_loader, (x_desc, w_desc, a_desc, x_bufs, w_bufs, a_bufs, ready, empty, n_tiles, full_rounds, tiles_m,
                  tiles_n, k_steps, S, STAGES, GROUP_M)),
        (_consumer, (x_bufs, w_bufs, a_bufs, ready, empty, c_bufs.index(0), out_desc, out_ptr, bias_ptr, M, N,
                    tab_ptr, ws_ptr, cnt_ptr, n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S, 0, BT, STAGES,
                    GROUP_M, HAS_BIAS, REPACKED)),
        (_consumer, (x_bufs, w_bufs, a_bufs, ready, empty, c_bufs.index(1), out_desc, out_ptr, bias_ptr, M, N,
                    tab_ptr, ws_ptr, cnt_ptr, n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S, 1, BT, STAGES,
                    GROUP_M, HAS_BIAS, REPACKED)),
    ], [4, 4], [CONS_REGS, CONS_REGS])


def _layouts(BT: int):
    x_layout = gl.NVMMASharedLayout.get_default_for([BT, 64], gl.bfloat16)
    flat = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return x_layout, flat


_SMS: dict[int, int] = {}
_COUNTERS: dict[int, torch.Tensor] = {}


def schedule(n_tiles: int, k_steps: int, programs: int, split: bool = True) -> tuple[int, int, int]:
    """(grid, full rounds, S): every program runs ``full_rounds`` whole tiles, then the tiles left over (fewer
    than a round) are split along K into S pieces of whole step pairs, one piece per program, S as large as
    the grid allows and at most k_steps / 8 (no piece under 4 steps)."""
    grid = min(n_tiles, programs)
    full = n_tiles // grid
    tail = n_tiles - full * grid
    S = max(1, min(grid // tail, k_steps // 8)) if tail and split else 1
    return grid, full, S


def nf4_gemm_tma(x, packed, absmax, tables, BT=256, STAGES=4, cons_regs=232, GROUP_M=4, split=True,
                 maxnreg=168, programs=None, bias=None,
                 repacked=True):
    """x (M, K) bf16, packed (N * K / 2,) uint8 as ``repack`` leaves it, absmax (N * K / 64,) float32 -> (M, N)
    bf16; K % 256 == 0, N % 128 == 0."""
    M, K = x.shape
    N = packed.numel() * 2 // K
    if K % 256 or N % 128:
        raise ValueError(f"nf4_gemm_tma: needs K % 256 == 0 and N % 128 == 0; got {M}x{N}x{K}")
    out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    x_layout, flat = _layouts(BT)
    x_desc = TensorDescriptor.from_tensor(x, [BT, 64], x_layout)
    out_desc = TensorDescriptor.from_tensor(out, [BT, 64], x_layout)
    w_desc = TensorDescriptor.from_tensor(packed.view(torch.int32).reshape(N, K // 8), [128, 8], flat)
    a_desc = TensorDescriptor.from_tensor(absmax.reshape(N, K // 64), [128, 4], flat)
    tiles_m, tiles_n = triton.cdiv(M, BT), N // 128
    n_tiles = tiles_m * tiles_n
    dev = x.device.index or 0
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        _COUNTERS[dev] = torch.zeros(2 * _SMS[dev], dtype=torch.int32, device=x.device)  # reset by the kernel
    grid, full, S = schedule(n_tiles, K // 64, programs or _SMS[dev], split)
    tail = n_tiles - full * grid
    ws = torch.empty(max(1, tail * S) * 128 * BT, dtype=torch.float32, device=x.device)
    nf4_gemm_tma_kernel[(grid,)](x_desc, w_desc, a_desc, out_desc, out, out if bias is None else bias, M, N,
                                 tables, ws, _COUNTERS[dev], n_tiles,
                                 full, tiles_m, tiles_n, K // 64, S=S, STAGES=STAGES, GROUP_M=GROUP_M,
                                 CONS_REGS=cons_regs, HAS_BIAS=bias is not None,
                                 REPACKED=repacked, num_warps=4, maxnreg=maxnreg)
    return out


class FusedNF4Linear(torch.nn.Module):
    """Bench only (bench/step.py's ``hb-nf4-fused``): halfbyte's ``Linear4bit`` whose bf16 calls over more than
    64 tokens take ``nf4_gemm_tma`` instead, from a repacked copy of the weight held beside the layer's own (so
    this variant's peak memory means nothing). Other calls (1-64 tokens, widths the kernel does not take, layers
    under ``min_n`` outputs) go to the layer."""

    def __init__(self, inner, min_n: int = 0):
        super().__init__()
        from nf4_gluon import nf4_tables

        self.inner = inner
        N, K = inner.out_features, inner.in_features
        self.ok = (K % 256 == 0 and N % 128 == 0 and N >= min_n and inner.quant_type == "nf4"
                   and not inner.double_quant and inner.blocksize == 64)
        if self.ok:
            self.packed = repack(inner.weight.detach().reshape(-1).view(torch.uint8), N, K)
            self.absmax = inner.absmax.view(torch.float32)
            self.tables = nf4_tables(inner.weight.device)

    def forward(self, x):
        K = x.shape[-1]
        M = x.numel() // K
        if not self.ok or M <= 64 or x.dtype != torch.bfloat16 or not x.is_cuda:
            return self.inner(x)
        b = self.inner.bias
        out = nf4_gemm_tma(x.reshape(M, K).contiguous(), self.packed, self.absmax, self.tables,
                           bias=None if b is None else b.detach().to(torch.bfloat16))
        return out.view(*x.shape[:-1], out.shape[-1])


def compile_only(BT=256, STAGES=4, cons_regs=232, GROUP_M=4, split=True, maxnreg=168, repacked=True):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    x_layout, flat = _layouts(BT)
    sig = {"x_desc": f"tensordesc<bf16[{BT}, 64],{x_layout!r}>", "w_desc": f"tensordesc<i32[128, 8],{flat!r}>",
           "a_desc": f"tensordesc<fp32[128, 4],{flat!r}>", "out_desc": f"tensordesc<bf16[{BT}, 64],{x_layout!r}>",
           "out_ptr": "*bf16", "bias_ptr": "*bf16", "M": "i32", "N": "i32", "tab_ptr": "*i32", "ws_ptr": "*fp32",
           "cnt_ptr": "*i32", "n_tiles": "i32", "full_rounds": "i32", "S": "constexpr",
           "tiles_m": "i32", "tiles_n": "i32", "k_steps": "i32",
           "STAGES": "constexpr", "GROUP_M": "constexpr", "CONS_REGS": "constexpr",
           "REPACKED": "constexpr"}
    src = GluonASTSource(nf4_gemm_tma_kernel, sig, constexprs={"STAGES": STAGES, "GROUP_M": GROUP_M,
                                                               "CONS_REGS": cons_regs,
                                                               "REPACKED": repacked, "S": 3 if split else 1})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})
    print(f"BT={BT} STAGES={STAGES} CONS_REGS={cons_regs}: shared {k.metadata.shared} B")
    return k


def _config(text: str) -> dict:
    """"BT,STAGES,CONS_REGS,GROUP_M,SPLIT[,REPACKED]" -> nf4_gemm_tma keyword arguments (REPACKED 0: the
    kernel reads bitsandbytes' byte order)."""
    v = [int(t) for t in text.split(",")]
    return dict(BT=v[0], STAGES=v[1], cons_regs=v[2], GROUP_M=v[3], split=bool(v[4]),
                repacked=bool(v[5]) if len(v) > 5 else True)


_ORIG: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _bnb_order(vp: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """``repack``'s inverse (cached per tensor, which the cache holds so that its address is not reused): the
    bitsandbytes byte order the REPACKED=False kernel reads."""
    hit = _ORIG.get(vp.data_ptr())
    if hit is None or hit[0] is not vp:
        hit = _ORIG[vp.data_ptr()] = (vp, vp.reshape(N, K // 64, 4, 8).transpose(-1, -2).contiguous().reshape(-1))
    return hit[1]


def main():
    from nf4_gluon import SHAPES, bench_cases
    from nf4_gluon_rs import nf4_gemm_rs

    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--configs", nargs="*", default=["256,4,232,4,1", "256,4,232,4,1,0"],
                    help="BT,STAGES,CONS_REGS,GROUP_M,SPLIT[,REPACKED]")
    ap.add_argument("--shapes", nargs="*", type=int, help="indices into nf4_gluon.SHAPES (default: all)")
    ap.add_argument("--mnk", nargs="*", default=[], help="extra shapes M,N,K")
    ap.add_argument("--rs", action="store_true", help="also session 16's register design (nf4_gluon_rs)")
    ap.add_argument("--repeat", type=int, default=0, help="check that this many calls give the same bits")
    ap.add_argument("--once", action="store_true", help="one call per config, no timing (for ncu)")
    ap.add_argument("--json")
    args = ap.parse_args()
    configs = {c: _config(c) for c in args.configs}
    if args.compile_only:
        for kw in configs.values():
            k = compile_only(**kw)
            ptx = k.asm["ptx"]
            print("  wgmma:", ptx.count("wgmma.mma_async"), "prmt:", ptx.count("prmt.b32"), "setmaxnreg:",
                  ptx.count("setmaxnreg"))
        return
    cases = [SHAPES[i] for i in (args.shapes if args.shapes is not None else range(len(SHAPES)))]
    cases += [(*(int(v) for v in t.split(",")), "extra") for t in args.mnk]
    def call(kw):
        if kw["repacked"]:
            return lambda x, p, a, t: nf4_gemm_tma(x, p, a, t, **kw)
        return lambda x, p, a, t: nf4_gemm_tma(x, _bnb_order(p, a.numel() * 64 // x.shape[1], x.shape[1]), a, t,
                                               **kw)

    variants = {"tma " + key: call(kw) for key, kw in configs.items()}
    if args.rs:
        variants["rs 256,4,168,232,2"] = lambda x, p, a, t: nf4_gemm_rs(x, p, a, t)
    if args.repeat:  # the split tail's fixed summation order: the same bits call after call
        from nf4_gluon import nf4_tables

        for M, N, K, name in cases:
            w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
            packed, absmax = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            vp, tables = repack(packed, N, K), nf4_tables()
            for key, fn in variants.items():
                outs = [fn(x, vp, absmax, tables) for _ in range(args.repeat)]
                same = all(torch.equal(outs[0], o) for o in outs[1:])
                print(f"  repeat {M}x{N}x{K} {key}: {'identical' if same else 'DIFFERENT'} over {args.repeat} calls")
    bench_cases(cases, variants, args.once, args.json, prepare=repack)


if __name__ == "__main__":
    main()
