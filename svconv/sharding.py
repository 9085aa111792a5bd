"""SPMD partitioning of the kernel calls: how every op and gradient runs on a device mesh.

A Pallas kernel is opaque to XLA's partitioner (left alone it would gather its operands onto
every device), and the XLA tap loop would be partitioned op by op. So every kernel call
(:func:`partitioned`) is a ``jax.experimental.custom_partitioning`` op with one rule for all of
them, written in terms of the dimensions each slot carries:

* **batch** (``N``, mesh axes taken from the first sharded batch dimension among the operands):
  every image-like array keeps its batch sharding and each device runs the kernel on its own
  images. Results without a batch dimension (the shared kernel ``w`` of ``modulated``, a
  batch-shared ``d``, the per-location kernel ``w`` of ``local``) are summed over the batch
  shards (``psum``).
* **height** (``H`` of the input, ``Ho`` of the output and of the per-output-pixel arrays ``d``,
  ``k``, local ``w``): when ``H == stride * Ho`` and the shards split ``Ho`` evenly, device ``r``
  owns input rows ``[r*Bi, (r+1)*Bi)`` and output rows ``[r*Bo, (r+1)*Bo)`` with
  ``Bi = stride * Bo``. Its output rows read ``pad_top`` rows above its block and
  ``(kh-1)*dh + 1 - stride - pad_top`` below: only these halo rows are exchanged with the two
  neighbouring devices (``ppermute``; the missing neighbour of the first and last device gives
  the zero padding). Gradients with respect to the input run the transposed exchange: each
  device sends the halo part of its result back to its neighbour, which adds it. The shared
  kernel gradient is also summed over the height shards. A family whose reads are not bounded
  by the window (``Family.bounded``: the deformable family, whose offsets may reach any row) is
  never split in height: its height-sharded operands are gathered.

Anything else falls back to replication, never to a wrong result: width and channel shardings
are dropped (those operands are all-gathered along that dimension), and so is height sharding
when the geometry does not split (``H != stride * Ho``, e.g. ``"VALID"`` padding; a shard count
that does not divide ``Ho``; a halo taller than a shard), as is batch sharding over a mesh axis
that does not divide ``N``.

With ``Auto`` mesh axes XLA's partitioner calls the rule while compiling (Shardy propagates
shardings through the op with :func:`sharding_rule`, then :func:`partitioned`'s ``partition``
callback picks the final shardings and the per-device function). With ``Explicit`` axes the
shardings are known while tracing and the same per-device function runs under ``shard_map``.
``vmap`` never reaches the rule: the primitives' batching rule folds a mapped axis into the
batch (or maps over it) before lowering. Under ``Explicit`` axes the result's sharding is part of
its type, so the primitives' abstract evaluation asks :func:`result_type` for the same plan, and
a cotangent takes its primal's sharding (:func:`like_primal`). A summed gradient in a 16-bit
dtype is rounded per device before the float32 ``psum``, so it can differ from one device's by
about an ulp.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.geometry import Geometry
from svconv._checks import accumulation_dtype

# ``spec`` below is a ``svconv._primitive.Spec``: its ``dims(slot)`` names the dimensions of every
# slot's array ("b" batch, "h"/"w" input and "ho"/"wo" output height and width, ...).


def sharding_rule(spec: Any, mesh: Any, operand_types: Any, result_types: Any) -> tuple:
    """Shardy's einsum-like rule: batch shared by every image-like array, input height tied to
    output height when ``H == stride * Ho``; dimensions absent from the result are reductions."""
    del mesh, operand_types, result_types
    geom: Geometry = spec.geom
    (h, _), (ho, _), (sh, _) = geom.in_size, geom.out_size, geom.stride
    sizes: dict[str, int] = {}
    if not spec.family.bounded:  # its reads may reach any row
        h_token = "h"
    elif h == ho:
        h_token = "ho"
    elif h == sh * ho:
        h_token = "(ho sh)"
        sizes["sh"] = sh
    else:
        h_token = "h"

    def term(slot: str) -> str:
        return " ".join(h_token if d == "h" else d for d in spec.dims(slot))

    rule = ", ".join(term(s) for s in spec.operands) + " -> " + term(spec.target)
    # Shardy wants the reduction factors in order of first appearance.
    operands, result = (
        part.replace("(", " ").replace(")", " ").replace(",", " ").split()
        for part in rule.split("->")
    )
    reductions = tuple(dict.fromkeys(f for f in operands if f not in result))
    options: dict[str, Any] = dict(sizes)
    if reductions:
        options["reduction_factors"] = reductions
    return rule, options


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _size(mesh: Any, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _dim_axes(arg: Any, index: int) -> tuple[str, ...]:
    sharding = arg.sharding
    if not isinstance(sharding, NamedSharding) or index >= len(sharding.spec):
        return ()
    return _axes(sharding.spec[index])


@dataclasses.dataclass(frozen=True)
class Halo:
    """Height split of one call: rows per shard and the halo above/below (``below`` < 0 crops)."""

    axes: tuple[str, ...]
    shards: int
    block_in: int
    block_out: int
    top: int
    below: int


def height_split(geom: Geometry, axes: tuple[str, ...], shards: int) -> Halo | None:
    """The halo exchange that splits ``geom``'s height over the ``shards`` devices of mesh
    ``axes``, or None when the geometry does not split (then height is replicated)."""
    (h, _), (ho, _) = geom.in_size, geom.out_size
    (kh, _), (sh, _), (dh, _) = geom.kernel_size, geom.stride, geom.dilation
    (pt, _), _ = geom.padding
    if h != sh * ho or ho % shards or min(*geom.padding[0]) < 0:
        return None
    block_out = ho // shards
    block_in = sh * block_out
    below = (kh - 1) * dh + 1 - sh - pt
    if pt > block_in or abs(below) > block_in:
        return None
    return Halo(
        axes=axes, shards=shards, block_in=block_in, block_out=block_out, top=pt, below=below
    )


def _local_geometry(geom: Geometry, halo: Halo) -> Geometry:
    """The geometry one shard runs: its extended input rows, no height padding."""
    return dataclasses.replace(
        geom,
        in_size=(halo.block_in + halo.top + halo.below, geom.in_size[1]),
        out_size=(halo.block_out, geom.out_size[1]),
        padding=((0, 0), geom.padding[1]),
    )


def _name(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return axes[0] if len(axes) == 1 else axes


def _shift(v: jax.Array, halo: Halo, step: int) -> jax.Array:
    """Send ``v`` from shard ``r`` to shard ``r + step``; shards with no sender get zeros."""
    perm = [(r, r + step) for r in range(halo.shards) if 0 <= r + step < halo.shards]
    return lax.ppermute(v, _name(halo.axes), perm)


def halo_extend(x: jax.Array, halo: Halo, axis: int = 1) -> jax.Array:
    """``x``'s own rows with ``top`` rows of the shard above and ``below`` of the shard below."""
    parts = []
    if halo.top:
        parts.append(
            _shift(lax.slice_in_dim(x, halo.block_in - halo.top, halo.block_in, axis=axis), halo, 1)
        )
    parts.append(x)
    if halo.below > 0:
        parts.append(_shift(lax.slice_in_dim(x, 0, halo.below, axis=axis), halo, -1))
    out = jnp.concatenate(parts, axis=axis)
    if halo.below < 0:
        out = lax.slice_in_dim(out, 0, out.shape[axis] + halo.below, axis=axis)
    return out


