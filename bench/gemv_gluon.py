"""Exploratory: the 4-bit GEMV (M = 1) with a TMA ring and a shared-memory code table (Gluon, Hopper). Not library
code. Results and reading: BENCHMARKS.md, session 17.

    python bench/gemv_gluon.py [--dtype bfloat16|float16] [--configs BN,KT,STAGES,CTAS,SPLIT,W ...] [--read-only]
    python bench/gemv_gluon.py --compile-only     # no GPU needed: compiles for sm_90 (triton 3.6 and 3.9)

Why (BENCHMARKS.md sessions 8-9): the library's tensor-core GEMV spends ~22 integer instructions per 32-bit word
of 8 codes on the ``prmt`` decode, and ncu put its ALU pipe alone above the time that 2x bitsandbytes allows.
Session 9 moved the decode into a shared-memory table (a byte -> (code, code) pair, 256 entries replicated per lane
so that a warp's 32 lookups never share a bank: 4 x (shift, and|or, ``ld.shared``) per word), but its loads went
through registers, so it either held 96-168 registers or stalled on memory. Here no load touches a register:
* the default partition (4 warps; one thread issues) streams each (row tile, K tile)'s packed words, float32
  absmax and x into a STAGES-deep shared-memory ring by TMA;
* each of the W consumer warps is a partition of its own, so that it waits for a stage and releases it alone (a
  multi-warp partition arrives once, from one thread, and needs a barrier of its warps first: that barrier was
  the largest stall in ncu). A warp owns BN / W rows of every tile, half of them its mma rows a, half rows b;
* the consumers sum code * x on the tensor cores as ``halfbyte.kernels.gemv_mma`` does (rows a / b in A rows
  g / g+8, x in B; the diagonal entry C[g][g] of an mma lane group is the sum over its absmax group), picking the
  diagonal by a per-lane float mask folded into the absmax multiply instead of selects;
* the table (32 KB, static shared memory declared in inline PTX) is written from immediates by the consumer warps
  while the first TMA loads are in flight, then a named barrier of those warps.
Persistent programs walk (row tile, K chunk) items, spread so that every program gets the same number or one
fewer. ``--read-only`` also times the same programs with the decode replaced by a trivial use of the stage: the
memory side's floor.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# triton 3.7+ renamed the TMA load (3.9 raises on the old name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# and made the shared-memory reinterpretation public
_NEW_VIEW = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

TABLE = "hb_gtab"
BAR_ID = 14  # a named barrier the table build uses (warp specialization takes the low ids)


def declare_asm() -> str:
    """Declares the 32 KB table (function scope: emitted once, in the parent region) and returns its address."""
    return f".shared .align 16 .b32 {TABLE}[8192];\nmov.u32 $0, {TABLE};"


def build_asm(warps: int, pairs: list[int]) -> str:
    """Fills the table with the 256 ``pairs`` (immediates: they depend only on the code and dtype) using the
    ``warps`` consumer warps, each its own partition (warp w writes entries w, w + warps, ...: one store per
    entry, 32 lanes wide, since entry e of lane l is word 32 e + l), then waits at a named barrier of those warps
    and returns the table address. ($1 is unused.) No global loads: a first version loaded the pairs in a loop,
    one L2 round trip per entry per warp, and that alone took several microseconds per program."""
    lines = ["{", ".reg .b32 %ln, %tx, %w, %tb, %v;", f".reg .pred %p<{warps}>;",
             "mov.u32 %ln, %laneid;", "shl.b32 %ln, %ln, 2;", f"mov.u32 %tb, {TABLE};", "add.u32 %tb, %tb, %ln;",
             "mov.u32 %tx, %tid.x;", "shr.u32 %w, %tx, 5;", f"rem.u32 %w, %w, {warps};"]
    lines += [f"setp.eq.u32 %p{w}, %w, {w};" for w in range(warps)]
    for e, v in enumerate(pairs):
        p = f"@%p{e % warps}"
        lines += [f"{p} mov.b32 %v, {v & 0xFFFFFFFF};", f"{p} st.shared.b32 [%tb+{128 * e}], %v;"]
    lines += [f"bar.sync {BAR_ID}, {32 * warps};", f"mov.u32 $0, {TABLE};", "}"]
    return "\n".join(lines)


def gemv_asm(dtype: torch.dtype) -> str:
    """$0,$1 / $2,$3: (d0, d1) / (d2, d3) of the mma accumulators (row a / row b, C[g][2t], C[g][2t+1]); $4,$5 /
    $6,$7 two consecutive words of rows a / b; $8 + 2m + w: x pair m of word w; $16 the lane's table base."""
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    lines = ["{", ".reg .f32 %d<4>;", ".reg .b32 %t<16>, %tb;", f"mov.u32 %tb, {TABLE};"]
    for name, words in (("a", ("$4", "$5")), ("b", ("$6", "$7"))):
        for w, reg in enumerate(words):
            lines.append(".reg .b32 " + ", ".join(f"%{name}{w}_{k}" for k in range(4)) + ";")
            for k in range(4):
                t = f"%t{(0 if name == 'a' else 8) + 4 * w + k}"
                lines.append(f"shl.b32 {t}, {reg}, 7;" if k == 0 else f"shr.u32 {t}, {reg}, {8 * k - 7};")
                lines += [f"and.b32 {t}, {t}, 0x7F80;", f"or.b32 {t}, {t}, $16;", f"add.u32 {t}, {t}, %tb;",
                          f"ld.shared.b32 %{name}{w}_{k}, [{t}];"]
    lines += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
    d = "{%d0, %d1, %d2, %d3}"
    for w in range(2):
        for m0, m1 in ((0, 1), (2, 3)):  # A rows g (row a) / g+8 (row b) at this lane's k slots; B = x
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                         f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, "
                         f"{{${8 + 2 * m0 + w}, ${8 + 2 * m1 + w}}}, {d};")
    lines += ["mov.b32 $0, %d0;", "mov.b32 $1, %d1;", "mov.b32 $2, %d2;", "mov.b32 $3, %d3;", "}"]
    return "\n".join(lines)


