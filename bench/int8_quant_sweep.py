"""Launch-shape sweep of LLM.int8()'s two activation kernels (outlier flags; row quantization with gathers), CUDA
graph replay (ms), FLUX/T5 activation shapes with 0 and 350 outlier columns. The winners go into
``halfbyte/kernels/int8.py`` (``_flag_config``, ``_quant_config``; the module's ``_FLAG_CONFIG`` /
``_QUANT_CONFIG`` override them for this sweep).

    python bench/int8_quant_sweep.py [--quant-only]
"""

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import outlier_activations, timed_graph  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte.kernels import int8 as k8  # noqa: E402
from halfbyte.kernels import int8_mm as km  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
# (block_m = rows unrolled per step, block_k, row_iters = steps per program, warps); 8 bf16 columns per thread
# where block_k = 256 x warps
FLAGS = [(8, 1024, 1, 4), (8, 1024, 2, 4), (8, 1024, 4, 4), (8, 1024, 8, 4), (4, 1024, 8, 4), (16, 1024, 2, 4),
         (16, 1024, 4, 4), (8, 2048, 4, 8), (8, 512, 4, 2), (8, 512, 8, 2), (4, 2048, 8, 8)]
QUANTS = [(4096, 8), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 16)]  # (block_k, warps)


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    quant_only = "--quant-only" in sys.argv
    for M, K, N in ((4608, 3072, 3072), (4608, 12288, 3072), (512, 4096, 10240)):
        lin = torch.nn.Linear(K, N, device=DEV, dtype=DT)
        layer = halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
        CB, SCB = layer.weight, layer.SCB.view(torch.float32)
        for c in (0, 350):
            x = outlier_activations(M, K, c, DT, DEV)
            ref = km.int8_mixed_mm(x, CB, SCB, lin.bias, 6.0)
            res = []
            for bm, bk, it, w in ([] if quant_only else FLAGS):
                k8._FLAG_CONFIG = dict(block_m=bm, block_k=bk, row_iters=it, num_warps=w)
                ok = torch.allclose(km.int8_mixed_mm(x, CB, SCB, lin.bias, 6.0).float(), ref.float(), rtol=2 ** -7,
                                    atol=2 ** -7)
                res.append((timed_graph(lambda: k8._quant_with_outliers(x, CB, SCB, 6.0)), (bm, bk, it, w), ok))
            k8._FLAG_CONFIG = None
            if res:
                print(f"{M}x{K} outliers={c} flag configs (flag+quant ms, (block_m, block_k, row_iters, warps), ok):")
            for r in sorted(res):
                print(f"   {r[0]:.4f} {r[1]} {r[2]}")
            res = []
            for bk, w in QUANTS:
                k8._QUANT_CONFIG = dict(block_k=bk, num_warps=w)
                ok = torch.equal(km.int8_mixed_mm(x, CB, SCB, lin.bias, 6.0), ref)  # outlier order is deterministic
                res.append((timed_graph(lambda: k8._quant_with_outliers(x, CB, SCB, 6.0)), (bk, w), ok))
            k8._QUANT_CONFIG = None
            print(f"{M}x{K} outliers={c} quant configs (flag+quant ms, (block_k, warps), ok):")
            for r in sorted(res):
                print(f"   {r[0]:.4f} {r[1]} {r[2]}")


if __name__ == "__main__":
    main()
