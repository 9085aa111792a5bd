"""Deformable convolution as Pallas (Triton) kernels: the forward and the three backward
products of the deformable family (see ``svconv.deformable`` for the form).

    y[b,i,j,o] = sum_{m,n,c} S(x)[b,i,j,m,n,c] * d[b,i,j,m,n,g(c)] * w[m,n,c',o]

``S`` samples channel ``c`` bilinearly at ``(i*sh + m*dh - pt + dy, j*sw + n*dw - pl + dx)``,
``(dy, dx) = offsets[b,i,j,m,n,g(c)]`` (or, without offsets, the plain window), with the
derivative of the bilinear weights of ``moments = (ay, ax)`` in the position. Refs are whole
arrays addressed with index arrays and masks (``x [N, H, W, C]``, ``w [kh, kw, C/G, Cout]``,
``d [N, Ho, Wo, kh, kw, Go]`` or batch-shared ``[Ho, Wo, kh, kw, Go]``, ``offsets [N, Ho, Wo,
kh, kw, Go, 2]``): the four neighbours of each sample are masked gathers, never a patch tensor.

* forward: an implicit GEMM. A program owns ``block_p`` output pixels (flattened over the batch)
  and ``block_out`` output channels of one feature group; per tap and block of the group's input
  channels it builds the sampled, modulated ``[block_p, block_c]`` tile in registers and adds
  one tensor-core dot with the tap's weights.
* grad_d: per program ``block_p`` pixels and one tap: ``dy @ w_tap^T`` (the column) times the
  samples, summed over the channels of each offset group (with ``moments``: the derivative in
  the offsets, before the chain rule's factor).
* grad_w: ``(S(x) * d)^T @ dy`` per tap over a chunk of the pixels; the chunks' float32
  partial sums are added in JAX.
* grad_x: the column ``(dy @ w_tap^T) * d`` scattered to the four neighbours of each sample by
  float32 atomic adds (the samples of different pixels land anywhere: the sum's order, and its
  last bits, vary from run to run, as torchvision's).

Depthwise cases (one input and one output channel per feature group: ``deformable_filter2d``)
have no dot to feed and run on the XLA path.
"""

import dataclasses
import functools
import math
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.triton import _common as cm

_F32 = jnp.float32
_MAX_OFFSET_GROUPS = 16


@dataclasses.dataclass(frozen=True)
class DeformableBlockSizes:
    """Tile sizes (powers of 2 >= 16 except ``chunks_dw``, ``num_warps``, ``num_stages``).

    Attributes:
      block_p: output pixels per program (forward, grad_d, grad_x: dot M; grad_w: dot K).
      block_c: input channels per dot (forward: dot K; grad_x, grad_d: dot N; grad_w: dot M).
      block_out: output channels per dot (forward, grad_w: dot N; grad_x, grad_d: dot K).
      chunks_dw: grad_w: chunks of the pixels, one float32 partial sum each (added by XLA).
      num_warps: warps per program.
      num_stages: software-pipelining depth of the channel loops.

    Raises:
      ValueError: when constructed: a block size that is not a power of 2 at least 16, a
        ``num_warps`` that is not a power of 2, a count (``num_stages``, ``chunks_dw``) below 1; the
        message names the field.
    """

    block_p: int
    block_c: int
    block_out: int
    chunks_dw: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        cm.check_tiles(self, minimum=16, counts=("num_stages", "chunks_dw"))


