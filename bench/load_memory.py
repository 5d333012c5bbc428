"""Streaming load: wall time and peak anonymous host memory of ``halfbyte.from_pretrained`` on the CPU.

Writes a random bfloat16 checkpoint of the FLUX.1 transformer architecture (FLUX widths: hidden 3072 = 24 heads x
128, joint_attention_dim 4096, in_channels 64, pooled 768, guidance embedding) with fewer blocks (default 4 double
+ 5 single: 2.13 B parameters, 4.3 GB), shard by shard from a meta-device model, so the writer never holds more
than one shard. Then, for each format, a fresh interpreter loads it with ``halfbyte.from_pretrained(...,
quantization_config=..., torch_dtype=torch.bfloat16, device="cpu")`` while a thread samples ``RssAnon`` (anonymous
resident memory; the memory-mapped checkpoint is file-backed and not counted) every millisecond, and reports the
peak against the bound: 1.1 x (final quantized bytes + largest floating-point tensor).

    python bench/load_memory.py [--double 4 --single 5] [--formats nf4 nf4-dq int8] [--workdir /tmp] [--keep]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

FORMATS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
MiB = 2**20


def flux_config(double: int, single: int) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])


def write_checkpoint(directory: Path, double: int, single: int, shard_bytes: int) -> dict:
    """Random bf16 FLUX-architecture checkpoint in diffusers' layout; returns parameter count and largest tensor."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta = FluxTransformer2DModel(**flux_config(double, single))
    meta.save_config(directory)
    shapes = {k: tuple(t.shape) for k, t in meta.state_dict().items()}
    groups, current, size = [], [], 0
    for k, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(k)
        size += nbytes
    groups.append(current)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: torch.randn(shapes[k], generator=g, dtype=torch.bfloat16).mul_(0.02) for k in keys}
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    numels = [torch.Size(s).numel() for s in shapes.values()]
    index = {"metadata": {"total_size": 2 * sum(numels)}, "weight_map": weight_map}
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2,
                                                                                         sort_keys=True) + "\n")
    return {"parameters": sum(numels), "largest_fp_tensor": 2 * max(numels), "checkpoint_bytes": 2 * sum(numels),
            "shards": len(groups)}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(directory: str, fmt: str) -> dict:
    """Runs in a fresh interpreter: load once, sampling RssAnon / RssFile."""
    import ctypes
    import ctypes.util

    from diffusers import FluxTransformer2DModel
    from torch import nn

    import halfbyte

    # Outside the load: op registration and the reciprocal table built once per process (8 MB); then give freed
    # heap memory back so the baseline holds no free memory for the load to reuse unseen.
    halfbyte.Linear4bit.from_linear(nn.Linear(64, 64), double_quant=True)
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    base = _status("RssAnon")
    peak = {"RssAnon": base, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for field in peak:
                peak[field] = max(peak[field], _status(field))
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model = halfbyte.from_pretrained(FluxTransformer2DModel, directory,
                                     quantization_config=halfbyte.BitsAndBytesConfig(**FORMATS[fmt]),
                                     torch_dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return {"format": fmt, "seconds": seconds, "peak_anon": peak["RssAnon"] - base, "peak_file": peak["RssFile"],
            "final_anon": _status("RssAnon") - base, "quantized_bytes": halfbyte.memory_footprint(model)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=4, help="double-stream blocks (FLUX.1: 19)")
    p.add_argument("--single", type=int, default=5, help="single-stream blocks (FLUX.1: 38)")
    p.add_argument("--formats", nargs="+", default=["nf4", "int8"], choices=list(FORMATS))
    p.add_argument("--shard-size", type=int, default=2 * 10**9, help="bytes per checkpoint shard")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoint is written")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    p.add_argument("--measure", nargs=2, metavar=("DIR", "FORMAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    directory = Path(tempfile.mkdtemp(prefix="halfbyte-flux-bf16-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        info = write_checkpoint(directory, args.double, args.single, args.shard_size)
        print(f"wrote {info['parameters'] / 1e9:.3f} B parameters, {info['checkpoint_bytes'] / 1e9:.2f} GB bf16 in "
              f"{info['shards']} shards to {directory} ({time.perf_counter() - t0:.0f} s)", flush=True)
        root = str(Path(__file__).resolve().parent.parent)  # the halfbyte checkout, importable without installing
        env = dict(os.environ, HALFBYTE_NO_PROGRESS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        rows = []
        for fmt in args.formats:
            out = subprocess.run([sys.executable, __file__, "--measure", str(directory), fmt], env=env,
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{fmt}: load failed\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["bound"] = 1.1 * (r["quantized_bytes"] + info["largest_fp_tensor"])
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}, python {platform.python_version()}; "
          f"{info['parameters'] / 1e9:.3f} B parameters ({args.double} double + {args.single} single blocks), "
          f"largest fp tensor "
          f"{info['largest_fp_tensor'] / MiB:.1f} MiB\n")
    print("| format | load time (s) | peak RssAnon (MiB) | final quantized (MiB) "
          "| bound 1.1 x (final + largest) (MiB) | peak / bound | peak RssFile (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['seconds']:.1f} | {r['peak_anon'] / MiB:.0f} | "
              f"{r['quantized_bytes'] / MiB:.0f} | {r['bound'] / MiB:.0f} | {r['peak_anon'] / r['bound']:.2f} | "
              f"{r['peak_file'] / MiB:.0f} |")


if __name__ == "__main__":
    main()
