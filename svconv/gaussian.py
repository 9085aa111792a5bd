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
``[..., kw]``) array exists on any platform. Without ``rho`` they factor into sums over the rows
and over the columns (``kh + kw`` exponentials a pixel); with ``rho``, on CPU a loop over the
taps a few columns a step, elsewhere every tap unrolled into one expression (one fused pass).
Their derivatives are moments again (:func:`log_normalizer`, :func:`weight_moments`), to any order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import PartitionSpec

from pallas_kernels.gaussian_taps import features
from pallas_kernels.geometry import match_varying, vary_like

_VARIANCE_FLOOR = 1e-12


def tap_features(kernel_size: tuple[int, int], parts: int) -> np.ndarray:
    """``phi``: ``[kh * kw, parts]``, taps in row-major order."""
    kh, kw = kernel_size
    u = np.repeat(np.arange(kh) - (kh - 1) / 2, kw)
    v = np.tile(np.arange(kw) - (kw - 1) / 2, kh)
    return np.stack(features(u, v, parts), axis=-1)


def _tap_features(m, n, kernel_size, parts: int, dtype) -> list:
    """``phi`` of tap ``(m, n)`` (row and column, traced int32 or Python ints: then Python
    floats, so that an unrolled sum traces no op for them), from the indices: the loops that
    call this stay free of array constants."""
    kh, kw = kernel_size

    def offset(i, size):
        if isinstance(i, int):
            return i - (size - 1) / 2
        return jnp.asarray(i).astype(dtype) - (size - 1) / 2

    return features(offset(m, kh), offset(n, kw), parts)


def _times_moment(weight: jax.Array, phi: list, moments) -> jax.Array:
    """``weight * prod_p phi[p] ** moments[p]``."""
    for f, power in zip(phi, moments, strict=True):
        if power:
            weight = weight * f**power
    return weight


def _dot(phi: list, eta) -> jax.Array:
    """``eta . phi``: ``[...]``; ``eta`` an array ``[..., P]`` or its ``P`` planes."""
    planes = eta if isinstance(eta, list) else _planes(eta)
    return sum(plane * f for plane, f in zip(planes, phi, strict=True))


def _exp_logit(phi: list, eta, zeta) -> jax.Array:
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


# Taps a step of the CPU's loop computes (unrolled): 8 measured best at 31x31 with rho, the
# compile time of forward and gradient 1.4 s (31 a step: 2.5 s and a 1.4x faster forward
# normalizer; 4: 1.2 s and 1.6x slower).
_TAPS_PER_STEP = 8


def _looped(fn, kernel_size, init):
    """``fn(m, n, carry)`` for every tap ``(m, n)`` of the window in a loop over the rows and
    blocks of ``_TAPS_PER_STEP`` columns, the columns of a block unrolled: each step is one
    elementwise pass over the parameters, with no reduction op, no array constant and no
    ``[..., kw]`` or ``[..., kh, kw]`` temporary. The CPU's form: compile time flat in the
    window; one tap per step measured 1.5-2x slower there."""
    kh, kw = kernel_size
    block = min(_TAPS_PER_STEP, kw)
    blocks = -(-kw // block)

    def step(t, carry):
        m, first = t // blocks, (t % blocks) * block
        for i in range(block):
            n = first + i
            new = fn(m, n, carry)
            if kw % block:  # the last block's columns past the window
                new = jax.tree.map(functools.partial(jnp.where, n < kw), new, carry)
            carry = new
        return carry

    return lax.fori_loop(0, kh * blocks, step, init)


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


def _per_platform(form, *operands, **params):
    """``form(*operands, **params, over=...)``: the loop lowered for CPU, the unrolled taps
    lowered for any other platform. A primitive whose lowering rule is registered per
    platform, so that only the chosen form is ever traced (the unrolled one is ``kh * kw``
    taps: seconds to trace at 31x31). Only :func:`log_normalizer` and :func:`weight_moments`
    bind it, under their own JVP rules: it needs no differentiation rule of its own."""
    operands = match_varying(*operands)
    return _sums_p.bind(*operands, form=form, params=tuple(sorted(params.items())))


def _sums_impl(*operands, form, params, over):
    def typed(fn, kernel_size, init):  # the carry typed as the operands (inside shard_map)
        return over(fn, kernel_size, jax.tree.map(lambda v: vary_like(v, *operands), init))

    return tuple(_as_tuple(form(*operands, **dict(params), over=typed)))


def _as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _sums_abstract_eval(eta, *others, form, params):
    """One ``[...]`` array per sum, sharded as ``eta`` without its last dimension."""
    count = len(dict(params).get("moments", (None,)))
    sharding = eta.sharding
    if getattr(sharding, "spec", None) is not None:
        sharding = sharding.update(spec=PartitionSpec(*tuple(sharding.spec)[: eta.ndim - 1]))
    aval = eta.update(shape=eta.shape[:-1], sharding=sharding)  # operands' manual axes alike
    return (aval,) * count


def _sums_batch(args, axes, *, form, params):
    """Every sum is per pixel over the leading dimensions: the mapped axis goes first."""
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, axes, strict=True)]
    size = next(a.shape[0] for a, d in zip(args, axes, strict=True) if d is not None)
    args = [
        a if d is not None else jnp.broadcast_to(a, (size, *a.shape))
        for a, d in zip(args, axes, strict=True)
    ]
    outs = _sums_p.bind(*args, form=form, params=params)
    return outs, (0,) * len(outs)


