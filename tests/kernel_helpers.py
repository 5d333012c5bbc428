"""Shared by the kernel test modules (tests/test_kernels.py, tests/test_kernels_int8.py): the two tiers' device,
dtypes, shapes and helpers."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of triton.jit'ed code
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if CUDA else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# (N, K) weight shapes of FLUX.1 (attention, MLP up/down, single-block proj_out, AdaLN) and T5-XXL (MLP up/down)
FLUX_T5 = [(3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (18432, 3072), (10240, 4096), (4096, 10240)]
# The interpreter evaluates 0 * inf and 1 / 0 in numpy, which warns; those values are what the tests check.
IGNORE_NUMPY_WARNINGS = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def gpu(fn):
    """GPU tier: the ``gpu`` marker (``pytest -m gpu`` selects it) and a skip where no CUDA device is."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="GPU tier: needs a CUDA device")(fn))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Exact bit pattern, so that NaN == NaN and -0 != +0 in comparisons."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
