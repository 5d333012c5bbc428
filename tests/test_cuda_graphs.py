"""Quantized layers inside CUDA graphs: captured eagerly (``torch.cuda.graph``) and through
``torch.compile(mode="reduce-overhead")``. Every launch of the 4-bit and LLM.int8() paths is asynchronous (no host
sync, not even for the data-dependent outlier columns, whose count the kernels read on the device), so a replay
computes the layer for whatever the captured input buffer holds, including a different set of outlier columns.
bitsandbytes' LLM.int8() layer cannot be captured (its outlier path syncs with the host)."""

import pytest
import torch

import halfbyte

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="GPU tier: needs a CUDA device")]


def _layers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384, dtype=torch.bfloat16, device="cuda")
    return {"nf4": halfbyte.Linear4bit.from_linear(lin), "nf4-dq": halfbyte.Linear4bit.from_linear(lin,
                                                                                                   double_quant=True),
            "int8": halfbyte.Linear8bit.from_linear(lin, threshold=6.0),
            "int8-t0": halfbyte.Linear8bit.from_linear(lin, threshold=0.0)}


def _input(M, outlier_cols, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, 512, device="cuda", generator=g)
    x[:, outlier_cols] *= 20
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8", "int8-t0"])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_layer_replays_in_a_cuda_graph(kind, M):
    layer = _layers()[kind].requires_grad_(False)
    static = _input(M, [3, 100], seed=1)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph's docs ask: builds the plans
            for _ in range(3):
                layer(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = layer(static)
        for seed, cols in ((2, [7]), (3, [5, 200, 511]), (4, [])):  # other data, other outlier columns
            new = _input(M, cols, seed)
            static.copy_(new)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, layer(new)), (kind, M, cols)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_reduce_overhead_compile(kind):
    layer = _layers()[kind].requires_grad_(False)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed, cols in ((1, [3]), (2, [9, 10]), (3, []), (4, [400]), (5, [1, 2])):  # warm-up, record, replays
            x = _input(64, cols, seed)
            assert torch.equal(compiled(x).clone(), layer(x)), (kind, cols)
