"""Per-pixel Gaussian filters (Pallas, Triton backend) whose weights are computed in the kernel.

Shapes (NHWC): x, dy: [N, H, W, C] or [N, Ho, Wo, C]; per output pixel (on the filter's output
grid, which is the splat's source grid) the parameters eta [N, Ho, Wo, P], the log-normaliser
zeta [N, Ho, Wo] and an optional scale s [N, Ho, Wo]. Tap ``(m, n)`` of pixel ``p`` weighs

    w[p, tap] = exp(eta[p] . phi(tap) - zeta[p]) * prod_q phi(tap)_q ** moments[q]

with the features ``phi`` of :func:`features` (``svconv.gaussian`` derives ``eta`` and ``zeta``
from sigma and rho; ``moments`` > 0 are the derivatives in ``eta``). Three kernels, the partials of
``T(x, s, y) = sum y[p, c] * s[p] * w[p, tap] * x[pos(p, tap), c]``:

* `forward`: ``y = s * sum_tap w * x[pos]`` (the filter);
* `grad_x`: its transpose in x (the splat), in gather form per stride phase as `pixel.grad_x`;
* `grad_s`: ``ds[p] = sum_tap w[p, tap] sum_c x[pos, c] dy[p, c]``;

and the tangents of the first two in one kernel each (`forward_jvp`, `grad_x_jvp`): for tangents
of the image, of ``s`` and of the parameters at once, the weights' tangent being
``w * (t_eta . phi(tap) - t_zeta)``.

The weights are recomputed for every tap and never stored: memory is that of the images. Tiling
and addressing (whole-array refs, masks for padding, strides, dilation and ragged tiles) follow
`pixel`'s kernels, with one filter for all channels.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gaussian_taps import features
from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.triton import _common as cm
from pallas_kernels.triton.pixel import PixelBlockSizes, pixel_block_sizes

_F32 = jnp.float32


def unsupported_reason(geom: Geometry, shapes, dtype) -> str | None:
    """None when the kernels handle this case, else why not (one line). ``shapes``: the shape
    of every slot and parameter by name."""
    del geom  # every geometry the API accepts
    return cm.common_unsupported_reason(shapes, dtype)


def _tile_pixels(ti, tj, bs: PixelBlockSizes):
    """Row and column of every pixel of tile (ti, tj), each [P, 1]."""
    p = jnp.arange(bs.block_h * bs.block_w)[:, None]
    return ti * bs.block_h + lax.div(p, bs.block_w), tj * bs.block_w + lax.rem(p, bs.block_w)


def _pixel_params(eta_ref, zeta_ref, b, i, j, ok):
    """eta (a list of P arrays) and zeta of pixels (i, j) of image b, each like i; or their
    tangents (each None where its ref is)."""
    eta = None
    if eta_ref is not None:
        eta = [cm.gather(eta_ref.at[b, i, j, q], ok).astype(_F32) for q in range(eta_ref.shape[-1])]
    zeta = None if zeta_ref is None else cm.gather(zeta_ref.at[b, i, j], ok).astype(_F32)
    return eta, zeta


def _features(m, n, kernel_size, parts: int) -> list:
    """``phi`` of tap (m, n) (traced int32 scalars)."""
    kh, kw = kernel_size
    return features(m.astype(_F32) - (kh - 1) / 2, n.astype(_F32) - (kw - 1) / 2, parts)


def _weight(eta, zeta, phi, moments):
    """The weight of the tap with features phi for pixels with parameters eta, zeta."""
    w = jnp.exp(sum(e * f for e, f in zip(eta, phi, strict=True)) - zeta)
    for f, power in zip(phi, moments, strict=True):
        for _ in range(power):
            w = w * f
    return w


def _weight_tangent_factor(teta, tzeta, phi):
    """``t_eta . phi - t_zeta``: the weight's tangent over the weight (None for none)."""
    terms = [] if teta is None else [t * f for t, f in zip(teta, phi, strict=True)]
    if tzeta is not None:
        terms.append(-tzeta)
    return sum(terms) if terms else None


# ------------------------------------------------------------------------------------------------
# Kernel bodies
# ------------------------------------------------------------------------------------------------


