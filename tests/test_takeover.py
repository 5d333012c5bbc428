"""halfbyte standing in for bitsandbytes: with bitsandbytes absent, ``import halfbyte`` makes transformers and
diffusers load ``quant_method: "bitsandbytes"`` checkpoints into halfbyte's layers; ``HALFBYTE_REPLACE_BITSANDBYTES=0``
opts out. Each case runs in a fresh interpreter in which ``import bitsandbytes`` fails (``sys.modules`` entry None).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import halfbyte

ROOT = Path(__file__).resolve().parents[1]
NF4_DIFFUSERS = Path(__file__).parent / "data" / "diffusers_bnb" / "nf4"

SCRIPT = """
import sys
sys.modules["bitsandbytes"] = None  # as if not installed
import json, torch, halfbyte
from diffusers import AutoModel
from transformers import T5EncoderModel
out = {"replacing": halfbyte.integrations.replacing_bitsandbytes()}
for name, load in (("t5", lambda: T5EncoderModel.from_pretrained(sys.argv[1])),
                   ("flux", lambda: AutoModel.from_pretrained(sys.argv[2]))):
    try:
        model = load()
        out[name] = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                            if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear})
    except Exception as e:
        out[name] = "error: " + type(e).__name__ + ": " + str(e)[:300]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def bnb_t5(tmp_path_factory):
    """A T5 checkpoint written by transformers + bitsandbytes (NF4 + double quant) on the CPU."""
    pytest.importorskip("bitsandbytes")
    import transformers
    from transformers import T5Config, T5EncoderModel

    from halfbyte.testing import tiny_t5_config

    src = tmp_path_factory.mktemp("takeover")
    T5EncoderModel(T5Config(**tiny_t5_config(d_model=64, d_kv=16, d_ff=128))).save_pretrained(src / "fp")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True)
    model = T5EncoderModel.from_pretrained(src / "fp", quantization_config=cfg, device_map="cpu")
    model.save_pretrained(src / "bnb")
    qc = json.loads((src / "bnb" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    return src / "bnb"


def run(t5_dir, env_value=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HALFBYTE_REPLACE_BITSANDBYTES"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if env_value is not None:
        env["HALFBYTE_REPLACE_BITSANDBYTES"] = env_value
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(t5_dir), str(NF4_DIFFUSERS)], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_bitsandbytes_checkpoints_load_without_bitsandbytes(bnb_t5):
    out = run(bnb_t5)
    assert out["replacing"] is True
    assert out["t5"] == ["halfbyte.nn.Linear4bit"], out
    assert out["flux"] == ["halfbyte.nn.Linear4bit"], out


def test_opt_out(bnb_t5):
    out = run(bnb_t5, "0")
    assert out["replacing"] is False
    # the libraries' own bitsandbytes quantizers are in charge again, and they need bitsandbytes
    assert out["t5"].startswith("error:") and "bitsandbytes" in out["t5"], out
    # diffusers' bitsandbytes quantizer refuses even earlier on a machine without a GPU
    assert out["flux"].startswith("error:") and ("bitsandbytes" in out["flux"] or "No GPU found" in out["flux"]), out


def test_replace_and_restore_in_process():
    from diffusers.quantizers import auto as d_auto
    from transformers.quantizers import auto as t_auto

    before = (dict(t_auto.AUTO_QUANTIZER_MAPPING), dict(d_auto.AUTO_QUANTIZER_MAPPING))
    assert halfbyte.integrations.replacing_bitsandbytes() is False  # bitsandbytes is installed here
    halfbyte.integrations.replace_bitsandbytes()
    try:
        assert t_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"].__module__ == "halfbyte.integrations.transformers"
        assert d_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_8bit"].__module__ == "halfbyte.integrations.diffusers"
    finally:
        halfbyte.integrations.restore_bitsandbytes()
    assert (dict(t_auto.AUTO_QUANTIZER_MAPPING), dict(d_auto.AUTO_QUANTIZER_MAPPING)) == before
    # halfbyte's own entries stay registered either way
    assert t_auto.AUTO_QUANTIZER_MAPPING["halfbyte"].__module__ == "halfbyte.integrations.transformers"


def test_bad_setting_is_refused():
    env = dict(os.environ, HALFBYTE_REPLACE_BITSANDBYTES="maybe", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", "import halfbyte"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "HALFBYTE_REPLACE_BITSANDBYTES must be 0 or 1" in proc.stderr
    assert halfbyte.integrations.bitsandbytes_installed()