def pair256(dtype: torch.dtype, device) -> torch.Tensor:
    """(256,) int32: entry b = code[b >> 4] | code[b & 15] << 16 as ``dtype`` bits (byte b holds element 2j in its
    high nibble; a packed pair keeps the first element low)."""
    from halfbyte.formats.codebooks import code_4bit

    h = code_4bit("nf4", torch.device("cpu")).to(torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256)
    v = h[b >> 4] | (h[b & 15] << 16)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32).to(device)


@gluon.constexpr_function
def _x_layout(G, NW):
    """[G, 8, 4] x pairs: pair m and word bit 0 in registers, word bits 1-2 and group bits 0-2 on the lanes (as
    L3), group bit 3 in registers, every warp a copy."""
    regs = [[0, 0, 1], [0, 0, 2], [0, 1, 0]] + ([[8, 0, 0]] if G == 16 else [])
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0],
                                                                  [4, 0, 0]],
                                      warp_bases=[[0, 0, 0]] * (NW.bit_length() - 1), block_bases=[],
                                      shape=[G, 8, 4])


@gluon.jit
def _view(buf, shape: gl.constexpr, layout: gl.constexpr):
    """``buf``'s bytes as int32 of ``shape`` in ``layout``."""
    if _NEW_VIEW:
        return buf.reinterpret(gl.int32, shape, layout)
    else:
        return buf._reinterpret(gl.int32, shape, layout)


