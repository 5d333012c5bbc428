"""Whether a 4-bit weight's dequantize hides under attention when it runs on a second stream, one GPU.

    python bench/attn_overlap.py [--tokens 4608] [--weights 15360x3072 ...] [--json out.json]

Session 4 put the next layer's dequantize beside the current layer's cuBLAS GEMM and found nothing to gain: the
GEMM holds every SM. Attention is the other compute-bound kernel of a FLUX step (23 ms of 171 at 1024x1024) and reads
little memory, so a memory-bound dequantize might share its SMs. Here, for FLUX's attention (1 x 24 heads x tokens x
128, bf16) under each SDPA backend, and for the weights a FLUX block multiplies after its attention (default: a
single block's proj_out 3072 x 15360, and a double block's to_out + ff, 3072 x 3072 + 12288 x 3072 + 3072 x 12288):
attention alone, the dequantizes alone, both one after the other, and both forked onto two streams (the dequantizes
on a side stream of high priority or of the default priority, enqueued after the attention), CUDA graph replay, ms
(and eager, serial against forked at high priority, host launches included).
The last column, the whole of what a block would do after the fork: attention, then a GEMM of each dequantized weight
over the attention's tokens, serial against forked. Bits of the forked dequantize are checked against the serial one.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from benchutil import timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import fourbit  # noqa: E402
from halfbyte.kernels.launch import launch  # noqa: E402

SETS = {"single proj_out": [(3072, 15360)], "double to_out+ff": [(3072, 3072), (12288, 3072), (3072, 12288)]}


def backends():
    from torch.nn.attention import SDPBackend

    return {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_fn(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def weights(shapes):
    """One NF4 weight per (N, K): its launch into a preallocated bf16 (N, K) buffer."""
    out = []
    for N, K in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        packed, absmax = fourbit.quantize_4bit(w, 64, "nf4")
        buf = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        kernel, grid, args, kwargs = fourbit.dequant_launch(packed.view(-1), absmax, None, None, None, 64, "nf4",
                                                            N * K, buf.view(-1))
        out.append((buf, lambda kernel=kernel, grid=grid, args=args, kwargs=kwargs: launch(kernel, grid, *args,
                                                                                           **kwargs)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--weights", nargs="*", help="NxK ... (one set)")
    ap.add_argument("--json")
    a = ap.parse_args()
    sets = {"custom": [tuple(int(v) for v in s.split("x")) for s in a.weights]} if a.weights else SETS
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 24, a.tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    x = torch.randn(a.tokens, 15360, device="cuda", dtype=torch.bfloat16)
    lo, hi = torch.cuda.Stream.priority_range()
    streams = {"high": torch.cuda.Stream(priority=hi), "normal": torch.cuda.Stream(priority=lo)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.tokens} tokens, stream priorities "
          f"{lo}..{hi}")
    print("| weights | SDPA | attention | dequantize | serial | forked, high / normal | eager: serial / forked | "
          "block: serial / forked |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with torch.inference_mode():
        for name, shapes in sets.items():
            ws = weights(shapes)

            def deq(ws=ws):
                for _, fn in ws:
                    fn()
            deq()
            serial_bits = [b.clone() for b, _ in ws]
            for bname, backend in backends().items():
                attn = attention_fn(q, k, v, backend)
                try:
                    attn()
                except RuntimeError as e:
                    print(f"| {name} | {bname} | unavailable: {str(e).splitlines()[0][:60]} |")
                    continue

                def gemms(o, ws=ws):
                    t = o.transpose(1, 2).reshape(a.tokens, -1)  # (tokens, 3072)
                    for b, _ in ws:
                        inp = t if b.shape[1] == t.shape[1] else x[:, :b.shape[1]]
                        F.linear(inp, b)

                def serial(attn=attn, deq=deq):
                    o = attn()
                    deq()
                    return o

                def forked(s, attn=attn, deq=deq):
                    main = torch.cuda.current_stream()
                    s.wait_stream(main)
                    o = attn()
                    with torch.cuda.stream(s):
                        deq()
                    main.wait_stream(s)
                    return o

                r = {"weights": name, "sdpa": bname, "attention": timed_graph(attn), "dequantize": timed_graph(deq),
                     "serial": timed_graph(serial)}
                for pname, s in streams.items():
                    for b, _ in ws:
                        b.zero_()
                    r[f"forked_{pname}"] = timed_graph(lambda s=s, forked=forked: forked(s))
                    assert all(torch.equal(b, ref) for (b, _), ref in zip(ws, serial_bits, strict=True))
                r["eager_serial"] = triton.testing.do_bench(serial, return_mode="median")
                r["eager_forked"] = triton.testing.do_bench(lambda forked=forked: forked(streams["high"]),
                                                            return_mode="median")
                r["block_serial"] = timed_graph(lambda serial=serial, gemms=gemms: gemms(serial()))
                r["block_forked"] = timed_graph(lambda forked=forked, gemms=gemms: gemms(forked(streams["high"])))
                rows.append(r)
                print(f"| {name} | {bname} | {r['attention']:.4f} | {r['dequantize']:.4f} | {r['serial']:.4f} | "
                      f"{r['forked_high']:.4f} / {r['forked_normal']:.4f} | {r['eager_serial']:.4f} / "
                      f"{r['eager_forked']:.4f} | {r['block_serial']:.4f} / {r['block_forked']:.4f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
