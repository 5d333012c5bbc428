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


L2_BYTES = 50 * 2**20  # an H100/H200's L2: weight copies are cycled past it


def ring_copies(N: int, K: int, dtype: torch.dtype = torch.bfloat16):
    """The fused-GEMM benches' weights: (copies, lins, layers, gemms), enough copies of a random (N, K)
    ``nn.Linear`` (bias, N(0, 1/K) weights, ``dtype``) to exceed the L2 three times in NF4, their halfbyte
    ``Linear4bit`` layers and a ``gemm_ring.RingGemm`` bound to each layer's weight."""
    import halfbyte
    from halfbyte.kernels import gemm_ring

    copies = max(2, -(-3 * L2_BYTES // (N * K // 2)))
    lins = []
    for _ in range(copies):
        lin = torch.nn.Linear(K, N, device="cuda", dtype=dtype)
        lin.weight.data.normal_(0, K ** -0.5)
        lins.append(lin)
    layers = [halfbyte.Linear4bit.from_linear(lin, quant_type="nf4") for lin in lins]
    gemms = [gemm_ring.RingGemm(q.weight.reshape(-1), q.quant_stats()[0], N, K, "nf4", None, dtype) for q in layers]
    return copies, lins, layers, gemms


def gemv_case(N: int, K: int, dtype: torch.dtype, device: str = "cuda", nested: bool = False):
    """The GEMV benches' test case: (ws, x, check, row, nbytes, copies). ``ws``: enough (packed, absmax, weight)
    NF4 copies (blocksize 64, float32 absmax) of random (N, K) weights to exceed the L2 three times; with
    ``nested``, (packed, uint8 absmax, weight, (nested_absmax, None, offset)): double quantization. ``x`` one
    (1, K) token; ``check(name, out)`` records in ``row`` whether ``out`` is within 2x the bf16-input bound of
    float64 ``x @ W.T`` for the first copy (and prints when not); ``nbytes`` the weight and absmax bytes."""
    from halfbyte.formats import blockwise
    from halfbyte.formats import fourbit as ref4

    copies = max(2, -(-3 * L2_BYTES // (N * K // 2)))
    ws = []
    for _ in range(copies):
        w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
        p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
        if nested:
            q, nested_absmax, offset = blockwise.double_quantize(a)
            ws.append((p, q, w, (nested_absmax, None, offset)))
        else:
            ws.append((p, a, w))
    x = torch.randn(1, K, device=device, dtype=dtype)
    am = blockwise.double_dequantize(ws[0][1], *ws[0][3][::2]) if nested else ws[0][1]
    deq = ref4.dequantize_4bit(ws[0][0], am, 64, "nf4", (N, K), torch.float32).double()
    exact = (x.double() @ deq.T).reshape(-1)
    bound = (x.double().abs() @ deq.abs().T).reshape(-1) * 2 ** -8 + 1e-6
    row = {"N": N, "K": K, "copies": copies}

    def check(name, out):
        err = (out.double().reshape(-1) - exact).abs()
        row[name + "_ok"] = ok = bool((err <= bound * 2).all())
        if not ok:
            print(f"  {name}: WRONG, max err / bound {float((err / bound).max()):.2f}")

    stats = N * K // 64 + 4 * -(-N * K // 64 // 256) if nested else N * K // 64 * 4
    return ws, x, check, row, N * K // 2 + stats, copies


def bnb_gemv_ms(bnb, ws, x: torch.Tensor, nested: bool = False) -> float:
    """Milliseconds per call of bitsandbytes' ``matmul_4bit`` on x (1, K) over ``gemv_case``'s weight copies (NF4,
    blocksize 64, double quant where ``nested``), graph replay."""
    bq = [bnb.functional.quantize_4bit(pa[2], blocksize=64, compress_statistics=nested, quant_type="nf4")
          for pa in ws]
    return timed_graph(lambda: [bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in bq]) / len(ws)


def copy_ms(traffic: int, copies: int) -> float:
    """Milliseconds per device-to-device copy that reads traffic/2 bytes and writes as many (``traffic`` bytes moved,
    as a GEMV of that weight size reads), over ``copies`` source and destination buffers cycled past the L2 as the
    GEMV benches cycle their weights, graph replay: the copy bandwidth at the GEMV's working-set size."""
    half = traffic // 2
    src = [torch.empty(half, dtype=torch.uint8, device="cuda") for _ in range(copies)]
    dst = [torch.empty_like(t) for t in src]
    return timed_graph(lambda: [d.copy_(t) for d, t in zip(dst, src)]) / copies


def card_copy_tbs(nbytes: int = 2**28) -> float:
    """The card's copy bandwidth in TB/s (bytes read + written per second) on a copy of ``nbytes`` (256 MiB)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed_graph(lambda: dst.copy_(src)) / 1e9


def sweep(row: dict, name: str, configs, make, check, ws, copies: int) -> None:
    """Times ``make(cfg)`` (a call on one weight copy, or None where cfg does not apply) over ``configs``, records
    each in ``row`` and the best under ``name``."""
    best = None
    for cfg in configs:
        call = make(cfg)
        if call is None:
            continue
        try:
            check(name, call(ws[0]))
            ms = timed_graph(lambda: [call(pa) for pa in ws]) / copies  # noqa: B023
        except Exception as e:  # noqa: BLE001
            print(f"  {name} {cfg}: failed {type(e).__name__}: {str(e)[:300]}")
            continue
        row[f"{name}/{','.join(map(str, cfg))}"] = ms
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best:
        row[name], row[name + "_cfg"] = best


def report_row(row: dict, nbytes: int, results: list) -> None:
    """Prints a GEMV bench's ``row`` (best time and TB/s per variant, best configs, every config) and appends it
    to ``results``."""
    cells = " ".join(f"{k}={v:.4f}ms({nbytes / v / 1e9:.2f}TB/s)" for k, v in row.items()
                     if isinstance(v, float) and "/" not in k)
    print(f"{row['N']}x{row['K']}: {cells}")
    print("   best cfgs:", {k: v for k, v in row.items() if k.endswith("_cfg")})
    print("   all:", " ".join(f"{k}={v:.4f}" for k, v in row.items() if "/" in k))
    results.append(row)
