"""``BitsAndBytesConfig``: the one configuration object for halfbyte, diffusers and transformers.

Same fields, meanings and defaults as ``diffusers.BitsAndBytesConfig`` (docs/bnb-format.md §6.1), plus
``bnb_4bit_blocksize`` (default 64), with one deliberate change: ``bnb_4bit_compute_dtype=None`` means "compute
in the activations' dtype" (bitsandbytes' float32 default is the most common reason NF4 runs slowly).
"""

import copy
import enum
import json
from typing import Any

import torch

from .formats.codebooks import BLOCKSIZES_4BIT, QUANT_TYPES

_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
_COMPUTE_DTYPES = ("float16", "bfloat16", "float32")


class QuantMethod(str, enum.Enum):
    """``quant_method`` of halfbyte configs. Not "bitsandbytes": transformers reserves that for its own class."""

    HALFBYTE = "halfbyte"


def _dtype(field: str, value: Any, allowed: tuple[str, ...]) -> torch.dtype:
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    if name not in allowed:
        raise ValueError(f"{field} must be a torch.dtype or one of {allowed}, got {value!r}")
    return getattr(torch, name)


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be a bool, got {value!r}")
    return value


class BitsAndBytesConfig:
    """What to quantize and how: 8-bit LLM.int8() (``load_in_8bit``) or 4-bit NF4/FP4 (``load_in_4bit``).

    Args:
        load_in_8bit / load_in_4bit: choose the format (at most one).
        llm_int8_threshold: 8-bit outlier threshold on activations; 0 disables the decomposition.
        llm_int8_skip_modules: module names kept in floating point (a name matches the module's own name, its
            full dotted path, or any path it prefixes), for 4-bit as well.
        llm_int8_enable_fp32_cpu_offload: let a device_map put (unquantized) modules on CPU/disk.
        llm_int8_has_fp16_weight: bitsandbytes' 8-bit training mode; not supported (quantize_ raises).
        bnb_4bit_compute_dtype: dtype of the 4-bit matmul; None = the activations' dtype.
        bnb_4bit_quant_type: "fp4" (default, as bitsandbytes) or "nf4".
        bnb_4bit_use_double_quant: quantize the absmax statistics again (8-bit, blocks of 256).
        bnb_4bit_quant_storage: dtype the packed bytes are viewed as in bitsandbytes files (default uint8).
        bnb_4bit_blocksize: 4-bit block size, one of 32..4096 (bitsandbytes and the HF loaders use 64).
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: torch.dtype | str | None = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: torch.dtype | str | None = None,
        bnb_4bit_blocksize: int = 64,
        **kwargs: Any,
    ):
        unknown = set(kwargs) - {"quant_method", "_load_in_4bit", "_load_in_8bit"}
        if unknown:
            raise TypeError(f"BitsAndBytesConfig got unknown fields {sorted(unknown)}")
        method = kwargs.get("quant_method", QuantMethod.HALFBYTE)
        if method not in ("halfbyte", "bitsandbytes"):
            raise ValueError(f"quant_method must be 'halfbyte' or 'bitsandbytes', got {method!r}")
        self.quant_method = QuantMethod.HALFBYTE
        load_in_8bit = _bool("load_in_8bit", kwargs.get("_load_in_8bit", load_in_8bit))
        load_in_4bit = _bool("load_in_4bit", kwargs.get("_load_in_4bit", load_in_4bit))
        if load_in_8bit and load_in_4bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True: choose one")
        self._load_in_8bit, self._load_in_4bit = load_in_8bit, load_in_4bit
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise TypeError(f"llm_int8_threshold must be a float, got {llm_int8_threshold!r}")
        if not llm_int8_threshold >= 0:  # also rejects NaN
            raise ValueError(f"llm_int8_threshold must be >= 0, got {llm_int8_threshold}")
        self.llm_int8_threshold = float(llm_int8_threshold)
        if llm_int8_skip_modules is not None and (
            not isinstance(llm_int8_skip_modules, (list, tuple)) or not all(isinstance(m, str) for m in llm_int8_skip_modules)
        ):
            raise TypeError(f"llm_int8_skip_modules must be a list of str, got {llm_int8_skip_modules!r}")
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None else list(llm_int8_skip_modules)
        self.llm_int8_enable_fp32_cpu_offload = _bool("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload)
        self.llm_int8_has_fp16_weight = _bool("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight)
        self.bnb_4bit_compute_dtype = (
            None if bnb_4bit_compute_dtype is None
            else _dtype("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, _COMPUTE_DTYPES)
        )
        if bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {bnb_4bit_quant_type!r}")
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = _bool("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)
        self.bnb_4bit_quant_storage = (
            torch.uint8 if bnb_4bit_quant_storage is None
            else _dtype("bnb_4bit_quant_storage", bnb_4bit_quant_storage, _STORAGE_DTYPES)
        )
        if isinstance(bnb_4bit_blocksize, bool) or bnb_4bit_blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"bnb_4bit_blocksize must be one of {BLOCKSIZES_4BIT}, got {bnb_4bit_blocksize!r}")
        self.bnb_4bit_blocksize = int(bnb_4bit_blocksize)

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    def quantization_method(self) -> str | None:
        """"llm_int8", "fp4", "nf4" or None, as diffusers' config answers."""
        if self.load_in_8bit:
            return "llm_int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (dtypes as strings), the form written under ``quantization_config`` in config.json."""
        d = copy.deepcopy({k: v for k, v in self.__dict__.items()})
        d["quant_method"] = self.quant_method.value
        for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            d[k] = None if d[k] is None else str(d[k]).removeprefix("torch.")
        d["load_in_4bit"], d["load_in_8bit"] = self.load_in_4bit, self.load_in_8bit
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BitsAndBytesConfig":
        d = dict(d)
        for key in ("load_in_4bit", "load_in_8bit"):
            if f"_{key}" in d and key in d and d[f"_{key}"] != d[key]:
                raise ValueError(f"config dict disagrees with itself: _{key}={d[f'_{key}']} but {key}={d[key]}")
            d.pop(f"_{key}", None)
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
