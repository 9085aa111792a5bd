"""Low-rank per-pixel filters (``product_filter2d``, ``product_splat2d``) and the builders of the
decomposition: both methods (direct convolutions, FFTs) against the reference (the per-pixel
kernels built and applied by ``pixel_filter2d``'s reference) and an independent NumPy oracle;
every gradient, forward mode, transposition, vmap, dtypes, memory, bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import svconv
from svconv import product
from tests.conftest import assert_close, rands

METHODS = ("direct", "fft")
# (x shape, R, filters' trailing shape, stride, dilation, padding, weights shared)
CASES = [
    ((2, 9, 11, 3), 3, (5, 3), 1, 1, "SAME", False),
    ((1, 12, 10, 4), 2, (3, 4, 2), 2, 1, "VALID", True),
    ((2, 10, 9, 2), 4, (3, 3, 2), 1, 2, ((2, 1), (0, 3)), False),
    ((1, 11, 8, 2), 3, (4, 2), (2, 1), (1, 3), ((-1, 2), (1, -1)), False),
]


def _case(case, seed=0, dtype=jnp.float32):
    xs, r, fs, stride, dilation, padding, shared = case
    geo = {"stride": stride, "padding": padding, "dilation": dilation}
    (x, f) = rands(seed, xs, (r, *fs), dtype=dtype)
    ho, wo = _out_size(xs, fs, geo)
    (u,) = rands(seed + 1, (ho, wo, r) if shared else (xs[0], ho, wo, r), dtype=dtype)
    return (x, f, u), geo


def _out_size(xs, fs, geo):
    kernel = jnp.zeros((*fs[:2], 1, 1), jnp.float32)
    pads = geo["padding"]
    y = jax.eval_shape(
        lambda x: lax.conv_general_dilated(
            x,
            kernel,
            _pair(geo["stride"]),
            pads if not isinstance(pads, int) else [(pads,) * 2] * 2,
            rhs_dilation=_pair(geo["dilation"]),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),  # fmt: skip
        jax.ShapeDtypeStruct((1, *xs[1:3], 1), jnp.float32),
    )
    return y.shape[1:3]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _np_product_filter(x, f, u, stride, dilation, padding):
    """An independent oracle in float64: the per-pixel kernels built, then every output pixel's
    window summed with explicit indices."""
    x, f, u = (np.asarray(a, np.float64) for a in (x, f, u))
    if f.ndim == 3:
        f = f[..., None]
    n, h, w, c = x.shape
    r, kh, kw, g = f.shape
    if u.ndim == 3:
        u = np.broadcast_to(u, (n, *u.shape))
    ho, wo = u.shape[1:3]
    (sh, sw), (dh, dw), ((pt, _), (pl, _)) = stride, dilation, padding
    k = np.einsum("bijr,rmng->bijmng", u, f)
    y = np.zeros((n, ho, wo, c))
    for b, i, j, m, q in itertools.product(range(n), range(ho), range(wo), range(kh), range(kw)):
        row, col = i * sh + m * dh - pt, j * sw + q * dw - pl
        if 0 <= row < h and 0 <= col < w:
            y[b, i, j] += x[b, row, col] * np.repeat(k[b, i, j, m, q], c // g)
    return y


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_filter_splat_and_gradients_equal_the_reference(index, method):
    (x, f, u), geo = _case(CASES[index], seed=index)
    # FFTs spread each rounding over the whole image: an error of a few float32 ulps of the
    # largest value, not of each output's own sum.
    tol = 3e-5 if method == "fft" else None

    def op(impl, which="filter"):
        fn = svconv.product_filter2d if which == "filter" else svconv.product_splat2d
        extra = {"method": method} if impl == "xla" else {}
        if which == "splat":
            extra["output_size"] = x.shape[1:3]
        return lambda *a: fn(*a, impl=impl, **geo, **extra)

    y = op("xla")(x, f, u)
    assert_close(y, op("reference")(x, f, u), tol=tol, what="forward")
    pads = svconv.ops._checks.padding_pairs(
        geo["padding"], x.shape[1:3], f.shape[1:3], _pair(geo["stride"]), _pair(geo["dilation"])
    )
    want = _np_product_filter(x, f, u, _pair(geo["stride"]), _pair(geo["dilation"]), pads)
    assert_close(y, want, tol=tol, what="numpy oracle")
    (dy,) = rands(9, y.shape)
    # The splat is the transpose of the filter in x.
    splat = op("xla", "splat")(dy, f, u)
    assert_close(splat, op("reference", "splat")(dy, f, u), tol=tol, what="splat")
    transpose = jax.linear_transpose(lambda v: op("xla")(v, f, u), x)(dy)[0]
    assert_close(transpose, splat, tol=tol, what="linear_transpose")
    # Every gradient of the filter and of the splat.
    for which, args in (("filter", (x, f, u)), ("splat", (dy, f, u))):

        def loss(impl, which=which):
            return lambda *arrays: jnp.sum(jnp.sin(op(impl, which)(*arrays)))

        got = jax.grad(loss("xla"), argnums=(0, 1, 2))(*args)
        want = jax.grad(loss("reference"), argnums=(0, 1, 2))(*args)
        for name, a, b in zip("xfu", got, want, strict=True):
            assert_close(a, b, tol=tol, what=f"{which} grad {name}")


@pytest.mark.parametrize("method", METHODS)
def test_delta_filters_give_pixel_filter2d(method):
    """``R = kh * kw`` delta filters with the per-pixel kernels as weights: ``pixel_filter2d``."""
    kh, kw = 3, 5
    x, k = rands(1, (2, 10, 12, 3), (2, 10, 12, kh, kw))
    deltas = jnp.eye(kh * kw).reshape(kh * kw, kh, kw)
    got = svconv.product_filter2d(x, deltas, k.reshape(2, 10, 12, kh * kw), method=method)
    assert_close(got, svconv.pixel_filter2d(x, k, impl="xla"), tol=1e-5)
    splat = svconv.product_splat2d(x, deltas, k.reshape(2, 10, 12, kh * kw), method=method)
    assert_close(splat, svconv.pixel_splat2d(x, k, impl="xla"), tol=1e-5)


def test_fft_equals_direct_on_a_large_kernel():
    x, f, u = rands(2, (1, 48, 40, 3), (4, 31, 25, 3), (1, 48, 40, 4))
    direct = svconv.product_filter2d(x, f, u, method="direct")
    fft = svconv.product_filter2d(x, f, u, method="fft")
    scale = float(jnp.max(jnp.abs(direct)))
    assert float(jnp.max(jnp.abs(fft - direct))) / scale < 1e-5
    dy = rands(3, direct.shape)[0]
    back = [
        jax.vjp(lambda *a, m=m: svconv.product_filter2d(*a, method=m), x, f, u)[1](dy)
        for m in METHODS
    ]
    for name, a, b in zip("xfu", *back, strict=True):
        assert float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b))) < 1e-5, name


def test_method_chosen_by_size():
    def method_of(kernel, size=64):
        x, f, u = jnp.zeros((1, size, size, 3)), jnp.zeros((16, kernel, kernel)), None
        u = jnp.zeros((size, size, 16))
        text = str(jax.make_jaxpr(svconv.product_filter2d)(x, f, u))
        return "fft" if "method='fft'" in text else "direct"

    assert method_of(3) == "direct"
    assert method_of(31) == "fft"
    assert (
        product.choose_method(svconv.ops._checks.geometry((512, 512), (63, 63), 1, "SAME", 1), 16)
        == "fft"
    )


def test_forward_mode_against_finite_differences():
    with jax.enable_x64(True):
        (x, f, u), geo = _case(CASES[2], seed=4, dtype=jnp.float64)
        tangents = rands(5, x.shape, f.shape, u.shape, dtype=jnp.float64)
        for method in METHODS:

            def fn(*a, method=method):
                return svconv.product_filter2d(*a, method=method, **geo)

            args = (x, f, u)
            _, jvp = jax.jvp(fn, args, tuple(tangents))
            eps = 1e-6
            plus = fn(*(a + eps * t for a, t in zip(args, tangents, strict=True)))
            minus = fn(*(a - eps * t for a, t in zip(args, tangents, strict=True)))
            assert_close(jvp, (plus - minus) / (2 * eps), tol=1e-7, what=method)


def test_second_order_and_vmap():
    (x, f, u), geo = _case(CASES[0], seed=6)

    def loss(impl):
        return lambda f: jnp.sum(jnp.sin(svconv.product_filter2d(x, f, u, impl=impl, **geo)))

    v = rands(7, f.shape)[0]
    hvp = [jax.jvp(jax.grad(loss(impl)), (f,), (v,))[1] for impl in ("xla", "reference")]
    assert_close(*hvp, what="hvp in the filters")
    # vmap over each argument alone, and over all three.
    xs, fs, us = rands(8, (3, *x.shape), (3, *f.shape), (3, *u.shape))
    for axes in ((0, None, None), (None, 0, None), (None, None, 0), (0, 0, 0)):
        args = [
            a if ax is None else b for a, b, ax in zip((x, f, u), (xs, fs, us), axes, strict=True)
        ]
        got = jax.vmap(lambda *a: svconv.product_filter2d(*a, method="fft", **geo), axes)(*args)
        want = jnp.stack(
            [
                svconv.product_filter2d(
                    *(a if ax is None else a[i] for a, ax in zip(args, axes, strict=True)),
                    impl="reference",
                    **geo,
                )
                for i in range(3)
            ]
        )
        assert_close(got, want, what=f"vmap {axes}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_inputs_are_computed_in_float32(dtype):
    (x, f, u), geo = _case(CASES[0], seed=10, dtype=dtype)
    want = svconv.product_filter2d(*(a.astype(jnp.float32) for a in (x, f, u)), **geo)
    for method in METHODS:
        got = svconv.product_filter2d(x, f, u, method=method, **geo)
        assert got.dtype == dtype
        assert_close(got, want, dtype=dtype, what=method)


def test_complex_on_both_methods():
    (x, f, u), geo = _case(CASES[2], seed=11)
    (xi, fi, ui), _ = _case(CASES[2], seed=12)
    x, f, u = x + 1j * xi, f + 1j * fi, u + 1j * ui
    want = svconv.product_filter2d(x, f, u, impl="reference", **geo)
    for method in METHODS:
        got = svconv.product_filter2d(x, f, u, method=method, **geo)
        assert got.dtype == jnp.complex64
        assert_close(got, want, what=method)
        g = jax.grad(lambda f: jnp.sum(jnp.abs(svconv.product_filter2d(x, f, u, **geo)) ** 2))
        g_ref = jax.grad(
            lambda f: jnp.sum(
                jnp.abs(svconv.product_filter2d(x, f, u, impl="reference", **geo)) ** 2
            )
        )
        assert_close(g(f), g_ref(f), what=f"{method} grad")


def test_memory_is_that_of_a_few_images():
    """No ``[.., kh, kw]`` array: the compiled forward and backward hold a few times the bytes
    of the ``R`` terms' spectra (``R * C`` padded images), under a quarter of the per-pixel
    kernels' bytes at 31x31 on 64x64."""
    x, f, u = jnp.zeros((1, 64, 64, 3)), jnp.zeros((4, 31, 31)), jnp.zeros((1, 64, 64, 4))
    kernels_bytes = 64 * 64 * 31 * 31 * 4
    lh, lw = product.fast_length(64 + 30), product.fast_length(64 + 30)
    spectra_bytes = 4 * 3 * lh * (lw // 2 + 1) * 8

    def step(x, f, u):
        y, back = jax.vjp(lambda *a: svconv.product_filter2d(*a, method="fft"), x, f, u)
        return back(y)

    for fn in (lambda *a: svconv.product_filter2d(*a, method="fft"), step):
        stats = jax.jit(fn).lower(x, f, u).compile().memory_analysis()
        assert stats.temp_size_in_bytes < min(kernels_bytes / 4, 6 * spectra_bytes), stats


def _fft_order(fn, *args) -> tuple[int, list[tuple[str, str]]]:
    """The FFTs of ``fn``'s compiled program (CPU) and the pairs of them that do not depend on
    each other (which XLA:CPU may run at once)."""
    import re

    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    deps = {}
    ffts = []
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (.*)$", line)
        if match:
            name, rhs = match.groups()
            deps[name] = set(re.findall(r"%([\w.-]+)", rhs))
            if " fft(" in rhs:
                ffts.append(name)

    def ancestors(node, seen):
        for d in deps.get(node, ()):
            if d not in seen:
                seen.add(d)
                ancestors(d, seen)
        return seen

    above = {n: ancestors(n, set()) for n in ffts}
    free = [(a, b) for i, a in enumerate(ffts) for b in ffts[i + 1 :]
            if a not in above[b] and b not in above[a]]  # fmt: skip
    return len(ffts), free


def test_ffts_run_one_after_another():
    """XLA:CPU hangs when FFTs run at once on every worker of its pool (see
    ``svconv.product._after``): in the compiled forward, forward+backward (filter and splat) and
    forward mode, every FFT depends on the one before it."""
    x, f, u = rands(17, (1, 32, 32, 3), (4, 9, 9), (1, 32, 32, 4))

    def op(*a):
        return svconv.product_filter2d(*a, method="fft")

    def splat(*a):
        return svconv.product_splat2d(*a, method="fft")

    programs = {
        "forward": op,
        "value and grad": jax.value_and_grad(lambda *a: jnp.sum(op(*a) ** 2), (0, 1, 2)),
        "splat grad": jax.grad(lambda *a: jnp.sum(splat(*a) * a[0]), (0, 1, 2)),
        "jvp": lambda *a: jax.jvp(op, a, a),
    }
    for name, fn in programs.items():
        count, free = _fft_order(fn, x, f, u)
        assert count >= 3, (name, count)
        assert not free, f"{name}: FFTs that may run at once: {free}"


# ------------------------------------------------------------------------------- builders


def test_grid_interpolation_equals_interpolated_per_pixel_kernels():
    """Without ``rank``: each pixel's kernel is the bilinear interpolation of the grid PSFs,
    applied by ``pixel_filter2d``; the weights sum to one."""
    (psfs, x) = rands(13, (3, 4, 5, 5), (1, 14, 17, 2))
    filters, weights = svconv.psf_grid_decomposition(psfs, (14, 17))
    assert filters.shape == (12, 5, 5) and weights.shape == (14, 17, 12)
    assert_close(jnp.sum(weights, -1), jnp.ones((14, 17)), tol=1e-6)

    # The per-pixel kernels by explicit bilinear interpolation between node centres.
    def coords(size, points):
        t = np.clip((np.arange(size) + 0.5) * points / size - 0.5, 0, points - 1)
        lo = np.minimum(np.floor(t).astype(int), max(points - 2, 0))
        return lo, t - lo

    (r0, fr), (c0, fc) = coords(14, 3), coords(17, 4)
    p = np.asarray(psfs)
    k = np.zeros((14, 17, 5, 5))
    for i, j in itertools.product(range(14), range(17)):
        a, b, s, t = r0[i], c0[j], fr[i], fc[j]
        k[i, j] = (
            (1 - s) * (1 - t) * p[a, b] + (1 - s) * t * p[a, b + 1]
            + s * (1 - t) * p[a + 1, b] + s * t * p[a + 1, b + 1]
        )  # fmt: skip
    want = svconv.pixel_filter2d(x, jnp.asarray(k[None], jnp.float32), impl="xla")
    for method in METHODS:
        got = svconv.product_filter2d(x, filters, weights, method=method)
        assert_close(got, want, tol=1e-5, what=method)
    # With the full rank, the eigen-PSFs reproduce the same kernels.
    filters, weights = svconv.psf_grid_decomposition(psfs, (14, 17), rank=12)
    assert_close(svconv.product_filter2d(x, filters, weights), want, tol=1e-4, what="rank 12")


def test_grid_of_one_is_a_plain_convolution():
    psf, x = rands(14, (1, 1, 7, 5, 2), (2, 12, 9, 2))
    filters, weights = svconv.psf_grid_decomposition(psf, (12, 9))
    assert filters.shape == (1, 7, 5, 2)
    got = svconv.product_filter2d(x, filters, weights)
    kernel = psf[0, 0][:, :, None, :]  # depthwise HWIO
    want = lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert_close(got, want, tol=1e-5)


def test_low_rank_kernels():
    # Kernels of rank 3 exactly: recovered, zero error.
    basis, coef = rands(15, (3, 7, 7), (2, 6, 5, 3))
    k = jnp.einsum("...r,rmn->...mn", coef, basis)
    filters, weights, error = svconv.low_rank_kernels(k, 3)
    assert float(error) < 1e-5
    assert_close(jnp.einsum("...r,rmn->...mn", weights, filters), k, tol=1e-5)
    assert_close(jnp.einsum("rmn,smn->rs", filters, filters), jnp.eye(3), tol=1e-5)
    # Gaussian kernels: the error falls with the rank and matches the applied op.
    sigma = 1.0 + 3.0 * jax.nn.sigmoid(rands(16, (1, 16, 16))[0])
    k = svconv.gaussian_kernels(sigma, 15)
    errors = [float(svconv.low_rank_kernels(k, r)[2]) for r in (1, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    resid = np.linalg.norm(k - jnp.einsum("...r,rmn->...mn", *svconv.low_rank_kernels(k, 4)[1::-1]))
    assert abs(resid / np.linalg.norm(k) - errors[1]) < 1e-4


# ------------------------------------------------------------------------------ bad input


def test_bad_input():
    x, f, u = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 3)), jnp.zeros((1, 8, 8, 3))
    for fn in (
        svconv.product_filter2d,
        jax.jit(svconv.product_filter2d, static_argnames="padding"),
    ):
        with pytest.raises(ValueError, match=r"`weights` of shape \(1, 8, 8, 4\) has 4 terms"):
            fn(x, f, jnp.zeros((1, 8, 8, 4)))
        with pytest.raises(ValueError, match="more than the padded input"):
            fn(x, jnp.zeros((3, 11, 3)), u, padding="VALID")
        with pytest.raises(ValueError, match=r"`weights` of shape \(1, 7, 8, 3\)"):
            fn(x, f, jnp.zeros((1, 7, 8, 3)))
        with pytest.raises(ValueError, match="does not divide the 2 channels"):
            fn(x, jnp.zeros((3, 3, 3, 3)), u)
        with pytest.raises(TypeError, match="`filters` must have a floating"):
            fn(x, jnp.zeros((3, 3, 3), jnp.int32), u)
        with pytest.raises(ValueError, match="`filters` must be"):
            fn(x, jnp.zeros((3, 3)), u)
    with pytest.raises(ValueError, match="`method` must be"):
        svconv.product_filter2d(x, f, u, method="winograd")
    with pytest.raises(NotImplementedError, match="product family has no Pallas kernels"):
        svconv.product_filter2d(x, f, u, impl="pallas")
    with pytest.raises(NotImplementedError, match="product family has xla kernels only"):
        svconv.product_filter2d(x, f, u, impl="triton")
    with pytest.raises(ValueError, match=r"`weights` of shape \(1, 8, 8, 4\) has 4 terms"):
        svconv.product_splat2d(x, f, jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="`rank` must be an int from 1 to 4"):
        svconv.psf_grid_decomposition(jnp.zeros((2, 2, 3, 3)), (8, 8), rank=5)
    with pytest.raises(ValueError, match="`psfs` must be"):
        svconv.psf_grid_decomposition(jnp.zeros((2, 3, 3)), (8, 8))
    with pytest.raises(ValueError, match="`image_size`"):
        svconv.psf_grid_decomposition(jnp.zeros((2, 2, 3, 3)), (0, 8))
    with pytest.raises(ValueError, match="`rank` must be an int from 1 to kh"):
        svconv.low_rank_kernels(jnp.zeros((4, 3, 3)), 10)
