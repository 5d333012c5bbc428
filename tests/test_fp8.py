"""The opt-in fp8 compute mode (``halfbyte.set_fp8_compute``; definitions in ``halfbyte.formats.fp8``).

Both tiers: the Triton kernels (weight decode to e4m3 with row scales, activation row quantization) against the
reference bit for bit, the e4m3 rounding over every e4m3 value and midpoint (on the GPU this checks that triton's
conversion is round-to-nearest-even with saturation; on the CPU, the interpreter's emulation), the layer's output
within the bounds derived below, and the mode's switches and errors. The GPU tier adds the FLUX/T5 shapes,
cuBLAS's scaled matmul and a compiled layer."""

import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import CUDA, DEV, FLUX_T5, gpu
from torch import nn

import halfbyte
from halfbyte.formats import blockwise, fourbit
from halfbyte.formats import fp8 as ref
from halfbyte.kernels import fp8 as k8
from halfbyte.kernels.common import USE_PTX


@triton.jit
def _encode_kernel(v_ptr, o_ptr, n, BLOCK: tl.constexpr, USE_PTX: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(o_ptr + i, k8._e4m3_bits(tl.load(v_ptr + i, mask=i < n, other=0.0), USE_PTX), mask=i < n)


def _e4m3_probe_values() -> torch.Tensor:
    """Every finite e4m3 value, every midpoint between neighbours and the float32 values just beside each
    midpoint, and values past the range (saturate), below the smallest subnormal, and signed zeros."""
    v = torch.arange(256, dtype=torch.uint8).view(ref.E4M3).float()
    s = v[torch.isfinite(v)].unique().sort().values
    mids = (s[1:] + s[:-1]) / 2
    up, down = mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-float("inf")))
    extra = torch.tensor([448.0, 464.0, 480.0, 1e6, -1e30, 2.0**-10, -(2.0**-10), 3 * 2.0**-11, 1e-30, 0.0, -0.0])
    return torch.cat([s, mids, up, down, extra])


def test_e4m3_rounding_is_nearest_even_saturating():
    vals = _e4m3_probe_values().to(DEV)
    out = torch.empty(vals.numel(), dtype=torch.uint8, device=DEV)
    _encode_kernel[(triton.cdiv(vals.numel(), 1024),)](vals, out, vals.numel(), BLOCK=1024, USE_PTX=USE_PTX)
    want = ref.e4m3(vals.cpu()).view(torch.uint8)
    assert torch.equal(out.cpu(), want)
    assert ref.e4m3(torch.tensor([1.0625, 1.1875, 500.0, -1e9])).tolist() == [1.0, 1.25, 448.0, -448.0]


def _weight(N, K, bs, qt, nested):
    w = torch.randn(N, K, device=DEV) / K**0.5
    w[:2] *= 1e-3  # rows whose scale is far below the others: small e4m3 values, subnormals
    w[2, : bs * 2] = 0  # an all-zero block
    packed, absmax = fourbit.quantize_4bit(w, bs, qt)
    if not nested:
        return packed, (absmax, None, None, None), absmax
    q, nested_absmax, offset = blockwise.double_quantize(absmax)
    return packed, (q, nested_absmax, None, offset), blockwise.double_dequantize(q, nested_absmax, offset)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("qt,bs", [("nf4", 64), ("fp4", 32), ("nf4", 256)])
