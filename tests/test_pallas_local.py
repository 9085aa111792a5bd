"""Local-conv Pallas kernels: interpreter vs lax.conv_general_dilated_local; lowering for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.static.lowering import lower_for_cuda
from pallas_kernels.triton import local
from pallas_kernels.triton.local import LocalBlockSizes
from tests import kernel_checks
from tests.conftest import Case, rands

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
HIGHEST = jax.lax.Precision.HIGHEST
OPS = ("forward", "grad_x", "grad_w")
# Kernels compile on a GPU and run in Pallas's interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"


CASES = [
    Case(2, 7, 6, 3, 5, 3, padding=1),
    Case(1, 5, 6, 4, 3, 1, stride=2),
    Case(2, 9, 8, 5, 4, 3, stride=2, padding=((1, 0), (0, 2))),
    Case(2, 9, 9, 3, 2, 5, stride=(2, 1), dilation=2, padding=((3, 2), (4, 1))),
    Case(1, 9, 8, 2, 3, 7, padding=3),
    Case(2, 8, 7, 6, 5, 3, stride=(1, 2), dilation=(2, 1), padding=((2, 2), (0, 1)), dtype=BF16),
    Case(3, 7, 7, 3, 4, 5, stride=2, padding=2, dtype=F16),
    # Several batch, channel and K blocks per program.
    Case(
        18,
        5,
        4,
        20,
        18,
        3,
        stride=(2, 1),
        dilation=(1, 2),
        padding=((1, 1), (2, 0)),
        block_sizes=LocalBlockSizes(block_batch=16, block_k=16, block_in=16, block_out=16),
    ),
]


def _local_weights(w):
    """[Ho, Wo, kh, kw, Cin, Cout] -> lax's [Ho, Wo, Cin*kh*kw, Cout] (input-channel major)."""
    ho, wo, kh, kw, cin, cout = w.shape
    return w.transpose(0, 1, 4, 2, 3, 5).reshape(ho, wo, cin * kh * kw, cout)


def _oracle(x, w, case):
    return jax.lax.conv_general_dilated_local(
        x,
        _local_weights(w),
        case.geom().stride,
        case.geom().padding,
        case.geom().kernel_size,
        rhs_dilation=case.geom().dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )


def _loops(x, w, case):
    """Plain loops over taps on a zero-padded x: checks the oracle's weight layout."""
    return sum(
        jnp.einsum("bijc,ijco->bijo", window, w[:, :, m, n], precision=HIGHEST)
        for m, n, window in kernel_checks.tap_windows(x, case.geom())
    )


def _inputs(case, seed=0):
    n, (ho, wo), k = case.n, case.geom().out_size, case.geom().kernel_size
    shapes = (
        (n, case.h, case.w, case.cin),
        (ho, wo, *k, case.cin, case.cout),
        (n, ho, wo, case.cout),
    )
    return rands(seed, *shapes, dtype=case.dtype)


@functools.cache
def _expected(case):
    """Oracle forward and its vjp in x and in w, from float32 copies of the inputs."""
    oracle = functools.partial(_oracle, case=case)
    return kernel_checks.oracle_with_vjp(oracle, _inputs(case), OPS)


def _run(case, op, interpret, x, w, dy, precision=None):
    """Kernel `op` of `case` on its operands (slot order)."""
    n, (ho, wo), k = case.n, case.geom().out_size, case.geom().kernel_size
    if op == "forward":
        return local.forward(x, w, case.call((n, ho, wo, case.cout), interpret, precision))
    if op == "grad_x":
        return local.grad_x(w, dy, case.call((n, case.h, case.w, case.cin), interpret, precision))
    return local.grad_w(x, dy, case.call((ho, wo, *k, case.cin, case.cout), interpret, precision))


def test_oracle_matches_tap_loops():
    case = Case(2, 8, 7, 3, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=((1, 2), (0, 1)))
    x, w, _ = _inputs(case)
    np.testing.assert_allclose(_oracle(x, w, case), _loops(x, w, case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_match_oracle(op, case):
    out = _run(case, op, INTERPRET, *_inputs(case))
    kernel_checks.check_kernel_output(out, case, _expected(case)[op])


def test_vmap():
    case = Case(2, 7, 6, 3, 4, 3, stride=(1, 2), padding=((1, 0), (1, 1)))
    run = functools.partial(_run, case)
    oracle = functools.partial(_oracle, case=case)
    inputs = [_inputs(case, 1), _inputs(case, 2)]
    kernel_checks.check_vmapped_kernels(run, oracle, inputs, OPS, "local", INTERPRET)


def test_precision_reaches_the_dot():
    case = Case(1, 5, 5, 3, 2, 3, padding=1)
    x, w, _ = _inputs(case)
    texts = {
        precision: lower_for_cuda(
            functools.partial(_run, case, "forward", False, precision=precision), x, w, None
        )
        for precision in (jax.lax.Precision.DEFAULT, HIGHEST)
    }
    assert texts[jax.lax.Precision.DEFAULT] != texts[HIGHEST]  # TF32 vs IEEE float32 dots


def test_unsupported():
    shapes = {"x": (1, 5, 5, 3), "w": (5, 5, 3, 3, 3, 4), "y": (1, 5, 5, 4)}
    kernel_checks.check_unsupported_reason(local.unsupported_reason, shapes)


LOWER_CASES = [
    Case(8, 16, 16, 64, 64, 3, padding=1, dtype=BF16),
    Case(8, 16, 16, 64, 64, 3, padding=1, dtype=F32),
    Case(2, 17, 15, 3, 5, 7, stride=2, padding=3, dtype=F16),
    Case(100, 12, 12, 32, 200, 5, dilation=2, padding=((4, 3), (2, 5)), dtype=BF16),
    Case(4, 15, 16, 130, 7, 1, stride=(2, 1), dtype=F32),
]


@pytest.mark.parametrize(
    "case", LOWER_CASES + [c for c in CASES if c.block_sizes], ids=lambda c: c.id
)
def test_lowers_for_cuda(case):
    kernel_checks.check_kernels_lower_for_cuda(
        functools.partial(_run, case), lambda: _inputs(case), OPS, "local"
    )
