"""gaussian_kernels (isotropic, axis-aligned, rotated): normalised, the right shape, a delta at
sigma -> 0, smooth gradients, an independent check of the elliptical formula; gaussian_filter2d
and gaussian_splat2d against the explicit-weights route on every implementation, forward,
backward and forward mode; bad arguments."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svconv
from experiments.gpu_check import compare
from svconv import gaussian
from tests.conftest import assert_close, random_cases, rands


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


# ------------------------------------------------------------------ elliptical gaussian_kernels


def test_elliptical_kernels_match_an_independent_formula():
    """Sigma^-1 from numpy's matrix inverse, the quadratic form tap by tap."""
    sr = np.array([0.8, 2.0, 1.3])
    sc = np.array([1.5, 0.6, 1.3])
    rho = np.array([0.5, -0.7, 0.0])
    k = np.asarray(svconv.gaussian_kernels((jnp.asarray(sr), jnp.asarray(sc)), (5, 7), rho=rho))
    assert k.shape == (3, 5, 7)
    for i in range(3):
        cov = np.array([[sr[i] ** 2, rho[i] * sr[i] * sc[i]], [rho[i] * sr[i] * sc[i], sc[i] ** 2]])
        inv = np.linalg.inv(cov)
        want = np.zeros((5, 7))
        for m in range(5):
            for n in range(7):
                d = np.array([m - 2.0, n - 3.0])
                want[m, n] = np.exp(-0.5 * d @ inv @ d)
        np.testing.assert_allclose(k[i], want / want.sum(), rtol=2e-5, atol=1e-7)
    # The pair without rho is the axis-aligned product; one sigma with rho uses sr = sc = sigma.
    pair = svconv.gaussian_kernels((jnp.asarray(sr), jnp.asarray(sc)), (5, 7))
    u, v = np.arange(5)[:, None] - 2.0, np.arange(7)[None, :] - 3.0
    for i in range(3):
        want = np.exp(-(u**2) / (2 * sr[i] ** 2) - v**2 / (2 * sc[i] ** 2))
        np.testing.assert_allclose(pair[i], want / want.sum(), rtol=2e-5, atol=1e-7)
    same = svconv.gaussian_kernels(jnp.asarray(sr), 5, rho=jnp.asarray(rho))
    both = svconv.gaussian_kernels((jnp.asarray(sr), jnp.asarray(sr)), 5, rho=jnp.asarray(rho))
    assert_close(same, both, tol=1e-6)


def test_elliptical_zero_sigma_is_a_delta_without_nan():
    zero = jnp.zeros((2,))
    rho = jnp.array([0.0, 0.9])
    k = svconv.gaussian_kernels((zero, zero), 3, rho=rho)
    delta = jnp.zeros((3, 3)).at[1, 1].set(1.0)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(k[i]), np.asarray(delta))

    def loss(s, r):
        return jnp.sum(
            svconv.gaussian_kernels((s, s + 1.0), 3, rho=r) * jnp.arange(9.0).reshape(3, 3)
        )

    for g in jax.grad(loss, argnums=(0, 1))(zero, rho):
        assert bool(jnp.all(jnp.isfinite(g)))


# ----------------------------------------------- gaussian_filter2d / gaussian_splat2d vs weights

FORMS = ["isotropic", "axis-aligned", "rotated"]


def _sigma_rho(form: str, shape, seed: int):
    sr, sc, r = rands(seed, shape, shape, shape)
    sr, sc = 0.3 + jnp.abs(sr), 0.3 + jnp.abs(sc)
    rho = 0.8 * jnp.tanh(r)
    if form == "isotropic":
        return sr, None
    if form == "axis-aligned":
        return (sr, sc), None
    return (sr, sc), rho


def _arrays(sigma, rho):
    """The differentiable arrays of (sigma, rho), flat."""
    return [*(sigma if isinstance(sigma, tuple) else (sigma,)), *(() if rho is None else (rho,))]


