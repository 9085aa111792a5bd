"""Pallas GPU kernels for svconv, forward and backward, per backend.

* :mod:`pallas_kernels.triton` — the Triton backend (Ampere and newer);
* :mod:`pallas_kernels.mosaic_gpu` — the Mosaic GPU backend (compute capability 9.0 and newer:
  TMA copies into shared memory);
* :mod:`pallas_kernels.geometry` — the window geometry and the kernel-call record every kernel
  takes; :mod:`pallas_kernels.gaussian_taps` — the Gaussian's tap features.

Every kernel is called as ``kernel(*operands, call)``. These modules know nothing of Flax or of
dispatch; the public, checked and differentiable API is :mod:`svconv`.
"""
