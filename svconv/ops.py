"""The public ops: argument checking, dispatch and the differentiable entry points.

Layouts are NHWC for images and HWIO for shared kernels, like ``lax`` and Flax. For output
pixel ``(i, j)`` and tap ``(m, n)`` the input position is
``pos(i, m) = i*sh + m*dh - pad_top`` and ``pos(j, n) = j*sw + n*dw - pad_left``; outside the
input it reads zero. ``stride`` and ``dilation`` are an int or a pair; ``padding`` is
``"SAME"``, ``"VALID"``, an int or ``((top, bottom), (left, right))`` with exactly
``lax.conv_general_dilated``'s meaning, so output sizes match it.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp

from svconv import _checks, gaussian, product, reference
from svconv._families import DEFORMABLE, GAUSSIAN, LOCAL, MODULATED, PIXEL, PRODUCT
from svconv._primitive import Family, Spec, bind

PaddingLike = str | int | tuple[tuple[int, int], tuple[int, int]]
IntOrPair = int | tuple[int, int]


def _bind(op: str, spec: Spec, operands: dict[str, jax.Array]) -> jax.Array:
    """Bind ``spec``'s partial. With Pallas kernels asked for (``"pallas"``, ``"mosaic"``,
    ``"triton"``), a case none of them can take raises here, at call time, as far as it can be
    told before the device is known; the rest is decided when lowering."""
    args = tuple(operands[s] for s in spec.operands)
    if spec.impl in ("pallas", "mosaic", "triton"):
        shapes = spec.shapes(tuple(a.shape for a in args))
        backend, reasons = spec.choose(None, shapes, args[0].dtype)
        if backend is None:
            raise NotImplementedError(
                f"{op}(impl={spec.impl!r}) cannot run this case: {'; '.join(reasons)}"
            )
    return bind(spec, *args)


def _call(
    oracle: Any, family: Family, target: str, operands: dict[str, jax.Array], **spec: Any
) -> jax.Array:
    """Promote the operands to one dtype, then run the reference ``oracle`` (``impl=
    "reference"``; it names the op) or bind ``family``'s partial with respect to ``target``."""
    dtype = jnp.result_type(*operands.values())
    operands = {n: v.astype(dtype) for n, v in operands.items()}
    if spec["impl"] == "reference":
        return oracle(*operands.values(), spec["geom"])
    return _bind(oracle.__name__, Spec(family=family, target=target, **spec), operands)


def _weight_geometry(
    x, w, w_rank: int, layout: str, stride, padding, dilation, feature_groups=1, **arrays
):
    """Checks shared by the ops with weights ``w [..., kh, kw, in_channels / feature_groups,
    out_channels]``: ranks, matching input channels, groups dividing the channels; returns the
    geometry."""
    _checks.rank("x", x, (4,), "[batch, height, width, in_channels]")
    _checks.rank("w", w, (w_rank,), layout)
    kh, kw, cin, cout = w.shape[-4:]
    groups = feature_groups
    if cin * groups != x.shape[3]:
        per = "" if groups == 1 else f" in each of {groups} feature groups"
        raise ValueError(
            f"`w` of shape {tuple(w.shape)} expects {cin} input channels{per} but `x` of shape "
            f"{tuple(x.shape)} has {x.shape[3]}"
        )
    if cout % groups:
        raise ValueError(
            f"`feature_group_count` {groups} does not divide the {cout} output channels of `w` "
            f"of shape {tuple(w.shape)}"
        )
    shapes = {"x": x.shape, "w": w.shape, **{k: v.shape for k, v in arrays.items()}}
    return _checks.geometry(x.shape[1:3], (kh, kw), stride, padding, dilation, shapes)


