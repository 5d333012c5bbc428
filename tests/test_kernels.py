"""Triton kernels (halfbyte.kernels) vs their pure-PyTorch references and bitsandbytes' CUDA goldens.

Two tiers. Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes (the CI tier, with the
fast-math emulation of ``kernels.common``); with a GPU the same tests run compiled, plus the ``gpu``-marked tests
over FLUX / T5-XXL layer shapes, odd K and M up to 8192. Quantize and dequantize must be bit-exact; the fused
4-bit matmul must stay within the float32-accumulation bound derived at ``assert_within_fp32_sum_bound``.
"""

import pytest
import torch
from kernel_helpers import BLOCKSIZES, CUDA, DEV, DTYPES, FLUX_T5, IGNORE_NUMPY_WARNINGS, bits, gpu

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from halfbyte import ops  # noqa: E402
from halfbyte.formats import blockwise, fourbit  # noqa: E402
from halfbyte.formats.fastmath import rcp_approx  # noqa: E402
from halfbyte.kernels import common, gemm4bit, gemv  # noqa: E402
from halfbyte.kernels import fourbit as k4  # noqa: E402

pytestmark = IGNORE_NUMPY_WARNINGS


@triton.jit
def _fastmath_kernel(x_ptr, rcp_ptr, rint_ptr, s32_ptr, delta_ptr, n, BLOCK: tl.constexpr, USE_PTX: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(rcp_ptr + offs, common.rcp_approx(x, delta_ptr, USE_PTX), mask=offs < n)
    tl.store(rint_ptr + offs, common.rint(x, USE_PTX), mask=offs < n)
    tl.store(s32_ptr + offs, common.rint_s32(x, USE_PTX), mask=offs < n)


def _fastmath(x: torch.Tensor, s32: bool = False):
    r, q, i = torch.empty_like(x), torch.empty_like(x), torch.empty(x.shape, dtype=torch.int32, device=x.device)
    _fastmath_kernel[(triton.cdiv(x.numel(), 4096),)](x, r, q, i, common.rcp_table(x.device), x.numel(), BLOCK=4096,
                                                      USE_PTX=common.USE_PTX)
    return (r, q, i) if s32 else (r, q)


def _special_floats() -> torch.Tensor:
    f32 = torch.finfo(torch.float32)
    vals = [0.0, -0.0, 1.0, -1.0, 3.0, 0.5, 1.5, 2.5, -2.5, 126.5, -127.5, 8388607.5, 2.0**23, 2.0**24 + 2,
            f32.tiny, f32.tiny / 2, -f32.tiny / 8, 2.0**125, 2.0**126, -(2.0**126), 2.0**126 * 1.5, -(2.0**127),
            f32.max, f32.min,
            float("inf"), float("-inf"), float("nan")]
    return torch.tensor(vals, dtype=torch.float32)


def test_fastmath_matches_emulation():
    """rcp.approx.ftz (PTX on the GPU, the ulp table when interpreting) and rint agree with formats.fastmath."""
    x = torch.cat([_special_floats(), torch.randn(3000) * 10.0 ** torch.randint(-30, 30, (3000,))]).to(DEV)
    r, q = _fastmath(x)
    # |a| = 2**126 (in _special_floats): the H100 (run 2026-11-26) returns the normal 2**-126, as both now do.
    edge = x.abs() == 2.0**126
    assert edge.any() and torch.equal(r[edge], torch.copysign(torch.full_like(r[edge], 2.0**-126), x[edge]))
    assert torch.equal(bits(r), bits(rcp_approx(x)))
    assert torch.equal(q.nan_to_num(), torch.round(x).nan_to_num())


def test_rint_s32_rounds_saturates_and_zeroes_nan():
    """``cvt.rni.s32.f32`` (the int8 codes' rounding): half to even, NaN -> 0, past the int32 range saturated."""
    big = [2.0**31, -(2.0**31), 2.0**31 - 128, -(2.0**31) - 256, 3e9, -3e9]
    x = torch.cat([_special_floats(), torch.tensor(big), torch.randn(3000) * 10.0 ** torch.randint(-3, 10, (3000,))])
    x = x.to(DEV)
    q = _fastmath(x, s32=True)[2]
    want = torch.round(x.double()).nan_to_num(0.0, posinf=2**31 - 1, neginf=-(2**31)).clamp(-(2**31), 2**31 - 1)
    assert torch.equal(q.long(), want.long())


@pytest.mark.parametrize("n", [1, 1000, 3073])
def test_zero_launch_zeroes_exactly_its_tensor(n):
    """The workspace zeroing of the int8 plans: every element of the view, nothing past it."""
    buf = torch.full((n + 8,), 7, dtype=torch.int32, device=DEV)
    fn, grid, args, kwargs = common.zero_launch(buf[:n])
    fn[grid](*args, **kwargs)
    assert not buf[:n].any() and (buf[n:] == 7).all()


@gpu
def test_rcp_table_is_this_gpus_rcp_approx():
    """All 2**23 mantissas: the stored table (measured once on an H100) is what this GPU's MUFU.RCP returns."""
    m = (torch.arange(2**23, dtype=torch.int32, device=DEV) | 0x3F800000).view(torch.float32)
    assert torch.equal(bits(_fastmath(m)[0]), bits(rcp_approx(m)))


# --- 4-bit quantize / dequantize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [64, 4096] if not CUDA else BLOCKSIZES)
def test_quantize_4bit_matches_cuda_goldens(goldens, dn, qt, bs):
    """Bytes of bitsandbytes' CUDA kernel: threshold ties, an all-zero run, odd length 16421."""
    x = goldens[f"in.{dn}"].to(DEV)
    packed, absmax = k4.quantize_4bit(x, bs, qt)
    key = f"q4.{qt}.{dn}.bs{bs}"
    assert torch.equal(packed.cpu(), goldens[key + ".packed"])
    assert torch.equal(absmax.cpu(), goldens[key + ".absmax"])
    if bs in (64, 256):
        deq = k4.dequantize_4bit(packed, absmax, bs, qt, x.shape, x.dtype)
        # Equal values: CUDA decodes FP4 code 8 as -0.0, the reference's table (bnb's quant_map) holds +0.0.
        assert torch.equal(deq.cpu(), goldens[f"dq4.{qt}.{dn}.bs{bs}"])


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_quantize_4bit_nonfinite_matches_cuda_goldens(goldens, dn, qt):
    packed, absmax = k4.quantize_4bit(goldens[f"in_nonfinite.{dn}"].to(DEV), 64, qt)
    assert torch.equal(packed.cpu(), goldens[f"q4nf.{qt}.{dn}.bs64.packed"])
    assert torch.equal(bits(absmax.cpu()), bits(goldens[f"q4nf.{qt}.{dn}.bs64.absmax"]))


@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("n", [1, 2 * 97 + 1, 3000])
def test_4bit_kernels_match_reference_all_blocksizes(bs, n):
    """quantize, dequantize (plain and double-quantized absmax) bit-exact for odd and partial-block lengths."""
    x = torch.randn(n, device=DEV) * 4
    for qt in ("nf4", "fp4"):
        packed, absmax = fourbit.quantize_4bit(x, bs, qt)
        p2, a2 = k4.quantize_4bit(x, bs, qt)
        assert torch.equal(packed, p2) and torch.equal(absmax, a2)
        q, nested, offset = blockwise.double_quantize(absmax)
        am = blockwise.double_dequantize(q, nested, offset)
        for dt in DTYPES.values():
            ref = fourbit.dequantize_4bit(packed, absmax, bs, qt, (n,), dt)
            assert torch.equal(bits(k4.dequantize_4bit(packed, absmax, bs, qt, (n,), dt)), bits(ref))
            ref_dq = fourbit.dequantize_4bit(packed, am, bs, qt, (n,), dt)
            assert torch.equal(bits(k4.dequantize(packed, q, nested, None, offset, bs, qt, n, dt)), bits(ref_dq))
        # float32 statistics passed as their int32 bits (halfbyte.nn's storage) are read as float32
        i32 = [t.view(torch.int32) for t in (absmax, nested, offset)]
        assert torch.equal(bits(k4.dequantize(packed, i32[0], None, None, None, bs, qt, n, torch.float32)),
                           bits(fourbit.dequantize_4bit(packed, absmax, bs, qt, (n,), torch.float32)))
        assert torch.equal(bits(k4.dequantize(packed, q, i32[1], None, i32[2], bs, qt, n, torch.float32)),
                           bits(fourbit.dequantize_4bit(packed, am, bs, qt, (n,), torch.float32)))


@pytest.mark.parametrize("bs", [32, 64, 4096])
def test_dequantize_word_and_tile_kernels_give_the_same_bits(bs):
    """The word kernel (n % 8 == 0, 4-byte aligned packed data) and the tile kernel (the rest) give the reference's
    bits; packed data read from a view 4 bytes or 1 byte into a buffer takes the one or the other."""
    n = 2 * 4096 + 8 * 13
    x = torch.randn(n, device=DEV) * 3
    for qt in ("nf4", "fp4"):
        packed, absmax = fourbit.quantize_4bit(x, bs, qt)
        q, nested, offset = blockwise.double_quantize(absmax)
        for shift, kernel in ((4, k4._dequant_words_kernel), (1, k4._dequant_kernel)):
            buf = torch.zeros(packed.numel() + 8, dtype=torch.uint8, device=DEV)
            view = buf[shift:shift + packed.numel()]
            view.copy_(packed)
            out = torch.empty(n, device=DEV)
            assert k4.dequant_launch(view, absmax, None, None, None, bs, qt, n, out)[0] is kernel
            for dt in DTYPES.values():
                ref = fourbit.dequantize_4bit(packed, absmax, bs, qt, (n,), dt)
                assert torch.equal(bits(k4.dequantize(view, absmax, None, None, None, bs, qt, n, dt)), bits(ref))
                ref_dq = fourbit.dequantize_4bit(packed, blockwise.double_dequantize(q, nested, offset), bs, qt, (n,),
                                                 dt)
                assert torch.equal(bits(k4.dequantize(view, q, nested, None, offset, bs, qt, n, dt)), bits(ref_dq))
    # a length that is not whole words takes the tile kernel
    assert k4.dequant_launch(packed[:-1], absmax, None, None, None, bs, qt, n - 2, out)[0] is k4._dequant_kernel


def test_4bit_kernels_reject_bad_arguments():
    packed, absmax = k4.quantize_4bit(torch.randn(128, device=DEV), 64, "nf4")
    with pytest.raises(ValueError, match="blocksize"):
        k4.quantize_4bit(torch.randn(128, device=DEV), 48, "nf4")
    with pytest.raises(ValueError, match="absmax has"):
        k4.dequantize_4bit(packed, absmax[:1], 64, "nf4", (128,), torch.float32)
    with pytest.raises(ValueError, match="packed 4-bit data"):
        k4.dequantize_4bit(packed[:10], absmax, 64, "nf4", (128,), torch.float32)



@gpu
@pytest.mark.parametrize("shape", FLUX_T5, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dn", DTYPES)
def test_4bit_kernels_bit_exact_flux_t5_shapes(shape, dn):
    w = (torch.randn(shape, device=DEV) / shape[1] ** 0.5).to(DTYPES[dn])
    packed, absmax = fourbit.quantize_4bit(w, 64, "nf4")
    p2, a2 = k4.quantize_4bit(w, 64, "nf4")
    assert torch.equal(packed, p2) and torch.equal(absmax, a2)
    q, nested, offset = blockwise.double_quantize(absmax)
    ref = fourbit.dequantize_4bit(packed, blockwise.double_dequantize(q, nested, offset), 64, "nf4", shape, w.dtype)
    out = k4.dequantize(packed, q, nested, None, offset, 64, "nf4", w.numel(), w.dtype).view(shape)
    assert torch.equal(bits(out), bits(ref))


# --- 4-bit matmul ------------------------------------------------------------------------------------------------


def assert_within_fp32_sum_bound(out: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                                  unrounded_weights: bool = False, weight_terms: int | None = None):
    """|out - y| <= 2(K+3)u * (|x| @ |W|^T + |b|) + u_out * |y| (+ the output dtype's smallest subnormal), where
    y = x @ W^T + b in float64 with the dequantized weight W (rounded to x's dtype, as the reference).

    Derivation: the kernels and cuBLAS form each product x_k W_nk (exact in float32 for 16-bit inputs, one rounding
    for float32 inputs) and add K products and the bias in float32 in some order; any order errs by at most
    gamma_{K+2} * sum|terms| with u = 2^-24 (Higham, Accuracy and Stability, Thm 3.1; the factor 2 also covers
    tensor cores that truncate instead of rounding while accumulating). The result is then rounded once to the
    output dtype (relative error u_out: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32).

    ``unrounded_weights`` (the GEMV): the kernel computes with code * absmax unrounded, forming
    (sum_group code_k x_k) * absmax: one more rounding per term (hence K+3), and each weight differs from the
    reference's rounded W by at most u_x |W_exact| <= u_x / (1 - u_x) |W| (u_x: x's dtype's unit roundoff, the
    same 2^-8 / 2^-11 / 2^-24), which adds u_x / (1 - u_x) * |x| @ |W|^T. For 16-bit activations the GEMV's
    register tables hold the codes rounded to x's dtype (kernels.lut, kernels.gemv_mma; bitsandbytes' GEMV rounds
    its table to the activation dtype too): code_x * absmax differs from code * absmax by another u_x |W_exact|,
    so the weight term doubles.

    ``weight_terms`` (the fused GEMM, ``kernels.gemm_ring``): each weight differs from the reference's W by at most
    that many u_x / (1 - u_x) |W|. That kernel rounds the code, the absmax and their product to bf16, so its weight
    is within (1 + u)^3 - 1 of code * absmax, which W is within u of: 4u + 3u^2 + u^3 < 5u in all (``5``).
    """
    K = x.shape[-1]
    y = x.double() @ W.double().T
    s = x.double().abs() @ W.double().abs().T
    if bias is not None:
        y, s = y + bias.double(), s + bias.double().abs()
    u_out = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[out.dtype]
    tiny = torch.finfo(out.dtype).smallest_normal * torch.finfo(out.dtype).eps
    tol = 2 * (K + 3) * 2.0**-24 * s * (1 + u_out) + u_out * y.abs() + tiny
    if unrounded_weights or weight_terms:
        u_x = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[x.dtype]
        if not weight_terms:
            weight_terms = 2 if x.dtype in (torch.bfloat16, torch.float16) else 1
        tol = tol + weight_terms * u_x / (1 - u_x) * (x.double().abs() @ W.double().abs().T) * (1 + u_out)
    err = (out.double() - y).abs()
    assert torch.isfinite(out).all()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


def _quantized_linear(N, K, bs, qt, nested, dtype):
    w = torch.randn(N, K, device=DEV) / K**0.5
    packed, absmax = fourbit.quantize_4bit(w, bs, qt)
    if not nested:
        return packed, (absmax, None, None, None), absmax
    q, nested_absmax, offset = blockwise.double_quantize(absmax)
    return packed, (q, nested_absmax, None, offset), blockwise.double_dequantize(q, nested_absmax, offset)


def small_serves(x: torch.Tensor, packed: torch.Tensor, K: int, bs: int) -> bool:
    """Whether ``gemm_4bit`` hands this (..., K) input to the small-batch tensor-core kernel."""
    from halfbyte.kernels import gemm_small

    M = x.numel() // K
    N = packed.numel() * 2 // K
    return gemm_small.small_supported(M, N, K, x.dtype, bs, x.reshape(M, K).contiguous(), packed)


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_gemm_4bit_tiny(dn, nested):
    """GEMV (M = 1, default and another launch shape) and the small-batch kernel (M = 3, 16-bit x, blocksize 64)
    within the fp32 bound; M = 3 otherwise (dequantize + linear) bit-identical.

    Shapes: one N tile with K long enough to split K across programs (atomics), and two tiles at blocksize 32."""
    dtype = DTYPES[dn]
    for N, K, bs, qt in ((40, 2048, 64, "nf4"), (72, 128, 32, "fp4")):
        packed, stats, am = _quantized_linear(N, K, bs, qt, nested, dtype)
        W = fourbit.dequantize_4bit(packed, am, bs, qt, (N, K), dtype)
        bias = torch.randn(N, device=DEV).to(dtype) if nested else None
        for M in (1, 3):
            x = torch.randn(M, K, device=DEV).to(dtype)
            out = gemm4bit.gemm_4bit(x, packed, *stats, bias, [N, K], bs, qt)
            assert out.shape == (M, N) and out.dtype == dtype
            if M == 1:
                assert_within_fp32_sum_bound(out, x, W, bias, unrounded_weights=True)
                for cfg in (gemv.Config(64, 64, num_warps=8), gemv.Config(8, 128, xsplit=True)):
                    other = gemm4bit.gemv(x, packed, *stats, bias, N, K, bs, qt, cfg)
                    assert_within_fp32_sum_bound(other, x, W, bias, unrounded_weights=True)
            elif small_serves(x, packed, K, bs):
                assert dtype != torch.float32 and bs == 64
                assert_within_fp32_sum_bound(out, x, W, bias, unrounded_weights=True)
            else:
                assert torch.equal(bits(out), bits(torch.nn.functional.linear(x, W, bias)))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_dequantize_weight_tiny(nested):
    """``halfbyte::dequantize_4bit_after``'s CUDA kernel (``gemm4bit.dequantize_weight``) returns the reference's
    (N, K) weight bit for bit, with the input in the weight's dtype (a plan's bound launch from the second call, on
    a GPU) or in another one (the direct dequantize)."""
    N, K, bs, qt = 48, 192, 64, "nf4"
    for dtype in (torch.bfloat16, torch.float32):
        packed, stats, am = _quantized_linear(N, K, bs, qt, nested, dtype)
        want = fourbit.dequantize_4bit(packed, am, bs, qt, (N, K), dtype)
        for x_dtype in (dtype, torch.float16):
            x = torch.randn(5, K, device=DEV).to(x_dtype)
            for _ in range(3):
                W = gemm4bit.dequantize_weight(x, packed, *stats, bs, qt, [N, K], dtype)
                assert W.shape == (N, K) and W.dtype == dtype
                assert torch.equal(bits(W), bits(want))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_gemv_register_tables_tiny(nested):
    """bf16 GEMV through the register-table kernel (kernels.lut) at blocksizes whose absmax groups are 4 and 8
    words, with a K step that does not divide K's words evenly at first (the launch halves it), and the table-load
    kernel it falls back to when x is not 4-byte aligned; both within the bound."""
    for N, K, bs, qt in ((24, 1536, 32, "nf4"), (40, 640, 64, "fp4"), (9, 1024, 128, "nf4")):
        packed, stats, am = _quantized_linear(N, K, bs, qt, nested, torch.bfloat16)
        W = fourbit.dequantize_4bit(packed, am, bs, qt, (N, K), torch.bfloat16)
        bias = torch.randn(N, device=DEV).to(torch.bfloat16)
        x = torch.randn(1, K, device=DEV).to(torch.bfloat16)
        assert gemv.lut_supported(x.dtype, x, packed)
        out = gemm4bit.gemv(x, packed, *stats, bias, N, K, bs, qt)
        assert_within_fp32_sum_bound(out, x, W, bias, unrounded_weights=True)
        grid, steps, _, kw = gemv.gemv_lut_launch(N, K, bs, nested, True, x.device)
        assert kw["G"] == min(bs // 8, 8) and kw["NG"] * kw["G"] * steps * grid[1] == K // 8
        shifted = torch.empty(1, K + 1, device=DEV, dtype=torch.bfloat16)[:, 1:]  # 2 bytes past alignment
        shifted.copy_(x)
        assert not gemv.lut_supported(x.dtype, shifted, packed)
        other = gemm4bit.gemv(shifted, packed, *stats, bias, N, K, bs, qt)
        assert_within_fp32_sum_bound(other, x, W, bias, unrounded_weights=True)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_gemv_tensor_core_tiny(nested):
    """GEMV through the tensor-core kernel (kernels.gemv_mma): fp16 with odd N (clamped rows), a K step that must
    halve, blocksizes 64 and 128, split K; bf16 where K % 2048 == 0; within the bound, through the library's routing
    and through a plan. Blocksize 32 (an mma lane group would span two absmax blocks), fp16 with K % 512 != 0, bf16
    with K % 2048 != 0 and fp32 do not take it."""
    from halfbyte.kernels import gemv_mma

    for N, K, bs, qt, dtype in ((9, 1536, 64, "nf4", torch.float16), (24, 4096, 128, "fp4", torch.float16),
                                (5, 2048, 64, "nf4", torch.float16), (7, 2048, 64, "fp4", torch.bfloat16),
                                (13, 4096, 128, "nf4", torch.bfloat16)):
        packed, stats, am = _quantized_linear(N, K, bs, qt, nested, dtype)
        W = fourbit.dequantize_4bit(packed, am, bs, qt, (N, K), dtype)
        bias = torch.randn(N, device=DEV).to(dtype)
        x = torch.randn(1, K, device=DEV).to(dtype)
        assert gemv_mma.mma_supported(x.dtype, K, bs, x, packed)
        out = gemm4bit.gemv(x, packed, *stats, bias, N, K, bs, qt)
        assert_within_fp32_sum_bound(out, x, W, bias, unrounded_weights=True)
        if DEV == "cuda":  # plans bind launches on the GPU only
            plan = gemm4bit.Plan(packed, *stats, bias, N, K, bs, qt, dtype)
            assert_within_fp32_sum_bound(plan(x, bias), x, W, bias, unrounded_weights=True)
        grid, steps, _, kw = gemv_mma.mma_launch(N, K, bs, nested, True, x.device, dtype=dtype)
        assert kw["NG"] * 8 * steps * grid[1] == K // 8
    assert not gemv_mma.mma_supported(torch.float16, 2048, 32, x, packed)
    assert not gemv_mma.mma_supported(torch.float16, 640, 64, x, packed)
    assert not gemv_mma.mma_supported(torch.bfloat16, 3072, 64, x, packed)
    assert not gemv_mma.mma_supported(torch.float32, 2048, 64, x, packed)
    with pytest.raises(ValueError, match="smaller than 4 warps"):
        gemv_mma.mma_launch(64, 1024, 64, False, False, x.device, (2, 64, 4))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_gemm_small_tiny(nested):
    """The small-batch tensor-core kernel (kernels.gemm_small) within the bound: token counts inside one tile of 8,
    across tiles and across two passes (M = 2, 9, 33, 64), fp16 and bf16, blocksizes 64 and 128, odd N (clamped
    rows), K split across programs (atomics) or not, with and without a bias, through the routing where it takes
    these weights (up to 16 tokens below 2^24 weights) and (GPU) through a plan. Blocksize 32, K % 64 != 0, fp32,
    more tokens than ``max_m`` and a misaligned x do not take it."""
    from halfbyte.kernels import gemm_small

    cases = ((9, 128, 64, "nf4", torch.float16, 2, (8, 4, 1, 32)), (24, 256, 128, "fp4", torch.bfloat16, 9, None),
             (16, 512, 64, "nf4", torch.bfloat16, 33, (2, 2, 64, 16)), (5, 192, 64, "fp4", torch.float16, 64, None))
    split_seen = False
    for i, (N, K, bs, qt, dtype, M, cfg) in enumerate(cases):
        packed, stats, am = _quantized_linear(N, K, bs, qt, nested, dtype)
        W = fourbit.dequantize_4bit(packed, am, bs, qt, (N, K), dtype)
        data = packed.reshape(-1).view(torch.uint8)
        x = torch.randn(M, K, device=DEV).to(dtype)
        bias = torch.randn(N, device=DEV).to(dtype) if i % 2 else None
        assert gemm_small.small_supported(M, N, K, dtype, bs, x, data) == (M <= 16)
        out = gemm_small.mm_small(x, data, *stats, bias, N, K, bs, qt, cfg)
        assert out.shape == (M, N) and out.dtype == dtype
        assert_within_fp32_sum_bound(out, x, W, bias, unrounded_weights=True)
        if cfg is not None:  # the default launch shape too, through the routing where it applies
            routed = gemm4bit.gemm_4bit(x.view(1, M, K), packed, *stats, bias, [N, K], bs, qt)
            assert_within_fp32_sum_bound(routed.view(M, N), x, W, bias, unrounded_weights=True)
        if DEV == "cuda" and M <= 16:  # plans bind launches on the GPU only
            plan = gemm4bit.Plan(packed, *stats, bias, N, K, bs, qt, dtype)
            ref = gemm_small.mm_small(x, data, *stats, bias, N, K, bs, qt)
            assert plan(x, bias) is None  # not bound yet: the plan holds no tensor to bind with
            plan.bind_small(M, packed, *stats)
            assert torch.equal(bits(plan(x, bias)), bits(ref))
        grid, steps, partial, kw = gemm_small.small_launch(N, K, M, bs, nested, True, x.device, dtype, cfg)
        assert kw["NG"] * 64 * steps * grid[1] == K and grid[2] == triton.cdiv(M, 8 * kw["TT"])
        assert partial == (grid[1] > 1)
        split_seen = split_seen or partial
        again = gemm_small.mm_small(x, data, *stats, bias, N, K, bs, qt, cfg)
        assert torch.equal(bits(again), bits(out))  # no atomics: the same bits on every run
    assert split_seen  # (16, 512) with 2 groups per step: 4 K steps over 4 programs
    assert gemm_small.max_m(4096, 4096) == 64 and gemm_small.max_m(3072, 3072) == 16
    assert not gemm_small.small_supported(65, 4096, 4096, torch.float16, 64, x, data)
    assert not gemm_small.small_supported(17, 16, 128, torch.float16, 64, x, data)
    assert not gemm_small.small_supported(4, 16, 128, torch.float32, 64, x, data)
    assert not gemm_small.small_supported(4, 16, 128, torch.float16, 32, x, data)
    assert not gemm_small.small_supported(4, 16, 96, torch.float16, 32, x, data)
    shifted = torch.empty(4 * 128 + 1, device=DEV, dtype=torch.float16)[1:].view(4, 128)  # 2 bytes off
    assert not gemm_small.small_supported(4, 16, 128, torch.float16, 64, shifted, data)


def test_gemm_4bit_rejects_a_wrong_feature_count():
    """An input with K elements but another last dimension must not be taken for one token (the GEMV)."""
    packed, stats, _ = _quantized_linear(16, 128, 64, "nf4", False, torch.float32)
    with pytest.raises(ValueError, match="has 64 features, the 16x128 weight expects 128"):
        gemm4bit.gemm_4bit(torch.randn(2, 64, device=DEV), packed, *stats, None, [16, 128], 64, "nf4")


def test_gemm_4bit_fallbacks_and_leading_dims():
    """K % blocksize != 0 (a block straddles rows) and odd K go through dequantize + linear; 3-D input; a
    (1, 1, K) input takes the GEMV where K allows."""
    for N, K, bs in ((33, 95, 64), (16, 96, 64), (8, 130, 32), (16, 128, 64)):
        packed, stats, am = _quantized_linear(N, K, bs, "nf4", True, torch.float32)
        W = fourbit.dequantize_4bit(packed, am, bs, "nf4", (N, K), torch.bfloat16)
        x = torch.randn(2, 3, K, device=DEV).to(torch.bfloat16)
        out = gemm4bit.gemm_4bit(x, packed, *stats, None, [N, K], bs, "nf4")
        assert out.shape == (2, 3, N)
        if small_serves(x, packed, K, bs):  # (16, 128): six tokens, whole mma groups
            assert K == 128
            assert_within_fp32_sum_bound(out.view(6, N), x.view(6, K), W, None, unrounded_weights=True)
        else:
            assert torch.equal(bits(out), bits(torch.nn.functional.linear(x, W)))
        x1 = x[:1, :1]  # (1, 1, K): a single token takes the GEMV only when K % blocksize == 0
        out1 = gemm4bit.gemm_4bit(x1, packed, *stats, None, [N, K], bs, "nf4")
        if gemv.fused_supported(1, K, bs, x.dtype):
            assert_within_fp32_sum_bound(out1.view(1, N), x1.view(1, K), W, None, unrounded_weights=True)
        else:
            assert torch.equal(bits(out1), bits(torch.nn.functional.linear(x1, W)))


@gpu
@pytest.mark.parametrize("shape", FLUX_T5, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dn", ["bf16", "fp16"])
def test_gemm_4bit_flux_t5_shapes(shape, dn):
    """Double-quantized NF4 through the registered op at every token-count regime: the GEMV and the small-batch
    kernel within the bound; the fused GEMM (bf16 / fp16, 17-2048 tokens, Hopper) within its bound and with the bits of
    the weight's absmax decoded to float32; dequantize + cuBLAS bit-identical to ``F.linear``."""
    from halfbyte.kernels import gemm_ring

    dtype = DTYPES[dn]
    N, K = shape
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", True, dtype)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", shape, dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    ring = gemm_ring.supported(N, K, 64, "nf4", dtype, stats[0], packed, nested=stats[1:])
    for M in (1, 2, 16, 40, 64, 65, 512, 4608):
        x = torch.randn(M, K, device=DEV).to(dtype)
        out = torch.ops.halfbyte.gemm_4bit(x, packed, *stats, bias, [N, K], 64, "nf4")  # the registered kernel
        if M > 1 and ring and gemm_ring.wanted(M, N, K, gemm_ring.sms(x.get_device())):  # from 17 tokens
            assert_within_fp32_sum_bound(out, x, W, bias, weight_terms=5)
            assert torch.equal(out, gemm_ring.RingGemm(packed.reshape(-1), am, N, K, "nf4", None, dtype)(x, bias))
        elif M == 1 or small_serves(x, packed, K, 64):  # the GEMV and the small-batch kernel
            assert M <= 16 or N * K >= 2**24
            assert_within_fp32_sum_bound(out, x, W, bias, unrounded_weights=True)
        else:
            assert torch.equal(bits(out), bits(torch.nn.functional.linear(x, W, bias)))


@gpu
@pytest.mark.parametrize("M", [1, 7, 64, 8192])
def test_gemm_4bit_fp32_odd_k_and_large_m(M):
    for N, K in ((3072, 3072), (257, 4099)):
        packed, stats, am = _quantized_linear(N, K, 64, "fp4", False, torch.float32)
        W = fourbit.dequantize_4bit(packed, am, 64, "fp4", (N, K), torch.float32)
        x = torch.randn(M, K, device=DEV)
        out = torch.ops.halfbyte.gemm_4bit(x, packed, *stats, None, [N, K], 64, "fp4")
        assert_within_fp32_sum_bound(out, x, W, None, unrounded_weights=M == 1)


@gpu
def test_cuda_kernels_are_registered():
    for op in ops.CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"halfbyte::{op}", "CUDA"), op
