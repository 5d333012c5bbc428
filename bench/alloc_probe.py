"""Where the CUDA memory of a quantized load goes: bytes allocated by ``Linear4bit/Linear8bit.from_linear`` against
the bytes of the tensors the layers hold; every live allocation that no layer tensor owns is listed with the
Python frames that made it (``torch.cuda.memory._record_memory_history``).

Usage (one CUDA GPU): python bench/alloc_probe.py [--layers 4] > probe.txt
"""

import argparse

import torch
from torch import nn

from halfbyte.nn import Linear4bit, Linear8bit


def layer_storages(layers) -> dict[int, int]:
    out = {}
    for layer in layers:
        for t in list(layer.parameters()) + list(layer.buffers()):
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def probe(kind: str, dq: bool, source: str, n: int) -> None:
    torch.cuda.synchronize()
    lins = [nn.Linear(3072, 12288, dtype=torch.bfloat16, device=source) for _ in range(n)]
    torch.cuda.memory._record_memory_history(max_entries=200000)
    base = torch.cuda.memory_allocated()
    if kind == "nf4":
        layers = [Linear4bit.from_linear(lin, double_quant=dq, device="cuda") for lin in lins]
    else:
        layers = [Linear8bit.from_linear(lin, device="cuda") for lin in lins]
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - base
    owned = layer_storages(layers)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    src_ptrs = {lin.weight.untyped_storage().data_ptr() for lin in lins} | {
        lin.bias.untyped_storage().data_ptr() for lin in lins}
    stray = []
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            addr = blk["address"]
            if addr in owned or addr in src_ptrs:
                continue
            frames = blk.get("frames", [])
            where = " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in frames[:8]
                               if "torch/" not in f["filename"] or "halfbyte" in f["filename"])
            stray.append((blk["size"], where))
    label = f"{kind}{'+dq' if dq else ''} from {source}"
    print(f"{label}: allocated +{grown / 2**20:.2f} MiB, layer storages {sum(owned.values()) / 2**20:.2f} MiB, "
          f"difference {(grown - sum(owned.values())) / 2**20:+.3f} MiB")
    for size, where in sorted(stray, reverse=True)[:12]:
        print(f"   stray {size / 2**20:8.3f} MiB  {where}")
    del layers, lins
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    for kind, dq, source in (("nf4", False, "cpu"), ("nf4", True, "cpu"), ("nf4", True, "cuda"),
                             ("int8", False, "cpu"), ("int8", False, "cuda")):
        probe(kind, dq, source, a.layers)


if __name__ == "__main__":
    main()
