"""The math of the layers, written once for the Flax linen layers (:mod:`svconv.layers`) and the
Flax NNX layers (:mod:`svconv.nnx`): default initializers, parameter shapes, dtype promotion,
the op calls and the bias. Flax-free: the layer modules only create parameters and call these,
so the two families give the same numbers given the same parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from svconv import _checks
from svconv.ops import (
    deformable_conv2d,
    deformable_filter2d,
    local_conv2d,
    modulated_conv2d,
    pixel_filter2d,
)

Initializer = Callable[..., jax.Array]

# Flax's defaults for convolutions (its initializers are these same functions). For a
# per-location kernel [out_h, out_w, kh, kw, in, out] the fan-in counts the output positions
# too (out_h*out_w*kh*kw*in), as nn.ConvLocal's does for its [out_h, out_w, in*kh*kw, out]
# kernel: the same scale. (The same key draws the same values as nn.ConvLocal's, but in the
# flat order of this layout, whose taps come before the channels: not the converted kernel.)
KERNEL_INIT: Initializer = jax.nn.initializers.lecun_normal()
LOCAL_KERNEL_INIT: Initializer = jax.nn.initializers.lecun_normal(in_axis=(2, 3, 4), out_axis=5)
BIAS_INIT: Initializer = jax.nn.initializers.zeros


def kernel_size(value: int | Sequence[int], name: str = "kernel_size") -> tuple[int, int]:
    """An int or a pair -> ``(kh, kw)``."""
    return _checks.pair(name, value)


def positive_int(name: str, value: Any) -> int:
    """A layer size such as ``in_features``: an int >= 1."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value!r}")
    return value


def promote(*arrays: jax.Array | None, dtype: Any = None) -> list[jax.Array | None]:
    """Cast the arrays (``None`` passes through) to ``dtype``, or to their promoted dtype (at
    least float32 if none is inexact) when ``dtype`` is ``None``: Flax's ``promote_dtype``."""
    if dtype is None:
        dtype = jnp.result_type(*(jnp.asarray(a) for a in arrays if a is not None))
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"`dtype` must be a floating dtype, got {jnp.dtype(dtype).name}")
    return [None if a is None else jnp.asarray(a, dtype) for a in arrays]


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------
# ModulatedConv


def _op_settings(layer: Any) -> dict[str, Any]:
    """The op's keyword arguments from a layer's settings (linen and NNX layers name them
    alike): ``strides``, ``padding``, ``kernel_dilation``, ``precision``, ``impl``."""
    return {
        "stride": layer.strides,
        "padding": layer.padding,
        "dilation": layer.kernel_dilation,
        "precision": layer.precision,
        "impl": layer.impl,
    }


def modulated_conv(
    layer: Any, x: jax.Array, d: jax.Array, kernel: jax.Array, bias: jax.Array | None
) -> jax.Array:
    """``modulated_conv2d(x, kernel, d) + bias`` with ``layer``'s settings (and its
    ``feature_group_count``), in the promoted (or the layer's) dtype."""
    x, kernel, d, bias = cast(  # (``None`` only where ``None`` was given)
        "tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]",
        promote(x, kernel, d, bias, dtype=layer.dtype),
    )
    groups = layer.feature_group_count
    y = modulated_conv2d(x, kernel, d, feature_group_count=groups, **_op_settings(layer))
    return _add_bias(y, bias)


# --------------------------------------------------------------------------------------------
# LocalConv


