import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GOLDENS = Path(__file__).parent / "data" / "bnb_cuda_goldens.safetensors"


@pytest.fixture(scope="session")
def goldens() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(GOLDENS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
