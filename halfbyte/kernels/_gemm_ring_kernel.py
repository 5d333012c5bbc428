"""The Gluon code of ``gemm_ring`` (imported only where triton has Gluon; the design is in that module's doc).

Shapes and names: the program computes out^T tiles, 128 weight rows (``pn``) x BT tokens (``pm``), in K steps of
64 (one absmax block per row). Two consumer warpgroups (WG 0 / 1) own 64 rows each; the loader partition fills the
STAGES-deep ring of (x tile, weight words, absmax) stages by TMA.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._gemm_ring_decode import decode_lut, decode_prmt, fill_lut, gather_words, lut_lanes, pair_tables

# triton 3.7+ renamed the TMA copies (3.9 raises on the old names) and the CTA barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _tile(t, tiles_m, tiles_n, GROUP_M: gl.constexpr):
    """Tile t's (m, n) tile indices, GROUP_M token tiles per group so that a group's weight tiles stay in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % per_group) % size_m, (t % per_group) // size_m


@gluon.jit
def _item(j, full_rounds, tiles_m, tiles_n, k_steps, S: gl.constexpr, GROUP_M: gl.constexpr):
    """The program's j-th work item: (m tile, n tile, first K step, end K step, piece or -1). Items below
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
def _fetch_absmax(pn, k, valid, am_ptr, nabs_ptr, k_steps, rows):
    """Double quantization: the uint8 absmax codes (as int32) and nested float32 absmax of weight rows
    ``pn * 128 + rows`` at K step k, or zeros where not ``valid``."""
    blk = (pn * 128 + rows) * k_steps + k
    ok = (rows >= 0) & valid
    q = gl.load(am_ptr + blk, mask=ok, other=0).to(gl.int32)
    return q, gl.load(nabs_ptr + blk // 256, mask=ok, other=0.0)


@gluon.jit
def _advance(fj, fpn, fk, fke, n_items, full_rounds, tiles_m, tiles_n, k_steps, S: gl.constexpr,
             GROUP_M: gl.constexpr):
    """The cursor (item fj, its n tile fpn, step fk, end fke) one K step on, in the order the loader runs them
    (an item's tile arithmetic only where an item starts; past the last item it stays on that item's tile)."""
    fk += 1
    if fk >= fke:
        fj += 1
        _pm, fpn, fk, fke, _piece = _item(gl.minimum(fj, n_items - 1), full_rounds, tiles_m, tiles_n, k_steps, S,
                                          GROUP_M)
    return fj, fpn, fk, fke


@gluon.jit
def _slot(i, STAGES: gl.constexpr):
    """(stage, phase) of ring step ``i`` (>= 0), in unsigned arithmetic: a signed ``i % STAGES`` and ``i // STAGES``
    cost four more (uniform) instructions each, several times per K step."""
    u = i.to(gl.uint32)
    return (u % STAGES).to(gl.int32), ((u // STAGES) & 1).to(gl.int32)


@gluon.jit
def _loader(x_desc, w_desc, a_desc, xs_desc, x_bufs, w_bufs, a_bufs, ready, empty, M, n_tiles, full_rounds, tiles_m,
            tiles_n, k_steps, am_ptr, nabs_ptr, ncode_ptr, off_ptr, S: gl.constexpr, STAGES: gl.constexpr,
            GROUP_M: gl.constexpr, NESTED: gl.constexpr):
    """The default partition (4 warps; one thread issues the TMA loads): the program's K steps, in order, into the
    ring. NESTED (double quantization): instead of the absmax's TMA load, the partition's 128 threads decode the
    stage's 128 rows' absmax, one each (``ncode[q] * nested + offset``, the product rounded: ``ops.decode_absmax``),
    into every column of the stage's float32 absmax (the consumers read column k % 4), then arrive on the stage's
    ready barrier beside the TMA's bytes. A step's codes and nested absmax are loaded three steps ahead, its nested
    code value two steps ahead, and its absmax computed before the stage frees: the loads' latency stays off the
    ring. (Float32 absmax loaded that way, by the threads, was 1.03-1.08x slower than by TMA: BENCHMARKS.md
    session 26.) The last token tile, where it holds fewer than BT tokens, comes in 64-row boxes (``xs_desc``):
    TMA fills the rows of a box past M slowly (at 257 tokens of a 512-token tiling a call took 1.3x as long,
    session 26), so boxes wholly past M re-read x's last 64 rows instead (in L2, inside x; their token columns
    are dropped at the store) and only the last box with tokens has rows past M, fewer than 64."""
    BT: gl.constexpr = x_desc.block_type.shape[0]
    XS: gl.constexpr = xs_desc.block_type.shape[0]
    if NESTED:
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        LA: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [4, 1], [1, 0])  # thread r: row r's 4 columns
        rows = gl.arange(0, 128, layout=gl.SliceLayout(1, LA))
        offset = gl.load(off_ptr)
        n_items = _n_items(full_rounds, n_tiles, S)
        fj = 0  # the fetch cursor, three steps ahead of the stage being filled
        _pm, fpn, fk, fke, _piece = _item(0, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        q0, s0 = _fetch_absmax(fpn, fk, fj < n_items, am_ptr, nabs_ptr, k_steps, rows)
        fj, fpn, fk, fke = _advance(fj, fpn, fk, fke, n_items, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        q1, s1 = _fetch_absmax(fpn, fk, fj < n_items, am_ptr, nabs_ptr, k_steps, rows)
        fj, fpn, fk, fke = _advance(fj, fpn, fk, fke, n_items, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        q2, s2 = _fetch_absmax(fpn, fk, fj < n_items, am_ptr, nabs_ptr, k_steps, rows)
        fj, fpn, fk, fke = _advance(fj, fpn, fk, fke, n_items, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        c0 = gl.load(ncode_ptr + q0)
        c1 = gl.load(ncode_ptr + q1)
    else:
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes + a_desc.block_type.nbytes
    i = 0
    for j in range(_n_items(full_rounds, n_tiles, S)):
        pm, pn, kb, ke, piece = _item(j, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
        for k in range(kb, ke):
            s, phase = _slot(i, STAGES)
            if NESTED:
                am = gl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [c0, s0], dtype=gl.float32,
                                               is_pure=True, pack=1) + offset
                q3, s3 = _fetch_absmax(fpn, fk, fj < n_items, am_ptr, nabs_ptr, k_steps, rows)
                fj, fpn, fk, fke = _advance(fj, fpn, fk, fke, n_items, full_rounds, tiles_m, tiles_n, k_steps, S,
                                            GROUP_M)
                c2 = gl.load(ncode_ptr + q2)
            mbarrier.wait(empty.index(s), phase ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            if pm * BT + BT <= M:
                _tma_load(x_desc, [pm * BT, k * 64], bar, x_bufs.index(s))
            else:
                last = gl.maximum(M - XS, 0)  # the last XS rows: a box inside x (M > XS where wanted)
                for q in gl.static_range(BT // XS):
                    past = (pm * BT + q * XS >= M).to(gl.int32)
                    r0 = pm * BT + q * XS + past * (last - pm * BT - q * XS)
                    _tma_load(xs_desc, [r0, k * 64], bar, x_bufs.index(s).slice(q * XS, XS, 0))
            _tma_load(w_desc, [pn * 128, k * 8], bar, w_bufs.index(s))
            if NESTED:
                a_bufs.index(s).store(gl.expand_dims(am, 1) + gl.zeros([128, 4], gl.float32, LA))
                _barrier()  # every thread's absmax is in the stage before the one arrival
                mbarrier.arrive(bar, count=1)
                c0, s0, c1, s1, q2, s2 = c1, s1, c2, s2, q3, s3
            else:
                # TMA's smallest box row is 16 bytes: the absmax of 4 steps, re-read at each of them
                _tma_load(a_desc, [pn * 128, (k // 4) * 4], bar, a_bufs.index(s))
            i += 1


@gluon.jit
def _frag(i, k, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG: gl.constexpr, STAGES: gl.constexpr,
          g_layout: gl.constexpr, am_layout: gl.constexpr, a_layout: gl.constexpr, DT: gl.constexpr,
          SMEM_LUT: gl.constexpr):
    """Step i's (the tile's K step k) A fragment of this warpgroup's 64 rows, decoded from the stage into DT: with
    SMEM_LUT by the byte table (t0-t1: ``lut_lanes``'s, g_layout its L3), else by the ``prmt`` pair tables t0-t7."""
    s, phase = _slot(i, STAGES)
    mbarrier.wait(ready.index(s), phase)
    a4 = a_bufs.index(s).slice(64 * WG, 64, 0).load(am_layout)
    col = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, am_layout)), 0)
    am = gl.sum(gl.where(col == (k & 3), a4, 0.0), axis=1)  # k >= 0: k % 4
    if SMEM_LUT:
        am = gl.convert_layout(am, gl.SliceLayout(1, gl.SliceLayout(2, g_layout)))
        return decode_lut(w_bufs.index(s), am, t0, t1, WG, g_layout, a_layout, DT)
    else:
        w = gather_words(w_bufs.index(s), WG, g_layout)
        am = gl.convert_layout(am, gl.SliceLayout(1, g_layout))
        return decode_prmt(w, t0, t1, t2, t3, t4, t5, t6, t7, am, a_layout, DT)


