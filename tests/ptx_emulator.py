"""A host emulator of the PTX subset that halfbyte's inline-assembly decoders use (``mov``, ``and``/``or``/``shl``/
``shr``/``add.u32``, ``shf.r.wrap``, ``prmt``, ``mul.rn.f32``/``add.rn.f32``, ``mul.rn.{bf16,f16}x2``,
``cvt.rn.{bf16,f16}x2.f32``, ``setp.ne``, predicated ``st.global.v4`` and 32-bit ``ld.shared``/``st.shared`` (and
``st.shared.v4``) at named shared symbols), so the assembly that the GPU kernels run (``kernels.lut``'s table
decoders, ``kernels.gemv_ring``'s absmax decode, ``kernels.gemm_ring``'s gather and decode, bench/dequant_words.py)
is checked bit for bit on a CPU, where the interpreter takes another path. Semantics from the PTX ISA: ``prmt``
picks byte n & 7 of {b, a} (a = bytes 0-3) per selector nibble n, replicating the byte's sign bit when n & 8; ``cvt
... d, a, b`` puts a in the upper half; float32 products, sums and 16-bit conversions round to nearest even."""

import numpy as np
import torch


def run_ptx(asm: str, operands: dict[int, int], shared: dict[int, int] | None = None,
            symbols: dict[str, int] | None = None) -> list[tuple[int, list[int]]]:
    """Runs the PTX block ``asm`` (the subset above) with 32-bit operands {index: value}, updated in place with
    the outputs it writes; returns its global stores as (address operand, four words). ``shared`` {byte address:
    32-bit word} is the shared memory its ``ld.shared``/``st.shared`` use, ``symbols`` {name: address} the shared
    symbols it names."""
    regs: dict[str, int] = {}
    symbols = symbols or {}

    def val(tok: str) -> int:
        tok = tok.strip().rstrip(";").strip("[]")  # (an address operand: its register's value, + an offset)
        if "+" in tok:
            return sum(val(t) for t in tok.split("+"))
        if tok.startswith("$"):
            return operands[int(tok[1:])]
        if tok.startswith("%"):
            return regs[tok]
        if tok in symbols:
            return symbols[tok]
        if tok.startswith("0f"):
            return int(tok[2:], 16)
        return int(tok, 16) if tok.startswith("0x") else int(tok)

    def f32(bits: int) -> np.float32:
        return np.array([bits], dtype=np.uint32).view(np.float32)[0]

    def half_bits(x: np.float32, ty: torch.dtype) -> int:
        return int(torch.tensor([float(x)], dtype=torch.float32).to(ty).view(torch.int16).item()) & 0xFFFF

    stores = []
    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith((".reg", ".shared")):  # (a shared symbol: given in ``symbols``)
            continue
        pred = None
        if line.startswith("@"):
            pred, line = line.split(None, 1)
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.rstrip(";").split(",", 1)]
        if op.startswith("st.global.v4"):
            if regs[pred[1:]]:
                addr = operands[int(args[0].strip("[]$"))]
                stores.append((addr, [val(t) for t in args[1].strip("{} ").split(",")]))
            continue
        if op in ("st.shared.f32", "st.shared.b32"):
            shared[val(args[0])] = val(args[1])
            continue
        if op == "st.shared.v4.b32":
            for i, t in enumerate(args[1].strip("{} ").split(",")):
                shared[val(args[0]) + 4 * i] = val(t)
            continue
        dst, srcs = args[0], [t.strip() for t in args[1].split(",")]
        v = [val(t) for t in srcs]
        if op in ("mov.b32", "mov.u32"):
            r = v[0]
        elif op in ("ld.shared.f32", "ld.shared.b32"):
            r = shared[v[0]]
        elif op == "mul.rn.f32":
            r = int(np.array([f32(v[0]) * f32(v[1])], dtype=np.float32).view(np.uint32)[0])
        elif op == "mul.rn.bf16x2":  # each half: the float32 product of two bf16 is exact, rounded once to bf16
            r = 0
            for sh in (0, 16):
                a, b = (np.array([((t >> sh) & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0] for t in v)
                r |= half_bits(np.float32(a * b), torch.bfloat16) << sh
        elif op == "mul.rn.f16x2":  # each half: the float32 product of two fp16 (22 bits) is exact, rounded to fp16
            r = 0
            for sh in (0, 16):
                a, b = (np.array([(t >> sh) & 0xFFFF], dtype=np.uint16).view(np.float16)[0].astype(np.float32)
                        for t in v)
                r |= half_bits(np.float32(a * b), torch.float16) << sh
        elif op == "add.rn.f32":
            r = int(np.array([f32(v[0]) + f32(v[1])], dtype=np.float32).view(np.uint32)[0])
        elif op == "add.u32":
            r = (v[0] + v[1]) & 0xFFFFFFFF
        elif op.startswith("cvt.rn.") and op.endswith("x2.f32"):
            ty = torch.bfloat16 if "bf16" in op else torch.float16
            r = (half_bits(f32(v[0]), ty) << 16) | half_bits(f32(v[1]), ty)
        elif op == "prmt.b32":
            pool = v[0] | (v[1] << 32)
            r = 0
            for k in range(4):
                nib = (v[2] >> (4 * k)) & 0xF
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                if nib & 8:
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * k)
        elif op == "shf.r.wrap.b32":  # the 64 bits {b, a} (a low) shifted right by c mod 32, low word
            r = (((v[1] << 32) | v[0]) >> (v[2] & 31)) & 0xFFFFFFFF
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = (v[0] << v[1]) & 0xFFFFFFFF
        elif op == "setp.ne.u32":
            r = int(v[0] != v[1])
        else:
            raise NotImplementedError(op)
        if dst.startswith("$"):
            operands[int(dst[1:])] = r
        else:
            regs[dst] = r
    return stores
