"""Complex inputs: every op on the XLA path and the reference against a numpy einsum on explicit
patches (complex128), the transpose identity <A x, y> = <x, A^T y> (bilinear, no conjugation,
as JAX's transposition), JAX's gradient convention, promotion of mixed real/complex inputs,
complex128 under x64, and the Pallas path refusing complex dtypes."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svconv
from experiments.static.lowering import lower_for_cuda, triton_kernel_names
from tests.conftest import Case, assert_close

CASE = Case(2, 7, 6, 3, 2, (3, 2), (2, 1), (1, 2), ((1, 0), (2, 1)))
GEOM = CASE.geom()


def _patches(x: np.ndarray) -> np.ndarray:
    """``[N, Ho, Wo, kh, kw, C]``: the input each output pixel reads through each tap (zero
    outside), by explicit index arithmetic."""
    n, h, w, c = x.shape
    (ho, wo), (kh, kw) = GEOM.out_size, GEOM.kernel_size
    (sh, sw), (dh, dw), ((pt, _), (pl, _)) = GEOM.stride, GEOM.dilation, GEOM.padding
    out = np.zeros((n, ho, wo, kh, kw, c), x.dtype)
    for i in range(ho):
        for j in range(wo):
            for m in range(kh):
                for q in range(kw):
                    r, s = i * sh + m * dh - pt, j * sw + q * dw - pl
                    if 0 <= r < h and 0 <= s < w:
                        out[:, i, j, m, q] = x[:, r, s]
    return out


def _complex(seed: int, *shapes, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(dtype) for s in shapes]


def _cases():
    """(name, op as a function of its arrays, arrays, numpy oracle)."""
    (ho, wo), (kh, kw) = GEOM.out_size, GEOM.kernel_size
    n, c, o = CASE.n, CASE.cin, CASE.cout
    x, w, d, wl, k, v = _complex(
        1,
        (n, CASE.h, CASE.w, c),
        (kh, kw, c, o),
        (n, ho, wo, kh, kw),
        (ho, wo, kh, kw, c, o),
        (n, ho, wo, kh, kw),
        (n, ho, wo, c),
    )
    kw_ = CASE.kw()
    return [
        (
            "modulated",
            functools.partial(svconv.modulated_conv2d, **kw_),
            (x, w, d),
            lambda x, w, d: np.einsum("bijmnc,mnco,bijmn->bijo", _patches(x), w, d),
        ),
        (
            "local",
            functools.partial(svconv.local_conv2d, **kw_),
            (x, wl),
            lambda x, wl: np.einsum("bijmnc,ijmnco->bijo", _patches(x), wl),
        ),
        (
            "filter",
            functools.partial(svconv.pixel_filter2d, **kw_),
            (x, k),
            lambda x, k: np.einsum("bijmnc,bijmn->bijc", _patches(x), k),
        ),
    ], v


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_ops_match_an_einsum_on_explicit_patches(impl):
    cases, _ = _cases()
    for name, fn, args, oracle in cases:
        y = fn(*args, impl=impl)
        assert y.dtype == jnp.complex64, name
        want = oracle(*(a.astype(np.complex128) for a in args))
        assert_close(y.real, want.real, tol=1e-5, what=f"{name} real")
        assert_close(y.imag, want.imag, tol=1e-5, what=f"{name} imag")


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_transpose_identity_in_every_argument(impl):
    """<A_i a, y> = <a, A_i^T y> with the bilinear product sum(u * v): JAX transposes, it does not
    take adjoints."""
    cases, v = _cases()
    splat = functools.partial(svconv.pixel_splat2d, **CASE.kw(), output_size=(CASE.h, CASE.w))
    cases.append(("splat", splat, (v, cases[2][2][1]), None))
    for name, fn, args, _ in cases:
        out = fn(*args, impl=impl)
        (ct,) = _complex(2, out.shape)
        for i, a in enumerate(args):

            def slot(z, i=i, fn=fn, args=args):
                return fn(*args[:i], z, *args[i + 1 :], impl=impl)

            (transposed,) = jax.linear_transpose(slot, a)(ct)
            left = jnp.sum(slot(a) * ct)
            right = jnp.sum(a * transposed)
            assert abs(complex(left) - complex(right)) <= 1e-4 * abs(complex(left)), (name, i)


def test_gradients_follow_jax_convention():
    """The XLA path's gradients of a real loss equal those of the reference (plain jnp autodiff,
    JAX's convention for complex inputs), and so do forward-mode derivatives."""
    cases, _ = _cases()
    for name, fn, args, _ in cases:

        def loss(*a, fn=fn, impl="xla"):
            return jnp.sum(jnp.abs(fn(*a, impl=impl)) ** 2)

        argnums = tuple(range(len(args)))
        got = jax.grad(loss, argnums=argnums)(*args)
        want = jax.grad(functools.partial(loss, impl="reference"), argnums=argnums)(*args)
        for g, r in zip(got, want, strict=True):
            assert g.dtype == jnp.complex64
            assert_close(g.real, r.real, tol=1e-5, what=f"{name} grad")
            assert_close(g.imag, r.imag, tol=1e-5, what=f"{name} grad")
        t = jax.jvp(functools.partial(fn, impl="xla"), args, args)[1]
        t_ref = jax.jvp(functools.partial(fn, impl="reference"), args, args)[1]
        assert_close(t.real, t_ref.real, tol=1e-5, what=f"{name} jvp")
        assert_close(t.imag, t_ref.imag, tol=1e-5, what=f"{name} jvp")


