"""svconv: spatially-varying 2D convolution for JAX.

Ops (NHWC images, HWIO kernels; differentiable in every array argument; jit/vmap/grad):

* :func:`modulated_conv2d` — a shared kernel modulated per output pixel and tap.
* :func:`local_conv2d` — a different kernel at every output pixel (locally connected).
* :func:`pixel_filter2d` — per-pixel filters applied to every channel (or channel group).
* :func:`pixel_splat2d` — the scatter form: each source pixel spreads its own kernel.
* :func:`gaussian_kernels` — normalised per-pixel Gaussian filters from a sigma map (isotropic,
  axis-aligned or rotated ellipses).
* :func:`gaussian_filter2d`, :func:`gaussian_splat2d` — ``pixel_filter2d`` / ``pixel_splat2d``
  with those filters, their weights computed inside the kernels (no ``[.., kh, kw]`` array).
* :func:`deformable_conv2d` — modulated deformable convolution (DCNv2: every tap samples at its
  own offset, with groups and offset groups), torchvision's numbers
  (:func:`from_torch_deform_conv2d`, :func:`to_torch_deform_conv2d` convert the layouts).
* :func:`deformable_filter2d`, :func:`deformable_splat2d` — per-pixel filters whose taps sample
  at offsets (DCNv3/DCNv4's aggregation), and their transpose.
* :func:`product_filter2d`, :func:`product_splat2d` — per-pixel filters of low rank (a weighted
  sum of shared filters at every pixel: large spatially-varying PSFs), by direct convolutions or
  FFTs; :func:`psf_grid_decomposition`, :func:`low_rank_kernels` build the decomposition.

Flax linen layers: :class:`ModulatedConv`, :class:`LocalConv`, :class:`KernelPredictionFilter`,
:class:`DeformableConv`, :class:`DeformableFilter`;
the same layers for Flax NNX in :mod:`svconv.nnx` (imported on first use of ``svconv.nnx``).
"""

import importlib

from svconv.layers import (
    DeformableConv,
    DeformableFilter,
    KernelPredictionFilter,
    LocalConv,
    ModulatedConv,
    from_conv_local_kernel,
)
from svconv.ops import (
    deformable_conv2d,
    deformable_filter2d,
    deformable_splat2d,
    from_torch_deform_conv2d,
    gaussian_filter2d,
    gaussian_kernels,
    gaussian_splat2d,
    local_conv2d,
    low_rank_kernels,
    modulated_conv2d,
    pixel_filter2d,
    pixel_splat2d,
    product_filter2d,
    product_splat2d,
    psf_grid_decomposition,
    to_torch_deform_conv2d,
)

__version__ = "0.1.0"

__all__ = [
    "DeformableConv",
    "DeformableFilter",
    "KernelPredictionFilter",
    "deformable_conv2d",
    "deformable_filter2d",
    "deformable_splat2d",
    "from_torch_deform_conv2d",
    "LocalConv",
    "ModulatedConv",
    "from_conv_local_kernel",
    "gaussian_filter2d",
    "gaussian_kernels",
    "gaussian_splat2d",
    "local_conv2d",
    "modulated_conv2d",
    "pixel_filter2d",
    "pixel_splat2d",
    "product_filter2d",
    "product_splat2d",
    "psf_grid_decomposition",
    "low_rank_kernels",
    "to_torch_deform_conv2d",
]


def __getattr__(name: str):
    # `import svconv` does not pay for importing flax.nnx until the NNX layers are used.
    if name == "nnx":
        return importlib.import_module("svconv.nnx")
    raise AttributeError(f"module 'svconv' has no attribute {name!r}")
