"""File-boundary translation: bitsandbytes-layout state dicts (checkpoints and streaming loads come later)."""

from .bnb import bitsandbytes_state_dict, load_bitsandbytes_state_dict

__all__ = ["bitsandbytes_state_dict", "load_bitsandbytes_state_dict"]
