"""Where the host time of a T5-XXL encode at 512 tokens goes, per variant (bf16, halfbyte NF4, bitsandbytes NF4).

    python bench/t5_host.py [--variants bf16 hb-nf4 bnb-nf4] [--rounds 2] [--cprofile]

The encode is host-bound on the H200 machines (bench/step.py's GPU-ms column: ~22 ms of kernels under ~30-55 ms
of host). For each variant, after ``step.py``'s timed steps, on the same model:

- ``host``: the median host time of an encode (until the call returns; synchronized before each);
- ``rest``: the same with every linear replaced by a ``torch.empty`` of its output (the host time of the model
  around the linears, identical code for every variant) -- so ``host - rest`` is what the variant's linears add;
- ``per linear``: that difference over the number of linear calls, and the wall per call measured inside the
  linears' forwards, grouped by weight shape.

The linears are the model's ``nn.Linear`` or quantized replacements (``wo`` stays bf16 in every variant).
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step  # noqa: E402

ROWS: list[str] = []
CPROFILE = False


def _is_linear(m) -> bool:
    return hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight")


def _encodes_host(call, n: int) -> float:
    """Median host milliseconds of ``n`` calls of ``call()``, each after a synchronize."""
    host = []
    for _ in range(n):
        step.sync()
        t0 = time.perf_counter()
        call()
        host.append(time.perf_counter() - t0)
    step.sync()
    return statistics.median(host) * 1e3


def _count_descriptor_builds():
    """Counts the fused ring GEMM's x / out descriptor encodings (a launch not kept for its addresses) until the
    returned function is called, which restores the method and returns the count."""
    if step.DEV != "cuda":
        return lambda: 0
    from halfbyte.kernels import gemm_ring

    n, orig = [0], gemm_ring.RingGemm._io_desc

    def counted(self, *a):
        n[0] += 1
        return orig(self, *a)

    gemm_ring.RingGemm._io_desc = counted

    def done():
        gemm_ring.RingGemm._io_desc = orig
        return n[0]
    return done


def probe(kind, model, call, label) -> None:
    if label != "t5":
        return
    lins = [m for m in model.modules() if _is_linear(m)]
    host = _encodes_host(call, 9)

    def stub(m):
        dt = torch.bfloat16
        return lambda x: torch.empty(*x.shape[:-1], m.out_features, dtype=dt, device=x.device)

    for m in lins:
        m.forward = stub(m)
    try:
        rest = _encodes_host(call, 9)
    finally:
        for m in lins:
            del m.forward
    spent = defaultdict(list)

    def timed(m, fwd):
        key = (m.out_features, m.in_features, type(m).__name__)

        def run(x):
            t0 = time.perf_counter()
            y = fwd(x)
            spent[key].append(time.perf_counter() - t0)
            return y
        return run

    for m in lins:
        m.forward = timed(m, m.forward)
    misses = _count_descriptor_builds()
    try:
        _encodes_host(call, 3)
    finally:
        for m in lins:
            del m.forward
        misses = misses()
    calls = sum(len(v) for v in spent.values()) // 3
    ROWS.append(f"| {kind} | {host:.1f} | {rest:.1f} | {host - rest:.1f} | {calls} | {misses} | "
                f"{(host - rest) / calls * 1e3:.1f} | "
                + ", ".join(f"{n}x{k} {t} {statistics.median(v) * 1e6:.1f}" for (n, k, t), v in
                            sorted(spent.items())) + " |")
    print(ROWS[-1], flush=True)
    if CPROFILE:
        from benchutil import print_cprofile
        print_cprofile(call, 3, f"cProfile, 3 T5 encodes, {kind}", limit=30)


def main() -> None:
    global CPROFILE
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["bf16", "hb-nf4", "bnb-nf4"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny widths")
    a = ap.parse_args()
    if a.tiny:
        step.DEV, step.TINY = "cpu", True
    CPROFILE = a.cprofile
    step.ROUNDS = a.rounds
    step.AFTER_STEPS.append(probe)
    print(f"{torch.cuda.get_device_name() if step.DEV == 'cuda' else 'cpu'}, torch {torch.__version__}")
    step.t5(a.variants, False)
    print("\n| variant | host ms | rest ms (linears stubbed) | linears ms | linear calls | descriptor builds in 3 "
          "encodes | us per linear (host - rest) | wall us per call inside forward, by weight (N x K, class) |\n"
          "|---|---|---|---|---|---|---|---|")
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
