"""halfbyte inside diffusers: quantize on load, save and reload (split shards included), skips, dequantize,
pipeline quantization configs, offload maps, and checkpoints that diffusers + bitsandbytes wrote on a GPU."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoModel, FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import load_file

import halfbyte
from halfbyte import BitsAndBytesConfig
from halfbyte.testing import save_tiny_flux_pipeline, save_tiny_sd3_transformer

FORMATS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
GOLDENS = Path(__file__).parent / "data" / "diffusers_bnb"


def quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit))}


def states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu())
                                          for k in sa)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    # a str: diffusers' AutoModel fails on a Path
    return str(save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe") / "transformer")


def flux_inputs(dtype=torch.float32, tokens=16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, tokens, 16, generator=g).to(dtype),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
                  pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
                  timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(tokens, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5], dtype=dtype))
    return {k: v.to(device) for k, v in inputs.items()}


def run(model, dtype=torch.float32):
    """The model's output on the device it was loaded to: without a device_map, loaders put quantized models on
    the GPU when there is one (as with bitsandbytes), so these tests run on either kind of machine."""
    with torch.no_grad():
        return model(**flux_inputs(dtype, device=model.device)).sample


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls", [AutoModel, FluxTransformer2DModel])
def test_quantize_on_load_is_quantize_(flux_dir, cls, fmt):
    loaded = cls.from_pretrained(flux_dir, quantization_config=BitsAndBytesConfig(**FORMATS[fmt]),
                                 torch_dtype=torch.bfloat16)
    ref = halfbyte.quantize_(FluxTransformer2DModel.from_pretrained(flux_dir, torch_dtype=torch.bfloat16)
                             .to(loaded.device), BitsAndBytesConfig(**FORMATS[fmt]))
    assert len(quantized_names(loaded)) == 30 and quantized_names(loaded) == quantized_names(ref)
    assert states_equal(loaded, ref)
    assert torch.equal(run(loaded, torch.bfloat16), run(ref, torch.bfloat16))
    assert loaded.is_quantized and loaded.get_memory_footprint() == halfbyte.memory_footprint(loaded)
    with pytest.raises(ValueError, match="dtype"):
        loaded.to(torch.float16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_reload_with_split_shards(flux_dir, tmp_path, fmt):
    model = AutoModel.from_pretrained(flux_dir, quantization_config=BitsAndBytesConfig(**FORMATS[fmt]),
                                      torch_dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="1KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    stats = ".weight.absmax" if fmt != "int8" else ".SCB"
    split = [k for k in index if k.endswith(stats) and index[k] != index[k.removesuffix(stats) + ".weight"]]
    assert split, "the test needs shards that separate a layer's weight from its statistics"
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "halfbyte" and qc["_pre_quantization_dtype"] == "float32"
    again = AutoModel.from_pretrained(str(tmp_path))  # no config, no torch_dtype: restored as saved
    assert states_equal(model, again) and torch.equal(run(model), run(again))


def test_skip_modules_and_threshold_sd3(tmp_path):
    path = save_tiny_sd3_transformer(tmp_path / "sd3")
    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["proj_out"], llm_int8_threshold=10)
    model = SD3Transformer2DModel.from_pretrained(path, quantization_config=cfg, torch_dtype=torch.float32)
    assert type(model.proj_out) is torch.nn.Linear and len(quantized_names(model)) == 35
    assert all(m.threshold == 10.0 for m in model.modules() if isinstance(m, halfbyte.Linear8bit))
    model.save_pretrained(tmp_path / "q")
    again = SD3Transformer2DModel.from_pretrained(tmp_path / "q")
    assert type(again.proj_out) is torch.nn.Linear and states_equal(model, again)


def test_dequantize_then_save_is_a_plain_checkpoint(flux_dir, tmp_path):
    model = AutoModel.from_pretrained(flux_dir, quantization_config=BitsAndBytesConfig(**FORMATS["nf4-dq"]),
                                      torch_dtype=torch.float32)
    before = run(model)
    model.dequantize()
    assert not quantized_names(model) and not model.is_quantized
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("quantization_config") is None
    assert not quantized_names(AutoModel.from_pretrained(str(tmp_path)))


def test_disk_offload_needs_the_fp32_offload_flag(flux_dir, tmp_path):
    device_map = {"": "cpu", "proj_out": "disk"}
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        AutoModel.from_pretrained(flux_dir, quantization_config=BitsAndBytesConfig(**FORMATS["nf4"]),
                                  device_map=device_map, offload_folder=tmp_path, torch_dtype=torch.float32)
    # With the flag, modules a map sends to cpu/disk stay unquantized (bitsandbytes' rule). A disk map cannot be
    # dispatched on a machine without an accelerator (accelerate needs an execution device other than the CPU,
    # unquantized models fail the same way), so here the module goes to "cpu"; the GPU tier runs the disk case.
    cfg = BitsAndBytesConfig(**FORMATS["nf4"], llm_int8_enable_fp32_cpu_offload=True)
    model = AutoModel.from_pretrained(flux_dir, quantization_config=cfg, device_map={"": "cpu", "proj_out": "cpu"},
                                      torch_dtype=torch.float32)
    # the name also matches single_transformer_blocks.0.proj_out (diffusers matches a child's own name too)
    assert type(model.proj_out) is torch.nn.Linear and len(quantized_names(model)) == 28
    ref = halfbyte.quantize_(FluxTransformer2DModel.from_pretrained(flux_dir, torch_dtype=torch.float32),
                             BitsAndBytesConfig(**FORMATS["nf4"], llm_int8_skip_modules=["proj_out"]))
    torch.testing.assert_close(run(model), run(ref), rtol=0, atol=0)


def test_pipeline_quantization_config(flux_dir):
    from diffusers import FluxPipeline, PipelineQuantizationConfig

    pipe_dir = str(Path(flux_dir).parent)
    by_backend = PipelineQuantizationConfig(quant_backend="halfbyte", quant_kwargs=FORMATS["nf4"],
                                            components_to_quantize=["transformer", "text_encoder_2"])
    by_mapping = PipelineQuantizationConfig(quant_mapping={"transformer": BitsAndBytesConfig(**FORMATS["nf4"]),
                                                           "text_encoder_2": BitsAndBytesConfig(**FORMATS["int8"])})
    for cfg, kinds in ((by_backend, (halfbyte.Linear4bit, halfbyte.Linear4bit)),
                       (by_mapping, (halfbyte.Linear4bit, halfbyte.Linear8bit))):
        pipe = FluxPipeline.from_pretrained(pipe_dir, quantization_config=cfg, torch_dtype=torch.float32)
        assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, kinds[0])
        assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, kinds[1])
        assert not any(isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit)) for m in pipe.text_encoder.modules())
        image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                     output_type="np", generator=torch.manual_seed(0)).images
        assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


# --- checkpoints written by diffusers + bitsandbytes on an H100 (tests/data/make_diffusers_goldens.py) ------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_diffusers_bitsandbytes_checkpoint_loads(fmt):
    src = GOLDENS / fmt
    expected = load_file(GOLDENS / "expected.safetensors")
    halfbyte.integrations.replace_bitsandbytes()
    try:
        model = AutoModel.from_pretrained(str(src))
    finally:
        halfbyte.integrations.restore_bitsandbytes()
    assert len(quantized_names(model)) == 30
    files = load_file(src / "diffusion_pytorch_model.safetensors")
    mine = halfbyte.bitsandbytes_state_dict(model)
    assert files.keys() == mine.keys() and all(torch.equal(files[k], mine[k].cpu()) for k in files)
    # bitsandbytes' own dequantized weight (CUDA) and forward output (CUDA, float32 compute for 4-bit)
    layer = model.transformer_blocks[0].attn.to_q
    # bitsandbytes dequantizes 4-bit to the layer's dtype (float16 here), int8 to float32
    assert torch.equal(layer.dequantize(torch.float32 if fmt == "int8" else torch.float16).float().cpu(),
                       expected[f"{fmt}.to_q"])
    out = run(model, torch.float16).float().cpu()
    # The same weights, computed on another device: CPU vs CUDA attention, norms and GEMM summation order, in a
    # float16 model. Measured on outputs of magnitude <= 2.1 (one float16 ulp there is 2e-3): 4-bit <= 1.0e-3,
    # int8 <= 5.9e-3 (its float16 activations round at each of the 30 layers before quantization).
    torch.testing.assert_close(out, expected[f"{fmt}.out"].float(), rtol=0, atol=1e-2)
