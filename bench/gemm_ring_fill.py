"""The fused 4-bit GEMM at token counts that fill the last 256-token tile partly: same tiles, same schedule, so
the same work for the tensor cores; does the time follow the tile count? For each width and M, ms (CUDA graph
replay): the kernel at M tokens; with x's descriptors covering the whole last tile (x allocated with the padded
row count, out still M rows: no TMA box reaches past x, so no out-of-bounds fill); at the padded token count;
dequantize + cuBLAS at M. (Session 26 found the out-of-bounds fill slow; the kernel now reads a partial last tile
in 64-row boxes, and the first two columns should agree.)

    python bench/gemm_ring_fill.py
"""

import sys
from pathlib import Path

import torch
from benchutil import timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402
from halfbyte.kernels import fourbit, gemm_ring  # noqa: E402


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| N x K | M | fused | x desc padded | at padded M | deq + cuBLAS |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for N, K in ((10240, 4096), (12288, 3072)):
            lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
            q = halfbyte.Linear4bit.from_linear(lin, quant_type="nf4")
            data, (absmax, *stats) = q.weight.reshape(-1), q.quant_stats()
            bias = lin.bias.detach()
            g = gemm_ring.RingGemm(data, absmax, N, K, "nf4")
            for M in (257, 300, 384, 448, 512, 600, 768):
                P = -(-M // gemm_ring.BT) * gemm_ring.BT
                xp = torch.randn(P, K, device="cuda", dtype=torch.bfloat16)
                x = xp[:M]
                out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                t = timed_graph(lambda: g(x, bias))  # noqa: B023
                ref = g(x, bias)
                # x's descriptors over P rows (its rows past M are real memory), out's over M: the launch kept for
                # this call is rebuilt with them
                g._io_desc = lambda ptr, m, cols, rows, x=x, P=P: gemm_ring.RingGemm._io_desc(  # noqa: B023
                    g, ptr, P if ptr == x.data_ptr() and cols == K else m, cols, rows)
                g._calls.clear()
                t_pad = timed_graph(lambda: g.run(torch.cuda.current_stream().cuda_stream,  # noqa: B023
                                                  x.data_ptr(), out.data_ptr(), bias.data_ptr(), M))  # noqa: B023
                same = torch.equal(out, ref)
                del g._io_desc
                g._calls.clear()
                t_full = timed_graph(lambda: g(xp, bias))  # noqa: B023
                t_dc = timed_graph(lambda: torch.nn.functional.linear(  # noqa: B023
                    x, fourbit.dequantize(data, absmax, *stats, 64, "nf4", N * K,  # noqa: B023
                                          torch.bfloat16).view(N, K), bias))  # noqa: B023
                print(f"| {N}x{K} | {M} | {t:.4f} | {t_pad:.4f}{'' if same else ' (BITS DIFFER)'} | {t_full:.4f} | "
                      f"{t_dc:.4f} |", flush=True)


if __name__ == "__main__":
    main()
