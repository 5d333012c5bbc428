"""The TMA-ring 4-bit GEMV (``halfbyte.kernels.gemv_ring``: M = 1, Gluon, Hopper) over launch shapes, against the
library's GEMV as routed before it (the tensor-core / register-table kernels) and bitsandbytes'. Results and
reading: BENCHMARKS.md, session 17.

    python bench/gemv_gluon.py [--dtype bfloat16|float16] [--configs BN,KT,STAGES,CTAS ...] [--read-only]
    python bench/gemv_gluon.py --nested           # double-quantized absmax (bitsandbytes with compress_statistics)
    python bench/gemv_gluon.py --compile-only     # no GPU needed: compiles for sm_90 (triton 3.6 and 3.9)
    python bench/gemv_gluon.py --host             # host time per call: ring vs tensor-core GEMV, eager loops

Design: ``halfbyte/kernels/gemv_ring.py``. Columns: "routed" the library's GEMV as routed (the ring where it
serves: on by default), "lib" the GEMV without the ring (``use_ring=False``), "bnb" bitsandbytes' ``matmul_4bit``,
"copy" a device-to-device copy moving the bytes the GEMV reads (half read, half written; buffers cycled past the L2
as the weights are), "tma/..." the ring per launch shape; ``--read-only`` adds the same programs with the decode
replaced by a trivial use of each stage ("read", MODE 1) and without the absmax and x loads ("read-w", MODE 2):
the memory side's floor; then without the table build ("no-table", 3), without any load (stages declared full:
"no-load", 4: the structure alone), and the weight stream with every stage released unread ("stream", 5: the ring's
own memory floor, against bench/gemv_read.py's plain loads; BENCHMARKS.md, session 35).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import gemv_ring  # noqa: E402

CONFIGS = [(16, 64, 4, 3), (16, 64, 3, 4), (16, 128, 3, 3), (16, 128, 2, 3), (8, 128, 3, 4), (8, 128, 4, 3),
           (8, 64, 6, 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--configs", nargs="*", help="BN,KT,STAGES,CTAS (rows per tile, words per K tile, ring "
                                                   "stages, programs per SM)")
    ap.add_argument("--shapes", nargs="*", help="NxK")
    ap.add_argument("--read-only", action="store_true", help="also time the ring without the decode")
    ap.add_argument("--host", action="store_true", help="host time per one-token call instead")
    ap.add_argument("--nested", action="store_true", help="double-quantized absmax, both libraries")
    ap.add_argument("--empty", action="store_true", help="also the graph time per launch of an empty kernel "
                                                         "(396 programs of 8 warps): the launch's own floor")
    ap.add_argument("--old-build", action="store_true", help="the table written from 256 immediates, one store "
                                                             "each (the build before session 21), for an A/B")
    ap.add_argument("--json")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    if args.compile_only:
        for cfg in configs:
            k = gemv_ring.compile_offline(dt, cfg, nested=args.nested)
            ptx = k.asm["ptx"]
            print(f"cfg {cfg}: dynamic shared {k.metadata.shared} B (+ the 32 KB static table); PTX mma.sync "
                  f"{ptx.count('mma.sync')}, ld.shared {ptx.count('ld.shared')}")
        return
    if args.host:
        host_costs(getattr(torch, args.dtype))
        return
    from benchutil import bnb_gemv_ms, card_copy_tbs, copy_ms, gemv_case, report_row, sweep, timed_graph

    from halfbyte.kernels import gemm4bit
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        bnb = None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dt}"
          + (", double-quantized absmax" if args.nested else ""))
    nq = args.nested
    if args.old_build:
        gemv_ring.build_asm = build_asm_immediates
        gemv_ring._asm.cache_clear()
    if args.empty:
        print(f"empty kernel, per launch in a graph of 50: {empty_launch_ms() * 1e3:.2f} us")
    card = card_copy_tbs()
    print(f"the card's copy bandwidth (256 MiB copy, read + written): {card:.2f} TB/s")
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else
              [(18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072), (10240, 4096), (3072, 12288),
               (3072, 15360), (4096, 10240), (4096, 4096)])
    results = []
    for N, K in shapes:
        ws, x, check, row, nbytes, copies = gemv_case(N, K, dt, nested=nq)
        stats = lambda pa: (pa[1], *pa[3]) if nq else (pa[1], None, None, None)  # noqa: E731
        lib = lambda pa: gemm4bit.gemv(x, pa[0], *stats(pa), None, N, K, 64, "nf4")  # noqa: E731
        check("routed", lib(ws[0]))
        row["routed"] = timed_graph(lambda: [lib(pa) for pa in ws]) / copies
        # the GEMV the library routed to before the ring (tensor-core where it applies, else register tables)
        old = lambda pa: gemm4bit.gemv(x, pa[0], *stats(pa), None, N, K, 64, "nf4", use_ring=False)  # noqa: E731
        check("lib", old(ws[0]))
        row["lib"] = timed_graph(lambda: [old(pa) for pa in ws]) / copies
        if bnb is not None:
            row["bnb"] = bnb_gemv_ms(bnb, ws, x, nq)
        row["copy"] = copy_ms(nbytes, copies)  # a copy moving the bytes the GEMV reads
        for mode, name in ((0, "tma"),) + (((1, "read"), (2, "read-w"), (3, "no-table"), (4, "no-load"),
                                                                  (5, "stream"))
                                           if args.read_only else ()):
            def make(cfg, mode=mode):
                try:
                    fn = gemv_ring.RingGemv(ws[0][0].reshape(-1), ws[0][1], N, K, "nf4", dt, cfg, mode,
                                            ws[0][3] if nq else None)
                except ValueError:
                    return None
                rings = [fn] + [gemv_ring.RingGemv(pa[0].reshape(-1), pa[1], N, K, "nf4", dt, cfg, mode,
                                                   pa[3] if nq else None) for pa in ws[1:]]
                calls = {id(pa): r for pa, r in zip(ws, rings, strict=True)}
                return lambda pa: calls[id(pa)](x, None)
            # (MODE 1 / 2 results are not the product: their check is skipped)
            sweep(row, name, configs, make, check if mode == 0 else (lambda n, o: None), ws, copies)
        report_row(row, nbytes, results)
        if "bnb" in row:
            names = ("routed", "lib", "tma")
            print("   speed vs bnb:", ", ".join(f"{k} {row['bnb'] / row[k]:.2f}x" for k in names if k in row))
        tbs = nbytes / row["routed"] / 1e9
        print(f"   routed: {tbs:.2f} TB/s, {row['copy'] / row['routed']:.0%} of a copy moving the same bytes, "
              f"{tbs / card:.0%} of the card's copy bandwidth")
        ws = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def build_asm_immediates(words) -> str:
    """The table build before session 21: every entry from an immediate, one 4-byte store of 32 lanes per entry,
    warp w of the consumers taking entries w, w + 4, ... (8 KB of code per warp)."""
    W, T = gemv_ring.WARPS, gemv_ring.TABLE
    lines = ["{", ".reg .b32 %ln, %w, %tb, %v;", f".reg .pred %p<{W}>;", "mov.u32 %ln, %laneid;",
             "shl.b32 %ln, %ln, 2;", f"mov.u32 %tb, {T};", "add.u32 %tb, %tb, %ln;", "mov.u32 %w, %tid.x;",
             "shr.u32 %w, %w, 5;", f"rem.u32 %w, %w, {W};"]
    lines += [f"setp.eq.u32 %p{w}, %w, {w};" for w in range(W)]
    for e, v in enumerate(words):
        lines += [f"@%p{e % W} mov.b32 %v, {v};", f"@%p{e % W} st.shared.b32 [%tb+{128 * e}], %v;"]
    lines += [f"bar.sync {gemv_ring.BAR_ID}, {32 * W};", "mov.u32 $0, 0;", "}"]
    return "\n".join(lines)


@triton.jit
def _empty_kernel(ptr, flag):
    if flag == 12345:  # never: the kernel must not be empty for triton, nor write
        triton.language.store(ptr, 0)


def empty_launch_ms(n: int = 50) -> float:
    """Graph-replay milliseconds per launch of a kernel that does nothing, with the ring's grid and warps."""
    from benchutil import timed_graph
    buf = torch.zeros(1, device="cuda")
    grid = (3 * torch.cuda.get_device_properties(0).multi_processor_count,)
    return timed_graph(lambda: [_empty_kernel[grid](buf, 0, num_warps=8) for _ in range(n)]) / n


