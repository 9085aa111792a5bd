"""Flax NNX layers: parameter shapes, the same numbers as the linen layers given the same
parameters, gradients and training with ``nnx.Optimizer``, ``nnx.jit``, argument errors, the
docstring examples (the README's and the docs' examples run in `make test-docs`)."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import svconv
import svconv.nnx
from svconv import _checks
from tests.conftest import assert_close, rands

# (strides, padding, kernel_dilation): every padding form, strides and dilations per axis.
WINDOWS = [
    (1, "SAME", 1),
    (2, "VALID", 1),
    ((1, 2), ((1, 0), (2, 1)), 2),
    ((2, 1), 1, (2, 1)),
]


def _window_id(window) -> str:
    strides, padding, dilation = window
    return f"s{strides}-p{padding}-d{dilation}".replace(" ", "")


def _shapes(tree) -> dict:
    return jax.tree.map(jnp.shape, tree)


def _nnx_params(model: nnx.Module) -> dict:
    """The module's parameters as a plain nested dict, linen's layout."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model: nnx.Module, params: dict) -> None:
    """Overwrite the module's parameters with a linen parameter dict."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def _randomised(params: dict, seed: int) -> dict:
    """The same tree with every leaf redrawn (so zero-initialised biases matter too)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
    )


# --------------------------------------------------------------------------------------------
# Same numbers as the linen layers


@pytest.mark.parametrize("window", WINDOWS, ids=_window_id)
@pytest.mark.parametrize("shared_d", [False, True], ids=["d-per-image", "d-shared"])
def test_modulated_conv_matches_linen(window, shared_d):
    strides, padding, dilation = window
    kw = {"strides": strides, "padding": padding, "kernel_dilation": dilation}
    (x,) = rands(40, (2, 9, 8, 3))
    linen = svconv.ModulatedConv(5, (3, 2), **kw)
    ho, wo = _checks.geometry(
        in_size=(9, 8), kernel_size=(3, 2), stride=strides, padding=padding, dilation=dilation
    ).out_size
    d_shape = (ho, wo, 3, 2) if shared_d else (2, ho, wo, 3, 2)
    (d,) = rands(41, d_shape)
    params = _randomised(linen.init(jax.random.key(0), x, d)["params"], 42)

    layer = svconv.nnx.ModulatedConv(3, 5, (3, 2), rngs=nnx.Rngs(0), **kw)
    assert _shapes(_nnx_params(layer)) == _shapes(params)
    assert layer.kernel.shape == (3, 2, 3, 5) and layer.bias.shape == (5,)
    _load(layer, params)
    assert_close(layer(x, d), linen.apply({"params": params}, x, d))


@pytest.mark.parametrize("window", WINDOWS, ids=_window_id)
def test_local_conv_matches_linen(window):
    strides, padding, dilation = window
    kw = {"strides": strides, "padding": padding, "kernel_dilation": dilation}
    (x,) = rands(43, (2, 9, 8, 3))
    linen = svconv.LocalConv(4, (3, 2), **kw)
    params = _randomised(linen.init(jax.random.key(0), x)["params"], 44)

    layer = svconv.nnx.LocalConv(3, 4, (3, 2), input_size=(9, 8), rngs=nnx.Rngs(0), **kw)
    assert _shapes(_nnx_params(layer)) == _shapes(params)
    ho, wo = params["bias"].shape[:2]
    assert layer.kernel.shape == (ho, wo, 3, 2, 3, 4) and layer.bias.shape == (ho, wo, 4)
    _load(layer, params)
    assert_close(layer(x), linen.apply({"params": params}, x))


@pytest.mark.parametrize(
    "kernel_size,groups,dilation,predictor,temperature,with_guide",
    [
        ((3, 3), 1, 1, 3, 1.0, True),
        ((3, 5), 2, 2, (1, 3), 0.5, True),
        (5, 4, (2, 1), 1, 2.0, False),
    ],
    ids=["k3-g1", "k3x5-g2-d2", "k5-g4-no-guide"],
)
def test_kernel_prediction_filter_matches_linen(
    kernel_size, groups, dilation, predictor, temperature, with_guide
):
    x, guide = rands(45, (2, 8, 9, 4), (2, 8, 9, 6))
    guide = guide if with_guide else None
    settings = {
        "kernel_size": kernel_size,
        "groups": groups,
        "kernel_dilation": dilation,
        "predictor_kernel_size": predictor,
        "temperature": temperature,
    }
    linen = svconv.KernelPredictionFilter(**settings)
    params = _randomised(linen.init(jax.random.key(0), x, guide)["params"], 46)

    layer = svconv.nnx.KernelPredictionFilter(
        4 if guide is None else 6, rngs=nnx.Rngs(0), **settings
    )
    assert _shapes(_nnx_params(layer)) == _shapes(params)
    _load(layer, params)
    y, kernels = layer(x, guide, return_kernels=True)
    want_y, want_kernels = linen.apply({"params": params}, x, guide, return_kernels=True)
    assert_close(y, want_y)
    assert_close(kernels, want_kernels)
    assert_close(layer(x, guide), want_y)


