"""Per-pixel filters on Mosaic GPU: the forward and its fused tangent.

Shapes (NHWC): x [N, H, W, C], k [N, Ho, Wo, kh, kw, G], y [N, Ho, Wo, C]; channel ``c`` uses
group ``c // (C / G)``. ``y[b,i,j,c] = sum_{m,n} x[b, i*sh + m*dh - pt, j + n*dw - pl, c] *
k[b,i,j,m,n,g(c)]``, accumulated in float32. The sweep (:mod:`._sweep`) brings every input row
into shared memory once; a tap's weights are one ``[64]`` vector per output row.

The gradients (the splat in ``x``, the correlation in ``k``) are not written for this backend
yet: their results are indexed by the source pixel or by the tap, which the sweep's row
layout does not give; the Triton kernels run them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw

_KERNELS = ("y",)  # the partials this backend computes (the op's own, with its tangent)


def _out_bytes(out_itemsize: int):
    return lambda cb: 2 * sw.STRIP * cb * out_itemsize


def unsupported_reason(
    partial: str, geom: Geometry, shapes, dtype, *, tangents: bool
) -> str | None:
    """Why the Mosaic kernels cannot compute ``partial`` (the target slot) of this case, or
    None. ``shapes``: every slot's shape by name."""
    if partial not in _KERNELS:
        return f"no Mosaic kernel for the gradient in `{partial}` yet"
    channels, groups = shapes["x"][3], shapes["k"][-1]
    return sw.unsupported_reason(
        geom, channels, groups, dtype, _out_bytes(jnp.dtype(dtype).itemsize), 2 if tangents else 1
    )


def tiles(geom: Geometry, *, batch: int, channels: int, groups: int, dtype, images: int = 1,
          sm_count: int = 132) -> sw.SweepTiles:  # fmt: skip
    """The heuristic's tiles for the filter of ``images`` input-grid arrays (2: with tangent)."""
    out = _out_bytes(jnp.dtype(dtype).itemsize)
    return sw.sweep_tiles(
        geom, batch=batch, channels=channels, groups=groups, dtype=dtype, out_bytes=out,
        images=images, sm_count=sm_count,
    )  # fmt: skip


def _body(*refs, layout: sw.Layout, channels: int, groups: int, pairs: tuple):
    """``pairs``: per product, (image index in the ring, weight ref index) of ``image * weight``
    summed (one pair for the filter, two for its tangent ``tx * k + x * tk``)."""
    n_in = len(refs) - 4
    operands, (out_ref, bufs, bars, obuf) = refs[:n_in], refs[n_in:]
    images, weights = operands[: layout.images], operands[layout.images :]
    (kh, kw), cb = layout.geom.kernel_size, layout.tiles.block_channels
    prog = sw.program(layout)
    ring = sw.Ring(layout, prog, images, bufs, bars)
    group = prog.c0 // (channels // groups)

    def compute(i):
        # A loop over the window's rows, its columns unrolled (compile time flat in kh).
        def tap_row(m, acc):
            for n in range(kw):
                tap = (m * kw + n) * groups + group
                for image, weight in pairs:
                    kv = sw.pixel_row(weights[weight], prog.b, i, prog.j0, tap)
                    xv = ring.window(image, i, m, n).astype(jnp.float32)
                    acc = acc + xv * kv[:, None]
            return acc

        return lax.fori_loop(0, kh, tap_row, sw.zeros_tile(cb))

    def store(i, value, u):
        sw.store_tile(out_ref, obuf, prog, i, value, u, cb)

    sw.sweep(layout, prog, ring, compute, store)


def _filter(images, weights, pairs, call: KernelCall, name: str) -> jax.Array:
    n, ho, wo, c = call.out_shape
    groups = weights[0].shape[-1]
    geom, dtype = call.geom, images[0].dtype
    bs = call.block_sizes or tiles(
        geom, batch=n, channels=c, groups=groups, dtype=dtype, images=len(images)
    )
    layout = sw.plan(geom, bs, len(images), dtype, per_group=c // groups)
    # The weights as [N, Ho, Wo, taps * G]: one index per (tap, group).
    flat = [w.reshape(n, ho, wo, -1) for w in weights]
    body = functools.partial(_body, layout=layout, channels=c, groups=groups, pairs=pairs)
    out = jax.ShapeDtypeStruct(call.out_shape, dtype)
    staging = plgpu.SMEM((2, sw.STRIP, bs.block_channels), dtype)
    return sw.run(
        body, (*images, *flat), out, layout, call, name=name, batch=n, channels=c,
        out_scratch=staging,
    )  # fmt: skip


def forward(x: jax.Array, k: jax.Array, call: KernelCall) -> jax.Array:
    """The per-pixel filter: x [N, H, W, C], k [N, Ho, Wo, kh, kw, G] -> [N, Ho, Wo, C]."""
    return _filter([x], [k], ((0, 0),), call, "pixel_forward_mosaic")


def forward_jvp(x, k, tx, tk, call: KernelCall) -> jax.Array:
    """The filter's tangent ``filter(tx, k) + filter(x, tk)`` (either tangent None), in one
    kernel."""
    if tx is None:
        return _filter([x], [tk], ((0, 0),), call, "pixel_forward_jvp_mosaic")
    if tk is None:
        return _filter([tx], [k], ((0, 0),), call, "pixel_forward_jvp_mosaic")
    return _filter([x, tx], [k, tk], ((1, 0), (0, 1)), call, "pixel_forward_jvp_mosaic")
