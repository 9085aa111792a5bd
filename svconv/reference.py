"""Reference implementations: naive loops over taps in plain ``jnp``, written to be obviously
right. They are the oracle for the tests; their gradients come from JAX autodiff.

Every function takes normalised arguments (a :class:`~pallas_kernels.geometry.Geometry`) and
computes at ``HIGHEST`` precision in float32 (16-bit and float32 inputs) or in the inputs' own
dtype (float64, complex), returning the promoted input dtype.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.geometry import Geometry
from svconv._checks import accumulation_dtype

_HI = lax.Precision.HIGHEST


def _pad(x: jax.Array, padding) -> jax.Array:
    """Zero padding; negative pads crop."""
    (pt, pb), (pl, pr) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def tap(x: jax.Array, geom: Geometry, m: int, n: int) -> jax.Array:
    """``x[b, i*sh + m*dh - pt, j*sw + n*dw - pl, c]`` for every output pixel ``(i, j)``,
    reading zero outside ``x``: shape ``[N, Ho, Wo, C]``."""
    xp = _pad(x, geom.padding)
    (ho, wo), (sh, sw), (dh, dw) = geom.out_size, geom.stride, geom.dilation
    rows = m * dh + sh * jnp.arange(ho)
    cols = n * dw + sw * jnp.arange(wo)
    return xp[:, rows[:, None], cols[None, :], :]


def _taps(geom: Geometry):
    kh, kw = geom.kernel_size
    return [(m, n) for m in range(kh) for n in range(kw)]


def modulated_conv2d(x, w, d, geom: Geometry, precision=None) -> jax.Array:
    """``y[b,i,j,o] = sum_{m,n,c} x[b,pos(i,m),pos(j,n),c] * w[m,n,c,o] * d[b,i,j,m,n]``."""
    del precision  # the reference is always exact
    dtype = jnp.result_type(x, w, d)
    x, w, d = (a.astype(accumulation_dtype(dtype)) for a in (x, w, d))
    if d.ndim == 4:
        d = d[None]
    y: jax.Array | float = 0.0
    for m, n in _taps(geom):
        scaled = tap(x, geom, m, n) * d[:, :, :, m, n, None]
        y = y + jnp.einsum("bhwc,co->bhwo", scaled, w[m, n], precision=_HI)
    return cast(jax.Array, y).astype(dtype)  # (a sum over at least one tap)


def local_conv2d(x, w, geom: Geometry, precision=None) -> jax.Array:
    """``y[b,i,j,o] = sum_{m,n,c} x[b,pos(i,m),pos(j,n),c] * w[i,j,m,n,c,o]``."""
    del precision
    dtype = jnp.result_type(x, w)
    x, w = x.astype(accumulation_dtype(dtype)), w.astype(accumulation_dtype(dtype))
    y: jax.Array | float = 0.0
    for m, n in _taps(geom):
        y = y + jnp.einsum("bhwc,hwco->bhwo", tap(x, geom, m, n), w[:, :, m, n], precision=_HI)
    return cast(jax.Array, y).astype(dtype)  # (a sum over at least one tap)


def pixel_filter2d(x, k, geom: Geometry) -> jax.Array:
    """``y[b,i,j,c] = sum_{m,n} x[b,pos(i,m),pos(j,n),c] * k[b,i,j,m,n,g(c)]``.

    ``k`` has the groups axis: ``[N, Ho, Wo, kh, kw, G]``.
    """
    dtype = jnp.result_type(x, k)
    x, k = x.astype(accumulation_dtype(dtype)), k.astype(accumulation_dtype(dtype))
    groups = k.shape[-1]
    per_group = x.shape[-1] // groups
    k = jnp.repeat(k, per_group, axis=-1)  # channel c uses group c // per_group
    y: jax.Array | float = 0.0
    for m, n in _taps(geom):
        y = y + tap(x, geom, m, n) * k[:, :, :, m, n, :]
    return cast(jax.Array, y).astype(dtype)  # (a sum over at least one tap)


def pixel_splat2d(x, k, geom: Geometry) -> jax.Array:
    """Each source pixel ``(i, j)`` of ``x`` adds ``k[b,i,j,m,n,g(c)] * x[b,i,j,c]`` at input
    position ``(pos(i,m), pos(j,n))``; positions outside ``geom.in_size`` are dropped."""
    dtype = jnp.result_type(x, k)
    x, k = x.astype(accumulation_dtype(dtype)), k.astype(accumulation_dtype(dtype))
    groups = k.shape[-1]
    k = jnp.repeat(k, x.shape[-1] // groups, axis=-1)
    (h, w), (ho, wo) = geom.in_size, geom.out_size
    (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = geom.stride, geom.dilation, geom.padding
    # Scatter into the padded frame (all targets land inside it), then undo the padding (a
    # padding's transpose crops it; a negative padding's puts back the cropped zeros).
    y = jnp.zeros((x.shape[0], h + pt + pb, w + pl + pr, x.shape[-1]), x.dtype)
    for m, n in _taps(geom):
        rows = sh * jnp.arange(ho) + m * dh
        cols = sw * jnp.arange(wo) + n * dw
        y = y.at[:, rows[:, None], cols[None, :], :].add(x * k[:, :, :, m, n, :])
    y = _pad(y, ((-pt, -pb), (-pl, -pr)))
    return y.astype(dtype)


def _bilinear(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    """``x [N, H, W, C]`` sampled at ``(py, px) [N, Ho, Wo]``, bilinearly, pixels outside the
    image reading zero. Differentiated by JAX: on integer positions the derivative from above
    (``floor`` has derivative zero)."""
    n, h, w, _ = x.shape
    # Clamped where every neighbour is outside anyway.
    py, px = jnp.clip(py, -2, h + 1), jnp.clip(px, -2, w + 1)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    fy, fx = py - y0, px - x0
    b = jnp.arange(n)[:, None, None]
    out: jax.Array | float = 0.0
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            ok = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            r = jnp.clip(yy, 0, h - 1).astype(jnp.int32)
            c = jnp.clip(xx, 0, w - 1).astype(jnp.int32)
            out = out + jnp.where(ok, wy * wx, 0.0)[..., None] * x[b, r, c]
    return cast(jax.Array, out)  # (a sum of four terms)


def deformable_conv2d(x, w, offsets, mask, geom: Geometry, feature_groups: int = 1):
    """``y[b,i,j,o] = sum_{m,n,c} bilinear(x[..., c], pos(i,m) + dy, pos(j,n) + dx) *
    mask[b,i,j,m,n,g(c)] * w[m,n,c',o]`` with ``(dy, dx) = offsets[b,i,j,m,n,g(c)]``, ``g(c)``
    the offset group of channel ``c`` and ``w``'s input channels in ``feature_groups`` groups.

    ``offsets [N, Ho, Wo, kh, kw, G, 2]`` or None (no offsets: the plain window);
    ``mask [N or absent, Ho, Wo, kh, kw, G]`` or None (ones)."""
    dtype = jnp.result_type(x, w, *(() if mask is None else (mask,)))
    acc = accumulation_dtype(dtype)
    x, w = x.astype(acc), w.astype(acc)
    n, _, _, c = x.shape
    (ho, wo), (sh, sw), (dh, dw) = geom.out_size, geom.stride, geom.dilation
    (pt, _), (pl, _) = geom.padding
    groups = offsets.shape[5] if offsets is not None else mask.shape[-1] if mask is not None else 1
    per_group = c // groups
    if mask is not None:
        mask = mask.astype(acc)
        mask = mask if mask.ndim == 6 else jnp.broadcast_to(mask[None], (n, *mask.shape))
    real = jnp.finfo(acc).dtype
    cg = w.shape[2]
    y: jax.Array | float = 0.0
    for m, nn in _taps(geom):
        if offsets is None:
            sampled = tap(x, geom, m, nn)
        else:
            parts = []
            for g in range(groups):
                rows = (sh * jnp.arange(ho) + m * dh - pt).astype(real)[None, :, None]
                cols = (sw * jnp.arange(wo) + nn * dw - pl).astype(real)[None, None, :]
                off = offsets[:, :, :, m, nn, g].astype(real)
                chans = x[..., g * per_group : (g + 1) * per_group]
                parts.append(_bilinear(chans, rows + off[..., 0], cols + off[..., 1]))
            sampled = jnp.concatenate(parts, axis=-1)
        if mask is not None:
            sampled = sampled * jnp.repeat(mask[:, :, :, m, nn, :], per_group, axis=-1)
        outs = []
        for f in range(feature_groups):
            chunk = sampled[..., f * cg : (f + 1) * cg]
            cout = w.shape[3] // feature_groups
            wf = w[m, nn, :, f * cout : (f + 1) * cout]
            outs.append(jnp.einsum("bhwc,co->bhwo", chunk, wf, precision=_HI))
        y = y + jnp.concatenate(outs, axis=-1)
    return cast(jax.Array, y).astype(dtype)  # (a sum over at least one tap)


def _product_kernels(f, u):
    """The per-pixel kernels ``[N, Ho, Wo, kh, kw, G]`` of a product decomposition."""
    k = jnp.einsum("...r,rmng->...mng", u, f, precision=_HI)
    return k if k.ndim == 6 else k[None]


def product_filter2d(x, f, u, geom: Geometry) -> jax.Array:
    """:func:`pixel_filter2d` with ``k[b,i,j,m,n,g] = sum_r u[b,i,j,r] * f[r,m,n,g]`` (``u``
    may be shared over the batch)."""
    dtype = jnp.result_type(x, f, u)
    f, u = f.astype(accumulation_dtype(dtype)), u.astype(accumulation_dtype(dtype))
    k = jnp.broadcast_to(_product_kernels(f, u), (x.shape[0], *geom.out_size, *f.shape[1:]))
    return pixel_filter2d(x, k, geom).astype(dtype)


def product_splat2d(x, f, u, geom: Geometry) -> jax.Array:
    """:func:`pixel_splat2d` with the kernels of :func:`product_filter2d` on the source grid."""
    dtype = jnp.result_type(x, f, u)
    f, u = f.astype(accumulation_dtype(dtype)), u.astype(accumulation_dtype(dtype))
    k = jnp.broadcast_to(_product_kernels(f, u), (*x.shape[:3], *f.shape[1:]))
    return pixel_splat2d(x, k, geom).astype(dtype)
