"""Flax NNX layers over the svconv ops, in ``flax.nnx.Conv``'s vocabulary.

The constructors take ``in_features, out_features, kernel_size, ..., rngs`` and create their
parameters eagerly as ``nnx.Param`` attributes; ``__call__`` runs the math that the Flax linen
layers (``svconv.layers``) run (``svconv._layer_math``), so both give the same numbers given
the same parameters. Settings are checked in the constructor, shapes at call time, with errors
that name the argument.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from svconv import _checks, _layer_math
from svconv._layer_math import Initializer

__all__ = [
    "DeformableConv",
    "DeformableFilter",
    "KernelPredictionFilter",
    "LocalConv",
    "ModulatedConv",
]


def _static_padding(padding: Any) -> Any:
    """``padding`` as an immutable value (a module attribute must not hold lists)."""
    if isinstance(padding, str) or not isinstance(padding, Sequence):
        return padding
    return tuple(tuple(p) if isinstance(p, Sequence) else p for p in padding)


def _check_window(
    size: tuple[int, int], strides: Any, padding: Any, kernel_dilation: Any
) -> tuple[tuple[int, int], tuple[int, int], Any]:
    """Validate the window settings before any input is seen, on an input one window large
    (``padding`` is only resolved against the real input size at call time); returns
    ``strides`` and ``kernel_dilation`` as pairs and ``padding`` as given."""
    strides = _checks.pair("strides", strides)
    kernel_dilation = _checks.pair("kernel_dilation", kernel_dilation)
    span = tuple((k - 1) * d + 1 for k, d in zip(size, kernel_dilation, strict=True))
    _checks.padding_pairs(padding, span, size, strides, kernel_dilation)
    return strides, kernel_dilation, _static_padding(padding)


def _check_channels(x: jax.Array, in_features: int, layout: str) -> None:
    _checks.rank("x", x, (4,), layout)
    if x.shape[-1] != in_features:
        raise ValueError(
            f"`x` of shape {tuple(x.shape)} has {x.shape[-1]} channels but the layer was built "
            f"with in_features={in_features}"
        )


class _Conv(nnx.Module):
    """The settings and parameters every conv layer stores (:func:`_set_conv_settings`,
    :func:`_create_parameters`): declared once for the type checker."""

    in_features: int
    out_features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    kernel_dilation: tuple[int, int]
    padding: Any
    use_bias: bool
    dtype: Any
    param_dtype: Any
    precision: Any
    impl: str | None
    kernel: nnx.Param[jax.Array]
    bias: nnx.Param[jax.Array] | None


def _set_conv_settings(
    layer: _Conv,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    settings: dict[str, Any],
) -> None:
    """Check and store a conv layer's sizes and its settings (``strides``, ``padding``,
    ``kernel_dilation``, ``use_bias``, ``dtype``, ``param_dtype``, ``precision``, ``impl``)."""
    layer.in_features = _layer_math.positive_int("in_features", in_features)
    layer.out_features = _layer_math.positive_int("out_features", out_features)
    layer.kernel_size = _layer_math.kernel_size(kernel_size)
    layer.strides, layer.kernel_dilation, layer.padding = _check_window(
        layer.kernel_size, settings["strides"], settings["padding"], settings["kernel_dilation"]
    )
    layer.use_bias = settings["use_bias"]
    layer.dtype = settings["dtype"]
    layer.param_dtype = settings["param_dtype"]
    layer.precision = _checks.precision(settings["precision"])
    _checks.impl(settings["impl"])
    layer.impl = settings["impl"]


def _create_parameters(
    layer: _Conv,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    kernel_init: Initializer,
    bias_init: Initializer,
    rngs: nnx.Rngs,
) -> None:
    """``layer.kernel`` and ``layer.bias`` (``None`` without ``use_bias``) as ``nnx.Param``."""
    kernel_shape, bias_shape = shapes
    layer.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, layer.param_dtype))
    layer.bias = (
        nnx.Param(bias_init(rngs.params(), bias_shape, layer.param_dtype))
        if layer.use_bias
        else nnx.data(None)
    )


def _parameters(layer: _Conv) -> tuple[jax.Array, jax.Array | None]:
    return layer.kernel[...], None if layer.bias is None else layer.bias[...]


class ModulatedConv(_Conv):
    """A convolution whose kernel is modulated per output pixel and tap by a known ``d``.

    ``y = modulated_conv2d(x, kernel, d) + bias``; with ``d == 1`` it is ``nnx.Conv``.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from svconv.nnx import ModulatedConv
      >>> layer = ModulatedConv(4, 8, (3, 3), rngs=nnx.Rngs(0))
      >>> layer.kernel.shape, layer.bias.shape
      ((3, 3, 4, 8), (8,))
      >>> x, d = jnp.ones((2, 16, 16, 4)), jnp.ones((16, 16, 3, 3))
      >>> layer(x, d).shape
      (2, 16, 16, 8)

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      kernel_size: ``(kh, kw)`` or an int.
      strides: an int or a pair (default 1).
      padding: ``"SAME"`` (default), ``"VALID"``, an int or ``((top, bottom), (left, right))``,
        as in ``lax.conv_general_dilated``.
      kernel_dilation: an int or a pair (default 1).
      use_bias: whether to add a bias (default True).
      dtype: the dtype of the computation (default: promoted from the inputs and parameters).
      param_dtype: the dtype of the parameters (default float32).
      precision: the ``lax`` precision of the dots.
      kernel_init: initializer of ``kernel [kh, kw, in_features, out_features]``.
      bias_init: initializer of ``bias [out_features]``.
      impl: ``None``/``"auto"``, ``"pallas"``, ``"mosaic"``, ``"triton"``, ``"xla"`` or
        ``"reference"``.
      feature_group_count: as ``nnx.Conv``: the kernel is ``[kh, kw, in_features // groups,
        out_features]`` (see :func:`svconv.modulated_conv2d` for what runs it).
      rngs: the random generators; parameters draw from ``rngs.params()``.

    Raises:
      ValueError: in the constructor, settings that do not fit (a window, stride, padding or
        groups); at call time, inputs of the wrong shape, e.g. channels other than the
        layer's (the message names the argument and prints the shapes). Integer inputs are
        cast to the layer's dtype, as ``nnx.Conv`` casts them.
    """

    feature_group_count: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _layer_math.KERNEL_INIT,
        bias_init: Initializer = _layer_math.BIAS_INIT,
        impl: str | None = None,
        feature_group_count: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        _set_conv_settings(self, in_features, out_features, kernel_size, locals())
        self.feature_group_count = _layer_math.positive_int(
            "feature_group_count", feature_group_count
        )
        shapes = _layer_math.deformable_conv_shapes(
            self.in_features, self.out_features, self.kernel_size, self.feature_group_count
        )
        _create_parameters(self, shapes, kernel_init, bias_init, rngs)

    def __call__(self, x: jax.Array, d: jax.Array) -> jax.Array:
        """Apply the layer.

        Args:
          x: input ``[batch, height, width, in_features]``.
          d: modulation ``[batch, out_height, out_width, kh, kw]``, or ``[out_height, out_width,
            kh, kw]`` shared over the batch (either with a trailing axis of modulation groups).

        Returns:
          ``[batch, out_height, out_width, out_features]``.
        """
        _check_channels(x, self.in_features, "[batch, height, width, in_features]")
        return _layer_math.modulated_conv(self, x, d, *_parameters(self))


class LocalConv(_Conv):
    """Locally connected 2D layer: an unshared kernel per output pixel (``flax.nnx`` has no
    ``ConvLocal``).

    The parameters depend on the output size, so the layer is built for one ``input_size``.
    The kernel is ``[out_h, out_w, kh, kw, in_features, out_features]`` and the bias
    ``[out_h, out_w, out_features]``, like :class:`svconv.LocalConv`'s; a
    ``flax.linen.ConvLocal`` kernel converts with :func:`svconv.from_conv_local_kernel`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from svconv.nnx import LocalConv
      >>> layer = LocalConv(2, 4, (3, 3), input_size=(8, 8), strides=2, rngs=nnx.Rngs(0))
      >>> layer.kernel.shape, layer.bias.shape
      ((4, 4, 3, 3, 2, 4), (4, 4, 4))
      >>> layer(jnp.ones((1, 8, 8, 2))).shape
      (1, 4, 4, 4)

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      kernel_size: ``(kh, kw)`` or an int.
      input_size: ``(height, width)`` (or an int) of the inputs the layer is built for.
      strides, padding, kernel_dilation, use_bias, dtype, param_dtype, precision, impl, rngs:
        as :class:`ModulatedConv`.
      kernel_init: initializer of ``kernel [out_h, out_w, kh, kw, in_features,
        out_features]`` (default: LeCun normal with ``flax.linen.ConvLocal``'s fan-in,
        ``out_h * out_w * kh * kw * in_features``).
      bias_init: initializer of ``bias [out_h, out_w, out_features]``.

    Raises:
      ValueError: in the constructor, settings that do not fit (a window, stride, padding or
        groups); at call time, inputs of the wrong shape, e.g. channels other than the
        layer's (the message names the argument and prints the shapes). Integer inputs are
        cast to the layer's dtype, as ``nnx.Conv`` casts them.
    """

    input_size: tuple[int, int]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        input_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _layer_math.LOCAL_KERNEL_INIT,
        bias_init: Initializer = _layer_math.BIAS_INIT,
        impl: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        _set_conv_settings(self, in_features, out_features, kernel_size, locals())
        self.input_size = _checks.pair("input_size", input_size)
        shapes = _layer_math.local_conv_shapes(
            self.input_size,
            self.in_features,
            self.out_features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
        )
        _create_parameters(self, shapes, kernel_init, bias_init, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer.

        Args:
          x: input ``[batch, height, width, in_features]`` with ``(height, width) ==
            input_size``.

        Returns:
          ``[batch, out_height, out_width, out_features]``.
        """
        _check_channels(x, self.in_features, "[batch, height, width, in_features]")
        if tuple(x.shape[1:3]) != self.input_size:
            raise ValueError(
                f"`x` of shape {tuple(x.shape)} is {x.shape[1]}x{x.shape[2]} but the layer was "
                f"built with input_size={self.input_size}"
            )
        return _layer_math.local_conv(self, x, *_parameters(self))


