"""The XLA path: every op and every gradient as a loop over taps of shifted (strided) slices.

Each function has the signature of its Pallas counterpart in ``pallas_kernels`` (arrays of one
float dtype, geometry as keyword tuples) so that dispatch is uniform. Accumulation is float32;
results take the input dtype.

Why a tap loop: for each tap ``(m, n)`` the input seen by all output pixels is one strided slice
of the padded input (``_tap``), and its transpose is one interior-padded ``lax.pad`` (``_untap``).
A modulated conv is then ``kh*kw`` GEMMs ``[P, Cin] x [Cin, Cout]`` with a per-row scale, and a
per-pixel filter ``kh*kw`` fused multiply-adds; XLA fuses the slices into the consumers, so no
``kh*kw``-times patch tensor is built. ``modulated_conv2d_patches`` and ``pixel_gather_patches``
are the patch-tensor formulations, kept for the benchmark that justifies this choice
(``make bench``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _pad(x, padding):
    (pt, pb), (pl, pr) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def _out_size(in_size, kernel_size, stride, dilation, padding):
    return tuple(
        (size + lo + hi - (k - 1) * d - 1) // s + 1
        for size, k, s, d, (lo, hi) in zip(
            in_size, kernel_size, stride, dilation, padding, strict=True
        )
    )


def _tap(xp, m, n, out_size, stride, dilation, axes=(-3, -2)):
    """Slice of the padded input read by tap ``(m, n)``: its ``axes`` (height, width; by
    default ``[..., H, W, C]``) become ``(Ho, Wo)``."""
    (ho, wo), (sh, sw), (dh, dw) = out_size, stride, dilation
    start, limit, step = [0] * xp.ndim, list(xp.shape), [1] * xp.ndim
    for axis, first, count, s in zip(axes, (m * dh, n * dw), (ho, wo), (sh, sw), strict=True):
        start[axis], limit[axis], step[axis] = first, first + (count - 1) * s + 1, s
    return lax.slice(xp, start, limit, step)


def _untap(v, m, n, in_size, stride, dilation, padding, axes=(-3, -2)):
    """Transpose of ``_tap`` composed with the padding: places ``v`` (``(Ho, Wo)`` on ``axes``)
    where tap ``(m, n)`` read it, in the unpadded input frame ``(H, W)`` (negative pads crop)."""
    cfg = [(0, 0, 0)] * v.ndim
    for axis, size, first, s, (lo, _) in zip(
        axes, in_size, (m * dilation[0], n * dilation[1]), stride, padding, strict=True
    ):
        count = v.shape[axis]
        cfg[axis] = (first - lo, size - (first - lo) - (count - 1) * s - 1, s - 1)
    return lax.pad(v, jnp.zeros((), v.dtype), cfg)


def _taps(kernel_size):
    kh, kw = kernel_size
    return [(m, n) for m in range(kh) for n in range(kw)]


def _tap_at(xp, t, kernel_size, out_size, stride, dilation):
    """``_tap`` for a traced tap index ``t = m * kw + n`` (inside a loop over taps)."""
    (ho, wo), (sh, sw), (dh, dw) = out_size, stride, dilation
    m, n = t // kernel_size[1], t % kernel_size[1]
    lead = xp.ndim - 3
    window = lax.dynamic_slice(
        xp,
        (0,) * lead + (m * dh, n * dw, 0),
        xp.shape[:lead] + ((ho - 1) * sh + 1, (wo - 1) * sw + 1, xp.shape[-1]),
    )
    if (sh, sw) == (1, 1):
        return window
    return lax.slice(window, (0,) * xp.ndim, window.shape, (1,) * lead + (sh, sw, 1))


def _per_tap(fn, kernel_size, shape):
    """``fn(t)`` (of shape ``shape = [N, Ho, Wo, ...]``) for every tap ``t``, returned as
    ``[N, Ho, Wo, kh, kw, ...]``.

    One compiled loop body instead of an unrolled Python loop: for per-tap reductions XLA's CPU
    backend otherwise writes every shifted input slice to its own buffer (``kh*kw`` copies).
    """
    taps = kernel_size[0] * kernel_size[1]

    def body(t, acc):
        return lax.dynamic_update_index_in_dim(acc, fn(t), t, 0)

    out = lax.fori_loop(0, taps, body, jnp.zeros((taps, *shape), _F32))
    out = jnp.moveaxis(out, 0, 3)
    return out.reshape(*shape[:3], *kernel_size, *shape[3:])


def _dot(a, b, precision):
    """``[..., K] x [K, N] -> [..., N]`` accumulated in float32."""
    return lax.dot_general(
        a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=_F32
    )


def _batched_d(d):
    return d if d.ndim == 5 else d[None]


def _by_row_blocks(
    fn, x, row_arrays, *, out_rows, kernel_h, stride_h, dilation_h, padding, block_bytes=1 << 19
):
    """``fn`` over blocks of output rows, so that each block's per-tap temporaries stay in cache.

    XLA's CPU backend runs a tap loop as separate GEMMs and elementwise passes over image-sized
    temporaries; on blocks of a few rows the same loop is memory-light (measured 1.6x faster on
    the modulated forward). ``fn(x_block, *row_blocks, padding=...)`` computes the op on an input
    block padded in width only; ``row_arrays`` are ``(array, axis)`` pairs indexed by output row
    (``d``, ``k``, local ``w``). Results are concatenated along axis 1 (output rows).
    """
    (pt, pb), (pl, pr) = padding
    row_bytes = x.shape[0] * (x.shape[2] + pl + pr) * x.shape[3] * x.dtype.itemsize * stride_h
    rows = 1 << max(0, (block_bytes // max(row_bytes, 1)).bit_length() - 1)
    if rows >= out_rows:
        return fn(x, *(a for a, _ in row_arrays), padding=padding)
    blocks = -(-out_rows // rows)
    span = (rows - 1) * stride_h + (kernel_h - 1) * dilation_h + 1
    needed = (blocks * rows - 1) * stride_h + (kernel_h - 1) * dilation_h + 1
    xr = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        ((0, 0, 0), (pt, needed - x.shape[1] - pt, 0), (0, 0, 0), (0, 0, 0)),
    )
    padded = []
    for a, axis in row_arrays:
        cfg = [(0, 0, 0)] * a.ndim
        cfg[axis] = (0, blocks * rows - out_rows, 0)
        padded.append((lax.pad(a, jnp.zeros((), a.dtype), cfg), axis))

    def block(i):
        xb = lax.dynamic_slice_in_dim(xr, i * rows * stride_h, span, axis=1)
        parts = [lax.dynamic_slice_in_dim(a, i * rows, rows, axis=axis) for a, axis in padded]
        return fn(xb, *parts, padding=((0, 0), (pl, pr)))

    ys = lax.map(block, jnp.arange(blocks))  # [blocks, N, rows, ...]
    ys = jnp.moveaxis(ys, 0, 1)
    return ys.reshape(ys.shape[0], blocks * rows, *ys.shape[3:])[:, :out_rows]


# ----------------------------------------------------------------------------- modulated conv


def modulated_conv2d_fwd(x, w, d, *, stride, dilation, padding, precision=None):
    d = _batched_d(d)
    fn = functools.partial(
        _modulated_fwd_taps, w=w, stride=stride, dilation=dilation, precision=precision
    )
    return _by_row_blocks(
        lambda xb, db, padding: fn(xb, d=db, padding=padding),
        x,
        [(d, 1)],
        out_rows=d.shape[1],
        kernel_h=w.shape[0],
        stride_h=stride[0],
        dilation_h=dilation[0],
        padding=padding,
    )


def _modulated_fwd_taps(x, w, d, *, stride, dilation, padding, precision):
    kernel_size = w.shape[:2]
    out_size = _out_size(x.shape[1:3], kernel_size, stride, dilation, padding)
    xp, d = _pad(x, padding), _batched_d(d)
    # Modulate whichever side of the GEMM is narrower: same result, fewer multiplies.
    scale_input = w.shape[2] <= w.shape[3]
    y = 0.0
    for m, n in _taps(kernel_size):
        xs, dt = _tap(xp, m, n, out_size, stride, dilation), d[..., m, n, None]
        if scale_input:
            y = y + _dot(xs * dt, w[m, n], precision)
        else:
            y = y + _dot(xs, w[m, n], precision) * dt
    return y.astype(x.dtype)


def modulated_conv2d_grad_x(dy, w, d, *, input_size, stride, dilation, padding, precision=None):
    d = _batched_d(d)
    dx = 0.0
    for m, n in _taps(w.shape[:2]):
        u = _dot(dy, w[m, n].T, precision) * d[..., m, n, None]
        dx = dx + _untap(u, m, n, input_size, stride, dilation, padding)
    return dx.astype(dy.dtype)


def modulated_conv2d_grad_w(x, dy, d, *, kernel_size, stride, dilation, padding, precision=None):
    xp, d = _pad(x, padding), _batched_d(d)
    out_size = dy.shape[1:3]
    dy2 = dy.reshape(
        -1, dy.shape[-1]
    )  # a plain 2-D GEMM is faster on CPU than a 3-axis contraction
    taps = []
    for m, n in _taps(kernel_size):
        xs = _tap(xp, m, n, out_size, stride, dilation) * d[..., m, n, None]
        taps.append(
            lax.dot_general(
                xs.reshape(-1, xs.shape[-1]),
                dy2,
                (((0,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=_F32,
            )
        )
    kh, kw = kernel_size
    return jnp.stack(taps).reshape(kh, kw, *taps[0].shape).astype(x.dtype)


def modulated_conv2d_grad_d(x, w, dy, *, batched, stride, dilation, padding, precision=None):
    kernel_size = w.shape[:2]
    xp, out_size = _pad(x, padding), dy.shape[1:3]
    w_taps = w.reshape(-1, *w.shape[2:])
    # dd_t = <x_t, dy @ w_t^T> over Cin, or <x_t @ w_t, dy> over Cout: contract the narrower.
    via_input = w.shape[2] <= w.shape[3]

    def tap(t):
        xs = _tap_at(xp, t, kernel_size, out_size, stride, dilation)
        wt = lax.dynamic_index_in_dim(w_taps, t, keepdims=False)
        if via_input:
            return jnp.sum(xs.astype(_F32) * _dot(dy, wt.T, precision), axis=-1)
        return jnp.sum(_dot(xs, wt, precision) * dy.astype(_F32), axis=-1)

    dd = _per_tap(tap, kernel_size, dy.shape[:3])
    if not batched:
        dd = jnp.sum(dd, axis=0)
    return dd.astype(x.dtype)


def modulated_conv2d_patches(x, w, d, *, stride, dilation, padding, precision=None):
    """Patch-tensor formulation (``conv_general_dilated_patches`` + einsum), for comparison."""
    kh, kw, cin, cout = w.shape
    patches = lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        stride,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    n, ho, wo, _ = patches.shape
    patches = patches.reshape(n, ho, wo, cin, kh * kw)  # features are ordered (c, m, n)
    d = jnp.broadcast_to(_batched_d(d), (n, ho, wo, kh, kw)).reshape(n, ho, wo, 1, kh * kw)
    y = jnp.einsum(
        "bhwct,tco->bhwo",
        patches * d,
        w.reshape(kh * kw, cin, cout),
        precision=precision,
        preferred_element_type=_F32,
    )
    return y.astype(x.dtype)


# ------------------------------------------------------------------------------- local conv


# Local conv is one small GEMM per output pixel: written as an explicit batched dot over pixels
# in a pixel-major layout (``[Ho*Wo, N, C] x [Ho*Wo, C, O]``), measured 2.2x faster on CPU than
# the same contraction as an einsum over NHWC.
_PIXEL_MAJOR = (1, 2, 0, 3)  # [N, H, W, C] -> [H, W, N, C]
_NHWC = (2, 0, 1, 3)  # back


def _pixel_dot(a, b, contract, precision):
    """Batched over the leading (pixel) axis; contracts ``a``'s and ``b``'s ``contract`` axes."""
    return lax.dot_general(
        a,
        b,
        ((contract[0], contract[1]), ((0,), (0,))),
        precision=precision,
        preferred_element_type=_F32,
    )


def local_conv2d_fwd(x, w, *, stride, dilation, padding, precision=None):
    ho, wo, kh, kw, cin, cout = w.shape
    xp = _pad(x, padding).transpose(_PIXEL_MAJOR)
    w = w.reshape(ho * wo, kh, kw, cin, cout)
    y = 0.0
    for m, n in _taps((kh, kw)):
        xs = _tap(xp, m, n, (ho, wo), stride, dilation, axes=(0, 1)).reshape(ho * wo, -1, cin)
        y = y + _pixel_dot(xs, w[:, m, n], ((2,), (1,)), precision)
    return y.reshape(ho, wo, -1, cout).transpose(_NHWC).astype(x.dtype)


def local_conv2d_grad_x(dy, w, *, input_size, stride, dilation, padding, precision=None):
    ho, wo, kh, kw, cin, cout = w.shape
    dyt = dy.transpose(_PIXEL_MAJOR).reshape(ho * wo, -1, cout)
    w = w.reshape(ho * wo, kh, kw, cin, cout)
    dx = 0.0
    for m, n in _taps((kh, kw)):
        u = _pixel_dot(dyt, w[:, m, n], ((2,), (2,)), precision).reshape(ho, wo, -1, cin)
        dx = dx + _untap(u, m, n, input_size, stride, dilation, padding, axes=(0, 1))
    return dx.transpose(_NHWC).astype(dy.dtype)


def local_conv2d_grad_w(x, dy, *, kernel_size, stride, dilation, padding, precision=None):
    ho, wo, cout = dy.shape[1], dy.shape[2], dy.shape[3]
    xp = _pad(x, padding).transpose(_PIXEL_MAJOR)
    dyt = dy.transpose(_PIXEL_MAJOR).reshape(ho * wo, -1, cout)
    taps = []
    for m, n in _taps(kernel_size):
        xs = _tap(xp, m, n, (ho, wo), stride, dilation, axes=(0, 1)).reshape(
            ho * wo, -1, x.shape[3]
        )
        taps.append(_pixel_dot(xs, dyt, ((1,), (1,)), precision))  # [Ho*Wo, Cin, Cout]
    dw = jnp.stack(taps, axis=1)
    return dw.reshape(ho, wo, *kernel_size, x.shape[3], cout).astype(x.dtype)


# ------------------------------------------------------------------------ per-pixel filters


def _grouped(x, groups):
    """``[..., C] -> [..., G, C // G]`` (channel ``c`` is in group ``c // (C // G)``)."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def pixel_gather(x, k, *, stride, dilation, padding):
    """``y[b,i,j,c] = sum_{m,n} x[b,pos(i,m),pos(j,n),c] * k[b,i,j,m,n,g(c)]``."""
    kernel_size, groups = k.shape[3:5], k.shape[5]
    xp = _grouped(_pad(x, padding), groups)
    out_size = k.shape[1:3]
    y = 0.0
    for m, n in _taps(kernel_size):
        xs = _tap(xp, m, n, out_size, stride, dilation, axes=(1, 2))
        y = y + xs.astype(_F32) * k[:, :, :, m, n, :, None].astype(_F32)
    return y.reshape(*y.shape[:3], -1).astype(x.dtype)


def pixel_scatter(v, k, *, input_size, stride, dilation, padding):
    """Transpose of :func:`pixel_gather` with respect to ``x``: ``[N,Ho,Wo,C] -> [N,H,W,C]``."""
    kernel_size, groups = k.shape[3:5], k.shape[5]
    vg = _grouped(v, groups).astype(_F32)
    y = 0.0
    for m, n in _taps(kernel_size):
        contrib = vg * k[:, :, :, m, n, :, None].astype(_F32)
        y = y + _untap(contrib.reshape(v.shape), m, n, input_size, stride, dilation, padding)
    return y.astype(v.dtype)


def pixel_correlate(x, v, *, kernel_size, groups, stride, dilation, padding):
    """Gradient of :func:`pixel_gather` with respect to ``k``: ``[N, Ho, Wo, kh, kw, G]``."""
    xp = _pad(x, padding)
    vg = _grouped(v, groups).astype(_F32)
    out_size = v.shape[1:3]

    def tap(t):
        xs = _grouped(_tap_at(xp, t, kernel_size, out_size, stride, dilation), groups)
        return jnp.sum(xs.astype(_F32) * vg, axis=-1)

    return _per_tap(tap, kernel_size, (*v.shape[:3], groups)).astype(x.dtype)


def pixel_gather_patches(x, k, *, stride, dilation, padding):
    """Patch-tensor formulation of :func:`pixel_gather`, for comparison."""
    kh, kw, groups = k.shape[3:]
    patches = lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        stride,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    n, ho, wo, _ = patches.shape
    patches = patches.reshape(n, ho, wo, groups, x.shape[-1] // groups, kh * kw)
    y = jnp.einsum(
        "bhwgct,bhwtg->bhwgc",
        patches,
        k.reshape(n, ho, wo, kh * kw, groups),
        preferred_element_type=_F32,
    )
    return y.reshape(n, ho, wo, -1).astype(x.dtype)
