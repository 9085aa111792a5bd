"""Per-pixel Gaussian weights as a closed form of per-pixel parameters.

For tap ``(m, n)`` of a ``kh x kw`` window the offset from the window's centre is
``u = m - (kh - 1) / 2`` rows and ``v = n - (kw - 1) / 2`` columns, and the Gaussian's weight is

    K[tap] = exp(-q / 2) / Z,   q = [u, v] Sigma^-1 [u, v]^T,
    Sigma = [[sr^2, rho sr sc], [rho sr sc, sc^2]],

normalised over the window (``Z``). ``-q / 2`` is linear in a few per-pixel *parameters*
``eta`` with per-tap *features* ``phi``: ``-q / 2 = eta . phi[tap]``. The weights are then
``exp(eta . phi[tap] - zeta)`` with ``zeta = log sum_tap exp(eta . phi[tap])``, and their
derivatives in ``eta`` are the same weights times powers of ``phi`` ("moments"). Three forms,
by the number ``P`` of parameters:

* ``P = 1``, isotropic (``sigma``): ``phi = -(u^2 + v^2) / 2``, ``eta = 1 / sigma^2``;
* ``P = 2``, axis-aligned (``(sigma_rows, sigma_cols)``): ``phi = (-u^2 / 2, -v^2 / 2)``,
  ``eta = (1 / sr^2, 1 / sc^2)``;
* ``P = 3``, rotated (with ``rho``): ``phi = (-u^2 / 2, u v, -v^2 / 2)``,
  ``eta = (1 / sr^2, rho / (sr sc), 1 / sc^2) / (1 - rho^2)``.

Variances are floored at 1e-12 so that ``sigma -> 0`` gives a delta (the identity filter for
odd window sizes), never NaN. ``zeta`` and the moments of the weights are sums over the
taps written as elementwise passes over the parameters, so no ``[..., kh, kw]`` (or
``[..., kw]``) array exists on any platform: on CPU a loop over the window's rows with the
columns unrolled, elsewhere every tap unrolled into one expression (one fused pass). Their
derivatives are moments again (:func:`log_normalizer`, :func:`weight_moments`), to any order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.gaussian import features

_VARIANCE_FLOOR = 1e-12


def tap_features(kernel_size: tuple[int, int], parts: int) -> np.ndarray:
    """``phi``: ``[kh * kw, parts]``, taps in row-major order."""
    kh, kw = kernel_size
    u = np.repeat(np.arange(kh) - (kh - 1) / 2, kw)
    v = np.tile(np.arange(kw) - (kw - 1) / 2, kh)
    return np.stack(features(u, v, parts), axis=-1)


def _tap_features(m, n, kernel_size, parts: int, dtype) -> list:
    """``phi`` of tap ``(m, n)`` (row and column, traced int32 or Python ints), from the
    indices: the loops that call this stay free of array constants."""
    kh, kw = kernel_size
    u = jnp.asarray(m).astype(dtype) - (kh - 1) / 2
    v = jnp.asarray(n).astype(dtype) - (kw - 1) / 2
    return features(u, v, parts)


def _times_moment(weight: jax.Array, phi: list, moments) -> jax.Array:
    """``weight * prod_p phi[p] ** moments[p]``."""
    for f, power in zip(phi, moments, strict=True):
        if power:
            weight = weight * f**power
    return weight


def _dot(phi: list, eta: jax.Array) -> jax.Array:
    """``eta . phi``: ``[...]``."""
    return sum(eta[..., p] * f for p, f in enumerate(phi))


def _exp_logit(phi: list, eta: jax.Array, zeta) -> jax.Array:
    """``exp(eta . phi - zeta)``."""
    return jnp.exp(_dot(phi, eta) - zeta)


def tap_weight(t, eta: jax.Array, zeta: jax.Array, kernel_size, moments) -> jax.Array:
    """The weight ``exp(eta . phi - zeta) * prod_p phi[p] ** moments[p]`` of tap ``t`` (a traced
    int32, row-major) for every pixel: ``eta [..., P]``, ``zeta [...]`` -> ``[...]``."""
    kw = kernel_size[1]
    phi = _tap_features(t // kw, t % kw, kernel_size, eta.shape[-1], eta.dtype)
    return _times_moment(_exp_logit(phi, eta, zeta), phi, moments)


def parameters(sigma, rho=None) -> jax.Array:
    """``eta [..., P]`` from ``sigma`` (an array, or a pair ``(sigma_rows, sigma_cols)``) and an
    optional correlation ``rho``, in float32 (float64 for float64 inputs)."""
    pair = isinstance(sigma, (tuple, list))
    sr, sc = sigma if pair else (sigma, sigma)
    dtype = jnp.result_type(jnp.float32, sr, sc, *(() if rho is None else (rho,)))
    vr = jnp.maximum(jnp.square(sr.astype(dtype)), _VARIANCE_FLOOR)
    vc = jnp.maximum(jnp.square(sc.astype(dtype)), _VARIANCE_FLOOR)
    if rho is None:
        return jnp.stack([1 / vr, 1 / vc], axis=-1) if pair else (1 / vr)[..., None]
    rho = rho.astype(dtype)
    det = jnp.maximum(1 - jnp.square(rho), _VARIANCE_FLOOR)
    return jnp.stack([1 / vr, rho * lax.rsqrt(vr * vc), 1 / vc], axis=-1) / det[..., None]


def _over_rows(fn, kernel_size, init):
    """``fn(m, n, carry)`` for every tap of the window, ``m`` (traced) the row in a loop and
    ``n`` (a Python int) the column, unrolled: each row is one elementwise pass over the
    parameters, with no reduction op, no array constant and no ``[..., kw]`` or
    ``[..., kh, kw]`` temporary. The CPU's form: compile time flat in ``kh``; one tap per step,
    or several taps per step with traced columns, measured 1.5-2x slower there."""

    def row(m, carry):
        for n in range(kernel_size[1]):
            carry = fn(m, n, carry)
        return carry

    return lax.fori_loop(0, kernel_size[0], row, init)


def _unrolled(fn, kernel_size, init):
    """``fn(m, n, carry)`` for every tap, both unrolled (Python ints): one elementwise
    expression that XLA fuses into one pass over the parameters. The form lowered for
    accelerators, where each step of a loop is a kernel launch and a pass over the parameters
    in memory. (A reduction over a ``[..., kh * kw]`` operand instead took XLA:GPU minutes to
    compile at 31x31 and materialised the operand.)"""
    for m in range(kernel_size[0]):
        for n in range(kernel_size[1]):
            init = fn(m, n, init)
    return init


def _per_platform(form, *operands, **kwargs):
    """``form(*operands, over=...)`` with the row loop on CPU and unrolled elsewhere."""
    return lax.platform_dependent(
        *operands,
        cpu=functools.partial(form, over=_over_rows, **kwargs),
        default=functools.partial(form, over=_unrolled, **kwargs),
    )


def _logit(m, n, eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``eta . phi`` of tap ``(m, n)``: ``[...]``."""
    return _dot(_tap_features(m, n, kernel_size, eta.shape[-1], eta.dtype), eta)


