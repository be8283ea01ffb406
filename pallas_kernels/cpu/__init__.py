"""Everything in ``pallas_kernels`` that is not Pallas: the CPU paths of the sparse matmuls.

* ``bsr.py``: block-sparse product and SDDMM as XLA ops (runs on any CPU);
* ``nm.py``: N:M decompression + one GEMM, and the kept-entry gather of its gradient;
* ``native.py``: numba-compiled block-sparse kernels (``microkernel.py``) for CPUs with
  AVX-512F, called by XLA as FFI custom calls through ``ffi.py``; ``abi.py`` holds the C API
  layout the handlers were written for and checks it against the running jaxlib's header;
  ``cache.py`` keeps their compiled code in a private per-user folder.
"""