def test_without_bias_and_low_precision_match_linen():
    x, d = rands(47, (2, 6, 6, 3), (2, 6, 6, 3, 3))
    kw = {"use_bias": False, "dtype": jnp.bfloat16}
    linen = svconv.ModulatedConv(4, 3, **kw)
    params = linen.init(jax.random.key(0), x, d)["params"]
    layer = svconv.nnx.ModulatedConv(3, 4, 3, rngs=nnx.Rngs(0), **kw)
    assert layer.bias is None and set(_nnx_params(layer)) == {"kernel"}
    assert layer.kernel.dtype == jnp.float32
    _load(layer, params)
    y = layer(x, d)
    assert y.dtype == jnp.bfloat16
    assert_close(y, linen.apply({"params": params}, x, d), dtype=jnp.bfloat16)

    local_linen = svconv.LocalConv(2, 3, **kw)
    local_params = local_linen.init(jax.random.key(0), x)["params"]
    local = svconv.nnx.LocalConv(3, 2, 3, input_size=6, rngs=nnx.Rngs(0), **kw)
    assert local.bias is None
    _load(local, local_params)
    assert local(x).dtype == jnp.bfloat16
    assert_close(local(x), local_linen.apply({"params": local_params}, x), dtype=jnp.bfloat16)


def test_default_initializers_are_linens():
    """Same initializers as the linen layers: the same statistics (linen and NNX derive their
    keys differently, so not the same values)."""
    x = jnp.ones((1, 12, 12, 16))
    local_linen = svconv.LocalConv(8, 3).init(jax.random.key(0), x)["params"]
    local = svconv.nnx.LocalConv(16, 8, 3, input_size=12, rngs=nnx.Rngs(0))
    # LeCun normal; nn.ConvLocal's fan-in counts the 12x12 output positions: 12*12 * 3*3*16.
    for kernel in (local_linen["kernel"], local.kernel[...]):
        assert abs(float(jnp.std(kernel)) * 144 - 1) < 0.05
    assert not jnp.any(local.bias[...])
    # Fan-in 3*3*16 = 144.
    conv = svconv.nnx.ModulatedConv(16, 64, 3, rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(conv.kernel[...])) * 12 - 1) < 0.05
    assert not jnp.any(conv.bias[...])


# --------------------------------------------------------------------------------------------
# Gradients, training and transforms


def _models_and_data():
    """Each layer with an input and a target of its output's shape."""
    x, d, target_m, target_l, target_k = rands(
        48, (2, 8, 8, 3), (8, 8, 3, 3), (2, 8, 8, 4), (2, 4, 4, 4), (2, 8, 8, 3)
    )
    rngs = nnx.Rngs(1)
    return {
        "ModulatedConv": (svconv.nnx.ModulatedConv(3, 4, 3, rngs=rngs), (x, d), target_m),
        "LocalConv": (
            svconv.nnx.LocalConv(3, 4, 3, input_size=(8, 8), strides=2, rngs=rngs),
            (x,),
            target_l,
        ),
        "KernelPredictionFilter": (
            svconv.nnx.KernelPredictionFilter(3, 3, groups=3, rngs=rngs),
            (x,),
            target_k,
        ),
    }


@pytest.mark.parametrize("name", ["ModulatedConv", "LocalConv", "KernelPredictionFilter"])
def test_gradients_flow_and_adam_reduces_the_loss(name):
    model, inputs, target = _models_and_data()[name]

    def loss_fn(model):
        return jnp.mean((model(*inputs) - target) ** 2)

    grads = nnx.grad(loss_fn)(model)
    for path, g in jax.tree.leaves_with_path(nnx.to_pure_dict(grads)):
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.max(jnp.abs(g))) > 0, path

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < 0.97 * losses[0], losses
    assert float(loss_fn(model)) < losses[-1]


def test_nnx_jit_matches_eager():
    for name, (model, inputs, _) in _models_and_data().items():
        jitted = nnx.jit(lambda m, *a: m(*a))
        assert_close(jitted(model, *inputs), model(*inputs), what=name)


def test_split_merge_round_trip():
    model, (x, d), _ = _models_and_data()["ModulatedConv"]
    graphdef, params = nnx.split(model)
    y = jax.jit(lambda p, x, d: nnx.merge(graphdef, p)(x, d))(params, x, d)
    assert_close(y, model(x, d))


# --------------------------------------------------------------------------------------------
# Argument errors


