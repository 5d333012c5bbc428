"""Every code example of the diffusers bitsandbytes guide (shared/seed/000_*.txt), run with halfbyte.

Each test holds the guide's code as written, with two kinds of change only:
* the config import: ``from halfbyte import BitsAndBytesConfig`` (as ``DiffusersBitsAndBytesConfig`` /
  ``TransformersBitsAndBytesConfig`` where the guide imports both libraries' classes);
* the repo ids resolve offline to tiny checkpoints of the same architectures, laid out in the test Hub cache
  (``halfbyte.testing``): "black-forest-labs/FLUX.1-dev" is a tiny FLUX.1 pipeline,
  "stabilityai/stable-diffusion-3-medium-diffusers" a tiny SD3 pipeline, and "hf-internal-testing/flux.1-dev-nf4-pkg"
  the tiny FLUX transformer as diffusers + bitsandbytes saved it in NF4 on an H100 (tests/data/diffusers_bnb/nf4).
Where diffusers itself rejects an argument or the CPU cannot do what the guide does on a GPU, the test says so at
the line. After the guide's code come the checks of what it promised.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

import halfbyte
from halfbyte.testing import make_hub_cache, save_tiny_flux_pipeline, save_tiny_sd3_pipeline

QUANTIZED = (halfbyte.Linear4bit, halfbyte.Linear8bit)
GOLDEN_NF4 = Path(__file__).parent / "data" / "diffusers_bnb" / "nf4"


@pytest.fixture(scope="module", autouse=True)
def hub(tmp_path_factory):
    cache = os.environ["HF_HUB_CACHE"]
    src = tmp_path_factory.mktemp("seed")
    make_hub_cache(cache, "black-forest-labs/FLUX.1-dev", save_tiny_flux_pipeline(src / "flux"))
    make_hub_cache(cache, "stabilityai/stable-diffusion-3-medium-diffusers", save_tiny_sd3_pipeline(src / "sd3"))
    pkg = src / "nf4-pkg"
    shutil.copytree(GOLDEN_NF4, pkg / "transformer")
    make_hub_cache(cache, "hf-internal-testing/flux.1-dev-nf4-pkg", pkg)


def kinds(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, QUANTIZED)}


def count(model, cls=QUANTIZED) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def load_8bit_pair(torch_dtype=torch.float16):
    # --- guide: "Quantizing a model in 8-bit halves the memory-usage" ---
    from diffusers import AutoModel
    from transformers import T5EncoderModel

    from halfbyte import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
    from halfbyte import BitsAndBytesConfig as TransformersBitsAndBytesConfig

    quant_config = TransformersBitsAndBytesConfig(load_in_8bit=True,)
    text_encoder_2_8bit = T5EncoderModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        subfolder="text_encoder_2",
        quantization_config=quant_config,
        torch_dtype=torch.float16,
    )
    quant_config = DiffusersBitsAndBytesConfig(load_in_8bit=True,)
    transformer_8bit = AutoModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        subfolder="transformer",
        quantization_config=quant_config,
        torch_dtype=torch_dtype,
    )
    return text_encoder_2_8bit, transformer_8bit


def test_8bit_transformer_and_text_encoder():
    text_encoder_2_8bit, transformer_8bit = load_8bit_pair()
    assert kinds(text_encoder_2_8bit) == kinds(transformer_8bit) == {halfbyte.Linear8bit}
    assert count(transformer_8bit) == 30 and count(text_encoder_2_8bit) == 12  # T5 keeps its 2 `wo` layers dense
    # "By default, all the other modules such as torch.nn.LayerNorm are converted to torch.float16."
    assert transformer_8bit.norm_out.linear.bias.dtype == torch.float16
    assert transformer_8bit.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float16


def test_8bit_transformer_torch_dtype_float32():
    _, transformer_8bit = load_8bit_pair(torch_dtype=torch.float32)  # the guide's "+   torch_dtype=torch.float32"
    assert transformer_8bit.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert transformer_8bit.norm_out.linear.bias.dtype == torch.float32


def test_generate_save_and_memory_footprint(tmp_path):
    text_encoder_2_8bit, transformer_8bit = load_8bit_pair()
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        transformer=transformer_8bit,
        text_encoder_2=text_encoder_2_8bit,
        torch_dtype=torch.float16,
        # The guide's device_map="auto" is rejected by diffusers 0.42 for pipelines (only "balanced", "cpu" or an
        # accelerator): this machine has no GPU, so "cpu". The GPU tier runs "balanced", .to("cuda") and offload.
        device_map="cpu",
    )
    pipe_kwargs = {
        "prompt": "A cat holding a sign that says hello world",
        "height": 1024,
        "width": 1024,
        "guidance_scale": 3.5,
        "num_inference_steps": 50,
        "max_sequence_length": 512,
    }
    image = pipe(**pipe_kwargs, generator=torch.manual_seed(0),).images[0]
    assert image.size == (1024, 1024)
    import numpy as np

    pixels = np.asarray(image)
    assert pixels.std() > 1  # an image, not a constant

    # "You can also save the serialized 8-bit models locally with save_pretrained()."
    transformer_8bit.save_pretrained(tmp_path / "transformer")
    text_encoder_2_8bit.save_pretrained(tmp_path / "text_encoder_2")
    # "Check your memory footprint with the get_memory_footprint method"
    model = transformer_8bit
    print(model.get_memory_footprint())
    assert model.get_memory_footprint() == halfbyte.memory_footprint(model)
    from diffusers import AutoModel

    again = AutoModel.from_pretrained(str(tmp_path / "transformer"))
    assert kinds(again) == {halfbyte.Linear8bit}
    assert model.get_memory_footprint() == again.get_memory_footprint()


def test_prequantized_checkpoint_without_config():
    halfbyte.integrations.replace_bitsandbytes()  # the default where bitsandbytes is absent; CI installs it
    try:
        # --- guide: "Quantized models can be loaded from the from_pretrained() method without needing to specify
        # the quantization_config parameters" ---
        from diffusers import AutoModel

        from halfbyte import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(load_in_4bit=True)
        model_4bit = AutoModel.from_pretrained(
            "hf-internal-testing/flux.1-dev-nf4-pkg", subfolder="transformer"
        )
    finally:
        halfbyte.integrations.restore_bitsandbytes()
    assert kinds(model_4bit) == {halfbyte.Linear4bit} and count(model_4bit) == 30
    assert {m.quant_type for m in model_4bit.modules() if isinstance(m, halfbyte.Linear4bit)} == {"nf4"}
    assert quantization_config.load_in_4bit


def test_outlier_threshold():
    from diffusers import AutoModel

    from halfbyte import BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=10,
    )
    model_8bit = AutoModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        subfolder="transformer",
        quantization_config=quantization_config,
    )
    assert {m.threshold for m in model_8bit.modules() if isinstance(m, halfbyte.Linear8bit)} == {10.0}


def test_skip_module_conversion():
    from diffusers import SD3Transformer2DModel

    from halfbyte import BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=["proj_out"],
    )
    model_8bit = SD3Transformer2DModel.from_pretrained(
        "stabilityai/stable-diffusion-3-medium-diffusers",
        subfolder="transformer",
        quantization_config=quantization_config,
    )
    assert type(model_8bit.proj_out) is torch.nn.Linear and count(model_8bit) == 35


def test_compute_data_type():
    import torch

    from halfbyte import BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    # (the guide stops at the config; load with it to check the matmuls run in bfloat16)
    from diffusers import AutoModel

    model = AutoModel.from_pretrained("black-forest-labs/FLUX.1-dev", subfolder="transformer",
                                      quantization_config=quantization_config, torch_dtype=torch.float32)
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(3, layer.in_features, device=layer.weight.device)  # loaded onto the GPU where there is one
    expected = (x.bfloat16() @ layer.dequantize(torch.bfloat16).t() + layer.bias.bfloat16()).float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def load_4bit_pair(**fields):
    from diffusers import AutoModel
    from transformers import T5EncoderModel

    from halfbyte import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
    from halfbyte import BitsAndBytesConfig as TransformersBitsAndBytesConfig

    quant_config = TransformersBitsAndBytesConfig(
        load_in_4bit=True,
        **fields,
    )
    text_encoder_2_4bit = T5EncoderModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        subfolder="text_encoder_2",
        quantization_config=quant_config,
        torch_dtype=torch.float16,
    )
    quant_config = DiffusersBitsAndBytesConfig(
        load_in_4bit=True,
        **fields,
    )
    transformer_4bit = AutoModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        subfolder="transformer",
        quantization_config=quant_config,
        torch_dtype=torch.float16,
    )
    return text_encoder_2_4bit, transformer_4bit


def test_normal_float_4():
    text_encoder_2_4bit, transformer_4bit = load_4bit_pair(bnb_4bit_quant_type="nf4")
    for model in (text_encoder_2_4bit, transformer_4bit):
        assert {m.quant_type for m in model.modules() if isinstance(m, halfbyte.Linear4bit)} == {"nf4"}


def test_nested_quantization():
    text_encoder_2_4bit, transformer_4bit = load_4bit_pair(bnb_4bit_use_double_quant=True)
    for model in (text_encoder_2_4bit, transformer_4bit):
        layers = [m for m in model.modules() if isinstance(m, halfbyte.Linear4bit)]
        assert layers and all(m.double_quant and m.absmax.dtype == torch.uint8 for m in layers)
    plain = load_4bit_pair()[1]
    assert transformer_4bit.get_memory_footprint() < plain.get_memory_footprint()


def test_dequantizing():
    text_encoder_2_4bit, transformer_4bit = load_4bit_pair(bnb_4bit_use_double_quant=True)
    text_encoder_2_4bit.dequantize()
    transformer_4bit.dequantize()
    assert count(text_encoder_2_4bit) == count(transformer_4bit) == 0
    assert transformer_4bit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float16


def test_torch_compile():
    from diffusers import AutoModel

    from halfbyte import BitsAndBytesConfig as DiffusersBitsAndBytesConfig

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    quant_config = DiffusersBitsAndBytesConfig(load_in_8bit=True)
    transformer_4bit = AutoModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev",
        subfolder="transformer",
        quantization_config=quant_config,
        torch_dtype=torch.float16,
    )
    transformer_4bit.compile(fullgraph=True)
    # (the guide then generates; here one forward of the compiled model, float16 like the guide, on the CPU)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g).half(),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g).half(),
                  pooled_projections=torch.randn(1, 32, generator=g).half(), timestep=torch.tensor([0.5]).half(),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]).half())
    inputs = {k: v.to(transformer_4bit.device) for k, v in inputs.items()}  # on the GPU where there is one
    with torch.no_grad():
        out = transformer_4bit(**inputs).sample
        eager = transformer_4bit.forward(**inputs).sample  # nn.Module.compile leaves forward itself eager
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)  # float16 outputs, fused vs unfused rounding
