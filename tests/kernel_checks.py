"""Checks shared by the tests of the per-pixel and local-conv Pallas kernels: plain tap loops,
vmapped kernels, lowering for CUDA, the support check, the float32 oracle with its VJP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.geometry import Geometry
from tests.conftest import assert_close


def oracle_with_vjp(oracle, args, names: tuple[str, ...]) -> dict:
    """``oracle(*args[:-1])`` and its VJP with the cotangent ``args[-1]``, in float32, jitted:
    ``{names[0]: output, names[1]: gradient in args[0], ...}``."""

    @jax.jit
    def run(*args):
        y, vjp = jax.vjp(oracle, *args[:-1])
        return dict(zip(names, (y, *vjp(args[-1])), strict=True))

    return run(*(a.astype(jnp.float32) for a in args))


def check_vmapped_kernels(run, oracle, inputs, ops, family: str, interpret: bool) -> None:
    """Each kernel ``run(op, interpret, *inputs)`` vmapped over the two sets of ``inputs``
    (stacked): lowered for CUDA it is still one kernel (vmap adds a grid axis), and each slice
    equals ``oracle_with_vjp(oracle, slice, ops)``'s entry for the op."""
    from experiments.static.lowering import lower_for_cuda, triton_kernel_names

    stacked = [jnp.stack(pair) for pair in zip(*inputs, strict=True)]
    for op in ops:
        text = lower_for_cuda(jax.vmap(functools.partial(run, op, False)), *stacked)
        assert triton_kernel_names(text) == [f"svconv_{family}_{op}"]
        got = jax.vmap(functools.partial(run, op, interpret))(*stacked)
        for i in range(len(inputs)):
            assert_close(got[i], oracle_with_vjp(oracle, inputs[i], ops)[op], what=op)


def check_kernels_lower_for_cuda(run, inputs, ops, family: str) -> None:
    """Each kernel ``run(op, False, *inputs)`` lowered for CUDA on the abstract ``inputs`` (a
    function returning them) is one Triton kernel, ``svconv_<family>_<op>``."""
    from experiments.static.lowering import lower_for_cuda, triton_kernel_names

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.eval_shape(inputs)]
    for op in ops:
        text = lower_for_cuda(functools.partial(run, op, False), *specs)
        assert triton_kernel_names(text) == [f"svconv_{family}_{op}"], op


def check_unsupported_reason(unsupported_reason, shapes: dict, bad_dtype=jnp.int32) -> None:
    """A family's support check takes float32, bfloat16 and float16 on a small 3x3 case with
    the slot ``shapes``, and refuses ``bad_dtype`` naming it."""
    geom = Geometry.of((5, 5), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert unsupported_reason(geom, shapes, jnp.dtype(dtype)) is None
    reason = unsupported_reason(geom, shapes, jnp.dtype(bad_dtype))
    assert jnp.dtype(bad_dtype).name in reason


def tap_windows(x, geom: Geometry):
    """``(m, n, window)`` for every tap of ``geom``: the ``[N, Ho, Wo, C]`` window of the
    zero-padded ``x`` that tap ``(m, n)`` reads, by plain slicing (the tap loops that check the
    oracles' layouts)."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = (
        geom.kernel_size, geom.stride, geom.dilation, geom.out_size
    )  # fmt: skip
    xp = jnp.pad(x, ((0, 0), geom.padding[0], geom.padding[1], (0, 0)))
    for m in range(kh):
        for n in range(kw):
            rows = slice(m * dh, m * dh + (ho - 1) * sh + 1, sh)
            cols = slice(n * dw, n * dw + (wo - 1) * sw + 1, sw)
            yield m, n, xp[:, rows, cols, :]


def check_kernel_output(out, case, expected) -> None:
    """A kernel's result has the case's dtype and is within its tolerance of ``expected``."""
    assert out.dtype == case.dtype
    assert_close(out, expected, case.dtype)
