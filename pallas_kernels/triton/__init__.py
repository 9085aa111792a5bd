"""Pallas kernels on the Triton backend (Ampere and newer, while JAX ships that backend).

One module per op family — ``modulated`` (modulated conv), ``local`` (locally connected conv),
``pixel`` (per-pixel filter), ``gaussian`` (per-pixel Gaussian filter) — each with its tiling
config, kernel bodies and wrappers ``forward`` and ``grad_<slot>``, all called as
``kernel(*operands, call)`` with a :class:`pallas_kernels.geometry.KernelCall`; ``_common``
holds their shared helpers.
"""
