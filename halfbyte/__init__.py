"""halfbyte: bitsandbytes-compatible 4-bit (NF4/FP4) and 8-bit (LLM.int8()) quantization in Python + Triton.

Importing halfbyte touches neither CUDA, triton, diffusers nor transformers; it arranges for halfbyte to register
itself with transformers and diffusers when they are imported (``halfbyte.integrations``).
"""

from . import functional, integrations, nn
from .config import BitsAndBytesConfig
from .convert import dequantize_, memory_footprint, quantize_, set_fp8_compute
from .io import bitsandbytes_state_dict, from_pretrained, load_bitsandbytes_state_dict, save_pretrained
from .nn import Linear4bit, Linear8bit
from .precompiler import precompile
from .sharing import share_int8_inputs

__version__ = "0.1.0"

integrations.install()

__all__ = [
    "BitsAndBytesConfig",
    "Linear4bit",
    "Linear8bit",
    "bitsandbytes_state_dict",
    "dequantize_",
    "from_pretrained",
    "functional",
    "load_bitsandbytes_state_dict",
    "memory_footprint",
    "nn",
    "precompile",
    "quantize_",
    "save_pretrained",
    "set_fp8_compute",
    "share_int8_inputs",
]
