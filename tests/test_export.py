"""``jax.export`` of a jitted model that uses svconv: serialised, deserialised and run with the
same numbers; exported for CPU and CUDA together (abstract H100), each platform gets its own
implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import export

import svconv
from experiments.static.lowering import abstract_gpu, triton_kernel_names
from tests.conftest import assert_close, rands


def _model(x, w, d, k):
    y = jnp.tanh(svconv.modulated_conv2d(x, w, d, stride=2))
    y = svconv.pixel_filter2d(y, k, padding=2, dilation=2)
    # Rotated: its normalizer is a primitive lowered per platform.
    sigma = 0.5 + jax.nn.sigmoid(y[..., 0])
    y = svconv.gaussian_filter2d(y, (sigma, 1.5 * sigma), 3, rho=0.5 * jnp.tanh(y[..., 1]))
    return svconv.local_conv2d(y, jnp.ones((4, 4, 3, 3, 4, 2)) / 36)


# Pallas's Triton kernels (what a program lowered for CUDA holds) are not on the list of custom
# calls export guarantees stable across jaxlib versions: the caller opts in (README).
TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _args():
    return rands(71, (2, 8, 7, 3), (3, 3, 3, 4), (2, 4, 4, 3, 3), (2, 4, 4, 3, 3))


def test_export_round_trip_forward_and_gradient():
    args = _args()
    for fn in (jax.jit(_model), jax.jit(jax.grad(lambda *a: jnp.sum(_model(*a) ** 2)))):
        exported = export.export(fn, disabled_checks=TRITON)(*args)
        exported = export.deserialize(exported.serialize())
        assert len(exported.platforms) == 1  # the default backend's
        assert_close(exported.call(*args), fn(*args))


def test_export_for_cpu_and_cuda_picks_per_platform():
    args = _args()
    with abstract_gpu():
        exported = export.export(
            jax.jit(_model),
            platforms=("cpu", "cuda"),
            disabled_checks=TRITON,
        )(*args)
    assert sorted(set(triton_kernel_names(exported.mlir_module()))) == [
        "svconv_gaussian_forward",
        "svconv_local_forward",
        "svconv_modulated_forward",
        "svconv_pixel_forward",
    ]
    restored = export.deserialize(exported.serialize())
    assert_close(restored.call(*args), _model(*args))
