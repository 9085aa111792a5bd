"""Static HBM traffic of the program lowered for CUDA (nothing runs; no GPU needed).

DESIGN: the arrays XLA builds around the Pallas kernels cost at most 10% of an op's minimal
bytes, forward and backward. The first half checks that for every op, direction and dtype at
DESIGN's shapes; the second half checks the analyzer itself on small hand-written programs
around a tiny Triton kernel, where the right answer is known to the byte.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl

from experiments.static import traffic


class NotAvailable(Exception):
    """JAX cannot trace this direction of the op."""


class OverBudget(AssertionError):
    """The glue costs more than DESIGN's budget."""


# Rows that fail today: how they fail and why. A row that starts passing fails (strict xfail),
# and so does a row that fails the other way (a direction that becomes available but is over
# budget): update this table then. (Forward mode of every op but the deformable conv takes the
# tangents of every slot and parameter in one fused kernel: no sum of one kernel per tangent.)
_DEFORMABLE_BWD = (
    "deformable_conv2d's Triton kernels (not yet the default): the gradient in the offsets is "
    "the two derivative partials scaled by the mask and stacked by XLA, the atomic gradient in "
    "the image adds into a zeroed float32 array"
)
_DEFORMABLE_16_BIT = (
    "and with 16-bit inputs, no fused tangent kernel: the linearised op is a sum of one partial "
    "per tangent in float32 (the primals cast to it), whose transposes run on float32 copies"
)
_DEFORMABLE_JVP = "deformable_conv2d: no fused tangent kernel, the sum of one partial per tangent"
KNOWN_FAILING: dict = {
    ("deformable_conv2d 3x3", "bwd", "float32"): (OverBudget, _DEFORMABLE_BWD),
    ("deformable_conv2d 3x3", "bwd", "bfloat16"): (
        OverBudget,
        f"{_DEFORMABLE_BWD}; {_DEFORMABLE_16_BIT}",
    ),
    ("deformable_conv2d 3x3", "jvp", "float32"): (OverBudget, _DEFORMABLE_JVP),
    ("deformable_conv2d 3x3", "jvp", "bfloat16"): (OverBudget, _DEFORMABLE_JVP),
}


def _design_params():
    for case in traffic.design_cases():
        for direction in traffic.DIRECTIONS:
            for dtype in traffic.DTYPES:
                key = (case.id, direction, dtype)
                marks = []
                if key in KNOWN_FAILING:
                    raises, reason = KNOWN_FAILING[key]
                    marks = [pytest.mark.xfail(strict=True, raises=raises, reason=reason)]
                yield pytest.param(
                    case, direction, dtype, marks=marks, id="-".join(key).replace(" ", "-")
                )


@pytest.mark.parametrize("case, direction, dtype", list(_design_params()))
def test_glue_within_budget_at_design_shapes(case, direction, dtype):
    row = traffic.measure(case, direction, dtype)
    if row.traffic is None:
        raise NotAvailable(f"{direction} is not available: {row.reason}")
    t = row.traffic
    assert t.kernels, "no Pallas kernel in the lowered program"
    where = "\n".join(
        f"  {g.nbytes / 1e6:.1f} MB: {', '.join(g.ops)} writing "
        + "; ".join(f"{a} for {w}" for w, a, _ in g.writes)
        for g in t.regions
    )
    if t.ratio > traffic.BUDGET:
        raise OverBudget(
            f"glue {t.glue_bytes / 1e6:.1f} MB = {t.ratio:.2f}x of the minimal "
            f"{t.minimal_bytes / 1e6:.1f} MB:\n{where}"
        )


@pytest.mark.parametrize("direction", traffic.DIRECTIONS)
@pytest.mark.parametrize(
    "case", traffic.mosaic_cases(gaussian_size=7), ids=lambda c: c.id.replace(" ", "-")
)
def test_mosaic_programs_glue_within_budget(case, direction):
    """The programs with the Mosaic GPU kernels (float32): the same budget, their kernels
    among the priced ones (the Gaussian at 7x7: what XLA builds around the kernels does not
    depend on the window, its lowering's time does; results/traffic.md has 31x31)."""
    row = traffic.measure(case, direction, "float32")
    t = row.traffic
    assert t is not None and t.kernels, row.reason
    # Every program has Mosaic kernels (the modulated conv's float32 gradient in the weights
    # and the local conv's gradient in the image are the Triton kernels').
    assert any("mosaic" in k for k in t.kernels), t.kernels
    assert t.ratio <= traffic.BUDGET, f"glue {t.ratio:.3f}x of the minimal bytes"


def test_known_failing_table_names_real_rows():
    rows = {
        (c.id, d, t)
        for c in traffic.design_cases()
        for d in traffic.DIRECTIONS
        for t in traffic.DTYPES
    }
    assert set(KNOWN_FAILING) <= rows


# ------------------------------------------------------------------------- the analyzer

SHAPE, F32 = (16, 32), jnp.float32
NBYTES = 16 * 32 * 4  # one f32[16, 32]


def _scale(factor):
    """A Triton kernel multiplying its whole (power-of-2 sized) input by ``factor``."""

    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] * factor

    def kernel(x):
        return pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    return kernel


double, triple = _scale(2.0), _scale(3.0)


def _split(x):
    """A kernel with two results: ``2x`` and ``3x``."""

    def body(x_ref, a_ref, b_ref):
        a_ref[...] = x_ref[...] * 2
        b_ref[...] = x_ref[...] * 3

    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return pl.pallas_call(body, out_shape=(out, out))(x)


