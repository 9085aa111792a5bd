"""Bad input raises a ValueError/TypeError naming the argument and printing the offending shape or
value, at trace time, eagerly and under jit."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import svconv

X = jnp.ones((2, 9, 10, 3))
W = jnp.ones((3, 3, 3, 4))
D = jnp.ones((2, 9, 10, 3, 3))
WL = jnp.ones((9, 10, 3, 3, 3, 4))
K = jnp.ones((2, 9, 10, 3, 3))

mod = svconv.modulated_conv2d
loc = svconv.local_conv2d
filt = svconv.pixel_filter2d
splat = svconv.pixel_splat2d

# (id, callable, args, exception, pattern the message must contain)
BAD = [
    ("x-rank", mod, (X[0], W, D), ValueError, r"`x` .* shape \(9, 10, 3\)"),
    ("w-rank", mod, (X, W[0], D), ValueError, r"`w` .* shape \(3, 3, 4\)"),
    (
        "channels",
        mod,
        (X, jnp.ones((3, 3, 5, 4)), D),
        ValueError,
        r"\(3, 3, 5, 4\).*\(2, 9, 10, 3\)",
    ),
    (
        "d-shape",
        mod,
        (X, W, jnp.ones((2, 9, 11, 3, 3))),
        ValueError,
        r"`d` of shape \(2, 9, 11, 3, 3\) where \(2, 9, 10, 3, 3\) was expected",
    ),
    (
        "d-shared-shape",
        mod,
        (X, W, jnp.ones((9, 10, 3, 2))),
        ValueError,
        r"`d` of shape \(9, 10, 3, 2\) where \(9, 10, 3, 3\)",
    ),
    ("d-rank", mod, (X, W, jnp.ones((9, 10, 9))), ValueError, r"`d` .* shape \(9, 10, 9\)"),
    ("d-batch", mod, (X, W, jnp.ones((3, 9, 10, 3, 3))), ValueError, r"`d` of shape \(3, 9"),
    ("x-int", mod, (X.astype(jnp.int32), W, D), TypeError, r"`x` .*int32"),
    ("w-uint", mod, (X, W.astype(jnp.uint8), D), TypeError, r"`w` must have a floating or complex"),
    ("d-bool", mod, (X, W, D > 0), TypeError, r"`d` .*bool"),
    (
        "local-w-shape",
        loc,
        (X, jnp.ones((9, 9, 3, 3, 3, 4))),
        ValueError,
        r"`w` of shape \(9, 9, 3, 3, 3, 4\) where \(9, 10, 3, 3, 3, 4\)",
    ),
    ("local-w-rank", loc, (X, W), ValueError, r"`w` .*shape \(3, 3, 3, 4\)"),
    ("local-channels", loc, (X, jnp.ones((9, 10, 3, 3, 2, 4))), ValueError, r"`w` of shape"),
    (
        "k-shape",
        filt,
        (X, jnp.ones((2, 8, 10, 3, 3))),
        ValueError,
        r"`k` of shape \(2, 8, 10, 3, 3\) where \(2, 9, 10, 3, 3\)",
    ),
    (
        "k-groups",
        filt,
        (X, jnp.ones((2, 9, 10, 3, 3, 2))),
        ValueError,
        r"`k` of shape \(2, 9, 10, 3, 3, 2\) has 2 groups.*3 channels",
    ),
    ("k-rank", filt, (X, jnp.ones((9, 10, 3, 3))), ValueError, r"`k` .*shape \(9, 10, 3, 3\)"),
    ("k-int", filt, (X, K.astype(jnp.int8)), TypeError, r"`k` .*int8"),
    ("splat-k-shape", splat, (X, jnp.ones((2, 9, 9, 3, 3))), ValueError, r"`k` of shape"),
    (
        "splat-size",
        functools.partial(splat, output_size=(20, 20)),
        (X, K),
        ValueError,
        r"`output_size` \(20, 20\)",
    ),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,fn,args,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_arrays(name, fn, args, exc, pattern, jit):
    call = jax.jit(fn) if jit else fn
    with pytest.raises(exc, match=pattern):
        call(*args)


BAD_KW = [
    ("stride-0", {"stride": 0}, ValueError, r"`stride` must be >= 1, got 0"),
    ("stride-neg", {"stride": (1, -2)}, ValueError, r"`stride` must be >= 1, got \(1, -2\)"),
    ("stride-float", {"stride": 1.5}, TypeError, r"`stride` must be an int, got 1.5"),
    ("stride-triple", {"stride": (1, 1, 1)}, ValueError, r"`stride` .*\(1, 1, 1\)"),
    ("dilation-0", {"dilation": 0}, ValueError, r"`dilation` must be >= 1, got 0"),
    ("padding-str", {"padding": "FULL"}, ValueError, r"`padding` .*'FULL'"),
    ("padding-neg-crop", {"padding": -5}, ValueError, r"more than the padded input.*`x` of"),
    ("padding-shape", {"padding": (1, 2, 3)}, ValueError, r"`padding` .*\(1, 2, 3\)"),
    ("impl", {"impl": "cuda"}, ValueError, r"`impl` .*'cuda'"),
    ("precision", {"precision": "ultra"}, ValueError, r"`precision` .*'ultra'"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,kw,exc,pattern", BAD_KW, ids=[b[0] for b in BAD_KW])
def test_bad_keywords(name, kw, exc, pattern, jit):
    fn = functools.partial(mod, **kw)
    call = jax.jit(fn) if jit else fn
    # d is given shared and of the stride-1 SAME size: only the keyword can be at fault first.
    with pytest.raises(exc, match=pattern):
        call(X, W, D[0])


@pytest.mark.parametrize("op", ["modulated", "local", "filter"])
def test_kernel_larger_than_padded_input(op):
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match=re.escape("more than the padded input height 4")):
        if op == "modulated":
            mod(x, jnp.ones((5, 3, 3, 2)), jnp.ones((1, 1, 5, 3)), padding="VALID")
        elif op == "local":
            loc(x, jnp.ones((1, 1, 5, 3, 3, 2)), padding="VALID")
        else:
            filt(x, jnp.ones((1, 1, 1, 5, 3)), padding="VALID")


def test_gaussian_kernels_bad_input():
    with pytest.raises(TypeError, match=r"`sigma` .*int32"):
        svconv.gaussian_kernels(jnp.ones((3,), jnp.int32), 3)
    with pytest.raises(ValueError, match=r"`size` must be >= 1, got 0"):
        svconv.gaussian_kernels(jnp.ones((3,)), 0)


def test_python_int_lists_are_rejected_not_cast():
    with pytest.raises(TypeError, match=r"`x` must have a floating or complex dtype"):
        mod([[[[1]]]], W[:, :, :1], jnp.ones((1, 1, 3, 3)))
