"""End-to-end checks of ``quantize_`` / ``dequantize_`` on tiny random models of real architectures.

* FLUX: a one-block diffusers ``FluxTransformer2DModel`` (bfloat16, as FLUX is run), 30 ``nn.Linear``.
* T5: a two-block transformers ``T5EncoderModel`` (float32), 12 ``nn.Linear``; its ``_keep_in_fp32_modules =
  ["wo"]`` keeps the two ``DenseReluDense.wo`` layers unquantized.

For every format (nf4, nf4 + double quant, fp4, int8 with threshold 6): every eligible Linear is swapped, the
quantized forward is finite and close to the unquantized one, gradients reach the inputs (and biases) but never
the frozen weights, a LoRA-style adapter on top of quantized layers trains, ``memory_footprint`` counts exactly
the quantized bytes, and ``dequantize_`` gives back ``nn.Linear`` layers that compute what the quantized ones did.
"""

import copy

import diffusers
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import halfbyte
from halfbyte import BitsAndBytesConfig, Linear4bit, Linear8bit

QUANTIZED = (Linear4bit, Linear8bit)

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True, llm_int8_threshold=6.0),
}

# Output cosine-similarity floors vs the unquantized model. Measured over init seeds 0-3 of both tiny models
# (inputs fixed): nf4 / nf4-dq >= 0.9902, fp4 >= 0.9824, int8 >= 0.99994. Random (Gaussian-like) weights are
# the 4-bit codebooks' easy case: measured per-layer relative weight error 0.087-0.093 (nf4), 0.116-0.127 (fp4),
# i.e. an output cosine ~0.995 per layer, compounded over a few layers in series. The floors allow 2-3x the
# worst measured deficit (1 - cos) for 4-bit and >10x for int8 (row-wise int8 weights and activations: ~1e-2
# relative error per layer => deficit ~1e-4), so seed/platform changes pass while a wrong codebook, misordered
# nibbles or a bad scale (cosine far below 0.9) fail.
COS_FLOOR = {"nf4": 0.97, "nf4-dq": 0.97, "fp4": 0.96, "int8": 0.999}


def cfg_of(name: str) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(**CONFIGS[name])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QUANTIZED)}


def quantized_class(name: str) -> type:
    return Linear8bit if CONFIGS[name].get("load_in_8bit") else Linear4bit


