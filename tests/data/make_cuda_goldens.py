"""Produce the golden bytes that bitsandbytes' CUDA kernels write, for halfbyte's CPU tests.

Run on a machine with an NVIDIA GPU and bitsandbytes 0.50.2 (CUDA backend):

    python tests/data/make_cuda_goldens.py tests/data/bnb_cuda_goldens.safetensors

Inputs are built deterministically on the CPU (see ``golden_inputs``) and stored next to the outputs, so the
tests never depend on a random generator matching across machines. Every tensor is stored on the CPU.

Contents (key prefixes):
  ``in.<dtype>``                    4-bit input vector (ties segment, all-zero segment, random segment, odd length)
  ``in_nonfinite.<dtype>``          small input with NaN/+Inf/-Inf in separate 64-blocks
  ``q4.<qt>.<dtype>.bs<bs>[.dq]``   ``.packed`` / ``.absmax`` (+ ``.nested_absmax``, ``.offset`` with DQ)
  ``q4nf.<qt>.<dtype>.bs64``        same for the non-finite input
  ``dq4.<qt>.<dtype>.bs<bs>``       ``dequantize_4bit`` of the corresponding ``q4`` entry (CUDA output)
  ``int8.w.<dtype>`` / ``int8.cb.<dtype>`` / ``int8.scb.<dtype>``    weight row-wise quantization
  ``int8.a`` / ``int8.ca.t<th>`` / ``int8.sca.t<th>`` / ``int8.cols.t<th>``  activations (fp16) with outliers
  ``fdividef127``                   ``__fdividef(127, a)`` for every positive finite float16 ``a`` (Triton libdevice)
  ``lin8.*`` / ``lin4.*``           Linear8bitLt / Linear4bit forwards on CUDA (inputs, weights, bias, outputs)
"""

import sys

import torch

# CPU only for a dry run of the script itself; the goldens must come from CUDA.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def golden_inputs(dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit test vector: 4096 ties + 4096 zeros + 8229 random values (odd total, 16421)."""
    nf4_mid = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
               -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
               0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
               0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
    fp4_mid = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
    chunk = [1.0] + nf4_mid + fp4_mid + [-v for v in fp4_mid] + [-1.0, 0.0]  # 32 values, absmax 1
    ties = []
    for scale in (1.0, 2.0, 0.5, 0.25):  # powers of two keep the ratios exact
        ties += [v * scale for v in chunk] * 32
    ties = torch.tensor(ties, dtype=torch.float32)
    g = torch.Generator().manual_seed(1234)
    rand = torch.randn(8229, generator=g) * torch.linspace(0.01, 3.0, 8229)
    rand[::97] *= 8.0  # a few large values per block, as trained weights have
    x = torch.cat([ties, torch.zeros(4096), rand])
    return x.to(dtype)


def nonfinite_input(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    x = torch.randn(64 * 6, generator=g)
    x[64 + 5] = float("nan")
    x[128 + 7] = float("inf")
    x[192 + 9] = float("-inf")
    x[256:320] = float("nan")
    return x.to(dtype)


def fdividef_table() -> torch.Tensor:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def k(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m).to(tl.float32)
        tl.store(out_ptr + offs, libdevice.fast_dividef(127.0, a), mask=m)

    bits = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16)
    a = bits.view(torch.float16).to(DEV)
    out = torch.empty(a.shape, dtype=torch.float32, device=DEV)
    k[(triton.cdiv(a.numel(), 1024),)](a, out, a.numel(), BLOCK=1024)
    return out.cpu()