def test_gaussian_filter_of_a_complex_field():
    """Real weights (sigma, rho real) on a complex field: real and imaginary parts are filtered
    apart; the gradient in sigma is real."""
    (x,) = _complex(3, (1, 8, 7, 2))
    sigma = jnp.full((1, 8, 7), 1.3)
    y = svconv.gaussian_filter2d(x, sigma, 5, impl="xla")
    assert y.dtype == jnp.complex64
    parts = [svconv.gaussian_filter2d(p, sigma, 5, impl="xla") for p in (x.real, x.imag)]
    assert_close(y.real, parts[0], tol=1e-6)
    assert_close(y.imag, parts[1], tol=1e-6)

    def loss(s, impl):
        return jnp.sum(jnp.abs(svconv.gaussian_filter2d(x, s, 5, impl=impl)) ** 2)

    g = jax.grad(loss)(sigma, "xla")
    assert g.dtype == jnp.float32
    assert_close(g, jax.grad(loss)(sigma, "reference"), tol=1e-5)


def test_mixed_real_and_complex_promote_to_complex():
    (x,) = _complex(4, (1, 6, 6, 2))
    w = np.ones((3, 3, 2, 2), np.float32)
    d = np.ones((1, 6, 6, 3, 3), np.float32)
    assert svconv.modulated_conv2d(x, w, d).dtype == jnp.complex64
    assert svconv.modulated_conv2d(x.real, w.astype(np.complex64), d).dtype == jnp.complex64


def test_complex128_under_x64():
    with jax.enable_x64(True):
        cases, _ = _cases()
        for name, fn, args, oracle in cases:
            args = [a.astype(np.complex128) for a in args]
            y = fn(*args)
            assert y.dtype == jnp.complex128, name
            want = oracle(*args)
            np.testing.assert_allclose(np.asarray(y), want, rtol=1e-12, atol=1e-12)


def test_pallas_refuses_complex_and_auto_uses_xla(caplog):
    cases, _ = _cases()
    name, fn, args, _ = cases[0]
    with pytest.raises(NotImplementedError, match="impl='pallas'.*complex64"):
        fn(*args, impl="pallas")
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        hlo = lower_for_cuda(fn, *shapes)
    assert not triton_kernel_names(hlo)
    assert "using xla, not triton: dtype complex64" in caplog.text
