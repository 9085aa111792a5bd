"""Flax linen layers over the svconv ops, in ``flax.linen.Conv``'s vocabulary.

The modules are thin: parameters here, the math in ``svconv._layer_math`` (shared with the Flax
NNX layers of :mod:`svconv.nnx`) and :mod:`svconv.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svconv import _checks, _layer_math
from svconv._layer_math import Initializer


class _Conv(nn.Module):
    """The attributes of :class:`ModulatedConv` and :class:`LocalConv`, ``nn.Conv``'s."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = _layer_math.KERNEL_INIT
    bias_init: Initializer = _layer_math.BIAS_INIT
    impl: str | None = None

    def _parameters(
        self, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]
    ) -> tuple[jax.Array, jax.Array | None]:
        """The ``kernel`` and (with ``use_bias``) ``bias`` parameters."""
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", self.bias_init, bias_shape, self.param_dtype)


class ModulatedConv(_Conv):
    """A convolution whose kernel is modulated per output pixel and tap by a known ``d``.

    ``y = modulated_conv2d(x, kernel, d) + bias``; with ``d == 1`` it is ``nn.Conv``.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from svconv import ModulatedConv
      >>> layer = ModulatedConv(features=8, kernel_size=(3, 3))
      >>> x, d = jnp.ones((2, 16, 16, 4)), jnp.ones((16, 16, 3, 3))
      >>> params = layer.init(jax.random.key(0), x, d)
      >>> jax.tree.map(jnp.shape, params)
      {'params': {'bias': (8,), 'kernel': (3, 3, 4, 8)}}
      >>> layer.apply(params, x, d).shape
      (2, 16, 16, 8)

    Attributes:
      features: number of output channels.
      kernel_size: ``(kh, kw)`` or an int.
      strides, padding, kernel_dilation: as ``nn.Conv`` (``padding``: ``"SAME"``, ``"VALID"``,
        int or ``((top, bottom), (left, right))``).
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Conv``.
      impl: ``None``/``"auto"``, ``"pallas"``, ``"mosaic"``, ``"triton"``, ``"xla"`` or
        ``"reference"``.
      feature_group_count: as ``nn.Conv``: the kernel is ``[kh, kw, in // groups, features]``
        (with groups, or a ``d`` with modulation groups, the op runs the deformable family's
        kernels: see :func:`svconv.modulated_conv2d`).

    Raises:
      ValueError: when the layer is initialised or applied: settings that do not fit (a window,
        stride, padding or groups that the input cannot take) or inputs of the wrong shape
        (the message names the attribute or argument and prints the shapes). Integer inputs
        are cast to the layer's dtype, as ``nn.Conv`` casts them.
    """

    feature_group_count: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, d: jax.Array) -> jax.Array:
        """``x [batch, height, width, in]``, ``d [batch, out_h, out_w, kh, kw(, groups)]`` or
        shared ``[out_h, out_w, kh, kw(, groups)]`` -> ``[batch, out_h, out_w, features]``."""
        kernel_shape, bias_shape = _layer_math.deformable_conv_shapes(
            x.shape[-1], self.features, _layer_math.kernel_size(self.kernel_size),
            self.feature_group_count,
        )  # fmt: skip
        return _layer_math.modulated_conv(self, x, d, *self._parameters(kernel_shape, bias_shape))


