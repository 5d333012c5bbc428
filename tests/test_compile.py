"""torch.compile(fullgraph=True) of quantized FLUX and T5 blocks: one graph, no recompiles, eager's numbers.

Issue 4, item 3, the part a CPU can check (the speed part needs a GPU). The FLUX double block
(``FluxTransformerBlock``), the FLUX single block (``FluxSingleTransformerBlock``) and the first T5 encoder block
(the one that computes the relative attention bias, called as ``T5Stack`` calls it) of the tiny models of
``halfbyte.testing`` are quantized by ``halfbyte.quantize_`` (on the whole model, so its skip rules apply) to

* NF4 with double quantization, bfloat16 activations (FLUX's dtype; the double-quant path traces a superset of
  the plain one: the nested statistics and the dynamic map),
* LLM.int8() with threshold 6.0 and float16 activations (the diffusers guide's 8-bit setup; T5 keeps ``wo`` in
  float32 as its loader does). The inputs cross the threshold in some columns only, so the outlier decomposition
  runs (counted with hooks),

compiled with ``fullgraph=True`` and run at two sequence lengths. The sequence dimensions are marked dynamic
(``torch._dynamo.mark_dynamic``, which also fails if the trace specializes on them), so the second length must
reuse the first graph: dynamo's frame count stays 1 and its graph-break counter stays empty. Plain NF4 and FP4
(with a compute dtype) are compiled at the layer level, where the output must be bit-exact. ``int8_mixed_mm`` has a
fixed output shape, so 8-bit layers need no dynamic-shape flag; the op whose output size is data-dependent
(``int8_vectorwise_quant``'s outlier columns) is compiled on its own, with and without
``capture_dynamic_output_shape_ops``.

Backend: Inductor on the CPU, the backend users get. ``aot_eager`` would only check tracing and the fakes;
Inductor also re-derives the traced float code, which is where a real bug was found (double quantization's
dynamic map, traced and rebuilt by Inductor's ``linspace``, had 42 of its 256 values off by 1-2 ulp; it is now a
constant, ``halfbyte/formats/codebooks.py``). On 2 cores with an empty Inductor cache the file takes about 70 s, of
which about 20 s is Inductor's one-time start on the first block (15 s of it compiling probes for the CPU's vector
ISA); with a warm cache about 17 s.

Tolerances. The halfbyte ops are opaque to Inductor, so a compiled quantized layer returns eager's bits (asserted
exactly). In a block, Inductor fuses the float code around the ops (norms, RoPE, softmax, GELU, modulation,
residuals): it rounds once where eager rounds after every op, and reduces in another order. Behind a 4-bit layer,
which is weight-only, that stays a few ulps of the activation dtype at the output's magnitude: the unit is
eps(dtype) * max|eager|. An int8 layer quantizes its input, and an ulp there moves an int8 code by one where the
value sits near a rounding boundary (or moves it across the outlier threshold): the unit is one quantization step,
max|eager| / 127. Measured by running this file (``PYTHONPATH=. python tests/test_compile.py``) over 20 seeds
and both lengths: max |compiled - eager| was at most 2.3 units (NF4, FLUX double block; median 1.0) and 1.8 units
(int8); the tests allow ``TOL_UNITS`` = 5.
"""

import re

import pytest
import torch
import torch._dynamo
import transformers
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import halfbyte
from halfbyte import BitsAndBytesConfig
from halfbyte.formats.codebooks import dynamic_map
from halfbyte.nn import Linear4bit, Linear8bit
from halfbyte.testing import tiny_flux_transformer, tiny_t5_config

BACKEND = "inductor"
THRESHOLD = 6.0
#: (image tokens, text tokens) of the FLUX blocks; T5 uses the first number. Two lengths, one graph.
LENGTHS = [(16, 8), (24, 12)]
#: Allowed |compiled - eager| in units of the format (below); measured at most 2.3 (module docstring).
TOL_UNITS = 5
DEQUANT_KERNEL = r"_dequant_(words_)?kernel"  # the 4-bit dequantize kernels (kernels.fourbit.dequant_launch)

