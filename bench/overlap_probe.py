"""Exploratory: can the next layer's 4-bit dequantize run beside this layer's cuBLAS GEMM if the GEMM leaves a
few SMs free (``torch._C._set_sm_carveout_experimental``)? Session 4 overlapped the two on a side stream without a
carveout and gained nothing: cuBLAS's Hopper GEMMs hold every SM (BENCHMARKS.md, "Side-stream dequantize").

    python bench/overlap_probe.py [--carveouts 0 8 16] [--layers 8]

Per FLUX shape (M = 4608 tokens, bf16, NF4 blocksize 64, float32 absmax), graph replay, ms per layer over a chain of
``--layers`` distinct weights (cycled past the L2):
* ``bf16``: ``F.linear`` with the bf16 weights;
* ``gemm/cN``: the same with N SMs carved out of cuBLAS's launches;
* ``serial/cN``: dequantize then the GEMM, one stream (the library's eager path), N SMs carved out;
* ``overlap/cN``: layer i's GEMM (N SMs carved out) on the main stream while layer i+1's weight is dequantized on a
  side stream into the other of two workspaces; events order each GEMM after its weight and each dequantize after
  the GEMM that last read its workspace. The outputs are checked against ``serial/cN``'s, bit for bit.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import L2_BYTES, timed_graph  # noqa: E402

from halfbyte.kernels import gemm4bit  # noqa: E402

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 18432, 3072)]  # M, N, K


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--carveouts", nargs="*", type=int, default=[0, 4, 8, 16, 24])
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    dt = torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__)
    set_carveout = torch._C._set_sm_carveout_experimental
    for M, N, K in SHAPES:
        L = max(args.layers, -(-3 * L2_BYTES // (N * K // 2)))
        layers = []
        for _ in range(L):
            w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dt)
            p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
            deq = gemm4bit.bind_dequantize(p.reshape(-1).view(torch.uint8), a, None, None, None, N * K, 64, "nf4",
                                           dt)
            layers.append((w, p, a, deq))
        x = torch.randn(M, K, device="cuda", dtype=dt)
        bias = torch.randn(N, device="cuda", dtype=dt)
        slots = [torch.empty(N, K, device="cuda", dtype=dt) for _ in range(2)]
        outs = [torch.empty(M, N, device="cuda", dtype=dt) for _ in range(L)]
        row = {}
        row["bf16"] = timed_graph(lambda: [F.linear(x, w, bias) for w, *_ in layers]) / L

        def serial():
            for i, (_, _, _, deq) in enumerate(layers):
                deq(torch.cuda.current_stream().cuda_stream, slots[0].data_ptr())
                torch.addmm(bias, x, slots[0].t(), out=outs[i])

        side = torch.cuda.Stream()

        def overlap():
            main = torch.cuda.current_stream()
            ready = [torch.cuda.Event() for _ in range(L)]
            freed = [torch.cuda.Event() for _ in range(L)]
            side.wait_stream(main)
            with torch.cuda.stream(side):
                layers[0][3](side.cuda_stream, slots[0].data_ptr())
                ready[0].record(side)
            for i in range(L):
                if i + 1 < L:
                    with torch.cuda.stream(side):
                        if i >= 1:
                            side.wait_event(freed[i - 1])  # slot (i + 1) % 2 was read by GEMM i - 1
                        layers[i + 1][3](side.cuda_stream, slots[(i + 1) % 2].data_ptr())
                        ready[i + 1].record(side)
                main.wait_event(ready[i])
                torch.addmm(bias, x, slots[i % 2].t(), out=outs[i])
                freed[i].record(main)
            main.wait_stream(side)

        for c in args.carveouts:
            set_carveout(c or None)
            try:
                row[f"gemm/c{c}"] = timed_graph(lambda: [F.linear(x, w, bias) for w, *_ in layers]) / L
                row[f"serial/c{c}"] = timed_graph(serial) / L  # (cuBLAS may pick another kernel per carveout)
                torch.cuda.synchronize()
                ref = [o.clone() for o in outs]
                for o in outs:
                    o.zero_()
                row[f"overlap/c{c}"] = timed_graph(overlap) / L
                torch.cuda.synchronize()
                row[f"overlap/c{c}_bits"] = all(torch.equal(o, r) for o, r in zip(outs, ref, strict=True))
            finally:
                set_carveout(None)
        cells = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"{M}x{N}x{K} ({L} layers): {cells}")
        best = min(v for k, v in row.items() if k.startswith("overlap") and isinstance(v, float))
        print(f"   serial/bf16 {row['serial/c0'] / row['bf16']:.3f}; best overlap/bf16 {best / row['bf16']:.3f}")
        layers = slots = outs = ref = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