class LocalConv(_Conv):
    """Locally connected 2D layer: an unshared kernel per output pixel.

    Same numbers as ``nn.ConvLocal`` given the same weights (convert its kernel with
    :func:`from_conv_local_kernel`); the kernel is stored as ``[out_h, out_w, kh, kw, in,
    features]`` and the bias as ``[out_h, out_w, features]``, like ``nn.ConvLocal``'s.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from svconv import LocalConv
      >>> layer = LocalConv(features=4, kernel_size=(3, 3), strides=2)
      >>> params = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
      >>> jax.tree.map(jnp.shape, params)
      {'params': {'bias': (4, 4, 4), 'kernel': (4, 4, 3, 3, 2, 4)}}

    Attributes: as :class:`ModulatedConv`.

    Raises:
      ValueError: when the layer is initialised or applied: settings that do not fit (a window,
        stride, padding or groups that the input cannot take) or inputs of the wrong shape
        (the message names the attribute or argument and prints the shapes). Integer inputs
        are cast to the layer's dtype, as ``nn.Conv`` casts them.
    """

    kernel_init: Initializer = _layer_math.LOCAL_KERNEL_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [batch, height, width, in]`` -> ``[batch, out_h, out_w, features]``."""
        _checks.rank("x", x, (4,), "[batch, height, width, in_channels]")
        kernel_shape, bias_shape = _layer_math.local_conv_shapes(
            x.shape[1:3],
            x.shape[-1],
            self.features,
            _layer_math.kernel_size(self.kernel_size),
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
        )
        return _layer_math.local_conv(self, x, *self._parameters(kernel_shape, bias_shape))


def from_conv_local_kernel(kernel: jax.Array, kernel_size: int | Sequence[int]) -> jax.Array:
    """Convert an ``nn.ConvLocal`` / ``lax.conv_general_dilated_local`` kernel to
    :func:`svconv.local_conv2d`'s layout.

    Args:
      kernel: ``[out_h, out_w, in * kh * kw, features]``, the patch features ordered
        ``(in, kh, kw)`` as ``lax.conv_general_dilated_patches`` gives them.
      kernel_size: ``kh`` (square) or ``(kh, kw)``.

    Returns:
      ``[out_h, out_w, kh, kw, in, features]`` in ``kernel``'s dtype (a transpose: no
      arithmetic).

    Raises:
      ValueError: a ``kernel`` of another rank, or whose third dimension is not a multiple of
        ``kh * kw``.
    """
    kh, kw = _layer_math.kernel_size(kernel_size)
    kernel = jnp.asarray(kernel)
    _checks.rank("kernel", kernel, (4,), "[out_h, out_w, in * kh * kw, features]")
    ho, wo, k, f = kernel.shape
    if k % (kh * kw):
        raise ValueError(
            f"`kernel` of shape {tuple(kernel.shape)} does not hold "
            f"{kh}x{kw} taps per input channel"
        )
    return kernel.reshape(ho, wo, k // (kh * kw), kh, kw, f).transpose(0, 1, 3, 4, 2, 5)


class KernelPredictionFilter(nn.Module):
    """Kernel-prediction layer (KPN style): predicts a normalised filter per pixel from a guide
    and applies it to the input with :func:`svconv.pixel_filter2d`.

    The logits come from a ``predictor_kernel_size`` convolution of the guide with
    ``kh*kw*groups`` outputs; a softmax over the taps makes each filter non-negative and sum to
    1, so the layer starts close to a local average and learns where to keep edges.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from svconv import KernelPredictionFilter
      >>> layer = KernelPredictionFilter(kernel_size=(5, 5))
      >>> x, guide = jnp.ones((1, 16, 16, 3)), jnp.ones((1, 16, 16, 8))
      >>> params = layer.init(jax.random.key(0), x, guide)
      >>> jax.tree.map(jnp.shape, params)
      {'params': {'predictor': {'bias': (25,), 'kernel': (3, 3, 8, 25)}}}
      >>> layer.apply(params, x, guide).shape
      (1, 16, 16, 3)

    Attributes:
      kernel_size: ``(kh, kw)`` of the predicted filters.
      groups: filters per pixel; channel ``c`` of ``x`` uses group ``c // (C // groups)``.
      kernel_dilation: dilation of the predicted filters.
      predictor_kernel_size: kernel of the convolution that predicts the logits.
      temperature: the softmax temperature.
      dtype, param_dtype, precision, kernel_init, bias_init: of the predictor convolution.
      impl: implementation of ``pixel_filter2d``.

    Raises:
      ValueError: when the layer is initialised or applied: settings that do not fit (a window,
        stride, padding or groups that the input cannot take) or inputs of the wrong shape
        (the message names the attribute or argument and prints the shapes). Integer inputs
        are cast to the layer's dtype, as ``nn.Conv`` casts them.
    """

    kernel_size: int | Sequence[int]
    groups: int = 1
    kernel_dilation: int | Sequence[int] = 1
    predictor_kernel_size: int | Sequence[int] = 3
    temperature: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = _layer_math.KERNEL_INIT
    bias_init: Initializer = _layer_math.BIAS_INIT
    impl: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, guide: jax.Array | None = None, *, return_kernels: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``x [batch, h, w, channels]``, ``guide [batch, h, w, features]`` (default ``x``) ->
        the filtered ``x`` (and the kernels ``[batch, h, w, kh, kw, groups]`` when asked)."""
        guide = _layer_math.guide_for(x, guide)
        size = _layer_math.kernel_size(self.kernel_size)
        logits = nn.Conv(
            _layer_math.predicted_logits(size, self.groups),
            _layer_math.kernel_size(self.predictor_kernel_size, "predictor_kernel_size"),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="predictor",
        )(guide)
        y, kernels = _layer_math.filter_with_logits(self, x, logits, size)
        return (y, kernels) if return_kernels else y


