"""Exploratory: how fast can a kernel merely *read* a 4-bit weight on this GPU, tiled as the GEMV tiles it?
Graph replay, weight copies cycled past the L2, as bench/gemv_lut.py. Sets the ceiling the GEMV variants are
measured against: if reading alone is slow at a tiling, no decoding trick will make that tiling fast.

    python bench/gemv_read.py
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import timed_graph  # noqa: E402

L2_BYTES = 50 * 2**20


@triton.jit
def _read_tiles(w_ptr, out_ptr, N, KW: tl.constexpr, BLOCK_N: tl.constexpr, WPS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.where(rows < N, rows, 0)
    acc = tl.zeros((BLOCK_N, WPS), tl.int32)
    for i in range(KW // WPS):
        acc ^= tl.load(w_ptr + rows_c[:, None] * KW + i * WPS + tl.arange(0, WPS)[None, :],
                       eviction_policy="evict_first")
    tl.store(out_ptr + rows, tl.xor_sum(acc, axis=1), mask=rows < N)


@triton.jit
def _read_flat(w_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0) * (BLOCK * ITERS)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(ITERS):
        off = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + off, mask=off < n, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def main():
    print(torch.cuda.get_device_name())
    for N, K in ((18432, 3072), (12288, 3072), (3072, 12288)):
        KW = K // 8
        nbytes = N * K // 2
        copies = max(2, -(-3 * L2_BYTES // nbytes))
        ws = [torch.randint(-2**31, 2**31 - 1, (N, KW), dtype=torch.int32, device="cuda") for _ in range(copies)]
        out = torch.empty(N, dtype=torch.int32, device="cuda")
        cells = []
        for bn, wps, warps in ((8, 128, 4), (16, 128, 4), (32, 128, 8), (8, 256, 4), (4, 128, 2), (64, 64, 8),
                               (16, 256, 8), (2, 256, 2)):
            if KW % wps:
                continue
            ms = timed_graph(lambda: [_read_tiles[(triton.cdiv(N, bn),)](w, out, N, KW, BLOCK_N=bn, WPS=wps,
                                                                         num_warps=warps) for w in ws]) / copies
            cells.append(f"tiles {bn}x{wps}w/{warps}: {ms * 1e3:.1f}us {nbytes / ms / 1e9:.2f}TB/s")
        n = N * KW
        for block, iters, warps in ((1024, 8, 4), (2048, 8, 8), (4096, 4, 8), (1024, 32, 4)):
            grid = triton.cdiv(n, block * iters)
            o = torch.empty(grid, dtype=torch.int32, device="cuda")
            ms = timed_graph(lambda: [_read_flat[(grid,)](w, o, n, BLOCK=block, ITERS=iters, num_warps=warps)
                                      for w in ws]) / copies
            cells.append(f"flat {block}x{iters}/{warps}: {ms * 1e3:.1f}us {nbytes / ms / 1e9:.2f}TB/s")
        ms = timed_graph(lambda: [w.view(torch.uint8).clone() for w in ws]) / copies
        cells.append(f"clone (read+write): {ms * 1e3:.1f}us {2 * nbytes / ms / 1e9:.2f}TB/s")
        print(f"{N}x{K} ({nbytes / 1e6:.1f} MB, {copies} copies):\n  " + "\n  ".join(cells))


if __name__ == "__main__":
    main()