def halo_fold(v: jax.Array, halo: Halo, axis: int = 1) -> jax.Array:
    """Transpose of :func:`halo_extend`: rows that belong to a neighbour are sent there and
    added."""
    if halo.below < 0:
        pad = [(0, 0, 0)] * v.ndim
        pad[axis] = (0, -halo.below, 0)
        v = lax.pad(v, jnp.zeros((), v.dtype), pad)
    top, block = halo.top, halo.block_in
    own = lax.slice_in_dim(v, top, top + block, axis=axis)
    if top:
        recv = _shift(lax.slice_in_dim(v, 0, top, axis=axis), halo, -1)
        own = _add_rows(own, recv, block - top, axis)
    if halo.below > 0:
        recv = _shift(
            lax.slice_in_dim(v, top + block, top + block + halo.below, axis=axis), halo, 1
        )
        own = _add_rows(own, recv, 0, axis)
    return own


def _add_rows(v: jax.Array, rows: jax.Array, start: int, axis: int) -> jax.Array:
    pad = [(0, 0, 0)] * v.ndim
    pad[axis] = (start, v.shape[axis] - start - rows.shape[axis], 0)
    return v + lax.pad(rows, jnp.zeros((), rows.dtype), pad)


def _plan(spec: Any, mesh: Any, arg_shapes: tuple, result_shape: Any):
    """Choose the batch axes and the height split for one call from the propagated shardings."""
    shapes = dict(zip(spec.operands, arg_shapes, strict=True))
    slots = spec.operands
    if result_shape is not None:
        shapes[spec.target] = result_shape
        slots = (*slots, spec.target)

    def first(names: tuple[str, ...], size_of: Callable[[Any, int], int]) -> tuple[str, ...]:
        for slot in slots:
            dims = spec.dims(slot)
            for name in names:
                if name in dims:
                    axes = _dim_axes(shapes[slot], dims.index(name))
                    if axes and size_of(shapes[slot], dims.index(name)) % _size(mesh, axes) == 0:
                        return axes
        return ()

    def dim_size(arg: Any, index: int) -> int:
        return arg.shape[index]

    batch = first(("b",), dim_size)
    height = tuple(a for a in first(("h", "ho"), lambda a, i: 0) if a not in batch)
    if not spec.family.bounded:  # the height is gathered: any row may be read
        height = ()
    halo = height_split(spec.geom, height, _size(mesh, height)) if height else None
    return batch, halo


def _sharding(
    spec: Any, mesh: Any, slot: str, batch: tuple[str, ...], halo: Halo | None
) -> NamedSharding:
    entries: list[str | tuple[str, ...] | None] = []
    for name in spec.dims(slot):
        if name == "b" and batch:
            entries.append(_name(batch))
        elif name in ("h", "ho") and halo is not None:
            entries.append(_name(halo.axes))
        else:
            entries.append(None)
    return NamedSharding(mesh, P(*entries))