@gluon.jit
def _mainloop(i, kb, ke, acc, x_bufs, w_bufs, a_bufs, ready, empty, t0, t1, t2, t3, t4, t5, t6, t7,
              WG: gl.constexpr, STAGES: gl.constexpr, g_layout: gl.constexpr, am_layout: gl.constexpr,
              a_layout: gl.constexpr, SMEM_LUT: gl.constexpr):
    """acc += this warpgroup's rows of W[:, 64 kb: 64 ke] @ x^T from the stages i, i + 1, ...; ke - kb even."""
    DT: gl.constexpr = x_bufs.dtype  # the weight fragment's dtype: x's (bf16 or fp16)
    fa = _frag(i, kb, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES, g_layout, am_layout,
               a_layout, DT, SMEM_LUT)
    n = ke - kb
    # Two fragment variables: the decode of the next step must not write the registers a wgmma in flight reads
    # (with one, ptxas serialized every wgmma). Each wgmma retires before the next issues; the other warpgroup's
    # keep the tensor cores busy meanwhile. (Leaving one in flight while the next step decodes was no faster, with
    # either decode: BENCHMARKS.md, sessions 31 and 33.)
    for k in range(0, n - 2, 2):
        sa = _slot(i + k, STAGES)[0]
        acc = warpgroup_mma(fa, x_bufs.index(sa).permute((1, 0)), acc, is_async=True)
        fb = _frag(i + k + 1, kb + k + 1, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES,
                   g_layout, am_layout, a_layout, DT, SMEM_LUT)
        acc, fa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fa))
        mbarrier.arrive(empty.index(sa), count=1)
        sb = _slot(i + k + 1, STAGES)[0]
        acc = warpgroup_mma(fb, x_bufs.index(sb).permute((1, 0)), acc, is_async=True)
        fa = _frag(i + k + 2, kb + k + 2, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES,
                   g_layout, am_layout, a_layout, DT, SMEM_LUT)
        acc, fb = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fb))
        mbarrier.arrive(empty.index(sb), count=1)
    sa = _slot(i + n - 2, STAGES)[0]
    acc = warpgroup_mma(fa, x_bufs.index(sa).permute((1, 0)), acc, is_async=True)
    fb = _frag(i + n - 1, ke - 1, w_bufs, a_bufs, ready, t0, t1, t2, t3, t4, t5, t6, t7, WG, STAGES, g_layout,
               am_layout, a_layout, DT, SMEM_LUT)
    acc, fa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fa))
    mbarrier.arrive(empty.index(sa), count=1)
    sb = _slot(i + n - 1, STAGES)[0]
    acc = warpgroup_mma(fb, x_bufs.index(sb).permute((1, 0)), acc, is_async=True)
    acc, fb = warpgroup_mma_wait(num_outstanding=0, deps=(acc, fb))
    mbarrier.arrive(empty.index(sb), count=1)
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
    """out[m, n] = acc[n, m] through shared memory by TMA (rows past M are clipped), in boxes of ``out_desc``'s
    tokens (BT or BT / 2: half the shared memory, so that a 256-token ring keeps 4 stages beside the byte table);
    each box waits for the previous store to have left c_smem."""
    EPI: gl.constexpr = out_desc.block_type.shape[0]
    if EPI == BT:
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_smem.dtype).permute((1, 0)))
        fence_async_shared()
        _tma_store(out_desc, [pm * BT, pn * 128 + 64 * WG], c_smem)
    else:
        # the token halves: bit 7 of the token is a register bit of the wgmma layout, so the split moves nothing
        lo, hi = gl.split(acc.reshape([64, 2, EPI]).permute((0, 2, 1)))
        tma.store_wait(pendings=0)
        c_smem.store(lo.to(c_smem.dtype).permute((1, 0)))
        fence_async_shared()
        _tma_store(out_desc, [pm * BT, pn * 128 + 64 * WG], c_smem)
        tma.store_wait(pendings=0)
        c_smem.store(hi.to(c_smem.dtype).permute((1, 0)))
        fence_async_shared()
        _tma_store(out_desc, [pm * BT + EPI, pn * 128 + 64 * WG], c_smem)


