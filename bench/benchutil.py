"""Helpers shared by the GPU benchmark scripts of this folder. Not a package: a script run as
``python bench/NAME.py`` has this folder first on sys.path and imports ``benchutil`` from beside itself."""

import torch
import triton


def timed_graph(fn, rep: int = 100) -> float:
    """Median milliseconds of replaying a CUDA graph of one ``fn()`` call (GPU time, no host or launch cost)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=rep, return_mode="median")


def outlier_activations(M: int, K: int, cols: int, dtype=torch.bfloat16, device="cuda") -> torch.Tensor:
    """(M, K) N(0, 1) activations in which ``cols`` random columns hold |x| >= 6 in every row: LLM.int8()
    outlier columns at threshold 6 (the rest stay below it with overwhelming probability)."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    if cols:
        c = torch.randperm(K, device=device)[:cols]
        x[:, c] = x[:, c].sign() * (6 + x[:, c].abs())
    return x


def print_cprofile(fn, n: int, title: str, limit: int = 25) -> None:
    """cProfile of ``n`` calls of ``fn()`` (then a CUDA sync), printed by internal time under ``title``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n## {title}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(limit)