def _lowering(
    kernel: Callable[..., jax.Array], spec: Any, mesh: Any, arg_shapes: tuple, result_shape: Any
):
    """The per-shard function of one call and the shardings it takes and gives."""
    batch, halo = _plan(spec, mesh, arg_shapes, result_shape)
    arg_shardings = tuple(_sharding(spec, mesh, s, batch, halo) for s in spec.operands)
    result_sharding = _sharding(spec, mesh, spec.target, batch, halo)
    target_dims = spec.dims(spec.target)
    reduce_axes = () if "b" in target_dims else batch
    if halo is not None and "ho" not in target_dims and "h" not in target_dims:
        reduce_axes += halo.axes
    local_spec = (
        spec if halo is None else dataclasses.replace(spec, geom=_local_geometry(spec.geom, halo))
    )

    def lower(*operands):
        if halo is not None:
            operands = tuple(
                halo_extend(v, halo) if s.rstrip("'") == "x" else v
                for s, v in zip(spec.operands, operands, strict=True)
            )
        out = kernel(local_spec, *operands)
        if halo is not None and spec.target == "x":
            out = halo_fold(out, halo)
        if reduce_axes:
            summed = out.astype(accumulation_dtype(out.dtype))
            out = lax.psum(summed, _name(reduce_axes)).astype(out.dtype)
        return out

    return lower, result_sharding, arg_shardings


def _explicit_mesh(types: Any) -> Any:
    """The mesh of the arrays' shardings when they are part of their types (``Explicit`` mesh
    axes), else None. ``types``: arrays or their abstract values."""
    for t in types:
        # (the abstract values of arrays, which carry a sharding)
        aval = cast(core.ShapedArray, t if isinstance(t, core.AbstractValue) else jax.typeof(t))
        mesh = getattr(aval.sharding, "mesh", None)
        if mesh is not None and mesh.explicit_axes and not mesh.manual_axes:
            return mesh
    return None


def result_type(spec: Any, avals: tuple, shape: tuple[int, ...], dtype: Any) -> Any:
    """The abstract value of one call's result: under ``Explicit`` axes it carries the sharding
    the partitioning gives it; inside ``shard_map`` it varies over the axes its operands vary
    over."""
    mesh = _explicit_mesh(avals)
    if mesh is not None:
        batch, halo = _plan(spec, mesh, avals, None)
        return core.ShapedArray(
            shape, dtype, sharding=_sharding(spec, mesh, spec.target, batch, halo)
        )
    varying = frozenset().union(*(a.mat.varying for a in avals))
    if not varying:
        return core.ShapedArray(shape, dtype)
    return core.ShapedArray(
        shape,
        dtype,
        sharding=NamedSharding(avals[0].sharding.mesh, P()),
        manual_axis_type=core.ManualAxisType(varying=varying),
    )


def like_primal(cotangent: jax.Array, aval: Any) -> jax.Array:
    """Under ``Explicit`` axes a cotangent must carry its primal's sharding; the partitioning can
    leave it sharded differently (e.g. a batch-shared ``d`` sharded over an axis that also splits
    the batch)."""
    if _explicit_mesh((aval,)) is None:
        return cotangent
    want = aval.sharding.spec
    if jax.typeof(cotangent).sharding.spec != want:
        cotangent = jax.sharding.reshard(cotangent, want)
    return cotangent


def _shard_explicit(
    kernel: Callable[..., jax.Array], spec: Any, mesh: Any, operands: tuple[jax.Array, ...]
) -> jax.Array:
    """With ``Explicit`` mesh axes the shardings are known while tracing: the same per-shard
    function runs under ``shard_map``."""
    shapes = tuple(jax.typeof(v) for v in operands)
    lower, result_sharding, arg_shardings = _lowering(kernel, spec, mesh, shapes, None)
    operands = tuple(
        jax.sharding.reshard(v, s.spec) for v, s in zip(operands, arg_shardings, strict=True)
    )
    return jax.shard_map(
        lower,
        mesh=mesh,
        in_specs=tuple(s.spec for s in arg_shardings),
        out_specs=result_sharding.spec,
        check_vma=False,
    )(*operands)


def partitioned(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Wrap ``kernel(spec, *operands)`` (one kernel call on whole arrays) so that it partitions
    over a device mesh as the module docstring describes. Called while lowering."""

    def partition(spec, mesh, arg_shapes, result_shape):
        lower, result_sharding, arg_shardings = _lowering(
            kernel, spec, mesh, arg_shapes, result_shape
        )
        return mesh, lower, result_sharding, arg_shardings

    cp = custom_partitioning(kernel, static_argnums=(0,))
    cp.def_partition(partition, sharding_rule=sharding_rule)

    def call(spec: Any, *operands: jax.Array) -> jax.Array:
        mesh = _explicit_mesh(operands)
        if mesh is not None:
            return _shard_explicit(kernel, spec, mesh, operands)
        return cp(spec, *operands)

    return call