@gluon.jit
def _fence(like):
    """fence.acq_rel.gpu in every thread (``like``: a tensor with one element per thread)."""
    return gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [like], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _store_piece(acc, piece, pm, pn, ws_ptr, cnt_ptr, out_ptr, bias_ptr, M, N, S: gl.constexpr, WG: gl.constexpr,
                 BT: gl.constexpr, mma_layout: gl.constexpr, HAS_BIAS: gl.constexpr):
    """A K range of a tail tile: the float32 partial sum to the workspace (per piece (BT, 128), token-major); the
    last of the tile's S pieces to arrive (a per-tile counter per warpgroup, acq_rel) adds the S partials in piece
    order -- the same bits whatever the arrival order -- CW tokens at a time (the S loads of a chunk in flight
    together), stores them, and resets the counter for the next call."""
    tile = piece // S
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, mma_layout))
    cols = gl.arange(0, BT, layout=gl.SliceLayout(0, mma_layout))
    offs = gl.expand_dims(cols, 0) * 128 + gl.expand_dims(rows, 1) + 64 * WG
    gl.store(ws_ptr + piece.to(gl.int64) * (128 * BT) + offs, acc)
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    _fence(gl.zeros([128], gl.int32, L1))
    _barrier()
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
            gl.store(out_ptr + tok.to(gl.int64) * N + pn * 128 + 64 * WG + n, part.to(out_ptr.dtype.element_ty),
                     mask=(tok < M) & (n >= 0))
        gl.store(cnt_ptr + tile * 2 + WG, 0)


