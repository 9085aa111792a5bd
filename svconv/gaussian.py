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
odd window sizes), never NaN. ``zeta`` and the moments of the weights are reductions over the
taps, so no ``[..., kh, kw]`` (or ``[..., kw]``) array exists: on CPU a loop, one tap at a time
(measured fastest there); lowered for any other platform one fused reduction over the taps (a
loop of ``kh * kw`` small kernels costs a launch and a pass over the parameters per tap on an
accelerator). Their derivatives are moments again (:func:`log_normalizer`,
:func:`weight_moments`), to any order.
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


def _tap_features(t, kernel_size, parts: int, dtype) -> list:
    """``phi`` of tap ``t`` (a traced int32, row-major), from the tap's index: the loops that
    call this stay free of array constants."""
    kh, kw = kernel_size
    u = (t // kw).astype(dtype) - (kh - 1) / 2
    v = (t % kw).astype(dtype) - (kw - 1) / 2
    return features(u, v, parts)


def tap_weight(t, eta: jax.Array, zeta: jax.Array, kernel_size, moments) -> jax.Array:
    """The weight ``exp(eta . phi - zeta) * prod_p phi[p] ** moments[p]`` of tap ``t`` (a traced
    int32, row-major) for every pixel: ``eta [..., P]``, ``zeta [...]`` -> ``[...]``."""
    phi = _tap_features(t, kernel_size, eta.shape[-1], eta.dtype)
    weight = jnp.exp(sum(eta[..., p] * f for p, f in enumerate(phi)) - zeta)
    for f, power in zip(phi, moments, strict=True):
        weight = weight * f**power
    return weight


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


def _over_taps(fn, kernel_size, init):
    """``fn(t, carry)`` for every tap ``t`` of the window (row-major), in a loop: the
    temporaries are of the parameters' size, never ``[..., kw]`` or ``[..., kh, kw]``."""
    return lax.fori_loop(0, kernel_size[0] * kernel_size[1], fn, init)


def _logit(t, eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``eta . phi[t]`` for tap ``t`` (traced): ``[...]``."""
    phi = _tap_features(t, kernel_size, eta.shape[-1], eta.dtype)
    return sum(eta[..., p] * f for p, f in enumerate(phi))


def _logits(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``eta . phi[tap]`` for every tap, ``[..., kh * kw]``: only inside a fused reduction."""
    phi = tap_features(kernel_size, eta.shape[-1]).astype(eta.dtype)
    return sum(eta[..., p, None] * phi[:, p] for p in range(eta.shape[-1]))


def _odd(kernel_size: tuple[int, int]) -> bool:
    """Whether the window has a centre tap (logit 0): then the sum of exponentials is >= 1."""
    return bool(kernel_size[0] % 2 and kernel_size[1] % 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
@functools.partial(jax.jit, static_argnums=(1,))
def log_normalizer(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``zeta = log sum_tap exp(eta . phi[tap])``: ``[..., P] -> [...]`` (finite for any
    ``eta``: every logit is ``-q / 2 <= 0`` and, in a window of odd sizes, the centre's is 0, so
    the sum is at least 1; in other windows the maximum is taken out). A loop over the taps on
    CPU, one fused reduction elsewhere."""
    return lax.platform_dependent(
        eta,
        cpu=functools.partial(_log_normalizer_loop, kernel_size=kernel_size),
        default=functools.partial(_log_normalizer_fused, kernel_size=kernel_size),
    )


def _log_normalizer_fused(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    logits = _logits(eta, kernel_size)
    if _odd(kernel_size):
        return jnp.log(jnp.sum(jnp.exp(logits), axis=-1))
    top = jnp.max(logits, axis=-1)
    return top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))


def _log_normalizer_loop(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    if _odd(kernel_size):

        def add(t, total):
            return total + jnp.exp(_logit(t, eta, kernel_size))

        return jnp.log(_over_taps(add, kernel_size, jnp.zeros(eta.shape[:-1], eta.dtype)))

    def tap(t, carry):
        top, total = carry
        logit = _logit(t, eta, kernel_size)
        new_top = jnp.maximum(top, logit)
        return new_top, total * jnp.exp(top - new_top) + jnp.exp(logit - new_top)

    first = _logit(jnp.int32(0), eta, kernel_size)
    top, total = _over_taps(tap, kernel_size, (first, jnp.zeros_like(first)))
    return top + jnp.log(total)


@log_normalizer.defjvp
def _log_normalizer_jvp(kernel_size, primals, tangents):
    (eta,), (t_eta,) = primals, tangents
    zeta = log_normalizer(eta, kernel_size)
    parts = eta.shape[-1]
    unit = [tuple(int(q == p) for q in range(parts)) for p in range(parts)]
    t_zeta = sum(
        weight_moments(eta, zeta, kernel_size, unit[p]) * t_eta[..., p] for p in range(parts)
    )
    return zeta, t_zeta


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
@functools.partial(jax.jit, static_argnums=(2, 3))
def weight_moments(
    eta: jax.Array, zeta: jax.Array, kernel_size: tuple[int, int], moments: tuple[int, ...]
) -> jax.Array:
    """``sum_tap exp(eta . phi[tap] - zeta) * prod_p phi[tap, p] ** moments[p]``: ``[...]``
    (a loop over the taps on CPU, one fused reduction elsewhere)."""
    return lax.platform_dependent(
        eta,
        zeta,
        cpu=functools.partial(_weight_moments_loop, kernel_size=kernel_size, moments=moments),
        default=functools.partial(_weight_moments_fused, kernel_size=kernel_size, moments=moments),
    )


def _weight_moments_fused(eta, zeta, kernel_size, moments):
    phi = tap_features(kernel_size, eta.shape[-1]).astype(eta.dtype)
    weights = jnp.exp(_logits(eta, kernel_size) - zeta[..., None])
    for p, power in enumerate(moments):
        weights = weights * phi[:, p] ** power
    return jnp.sum(weights, axis=-1)


def _weight_moments_loop(eta, zeta, kernel_size, moments):
    def tap(t, total):
        return total + tap_weight(t, eta, zeta, kernel_size, moments)

    return _over_taps(tap, kernel_size, jnp.zeros_like(zeta))


@weight_moments.defjvp
def _weight_moments_jvp(kernel_size, moments, primals, tangents):
    eta, zeta = primals
    t_eta, t_zeta = tangents
    out = weight_moments(eta, zeta, kernel_size, moments)
    tangent = -out * t_zeta
    for p in range(eta.shape[-1]):
        higher = tuple(a + (q == p) for q, a in enumerate(moments))
        tangent = tangent + weight_moments(eta, zeta, kernel_size, higher) * t_eta[..., p]
    return out, tangent


def explicit_weights(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """The weights as an array ``[..., kh, kw]`` (a softmax over the taps)."""
    phi = jnp.asarray(tap_features(kernel_size, eta.shape[-1]), eta.dtype)
    weights = jax.nn.softmax(eta @ phi.T, axis=-1)
    return weights.reshape(*eta.shape[:-1], *kernel_size)
