"""Low-rank per-pixel filters (product convolution): the XLA kernels of the product family and
the builders of the decomposition.

The per-pixel kernels are ``k[b,i,j,m,n,g] = sum_r u[b,i,j,r] * f[r,m,n,g]``, never built. The
filter form is ``y = sum_r u_r * (f_r correlated with x)``: ``R`` spatially-invariant
correlations, each weighted per output pixel (Nagy & O'Leary 1998). Its transpose in ``x``, the
splat, is ``sum_r f_r convolved with (u_r * x)``: a point-spread function that moves with the
source.

Kernels, with the signature of every family's (the other slots' arrays in slot order, one
dtype, then a :class:`~pallas_kernels.geometry.KernelCall`), slots ``x, f, u, y``:

* :func:`forward` computes the ``R`` correlations one of two ways (``call.method``):
  ``"direct"``, one depthwise ``lax.conv_general_dilated`` with ``R`` outputs per channel
  (cuDNN on a GPU), or ``"fft"``, real FFTs of the zero-padded image of a fast length: one
  forward transform per channel, the filters' transforms, ``R`` inverse ones per channel (along
  the rows, then along the columns of the rows kept only). The padding is large enough that the
  circular convolution never wraps around: the numbers are the direct method's up to rounding.
* :func:`grad_x` (the splat), :func:`grad_f` and :func:`grad_u` are the transposes of the
  forward in one slot, taken by JAX from the same computation: the splat sums its ``R`` terms in
  the frequency domain (``R`` forward transforms per channel, one inverse), the filters' gradient
  correlates the image with each weighted cotangent, the weights' gradient recomputes the ``R``
  responses and contracts them with the cotangent. Nothing holds more than ``R`` images.

Accumulation is float32 for 16-bit inputs; float64 and complex inputs keep their own dtype
(complex inputs take full complex transforms).
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.geometry import Geometry, KernelCall, after, vary_like
from svconv._checks import accumulation_dtype

METHODS = ("direct", "fft")

# method=None takes the FFTs when the direct method's multiply-adds (R * taps per output pixel
# and channel) exceed this many times the FFTs' cost ((R + 1) * log2(Lh * Lw) per padded pixel
# and channel); measured on CPU, forward+backward (``experiments/notes/product.md``).
FFT_CROSSOVER = 6.0


def fast_length(n: int) -> int:
    """The smallest length ``>= n`` whose prime factors are 2, 3, 5 and 7 (fast FFTs)."""
    best = 1 << max(0, (n - 1).bit_length())
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                p2 = p3
                while p2 < n:
                    p2 *= 2
                best = min(best, p2)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def _fft_sizes(geom: Geometry) -> tuple[int, int]:
    """The transforms' size: the padded input, rounded up to a fast length (a circular
    correlation of that length is the linear one on every output pixel)."""
    return cast(
        tuple[int, int],
        tuple(
            fast_length(size + lo + hi)
            for size, (lo, hi) in zip(geom.in_size, geom.padding, strict=True)
        ),
    )


def choose_method(geom: Geometry, rank: int) -> str:
    """``"fft"`` or ``"direct"``, whichever the cost model says is faster (see
    ``FFT_CROSSOVER``): the direct method costs ``R * kh * kw`` multiply-adds per output pixel
    and channel, the FFTs about ``(R + 1) * log2(Lh * Lw)`` per padded pixel and channel."""
    (ho, wo), (lh, lw) = geom.out_size, _fft_sizes(geom)
    direct = rank * geom.num_taps * ho * wo
    fft = (rank + 1) * lh * lw * math.log2(lh * lw)
    return "fft" if direct > FFT_CROSSOVER * fft else "direct"


def _channels_first(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 1)


def _transforms(real: bool):
    return (jnp.fft.rfft2, jnp.fft.irfft2) if real else (jnp.fft.fft2, jnp.fft.ifft2)


def _image_spectra(x: jax.Array, geom: Geometry) -> jax.Array:
    """``[N, C, Lh, Lw']``: the transforms of the zero-padded image ``x [N, H, W, C]``."""
    (pt, pb), (pl, pr) = geom.padding
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(_channels_first(x), zero, ((0, 0, 0), (0, 0, 0), (pt, pb, 0), (pl, pr, 0)))
    return _transforms(_is_real(x))[0](xp, s=_fft_sizes(geom))


def _filter_spectra(f: jax.Array, geom: Geometry) -> jax.Array:
    """``[R, G, Lh, Lw']``: the transforms of the dilated, flipped filters ``f [R, kh, kw, G]``
    (the correlation is a convolution with them, whose valid part starts at the dilated
    kernel's last row and column)."""
    (dh, dw), zero = geom.dilation, jnp.zeros((), f.dtype)
    fd = lax.pad(_channels_first(f), zero, ((0, 0, 0), (0, 0, 0), (0, 0, dh - 1), (0, 0, dw - 1)))
    return _transforms(_is_real(f))[0](fd[:, :, ::-1, ::-1], s=_fft_sizes(geom))


def _is_real(x: jax.Array) -> bool:
    return not jnp.issubdtype(x.dtype, jnp.complexfloating)


def _correlate(xf: jax.Array, ff: jax.Array, geom: Geometry, dtype) -> jax.Array:
    """``[N, R, C, Ho, Wo]``: every channel correlated with every filter (channel ``c`` with
    group ``c // (C / G)``), from the spectra: one inverse transform per channel and filter,
    cropped to the valid part and subsampled by the stride."""
    n, c, *spectrum = xf.shape
    r, g = ff.shape[:2]
    real = _is_real(jnp.zeros((), dtype))
    product = xf.reshape(n, 1, g, c // g, *spectrum) * ff.reshape(1, r, g, 1, *spectrum)
    product = product.reshape(n, r, c, *spectrum)
    kh, kw = ((k - 1) * d + 1 for k, d in zip(geom.kernel_size, geom.dilation, strict=True))
    (ho, wo), (sh, sw) = geom.out_size, geom.stride
    rows = slice(kh - 1, kh - 1 + (ho - 1) * sh + 1, sh)
    cols = slice(kw - 1, kw - 1 + (wo - 1) * sw + 1, sw)
    # The inverse along the rows first, then along the columns of the kept rows only.
    lh, lw = _fft_sizes(geom)
    z = jnp.fft.ifft(product, n=lh, axis=-2)[..., rows, :]
    z = jnp.fft.irfft(z, n=lw, axis=-1) if real else jnp.fft.ifft(z, n=lw, axis=-1)
    z = z.astype(dtype) if real else z
    return z[..., cols]


def _weigh(z: jax.Array, u: jax.Array) -> jax.Array:
    """``sum_r u_r * z_r``: ``z [N, R, C, Ho, Wo]``, ``u [(N,) Ho, Wo, R]``; ``[N, Ho, Wo, C]``.
    A sum of ``R`` terms (one loop fusion over the output), not a reduction over the non-minor
    axis ``R``, which XLA:CPU runs 20x slower (512x512x3, R 16: 7 ms against 133-171 ms)."""
    weights = jnp.moveaxis(u, -1, -3)  # [(N,) R, Ho, Wo]
    weights = weights[:, :, None] if weights.ndim == 4 else weights[None, :, None]
    if z.shape[1] > _UNROLLED_TERMS:
        y = jnp.sum(z * weights, axis=1)
    else:
        y = z[:, 0] * weights[:, 0]
        for r in range(1, z.shape[1]):
            y = y + z[:, r] * weights[:, r]
    return jnp.moveaxis(y, 1, -1)


_UNROLLED_TERMS = 256


def _after(value: jax.Array, *earlier: jax.Array) -> jax.Array:
    """``value``, computed only once ``earlier`` are. XLA:CPU (jax 0.11, 0.12) runs an FFT on an
    intra-op worker and fans it out into the same pool: FFTs that run at once can each wait on
    sub-tasks that no free worker is left to run, and hang (on 2 cores, two are enough). The
    product family therefore runs its transforms one after another: each partial orders its
    own, and the family is ``serial`` (its partials in one backward pass are chained)."""
    return after(value, *earlier)


def _filter_direct(
    x: jax.Array, f: jax.Array, u: jax.Array, geom: Geometry, precision
) -> jax.Array:
    """The filter form by one convolution: the channels of each group in the batch (so that its
    gradients are plain convolutions, not XLA:CPU's slow grouped ones), one feature group per
    filter group with ``R`` outputs each."""
    n, h, w, c = x.shape
    r, kh, kw, g = f.shape
    per = c // g
    xb = x.reshape(n, h, w, g, per).transpose(0, 4, 1, 2, 3).reshape(n * per, h, w, g)
    # Output channel g * R + r of group g is its channels through filter r.
    kernel = f.transpose(1, 2, 3, 0).reshape(kh, kw, 1, g * r)
    z = lax.conv_general_dilated(
        xb,
        kernel,
        window_strides=geom.stride,
        padding=geom.padding,
        rhs_dilation=geom.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=g,
        precision=precision,
    )
    ho, wo = geom.out_size
    z = z.reshape(n, per, ho, wo, g, r)
    weights = u if u.ndim == 4 else u[None]
    y = jnp.sum(z * weights[:, None, :, :, None, :], axis=-1)  # [N, C / G, Ho, Wo, G]
    return y.transpose(0, 2, 3, 4, 1).reshape(n, ho, wo, c)


def _filter(x: jax.Array, f: jax.Array, u: jax.Array, call: KernelCall) -> jax.Array:
    """The filter form in the accumulation dtype: ``sum_r u_r * responses_r``, ``[N, Ho, Wo,
    C]`` (``u``: ``[N, Ho, Wo, R]`` or, shared over the batch, ``[Ho, Wo, R]``)."""
    if call.method != "fft":
        return _filter_direct(x, f, u, call.geom, call.precision)
    x, f, u = (_after(v, x, f, u) for v in (x, f, u))  # (see _transpose)
    return _weigh(_responses(x, f, call.geom), u)


def _responses(x: jax.Array, f: jax.Array, geom: Geometry) -> jax.Array:
    """``[N, R, C, Ho, Wo]`` through FFTs, the filters' transforms first, then the image's."""
    ff = _filter_spectra(f, geom)
    xf = _image_spectra(_after(x, ff), geom)
    return _correlate(xf, ff, geom, x.dtype)


def _upcast(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    dtype = accumulation_dtype(arrays[0].dtype)
    return tuple(a.astype(dtype) for a in arrays)


def forward(x: jax.Array, f: jax.Array, u: jax.Array, call: KernelCall) -> jax.Array:
    """``y [N, Ho, Wo, C]`` from ``x``, ``f [R, kh, kw, G]``, ``u``."""
    dtype = x.dtype
    x, f, u = _upcast(x, f, u)
    return _filter(x, f, u, call).astype(dtype)


def _pullback(linear, ct: jax.Array, shape, others) -> jax.Array:
    """The transpose of ``linear`` applied to ``ct``, taken at a zero of ``shape`` that varies
    like the other operands (inside ``shard_map``, a transpose from an invariant point would sum
    the devices' results)."""
    at = vary_like(jnp.zeros(shape, ct.dtype), ct, *others)
    (back,) = jax.vjp(linear, at)[1](ct)
    return back


def _transpose(slot: int, operands: tuple, ct: jax.Array, call: KernelCall) -> jax.Array:
    """The transpose of the filter form in operand ``slot`` (0: ``x``, 1: ``f``, 2: ``u``, of
    shape ``call.out_shape``) applied to the cotangent ``ct``, the other operands given. With
    FFTs, the other operands' transforms come first, then the cotangent's (see :func:`_after`)."""
    dtype = ct.dtype
    ct, *others = _upcast(ct, *(o for o in operands if o is not None))
    geom, shape = call.geom, call.out_shape
    if call.method == "fft":  # every operand after all of them (one may end an earlier partial)
        tied = (ct, *others)
        ct, *others = (_after(v, *tied) for v in tied)
    if call.method != "fft":

        def linear(v):
            args = list(others)
            args.insert(slot, v)
            x, f, u = args
            return _filter(x, f, u, call)

    elif slot == 0:  # the splat: the R terms summed in the frequency domain, one inverse each
        f, u = others
        ff = _filter_spectra(f, geom)
        ct = _after(ct, ff)

        def linear(v):
            return _weigh(_correlate(_image_spectra(v, geom), ff, geom, ct.dtype), u)

    elif slot == 1:
        x, u = others
        xf = _image_spectra(x, geom)
        ct = _after(ct, xf)

        def linear(v):
            return _weigh(_correlate(xf, _filter_spectra(v, geom), geom, ct.dtype), u)

    else:
        x, f = others
        z = _responses(x, f, geom)

        def linear(v):
            return _weigh(z, v)

    return _pullback(linear, ct, shape, others).astype(dtype)


def grad_x(f: jax.Array, u: jax.Array, y: jax.Array, call: KernelCall) -> jax.Array:
    """The transpose in ``x`` (the splat of ``y`` with the source-side weights ``u``)."""
    return _transpose(0, (None, f, u), y, call)


def grad_f(x: jax.Array, u: jax.Array, y: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the filters ``[R, kh, kw, G]``."""
    return _transpose(1, (x, None, u), y, call)


def grad_u(x: jax.Array, f: jax.Array, y: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the per-pixel weights."""
    return _transpose(2, (x, f, None), y, call)


def _fused_tangent(kernel):
    """A forward-mode kernel for ``kernel`` (a partial with three other slots): the sum of the
    partial with each given tangent in its slot, in the accumulation dtype, each term after the
    previous one (see :func:`_after`)."""

    def jvp(*args):
        *arrays, call = args
        primals, tangents = arrays[:3], arrays[3:]
        dtype = next(a.dtype for a in primals if a is not None)
        up = accumulation_dtype(dtype)
        total = None
        for i, tangent in enumerate(tangents):
            if tangent is None:
                continue
            operands = [tangent if j == i else p for j, p in enumerate(primals)]
            operands = [None if o is None else o.astype(up) for o in operands]
            # The tangent waits for the primals (which wait for the primal's own kernel) and
            # for the previous term.
            present = [o for o in operands if o is not None]
            earlier = present if total is None else [total]
            operands = [None if o is None else _after(o, *earlier) for o in operands]
            term = kernel(*operands, call)
            total = term if total is None else total + term
        return cast(jax.Array, total).astype(dtype)  # (at least one tangent is given)

    return jvp


forward_jvp = _fused_tangent(forward)
grad_x_jvp = _fused_tangent(grad_x)

# ------------------------------------------------------------------------------- builders


def _hat_weights(size: int, points: int, dtype: Any) -> np.ndarray:
    """``[size, points]``: the bilinear (hat) weights of ``points`` grid nodes, placed at the
    centres of ``points`` equal regions of ``size`` pixels, at every pixel; constant beyond the
    outermost nodes, so every row sums to one."""
    if points == 1:
        return np.ones((size, 1), dtype)
    t = (np.arange(size) + 0.5) * points / size - 0.5
    t = np.clip(t, 0.0, points - 1)
    lo = np.minimum(np.floor(t).astype(int), points - 2)
    frac = t - lo
    hats = np.zeros((size, points))
    hats[np.arange(size), lo] = 1.0 - frac
    hats[np.arange(size), lo + 1] += frac
    return hats.astype(dtype)


def interpolation_weights(grid: tuple[int, int], image_size: tuple[int, int], dtype) -> jax.Array:
    """``[H, W, Gh * Gw]``: each pixel's bilinear weights of the grid nodes (row-major)."""
    (gh, gw), (h, w) = grid, image_size
    rows, cols = _hat_weights(h, gh, np.float64), _hat_weights(w, gw, np.float64)
    weights = rows[:, None, :, None] * cols[None, :, None, :]
    return jnp.asarray(weights.reshape(h, w, gh * gw), dtype)


def top_components(matrix: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best rank-``rank`` factorisation of ``matrix [P, K] ~ coefficients @ basis``:
    ``basis [rank, K]`` (orthonormal rows spanning the leading right singular vectors),
    ``coefficients [P, rank]`` and the relative Frobenius error it leaves. From
    the eigenvectors of the smaller Gram matrix (``[K, K]`` for many kernels of few taps,
    ``[P, P]`` for a few large PSFs); no SVD of ``matrix`` itself."""
    dtype = accumulation_dtype(matrix.dtype)
    m = matrix.astype(dtype)
    hi = lax.Precision.HIGHEST
    if m.shape[1] <= m.shape[0]:
        _, vectors = jnp.linalg.eigh(jnp.matmul(m.conj().T, m, precision=hi))
        basis = vectors[:, ::-1][:, :rank].conj().T  # [rank, K], the largest eigenvalues first
    else:
        values, vectors = jnp.linalg.eigh(jnp.matmul(m, m.conj().T, precision=hi))
        left = vectors[:, ::-1][:, :rank]  # [P, rank]: the leading left singular vectors
        # The Gram matrix squares the singular values: the small ones lose their precision,
        # so the rows are made orthonormal again (the coefficients are then the least-squares
        # projection onto their span).
        rows = jnp.matmul(left.conj().T, m, precision=hi)
        basis = jnp.linalg.qr(rows.T)[0].T
    coefficients = jnp.matmul(m, basis.conj().T, precision=hi)
    residual = m - jnp.matmul(coefficients, basis, precision=hi)
    total = jnp.linalg.norm(m)
    error = jnp.where(total > 0, jnp.linalg.norm(residual) / jnp.where(total > 0, total, 1), 0)
    return basis, coefficients, error.real


@functools.partial(jax.jit, static_argnames=("rank",))
def low_rank(k: jax.Array, rank: int):
    """See :func:`svconv.low_rank_kernels`."""
    lead, taps = k.shape[:-2], k.shape[-2:]
    basis, coefficients, error = top_components(k.reshape(-1, math.prod(taps)), rank)
    dtype = k.dtype
    filters = basis.reshape(rank, *taps).astype(dtype)
    return filters, coefficients.reshape(*lead, rank).astype(dtype), error
