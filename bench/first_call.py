"""What a quantized model's first call compiles, and how long it takes: a FLUX-sized transformer step or a T5-XXL
encode (bench/step.py's models and variants), one variant per process.

    python bench/first_call.py --model flux|t5 --variant hb-nf4|hb-nf4-dq|hb-int8 [--precompile [--workers N]]
                               [--cache DIR] [--json out.json]

Triton's on-disk cache is set to ``--cache`` (default: a new empty folder, so every kernel compiles as on a
machine that never ran halfbyte; pass the same folder twice to see a second process's first call). Every triton
compile in the first call is logged through ``triton.knobs.compilation.listener``: the kernel, its constexprs,
whether the disk cache held it, and its seconds (the listener's stage times, which exclude the wait for the GIL).
Prints the first call's wall seconds, then the second call's, and the compiles grouped by kernel. ``--precompile``
first runs ``halfbyte.precompile`` on the same call (its seconds and compiles are printed apart): the first call
should then compile nothing.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["flux", "t5"], default="flux")
    ap.add_argument("--variant", default="hb-nf4")
    ap.add_argument("--cache", help="triton's cache folder (default: a new empty one)")
    ap.add_argument("--precompile", action="store_true", help="halfbyte.precompile the call first")
    ap.add_argument("--workers", type=int, help="precompile's threads (default: its own)")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ["TRITON_CACHE_DIR"] = a.cache or tempfile.mkdtemp(prefix="hb-triton-")  # before triton loads
    import torch
    from triton import knobs

    import halfbyte

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import step

    log = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        fn = getattr(src, "fn", None)
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", str(src))
        consts = {k[0] if isinstance(k, tuple) and len(k) == 1 else k: v
                  for k, v in getattr(src, "constants", {}).items() if isinstance(v, (int, bool, str))}
        us = times.ir_initialization + sum(t for _, t in times.lowering_stages) + times.store_results
        log.append(dict(kernel=name, constants=str(consts)[:160], cache_hit=cache_hit, seconds=us / 1e6))

    knobs.compilation.listener = listener
    step.ROUNDS = 1
    calls, ahead = [], {}

    # time the variant's first and second calls ourselves (step.py's first call, then one more step)
    orig_steps = step.steps

    def steps(fn, n=5, warmup=2):
        del log[:]  # what quantizing the layers compiled is not the first call's
        if a.precompile:
            ahead.update(halfbyte.precompile(fn, workers=a.workers))
            ahead["compiles"] = len(log)
            ahead["compiler_seconds"] = sum(e["seconds"] for e in log)
            del log[:]
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            calls.append(time.perf_counter() - t0)
        return orig_steps(fn, n=1, warmup=1)

    step.steps = steps
    rows = (step.flux if a.model == "flux" else step.t5)([a.variant], False)
    if ahead:
        print(f"precompile: {ahead}")
    by_kernel: dict[str, list] = {}
    for e in log:
        by_kernel.setdefault(e["kernel"], []).append(e)
    print(f"{torch.cuda.get_device_name()}: {a.model} {a.variant}: first call {calls[0]:.1f} s, second "
          f"{calls[1] * 1e3:.0f} ms; {len(log)} compiles ({sum(not e['cache_hit'] for e in log)} not cached), "
          f"{sum(e['seconds'] for e in log):.1f} s of compiler stages, {os.cpu_count()} CPUs")
    for k, es in sorted(by_kernel.items(), key=lambda kv: -sum(e["seconds"] for e in kv[1])):
        print(f"  {k}: {len(es)} compiles, {sum(e['seconds'] for e in es):.2f} s")
        for e in es:
            print(f"      {e['seconds']:.2f} s {'hit ' if e['cache_hit'] else ''}{e['constants']}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(calls=calls, precompile=ahead, compiles=log, rows=rows), indent=1,
                                           default=str))


if __name__ == "__main__":
    main()