def host_costs(dt, N=12288, K=3072, n=2000):
    """Host time per call (a loop of ``n`` calls, before the synchronize) and wall time per call (after it) of a
    plan and of the registered op, with the ring and with the tensor-core GEMV, one token of a N x K weight."""
    import time

    from halfbyte.kernels import gemm4bit, launch

    w = (torch.randn(N, K, device="cuda") / K**0.5).to(dt)
    p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
    x = torch.randn(1, K, device="cuda", dtype=dt)
    bias = torch.randn(N, device="cuda", dtype=dt)
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__} (launch.DIRECT {launch.DIRECT}), "
          f"{N}x{K} {dt}, host / wall us per call over {n} calls")
    for ring in (True, False):
        gemv_ring.ENABLED = ring
        plan = gemm4bit.Plan(p, a, None, None, None, bias, N, K, 64, "nf4", dt)
        assert (plan._ring is not None) == ring
        gemv_ring._RINGS.clear()
        op = lambda: torch.ops.halfbyte.gemm_4bit(x, p, a, None, None, None, bias, [N, K], 64, "nf4")  # noqa: E731
        for name, fn in (("plan", lambda: plan(x, bias)), ("op", op)):
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / n * 1e6
            print(f"  {'ring' if ring else 'tensor-core'} {name}: host {host:.1f} us, wall {wall:.1f} us")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
