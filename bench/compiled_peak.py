"""Where a compiled FLUX step's peak GPU memory goes: one variant per process, a FLUX transformer with FLUX.1-dev
widths and fewer blocks (``NL`` double, ``NS`` single; default 2 + 2), 1024x1024, compiled as ``bench/step.py``
compiles it (``compile_repeated_blocks(fullgraph=True)``) or eager.

    python bench/compiled_peak.py hb-nf4|hb-nf4-launch|hb-nf4-after|hb-nf4-op|bnb-nf4|bf16 [--eager] [--trace]

Prints the first call's and a later call's peak above the memory allocated before the step (the weights). With
``--trace`` the later call's allocations are recorded (``torch.cuda.memory._record_memory_history``) and the
tensors live at the traced peak are listed, largest first, with the line of Inductor's generated code that
allocated them. Findings: BENCHMARKS.md, session 18.
"""

import argparse
import linecache
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step import BF16, DEV, linears, materialise, quantized, swap  # noqa: E402

import halfbyte  # noqa: E402


def live_at_peak(snap: dict, top: int = 12, dump: str | None = None) -> None:
    """The allocations live at the largest total of a recorded trace, largest first, with their generated-code
    line (the deepest frame in a file outside site-packages: Inductor's generated code, else the library's) and
    that line's text. ``dump``: a folder to copy the generated files named there into."""
    live, cur, best, best_live = {}, 0, -1, {}
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    print(f"  traced peak {best / 1e6:.1f} MB; live there:")
    for e in sorted(best_live.values(), key=lambda e: -e["size"])[:top]:
        code = [f for f in e.get("frames", [])
                if f["filename"].endswith(".py") and "site-packages" not in f["filename"]]
        where = f"{Path(code[0]['filename']).name}:{code[0]['line']} {code[0]['name']}" if code else "?"
        text = linecache.getline(code[0]["filename"], code[0]["line"]).strip()[:110] if code else ""
        print(f"    {e['size'] / 1e6:8.1f} MB  {where}  {text}")
        if dump and code and "torchinductor" in code[0]["filename"]:
            os.makedirs(dump, exist_ok=True)
            shutil.copy(code[0]["filename"], dump)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=["bf16", "hb-nf4", "hb-nf4-launch", "hb-nf4-after", "hb-nf4-op", "bnb-nf4"])
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--dump", help="with --trace: copy the generated code named at the peak into this folder")
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    kw = dict(guidance_embeds=True, num_layers=int(os.environ.get("NL", 2)),
              num_single_layers=int(os.environ.get("NS", 2)))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**kw).to(BF16)
    model = materialise(model)
    side, txt, ch, ctx, pooled = 64, 512, 64, 4096, 768
    gen = torch.Generator(DEV).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, ch, device=DEV, dtype=BF16, generator=gen),
        encoder_hidden_states=torch.randn(1, txt, ctx, device=DEV, dtype=BF16, generator=gen),
        pooled_projections=torch.randn(1, pooled, device=DEV, dtype=BF16, generator=gen),
        timestep=torch.tensor([0.5], device=DEV, dtype=BF16), guidance=torch.tensor([3.5], device=DEV, dtype=BF16),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                           indexing="ij"), -1).reshape(-1, 3).to(DEV),
        txt_ids=torch.zeros(txt, 3, device=DEV), return_dict=False)
    if args.variant != "bf16":
        base = linears(model)
        swap(model, {n: quantized(args.variant, m) for n, m in base.items()})
        del base
        halfbyte.nn.release_scratch()
    halfbyte.nn.DEQUANTIZE_IN_GRAPH = args.variant != "hb-nf4-op"
    halfbyte.nn.IN_GRAPH_DEQUANTIZE = {"hb-nf4-launch": "launch", "hb-nf4-after": "after"}.get(args.variant, "auto")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if not args.eager:
        model.compile_repeated_blocks(fullgraph=True)
    a0 = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(**inputs)
        torch.cuda.synchronize()
        first = torch.cuda.max_memory_allocated() - a0
        model(**inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        a1 = torch.cuda.memory_allocated()
        if args.trace:
            torch.cuda.memory._record_memory_history(max_entries=200000)
        model(**inputs)
        torch.cuda.synchronize()
        later = torch.cuda.max_memory_allocated() - a1
        if args.trace:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
    print(f"{args.variant} {'eager' if args.eager else 'compiled'}: {a0 / 1e9:.3f} GB allocated before the step; "
          f"peak above it: first call {first / 1e6:.1f} MB, later call {later / 1e6:.1f} MB", flush=True)
    if args.trace:
        live_at_peak(snap, dump=args.dump)


if __name__ == "__main__":
    main()
