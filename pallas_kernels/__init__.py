"""Pallas (Triton GPU backend) kernels for svconv, forward and backward.

One module per op family — ``modulated`` (modulated conv), ``local`` (locally connected conv),
``pixel`` (per-pixel filter), ``gaussian`` (per-pixel Gaussian filter) — each with its tiling
config, kernel bodies and wrappers ``forward`` and ``grad_<slot>``, all called as
``kernel(*operands, call)`` with a :class:`pallas_kernels.geometry.KernelCall`. These modules
know nothing of Flax or of dispatch; the public, checked and differentiable API is
:mod:`svconv`.
"""
