"""impl= dispatch, decided when lowering, per platform: lowered for CUDA (on this machine, under an
abstract H100), ``impl=None`` and ``impl="pallas"`` hold only compiled Pallas kernels in the
forward, every gradient and the JVP; lowered for CPU, ``impl=None`` is XLA and
``impl="pallas"`` Pallas's interpreter; one function lowered for both platforms picks per
platform; an unsupported Pallas case raises at call time instead of falling back."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import svconv
from experiments.static.lowering import H100, lower_for_cuda, triton_kernel_names
from tests.conftest import assert_close, rands


def test_auto_uses_xla_on_cpu_and_logs_why(caplog):
    x, w, d = rands(51, (1, 6, 7, 2), (3, 3, 2, 2), (6, 7, 3, 3))
    # On the CPU device also in a process whose default backend is a GPU: a computation placed
    # there must run XLA, not kernels it cannot run.
    cpu = jax.devices("cpu")[0]
    with caplog.at_level(logging.DEBUG, logger="svconv"), jax.default_device(cpu):
        y = svconv.modulated_conv2d(*(jax.device_put(a, cpu) for a in (x, w, d)))
    assert "using xla: no GPU kernels on platform 'cpu'" in caplog.text
    assert_close(y, svconv.modulated_conv2d(x, w, d, impl="reference"))


def test_unsupported_pallas_case_raises_at_call_time_and_auto_falls_back(caplog):
    with jax.enable_x64(True):
        x, k = (a.astype(jnp.float64) for a in rands(52, (1, 6, 6, 2), (1, 6, 6, 3, 3)))
        with pytest.raises(NotImplementedError, match="pixel_filter2d.*float64"):
            svconv.pixel_filter2d(x, k, impl="pallas")
        with pytest.raises(NotImplementedError, match="pixel_filter2d.*float64"):
            jax.jit(functools.partial(svconv.pixel_filter2d, impl="pallas")).trace(x, k)
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, k)]
        with caplog.at_level(logging.DEBUG, logger="svconv"):
            hlo = lower_for_cuda(svconv.pixel_filter2d, *args)
        assert "using xla, not triton: dtype float64" in caplog.text
        assert not triton_kernel_names(hlo)
        y = svconv.pixel_filter2d(x, k)
        assert y.dtype == jnp.float64
        assert_close(y, svconv.pixel_filter2d(x, k, impl="reference"))


def _grad_all(fn, n_args):
    def loss(*args):
        return jnp.sum(fn(*args) ** 2)

    return jax.grad(loss, argnums=tuple(range(n_args)))


def _jvp_all(fn):
    def jvp(*args):
        return jax.jvp(fn, args, tuple(jnp.ones_like(a) for a in args))

    return jvp


# Each op: the function, its argument shapes, and its number of kernels (the forward and one
# per gradient).
LOWERING_CASES = {
    "modulated": (
        functools.partial(svconv.modulated_conv2d, stride=2, dilation=1, padding="SAME"),
        [(2, 16, 16, 5), (3, 3, 5, 7), (2, 8, 8, 3, 3)],
        4,
    ),
    "modulated-shared-d": (
        functools.partial(svconv.modulated_conv2d, dilation=2),
        [(2, 16, 16, 5), (3, 3, 5, 7), (16, 16, 3, 3)],
        4,
    ),
    "local": (
        functools.partial(svconv.local_conv2d, dilation=2),
        [(2, 16, 16, 5), (16, 16, 3, 3, 5, 7)],
        3,
    ),
    "filter": (svconv.pixel_filter2d, [(2, 16, 16, 6), (2, 16, 16, 7, 7, 3)], 3),
    "splat": (
        functools.partial(svconv.pixel_splat2d, stride=2),
        [(2, 8, 8, 6), (2, 8, 8, 5, 5)],
        3,
    ),
    # The forward, the splat (grad in x) and the scale-gradient kernel (grads in sigma, rho).
    "gaussian": (
        lambda x, sr, sc, rho, impl: svconv.gaussian_filter2d(x, (sr, sc), 7, rho=rho, impl=impl),
        [(2, 16, 16, 3), (2, 16, 16), (2, 16, 16), (2, 16, 16)],
        3,
    ),
}


def _assert_only_kernels(hlo: str, family: str, at_least: int):
    names = triton_kernel_names(hlo)
    assert len(set(names)) >= at_least, names
    assert all(n.startswith(f"svconv_{family}_") for n in names), names
    # No XLA fallback and no interpreter around the kernels: no dots, convolutions or loops
    # (but the Gaussian's log-normaliser, a loop over the window's rows outside the kernels).
    unwanted = ["stablehlo.dot_general", "stablehlo.convolution"]
    if family != "gaussian":
        unwanted.append("stablehlo.while")
    for op in unwanted:
        assert op not in hlo, op


@pytest.mark.parametrize("impl", [None, "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_lowered_for_cuda_holds_only_compiled_kernels(name, dtype, impl):
    fn, shapes, kernels = LOWERING_CASES[name]
    fn = functools.partial(fn, impl=impl)
    family = {"filter": "pixel", "splat": "pixel"}.get(name, name.split("-")[0])
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    _assert_only_kernels(lower_for_cuda(fn, *args), family, 1)
    # The backward holds the forward and a kernel per gradient; the JVP the forward kernel and
    # one fused kernel for the tangents of every argument (the Gaussian's parameters too).
    _assert_only_kernels(lower_for_cuda(_grad_all(fn, len(args)), *args), family, kernels)
    jvp = lower_for_cuda(_jvp_all(fn), *args)
    _assert_only_kernels(jvp, family, 1)
    assert len(triton_kernel_names(jvp)) == 2


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_lowered_for_cuda_inside_shard_map_holds_the_kernels(name):
    """Inside ``jax.shard_map`` (``check_vma=True``) over 2 abstract H100s, the batch split and
    the shared arrays replicated: the forward and every gradient are the compiled kernels, each
    kernel's result typed with the manual axes of its operands, and the replicated arrays'
    gradients summed over the devices."""
    fn, shapes, kernels = LOWERING_CASES[name]
    family = {"filter": "pixel", "splat": "pixel"}.get(name, name.split("-")[0])
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    # The batch (2) leads every per-image array of these cases; the others are shared.
    specs = tuple(P("data") if s[0] == shapes[0][0] else P() for s in shapes)
    mesh = jax.sharding.AbstractMesh(
        (2,), ("data",), abstract_device=H100, axis_types=(jax.sharding.AxisType.Auto,)
    )
    step = jax.shard_map(
        _grad_all(functools.partial(fn, impl=None), len(args)),
        mesh=mesh,
        in_specs=specs,
        out_specs=specs,
    )
    with jax.sharding.use_abstract_mesh(mesh):
        hlo = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    _assert_only_kernels(hlo, family, kernels)
    if any(s == P() for s in specs):
        assert "stablehlo.all_reduce" in hlo or "all-reduce" in hlo


def _lower_for(fn, args, platforms):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms).as_text()


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_lowered_for_cpu_holds_no_gpu_kernel(name):
    fn, shapes, _ = LOWERING_CASES[name]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    for impl in (None, "xla", "pallas"):
        hlo = _lower_for(_grad_all(functools.partial(fn, impl=impl), len(args)), args, ("cpu",))
        assert not triton_kernel_names(hlo), impl


def test_one_function_lowered_for_two_platforms_picks_per_platform():
    fn, shapes, _ = LOWERING_CASES["modulated"]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    hlo = lower_for_cuda(fn, *args, platforms=("cpu", "cuda"))
    # A case over the platform index: the CUDA branch calls the kernel, the CPU one runs XLA.
    assert "stablehlo.case" in hlo
    assert triton_kernel_names(hlo) == ["svconv_modulated_forward"]
    assert "stablehlo.dot_general" in hlo


def test_pallas_on_cpu_runs_the_interpreter():
    x, w, d = rands(53, (2, 7, 6, 3), (3, 3, 3, 4), (2, 7, 6, 3, 3))
    want = svconv.modulated_conv2d(x, w, d, impl="reference")
    got = jax.jit(functools.partial(svconv.modulated_conv2d, impl="pallas"))(x, w, d)
    assert_close(got, want)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w, d)]
    hlo = _lower_for(functools.partial(svconv.modulated_conv2d, impl="pallas"), args, ("cpu",))
    assert "stablehlo.while" in hlo  # the interpreter's loop over the grid


@pytest.mark.parametrize("bad", ["gpu", "cuda", "", 3])
def test_unknown_impl_is_a_value_error(bad):
    x, w, d = rands(54, (1, 5, 5, 2), (3, 3, 2, 2), (5, 5, 3, 3))
    with pytest.raises(ValueError, match="`impl` must be one of"):
        svconv.modulated_conv2d(x, w, d, impl=bad)


def test_eager_and_jit_agree_on_every_impl():
    x, w, d = rands(55, (2, 6, 5, 2), (3, 2, 2, 3), (2, 6, 5, 3, 2))
    results = {
        impl: np.asarray(svconv.modulated_conv2d(x, w, d, impl=impl))
        for impl in ("xla", "pallas", "reference")
    }
    for impl, y in results.items():
        assert_close(jax.jit(functools.partial(svconv.modulated_conv2d, impl=impl))(x, w, d), y)
        assert_close(y, results["reference"])