@gluon.jit
def _consumer(x_bufs, w_bufs, a_bufs, ready, empty, c_smem, out_desc, out_ptr, bias_ptr, M, N, tab_ptr, ws_ptr,
              cnt_ptr, n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S: gl.constexpr, WG: gl.constexpr,
              BT: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, HAS_BIAS: gl.constexpr,
              SMEM_LUT: gl.constexpr):
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
    if SMEM_LUT:
        # [64 rows, 4 t, 8 words j]: lanes t (bits 0-1) and rows (bits 2-4), registers j and row + 8, warps row + 16,
        # + 32 (the rows of g_layout)
        L3: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 4, 8])
        t0, t1 = lut_lanes(L3)
        t2, t3, t4, t5, t6, t7 = t0, t0, t0, t0, t0, t0  # not read
        d_layout: gl.constexpr = L3
    else:
        t0, t1, t2, t3, t4, t5, t6, t7 = pair_tables(tab_ptr, gl.zeros([64, 8], gl.int32, g_layout))
        d_layout: gl.constexpr = g_layout
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
                        STAGES, d_layout, am_layout, a_layout, SMEM_LUT)
        i += ke - kb
        acc = _add_bias(acc, bias_ptr, pn, WG, mma_layout, HAS_BIAS)
        _store_tile(acc, c_smem, out_desc, pm, pn, WG, BT)
    if S > 1:
        if gl.program_id(0) < _tail(full_rounds, n_tiles, S):
            pm, pn, kb, ke, piece = _item(full_rounds, full_rounds, tiles_m, tiles_n, k_steps, S, GROUP_M)
            acc = gl.zeros((64, BT), dtype=gl.float32, layout=mma_layout)
            acc = _mainloop(i, kb, ke, acc, x_bufs, w_bufs, a_bufs, ready, empty, t0, t1, t2, t3, t4, t5, t6, t7,
                            WG, STAGES, d_layout, am_layout, a_layout, SMEM_LUT)
            _store_piece(acc, piece, pm, pn, ws_ptr, cnt_ptr, out_ptr, bias_ptr, M, N, S, WG, BT, mma_layout,
                         HAS_BIAS)
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["am_ptr", "nabs_ptr", "ncode_ptr", "off_ptr", "M", "N", "n_tiles", "full_rounds",
                              "tiles_m", "tiles_n", "k_steps"])