def _rebuild(form, arrays):
    if form == "isotropic":
        return arrays[0], None
    if form == "axis-aligned":
        return (arrays[0], arrays[1]), None
    return (arrays[0], arrays[1]), arrays[2]


GAUSS_CASES = random_cases(seed=7, count=3, max_k=6)


def _gauss_params():
    # Each random geometry with one form (in turn), on both paths.
    for case, form in zip(GAUSS_CASES, FORMS, strict=True):
        for impl in ("xla", "pallas"):
            yield pytest.param(case, form, impl, id=f"{impl}-{form}-{case.id}")


def _compare(f, g, args, seed, dtype=jnp.float32):
    """f and g agree forward, in the VJP with a random cotangent and in the JVP."""
    y, vjp = jax.vjp(f, *args)
    y_ref, vjp_ref = jax.vjp(g, *args)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, dtype, what="forward")
    (ct,) = rands(seed, y.shape, dtype=y.dtype)
    for i, (a, b) in enumerate(zip(vjp(ct), vjp_ref(ct), strict=True)):
        assert a.shape == args[i].shape
        assert_close(a, b, dtype, tol=2e-4 if dtype == jnp.float32 else None, what=f"vjp {i}")
    tangents = tuple(rands(seed + 1, *(a.shape for a in args)))
    t, t_ref = jax.jvp(f, args, tangents)[1], jax.jvp(g, args, tangents)[1]
    assert_close(t, t_ref, dtype, tol=2e-4 if dtype == jnp.float32 else None, what="jvp")


@pytest.mark.parametrize("case,form,impl", list(_gauss_params()))
def test_filter_and_splat_match_the_explicit_weights(case, form, impl):
    geom = case.geom()
    (x,) = rands(81, (case.n, case.h, case.w, case.cin))
    sigma, rho = _sigma_rho(form, (case.n, *geom.out_size), 82)
    size = case.k

    def filt(impl_):
        def f(x, *arrays):
            s, r = _rebuild(form, arrays)
            return svconv.gaussian_filter2d(x, s, size, rho=r, **case.kw(), impl=impl_)

        return f

    _compare(filt(impl), filt("reference"), (x, *_arrays(sigma, rho)), 83)
    # The explicit-weights route is exactly the reference.
    s, r = sigma, rho
    explicit = svconv.pixel_filter2d(
        x, svconv.gaussian_kernels(s, size, rho=r), **case.kw(), impl="reference"
    )
    assert_close(filt(impl)(x, *_arrays(sigma, rho)), explicit)

    (v,) = rands(84, (case.n, *geom.out_size, case.cin))

    def splat(impl_):
        def f(v, *arrays):
            s, r = _rebuild(form, arrays)
            return svconv.gaussian_splat2d(
                v, s, size, rho=r, **case.kw(), output_size=(case.h, case.w), impl=impl_
            )

        return f

    _compare(splat(impl), splat("reference"), (v, *_arrays(sigma, rho)), 85)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_low_precision(impl, dtype):
    (x,) = rands(86, (2, 9, 8, 3), dtype=dtype)
    sigma, rho = _sigma_rho("rotated", (2, 9, 8), 87)
    y = svconv.gaussian_filter2d(x, sigma, 5, rho=rho, impl=impl)
    # sigma and rho are float32, so the output promotes; with 16-bit sigma it stays 16-bit.
    assert y.dtype == jnp.float32
    low = tuple(s.astype(dtype) for s in sigma)
    y16 = svconv.gaussian_filter2d(x, low, 5, rho=rho.astype(dtype), impl=impl)
    assert y16.dtype == dtype
    want = svconv.gaussian_filter2d(
        x.astype(jnp.float32), tuple(s.astype(jnp.float32) for s in low), 5,
        rho=rho.astype(dtype).astype(jnp.float32), impl="reference",
    )  # fmt: skip
    assert_close(y16, want, dtype)


