"""The fused 4-bit GEMM's two decodes of a K step's weight fragment (``gemm_ring``'s consumers; imported only where
triton has Gluon): the byte table in shared memory (``SMEM_LUT``) and the ``prmt`` register tables.

Both give each weight as DT(DT(code) * DT(absmax)) (DT: x's dtype), the same bits, in wgmma's A-fragment layout of
a warpgroup's 64 rows x 64 K: lane l holds rows r and r + 8 (r = 16 warp + (l >> 2)) at k = 16 c + 8 s + 2 (l & 3)
and the next k, which is byte 8 c + 4 s + (l & 3) of the row in bitsandbytes' order (high nibble first).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .lut import pair_decode_lines


def _word_asm(ty: str = "bf16") -> str:
    """$0..$3: the four ``ty`` (bf16 / f16) pairs of word $4's codes (weights 0-1, 2-3, 4-5, 6-7) times $13 (the
    absmax in ``ty``, in both halves); $5..$12 the ``lut.pair_tables`` words of the code in ``ty``."""
    lines = ["{", ".reg .b32 %o0, %o1, %o2, %o3;"]
    lines += pair_decode_lines(tuple(f"${5 + i}" for i in range(8)), "$4", ("%o0", "%o1", "%o2", "%o3"), "%u")
    lines += [f"mul.rn.{ty}x2 ${i}, %o{i}, $13;" for i in range(4)]
    lines.append("}")
    return "\n".join(lines)


_WORD_ASM = gl.constexpr(_word_asm())
_WORD_ASM_F16 = gl.constexpr(_word_asm("f16"))
_WORD_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 10))

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


# SMEM_LUT: the byte table (``lut.byte_pairs``: 256 entries, each copied for the 32 lanes, entry e's copy for lane l
# at 128 e + 4 l, so that every lane reads its own bank) in 32 KB of static shared memory, declared at function scope
# by the fill's one instance per thread, which the kernel runs before the partitions start: triton lays the
# partitions' code out after that, and PTX wants a name declared above its uses. (Gluon cannot hand an allocation's
# address to inline assembly.) Static shared memory comes before triton's dynamic allocation, whose 128-byte-swizzled
# TMA boxes need 1 KB alignment: the table's size must stay a multiple of 1 KB. $0-$1: the table's address; $2-$17
# the values of the 16 entries this thread fills (two per input tensor), 64 w + 8 s + 4 q + (lane >> 3) for value 2 +
# 2 s + q, each into the 16 bytes at its row + 16 (lane & 7) ($18: this thread's offset for s = q = 0).
def _fill_asm() -> str:
    lines = [".shared .align 16 .b8 hb_lut[32768];", "{", ".reg .b32 %a;", "mov.u32 %a, hb_lut;",
             "mov.u32 $0, %a;", "mov.u32 $1, %a;", "add.u32 %a, %a, $18;"]
    for s in range(8):
        for q in range(2):
            v = f"${2 + 2 * s + q}"
            lines.append(f"st.shared.v4.b32 [%a+{(8 * s + 4 * q) * 128}], {{{v}, {v}, {v}, {v}}};")
    lines.append("}")
    return "\n".join(lines)


_FILL_ASM = gl.constexpr(_fill_asm())
_FILL_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 2 + ["r"] * 18))


def _lookup_asm(ty: str) -> str:
    """$0: the pair of the byte of word $1 that rotating right by $2 brings to bits 7-14, looked up in the byte
    table (this lane's copy: + $3 = 4 lane), times $4 (the absmax in both halves)."""
    return "\n".join(["{", ".reg .b32 %a, %b, %v;", "shf.r.wrap.b32 %a, $1, $1, $2;", "and.b32 %a, %a, 0x7F80;",
                      "or.b32 %a, %a, $3;", "mov.u32 %b, hb_lut;", "add.u32 %a, %a, %b;",
                      "ld.shared.b32 %v, [%a];", f"mul.rn.{ty}x2 $0, %v, $4;", "}"])


_LOOKUP_ASM = gl.constexpr(_lookup_asm("bf16"))
_LOOKUP_ASM_F16 = gl.constexpr(_lookup_asm("f16"))


@gluon.jit
def pair_tables(tab_ptr, z):
    """The 8 ``lut.pair_tables`` words at ``tab_ptr``, each broadcast to ``z``'s shape and layout (operands of
    ``_WORD_ASM``, held in registers)."""
    return (z + gl.load(tab_ptr), z + gl.load(tab_ptr + 1), z + gl.load(tab_ptr + 2), z + gl.load(tab_ptr + 3),
            z + gl.load(tab_ptr + 4), z + gl.load(tab_ptr + 5), z + gl.load(tab_ptr + 6), z + gl.load(tab_ptr + 7))


@gluon.jit
def gather_words(wbuf, WG: gl.constexpr, g_layout: gl.constexpr):
    """This warpgroup's 64 rows of the stage's (128, 8) words in bitsandbytes' order, transposed on the way to
    registers: element (r, 2b + t) of the result (g_layout) holds byte b of the row's words 4t .. 4t + 3 (the 8
    codes one wgmma A-fragment lane needs). Each lane loads its rows' 8 words (the four lanes b of a row read the
    same 32 bytes) and picks its bytes with three prmt."""
    # [64 rows, 4 b, 2 t, 4 j] (word 4t + j): j, t and row + 8 in registers, b and rows on the lanes
    L4: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [8, 0, 0, 0]],
        lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[16, 0, 0, 0], [32, 0, 0, 0]], block_bases=[], shape=[64, 4, 2, 4])
    z4 = gl.zeros([64, 4, 2, 4], gl.int32, L4)
    rows = wbuf.reshape([128, 2, 4]).slice(64 * WG, 64, 0)
    words = gl.expand_dims(rows.load(gl.SliceLayout(1, L4)), 1) + z4
    b = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(b | ((b + 4) << 4), 0), 2), 3) + z4
    g = gl.inline_asm_elementwise(_GATHER_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [words, sel], dtype=gl.int32,
                                  is_pure=True, pack=4)
    g0, _ = gl.split(g.reshape([64, 4, 2, 2, 2]))  # j = 0 (the other three are zeros)
    g0, _ = gl.split(g0)
    return gl.convert_layout(g0.reshape([64, 8]), g_layout)