#: name -> (config, activation dtype, unit of |compiled - eager| as a fraction of max|eager|; module docstring).
FORMATS = {
    "nf4-dq-bf16": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                    torch.bfloat16, torch.finfo(torch.bfloat16).eps),
    "int8-fp16": (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=THRESHOLD), torch.float16, 1 / 127),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graphs, guards or counters left by another test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _flux_block(kind: str, config: BitsAndBytesConfig, dtype: torch.dtype):
    """A quantized FLUX block and ``inputs(length)`` -> its (args, kwargs), sequence dims marked dynamic."""
    model = halfbyte.quantize_(tiny_flux_transformer(seed=0, dtype=dtype), config)
    block = model.transformer_blocks[0] if kind == "double" else model.single_transformer_blocks[0]
    dim = model.inner_dim

    def inputs(length):
        n_img, n_txt = length
        hidden = torch.randn(1, n_img, dim).to(dtype)
        text = torch.randn(1, n_txt, dim).to(dtype)
        # A large conditioning embedding makes the AdaLayerNorm modulation large: with it, the attention and MLP
        # inputs of the int8 layers cross the threshold in a few columns.
        temb = (4 * torch.randn(1, dim)).to(dtype)
        # Position ids as FluxTransformer2DModel builds them: zeros for text, (0, row, col) for the image patches.
        rows = torch.arange(n_img) // 4
        img_ids = torch.stack([torch.zeros(n_img), rows.float(), (torch.arange(n_img) % 4).float()], dim=1)
        rope = model.pos_embed(torch.cat([torch.zeros(n_txt, 3), img_ids]))  # (cos, sin), each (n_txt + n_img, 16)
        for t in (hidden, text):
            torch._dynamo.mark_dynamic(t, 1)
        for t in rope:
            torch._dynamo.mark_dynamic(t, 0)
        return (hidden, text, temb, rope), {}

    return block, inputs


def _t5_block(config: BitsAndBytesConfig, dtype: torch.dtype):
    """The quantized first block of the tiny T5 encoder and ``inputs(length)`` -> (args, kwargs) as T5Stack
    passes them (no attention mask, as FluxPipeline encodes; the block computes the position bias)."""
    model = transformers.T5EncoderModel(transformers.T5Config(**tiny_t5_config()))
    block = model.encoder.block[0]
    # Outlier features (LLM.int8(), section 4) in two hidden channels: an RMS norm alone caps |x| at
    # sqrt(d_model) = 5.7, below the threshold, so those channels of each norm of the block get a gain of 8.
    for layer in block.layer:
        layer.layer_norm.weight.data[[3, 17]] = 8.0
    model = nn.Module.to(model, dtype).eval()
    if dtype == torch.float16:  # as from_pretrained(torch_dtype=float16) loads it (_keep_in_fp32_modules)
        block.layer[1].DenseReluDense.wo.float()
    halfbyte.quantize_(model, config)

    def inputs(length):
        hidden = torch.randn(1, length[0], model.config.d_model).to(dtype)
        torch._dynamo.mark_dynamic(hidden, 1)
        return (hidden, None, None, None, None, None), {"cache": None}

    return block, inputs


BLOCKS = {
    "flux-double": lambda config, dtype: _flux_block("double", config, dtype),
    "flux-single": lambda config, dtype: _flux_block("single", config, dtype),
    "t5": _t5_block,
}


def _eager_with_outlier_count(block: nn.Module, args, kwargs):
    """Eager outputs, and how many Linear8bit layers saw inputs with both outlier and ordinary columns."""
    mixed = []

    def count(layer, layer_args):
        x = layer_args[0].reshape(-1, layer.in_features)
        n_outlier_cols = int((x.abs() >= layer.threshold).any(dim=0).sum())
        mixed.append(0 < n_outlier_cols < layer.in_features)

    handles = [m.register_forward_pre_hook(count) for m in block.modules() if isinstance(m, Linear8bit)]
    try:
        out = block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, sum(mixed)


