"""Pallas (Triton GPU backend) kernels for svconv, forward and backward.

One module per op family — ``modulated`` (modulated conv), ``local`` (locally connected conv),
``pixel`` (per-pixel filter gather / scatter / correlate) — each with its tiling config, kernel
bodies and ``pallas_call`` wrappers. These modules know nothing of Flax or of dispatch; the
public, checked and differentiable API is :mod:`svconv`.
"""
