"""Per-pixel filters on Mosaic GPU: the forward, the splat (its transpose in ``x``), both
fused tangents, and the gradient in ``k``.

Shapes (NHWC): x [N, H, W, C], k [N, Ho, Wo, kh, kw, G], y [N, Ho, Wo, C]; channel ``c`` uses
group ``c // (C / G)``. ``y[b,i,j,c] = sum_{m,n} x[b, i*sh + m*dh - pt, j + n*dw - pl, c] *
k[b,i,j,m,n,g(c)]``, accumulated in float32. The sweep (:mod:`._sweep`) brings every input row
into shared memory once; a tap's weights are one ``[64]`` vector per output row.

* The splat ``dx[p] = sum_{q, tap: q + tap - pad = p} dy[q] k[q, tap]`` (stride 1) is the sweep
  of the transposed geometry (:func:`._sweep.transposed`): the rows of ``dy`` through the ring,
  the flipped taps; the weights of a tap's source pixels lie at a column shift, so each tap row's
  weights pass through shared memory (:class:`._sweep.Staged`).
* The gradient in ``k``, ``dk[q, tap, g] = sum_{c in g} x[q + tap - pad, c] dy[q, c]``, is the
  forward's sweep with ``dy``'s tile loaded once a row, each tap's ``[64]`` sums stored to
  ``dk`` directly (its rows are ``kh * kw * G`` elements, no TMA stride); a group wider than a
  program's channels gives float32 partial sums, added after the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw


def _out_bytes(out_itemsize: int, staged: int = 0):
    """The output staging buffers' bytes and ``staged`` per-pixel planes (the splat's)."""
    return lambda cb: 2 * sw.STRIP * cb * out_itemsize + sw.staged_bytes(staged)


def _splat_planes(kw: int, tangents: bool) -> int:
    return kw * (2 if tangents else 1)


def unsupported_reason(
    partial: str, geom: Geometry, shapes, dtype, *, tangents: bool, precision=None
) -> str | None:
    """Why the Mosaic kernels cannot compute ``partial`` (the target slot: ``y`` the filter,
    ``x`` the splat, ``k`` the gradient in the weights) of this case, or None. ``shapes``: every
    slot's shape by name. ``precision``: no dots here, unused."""
    del precision
    channels, groups = shapes["x"][3], shapes["k"][-1]
    itemsize = jnp.dtype(dtype).itemsize
    images = 2 if tangents else 1
    if partial == "y":
        return sw.unsupported_reason(geom, channels, groups, dtype, _out_bytes(itemsize), images)
    if partial == "x":
        out = _out_bytes(itemsize, _splat_planes(geom.kernel_size[1], tangents))

        def check(t: Geometry) -> str | None:
            return sw.unsupported_reason(t, channels, groups, dtype, out, images)

        return sw.splat_unsupported_reason(geom, check)
    if partial == "k":
        return sw.unsupported_reason(geom, channels, groups, dtype, lambda cb: 0, 1)
    raise ValueError(f"no partial `{partial}` in the per-pixel family")