@gluon.jit
def fill_lut(tab_ptr):
    """Fills the byte table from the 256 ``lut.byte_pairs`` words at ``tab_ptr`` (4 warps: the kernel's before its
    partitions start, whose launch barrier then orders these stores before every lookup)."""
    # one register per row pair (row, row + 8) of a [64, 4]: the fill's one instance per thread
    LF: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[8, 0]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]], warp_bases=[[16, 0], [32, 0]],
        block_bases=[], shape=[64, 4])
    r = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(1, LF)), 1)
    lane = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LF)), 0) + 4 * (r & 7)
    w = (r >> 4) & 3
    e0 = 64 * w + 4 * ((r >> 3) & 1) + (lane >> 3)
    off = (64 * w + (lane >> 3)) * 128 + (lane & 7) * 16
    gl.inline_asm_elementwise(
        _FILL_ASM, _FILL_CONSTRAINTS,
        [gl.load(tab_ptr + e0), gl.load(tab_ptr + e0 + 8), gl.load(tab_ptr + e0 + 16), gl.load(tab_ptr + e0 + 24),
         gl.load(tab_ptr + e0 + 32), gl.load(tab_ptr + e0 + 40), gl.load(tab_ptr + e0 + 48),
         gl.load(tab_ptr + e0 + 56), off], dtype=gl.int32, is_pure=False, pack=2)


