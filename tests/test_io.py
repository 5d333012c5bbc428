"""bitsandbytes_state_dict / load_bitsandbytes_state_dict against bitsandbytes' own layers (CPU backend)."""

import json

import pytest
import torch
from torch import nn

import halfbyte
import halfbyte.formats.codebooks
from halfbyte import BitsAndBytesConfig

bnb = pytest.importorskip("bitsandbytes")


def make(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16, bias=False), nn.LayerNorm(16)).to(dtype)


def bnb_model(ref, cfg):
    m = make()
    m.load_state_dict(ref.state_dict())
    for i in (0, 2):
        lin = m[i]
        if cfg.load_in_4bit:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=cfg.bnb_4bit_use_double_quant,
                                  quant_type=cfg.bnb_4bit_quant_type)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                         compress_statistics=cfg.bnb_4bit_use_double_quant,
                                         quant_type=cfg.bnb_4bit_quant_type)
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None, has_fp16_weights=False,
                                    threshold=cfg.llm_int8_threshold)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        m[i] = q.to("cpu")
    return m


CFGS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("name", CFGS)
def test_state_dict_is_what_bitsandbytes_saves(name):
    cfg = CFGS[name]
    ref = make()
    ours = halfbyte.bitsandbytes_state_dict(halfbyte.quantize_(make(), cfg))
    theirs = bnb_model(ref, cfg).state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    for k in theirs:
        a, b = ours[k], theirs[k]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), k
        if "quant_state" in k:  # the JSON blob byte for byte (same mean on the same CPU)
            assert bytes(a.tolist()) == bytes(b.tolist()), (bytes(a.tolist()), bytes(b.tolist()))
            json.loads(bytes(a.tolist()))
        elif name != "fp4-dq" and k.endswith(".weight") and a.dtype == torch.uint8:
            assert torch.equal(a, b), k  # NF4 bytes: CPU backend == CUDA on random data
        elif a.dtype == torch.int8:
            assert (a.int() - b.int()).abs().max() <= 1  # CPU backend divides exactly, CUDA approximately
        elif k.endswith("weight.absmax") and a.dtype == torch.uint8:
            # double-quant codes: bnb's CPU backend rounds near-zero ties unlike CUDA (spec §2.1); the decoded
            # absmax values differ by at most one step of the dynamic map's densest region
            nested = ours[k.replace("absmax", "nested_absmax")]
            code = halfbyte.formats.codebooks.dynamic_map()
            diff = (code[a.long()] - code[b.long()]).abs() * nested[0]
            assert (diff <= 0.05 * nested[0]).all() and (a == b).float().mean() > 0.8, k
        elif "SCB" in k or "absmax" in k or "map" in k or "bias" in k or k.startswith("3."):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("name", CFGS)
def test_load_bitsandbytes_checkpoint_into_meta_shells(name):
    """A state dict written by bitsandbytes' layers fills halfbyte shells; outputs match bitsandbytes' layers."""
    cfg = CFGS[name]
    ref = make()
    theirs = bnb_model(ref, cfg)
    with torch.device("meta"):
        shell = halfbyte.quantize_(make(), cfg)
    result = halfbyte.load_bitsandbytes_state_dict(shell, theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(t.is_meta for t in shell.state_dict().values())
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = shell(x).float(), theirs(x).float()
    # 4-bit: same bytes, same dequantized weights -> equal up to bf16 GEMM order; 8-bit: CPU backend's 1/16129 typo
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())


@pytest.mark.parametrize("name", CFGS)
def test_round_trip_is_exact(name):
    cfg = CFGS[name]
    model = halfbyte.quantize_(make(), cfg)
    sd = halfbyte.bitsandbytes_state_dict(model)
    with torch.device("meta"):
        shell = halfbyte.quantize_(make(), cfg)
    halfbyte.load_bitsandbytes_state_dict(shell, sd)
    for (k, a), (k2, b) in zip(model.state_dict().items(), shell.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(model(x), shell(x))


def test_halfbyte_state_dict_loads_in_bitsandbytes():
    cfg = CFGS["nf4-dq"]
    model = halfbyte.quantize_(make(), cfg)
    sd = halfbyte.bitsandbytes_state_dict(model)
    p = bnb.nn.Params4bit.from_prequantized(
        data=sd["0.weight"], quantized_stats={k: v for k, v in sd.items() if k.startswith("0.weight.")}, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), model[0].dequantize())


def test_quant_storage_view():
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage="bfloat16")
    sd = halfbyte.bitsandbytes_state_dict(halfbyte.quantize_(make(), cfg))
    assert sd["0.weight"].dtype == torch.bfloat16 and sd["0.weight"].shape == (64 * 32 // 4, 1)
    with torch.device("meta"):
        shell = halfbyte.quantize_(make(), cfg)
    halfbyte.load_bitsandbytes_state_dict(shell, sd)
    assert shell[0].weight.dtype == torch.uint8


def _bad(sd, key, value):
    sd = dict(sd)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    with torch.device("meta"):
        shell = halfbyte.quantize_(make(), CFGS["nf4-dq"])
    return shell, sd


@pytest.mark.parametrize("key, value, match", [
    ("0.weight.quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"), dtype=torch.uint8), "corrupted"),
    ("0.weight", torch.zeros(10, 1, dtype=torch.uint8), "0.weight: 10 packed bytes, expected 1024"),
    ("0.weight.quant_state.bitsandbytes__nf4", None, "no 0.weight.quant_state"),
    ("0.weight.quant_map", torch.zeros(16), "quant_map differs"),
    ("0.weight.absmax", torch.zeros(7, dtype=torch.uint8), "0.weight.absmax: shape"),
])
def test_bad_checkpoints_name_the_tensor(key, value, match):
    sd = halfbyte.bitsandbytes_state_dict(halfbyte.quantize_(make(), CFGS["nf4-dq"]))
    shell, sd = _bad(sd, key, value)
    with pytest.raises(ValueError, match=match):
        halfbyte.load_bitsandbytes_state_dict(shell, sd)


def test_shape_mismatch_and_kind_mismatch():
    sd4 = halfbyte.bitsandbytes_state_dict(halfbyte.quantize_(make(), CFGS["nf4"]))
    with torch.device("meta"):
        shell8 = halfbyte.quantize_(make(), CFGS["int8"])
    with pytest.raises(ValueError, match="no 0.SCB"):
        halfbyte.load_bitsandbytes_state_dict(shell8, sd4)
    with torch.device("meta"):
        wrong = halfbyte.quantize_(nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16, bias=False),
                                                 nn.LayerNorm(16)), CFGS["nf4"])
    with pytest.raises(ValueError, match=r"shape \[32, 64\] does not match"):
        halfbyte.load_bitsandbytes_state_dict(wrong, sd4)