def tiles(geom: Geometry, *, batch: int, channels: int, groups: int, dtype, images: int = 1,
          partial: str = "y", sm_count: int = 132) -> sw.SweepTiles:  # fmt: skip
    """The heuristic's tiles for ``partial`` with ``images`` input-grid arrays (2: with
    tangent); ``geom`` the forward's geometry. The gradient in ``k`` takes the most channels
    that fit (each channel block of a group adds a partial sum)."""
    itemsize = jnp.dtype(dtype).itemsize
    out = _out_bytes(itemsize)
    if partial == "x":
        out = _out_bytes(itemsize, _splat_planes(geom.kernel_size[1], images > 1))
        geom = sw.transposed(geom)
    elif partial == "k":
        out = lambda cb: 0  # noqa: E731
    return sw.sweep_tiles(
        geom, batch=batch, channels=channels, groups=groups, dtype=dtype, out_bytes=out,
        images=images, sm_count=sm_count, widest=partial == "k",
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


def _splat_body(*refs, layout: sw.Layout, channels: int, groups: int, pairs: tuple,
                n_weights: int, src_hw: tuple[int, int]):  # fmt: skip
    """The splat as the transposed geometry's sweep; ``pairs`` as in :func:`_body`."""
    n_in = len(refs) - 5
    operands, (out_ref, bufs, bars, obuf, wbuf) = refs[:n_in], refs[n_in:]
    images, weights = operands[: layout.images], operands[layout.images :]
    (kh, kw), (dh, dw) = layout.geom.kernel_size, layout.geom.dilation
    cb = layout.tiles.block_channels
    prog = sw.program(layout)
    ring = sw.Ring(layout, prog, images, bufs, bars)
    staged = sw.Staged(wbuf, *src_hw, ring.pl, (kw - 1) * dw - ring.pl)
    group = prog.c0 // (channels // groups)

    def compute(i):
        def tap_row(mf, acc):  # mf: the flipped window row, kh - 1 - m
            q, m = i - ring.pt + mf * dh, kh - 1 - mf  # the source row, the tap's row
            slot = lax.rem(mf, 2)
            for w in range(n_weights):
                for n in range(kw):
                    tap = (m * kw + n) * groups + group
                    staged.fill(slot, w * kw + n, weights[w], prog.b, q, prog.j0, tap)
            staged.ready()
            for nf in range(kw):
                n = kw - 1 - nf
                for image, w in pairs:
                    kv = staged.read(slot, w * kw + n, nf * dw - ring.pl)
                    xv = ring.window(image, i, mf, nf).astype(jnp.float32)
                    acc = acc + xv * kv[:, None]
            return acc

        return lax.fori_loop(0, kh, tap_row, sw.zeros_tile(cb))

    def store(i, value, u):
        sw.store_tile(out_ref, obuf, prog, i, value, u, cb)

    sw.sweep(layout, prog, ring, compute, store)


def _splat(images, weights, pairs, call: KernelCall, name: str) -> jax.Array:
    n, h, w, c = call.out_shape
    _, ho, wo, kh, kw, groups = weights[0].shape
    dtype = images[0].dtype
    bs = call.block_sizes or tiles(
        call.geom, batch=n, channels=c, groups=groups, dtype=dtype, images=len(images),
        partial="x",
    )  # fmt: skip
    layout = sw.plan(sw.transposed(call.geom), bs, len(images), dtype, per_group=c // groups)
    flat = [k.reshape(n, ho, wo, -1) for k in weights]
    body = functools.partial(
        _splat_body, layout=layout, channels=c, groups=groups, pairs=pairs,
        n_weights=len(weights), src_hw=(ho, wo),
    )  # fmt: skip
    out = jax.ShapeDtypeStruct(call.out_shape, dtype)
    staging = plgpu.SMEM((2, sw.STRIP, bs.block_channels), dtype)
    staged = plgpu.SMEM((2, len(weights) * kw, 3 * sw.STRIP), jnp.float32)
    return sw.run(
        body, (*images, *flat), out, layout, call, name=name, batch=n, channels=c,
        out_scratch=staging, extra_scratch=(staged,),
    )  # fmt: skip


def grad_x(k: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """The splat, transpose of :func:`forward` in x: k [N, Ho, Wo, kh, kw, G], dy [N, Ho, Wo,
    C] -> [N, H, W, C] (stride 1)."""
    return _splat([dy], [k], ((0, 0),), call, "pixel_grad_x_mosaic")


def grad_x_jvp(k, dy, tk, tdy, call: KernelCall) -> jax.Array:
    """The splat's tangent ``grad_x(tk, dy) + grad_x(k, tdy)`` (either tangent None), in one
    kernel."""
    name = "pixel_grad_x_jvp_mosaic"
    if tk is None:
        return _splat([tdy], [k], ((0, 0),), call, name)
    if tdy is None:
        return _splat([dy], [tk], ((0, 0),), call, name)
    return _splat([dy, tdy], [k, tk], ((1, 0), (0, 1)), call, name)


def _grad_k_body(x_ref, dy_ref, out_ref, bufs, bars, obuf, *, layout: sw.Layout, channels: int,
                 groups: int):  # fmt: skip
    del obuf  # the sums go to global memory from registers
    (kh, kw), cb = layout.geom.kernel_size, layout.tiles.block_channels
    per_group = channels // groups
    prog = sw.program(layout)
    ring = sw.Ring(layout, prog, [x_ref], bufs, bars)
    group = prog.c0 // per_group
    block = lax.div(lax.rem(prog.c0, per_group), cb)  # the channel block within the group

    def compute(i):
        dyv = sw.pixel_tile(dy_ref, prog.b, i, prog.j0, prog.c0, cb)

        def tap_row(m, carry):
            for n in range(kw):
                xv = ring.window(0, i, m, n).astype(jnp.float32)
                total = jnp.sum(xv * dyv, axis=1)
                dest = out_ref.at[block, prog.b, i, pl.ds(prog.j0, sw.STRIP), m * kw + n, group]
                sw.store_global(dest, total.astype(out_ref.dtype))
            return carry

        lax.fori_loop(0, kh, tap_row, 0)

    sw.sweep(layout, prog, ring, compute, sw.reads_done)


def grad_k(x: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the weights, x [N, H, W, C], dy [N, Ho, Wo, C] -> [N, Ho, Wo, kh, kw,
    G]."""
    n, ho, wo, kh, kw, groups = call.out_shape
    c = x.shape[3]
    bs = call.block_sizes or tiles(
        call.geom, batch=n, channels=c, groups=groups, dtype=x.dtype, partial="k"
    )
    layout = sw.plan(call.geom, bs, 1, x.dtype, per_group=c // groups)
    blocks = c // groups // bs.block_channels
    dtype = x.dtype if blocks == 1 else jnp.float32
    out = jax.ShapeDtypeStruct((blocks, n, ho, wo, kh * kw, groups), dtype)
    body = functools.partial(_grad_k_body, layout=layout, channels=c, groups=groups)
    parts = sw.run(
        body, (x, dy), out, layout, call, name="pixel_grad_k_mosaic", batch=n, channels=c,
        out_scratch=plgpu.SMEM((8,), jnp.float32),
    )  # fmt: skip
    total = parts[0] if blocks == 1 else jnp.sum(parts, axis=0)
    return total.reshape(call.out_shape).astype(x.dtype)
