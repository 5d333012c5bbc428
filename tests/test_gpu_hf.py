"""GPU tier of the Hugging Face integration: device moves, model and sequential CPU offload (4-bit and 8-bit
components), ``device_map="auto"`` with layers forced to the CPU, pipeline ``device_map="balanced"``.

Needs a CUDA device and diffusers (``pytest -m gpu``); on a machine without CUDA these tests do not run.
Every variant must give the image that the plain ``.to("cuda")`` pipeline gives: offloading moves bytes, it must
not change what is computed.
"""

import numpy as np
import pytest
import torch

import halfbyte
from halfbyte import BitsAndBytesConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier: needs a CUDA device")]

KINDS = {"4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "8bit": dict(load_in_8bit=True)}
CALL = dict(prompt="a photo of a cat", height=64, width=64, num_inference_steps=3, max_sequence_length=16,
            output_type="np")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from halfbyte.testing import save_tiny_flux_pipeline

    return str(save_tiny_flux_pipeline(tmp_path_factory.mktemp("gpu") / "flux"))


def components(pipe_dir, kind):
    from diffusers import AutoModel
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(pipe_dir, subfolder="text_encoder_2", dtype=torch.float16,
                                        quantization_config=BitsAndBytesConfig(**KINDS[kind]))
    tr = AutoModel.from_pretrained(pipe_dir, subfolder="transformer", torch_dtype=torch.float16,
                                   quantization_config=BitsAndBytesConfig(**KINDS[kind]))
    return dict(transformer=tr, text_encoder_2=t5)


def generate(pipe):
    return pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0)).images


@pytest.fixture(scope="module", params=list(KINDS))
def reference(request, pipe_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(pipe_dir, **components(pipe_dir, request.param), torch_dtype=torch.float16)
    pipe.to("cuda")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.device.type == "cuda"
    return request.param, generate(pipe)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_matches_to_cuda(pipe_dir, reference, mode):
    from diffusers import FluxPipeline

    kind, expected = reference
    pipe = FluxPipeline.from_pretrained(pipe_dir, **components(pipe_dir, kind), torch_dtype=torch.float16)
    (pipe.enable_model_cpu_offload if mode == "model" else pipe.enable_sequential_cpu_offload)()
    image = generate(pipe)
    np.testing.assert_array_equal(image, expected)
    # the quantized weights stayed quantized through the hooks
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype in (torch.uint8, torch.int8)


def test_pipeline_balanced_device_map(pipe_dir, reference):
    from diffusers import FluxPipeline

    kind, expected = reference
    pipe = FluxPipeline.from_pretrained(pipe_dir, **components(pipe_dir, kind), torch_dtype=torch.float16,
                                        device_map="balanced")
    np.testing.assert_array_equal(generate(pipe), expected)


def flux_inputs(device, dtype=torch.float16, tokens=64):
    g = torch.Generator().manual_seed(0)
    d = dict(hidden_states=torch.randn(1, tokens, 16, generator=g),
             encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
             pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
             guidance=torch.tensor([3.5]))
    d = {k: v.to(device, dtype) for k, v in d.items()}
    d.update(img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(8, 3, device=device))
    return d


@pytest.mark.parametrize("kind", list(KINDS))
def test_device_map_auto_with_layers_on_cpu(pipe_dir, kind):
    from diffusers import AutoModel

    on_gpu = AutoModel.from_pretrained(pipe_dir, subfolder="transformer", torch_dtype=torch.float16,
                                       quantization_config=BitsAndBytesConfig(**KINDS[kind]), device_map="cuda")
    # room on the GPU for 90 % of the quantized model; accelerate also keeps the largest block's size free there
    # (for the offloaded blocks it streams in), so a good part lands on the CPU and is moved in at each forward
    budget = int(halfbyte.memory_footprint(on_gpu) * 0.9)
    split = AutoModel.from_pretrained(pipe_dir, subfolder="transformer", torch_dtype=torch.float16,
                                      quantization_config=BitsAndBytesConfig(**KINDS[kind]), device_map="auto",
                                      max_memory={0: budget, "cpu": 10**10})
    placed = set(split.hf_device_map.values())
    assert "cpu" in placed and (0 in placed or "cuda:0" in placed), split.hf_device_map
    quantized = [m for m in split.modules() if isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit))]
    assert len(quantized) == 30 and all(m.weight.dtype in (torch.uint8, torch.int8) for m in quantized)
    with torch.no_grad():
        a = on_gpu(**flux_inputs("cuda")).sample
        b = split(**flux_inputs("cuda")).sample
    torch.testing.assert_close(b.cpu(), a.cpu(), rtol=0, atol=0)  # same bytes, same kernels, same device


@pytest.mark.parametrize("kind", list(KINDS))
def test_bitsandbytes_compatible_save_loads_in_diffusers_bitsandbytes(pipe_dir, kind, tmp_path):
    """halfbyte.save_pretrained(..., bitsandbytes_compatible=True) is a checkpoint diffusers + bitsandbytes load
    as their own (bitsandbytes' layers), computing what halfbyte computes."""
    bnb = pytest.importorskip("bitsandbytes")
    from diffusers import AutoModel

    # float32 compute for 4-bit: the dtype bitsandbytes reads back from the written config (its default)
    fields = dict(KINDS[kind], bnb_4bit_compute_dtype=torch.float32) if kind == "4bit" else KINDS[kind]
    ours = AutoModel.from_pretrained(pipe_dir, subfolder="transformer", torch_dtype=torch.float16,
                                     quantization_config=BitsAndBytesConfig(**fields), device_map="cuda")
    halfbyte.save_pretrained(ours, tmp_path / "compat", bitsandbytes_compatible=True)
    halfbyte.integrations.restore_bitsandbytes()  # bitsandbytes itself must read it
    theirs = AutoModel.from_pretrained(str(tmp_path / "compat"))
    layer = theirs.transformer_blocks[0].attn.to_q
    assert isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    with torch.no_grad():
        a = ours(**flux_inputs("cuda")).sample.float()
        b = theirs(**flux_inputs("cuda")).sample.float()
    # Same bytes; 4-bit: both dequantize then GEMM in float32 (cuBLAS, same order) -> equal up to the float16
    # output rounding of a differently fused bias; int8: same int8 codes, same float16 epilogue.
    torch.testing.assert_close(a, b, rtol=0, atol=4e-3)
