"""The XLA path: every op and every gradient from XLA's GEMMs and fused elementwise loops.

Each function has the signature of its Pallas counterpart in ``pallas_kernels``: the arrays of
the family's other slots in slot order (one dtype), then a
:class:`~pallas_kernels.geometry.KernelCall` (see ``svconv._primitive.Family``). Accumulation is
float32 for 16-bit inputs (float64 stays float64); results take the input dtype.

The formulations, chosen by measurement on CPU (``experiments/notes/xla-cpu.md``); none builds
a ``kh*kw``-times patch tensor of the whole image:

* **Modulated conv, forward and gradient in x: one GEMM per block of rows with every tap in its
  output.** ``y[p] = sum_t d[p, t] * (x @ w_t)[p + offset_t]``: per block of output rows (whole
  images when they are small), one GEMM ``x_block @ [Cin, taps * Cout]``, then one fused loop
  that sums the taps' shifted slices of the product, each scaled by ``d``; the block is sized for
  the cache. The gradient in ``x`` is the same computation in gather form on ``dy`` spread onto
  the input grid (``d`` moving with it), with no interior-padded scatter per tap.
* **Modulated gradients in w and d, local conv: one GEMM per tap in a rolled loop** (long GEMMs
  over every pixel, or the local conv's batched per-pixel dots), as fast as unrolled on CPU.
  Above ``_UNROLLED_TAPS`` taps the modulated forward and gradient in ``x`` are rolled per-tap
  loops as well.
* **Per-pixel filters**: fused multiply-adds over shifted slices (memory-bound), unrolled up to
  ``_UNROLLED_FILTER_TAPS`` taps, the gradient in the input in gather form; the gradient in the
  filters, a local correlation, as one GEMM per tile of output pixels against its whole input
  window (per-tap reductions over channels are slow scalar loops on CPU).

Rolled loops keep the compile time independent of the window (31x31: well under 2 s).

``modulated_forward_patches`` and ``pixel_forward_patches`` are the patch-tensor formulations,
kept for the benchmark (``make bench``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.geometry import Geometry, KernelCall, vary_like
from svconv import gaussian
from svconv._checks import accumulation_dtype

_F32 = jnp.float32
# A block's intermediate (bytes): large enough that each GEMM call is efficient, small enough
# to stay in the cache.
_BLOCK_BYTES = 4 << 20
# Above these many taps, tap loops are rolled (compile time no longer grows with the window).
# The modulated conv's tap loops feed GEMMs and are rolled early: a rolled loop of per-tap GEMMs
# is as fast from 5x5 up, and each unrolled tap adds compile time. The per-pixel filter's fused
# multiply-adds are much faster unrolled and compile quickly (15x15: 1.4 s with its gradients).
_UNROLLED_TAPS = 25
_UNROLLED_FILTER_TAPS = 256


def _pad(x, padding):
    (pt, pb), (pl, pr) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def _span(count, stride, kernel, dilation):
    """Input extent along one axis read by ``count`` outputs."""
    return (count - 1) * stride + (kernel - 1) * dilation + 1


def _window(v, start, count, stride, axes=(1, 2)):
    """The strided slice of ``v`` on ``axes`` (height, width) that ``count`` outputs read at
    offset ``start``."""
    begin, limit, step = [0] * v.ndim, list(v.shape), [1] * v.ndim
    for axis, first, c, s in zip(axes, start, count, stride, strict=True):
        begin[axis], limit[axis], step[axis] = first, first + (c - 1) * s + 1, s
    return lax.slice(v, begin, limit, step)


def _tap_at(xp, t, kernel_size, out_size, stride, dilation):
    """The window of tap ``t = m * kw + n`` (traced, inside a loop over taps) of the padded
    input ``[..., H, W, C]``: ``[..., Ho, Wo, C]``."""
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


def _offsets(geom: Geometry, flipped=False):
    """Each tap's offset ``(m * dh, n * dw)`` into the padded input, taps in ``(m, n)`` order;
    ``flipped``: ``((kh-1-m) * dh, (kw-1-n) * dw)``, the offsets of the gather-form transpose."""
    (kh, kw), (dh, dw) = geom.kernel_size, geom.dilation
    out = []
    for m in range(kh):
        for n in range(kw):
            mm, nn = (kh - 1 - m, kw - 1 - n) if flipped else (m, n)
            out.append((mm * dh, nn * dw))
    return out


def _spread(v, geom: Geometry, axes=(1, 2)):
    """``v`` on the output grid spread onto the input grid for the gather form of the
    transpose: interleaved with ``stride - 1`` zeros and padded so that the transpose is
    ``dx[q] = sum_{m, n} v'[q + ((kh-1-m) * dh, (kw-1-n) * dw)]`` (``v'`` times tap ``(m, n)``'s
    weights), a stride-1 window sweep. Its height and width are ``H + (kh-1)*dh`` and
    ``W + (kw-1)*dw``; negative pads crop."""
    cfg = [(0, 0, 0)] * v.ndim
    for axis, size, kernel, stride, dilation, (lo, _), count in zip(
        axes,
        geom.in_size,
        geom.kernel_size,
        geom.stride,
        geom.dilation,
        geom.padding,
        geom.out_size,
        strict=True,
    ):
        before = (kernel - 1) * dilation - lo
        cfg[axis] = (before, size - 1 + lo - (count - 1) * stride, stride - 1)
    return lax.pad(v, jnp.zeros((), v.dtype), cfg)


def _batched_d(d):
    return d if d.ndim == 5 else d[None]


def _taps_last(d):
    """``d [N, Ho, Wo, kh, kw]`` or batch-shared ``[Ho, Wo, kh, kw]`` -> ``[N or 1, Ho, Wo, T]``."""
    d = _batched_d(d)
    return d.reshape(*d.shape[:3], -1)


def _dot(a, b, precision, acc):
    """``[..., K] x [K, N] -> [..., N]`` accumulated in ``acc``."""
    return lax.dot_general(
        a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=acc
    )


def _dot_pixels(a, b, precision, acc):
    """``[..., K]^T x [..., N] -> [K, N]``, contracting every leading (pixel) axis."""
    return lax.dot_general(
        a.reshape(-1, a.shape[-1]),
        b.reshape(-1, b.shape[-1]),
        (((0,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=acc,
    )


# ------------------------------------------------------------------------- blocks of rows


def _plan(n, rows, size):
    """``(images, rows)`` per block: the largest block whose ``size(images, rows)`` (bytes) fits
    ``_BLOCK_BYTES``; whole images when one fits, else rows of one image (at least one)."""
    if size(1, rows) <= _BLOCK_BYTES:
        images = max(1, min(n, _BLOCK_BYTES // size(1, rows)))
        return -(-n // -(-n // images)), rows  # as even as the count of blocks allows
    lo, hi = 1, rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(1, mid) <= _BLOCK_BYTES else (lo, mid - 1)
    return 1, -(-rows // -(-rows // lo))


def _rows(a, b, r, images, rows):
    """``a[b : b + images, r : r + rows]``; an array with a batch of 1 is batch-shared (its
    only image serves every block)."""
    if a.shape[0] == 1:
        b, images = 0, 1
    return lax.dynamic_slice(a, (b, r) + (0,) * (a.ndim - 2), (images, rows, *a.shape[2:]))


def _loop(count, body, init, *operands):
    """``lax.fori_loop(0, count, body, init)``, the initial carry typed as what ``body`` computes
    from ``operands``: inside ``jax.shard_map`` a fresh array is invariant while the operands may
    vary over manual axes, and a loop's carry keeps one type."""
    return lax.fori_loop(0, count, body, jax.tree.map(lambda v: vary_like(v, *operands), init))


