import pytest
import torch
from torch import nn

import halfbyte
from halfbyte import BitsAndBytesConfig, Linear4bit, Linear8bit

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
INT8 = BitsAndBytesConfig(load_in_8bit=True)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(16, 16), "to_out": nn.Linear(16, 16)})
        self.proj_out = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)


class Model(nn.Module):
    _keep_in_fp32_modules = ["keep"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj_out = nn.Linear(16, 4)
        self.keep = nn.Linear(16, 16)


def kinds(model):
    kinds = (nn.Linear, Linear4bit, Linear8bit)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, kinds)}


def test_skip_rules_follow_diffusers():
    cfg = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["proj_out", "blocks.1.attn"])
    m = halfbyte.quantize_(Model(), cfg)
    k = kinds(m)
    # a name matches the module's own name anywhere, or a dotted prefix of the path; _keep_in_fp32_modules too
    assert k["proj_out"] == k["blocks.0.proj_out"] == k["keep"] == "Linear"
    assert k["blocks.1.attn.to_q"] == k["blocks.1.attn.to_out"] == "Linear"
    assert k["blocks.0.attn.to_q"] == "Linear4bit"


def test_skip_rules_match_diffusers_implementation():
    utils = pytest.importorskip("diffusers.quantizers.bitsandbytes.utils")
    pytest.importorskip("bitsandbytes")
    skip = ["proj_out", "blocks.1.attn"]
    ours = halfbyte.quantize_(Model(), BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip)))
    with torch.device("meta"):
        theirs = Model()
    import diffusers

    cfg = diffusers.BitsAndBytesConfig(load_in_8bit=True)
    theirs = utils.replace_with_bnb_linear(theirs, modules_to_not_convert=skip + ["keep"], quantization_config=cfg)
    assert {n for n, t in kinds(ours).items() if t == "Linear"} == {
        n for n, m in theirs.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("cfg", [NF4, INT8])
def test_meta_model_gives_shells_and_real_model_quantizes(cfg):
    with torch.device("meta"):
        shell = halfbyte.quantize_(Model(), cfg)
    assert all(t.is_meta for t in shell.state_dict().values())
    real = halfbyte.quantize_(Model(), cfg)
    for (k, a), (k2, b) in zip(shell.state_dict().items(), real.state_dict().items()):
        assert k == k2 and a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("cfg", [NF4, INT8])
def test_dequantize_restores_linear_in_original_dtype(cfg):
    model = Model().to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    halfbyte.quantize_(model, cfg)
    q_out = model.blocks[0].attn.to_q(x)
    halfbyte.dequantize_(model)
    assert all(t == "Linear" for t in kinds(model).values())
    lin = model.blocks[0].attn.to_q
    assert lin.weight.dtype == torch.bfloat16
    # 4-bit: the same dequantized weight in the same dtype -> same output; 8-bit went through fp16 and int32
    tol = 0 if cfg is NF4 else 0.05 * q_out.abs().max().item()
    torch.testing.assert_close(lin(x), q_out, rtol=0, atol=tol)


def test_memory_footprint_counts_statistics():
    model = halfbyte.quantize_(nn.Sequential(nn.Linear(256, 128)), BitsAndBytesConfig(load_in_4bit=True))
    n = 256 * 128
    assert halfbyte.memory_footprint(model) == n // 2 + (n // 64) * 4 + 128 * 4
    dq = halfbyte.quantize_(nn.Sequential(nn.Linear(256, 128)), NF4)
    assert halfbyte.memory_footprint(dq) == n // 2 + n // 64 + 4 * 2 + 4 + 128 * 4


def test_bad_inputs():
    with pytest.raises(ValueError, match="quantizes nothing"):
        halfbyte.quantize_(Model(), BitsAndBytesConfig())
    with pytest.raises(NotImplementedError, match="llm_int8_has_fp16_weight"):
        halfbyte.quantize_(Model(), BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True))
    with pytest.raises(TypeError, match="BitsAndBytesConfig"):
        halfbyte.quantize_(Model(), {"load_in_4bit": True})


def test_stats_survive_device_and_dtype_move_of_a_transformers_model():
    """What DiffusionPipeline.to(device, dtype) does to a non-diffusers component: module.to(device, dtype)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    t5 = transformers.T5EncoderModel(cfg).eval()
    halfbyte.quantize_(t5, NF4)
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, Linear4bit)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    ids = torch.tensor([[1, 2, 3, 4]])
    out_fp32 = t5(input_ids=ids).last_hidden_state
    t5.to("cpu", torch.bfloat16)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    out_bf16 = t5(input_ids=ids).last_hidden_state
    assert out_bf16.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out_bf16.float().flatten(), out_fp32.flatten(), dim=0)
    assert cos > 0.99  # only bf16 rounding of activations and norms separates the two


_EXACT_BYTES = """
import sys
import torch
from torch import nn
import halfbyte
from halfbyte import BitsAndBytesConfig
from halfbyte.convert import quantized_tensor_bytes

cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if sys.argv[1] == "nf4"
       else BitsAndBytesConfig(load_in_8bit=True))
# first: the lazily built per-device tables (code tables, int8's reciprocal table) the kernels keep
halfbyte.quantize_(nn.Sequential(nn.Linear(64, 64, device="cuda")), cfg)(torch.randn(2, 64, device="cuda"))
torch.cuda.synchronize()
torch.cuda.empty_cache()
base = torch.cuda.memory_allocated()
model = nn.Sequential(*[nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                        for k, n in [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 9216)] * 4])
expected = sum(sum(quantized_tensor_bytes(m, cfg)) for m in model)
halfbyte.quantize_(model, cfg, device="cuda")
torch.cuda.synchronize()
held = torch.cuda.memory_allocated() - base
x = torch.randn(2, 3072, dtype=torch.bfloat16, device="cuda")
assert model[:1](x).shape == (2, 3072)
print(held - expected, expected)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier: needs a CUDA device")
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantize_on_cuda_holds_exactly_the_quantized_bytes(fmt):
    """quantize_ reserves one segment for the quantized tensors (transfer.reserve_device_memory): a model
    quantized onto the GPU from host weights leaves the allocator holding its tensor bytes exactly, with no block
    rounding (FLUX widths).

    Run in a fresh process: in this one, segments that earlier tests left partly in use keep free blocks that
    ``empty_cache`` cannot return, and a layer's tensor carved from one of those with less than 1 MiB to spare
    takes the whole block (the allocator does not split it), so the count depended on which tests ran before (once
    +589824 bytes after test_compile.py). A fresh allocator has only the reserved segment to carve from."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _EXACT_BYTES, fmt], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    extra, expected = (int(v) for v in run.stdout.split()[-2:])
    assert extra == 0, f"allocated {extra:+d} bytes beyond the quantized tensors' {expected}"


def test_quantize_drops_the_float_layers_at_once():
    """The replaced nn.Linear layers (and their float weights) are freed when quantize_ returns, without waiting
    for a garbage collection."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 32)))
    refs = [weakref.ref(model[0]), weakref.ref(model[1][0].weight)]
    gc.disable()
    try:
        halfbyte.quantize_(model, BitsAndBytesConfig(load_in_4bit=True))
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
