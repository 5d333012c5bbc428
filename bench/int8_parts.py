"""Where an LLM.int8() layer's GPU time goes: each launch of ``int8_mixed_mm`` timed alone (CUDA graph replay,
ms), for FLUX/T5 shapes with 0 and 350 outlier columns, against bf16 ``F.linear``; and a layer whose input a share
had quantized (weight gathers + GEMM).

    python bench/int8_parts.py
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


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for M, N, K in ((4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (512, 10240, 4096)):
        lin = torch.nn.Linear(K, N, device=DEV, dtype=DT)
        layer = halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
        CB, SCB = layer.weight, layer.SCB.view(torch.float32)
        for c in (0, 350):
            x = outlier_activations(M, K, c, DT, DEV)
            state = torch.zeros(k8.state_size(K), dtype=torch.int32, device=DEV)
            ws = torch.empty(k8.workspace_size(K), dtype=torch.int32, device=DEV)
            r = {"bf16": timed_graph(lambda: lin(x))}

            def flag():  # the flags and their list: the state is zero again after each launch
                fn, grid, args, kwargs = k8.flag_launch(x, state, ws, 6.0)
                k8.launch(fn, grid, *args, **kwargs)
            r["flag+list"] = timed_graph(flag)
            ca, sca, outl, ws_l = k8._quant_with_outliers(x, CB, SCB, 6.0, return_ws=True)
            r["flag+quant_gather(+allocs)"] = timed_graph(lambda: k8._quant_with_outliers(x, CB, SCB, 6.0))
            r["quant_rows(no outliers)"] = timed_graph(lambda: k8._quant_rows(x, 0.0))
            r["int8_mm(no outlier loop)"] = timed_graph(lambda: km.int8_mm(ca, CB, sca, SCB, lin.bias, DT))
            r["int8_mm(+outliers)"] = timed_graph(lambda: km.int8_mm(ca, CB, sca, SCB, lin.bias, DT, outliers=outl))
            r["whole"] = timed_graph(lambda: km.int8_mixed_mm(x, CB, SCB, lin.bias, 6.0))
            # a layer whose input a share already quantized (kernels.share): the weight's gathers, then the GEMM
            wg = torch.empty_like(outl[1])
            gather = km._weight_gather_launch(x, ca, sca, ws_l, outl[0], CB, SCB, wg, 6.0)
            r["weight gathers only"] = timed_graph(lambda: k8.launch(gather[0], gather[1], *gather[2], **gather[3]))

            def shared():
                k8.launch(gather[0], gather[1], *gather[2], **gather[3])
                return km.int8_mm(ca, CB, sca, SCB, lin.bias, DT, outliers=(outl[0], wg, outl[2]))
            r["whole(shared input)"] = timed_graph(shared)
            print(f"{M}x{N}x{K} outliers={c}: " + " ".join(f"{k}={v:.4f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
