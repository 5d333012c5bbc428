#!/usr/bin/env bash
# The GPU pass behind BENCHMARKS.md's load numbers and the diffusers + bitsandbytes goldens, on a machine with one
# CUDA GPU, bitsandbytes 0.50.2 and diffusers 0.42.1 importable. Usage: bench/run_gpu.sh OUT_DIR STAGE
#   goldens: tests/data/diffusers_bnb (checkpoints diffusers + bitsandbytes write) and the GPU tier of the HF tests
#   nf4 | int8: FLUX-sized (11.9 B) bf16 checkpoint -> quantized load, save, reload; bitsandbytes vs halfbyte
set -u
OUT=$1; STAGE=$2; CKPT=${CKPT:-/tmp/halfbyte-flux-bf16}
mkdir -p "$OUT"
python3 -c "import torch, transformers, diffusers, bitsandbytes, accelerate, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'accelerate', accelerate.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1
case $STAGE in
  goldens)
    python3 tests/data/make_diffusers_goldens.py "$OUT/diffusers_bnb" > "$OUT/goldens.log" 2>&1
    tar czf "$OUT/diffusers_bnb.tgz" -C "$OUT" diffusers_bnb && rm -rf "$OUT/diffusers_bnb"
    python3 -m pytest -q -m gpu tests/test_gpu_hf.py > "$OUT/gpu_hf.log" 2>&1
    python3 - > "$OUT/disk_map_unquantized.log" 2>&1 <<'PY'
import tempfile, torch
from diffusers import AutoModel
from halfbyte.testing import save_tiny_flux_pipeline
d = tempfile.mkdtemp()
p = str(save_tiny_flux_pipeline(d + "/p") / "transformer")
try:
    AutoModel.from_pretrained(p, device_map={"": "cuda", "norm_out": "disk"}, offload_folder=d + "/off",
                              torch_dtype=torch.float16)
    print("unquantized FLUX with a partial disk map: loads")
except Exception as e:
    print("unquantized FLUX with a partial disk map fails in diffusers itself:", type(e).__name__, e)
PY
    ;;
  profile)  # where an on-the-fly NF4 load spends its time (needs the checkpoint of stage nf4)
    python3 -m cProfile -s tottime bench/load_flux.py one "$CKPT" hf-nf4 /tmp/hb-profile 2>&1 | head -60 \
      > "$OUT/profile_hf_nf4.txt" ;;
  nf4|int8)
    [ -f "$CKPT/diffusion_pytorch_model.safetensors.index.json" ] || \
      python3 bench/load_flux.py make "$CKPT" > "$OUT/make.log" 2>&1
    python3 bench/load_flux.py all "$CKPT" --cases bnb-$STAGE hf-$STAGE stream-$STAGE \
      --json "$OUT/load_$STAGE.json" > "$OUT/load_$STAGE.log" 2>&1 ;;
esac
tail -n 3 "$OUT"/*.log
