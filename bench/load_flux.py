"""Load a FLUX-sized (11.9 B) bf16 checkpoint into NF4 / int8, save, reload: diffusers + bitsandbytes vs halfbyte.

    python bench/load_flux.py make DIR              # random bf16 FluxTransformer2DModel (FLUX.1-dev config), sharded
    python bench/load_flux.py all DIR [--cases ...] [--json OUT]   # every case in its own process, then a table

Cases (each in a fresh process, after the checkpoint files were read once so every case reads from page cache, and
after the library's imports and first kernel loads, which are not timed):
  bnb-<fmt>       diffusers AutoModel + bitsandbytes' BitsAndBytesConfig, model.save_pretrained, reload
  hf-<fmt>        diffusers AutoModel + halfbyte.BitsAndBytesConfig, model.save_pretrained, reload
  stream-<fmt>    halfbyte.from_pretrained (streaming), halfbyte.save_pretrained, halfbyte.from_pretrained reload
                  (and halfbyte.save_pretrained(durable=True), timed apart)
with fmt in nf4 (compute bf16) and int8 (threshold 6). Reported per step (load, save, reload): seconds, peak GPU
memory allocated (torch.cuda.max_memory_allocated), peak anonymous host memory (RssAnon, sampled every 5 ms).
"""

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
WARMUP = """
import torch, halfbyte
from torch import nn
for dtype in (torch.bfloat16, torch.float16):
    for cfg in (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
                dict(load_in_8bit=True)):
        model = nn.Sequential(nn.Linear(256, 256, device="cuda", dtype=dtype))
        halfbyte.quantize_(model, halfbyte.BitsAndBytesConfig(**cfg))
torch.cuda.synchronize()
"""
CASES = [f"{kind}-{fmt}" for fmt in ("nf4", "int8") for kind in ("bnb", "hf", "stream")]


def make(path: Path, shard_bytes: int = 5 * 2**30) -> None:
    """Write the checkpoint tensor by tensor (never the whole model in memory): randn * 0.02, norms at 1."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    model.save_config(path)
    names = [(n, t.shape) for n, t in model.state_dict().items()]
    gen = torch.Generator("cuda").manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            name = f"diffusion_pytorch_model-{len(shards):05d}-of-NNNNN.safetensors"
            save_file(current, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in current})
            current, size = {}, 0

    for name, shape in names:
        if name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                          "norm_added_k.weight")):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device="cuda") * 0.02).to(torch.bfloat16).cpu()
        if size + t.numel() * 2 > shard_bytes:
            flush()
        current[name] = t
        size += t.numel() * 2
    flush()
    n = len(shards)
    renamed = {}
    for old in sorted(set(weight_map.values())):
        new = old.replace("NNNNN", f"{n:05d}")
        os.replace(path / old, path / new)
        renamed[old] = new
    index = {"metadata": {"total_size": sum(t.numel() * 2 for s in shards for t in s.values())},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {sum(math.prod(s) for _, s in names) / 1e9:.2f} B parameters in {n} shards to {path}")


class RssAnonPeak:
    """Peak of /proc/self/status RssAnon (anonymous resident memory: not the page cache of mapped files)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def measure(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with RssAnonPeak() as host:
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return out, dict(seconds=round(seconds, 2), peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     final_gpu_gb=round(torch.cuda.memory_allocated() / 2**30, 2),
                     final_reserved_gb=round(torch.cuda.memory_reserved() / 2**30, 2),
                     peak_host_anon_gb=round(host.peak / 2**30, 2))


def run_case(ckpt: Path, case: str, out: Path) -> dict:
    import diffusers
    from diffusers import AutoModel, FluxTransformer2DModel

    import halfbyte

    kind, fmt = case.split("-")
    fields = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16) \
        if fmt == "nf4" else dict(load_in_8bit=True)
    cfg = (diffusers.BitsAndBytesConfig if kind == "bnb" else halfbyte.BitsAndBytesConfig)(**fields)
    if kind == "stream":
        def load():
            return halfbyte.from_pretrained(FluxTransformer2DModel, str(ckpt), quantization_config=cfg,
                                            torch_dtype=torch.bfloat16, device="cuda")

        def save(m):
            return halfbyte.save_pretrained(m, out)

        def reload():
            return halfbyte.from_pretrained(FluxTransformer2DModel, str(out), torch_dtype=torch.bfloat16,
                                            device="cuda")
    else:
        def load():
            return AutoModel.from_pretrained(str(ckpt), quantization_config=cfg, torch_dtype=torch.bfloat16)

        def save(m):
            return m.save_pretrained(out)

        def reload():
            return AutoModel.from_pretrained(str(out), torch_dtype=torch.bfloat16)

    # Each library's imports and first kernel loads happen before timing (diffusers imports model classes lazily,
    # halfbyte loads triton and its kernels on first use, bitsandbytes its CUDA library), as in a process that has
    # loaded a model before: the numbers compare loading, not importing.
    from diffusers import FluxTransformer2DModel  # noqa: F401, F811
    if kind == "bnb":
        import bitsandbytes as bnb

        bnb.functional.quantize_4bit(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        bnb.functional.int8_vectorwise_quant(torch.randn(256, 256, device="cuda", dtype=torch.float16))
    else:
        exec(WARMUP, {})
    torch.cuda.synchronize()
    result = {"case": case}
    if os.environ.get("LOAD_TRACE"):  # diagnosis only: the recorder slows the load, so nothing is timed
        result["trace"] = traced_load(load)
        return result
    model, result["load"] = measure(load)
    result["quantized_gb"] = round(halfbyte.memory_footprint(model) / 2**30, 2) if kind != "bnb" else \
        round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30, 2)
    if kind != "bnb":
        result["bytes_check"] = bytes_check(model, ckpt, fmt)
    _, result["save"] = measure(functools.partial(save, model))
    result["saved_gb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30, 2)
    if kind == "stream":  # the fsynced save, for the cost of durability
        durable = out.with_name(out.name + "-durable")
        _, result["save_durable"] = measure(functools.partial(halfbyte.save_pretrained, model, durable, durable=True))
        shutil.rmtree(durable, ignore_errors=True)
    del model
    torch.cuda.empty_cache()
    _, result["reload"] = measure(reload)
    shutil.rmtree(out, ignore_errors=True)
    return result


def _frame(frames) -> str:
    """The two innermost Python frames of an allocation's stack outside torch (the code that asked for it)."""
    py = [f for f in frames if f.get("filename", "").endswith(".py") and "/torch/" not in f["filename"]]
    if not py:
        return "torch internals"
    return " <- ".join(f"{f['filename'].split('site-packages/')[-1].split('/work/main/')[-1]}:{f.get('line')} "
                       f"{f.get('name')}" for f in py[:2])


def traced_load(load) -> dict:
    """Run ``load`` under the CUDA allocator's history recorder: the allocations alive at the peak of allocated
    memory grouped by the code that made them, and what stays allocated besides the model's own tensors."""
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    model = load()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, peak, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _frame(ev.get("frames", [])))
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]
    groups: dict[str, int] = {}
    for size, where in at_peak.values():
        groups[where] = groups.get(where, 0) + size
    own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda)
    after = torch.cuda.memory_allocated() - base
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:12]
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda}
    stray: dict[str, int] = {}
    for addr, (size, where) in live.items():  # allocations alive after the load that no model tensor holds
        if addr not in owned:
            stray[where] = stray.get(where, 0) + size
    return dict(peak_delta_gb=round(peak / 2**30, 4), model_gb=round(own / 2**30, 4),
                allocated_after_minus_model_mb=round((after - own) / 2**20, 1),
                peak_minus_model_mb=round((peak - own) / 2**20, 1),
                at_peak_mb={k: round(v / 2**20, 1) for k, v in top},
                alive_not_model_mb={k: round(v / 2**20, 1)
                                    for k, v in sorted(stray.items(), key=lambda kv: -kv[1])[:8]})


