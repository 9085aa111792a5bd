"""impl= dispatch: auto picks XLA without a GPU (and says why at debug level), pallas on a CPU
runs the interpreter, an unsupported Pallas case raises instead of falling back, and the
lowered module for impl="pallas" holds Pallas GPU kernels forward and backward."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import pytest

import svconv
from experiments.static.lowering import lower_for_cuda, triton_kernel_names
from svconv import _dispatch
from tests.conftest import assert_close, rands


def test_auto_uses_xla_on_cpu_and_logs_why(caplog):
    x, w, d = rands(51, (1, 6, 6, 2), (3, 3, 2, 2), (6, 6, 3, 3))
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        y = svconv.modulated_conv2d(x, w, d)
    assert "using XLA, not Pallas: no GPU" in caplog.text
    assert_close(y, svconv.modulated_conv2d(x, w, d, impl="reference"))


def test_unsupported_pallas_case_raises_and_auto_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "pallas_reason", lambda family, **case: "tile too large")
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)
    x, k = rands(52, (1, 6, 6, 2), (1, 6, 6, 3, 3))
    with pytest.raises(NotImplementedError, match="pixel_filter2d.*tile too large"):
        svconv.pixel_filter2d(x, k, impl="pallas")
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        y = svconv.pixel_filter2d(x, k)
    assert "using XLA, not Pallas: tile too large" in caplog.text
    assert_close(y, svconv.pixel_filter2d(x, k, impl="reference"))


def _grad_all(fn, n_args):
    def loss(*args):
        return jnp.sum(fn(*args) ** 2)

    return jax.grad(loss, argnums=tuple(range(n_args)))


LOWERING_CASES = {
    "modulated": (
        functools.partial(
            svconv.modulated_conv2d, stride=2, dilation=1, padding="SAME", impl="pallas"
        ),
        [(2, 16, 16, 5), (3, 3, 5, 7), (2, 8, 8, 3, 3)],
        {"svconv_modulated"},
    ),
    "local": (
        functools.partial(svconv.local_conv2d, dilation=2, impl="pallas"),
        [(2, 16, 16, 5), (16, 16, 3, 3, 5, 7)],
        {"svconv_local"},
    ),
    "filter": (
        functools.partial(svconv.pixel_filter2d, impl="pallas"),
        [(2, 16, 16, 6), (2, 16, 16, 7, 7, 3)],
        {"svconv_pixel"},
    ),
    "splat": (
        functools.partial(svconv.pixel_splat2d, stride=2, impl="pallas"),
        [(2, 8, 8, 6), (2, 8, 8, 5, 5)],
        {"svconv_pixel"},
    ),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_pallas_impl_lowers_to_gpu_kernels_forward_and_backward(name, dtype, monkeypatch):
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)  # compile, do not interpret
    fn, shapes, prefixes = LOWERING_CASES[name]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    forward = triton_kernel_names(lower_for_cuda(fn, *args))
    backward = triton_kernel_names(lower_for_cuda(_grad_all(fn, len(args)), *args))
    assert forward and all(any(n.startswith(p) for p in prefixes) for n in forward), forward
    # The backward holds the forward kernel plus one kernel per gradient, and no XLA fallback.
    assert len(set(backward)) >= len(args) + 1, backward
    hlo = lower_for_cuda(_grad_all(fn, len(args)), *args)
    assert "stablehlo.dot_general" not in hlo and "stablehlo.convolution" not in hlo
