"""The PTX of ``kernels.lut.decode_asm``, run through a small emulator of the instructions it uses, decodes every
nibble of a word to ``effective_codes`` (CPU; the GPU tier checks the same assembly on the hardware through the
GEMV tests)."""

import random
import re

import pytest
import torch

from halfbyte.formats.codebooks import code_4bit
from halfbyte.kernels import lut

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = a | (b << 32)
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:  # sign-replicate mode: the assembly must never use it
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def emulate(asm: str, word: int, tables: tuple[int, ...] = ()) -> list[int]:
    """Runs ``asm`` (mov/and/or/shl/shr/prmt on .b32) with ``$8 = word`` and ``$9...`` = ``tables``; returns
    ``$0..$7``."""
    regs = {"$8": word, **{f"${9 + i}": t & M32 for i, t in enumerate(tables)}}

    def val(tok):
        tok = tok.strip()
        if tok.startswith("%") or tok.startswith("$"):
            return regs[tok]
        return int(tok, 0) & M32

    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        m = re.fullmatch(r"(\S+)\s+(.*);", line)
        assert m, line
        op, ops = m.group(1), [t.strip() for t in m.group(2).split(",")]
        d, src = ops[0], [val(t) for t in ops[1:]]
        if op == "mov.b32":
            r = src[0]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "or.b32":
            r = src[0] | src[1]
        elif op == "shl.b32":
            r = (src[0] << src[1]) & M32
        elif op == "shr.u32":
            r = src[0] >> src[1]
        elif op == "prmt.b32":
            assert all(((src[2] >> (4 * i)) & 8) == 0 for i in range(4)), f"sign mode in {line}"
            r = _prmt(*src)
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[d] = r
    return [regs[f"${i}"] for i in range(8)]


def _float_bits(values) -> list[int]:
    return [int(v) & M32 for v in torch.tensor(values, dtype=torch.float32).view(torch.int32).tolist()]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("planes", [2, 3, 4])
@pytest.mark.parametrize("tables_in", [False, True], ids=["immediate", "operands"])
def test_decode_asm_matches_effective_codes(quant_type, planes, tables_in):
    code = tuple(code_4bit(quant_type, torch.device("cpu")).tolist())
    asm = lut.decode_asm(code, planes, tables_in)
    tables = lut.table_words(code, planes) if tables_in else ()
    if tables_in:  # the operand form carries no constants: one assembly serves every code table
        assert asm == lut.decode_asm(tuple(code_4bit("nf4", torch.device("cpu")).tolist()), planes, True)
        assert "mov" not in asm and len(lut.decode_constraints(planes, True).split(",")) == 9 + 4 * planes
    want = _float_bits(lut.effective_codes(code, planes))
    rng = random.Random(planes)
    words = [sum(v << (4 * i) for i in range(8)) for v in range(16)]  # every code in every nibble
    words += [rng.getrandbits(32) for _ in range(200)]
    for word in words:
        got = emulate(asm, word, tables)
        # weight 2i is byte i's high nibble, weight 2i+1 its low nibble
        codes = [((word >> (8 * (j // 2))) >> (0 if j % 2 else 4)) & 15 for j in range(8)]
        assert got == [want[c] for c in codes], hex(word)


@pytest.mark.parametrize("planes", [2, 3, 4])
def test_effective_codes_precision(planes):
    """2 planes: the bf16 rounding of the code; 3 planes: within 2^-15 relative; 4 planes: exact."""
    code = code_4bit("nf4", torch.device("cpu"))
    eff = torch.tensor(lut.effective_codes(tuple(code.tolist()), planes))
    if planes == 2:
        assert torch.equal(eff, code.to(torch.bfloat16).float())
    elif planes == 3:
        assert ((eff - code).abs() <= 2.0**-15 * code.abs()).all()
        assert not torch.equal(eff, code)  # the low byte really is a copy, not the exact value
    else:
        assert torch.equal(eff, code)


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="planes"):
        lut.decode_asm(tuple(range(16)), 5)
    with pytest.raises(ValueError, match="16 entries"):
        lut.decode_asm(tuple(range(8)), 2)
