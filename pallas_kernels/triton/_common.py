"""Helpers shared by the Pallas (Triton) kernels: sizes, channel tiling, the support check every
family shares, and the index arithmetic of masked-gather kernels (zero padding, strides and
dilation as masks and integer arithmetic on whole-array refs)."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import geometry
from pallas_kernels.geometry import Geometry, KernelCall


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def channel_block(c: int, cap: int) -> int:
    """Largest power-of-2 channel block in [16, cap] that pads `c` by at most 1/8.

    Tiles must have power-of-2 sizes and tensor-core dots want >= 16, so channels are padded to a
    multiple of the block; a smaller block wastes less on counts like 48 or 96.
    """
    block = max(16, min(cap, next_pow2(c)))
    while block > 16 and round_up(c, block) - c > c // 8:
        block //= 2
    return block


def check_tiles(tiles, *, minimum: int, counts: tuple[str, ...] = ("num_stages",)) -> None:
    """Validate a tiling dataclass: the ``counts`` fields >= 1, ``num_warps`` a power of 2, the
    fields declared ``bool`` booleans, every other field (a block size) a power of 2 >=
    ``minimum``."""
    for field in dataclasses.fields(tiles):
        value, name = getattr(tiles, field.name), f"{type(tiles).__name__}.{field.name}"
        if field.type in (bool, "bool"):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        elif field.name in counts:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        elif field.name == "num_warps":
            if not is_pow2(value):
                raise ValueError(f"{name} must be a power of 2, got {value}")
        elif not (is_pow2(value) and value >= minimum):
            raise ValueError(f"{name} must be a power of 2 >= {minimum}, got {value}")


def run(body, operands, call: KernelCall, *, name: str, grid, tiles, out=None, zeroed=False):
    """``body`` as a Pallas (Triton) kernel over ``grid`` on whole-array refs (``pl.ANY``:
    kernels address them with index arrays and masks): its refs are the operands' (None for an
    operand that is None) and the result's. The result is ``call.out_shape`` in the first
    operand's dtype unless ``out`` (a ``jax.ShapeDtypeStruct``) says otherwise; ``tiles`` gives
    ``num_warps`` and ``num_stages``. ``zeroed``: the result starts as zeros (an array of zeros
    aliased to it), for kernels that add into it with atomics."""
    present = [a for a in operands if a is not None]
    out = out or jax.ShapeDtypeStruct(call.out_shape, present[0].dtype)
    # Inside shard_map the result varies over the manual axes its operands vary over.
    out = jax.ShapeDtypeStruct(
        out.shape, out.dtype, manual_axis_type=geometry.manual_axis_type(*present)
    )
    inputs = present
    if zeroed:
        inputs = [*present, geometry.vary_like(jnp.zeros(out.shape, out.dtype), *present)]

    def kernel(*refs):
        rest = list(refs)
        args = [rest.pop(0) if a is not None else None for a in operands]
        if zeroed:
            rest.pop(0)  # the zeros' input ref: the result's ref aliases it
        return body(*args, *rest)

    return pl.pallas_call(
        kernel,
        out_shape=out,
        grid=grid,
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(inputs),
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        input_output_aliases={len(present): 0} if zeroed else {},
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=call.interpret,
        name=f"svconv_{name}",
    )(*inputs)


SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def common_unsupported_reason(shapes, dtype) -> str | None:
    """The checks every kernel family shares: None when they pass, else a one-line reason.
    ``shapes``: the shape of every slot of the family by name."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} is not one of float32, bfloat16, float16"
    # Element offsets are int32: refuse (rather than risk overflow) arrays of 2**31 or more.
    for slot, shape in shapes.items():
        if math.prod(shape) >= 2**31:
            return f"`{slot}` of shape {tuple(shape)} has 2**31 elements or more"
    return None


# ------------------------------------------------------------------------------------------------
# Index helpers of the masked-gather kernels
# ------------------------------------------------------------------------------------------------


def contributing_taps(residue, k: int, stride: int, dilation: int):
    """Taps t with `t * dilation = residue (mod stride)`, as (first, count, step): the taps of a
    strided convolution that reach an output position of the given phase. `residue` is a traced
    int32 in [0, stride); first >= k (and count 0) when no tap does."""
    step = stride // math.gcd(stride, dilation)
    first = jnp.int32(k)
    # Solutions repeat every `step` taps, so the first one (if any) is below `step`.
    for cand in reversed(range(min(k, step))):
        hit = lax.rem(cand * dilation - residue + stride, stride) == 0
        first = jnp.where(hit, cand, first)
    count = lax.div(k - 1 - first + step, step)
    return first, count, step