def _odd(kernel_size: tuple[int, int]) -> bool:
    """Whether the window has a centre tap (logit 0): then the sum of exponentials is >= 1."""
    return bool(kernel_size[0] % 2 and kernel_size[1] % 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
@functools.partial(jax.jit, static_argnums=(1,))
def log_normalizer(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``zeta = log sum_tap exp(eta . phi[tap])``: ``[..., P] -> [...]`` (finite for any
    ``eta``: every logit is ``-q / 2 <= 0`` and, in a window of odd sizes, the centre's is 0, so
    the sum is at least 1; in other windows the running maximum is taken out)."""
    return _per_platform(_log_normalizer, eta, kernel_size=kernel_size)


def _log_normalizer(eta, *, kernel_size, over):
    if _odd(kernel_size):

        def add(m, n, total):
            return total + jnp.exp(_logit(m, n, eta, kernel_size))

        return jnp.log(over(add, kernel_size, jnp.zeros(eta.shape[:-1], eta.dtype)))

    def tap(m, n, carry):
        top, total = carry
        logit = _logit(m, n, eta, kernel_size)
        new_top = jnp.maximum(top, logit)
        return new_top, total * jnp.exp(top - new_top) + jnp.exp(logit - new_top)

    first = _logit(0, 0, eta, kernel_size)
    top, total = over(tap, kernel_size, (first, jnp.zeros_like(first)))
    return top + jnp.log(total)


@log_normalizer.defjvp
def _log_normalizer_jvp(kernel_size, primals, tangents):
    (eta,), (t_eta,) = primals, tangents
    zeta = log_normalizer(eta, kernel_size)
    parts = eta.shape[-1]
    unit = tuple(tuple(int(q == p) for q in range(parts)) for p in range(parts))
    means = weight_moments(eta, zeta, kernel_size, unit)
    return zeta, sum(mean * t_eta[..., p] for p, mean in enumerate(means))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
@functools.partial(jax.jit, static_argnums=(2, 3))
def weight_moments(
    eta: jax.Array,
    zeta: jax.Array,
    kernel_size: tuple[int, int],
    moments: tuple[tuple[int, ...], ...],
) -> tuple[jax.Array, ...]:
    """``sum_tap exp(eta . phi[tap] - zeta) * prod_p phi[tap, p] ** a[p]``, ``[...]``, for each
    ``a`` in ``moments``, in one pass over the taps (one exponential per tap for all)."""
    return _per_platform(_weight_moments, eta, zeta, kernel_size=kernel_size, moments=moments)


def _weight_moments(eta, zeta, *, kernel_size, moments, over):
    def add(m, n, totals):
        phi = _tap_features(m, n, kernel_size, eta.shape[-1], eta.dtype)
        weight = _exp_logit(phi, eta, zeta)
        return tuple(
            total + _times_moment(weight, phi, a) for total, a in zip(totals, moments, strict=True)
        )

    return over(add, kernel_size, tuple(jnp.zeros_like(zeta) for _ in moments))


@weight_moments.defjvp
def _weight_moments_jvp(kernel_size, moments, primals, tangents):
    """``d M_a = -M_a dzeta + sum_p M_{a + e_p} deta_p``: the moments one order up, all in one
    loop."""
    eta, zeta = primals
    t_eta, t_zeta = tangents
    parts = eta.shape[-1]
    up = {a: [tuple(b + (q == p) for q, b in enumerate(a)) for p in range(parts)] for a in moments}
    needed = tuple(dict.fromkeys([*moments, *(b for a in moments for b in up[a])]))
    values = dict(zip(needed, weight_moments(eta, zeta, kernel_size, needed), strict=True))
    outs = tuple(values[a] for a in moments)
    tangent_outs = tuple(
        -values[a] * t_zeta + sum(values[b] * t_eta[..., p] for p, b in enumerate(up[a]))
        for a in moments
    )
    return outs, tangent_outs


def explicit_weights(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """The weights as an array ``[..., kh, kw]`` (a softmax over the taps)."""
    phi = jnp.asarray(tap_features(kernel_size, eta.shape[-1]), eta.dtype)
    weights = jax.nn.softmax(eta @ phi.T, axis=-1)
    return weights.reshape(*eta.shape[:-1], *kernel_size)
