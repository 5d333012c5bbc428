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


def test_import_from_inside_peft_import_defers_the_lora_hook(tmp_path):
    """halfbyte imported while peft itself is importing (here: transformers probes the optional ``kernels``
    package during peft's import, and a ``kernels.py`` beside the script imports halfbyte) must not import
    peft.tuners in the middle of it (a circular ImportError); the LoRA dispatch is installed once peft's LoRA
    model module has loaded."""
    (tmp_path / "kernels.py").write_text("import halfbyte\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from diffusers import FluxTransformer2DModel\n"
        "import halfbyte.integrations.peft as hp\n"
        "from peft.tuners.lora.model import LoraModel\n"
        "assert 'kernels' not in sys.modules or sys.modules['kernels'].__file__.startswith(sys.path[0])\n"
        "print('dispatch', LoraModel.__dict__['_create_new_module'].__func__ is hp._create_new_module)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dispatch True" in out.stdout