class PhaseTaps(NamedTuple):
    """The taps of one axis of a strided sweep that reach the input positions of one stride
    phase, ``P * stride + phase``: taps ``first + u * step`` for ``u < count``; tap ``t``
    reaches position ``P * stride + phase`` from output position ``P + offset(t)``."""

    first: Any
    count: Any
    step: int
    offset: Callable[[Any], Any]


def phase_taps(phase, pad: int, k: int, stride: int, dilation: int) -> PhaseTaps:
    """:class:`PhaseTaps` of the input positions ``P * stride + phase`` (``phase`` a traced
    non-negative int32: a stride phase in ``[0, stride)``, or a whole position with ``P = 0``)
    of a sweep with ``k`` taps, ``stride``, ``dilation`` and leading padding ``pad`` (negative:
    a crop). The gather form of every transpose in the input uses it.

    Tap ``t`` reaches input ``p`` from output ``i`` when ``i * stride + t * dilation - pad = p``,
    i.e. ``t * dilation = phase + pad (mod stride)`` and ``i = P + (phase + pad - t * dilation)
    / stride``, an exact division of a number ``>= min(pad, 0) - (k - 1) * dilation``."""
    # `pad % stride` is Python's (non-negative), so the residue's operand is never negative.
    first, count, step = contributing_taps(
        lax.rem(phase + pad % stride, stride), k, stride, dilation
    )
    low = min(pad, 0) - (k - 1) * dilation

    def offset(t):
        return exact_div(phase + pad - t * dilation, stride, low)

    return PhaseTaps(first, count, step, offset)


def phase_loop(rows: PhaseTaps, cols: PhaseTaps, tap, acc):
    """``acc = tap(m, n, acc)`` over the taps ``(m, n)`` of ``rows`` x ``cols``, in two rolled
    loops."""

    def row(u, acc):
        m = rows.first + u * rows.step
        return lax.fori_loop(0, cols.count, lambda t, a: tap(m, cols.first + t * cols.step, a), acc)

    return lax.fori_loop(0, rows.count, row, acc)


def exact_div(num, stride: int, low: int):
    """`num // stride` for traced int32 `num >= low` known to be a multiple of `stride`."""
    bias = stride * pl.cdiv(max(-low, 0), stride)
    return lax.div(num + bias, stride) - bias // stride


def products(first, second, tangents):
    """The ref pairs a bilinear kernel sums the products of: ``(first, second)``, or with the
    tangent refs ``(t_first, t_second)`` (None where a slot has none) the pairs of its tangent
    ``t_first * second + first * t_second``."""
    if not tangents:
        return [(first, second)]
    t_first, t_second = tangents
    pairs = ((t_first, second), (first, t_second))
    return [(a, c) for a, c in pairs if a is not None and c is not None]


def split(pid, inner: int):
    """A flat program id as ``(pid // inner, pid % inner)``."""
    return lax.div(pid, inner), lax.rem(pid, inner)


def inside(r, q, h: int, w: int):
    """Whether positions ``(r, q)`` lie in an ``h x w`` image."""
    return (r >= 0) & (r < h) & (q >= 0) & (q < w)


# L2 eviction hints: KEEP the tiles that neighbouring taps and tiles read again (inputs with
# halos, incoming gradients); STREAM what one program alone reads (local conv's weights), so it
# does not evict them.
KEEP, STREAM = "evict_last", "evict_first"


def gather(view, mask, policy: str | None = None):
    """The elements of ``view`` (a ref indexed with index arrays) where ``mask`` holds, zero
    elsewhere (a masked Triton load); ``mask=None``: every element, no bounds test (the caller
    knows they are all inside). ``policy``: ``KEEP``, ``STREAM`` or the default."""
    if mask is None:
        return plt.load(view, eviction_policy=policy)
    return plt.load(view, mask=mask, other=0.0, eviction_policy=policy)


def sweep(g: Geometry):
    """``(kh, kw), (sh, sw), (dh, dw), (pad_top, pad_left)`` of a geometry, for index arithmetic."""
    return g.kernel_size, g.stride, g.dilation, (g.padding[0][0], g.padding[1][0])
