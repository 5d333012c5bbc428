"""The inline-assembly 4-bit decoders of ``halfbyte.kernels.lut`` (``prmt`` register tables, used by the GEMV and
the small-batch kernel on the GPU) run on the host through ``tests/ptx_emulator.py``: every byte value in every
position of a word decodes to the codes the kernels' contracts name (``effective_codes``, ``pair_tables``). On a
CPU the kernels' interpreter path computes without this assembly, so this is where CI checks it."""

import random

import pytest
import torch
from ptx_emulator import run_ptx

from halfbyte.formats.codebooks import code_4bit
from halfbyte.kernels import lut


def _words() -> list[int]:
    rnd = random.Random(0)
    words = [b << (8 * i) | rnd.getrandbits(32) & ~(0xFF << (8 * i)) for b in range(256) for i in range(4)]
    return words[::3] + [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF]


def _codes(word: int) -> list[int]:
    """The 8 code indices of a packed word in weight order (byte i: weight 2i in the high nibble)."""
    return [(word >> (8 * (k // 2) + (0 if k % 2 else 4))) & 15 for k in range(8)]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("planes", [2, 3, 4])
@pytest.mark.parametrize("tables_in", [False, True], ids=["immediates", "registers"])
def test_decode_asm_gives_the_effective_codes(qt, planes, tables_in):
    code = tuple(code_4bit(qt).tolist())
    want = [int(v) & 0xFFFFFFFF for v in torch.tensor(lut.effective_codes(code, planes), dtype=torch.float32)
            .view(torch.int32).tolist()]
    asm = lut.decode_asm(code, planes, tables_in)
    tables = {9 + i: w & 0xFFFFFFFF for i, w in enumerate(lut.table_words(code, planes))} if tables_in else {}
    for word in _words():
        ops = {8: word, **tables}
        run_ptx(asm, ops)
        assert [ops[k] for k in range(8)] == [want[q] for q in _codes(word)], hex(word)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tables_in", [False, True], ids=["immediates", "registers"])
def test_pair_decode_gives_16_bit_pairs(qt, dtype, tables_in):
    code = tuple(code_4bit(qt).tolist())
    tables = lut.pair_tables(code, dtype)
    halves = [int(v) & 0xFFFF for v in torch.tensor(code).to(dtype).view(torch.int16).tolist()]
    names = tuple(f"${5 + i}" for i in range(8)) if tables_in else tables
    asm = "\n".join(["{", *lut.pair_decode_lines(names, "$4", ("$0", "$1", "$2", "$3"), "%u"), "}"])
    for word in _words():
        ops = {4: word, **({5 + i: t for i, t in enumerate(tables)} if tables_in else {})}
        run_ptx(asm, ops)
        q = _codes(word)
        assert [ops[k] for k in range(4)] == [halves[q[2 * k]] | halves[q[2 * k + 1]] << 16 for k in range(4)]


def test_emulator_catches_a_wrong_selector():
    code = tuple(code_4bit("nf4").tolist())
    asm = "\n".join(["{", *lut.pair_decode_lines(lut.pair_tables(code, torch.bfloat16), "$4",
                                                 ("$0", "$1", "$2", "$3"), "%u"), "}"]).replace("0x4051", "0x4015")
    ops = {4: 0x01234567}
    run_ptx(asm, ops)
    halves = [int(v) & 0xFFFF for v in torch.tensor(code).to(torch.bfloat16).view(torch.int16).tolist()]
    q = _codes(0x01234567)
    assert ops[0] != halves[q[0]] | halves[q[1]] << 16
