"""Pixel-filter Pallas kernels: interpreter vs an independent oracle, and lowering for CUDA."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.triton import pixel
from pallas_kernels.triton.pixel import PixelBlockSizes
from tests import kernel_checks
from tests.conftest import Case, assert_close, rands

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


CASES = [
    Case(2, 9, 7, 6, 6, 5, groups=3, stride=2, padding=2),
    Case(1, 8, 8, 3, 3, 1),
    Case(2, 10, 9, 5, 5, 3, dilation=2, padding=((2, 1), (0, 2))),
    Case(1, 11, 10, 4, 4, 7, groups=4, stride=(2, 1), padding=((3, 2), (1, 4))),
    Case(1, 12, 12, 3, 3, 15, padding=7),
    Case(1, 9, 9, 9, 9, 3, groups=3, stride=3, dilation=2, padding=1),
    Case(2, 9, 8, 6, 6, 3, groups=2, stride=2, dilation=2, padding=((1, 0), (2, 1)), dtype=BF16),
    Case(1, 8, 9, 5, 5, 5, groups=5, padding=((0, 3), (2, 2)), dtype=F16),
    Case(1, 10, 8, 8, 8, 7, padding=3, dtype=BF16),
    # Several channel sub-blocks per group, several group blocks, ragged pixel tiles.
    Case(
        2,
        10,
        7,
        12,
        12,
        3,
        groups=2,
        stride=(1, 2),
        dilation=(2, 1),
        padding=1,
        block_sizes=PixelBlockSizes(2, 4, 1, 4),
    ),
    Case(
        1,
        9,
        11,
        6,
        6,
        5,
        groups=3,
        stride=2,
        padding=((2, 0), (1, 3)),
        dtype=F16,
        block_sizes=PixelBlockSizes(4, 2, 2, 2),
    ),
    # The forward in interleaved column phases (one loaded vector for several taps): ragged
    # tiles; strides, dilation, groups and channel sub-blocks.
    Case(1, 9, 13, 8, 8, 5, padding=2, block_sizes=PixelBlockSizes(2, 8, 1, 8, column_phases=4)),
    Case(
        2,
        10,
        11,
        6,
        6,
        3,
        groups=2,
        stride=(1, 2),
        dilation=2,
        padding=((1, 2), (2, 1)),
        dtype=BF16,
        block_sizes=PixelBlockSizes(2, 4, 2, 2, column_phases=2),
    ),
    # Interior programs without bounds tests (a branch per program), beside border and ragged
    # ones: one tap at a time and in column phases; strides, dilation, groups.
    # (a crop at the bottom and a width of whole tiles: the last row of tiles is outside the
    # output but reads inside the image, the last column of tiles reads past the image)
    Case(1, 23, 20, 8, 8, 3, padding=((1, -3), (1, 1)), block_sizes=PixelBlockSizes(4, 4, 1, 8,
         unmasked_interior=True)),
    Case(2, 23, 19, 8, 8, 3, groups=2, stride=(2, 1), dilation=(1, 2), padding=((1, 2), (2, 1)),
         block_sizes=PixelBlockSizes(2, 4, 1, 4, unmasked_interior=True)),
    Case(1, 18, 26, 8, 8, 5, padding=2, block_sizes=PixelBlockSizes(2, 8, 1, 8, column_phases=4,
         unmasked_interior=True)),
    Case(2, 16, 22, 6, 6, 3, groups=3, stride=(1, 2), dilation=2, padding=((1, 2), (2, 1)),
         dtype=BF16, block_sizes=PixelBlockSizes(2, 4, 1, 2, column_phases=2,
         unmasked_interior=True)),
]  # fmt: skip


def _oracle_gather(x, k, case):
    """XLA's patch extraction and an einsum, in float32 (a test may build patches)."""
    n, _, _, c = x.shape
    ho, wo = case.geom().out_size
    patches = jax.lax.conv_general_dilated_patches(
        x,
        case.geom().kernel_size,
        case.geom().stride,
        case.geom().padding,
        rhs_dilation=case.geom().dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # [N, Ho, Wo, C * kh * kw], channel-major
    patches = patches.reshape(n, ho, wo, k.shape[-1], c // k.shape[-1], *case.geom().kernel_size)
    return jnp.einsum("bijgcmn,bijmng->bijgc", patches, k, precision="highest").reshape(
        n, ho, wo, c
    )


def _loops_gather(x, k, case):
    """Plain loops over taps on a zero-padded x: checks the oracle's layout assumptions."""
    kc = jnp.repeat(k, x.shape[-1] // k.shape[-1], axis=-1)
    return sum(
        window * kc[:, :, :, m, n, :] for m, n, window in kernel_checks.tap_windows(x, case.geom())
    )


def test_oracle_matches_tap_loops():
    case = Case(
        2, 9, 8, 6, 6, (3, 2), groups=3, stride=(2, 1), dilation=(1, 2), padding=((1, 2), (0, 1))
    )
    x, k, _ = _inputs(case)
    want = _loops_gather(x, k, case)
    np.testing.assert_allclose(_oracle_gather(x, k, case), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want).min()) > 0 or float(jnp.abs(want).max()) > 1


def _inputs(case, seed=0):
    n, (ho, wo), k = case.n, case.geom().out_size, case.geom().kernel_size
    shapes = (n, case.h, case.w, case.cin), (n, ho, wo, *k, case.groups), (n, ho, wo, case.cin)
    return rands(seed, *shapes, dtype=case.dtype)


@functools.cache
def _expected(case):
    """Oracle gather, and its vjp in x (= scatter) and in k (= correlate), from float32 copies."""
    return kernel_checks.oracle_with_vjp(
        functools.partial(_oracle_gather, case=case), _inputs(case), OPS
    )


# Kernels compile on a GPU and run in Pallas's interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"


def _run(case, op, interpret, x, k, v):
    """Kernel `op` ("forward", "grad_x", "grad_k") of `case` on its operands (slot order)."""
    n, (ho, wo), size = case.n, case.geom().out_size, case.geom().kernel_size
    if op == "forward":
        return pixel.forward(x, k, case.call((n, ho, wo, case.cin), interpret))
    if op == "grad_x":
        return pixel.grad_x(k, v, case.call((n, case.h, case.w, case.cin), interpret))
    return pixel.grad_k(x, v, case.call((n, ho, wo, *size, case.groups), interpret))


OPS = ["forward", "grad_x", "grad_k"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_match_oracle(op, case):
    out = _run(case, op, INTERPRET, *_inputs(case))
    kernel_checks.check_kernel_output(out, case, _expected(case)[op])


@pytest.mark.parametrize("case", [c for c in CASES if c.block_sizes], ids=lambda c: c.id)
def test_forward_jvp(case):
    """The fused tangent ``forward(tx, k) + forward(x, tk)`` in one kernel."""
    x, k, _ = _inputs(case)
    tx, tk, _ = _inputs(case, seed=5)
    n, (ho, wo) = case.n, case.geom().out_size
    got = pixel.forward_jvp(x, k, tx, tk, case.call((n, ho, wo, case.cin), INTERPRET))
    f32 = functools.partial(jnp.asarray, dtype=F32)
    want = _oracle_gather(f32(tx), f32(k), case) + _oracle_gather(f32(x), f32(tk), case)
    assert got.dtype == case.dtype
    assert_close(got, want, case.dtype)


def test_unmasked_interior_is_a_branch_of_unmasked_loads():
    """Lowered for CUDA, the forward with ``unmasked_interior`` holds a branch with the tap
    loop's loads unmasked (the image's and the filter's) beside the masked loop; without it,
    no load goes unmasked."""
    from experiments.static.lowering import lower, triton_kernels

    def loads(tiles):
        case = Case(1, 32, 32, 8, 8, 3, padding=1, block_sizes=tiles)
        x, k, _ = _inputs(case)
        lowered = lower(lambda x, k: _run(case, "forward", False, x, k, None), x, k)
        (kernel,) = triton_kernels(lowered)
        # Generic MLIR: a load's operands are (pointers, mask, other), the last two optional.
        segments = re.findall(r'"tt\.load".*operandSegmentSizes = array<i32: (\d), (\d)',
                              kernel.ttir)  # fmt: skip
        unmasked = sum(mask == "0" for _, mask in segments)
        return "scf.if" in kernel.ttir, unmasked, len(segments) - unmasked

    branch, unmasked, masked = loads(PixelBlockSizes(4, 4, 1, 8, unmasked_interior=True))
    assert branch and unmasked == 2 and masked >= 2
    branch, unmasked, masked = loads(PixelBlockSizes(4, 4, 1, 8))
    assert not branch and unmasked == 0 and masked >= 2


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.block_sizes and c.block_sizes.unmasked_interior],
    ids=lambda c: c.id,
)  # fmt: skip
def test_interior_programs_read_only_inside(case):
    """The programs the forward runs without bounds tests are exactly those whose every output
    pixel is in the output and every tap reads inside the image (the interpreter cannot tell:
    there an unmasked load out of bounds reads zero, like the padding), and some are."""
    geom, bs = case.geom(), case.block_sizes
    (h, w), (ho, wo), (kh, kw) = geom.in_size, geom.out_size, geom.kernel_size
    (sh, sw), (dh, dw), ((top, _), (left, _)) = geom.stride, geom.dilation, geom.padding
    shapes = ((h, w), (ho, wo), case.cin)
    found = 0
    for ti in range(-(-ho // bs.block_h)):
        for tj in range(-(-wo // bs.block_w)):
            rows = range(ti * bs.block_h, (ti + 1) * bs.block_h)
            cols = range(tj * bs.block_w, (tj + 1) * bs.block_w)
            inside_all = all(i < ho and j < wo for i in rows for j in cols) and all(
                0 <= i * sh + m * dh - top < h and 0 <= j * sw + n * dw - left < w
                for i in rows for j in cols for m in range(kh) for n in range(kw)
            )  # fmt: skip
            got = pixel._interior(ti, tj, geom, bs, shapes, case.groups)
            assert bool(got) == inside_all, (ti, tj)
            found += inside_all
    assert found > 0


def test_column_phases_at_most_the_tile_width():
    with pytest.raises(ValueError, match=r"column_phases \(4\) must be at most block_w \(2\)"):
        PixelBlockSizes(2, 2, 1, 4, column_phases=4)


def test_vmap():
    case = Case(2, 8, 7, 6, 6, 3, groups=2, stride=(2, 1), padding=((1, 2), (0, 1)))
    run = functools.partial(_run, case)
    oracle = functools.partial(_oracle_gather, case=case)
    inputs = [_inputs(case, 1), _inputs(case, 2)]
    kernel_checks.check_vmapped_kernels(run, oracle, inputs, OPS, "pixel", INTERPRET)


def test_unsupported():
    shapes = {"x": (1, 5, 5, 3), "k": (1, 5, 5, 3, 3, 1), "y": (1, 5, 5, 3)}
    kernel_checks.check_unsupported_reason(pixel.unsupported_reason, shapes)


LOWER_CASES = [
    Case(2, 32, 32, 64, 64, 3, padding=1, dtype=BF16),
    Case(2, 32, 32, 64, 64, 7, groups=4, stride=2, padding=3, dtype=BF16),
    Case(1, 64, 64, 3, 3, 15, padding=7, dtype=F32),
    Case(1, 33, 31, 5, 5, 5, groups=5, dilation=2, padding=((4, 3), (2, 5)), dtype=F16),
    Case(2, 17, 16, 96, 96, 1, groups=3, stride=(2, 1), dtype=F32),
    Case(1, 20, 20, 256, 256, 3, stride=2, dilation=2, padding=2, dtype=BF16),
]


@pytest.mark.parametrize(
    "case", LOWER_CASES + [c for c in CASES if c.block_sizes], ids=lambda c: c.id
)
def test_lowers_for_cuda(case):
    kernel_checks.check_kernels_lower_for_cuda(
        functools.partial(_run, case), lambda: _inputs(case), OPS, "pixel"
    )
