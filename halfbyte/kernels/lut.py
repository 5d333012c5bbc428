"""Register-table decoding of 4-bit codes with PTX ``prmt`` (byte permute), for the 4-bit GEMV.

A 16-entry code table fits in registers byte-plane by byte-plane: plane b holds byte b of every entry's float32
bits in four 32-bit words (entries 0-3, 4-7, 8-11, 12-15). One ``prmt`` picks four bytes out of two words by
four 3-bit selectors, so four nibbles look up one byte plane in three ``prmt``s: entries 0-7, entries 8-15, then
a select on each nibble's top bit (the trick of llama.cpp's ``get_int_from_table_16``). A word of 8 packed
weights becomes 8 float32 values in ~30 integer instructions, against ~10 instructions per weight for loads from
a table in memory (two address computations and two loads per byte, BENCHMARKS.md "GEMV").

The number of byte planes sets the precision of the decoded codes:
* 2 planes (bytes 2-3): the code rounded to bfloat16, exact within bf16 activations' tolerance. bitsandbytes'
  own GEMV rounds its code table to the activation dtype too.
* 3 planes (bytes 1-3, byte 0 a copy of byte 1): 2^-16 relative, for fp16 activations.
* 4 planes: the float32 code exactly, for float32 activations.
``effective_codes`` gives the values each choice decodes to, so the interpreter path and the tests use the same
numbers as the hardware.

Nibble order: byte i of a little-endian word holds weights 2i (high nibble) and 2i+1 (low nibble), so the word's
selector nibbles 0..7 are weights 1, 0, 3, 2, 5, 4, 7, 6. The assembly returns weights 0..7 in order.
"""

import functools

import torch

_FIRST = 0x77777777  # prmt selectors without the sign-replicate bit
_TOP = 0x44444444


def _bits(code: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in code.to(torch.float32).view(torch.int32).tolist()]


def _effective_bits(code: torch.Tensor, planes: int) -> list[int]:
    """float32 bits of the 16 values a table of ``planes`` byte planes decodes to."""
    if planes not in (2, 3, 4):
        raise ValueError(f"lut: planes must be 2, 3 or 4, got {planes}")
    if code.numel() != 16:
        raise ValueError(f"lut: a 4-bit code table has 16 entries, got {code.numel()}")
    bits = _bits(code)
    if planes == 2:
        bf = code.to(torch.float32).to(torch.bfloat16).view(torch.int16).tolist()
        return [(int(v) & 0xFFFF) << 16 for v in bf]
    if planes == 3:
        # Keep the top 24 bits rounded to nearest (ties away; |code| <= 1 never overflows), then byte 0 = byte 1.
        out = []
        for b in bits:
            top = ((b + 0x80) & 0xFFFFFF00) if (b & 0x7F800000) != 0x7F800000 else (b & 0xFFFFFF00)
            out.append(top | ((top >> 8) & 0xFF))
        return out
    return bits


@functools.lru_cache(maxsize=None)
def effective_codes(code_values: tuple[float, ...], planes: int) -> tuple[float, ...]:
    """The 16 float32 values that ``decode_asm(code_values, planes)`` produces (as Python floats)."""
    bits = _effective_bits(torch.tensor(code_values, dtype=torch.float32), planes)
    return tuple(torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).tolist())


def _plane_words(bits: list[int], byte: int) -> list[int]:
    """Four 32-bit words: word r holds byte ``byte`` of entries 4r..4r+3 (entry 4r in its low byte)."""
    words = []
    for r in range(4):
        w = 0
        for j in range(4):
            w |= ((bits[4 * r + j] >> (8 * byte)) & 0xFF) << (8 * j)
        words.append(w)
    return words


@functools.lru_cache(maxsize=None)
def table_words(code_values: tuple[float, ...], planes: int) -> tuple[int, ...]:
    """The 4 * planes table words ``decode_asm(..., tables_in=True)`` takes as ``$9...`` (plane-major, as int32)."""
    bits = _effective_bits(torch.tensor(code_values, dtype=torch.float32), planes)
    words = [w for b in range(4 - planes, 4) for w in _plane_words(bits, b)]
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in words)