def expected_quantized_bytes(lin: nn.Linear, name: str) -> int:
    """Bytes of the layer once quantized, from the formats (bnb's): 4-bit: packed nibbles + float32 absmax per
    64-block (double quant: uint8 absmax + float32 per 256 absmax + float32 offset); 8-bit: int8 + float32 SCB."""
    n, out = lin.weight.numel(), lin.out_features
    bias = lin.bias.numel() * lin.bias.element_size() if lin.bias is not None else 0
    if CONFIGS[name].get("load_in_8bit"):
        return n + 4 * out + bias
    blocks = -(-n // 64)
    stats = blocks + 4 * -(-blocks // 256) + 4 if CONFIGS[name].get("bnb_4bit_use_double_quant") else 4 * blocks
    return (n + 1) // 2 + stats + bias


# --- models ----------------------------------------------------------------------------------------------------

FLUX_LINEARS = 30
T5_LINEARS = 12
T5_KEPT = {"encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.1.layer.1.DenseReluDense.wo"}


def make_flux(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
    return model.to(torch.bfloat16).eval()


def flux_inputs(batch: int = 2, side: int = 4, txt: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    bf = torch.bfloat16
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                         indexing="ij"), -1).reshape(-1, 3)
    return dict(
        hidden_states=torch.randn(batch, side * side, 4, generator=g).to(bf),
        encoder_hidden_states=torch.randn(batch, txt, 32, generator=g).to(bf),
        pooled_projections=torch.randn(batch, 32, generator=g).to(bf),
        timestep=torch.full((batch,), 0.5, dtype=bf),
        guidance=torch.full((batch,), 3.5, dtype=bf),
        img_ids=img_ids,
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


def make_t5(seed: int = 0) -> nn.Module:
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.T5EncoderModel(config)
    return model.float().eval()


def t5_embeds(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    return model.get_input_embeddings()(ids).detach()


def run_flux(model, inputs) -> torch.Tensor:
    return model(**inputs)[0]


def run_t5(model, embeds) -> torch.Tensor:
    return model(inputs_embeds=embeds).last_hidden_state


@pytest.fixture(scope="module")
def flux():
    model, inputs = make_flux(), flux_inputs()
    assert len(linear_names(model)) == FLUX_LINEARS
    with torch.no_grad():
        ref = run_flux(model, inputs)
    assert ref.dtype == torch.bfloat16 and torch.isfinite(ref).all()
    return model, inputs, ref


@pytest.fixture(scope="module")
def t5():
    model = make_t5()
    assert len(linear_names(model)) == T5_LINEARS
    assert set(model._keep_in_fp32_modules) == {"wo"}
    embeds = t5_embeds(model)
    with torch.no_grad():
        ref = run_t5(model, embeds)
    assert ref.dtype == torch.float32 and torch.isfinite(ref).all()
    return model, embeds, ref


def quantized_copy(model: nn.Module, name: str) -> nn.Module:
    q = copy.deepcopy(model)
    assert halfbyte.quantize_(q, cfg_of(name)) is q
    return q


def check_backward(q: nn.Module, run, x: torch.Tensor, kept: set[str] = frozenset()) -> None:
    """Input grads finite and non-zero; frozen quantized weights get none; biases do; kept Linears train."""
    x = x.clone().requires_grad_(True)
    out = run(q, x)
    out.float().square().mean().backward()
    assert x.grad is not None and x.grad.dtype == x.dtype
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, m in q.named_modules():
        if isinstance(m, QUANTIZED):
            assert not m.weight.requires_grad and m.weight.grad is None, n
            assert all(b.grad is None for b in m.buffers()), n
            if m.bias is not None:
                assert m.bias.grad is not None and torch.isfinite(m.bias.grad).all(), n
        elif n in kept:
            assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all(), n


# --- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_flux_quantize_forward_backward(flux, name):
    model, inputs, ref = flux
    before = linear_names(model)
    q = quantized_copy(model, name)
    # every nn.Linear swapped (FLUX keeps nothing in fp32), all of the requested format
    assert linear_names(q) == set()
    assert quantized_names(q) == before
    assert all(type(m) is quantized_class(name) for m in q.modules() if isinstance(m, QUANTIZED))

    with torch.no_grad():
        out = run_flux(q, inputs)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert cosine(out, ref) > COS_FLOOR[name]

    x = inputs["hidden_states"]
    check_backward(q, lambda m, h: run_flux(m, {**inputs, "hidden_states": h}), x)


@pytest.mark.parametrize("name", CONFIGS)
def test_t5_quantize_forward_backward(t5, name):
    model, embeds, ref = t5
    before = linear_names(model)
    q = quantized_copy(model, name)
    # _keep_in_fp32_modules = ["wo"]: exactly the two DenseReluDense.wo stay nn.Linear (SelfAttention.o does not
    # match: the rule compares whole names), everything else is quantized
    assert linear_names(q) == T5_KEPT
    assert all(type(m) is nn.Linear for n, m in q.named_modules() if n in T5_KEPT)
    assert quantized_names(q) == before - T5_KEPT
    assert all(type(m) is quantized_class(name) for m in q.modules() if isinstance(m, QUANTIZED))

    with torch.no_grad():
        out = run_t5(q, embeds)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert cosine(out, ref) > COS_FLOOR[name]

    check_backward(q, run_t5, embeds, kept=T5_KEPT)


@pytest.mark.parametrize("model_name", ["flux", "t5"])
@pytest.mark.parametrize("name", CONFIGS)
def test_memory_footprint_shrinks_by_the_quantized_bytes(request, model_name, name):
    model = request.getfixturevalue(model_name)[0]
    before = halfbyte.memory_footprint(model)
    q = quantized_copy(model, name)
    after = halfbyte.memory_footprint(q)
    assert after < before
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    saved = sum(
        sum(p.numel() * p.element_size() for p in linears[n].parameters()) - expected_quantized_bytes(linears[n], name)
        for n in quantized_names(q)
    )
    assert after == before - saved


@pytest.mark.parametrize("model_name", ["flux", "t5"])
@pytest.mark.parametrize("name", CONFIGS)
def test_dequantize_gives_back_linears_computing_the_same(request, model_name, name):
    model, x, _ = request.getfixturevalue(model_name)
    run = run_flux if model_name == "flux" else run_t5
    q = quantized_copy(model, name)
    qnames = quantized_names(q)
    with torch.no_grad():
        out_q = run(q, x)
    halfbyte.dequantize_(q)
    assert quantized_names(q) == set()
    assert linear_names(q) == linear_names(model)
    mods = dict(q.named_modules())
    ref_mods = dict(model.named_modules())
    for n in qnames:
        assert type(mods[n]) is nn.Linear and mods[n].weight.dtype == ref_mods[n].weight.dtype, n
        assert mods[n].weight.shape == ref_mods[n].weight.shape, n
    with torch.no_grad():
        out_d = run(q, x)
    assert out_d.dtype == out_q.dtype and torch.isfinite(out_d).all()
    if CONFIGS[name].get("load_in_4bit"):
        # 4-bit forward = F.linear with the weight dequantized into the activation dtype; dequantize_ stores that
        # same weight (one rounding from float32 math), so the model computes the same thing.
        torch.testing.assert_close(out_d, out_q, rtol=1e-5, atol=1e-6)
    else:
        # LLM.int8() also quantizes the activations (row-wise int8, ~0.4% relative error per element) and passes
        # the result through float16, which the dequantized float Linears do not: close, not equal. Measured
        # cosine >= 0.99996 (both models, seeds 0-3); floor at >10x that deficit.
        assert cosine(out_d, out_q) > 0.9995


class LoRABlock(nn.Module):
    """y = q2(gelu(q1(x) + B(A(x)))): a rank-r adapter on quantized q1, whose gradient has to come back through
    the quantized q2's backward."""

    def __init__(self, q1: nn.Module, q2: nn.Module, rank: int = 4):
        super().__init__()
        self.q1, self.q2 = q1, q2
        self.A = nn.Linear(q1.in_features, rank, bias=False)
        self.B = nn.Linear(rank, q1.out_features, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q2(F.gelu(self.q1(x) + self.B(self.A(x))))


@pytest.mark.parametrize("name", CONFIGS)
def test_lora_adapter_on_quantized_layers_trains(t5, name):
    q = quantized_copy(t5[0], name)
    attn = q.encoder.block[0].layer[0].SelfAttention
    assert isinstance(attn.q, QUANTIZED) and isinstance(attn.k, QUANTIZED)
    frozen = {k: v.clone() for k, v in attn.q.state_dict().items()} | \
        {"k." + k: v.clone() for k, v in attn.k.state_dict().items()}

    g = torch.Generator().manual_seed(3)
    block = LoRABlock(attn.q, attn.k)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        block.A.reset_parameters()
    x = torch.randn(64, 32, generator=g)
    # a target the adapter can reach exactly: the same block with a random rank-4 update on q1
    delta = torch.randn(32, 4, generator=g) @ torch.randn(4, 32, generator=g) / 4
    with torch.no_grad():
        target = block.q2(F.gelu(block.q1(x) + x @ delta.T))

    # measured final / initial loss 0.245-0.247 for all four formats (0.51 at lr=0.02, 0.16 at lr=0.1)
    opt = torch.optim.Adam([block.A.weight, block.B.weight], lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(block(x), target)
        loss.backward()
        assert block.A.weight.grad is not None and block.B.weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))  # no NaN
    assert losses[-1] < 0.5 * losses[0], losses
    # the quantized layers stayed frozen: no weight grads, bytes untouched
    for m in (attn.q, attn.k):
        assert m.weight.grad is None and not m.weight.requires_grad
    after = {k: v for k, v in attn.q.state_dict().items()} | {"k." + k: v for k, v in attn.k.state_dict().items()}
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)
