"""Flax layers: same numbers as Flax's own layers given the same weights; docstring examples."""

from __future__ import annotations

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import svconv
from svconv import layers
from tests.conftest import assert_close, rands


@pytest.mark.parametrize(
    "strides,padding,dilation", [(1, "SAME", 1), (2, "VALID", 1), ((1, 2), ((1, 0), (2, 1)), 2)]
)
def test_modulated_conv_with_unit_d_is_flax_conv(strides, padding, dilation):
    (x,) = rands(31, (2, 9, 8, 3))
    conv = nn.Conv(5, (3, 3), strides=strides, padding=padding, kernel_dilation=dilation)
    params = conv.init(jax.random.key(0), x)
    want = conv.apply(params, x)
    ones = jnp.ones((*want.shape[1:3], 3, 3))
    mconv = svconv.ModulatedConv(
        5, (3, 3), strides=strides, padding=padding, kernel_dilation=dilation
    )
    assert jax.tree.map(jnp.shape, mconv.init(jax.random.key(0), x, ones)) == jax.tree.map(
        jnp.shape, params
    )
    assert_close(mconv.apply(params, x, ones), want)


def test_modulated_conv_dtype_and_grads():
    x, d = rands(32, (2, 6, 6, 3), (2, 6, 6, 3, 3))
    layer = svconv.ModulatedConv(4, 3, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(1), x, d)
    assert params["params"]["kernel"].dtype == jnp.float32
    y = layer.apply(params, x, d)
    assert y.dtype == jnp.bfloat16
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x, d).astype(jnp.float32) ** 2))(params)
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, "VALID"), ((2, 1), 1)])
def test_local_conv_is_flax_conv_local(strides, padding):
    (x,) = rands(33, (2, 8, 7, 3))
    flax_layer = nn.ConvLocal(4, (3, 3), strides=strides, padding=padding)
    flax_params = flax_layer.init(jax.random.key(0), x)["params"]
    flax_params = {
        **flax_params,
        "bias": jax.random.normal(jax.random.key(3), flax_params["bias"].shape),
    }
    ours = svconv.LocalConv(4, (3, 3), strides=strides, padding=padding)
    params = {
        "kernel": svconv.from_conv_local_kernel(flax_params["kernel"], (3, 3)),
        "bias": flax_params["bias"],
    }
    shapes = jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)["params"])
    assert shapes == jax.tree.map(jnp.shape, params)
    assert_close(ours.apply({"params": params}, x), flax_layer.apply({"params": flax_params}, x))


def test_kernel_prediction_filter_kernels_are_normalised():
    x, guide = rands(34, (2, 8, 8, 4), (2, 8, 8, 6))
    layer = svconv.KernelPredictionFilter(kernel_size=(3, 5), groups=2)
    params = layer.init(jax.random.key(0), x, guide)
    y, kernels = layer.apply(params, x, guide, return_kernels=True)
    assert y.shape == x.shape and kernels.shape == (2, 8, 8, 3, 5, 2)
    assert_close(jnp.sum(kernels, axis=(3, 4)), jnp.ones((2, 8, 8, 2)))
    assert bool(jnp.all(kernels >= 0))
    assert_close(y, svconv.pixel_filter2d(x, kernels, impl="reference"))
    with pytest.raises(ValueError, match=r"`guide` of shape \(2, 8, 7, 6\)"):
        layer.apply(params, x, guide[:, :, :7])


def test_docstring_examples():
    result = doctest.testmod(layers, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0