def test_weight_decode_matches_reference(qt, bs, nested):
    N, K = 24, 8 * bs
    packed, stats, am = _weight(N, K, bs, qt, nested)
    w8, sw = k8.dequantize_4bit_fp8(packed, *stats, bs, qt, N, K)
    w8r, swr = ref.dequantize_4bit_fp8(packed.cpu(), am.cpu(), bs, qt, (N, K))
    assert w8.dtype == ref.E4M3 and w8.shape == (N, K) and sw.shape == (N,)
    assert torch.equal(w8.cpu().view(torch.uint8), w8r.view(torch.uint8))
    assert torch.equal(sw.cpu(), swr)
    # the definition's promise: W8 * sw is the 4-bit weight within e4m3's rounding (half a quantum per value)
    W = fourbit.dequantize_4bit(packed.cpu(), am.cpu(), bs, qt, (N, K), torch.float32).double()
    approx = w8r.double() * swr.double()[:, None]
    quantum = torch.maximum(W.abs() * 2.0**-4, swr.double()[:, None] * 2.0**-10)
    assert ((approx - W).abs() <= quantum * (1 + 2.0**-20)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_activation_quantization_matches_reference(dtype):
    x = (torch.randn(9, 3000) * torch.logspace(-6, 2, 3000)).to(dtype)
    x[3] = 0  # a zero row: scale 0, all codes 0
    x[4, :4] = torch.tensor([1e-3, -2.0**-14, 0.5, -0.0]).to(dtype)
    x8, sx = k8.quantize_rows_fp8(x.to(DEV))
    x8r, sxr = ref.quantize_rows_fp8(x)
    assert torch.equal(x8.cpu().view(torch.uint8), x8r.view(torch.uint8)) and torch.equal(sx.cpu(), sxr)
    assert sxr[3] == 0 and (x8r[3].view(torch.uint8) == 0).all()
    with pytest.raises(ValueError, match="2-d"):
        k8.quantize_rows_fp8(x.to(DEV)[None])


def assert_within_fp8_bounds(out, x, W, bias, x8, sx, w8, sw, same_operands=True):
    """``out`` (from fp8 compute) against two exact float64 results.

    1. The fp8 operands' own product y8 = (x8 sx) @ (w8 sw)^T + b: cuBLAS and the reference form the products
       exactly in float32 (4-bit mantissas), add K of them and the bias in float32 in some order, scale twice and
       round once to bfloat16: |out - y8| <= 2(K+4)u * S8 + 2^-8 |y8| + tiny, S8 = |x8 sx| @ |w8 sw|^T + |b|,
       u = 2^-24 (the same argument as ``test_kernels.assert_within_fp32_sum_bound``).
    2. The exact layer y = x @ W^T + b: each operand's e4m3 rounding errs by at most half a quantum, e_x =
       max(2^-4 |x|, 2^-10 sx) and e_w = max(2^-4 |W|, 2^-10 sw), so |y8 - y| <= e_x @ |W|^T + |x| @ e_w^T + e_x @
       e_w^T, on top of bound 1. This is the precision the mode trades for speed.
    ``same_operands=False`` (a compiled graph, whose Inductor-generated activation quantization may round 448 / amax
    differently by an ulp, and so a tie of e4m3 the other way) checks bound 2 only.
    """
    xd, Wd, x8d, w8d = x.double(), W.double(), x8.double() * sx.double()[:, None], w8.double() * sw.double()[:, None]
    b = torch.zeros(W.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.bfloat16).double()
    y8 = x8d @ w8d.T + b
    S8 = x8d.abs() @ w8d.abs().T + b.abs()
    K = x.shape[1]
    tiny = torch.finfo(torch.bfloat16).smallest_normal * torch.finfo(torch.bfloat16).eps
    tol8 = 2 * (K + 4) * 2.0**-24 * S8 + 2.0**-8 * y8.abs() + tiny
    o = out.double().reshape(y8.shape)
    assert torch.isfinite(o).all()
    if same_operands:
        assert ((o - y8).abs() <= tol8).all(), f"max excess {((o - y8).abs() - tol8).max().item():.3g}"
    ex = torch.maximum(xd.abs() * 2.0**-4, sx.double()[:, None] * 2.0**-10)
    ew = torch.maximum(Wd.abs() * 2.0**-4, sw.double()[:, None] * 2.0**-10)
    y = xd @ Wd.T + b
    tol = tol8 + ex @ Wd.abs().T + xd.abs() @ ew.T + ex @ ew.T
    assert ((o - y).abs() <= tol).all(), f"max excess {((o - y).abs() - tol).max().item():.3g}"


def _layer(N, K, nested, dtype=torch.bfloat16, bias=True):
    lin = nn.Linear(K, N, bias=bias, device=DEV)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, device=DEV) / K**0.5)
    return halfbyte.Linear4bit.from_linear(lin.to(dtype), quant_type="nf4", double_quant=nested).requires_grad_(False)


def _check_layer(q, x, out, same_operands=True):
    am = halfbyte.ops.decode_absmax(*q.quant_stats()).cpu()
    N, K = q.shape
    W = fourbit.dequantize_4bit(q.weight.cpu(), am, q.blocksize, q.quant_type, (N, K), torch.float32)
    x2 = x.reshape(-1, K).cpu()
    x8, sx = ref.quantize_rows_fp8(x2)
    w8, sw = ref.dequantize_4bit_fp8(q.weight.cpu(), am, q.blocksize, q.quant_type, (N, K))
    bias = None if q.bias is None else q.bias.cpu()
    assert_within_fp8_bounds(out.reshape(-1, N).cpu(), x2.float(), W, bias, x8, sx, w8, sw, same_operands)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@torch.no_grad()
