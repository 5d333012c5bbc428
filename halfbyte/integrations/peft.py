"""LoRA (peft) on halfbyte's quantized layers, and diffusers' FLUX LoRA loader around them.

**Layers.** ``LoraLinear`` wraps a halfbyte ``Linear4bit`` or ``Linear8bit`` as peft's ``lora.Linear`` wraps an
``nn.Linear`` (modelled on peft's ``tuners/lora/hqq.py``): forward = the quantized layer's output plus the LoRA
terms, computed in the adapters' dtype; the base stays quantized and frozen, gradients reach only the adapters.
Adapters take the base layer's ``compute_dtype`` or, if that is None, the dtype it was quantized from, as peft
gives a plain ``nn.Linear``'s adapters its weight dtype. DoRA works through ``dequantize()``.

**Merging** (``merge`` / diffusers' ``fuse_lora``): dequantize to float32, add the adapters' deltas, quantize the
float32 sum in the layer's format and copy the result into the *same* tensors (so accelerate hooks and group
offloading, which hold tensor identities, keep working). The fused bytes are those of quantizing the float merged
weight (bitsandbytes' bytes for a float32 model), so the error is one more quantization: at most half the widest
code gap times the block's absmax per weight (NF4: 0.152 absmax, FP4: 0.167; int8: half a step of the row scale).
Weights sitting on the code grid move to another code only if their delta crosses a midpoint: a LoRA whose delta is
small next to the quantization step is mostly rounded away, and ``merge`` warns when the stored weight keeps less
than ``KEPT_WARNING`` of the change. Several plain adapters merged at once share one requantization.
Unmerging restores the original bytes exactly: the first merge keeps a copy of the layer's quantized tensors
(weight, statistics, bias) on ``BACKUP_DEVICE`` (default: the CPU), and ``unmerge`` copies it back. The copy costs
what the merged layers hold in quantized form (about 0.56 byte per weight for NF4) until unmerge or until the LoRA
layers are unloaded. bitsandbytes' unmerge instead subtracts the delta and quantizes again, which is lossy.

**Registration.** peft's public extension point, ``LoraConfig._register_custom_module`` (experimental in peft),
serves ``get_peft_model`` / ``add_adapter``: ``register_custom_modules(config)`` fills it. diffusers'
``load_lora_weights`` builds its own plain ``LoraConfig`` and offers no way to pass custom modules, so ``import
halfbyte`` also wraps peft's ``LoraModel._create_new_module`` (checked against the peft versions halfbyte is tested
with) to try halfbyte's layers first, unless the config maps them itself.

**diffusers' FLUX loader** (``FluxLoraLoaderMixin``) widens layers for LoRAs with more input features (Control
LoRAs: ``x_embedder`` from 64 to 128 channels), but only ``nn.Linear`` ones, and reads a layer's input width from
``weight.shape[1]``. For a transformer holding halfbyte layers, a wrapper of its
``_maybe_expand_transformer_param_shape_or_error_`` first checks the LoRA against the model (every target module
must exist, lora_A/lora_B shapes must fit: clear errors instead of diffusers' partial load of a LoRA for another
architecture) and widens halfbyte layers itself: the weight, zero-padded, is quantized again in the same format
(the same codes where rows hold whole blocks, as FLUX's 64-wide ``x_embedder`` at block size 64; otherwise one
more rounding of at most one quantization step). ``unload_lora_weights(reset_to_overwritten_params=True)`` puts
the original layers back.

Opt out of both wrappers with the environment variable ``HALFBYTE_LORA_HOOKS=0`` (read by ``import halfbyte``)
or ``uninstall()``; ``register_custom_modules`` keeps working.
"""

import inspect
import logging
import warnings

import torch
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from ..nn import Linear4bit, Linear8bit

logger = logging.getLogger(__name__)

