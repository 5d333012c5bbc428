"""The transformers integration across the versions whose loading internals changed (docs/integration-notes.md
§1: 5.17, 5.20, 5.21, 5.23; the environment's own version runs tests/test_hf_transformers.py directly).

Each version is installed from the package registry into a cache folder (``--target``, with its dependencies,
so e.g. 5.17 gets the huggingface_hub 1.x it requires) and tests/test_hf_transformers.py runs in a subprocess
with that folder first on ``sys.path``: quantize on load, save/reload, dequantize, bitsandbytes checkpoints both
ways. Set ``HALFBYTE_TRANSFORMERS_CACHE`` to reuse installs between runs.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["5.17.0", "5.20.0", "5.21.0", "5.23.0"]
CACHE = Path(os.environ.get("HALFBYTE_TRANSFORMERS_CACHE",
                            Path(tempfile.gettempdir()) / "halfbyte-transformers-versions"))


def install(version: str) -> Path:
    target = CACHE / version
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "--target", str(target), f"transformers=={version}"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"pip could not install transformers=={version}:\n{proc.stderr[-3000:]}"
        marker.touch()
    return target


@pytest.mark.parametrize("version", VERSIONS)
def test_integration_on_transformers_version(version):
    target = install(version)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    check = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert check.stdout.strip() == version, check.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           str(ROOT / "tests" / "test_hf_transformers.py")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"transformers {version}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout.splitlines()[-1]