def _blocked(out_shape, dtype, plan, compute, *like):
    """The result ``out_shape`` from its blocks: ``compute(b, r)`` is the block of ``plan``'s
    images and rows that starts at image ``b``, row ``r``, from the arrays ``like``. The last
    block along each axis is moved back to fit (it recomputes a few rows of the one before)."""
    n, total = out_shape[:2]
    images, rows = plan
    per_image = -(-total // rows)
    count = -(-n // images) * per_image
    if count == 1:
        return compute(0, 0).astype(dtype)

    def body(i, out):
        b = jnp.minimum(i // per_image * images, n - images)
        r = jnp.minimum(i % per_image * rows, total - rows)
        # A fusion of its own: fused into the in-place update it would run on one thread.
        block = lax.optimization_barrier(compute(b, r).astype(dtype))
        return lax.dynamic_update_slice(out, block, (b, r) + (0,) * (len(out_shape) - 2))

    return _loop(count, body, jnp.zeros(out_shape, dtype), *like)


# ----------------------------------------------------------------------------- modulated conv


def _product_taps(a, wmat, dmod, offsets, stride, out_shape, *, at_source, precision):
    """``out[b, i, j] = sum_t (a @ wmat)[b, i*sh + oh_t, j*sw + ow_t, t] * dmod_t``, over blocks
    of output rows.

    ``a [N, Ha, Wa, K]`` is the (padded) source, ``wmat [K, T * C]`` every tap's weights,
    ``offsets`` each tap's ``(oh_t, ow_t)``; ``dmod [N or 1, ..., T]`` is on the output grid, or
    with ``at_source`` on the source grid (it moves with ``a``). One GEMM per block with all taps
    in its output, then one fused loop over the taps.
    """
    n, ho, wo, c = out_shape
    (sh, sw), taps = stride, len(offsets)
    acc = accumulation_dtype(a.dtype)
    reach_h, reach_w = (max(o[i] for o in offsets) for i in (0, 1))
    width = (wo - 1) * sw + reach_w + 1
    a = a[:, :, :width]
    dmod = dmod[:, :, :width] if at_source else dmod

    def span(rows):
        return (rows - 1) * sh + reach_h + 1

    item = jnp.dtype(acc).itemsize
    plan = _plan(n, ho, lambda images, rows: images * span(rows) * width * taps * c * item)
    images, rows = plan

    def compute(b, r):
        u = _dot(_rows(a, b, r * sh, images, span(rows)), wmat, precision, acc)
        u = u.reshape(*u.shape[:3], taps, c)
        if at_source:
            dm = _rows(dmod, b, r * sh, images, span(rows)).astype(acc)
        else:
            dm = _rows(dmod, b, r, images, rows).astype(acc)
        out = 0.0
        for t, start in enumerate(offsets):
            if at_source:
                out = out + _window(u[..., t, :] * dm[..., t, None], start, (rows, wo), stride)
            else:
                out = out + _window(u[..., t, :], start, (rows, wo), stride) * dm[..., t, None]
        return out

    return _blocked(out_shape, a.dtype, plan, compute, a, wmat, dmod)


def _tap_major(d):
    """``d`` as ``[T, N or 1, Ho, Wo]``: each tap's slice contiguous, for rolled tap loops."""
    return jnp.moveaxis(_taps_last(d), 3, 0)


def modulated_forward(x, w, d, call: KernelCall):
    geom, out_shape, precision = call.geom, call.out_shape, call.precision
    kh, kw, cin, cout = w.shape
    taps = kh * kw
    xp = _pad(x, geom.padding)
    if taps > _UNROLLED_TAPS:
        return _modulated_forward_rolled(xp, w, _tap_major(d), geom, out_shape, precision)
    wmat = w.reshape(taps, cin, cout).transpose(1, 0, 2).reshape(cin, taps * cout)
    return _product_taps(
        xp,
        wmat,
        _taps_last(d),
        _offsets(geom),
        geom.stride,
        out_shape,
        at_source=False,
        precision=precision,
    )


def _modulated_forward_rolled(xp, w, d, geom, out_shape, precision):
    acc = accumulation_dtype(xp.dtype)
    w = w.reshape(-1, *w.shape[2:])

    def tap(t, y):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        xs = xs.astype(acc) * lax.dynamic_index_in_dim(d, t, keepdims=False)[..., None]
        return y + _dot(xs, lax.dynamic_index_in_dim(w, t, keepdims=False), precision, acc)

    y = _loop(geom.num_taps, tap, jnp.zeros(out_shape, acc), xp, w, d)
    return y.astype(xp.dtype)


def modulated_grad_x(w, d, dy, call: KernelCall):
    """Transpose of :func:`modulated_forward` in ``x``: ``[N, Ho, Wo, Cout] -> [N, H, W, Cin]``,
    in gather form on ``dy`` spread onto the input grid (:func:`_spread`)."""
    geom, out_shape, precision = call.geom, call.out_shape, call.precision
    kh, kw, cin, cout = w.shape
    taps = kh * kw
    if taps > _UNROLLED_TAPS:
        return _modulated_grad_x_rolled(w, _tap_major(d), dy, geom, out_shape, precision)
    wmat = w.reshape(taps, cin, cout).transpose(2, 0, 1).reshape(cout, taps * cin)
    d = _taps_last(d)
    return _product_taps(
        _spread(dy, geom),
        wmat,
        _spread(d, geom),
        _offsets(geom, flipped=True),
        (1, 1),
        out_shape,
        at_source=True,
        precision=precision,
    )


def _modulated_grad_x_rolled(w, d, dy, geom, out_shape, precision):
    """Each tap's contribution added into the padded frame at its (traced) offset."""
    acc = accumulation_dtype(dy.dtype)
    (pt, pb), (pl, pr) = geom.padding
    (h, wd), (sh, sw), (dh, dw) = geom.in_size, geom.stride, geom.dilation
    kw = geom.kernel_size[1]
    w = w.reshape(-1, *w.shape[2:])
    zero = jnp.zeros((), acc)
    interleave = ((0, 0, 0), (0, 0, sh - 1), (0, 0, sw - 1), (0, 0, 0))

    def tap(t, frame):
        wt = lax.dynamic_index_in_dim(w, t, keepdims=False)
        v = (
            _dot(dy, wt.T, precision, acc)
            * lax.dynamic_index_in_dim(d, t, keepdims=False)[..., None]
        )
        v = lax.pad(v, zero, interleave)
        start = (0, (t // kw) * dh, (t % kw) * dw, 0)
        return lax.dynamic_update_slice(frame, lax.dynamic_slice(frame, start, v.shape) + v, start)

    frame = (dy.shape[0], h + pt + pb, wd + pl + pr, w.shape[1])
    frame = _loop(geom.num_taps, tap, jnp.zeros(frame, acc), w, d, dy)
    dx = lax.pad(frame, zero, ((0, 0, 0), (-pt, -pb, 0), (-pl, -pr, 0), (0, 0, 0)))
    return dx.astype(dy.dtype)


def modulated_grad_w(x, d, dy, call: KernelCall):
    """``dw[m, n] = sum_p (x_mn * d_mn)[p]^T dy[p]``: one long GEMM
    ``[Cin, pixels] x [pixels, Cout]`` per tap, in a rolled loop (as fast as blocks of rows or an
    unrolled loop, and its compile time does not grow with the window)."""
    geom, out_shape, precision = call.geom, call.out_shape, call.precision
    xp, d = _pad(x, geom.padding), _tap_major(d)
    acc = accumulation_dtype(x.dtype)
    dyf = dy.astype(acc)

    def tap(t, dw):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        xs = xs.astype(acc) * lax.dynamic_index_in_dim(d, t, keepdims=False)[..., None]
        return lax.dynamic_update_index_in_dim(dw, _dot_pixels(xs, dyf, precision, acc), t, 0)

    dw = jnp.zeros((geom.num_taps, *out_shape[2:]), acc)
    return _loop(geom.num_taps, tap, dw, x, d, dy).reshape(out_shape).astype(x.dtype)


def modulated_grad_d(x, w, dy, call: KernelCall):
    """``dd[p, t] = <x_t[p], (dy @ w_t^T)[p]>`` over ``Cin``, tap by tap in a rolled loop (the
    per-tap reductions cost the same unrolled or over blocks of rows).

    ``out_shape``: ``[N, Ho, Wo, kh, kw]``, or ``[Ho, Wo, kh, kw]`` for a batch-shared ``d``
    (summed over the batch)."""
    geom, out_shape, precision = call.geom, call.out_shape, call.precision
    xp, acc = _pad(x, geom.padding), accumulation_dtype(x.dtype)
    w = w.reshape(-1, *w.shape[2:])

    def tap(t, dd):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        g = _dot(dy, lax.dynamic_index_in_dim(w, t, keepdims=False).T, precision, acc)
        return lax.dynamic_update_index_in_dim(dd, jnp.sum(xs.astype(acc) * g, axis=-1), t, 0)

    dd = _loop(geom.num_taps, tap, jnp.zeros((geom.num_taps, *dy.shape[:3]), acc), x, w, dy)
    dd = jnp.moveaxis(dd, 0, 3)
    if len(out_shape) == 4:
        dd = jnp.sum(dd, axis=0)
    return dd.reshape(out_shape).astype(x.dtype)


def _patches(x, kernel_size, geom: Geometry):
    """``conv_general_dilated_patches`` of ``x``: ``[n, ho, wo, c, kh*kw]`` (exact in float32)."""
    patches = lax.conv_general_dilated_patches(
        x,
        kernel_size,
        geom.stride,
        geom.padding,
        rhs_dilation=geom.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    n, ho, wo, _ = patches.shape
    return patches.reshape(n, ho, wo, x.shape[-1], -1)  # features are ordered (c, m, n)


def modulated_forward_patches(x, w, d, *, geom: Geometry, precision=None):
    """Patch-tensor formulation (``conv_general_dilated_patches`` + einsum), for comparison."""
    kh, kw, cin, cout = w.shape
    patches = _patches(x, (kh, kw), geom)
    n, ho, wo = patches.shape[:3]
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
# the same contraction as an einsum over NHWC; one tap at a time in a rolled loop (the forward
# measured 2.5x faster than unrolled, and the compile time does not grow with the window).
_PIXEL_MAJOR = (1, 2, 0, 3)  # [N, H, W, C] -> [H, W, N, C]
_NHWC = (2, 0, 1, 3)  # back


def _pixel_dot(a, b, contract, precision, acc):
    """Batched over the leading (pixel) axis; contracts ``a``'s and ``b``'s ``contract`` axes."""
    return lax.dot_general(
        a,
        b,
        ((contract[0], contract[1]), ((0,), (0,))),
        precision=precision,
        preferred_element_type=acc,
    )


def _tap_start(t, geom: Geometry):
    """Tap ``t``'s offset ``(m * dh, n * dw)`` into the padded input (``t`` int or traced)."""
    kw, (dh, dw) = geom.kernel_size[1], geom.dilation
    return (t // kw) * dh, (t % kw) * dw


def _window_at(v, start, count, stride, axes):
    """:func:`_window` at a traced ``start``."""
    begin, size = [0] * v.ndim, list(v.shape)
    for axis, first, c, s in zip(axes, start, count, stride, strict=True):
        begin[axis], size[axis] = first, (c - 1) * s + 1
    return _window(lax.dynamic_slice(v, begin, size), (0, 0), count, stride, axes)


def local_forward(x, w, call: KernelCall):
    geom, precision = call.geom, call.precision
    ho, wo, kh, kw, cin, cout = w.shape
    acc = accumulation_dtype(x.dtype)
    xp = _pad(x, geom.padding).transpose(_PIXEL_MAJOR)
    w = w.reshape(ho * wo, kh * kw, cin, cout)

    def tap(t, y):
        xs = _window_at(xp, _tap_start(t, geom), (ho, wo), geom.stride, axes=(0, 1))
        wt = lax.dynamic_index_in_dim(w, t, axis=1, keepdims=False)
        return y + _pixel_dot(xs.reshape(ho * wo, -1, cin), wt, ((2,), (1,)), precision, acc)

    y = _loop(kh * kw, tap, jnp.zeros((ho * wo, x.shape[0], cout), acc), x, w)
    return y.reshape(ho, wo, -1, cout).transpose(_NHWC).astype(x.dtype)


def local_grad_x(w, dy, call: KernelCall):
    """Each tap's contribution added into the padded input frame at its offset."""
    geom, precision = call.geom, call.precision
    ho, wo, kh, kw, cin, cout = w.shape
    acc = accumulation_dtype(dy.dtype)
    (pt, pb), (pl, pr) = geom.padding
    (h, wd), (sh, sw) = geom.in_size, geom.stride
    dyt = dy.transpose(_PIXEL_MAJOR).reshape(ho * wo, -1, cout)
    w = w.reshape(ho * wo, kh * kw, cin, cout)
    zero = jnp.zeros((), acc)
    interleave = ((0, 0, sh - 1), (0, 0, sw - 1), (0, 0, 0), (0, 0, 0))

    def tap(t, frame):
        wt = lax.dynamic_index_in_dim(w, t, axis=1, keepdims=False)
        u = _pixel_dot(dyt, wt, ((2,), (2,)), precision, acc).reshape(ho, wo, -1, cin)
        u = lax.pad(u, zero, interleave)
        start = (*_tap_start(t, geom), 0, 0)
        return lax.dynamic_update_slice(frame, lax.dynamic_slice(frame, start, u.shape) + u, start)

    frame = jnp.zeros((h + pt + pb, wd + pl + pr, dy.shape[0], cin), acc)
    frame = _loop(kh * kw, tap, frame, w, dy)
    dx = lax.pad(frame, zero, ((-pt, -pb, 0), (-pl, -pr, 0), (0, 0, 0), (0, 0, 0)))
    return dx.transpose(_NHWC).astype(dy.dtype)


def local_grad_w(x, dy, call: KernelCall):
    geom, out_shape, precision = call.geom, call.out_shape, call.precision
    ho, wo, kh, kw, cin, cout = out_shape
    acc = accumulation_dtype(x.dtype)
    xp = _pad(x, geom.padding).transpose(_PIXEL_MAJOR)
    dyt = dy.transpose(_PIXEL_MAJOR).reshape(ho * wo, -1, cout)

    def tap(t, dw):
        xs = _window_at(xp, _tap_start(t, geom), (ho, wo), geom.stride, axes=(0, 1))
        xs = xs.reshape(ho * wo, -1, cin)
        dw_t = _pixel_dot(xs, dyt, ((1,), (1,)), precision, acc)  # [Ho*Wo, Cin, Cout]
        return lax.dynamic_update_index_in_dim(dw, dw_t, t, 1)

    dw = _loop(kh * kw, tap, jnp.zeros((ho * wo, kh * kw, cin, cout), acc), x, dy)
    return dw.reshape(out_shape).astype(x.dtype)


# ------------------------------------------------------------------------ per-pixel filters


def _grouped(x, groups):
    """``[..., C] -> [..., G, C // G]`` (channel ``c`` is in group ``c // (C // G)``)."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def _filter_taps(src, k, offsets, out_size, stride, at_source, kernel_size):
    """``sum_t src[.., i*sh + oh_t, j*sw + ow_t, g, c] * k_t`` (``[N, Ho, Wo, G, Cg]``, in the
    accumulation dtype), ``src [N, Hs, Ws, G, Cg]``; ``k [N, ., ., kh, kw, G]`` on the output
    grid, or with ``at_source`` on the source grid (moving with ``src``). Fused multiply-adds,
    unrolled; above ``_UNROLLED_FILTER_TAPS`` taps, on blocks of output rows (the accumulator
    stays in cache), a loop over the rows of taps with each row's taps unrolled (each pass
    reads a contiguous run of taps of ``k``)."""
    acc = accumulation_dtype(src.dtype)
    kh, kw = kernel_size

    def kernel_row(src_m, k_m, starts, count):
        """The taps of one row: ``k_m [.., kw, G]``, ``starts`` their offsets into ``src_m``."""
        out = 0.0
        for n, start in enumerate(starts):
            if at_source:
                v = src_m.astype(acc) * k_m[..., n, :, None].astype(acc)
                out = out + _window(v, start, count, stride)
            else:
                v = _window(src_m, start, count, stride).astype(acc)
                out = out + v * k_m[..., n, :, None].astype(acc)
        return out

    if kh * kw <= _UNROLLED_FILTER_TAPS:
        return sum(
            kernel_row(src, k[:, :, :, m], offsets[m * kw : (m + 1) * kw], out_size)
            for m in range(kh)
        )
    n, (ho, wo), sh = src.shape[0], out_size, stride[0]
    first, row_step = offsets[0][0], (offsets[kw][0] - offsets[0][0] if kh > 1 else 0)
    reach = max(o[0] for o in offsets)
    item, channels = jnp.dtype(acc).itemsize, src.shape[3] * src.shape[4]

    def span(rows):
        return (rows - 1) * sh + reach + 1

    plan = _plan(
        n,
        ho,
        lambda images, rows: images * item * channels * (span(rows) * src.shape[2] + rows * wo),
    )
    images, rows = plan
    starts = [(0, o[1]) for o in offsets[:kw]]

    def compute(b, r):
        sb = _rows(src, b, r * sh, images, span(rows))
        kb = _rows(k, b, r * sh, images, span(rows)) if at_source else _rows(k, b, r, images, rows)

        def body(m, out):
            start_h = first + m * row_step
            src_m = lax.dynamic_slice_in_dim(sb, start_h, (rows - 1) * sh + 1, axis=1)
            k_m = lax.dynamic_index_in_dim(kb, m, axis=3, keepdims=False)
            if at_source:
                k_m = lax.dynamic_slice_in_dim(k_m, start_h, rows, axis=1)
            return out + kernel_row(src_m, k_m, starts, (rows, wo))

        init = jnp.zeros((sb.shape[0], rows, wo, *src.shape[3:]), acc)
        return _loop(kh, body, init, sb, kb)

    return _blocked((n, ho, wo, *src.shape[3:]), acc, plan, compute, src, k)


def pixel_forward(x, k, call: KernelCall):
    """``y[b,i,j,c] = sum_{m,n} x[b,pos(i,m),pos(j,n),c] * k[b,i,j,m,n,g(c)]``."""
    geom, out_shape = call.geom, call.out_shape
    xp = _grouped(_pad(x, geom.padding), k.shape[5])
    y = _filter_taps(xp, k, _offsets(geom), geom.out_size, geom.stride, False, geom.kernel_size)
    return y.reshape(out_shape).astype(x.dtype)


def pixel_grad_x(k, dy, call: KernelCall):
    """Transpose of :func:`pixel_forward` in ``x``: ``[N, Ho, Wo, C] -> [N, H, W, C]``, in
    gather form on ``dy`` and ``k`` spread onto the input grid (:func:`_spread`)."""
    geom, out_shape = call.geom, call.out_shape
    src = _grouped(_spread(dy, geom), k.shape[5])
    dx = _filter_taps(
        src,
        _spread(k, geom),
        _offsets(geom, flipped=True),
        geom.in_size,
        (1, 1),
        True,
        geom.kernel_size,
    )
    return dx.reshape(out_shape).astype(dy.dtype)


# Output tiles of the per-pixel filter gradient: J x J pixels correlated with their whole input
# window in one GEMM (see :func:`pixel_grad_k`).
_TILE = 8


def _strided_view(f, extents, strides):
    """``out[..., i_0, ..., i_k] = f[..., sum_j i_j * strides_j]`` over the last axis of ``f``,
    by zero-padding or cropping, reshaping and slicing (each stride must exceed the reach of
    the strides after it)."""
    for extent, stride in zip(extents[:-1], strides[:-1], strict=True):
        f = _fit_last(f, extent * stride).reshape(*f.shape[:-1], extent, stride)
    extent, stride = extents[-1], strides[-1]
    f = _fit_last(f, (extent - 1) * stride + 1)
    return lax.slice_in_dim(f, 0, f.shape[-1], stride, axis=f.ndim - 1)


def _fit_last(f, size):
    """``f`` cropped or zero-padded to ``size`` along its last axis."""
    if f.shape[-1] >= size:
        return lax.slice_in_dim(f, 0, size, axis=f.ndim - 1)
    cfg = [(0, 0, 0)] * (f.ndim - 1) + [(0, size - f.shape[-1], 0)]
    return lax.pad(f, jnp.zeros((), f.dtype), cfg)


def _width_tiles(v, tiles, step, size):
    """``[.., W, C] -> [.., tiles, size, C]``: tile ``q`` is ``v[.., q * step : q * step + size]``
    (overlapping when ``size > step``), from ``ceil(size / step)`` reshaped slices."""
    pieces = -(-size // step)
    cfg = [(0, 0, 0)] * v.ndim
    cfg[-2] = (0, max(0, (tiles + pieces) * step - v.shape[-2]), 0)
    v = lax.pad(v, jnp.zeros((), v.dtype), cfg)
    parts = []
    for p in range(pieces):
        part = lax.slice_in_dim(v, p * step, (p + tiles) * step, axis=v.ndim - 2)
        parts.append(part.reshape(*v.shape[:-2], tiles, step, v.shape[-1]))
    return lax.slice_in_dim(jnp.concatenate(parts, axis=-2), 0, size, axis=v.ndim - 1)


def pixel_grad_k(x, dy, call: KernelCall):
    """Gradient of :func:`pixel_forward` in ``k``: ``[N, Ho, Wo, kh, kw, G]``,
    ``dk[p, t, g] = sum_{c in g} x[pos(p, t), c] * dy[p, c]`` (a local correlation).

    Per-tap reductions over channels are slow loops on CPU; instead each tile of
    ``J x J`` output pixels is correlated with every position of its input window in one GEMM
    (``[J*J, C] x [C, window]``, batched over the tiles of a row of tiles), and the taps are read
    off the product as a strided view. The GEMM does ``(window / taps)`` times the needed work
    (about 2-4x), at GEMM speed.
    """
    geom, out_shape = call.geom, call.out_shape
    n, ho, wo, kh, kw, groups = out_shape
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    acc = accumulation_dtype(x.dtype)
    jr, jc = min(_TILE, ho), min(_TILE, wo)
    span_h, span_w = _span(jr, sh, kh, dh), _span(jc, sw, kw, dw)
    tiles = -(-wo // jc)
    xp = _pad(x, geom.padding)
    dyp = lax.pad(
        dy, jnp.zeros((), dy.dtype), ((0, 0, 0), (0, 0, 0), (0, tiles * jc - wo, 0), (0, 0, 0))
    )
    cg = x.shape[3] // groups
    # Offsets into a tile's flattened product [pixel (a, b), window position (row, col)].
    strides = (
        jc * span_h * span_w + sh * span_w,
        span_h * span_w + sw,
        dh * span_w,
        dw,
    )

    def compute(b, r):
        rows = _rows(xp, b, r * sh, 1, span_h)[0]  # [span_h, Wp, C]
        windows = _width_tiles(rows, tiles, jc * sw, span_w)  # [span_h, tiles, span_w, C]
        windows = jnp.moveaxis(windows, 1, 0).reshape(tiles, span_h * span_w, groups, cg)
        pixels = _rows(dyp, b, r, 1, jr)[0].reshape(jr, tiles, jc, groups, cg)
        pixels = pixels.transpose(1, 0, 2, 3, 4).reshape(tiles, jr * jc, groups, cg)
        product = jnp.einsum(
            "tpgc,tqgc->tgpq",
            pixels,
            windows,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=acc,
        )
        taps = _strided_view(
            product.reshape(tiles, groups, -1), (jr, jc, kh, kw), strides
        )  # [tiles, G, jr, jc, kh, kw]
        taps = taps.transpose(2, 0, 3, 4, 5, 1).reshape(1, jr, tiles * jc, kh, kw, groups)
        return taps[:, :, :wo]

    return _blocked(out_shape, x.dtype, (1, jr), compute, xp, dyp)


def pixel_forward_patches(x, k, *, geom: Geometry):
    """Patch-tensor formulation of :func:`pixel_forward`, for comparison."""
    kh, kw, groups = k.shape[3:]
    patches = _patches(x, (kh, kw), geom)
    n, ho, wo = patches.shape[:3]
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


def gaussian_forward(x, s, eta, zeta, call: KernelCall):
    """``y = s * sum_tap w[tap] * x[pos]`` with Gaussian weights ``w`` (svconv.gaussian)."""
    geom, out_shape, moments = call.geom, call.out_shape, call.moments
    acc_dtype = accumulation_dtype(jnp.result_type(x, eta))
    xp = _pad(x, geom.padding)

    def tap(t, acc):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        w = gaussian.tap_weight(t, eta, zeta, geom.kernel_size, moments)
        return acc + xs.astype(acc_dtype) * w[..., None].astype(acc_dtype)

    y = _loop(geom.num_taps, tap, jnp.zeros(out_shape, acc_dtype), x, s, eta, zeta)
    if s is not None:
        y = y * s[..., None].astype(acc_dtype)
    return y.astype(x.dtype)


def gaussian_grad_x(s, dy, eta, zeta, call: KernelCall):
    """Transpose of :func:`gaussian_forward` in ``x`` (the splat): ``[N, H, W, C]``, in gather
    form: ``dy`` (times ``s``) and the parameters spread onto the input grid (:func:`_spread`),
    each flipped tap's weight computed from the parameters of the source pixel it reads."""
    geom, out_shape, moments = call.geom, call.out_shape, call.moments
    acc_dtype = accumulation_dtype(jnp.result_type(dy, eta))
    (h, w), (kh, kw), (dh, dw) = geom.in_size, geom.kernel_size, geom.dilation
    scale = dy.astype(acc_dtype)
    if s is not None:
        scale = scale * s[..., None].astype(acc_dtype)
    # Between the source pixels the spread parameters are 0: finite weights times a zero scale.
    # The parameters are spread and sliced one plane at a time (slices of a [..., P] array
    # run many times slower on CPU).
    src = _spread(scale, geom)
    planes = [_spread(v, geom) for v in (zeta, *jnp.moveaxis(eta, -1, 0))]

    def tap(t, acc):
        start = ((kh - 1 - t // kw) * dh, (kw - 1 - t % kw) * dw)  # flipped, as _offsets

        def at(v):
            return lax.dynamic_slice(
                v, (0, *start, *(0,) * (v.ndim - 3)), (v.shape[0], h, w, *v.shape[3:])
            )

        z, *e = (at(v) for v in planes)
        weight = gaussian.tap_weight(t, jnp.stack(e, -1), z, geom.kernel_size, moments)
        return acc + at(src) * weight[..., None].astype(acc_dtype)

    init = jnp.zeros((dy.shape[0], h, w, dy.shape[3]), acc_dtype)
    dx = _loop(geom.num_taps, tap, init, s, dy, eta, zeta)
    return dx.reshape(out_shape).astype(dy.dtype)


def gaussian_grad_s(x, dy, eta, zeta, call: KernelCall):
    """Gradient of :func:`gaussian_forward` in its scale ``s``: ``[N, Ho, Wo]``."""
    geom, out_shape, moments = call.geom, call.out_shape, call.moments
    acc_dtype = accumulation_dtype(jnp.result_type(x, eta))
    xp = _pad(x, geom.padding)
    dyf = dy.astype(acc_dtype)

    # Per channel in the loop, summed over channels once at the end: a channel reduction in
    # every tap is measured 6x slower on CPU than this (the forward's loop, with dy folded in).
    def tap(t, acc):
        xs = _tap_at(xp, t, geom.kernel_size, geom.out_size, geom.stride, geom.dilation)
        w = gaussian.tap_weight(t, eta, zeta, geom.kernel_size, moments).astype(acc_dtype)
        return acc + xs.astype(acc_dtype) * (w[..., None] * dyf)

    ds = _loop(geom.num_taps, tap, jnp.zeros(dy.shape, acc_dtype), x, dy, eta, zeta)
    return jnp.sum(ds, axis=-1).reshape(out_shape).astype(x.dtype)