def test_zero_sigma_filter_is_the_identity():
    (x,) = rands(88, (1, 6, 7, 2))
    zero = jnp.zeros((1, 6, 7))
    for impl in ("xla", "pallas"):
        f = functools.partial(svconv.gaussian_filter2d, x, size=5, impl=impl)
        assert_close(f(zero), x, tol=0)
        g = jax.grad(lambda s, f=f: jnp.sum(f(s) ** 2))(zero)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_no_weights_array_in_the_xla_program():
    """Neither forward nor gradient of the XLA path holds a [.., kh, kw] array: XLA's compiled
    temporaries stay under 10% of the weights' size."""
    n, h, size = 1, 64, 31
    x = jax.ShapeDtypeStruct((n, h, h, 3), jnp.float32)
    s = jax.ShapeDtypeStruct((n, h, h), jnp.float32)
    weights_bytes = n * h * h * size * size * 4

    def loss(x, sr, sc, rho):
        return jnp.sum(svconv.gaussian_filter2d(x, (sr, sc), size, rho=rho, impl="xla") ** 2)

    for fn in (loss, jax.grad(loss, argnums=(0, 1, 2, 3))):
        memory = jax.jit(fn).lower(x, s, s, s).compile().memory_analysis()
        assert memory.temp_size_in_bytes < 0.1 * weights_bytes, memory.temp_size_in_bytes


@pytest.mark.parametrize(
    "kernel_size", [(5, 7), (4, 6), (3, 19)], ids=["odd", "even", "wide"]
)  # wide: the CPU loop's last block of columns is partial
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_normalizer_and_moments(kernel_size, parts):
    """The log-normalizer and the weight moments in every form against the explicit weights in
    float64 numpy."""
    sr, sc, rho = rands(3, (2, 4, 5), (2, 4, 5), (2, 4, 5))
    sr, sc = 0.3 + 2 * jnp.abs(sr), 0.3 + 2 * jnp.abs(sc)
    sigma = sr if parts == 1 else (sr, sc)
    eta = gaussian.parameters(sigma, 0.9 * jnp.tanh(rho) if parts == 3 else None)
    phi = gaussian.tap_features(kernel_size, parts)
    logits = np.asarray(eta, np.float64) @ phi.T
    zeta = np.log(np.sum(np.exp(logits), axis=-1))
    z = jnp.asarray(zeta, jnp.float32)
    moments = ((0,) * parts, (1,) + (0,) * (parts - 1), (2,) * parts, (3,) + (1,) * (parts - 1))

    # The two forms of the sums over the taps, called directly, and without rho the public
    # functions' product of sums over the rows and over the columns.
    for form in [gaussian._looped, gaussian._unrolled] + ["separable"] * (parts < 3):
        if form == "separable":
            got_zeta = gaussian.log_normalizer(eta, kernel_size)
            got = gaussian.weight_moments(eta, z, kernel_size, moments)
        else:
            got_zeta = gaussian._log_normalizer(eta, kernel_size=kernel_size, over=form)
            got = gaussian._weight_moments(
                eta, z, kernel_size=kernel_size, moments=moments, over=form
            )
        assert_close(got_zeta, zeta, terms=phi.shape[0])
        for a, value in zip(moments, got, strict=True):
            expected = np.sum(np.exp(logits - zeta[..., None]) * np.prod(phi**a, -1), -1)
            assert_close(value, expected, terms=phi.shape[0])


def _filter(sigma, *, rho=None, x_dtype=None):
    def call(x):
        return svconv.gaussian_filter2d(
            x if x_dtype is None else x.astype(x_dtype), sigma, 3, rho=rho
        )

    return call


