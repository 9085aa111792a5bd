"""Every implementation of every op against the reference and an independent oracle, forward and
``jax.vjp`` with random cotangents, on random geometries."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import svconv
from tests.conftest import Case, assert_close, random_cases, rands

IMPLS = ["xla", "pallas"]
# The Pallas interpreter is slow on CPU: it gets a subset of the geometries.
CASES = random_cases(seed=7, count=6)  # between them every stride, dilation and padding form
PALLAS_CASES = CASES[:3]  # dilations, strides, VALID, int and per-side padding


def _params():
    out = []
    for impl in IMPLS:
        for case in PALLAS_CASES if impl == "pallas" else CASES:
            out.append(pytest.param(impl, case, id=f"{impl}-{case.id}"))
    return out


def _check_vjp(f, g, args, seed, dtype=jnp.float32, what=""):
    """f and g agree forward and in their VJPs with a random cotangent."""
    shape = jax.eval_shape(f, *args)
    (ct,) = rands(seed, shape.shape, dtype=shape.dtype)

    @functools.partial(jax.jit, static_argnums=0)  # one compile per case, not op-by-op
    def both(fn, *args):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(ct)

    (y_f, grads_f), (y_g, grads_g) = both(f, *args), both(g, *args)
    assert y_f.dtype == y_g.dtype
    assert_close(y_f, y_g, dtype, what=f"{what} forward")
    for i, (a, b) in enumerate(zip(grads_f, grads_g, strict=True)):
        assert a.dtype == args[i].dtype and a.shape == args[i].shape
        assert_close(a, b, dtype, what=f"{what} grad of arg {i}")


def _lax_geometry(case: Case) -> dict:
    """``case``'s geometry as lax's convolutions take it, exact in float32."""
    geom = case.geom()
    return {
        "window_strides": geom.stride,
        "padding": geom.padding,
        "rhs_dilation": geom.dilation,
        "dimension_numbers": ("NHWC", "HWIO", "NHWC"),
        "precision": lax.Precision.HIGHEST,
    }


def _oracle_conv(x, w, case: Case):
    return lax.conv_general_dilated(x, w, **_lax_geometry(case))


# ------------------------------------------------------------------------------ modulated


@pytest.mark.parametrize("impl,case", _params())
def test_modulated_matches_reference(impl, case):
    geom = case.geom()
    x, w, d, ds = rands(
        1,
        (case.n, case.h, case.w, case.cin),
        (*case.k, case.cin, case.cout),
        (case.n, *geom.out_size, *case.k),
        (*geom.out_size, *case.k),
    )
    for dd in (d, ds):  # per-batch and batch-shared modulation
        f = functools.partial(svconv.modulated_conv2d, **case.kw(), impl=impl)
        g = functools.partial(svconv.modulated_conv2d, **case.kw(), impl="reference")
        _check_vjp(f, g, (x, w, dd), seed=2, what=f"{impl} d{dd.ndim}")


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: c.id)
def test_modulated_with_unit_d_is_lax_conv(impl, case):
    geom = case.geom()
    x, w = rands(3, (case.n, case.h, case.w, case.cin), (*case.k, case.cin, case.cout))
    ones = jnp.ones((*geom.out_size, *case.k))
    f = functools.partial(svconv.modulated_conv2d, **case.kw(), impl=impl)
    _check_vjp(
        lambda x, w: f(x, w, ones), lambda x, w: _oracle_conv(x, w, case), (x, w), seed=4, what=impl
    )


def test_modulated_is_linear_in_d():
    # An independent check of the d-dependence: y(d) = sum_t d_t * y(one-hot tap t).
    case = Case(2, 7, 6, 3, 4, (2, 3), 1, 1, "SAME")
    geom = case.geom()
    x, w, d = rands(5, (2, 7, 6, 3), (2, 3, 3, 4), (2, *geom.out_size, 2, 3))
    y = svconv.modulated_conv2d(x, w, d, impl="xla")
    expected = 0.0
    for m in range(2):
        for n in range(3):
            w_tap = jnp.zeros_like(w).at[m, n].set(w[m, n])
            expected = expected + _oracle_conv(x, w_tap, case) * d[..., m, n, None]
    assert_close(y, expected)


@pytest.mark.parametrize("shared_d", [False, True], ids=["d-batched", "d-shared"])
@pytest.mark.parametrize(
    "case",
    [
        Case(2, 37, 700, 16, 8, (3, 3), 1, 1, "SAME"),
        Case(1, 29, 900, 12, 4, (3, 2), (2, 1), 2, ((2, 0), (1, 1))),
    ],
    ids=lambda c: c.id,
)
def test_modulated_xla_forward_in_row_blocks(case, shared_d):
    # Wide images: the XLA forward runs over blocks of a few output rows (a ragged last block).
    geom = case.geom()
    row_bytes = case.n * (case.w + 2) * case.cin * 4 * geom.stride[0]
    assert row_bytes * 4 < (1 << 19) < row_bytes * geom.out_size[0]
    d_shape = (*geom.out_size, *case.k) if shared_d else (case.n, *geom.out_size, *case.k)
    x, w, d = rands(16, (case.n, case.h, case.w, case.cin), (*case.k, case.cin, case.cout), d_shape)
    y = jax.jit(functools.partial(svconv.modulated_conv2d, **case.kw(), impl="xla"))(x, w, d)
    want = jax.jit(functools.partial(svconv.modulated_conv2d, **case.kw(), impl="reference"))(
        x, w, d
    )
    assert_close(y, want)


# ---------------------------------------------------------------------------------- local


def _oracle_local(x, w, case: Case):
    ho, wo, kh, kw, cin, cout = w.shape
    # lax's local kernel flattens the patch features in (in, kh, kw) order.
    rhs = w.transpose(0, 1, 4, 2, 3, 5).reshape(ho, wo, cin * kh * kw, cout)
    return lax.conv_general_dilated_local(x, rhs, filter_shape=(kh, kw), **_lax_geometry(case))


@pytest.mark.parametrize("impl,case", _params())
def test_local_matches_reference_and_lax(impl, case):
    geom = case.geom()
    x, w = rands(
        6, (case.n, case.h, case.w, case.cin), (*geom.out_size, *case.k, case.cin, case.cout)
    )
    f = functools.partial(svconv.local_conv2d, **case.kw(), impl=impl)
    g = functools.partial(svconv.local_conv2d, **case.kw(), impl="reference")
    _check_vjp(f, g, (x, w), seed=7, what=impl)
    _check_vjp(f, lambda x, w: _oracle_local(x, w, case), (x, w), seed=8, what=f"{impl} vs lax")


# ---------------------------------------------------------------------------- pixel filter


def _groups_for(channels: int) -> int:
    return max(g for g in (1, 2, 3) if channels % g == 0)


@pytest.mark.parametrize("impl,case", _params())
def test_pixel_filter_matches_reference(impl, case):
    geom = case.geom()
    groups = _groups_for(case.cin)
    x, k5, k6 = rands(
        9,
        (case.n, case.h, case.w, case.cin),
        (case.n, *geom.out_size, *case.k),
        (case.n, *geom.out_size, *case.k, groups),
    )
    for k in (k5, k6):
        f = functools.partial(svconv.pixel_filter2d, **case.kw(), impl=impl)
        g = functools.partial(svconv.pixel_filter2d, **case.kw(), impl="reference")
        _check_vjp(f, g, (x, k), seed=10, what=f"{impl} k{k.ndim}")


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("case", CASES[1::3], ids=lambda c: c.id)
def test_pixel_filter_oracles(impl, case):
    geom = case.geom()
    x, kernel = rands(11, (case.n, case.h, case.w, case.cin), case.k)
    f = functools.partial(svconv.pixel_filter2d, **case.kw(), impl=impl)
    # 1. The same filter at every pixel is a depthwise convolution.
    k = jnp.broadcast_to(kernel, (case.n, *geom.out_size, *case.k))
    depthwise = lax.conv_general_dilated(
        x,
        jnp.broadcast_to(kernel[:, :, None, None], (*case.k, 1, case.cin)),
        geom.stride,
        geom.padding,
        rhs_dilation=geom.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=case.cin,
        precision=lax.Precision.HIGHEST,
    )
    assert_close(f(x, k), depthwise, what="depthwise")
    # 2. For one image, per-pixel filters are a local conv with diagonal channel weights.
    (k1,) = rands(12, (1, *geom.out_size, *case.k))
    eye = jnp.eye(case.cin)
    w_local = k1[0][..., None, None] * eye
    assert_close(f(x[:1], k1), _oracle_local(x[:1], w_local, case), what="local-diagonal")


@pytest.mark.parametrize("impl,case", _params())
def test_splat_is_the_transpose_of_filter(impl, case):
    geom = case.geom()
    groups = _groups_for(case.cin)
    x, k, v = rands(
        13,
        (case.n, case.h, case.w, case.cin),
        (case.n, *geom.out_size, *case.k, groups),
        (case.n, *geom.out_size, case.cin),
    )
    _, vjp = jax.vjp(lambda x: svconv.pixel_filter2d(x, k, **case.kw(), impl="reference"), x)
    splat = svconv.pixel_splat2d(v, k, **case.kw(), output_size=(case.h, case.w), impl=impl)
    assert_close(splat, vjp(v)[0], what="splat vs vjp of filter")
    f = functools.partial(
        svconv.pixel_splat2d, **case.kw(), output_size=(case.h, case.w), impl=impl
    )
    g = functools.partial(
        svconv.pixel_splat2d, **case.kw(), output_size=(case.h, case.w), impl="reference"
    )
    _check_vjp(f, g, (v, k), seed=14, what=f"{impl} splat")


def test_splat_default_output_size():
    x, k = rands(15, (1, 6, 5, 2), (1, 6, 5, 3, 3))
    assert svconv.pixel_splat2d(x, k).shape == (1, 6, 5, 2)  # SAME, stride 1: same size
    assert svconv.pixel_splat2d(x, k, stride=2).shape == (1, 12, 10, 2)
    assert svconv.pixel_splat2d(x, k, padding="VALID").shape == (1, 8, 7, 2)


def test_splat_moves_mass_to_kernel_taps():
    # A single bright source pixel with a one-hot kernel lands exactly at the tap's offset.
    x = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(3.0)
    k = jnp.zeros((1, 5, 5, 3, 3)).at[0, 2, 2, 0, 2].set(1.0)  # tap (0, 2) = offset (-1, +1)
    y = svconv.pixel_splat2d(x, k, impl="xla")
    expected = jnp.zeros((1, 5, 5, 1)).at[0, 1, 3, 0].set(3.0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))


# --------------------------------------------------------------------- edge cases of the geometry


def _every_op(impl, n, h, w, cin, cout, k):
    """Each op (SAME padding) with random arrays of the given sizes; the pixel ops filter `cin`
    channels."""
    (ho, wo), shapes = (h, w), {}
    shapes["modulated"] = [(n, h, w, cin), (*k, cin, cout), (n, ho, wo, *k)]
    shapes["local"] = [(n, h, w, cin), (ho, wo, *k, cin, cout)]
    shapes["filter"] = [(n, h, w, cin), (n, ho, wo, *k)]
    shapes["splat"] = [(n, ho, wo, cin), (n, ho, wo, *k)]
    fns = {
        "modulated": svconv.modulated_conv2d,
        "local": svconv.local_conv2d,
        "filter": svconv.pixel_filter2d,
        "splat": functools.partial(svconv.pixel_splat2d, output_size=(h, w)),
    }
    return {
        name: (functools.partial(fns[name], impl=impl), rands(61, *shapes[name])) for name in fns
    }


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
@pytest.mark.parametrize(
    "sizes",
    [(0, 6, 5, 3, 2), (2, 6, 5, 0, 2), (2, 6, 5, 3, 0)],
    ids=["empty-batch", "no-input-channels", "no-output-channels"],
)
def test_zero_size_arrays_behave_as_in_lax(impl, sizes):
    """Empty or all-zero results, forward, backward and forward mode, as the reference (plain
    jnp) gives them; the modulated conv's output shape is lax's."""
    ops = _every_op(impl, *sizes, (3, 2))
    refs = _every_op("reference", *sizes, (3, 2))
    for name, (f, args) in ops.items():
        ref = refs[name][0]
        y, vjp = jax.vjp(f, *args)
        y_ref, vjp_ref = jax.vjp(ref, *args)
        assert_close(y, y_ref, what=name)
        for g, g_ref in zip(vjp(jnp.ones_like(y)), vjp_ref(jnp.ones_like(y)), strict=True):
            assert_close(g, g_ref, what=f"{name} vjp")
        assert_close(jax.jvp(f, args, args)[1], jax.jvp(ref, args, args)[1], what=f"{name} jvp")
    f, (x, w, d) = ops["modulated"]
    want = lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = f(x, w, d)
    assert y.shape == want.shape and not np.any(np.asarray(y))


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_padding_crops_as_in_lax(impl):
    case = Case(2, 9, 8, 3, 4, (3, 3), (2, 1), (1, 2), ((-1, 2), (1, -2)))
    geom = case.geom()
    x, w, wl, k = rands(
        62,
        (case.n, case.h, case.w, case.cin),
        (*case.k, case.cin, case.cout),
        (*geom.out_size, *case.k, case.cin, case.cout),
        (case.n, *geom.out_size, *case.k),
    )
    ones = jnp.ones((case.n, *geom.out_size, *case.k))
    f = functools.partial(svconv.modulated_conv2d, **case.kw(), impl=impl)
    assert_close(f(x, w, ones), _oracle_conv(x, w, case), what="modulated d=1 vs lax")
    g = functools.partial(svconv.modulated_conv2d, **case.kw(), impl="reference")
    _check_vjp(f, g, (x, w, k), seed=63, what="modulated")
    local = functools.partial(svconv.local_conv2d, **case.kw())
    want = lax.conv_general_dilated_local(
        x,
        wl.transpose(0, 1, 4, 2, 3, 5).reshape(*geom.out_size, -1, case.cout),
        geom.stride,
        geom.padding,
        case.k,
        rhs_dilation=geom.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    assert_close(local(x, wl, impl=impl), want, what="local vs lax")
    _check_vjp(
        functools.partial(local, impl=impl), functools.partial(local, impl="reference"), (x, wl), 64
    )
    pf = functools.partial(svconv.pixel_filter2d, **case.kw())
    _check_vjp(
        functools.partial(pf, impl=impl), functools.partial(pf, impl="reference"), (x, k), 65
    )