@functools.lru_cache(maxsize=None)
def decode_asm(code_values: tuple[float, ...], planes: int, tables_in: bool = False) -> str:
    """PTX for ``tl.inline_asm_elementwise`` with constraints ``decode_constraints(planes, tables_in)``: input
    ``$8`` a 32-bit word of 8 packed 4-bit codes, outputs ``$0..$7`` the float32 bits of weights 0..7
    (``effective_codes`` values). ``tables_in``: the table words come in as ``$9...`` (``table_words``), held in
    registers by the caller, instead of as immediates that ptxas re-materializes at every use."""
    bits = _effective_bits(torch.tensor(code_values, dtype=torch.float32), planes)
    used = list(range(4 - planes, 4))  # the byte planes read: the top ``planes`` bytes
    lines = ["{", ".reg .b32 %sa, %ca, %sb, %cb, %tlo, %thi;"]
    if not tables_in:
        lines.append(".reg .b32 " + ", ".join(f"%t{b}_{r}" for b in used for r in range(4)) + ";")
    lines.append(".reg .b32 " + ", ".join(f"%a{b}_{h}" for b in used for h in range(2)) + ";")
    lines.append(".reg .b32 %p0, %p1, %p2, %p3;")
    if not tables_in:
        for b in used:
            for r, w in enumerate(_plane_words(bits, b)):
                lines.append(f"mov.b32 %t{b}_{r}, 0x{w:08X};")
    lines += [f"and.b32 %sa, $8, 0x{_FIRST:08X};",
              "shr.u32 %ca, $8, 1;",
              f"and.b32 %ca, %ca, 0x{_TOP:08X};",
              "or.b32 %ca, %ca, 0x32103210;",  # selector i -> byte i of lo, or of hi when nibble i's top bit is set
              "shr.u32 %sb, %sa, 16;",
              "shr.u32 %cb, %ca, 16;"]
    for h, (s, c) in enumerate((("%sa", "%ca"), ("%sb", "%cb"))):
        for b in used:
            lines += [f"prmt.b32 %tlo, %t{b}_0, %t{b}_1, {s};",
                      f"prmt.b32 %thi, %t{b}_2, %t{b}_3, {s};",
                      f"prmt.b32 %a{b}_{h}, %tlo, %thi, {c};"]
    # a{b}_h byte j = byte b of the weight at selector nibble 4h+j, i.e. weights (1, 0, 3, 2) + 4h.
    for h in range(2):
        o = 4 * h
        for pair, (wl, wh), sel in ((0, (o + 1, o), 0x5140), (1, (o + 3, o + 2), 0x7362)):
            # bytes (low plane, high plane) of the first weight, then of the second
            if planes == 2:
                lines += [f"prmt.b32 %p{pair}, %a2_{h}, %a3_{h}, 0x{sel:04X};",
                          f"shl.b32 ${wl}, %p{pair}, 16;",
                          f"and.b32 ${wh}, %p{pair}, 0xFFFF0000;"]
            elif planes == 3:
                lines += [f"prmt.b32 %p{pair}, %a1_{h}, %a2_{h}, 0x{sel:04X};",
                          f"prmt.b32 ${wl}, %p{pair}, %a3_{h}, 0x{0x4100 + 0x2000 * pair:04X};",
                          f"prmt.b32 ${wh}, %p{pair}, %a3_{h}, 0x{0x5322 + 0x2000 * pair:04X};"]
            else:
                lines += [f"prmt.b32 %p{pair}, %a0_{h}, %a1_{h}, 0x{sel:04X};",
                          f"prmt.b32 %p{pair + 2}, %a2_{h}, %a3_{h}, 0x{sel:04X};",
                          f"prmt.b32 ${wl}, %p{pair}, %p{pair + 2}, 0x5410;",
                          f"prmt.b32 ${wh}, %p{pair}, %p{pair + 2}, 0x7632;"]
    lines.append("}")
    asm = "\n".join(lines)
    if tables_in:
        for i, (b, r) in enumerate((b, r) for b in used for r in range(4)):
            asm = asm.replace(f"%t{b}_{r},", f"${9 + i},")
    return asm


def decode_constraints(planes: int, tables_in: bool = False) -> str:
    """Constraint string of ``decode_asm``: 8 int32 outputs, the word, then the table words if ``tables_in``."""
    return ",".join(["=r"] * 8 + ["r"] * (1 + (4 * planes if tables_in else 0)))