class KernelPredictionFilter(nnx.Module):
    """Kernel-prediction layer (KPN style): predicts a normalised filter per pixel from a guide
    and applies it to the input with :func:`svconv.pixel_filter2d`.

    The logits come from ``predictor``, an ``nnx.Conv`` of the guide with ``kh*kw*groups``
    outputs; a softmax over the taps makes each filter non-negative and sum to 1, so the layer
    starts close to a local average and learns where to keep edges.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from svconv.nnx import KernelPredictionFilter
      >>> layer = KernelPredictionFilter(8, (5, 5), rngs=nnx.Rngs(0))
      >>> layer.predictor.kernel.shape, layer.predictor.bias.shape
      ((3, 3, 8, 25), (25,))
      >>> x, guide = jnp.ones((1, 16, 16, 3)), jnp.ones((1, 16, 16, 8))
      >>> layer(x, guide).shape
      (1, 16, 16, 3)

    Args:
      guide_features: channels of the guide (of ``x`` when no guide is passed).
      kernel_size: ``(kh, kw)`` of the predicted filters.
      groups: filters per pixel; channel ``c`` of ``x`` uses group ``c // (C // groups)``.
      kernel_dilation: dilation of the predicted filters.
      predictor_kernel_size: kernel of the convolution that predicts the logits.
      temperature: the softmax temperature (> 0).
      dtype, param_dtype, precision, kernel_init, bias_init: of the predictor convolution.
      impl: implementation of ``pixel_filter2d``.
      rngs: the random generators; parameters draw from ``rngs.params()``.

    Raises:
      ValueError: in the constructor, settings that do not fit (a window, stride, padding or
        groups); at call time, inputs of the wrong shape, e.g. channels other than the
        layer's (the message names the argument and prints the shapes). Integer inputs are
        cast to the layer's dtype, as ``nnx.Conv`` casts them.
    """

    guide_features: int
    kernel_size: tuple[int, int]
    groups: int
    kernel_dilation: tuple[int, int]
    temperature: float
    dtype: Any
    impl: str | None
    predictor: nnx.Conv

    def __init__(
        self,
        guide_features: int,
        kernel_size: int | Sequence[int],
        *,
        groups: int = 1,
        kernel_dilation: int | Sequence[int] = 1,
        predictor_kernel_size: int | Sequence[int] = 3,
        temperature: float = 1.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _layer_math.KERNEL_INIT,
        bias_init: Initializer = _layer_math.BIAS_INIT,
        impl: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.guide_features = _layer_math.positive_int("guide_features", guide_features)
        self.kernel_size = _layer_math.kernel_size(kernel_size)
        self.groups = _layer_math.positive_int("groups", groups)
        self.kernel_dilation = _checks.pair("kernel_dilation", kernel_dilation)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"`temperature` must be a number, got {temperature!r}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.dtype = dtype
        _checks.impl(impl)
        self.impl = impl
        self.predictor = nnx.Conv(
            self.guide_features,
            _layer_math.predicted_logits(self.kernel_size, self.groups),
            _layer_math.kernel_size(predictor_kernel_size, "predictor_kernel_size"),
            padding="SAME",
            dtype=dtype,
            param_dtype=param_dtype,
            precision=_checks.precision(precision),
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, guide: jax.Array | None = None, *, return_kernels: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Apply the layer.

        Args:
          x: the image to filter ``[batch, height, width, channels]``, ``channels`` divisible
            by ``groups``.
          guide: ``[batch, height, width, guide_features]`` (default ``x``).
          return_kernels: also return the predicted kernels.

        Returns:
          The filtered ``x``, and with ``return_kernels`` the kernels
          ``[batch, height, width, kh, kw, groups]``.
        """
        name = "`x` (the guide when none is passed)" if guide is None else "`guide`"
        guide = _layer_math.guide_for(x, guide)
        if guide.shape[-1] != self.guide_features:
            raise ValueError(
                f"{name} of shape {tuple(guide.shape)} has {guide.shape[-1]} channels but the "
                f"layer was built with guide_features={self.guide_features}"
            )
        y, kernels = _layer_math.filter_with_logits(
            self, x, self.predictor(guide), self.kernel_size
        )
        return (y, kernels) if return_kernels else y


class DeformableConv(_Conv):
    """Modulated deformable convolution (DCNv2): each tap samples the input at a learned offset
    and is scaled by a learned mask, both predicted from the input by ``offset_predictor``.

    ``y = deformable_conv2d(x, kernel, offsets, mask) + bias``. The predictor (an ``nnx.Conv``
    with the layer's window, stride, padding and dilation and ``kh*kw*offset_groups*3``
    outputs, ``None`` with ``predict_offsets=False``) starts at zero: zero offsets and a mask of
    ``sigmoid(0) = 0.5``, DCNv2's initialisation. Offsets (and a mask) passed to the call are
    used instead of the predictor's.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from svconv.nnx import DeformableConv
      >>> layer = DeformableConv(4, 8, (3, 3), offset_groups=2, rngs=nnx.Rngs(0))
      >>> layer.kernel.shape, layer.offset_predictor.kernel.shape
      ((3, 3, 4, 8), (3, 3, 4, 54))
      >>> layer(jnp.ones((2, 16, 16, 4))).shape
      (2, 16, 16, 8)

    ``in_features``, ``out_features``, ``kernel_size``, ``strides``, ``padding``,
    ``kernel_dilation``, ``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
    ``kernel_init``, ``bias_init``, ``impl`` and ``rngs`` are as in :class:`ModulatedConv`.

    Args:
      feature_group_count: as ``nnx.Conv``: the kernel is ``[kh, kw, in // groups, out]``.
      offset_groups: channel groups with their own offsets and mask (dividing ``in_features``).
      use_mask: predict a mask (DCNv2); without it the taps are not scaled (DCNv1).
      predict_offsets: create the predictor (else offsets must be passed to every call).

    Raises:
      ValueError: in the constructor, settings that do not fit (a window, stride, padding or
        groups); at call time, inputs of the wrong shape, e.g. channels other than the
        layer's (the message names the argument and prints the shapes). Integer inputs are
        cast to the layer's dtype, as ``nnx.Conv`` casts them.
    """

    feature_group_count: int
    offset_groups: int
    use_mask: bool
    offset_predictor: nnx.Conv | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        offset_groups: int = 1,
        use_mask: bool = True,
        predict_offsets: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _layer_math.KERNEL_INIT,
        bias_init: Initializer = _layer_math.BIAS_INIT,
        impl: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        _set_conv_settings(self, in_features, out_features, kernel_size, locals())
        self.feature_group_count = _layer_math.positive_int(
            "feature_group_count", feature_group_count
        )
        self.offset_groups = _layer_math.check_offset_groups(offset_groups, self.in_features)
        self.use_mask = use_mask
        shapes = _layer_math.deformable_conv_shapes(
            self.in_features, self.out_features, self.kernel_size, self.feature_group_count
        )
        _create_parameters(self, shapes, kernel_init, bias_init, rngs)
        self.offset_predictor = (
            nnx.Conv(
                self.in_features,
                _layer_math.predicted_sampling(self.kernel_size, self.offset_groups, use_mask),
                self.kernel_size,
                strides=self.strides,
                padding=self.padding,
                kernel_dilation=self.kernel_dilation,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=self.precision,
                kernel_init=_layer_math.ZEROS,
                bias_init=_layer_math.ZEROS,
                rngs=rngs,
            )
            if predict_offsets
            else nnx.data(None)
        )

    def __call__(
        self, x: jax.Array, offsets: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """Apply the layer.

        Args:
          x: input ``[batch, height, width, in_features]``.
          offsets: ``[batch, out_height, out_width, kh, kw, offset_groups, 2]`` (default: the
            predictor's).
          mask: ``[batch, out_height, out_width, kh, kw, offset_groups]`` with ``offsets``
            (None: no mask).

        Returns:
          ``[batch, out_height, out_width, out_features]``.
        """
        _check_channels(x, self.in_features, "[batch, height, width, in_features]")
        _layer_math.check_sampling(offsets, mask)
        if offsets is None:
            if self.offset_predictor is None:
                raise ValueError("the layer was built with predict_offsets=False: pass `offsets`")
            offsets, mask = _layer_math.split_sampling(
                self.offset_predictor(x), self.kernel_size, self.offset_groups, self.use_mask
            )
        return _layer_math.deformable_conv(self, x, offsets, mask, *_parameters(self))


class DeformableFilter(nnx.Module):
    """Deformable aggregation (DCNv3/DCNv4 style): per pixel and channel group, ``kh*kw`` taps
    sampled at predicted offsets and weighted by predicted weights, between an input and an
    output projection.

    ``y = output_projection(deformable_filter2d(input_projection(x), k, offsets))``, with
    ``offsets`` and the logits of ``k`` predicted from ``x`` by ``predictor`` (an ``nnx.Conv``
    of ``predictor_kernel_size``, initialised to zero: zero offsets and, with ``softmax``,
    uniform weights) and ``k`` their softmax over the taps (DCNv3) or the logits themselves
    (``softmax=False``, DCNv4).

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from svconv.nnx import DeformableFilter
      >>> layer = DeformableFilter(8, (3, 3), groups=4, rngs=nnx.Rngs(0))
      >>> layer.predictor.kernel.shape
      (3, 3, 8, 108)
      >>> layer(jnp.ones((1, 16, 16, 8))).shape
      (1, 16, 16, 8)

    ``kernel_size``, ``groups``, ``kernel_dilation``, ``predictor_kernel_size``, ``softmax``,
    ``use_projections``, ``dtype``, ``param_dtype``, ``precision``, ``kernel_init``,
    ``bias_init`` and ``impl`` are as in the linen :class:`svconv.DeformableFilter`.

    Args:
      features: channels of the input and the output.
      rngs: the random generators; parameters draw from ``rngs.params()``.

    Raises:
      ValueError: in the constructor, settings that do not fit (a window, stride, padding or
        groups); at call time, inputs of the wrong shape, e.g. channels other than the
        layer's (the message names the argument and prints the shapes). Integer inputs are
        cast to the layer's dtype, as ``nnx.Conv`` casts them.
    """

    features: int
    kernel_size: tuple[int, int]
    groups: int
    kernel_dilation: tuple[int, int]
    softmax: bool
    dtype: Any
    impl: str | None
    input_projection: nnx.Linear | None
    predictor: nnx.Conv
    output_projection: nnx.Linear | None

    def __init__(
        self,
        features: int,
        kernel_size: int | Sequence[int],
        *,
        groups: int = 1,
        kernel_dilation: int | Sequence[int] = 1,
        predictor_kernel_size: int | Sequence[int] = 3,
        softmax: bool = True,
        use_projections: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _layer_math.KERNEL_INIT,
        bias_init: Initializer = _layer_math.BIAS_INIT,
        impl: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.features = _layer_math.positive_int("features", features)
        self.kernel_size = _layer_math.kernel_size(kernel_size)
        self.groups = _layer_math.check_offset_groups(groups, self.features)
        self.kernel_dilation = _checks.pair("kernel_dilation", kernel_dilation)
        self.softmax = softmax
        self.dtype = dtype
        _checks.impl(impl)
        self.impl = impl
        precision = _checks.precision(precision)
        kh, kw = self.kernel_size

        def dense() -> nnx.Linear:
            return nnx.Linear(
                self.features, self.features, dtype=dtype, param_dtype=param_dtype,
                precision=precision, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
            )  # fmt: skip

        self.input_projection = dense() if use_projections else nnx.data(None)
        self.predictor = nnx.Conv(
            self.features,
            kh * kw * self.groups * 3,
            _layer_math.kernel_size(predictor_kernel_size, "predictor_kernel_size"),
            padding="SAME",
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=_layer_math.ZEROS,
            bias_init=_layer_math.ZEROS,
            rngs=rngs,
        )
        self.output_projection = dense() if use_projections else nnx.data(None)

    def __call__(
        self, x: jax.Array, *, return_sampling: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
        """Apply the layer.

        Args:
          x: ``[batch, height, width, features]``.
          return_sampling: also return the filters ``[batch, height, width, kh, kw, groups]``
            and the offsets ``[batch, height, width, kh, kw, groups, 2]``.

        Returns:
          ``[batch, height, width, features]`` (and the filters and offsets).
        """
        _check_channels(x, self.features, "[batch, height, width, features]")
        v = x if self.input_projection is None else self.input_projection(x)
        y, k, offsets = _layer_math.deformable_filter(self, v, self.predictor(x), self.kernel_size)
        if self.output_projection is not None:
            y = self.output_projection(y)
        return (y, k, offsets) if return_sampling else y
