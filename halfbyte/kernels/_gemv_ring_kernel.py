"""The Gluon code of ``gemv_ring`` (imported only where triton has Gluon; the design is in that module's doc)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

# triton 3.7+ renamed the TMA load (3.9 raises on the old name) and made the shared-memory reinterpretation public
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_NEW_VIEW = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
# ... and renamed the CTA barrier (within a warp-specialized partition: that partition's warps only)
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


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
          ASM: gl.constexpr, MODE: gl.constexpr):
    """x split into its pairs m = 0..3 (laid out as the words), then the lookups and mmas of ``ASM``; the kept
    diagonal entries, times the absmax, are added to the accumulators."""
    lo, hi = gl.split(nx.reshape([G, 8, 2, 2]))
    x0, x2 = gl.split(lo)
    x1, x3 = gl.split(hi)
    x0 = gl.expand_dims(gl.convert_layout(x0, LX), 0) + z3
    x1 = gl.expand_dims(gl.convert_layout(x1, LX), 0) + z3
    x2 = gl.expand_dims(gl.convert_layout(x2, LX), 0) + z3
    x3 = gl.expand_dims(gl.convert_layout(x3, LX), 0) + z3
    if MODE != 0:  # (bench: the memory side alone: the stage is read, nothing decoded)
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
def _fetch_absmax(am_ptr, nabs_ptr, j, total, KTILES, BN: gl.constexpr, G: gl.constexpr, LQ: gl.constexpr):
    """Double quantization: the uint8 absmax (as int32) and nested float32 absmax of the program's ``j``-th
    (row tile, K tile), as (row, group) in LQ; zeros past its last."""
    item = gl.program_id(0) + (j // KTILES) * gl.num_programs(0)
    kt = j % KTILES
    r = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LQ)), 1)
    g = gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(0, LQ)), 0)
    blk = (item * BN + r) * (KTILES * G) + kt * G + g
    ok = (blk >= 0) & (j < total)
    q = gl.load(am_ptr + blk, mask=ok, other=0).to(gl.int32)
    return q, gl.load(nabs_ptr + blk // 256, mask=ok, other=0.0)


@gluon.jit
def _producer(w_desc, a_desc, x_desc, ring_w, ring_a, ring_x, ready, empty, n_items, KTILES, am_ptr, nabs_ptr,
              ncode_ptr, off_ptr, STAGES: gl.constexpr, NESTED: gl.constexpr, CODE: gl.constexpr,
              DECODE: gl.constexpr, MODE: gl.constexpr):
    """The default partition (4 warps; one thread issues the TMA loads): the program's (row tile, K tile)s, in
    order, into the ring.
    NESTED (double quantization; the absmax rows of a tile, 8 or 16 bytes, are under TMA's 16-byte minimum):
    the partition's 128 threads decode each tile's absmax themselves, one per thread, into the stage's float32
    absmax (``ncode[q] * nested + offset``, the nested code in shared memory), then arrive on the stage's ready
    barrier beside the TMA's bytes. A tile's uint8 and nested absmax are loaded into registers two tiles ahead
    (loads from the memory the ring keeps busy take microseconds; four ahead measured no faster)."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    G: gl.constexpr = w_desc.block_type.shape[1] // 8
    if NESTED:
        LC: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])
        ci = gl.arange(0, 256, layout=LC)
        gl.inline_asm_elementwise(CODE, "=r,r,f", [ci, gl.load(ncode_ptr + ci)], dtype=gl.int32, is_pure=False,
                                  pack=1)
        _barrier()  # the table is whole before any decode (the decode's assembly is not pure: it stays below)
        offset = gl.load(off_ptr)
        LQ: gl.constexpr = gl.BlockedLayout([1, 1], [32 // G, G], [4, 1], [1, 0])
        total = gl.cdiv(n_items - gl.program_id(0), gl.num_programs(0)) * KTILES
        q0, s0 = _fetch_absmax(am_ptr, nabs_ptr, 0, total, KTILES, BN, G, LQ)
        q1, s1 = _fetch_absmax(am_ptr, nabs_ptr, 1, total, KTILES, BN, G, LQ)
    s = 0
    ph = 0
    j = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        row0 = item * BN
        for kt in range(KTILES):
            mbarrier.wait(empty.index(s), ph ^ 1)
            bar = ready.index(s)
            if MODE == 4:  # (bench: no load at all: the stage is declared full)
                mbarrier.arrive(bar, count=1)
            elif MODE >= 2:  # (bench: the weight stream alone)
                mbarrier.expect(bar, w_desc.block_type.nbytes)
                _tma_load(w_desc, [row0, kt * G * 8], bar, ring_w.index(s))
            elif NESTED:
                mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes)
                _tma_load(w_desc, [row0, kt * G * 8], bar, ring_w.index(s))
                _tma_load(x_desc, [kt * G // 8, 0], bar, ring_x.index(s))
                q2, s2 = _fetch_absmax(am_ptr, nabs_ptr, j + 2, total, KTILES, BN, G, LQ)
                am = gl.inline_asm_elementwise(DECODE, "=f,r,f,f", [q0, s0, offset + gl.zeros_like(s0)],
                                               dtype=gl.float32, is_pure=False, pack=1)
                ring_a.index(s).store(am)
                _barrier()  # every thread's absmax is in the stage before the one arrival
                mbarrier.arrive(bar, count=1)
                q0, s0, q1, s1 = q1, s1, q2, s2
            else:
                mbarrier.expect(bar, w_desc.block_type.nbytes + a_desc.block_type.nbytes + x_desc.block_type.nbytes)
                _tma_load(w_desc, [row0, kt * G * 8], bar, ring_w.index(s))
                _tma_load(a_desc, [row0, kt * G], bar, ring_a.index(s))
                _tma_load(x_desc, [kt * G // 8, 0], bar, ring_x.index(s))
            j += 1
            s += 1
            if s == STAGES:
                s = 0
                ph ^= 1


@gluon.jit
def _consumer(ring_w, ring_a, ring_x, ready, empty, out_ptr, bias_ptr, N, n_items, KTILES,
              BN: gl.constexpr, GT: gl.constexpr, STAGES: gl.constexpr, W: gl.constexpr, WID: gl.constexpr,
              HAS_BIAS: gl.constexpr, BUILD: gl.constexpr, ASM: gl.constexpr, MODE: gl.constexpr):
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
    if MODE >= 3:  # (bench: no table)
        tok = gl.zeros([32], gl.int32, L1)
    else:
        tok = gl.inline_asm_elementwise(BUILD, "=r,r", [gl.zeros([32], gl.int32, L1)], dtype=gl.int32,
                                        is_pure=False, pack=1)
    after_build = gl.max(tok, 0)  # 0, but opaque: the lookups depend on it, so they follow the build
    z3 = gl.zeros([HALF, G, 8], gl.int32, L3)
    lane = _lane_id(z3)
    lt = ((lane & 31) << 2) | after_build
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
        rows = item * BN + rr
        acc_a = gl.zeros([HALF, G, 8], gl.float32, L3)
        acc_b = gl.zeros([HALF, G, 8], gl.float32, L3)
        for kt in range(KTILES):
            mbarrier.wait(ready.index(s), ph)
            # the stage as (row, group, word): the same row-major bytes (no swizzle); a stage of GT groups is
            # consumed in NSUB steps of G (a wider stage is a longer contiguous TMA row, same registers per step)
            if MODE != 5:  # (MODE 5, bench: the stage is released unread: the weight stream through the ring alone)
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
            if MODE != 5:
                acc_a, acc_b = _step(acc_a, acc_b, qa, qb, am_a, am_b, nx, lt, keep, z3, G, LX, ASM, MODE)
                if NSUB == 2:
                    acc_a, acc_b = _step(acc_a, acc_b, qa2, qb2, am_a2, am_b2, nx2, lt, keep, z3, G, LX, ASM,
                                         MODE)
        res_a = gl.sum(gl.sum(acc_a, 2), 1)
        res_b = gl.sum(gl.sum(acc_b, 2), 1)
        if HAS_BIAS:
            res_a += gl.load(bias_ptr + rows).to(gl.float32)
            res_b += gl.load(bias_ptr + rows + HALF).to(gl.float32)
        gl.store(out_ptr + rows, res_a.to(out_ptr.dtype.element_ty))
        gl.store(out_ptr + rows + HALF, res_b.to(out_ptr.dtype.element_ty))


@gluon.jit
def gemv_ring_kernel(out_ptr, bias_ptr, am_ptr, nabs_ptr, ncode_ptr, off_ptr, w_desc, a_desc, x_desc, N, n_items,
                     KTILES, STAGES: gl.constexpr, CONS_REGS: gl.constexpr, HAS_BIAS: gl.constexpr,
                     DECLARE: gl.constexpr, BUILD: gl.constexpr, ASM: gl.constexpr, NESTED: gl.constexpr = False,
                     CODE: gl.constexpr = "", DECODE: gl.constexpr = "", MODE: gl.constexpr = 0):
    """out (1, N) = x @ W^T (+ bias): W's packed words (N, K / 8) int32 and float32 absmax (N, K / 64) and x
    (K / 512, 256) int32 as TMA descriptors of (BN, KT), (BN, KT / 8) and (KT / 64, 256) blocks; N % BN == 0.
    NESTED: double-quantized absmax instead: uint8 ``am_ptr`` (N * K / 64), nested float32 ``nabs_ptr`` (one per
    256 blocks), the nested code ``ncode_ptr`` (256 float32) and ``off_ptr`` (one float32); ``a_desc`` is then
    not read (any float32 descriptor of the block shape). Without NESTED those four are not read.
    MODE (bench only): 1 skips the decode, 2 also the absmax and x loads, 3 also the table build, 4 also the
    weight loads (the stages are declared full); 5 loads the weights as 3 does, and the consumers release each stage
    without reading it (no table is declared either)."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    G: gl.constexpr = w_desc.block_type.shape[1] // 8
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    if MODE != 5:  # (MODE 5 reads no table: without its 32 KB, deeper rings fit, to see what bytes in flight buy)
        gl.inline_asm_elementwise(DECLARE, "=r,r", [gl.zeros([32 * gl.num_warps()], gl.int32, L1)],
                                  dtype=gl.int32, is_pure=False, pack=1)
    ring_w = gl.allocate_shared_memory(gl.int32, [STAGES, BN, G * 8], w_desc.layout)
    ring_a = gl.allocate_shared_memory(gl.float32, [STAGES, BN, G], a_desc.layout)
    ring_x = gl.allocate_shared_memory(gl.int32, [STAGES, G // 8, 256], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for si in gl.static_range(STAGES):
        mbarrier.init(ready.index(si), count=2 if NESTED else 1)  # NESTED: the producer's decode arrives too
        mbarrier.init(empty.index(si), count=4)  # every consumer warp releases each stage
    # the producer is the default partition; one partition per consumer warp
    gl.warp_specialize([
        (_producer, (w_desc, a_desc, x_desc, ring_w, ring_a, ring_x, ready, empty, n_items, KTILES, am_ptr, nabs_ptr,
                      ncode_ptr, off_ptr, STAGES, NESTED, CODE, DECODE, MODE)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, out_ptr, bias_ptr, N, n_items, KTILES, BN, G, STAGES, 4,
                     0, HAS_BIAS, BUILD, ASM, MODE)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, out_ptr, bias_ptr, N, n_items, KTILES, BN, G, STAGES, 4,
                     1, HAS_BIAS, BUILD, ASM, MODE)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, out_ptr, bias_ptr, N, n_items, KTILES, BN, G, STAGES, 4,
                     2, HAS_BIAS, BUILD, ASM, MODE)),
        (_consumer, (ring_w, ring_a, ring_x, ready, empty, out_ptr, bias_ptr, N, n_items, KTILES, BN, G, STAGES, 4,
                     3, HAS_BIAS, BUILD, ASM, MODE)),
    ], [1, 1, 1, 1], [CONS_REGS] * 4)