def _forward_kernel(x_ref, s_ref, eta_ref, zeta_ref, *refs, g, bs, moments, n_th):
    """``y = s * sum_tap w * x``; with the tangent refs ``tx, ts, t_eta, t_zeta`` (each None or
    not) before ``y``'s, its tangent ``sum_tap w * (s * (tx + x * f) + ts * x)``, ``f`` the
    weight's relative tangent."""
    *tangents, y_ref = refs
    tx_ref, ts_ref, teta_ref, tzeta_ref = tangents or (None,) * 4
    _, h, w, c = x_ref.shape
    _, ho, wo, _ = y_ref.shape
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    b, ti = cm.split(pl.program_id(2), n_th)
    rows, cols = _tile_pixels(ti, pl.program_id(1), bs)
    chans = pl.program_id(0) * bs.block_channels + jnp.arange(bs.block_channels)[None, :]
    pix_ok = (rows < ho) & (cols < wo)
    eta, zeta = _pixel_params(eta_ref, zeta_ref, b, rows, cols, pix_ok)
    teta, tzeta = _pixel_params(teta_ref, tzeta_ref, b, rows, cols, pix_ok)
    scale = None if s_ref is None else cm.gather(s_ref.at[b, rows, cols], pix_ok).astype(_F32)
    tscale = None if ts_ref is None else cm.gather(ts_ref.at[b, rows, cols], pix_ok).astype(_F32)

    def tap(t, acc):
        m, n = lax.div(t, kw), lax.rem(t, kw)
        r, q = rows * sh + m * dh - ptop, cols * sw + n * dw - pleft
        ok = pix_ok & cm.inside(r, q, h, w) & (chans < c)
        phi = _features(m, n, (kh, kw), len(eta))
        weight = _weight(eta, zeta, phi, moments)
        xt = cm.gather(x_ref.at[b, r, q, chans], ok, cm.KEEP).astype(_F32)
        if not tangents:
            return acc + xt * weight
        plain, moved = acc  # sum w * x (for ts), sum w * (tx + x * f)
        factor = _weight_tangent_factor(teta, tzeta, phi)
        change = None if factor is None else xt * factor
        if tx_ref is not None:
            txt = cm.gather(tx_ref.at[b, r, q, chans], ok, cm.KEEP).astype(_F32)
            change = txt if change is None else change + txt
        if tscale is not None:
            plain = plain + xt * weight
        if change is not None:
            moved = moved + change * weight
        return plain, moved

    zeros = jnp.zeros((rows.shape[0], bs.block_channels), _F32)
    acc = lax.fori_loop(0, kh * kw, tap, (zeros, zeros) if tangents else zeros)
    if tangents:
        plain, acc = acc
    if scale is not None:
        acc = acc * scale
    if tscale is not None:
        acc = acc + plain * tscale
    plt.store(y_ref.at[b, rows, cols, chans], acc.astype(y_ref.dtype), mask=pix_ok & (chans < c))


