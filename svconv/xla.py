"""The XLA path: every op and every gradient as a loop over taps of shifted (strided) slices.

Each function has the signature of its Pallas counterpart in ``pallas_kernels``: the arrays of
the family's other slots in slot order (one float dtype), then ``geom``, ``out_shape`` and, for
the families with dots, ``precision`` (see ``svconv._primitive.Family``). Accumulation is
float32; results take the input dtype.

Why a tap loop: for each tap ``(m, n)`` the input seen by all output pixels is one strided slice
of the padded input (``_tap``), and its transpose is one interior-padded ``lax.pad`` (``_untap``).
A modulated conv is then ``kh*kw`` GEMMs ``[P, Cin] x [Cin, Cout]`` with a per-row scale, and a
per-pixel filter ``kh*kw`` fused multiply-adds; XLA fuses the slices into the consumers, so no
``kh*kw``-times patch tensor is built. ``modulated_forward_patches`` and ``pixel_forward_patches``
are the patch-tensor formulations, kept for the benchmark that justifies this choice
(``make bench``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from pallas_kernels.geometry import Geometry
from svconv import gaussian

_F32 = jnp.float32


def _pad(x, padding):
    (pt, pb), (pl, pr) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


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


def _by_row_blocks(fn, x, row_arrays, geom: Geometry, block_bytes=1 << 19):
    """``fn`` over blocks of output rows, so that each block's per-tap temporaries stay in cache.

    XLA's CPU backend runs a tap loop as separate GEMMs and elementwise passes over image-sized
    temporaries; on blocks of a few rows the same loop is memory-light (measured 1.6x faster on
    the modulated forward). ``fn(x_block, *row_blocks, geom=...)`` computes the op on an input
    block padded in width only; ``row_arrays`` are ``(array, axis)`` pairs indexed by output row
    (``d``, ``k``, local ``w``). Results are concatenated along axis 1 (output rows).
    """
    (pt, _), (pl, pr) = geom.padding
    out_rows, kernel_h = geom.out_size[0], geom.kernel_size[0]
    stride_h, dilation_h = geom.stride[0], geom.dilation[0]
    row_bytes = x.shape[0] * (x.shape[2] + pl + pr) * x.shape[3] * x.dtype.itemsize * stride_h
    rows = 1 << max(0, (block_bytes // max(row_bytes, 1)).bit_length() - 1)
    if rows >= out_rows:
        return fn(x, *(a for a, _ in row_arrays), geom=geom)
    blocks = -(-out_rows // rows)
    span = (rows - 1) * stride_h + (kernel_h - 1) * dilation_h + 1
    needed = (blocks * rows - 1) * stride_h + (kernel_h - 1) * dilation_h + 1
    # Negative top padding crops; the rows past the input (or below a crop) are zeros.
    xr = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        ((0, 0, 0), (pt, needed - x.shape[1] - pt, 0), (0, 0, 0), (0, 0, 0)),
    )
    block_geom = Geometry.of(
        (span, geom.in_size[1]),
        geom.kernel_size,
        geom.stride,
        geom.dilation,
        ((0, 0), geom.padding[1]),
    )
    padded = []
    for a, axis in row_arrays:
        cfg = [(0, 0, 0)] * a.ndim
        cfg[axis] = (0, blocks * rows - out_rows, 0)
        padded.append((lax.pad(a, jnp.zeros((), a.dtype), cfg), axis))

    def block(i):
        xb = lax.dynamic_slice_in_dim(xr, i * rows * stride_h, span, axis=1)
        parts = [lax.dynamic_slice_in_dim(a, i * rows, rows, axis=axis) for a, axis in padded]
        return fn(xb, *parts, geom=block_geom)

    ys = lax.map(block, jnp.arange(blocks))  # [blocks, N, rows, ...]
    ys = jnp.moveaxis(ys, 0, 1)
    return ys.reshape(ys.shape[0], blocks * rows, *ys.shape[3:])[:, :out_rows]


# ----------------------------------------------------------------------------- modulated conv


def modulated_forward(x, w, d, *, geom: Geometry, out_shape, precision=None):
    del out_shape  # [N, Ho, Wo, Cout]
    d = _batched_d(d)
    fn = functools.partial(_modulated_forward_taps, w=w, precision=precision)
    return _by_row_blocks(lambda xb, db, geom: fn(xb, d=db, geom=geom), x, [(d, 1)], geom)


def _modulated_forward_taps(x, w, d, *, geom: Geometry, precision):
    xp, d = _pad(x, geom.padding), _batched_d(d)
    # Modulate whichever side of the GEMM is narrower: same result, fewer multiplies.
    scale_input = w.shape[2] <= w.shape[3]
    y = 0.0
    for m, n in _taps(geom.kernel_size):
        xs, dt = _tap(xp, m, n, geom.out_size, geom.stride, geom.dilation), d[..., m, n, None]
        if scale_input:
            y = y + _dot(xs * dt, w[m, n], precision)
        else:
            y = y + _dot(xs, w[m, n], precision) * dt
    return y.astype(x.dtype)


def modulated_grad_x(w, d, dy, *, geom: Geometry, out_shape, precision=None):
    del out_shape  # [N, H, W, Cin]
    d = _batched_d(d)
    dx = 0.0
    for m, n in _taps(geom.kernel_size):
        u = _dot(dy, w[m, n].T, precision) * d[..., m, n, None]
        dx = dx + _untap(u, m, n, geom.in_size, geom.stride, geom.dilation, geom.padding)
    return dx.astype(dy.dtype)


def modulated_grad_w(x, d, dy, *, geom: Geometry, out_shape, precision=None):
    xp, d = _pad(x, geom.padding), _batched_d(d)
    # A plain 2-D GEMM is faster on CPU than a 3-axis contraction.
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = []
    for m, n in _taps(geom.kernel_size):
        xs = _tap(xp, m, n, geom.out_size, geom.stride, geom.dilation) * d[..., m, n, None]
        taps.append(
            lax.dot_general(
                xs.reshape(-1, xs.shape[-1]),
                dy2,
                (((0,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=_F32,
            )
        )
    return jnp.stack(taps).reshape(out_shape).astype(x.dtype)


def modulated_grad_d(x, w, dy, *, geom: Geometry, out_shape, precision=None):
    """``out_shape``: ``[N, Ho, Wo, kh, kw]``, or ``[Ho, Wo, kh, kw]`` for a batch-shared ``d``
    (summed over the batch)."""
    kernel_size = geom.kernel_size
    xp = _pad(x, geom.padding)
    w_taps = w.reshape(-1, *w.shape[2:])
    # dd_t = <x_t, dy @ w_t^T> over Cin, or <x_t @ w_t, dy> over Cout: contract the narrower.
    via_input = w.shape[2] <= w.shape[3]

    def tap(t):
        xs = _tap_at(xp, t, kernel_size, geom.out_size, geom.stride, geom.dilation)
        wt = lax.dynamic_index_in_dim(w_taps, t, keepdims=False)
        if via_input:
            return jnp.sum(xs.astype(_F32) * _dot(dy, wt.T, precision), axis=-1)
        return jnp.sum(_dot(xs, wt, precision) * dy.astype(_F32), axis=-1)

    dd = _per_tap(tap, kernel_size, dy.shape[:3])
    if len(out_shape) == 4:
        dd = jnp.sum(dd, axis=0)
    return dd.astype(x.dtype)


def modulated_forward_patches(x, w, d, *, geom: Geometry, precision=None):
    """Patch-tensor formulation (``conv_general_dilated_patches`` + einsum), for comparison."""
    kh, kw, cin, cout = w.shape
    patches = lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        geom.stride,
        geom.padding,
        rhs_dilation=geom.dilation,
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


def local_forward(x, w, *, geom: Geometry, out_shape, precision=None):
    del out_shape  # [N, Ho, Wo, Cout]
    ho, wo, kh, kw, cin, cout = w.shape
    xp = _pad(x, geom.padding).transpose(_PIXEL_MAJOR)
    w = w.reshape(ho * wo, kh, kw, cin, cout)
    y = 0.0
    for m, n in _taps((kh, kw)):
        xs = _tap(xp, m, n, (ho, wo), geom.stride, geom.dilation, axes=(0, 1))
        y = y + _pixel_dot(xs.reshape(ho * wo, -1, cin), w[:, m, n], ((2,), (1,)), precision)
    return y.reshape(ho, wo, -1, cout).transpose(_NHWC).astype(x.dtype)


def local_grad_x(w, dy, *, geom: Geometry, out_shape, precision=None):
    del out_shape  # [N, H, W, Cin]
    ho, wo, kh, kw, cin, cout = w.shape
    dyt = dy.transpose(_PIXEL_MAJOR).reshape(ho * wo, -1, cout)
    w = w.reshape(ho * wo, kh, kw, cin, cout)
    dx = 0.0
    for m, n in _taps((kh, kw)):
        u = _pixel_dot(dyt, w[:, m, n], ((2,), (2,)), precision).reshape(ho, wo, -1, cin)
        dx = dx + _untap(
            u, m, n, geom.in_size, geom.stride, geom.dilation, geom.padding, axes=(0, 1)
        )
    return dx.transpose(_NHWC).astype(dy.dtype)


def local_grad_w(x, dy, *, geom: Geometry, out_shape, precision=None):
    ho, wo, cout = dy.shape[1], dy.shape[2], dy.shape[3]
    xp = _pad(x, geom.padding).transpose(_PIXEL_MAJOR)
    dyt = dy.transpose(_PIXEL_MAJOR).reshape(ho * wo, -1, cout)
    taps = []
    for m, n in _taps(geom.kernel_size):
        xs = _tap(xp, m, n, (ho, wo), geom.stride, geom.dilation, axes=(0, 1))
        xs = xs.reshape(ho * wo, -1, x.shape[3])
        taps.append(_pixel_dot(xs, dyt, ((1,), (1,)), precision))  # [Ho*Wo, Cin, Cout]
    return jnp.stack(taps, axis=1).reshape(out_shape).astype(x.dtype)


# ------------------------------------------------------------------------ per-pixel filters


def _grouped(x, groups):
    """``[..., C] -> [..., G, C // G]`` (channel ``c`` is in group ``c // (C // G)``)."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def pixel_forward(x, k, *, geom: Geometry, out_shape):
    """``y[b,i,j,c] = sum_{m,n} x[b,pos(i,m),pos(j,n),c] * k[b,i,j,m,n,g(c)]``."""
    groups = k.shape[5]
    xp = _grouped(_pad(x, geom.padding), groups)
    y = 0.0
    for m, n in _taps(geom.kernel_size):
        xs = _tap(xp, m, n, geom.out_size, geom.stride, geom.dilation, axes=(1, 2))
        y = y + xs.astype(_F32) * k[:, :, :, m, n, :, None].astype(_F32)
    return y.reshape(out_shape).astype(x.dtype)


def pixel_grad_x(k, dy, *, geom: Geometry, out_shape):
    """Transpose of :func:`pixel_forward` in ``x``: ``[N, Ho, Wo, C] -> [N, H, W, C]``."""
    groups = k.shape[5]
    dyg = _grouped(dy, groups).astype(_F32)
    dx = 0.0
    for m, n in _taps(geom.kernel_size):
        contrib = (dyg * k[:, :, :, m, n, :, None].astype(_F32)).reshape(dy.shape)
        dx = dx + _untap(contrib, m, n, geom.in_size, geom.stride, geom.dilation, geom.padding)
    return dx.reshape(out_shape).astype(dy.dtype)


def pixel_grad_k(x, dy, *, geom: Geometry, out_shape):
    """Gradient of :func:`pixel_forward` in ``k``: ``[N, Ho, Wo, kh, kw, G]``."""
    groups = out_shape[-1]
    xp = _pad(x, geom.padding)
    dyg = _grouped(dy, groups).astype(_F32)

    def tap(t):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        return jnp.sum(_grouped(xs, groups).astype(_F32) * dyg, axis=-1)

    return _per_tap(tap, geom.kernel_size, (*dy.shape[:3], groups)).astype(x.dtype)


def pixel_forward_patches(x, k, *, geom: Geometry):
    """Patch-tensor formulation of :func:`pixel_forward`, for comparison."""
    kh, kw, groups = k.shape[3:]
    patches = lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        geom.stride,
        geom.padding,
        rhs_dilation=geom.dilation,
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


# ------------------------------------------------------------------------- Gaussian filters
#
# The weights are computed per tap from the per-pixel parameters (svconv.gaussian), in a rolled
# loop over the taps: no [.., kh, kw] array, and the compile time does not grow with the window.


def _accumulation_dtype(*arrays):
    """float32, or float64 when an input is float64."""
    return jnp.result_type(_F32, *arrays)


def gaussian_forward(x, s, eta, zeta, *, geom: Geometry, out_shape, moments):
    """``y = s * sum_tap w[tap] * x[pos]`` with Gaussian weights ``w`` (svconv.gaussian)."""
    acc_dtype = _accumulation_dtype(x, eta)
    xp = _pad(x, geom.padding)

    def tap(t, acc):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        w = gaussian.tap_weight(t, eta, zeta, geom.kernel_size, moments)
        return acc + xs.astype(acc_dtype) * w[..., None].astype(acc_dtype)

    y = lax.fori_loop(0, geom.num_taps, tap, jnp.zeros(out_shape, acc_dtype))
    if s is not None:
        y = y * s[..., None].astype(acc_dtype)
    return y.astype(x.dtype)


def gaussian_grad_x(s, dy, eta, zeta, *, geom: Geometry, out_shape, moments):
    """Transpose of :func:`gaussian_forward` in ``x`` (the splat): ``[N, H, W, C]``.

    Each tap's contribution is placed into the padded frame with a dynamic update (strided
    outputs interleaved with zeros), and the padding is removed at the end.
    """
    acc_dtype = _accumulation_dtype(dy, eta)
    (pt, pb), (pl, pr) = geom.padding
    (h, w), (sh, sw), (dh, dw) = geom.in_size, geom.stride, geom.dilation
    kw = geom.kernel_size[1]
    scale = dy.astype(acc_dtype)
    if s is not None:
        scale = scale * s[..., None].astype(acc_dtype)
    zero = jnp.zeros((), acc_dtype)
    interleave = ((0, 0, 0), (0, 0, sh - 1), (0, 0, sw - 1), (0, 0, 0))

    def tap(t, acc):
        w = gaussian.tap_weight(t, eta, zeta, geom.kernel_size, moments).astype(acc_dtype)
        contrib = lax.pad(scale * w[..., None], zero, interleave)
        start = (0, (t // kw) * dh, (t % kw) * dw, 0)
        current = lax.dynamic_slice(acc, start, contrib.shape)
        return lax.dynamic_update_slice(acc, current + contrib, start)

    frame = (dy.shape[0], h + pt + pb, w + pl + pr, dy.shape[3])
    acc = lax.fori_loop(0, geom.num_taps, tap, jnp.zeros(frame, acc_dtype))
    dx = lax.pad(acc, zero, ((0, 0, 0), (-pt, -pb, 0), (-pl, -pr, 0), (0, 0, 0)))
    return dx.reshape(out_shape).astype(dy.dtype)


def gaussian_grad_s(x, dy, eta, zeta, *, geom: Geometry, out_shape, moments):
    """Gradient of :func:`gaussian_forward` in its scale ``s``: ``[N, Ho, Wo]``."""
    acc_dtype = _accumulation_dtype(x, eta)
    xp = _pad(x, geom.padding)
    dyf = dy.astype(acc_dtype)

    def tap(t, acc):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        w = gaussian.tap_weight(t, eta, zeta, geom.kernel_size, moments).astype(acc_dtype)
        return acc + w * jnp.sum(xs.astype(acc_dtype) * dyf, axis=-1)

    ds = lax.fori_loop(0, geom.num_taps, tap, jnp.zeros(out_shape, acc_dtype))
    return ds.astype(x.dtype)