def test_layer_in_fp8_compute(dtype, nested):
    q = _layer(48, 256, nested, dtype)
    model = nn.Sequential(q)
    assert halfbyte.set_fp8_compute(model) == ["0"] and q.fp8_compute and "fp8_compute=True" in repr(q)
    x = torch.randn(2, 40, 256, device=DEV).to(dtype)
    out = model(x)
    assert out.shape == (2, 40, 48) and out.dtype == dtype
    _check_layer(q, x, out)
    few = x[:1, :64]  # 64 tokens: the exact path, bit for bit
    exact = model(few)
    assert halfbyte.set_fp8_compute(model, False) == ["0"] and not q.fp8_compute
    assert torch.equal(model(few), exact)
    assert set_state(q) == set_state(_layer(48, 256, nested, dtype))  # nothing of the mode is saved


def set_state(layer):
    return {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}


def test_set_fp8_compute_leaves_odd_layers_and_refuses_training():
    model = nn.Sequential(_layer(48, 96, False), _layer(40, 128, False), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"0 \(48x96, blocksize 64\), 1 \(40x128"):
        assert halfbyte.set_fp8_compute(model) == []
    model = nn.Sequential(_layer(48, 128, False))
    halfbyte.set_fp8_compute(model)
    x = torch.randn(80, 128, device=DEV, requires_grad=True)
    with pytest.raises(RuntimeError, match="fp8 compute is for inference"):
        model(x)
    with torch.no_grad():
        _check_layer(model[0], x.detach(), model(x))
    with pytest.raises((RuntimeError, ValueError), match="input has 64 features"):
        torch.ops.halfbyte.gemm_4bit_fp8(x.detach()[:, :64], model[0].weight, *model[0].quant_stats(), None,
                                         [48, 128], 64, "nf4")


@torch.no_grad()
def test_op_reference_and_kernel_agree():
    """The op's body (the reference, any device) and its CUDA kernel (on a GPU) on the same call."""
    q = _layer(32, 192, True)
    x = torch.randn(70, 192, device=DEV, dtype=torch.bfloat16)
    args = (q.weight, *q.quant_stats(), q.bias, [32, 192], 64, "nf4")
    out = torch.ops.halfbyte.gemm_4bit_fp8(x, *args)
    _check_layer(q, x, out)
    if CUDA:
        cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        _check_layer(q, x, torch.ops.halfbyte.gemm_4bit_fp8(x.cpu(), *cpu_args))


@gpu
@pytest.mark.parametrize("shape", FLUX_T5, ids=lambda s: f"{s[0]}x{s[1]}")
@torch.no_grad()
def test_fp8_flux_t5_shapes(shape):
    N, K = shape
    for nested in (False, True):
        packed, stats, am = _weight(N, K, 64, "nf4", nested)
        w8, sw = k8.dequantize_4bit_fp8(packed, *stats, 64, "nf4", N, K)
        w8r, swr = ref.dequantize_4bit_fp8(packed.cpu(), am.cpu(), 64, "nf4", (N, K))
        assert torch.equal(w8.cpu().view(torch.uint8), w8r.view(torch.uint8)) and torch.equal(sw.cpu(), swr)
    q = _layer(N, K, False)
    x = torch.randn(300, K, device=DEV, dtype=torch.bfloat16) * 3
    x8, sx = k8.quantize_rows_fp8(x)
    x8r, sxr = ref.quantize_rows_fp8(x.cpu())
    assert torch.equal(x8.cpu().view(torch.uint8), x8r.view(torch.uint8)) and torch.equal(sx.cpu(), sxr)
    halfbyte.set_fp8_compute(q)
    out = q(x)  # the layer's plan (bound launches)
    _check_layer(q, x, out)
    op = torch.ops.halfbyte.gemm_4bit_fp8(x, q.weight, *q.quant_stats(), q.bias, [N, K], 64, "nf4")
    assert torch.equal(out, op)
    xt = torch.randn(K, 130, device=DEV, dtype=torch.bfloat16).T  # not contiguous: the op's path
    assert torch.equal(q(xt), torch.ops.halfbyte.gemm_4bit_fp8(xt, q.weight, *q.quant_stats(), q.bias, [N, K], 64,
                                                                "nf4"))


@gpu
@torch.no_grad()
def test_compiled_fp8_layer_one_graph_two_lengths():
    """fullgraph compile of a layer in fp8 compute (the weight decode launched by Inductor, the activations'
    quantization written in PyTorch and fused by it): one graph for two token counts, within the bounds."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    q = _layer(256, 512, True)
    halfbyte.set_fp8_compute(q)
    cnt = CompileCounterWithBackend("inductor")
    fn = torch.compile(q, backend=cnt, fullgraph=True)
    for M in (96, 160):
        x = torch.randn(M, 512, device=DEV, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        out = fn(x)
        _check_layer(q, x, out, same_operands=False)
    assert cnt.frame_count == 1


@gpu
def test_cuda_capability_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ValueError, match="capability 8.9"):
        halfbyte.set_fp8_compute(nn.Sequential(_layer(48, 128, False)))
