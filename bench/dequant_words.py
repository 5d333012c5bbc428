"""Exploratory: a 4-bit dequantize that reads whole 32-bit words and writes each word's 8 values with one
16-byte store, against the library's kernel (``kernels.fourbit._dequant_kernel``). Not library code.

    python bench/dequant_words.py [--check] [--json out.json]

Why: the dequantize is what keeps the NF4 step above bf16 (BENCHMARKS.md: ~6 % of an eager or compiled FLUX step),
and the library's kernel moves 2.5 B per value at ~2.4 TB/s where a copy reaches ~3.0. Its offline sm_90 SASS
(``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, then ``cuobjdump -sass``; session 11) shows byte loads of the
packed codes (8 ``LDG.E.U8`` per thread: the ``j < (n + 1) // 2`` mask hides the contiguity), the nibble interleave
done through shared memory (``STS``/``LDS.U16``, 5 barriers) and a shared-memory transpose before its 16-byte
stores. Here each thread owns whole words: word w holds elements 8w..8w+7, element k in byte k // 2, the high
nibble first (bitsandbytes' order), so the 8 values of a word are contiguous in the output. The numerics are the
library's: ``code[q]`` in float32 times the float32 absmax, rounded once.

Offline SASS of this kernel (1024 words, 4 warps): 8.75 instructions per value against 16 for the library's (64
blocks, 4 warps), coalesced 32-bit word loads and 16-byte stores, but still a shared-memory conversion before the
stores (triton computes in a layout with one word per thread along the rows, stores from another) and one
``LDG`` + 64-bit address arithmetic per value for the code table. Not measured on a GPU yet.

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

import halfbyte  # noqa: E402, F401
from halfbyte.kernels import fourbit  # noqa: E402
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
    print("check: bit-identical to kernels.fourbit.dequantize")


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
        best = min((v, k) for k, v in r.items() if k.startswith("words") and isinstance(v, float))
        words_ = " ".join(f"{k}={v}" for k, v in r.items() if k.startswith("words"))
        print(f"{r['shape']}: library {r['library']:.4f} ms ({nbytes / r['library'] / 1e9:.2f} TB/s), a copy moving "
              f"the same {nbytes / 2 ** 20:.0f} MiB {r['copy (same bytes)']:.4f} ms, best word kernel {best[1]} "
              f"{best[0]:.4f} ms ({nbytes / best[0] / 1e9:.2f} TB/s); {words_}", flush=True)
        rows.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