QUANTIZED = (Linear4bit, Linear8bit)
#: Where ``merge`` keeps the original quantized tensors for an exact ``unmerge``; None = the layer's own device.
BACKUP_DEVICE: str | torch.device | None = "cpu"
#: peft versions whose ``LoraModel._create_new_module`` the dispatch wrapper was written against: [low, high).
PEFT_VERSIONS = ((0, 21), (0, 22))
#: diffusers versions whose FLUX LoRA loader the loader wrapper was written against: [low, high).
DIFFUSERS_VERSIONS = ((0, 42), (0, 43))
#: merge warns when the requantized weight keeps less than this fraction of the adapters' change (projected on it)
KEPT_WARNING = 0.5
_SMALL_DELTA = ("merging a LoRA into a quantized layer kept less than half of its change: its delta is small next to "
                "the quantization step, so most weights round back to their old codes. Run the LoRA unfused for its "
                "full effect (halfbyte README, 'LoRA')")
# init_lora_weights values that leave the base weight alone (the others read or rewrite it: PiSSA, OLoRA, ...)
_INITS = (True, False, "gaussian")


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


class LoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer around a halfbyte ``Linear4bit`` / ``Linear8bit`` (any number of adapters, DoRA included).

    ``base_layer``: the halfbyte layer (or a peft layer wrapping one). Input ``x`` (..., in_features) in any
    floating dtype; output (..., out_features) in the base layer's output dtype (= ``x``'s dtype).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        init = config.init_lora_weights
        if not any(init is v or (isinstance(v, str) and init == v) for v in _INITS):
            raise ValueError(f"init_lora_weights={init!r} reads or rewrites the base weight, which halfbyte keeps "
                             f"quantized and frozen; use one of {_INITS}")
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True does not apply to halfbyte layers (their weight is (out, in), as "
                          "nn.Linear's); using False", stacklevel=2)
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._backup: dict[str, Tensor] | None = None  # the base's quantized tensors before the first merge
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self):
        from peft.tuners.lora import variants

        return {(): None, ("use_dora",): variants.DoraLinearVariant}

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # peft's generic lookup would warn "unsupported layer"

    def _get_base_layer_device_and_dtype(self, base_layer):
        # peft would take the packed weight's integer dtype and leave the adapters in float32; use the dtype the
        # layer computes in, as peft does for nn.Linear (get_peft_model's autocast_adapter_dtype upcasts 16-bit)
        return base_layer.weight.device, getattr(base_layer, "compute_dtype", None) or base_layer.dtype

    def get_delta_weight(self, adapter: str) -> Tensor:
        """(out_features, in_features) float32: ``lora_B @ lora_A * scaling``."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (B.float() @ A.float()) * self.scaling[adapter]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        variant_kwargs = {k: kwargs.pop(k, None) for k in VARIANT_KWARG_KEYS}  # not for the base layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **variant_kwargs, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result,
                                                         **variant_kwargs, **kwargs)
            else:
                # out of place, so the base output needs no defensive clone (bitsandbytes' layer clones it)
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(dtype)

    # --- merging -----------------------------------------------------------------------------------------------
    def _quantized_tensors(self) -> dict[str, Tensor]:
        base = self.get_base_layer()
        return {n: t for n, t in [*base.named_parameters(recurse=False), *base.named_buffers(recurse=False)]}

    def _store(self, weight: Tensor, bias: Tensor | None) -> None:
        """Quantize ``weight`` (out, in) float32 in the base layer's format and copy it (and ``bias``) into the base
        layer's existing tensors."""
        base = self.get_base_layer()
        new = _quantized_like(base, weight)
        live = self._quantized_tensors()
        for name, t in [*new.named_parameters(recurse=False), *new.named_buffers(recurse=False)]:
            if live[name].dtype != t.dtype or live[name].numel() != t.numel():
                raise RuntimeError(f"requantized {name} ({t.dtype}, {t.numel()} elements) does not fit the layer's "
                                   f"({live[name].dtype}, {live[name].numel()})")
            live[name].copy_(t.reshape(live[name].shape))
        if bias is not None:
            base.bias.copy_(bias)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the quantized weight (dequantize, add, quantize again into the same tensors).

        ``safe_merge``: check each merged weight for NaN/inf before storing it, and raise if there are any.
        ``adapter_names``: default the active adapters. Plain adapters merged together share one requantization;
        variants (DoRA) are merged one at a time, because peft's variants read the already merged weight.
        """
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        if base.weight.is_meta:
            raise RuntimeError(f"cannot merge into {type(base).__name__}: its weights are offloaded (on the meta "
                               "device); merge before enabling sequential CPU offload or group offloading")
        if not self.merged_adapters:
            device = BACKUP_DEVICE if BACKUP_DEVICE is not None else base.weight.device
            self._backup = {n: t.detach().to(device, copy=True) for n, t in self._quantized_tensors().items()}
        groups: list[list[str]] = []
        for a in names:
            if a in self.lora_variant or not groups or groups[-1][0] in self.lora_variant:
                groups.append([a])
            else:
                groups[-1].append(a)
        for group in groups:
            before = base.dequantize(torch.float32)
            if group[0] in self.lora_variant:
                weight = self.lora_variant[group[0]].merge_safe(self, group[0], before).float()
            else:
                weight = before + sum(self.get_delta_weight(a) for a in group)
            bias = None
            if any(self.lora_bias[a] for a in group):
                if base.bias is None:
                    raise RuntimeError("cannot merge a LoRA with lora_bias=True into a layer without bias")
                bias = base.bias + sum(self.lora_B[a].bias * self.scaling[a] for a in group if self.lora_bias[a])
            if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {group} seem to be broken")
            self._store(weight, bias)
            self.merged_adapters.extend(group)
            delta = weight - before
            norm = (delta * delta).sum()
            if norm > 0 and ((base.dequantize(torch.float32) - before) * delta).sum() < KEPT_WARNING * norm:
                warnings.warn(_SMALL_DELTA, stacklevel=3)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base layer's bytes from before the first merge (exactly)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        live = self._quantized_tensors()
        for name, saved in self._backup.items():
            live[name].copy_(saved)
        for a in self.merged_adapters:
            self._caches.pop(f"{a}-weight_norm", None)  # what DoRA's own unmerge would have consumed
        self.merged_adapters.clear()
        self._backup = None

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_halfbyte(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs) -> nn.Module | None:
    """A peft dispatcher: a ``LoraLinear`` for a halfbyte layer (or a peft layer around one), else None."""
    if isinstance(_base_of(target), QUANTIZED):
        return LoraLinear(target, adapter_name, config=lora_config, **kwargs)
    return None


def register_custom_modules(config: LoraConfig) -> LoraConfig:
    """Map halfbyte's layers to ``LoraLinear`` in ``config`` (peft's ``_register_custom_module``); returns it.

    Only needed with ``HALFBYTE_LORA_HOOKS=0``: otherwise peft finds halfbyte's layers by itself.
    """
    config._register_custom_module({Linear4bit: LoraLinear, Linear8bit: LoraLinear})
    return config


# --- peft: LoraModel._create_new_module ------------------------------------------------------------------------
_peft_original = None  # the staticmethod that install_peft_dispatch replaced


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    """peft's ``LoraModel._create_new_module``, trying halfbyte's layers first unless the config maps them."""
    custom = lora_config._custom_modules or {}
    if not any(isinstance(_base_of(target), cls) for cls in custom):
        new = dispatch_halfbyte(target, adapter_name, lora_config, **kwargs)
        if new is not None:
            return new
    return _peft_original.__func__(lora_config, adapter_name, target, **kwargs)


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _untested(name: str, version: str, tested: tuple) -> str | None:
    (lo, hi) = tested
    if lo <= _version(version) < hi:
        return None
    return (f"halfbyte's LoRA hooks were written for {name} {lo[0]}.{lo[1]}.x, but {name} {version} is installed, "
            "so they stay off")


def install_peft_dispatch() -> bool:
    """Wrap ``peft.tuners.lora.model.LoraModel._create_new_module`` so that every LoraConfig (diffusers'
    included) wraps halfbyte's layers in ``LoraLinear``. Returns whether the wrapper is in place; warns and leaves
    peft alone on an untested peft version or an unexpected signature."""
    global _peft_original
    import peft
    from peft.tuners.lora.model import LoraModel

    current = LoraModel.__dict__.get("_create_new_module")
    if getattr(current, "__func__", None) is _create_new_module:
        return True
    problem = _untested("peft", peft.__version__, PEFT_VERSIONS)
    if problem is None and (not isinstance(current, staticmethod) or list(
            inspect.signature(current.__func__).parameters) != ["lora_config", "adapter_name", "target", "kwargs"]):
        problem = "peft's LoraModel._create_new_module has an unexpected form; halfbyte's dispatch is not installed"
    if problem:
        warnings.warn(f"{problem}. Use halfbyte.integrations.peft.register_custom_modules(lora_config) with "
                      "get_peft_model; diffusers' load_lora_weights will not find halfbyte's layers.", stacklevel=2)
        return False
    _peft_original = current
    LoraModel._create_new_module = staticmethod(_create_new_module)
    return True


# --- diffusers: FluxLoraLoaderMixin ----------------------------------------------------------------------------
_flux_originals: dict[str, object] = {}  # attribute name -> what patch_flux_lora_loader replaced
_flux_mixin = None
_flux_attribute_map: dict[str, str] = {}  # diffusers' module name -> config attribute holding its input width


def _quantized_like(layer: nn.Module, weight: Tensor) -> nn.Module:
    """A new layer (no bias) of ``layer``'s format, dtype and device holding ``weight`` (out, in), quantized from
    the given values (float32 here: no rounding to the layer's dtype first)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if isinstance(layer, Linear4bit):
        new = Linear4bit.from_linear(lin, quant_type=layer.quant_type, blocksize=layer.blocksize,
                                     double_quant=layer.double_quant, compute_dtype=layer.compute_dtype,
                                     quant_storage=layer.quant_storage)
    else:
        new = Linear8bit.from_linear(lin, threshold=layer.threshold)
    new.dtype = layer.dtype
    return new


def _widened(layer: nn.Module, in_features: int) -> nn.Module:
    """A copy of the halfbyte ``layer`` taking ``in_features`` inputs: its weight zero-padded on the right and
    quantized again in the same format; bias shared."""
    weight = layer.dequantize(torch.float32)
    padded = weight.new_zeros(layer.out_features, in_features)
    padded[:, :layer.in_features] = weight
    new = _quantized_like(layer, padded)
    new.bias = layer.bias
    return new


def fit_lora_to_halfbyte_layers(transformer: nn.Module, lora_state_dict: dict[str, Tensor], prefix: str,
                                attribute_map: dict[str, str] | None = None) -> bool:
    """Check a diffusers-format LoRA (keys ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``, or without
    the prefix) against ``transformer`` and widen the halfbyte layers whose lora_A has more input features.

    Raises ValueError if a target module does not exist (a LoRA for another architecture) or a halfbyte layer's
    lora_A (r, in) / lora_B (out, r) do not fit it. ``attribute_map``: module name -> config attribute holding its
    input width (diffusers' ``{"x_embedder": "in_channels"}``), updated on widening. Returns whether a layer was
    widened; the originals go to ``transformer._halfbyte_overwritten_layers``.
    """
    pre = prefix + "."
    lora = {(k[len(pre):] if k.startswith(pre) else k): v for k, v in lora_state_dict.items()}
    targets = sorted({k[:-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")})
    modules = dict(transformer.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(
            f"this LoRA does not fit {type(transformer).__name__}: {len(missing)} of its {len(targets)} target "
            f"modules do not exist in the model (e.g. {missing[:3]}); it was probably made for another architecture "
            "(to load only the part that fits, pass a state dict without those keys)"
        )
    widened = False
    for name in targets:
        layer = _base_of(modules[name])
        if not isinstance(layer, QUANTIZED):
            continue  # diffusers' own checks and expansion apply
        A, B = lora[f"{name}.lora_A.weight"], lora.get(f"{name}.lora_B.weight")
        expected = f"lora_A (r, {layer.in_features}) and lora_B ({layer.out_features}, r)"
        got = f"{tuple(A.shape)} and {None if B is None else tuple(B.shape)}"
        if B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or B.shape[0] != layer.out_features:
            raise ValueError(f"the LoRA for {name} does not fit the layer: expected {expected}, got {got}")
        if layer.weight.ndim != 2:
            raise ValueError(f"{name}: halfbyte stores this layer's weight flat (odd out_features="
                             f"{layer.out_features}), and diffusers' FLUX LoRA loader reads the input width from "
                             "weight.shape[1]")
        if A.shape[1] <= layer.in_features:
            continue  # narrower: diffusers zero-pads lora_A
        if modules[name] is not layer:
            raise ValueError(f"the LoRA for {name} widens the layer's input from {layer.in_features} to "
                             f"{A.shape[1]}, but adapters are already loaded on it: load the widening LoRA first")
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), child, _widened(layer, A.shape[1]))
        saved = getattr(transformer, "_halfbyte_overwritten_layers", None) or {}
        saved.setdefault(name, layer)
        transformer._halfbyte_overwritten_layers = saved
        if attribute_map and child in attribute_map:
            setattr(transformer.config, attribute_map[child], int(A.shape[1]))
        logger.info(f"widened the halfbyte layer {name} from {layer.in_features} to {A.shape[1]} input features")
        widened = True
    return widened


def _expand_or_error(cls, transformer, lora_state_dict=None, norm_state_dict=None, prefix=None):
    """``FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_`` for halfbyte layers first."""
    widened = False
    if lora_state_dict and any(isinstance(m, QUANTIZED) for m in transformer.modules()):
        widened = fit_lora_to_halfbyte_layers(transformer, lora_state_dict, prefix or cls.transformer_name,
                                              _flux_attribute_map)
    original = _flux_originals["_maybe_expand_transformer_param_shape_or_error_"]
    return original.__func__(cls, transformer, lora_state_dict, norm_state_dict, prefix) or widened


def _unload_lora_weights(self, reset_to_overwritten_params=False):
    """``FluxLoraLoaderMixin.unload_lora_weights``, also putting back halfbyte layers that a LoRA widened."""
    _flux_originals["unload_lora_weights"](self, reset_to_overwritten_params=reset_to_overwritten_params)
    transformer = getattr(self, self.transformer_name) if not hasattr(self, "transformer") else self.transformer
    saved = getattr(transformer, "_halfbyte_overwritten_layers", None)
    if reset_to_overwritten_params and saved:
        for name, layer in saved.items():
            parent_name, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent_name), child, layer)
            if child in _flux_attribute_map:
                setattr(transformer.config, _flux_attribute_map[child], layer.in_features)
        transformer._halfbyte_overwritten_layers = None


def patch_flux_lora_loader(lora_pipeline) -> bool:
    """Wrap ``FluxLoraLoaderMixin`` of ``lora_pipeline`` (``diffusers.loaders.lora_pipeline``) as the module
    docstring describes. Returns whether the wrappers are in place (warns on an untested diffusers)."""
    global _flux_mixin
    import diffusers

    mixin = lora_pipeline.FluxLoraLoaderMixin
    if _flux_mixin is mixin:
        return True
    problem = _untested("diffusers", diffusers.__version__, DIFFUSERS_VERSIONS)
    expand = mixin.__dict__.get("_maybe_expand_transformer_param_shape_or_error_")
    unload = mixin.__dict__.get("unload_lora_weights")
    if problem is None and not (isinstance(expand, classmethod) and callable(unload)):
        problem = "diffusers' FluxLoraLoaderMixin has an unexpected form; halfbyte's loader hooks are not installed"
    if problem:
        warnings.warn(f"{problem}. LoRAs that widen quantized layers will not load.", stacklevel=2)
        return False
    _flux_originals.update(_maybe_expand_transformer_param_shape_or_error_=expand,
                           unload_lora_weights=unload)
    mixin._maybe_expand_transformer_param_shape_or_error_ = classmethod(_expand_or_error)
    mixin.unload_lora_weights = _unload_lora_weights
    _flux_attribute_map.update(getattr(lora_pipeline, "_MODULE_NAME_TO_ATTRIBUTE_MAP_FLUX", {}))
    _flux_mixin = mixin
    return True


def uninstall() -> None:
    """Put back what ``install_peft_dispatch`` and ``patch_flux_lora_loader`` replaced."""
    global _peft_original, _flux_mixin
    if _peft_original is not None:
        from peft.tuners.lora.model import LoraModel

        LoraModel._create_new_module = _peft_original
        _peft_original = None
    if _flux_mixin is not None:
        for name, value in _flux_originals.items():
            setattr(_flux_mixin, name, value)
        _flux_originals.clear()
        _flux_mixin = None
