"""Argument normalisation shared by every public op: one path from user arguments to a
:class:`~pallas_kernels.geometry.Geometry`, with errors raised at trace time that name the
argument and print the offending shape or value."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.geometry import Geometry, Padding, Pair

IMPLS = (None, "auto", "pallas", "mosaic", "triton", "xla", "reference")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {value!r}") from None


def pair(name: str, value: Any, *, minimum: int = 1) -> Pair:
    """An int or a pair of ints -> a pair of ints, each >= ``minimum``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}")
        out = (_int(name, value[0]), _int(name, value[1]))
    else:
        v = _int(name, value)
        out = (v, v)
    if min(out) < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return out


def groups(name: str, value: Any, channels: int, what: str) -> int:
    """A group count: an int >= 1 dividing ``channels`` (``what`` says whose)."""
    g = _int(name, value)
    if g < 1 or channels % g:
        raise ValueError(f"`{name}` {value!r} must be >= 1 and divide the {channels} {what}")
    return g


def padding_pairs(
    padding: Any, in_size: Sequence[int], kernel_size: Sequence[int], stride: Pair, dilation: Pair
) -> Padding:
    """``"SAME"``/``"VALID"``/int/``((top, bottom), (left, right))`` -> explicit pads.

    Strings follow ``lax.conv_general_dilated`` exactly (including ``"SAME_LOWER"``); negative
    explicit pads crop, as there.
    """
    if isinstance(padding, str):
        name = padding.upper()
        if name not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"`padding` must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)), "
                f"got {padding!r}"
            )
        effective = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True))
        pads = lax.padtype_to_pads(in_size, effective, stride, name)
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    if isinstance(padding, Sequence):
        ok = len(padding) == 2 and all(
            isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in padding
        )
        if not ok:
            raise ValueError(
                "`padding` must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)), "
                f"got {padding!r}"
            )
        out = tuple((_int("padding", lo), _int("padding", hi)) for lo, hi in padding)
    else:
        p = _int("padding", padding)
        out = ((p, p), (p, p))
    return out  # type: ignore[return-value]


def geometry(
    in_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Any,
    padding: Any,
    dilation: Any,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Geometry:
    """Normalise stride/dilation/padding and compute the output size, as lax does.

    ``shapes`` (argument name -> shape) are printed when the kernel does not fit the input.
    """
    stride = pair("stride", stride)
    dilation = pair("dilation", dilation)
    pads = padding_pairs(padding, in_size, kernel_size, stride, dilation)
    geom = Geometry.of(tuple(in_size), tuple(kernel_size), stride, dilation, pads)
    for axis, dim in enumerate(("height", "width")):
        if geom.out_size[axis] < 1:
            k, d, (lo, hi) = kernel_size[axis], dilation[axis], pads[axis]
            arrays = ", ".join(f"`{n}` of shape {tuple(s)}" for n, s in (shapes or {}).items())
            raise ValueError(
                f"kernel {dim} {k} with dilation {d} spans {(k - 1) * d + 1} pixels, more than "
                f"the padded input {dim} {in_size[axis] + lo + hi} (input {in_size[axis]}, "
                f"padding {(lo, hi)}): {arrays}"
            )
    return geom


def float_array(name: str, value: Any) -> jax.Array:
    """An array of a real floating dtype; integer, bool and complex inputs are a TypeError."""
    return _array(name, value, jnp.floating, "a floating dtype (float32, bfloat16, float16, ...)")


def inexact_array(name: str, value: Any) -> jax.Array:
    """An array of a floating or complex dtype; integer and bool inputs are a TypeError."""
    return _array(name, value, jnp.inexact, "a floating or complex dtype (float32, complex64, ...)")


def _array(name: str, value: Any, kind: Any, wanted: str) -> jax.Array:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        value = jnp.asarray(value)
        dtype = value.dtype
    if not jnp.issubdtype(dtype, kind):
        shape = tuple(np.shape(value))
        raise TypeError(f"`{name}` must have {wanted}, got {np.dtype(dtype).name} of shape {shape}")
    return jnp.asarray(value)


def accumulation_dtype(dtype: Any) -> np.dtype:
    """Sums are taken in float32 for 16-bit inputs, else in the inputs' own precision (float64,
    complex64, complex128: a complex sum keeps its imaginary part)."""
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def rank(name: str, value: jax.Array, ranks: Sequence[int], layout: str) -> None:
    if value.ndim not in ranks:
        raise ValueError(
            f"`{name}` must be {layout}, got rank {value.ndim} with shape {tuple(value.shape)}"
        )


def shape(name: str, value: jax.Array, expected: tuple[int, ...], layout: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` of shape {tuple(value.shape)} where {tuple(expected)} was expected "
            f"({layout})"
        )


def impl(value: Any) -> str:
    if value not in IMPLS:
        raise ValueError(
            "`impl` must be one of None, 'auto', 'pallas', 'mosaic', 'triton', 'xla', "
            f"'reference'; got {value!r}"
        )
    return "auto" if value is None else value


def precision(value: Any) -> Any:
    """Accept what ``lax.dot_general`` accepts: None, a ``Precision`` or its name, a pair of
    those, or a ``DotAlgorithmPreset``."""
    parts = value if isinstance(value, tuple) and len(value) == 2 else (value,)
    for part in parts:
        if part is None or isinstance(part, (lax.Precision, lax.DotAlgorithmPreset)):
            continue
        if isinstance(part, str):
            try:
                lax.Precision(part)
                continue
            except ValueError:
                pass
        raise ValueError(f"`precision` is not a valid lax precision: {value!r}")
    return value
