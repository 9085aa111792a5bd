"""The geometry of one 2-D window sweep, shared by the kernels and the public package.

For output pixel ``(i, j)`` and tap ``(m, n)`` the input position is
``(i*sh + m*dh - pad_top, j*sw + n*dw - pad_left)``; outside the input it reads zero. Negative
padding crops, as in ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]


def out_size(size: int, kernel: int, stride: int, dilation: int, pad: Pair) -> int:
    """Output length along one axis (``lax.conv_general_dilated``'s)."""
    return (size + pad[0] + pad[1] - (kernel - 1) * dilation - 1) // stride + 1


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static, normalised geometry (hashable: part of the key of every compiled kernel).

    Attributes:
      in_size: ``(H, W)`` of the input.
      out_size: ``(Ho, Wo)`` of the output.
      kernel_size: ``(kh, kw)``.
      stride: ``(sh, sw)``.
      dilation: ``(dh, dw)``.
      padding: ``((top, bottom), (left, right))``; negative values crop.
    """

    in_size: Pair
    out_size: Pair
    kernel_size: Pair
    stride: Pair
    dilation: Pair
    padding: Padding

    @classmethod
    def of(
        cls,
        in_size: Sequence[int],
        kernel_size: Sequence[int],
        stride: Sequence[int],
        dilation: Sequence[int],
        padding: Padding,
    ) -> Geometry:
        """The geometry of an input of ``in_size`` (its output size computed as lax does)."""
        out = tuple(
            out_size(*axis)
            for axis in zip(in_size, kernel_size, stride, dilation, padding, strict=True)
        )
        # Pairs: the zip is strict and ``padding`` has two axes.
        return cls(
            cast(Pair, tuple(in_size)),
            cast(Pair, out),
            cast(Pair, tuple(kernel_size)),
            cast(Pair, tuple(stride)),
            cast(Pair, tuple(dilation)),
            padding,
        )

    @property
    def num_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """What one kernel call computes, besides its arrays (hashable, static).

    Every kernel of every family, Pallas or XLA, takes the arrays of its operands and one of
    these: ``kernel(*operands, call)``.

    Attributes:
      geom: the window geometry.
      out_shape: the shape of the result.
      precision: ``lax`` precision of the dots (families with dots).
      moments: powers of the tap features that weight the taps (families with parameters).
      method: the family's static variant (the product family's ``"direct"`` or ``"fft"``).
      block_sizes: Pallas tiling, or None for the family's heuristic (Pallas kernels).
      interpret: run in Pallas's interpreter instead of compiling (Pallas kernels).
    """

    geom: Geometry
    out_shape: tuple[int, ...]
    precision: Any = None
    moments: tuple[int, ...] = ()
    method: str | None = None
    block_sizes: Any = None
    interpret: bool = False


def after(value: jax.Array, *earlier: jax.Array) -> jax.Array:
    """``value`` (the same numbers), computed only once ``earlier`` are: a data dependency on
    each (its largest real part: a reduction, which stays local to each device, with a scalar
    all-reduce, where the arrays are sharded), added as an exact zero (NaN and infinity
    included), which XLA cannot fold away. (``lax.optimization_barrier`` orders nothing at run
    time: XLA:CPU drops it before its thunks are scheduled.)"""
    zero = None
    for e in earlier:
        if e.size == 0:
            continue
        s = jnp.max(jnp.real(e) if jnp.iscomplexobj(e) else e)
        s = jnp.clip(jnp.where(jnp.isnan(s), 0, s), -1, 1).astype(jnp.float32) * 0
        zero = s if zero is None else zero + s
    if zero is None or value.size == 0:
        return value
    return value + zero.astype(value.dtype)


def varying_axes(*arrays: Any) -> frozenset[Any]:
    """The manual mesh axes (inside ``jax.shard_map`` with ``check_vma=True``) over which any of
    ``arrays`` varies; empty outside ``shard_map``. ``None`` entries are skipped."""
    axes: frozenset[Any] = frozenset()
    for a in arrays:
        if a is not None:
            axes |= jax.typeof(a).manual_axis_type.varying
    return axes


def vary_like(value: jax.Array, *arrays: Any) -> jax.Array:
    """``value`` cast to vary over every manual axis that ``arrays`` vary over. Inside
    ``shard_map`` a fresh array (a loop's initial carry, a kernel's zeros) is invariant, while
    what is computed from the operands varies with them; loop carries and results must carry the
    operands' type."""
    missing = varying_axes(*arrays) - varying_axes(value)
    if not missing:
        return value
    return lax.pcast(value, tuple(sorted(missing)), to="varying")


def match_varying(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` cast to vary over the same manual axes, the union of theirs (as JAX does for the
    operands of its own primitives: a replicated weight used with a batch-split image becomes
    varying, and the transpose of that cast sums its cotangent over the axis)."""
    return tuple(vary_like(a, *arrays) for a in arrays)


def manual_axis_type(*arrays: Any) -> jax.sharding.ManualAxisType:
    """The manual axis type of a result computed from ``arrays`` (a ``pallas_call``'s output
    inside ``shard_map``)."""
    return jax.sharding.ManualAxisType(varying=varying_axes(*arrays))
