"""The outlier flag kernel (flags + ascending list, one launch) timed alone (CUDA graph replay, ms) with the rate
at which it reads the activation (GB/s), and its list checked against the reference's outlier columns.

    python bench/int8_flags.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import outlier_activations, timed_graph  # noqa: E402

from halfbyte.formats import int8 as ref8  # noqa: E402
from halfbyte.kernels import int8 as k8  # noqa: E402
from halfbyte.kernels.launch import launch  # noqa: E402

DEV = "cuda"


def main():
    print(torch.cuda.get_device_name())
    for M, K in ((4608, 3072), (4608, 12288), (4608, 15360), (512, 3072), (512, 4096), (512, 12288)):
        for dt in (torch.bfloat16, torch.float32):
            for c in (0, 350):
                x = outlier_activations(M, K, c, dt, DEV)
                state = torch.zeros(k8.state_size(K), dtype=torch.int32, device=DEV)
                ws = torch.zeros(k8.workspace_size(K), dtype=torch.int32, device=DEV)
                fn, grid, args, kwargs = k8.flag_launch(x, state, ws, 6.0)
                ms = timed_graph(lambda: launch(fn, grid, *args, **kwargs))
                n, w = int(ws[k8.count_offset(K)]), -(-K // 32)
                want = ref8.int8_vectorwise_quant(x, 6.0)[2].tolist()
                ok = ws[2 * w:2 * w + n].tolist() == want and not state.any()
                print(f"{M}x{K} {str(dt)[6:]} outliers={n}: {ms:.4f} ms "
                      f"({x.numel() * x.element_size() / ms / 1e6:.0f} GB/s) list as the reference: {ok}", flush=True)


if __name__ == "__main__":
    main()