ONES = jnp.ones((1, 6, 6))
BAD = [
    ("sigma-shape", _filter(jnp.ones((1, 5, 6))), ValueError,
     r"`sigma` must be \[batch, out_height, out_width\] of shape \(1, 6, 6\) \(the output grid of "
     r"`x` of shape \(1, 6, 6, 2\) with kernel \(3, 3\).*; got `sigma` \(1, 5, 6\)"),
    ("pair-shapes", _filter((ONES, jnp.ones((6, 6)))), ValueError,
     r"`sigma\[1\]` must be .*\(1, 6, 6\) \(the output grid .*\); "
     r"got `sigma\[0\]` \(1, 6, 6\), `sigma\[1\]` \(6, 6\)"),
    ("pair-length", _filter((ONES,) * 3), ValueError,
     r"pair \(sigma_rows, sigma_cols\), got 3 arrays"),
    ("rho-range", _filter(ONES, rho=ONES), ValueError,
     r"`rho` must lie in \(-1, 1\), got values in \[1.0, 1.0\]"),
    ("rho-shape", _filter(ONES, rho=jnp.ones((6, 6))), ValueError, r"`rho` must be"),
    ("sigma-int", _filter(ONES.astype(jnp.int32)), TypeError, r"`sigma` must have a floating"),
    ("x-int", _filter(ONES, x_dtype=jnp.int32), TypeError, r"`x` must have a floating or complex"),
    ("splat-sigma", lambda x: svconv.gaussian_splat2d(x, jnp.ones((1, 3, 6)), 3), ValueError,
     r"`sigma` must be \[batch, height, width\] of shape \(1, 6, 6\) \(`x` is \(1, 6, 6, 2\)\)"),
    ("size", lambda x: svconv.gaussian_filter2d(x, ONES, 0), ValueError, r"`size`"),
]  # fmt: skip


def _bad_params():
    for name, fn, exc, pattern in BAD:
        # A traced rho cannot be compared with (-1, 1): that check is eager only.
        for jit in (False,) if name == "rho-range" else (False, True):
            yield pytest.param(fn, exc, pattern, jit, id=f"{name}-{'jit' if jit else 'eager'}")


@pytest.mark.parametrize("fn,exc,pattern,jit", list(_bad_params()))
def test_bad_arguments(fn, exc, pattern, jit):
    x = jnp.ones((1, 6, 6, 2))
    with pytest.raises(exc, match=pattern):
        (jax.jit(fn) if jit else fn)(x)


# -------------------------------------------------------------------------------- transformations


def _small(impl):
    """The rotated filter at a tiny size, as a function of (x, sr, sc, rho), and its arguments."""
    case_kw = {"stride": (2, 1), "padding": ((1, 0), (2, 1)), "dilation": (1, 2)}
    (x,) = rands(91, (2, 6, 5, 2))
    (sr, sc), rho = _sigma_rho("rotated", (2, 3, 6), 92)

    def f(x, sr, sc, rho):
        return svconv.gaussian_filter2d(x, (sr, sc), (3, 2), rho=rho, **case_kw, impl=impl)

    return f, (x, sr, sc, rho)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_jit_vmap_and_second_order(impl):
    f, args = _small(impl)
    ref, _ = _small("reference")
    assert_close(jax.jit(f)(*args), ref(*args), what="jit")
    for i in (0, 3):  # over the image, and over a parameter (rho)
        stacked = [a if j != i else jnp.stack([a, 0.9 * a]) for j, a in enumerate(args)]
        axes = [0 if j == i else None for j in range(len(args))]
        assert_close(
            jax.vmap(f, in_axes=axes)(*stacked), jax.vmap(ref, in_axes=axes)(*stacked), what=f"{i}"
        )

    def grad_of_grad(fn):
        def loss(*a):
            grads = jax.grad(lambda *b: jnp.sum(jnp.sin(fn(*b))), argnums=(0, 1, 2, 3))(*a)
            return sum(jnp.sum(g**2) for g in grads)

        return jax.grad(loss, argnums=(0, 1, 2, 3))

    for a, b in zip(grad_of_grad(f)(*args), grad_of_grad(ref)(*args), strict=True):
        assert_close(a, b, tol=1e-4, what="grad of grad")
    argnums = (1, 2, 3)
    for a, b in zip(
        jax.jacfwd(f, argnums=argnums)(*args), jax.jacrev(f, argnums=argnums)(*args), strict=True
    ):
        assert_close(a, b, what="jacfwd vs jacrev")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_hessian_in_sigma_against_finite_differences(impl):
    f, (x, sr, sc, rho) = _small(impl)

    def loss(sr):
        return jnp.sum(jnp.tanh(f(x, sr, sc, rho)))

    (direction,) = rands(93, sr.shape)
    # The Hessian along a direction (forward over reverse mode; the whole Hessian is that, vmapped
    # over a basis: the batching rules are test_transforms').
    hvp = jax.jvp(jax.grad(loss), (sr,), (direction,))[1]
    eps = 1e-3
    fd = (jax.grad(loss)(sr + eps * direction) - jax.grad(loss)(sr - eps * direction)) / (2 * eps)
    assert_close(hvp, fd, tol=3e-3)
    if impl == "xla":  # the XLA path's forward modes share one generic rule (test_transforms)
        return
    # Forward over forward mode: the inner tangent of the parameters depends on sigma, so the
    # outer JVP differentiates the fused tangent kernels in their scale too.
    curvature = jax.jvp(
        lambda s: jax.jvp(loss, (s,), (direction,))[1], (sr,), (direction,)
    )[1]  # fmt: skip
    assert_close(curvature, jnp.vdot(direction, fd), tol=3e-3, what="forward over forward")