def _traffic(fn, *shapes, dtype=F32, **kwargs):
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    return traffic.analyze(traffic.lower_for_cuda(fn, *args), **kwargs)


def test_transpose_costs_its_read_and_write():
    t = _traffic(lambda x: double(x.T), (32, 16))
    assert t.kernels and t.minimal_bytes == 2 * NBYTES
    assert t.glue_bytes == 2 * NBYTES
    (region,) = t.regions
    assert region.ops == ["transpose"]
    assert [str(a) for _, a in region.reads] == ["f32[32,16]"]
    assert [str(a) for _, a, _ in region.writes] == ["f32[16,32]"]


def test_layout_free_paths_cost_nothing():
    def fn(x):
        y = x.reshape(32, 16)[None, :, :, None]  # reshape, then size-1 dims
        y = jnp.transpose(y, (3, 1, 0, 2)).astype(F32)  # moves size-1 dims only; same dtype
        y = double(y.reshape(32, 16))
        return jnp.sum(y[:, None, :], axis=1).reshape(SHAPE)  # a reduce over a size-1 dim

    t = _traffic(fn, SHAPE)
    assert len(t.kernels) == 1 and t.glue_bytes == 0 and t.regions == []


def test_crop_reads_the_whole_source_and_writes_the_crop():
    t = _traffic(lambda x: double(x)[:, :16], SHAPE)
    assert t.minimal_bytes == NBYTES + NBYTES // 2
    assert t.glue_bytes == NBYTES + NBYTES // 2


def test_called_functions_are_inlined():
    transpose = jax.jit(lambda a: jnp.transpose(a))
    fn = jax.jit(lambda x: double(transpose(x)))
    text = traffic.lower_for_cuda(fn, jax.ShapeDtypeStruct((32, 16), F32))
    assert "call @" in text
    assert traffic.analyze(text).glue_bytes == 2 * NBYTES


def test_a_copy_two_kernels_share_is_made_once():
    # Both kernels pad x the same way, in separate functions as svconv's kernels do.
    pad = jax.jit(lambda a: jnp.pad(a, ((0, 0), (1, 1))))

    def fn(x):
        return double(pad(x)), triple(jax.jit(lambda a: jnp.pad(a, ((0, 0), (1, 1))))(x))

    x_bytes = 16 * 30 * 4
    merged = _traffic(fn, (16, 30))
    assert merged.glue_bytes == x_bytes + NBYTES
    assert len(merged.regions) == 1
    (writes,) = [r.writes for r in merged.regions]
    assert len(writes) == 1 and "operand 0" in writes[0][0] and "," in writes[0][0]
    separate = _traffic(fn, (16, 30), cse=False)
    assert separate.glue_bytes == 2 * (x_bytes + NBYTES)


def test_constants_do_not_join_fusions():
    # Both pads use a zero built from one constant; they are still two fusions.
    def fn(x, y):
        return double(jnp.pad(x, ((0, 0), (1, 1)))), triple(jnp.pad(y, ((0, 0), (1, 1))))

    t = _traffic(fn, (16, 30), (16, 30))
    assert len(t.regions) == 2
    assert t.glue_bytes == 2 * (16 * 30 * 4 + NBYTES)


def test_elementwise_glue_and_materialised_constants():
    def fn(x):
        return double(jnp.zeros(SHAPE, F32)) + x  # a broadcast zero a kernel reads

    t = _traffic(fn, SHAPE)
    assert t.glue_bytes == NBYTES + 3 * NBYTES  # write the zeros; read two, write the sum


def test_unknown_ops_are_glue():
    t = _traffic(lambda x: double(jnp.sort(x, axis=-1)), SHAPE)
    assert t.glue_bytes == 2 * NBYTES
    assert t.regions[0].ops == ["sort"]


def test_select_in_its_short_form():
    # `stablehlo.select %p, %a, %b : pred type, type`: one result, of the second type.
    t = _traffic(lambda x, y: double(jnp.where(x > y, x, y)), SHAPE, SHAPE)
    assert t.glue_bytes == 3 * NBYTES  # compare and select in one fusion: read x, y; write


def test_a_loop_around_the_kernels_is_refused():
    # Priced as one op, a loop would hide all its iterations but one.
    def fn(x):
        return double(lax.fori_loop(0, 3, lambda i, v: v * 2, x))

    with pytest.raises(ValueError, match="loop around the kernels"):
        _traffic(fn, SHAPE)


def test_kernel_with_two_results():
    def fn(x):
        a, b = _split(x)
        return a.T, b

    t = _traffic(fn, SHAPE)
    assert t.kernels and t.minimal_bytes == 3 * NBYTES
    assert t.glue_bytes == 2 * NBYTES
    assert t.regions[0].reads[0][0].endswith("output 0")


def test_bf16_bytes():
    t = _traffic(lambda x: double(x.T), (32, 16), dtype=jnp.bfloat16)
    assert t.minimal_bytes == NBYTES and t.glue_bytes == NBYTES


def test_unavailable_direction_is_reported_not_raised():
    @jax.custom_vjp
    def op(x):
        return double(x)

    op.defvjp(lambda x: (op(x), None), lambda _, g: (2 * g,))
    case = traffic.Case("custom", "16x32", op, (("x", SHAPE),), SHAPE)
    row = traffic.measure(case, "jvp", "float32")
    assert row.traffic is None and "custom_vjp" in row.reason
    row = traffic.measure(case, "bwd", "float32")
    assert row.traffic is not None and row.traffic.minimal_bytes == 3 * NBYTES
