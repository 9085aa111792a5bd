"""gaussian_kernels: normalised, the right shape, a delta at sigma -> 0, smooth gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import svconv
from tests.conftest import assert_close, rands


def test_matches_the_formula_and_sums_to_one():
    sigma = jnp.array([[0.7, 1.5], [3.0, 10.0]])
    k = svconv.gaussian_kernels(sigma, (5, 3))
    assert k.shape == (2, 2, 5, 3)
    r = np.arange(5)[:, None] - 2.0
    c = np.arange(3)[None, :] - 1.0
    for s, got in zip(np.asarray(sigma).ravel(), np.asarray(k).reshape(-1, 5, 3), strict=True):
        want = np.exp(-(r**2 + c**2) / (2 * s**2))
        np.testing.assert_allclose(got, want / want.sum(), rtol=1e-5, atol=1e-7)
    assert_close(k.sum(axis=(-2, -1)), jnp.ones((2, 2)))


def test_zero_sigma_is_the_identity_filter_without_nan():
    sigma = jnp.array([0.0, 1e-30, 1e-3])
    k = svconv.gaussian_kernels(sigma, 5)
    delta = jnp.zeros((5, 5)).at[2, 2].set(1.0)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(k[i]), np.asarray(delta))
    grad = jax.grad(
        lambda s: jnp.sum(svconv.gaussian_kernels(s, 5) * jnp.arange(25.0).reshape(5, 5))
    )(sigma)
    assert bool(jnp.all(jnp.isfinite(grad)))
    # Filtering with zero sigma leaves the image unchanged.
    (x,) = rands(41, (1, 6, 7, 2))
    y = svconv.pixel_filter2d(x, svconv.gaussian_kernels(jnp.zeros((1, 6, 7)), 5))
    assert_close(y, x, tol=0)


def test_gradient_matches_finite_differences():
    # The kernel's second moment grows with sigma (a linear weight would have zero derivative).
    r = jnp.arange(7.0) - 3
    weights = r[:, None] ** 2 + r[None, :] ** 2 + 0.1 * r[:, None] ** 4
    f = lambda s: jnp.sum(svconv.gaussian_kernels(s, 7) * weights)  # noqa: E731
    s = jnp.float32(1.3)
    eps = 1e-2
    fd = (f(s + eps) - f(s - eps)) / (2 * eps)
    assert float(fd) > 0.5
    np.testing.assert_allclose(float(jax.grad(f)(s)), float(fd), rtol=2e-3)


def test_dtype_follows_sigma():
    assert svconv.gaussian_kernels(jnp.ones((2,), jnp.bfloat16), 3).dtype == jnp.bfloat16
