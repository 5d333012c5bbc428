"""Device copies of the constant tables that quantized layers' forwards read (4-bit code tables, the dynamic map of
double quantization), one per device."""

import torch
from torch import Tensor

from .formats.codebooks import code_4bit, dynamic_map

_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def code_table(quant_type: str, device: torch.device) -> Tensor:
    """The (16,) float32 NF4/FP4 code table (``quant_type`` "dynamic": double quantization's (256,) dynamic map) on
    ``device``, one copy per device: a forward must not copy it from the host each call (a blocking transfer in
    eager mode, a host tensor inside a compiled graph). Read-only by contract. ``halfbyte.nn``'s layers fill it
    when they are built, moved or loaded: a first call traced by torch.compile that inserted it would leave the
    graph guarded on its absence, and the next call would compile again."""
    code = _TABLES.get((quant_type, device))
    if code is None:
        code = dynamic_map(device) if quant_type == "dynamic" else code_4bit(quant_type, device)
        _TABLES[(quant_type, device)] = code
    return code


def nested_code(device: torch.device) -> Tensor:
    """The (256,) dynamic map on ``device``, as ``code_table``."""
    return code_table("dynamic", device)
