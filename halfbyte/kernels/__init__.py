"""Triton kernels for the ``halfbyte::`` ops (imported lazily by ``halfbyte.ops`` on the first CUDA call).

One module per kernel family: ``fourbit`` (4-bit quantize/dequantize with the nested absmax fused), ``gemm4bit`` (4-bit
matmul: its routing by token count and the inference plans), ``gemv`` (the GEMVs that decode from tables), ``lut`` and
``gemv_mma`` (the register-table decodes, the tensor-core GEMV), ``gemv_ring`` (the Hopper TMA-ring GEMV, Gluon),
``gemm_small`` (2-16 tokens; up to 64 where ``gemm_ring`` does not serve), ``gemm_ring`` (17-2048 tokens on Hopper: the
fused GEMM, Gluon), ``fp8`` (the opt-in fp8 compute's decode and activation quantization), ``int8`` (LLM.int8()
activation quantization and outlier gathers), ``int8_mm`` (the int8 GEMM, outlier products and the whole layer),
``int8_plan`` (the layer through cached prebuilt launches: the op's CUDA kernel). ``launch`` holds the cached and bound
launchers, ``common`` the CUDA fast-math pieces (``rcp.approx``, ``rint``) and their exact emulation for
``TRITON_INTERPRET=1``. The Gluon kernels' code lives in ``_gemv_ring_kernel`` / ``_gemm_ring_kernel``, imported only
where triton has Gluon.
Importing these modules imports triton (``share`` excepted: plain Python); ``import halfbyte`` never does.
"""
