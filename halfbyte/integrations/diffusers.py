"""halfbyte as a diffusers quantizer (diffusers 0.42; docs/integration-notes.md §2).

diffusers has no registration API: ``register()`` below is the one place that writes halfbyte into
``diffusers.quantizers.auto``'s two mappings (read at call time by ``ModelMixin.from_pretrained`` and by
``PipelineQuantizationConfig``). ``import halfbyte`` arranges for it to run when that module is imported.

Loading (``load_model_dict_into_meta``) visits only names of the meta state dict: a quantized layer's ``weight``
arrives here (floating point: quantized on its target device; uint8/int8: a pre-quantized checkpoint whose other
bitsandbytes tensors are pulled from the same shard's state dict). Shards can split a layer from its statistics,
so ``maybe_update_state_dict`` holds incomplete layers back until the shard that completes them, and parallel
loading is off for pre-quantized checkpoints.
"""

import copy
import weakref

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from .. import transfer
from ..config import BitsAndBytesConfig
from ..convert import dequantize_, is_skipped
from ..io.bnb import bitsandbytes_state_dict
from ..nn import Linear4bit, release_scratch
from ..sharing import share_int8_inputs
from . import _layers


class HalfbyteDiffusersQuantizer(DiffusersQuantizer):
    """diffusers side of halfbyte: quantize on load, load halfbyte and bitsandbytes checkpoints, save them."""

    use_keep_in_fp32_modules = True
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.config = BitsAndBytesConfig.coerce(quantization_config)
        if self.config is quantization_config:  # a private copy: this load records its dtype in it
            self.config = self.quantization_config = copy.deepcopy(quantization_config)
        self.modules_to_not_convert = list(self.config.llm_int8_skip_modules or [])
        self._pending: dict[str, torch.Tensor] = {}  # tensors of layers whose group is not complete yet
        self._model = None

    # --- environment, dtype, devices ---------------------------------------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs):
        if not isinstance(device_map, dict) or self.config.llm_int8_enable_fp32_cpu_offload:
            return
        quantized_on_disk = [k for k, v in device_map.items()
                             if v == "disk" and not is_skipped(k.rpartition(".")[2], k, self.modules_to_not_convert)]
        if quantized_on_disk:
            raise ValueError(
                f"device_map puts quantized modules on 'disk' ({quantized_on_disk[:3]}...): halfbyte keeps quantized "
                "layers on a device (CPU included); set llm_int8_enable_fp32_cpu_offload=True to keep disk-offloaded "
                "modules unquantized"
            )

    def update_torch_dtype(self, torch_dtype):
        # diffusers casts every floating tensor to torch_dtype while loading; None would cast to the placeholder's
        # dtype instead. A halfbyte checkpoint records its dtype; otherwise float16, as diffusers + bitsandbytes.
        if torch_dtype is None:
            torch_dtype = self.config._pre_quantization_dtype or torch.float16
        self.config._pre_quantization_dtype = torch_dtype
        return torch_dtype

    def update_device_map(self, device_map):
        if device_map is None and torch.cuda.is_available():
            return {"": f"cuda:{torch.cuda.current_device()}"}
        return device_map

    def adjust_target_dtype(self, target_dtype):
        if self.config.load_in_8bit:
            return torch.int8
        from accelerate.utils import CustomDtype

        return CustomDtype.INT4

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}

    def get_cuda_warm_up_factor(self):
        return 4 if self.config.load_in_8bit else 8  # placeholders are floating point; the result is 1 or 0.5 byte

    # --- before loading ----------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=(), **kwargs):
        skip = list(self.config.llm_int8_skip_modules or [])
        skip += [m for m in (keep_in_fp32_modules or []) if m not in skip]
        if isinstance(device_map, dict) and len(device_map) > 1 and self.config.llm_int8_enable_fp32_cpu_offload:
            # bitsandbytes' rule: modules mapped to cpu/disk stay unquantized; never the root entry "", which would
            # match every module and silently quantize nothing
            skip += [k for k, v in device_map.items() if v in ("cpu", "disk") and k and k not in skip]
        self.modules_to_not_convert = skip
        _layers.replace_with_placeholders(model, self.config, skip)
        model.register_to_config(quantization_config=self.quantization_config)  # our copy, not the user's object
        model._halfbyte_config = self.config
        self._model = weakref.ref(model)

    def update_missing_keys(self, model, missing_keys, prefix):
        quantized = {n for n, m in model.named_modules() if _layers.is_halfbyte_layer(m)}
        return [k for k in missing_keys
                if not (k.rpartition(".")[0] in quantized and k.rpartition(".")[2] in _layers.STAT_NAMES + ("SCB",))]

    @property
    def supports_parallel_loading(self) -> bool:
        return not self.pre_quantized

    def maybe_update_state_dict(self, state_dict):
        """Hold back the tensors of pre-quantized layers whose group is incomplete in this shard."""
        if not self.pre_quantized or self._model is None or self._model() is None:
            return state_dict
        merged = {**self._pending, **state_dict}
        self._pending = {}
        waiting = {n for n, m in self._model().named_modules()
                   if _layers.is_halfbyte_layer(m) and not _layers.is_filled(m)}
        groups: dict[str, list[str]] = {}
        for k in merged:  # one pass: the layer a key belongs to, if any (P.weight, P.weight.*, P.SCB, ...)
            layer = k.split(".weight.", 1)[0] if ".weight." in k else k.rpartition(".")[0]
            if layer in waiting and (k.endswith((".weight", ".SCB", ".weight_format")) or ".weight." in k):
                groups.setdefault(layer, []).append(k)
        model = self._model()
        for layer, keys in groups.items():
            if not self._complete(model.get_submodule(layer), layer + ".", merged):
                for k in keys:
                    self._pending[k] = merged.pop(k)
        return merged

    @staticmethod
    def _complete(module, P, sd) -> bool:
        if P + "weight" not in sd:
            return False
        if sd[P + "weight"].is_floating_point():
            return True
        if isinstance(module, Linear4bit):
            return any(P + s in sd for s in _layers.BNB_4BIT_SUFFIXES[-2:]) and P + "weight.absmax" in sd
        return P + "SCB" in sd

    # --- loading -----------------------------------------------------------------------------------------------
    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        module, name = _layers.layer_of(model, param_name)
        return _layers.is_halfbyte_layer(module) and name in ("weight", "SCB")

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        n = current_param.shape.numel()
        packed = (n + 1) // 2
        if loaded_param.numel() * loaded_param.element_size() != packed or loaded_param.dim() != 2 or \
                loaded_param.shape[1] != 1:
            raise ValueError(f"{param_name}: packed 4-bit weight of shape {tuple(loaded_param.shape)} and dtype "
                             f"{loaded_param.dtype} does not hold the {packed} bytes of a "
                             f"{tuple(current_param.shape)} weight (expected bitsandbytes' ((n + 1) // 2, 1) layout)")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                               unexpected_keys=None, **kwargs):
        module, name = _layers.layer_of(model, param_name)
        if _layers.is_filled(module):
            return  # SCB after its weight: the layer was loaded as a whole
        P = param_name[: -len(name)]
        raw = state_dict.get(P + "weight")
        if raw is None:
            raise ValueError(f"{P}SCB found without {P}weight in the same shard")
        if raw.is_floating_point():  # quantize on load; param_value is the weight cast to torch_dtype
            value = param_value if name == "weight" else raw
            tensors = _layers.quantized_tensors(module, value, target_device)  # moved to the device piecewise
        else:
            names = [P + s for s in ("weight",) + _layers.BNB_8BIT_SUFFIXES + _layers.BNB_4BIT_SUFFIXES]
            bnb = {k[len(P):]: state_dict[k] for k in names if k in state_dict}
            tensors = _layers.deserialized_tensors(module, bnb, P + "weight")
            tensors = {k: transfer.to_device(v, target_device) for k, v in tensors.items()}
            if unexpected_keys is not None:
                for k in names[2:]:  # never visited by diffusers (not model names): not unexpected either
                    if k in state_dict and k in unexpected_keys:
                        unexpected_keys.remove(k)
        _layers.assign(module, tensors)

    def _process_model_after_weight_loading(self, model, **kwargs):
        release_scratch()
        if self._pending:
            names = sorted({k.rpartition(".weight")[0] or k for k in self._pending})
            raise ValueError(f"checkpoint ended with incomplete quantized layers: {names[:5]}")
        _layers.check_all_filled(model)
        share_int8_inputs(model)
        return model

    # --- saving, dequantizing, capabilities --------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError("halfbyte quantizer lost its model; save with halfbyte.save_pretrained(model, dir)")
        return bitsandbytes_state_dict(model), {}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model):
        dequantize_(model)
        if "quantization_config" in model.config:  # diffusers leaves it; a later save would claim quantized
            from diffusers.configuration_utils import FrozenDict

            model._internal_dict = FrozenDict({k: v for k, v in model.config.items() if k != "quantization_config"})
        return model


def register(module=None) -> None:
    """THE place halfbyte enters diffusers: its config and quantizer under "halfbyte" in both mappings."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING["halfbyte"] = BitsAndBytesConfig
    auto.AUTO_QUANTIZER_MAPPING["halfbyte"] = HalfbyteDiffusersQuantizer
