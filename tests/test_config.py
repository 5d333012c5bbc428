import json

import pytest
import torch

from halfbyte import BitsAndBytesConfig


def test_defaults_match_diffusers_except_compute_dtype():
    c = BitsAndBytesConfig(load_in_4bit=True)
    assert (c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant, c.llm_int8_threshold) == ("fp4", False, 6.0)
    assert c.bnb_4bit_quant_storage == torch.uint8 and c.bnb_4bit_blocksize == 64
    assert c.bnb_4bit_compute_dtype is None  # deliberate: the activations' dtype
    assert c.quantization_method() == "fp4"
    assert BitsAndBytesConfig(load_in_8bit=True).quantization_method() == "llm_int8"


def test_every_diffusers_field_is_accepted():
    diffusers = pytest.importorskip("diffusers")
    import inspect

    theirs = set(inspect.signature(diffusers.BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    ours = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    assert theirs <= ours and ours - theirs == {"bnb_4bit_blocksize"}


@pytest.mark.parametrize("kw", [
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
         bnb_4bit_compute_dtype="bfloat16", llm_int8_skip_modules=["proj_out"], bnb_4bit_blocksize=128,
         bnb_4bit_quant_storage=torch.bfloat16),
    dict(load_in_8bit=True, llm_int8_threshold=10),
    dict(),
])
def test_json_round_trip(kw):
    c = BitsAndBytesConfig(**kw)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["quant_method"] == "halfbyte" and d["_load_in_4bit"] == c.load_in_4bit
    # A truthy top-level load_in_4bit/8bit would make transformers and diffusers route the dict to bitsandbytes.
    assert "load_in_4bit" not in d and "load_in_8bit" not in d and d["format_version"] == 1
    assert BitsAndBytesConfig.from_dict(d) == c
    assert BitsAndBytesConfig(**d) == c  # the HF protocol calls cls(**dict)


@pytest.mark.parametrize("kw, field", [
    (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit"),
    (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(bnb_4bit_blocksize=48), "bnb_4bit_blocksize"),
    (dict(llm_int8_threshold=-1.0), "llm_int8_threshold"),
    (dict(llm_int8_threshold=float("nan")), "llm_int8_threshold"),
    (dict(bnb_4bit_compute_dtype="bfloat17"), "bnb_4bit_compute_dtype"),
    (dict(bnb_4bit_compute_dtype=torch.int8), "bnb_4bit_compute_dtype"),
    (dict(bnb_4bit_quant_storage="complex64"), "bnb_4bit_quant_storage"),
    (dict(load_in_4bit="yes"), "load_in_4bit"),
    (dict(llm_int8_skip_modules="proj_out"), "llm_int8_skip_modules"),
    (dict(bnb_4bit_use_double_quant=1), "bnb_4bit_use_double_quant"),
    (dict(quant_method="gptq"), "quant_method"),
    (dict(load_in_3bit=True), "unknown fields"),
])
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        BitsAndBytesConfig(**kw)


def test_bitsandbytes_dict_is_the_one_diffusers_writes():
    diffusers = pytest.importorskip("diffusers")
    for kw in (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16),
               dict(load_in_8bit=True, llm_int8_threshold=10.0, llm_int8_skip_modules=["proj_out"]),
               dict(load_in_4bit=True)):
        ours = BitsAndBytesConfig(**kw).to_bitsandbytes_dict()
        theirs = diffusers.BitsAndBytesConfig(**kw).to_dict()
        assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def test_mixin_protocol():
    c, unused = BitsAndBytesConfig.from_dict({"load_in_4bit": True}, return_unused_kwargs=True,
                                             bnb_4bit_quant_type="nf4", device_map="auto")
    assert c.bnb_4bit_quant_type == "nf4" and unused == {"device_map": "auto"}
    assert c.update(bnb_4bit_use_double_quant=True, foo=1) == {"foo": 1} and c.bnb_4bit_use_double_quant
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        c.update(bnb_4bit_quant_type="int3")
    assert dict(c)["bnb_4bit_quant_type"] == "nf4"
    assert set(c.to_diff_dict()) == {"quant_method", "_load_in_4bit", "_load_in_8bit", "format_version",
                                     "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"}
    with pytest.raises(ValueError, match="format_version"):
        BitsAndBytesConfig.from_dict({**c.to_dict(), "format_version": 2})