class DeformableConv(_Conv):
    """Modulated deformable convolution (DCNv2): each tap samples the input at a learned offset
    and is scaled by a learned mask, both predicted from the input by a convolution.

    ``y = deformable_conv2d(x, kernel, offsets, mask) + bias``. The predictor
    (``offset_predictor``, an ``nn.Conv`` with the layer's window, stride, padding and dilation
    and ``kh*kw*offset_groups*3`` outputs) starts at zero: zero offsets and a mask of
    ``sigmoid(0) = 0.5``, DCNv2's initialisation. Offsets (and a mask) passed to the call are
    used instead, and the predictor is not created.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from svconv import DeformableConv
      >>> layer = DeformableConv(features=8, kernel_size=(3, 3), offset_groups=2)
      >>> x = jnp.ones((2, 16, 16, 4))
      >>> params = layer.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, params)  # doctest: +NORMALIZE_WHITESPACE
      {'params': {'bias': (8,), 'kernel': (3, 3, 4, 8),
                  'offset_predictor': {'bias': (54,), 'kernel': (3, 3, 4, 54)}}}
      >>> layer.apply(params, x).shape
      (2, 16, 16, 8)

    Attributes:
      features, kernel_size, strides, padding, kernel_dilation, use_bias, dtype, param_dtype,
        precision, kernel_init, bias_init, impl: as :class:`ModulatedConv`.
      feature_group_count: as ``nn.Conv``: the kernel is ``[kh, kw, in // groups, features]``.
      offset_groups: channel groups with their own offsets and mask (dividing the input
        channels).
      use_mask: predict a mask (DCNv2); without it the taps are not scaled (DCNv1).

    Raises:
      ValueError: when the layer is initialised or applied: settings that do not fit (a window,
        stride, padding or groups that the input cannot take) or inputs of the wrong shape
        (the message names the attribute or argument and prints the shapes). Integer inputs
        are cast to the layer's dtype, as ``nn.Conv`` casts them.
    """

    feature_group_count: int = 1
    offset_groups: int = 1
    use_mask: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, offsets: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """``x [batch, height, width, in]`` (with ``offsets [batch, out_h, out_w, kh, kw,
        offset_groups, 2]`` and ``mask [batch, out_h, out_w, kh, kw, offset_groups]`` when
        given) -> ``[batch, out_h, out_w, features]``."""
        _checks.rank("x", x, (4,), "[batch, height, width, in_channels]")
        size = _layer_math.kernel_size(self.kernel_size)
        groups = _layer_math.check_offset_groups(self.offset_groups, x.shape[-1])
        _layer_math.check_sampling(offsets, mask)
        if offsets is None:
            predicted = nn.Conv(
                _layer_math.predicted_sampling(size, groups, self.use_mask),
                size,
                strides=self.strides,
                padding=self.padding,
                kernel_dilation=self.kernel_dilation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=_layer_math.ZEROS,
                bias_init=_layer_math.ZEROS,
                name="offset_predictor",
            )(x)
            offsets, mask = _layer_math.split_sampling(predicted, size, groups, self.use_mask)
        kernel_shape, bias_shape = _layer_math.deformable_conv_shapes(
            x.shape[-1], self.features, size, self.feature_group_count
        )
        params = self._parameters(kernel_shape, bias_shape)
        return _layer_math.deformable_conv(self, x, offsets, mask, *params)


