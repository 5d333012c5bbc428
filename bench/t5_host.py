"""Where the host time of a T5-XXL encode at 512 tokens goes, per variant (bf16, halfbyte NF4, bitsandbytes NF4).

    python bench/t5_host.py [--variants bf16 hb-nf4 bnb-nf4] [--rounds 2] [--pairs 21] [--cprofile]

The encode is host-bound on the H200 machines (bench/step.py's GPU-ms column: ~22 ms of kernels under ~30-55 ms
of host). For each variant, after ``step.py``'s timed steps, on the same model:

- ``host``: the median host time of an encode (until the call returns; synchronized before each);
- ``rest``: the same with every linear replaced by a ``torch.empty`` of its output (the host time of the model
  around the linears, identical code for every variant) -- so ``host - rest`` is what the variant's linears add;
- ``per linear``: that difference over the number of linear calls, and the wall per call measured inside the
  linears' forwards, grouped by weight shape.

- ``paired``: the encode's wall time over that of a bf16 copy of the model, the two run in turn (``--pairs``
  pairs, which goes first alternating), median and range of the per-pair ratios. The host's speed drifts by up to
  2x over seconds on these machines (``rest`` of one variant between rounds), which ratios of medians taken
  seconds apart inherit; adjacent pairs share the host's state. The copy holds ~10 GB more, so the weights and
  peak columns ``step.py`` prints here are not the variants' own.

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
PAIRS = 0
TWICE = False  # --twice: each linear call inside the timed encodes is made twice, the second timed apart
MODEL = "t5"  # --model: the model whose steps are split (t5, or flux: bench/step.py's FLUX step)
REF: dict = {}  # the bf16 copy of the model (taken at the bf16 variant's probe) and its call


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


def _wall(call) -> tuple[float, float]:
    step.sync()
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    step.sync()
    return time.perf_counter() - t0, t1 - t0


def paired(call) -> str:
    """Median (range) of the per-pair ratios of ``call``'s wall and host time to the bf16 copy's, run in turn."""
    if not PAIRS or "call" not in REF:
        return "-"
    walls, hosts = [], []
    for i in range(PAIRS):
        first, second = (REF["call"], call) if i % 2 == 0 else (call, REF["call"])
        a, b = _wall(first), _wall(second)
        ref, var = (a, b) if i % 2 == 0 else (b, a)
        walls.append(var[0] / ref[0])
        hosts.append(var[1] / ref[1])
    return (f"wall {statistics.median(walls):.3f} ({min(walls):.3f}-{max(walls):.3f}), host "
            f"{statistics.median(hosts):.3f}")


def probe(kind, model, call, label) -> None:
    if label != MODEL:
        return
    if kind == "bf16" and PAIRS and "call" not in REF:
        import copy
        ref, inputs = copy.deepcopy(model), step.INPUTS[MODEL]
        REF.update(model=ref, call=(lambda: ref(input_ids=inputs).last_hidden_state) if MODEL == "t5" else
                   (lambda: ref(**inputs)[0]))
    pair = paired(call) if kind != "bf16" else "1"
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
            if TWICE:  # the same call again at once: its host path now warm in the CPU's caches
                t0 = time.perf_counter()
                fwd(x)
                spent[key + ("again",)].append(time.perf_counter() - t0)
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
    calls = sum(len(v) for k, v in spent.items() if len(k) == 3) // 3
    ROWS.append(f"| {kind} | {pair} | {host:.1f} | {rest:.1f} | {host - rest:.1f} | {calls} | {misses} | "
                f"{(host - rest) / calls * 1e3:.1f} | "
                + ", ".join(f"{' '.join(map(str, (f'{k[0]}x{k[1]}',) + k[2:]))} {statistics.median(v) * 1e6:.1f}"
                            for k, v in sorted(spent.items())) + " |")
    print(ROWS[-1], flush=True)
    if CPROFILE:
        from benchutil import print_cprofile
        print_cprofile(call, 3, f"cProfile, 3 T5 encodes, {kind}", limit=30)


def main() -> None:
    global CPROFILE, PAIRS, MODEL, TWICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["bf16", "hb-nf4", "bnb-nf4"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--pairs", type=int, default=0, help="pairs of encodes timed against a bf16 copy (0: none)")
    ap.add_argument("--twice", action="store_true",
                    help="time each linear call again right after itself (warm host caches) in the per-call column")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny widths")
    ap.add_argument("--model", choices=["t5", "flux"], default="t5", help="flux: the FLUX step")
    a = ap.parse_args()
    if a.tiny:
        step.DEV, step.TINY = "cpu", True
    CPROFILE, PAIRS, MODEL, TWICE = a.cprofile, a.pairs, a.model, a.twice
    step.ROUNDS = a.rounds
    step.AFTER_STEPS.append(probe)
    print(f"{torch.cuda.get_device_name() if step.DEV == 'cuda' else 'cpu'}, torch {torch.__version__}")
    (step.t5 if MODEL == "t5" else step.flux)(a.variants, False)
    print("\n| variant | paired vs bf16 | host ms | rest ms (linears stubbed) | linears ms | linear calls | "
          "descriptor builds in 3 encodes | us per linear (host - rest) | wall us per call inside forward, by "
          "weight (N x K, class) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
