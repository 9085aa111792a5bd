"""jit, vmap over every argument, grad-of-grad, checkpoint, dtypes, NaN propagation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svconv
from tests.conftest import Case, assert_close, rands

IMPLS = ["xla", "pallas"]
CASE = Case(2, 7, 6, 3, 4, (3, 3), (2, 1), 1, ((1, 0), (2, 1)))
GEOM = CASE.geom()


def _ops(impl):
    """Each op as a function of its arrays, with its random arguments."""
    kw = {**CASE.kw(), "impl": impl}
    n, (ho, wo) = CASE.n, GEOM.out_size
    x, w, d, wl, k, v = rands(
        21,
        (n, CASE.h, CASE.w, CASE.cin),
        (*CASE.k, CASE.cin, CASE.cout),
        (n, ho, wo, *CASE.k),
        (ho, wo, *CASE.k, CASE.cin, CASE.cout),
        (n, ho, wo, *CASE.k, 3),
        (n, ho, wo, CASE.cin),
    )
    return {
        "modulated": (functools.partial(svconv.modulated_conv2d, **kw), (x, w, d)),
        "local": (functools.partial(svconv.local_conv2d, **kw), (x, wl)),
        "filter": (functools.partial(svconv.pixel_filter2d, **kw), (x, k)),
        "splat": (
            functools.partial(svconv.pixel_splat2d, **kw, output_size=(CASE.h, CASE.w)),
            (v, k),
        ),
    }


def _reference(name):
    return _ops("reference")[name][0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_jit_and_vmap_over_each_argument(impl, name):
    f, args = _ops(impl)[name]
    ref = _reference(name)
    assert_close(jax.jit(f)(*args), ref(*args), what="jit")
    for axis_arg in range(len(args)):
        # A leading vmapped axis of size 2 on one argument; the others are shared.
        stacked = [a if i != axis_arg else jnp.stack([a, 0.5 * a]) for i, a in enumerate(args)]
        in_axes = [None if i != axis_arg else 0 for i in range(len(args))]
        got = jax.vmap(f, in_axes=in_axes)(*stacked)
        want = jax.vmap(ref, in_axes=in_axes)(*stacked)
        assert_close(got, want, what=f"vmap over arg {axis_arg}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_grad_of_grad(impl, name):
    f, args = _ops(impl)[name]
    ref = _reference(name)
    (ct,) = rands(22, f(*args).shape)

    def inner(fn):
        # A scalar of the first-order gradients, differentiated again w.r.t. every argument.
        def loss(*a):
            grads = jax.grad(lambda *b: jnp.sum(fn(*b) * ct), argnums=tuple(range(len(a))))(*a)
            return sum(jnp.sum(jnp.sin(g)) for g in grads)

        return jax.grad(loss, argnums=tuple(range(len(args))))

    for got, want in zip(inner(f)(*args), inner(ref)(*args), strict=True):
        assert_close(got, want, tol=1e-4, what="grad of grad")


@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_checkpoint(name):
    f, args = _ops("xla")[name]
    loss = lambda *a: jnp.sum(jnp.tanh(f(*a)))  # noqa: E731
    want = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    got = jax.grad(jax.checkpoint(loss), argnums=tuple(range(len(args))))(*args)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_low_precision_dtypes(impl, dtype, name):
    f, args = _ops(impl)[name]
    low = [a.astype(dtype) for a in args]
    y, vjp = jax.vjp(f, *low)
    assert y.dtype == dtype
    # Compared with the float32 reference on the same (rounded) inputs.
    ref = _reference(name)
    exact = [a.astype(jnp.float32) for a in low]
    y_ref, vjp_ref = jax.vjp(ref, *exact)
    assert_close(y, y_ref, dtype, what="forward")
    (ct,) = rands(23, y.shape, dtype=dtype)
    for a, b, arg in zip(vjp(ct), vjp_ref(ct.astype(jnp.float32)), low, strict=True):
        assert a.dtype == dtype and a.shape == arg.shape
        assert_close(a, b, dtype, what="vjp")


def test_mixed_float_dtypes_promote():
    x, w, d = rands(24, (1, 5, 5, 2), (3, 3, 2, 2), (5, 5, 3, 3))
    y = svconv.modulated_conv2d(x.astype(jnp.bfloat16), w, d, impl="xla")
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter"])
def test_nan_reaches_exactly_the_covering_windows(impl, name):
    f, args = _ops(impl)[name]
    x = args[0]
    poisoned = x.at[1, 3, 2, 1].set(jnp.nan)
    y = f(poisoned, *args[1:])
    # The windows that cover the pixel: the output of an all-positive op on a one-hot input.
    indicator = jnp.zeros_like(x).at[1, 3, 2, 1].set(1.0)
    positive = [jnp.abs(a) + 1.0 for a in args[1:]]
    covered = _reference(name)(indicator, *positive) > 0
    np.testing.assert_array_equal(np.isnan(np.asarray(y)), np.asarray(covered))
    assert covered.any() and not covered.all()