def gemm_ring_kernel(x_desc, w_desc, a_desc, out_desc, xs_desc, out_ptr, bias_ptr, tab_ptr, ws_ptr, cnt_ptr, am_ptr,
                     nabs_ptr, ncode_ptr, off_ptr, M, N, n_tiles, full_rounds, tiles_m, tiles_n, k_steps,
                     S: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONS_REGS: gl.constexpr,
                     HAS_BIAS: gl.constexpr, NESTED: gl.constexpr, SMEM_LUT: gl.constexpr):
    """``xs_desc``: x again, in (64, 64) boxes (for the last, partial token tile). NESTED: ``a_desc`` is not read
    (any float32 descriptor of its block shape); ``am_ptr`` (uint8, N K / 64), ``nabs_ptr`` (float32, one per 256
    blocks), ``ncode_ptr`` (256 float32) and ``off_ptr`` (one float32) are the double-quantized absmax (scalar
    loads: their alignment is not specialized). Without NESTED those four are not read."""
    BT: gl.constexpr = x_desc.block_type.shape[0]
    DT: gl.constexpr = x_desc.block_type.element_ty  # bf16 or fp16: x, the decoded weight and out
    x_bufs = gl.allocate_shared_memory(DT, [STAGES, BT, 64], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, 128, 8], w_desc.layout)
    a_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 128, 4], a_desc.layout)
    c_bufs = gl.allocate_shared_memory(DT, [2, out_desc.block_type.shape[0], 64], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=2 if NESTED else 1)  # NESTED: the loader's decode arrives too
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a stage
    if SMEM_LUT:
        fill_lut(tab_ptr + 8)
    # the loader is the default partition (4 warps): 12 warps
    gl.warp_specialize([
        (_loader, (x_desc, w_desc, a_desc, xs_desc, x_bufs, w_bufs, a_bufs, ready, empty, M, n_tiles, full_rounds,
                   tiles_m, tiles_n, k_steps, am_ptr, nabs_ptr, ncode_ptr, off_ptr, S, STAGES, GROUP_M, NESTED)),
        (_consumer, (x_bufs, w_bufs, a_bufs, ready, empty, c_bufs.index(0), out_desc, out_ptr, bias_ptr, M, N,
                     tab_ptr, ws_ptr, cnt_ptr, n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S, 0, BT, STAGES,
                     GROUP_M, HAS_BIAS, SMEM_LUT)),
        (_consumer, (x_bufs, w_bufs, a_bufs, ready, empty, c_bufs.index(1), out_desc, out_ptr, bias_ptr, M, N,
                     tab_ptr, ws_ptr, cnt_ptr, n_tiles, full_rounds, tiles_m, tiles_n, k_steps, S, 1, BT, STAGES,
                     GROUP_M, HAS_BIAS, SMEM_LUT)),
    ], [4, 4], [CONS_REGS, CONS_REGS])
