"""File boundary: bitsandbytes-layout state dicts, checkpoint directories (atomic save, streaming load)."""

from .bnb import bitsandbytes_state_dict, load_bitsandbytes_state_dict
from .checkpoint import disable_progress_bars, enable_progress_bars, from_pretrained, save_pretrained

__all__ = [
    "bitsandbytes_state_dict",
    "disable_progress_bars",
    "enable_progress_bars",
    "from_pretrained",
    "load_bitsandbytes_state_dict",
    "save_pretrained",
]