@gluon.jit
def lut_lanes(L3: gl.constexpr):
    """(4 lane, the rotation that brings byte lane & 3 of a word to bits 7-14), [64, 4] int32 in L3's rows and
    lanes (dims 0-1)."""
    S2: gl.constexpr = gl.SliceLayout(2, L3)
    r = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(1, S2)), 1)
    t = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, S2)), 0)
    lane4 = 4 * (t + 4 * (r & 7))
    return lane4, ((8 * t + 25) & 31) + gl.zeros_like(lane4)


@gluon.jit
def decode_lut(wbuf, am, lane4, rot, WG: gl.constexpr, L3: gl.constexpr, a_layout: gl.constexpr,
                DT: gl.constexpr):
    """The (64, 64) A fragment in DT of this warpgroup's 64 rows of the stage's (128, 8) words ``wbuf`` and the
    rows' absmax ``am`` (64,): lane l reads byte l & 3 of each of its rows' 8 words -- the pair of weights its
    fragment holds for k = 8 j + 2 (l & 3) -- and looks it up in the byte table (``fill_lut``; ``lut_lanes``
    gives ``lane4`` and ``rot``)."""
    z = gl.zeros([64, 4, 8], gl.int32, L3)
    words = gl.expand_dims(wbuf.slice(64 * WG, 64, 0).load(gl.SliceLayout(1, L3)), 1) + z
    h = am.to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    scale = gl.expand_dims(gl.expand_dims(h | (h << 16), 1), 2) + z
    if DT == gl.float16:
        asm: gl.constexpr = _LOOKUP_ASM_F16
    else:
        asm: gl.constexpr = _LOOKUP_ASM
    p = gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [words, gl.expand_dims(rot, 2) + z, gl.expand_dims(lane4, 2) + z,
                                  scale], dtype=gl.int32, is_pure=True, pack=1)
    # element (r, t, j) holds k = 16 c + 8 s + 2 t (+ 1 in the high half) with j = 2 c + s
    p = p.reshape([64, 4, 4, 2]).permute((0, 2, 3, 1))  # [64, c, s, t]
    lo = p.to(gl.int16).to(DT, bitcast=True)
    hi = (p >> 16).to(gl.int16).to(DT, bitcast=True)
    a = gl.join(lo, hi).reshape([64, 64])
    return gl.convert_layout(a, a_layout)

@gluon.jit
def decode_prmt(w, t0, t1, t2, t3, t4, t5, t6, t7, am, a_layout: gl.constexpr, DT: gl.constexpr):
    """The (64, 64) A fragment in DT (bf16 / fp16, x's dtype) of gathered words ``w`` (64, 8) and the rows' absmax
    ``am`` (64,): DT(DT(code) * DT(absmax)) per weight."""
    h = am.to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    scale = (h | (h << 16))[:, None] + gl.zeros_like(w)
    if DT == gl.float16:
        q0, q1, q2, q3 = gl.inline_asm_elementwise(_WORD_ASM_F16, _WORD_CONSTRAINTS,
                                                   [w, t0, t1, t2, t3, t4, t5, t6, t7, scale],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
    else:
        q0, q1, q2, q3 = gl.inline_asm_elementwise(_WORD_ASM, _WORD_CONSTRAINTS,
                                                   [w, t0, t1, t2, t3, t4, t5, t6, t7, scale],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
    # q_j of element (r, 2b + t) is the pair of original byte b + 4 (4t + j): pair column b + 4h + 8s0 + 16t
    # with j = h + 2 s0
    q = gl.join(gl.join(q0, q1), gl.join(q2, q3))  # [64, 8 (b, t), 2 (h), 2 (s0)]
    q = q.reshape([64, 4, 2, 2, 2]).permute((0, 2, 4, 3, 1)).reshape([64, 32])
    lo = q.to(gl.int16).to(DT, bitcast=True)
    hi = (q >> 16).to(gl.int16).to(DT, bitcast=True)
    a = gl.join(lo, hi).reshape([64, 64])
    return gl.convert_layout(a, a_layout)
