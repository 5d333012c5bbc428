import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A private, initially empty Hub cache: tests that resolve repo ids (the seed guide's examples) lay out tiny local
# checkpoints in it (halfbyte.testing.make_hub_cache); nothing of the developer's own cache is read. Set before any
# test module imports huggingface_hub, which reads it at import time.
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="halfbyte-test-hub-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)  # (each run left 2.7 MB in /tmp)
# Without a GPU, Triton kernels run in the interpreter (the CI tier of tests/test_kernels.py); triton reads this
# when a kernel is decorated, so it is set before any test module can import halfbyte.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
GOLDENS = Path(__file__).parent / "data" / "bnb_cuda_goldens.safetensors"


@pytest.fixture(scope="session")
def goldens() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(GOLDENS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cpu_machine(monkeypatch):
    """The test sees a machine without a GPU (``torch.cuda.is_available()`` False), as in CI, on any machine: for
    CPU-tier tests whose exact comparisons hold on the reference path. Without a device_map, loaders put quantized
    models on the GPU when there is one (as bitsandbytes'), and peft re-dispatches models to it; the GPU tier
    (tests/test_gpu_hf.py) covers those paths on CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _clear_triton_probes()
    yield
    # torch caches "is triton usable" (torch.utils._triton.has_triton & co) on first use: a probe made while the
    # GPU was hidden would leave later GPU-tier tests of the same process unable to compile for CUDA
    # (inductor: TritonMissing). Drop what was probed under the patch.
    monkeypatch.undo()
    _clear_triton_probes()


def _clear_triton_probes() -> None:
    import torch.utils._triton as probes

    for value in vars(probes).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (the GPU tier of tests/test_kernels.py)")


# --- checkpoint tests (test_checkpoint*.py) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_float(tmp_path_factory) -> Path:
    """A tiny floating-point FLUX checkpoint written by diffusers' own (sharded) writer."""
    from checkpoint_helpers import make_flux

    d = tmp_path_factory.mktemp("flux") / "float"
    make_flux().save_pretrained(d, max_shard_size="60KB")
    return d


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """name -> (quantized tiny FLUX, its halfbyte.save_pretrained directory (small shards))."""
    from checkpoint_helpers import CFGS, make_flux

    import halfbyte

    out = {}
    for name, cfg in CFGS.items():
        model = halfbyte.quantize_(make_flux(), cfg)
        d = tmp_path_factory.mktemp("saved") / name
        halfbyte.save_pretrained(model, d, max_shard_size="20KB")
        out[name] = model, d
    return out


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    """A saved tiny FLUX pipeline (the LoRA tests)."""
    from halfbyte.testing import save_tiny_flux_pipeline

    return str(save_tiny_flux_pipeline(tmp_path_factory.mktemp("lora") / "pipe"))