_sums_p = Primitive("svconv_gaussian_sums")
_sums_p.multiple_results = True
_sums_p.def_impl(functools.partial(dispatch.apply_primitive, _sums_p))
_sums_p.def_abstract_eval(_sums_abstract_eval)
batching.primitive_batchers[_sums_p] = _sums_batch
mlir.register_lowering(
    _sums_p, mlir.lower_fun(functools.partial(_sums_impl, over=_looped), True), "cpu"
)
mlir.register_lowering(_sums_p, mlir.lower_fun(functools.partial(_sums_impl, over=_unrolled), True))


def _logit(m, n, planes: list, kernel_size: tuple[int, int]) -> jax.Array:
    """``eta . phi`` of tap ``(m, n)``: ``[...]``, from ``eta``'s planes."""
    return _dot(_tap_features(m, n, kernel_size, len(planes), planes[0].dtype), planes)


def _planes(eta: jax.Array) -> list:
    """``eta [..., P]`` as ``P`` arrays ``[...]``, sliced once for every tap."""
    return [eta[..., p] for p in range(eta.shape[-1])]


def _odd(kernel_size: tuple[int, int]) -> bool:
    """Whether the window has a centre tap (logit 0): then the sum of exponentials is >= 1."""
    return bool(kernel_size[0] % 2 and kernel_size[1] % 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
@functools.partial(jax.jit, static_argnums=(1,))
def log_normalizer(eta: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``zeta = log sum_tap exp(eta . phi[tap])``: ``[..., P] -> [...]`` (finite for any
    ``eta``: every logit is ``-q / 2 <= 0`` and, in a window of odd sizes, the centre's is 0, so
    the sum is at least 1; in other windows the running maximum is taken out)."""
    if eta.shape[-1] < 3:
        return _separable_log_normalizer(eta, kernel_size)
    (zeta,) = _per_platform(_log_normalizer, eta, kernel_size=kernel_size)
    return zeta


def _log_normalizer(eta, *, kernel_size, over):
    planes = _planes(eta)
    if _odd(kernel_size):

        def add(m, n, total):
            return total + jnp.exp(_logit(m, n, planes, kernel_size))

        return jnp.log(over(add, kernel_size, jnp.zeros(eta.shape[:-1], eta.dtype)))

    def tap(m, n, carry):
        top, total = carry
        logit = _logit(m, n, planes, kernel_size)
        new_top = jnp.maximum(top, logit)
        return new_top, total * jnp.exp(top - new_top) + jnp.exp(logit - new_top)

    first = _logit(0, 0, planes, kernel_size)
    top, total = over(tap, kernel_size, (first, jnp.zeros_like(first)))
    return top + jnp.log(total)


# Without ``rho`` the logit is a sum of a row part and a column part, ``eta_r A[m] + eta_c B[n]``
# (``A = -u^2 / 2``, ``B = -v^2 / 2``; isotropic: ``eta_r = eta_c = eta``), so the sums over the
# window are products of sums over one axis: ``kh + kw`` exponentials a pixel, not ``kh * kw``.


def _axis_sums(e: jax.Array, size: int, orders) -> tuple[jax.Array, dict]:
    """``log sum_i exp(e A[i])`` over one axis of ``size`` taps and the means
    ``E[A^j] = sum_i exp(e A[i]) A[i]^j / sum_i exp(e A[i])`` for ``j`` in ``orders``. The
    largest ``A`` (the centre's) is taken out, so the sum is at least 1."""
    a = [-((i - (size - 1) / 2) ** 2) / 2 for i in range(size)]
    top = max(a)
    weights = [jnp.exp(e * (ai - top)) for ai in a]
    total = sum(weights)
    means = {j: sum(w * ai**j for w, ai in zip(weights, a, strict=True)) / total for j in orders}
    return e * top + jnp.log(total), means


def _separable_log_normalizer(eta, kernel_size):
    er, ec = eta[..., 0], eta[..., -1]
    return _axis_sums(er, kernel_size[0], ())[0] + _axis_sums(ec, kernel_size[1], ())[0]


def _separable_moments(eta, zeta, kernel_size, moments):
    """The weight moments without ``rho``: for the pair form ``phi = (A, B)`` a product of one
    axis's means; isotropic, ``phi = A + B``, the binomial expansion of ``(A + B)^k``."""
    er, ec = eta[..., 0], eta[..., -1]
    if eta.shape[-1] == 2:
        row_orders, col_orders = {a[0] for a in moments}, {a[1] for a in moments}
    else:
        row_orders = col_orders = set(range(max(a[0] for a in moments) + 1))
    log_r, mean_r = _axis_sums(er, kernel_size[0], row_orders)
    log_c, mean_c = _axis_sums(ec, kernel_size[1], col_orders)
    scale = jnp.exp(log_r + log_c - zeta)  # 1 where zeta is the log-normalizer
    if eta.shape[-1] == 2:
        return tuple(scale * mean_r[a[0]] * mean_c[a[1]] for a in moments)
    return tuple(
        scale * sum(math.comb(k, j) * mean_r[j] * mean_c[k - j] for j in range(k + 1))
        for (k,) in moments
    )


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
    if eta.shape[-1] < 3:
        return _separable_moments(eta, zeta, kernel_size, moments)
    return _per_platform(_weight_moments, eta, zeta, kernel_size=kernel_size, moments=moments)


def _weight_moments(eta, zeta, *, kernel_size, moments, over):
    planes = _planes(eta)

    def add(m, n, totals):
        phi = _tap_features(m, n, kernel_size, len(planes), eta.dtype)
        weight = _exp_logit(phi, planes, zeta)
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