def local_conv_shapes(
    input_size: Sequence[int],
    in_features: int,
    out_features: int,
    size: tuple[int, int],
    *,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``kernel [out_h, out_w, kh, kw, in, out]`` and ``bias [out_h, out_w, out]`` for
    an input of ``input_size = (height, width)``; raises if the window does not fit."""
    geom = _checks.geometry(
        in_size=tuple(input_size),
        kernel_size=size,
        stride=strides,
        padding=padding,
        dilation=kernel_dilation,
    )
    return (*geom.out_size, *size, in_features, out_features), (*geom.out_size, out_features)


def local_conv(layer: Any, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``local_conv2d(x, kernel) + bias`` with ``layer``'s settings, in the promoted (or the
    layer's) dtype."""
    x, kernel, bias = cast(  # (``None`` only where ``None`` was given)
        "tuple[jax.Array, jax.Array, jax.Array | None]",
        promote(x, kernel, bias, dtype=layer.dtype),
    )
    return _add_bias(local_conv2d(x, kernel, **_op_settings(layer)), bias)


# --------------------------------------------------------------------------------------------
# KernelPredictionFilter


def guide_for(x: jax.Array, guide: jax.Array | None) -> jax.Array:
    """The guide of a kernel-prediction layer (``x`` when ``None``), checked against ``x``."""
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    guide = x if guide is None else guide
    _checks.rank("guide", guide, (4,), "[batch, height, width, features]")
    if tuple(guide.shape[:3]) != tuple(x.shape[:3]):
        raise ValueError(
            f"`guide` of shape {tuple(guide.shape)} must match `x` of shape "
            f"{tuple(x.shape)} in batch, height and width"
        )
    return guide


def predicted_logits(size: tuple[int, int], groups: int) -> int:
    """Output channels of the predictor convolution: one logit per tap and group."""
    return size[0] * size[1] * groups


def check_groups(groups: int, x: jax.Array) -> int:
    """A layer's ``groups``, which must divide the channels of ``x``."""
    if x.shape[-1] % groups:
        raise ValueError(
            f"`groups`={groups} does not divide the {x.shape[-1]} channels of `x` of shape "
            f"{tuple(x.shape)}"
        )
    return groups


def filter_with_logits(
    layer: Any, x: jax.Array, logits: jax.Array, size: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Softmax over the taps of ``logits [batch, h, w, kh*kw*groups] / temperature`` (in
    float32), then :func:`svconv.pixel_filter2d` of ``x`` with those kernels, with ``layer``'s
    ``groups``, ``temperature``, ``kernel_dilation``, ``dtype`` and ``impl``.

    Returns:
      The filtered ``x`` in ``dtype`` (default ``x``'s) and the kernels
      ``[batch, h, w, kh, kw, groups]`` (float32).
    """
    groups = check_groups(layer.groups, x)
    kh, kw = size
    logits = logits.reshape(*logits.shape[:3], kh * kw, groups) / layer.temperature
    kernels = jax.nn.softmax(logits.astype(jnp.float32), axis=3)
    kernels = kernels.reshape(*logits.shape[:3], kh, kw, groups)
    dtype = x.dtype if layer.dtype is None else layer.dtype
    y = pixel_filter2d(
        x.astype(dtype),
        kernels.astype(dtype),
        padding="SAME",
        dilation=layer.kernel_dilation,
        impl=layer.impl,
    )
    return y, kernels


# --------------------------------------------------------------------------------------------
# DeformableConv and DeformableFilter

ZEROS: Initializer = jax.nn.initializers.zeros


def deformable_conv_shapes(
    in_features: int, out_features: int, size: tuple[int, int], feature_group_count: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``kernel [kh, kw, in / groups, out]`` and ``bias [out]``; the groups must divide
    both channel counts."""
    for name, n in (("in_features", in_features), ("features", out_features)):
        if n % feature_group_count:
            raise ValueError(
                f"`feature_group_count` {feature_group_count} does not divide {name}={n}"
            )
    return (*size, in_features // feature_group_count, out_features), (out_features,)


def predicted_sampling(size: tuple[int, int], offset_groups: int, use_mask: bool) -> int:
    """Output channels of the offset predictor: ``(dy, dx)`` (and a mask logit) per tap and
    offset group."""
    return size[0] * size[1] * offset_groups * (3 if use_mask else 2)


def check_sampling(offsets: jax.Array | None, mask: jax.Array | None) -> None:
    """A deformable layer's call: a mask only with offsets (else both are predicted)."""
    if offsets is None and mask is not None:
        raise ValueError("`mask` without `offsets`: pass both, or neither to predict them")


def split_sampling(
    predicted: jax.Array, size: tuple[int, int], offset_groups: int, use_mask: bool
) -> tuple[jax.Array, jax.Array | None]:
    """The predictor's ``[batch, h, w, kh*kw*groups*(3 or 2)]`` -> offsets ``[batch, h, w, kh,
    kw, groups, 2]`` and mask ``sigmoid(logit)`` ``[batch, h, w, kh, kw, groups]`` (None
    without ``use_mask``): zero weights give zero offsets and a mask of 0.5, DCNv2's start."""
    parts = 3 if use_mask else 2
    p = predicted.reshape(*predicted.shape[:3], *size, offset_groups, parts)
    mask = jax.nn.sigmoid(p[..., 2]) if use_mask else None
    return p[..., :2], mask


def check_offset_groups(offset_groups: int, channels: int) -> int:
    offset_groups = positive_int("offset_groups", offset_groups)
    if channels % offset_groups:
        raise ValueError(f"`offset_groups`={offset_groups} does not divide {channels} channels")
    return offset_groups


def deformable_conv(
    layer: Any,
    x: jax.Array,
    offsets: jax.Array,
    mask: jax.Array | None,
    kernel: jax.Array,
    bias: jax.Array | None,
) -> jax.Array:
    """``deformable_conv2d(x, kernel, offsets, mask) + bias`` with ``layer``'s settings (and
    ``feature_group_count``), in the promoted (or the layer's) dtype; the offsets keep their
    own floating dtype."""
    x, kernel, mask, bias = cast(  # (``None`` only where ``None`` was given)
        "tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]",
        promote(x, kernel, mask, bias, dtype=layer.dtype),
    )
    y = deformable_conv2d(
        x, kernel, offsets, mask, feature_group_count=layer.feature_group_count,
        **_op_settings(layer),
    )  # fmt: skip
    return _add_bias(y, bias)


def deformable_filter(
    layer: Any, v: jax.Array, predicted: jax.Array, size: tuple[int, int]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DCNv3's aggregation: the predictor's ``[batch, h, w, kh*kw*groups*3]`` split into offsets
    and weight logits, a softmax over the taps (with ``layer.softmax``; else the logits are the
    weights, as DCNv4's), then :func:`svconv.deformable_filter2d` of ``v``. Returns the result
    and the filters ``[batch, h, w, kh, kw, groups]`` and offsets (float32)."""
    groups = check_groups(layer.groups, v)
    kh, kw = size
    p = predicted.astype(jnp.float32).reshape(*predicted.shape[:3], kh * kw, groups, 3)
    offsets, logits = p[..., :2], p[..., 2]
    k = jax.nn.softmax(logits, axis=3) if layer.softmax else logits
    k = k.reshape(*k.shape[:3], kh, kw, groups)
    offsets = offsets.reshape(*offsets.shape[:3], kh, kw, groups, 2)
    dtype = v.dtype if layer.dtype is None else layer.dtype
    y = deformable_filter2d(
        v.astype(dtype), k.astype(dtype), offsets, padding="SAME",
        dilation=layer.kernel_dilation, impl=layer.impl,
    )  # fmt: skip
    return y, k, offsets