def main(path: str) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for dn, dt in dtypes.items():
        x = golden_inputs(dt)
        out[f"in.{dn}"] = x
        xnf = nonfinite_input(dt)
        out[f"in_nonfinite.{dn}"] = xnf
        for qt in ("nf4", "fp4"):
            for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
                for dq in (False, True):
                    packed, qs = F.quantize_4bit(x.to(DEV), blocksize=bs, compress_statistics=dq, quant_type=qt)
                    key = f"q4.{qt}.{dn}.bs{bs}" + (".dq" if dq else "")
                    out[key + ".packed"] = packed.cpu().reshape(-1)
                    out[key + ".absmax"] = qs.absmax.cpu()
                    if dq:
                        out[key + ".nested_absmax"] = qs.state2.absmax.cpu()
                        out[key + ".offset"] = qs.offset.reshape(1).cpu()
                    if not dq and bs in (64, 256):
                        out[f"dq4.{qt}.{dn}.bs{bs}"] = F.dequantize_4bit(packed, qs).cpu()
            packed, qs = F.quantize_4bit(xnf.to(DEV), blocksize=64, compress_statistics=False, quant_type=qt)
            out[f"q4nf.{qt}.{dn}.bs64.packed"] = packed.cpu().reshape(-1)
            out[f"q4nf.{qt}.{dn}.bs64.absmax"] = qs.absmax.cpu()

        # int8 weights: Int8Params casts to fp16 and quantizes row-wise on .to(DEV)
        g = torch.Generator().manual_seed(7)
        w = (torch.randn(96, 160, generator=g) * torch.linspace(0.02, 0.5, 96)[:, None]).to(dt)
        w[3, :] = 0  # an all-zero row
        out[f"int8.w.{dn}"] = w
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to(DEV)
        out[f"int8.cb.{dn}"] = p.data.cpu()
        out[f"int8.scb.{dn}"] = p.SCB.cpu()

    g = torch.Generator().manual_seed(11)
    a = (torch.randn(48, 160, generator=g) * 2).half()
    a[5, 17] = 9.0
    a[20, 17] = -7.5
    a[30, 100] = 6.0  # exactly at the threshold: an outlier (>=)
    a[31, :] = 0  # all-zero row
    a[40, :] = 0
    a[40, 3] = 12.0  # a row whose only non-zero is an outlier
    out["int8.a"] = a
    for th in (0.0, 6.0):
        ca, sca, cols = F.int8_vectorwise_quant(a.to(DEV), threshold=th)
        tag = f"t{int(th)}"
        out[f"int8.ca.{tag}"] = ca.cpu()
        out[f"int8.sca.{tag}"] = sca.cpu()
        out[f"int8.cols.{tag}"] = (cols if cols is not None else torch.empty(0, dtype=torch.int64)).cpu()
    if DEV == "cuda":
        out["fdividef127"] = fdividef_table()

    # Layer forwards on CUDA.
    g = torch.Generator().manual_seed(21)
    w = torch.randn(64, 160, generator=g) * 0.1
    bias = torch.randn(64, generator=g) * 0.1
    x = torch.randn(2, 24, 160, generator=g)
    x[0, 3, 17] = 8.0  # an outlier column for threshold 6
    out["lin.w"], out["lin.bias"], out["lin.x"] = w, bias, x
    for dn in ("fp16", "bf16"):
        dt = dtypes[dn]
        for th in (0.0, 6.0):
            lin = bnb.nn.Linear8bitLt(160, 64, bias=True, has_fp16_weights=False, threshold=th)
            lin.weight = bnb.nn.Int8Params(w.to(dt), requires_grad=False, has_fp16_weights=False)
            lin.bias = torch.nn.Parameter(bias.to(dt), requires_grad=False)
            lin = lin.to(DEV)
            with torch.no_grad():
                out[f"lin8.{dn}.t{int(th)}"] = lin(x.to(dt).to(DEV)).cpu()
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                lin = bnb.nn.Linear4bit(160, 64, bias=True, compute_dtype=dt, compress_statistics=dq, quant_type=qt)
                lin.weight = bnb.nn.Params4bit(w.to(dt), requires_grad=False, compress_statistics=dq, quant_type=qt)
                lin.bias = torch.nn.Parameter(bias.to(dt), requires_grad=False)
                lin = lin.to(DEV)
                with torch.no_grad():
                    out[f"lin4.{qt}.{dn}" + (".dq" if dq else "")] = lin(x.to(dt).to(DEV)).cpu()

    from safetensors.torch import save_file

    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "device": device}
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print(f"wrote {len(out)} tensors to {path}: {meta}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bnb_cuda_goldens.safetensors")
