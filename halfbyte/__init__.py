"""halfbyte: bitsandbytes-compatible 4-bit (NF4/FP4) and 8-bit (LLM.int8()) quantization in Python + Triton.

Importing halfbyte touches neither CUDA, triton, diffusers nor transformers.
"""

from . import functional, nn
from .config import BitsAndBytesConfig
from .convert import dequantize_, memory_footprint, quantize_
from .io import bitsandbytes_state_dict, load_bitsandbytes_state_dict
from .nn import Linear4bit, Linear8bit

__version__ = "0.1.0"

__all__ = [
    "BitsAndBytesConfig",
    "Linear4bit",
    "Linear8bit",
    "bitsandbytes_state_dict",
    "dequantize_",
    "functional",
    "load_bitsandbytes_state_dict",
    "memory_footprint",
    "nn",
    "quantize_",
]
