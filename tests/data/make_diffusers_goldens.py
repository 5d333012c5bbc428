"""Write the checkpoints that diffusers + bitsandbytes produce on a CUDA GPU, for tests/test_hf_diffusers.py.

Run on a machine with a CUDA GPU, diffusers 0.42 and bitsandbytes 0.50.2:
    python tests/data/make_diffusers_goldens.py tests/data/diffusers_bnb
For each format (nf4, nf4-dq, fp4, int8) it quantizes the tiny FLUX transformer of ``halfbyte.testing`` (seed 0)
with diffusers' own ``BitsAndBytesConfig`` at ``torch_dtype=float16`` (the seed guide's settings) and saves it with
``save_pretrained``. ``expected.safetensors`` holds, per format, bitsandbytes' dequantized
``transformer_blocks.0.attn.to_q`` weight (float32) and the model's output for the fixed inputs of the test.
"""

import sys
import tempfile
from pathlib import Path

import torch

FORMATS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def flux_inputs(dtype, tokens=16, device="cpu"):
    """The same inputs as tests/test_hf_diffusers.py: flux_inputs."""
    g = torch.Generator().manual_seed(0)
    d = dict(hidden_states=torch.randn(1, tokens, 16, generator=g).to(dtype),
             encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
             pooled_projections=torch.randn(1, 32, generator=g).to(dtype), timestep=torch.tensor([0.5], dtype=dtype),
             img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5], dtype=dtype))
    return {k: v.to(device) for k, v in d.items()}


def main(out: Path) -> None:
    import bitsandbytes as bnb
    import diffusers
    from safetensors.torch import save_file

    from halfbyte.testing import tiny_flux_transformer

    out.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp()) / "flux"
    tiny_flux_transformer(seed=0).save_pretrained(src)
    expected = {}
    for name, kw in FORMATS.items():
        model = diffusers.AutoModel.from_pretrained(str(src), quantization_config=diffusers.BitsAndBytesConfig(**kw),
                                                    torch_dtype=torch.float16)
        model.save_pretrained(out / name)
        w = model.transformer_blocks[0].attn.to_q.weight
        if name == "int8":
            deq = bnb.functional.int8_vectorwise_dequant(w.data, w.SCB)
        else:
            deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        expected[f"{name}.to_q"] = deq.float().cpu().contiguous()
        with torch.no_grad():
            expected[f"{name}.out"] = model(**flux_inputs(torch.float16, device="cuda")).sample.float().cpu()
        print(name, "saved; output absmax", expected[f"{name}.out"].abs().max().item())
    save_file(expected, out / "expected.safetensors",
              metadata={"bitsandbytes": bnb.__version__, "diffusers": diffusers.__version__,
                        "torch": torch.__version__, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
