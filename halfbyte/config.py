"""``BitsAndBytesConfig``: the one configuration object for halfbyte, diffusers and transformers.

Same fields, meanings and defaults as ``diffusers.BitsAndBytesConfig`` (docs/bnb-format.md §6.1), plus
``bnb_4bit_blocksize`` (default 64), with one deliberate change: ``bnb_4bit_compute_dtype=None`` means "compute
in the activations' dtype" (bitsandbytes' float32 default is the most common reason NF4 runs slowly).
"""

import copy
import enum
import inspect
import json
from typing import Any

import torch

from .formats.codebooks import BLOCKSIZES_4BIT, QUANT_TYPES

_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
_COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
FORMAT_VERSION = 1  # of the dict written by to_dict(); bump on incompatible changes


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
        unknown = set(kwargs) - {"quant_method", "_load_in_4bit", "_load_in_8bit", "format_version",
                                 "_pre_quantization_dtype"}
        if unknown:
            raise TypeError(f"BitsAndBytesConfig got unknown fields {sorted(unknown)}")
        if kwargs.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"quantization_config has format_version {kwargs['format_version']!r}; this halfbyte "
                             f"reads {FORMAT_VERSION}")
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
            not isinstance(llm_int8_skip_modules, (list, tuple))
            or not all(isinstance(m, str) for m in llm_int8_skip_modules)
        ):
            raise TypeError(f"llm_int8_skip_modules must be a list of str, got {llm_int8_skip_modules!r}")
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None else list(llm_int8_skip_modules)
        self.llm_int8_enable_fp32_cpu_offload = _bool("llm_int8_enable_fp32_cpu_offload",
                                                      llm_int8_enable_fp32_cpu_offload)
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
        # dtype of the model's unquantized tensors when it was quantized, recorded by the loaders so that reloading
        # a saved checkpoint without torch_dtype restores it (diffusers would otherwise pick float16)
        pre = kwargs.get("_pre_quantization_dtype")
        self._pre_quantization_dtype = None if pre is None else _dtype("_pre_quantization_dtype", pre, _COMPUTE_DTYPES)

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
        """JSON-safe dict (dtypes as strings), the form written under ``quantization_config`` in config.json.

        Writes ``_load_in_4bit/_load_in_8bit`` and never a top-level ``load_in_4bit``/``load_in_8bit``: a truthy
        one makes transformers and diffusers route the checkpoint to bitsandbytes whatever ``quant_method`` says.
        """
        d = copy.deepcopy(dict(self.__dict__))
        d["quant_method"] = self.quant_method.value
        for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "_pre_quantization_dtype"):
            d[k] = None if d[k] is None else str(d[k]).removeprefix("torch.")
        if d["_pre_quantization_dtype"] is None:
            del d["_pre_quantization_dtype"]
        d["format_version"] = FORMAT_VERSION
        return d

    def to_bitsandbytes_dict(self) -> dict[str, Any]:
        """The dict diffusers/transformers + bitsandbytes write for the same settings (docs/bnb-format.md §6.2).

        ``bnb_4bit_compute_dtype=None`` is written as "float32", bitsandbytes' meaning of None, so a reader of
        the checkpoint computes as bitsandbytes would. ``bnb_4bit_blocksize`` is not a bitsandbytes field; the
        block size travels in each layer's quant-state JSON, which bitsandbytes reads.
        """
        d = self.to_dict()
        del d["bnb_4bit_blocksize"], d["format_version"]
        d.pop("_pre_quantization_dtype", None)
        d["quant_method"] = "bitsandbytes"
        d["bnb_4bit_compute_dtype"] = d["bnb_4bit_compute_dtype"] or "float32"
        d["load_in_4bit"], d["load_in_8bit"] = self.load_in_4bit, self.load_in_8bit
        return d

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a config dict (halfbyte's, or bitsandbytes' as diffusers/transformers write it).

        ``kwargs`` override fields (transformers' ``QuantizationConfigMixin.from_dict`` protocol); with
        ``return_unused_kwargs`` the kwargs that are not fields come back as the second element.
        """
        d = dict(config_dict)
        for key in ("load_in_4bit", "load_in_8bit"):
            if f"_{key}" in d and key in d and d[f"_{key}"] != d[key]:
                raise ValueError(f"config dict disagrees with itself: _{key}={d[f'_{key}']} but {key}={d[key]}")
            if f"_{key}" in d:
                d[key] = d.pop(f"_{key}")
        fields = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        unused = {k: v for k, v in kwargs.items() if k not in fields}
        d.update({k: v for k, v in kwargs.items() if k in fields})
        config = cls(**d)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def coerce(cls, config: Any) -> "BitsAndBytesConfig":
        """``config`` itself if it is a halfbyte config; else the same settings from a diffusers/transformers
        ``BitsAndBytesConfig`` (or its dict, e.g. a checkpoint's ``quantization_config``), field by field."""
        if isinstance(config, cls):
            return config
        d = config if isinstance(config, dict) else config.to_dict()
        if d.get("quant_method") not in ("halfbyte", "bitsandbytes") and not (d.get("load_in_4bit") or
                                                                           d.get("load_in_8bit")):
            raise ValueError(f"not a halfbyte or bitsandbytes quantization config: quant_method "
                             f"{d.get('quant_method')!r}")
        fields = set(cls().to_dict()) | {"load_in_4bit", "load_in_8bit"}
        return cls.from_dict({k: v for k, v in d.items() if k in fields})

    # The rest of the QuantizationConfigMixin surface that transformers and diffusers call on a config object.
    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def to_diff_dict(self) -> dict[str, Any]:
        """Fields that differ from the defaults (plus quant_method and the format flags)."""
        default = type(self)().to_dict()
        keep = {"quant_method", "_load_in_4bit", "_load_in_8bit", "format_version", "_pre_quantization_dtype"}
        return {k: v for k, v in self.to_dict().items() if k in keep or default.get(k) != v}

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given fields (validated by rebuilding); returns the kwargs that are not fields."""
        fields = set(inspect.signature(type(self).__init__).parameters) - {"self", "kwargs"}
        d = self.to_dict()
        d.update({k: v for k, v in kwargs.items() if k in fields})
        self.__dict__.update(type(self).from_dict(d).__dict__)
        return {k: v for k, v in kwargs.items() if k not in fields}

    def __iter__(self):
        yield from copy.deepcopy(self.to_dict()).items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