@gluon.jit
def _load_step(wbuf, abuf, xbuf, r0, HALF: gl.constexpr, g0: gl.constexpr, G: gl.constexpr, L3: gl.constexpr,
               LA: gl.constexpr, XL: gl.constexpr):
    """A consumer step's operands from the stage: words of rows a / b (rows r0.., r0 + HALF..), their absmax, and
    x, for the groups g0 .. g0 + G."""
    qa = wbuf.slice(r0, HALF, 0).slice(g0, G, 1).load(L3)
    qb = wbuf.slice(r0 + HALF, HALF, 0).slice(g0, G, 1).load(L3)
    am_a = abuf.slice(r0, HALF, 0).slice(g0, G, 1).load(LA)
    am_b = abuf.slice(r0 + HALF, HALF, 0).slice(g0, G, 1).load(LA)
    nx = xbuf.slice(g0, G, 0).load(XL)
    return qa, qb, am_a, am_b, nx


@gluon.jit
def _step(acc_a, acc_b, qa, qb, am_a, am_b, nx, lt, keep, z3, G: gl.constexpr, LX: gl.constexpr,
          ASM: gl.constexpr, READ_ONLY: gl.constexpr):
    """x split into its pairs m = 0..3 (laid out as the words), then the lookups and mmas of ``ASM``; the kept
    diagonal entries, times the absmax, are added to the accumulators."""
    lo, hi = gl.split(nx.reshape([G, 8, 2, 2]))
    x0, x2 = gl.split(lo)
    x1, x3 = gl.split(hi)
    x0 = gl.expand_dims(gl.convert_layout(x0, LX), 0) + z3
    x1 = gl.expand_dims(gl.convert_layout(x1, LX), 0) + z3
    x2 = gl.expand_dims(gl.convert_layout(x2, LX), 0) + z3
    x3 = gl.expand_dims(gl.convert_layout(x3, LX), 0) + z3
    if READ_ONLY != 0:  # the memory side alone: the ring's stages are read, nothing is decoded
        acc_a += (qa ^ x0).to(gl.float32) * gl.expand_dims(am_a, 2)
        acc_b += (qb ^ x1).to(gl.float32) * gl.expand_dims(am_b, 2)
    else:
        ya, yb = gl.inline_asm_elementwise(ASM, "=f,=f,=f,=f" + ",r" * 14, [qa, qb, x0, x1, x2, x3, lt],
                                           dtype=(gl.float32, gl.float32), is_pure=True, pack=2)
        acc_a += ya * (gl.expand_dims(am_a, 2) * keep)
        acc_b += yb * (gl.expand_dims(am_b, 2) * keep)
    return acc_a, acc_b


