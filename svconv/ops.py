"""The public ops: argument checking, dispatch and the differentiable entry points.

Layouts are NHWC for images and HWIO for shared kernels, like ``lax`` and Flax. For output
pixel ``(i, j)`` and tap ``(m, n)`` the input position is
``pos(i, m) = i*sh + m*dh - pad_top`` and ``pos(j, n) = j*sw + n*dw - pad_left``; outside the
input it reads zero. ``stride`` and ``dilation`` are an int or a pair; ``padding`` is
``"SAME"``, ``"VALID"``, an int or ``((top, bottom), (left, right))`` with exactly
``lax.conv_general_dilated``'s meaning, so output sizes match it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from svconv import _checks, reference
from svconv._families import LOCAL, MODULATED, PIXEL
from svconv._primitive import Family, Spec, bind

PaddingLike = str | int | tuple[tuple[int, int], tuple[int, int]]
IntOrPair = int | tuple[int, int]


def _call(
    op: str, family: Family, target: str, operands: dict[str, jax.Array], **spec: Any
) -> jax.Array:
    """Bind ``family``'s partial with respect to ``target``; ``impl="pallas"`` on a case the
    kernels cannot take raises here, at call time (``impl="auto"`` decides when lowering)."""
    spec = Spec(family=family, target=target, **spec)
    args = tuple(operands[s] for s in spec.operands)
    if spec.impl == "pallas":
        reason = spec.pallas_reason(spec.shapes(tuple(a.shape for a in args)), args[0].dtype)
        if reason is not None:
            raise NotImplementedError(f"{op}(impl='pallas') cannot run this case: {reason}")
    return bind(spec, *args)


def _weight_geometry(x, w, w_rank: int, layout: str, stride, padding, dilation, **arrays):
    """Checks shared by the ops with weights ``w [..., kh, kw, in_channels, out_channels]``:
    ranks, matching input channels; returns the geometry."""
    _checks.rank("x", x, (4,), "[batch, height, width, in_channels]")
    _checks.rank("w", w, (w_rank,), layout)
    kh, kw, cin, _ = w.shape[-4:]
    if cin != x.shape[3]:
        raise ValueError(
            f"`w` of shape {tuple(w.shape)} expects {cin} input channels but `x` of shape "
            f"{tuple(x.shape)} has {x.shape[3]}"
        )
    return _checks.geometry(
        in_size=x.shape[1:3],
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        shapes={"x": x.shape, "w": w.shape, **{k: v.shape for k, v in arrays.items()}},
    )


def modulated_conv2d(
    x: jax.Array,
    w: jax.Array,
    d: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    precision: Any = None,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """Convolution with a shared kernel modulated per output pixel and tap.

    ``y[b,i,j,o] = sum_{m,n,c} x[b, pos(i,m), pos(j,n), c] * w[m,n,c,o] * d[b,i,j,m,n]``.
    With ``d == 1`` this equals ``lax.conv_general_dilated`` (NHWC/HWIO).

    Args:
      x: input ``[batch, height, width, in_channels]``.
      w: kernel ``[kh, kw, in_channels, out_channels]``.
      d: modulation ``[batch, out_height, out_width, kh, kw]``, or ``[out_height, out_width,
        kh, kw]`` shared over the batch.
      stride: int or ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"``, int or ``((top, bottom), (left, right))``.
      dilation: kernel dilation, int or ``(dh, dw)``.
      precision: ``lax`` precision of the dots (float32: default TF32 on GPUs, ``HIGHEST`` exact).
      impl: ``None``/``"auto"``, ``"pallas"``, ``"xla"`` or ``"reference"``.
      block_sizes: optional Pallas tiling (``pallas_kernels.modulated.ModulatedBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, out_channels]`` in the promoted dtype of the inputs,
      accumulated in float32.
    """
    x = _checks.float_array("x", x)
    w = _checks.float_array("w", w)
    d = _checks.float_array("d", d)
    impl = _checks.impl(impl)
    geom = _weight_geometry(
        x, w, 4, "[kh, kw, in_channels, out_channels]", stride, padding, dilation, d=d
    )
    kh, kw = geom.kernel_size
    _checks.rank(
        "d", d, (4, 5), "[batch, out_height, out_width, kh, kw] or [out_height, out_width, kh, kw]"
    )
    expected = (*geom.out_size, kh, kw)
    if d.ndim == 5:
        expected = (x.shape[0], *expected)
    _checks.shape(
        "d",
        d,
        expected,
        "[batch, out_height, out_width, kh, kw]"
        if d.ndim == 5
        else "[out_height, out_width, kh, kw]",
    )
    precision = _checks.precision(precision)
    dtype = _checks.common_dtype(x=x, w=w, d=d)
    x, w, d = x.astype(dtype), w.astype(dtype), d.astype(dtype)
    if impl == "reference":
        return reference.modulated_conv2d(x, w, d, geom)
    return _call(
        "modulated_conv2d",
        MODULATED,
        "y",
        {"x": x, "w": w, "d": d},
        geom=geom,
        impl=impl,
        precision=precision,
        shared=() if d.ndim == 5 else ("d",),
        block_sizes=block_sizes,
    )


def local_conv2d(
    x: jax.Array,
    w: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    precision: Any = None,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """Locally connected convolution: a different kernel at every output pixel.

    ``y[b,i,j,o] = sum_{m,n,c} x[b, pos(i,m), pos(j,n), c] * w[i,j,m,n,c,o]``. Equals
    ``flax.linen.ConvLocal`` / ``lax.conv_general_dilated_local`` given the same weights (see
    :func:`svconv.from_conv_local_kernel` for their weight layout).

    Args:
      x: input ``[batch, height, width, in_channels]``.
      w: kernels ``[out_height, out_width, kh, kw, in_channels, out_channels]``.
      stride, padding, dilation, precision, impl: as in :func:`modulated_conv2d`.
      block_sizes: optional Pallas tiling (``pallas_kernels.local.LocalBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, out_channels]`` in the promoted input dtype.
    """
    x = _checks.float_array("x", x)
    w = _checks.float_array("w", w)
    impl = _checks.impl(impl)
    layout = "[out_height, out_width, kh, kw, in_channels, out_channels]"
    geom = _weight_geometry(x, w, 6, layout, stride, padding, dilation)
    (kh, kw), cin, cout = geom.kernel_size, w.shape[-2], w.shape[-1]
    _checks.shape("w", w, (*geom.out_size, kh, kw, cin, cout), layout)
    precision = _checks.precision(precision)
    dtype = _checks.common_dtype(x=x, w=w)
    x, w = x.astype(dtype), w.astype(dtype)
    if impl == "reference":
        return reference.local_conv2d(x, w, geom)
    return _call(
        "local_conv2d",
        LOCAL,
        "y",
        {"x": x, "w": w},
        geom=geom,
        impl=impl,
        precision=precision,
        block_sizes=block_sizes,
    )


def _pixel_kernels(name: str, k: jax.Array, channels: int) -> tuple[jax.Array, int]:
    """Check the rank/groups of per-pixel kernels; returns them with a groups axis."""
    _checks.rank(
        name, k, (5, 6), "[batch, height, width, kh, kw] or [batch, height, width, kh, kw, groups]"
    )
    if k.ndim == 5:
        return k[..., None], 1
    groups = k.shape[5]
    if groups < 1 or channels % groups:
        raise ValueError(
            f"`{name}` of shape {tuple(k.shape)} has {groups} groups, which does not divide the "
            f"{channels} channels of `x`"
        )
    return k, groups


def pixel_filter2d(
    x: jax.Array,
    k: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """Apply a different filter at every pixel, the same filter to every channel (or group).

    ``y[b,i,j,c] = sum_{m,n} x[b, pos(i,m), pos(j,n), c] * k[b,i,j,m,n(,g(c))]`` where channel
    ``c`` uses group ``g(c) = c // (channels // groups)``.

    Args:
      x: input ``[batch, height, width, channels]``.
      k: filters ``[batch, out_height, out_width, kh, kw]`` or ``[batch, out_height, out_width,
        kh, kw, groups]`` with ``channels % groups == 0``.
      stride, padding, dilation, impl: as in :func:`modulated_conv2d`.
      block_sizes: optional Pallas tiling (``pallas_kernels.pixel.PixelBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted input dtype.
    """
    x = _checks.float_array("x", x)
    k = _checks.float_array("k", k)
    impl = _checks.impl(impl)
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    k6, groups = _pixel_kernels("k", k, x.shape[3])
    kh, kw = k6.shape[3:5]
    geom = _checks.geometry(
        in_size=x.shape[1:3],
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        shapes={"x": x.shape, "k": k.shape},
    )
    _checks.shape(
        "k",
        k,
        (x.shape[0], *geom.out_size, *k.shape[3:]),
        "[batch, out_height, out_width, kh, kw(, groups)]",
    )
    dtype = _checks.common_dtype(x=x, k=k)
    x, k6 = x.astype(dtype), k6.astype(dtype)
    if impl == "reference":
        return reference.pixel_filter2d(x, k6, geom)
    return _call(
        "pixel_filter2d",
        PIXEL,
        "y",
        {"x": x, "k": k6},
        geom=geom,
        impl=impl,
        groups=groups,
        block_sizes=block_sizes,
    )


def _splat_output_size(source_size, kernel_size, stride, dilation, padding):
    """The natural output size of a splat: that of ``lax.conv_transpose`` (``SAME``: source
    size times stride; otherwise the smallest input whose filter output is the source)."""
    if isinstance(padding, str) and padding.upper() in ("SAME", "SAME_LOWER"):
        return tuple(s * st for s, st in zip(source_size, stride, strict=True))
    pads = _checks.padding_pairs(padding, (1, 1), kernel_size, stride, dilation)
    return tuple(
        (s - 1) * st + (k - 1) * dl + 1 - lo - hi
        for s, k, st, dl, (lo, hi) in zip(
            source_size, kernel_size, stride, dilation, pads, strict=True
        )
    )


def pixel_splat2d(
    x: jax.Array,
    k: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    output_size: tuple[int, int] | None = None,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """Scatter form of :func:`pixel_filter2d`: every source pixel spreads its own kernel.

    ``y[b, pos(i,m), pos(j,n), c] += k[b,i,j,m,n(,g(c))] * x[b,i,j,c]`` (targets outside
    ``output_size`` are dropped). This is the transpose of ``pixel_filter2d`` with respect to
    its input, the physical model of a spatially-varying point-spread function.

    Args:
      x: source image ``[batch, height, width, channels]``.
      k: kernels ``[batch, height, width, kh, kw(, groups)]``, one per source pixel.
      stride, padding, dilation, impl: the geometry of the ``pixel_filter2d`` this transposes.
      output_size: ``(out_height, out_width)``; by default ``height * stride`` for ``"SAME"``
        (the size itself at stride 1), else the smallest size whose filter output is ``x``'s.
      block_sizes: optional Pallas tiling (``pallas_kernels.pixel.PixelBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted input dtype.
    """
    x = _checks.float_array("x", x)
    k = _checks.float_array("k", k)
    impl = _checks.impl(impl)
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    k6, groups = _pixel_kernels("k", k, x.shape[3])
    kh, kw = k6.shape[3:5]
    _checks.shape("k", k, (*x.shape[:3], *k.shape[3:]), "[batch, height, width, kh, kw(, groups)]")
    stride_pair = _checks.pair("stride", stride)
    dilation_pair = _checks.pair("dilation", dilation)
    if output_size is None:
        size = _splat_output_size(x.shape[1:3], (kh, kw), stride_pair, dilation_pair, padding)
    else:
        size = _checks.pair("output_size", output_size)
    if min(size) < 1:
        raise ValueError(
            f"pixel_splat2d: the output size {size} is empty for `x` of shape {tuple(x.shape)}, "
            f"kernel {(kh, kw)} and padding {padding!r}; pass `output_size`"
        )
    geom = _checks.geometry(
        in_size=size,
        kernel_size=(kh, kw),
        stride=stride_pair,
        padding=padding,
        dilation=dilation_pair,
        shapes={"x": x.shape, "k": k.shape},
    )
    if geom.out_size != tuple(x.shape[1:3]):
        raise ValueError(
            f"`output_size` {size}: a pixel_filter2d of that size gives {geom.out_size} pixels, "
            f"not the {tuple(x.shape[1:3])} of `x` of shape {tuple(x.shape)} (`k` of shape "
            f"{tuple(k.shape)})"
        )
    dtype = _checks.common_dtype(x=x, k=k)
    x, k6 = x.astype(dtype), k6.astype(dtype)
    if impl == "reference":
        return reference.pixel_splat2d(x, k6, geom)
    return _call(
        "pixel_splat2d",
        PIXEL,
        "x",
        {"y": x, "k": k6},
        geom=geom,
        impl=impl,
        groups=groups,
        block_sizes=block_sizes,
    )


def gaussian_kernels(sigma: jax.Array, size: IntOrPair) -> jax.Array:
    """Normalised Gaussian filters, one per element of ``sigma``.

    ``out[..., m, n] ∝ exp(-((m - cy)^2 + (n - cx)^2) / (2 sigma^2))`` with the centre
    ``(cy, cx) = ((kh - 1) / 2, (kw - 1) / 2)``, normalised to sum 1 over ``(m, n)``. As
    ``sigma -> 0`` the filter becomes a delta at the centre (for odd sizes: the identity filter),
    never NaN; the result is differentiable in ``sigma``. Only ``sigma**2`` matters, so a
    negative ``sigma`` acts like its absolute value.

    Args:
      sigma: standard deviations in pixels, any shape ``[...]``, floating dtype.
      size: ``kh`` (square) or ``(kh, kw)``.

    Returns:
      ``[..., kh, kw]`` in ``sigma``'s dtype; feed it to :func:`pixel_filter2d` as ``k``.
    """
    sigma = _checks.float_array("sigma", sigma)
    kh, kw = _checks.pair("size", size)
    rows = jnp.arange(kh, dtype=jnp.float32) - (kh - 1) / 2
    cols = jnp.arange(kw, dtype=jnp.float32) - (kw - 1) / 2
    r2 = (rows[:, None] ** 2 + cols[None, :] ** 2).reshape(-1)
    # A softmax over taps of -r^2 / (2 sigma^2): stable for tiny sigma (the centre logit is 0 and
    # the others go to -huge, never -inf), with a floor on sigma^2 so sigma == 0 is no 0/0.
    var = jnp.maximum(jnp.square(sigma.astype(jnp.float32)), 1e-12)
    logits = -r2 / (2.0 * var[..., None])
    weights = jax.nn.softmax(logits, axis=-1)
    return weights.reshape(*sigma.shape, kh, kw).astype(sigma.dtype)
