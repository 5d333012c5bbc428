import subprocess
import sys


def test_import_is_lean():
    """import halfbyte pulls in neither triton, diffusers, transformers nor bitsandbytes, and leaves CUDA alone."""
    code = (
        "import sys, torch, halfbyte\n"
        "bad = [m for m in ('triton', 'diffusers', 'transformers', 'bitsandbytes') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lean" in out.stdout