def deformable_block_sizes(
    cg: int, cout_g: int, pixels: int, per_group: int, partial: str = "y"
) -> DeformableBlockSizes:
    """The heuristic's tiles (not yet tuned on a GPU): 64 pixels a program; ``block_c`` the
    largest power of 2 from 16 to 32 that divides both the feature group's channels ``cg`` and
    an offset group's ``per_group`` (each block then has one offset group: its sample positions
    and bilinear weights are one per pixel), else the smallest that covers ``cg`` with little
    padding; ``block_out`` likewise up to 64. ``partial="x"`` (the atomic scatter: the column
    and four neighbours' indices live at once) takes 8 warps, which it needs to spill nothing."""
    common = math.gcd(cg, per_group)
    block_c = next((b for b in (32, 16) if common % b == 0), None)
    return DeformableBlockSizes(
        block_p=64,
        block_c=block_c or cm.channel_block(cg, 32),
        block_out=cm.channel_block(cout_g, 64),
        chunks_dw=max(1, min(16, pixels // 4096)),
        num_warps=8 if partial == "x" else 4,
    )


def unsupported_reason(geom: Geometry, shapes, dtype) -> str | None:
    """None when the kernels take this case, else a one-line reason."""
    del geom
    _, _, cg, cout = shapes["w"]
    if cg == 1 and cout == shapes["x"][3]:
        return "depthwise with one output a channel (a per-pixel filter): no dot to feed"
    groups = shapes["d"][-1]
    if groups > _MAX_OFFSET_GROUPS:
        return f"{groups} offset groups (the kernels take up to {_MAX_OFFSET_GROUPS})"
    return cm.common_unsupported_reason(shapes, dtype)


def _dot(a, b, precision, contract=((1,), (0,))):
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=_F32
    )


@dataclasses.dataclass(frozen=True)
class _Form:
    """The static description every kernel body takes."""

    g: Geometry
    feature_groups: int
    moments: tuple[int, int]
    shared_d: bool
    precision: object
    interpret: bool = False
    uniform: bool = False  # every channel block lies in one offset group


def _pixels(p, ho: int, wo: int, n: int):
    """Flat output pixels ``p`` ``[P, 1]`` -> image, row, column, in-range mask."""
    b, rest = lax.div(p, ho * wo), lax.rem(p, ho * wo)
    return b, lax.div(rest, wo), lax.rem(rest, wo), p < n * ho * wo


def _axis_weights(frac, order: int):
    if order == 0:
        return 1 - frac, frac
    one = jnp.ones_like(frac)
    return -one, one  # (an order above 1 never reaches a kernel: its partial is zero)


def _positions(off_ref, b, i, j, m, n, og, ok, h: int, w: int, f: _Form):
    """Tap ``(m, n)``'s sample positions at pixels ``(b, i, j)`` in offset groups ``og``: the
    upper-left neighbour ``(y0, x0)`` and the bilinear weights (or their derivatives) along
    each axis, every array shaped like the broadcast of the indices."""
    _, (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(f.g)
    r, q = i * sh + m * dh - ptop, j * sw + n * dw - pleft
    dy = cm.gather(off_ref.at[b, i, j, m, n, og, 0], ok).astype(_F32)
    dx = cm.gather(off_ref.at[b, i, j, m, n, og, 1], ok).astype(_F32)
    # Clamped where every neighbour is outside (nothing changes), before the integer conversion.
    py = jnp.clip(r.astype(_F32) + dy, -2.0, h + 1.0)
    px = jnp.clip(q.astype(_F32) + dx, -2.0, w + 1.0)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    wy = _axis_weights(py - y0, f.moments[0])
    wx = _axis_weights(px - x0, f.moments[1])
    return y0.astype(jnp.int32), x0.astype(jnp.int32), wy, wx


def _offset_group(chans, c: int, groups: int, f: _Form):
    """The offset group of the channels ``chans`` ``[1, K]``: one per channel, or with
    ``f.uniform`` the block's one (``[1, 1]``)."""
    per_group = c // groups
    return lax.div(jnp.min(chans) if f.uniform else chans, per_group)


def _sample(x_ref, off_ref, b, i, j, m, n, chans, pixel_ok, chan_ok, f: _Form):
    """``S(x)`` of tap ``(m, n)`` at pixels ``(b, i, j)`` (``[P, 1]``) and channels ``chans``
    (``[1, K]``), in float32; zero where ``pixel_ok`` (``[P, 1]``) or ``chan_ok`` (``[1, K]``)
    is false."""
    _, h, w, c = x_ref.shape
    _, (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(f.g)
    ok = pixel_ok & chan_ok & (chans < c)
    if off_ref is None:
        r, q = i * sh + m * dh - ptop, j * sw + n * dw - pleft
        v = cm.gather(x_ref.at[b, r, q, chans], ok & cm.inside(r, q, h, w), cm.KEEP)
        return v.astype(_F32)
    og = _offset_group(chans, c, off_ref.shape[5], f)
    y0, x0, wy, wx = _positions(off_ref, b, i, j, m, n, og, pixel_ok if f.uniform else ok, h, w, f)
    out = jnp.zeros(ok.shape, _F32)
    for a in (0, 1):
        for e in (0, 1):
            yy, xx = y0 + a, x0 + e
            v = cm.gather(x_ref.at[b, yy, xx, chans], ok & cm.inside(yy, xx, h, w), cm.KEEP)
            out += (wy[a] * wx[e]) * v.astype(_F32)
    return out


def _corners(x_shape, off_ref, b, i, j, m, n, chans, pixel_ok, chan_ok, f: _Form):
    """The neighbours ``(row, col, weight, mask)`` of each sample (one, weight None, without
    offsets): the targets of :func:`_sample`'s transpose."""
    _, h, w, c = x_shape
    _, (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(f.g)
    ok = pixel_ok & chan_ok & (chans < c)
    if off_ref is None:
        r, q = i * sh + m * dh - ptop, j * sw + n * dw - pleft
        return [(r, q, None, ok & cm.inside(r, q, h, w))]
    og = _offset_group(chans, c, off_ref.shape[5], f)
    y0, x0, wy, wx = _positions(off_ref, b, i, j, m, n, og, pixel_ok if f.uniform else ok, h, w, f)
    out = []
    for a in (0, 1):
        for e in (0, 1):
            yy, xx = y0 + a, x0 + e
            out.append((yy, xx, wy[a] * wx[e], ok & cm.inside(yy, xx, h, w)))
    return out


def _mask_at(d_ref, b, i, j, m, n, chans, ok, c: int, f: _Form):
    """``d`` of tap ``(m, n)`` per pixel and channel (``[P, K]``, or with ``f.uniform``
    ``[P, 1]``; float32), or None (ones). ``ok``: the pixels' mask ``[P, 1]``."""
    if d_ref is None:
        return None
    og = _offset_group(chans, c, d_ref.shape[-1], f)
    ok = ok if f.uniform else ok & (chans < c)
    at = d_ref.at[i, j, m, n, og] if f.shared_d else d_ref.at[b, i, j, m, n, og]
    return cm.gather(at, ok).astype(_F32)


def _tap(t, kw: int):
    return lax.div(t, kw), lax.rem(t, kw)


def _forward_kernel(x_ref, w_ref, d_ref, off_ref, y_ref, *, f: _Form, bs: DeformableBlockSizes):
    n_img, _, _, c = x_ref.shape
    kh, kw, cg, cout = w_ref.shape
    _, ho, wo, _ = y_ref.shape
    cout_g = cout // f.feature_groups
    group, ob = cm.split(pl.program_id(1), pl.cdiv(cout_g, bs.block_out))
    p = pl.program_id(0) * bs.block_p + jnp.arange(bs.block_p)[:, None]
    b, i, j, ok = _pixels(p, ho, wo, n_img)
    within = ob * bs.block_out + jnp.arange(bs.block_out)[None, :]
    outs = group * cout_g + within

    def step(s, acc):
        t, cb = cm.split(s, pl.cdiv(cg, bs.block_c))
        m, n = _tap(t, kw)
        local = cb * bs.block_c + jnp.arange(bs.block_c)
        chans = group * cg + local[None, :]
        a = _sample(x_ref, off_ref, b, i, j, m, n, chans, ok, local[None, :] < cg, f)
        if (dm := _mask_at(d_ref, b, i, j, m, n, chans, ok, c, f)) is not None:
            a = a * dm
        wt = cm.gather(
            w_ref.at[m, n, local[:, None], outs], (local[:, None] < cg) & (within < cout_g)
        )
        return acc + _dot(a.astype(x_ref.dtype), wt, f.precision)

    steps = kh * kw * pl.cdiv(cg, bs.block_c)
    acc = lax.fori_loop(0, steps, step, jnp.zeros((bs.block_p, bs.block_out), _F32))
    plt.store(y_ref.at[b, i, j, outs], acc.astype(y_ref.dtype), mask=ok & (within < cout_g))


def _column(dy_ref, w_ref, b, i, j, m, n, group, local, ok, f: _Form, bs: DeformableBlockSizes):
    """``(dy @ w_tap^T)`` for the channels ``group * C/G + local`` (``[1, K]``): ``[P, K]``."""
    _, _, cg, cout = w_ref.shape
    cout_g = cout // f.feature_groups

    def out_block(ob, acc):
        within = ob * bs.block_out + jnp.arange(bs.block_out)
        outs = group * cout_g + within
        g = cm.gather(dy_ref.at[b, i, j, outs[None, :]], ok & (within[None, :] < cout_g), cm.KEEP)
        wt = cm.gather(
            w_ref.at[m, n, local, outs[:, None]], (local < cg) & (within[:, None] < cout_g)
        )
        return acc + _dot(g, wt, f.precision)

    init = jnp.zeros((bs.block_p, bs.block_c), _F32)
    return lax.fori_loop(0, pl.cdiv(cout_g, bs.block_out), out_block, init)


def _grad_d_kernel(x_ref, w_ref, dy_ref, off_ref, dd_ref, *, f: _Form, bs: DeformableBlockSizes):
    n_img, _, _, c = x_ref.shape
    kh, kw, cg, _ = w_ref.shape
    _, ho, wo, _ = dy_ref.shape
    groups = dd_ref.shape[-1]
    per_group = c // groups
    p = pl.program_id(0) * bs.block_p + jnp.arange(bs.block_p)[:, None]
    b, i, j, ok = _pixels(p, ho, wo, n_img)
    m, n = _tap(pl.program_id(1), kw)

    def step(s, acc):
        group, cb = cm.split(s, pl.cdiv(cg, bs.block_c))
        local = cb * bs.block_c + jnp.arange(bs.block_c)[None, :]
        chans = group * cg + local
        col = _column(dy_ref, w_ref, b, i, j, m, n, group, local, ok, f, bs)
        prod = col * _sample(x_ref, off_ref, b, i, j, m, n, chans, ok, local < cg, f)
        og = lax.div(chans, per_group)
        return tuple(a + jnp.sum(jnp.where(og == k, prod, 0.0), axis=1) for k, a in enumerate(acc))

    steps = f.feature_groups * pl.cdiv(cg, bs.block_c)
    init = tuple(jnp.zeros((bs.block_p,), _F32) for _ in range(groups))
    acc = lax.fori_loop(0, steps, step, init)
    bb, ii, jj, okk = b[:, 0], i[:, 0], j[:, 0], ok[:, 0]
    for k, a in enumerate(acc):
        plt.store(dd_ref.at[bb, ii, jj, m, n, k], a.astype(dd_ref.dtype), mask=okk)


def _grad_w_kernel(x_ref, d_ref, dy_ref, off_ref, dw_ref, *, f: _Form, bs: DeformableBlockSizes):
    n_img, _, _, c = x_ref.shape
    _, ho, wo, cout = dy_ref.shape
    _, kh, kw, cg, _ = dw_ref.shape
    cout_g = cout // f.feature_groups
    t = pl.program_id(0)
    m, n = _tap(t, kw)
    cblocks, oblocks = pl.cdiv(cg, bs.block_c), pl.cdiv(cout_g, bs.block_out)
    group, rest = cm.split(pl.program_id(1), cblocks * oblocks)
    cb, ob = cm.split(rest, oblocks)
    chunk = pl.program_id(2)
    local = cb * bs.block_c + jnp.arange(bs.block_c)[None, :]
    chans = group * cg + local
    within = ob * bs.block_out + jnp.arange(bs.block_out)[None, :]
    outs = group * cout_g + within
    total = n_img * ho * wo
    per_chunk = pl.cdiv(pl.cdiv(total, bs.block_p), bs.chunks_dw) * bs.block_p

    def step(s, acc):
        p = chunk * per_chunk + s * bs.block_p + jnp.arange(bs.block_p)[:, None]
        b, i, j, ok = _pixels(p, ho, wo, n_img)
        a = _sample(x_ref, off_ref, b, i, j, m, n, chans, ok, local < cg, f)
        if (dm := _mask_at(d_ref, b, i, j, m, n, chans, ok, c, f)) is not None:
            a = a * dm
        g = cm.gather(dy_ref.at[b, i, j, outs], ok & (within < cout_g), cm.KEEP)
        return acc + _dot(a.astype(x_ref.dtype), g, f.precision, contract=((0,), (0,)))

    acc = lax.fori_loop(
        0, per_chunk // bs.block_p, step, jnp.zeros((bs.block_c, bs.block_out), _F32)
    )
    rows, cols = local[0][:, None], outs[0][None, :]
    mask = (rows < cg) & (within[0][None, :] < cout_g)
    plt.store(dw_ref.at[chunk, m, n, rows, cols], acc, mask=mask)


def _grad_x_kernel(w_ref, d_ref, dy_ref, off_ref, dx_ref, *, f: _Form, bs: DeformableBlockSizes):
    _, h, w, c = dx_ref.shape
    kh, kw, cg, _ = w_ref.shape
    n_img, ho, wo, _ = dy_ref.shape
    p = pl.program_id(0) * bs.block_p + jnp.arange(bs.block_p)[:, None]
    b, i, j, ok = _pixels(p, ho, wo, n_img)
    group, cb = cm.split(pl.program_id(1), pl.cdiv(cg, bs.block_c))
    local = cb * bs.block_c + jnp.arange(bs.block_c)[None, :]
    chans = group * cg + local

    def tap(t, carry):
        m, n = _tap(t, kw)
        col = _column(dy_ref, w_ref, b, i, j, m, n, group, local, ok, f, bs)
        if (dm := _mask_at(d_ref, b, i, j, m, n, chans, ok, c, f)) is not None:
            col = col * dm
        corners = _corners(dx_ref.shape, off_ref, b, i, j, m, n, chans, ok, local < cg, f)
        for yy, xx, weight, mask in corners:
            val = jnp.where(mask, col if weight is None else col * weight, 0.0)
            idx = (
                jnp.clip(b, 0, n_img - 1),
                jnp.clip(yy, 0, h - 1),
                jnp.clip(xx, 0, w - 1),
                jnp.clip(chans, 0, c - 1),
            )
            if f.interpret:
                # Pallas's interpreter takes an atomic add as a gather and a scatter, which
                # loses repeated targets within one call: its programs run one at a time, so a
                # whole-array scatter-add stands in for it.
                dx_ref[...] = dx_ref[...].at[idx].add(val)
            else:
                plt.atomic_add(dx_ref, idx, val, mask=mask)
        return carry

    lax.fori_loop(0, kh * kw, tap, 0)


# ----------------------------------------------------------------------------------------------
# Entry points: the family's kernels (arrays of the other slots, the offsets, the call)
# ----------------------------------------------------------------------------------------------


def _groups(d, offsets) -> int:
    """The offset (modulation) groups, from ``offsets`` or ``d`` (1 without either)."""
    if offsets is not None:
        return offsets.shape[5]
    return 1 if d is None else d.shape[-1]


def _setup(call: KernelCall, channels: int, cg: int, cout: int, pixels: int, groups: int,
           shared_d: bool, partial: str = "y"):  # fmt: skip
    """The tiles (the caller's or the heuristic's) and the static form of one call."""
    fg = channels // cg
    bs = call.block_sizes or deformable_block_sizes(
        cg, cout // fg, pixels, channels // groups, partial
    )
    form = _Form(
        g=call.geom,
        feature_groups=fg,
        moments=cast(tuple[int, int], tuple(call.moments) or (0, 0)),
        shared_d=shared_d,
        precision=call.precision,
        interpret=call.interpret,
        uniform=(channels // groups) % bs.block_c == 0 and cg % bs.block_c == 0,
    )
    return bs, form


def _shared(d) -> bool:
    return d is not None and d.ndim == 5


def forward(x, w, d, offsets, call: KernelCall) -> jax.Array:
    n, ho, wo, cout = call.out_shape
    groups = _groups(d, offsets)
    bs, f = _setup(call, x.shape[3], w.shape[2], cout, n * ho * wo, groups, _shared(d))
    cout_g = cout // f.feature_groups
    grid = (pl.cdiv(n * ho * wo, bs.block_p), f.feature_groups * pl.cdiv(cout_g, bs.block_out))
    body = functools.partial(_forward_kernel, f=f, bs=bs)
    return cm.run(body, (x, w, d, offsets), call, name="deformable_forward", grid=grid, tiles=bs)


def grad_d(x, w, dy, offsets, call: KernelCall) -> jax.Array:
    """``dd [N, Ho, Wo, kh, kw, Go]`` (a batch-shared target: computed per image, then summed)."""
    shared = len(call.out_shape) == 5
    n, ho, wo, cout = dy.shape
    groups = call.out_shape[-1]  # the target's (d's) offset groups
    bs, f = _setup(call, x.shape[3], w.shape[2], cout, n * ho * wo, groups, False)
    kh, kw = call.geom.kernel_size
    shape = (n, *call.out_shape) if shared else call.out_shape
    grid = (pl.cdiv(n * ho * wo, bs.block_p), kh * kw)
    body = functools.partial(_grad_d_kernel, f=f, bs=bs)
    out = jax.ShapeDtypeStruct(shape, _F32 if shared else x.dtype)
    args = (x, w, dy, offsets)
    dd = cm.run(body, args, call, name="deformable_grad_d", grid=grid, tiles=bs, out=out)
    return dd.sum(axis=0).astype(x.dtype) if shared else dd


def grad_w(x, d, dy, offsets, call: KernelCall) -> jax.Array:
    kh, kw, cg, cout = call.out_shape
    n, ho, wo, _ = dy.shape
    bs, f = _setup(call, x.shape[3], cg, cout, n * ho * wo, _groups(d, offsets), _shared(d))
    cout_g = cout // f.feature_groups
    grid = (
        kh * kw,
        f.feature_groups * pl.cdiv(cg, bs.block_c) * pl.cdiv(cout_g, bs.block_out),
        bs.chunks_dw,
    )
    body = functools.partial(_grad_w_kernel, f=f, bs=bs)
    out = jax.ShapeDtypeStruct((bs.chunks_dw, kh, kw, cg, cout), _F32)
    args = (x, d, dy, offsets)
    parts = cm.run(body, args, call, name="deformable_grad_w", grid=grid, tiles=bs, out=out)
    return parts.sum(axis=0).astype(x.dtype)


def grad_x(w, d, dy, offsets, call: KernelCall) -> jax.Array:
    """``dx [N, H, W, C]``: float32 atomic adds into zeros, rounded to the inputs' dtype after."""
    n, ho, wo, cout = dy.shape
    cg = w.shape[2]
    groups = _groups(d, offsets)
    bs, f = _setup(call, call.out_shape[3], cg, cout, n * ho * wo, groups, _shared(d), "x")
    grid = (pl.cdiv(n * ho * wo, bs.block_p), f.feature_groups * pl.cdiv(cg, bs.block_c))
    body = functools.partial(_grad_x_kernel, f=f, bs=bs)
    out = jax.ShapeDtypeStruct(call.out_shape, _F32)
    args = (w, d, dy, offsets)
    dx = cm.run(
        body, args, call, name="deformable_grad_x", grid=grid, tiles=bs, out=out, zeroed=True
    )
    return dx.astype(dy.dtype)
