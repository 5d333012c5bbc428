"""halfbyte inside transformers and diffusers.

``import halfbyte`` calls ``install()``: as soon as transformers' or diffusers' quantizer mapping module is imported
(or right away if it already is), halfbyte's config and quantizer are registered under ``quant_method="halfbyte"``,
so ``Model.from_pretrained(..., quantization_config=halfbyte.BitsAndBytesConfig(...))`` and
``Model.from_pretrained(halfbyte_checkpoint)`` work in both libraries. Neither library is imported by halfbyte.

**Standing in for bitsandbytes.** When the ``bitsandbytes`` package is not installed, halfbyte also takes over the
libraries' ``bitsandbytes_4bit`` / ``bitsandbytes_8bit`` quantizer entries, so checkpoints written by diffusers or
transformers + bitsandbytes (``quant_method: "bitsandbytes"``) load into halfbyte's layers with the same bytes.
Opt out with the environment variable ``HALFBYTE_REPLACE_BITSANDBYTES=0`` (set before importing halfbyte) or
``halfbyte.integrations.restore_bitsandbytes()``; force it with ``HALFBYTE_REPLACE_BITSANDBYTES=1`` or
``replace_bitsandbytes()`` even where bitsandbytes is installed.

**LoRA.** When peft is imported, halfbyte's layers are registered with its LoRA dispatch, and when diffusers' LoRA
loaders are imported, their FLUX loader learns to check and widen halfbyte layers (``halfbyte.integrations.peft``).
Opt out with ``HALFBYTE_LORA_HOOKS=0``.
"""

import importlib.util
import os
import sys
from types import ModuleType

from ._hooks import when_imported

_ENV = "HALFBYTE_REPLACE_BITSANDBYTES"
_LORA_ENV = "HALFBYTE_LORA_HOOKS"
_BNB_KEYS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
_saved: dict[str, dict[str, type]] = {}  # library -> the quantizer classes halfbyte replaced
_replacing = False


def bitsandbytes_installed() -> bool:
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"] is not None
    return importlib.util.find_spec("bitsandbytes") is not None


def _register_transformers(module: ModuleType) -> None:
    from . import transformers as hb_transformers

    hb_transformers.register()
    if _replacing:
        _swap("transformers", module.AUTO_QUANTIZER_MAPPING, hb_transformers.HalfbyteHfQuantizer)


def _register_diffusers(module: ModuleType) -> None:
    from . import diffusers as hb_diffusers

    hb_diffusers.register()
    if _replacing:
        _swap("diffusers", module.AUTO_QUANTIZER_MAPPING, hb_diffusers.HalfbyteDiffusersQuantizer)


def _install_peft_dispatch(_module: ModuleType | None = None) -> None:
    from . import peft as hb_peft

    hb_peft.install_peft_dispatch()


def _register_peft(module: ModuleType) -> None:
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        # halfbyte is being imported from inside peft's own import (transformers probes optional packages while
        # peft imports it, and anything those import may import halfbyte): importing peft.tuners now would be
        # circular. Install once peft's LoRA model module has finished loading (its dependencies have by then).
        when_imported("peft.tuners.lora.model", _install_peft_dispatch)
        return
    _install_peft_dispatch()


def _register_diffusers_lora(module: ModuleType) -> None:
    if importlib.util.find_spec("peft") is None:  # diffusers' LoRA loading needs peft; nothing to wrap
        return
    from . import peft as hb_peft

    hb_peft.patch_flux_lora_loader(module)


def _swap(library: str, mapping: dict, quantizer: type) -> None:
    saved = _saved.setdefault(library, {})
    for key in _BNB_KEYS:
        if mapping.get(key) is not quantizer:
            saved.setdefault(key, mapping.get(key))
            mapping[key] = quantizer


def replace_bitsandbytes() -> None:
    """Load ``quant_method: "bitsandbytes"`` models with halfbyte's layers in transformers and diffusers
    (the default when bitsandbytes is not installed). Takes effect for later ``from_pretrained`` calls."""
    global _replacing
    _replacing = True
    for name, fn in (("transformers.quantizers.auto", _register_transformers),
                     ("diffusers.quantizers.auto", _register_diffusers)):
        if name in sys.modules:
            fn(sys.modules[name])


def restore_bitsandbytes() -> None:
    """Undo ``replace_bitsandbytes``: the libraries' own bitsandbytes quantizers are used again."""
    global _replacing
    _replacing = False
    for library, saved in _saved.items():
        auto = sys.modules.get(f"{library}.quantizers.auto")
        if auto is not None:
            for key, cls in saved.items():
                if cls is not None:
                    auto.AUTO_QUANTIZER_MAPPING[key] = cls
    _saved.clear()


def replacing_bitsandbytes() -> bool:
    return _replacing


def install() -> None:
    """Arrange registration in transformers and diffusers (called by ``import halfbyte``)."""
    global _replacing
    setting = os.environ.get(_ENV, "").strip().lower()
    if setting not in ("", "0", "1", "false", "true"):
        raise ValueError(f"{_ENV} must be 0 or 1, got {os.environ[_ENV]!r}")
    _replacing = setting in ("1", "true") or (setting == "" and not bitsandbytes_installed())
    for name, fn in (("transformers.quantizers.auto", _register_transformers),
                     ("diffusers.quantizers.auto", _register_diffusers)):
        if importlib.util.find_spec(name.partition(".")[0]) is not None:
            when_imported(name, fn)
    lora = os.environ.get(_LORA_ENV, "").strip().lower()
    if lora not in ("", "0", "1", "false", "true"):
        raise ValueError(f"{_LORA_ENV} must be 0 or 1, got {os.environ[_LORA_ENV]!r}")
    if lora not in ("0", "false"):
        for name, fn in (("peft", _register_peft), ("diffusers.loaders.lora_pipeline", _register_diffusers_lora)):
            if importlib.util.find_spec(name.partition(".")[0]) is not None:
                when_imported(name, fn)


def attach_quantizer(model, config, library: str) -> None:
    """Give a model that halfbyte's own loader built the quantizer object its library would have attached, so the
    library's ``save_pretrained`` (bitsandbytes layout), ``dequantize()`` and dtype guards work on it as on a
    model loaded through ``from_pretrained(..., quantization_config=...)``."""
    if library == "diffusers":
        import weakref

        from .diffusers import HalfbyteDiffusersQuantizer

        quantizer = HalfbyteDiffusersQuantizer(config, pre_quantized=True)  # holds a private copy of config
        quantizer._model = weakref.ref(model)
        # recorded so that the library's own reload of a saved copy restores this dtype (see update_torch_dtype)
        quantizer.config._pre_quantization_dtype = model.dtype
        model.register_to_config(quantization_config=quantizer.config)
    elif library == "transformers":
        from . import _layers
        from .transformers import HalfbyteHfQuantizer

        quantizer = HalfbyteHfQuantizer(config, pre_quantized=True)
        _layers.refuse_dtype_casts(model)
    else:
        raise ValueError(f"unknown library {library!r}: expected 'diffusers' or 'transformers'")
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
