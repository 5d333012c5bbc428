"""A 4-bit dequantize that reads whole 32-bit words and writes each word's 8 values with one 16-byte store,
against the tile kernel (``kernels.fourbit._dequant_kernel``). Its plain-triton variant ("words") became the
library's dequantize in session 29 (``kernels.fourbit._dequant_words_kernel``); the "library" column times
``fourbit.dequantize``, which now launches it, and "tile" the tile kernel.

    python bench/dequant_words.py [--check] [--json out.json]

Why: the dequantize is what keeps the NF4 step above bf16 (BENCHMARKS.md: ~6 % of an eager or compiled FLUX step),
and the library's kernel moves 2.5 B per value at ~2.4 TB/s where a copy reaches ~3.0. Its offline sm_90 SASS
(``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, then ``cuobjdump -sass``; session 11) shows byte loads of the
packed codes (8 ``LDG.E.U8`` per thread: the ``j < (n + 1) // 2`` mask hides the contiguity), the nibble interleave
done through shared memory (``STS``/``LDS.U16``, 5 barriers) and a shared-memory transpose before its 16-byte
stores. Here each thread owns whole words: word w holds elements 8w..8w+7, element k in byte k // 2, the high
nibble first (bitsandbytes' order), so the 8 values of a word are contiguous in the output. The numerics are the
library's: ``code[q]`` in float32 times the float32 absmax, rounded once.

Two variants. "words": plain triton, one table load per value. Offline SASS (1024 words, 4 warps): 8.75
instructions per value against 16 for the library's kernel (64 blocks, 4 warps); coalesced word loads and 16-byte
stores, but still a shared-memory conversion before the stores (triton computes in one layout and stores from
another), and one ``LDG`` with 64-bit address arithmetic per value for the code table. "prmt": each thread takes
4 consecutive words of one absmax block (one 16-byte load), builds the block's 16-entry table
``dtype(code[i] * absmax)`` in registers (16 float32 products rounded once, the library's numerics) in the layout
of ``lut.pair_tables``, decodes each word into 16-bit pairs with ``lut.pair_decode_lines`` (the GEMV's ``prmt``
decode) and stores the 8 values from the assembly block (no layout conversion). Offline SASS: 5.1 instructions per
value, no shared memory, 32 registers. Its PTX is also run on the host (``tests/ptx_emulator.py``), so ``--check``
verifies it bit for bit without a GPU (and failed when a table selector was mutated).

Timed on an H100 (session 12, BENCHMARKS.md): the library's kernel already takes 1.03-1.06x the time of a copy
moving the same bytes, so instruction counts never bound it; "words" is 2-5 % faster, "prmt" 1.75-1.9x slower (its
warps store 16 bytes per thread 64 bytes apart). Neither was adopted then. On an H200 (session 29) "words" took
0.84-0.93x the tile kernel's time, at a copy's speed (3.3 against 2.8 TB/s at 12288 x 3072), and was adopted.

Times: CUDA graph replays (ms, GPU only) at FLUX / T5 weight shapes, with the effective bandwidth (0.5 B read + 2 B
written per value + the absmax). Each variant's output must equal the library kernel's bit for bit. ``--check``
runs that comparison alone on tiny shapes (it also runs under ``TRITON_INTERPRET=1`` on a CPU).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ptx_emulator import run_ptx  # noqa: E402

import halfbyte  # noqa: E402, F401
from halfbyte.formats.codebooks import code_4bit  # noqa: E402
from halfbyte.kernels import fourbit, lut  # noqa: E402
from halfbyte.kernels.common import USE_PTX, round_to  # noqa: E402

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (10240, 4096)]
# (words per program, warps)
CONFIGS = [(512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8)]


@triton.jit
def _dequant_words_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_words, WORDS: tl.constexpr,
                          BLOCKSIZE: tl.constexpr, USE_PTX: tl.constexpr):
    """out (8 * n_words,) = code[q] * absmax[block] rounded once; packed read as n_words int32 words."""
    # (WORDS, 1) tiles, not (WORDS,): the word loads then share the store's layout (one thread, one word, its 8
    # values), where a 1-D load took a vectorized layout of its own and a shared-memory conversion to this one.
    w_idx = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)[:, None]
    live = w_idx < n_words
    w = tl.load(packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + w_idx, mask=live, other=0)
    am = tl.load(absmax_ptr + w_idx // (BLOCKSIZE // 8), mask=live, other=0.0)
    k = tl.arange(0, 8)[None, :]
    shift = (k // 2) * 8 + (1 - k % 2) * 4  # element k: byte k // 2 (little endian), high nibble for even k
    q = (w >> shift) & 15
    v = tl.load(code_ptr + q) * am
    tl.store(out_ptr + w_idx * 8 + k, round_to(v, out_ptr.dtype.element_ty, USE_PTX), mask=live)


# outputs: a dummy per word; inputs: the word, its absmax bits, its output address, whether it is live
PRMT_CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * 8 + ["l"] * 4 + ["r"] * 4)


def prmt_asm(code_values: tuple[float, ...], dtype: torch.dtype) -> str:
    """PTX for ``tl.inline_asm_elementwise(pack=4)`` over 4 consecutive words of one absmax block: words $4..$7
    (8 codes each), absmax bits $8 ($9..$11 copies), output addresses $12..$15 (16 bytes each), live flags
    $16..$19; $0..$3 dummies. The block's 16-entry table ``dtype(code[i] * absmax)`` (16 float32 products rounded
    once: the library's numerics) is built in registers as ``lut.pair_tables`` lays it out, each word is decoded
    by ``lut.pair_decode_lines`` (~2.75 instructions a value, no table load per value) and its 8 values are
    stored from the assembly (16 bytes), so triton has no tile to convert between layouts before storing."""
    cvt = {torch.bfloat16: "cvt.rn.bf16x2.f32", torch.float16: "cvt.rn.f16x2.f32"}[dtype]
    imm = [f"0f{v & 0xFFFFFFFF:08X}" for v in torch.tensor(code_values, dtype=torch.float32).view(torch.int32)
           .tolist()]
    lines = ["{", ".reg .f32 %am, " + ", ".join(f"%v{i}" for i in range(16)) + ";",
             ".reg .b32 " + ", ".join(f"%h{i}" for i in range(8)) + ", " + ", ".join(f"%t{i}" for i in range(8)) + ";",
             ".reg .b32 " + ", ".join(f"%o{j}_{p}" for j in range(4) for p in range(4)) + ";",
             ".reg .pred %live;", "mov.b32 %am, $8;"]
    lines += [f"mul.rn.f32 %v{i}, %am, {imm[i]};" for i in range(16)]
    lines += [f"{cvt} %h{i}, %v{2 * i + 1}, %v{2 * i};" for i in range(8)]  # entry 2i low half, 2i + 1 high
    for r in range(4):  # plane words: byte 0 (low bytes) of entries 4r..4r+3, then byte 1
        lines += [f"prmt.b32 %t{r}, %h{2 * r}, %h{2 * r + 1}, 0x6420;",
                  f"prmt.b32 %t{4 + r}, %h{2 * r}, %h{2 * r + 1}, 0x7531;"]
    for j in range(4):
        outs = tuple(f"%o{j}_{p}" for p in range(4))
        lines += lut.pair_decode_lines(tuple(f"%t{i}" for i in range(8)), f"${4 + j}", outs, f"%d{j}")
        lines += [f"setp.ne.u32 %live, ${16 + j}, 0;",
                  f"@%live st.global.v4.b32 [${12 + j}], {{{', '.join(outs)}}};", f"mov.b32 ${j}, 0;"]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _dequant_prmt_kernel(packed_ptr, absmax_ptr, out_ptr, n_words, WORDS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                         ASM: tl.constexpr, CONSTRAINTS: tl.constexpr):
    """16-bit out (8 * n_words,) from n_words int32 words; each thread's 4 consecutive words share an absmax."""
    w_idx = tl.program_id(0).to(tl.int64) * WORDS + tl.max_contiguous(tl.multiple_of(tl.arange(0, WORDS), 4), 4)
    live = w_idx < n_words
    w = tl.load(packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + w_idx, mask=live, other=0)
    am = tl.load(absmax_ptr + w_idx // (BLOCKSIZE // 8), mask=live, other=0.0).to(tl.int32, bitcast=True)
    addr = out_ptr.to(tl.int64, bitcast=True) + w_idx * 16
    tl.inline_asm_elementwise(ASM, CONSTRAINTS, [w, am, addr, live.to(tl.int32)], dtype=tl.int32, is_pure=False,
                              pack=4)


def emulate_prmt(packed: torch.Tensor, absmax: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequant_prmt``'s result, its PTX run on the host (``tests/ptx_emulator.py``): (n,) ``dtype``."""
    asm = prmt_asm(tuple(code_4bit("nf4").tolist()), dtype)
    words = [w & 0xFFFFFFFF for w in packed.view(torch.int32).tolist()]
    am = [a & 0xFFFFFFFF for a in absmax.view(torch.int32).tolist()]
    out = [0] * (n // 2)  # 32-bit pairs
    for g in range(0, n // 8, 4):  # one assembly call per 4 consecutive words
        ops = {4 + j: words[g + j] for j in range(4)}
        ops.update({8 + j: am[g // 8] for j in range(4)})
        ops.update({12 + j: 4 * (g + j) for j in range(4)})  # "address": index of the word's first pair
        ops.update({16 + j: 1 for j in range(4)})
        for addr, four in run_ptx(asm, ops):
            out[addr:addr + 4] = four
    t = torch.tensor([o - (1 << 32) if o >= 1 << 31 else o for o in out], dtype=torch.int32)
    return t.view(dtype)


def dequant_prmt(packed, absmax, n, dtype, words=1024, warps=4):
    """As ``dequant_words`` for NF4, 16-bit ``dtype``, through register tables (``prmt_asm``); CUDA only."""
    assert n % 64 == 0 and packed.data_ptr() % 16 == 0 and dtype in (torch.bfloat16, torch.float16)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    n_words = n // 8
    asm = prmt_asm(tuple(code_4bit("nf4").tolist()), dtype)
    _dequant_prmt_kernel[(triton.cdiv(n_words, words),)](packed, absmax, out, n_words, WORDS=words, BLOCKSIZE=64,
                                                         ASM=asm, CONSTRAINTS=PRMT_CONSTRAINTS, num_warps=warps)
    return out


def dequant_words(packed, absmax, code, n, dtype, words=1024, warps=4):
    """(n,) ``dtype`` from packed ((n+1)//2,) uint8 and absmax (n // 64,) float32, blocksize 64, n % 64 == 0."""
    assert n % 64 == 0 and packed.data_ptr() % 4 == 0
    out = torch.empty(n, dtype=dtype, device=packed.device)
    n_words = n // 8
    _dequant_words_kernel[(triton.cdiv(n_words, words),)](packed, absmax, code, out, n_words, WORDS=words,
                                                          BLOCKSIZE=64, USE_PTX=USE_PTX, num_warps=warps)
    return out


def case(N, K, device, dtype=torch.bfloat16):
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    packed, absmax = fourbit.quantize_4bit(w.reshape(-1), 64, "nf4")
    return packed, absmax, fourbit.code_table("nf4", torch.device(device))


def check(device) -> None:
    for N, K in ((16, 64), (24, 192), (5, 128)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            packed, absmax, code = case(N, K, device)
            want = fourbit.dequantize(packed, absmax, None, None, None, 64, "nf4", N * K, dtype)
            for words, warps in ((16, 1), (64, 2)):
                got = dequant_words(packed, absmax, code, N * K, dtype, words, warps)
                assert torch.equal(got.view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1),
                                   want.view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1)), \
                    (N, K, dtype, words)
            if device == "cpu" and dtype != torch.float32:  # the PTX run on the host
                got = emulate_prmt(packed.cpu(), absmax.cpu(), N * K, dtype)
                assert torch.equal(got.view(torch.int16), want.cpu().view(torch.int16)), ("prmt (host)", N, K, dtype)
            if device == "cuda" and dtype != torch.float32:  # inline PTX: no interpreter path
                for words, warps in ((128, 1), (256, 2)):  # 4 words per thread at least (pack=4)
                    got = dequant_prmt(packed, absmax, N * K, dtype, words, warps)
                    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), ("prmt", N, K, dtype, words)
    print("check: bit-identical to kernels.fourbit.dequantize (word kernel; register-table kernel "
          + ("on the GPU)" if device == "cuda" else "as its PTX run on the host)"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="only compare with the library kernel on tiny shapes")
    ap.add_argument("--json")
    a = ap.parse_args()
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    check(device)
    if a.check:
        return
    from benchutil import timed_graph

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for N, K in SHAPES:
        packed, absmax, code = case(N, K, device)
        n = N * K
        nbytes = n // 2 + n * 2 + 4 * (n // 64)
        lib = fourbit.dequantize(packed, absmax, None, None, None, 64, "nf4", n, torch.bfloat16)
        r = {"shape": f"{N}x{K}", "library": timed_graph(
            lambda: fourbit.dequantize(packed, absmax, None, None, None, 64, "nf4", n, torch.bfloat16), rep=200)}
        out, tile_rows = torch.empty_like(lib), fourbit._rows(64)
        r["tile"] = timed_graph(lambda: fourbit._dequant_kernel[(triton.cdiv(n // 64, tile_rows),)](
            packed, absmax, absmax, absmax, absmax, code, out, n, BLOCKSIZE=64, ROWS=tile_rows, NESTED=False,
            USE_PTX=USE_PTX, num_warps=4), rep=200)
        if not torch.equal(out.view(torch.int16), lib.view(torch.int16)):
            r["tile WRONG"] = True
        copy_src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=device)  # reads + writes nbytes in all
        copy_dst = torch.empty_like(copy_src)
        r["copy (same bytes)"] = timed_graph(lambda: copy_dst.copy_(copy_src), rep=200)
        for words, warps in CONFIGS:
            got = dequant_words(packed, absmax, code, n, torch.bfloat16, words, warps)
            name = f"words {words} w{warps}"
            r[name] = timed_graph(lambda words=words, warps=warps: dequant_words(
                packed, absmax, code, n, torch.bfloat16, words, warps), rep=200)
            if not torch.equal(got.view(torch.int16), lib.view(torch.int16)):
                r[name + " WRONG"] = True
        for words, warps in CONFIGS:
            got = dequant_prmt(packed, absmax, n, torch.bfloat16, words, warps)
            name = f"words prmt {words} w{warps}"
            r[name] = timed_graph(lambda words=words, warps=warps: dequant_prmt(
                packed, absmax, n, torch.bfloat16, words, warps), rep=200)
            if not torch.equal(got.view(torch.int16), lib.view(torch.int16)):
                r[name + " WRONG"] = True
        best = min((v, k) for k, v in r.items() if k.startswith("words") and isinstance(v, float))
        words_ = " ".join(f"{k}={v}" for k, v in r.items() if k.startswith("words"))
        print(f"{r['shape']}: library {r['library']:.4f} ms ({nbytes / r['library'] / 1e9:.2f} TB/s), tile kernel "
              f"{r['tile']:.4f} ms, a copy moving "
              f"the same {nbytes / 2 ** 20:.0f} MiB {r['copy (same bytes)']:.4f} ms, best word kernel {best[1]} "
              f"{best[0]:.4f} ms ({nbytes / best[0] / 1e9:.2f} TB/s); {words_}", flush=True)
        rows.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