def bytes_check(model, ckpt: Path, fmt: str, names=("x_embedder", "transformer_blocks.0.ff.net.2",
                                                      "single_transformer_blocks.37.proj_out")) -> bool:
    """The loaded layers hold the bytes of quantizing the checkpoint's weights at once on the GPU (guards the
    piecewise pinned-buffer transfer of the loaders)."""
    from safetensors import safe_open

    index = json.loads((ckpt / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        with safe_open(ckpt / index[name + ".weight"], framework="pt", device="cuda") as f:
            w = f.get_tensor(name + ".weight")
        layer = model.get_submodule(name)
        if fmt == "nf4":
            packed, absmax = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
            ok = torch.equal(layer.weight.reshape(-1), packed)
            ok = ok and torch.equal(layer.absmax.view(torch.float32), absmax)
        else:
            CB, SCB, _ = torch.ops.halfbyte.int8_vectorwise_quant(w.half(), 0.0)
            ok = torch.equal(layer.weight, CB) and torch.equal(layer.SCB.view(torch.float32), SCB)
        if not ok:
            return False
    return True


def table(results: list[dict]) -> str:
    rows = ["| case | load s | load peak GPU GB | load peak host GB | save s | reload s | reload peak GPU GB | "
            "model GB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | error: {r['error'][:80]} |||||||")
            continue
        rows.append(f"| {r['case']} | {r['load']['seconds']} | {r['load']['peak_gpu_gb']} | "
                    f"{r['load']['peak_host_anon_gb']} | {r['save']['seconds']} | {r['reload']['seconds']} | "
                    f"{r['reload']['peak_gpu_gb']} | {r['load']['final_gpu_gb']} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("dir", type=Path)
    one = sub.add_parser("one")
    one.add_argument("dir", type=Path)
    one.add_argument("case", choices=CASES)
    one.add_argument("out", type=Path)
    every = sub.add_parser("all")
    every.add_argument("dir", type=Path)
    every.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    every.add_argument("--json", type=Path)
    every.add_argument("--scratch", type=Path, default=Path("/tmp/halfbyte-bench-save"))
    every.add_argument("--trace", nargs="*", default=[], choices=CASES,
                       help="after the timed cases, load these again under the allocator's history recorder")
    args = p.parse_args()
    if args.cmd == "make":
        make(args.dir)
    elif args.cmd == "one":
        print("RESULT " + json.dumps(run_case(args.dir, args.case, args.out)))
    else:
        for f in args.dir.glob("*.safetensors"):  # page cache warm for every case alike
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
        # Triton compiles halfbyte's kernels on first use and caches them on disk; a user pays that once per
        # machine, so it is paid here before timing (bitsandbytes ships precompiled kernels)
        subprocess.run([sys.executable, "-c", WARMUP], check=True)
        results = []
        for case in args.cases:
            proc = subprocess.run([sys.executable, __file__, "one", str(args.dir), case, str(args.scratch / case)],
                                  capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results.append(json.loads(line[-1][7:]) if line else {"case": case,
                                                                  "error": proc.stderr.strip()[-400:]})
            print(json.dumps(results[-1]), flush=True)
        print(table(results))
        for case in args.trace:
            proc = subprocess.run([sys.executable, __file__, "one", str(args.dir), case, str(args.scratch / case)],
                                  capture_output=True, text=True, env={**os.environ, "LOAD_TRACE": "1"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results.append(json.loads(line[-1][7:]) if line else {"case": case, "trace_error": proc.stderr[-400:]})
            print(json.dumps(results[-1], indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