CONSTRUCTOR_ERRORS = [
    ("modulated", {"in_features": 0}, ValueError, r"`in_features` must be >= 1, got 0"),
    ("modulated", {"out_features": 2.5}, TypeError, r"`out_features` must be an int"),
    ("modulated", {"out_features": True}, TypeError, r"`out_features` must be an int"),
    ("modulated", {"kernel_size": (3, 3, 3)}, ValueError, r"`kernel_size` must be an int"),
    ("modulated", {"strides": 0}, ValueError, r"`strides` must be >= 1, got 0"),
    ("modulated", {"kernel_dilation": "2"}, TypeError, r"`kernel_dilation` must be an int"),
    ("modulated", {"padding": "FULL"}, ValueError, r"`padding` must be 'SAME', 'VALID'"),
    ("modulated", {"padding": "CIRCULAR"}, ValueError, r"`padding` must be 'SAME', 'VALID'"),
    ("modulated", {"impl": "cuda"}, ValueError, r"`impl` must be one of"),
    ("modulated", {"precision": "fast"}, ValueError, r"`precision` is not a valid"),
    ("local", {"input_size": (8, 8, 1)}, ValueError, r"`input_size` must be an int or a"),
    ("local", {"input_size": (8, 2), "padding": 0}, ValueError, r"kernel width 3 .* input wid"),
    ("local", {"padding": "VALID", "input_size": 2}, ValueError, r"kernel height 3"),
    ("kpn", {"guide_features": 0}, ValueError, r"`guide_features` must be >= 1"),
    ("kpn", {"groups": 0}, ValueError, r"`groups` must be >= 1"),
    ("kpn", {"temperature": 0.0}, ValueError, r"`temperature` must be > 0, got 0.0"),
    ("kpn", {"temperature": "1"}, TypeError, r"`temperature` must be a number"),
    ("kpn", {"predictor_kernel_size": 0}, ValueError, r"`predictor_kernel_size` must be"),
]


@pytest.mark.parametrize(
    "layer,settings,error,message",
    CONSTRUCTOR_ERRORS,
    ids=[
        f"{layer}-" + "-".join(f"{k}={v}" for k, v in settings.items()).replace(" ", "")
        for layer, settings, _, _ in CONSTRUCTOR_ERRORS
    ],
)
def test_constructor_errors_name_the_argument(layer, settings, error, message):
    base = {
        "modulated": {"in_features": 3, "out_features": 4, "kernel_size": 3},
        "local": {"in_features": 3, "out_features": 4, "kernel_size": 3, "input_size": (8, 8)},
        "kpn": {"guide_features": 3, "kernel_size": 3},
    }[layer]
    cls = {
        "modulated": svconv.nnx.ModulatedConv,
        "local": svconv.nnx.LocalConv,
        "kpn": svconv.nnx.KernelPredictionFilter,
    }[layer]
    with pytest.raises(error, match=message):
        cls(**{**base, **settings}, rngs=nnx.Rngs(0))


def test_missing_rngs_is_a_type_error():
    with pytest.raises(TypeError, match="rngs"):
        svconv.nnx.ModulatedConv(3, 4, 3)


def test_call_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    x = jnp.ones((2, 8, 8, 3))
    conv = svconv.nnx.ModulatedConv(3, 4, 3, rngs=rngs)
    with pytest.raises(ValueError, match=r"`x` of shape \(2, 8, 8, 5\) has 5 channels .* "):
        conv(jnp.ones((2, 8, 8, 5)), jnp.ones((8, 8, 3, 3)))
    with pytest.raises(ValueError, match=r"in_features=3"):
        conv(jnp.ones((2, 8, 8, 5)), jnp.ones((8, 8, 3, 3)))
    with pytest.raises(ValueError, match=r"`x` must be \[batch, height, width, in_features\]"):
        conv(jnp.ones((8, 8, 3)), jnp.ones((8, 8, 3, 3)))
    with pytest.raises(ValueError, match=r"`d` of shape \(7, 8, 3, 3\)"):
        conv(x, jnp.ones((7, 8, 3, 3)))

    local = svconv.nnx.LocalConv(3, 4, 3, input_size=(8, 8), rngs=rngs)
    with pytest.raises(
        ValueError, match=r"is 8x9 but the layer was built with input_size=\(8, 8\)"
    ):
        local(jnp.ones((2, 8, 9, 3)))
    with pytest.raises(ValueError, match=r"has 2 channels but the layer was built with in_feat"):
        local(jnp.ones((2, 8, 8, 2)))

    kpn = svconv.nnx.KernelPredictionFilter(6, 3, groups=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"`guide` of shape \(2, 8, 8, 5\) has 5 channels"):
        kpn(jnp.ones((2, 8, 8, 4)), jnp.ones((2, 8, 8, 5)))
    with pytest.raises(ValueError, match=r"`x` \(the guide when none is passed\) of shape"):
        kpn(jnp.ones((2, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"`guide` of shape \(2, 8, 7, 6\) must match `x`"):
        kpn(jnp.ones((2, 8, 8, 4)), jnp.ones((2, 8, 7, 6)))
    with pytest.raises(ValueError, match=r"`groups`=2 does not divide the 3 channels of `x`"):
        kpn(jnp.ones((2, 8, 8, 3)), jnp.ones((2, 8, 8, 6)))


def test_errors_under_nnx_jit():
    local = svconv.nnx.LocalConv(3, 4, 3, input_size=(8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input_size=\(8, 8\)"):
        nnx.jit(lambda m, x: m(x))(local, jnp.ones((1, 6, 8, 3)))


# --------------------------------------------------------------------------------------------
# Documentation


def test_docstring_examples():
    result = doctest.testmod(svconv.nnx, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0