def modulated_conv2d(
    x: jax.Array,
    w: jax.Array,
    d: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    feature_group_count: int = 1,
    precision: Any = None,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """Convolution with a shared kernel modulated per output pixel and tap.

    ``y[b,i,j,o] = sum_{m,n,c} x[b, pos(i,m), pos(j,n), c] * w[m,n,c,o] * d[b,i,j,m,n]``.
    With ``d == 1`` this equals ``lax.conv_general_dilated`` (NHWC/HWIO).

    Args:
      x: input ``[batch, height, width, in_channels]``.
      w: kernel ``[kh, kw, in_channels // feature_group_count, out_channels]``.
      d: modulation ``[batch, out_height, out_width, kh, kw]``, or ``[out_height, out_width,
        kh, kw]`` shared over the batch; with modulation groups ``[batch, out_height,
        out_width, kh, kw, groups]`` or ``[out_height, out_width, kh, kw, groups]``: channel
        ``c`` is scaled by group ``c // (in_channels // groups)`` (torchvision's mask with
        offset groups). A 5-dimensional ``d`` is batched when its shape allows.
      stride: int or ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"``, int or ``((top, bottom), (left, right))``.
      dilation: kernel dilation, int or ``(dh, dw)``.
      feature_group_count: as in ``lax.conv_general_dilated``: the input and output channels
        in that many groups, each convolved with its own part of ``w`` (``in_channels``:
        depthwise).
      precision: ``lax`` precision of the dots (float32: default TF32 on GPUs, ``HIGHEST`` exact).
      impl: ``None``/``"auto"``, ``"pallas"``, ``"mosaic"``, ``"triton"``, ``"xla"`` or
        ``"reference"`` (the documentation's conventions page says which runs where). With
        feature or modulation groups it runs the deformable family's kernels: ``None`` the XLA
        path, ``"triton"`` its Triton kernels (not yet run on a GPU); ``"pallas"`` and
        ``"mosaic"`` raise.
      block_sizes: optional Pallas tiling (``pallas_kernels.triton.modulated.ModulatedBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, out_channels]`` in the promoted dtype of the inputs,
      accumulated in float32 (or the inputs' own float64 or complex dtype).

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), groups that do not divide
        the channels, a bad stride, dilation, padding or ``impl``.
    """
    x = _checks.inexact_array("x", x)
    w = _checks.inexact_array("w", w)
    d = _checks.inexact_array("d", d)
    impl = _checks.impl(impl)
    _checks.rank("x", x, (4,), "[batch, height, width, in_channels]")
    groups = _checks.groups(
        "feature_group_count", feature_group_count, x.shape[3], f"input channels of `x` {x.shape}"
    )
    geom = _weight_geometry(
        x, w, 4, "[kh, kw, in_channels // feature_group_count, out_channels]", stride, padding,
        dilation, groups, d=d,
    )  # fmt: skip
    d, shared, mod_groups = _modulation(d, x, geom)
    operands = {"x": x, "w": w, "d": d}
    precision = _checks.precision(precision)
    if groups == 1 and mod_groups is None:
        return _call(
            reference.modulated_conv2d, MODULATED, "y", operands, geom=geom, impl=impl,
            precision=precision, shared=shared, block_sizes=block_sizes,
        )  # fmt: skip
    # Feature or modulation groups: the deformable family without offsets.
    d = d if mod_groups is not None else d[..., None]
    if impl in ("pallas", "mosaic"):
        raise NotImplementedError(
            f"modulated_conv2d(impl={impl!r}): with feature_group_count={groups} or modulation "
            "groups it runs the deformable family's kernels: impl='triton' (not yet run on a "
            "GPU) or the XLA path"
        )
    dtype = jnp.result_type(x, w, d)
    x, w, d = x.astype(dtype), w.astype(dtype), d.astype(dtype)
    if impl == "reference":
        return reference.deformable_conv2d(x, w, None, d, geom, groups)
    spec = Spec(
        family=DEFORMABLE, target="y", geom=geom, impl=impl, precision=precision,
        shared=shared, groups=d.shape[-1], feature_groups=groups, unit=("offsets",),
    )  # fmt: skip
    return _bind("modulated_conv2d", spec, {"x": x, "w": w, "d": d})


def _modulation(d, x, geom):
    """``modulated_conv2d``'s ``d`` checked: ``(d, shared, groups or None)``."""
    kh, kw = geom.kernel_size
    n, (ho, wo) = x.shape[0], geom.out_size
    layouts = (
        "[batch, out_height, out_width, kh, kw(, groups)] or "
        "[out_height, out_width, kh, kw(, groups)]"
    )
    _checks.rank("d", d, (4, 5, 6), layouts)
    if d.ndim == 4:
        _checks.shape("d", d, (ho, wo, kh, kw), "[out_height, out_width, kh, kw]")
        return d, ("d",), None
    if d.ndim == 5 and tuple(d.shape[:4]) != (ho, wo, kh, kw):  # batched, no groups
        _checks.shape("d", d, (n, ho, wo, kh, kw), "[batch, out_height, out_width, kh, kw]")
        return d, (), None
    if d.ndim == 5 and tuple(d.shape) == (n, ho, wo, kh, kw):  # (both readings: batched)
        return d, (), None
    batched = d.ndim == 6
    if batched:
        want = (n, ho, wo, kh, kw, d.shape[-1])
        _checks.shape("d", d, want, "[batch, out_height, out_width, kh, kw, groups]")
    _checks.groups("d.shape[-1]", d.shape[-1], x.shape[3], f"input channels of `x` {x.shape}")
    return d, (() if batched else ("d",)), d.shape[-1]


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
      block_sizes: optional Pallas tiling (``pallas_kernels.triton.local.LocalBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, out_channels]`` in the promoted input dtype.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x = _checks.inexact_array("x", x)
    w = _checks.inexact_array("w", w)
    impl = _checks.impl(impl)
    layout = "[out_height, out_width, kh, kw, in_channels, out_channels]"
    geom = _weight_geometry(x, w, 6, layout, stride, padding, dilation)
    (kh, kw), cin, cout = geom.kernel_size, w.shape[-2], w.shape[-1]
    _checks.shape("w", w, (*geom.out_size, kh, kw, cin, cout), layout)
    precision = _checks.precision(precision)
    spec = {"geom": geom, "impl": impl, "precision": precision, "block_sizes": block_sizes}
    return _call(reference.local_conv2d, LOCAL, "y", {"x": x, "w": w}, **spec)


def _pixel_operands(x: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Checks shared by the per-pixel filter and splat: dtypes, ranks, groups. Returns ``x``,
    ``k``, ``k`` with a groups axis and the number of groups."""
    x = _checks.inexact_array("x", x)
    k = _checks.inexact_array("k", k)
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    _checks.rank(
        "k", k, (5, 6), "[batch, height, width, kh, kw] or [batch, height, width, kh, kw, groups]"
    )
    if k.ndim == 5:
        return x, k, k[..., None], 1
    groups, channels = k.shape[5], x.shape[3]
    if groups < 1 or channels % groups:
        raise ValueError(
            f"`k` of shape {tuple(k.shape)} has {groups} groups, which does not divide the "
            f"{channels} channels of `x` of shape {tuple(x.shape)}"
        )
    return x, k, k, groups


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
      block_sizes: optional Pallas tiling (``pallas_kernels.triton.pixel.PixelBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted input dtype.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x, k, k6, groups = _pixel_operands(x, k)
    impl = _checks.impl(impl)
    kh, kw = k6.shape[3:5]
    geom = _checks.geometry(
        x.shape[1:3], (kh, kw), stride, padding, dilation, {"x": x.shape, "k": k.shape}
    )
    _checks.shape(
        "k",
        k,
        (x.shape[0], *geom.out_size, *k.shape[3:]),
        "[batch, out_height, out_width, kh, kw(, groups)]",
    )
    spec = {"geom": geom, "impl": impl, "groups": groups, "block_sizes": block_sizes}
    return _call(reference.pixel_filter2d, PIXEL, "y", {"x": x, "k": k6}, **spec)


def _splat_geometry(op, x, kernel_size, stride, padding, dilation, output_size, shapes):
    """The geometry of the filter a splat of the source ``x`` transposes. The natural output size
    is that of ``lax.conv_transpose`` (``SAME``: source size times stride; otherwise the smallest
    input whose filter output is the source)."""
    stride = _checks.pair("stride", stride)
    dilation = _checks.pair("dilation", dilation)
    shapes = {"x": x.shape, **shapes}
    if output_size is not None:
        size = _checks.pair("output_size", output_size)
    elif isinstance(padding, str) and padding.upper() in ("SAME", "SAME_LOWER"):
        size = tuple(s * st for s, st in zip(x.shape[1:3], stride, strict=True))
    else:
        pads = _checks.padding_pairs(padding, (1, 1), kernel_size, stride, dilation)
        size = tuple(
            (s - 1) * st + (k - 1) * dl + 1 - lo - hi
            for s, k, st, dl, (lo, hi) in zip(
                x.shape[1:3], kernel_size, stride, dilation, pads, strict=True
            )
        )
    arrays = ", ".join(f"`{n}` of shape {tuple(v)}" for n, v in shapes.items())
    if min(size) < 1:
        raise ValueError(
            f"{op}: the output size {size} is empty for {arrays}, kernel {kernel_size} and "
            f"padding {padding!r}; pass `output_size`"
        )
    geom = _checks.geometry(size, kernel_size, stride, padding, dilation, shapes)
    if geom.out_size != tuple(x.shape[1:3]):
        raise ValueError(
            f"`output_size` {size}: a filter of that size gives {geom.out_size} pixels, not the "
            f"{tuple(x.shape[1:3])} of the source: {arrays}"
        )
    return geom


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
      block_sizes: optional Pallas tiling (``pallas_kernels.triton.pixel.PixelBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted input dtype.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x, k, k6, groups = _pixel_operands(x, k)
    impl = _checks.impl(impl)
    kh, kw = k6.shape[3:5]
    _checks.shape("k", k, (*x.shape[:3], *k.shape[3:]), "[batch, height, width, kh, kw(, groups)]")
    geom = _splat_geometry(
        "pixel_splat2d", x, (kh, kw), stride, padding, dilation, output_size, {"k": k.shape}
    )
    spec = {"geom": geom, "impl": impl, "groups": groups, "block_sizes": block_sizes}
    return _call(reference.pixel_splat2d, PIXEL, "x", {"y": x, "k": k6}, **spec)


SigmaLike = jax.Array | tuple[jax.Array, jax.Array]


def _gaussian_arguments(sigma, rho, grid: tuple[int, ...] | None, layout: str, context=""):
    """Check ``sigma`` (an array or a pair of arrays) and ``rho``: floating, one shape (``grid``
    when given; ``context`` says where it comes from), ``rho`` in (-1, 1) where it is concrete.
    Returns them as arrays."""
    pair = isinstance(sigma, (tuple, list))
    if pair and len(sigma) != 2:
        raise ValueError(
            f"`sigma` must be an array or a pair (sigma_rows, sigma_cols), got {len(sigma)} arrays"
        )
    names = ("sigma[0]", "sigma[1]") if pair else ("sigma",)
    arrays = [
        _checks.float_array(n, v) for n, v in zip(names, sigma if pair else (sigma,), strict=True)
    ]
    if rho is not None:
        names, arrays = (*names, "rho"), [*arrays, _checks.float_array("rho", rho)]
    want = grid if grid is not None else tuple(arrays[0].shape)
    for name, value in zip(names, arrays, strict=True):
        if tuple(value.shape) != tuple(want):
            given = ", ".join(f"`{n}` {tuple(v.shape)}" for n, v in zip(names, arrays, strict=True))
            raise ValueError(
                f"`{name}` must be {layout} of shape {tuple(want)}{context}; got {given}"
            )
    if rho is not None:
        rho = arrays[-1]
        if not isinstance(rho, jax.core.Tracer) and rho.size:
            low, high = float(jnp.min(rho)), float(jnp.max(rho))
            if not (-1 < low and high < 1):
                raise ValueError(f"`rho` must lie in (-1, 1), got values in [{low}, {high}]")
        arrays = arrays[:-1]
    return (tuple(arrays) if pair else arrays[0]), rho


def gaussian_kernels(
    sigma: SigmaLike, size: IntOrPair, *, rho: jax.Array | None = None
) -> jax.Array:
    """Normalised Gaussian filters, one per element of ``sigma``.

    ``out[..., m, n] ∝ exp(-q / 2)`` with ``q = [u, v] Sigma^-1 [u, v]^T`` for the offset
    ``(u, v) = (m - (kh - 1) / 2, n - (kw - 1) / 2)`` of tap ``(m, n)`` from the window's centre
    and ``Sigma = [[sr^2, rho sr sc], [rho sr sc, sc^2]]``, normalised to sum 1 over ``(m, n)``.
    As ``sigma -> 0`` the filter becomes a delta at the centre (for odd sizes: the identity
    filter), never NaN; the result is differentiable in ``sigma`` and ``rho``. Only the squares
    of the sigmas matter.

    Args:
      sigma: standard deviations in pixels, any shape ``[...]`` (isotropic), or a pair
        ``(sigma_rows, sigma_cols)`` of arrays of one shape (axis-aligned ellipses).
      size: ``kh`` (square) or ``(kh, kw)``.
      rho: optional correlation in (-1, 1), the shape of ``sigma`` (rotated ellipses; with a
        single ``sigma``, ``sr = sc = sigma``).

    Returns:
      ``[..., kh, kw]`` in the promoted dtype of ``sigma`` (and ``rho``); feed it to
      :func:`pixel_filter2d` as ``k``. :func:`gaussian_filter2d` applies the same filters
      without building this array.

    Raises:
      TypeError: an integer or boolean ``sigma`` or ``rho``, a ``size`` that is not an int or
        a pair of ints.
      ValueError: ``sigma`` pairs or ``rho`` of different shapes, a ``size`` below 1.
    """
    kernel_size = _checks.pair("size", size)
    sigma, rho = _gaussian_arguments(sigma, rho, None, "an array")
    eta, dtype = _gaussian_parameters(sigma, rho)
    return gaussian.explicit_weights(eta, kernel_size).astype(dtype)


def _gaussian_parameters(sigma, rho) -> tuple[jax.Array, Any]:
    """``eta`` (see :mod:`svconv.gaussian`) of checked ``sigma`` and ``rho``, and their
    promoted dtype."""
    parts = sigma if isinstance(sigma, tuple) else (sigma,)
    dtype = jnp.result_type(*parts, *(() if rho is None else (rho,)))
    if rho is not None and not isinstance(sigma, tuple):
        sigma = (sigma, sigma)
    return gaussian.parameters(sigma, rho), dtype


def _gaussian_call(op, target, oracle, x, sigma, rho, geom, impl, block_sizes, operand):
    """``gaussian_filter2d`` (target ``y``) or ``gaussian_splat2d`` (target ``x``; ``operand``
    is the name of the image's slot): the Gaussian family's partial, or for
    ``impl="reference"`` the per-pixel ``oracle`` with the explicit weights."""
    eta, sigma_dtype = _gaussian_parameters(sigma, rho)
    dtype = jnp.result_type(x, sigma_dtype)
    if impl == "reference":  # gaussian_kernels' weights, exactly
        k = gaussian.explicit_weights(eta, geom.kernel_size).astype(sigma_dtype)
        return oracle(x.astype(dtype), k[..., None].astype(dtype), geom)
    zeta = gaussian.log_normalizer(eta, geom.kernel_size)
    spec = Spec(
        family=GAUSSIAN,
        target=target,
        geom=geom,
        impl=impl,
        unit=("s",),
        moments=(0,) * eta.shape[-1],
        block_sizes=block_sizes,
    )
    return _bind(op, spec, {operand: x.astype(dtype), "eta": eta, "zeta": zeta})


def gaussian_filter2d(
    x: jax.Array,
    sigma: SigmaLike,
    size: IntOrPair,
    *,
    rho: jax.Array | None = None,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """A Gaussian filter per output pixel, its weights computed where they are used.

    Exactly ``pixel_filter2d(x, gaussian_kernels(sigma, size, rho=rho), ...)``, without the
    ``[batch, out_height, out_width, kh, kw]`` weights: forward and backward take memory of the
    order of the images. Differentiable in ``x``, ``sigma`` and ``rho``, in reverse and forward
    mode, with the weights' derivatives recomputed inside the kernels.

    Args:
      x: input ``[batch, height, width, channels]``.
      sigma: per output pixel ``[batch, out_height, out_width]`` (isotropic), or a pair
        ``(sigma_rows, sigma_cols)`` of such arrays (axis-aligned ellipses), in pixels (taps).
      size: ``kh`` or ``(kh, kw)``.
      rho: optional correlation in (-1, 1) per output pixel (rotated ellipses).
      stride, padding, dilation, impl: as in :func:`pixel_filter2d`.
      block_sizes: optional Pallas tiling (``pallas_kernels.triton.pixel.PixelBlockSizes``).

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted dtype of the inputs.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x = _checks.inexact_array("x", x)
    impl = _checks.impl(impl)
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    kernel_size = _checks.pair("size", size)
    geom = _checks.geometry(x.shape[1:3], kernel_size, stride, padding, dilation, {"x": x.shape})
    layout = "[batch, out_height, out_width]"
    context = (
        f" (the output grid of `x` of shape {tuple(x.shape)} with kernel {kernel_size}, "
        f"stride {geom.stride}, dilation {geom.dilation}, padding {padding!r})"
    )
    grid = (x.shape[0], *geom.out_size)
    sigma, rho = _gaussian_arguments(sigma, rho, grid, layout, context)
    oracle = reference.pixel_filter2d
    args = (x, sigma, rho, geom, impl, block_sizes, "x")
    return _gaussian_call("gaussian_filter2d", "y", oracle, *args)


def gaussian_splat2d(
    x: jax.Array,
    sigma: SigmaLike,
    size: IntOrPair,
    *,
    rho: jax.Array | None = None,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    output_size: tuple[int, int] | None = None,
    impl: str | None = None,
    block_sizes: Any = None,
) -> jax.Array:
    """Every source pixel spreads its own Gaussian point-spread function.

    Exactly ``pixel_splat2d(x, gaussian_kernels(sigma, size, rho=rho), ...)``, the transpose of
    :func:`gaussian_filter2d` in ``x``, without the weights array (see there).

    Args:
      x: source image ``[batch, height, width, channels]``.
      sigma, rho: per source pixel, ``[batch, height, width]`` (or a pair of such arrays).
      size: ``kh`` or ``(kh, kw)``.
      stride, padding, dilation, output_size, impl, block_sizes: as in :func:`pixel_splat2d`.

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted dtype of the inputs.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x = _checks.inexact_array("x", x)
    impl = _checks.impl(impl)
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    kernel_size = _checks.pair("size", size)
    sigma, rho = _gaussian_arguments(
        sigma, rho, tuple(x.shape[:3]), "[batch, height, width]", f" (`x` is {tuple(x.shape)})"
    )
    geom = _splat_geometry(
        "gaussian_splat2d", x, kernel_size, stride, padding, dilation, output_size, {}
    )
    oracle = reference.pixel_splat2d
    args = (x, sigma, rho, geom, impl, block_sizes, "y")
    return _gaussian_call("gaussian_splat2d", "x", oracle, *args)


def _offset_arrays(op, x, geom, offsets, per_pixel, name, groups_axis: bool):
    """Check ``offsets`` (and the per-pixel array ``per_pixel`` called ``name``, or None) on
    the output grid of ``geom``: ``[N, Ho, Wo, kh, kw, G, 2]`` and ``[N, Ho, Wo, kh, kw, G]``
    (``groups_axis`` False: without the ``G`` axes, one group). Returns them with the groups
    axis and the number of groups."""
    kh, kw = geom.kernel_size
    n, (ho, wo), c = x.shape[0], geom.out_size, x.shape[3]
    grid = (n, ho, wo, kh, kw)
    offsets = _checks.float_array("offsets", offsets)
    g_layout = ", groups" if groups_axis else ""
    layout = f"[batch, out_height, out_width, kh, kw{g_layout}, 2]"
    _checks.rank("offsets", offsets, (7 if groups_axis else 6,), layout)
    groups = offsets.shape[5] if groups_axis else 1
    context = f"(`x` of shape {tuple(x.shape)}, output size {(ho, wo)}, kernel {(kh, kw)})"
    if tuple(offsets.shape[:5]) != grid or offsets.shape[-1] != 2:
        raise ValueError(
            f"{op}: `offsets` of shape {tuple(offsets.shape)} is not {layout} = "
            f"{(*grid, *((groups,) if groups_axis else ()), 2)} {context}"
        )
    _checks.groups("offsets.shape[5]", groups, c, f"channels of `x` {tuple(x.shape)}")
    if not groups_axis:
        offsets = offsets[..., None, :]
    if per_pixel is not None:
        per_pixel = _checks.inexact_array(name, per_pixel)
        want = (*grid, groups) if groups_axis else grid
        _checks.shape(name, per_pixel, want, f"[batch, out_height, out_width, kh, kw{g_layout}] "
                      f"with the groups of `offsets` of shape {tuple(offsets.shape)}")  # fmt: skip
        if not groups_axis:
            per_pixel = per_pixel[..., None]
    return offsets, per_pixel, groups


def _offsets_dtype(offsets, dtype):
    """The offsets as given (a real floating dtype: the kernels compute the sample positions in
    float32, or float64 for float64 and complex128 images); float64 offsets with narrower images
    are taken in float32."""
    real = jnp.finfo(_checks.accumulation_dtype(dtype)).dtype
    return offsets.astype(real) if offsets.dtype.itemsize > real.itemsize else offsets


def deformable_conv2d(
    x: jax.Array,
    w: jax.Array,
    offsets: jax.Array,
    mask: jax.Array | None = None,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    feature_group_count: int = 1,
    precision: Any = None,
    impl: str | None = None,
) -> jax.Array:
    """Modulated deformable convolution (DCNv2): every tap samples the image at its own offset.

    ``y[b,i,j,o] = sum_{m,n,c} x~[b, pos(i,m) + dy, pos(j,n) + dx, c] * mask[b,i,j,m,n,g(c)] *
    w[m,n,c',o]`` with ``(dy, dx) = offsets[b,i,j,m,n,g(c)]``, ``x~`` the bilinear
    interpolation of ``x`` (zero outside the image), ``g(c) = c // (in_channels // groups)``
    the offset group and the channels in ``feature_group_count`` groups as in
    ``lax.conv_general_dilated``. The numbers of ``torchvision.ops.deform_conv2d`` given the
    same arrays in its layout (:func:`svconv.from_torch_deform_conv2d`); zero offsets give
    :func:`modulated_conv2d`.

    Differentiable in ``x``, ``w``, ``offsets`` and ``mask``, in reverse and forward mode, to
    any order. The derivative in the offsets is exact where the bilinear weights are
    differentiable; on integer sample positions it is the derivative from above (the four
    pixels from the position's own row and column on), as torchvision's.

    Args:
      x: input ``[batch, height, width, in_channels]``.
      w: kernel ``[kh, kw, in_channels // feature_group_count, out_channels]``.
      offsets: ``[batch, out_height, out_width, kh, kw, groups, 2]``, ``(dy, dx)`` in input
        pixels, added to each tap's position; ``groups`` (offset groups) divides
        ``in_channels``. Any real floating dtype (the sample positions are computed in float32,
        float64 for float64 images; 16-bit offsets resolve a pixel coarsely far from zero).
      mask: ``[batch, out_height, out_width, kh, kw, groups]`` (DCNv2's modulation), or None
        (ones: DCNv1).
      stride, padding, dilation, precision: as in :func:`modulated_conv2d`.
      feature_group_count: as in ``lax.conv_general_dilated``.
      impl: ``None``/``"auto"`` (the XLA path on every platform until the Triton kernels have
        run on a GPU), ``"xla"``, ``"triton"`` (the Pallas Triton kernels: compiled for CUDA,
        interpreted elsewhere; not for depthwise cases) or ``"reference"``; ``"pallas"`` and
        ``"mosaic"`` raise.

    Returns:
      ``[batch, out_height, out_width, out_channels]`` in the promoted dtype of ``x``, ``w``
      and ``mask``.

    Raises:
      TypeError: integer or boolean arrays; complex offsets.
      ValueError: shapes that do not match (the message prints them), groups that do not divide
        the channels, a bad stride, dilation, padding or ``impl``.
    """
    x = _checks.inexact_array("x", x)
    w = _checks.inexact_array("w", w)
    impl = _checks.impl(impl)
    _checks.rank("x", x, (4,), "[batch, height, width, in_channels]")
    groups = _checks.groups(
        "feature_group_count", feature_group_count, x.shape[3], f"input channels of `x` {x.shape}"
    )
    geom = _weight_geometry(
        x, w, 4, "[kh, kw, in_channels // feature_group_count, out_channels]", stride, padding,
        dilation, groups, offsets=jax.ShapeDtypeStruct(jnp.shape(offsets), jnp.float32),
    )  # fmt: skip
    offsets, mask, offset_groups = _offset_arrays(
        "deformable_conv2d", x, geom, offsets, mask, "mask", True
    )
    slots = {"x": x, "w": w, **({} if mask is None else {"d": mask})}
    dtype = jnp.result_type(*slots.values())
    slots = {k: v.astype(dtype) for k, v in slots.items()}
    offsets = _offsets_dtype(offsets, dtype)
    if impl == "reference":
        return reference.deformable_conv2d(
            slots["x"], slots["w"], offsets, slots.get("d"), geom, groups
        )
    spec = Spec(
        family=DEFORMABLE, target="y", geom=geom, impl=impl, precision=_checks.precision(precision),
        groups=offset_groups, feature_groups=groups, unit=() if mask is not None else ("d",),
    )  # fmt: skip
    return _bind("deformable_conv2d", spec, {**slots, "offsets": offsets})


def _filter_operands(op, x, k, offsets, geom):
    """The per-pixel filters ``k`` and their offsets checked against ``geom``'s output grid."""
    groups_axis = k.ndim == 6
    return _offset_arrays(op, x, geom, offsets, k, "k", groups_axis)


def deformable_filter2d(
    x: jax.Array,
    k: jax.Array,
    offsets: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    impl: str | None = None,
) -> jax.Array:
    """Per-pixel filters whose taps sample at their own offsets (DCNv3/DCNv4's aggregation).

    ``y[b,i,j,c] = sum_{m,n} x~[b, pos(i,m) + dy, pos(j,n) + dx, c] * k[b,i,j,m,n,g(c)]``,
    ``(dy, dx) = offsets[b,i,j,m,n,g(c)]``, ``x~`` the bilinear interpolation of ``x`` (zero
    outside the image), ``g(c) = c // (channels // groups)``. Zero offsets give
    :func:`pixel_filter2d`; DCNv3's softmax over the taps is the caller's, on ``k``.
    Differentiable in ``x``, ``k`` and ``offsets`` (see :func:`deformable_conv2d` for the
    derivative in the offsets).

    Args:
      x: input ``[batch, height, width, channels]``.
      k: filters ``[batch, out_height, out_width, kh, kw, groups]`` (``groups`` dividing the
        channels), or ``[batch, out_height, out_width, kh, kw]`` (one group).
      offsets: ``[batch, out_height, out_width, kh, kw, groups, 2]`` (``(dy, dx)`` in input
        pixels), or without the ``groups`` axis for a 5-dimensional ``k``.
      stride, padding, dilation: as in :func:`pixel_filter2d`.
      impl: ``None``/``"auto"``, ``"xla"`` or ``"reference"``.

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted dtype of ``x`` and ``k``.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x, k, _, _ = _pixel_operands(x, k)
    impl = _checks.impl(impl)
    shapes = {"x": x.shape, "k": k.shape, "offsets": jnp.shape(offsets)}
    geom = _checks.geometry(x.shape[1:3], k.shape[3:5], stride, padding, dilation, shapes)
    offsets, k, groups = _filter_operands("deformable_filter2d", x, k, offsets, geom)
    return _deformable_filter_call("deformable_filter2d", "y", x, k, offsets, groups, geom, impl)


def _deformable_filter_call(op, target, x, k, offsets, groups, geom, impl):
    """The per-pixel filter (target ``y``) or splat (target ``x``) of the source ``x``: the
    depthwise deformable conv with unit weights and ``k`` as the mask."""
    dtype = jnp.result_type(x, k)
    x, k = x.astype(dtype), k.astype(dtype)
    offsets = _offsets_dtype(offsets, dtype)
    c = x.shape[3]
    ones = jnp.ones((*geom.kernel_size, 1, c), dtype)
    if impl == "reference":

        def filt(v):
            return reference.deformable_conv2d(v, ones, offsets, k, geom, c)

        if target == "y":
            return filt(x)
        like = jax.ShapeDtypeStruct((x.shape[0], *geom.in_size, c), dtype)
        return jax.linear_transpose(filt, like)(x)[0]
    spec = Spec(
        family=DEFORMABLE, target=target, geom=geom, impl=impl, groups=groups, feature_groups=c
    )
    image = "x" if target == "y" else "y"
    return _bind(op, spec, {image: x, "w": ones, "d": k, "offsets": offsets})


def deformable_splat2d(
    x: jax.Array,
    k: jax.Array,
    offsets: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    output_size: tuple[int, int] | None = None,
    impl: str | None = None,
) -> jax.Array:
    """Scatter form of :func:`deformable_filter2d`, its transpose in ``x``: every source pixel
    spreads its kernel, each tap bilinearly at its own offset position.

    ``y[b, pos(i,m) + dy, pos(j,n) + dx, c] += k[b,i,j,m,n,g(c)] * x[b,i,j,c]``, the point
    shared among its four neighbouring pixels by the bilinear weights (targets outside
    ``output_size`` dropped). Zero offsets give :func:`pixel_splat2d`.

    Args:
      x: source image ``[batch, height, width, channels]``.
      k: kernels ``[batch, height, width, kh, kw(, groups)]``, one per source pixel.
      offsets: ``[batch, height, width, kh, kw(, groups), 2]``.
      stride, padding, dilation, output_size: as in :func:`pixel_splat2d`.
      impl: ``None``/``"auto"``, ``"xla"`` or ``"reference"``.

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted dtype of ``x`` and ``k``.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), a bad stride, dilation,
        padding or ``impl``.
      NotImplementedError: Pallas kernels asked for (``impl="pallas"``, ``"mosaic"``,
        ``"triton"``) that cannot take the case (e.g. a complex or float64 dtype).
    """
    x, k, _, _ = _pixel_operands(x, k)
    impl = _checks.impl(impl)
    kernel_size = tuple(k.shape[3:5])
    shapes = {"k": k.shape, "offsets": jnp.shape(offsets)}
    geom = _splat_geometry(
        "deformable_splat2d", x, kernel_size, stride, padding, dilation, output_size, shapes
    )
    # The filter this transposes has ``x``'s grid as its output grid.
    source = jax.ShapeDtypeStruct((x.shape[0], *geom.in_size, x.shape[3]), x.dtype)
    offsets, k, groups = _filter_operands("deformable_splat2d", source, k, offsets, geom)
    return _deformable_filter_call("deformable_splat2d", "x", x, k, offsets, groups, geom, impl)


def from_torch_deform_conv2d(
    weight: Any, offset: Any, mask: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``torchvision.ops.deform_conv2d``'s arrays in :func:`deformable_conv2d`'s layouts.

    Args:
      weight: ``[out_channels, in_channels // groups, kh, kw]`` (OIHW).
      offset: ``[batch, 2 * offset_groups * kh * kw, out_height, out_width]``, channel
        ``(g * kh * kw + m * kw + n) * 2 + {0: dy, 1: dx}``.
      mask: ``[batch, offset_groups * kh * kw, out_height, out_width]`` or None.

    Returns:
      ``(w, offsets, mask)``: ``[kh, kw, in_channels // groups, out_channels]``, ``[batch,
      out_height, out_width, kh, kw, offset_groups, 2]`` and ``[batch, out_height, out_width,
      kh, kw, offset_groups]`` (or None). The image goes from NCHW to NHWC by
      ``x.transpose(0, 2, 3, 1)``.

    Raises:
      ValueError: ranks that do not match the layouts, an ``offset`` channel count that is not
        ``2 * offset_groups * kh * kw``, a ``mask`` of another shape (the message prints them).
    """
    weight, offset = jnp.asarray(weight), jnp.asarray(offset)
    _checks.rank("weight", weight, (4,), "[out_channels, in_channels // groups, kh, kw]")
    _checks.rank("offset", offset, (4,), "[batch, 2 * offset_groups * kh * kw, out_h, out_w]")
    kh, kw = weight.shape[2:]
    n, channels, ho, wo = offset.shape
    if channels % (2 * kh * kw):
        raise ValueError(
            f"`offset` of shape {tuple(offset.shape)}: {channels} channels are not 2 * groups * "
            f"{kh} * {kw} for `weight` of shape {tuple(weight.shape)}"
        )
    groups = channels // (2 * kh * kw)
    offsets = offset.reshape(n, groups, kh, kw, 2, ho, wo).transpose(0, 5, 6, 2, 3, 1, 4)
    if mask is not None:
        mask = jnp.asarray(mask)
        _checks.shape("mask", mask, (n, groups * kh * kw, ho, wo),
                      "[batch, offset_groups * kh * kw, out_height, out_width]")  # fmt: skip
        mask = mask.reshape(n, groups, kh, kw, ho, wo).transpose(0, 4, 5, 2, 3, 1)
    return weight.transpose(2, 3, 1, 0), offsets, mask


def to_torch_deform_conv2d(
    w: Any, offsets: Any, mask: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The inverse of :func:`from_torch_deform_conv2d`: ``(weight, offset, mask)`` in
    ``torchvision.ops.deform_conv2d``'s layouts (``torch.from_numpy(np.asarray(a))``).

    Args:
      w: ``[kh, kw, in_channels // groups, out_channels]``.
      offsets: ``[batch, out_height, out_width, kh, kw, offset_groups, 2]``, ``(dy, dx)`` last.
      mask: optional ``[batch, out_height, out_width, kh, kw, offset_groups]``.

    Returns:
      ``(weight [out_channels, in_channels // groups, kh, kw], offset [batch, 2 *
      offset_groups * kh * kw, out_height, out_width], mask [batch, offset_groups * kh * kw,
      out_height, out_width] or None)``, torchvision's channel order (group, tap, ``(dy, dx)``),
      in the arrays' dtypes.

    Raises:
      ValueError: ``w`` or ``offsets`` of another rank, a ``mask`` whose shape is not
        ``offsets.shape[:6]`` (the message prints the shapes).
    """
    w, offsets = jnp.asarray(w), jnp.asarray(offsets)
    _checks.rank("w", w, (4,), "[kh, kw, in_channels // groups, out_channels]")
    _checks.rank("offsets", offsets, (7,), "[batch, out_height, out_width, kh, kw, groups, 2]")
    n, ho, wo, kh, kw, groups, _ = offsets.shape
    offset = offsets.transpose(0, 5, 3, 4, 6, 1, 2).reshape(n, groups * kh * kw * 2, ho, wo)
    if mask is not None:
        mask = jnp.asarray(mask)
        _checks.shape("mask", mask, offsets.shape[:6], "[batch, out_height, out_width, kh, kw, "
                      "groups]")  # fmt: skip
        mask = mask.transpose(0, 5, 3, 4, 1, 2).reshape(n, groups * kh * kw, ho, wo)
    return w.transpose(3, 2, 0, 1), offset, mask


# ---------------------------------------------------------------- low-rank per-pixel filters


def _product_operands(x, filters, weights):
    """Checks shared by the product filter and splat before the geometry: dtypes, ranks, the
    filters' groups, the number of terms. Returns ``x``, the filters with a groups axis
    ``[R, kh, kw, G]``, the weights and the number of groups."""
    x = _checks.inexact_array("x", x)
    filters = _checks.inexact_array("filters", filters)
    weights = _checks.inexact_array("weights", weights)
    _checks.rank("x", x, (4,), "[batch, height, width, channels]")
    _checks.rank("filters", filters, (3, 4), "[rank, kh, kw] or [rank, kh, kw, groups]")
    _checks.rank(
        "weights", weights, (3, 4), "[batch, height, width, rank] or [height, width, rank]"
    )
    f4 = filters if filters.ndim == 4 else filters[..., None]
    groups, channels = f4.shape[3], x.shape[3]
    if groups < 1 or channels % groups:
        raise ValueError(
            f"`filters` of shape {tuple(filters.shape)} has {groups} channel groups, which does "
            f"not divide the {channels} channels of `x` of shape {tuple(x.shape)}"
        )
    if weights.shape[-1] != f4.shape[0] or f4.shape[0] < 1:
        raise ValueError(
            f"`weights` of shape {tuple(weights.shape)} has {weights.shape[-1]} terms (its last "
            f"axis) but `filters` of shape {tuple(filters.shape)} has {f4.shape[0]} (its first)"
        )
    return x, f4, weights, groups


def _product_call(target, x, f4, weights, grid, geom, method, precision, impl, groups):
    """Check the weights' grid and the method, then bind the product family's partial."""
    layout = "[batch, height, width, rank] or [height, width, rank]"
    rank = f4.shape[0]
    shared = weights.ndim == 3
    _checks.shape("weights", weights, (*grid[shared:], rank), layout + f" on a {grid} grid")
    if method not in (None, *product.METHODS):
        raise ValueError(f"`method` must be None, 'direct' or 'fft'; got {method!r}")
    method = product.choose_method(geom, rank) if method is None else method
    spec = {
        "geom": geom, "impl": impl, "groups": groups, "precision": _checks.precision(precision),
        "method": method, "shared": ("u",) if shared else (),
    }  # fmt: skip
    image = "x" if target == "y" else "y"
    oracle = reference.product_filter2d if target == "y" else reference.product_splat2d
    return _call(oracle, PRODUCT, target, {image: x, "f": f4, "u": weights}, **spec)


def product_filter2d(
    x: jax.Array,
    filters: jax.Array,
    weights: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    method: str | None = None,
    precision: Any = None,
    impl: str | None = None,
) -> jax.Array:
    """Per-pixel filters of low rank: a weighted sum of ``R`` shared filters at every pixel.

    Exactly ``pixel_filter2d(x, k)`` with the per-pixel kernels
    ``k[b,i,j,m,n] = sum_r weights[b,i,j,r] * filters[r,m,n]``, never built:
    ``y = sum_r weights_r * (filters_r correlated with x)``, ``R`` spatially-invariant filters
    whose outputs are weighted per output pixel (the product-convolution, or eigen-PSF, model of a
    spatially-varying point-spread function). Memory ``O(R * image)`` whatever the kernel size,
    so 64x64 to 256x256 kernels, out of reach of the per-pixel ops, run.

    Args:
      x: input ``[batch, height, width, channels]``.
      filters: ``[R, kh, kw]`` (every channel), or ``[R, kh, kw, groups]`` with
        ``channels % groups == 0`` (channel ``c`` uses group ``c // (channels // groups)``;
        ``groups = channels``: one set per channel, e.g. per wavelength).
      weights: the per-pixel coefficients ``[batch, out_height, out_width, R]``, or
        ``[out_height, out_width, R]`` shared over the batch (see :func:`psf_grid_decomposition`
        and :func:`low_rank_kernels` to build them with the filters).
      stride, padding, dilation: as in :func:`pixel_filter2d`.
      method: ``"direct"`` (``R`` depthwise convolutions: ``lax.conv_general_dilated``, cuDNN on
        a GPU), ``"fft"`` (real FFTs of the zero-padded image, one per channel, and ``R`` inverse
        ones; no circular wrap-around: the direct method's numbers up to rounding), or None:
        the faster by a cost model measured on CPU (at rank 16 the FFTs from 11x11 on a
        128x128 image, from 13x13 on 512x512).
      precision: ``lax`` precision of the direct method's convolution.
      impl: None, ``"xla"`` (the family has XLA kernels only: Pallas values raise
        ``NotImplementedError``) or ``"reference"`` (the kernels built explicitly, for tests).

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted input dtype (16-bit inputs
      computed in float32).

    Raises:
      ValueError: mismatched ranks, terms (``R``), groups or grids, a kernel larger than the
        padded image, an unknown ``method``. TypeError: integer or bool arrays.
    """
    x, f4, weights, groups = _product_operands(x, filters, weights)
    impl = _checks.impl(impl)
    shapes = {"x": x.shape, "filters": filters.shape, "weights": weights.shape}
    geom = _checks.geometry(x.shape[1:3], f4.shape[1:3], stride, padding, dilation, shapes)
    grid = (x.shape[0], *geom.out_size)
    args = (x, f4, weights, grid, geom, method, precision, impl, groups)
    return _product_call("y", *args)


def product_splat2d(
    x: jax.Array,
    filters: jax.Array,
    weights: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrPair = 1,
    output_size: tuple[int, int] | None = None,
    method: str | None = None,
    precision: Any = None,
    impl: str | None = None,
) -> jax.Array:
    """Every source pixel spreads its own low-rank kernel: the transpose of
    :func:`product_filter2d` in ``x``.

    Exactly ``pixel_splat2d(x, k)`` with ``k[b,i,j,m,n] = sum_r weights[b,i,j,r] *
    filters[r,m,n]`` on the source grid: ``y = sum_r filters_r convolved with (weights_r * x)``,
    a point-spread function that moves with the source (``deepinv``'s ``SpaceVaryingBlur``).
    With FFTs the ``R`` terms are summed in the frequency domain: ``R`` forward transforms per
    channel and one inverse.

    Args:
      x: source image ``[batch, height, width, channels]``.
      filters: ``[R, kh, kw]`` or ``[R, kh, kw, groups]``, as in :func:`product_filter2d`.
      weights: per source pixel, ``[batch, height, width, R]`` or ``[height, width, R]``.
      stride, padding, dilation, output_size: as in :func:`pixel_splat2d`.
      method, precision, impl: as in :func:`product_filter2d`.

    Returns:
      ``[batch, out_height, out_width, channels]`` in the promoted input dtype.

    Raises:
      TypeError: an integer or boolean array.
      ValueError: shapes that do not match (the message prints them), mismatched terms
        (``R``) or groups, a kernel larger than the padded image, an unknown ``method``, a bad
        stride, dilation, padding or ``impl``.
      NotImplementedError: ``impl="pallas"``, ``"mosaic"`` or ``"triton"`` (no Pallas kernels).
    """
    x, f4, weights, groups = _product_operands(x, filters, weights)
    impl = _checks.impl(impl)
    shapes = {"filters": filters.shape, "weights": weights.shape}
    geom = _splat_geometry(
        "product_splat2d", x, f4.shape[1:3], stride, padding, dilation, output_size, shapes
    )
    grid = tuple(x.shape[:3])
    args = (x, f4, weights, grid, geom, method, precision, impl, groups)
    return _product_call("x", *args)


def psf_grid_decomposition(
    psfs: jax.Array, image_size: tuple[int, int], *, rank: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Filters and per-pixel weights for :func:`product_filter2d` / :func:`product_splat2d` from
    point-spread functions sampled on a coarse grid (the usual calibration).

    The grid's ``Gh x Gw`` PSFs are taken at the centres of ``Gh x Gw`` equal regions of the
    image (row-major). Without ``rank``: the exact Nagy-O'Leary interpolation, the filters are
    the grid PSFs and the weights bilinear hat functions, so each pixel's kernel is the bilinear
    interpolation of its (up to) four neighbouring PSFs, constant beyond the outermost nodes
    (the weights sum to one at every pixel). With ``rank=R``: the ``R`` leading eigen-PSFs (the
    SVD of the grid PSFs) and their coefficients interpolated the same way, so each pixel's
    kernel is the interpolation of the grid PSFs' best rank-``R`` approximations.

    Args:
      psfs: ``[Gh, Gw, kh, kw]``, or ``[Gh, Gw, kh, kw, C]`` (per channel: filters
        ``[R, kh, kw, C]``, one coefficient per term for every channel).
      image_size: ``(height, width)`` of the grid the weights live on: the output grid of
        :func:`product_filter2d`, the source grid of :func:`product_splat2d`.
      rank: the number of eigen-PSFs, ``1 <= rank <= min(Gh * Gw, kh * kw (* C))``; None: the
        interpolation form (``R = Gh * Gw``).

    Returns:
      ``(filters [R, kh, kw(, C)], weights [height, width, R])`` in ``psfs``' dtype (float32 for
      16-bit ``psfs``).

    Raises:
      TypeError: integer or boolean ``psfs``.
      ValueError: ``psfs`` of another rank or empty, a bad ``image_size``, a ``rank`` that is
        not an int from 1 to the number of PSFs (at most their number of values).
    """
    psfs = _checks.inexact_array("psfs", psfs)
    _checks.rank("psfs", psfs, (4, 5), "[grid_h, grid_w, kh, kw] or [grid_h, grid_w, kh, kw, C]")
    size = _checks.pair("image_size", image_size)
    # (the rank is checked: two grid axes)
    grid, kernel = cast(tuple[int, int], tuple(psfs.shape[:2])), tuple(psfs.shape[2:])
    if min(grid) < 1 or min(kernel) < 1:
        raise ValueError(f"`psfs` of shape {tuple(psfs.shape)} is empty")
    dtype = _checks.accumulation_dtype(psfs.dtype)
    hats = product.interpolation_weights(grid, size, jnp.finfo(dtype).dtype)
    flat = psfs.astype(dtype).reshape(grid[0] * grid[1], -1)
    if rank is None:
        return flat.reshape(-1, *kernel), hats.astype(dtype)
    most = min(flat.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= most:
        raise ValueError(
            f"`rank` must be an int from 1 to {most} (the grid's {flat.shape[0]} PSFs of "
            f"{flat.shape[1]} values, `psfs` of shape {tuple(psfs.shape)}); got {rank!r}"
        )
    basis, coefficients, _ = product.top_components(flat, rank)
    weights = jnp.einsum("hwg,gr->hwr", hats.astype(dtype), coefficients, precision="highest")
    return basis.reshape(rank, *kernel), weights


def low_rank_kernels(k: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best rank-``R`` factorisation of per-pixel kernels, for :func:`product_filter2d`.

    ``k[..., m, n] ~ sum_r weights[..., r] * filters[r, m, n]`` with orthonormal filters (the
    leading right singular vectors of ``k`` viewed as ``[pixels, kh * kw]``, from its
    ``[kh*kw, kh*kw]`` Gram matrix), the least-squares best for that rank.

    Args:
      k: per-pixel kernels ``[..., kh, kw]``, e.g. ``[batch, height, width, kh, kw]`` from
        :func:`gaussian_kernels`.
      rank: ``1 <= rank <= kh * kw``.

    Returns:
      ``(filters [R, kh, kw], weights [..., R], error)``: ``error`` is the relative Frobenius
      error ``|k - approximation| / |k|`` the rank leaves (a float scalar).

    Raises:
      TypeError: an integer or boolean ``k``.
      ValueError: ``k`` with fewer than 3 dimensions, a ``rank`` that is not an int from 1 to
        ``kh * kw``.
    """
    k = _checks.inexact_array("k", k)
    if k.ndim < 3:
        raise ValueError(
            f"`k` must be [..., kh, kw] with at least one leading axis, got shape {tuple(k.shape)}"
        )
    taps = k.shape[-2] * k.shape[-1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= taps:
        raise ValueError(
            f"`rank` must be an int from 1 to kh * kw = {taps} (`k` of shape {tuple(k.shape)}); "
            f"got {rank!r}"
        )
    return product.low_rank(k, rank)