@gluon.jit
def _lane_id(like):
    return gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _producer(w_desc, a_desc, x_desc, ring_w, ring_a, ring_x, ready, empty, n_items, KTILES, SPLIT,
              STAGES: gl.constexpr, NO_ABSMAX: gl.constexpr = False):
    """One warp: TMA loads of the program's (row tile, K tile)s, in order, into the ring."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    G: gl.constexpr = w_desc.block_type.shape[1] // 8
    s = 0
    ph = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        row0 = (item // SPLIT) * BN
        kg = (item % SPLIT) * KTILES * G
        for kt in range(KTILES):
            mbarrier.wait(empty.index(s), ph ^ 1)
            bar = ready.index(s)
            if NO_ABSMAX:  # (read-only timing of the weight stream alone)
                mbarrier.expect(bar, w_desc.block_type.nbytes)
                _tma_load(w_desc, [row0, (kg + kt * G) * 8], bar, ring_w.index(s))
            else:
                mbarrier.expect(bar, w_desc.block_type.nbytes + a_desc.block_type.nbytes + x_desc.block_type.nbytes)
                _tma_load(w_desc, [row0, (kg + kt * G) * 8], bar, ring_w.index(s))
                _tma_load(a_desc, [row0, kg + kt * G], bar, ring_a.index(s))
                _tma_load(x_desc, [(kg + kt * G) // 8, 0], bar, ring_x.index(s))
            s += 1
            if s == STAGES:
                s = 0
                ph ^= 1


@gluon.jit
def _consumer(ring_w, ring_a, ring_x, ready, empty, pair_ptr, out_ptr, N, n_items, KTILES, SPLIT,
              BN: gl.constexpr, GT: gl.constexpr, STAGES: gl.constexpr, W: gl.constexpr, WID: gl.constexpr,
              ATOMIC: gl.constexpr, BUILD: gl.constexpr, ASM: gl.constexpr, READ_ONLY: gl.constexpr):
    """One consumer warp (its own partition, so that it waits for and releases stages alone: the single
    arrival of a multi-warp partition needs a barrier of all its warps first). It owns rows [WID * RW, WID * RW +
    RW) of every tile: the first half are its rows a, the second its rows b."""
    RW: gl.constexpr = BN // W
    HALF: gl.constexpr = RW // 2
    G: gl.constexpr = 8  # absmax groups per step: one per mma lane group
    NSUB: gl.constexpr = GT // G
    W3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
    # (row, group, word): word bit 0 in registers (pack=2 hands the asm two consecutive words), word bits 1-2 and
    # group bits 0-2 on the lanes (an mma lane group = one absmax group), the rest in registers.
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 2], [1, 8, 4], [1, 1, 1], [2, 1, 0])
    LA: gl.constexpr = gl.SliceLayout(2, L3)
    LR: gl.constexpr = gl.SliceLayout(1, LA)
    LX: gl.constexpr = gl.SliceLayout(0, L3)
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    tok = gl.inline_asm_elementwise(BUILD, "=r,l", [pair_ptr + gl.zeros([32], gl.int32, L1)],
                                    dtype=gl.int32, is_pure=False, pack=1)
    tab = gl.max(tok, 0)  # a scalar that orders the lookups after the build
    z3 = gl.zeros([HALF, G, 8], gl.int32, L3)
    lane = _lane_id(z3)
    lt = (lane & 31) << 2 | (tab & 0)
    wi = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
    # C[g][g] sits in lane 4g + g / 2, element (d0, d1)[g % 2]: keep that element of that lane only
    t = lane & 3
    g8 = (lane >> 2) & 7
    w3 = gl.expand_dims(gl.expand_dims(wi, 0), 0)
    keep = ((t == (g8 >> 1)) & ((w3 & 1) == (g8 & 1))).to(gl.float32)
    # x of a tile as [G, 8, 4] (group, word, pair), from the stage (the producer loads it with the weights): a
    # lane's two words' four pairs are contiguous (two 16-byte loads), split below into the pairs m = 0..3 laid
    # out as Slice(0, L3)
    XL: gl.constexpr = _x_layout(G, 1)
    rr = gl.arange(0, HALF, layout=LR) + WID * RW
    s = 0
    ph = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        rows = (item // SPLIT) * BN + rr
        acc_a = gl.zeros([HALF, G, 8], gl.float32, L3)
        acc_b = gl.zeros([HALF, G, 8], gl.float32, L3)
        for kt in range(KTILES):
            mbarrier.wait(ready.index(s), ph)
            # the stage as (row, group, word): the same row-major bytes (no swizzle); a stage of GT groups is
            # consumed in NSUB steps of G (a wider stage is a longer contiguous TMA row, same registers per step)
            wbuf = _view(ring_w.index(s), [BN, GT, 8], W3)
            abuf = ring_a.index(s)
            xbuf = _view(ring_x.index(s), [GT, 8, 4], W3)
            qa, qb, am_a, am_b, nx = _load_step(wbuf, abuf, xbuf, WID * RW, HALF, 0, G, L3, LA, XL)
            if NSUB == 2:
                qa2, qb2, am_a2, am_b2, nx2 = _load_step(wbuf, abuf, xbuf, WID * RW, HALF, G, G, L3, LA, XL)
            mbarrier.arrive(empty.index(s), count=1)
            s += 1
            if s == STAGES:
                s = 0
                ph ^= 1
            acc_a, acc_b = _step(acc_a, acc_b, qa, qb, am_a, am_b, nx, lt, keep, z3, G, LX, ASM, READ_ONLY)
            if NSUB == 2:
                acc_a, acc_b = _step(acc_a, acc_b, qa2, qb2, am_a2, am_b2, nx2, lt, keep, z3, G, LX, ASM,
                                     READ_ONLY)
        res_a = gl.sum(gl.sum(acc_a, 2), 1)
        res_b = gl.sum(gl.sum(acc_b, 2), 1)
        if ATOMIC:
            gl.atomic_add(out_ptr + rows, res_a, mask=rows < N)
            gl.atomic_add(out_ptr + rows + HALF, res_b, mask=rows + HALF < N)
        else:
            gl.store(out_ptr + rows, res_a.to(out_ptr.dtype.element_ty), mask=rows < N)
            gl.store(out_ptr + rows + HALF, res_b.to(out_ptr.dtype.element_ty), mask=rows + HALF < N)


@gluon.jit
def gemv_tma_kernel(w_desc, a_desc, x_desc, pair_ptr, out_ptr, N, K, n_items, KTILES, SPLIT,
                    STAGES: gl.constexpr, W: gl.constexpr, CONS_REGS: gl.constexpr, ATOMIC: gl.constexpr,
                    DECLARE: gl.constexpr, BUILD: gl.constexpr, ASM: gl.constexpr, READ_ONLY: gl.constexpr = 0):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    G: gl.constexpr = w_desc.block_type.shape[1] // 8
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    gl.inline_asm_elementwise(DECLARE, "=r,r", [gl.zeros([32 * gl.num_warps()], gl.int32, L1)], dtype=gl.int32,
                              is_pure=False, pack=1)
    ring_w = gl.allocate_shared_memory(gl.int32, [STAGES, BN, G * 8], w_desc.layout)
    ring_a = gl.allocate_shared_memory(gl.float32, [STAGES, BN, G], a_desc.layout)
    ring_x = gl.allocate_shared_memory(gl.int32, [STAGES, G // 8, 256], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for si in gl.static_range(STAGES):
        mbarrier.init(ready.index(si), count=1)
        mbarrier.init(empty.index(si), count=W)  # every consumer warp releases each stage
    # the producer is the default partition; one partition per consumer warp (W == 4: eight were slower)
    gl.warp_specialize([
        (_producer, (w_desc, a_desc, x_desc, ring_w, ring_a, ring_x, ready, empty, n_items, KTILES, SPLIT, STAGES,
                      READ_ONLY == 2)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, pair_ptr, out_ptr, N, n_items, KTILES, SPLIT,
                     BN, G, STAGES, W, 0, ATOMIC, BUILD, ASM, READ_ONLY)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, pair_ptr, out_ptr, N, n_items, KTILES, SPLIT,
                     BN, G, STAGES, W, 1, ATOMIC, BUILD, ASM, READ_ONLY)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, pair_ptr, out_ptr, N, n_items, KTILES, SPLIT,
                     BN, G, STAGES, W, 2, ATOMIC, BUILD, ASM, READ_ONLY)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, pair_ptr, out_ptr, N, n_items, KTILES, SPLIT,
                     BN, G, STAGES, W, 3, ATOMIC, BUILD, ASM, READ_ONLY)),
    ], [1, 1, 1, 1], [CONS_REGS] * 4)


def allow_dynamic_shared(compiled) -> int:
    """Opt ``compiled`` into its dynamic shared memory beyond the 48 KB default: triton does so only when the
    dynamic part alone passes 48 KB, but the 32 KB static table counts against the same limit."""
    import ctypes

    compiled._init_handles()
    cuda = ctypes.CDLL("libcuda.so.1")
    # 8: MAX_DYNAMIC_SHARED_SIZE_BYTES; 9: PREFERRED_SHARED_MEMORY_CARVEOUT (percent): all of it, so that several
    # programs fit on an SM (the driver otherwise picks a carveout for one)
    for attr, value in ((8, compiled.metadata.shared), (9, 100)):
        rc = cuda.cuFuncSetAttribute(ctypes.c_void_p(compiled.function), attr, ctypes.c_int(value))
        if rc:
            raise RuntimeError(f"cuFuncSetAttribute({attr}) failed: {rc}")
    return compiled.metadata.shared


def cons_regs(maxnreg: int, W: int) -> int:
    """Registers per consumer thread: the program's pool (maxnreg for 4 + W warps) less the producer
    warpgroup's 24 per thread (setmaxnreg moves registers between warpgroups)."""
    return min(248, (maxnreg * (4 + W) - 24 * 4) // W // 8 * 8)


def _layouts():
    return (gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))


