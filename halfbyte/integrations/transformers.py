"""halfbyte as a transformers quantizer (transformers 5.17 to 5.24; docs/integration-notes.md §1).

Registered under ``quant_method == "halfbyte"`` by ``register()``, which ``import halfbyte`` arranges to run as soon
as ``transformers.quantizers.auto`` is imported. Portable choices across 5.17-5.24: pre-quantized loading goes
through ``get_weight_conversions()`` (bitsandbytes key names, longest first, "weight" last) and sizes through
``param_element_size()``; ``serialized_names`` / ``get_load_operations`` / ``update_weight_conversions`` (5.21+)
are left at their defaults. The loader's converters are dropped from ``model._weight_conversions`` after loading,
so ``save_pretrained`` of a reloaded model never needs a reverse op.
"""

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer

from ..config import BitsAndBytesConfig
from ..convert import dequantize_
from ..io.bnb import bitsandbytes_state_dict
from ..nn import release_scratch
from ..sharing import share_int8_inputs
from . import _layers

_BNB_4BIT_PATTERNS = sorted(_layers.BNB_4BIT_SUFFIXES, key=len, reverse=True) + ["weight"]
_BNB_8BIT_PATTERNS = sorted(_layers.BNB_8BIT_SUFFIXES, key=len, reverse=True) + ["weight"]


def _discard(missing_keys, names) -> None:
    if missing_keys is not None:
        for n in names:
            missing_keys.discard(n)


class HalfbyteQuantize(ConversionOps):
    """On-the-fly: a floating-point ``P.weight`` (already on its device, in the load dtype) -> quantized layer."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = _layers.layer_of(model, key)
            tensors = _layers.quantized_tensors(module, value)
            _layers.assign(module, tensors)
            prefix = key[: -len("weight")]
            _discard(missing_keys, [prefix + n for n in tensors])
            out[key] = module.weight
        return out


class HalfbyteDeserialize(ConversionOps):
    """Pre-quantized: the bitsandbytes tensors of one layer (``weight``, ``weight.absmax``, ... or ``weight``,
    ``SCB``) -> halfbyte layer. A lone ``weight`` (norms, skipped Linears the pattern also catches) passes."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer  # truthy: transformers 5.21+ then leaves the stats' dtypes alone

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = _layers.layer_of(model, full_layer_name)
        if not _layers.is_halfbyte_layer(module):
            if len(tensors) != 1:
                raise ValueError(f"{full_layer_name}: quantized tensors {sorted(tensors)} in the checkpoint, but the "
                                 f"model keeps {type(module).__name__} here unquantized")
            return tensors
        if len(tensors) == 1 and tensors["weight"].is_floating_point():
            raise ValueError(f"{full_layer_name}: the checkpoint holds a floating-point weight for a layer that "
                             "its quantization_config says is quantized")
        native = _layers.deserialized_tensors(module, tensors, full_layer_name)
        _layers.assign(module, native)
        prefix = full_layer_name[: -len("weight")]
        _discard(missing_keys, [prefix + n for n in native])
        return {"weight": module.weight}

    @property
    def reverse_op(self):  # saving writes bitsandbytes keys itself (get_state_dict_and_metadata)
        return _PassThrough()


class _PassThrough(ConversionOps):
    def convert(self, input_dict, **kwargs):
        return input_dict


class HalfbyteHfQuantizer(HfQuantizer):
    """transformers side of halfbyte: quantize on load, load halfbyte and bitsandbytes checkpoints, save them."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.config = BitsAndBytesConfig.coerce(quantization_config)
        self.modules_to_not_convert: list[str] = []

    # --- environment, dtype, devices ---------------------------------------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values() and \
                not self.config.llm_int8_enable_fp32_cpu_offload:
            raise ValueError(
                "device_map puts modules on 'disk': halfbyte keeps quantized layers on a device (CPU included); "
                "set llm_int8_enable_fp32_cpu_offload=True to keep the disk-offloaded modules unquantized"
            )

    def update_device_map(self, device_map):
        if device_map is None and torch.cuda.is_available():
            return {"": torch.cuda.current_device()}
        return device_map

    def param_needs_quantization(self, model, param_name, **kwargs) -> bool:
        try:
            module, name = _layers.layer_of(model, param_name)
        except AttributeError:
            return False
        return _layers.is_halfbyte_layer(module) and name == "weight"

    def param_element_size(self, model, param_name, param) -> float:
        if self.param_needs_quantization(model, param_name):
            return 0.5 if self.config.load_in_4bit else 1.0
        return param.element_size()

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}  # room for the float weight being quantized

    # --- before / after loading --------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        skip = self.get_modules_to_not_convert(model, self.config.llm_int8_skip_modules,
                                               getattr(model, "_keep_in_fp32_modules", None))
        if self.config.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            # bitsandbytes' rule: modules mapped to cpu/disk stay unquantized; never the root entry "", which would
            # match every module and silently quantize nothing
            skip += [k for k, v in device_map.items() if v in ("cpu", "disk") and k and k not in skip]
        self.modules_to_not_convert = skip
        _layers.replace_with_placeholders(model, self.config, skip)
        model._halfbyte_config = self.config

    def _process_model_after_weight_loading(self, model, **kwargs):
        release_scratch()
        _layers.check_all_filled(model)
        share_int8_inputs(model)
        _layers.refuse_dtype_casts(model)
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c for c in conversions
                if not any(isinstance(op, (HalfbyteDeserialize, HalfbyteQuantize))
                           for op in getattr(c, "operations", ()))
            ]
        return model

    def get_quantize_ops(self):
        return HalfbyteQuantize(self)

    def get_weight_conversions(self):
        if not self.pre_quantized:
            return []
        patterns = _BNB_4BIT_PATTERNS if self.config.load_in_4bit else _BNB_8BIT_PATTERNS
        return [WeightConverter(source_patterns=list(patterns), target_patterns="weight",
                                operations=[HalfbyteDeserialize(self)])]

    # --- saving, dequantizing, capabilities --------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        return bitsandbytes_state_dict(model), {}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        dequantize_(model)
        model.__dict__.pop("to", None)
        if dtype is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.weight.dtype != dtype and m.weight.is_floating_point():
                    m.to(dtype)
        return model


def register(module=None) -> None:
    """Write halfbyte's config and quantizer into transformers' quantization mappings (idempotent)."""
    from transformers.quantizers import auto

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING["halfbyte"] = BitsAndBytesConfig
    auto.AUTO_QUANTIZER_MAPPING["halfbyte"] = HalfbyteHfQuantizer