def planes_for(dtype: torch.dtype) -> int:
    """Byte planes whose decoded codes stay within the GEMV's tolerance for activations of ``dtype``."""
    return {torch.bfloat16: 2, torch.float16: 3, torch.float32: 4}[dtype]


def _half_bits(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """16-bit patterns of the 16 codes rounded to ``dtype`` (bfloat16 or float16)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"lut: 16-bit pairs need bfloat16 or float16 codes, got {dtype}")
    return [int(v) & 0xFFFF for v in code.to(torch.float32).to(dtype).view(torch.int16).tolist()]


@functools.lru_cache(maxsize=None)
def pair_tables(code_values: tuple[float, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """8 words: the low-byte plane then the high-byte plane of the codes rounded to ``dtype`` (as uint32)."""
    halves = _half_bits(torch.tensor(code_values, dtype=torch.float32), dtype)
    return tuple(_plane_words(halves, 0) + _plane_words(halves, 1))


@functools.lru_cache(maxsize=None)
def byte_pairs(code_values: tuple[float, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """256 words: word e is the pair of codes packed in byte e, rounded to ``dtype`` -- the high nibble's (the
    even weight, bitsandbytes' order) in the low half, the low nibble's in the high half -- as uint32. One shared
    memory lookup per byte decodes two weights straight into a wgmma A-fragment register."""
    halves = _half_bits(torch.tensor(code_values, dtype=torch.float32), dtype)
    return tuple(halves[e >> 4] | (halves[e & 15] << 16) for e in range(256))


def pair_decode_lines(tables: tuple[int, ...] | tuple[str, ...], word: str, out: tuple[str, str, str, str],
                      tmp: str) -> list[str]:
    """PTX lines that decode the 8 codes of ``word`` into four packed 16-bit pairs ``out`` = (w0|w1<<16,
    w2|w3<<16, w4|w5<<16, w6|w7<<16) from ``pair_tables`` words: immediates, or the names of 8 registers that
    hold them (which spares ptxas re-materializing the constants at every use). ``tmp`` prefixes the scratch
    registers this declares (the caller's block must not declare them)."""
    s, c, s2, c2, lo, hi = (f"{tmp}{n}" for n in ("s", "c", "s2", "c2", "lo", "hi"))
    planes = [f"{tmp}p{b}_{h}" for b in range(2) for h in range(2)]
    if isinstance(tables[0], str):
        regs = list(tables)
        lines = [f".reg .b32 {s}, {c}, {s2}, {c2}, {lo}, {hi}, {', '.join(planes)};"]
    else:
        regs = [f"{tmp}t{i}" for i in range(8)]
        lines = [f".reg .b32 {s}, {c}, {s2}, {c2}, {lo}, {hi}, {', '.join(planes)}, {', '.join(regs)};"]
        lines += [f"mov.b32 {r}, 0x{w:08X};" for r, w in zip(regs, tables)]
    lines += [
             f"and.b32 {s}, {word}, 0x{_FIRST:08X};",
             f"shr.u32 {c}, {word}, 1;",
             f"and.b32 {c}, {c}, 0x{_TOP:08X};",
             f"or.b32 {c}, {c}, 0x32103210;",
             f"shr.u32 {s2}, {s}, 16;",
             f"shr.u32 {c2}, {c}, 16;"]
    for b in range(2):
        t = regs[4 * b:4 * b + 4]
        for h, (sel, top) in enumerate(((s, c), (s2, c2))):
            lines += [f"prmt.b32 {lo}, {t[0]}, {t[1]}, {sel};",
                      f"prmt.b32 {hi}, {t[2]}, {t[3]}, {sel};",
                      f"prmt.b32 {tmp}p{b}_{h}, {lo}, {hi}, {top};"]
    # p{b}_h byte j: byte b of the code at selector nibble 4h+j, i.e. of weights (1, 0, 3, 2) + 4h
    for k, o in enumerate(out):
        h, second = divmod(k, 2)
        lines.append(f"prmt.b32 {o}, {tmp}p0_{h}, {tmp}p1_{h}, {'0x6273' if second else '0x4051'};")
    return lines