class DeformableFilter(nn.Module):
    """Deformable aggregation (DCNv3/DCNv4 style): per pixel and channel group, ``kh*kw`` taps
    sampled at predicted offsets and weighted by predicted weights, between an input and an
    output projection.

    ``y = output_projection(deformable_filter2d(input_projection(x), k, offsets))``, with
    ``offsets`` and the logits of ``k`` predicted from ``x`` by ``predictor`` (an ``nn.Conv``
    of ``predictor_kernel_size``, initialised to zero: zero offsets and, with ``softmax``,
    uniform weights) and ``k`` their softmax over the taps (DCNv3) or the logits themselves
    (``softmax=False``, DCNv4).

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from svconv import DeformableFilter
      >>> layer = DeformableFilter(kernel_size=(3, 3), groups=4)
      >>> x = jnp.ones((1, 16, 16, 8))
      >>> params = layer.init(jax.random.key(0), x)
      >>> sorted(params['params'])
      ['input_projection', 'output_projection', 'predictor']
      >>> layer.apply(params, x).shape
      (1, 16, 16, 8)

    Attributes:
      kernel_size: ``(kh, kw)`` of the sampled window.
      groups: channel groups with their own offsets and weights (dividing the channels).
      kernel_dilation: dilation of the window.
      predictor_kernel_size: kernel of the predictor convolution.
      softmax: normalise the weights over the taps (DCNv3), or not (DCNv4).
      use_projections: the input and output projections (``nn.Dense``); without them the layer
        filters ``x`` itself.
      dtype, param_dtype, precision, kernel_init, bias_init: of the projections and the
        predictor (whose kernel and bias start at zero).
      impl: implementation of ``deformable_filter2d``.

    Raises:
      ValueError: when the layer is initialised or applied: settings that do not fit (a window,
        stride, padding or groups that the input cannot take) or inputs of the wrong shape
        (the message names the attribute or argument and prints the shapes). Integer inputs
        are cast to the layer's dtype, as ``nn.Conv`` casts them.
    """

    kernel_size: int | Sequence[int]
    groups: int = 1
    kernel_dilation: int | Sequence[int] = 1
    predictor_kernel_size: int | Sequence[int] = 3
    softmax: bool = True
    use_projections: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = _layer_math.KERNEL_INIT
    bias_init: Initializer = _layer_math.BIAS_INIT
    impl: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, *, return_sampling: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
        """``x [batch, h, w, channels]`` -> ``[batch, h, w, channels]`` (and with
        ``return_sampling`` the filters ``[batch, h, w, kh, kw, groups]`` and offsets
        ``[batch, h, w, kh, kw, groups, 2]``)."""
        _checks.rank("x", x, (4,), "[batch, height, width, channels]")
        size = _layer_math.kernel_size(self.kernel_size)
        channels = x.shape[-1]

        def dense(name):
            return nn.Dense(
                channels, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, kernel_init=self.kernel_init,
                bias_init=self.bias_init, name=name,
            )  # fmt: skip

        v = dense("input_projection")(x) if self.use_projections else x
        predicted = nn.Conv(
            size[0] * size[1] * self.groups * 3,
            _layer_math.kernel_size(self.predictor_kernel_size, "predictor_kernel_size"),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_layer_math.ZEROS,
            bias_init=_layer_math.ZEROS,
            name="predictor",
        )(x)
        y, k, offsets = _layer_math.deformable_filter(self, v, predicted, size)
        if self.use_projections:
            y = dense("output_projection")(y)
        return (y, k, offsets) if return_sampling else y