def plan(N: int, K: int, BN: int, KT: int, SPLIT: int, CTAS: int, sms: int, warps: int):
    """(n_items, KTILES, grid) or None where the config does not apply."""
    G = KT // 8
    if warps != 4 or (K // 8) % (KT * SPLIT) or BN < 2 * warps or N % BN or G not in (8, 16) or K % 512:
        return None
    n_items = (N // BN) * SPLIT
    # as many rounds of items as CTAS programs per SM need, spread over as few programs as give every program
    # that many or one fewer: no partial last round on most of the GPU
    rounds = -(-n_items // (CTAS * sms))
    return n_items, (K // 8) // (KT * SPLIT), -(-n_items // rounds)


def make_gemv(N, K, dtype, cfg, sms, device="cuda", read_only=0):
    """A call fn(x, packed, absmax) -> (1, N) for config (BN, KT, STAGES, CTAS, SPLIT, W), or None (W consumer
    warps)."""
    BN, KT, STAGES, CTAS, SPLIT, W = cfg
    p = plan(N, K, BN, KT, SPLIT, CTAS, sms, W)
    if p is None:
        return None
    n_items, ktiles, grid = p
    G = KT // 8
    wl, al = _layouts()
    pairs = pair256(dtype, device)
    build, asm = build_asm(W, pair256(dtype, "cpu").tolist()), gemv_asm(dtype)
    atomic = SPLIT > 1
    # registers for CTAS programs per SM: the producer warp is padded to a warpgroup (setmaxnreg works per
    # warpgroup) and gives most of its share back
    maxnreg = min(255, 65536 // (CTAS * 32 * (4 + W)) // 8 * 8)
    out = torch.zeros(1, N, dtype=torch.float32 if atomic else dtype, device=device)

    opened = []

    def call(x, packed, absmax):
        w_desc = TensorDescriptor.from_tensor(packed.view(torch.int32).reshape(N, K // 8), [BN, KT], wl)
        a_desc = TensorDescriptor.from_tensor(absmax.reshape(N, K // 64), [BN, G], al)
        if atomic:
            out.zero_()
        x_desc = TensorDescriptor.from_tensor(x.view(torch.int32).reshape(K // 512, 256), [G // 8, 256], al)
        args = (w_desc, a_desc, x_desc, pairs, out, N, K, n_items, ktiles, SPLIT)
        kw = dict(STAGES=STAGES, W=W, CONS_REGS=cons_regs(maxnreg, W), ATOMIC=atomic, DECLARE=declare_asm(),
                  BUILD=build, ASM=asm, READ_ONLY=read_only, num_warps=4, maxnreg=maxnreg)
        if not opened:  # the static table is beside triton's dynamic shared memory: allow both past 48 KB
            opened.append(allow_dynamic_shared(gemv_tma_kernel.warmup(*args, grid=(grid,), **kw)))
        gemv_tma_kernel[(grid,)](*args, **kw)
        return out.to(dtype) if atomic else out
    return call


MAXNREG = 0


def compile_only(cfg=(16, 64, 4, 3, 1, 4), dtype=torch.bfloat16):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    BN, KT, STAGES, CTAS, SPLIT, W = cfg
    G = KT // 8
    wl, al = _layouts()
    tn = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    sig = {"w_desc": f"tensordesc<i32[{BN}, {KT}],{wl!r}>", "a_desc": f"tensordesc<fp32[{BN}, {G}],{al!r}>",
           "x_desc": f"tensordesc<i32[{G // 8}, 256],{al!r}>", "pair_ptr": "*i32",
           "out_ptr": "*fp32" if SPLIT > 1 else f"*{tn}",
           "N": "i32", "K": "i32", "n_items": "i32", "KTILES": "i32", "SPLIT": "i32",
           "STAGES": "constexpr", "W": "constexpr", "CONS_REGS": "constexpr", "ATOMIC": "constexpr",
           "DECLARE": "constexpr", "BUILD": "constexpr", "ASM": "constexpr", "READ_ONLY": "constexpr"}
    regs = min(255, 65536 // (CTAS * 32 * (4 + W)) // 8 * 8)
    consts = {"READ_ONLY": 0, "STAGES": STAGES, "W": W, "CONS_REGS": cons_regs(regs, W), "DECLARE": declare_asm(),
              "ATOMIC": SPLIT > 1,
              "BUILD": build_asm(W, pair256(dtype, "cpu").tolist()),
              "ASM": gemv_asm(dtype)}
    # as a launch specializes them: 16-byte aligned pointers, N and K multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in (3, 4, 5, 6)}
    src = GluonASTSource(gemv_tma_kernel, sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": 4, "maxnreg": MAXNREG or regs}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    md = k.metadata
    print(f"cfg {cfg}: dynamic shared {md.shared} B (+ the 32 KB static table)")
    return k


CONFIGS = [(16, 64, 4, 3, 1, 4), (16, 64, 3, 4, 1, 4), (16, 128, 3, 3, 1, 4), (16, 128, 2, 3, 1, 4),
           (8, 128, 3, 4, 1, 4), (8, 128, 4, 3, 1, 4), (8, 64, 6, 4, 1, 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--configs", nargs="*", help="BN,KT,STAGES,CTAS,SPLIT,W (consumer warps)")
    ap.add_argument("--shapes", nargs="*", help="NxK")
    ap.add_argument("--read-only", action="store_true", help="also time the ring without the decode")
    ap.add_argument("--json")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    if args.compile_only:
        for cfg in configs:
            k = compile_only(cfg, dt)
            ptx = k.asm["ptx"]
            print("  PTX mma.sync:", ptx.count("mma.sync"), "ld.shared:", ptx.count("ld.shared"))
        return
    from benchutil import bnb_gemv_ms, gemv_case, report_row, sweep, timed_graph

    import halfbyte  # noqa: F401
    from halfbyte.kernels import gemm4bit
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        bnb = None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dt}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else
              [(18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072), (10240, 4096), (3072, 12288)])
    results = []
    for N, K in shapes:
        ws, x, check, row, nbytes, copies = gemv_case(N, K, dt)
        lib = lambda pa: gemm4bit.gemv(x, pa[0], pa[1], None, None, None, None, N, K, 64, "nf4")  # noqa: E731
        check("lib", lib(ws[0]))
        row["lib"] = timed_graph(lambda: [lib(pa) for pa in ws]) / copies
        if bnb is not None:
            row["bnb"] = bnb_gemv_ms(bnb, ws, x)

        def make(cfg):
            fn = make_gemv(N, K, dt, cfg, sms)
            return None if fn is None else (lambda pa: fn(x, pa[0], pa[1]))
        sweep(row, "tma", configs, make, check, ws, copies)
        if args.read_only:  # the same programs reading the ring without decoding: the memory side's floor
            for mode, name in ((1, "read"), (2, "read-w")):  # 2: without the absmax tiles
                def make_read(cfg, mode=mode):
                    fn = make_gemv(N, K, dt, cfg, sms, read_only=mode)
                    return None if fn is None else (lambda pa: fn(x, pa[0], pa[1]))
                sweep(row, name, configs, make_read, lambda name, out: None, ws, copies)
        if "bnb" in row and "tma" in row:
            print(f"   tma speed / bnb {row['bnb'] / row['tma']:.2f}x, lib / bnb {row['bnb'] / row['lib']:.2f}x")
        report_row(row, nbytes, results)
        ws = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