def _grad_x_kernel(s_ref, dy_ref, eta_ref, zeta_ref, *refs, g, bs, moments, n_th, n_tw):
    """The splat of ``s * dy``; with the tangent refs ``ts, tdy, t_eta, t_zeta`` (each None or
    not) before the result's, its tangent (as the forward's)."""
    *tangents, dx_ref = refs
    ts_ref, tdy_ref, teta_ref, tzeta_ref = tangents or (None,) * 4
    _, ho, wo, c = dy_ref.shape
    _, h, w, _ = dx_ref.shape
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    phw, tj = cm.split(pl.program_id(1), n_tw)
    b, rest = cm.split(pl.program_id(2), sh * n_th)
    phh, ti = cm.split(rest, n_th)
    # The program's pixels are (R * sh + phh, Q * sw + phw) for (R, Q) in its tile: only the taps
    # of that phase reach them, each from source pixel (R + const, Q + const).
    big_r, big_q = _tile_pixels(ti, tj, bs)
    rows, cols = big_r * sh + phh, big_q * sw + phw
    chans = pl.program_id(0) * bs.block_channels + jnp.arange(bs.block_channels)[None, :]
    taps_h = cm.phase_taps(phh, ptop, kh, sh, dh)
    taps_w = cm.phase_taps(phw, pleft, kw, sw, dw)

    def tap(m, n, acc):
        i, j = big_r + taps_h.offset(m), big_q + taps_w.offset(n)
        ok = cm.inside(i, j, ho, wo)
        eta, zeta = _pixel_params(eta_ref, zeta_ref, b, i, j, ok)
        phi = _features(m, n, (kh, kw), len(eta))
        weight = _weight(eta, zeta, phi, moments)
        scale = None if s_ref is None else cm.gather(s_ref.at[b, i, j], ok).astype(_F32)
        dyt = cm.gather(dy_ref.at[b, i, j, chans], ok & (chans < c), cm.KEEP).astype(_F32)
        if not tangents:
            return acc + dyt * (weight if scale is None else weight * scale)
        teta, tzeta = _pixel_params(teta_ref, tzeta_ref, b, i, j, ok)
        factor = _weight_tangent_factor(teta, tzeta, phi)
        change = None if factor is None else dyt * factor
        if tdy_ref is not None:
            tdyt = cm.gather(tdy_ref.at[b, i, j, chans], ok & (chans < c), cm.KEEP).astype(_F32)
            change = tdyt if change is None else change + tdyt
        if change is not None and scale is not None:
            change = change * scale
        if ts_ref is not None:
            moved = dyt * cm.gather(ts_ref.at[b, i, j], ok).astype(_F32)
            change = moved if change is None else change + moved
        return acc if change is None else acc + change * weight

    acc = cm.phase_loop(taps_h, taps_w, tap, jnp.zeros((rows.shape[0], bs.block_channels), _F32))
    ok = (rows < h) & (cols < w) & (chans < c)
    plt.store(dx_ref.at[b, rows, cols, chans], acc.astype(dx_ref.dtype), mask=ok)


def _grad_s_kernel(x_ref, dy_ref, eta_ref, zeta_ref, ds_ref, *, g, bs, moments, n_th):
    _, h, w, c = x_ref.shape
    _, ho, wo = ds_ref.shape
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    b, ti = cm.split(pl.program_id(2), n_th)
    rows, cols = _tile_pixels(ti, pl.program_id(1), bs)
    pix_ok = (rows < ho) & (cols < wo)
    eta, zeta = _pixel_params(eta_ref, zeta_ref, b, rows, cols, pix_ok)
    blocks = [
        jnp.arange(bs.block_channels)[None, :] + k * bs.block_channels
        for k in range(pl.cdiv(c, bs.block_channels))
    ]
    # dy is the same for every tap: read it once.
    dys = [cm.gather(dy_ref.at[b, rows, cols, ch], pix_ok & (ch < c)).astype(_F32) for ch in blocks]

    def tap(t, acc):
        m, n = lax.div(t, kw), lax.rem(t, kw)
        r, q = rows * sh + m * dh - ptop, cols * sw + n * dw - pleft
        inner = jnp.zeros_like(acc)
        for ch, dyt in zip(blocks, dys, strict=True):
            xt = cm.gather(
                x_ref.at[b, r, q, ch], pix_ok & cm.inside(r, q, h, w) & (ch < c), cm.KEEP
            )
            inner += jnp.sum(xt.astype(_F32) * dyt, axis=1, keepdims=True)
        return acc + inner * _weight(eta, zeta, _features(m, n, (kh, kw), len(eta)), moments)

    acc = lax.fori_loop(0, kh * kw, tap, jnp.zeros((rows.shape[0], 1), _F32))
    plt.store(ds_ref.at[b, rows, cols], acc.astype(ds_ref.dtype), mask=pix_ok)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers
# ------------------------------------------------------------------------------------------------


def forward(x, s, eta, zeta, call: KernelCall) -> jax.Array:
    """The Gaussian filter: x [N, H, W, C] (scale s, parameters eta, zeta [N, Ho, Wo(, P)])
    -> y [N, Ho, Wo, C]."""
    return _forward(x, s, eta, zeta, (), call)


def forward_jvp(x, s, eta, zeta, tx, ts, teta, tzeta, call: KernelCall) -> jax.Array:
    """The filter's tangent for tangents of x, s, eta and zeta (None for a zero one), in one
    kernel."""
    return _forward(x, s, eta, zeta, (tx, ts, teta, tzeta), call)