def _worst_difference(actual, expected, unit: float) -> float:
    """max |actual - expected| / (unit * max|expected|) over the outputs, which must match in structure, dtype
    and shape."""
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert [type(a) for a in actual] == [type(e) for e in expected]
    worst = 0.0
    for a, e in zip(actual, expected):
        if e is not None:
            assert (a.dtype, a.shape) == (e.dtype, e.shape)
            diff = (a.double() - e.double()).abs().max().item()
            worst = max(worst, diff / (unit * e.abs().max().item()))
    return worst


def _compile_and_compare(block_name: str, fmt: str) -> tuple[CompileCounterWithBackend, float, int]:
    """Compile the quantized block, run it at both lengths compiled and eagerly. Returns the compile counter, the
    worst difference (``_worst_difference``) and the number of int8 layers that ran the outlier decomposition at
    the first length."""
    config, dtype, unit = FORMATS[fmt]
    block, inputs = BLOCKS[block_name](config, dtype)
    assert any(isinstance(m, (Linear4bit, Linear8bit)) for m in block.modules())
    backend = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    worst, mixed = 0.0, []
    with torch.no_grad():
        for length in LENGTHS:
            args, kwargs = inputs(length)
            expected, n_mixed = _eager_with_outlier_count(block, args, kwargs)
            mixed.append(n_mixed)
            worst = max(worst, _worst_difference(compiled(*args, **kwargs), expected, unit))
    return backend, worst, mixed[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block_name", BLOCKS)
def test_quantized_block_compiles_to_one_graph(block_name, fmt):
    backend, worst, n_mixed = _compile_and_compare(block_name, fmt)
    assert backend.frame_count == 1, "the second sequence length recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert worst <= TOL_UNITS, f"compiled differs from eager by {worst:.2f} units of max|eager|"
    if FORMATS[fmt][0].load_in_8bit:
        assert n_mixed > 0, "no int8 layer ran the outlier decomposition"


class _FanOut(nn.ModuleList):
    def forward(self, x):
        return tuple(layer(x) for layer in self)


def test_quantized_linears_are_bit_exact():
    """Compiled layers return eager's bits: the ops are opaque, and the traced code around them only views the
    stored statistics (int32 bits as float32), casts, and reads the dynamic map (a constant)."""
    linear = nn.Linear(256, 64)
    layers = _FanOut([
        Linear4bit.from_linear(linear, quant_type="nf4"),
        Linear4bit.from_linear(linear, quant_type="nf4", double_quant=True),
        Linear4bit.from_linear(linear, quant_type="fp4", double_quant=True, compute_dtype=torch.bfloat16),
        Linear8bit.from_linear(linear, threshold=THRESHOLD),
    ])
    backend = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(layers, backend=backend, fullgraph=True)
    with torch.no_grad():
        for n_tokens in (5, 9):
            x = torch.randn(2, n_tokens, 256)
            x[..., [7, 200]] *= 4 * THRESHOLD  # two outlier columns for the int8 layer
            torch._dynamo.mark_dynamic(x, 1)
            for actual, expected in zip(compiled(x), layers(x), strict=True):
                torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert backend.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_dynamic_map_under_compile_is_eagers():
    """Double quantization's code table, read inside a compiled graph, is bit-identical to eager's (when Inductor
    traced its construction, its own ``linspace`` moved 42 of the 256 values by 1-2 ulp)."""
    compiled = torch.compile(lambda: dynamic_map("cpu"), backend=BACKEND, fullgraph=True)
    assert torch.equal(compiled(), dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantize_after_input_is_the_weight_and_compiles(double_quant):
    """``halfbyte::dequantize_4bit_after`` (the weight of a compiled layer, ordered after its input) returns the
    bytes of the layer's dequantize with the statistics in either storage (float32 or the layer's int32 bits), never
    reads the input, and compiles with ``fullgraph=True`` as one opaque call whose output feeds the matmul."""
    from halfbyte.nn import _code_table, _nested_code

    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(96, 40), quant_type="fp4", double_quant=double_quant)
    absmax, nested, ncode, offset = layer.quant_stats()
    expected = layer.dequantize().to(torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    for stats in ((absmax, nested, ncode, offset), (layer.absmax, layer.nested_absmax, ncode, layer.offset)):
        W = torch.ops.halfbyte.dequantize_4bit_after(x, layer.weight, *stats, 64, "fp4", [40, 96], torch.bfloat16)
        assert W.shape == (40, 96) and W.dtype == torch.bfloat16
        assert torch.equal(W, expected)
        fused = torch.ops.halfbyte.dequantize_4bit_fused(layer.weight, *stats, _code_table("fp4", x.device), 64,
                                                         "fp4", [40, 96], torch.bfloat16)
        assert torch.equal(W, fused)
    nan_input = torch.full_like(x, float("nan"))  # never read
    assert torch.equal(torch.ops.halfbyte.dequantize_4bit_after(nan_input, layer.weight, *stats, 64, "fp4",
                                                                [40, 96], torch.bfloat16), expected)
    with pytest.raises(RuntimeError, match="input has 95 features, weight expects 96"):
        torch.ops.halfbyte.dequantize_4bit_after(x[:, :95].to("meta"), layer.weight.to("meta"), *(
            None if t is None else t.to("meta") for t in stats), 64, "fp4", [40, 96], torch.bfloat16)

    def forward(x):
        W = torch.ops.halfbyte.dequantize_4bit_after(torch.relu(x), layer.weight, layer.absmax, layer.nested_absmax,
                                                     _nested_code(x.device) if double_quant else None, layer.offset,
                                                     64, "fp4", [40, 96], torch.bfloat16)
        return torch.nn.functional.linear(torch.relu(x), W)

    backend = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(forward, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), forward(x))
    assert backend.frame_count == 1 and not counters["graph_break"]


def test_dequantize_after_runs_after_its_input_on_the_matmuls_buffer():
    """Inductor places ``dequantize_4bit_after`` after the kernel that computes its input and hands it the buffer
    the matmul reads (no second store of the input), so the weight is live only from there to its matmul. The
    ordering this guards: Inductor's ``reorder_for_locality`` pass (on for inference) sinks each chain of pure
    producers to just before its consumer but never moves ``getitem`` nodes, so a weight built by a buffer and a
    kernel that fills it (``dequantize_4bit_fused``'s functional triton-kernel wrapper, read through ``getitem``)
    stays above activations computed after it in the program: the early 94 MB weight of BENCHMARKS.md, sessions
    18-19 (reproduced on the CPU with a mutating custom op filling a ``torch.empty``)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    T, D, H, N = 64, 64, 192, 32
    layer = Linear4bit.from_linear(nn.Linear(D + H, N, bias=False), quant_type="nf4")
    w1, w2 = torch.randn(D, D), torch.randn(D, H)

    def forward(x):
        c = torch.cat([x @ w1, nn.functional.gelu(x @ w2, approximate="tanh")], -1)
        W = torch.ops.halfbyte.dequantize_4bit_after(c, layer.weight, layer.absmax, None, None, None, 64, "nf4",
                                                     [N, D + H], torch.float32)
        return c @ W.t()

    x = torch.randn(T, D)
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(forward, backend=BACKEND, fullgraph=True), x)
    torch.testing.assert_close(out, forward(x))
    call = "".join(code).split("def call(")[1]
    lines = [ln.strip() for ln in call.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    op = next(i for i, ln in enumerate(lines) if "dequantize_4bit_after.default(" in ln)
    gelu = max(i for i, ln in enumerate(lines) if "gelu" in ln and "(" in ln and "=" not in ln)
    assert gelu < op, lines
    x_buf = lines[op].split("default(")[1].split(",")[0]
    assert any(ln.startswith("extern_kernels.mm(" + x_buf + ",") for ln in lines[op:]), lines


@pytest.mark.parametrize("capture", [False, True], ids=["default", "capture_dynamic_output_shape_ops"])
def test_int8_outlier_columns_compile_without_recompiles(capture):
    """``int8_vectorwise_quant`` returns as many outlier columns as the data holds (an unbacked size, from its
    fake's ``new_dynamic_size``): one graph serves inputs with 2 and with 5 such columns, with or without the flag
    that the diffusers guide sets."""

    def quantize_and_gather(x):
        CA, SCA, cols = torch.ops.halfbyte.int8_vectorwise_quant(x, THRESHOLD)
        return CA, SCA, cols, x[:, cols] * 2

    backend = CompileCounterWithBackend(BACKEND)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
        compiled = torch.compile(quantize_and_gather, backend=backend, fullgraph=True)
        for cols in ([3, 60], [0, 9, 17, 33, 63]):
            x = torch.randn(8, 64, dtype=torch.float16)
            x[:, cols] *= 4 * THRESHOLD
            actual, expected = compiled(x), quantize_and_gather(x)
            assert expected[2].tolist() == cols
            for a, e in zip(actual, expected, strict=True):
                torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert backend.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


if __name__ == "__main__":
    # Re-measures the differences quoted in the module docstring: PYTHONPATH=. python tests/test_compile.py (~3 min).
    for block_name in BLOCKS:
        for fmt in FORMATS:
            worst = []
            for seed in range(20):
                torch._dynamo.reset()
                torch.manual_seed(seed)
                worst.append(_compile_and_compare(block_name, fmt)[1])
            worst.sort()
            print(f"{block_name:12} {fmt:12} |compiled - eager| in units: max {worst[-1]:.2f}, median {worst[10]:.2f}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier: needs a CUDA device")
@pytest.mark.parametrize("mode", ["after", "launch", "auto"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_compiled_cuda_layer_dequantizes_in_graph(double_quant, mode, monkeypatch):
    """On CUDA, a compiled 4-bit layer over more tokens than the fused kernels serve dequantizes its weight in the
    graph (no opaque ``gemm_4bit`` call) and leaves the matmul to Inductor: through ``dequantize_4bit_after`` (the
    weight allocated once the input exists; "auto", the default, picks it for this 512 -> 256 layer) or a launch
    Inductor issues itself (``dequantize_4bit_fused``). One graph for two token counts, the dequantized weight
    bit-exact (both ops), the output within an ulp of eager's at its magnitude (Inductor may add the bias outside
    cuBLAS's epilogue). At 16 tokens it keeps ``gemm_4bit`` (the small-batch kernel), and the ops' CPU bodies are
    the reference."""
    from torch._inductor.utils import run_and_get_code

    from halfbyte import ops
    from halfbyte.kernels import fourbit as kf
    from halfbyte.kernels import gemm_small
    from halfbyte.nn import _code_table

    assert ops.FUSED_MAX_TOKENS == gemm_small.MAX_M
    dtype = torch.bfloat16 if double_quant else torch.float16
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(512, 256), quant_type="nf4", double_quant=double_quant).cuda()
    absmax, nested, ncode, offset = layer.quant_stats()
    args = (layer.weight, absmax, nested, ncode, offset, _code_table("nf4", layer.weight.device),
            64, "nf4", [256, 512], dtype)
    W = torch.ops.halfbyte.dequantize_4bit_fused(*args)
    assert torch.equal(W.view(-1), kf.dequantize(layer.weight, absmax, nested, ncode, offset, 64, "nf4", 256 * 512,
                                                   dtype))
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    assert torch.equal(torch.ops.halfbyte.dequantize_4bit_fused(*cpu_args), W.cpu())
    # The statistics as the layer stores them (float32 as int32 bits), as the compiled forward passes them
    bits = (layer.weight, layer.absmax, layer.nested_absmax, ncode, layer.offset, *args[5:])
    assert torch.equal(torch.ops.halfbyte.dequantize_4bit_fused(*bits), W)
    cpu_bits = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in bits)
    assert torch.equal(torch.ops.halfbyte.dequantize_4bit_fused(*cpu_bits), W.cpu())
    x0 = torch.randn(3, 512, device="cuda", dtype=dtype)
    for stats in (args[1:5], bits[1:5]):
        after = torch.ops.halfbyte.dequantize_4bit_after(x0, layer.weight, *stats, 64, "nf4", [256, 512], dtype)
        assert torch.equal(after, W)
    monkeypatch.setattr(halfbyte.nn, "IN_GRAPH_DEQUANTIZE", mode)

    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        for M in (80, 130):
            x = torch.randn(2, M, 512, device="cuda", dtype=dtype)
            torch._dynamo.mark_dynamic(x, 1)
            out = compiled(x)
            expected = layer(x)
            unit = torch.finfo(dtype).eps * expected.abs().max().item()
            assert (out.float() - expected.float()).abs().max().item() <= unit
        assert backend.frame_count == 1
        assert not counters["graph_break"], dict(counters["graph_break"])
        # run_and_get_code resets dynamo: the generated code, after the counts above
        _, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
        launched = "_dequant_words_kernel" if mode == "launch" else "dequantize_4bit_after"  # auto: this narrows
        assert launched in "".join(code) and "gemm_4bit" not in "".join(code)
        assert "view.dtype" not in "".join(code)  # the kernel reads the int32-stored statistics as float32
        _, code = run_and_get_code(torch.compile(layer, fullgraph=True), x[0, :16])
        assert "gemm_4bit" in "".join(code)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x), approximate="tanh"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier: needs a CUDA device")
def test_compiled_mlp_down_weight_lives_only_at_its_matmul():
    """A compiled NF4 MLP at FLUX's widths (3072 -> 12288 -> 3072, 1024 tokens) under the default
    ``IN_GRAPH_DEQUANTIZE = "auto"``: the up-projection's weight comes from a launch Inductor issues, the
    down-projection's (a narrowing layer) from ``dequantize_4bit_after``, which allocates it when it runs, and the
    GELU output is stored once (the op takes the matmul's own buffer; with the default exact-strides constraint
    Inductor stored it twice). On Hopper both layers call ``gemm_4bit`` instead (1024 tokens), whose fused GEMM
    never writes a weight out (``kernels.gemm_ring``): the bound below holds a fortiori.

    Memory: a later call's peak above what was allocated before it (weights, input) stays within the largest set
    live in the eager order, max(W_up + up, up + h, h + W_down + out) = 107 MB (bf16 bytes of the dequantized
    weights W, the up-projection's output ``up``, the GELU output ``h`` and the output), plus 4 MiB for the
    allocator's unsplit blocks (a block with under 1 MiB to spare is handed out whole). The down weight allocated
    early would add 75.5 MB: beside ``up`` and ``h`` (126 MB) or beside W_up and ``up`` (176 MB)."""
    from torch._inductor.utils import run_and_get_code

    dim, hidden, M = 3072, 12288, 1024
    torch.manual_seed(0)
    mlp = _Mlp(dim, hidden).to("cuda", torch.bfloat16)
    halfbyte.quantize_(mlp, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert halfbyte.nn.IN_GRAPH_DEQUANTIZE == "auto"
    x = torch.randn(1, M, dim, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(mlp, fullgraph=True)
    with torch.no_grad():
        want = mlp(x)
        compiled(x)
        compiled(x)  # the op's launch is bound on a weight's second call
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = compiled(x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    unit = torch.finfo(torch.bfloat16).eps * want.abs().max().item()  # Inductor fuses the GELU: module docstring
    assert (out.float() - want.float()).abs().max().item() <= TOL_UNITS * unit
    W, act, y = hidden * dim * 2, M * hidden * 2, M * dim * 2
    bound = max(W + act, 2 * act, act + W + y)
    assert peak <= bound + (4 << 20), f"peak {peak / 1e6:.1f} MB above the weights, bound {bound / 1e6:.1f} MB"

    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(mlp, fullgraph=True), x)
    code = "".join(code)
    if halfbyte.ops.fused_gemm_tokens(hidden, dim, 64, "nf4", x.device) >= M:  # Hopper: both take the fused GEMM
        assert code.count("gemm_4bit.default(") == 2 and not re.search(DEQUANT_KERNEL, code)
        assert "dequantize_4bit_after" not in code
    else:
        assert code.count("dequantize_4bit_after.default(") == 1 and re.search(DEQUANT_KERNEL, code)
        assert "gemm_4bit" not in code
    gelu = [k for k in code.split("async_compile.triton(")[1:] if "tanh" in k.split("''', device_str")[0]]
    assert gelu and all(k.split("''', device_str")[0].count("tl.store(") == 1 for k in gelu)
