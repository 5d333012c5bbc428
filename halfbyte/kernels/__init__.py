"""Triton kernels for the ``halfbyte::`` ops (imported lazily by ``halfbyte.ops`` on the first CUDA call).

One module per kernel family: ``fourbit`` (4-bit quantize/dequantize with the nested absmax fused), ``gemm4bit``
(4-bit matmul and its inference plans), ``int8`` (LLM.int8() activation quantization and outlier gathers), ``int8_mm``
(the int8 GEMM, outlier products and the whole layer), ``int8_plan`` (the layer through cached prebuilt launches:
the op's CUDA kernel). ``launch`` holds the cached and bound launchers, ``common`` the
CUDA fast-math pieces (``rcp.approx``, ``rint``) and their exact emulation for ``TRITON_INTERPRET=1``.
Importing these modules imports triton (``share`` excepted: plain Python); ``import halfbyte`` never does.
"""