def _forward(x, s, eta, zeta, tangents, call: KernelCall) -> jax.Array:
    n, ho, wo, c = call.out_shape
    bs = call.block_sizes or pixel_block_sizes(
        "forward", channels=c, groups=1, out_hw=(ho, wo), batch=n, dtype=x.dtype
    )
    n_th = pl.cdiv(ho, bs.block_h)
    grid = (pl.cdiv(c, bs.block_channels), pl.cdiv(wo, bs.block_w), n * n_th)
    body = functools.partial(_forward_kernel, g=call.geom, bs=bs, moments=call.moments, n_th=n_th)
    name = "gaussian_forward_jvp" if tangents else "gaussian_forward"
    return cm.run(body, (x, s, eta, zeta, *tangents), call, name=name, grid=grid, tiles=bs)


def grad_x(s, dy, eta, zeta, call: KernelCall) -> jax.Array:
    """The filter's transpose in x (the splat): dy [N, Ho, Wo, C] -> [N, H, W, C]."""
    return _grad_x(s, dy, eta, zeta, (), call)


def grad_x_jvp(s, dy, eta, zeta, ts, tdy, teta, tzeta, call: KernelCall) -> jax.Array:
    """The splat's tangent for tangents of s, dy, eta and zeta (None for a zero one), in one
    kernel."""
    return _grad_x(s, dy, eta, zeta, (ts, tdy, teta, tzeta), call)


def _grad_x(s, dy, eta, zeta, tangents, call: KernelCall) -> jax.Array:
    n, h, w, c = call.out_shape
    sh, sw = call.geom.stride
    hq, wq = pl.cdiv(h, sh), pl.cdiv(w, sw)
    bs = call.block_sizes or pixel_block_sizes(
        "grad_x", channels=c, groups=1, out_hw=(hq, wq), batch=n * sh * sw, dtype=dy.dtype
    )
    n_th, n_tw = pl.cdiv(hq, bs.block_h), pl.cdiv(wq, bs.block_w)
    grid = (pl.cdiv(c, bs.block_channels), sw * n_tw, n * sh * n_th)
    body = functools.partial(
        _grad_x_kernel, g=call.geom, bs=bs, moments=call.moments, n_th=n_th, n_tw=n_tw
    )
    out = jax.ShapeDtypeStruct(call.out_shape, dy.dtype)
    name = "gaussian_grad_x_jvp" if tangents else "gaussian_grad_x"
    operands = (s, dy, eta, zeta, *tangents)
    return cm.run(body, operands, call, name=name, grid=grid, tiles=bs, out=out)


def grad_s_block_sizes(*, channels: int, out_hw, batch: int, dtype) -> PixelBlockSizes:
    """``grad_s``'s tiles: the per-pixel ``grad_k``'s, with 8 warps for tiles of 1024 pixels or
    more: each pixel's parameters, image channels and sum live across the tap loop, and 1024
    pixels at 4 warps took 168-194 registers a thread (sm_90, 31x31 bf16; 4 bytes spilled by
    the ptxas of triton 3.9), at 8 warps 102-119 and 40% fewer instructions."""
    bs = pixel_block_sizes(
        "grad_k", channels=channels, groups=1, out_hw=out_hw, batch=batch, dtype=dtype
    )
    if bs.block_h * bs.block_w >= 1024:
        bs = dataclasses.replace(bs, num_warps=max(bs.num_warps, 8))
    return bs


def grad_s(x, dy, eta, zeta, call: KernelCall) -> jax.Array:
    """The filter's gradient in its scale: ``ds[p] = sum_tap w sum_c x[pos] dy[p]``, [N, Ho,
    Wo]."""
    n, ho, wo = call.out_shape
    bs = call.block_sizes or grad_s_block_sizes(
        channels=x.shape[3], out_hw=(ho, wo), batch=n, dtype=x.dtype
    )
    n_th = pl.cdiv(ho, bs.block_h)
    grid = (1, pl.cdiv(wo, bs.block_w), n * n_th)
    body = functools.partial(_grad_s_kernel, g=call.geom, bs=bs, moments=call.moments, n_th=n_th)
    return cm.run(body, (x, dy, eta, zeta), call, name="gaussian_grad_s", grid=grid, tiles=bs)