@pytest.mark.parametrize("op", ["filter", "splat"])
def test_forward_mode_is_one_fused_kernel(op):
    """Lowered for CUDA, the JVP with tangents in the image, both sigmas and rho holds the op's
    kernel and one fused tangent kernel, nothing else."""
    from experiments.static.lowering import lower_for_cuda, triton_kernel_names

    f, args = _small("pallas")
    if op == "splat":
        args = (jnp.ones((*args[1].shape, args[0].shape[3])), *args[1:])

        def f(v, sr, sc, rho):
            return svconv.gaussian_splat2d(v, (sr, sc), 3, rho=rho, impl="pallas")

    count = len(args)
    text = lower_for_cuda(lambda *a: jax.jvp(f, a[:count], a[count:]), *args, *args)
    kernel = "forward" if op == "filter" else "grad_x"
    names = [f"svconv_gaussian_{kernel}", f"svconv_gaussian_{kernel}_jvp"]
    assert sorted(triton_kernel_names(text)) == names


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_splat_is_the_transpose_of_the_filter(impl):
    f, (x, sr, sc, rho) = _small(impl)
    y = f(x, sr, sc, rho)
    (ct,) = rands(94, y.shape)
    (transposed,) = jax.linear_transpose(lambda a: f(a, sr, sc, rho), x)(ct)
    splat = svconv.gaussian_splat2d(
        ct, (sr, sc), (3, 2), rho=rho, stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2),
        output_size=x.shape[1:3], impl=impl,
    )  # fmt: skip
    assert_close(transposed, splat)


def test_bf16_forward_mode_of_the_xla_path_rounds_once(monkeypatch):
    """The XLA path's JVP sums one term per tangent (x, sigma, rho): in float32, rounded to
    bfloat16 once. Rounding every term first gave 1.0-1.2x the comparison's tolerance on this
    case (seen on a GPU first); the fused kernels and the forward stay near 0.2x."""
    problem = compare.Problem("gaussian", 3, 29, 12, 9, 9, (7, 2), (2, 1), (1, 2), "SAME", rho=True)
    monkeypatch.setattr(compare, "IMPLS", ("xla",))
    (record,) = compare.compare_problem(problem, 0, (("bfloat16", None),), "cpu", print)
    jvp = record["results"]["jvp"]
    assert jvp["err"] < 0.5 * jvp["tol"], record
