"""Pallas modulated-conv kernels vs independent oracles (interpreted on CPU, compiled on a GPU),
and lowering for CUDA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments.static.lowering import lower_for_cuda, triton_kernel_names
from pallas_kernels.geometry import Geometry
from pallas_kernels.triton import modulated as mk
from tests.conftest import Case, assert_close

HIGHEST = lax.Precision.HIGHEST


def _geometry(case: Case) -> dict:
    """The normalised geometry keywords of the oracle."""
    g = case.geom()
    return dict(stride=g.stride, dilation=g.dilation, padding=g.padding)


def _shapes(case: Case):
    """Shapes of x, w, d, y."""
    (ho, wo), (kh, kw) = case.geom().out_size, case.geom().kernel_size
    d = (ho, wo, kh, kw) if case.shared else (case.n, ho, wo, kh, kw)
    return (
        (case.n, case.h, case.w, case.cin),
        (kh, kw, case.cin, case.cout),
        d,
        (case.n, ho, wo, case.cout),
    )


def _pad(p):
    return ((p, p), (p, p))


SMALL_BLOCKS = mk.ModulatedBlockSizes(
    block_m=32, block_n=16, block_k=16, block_m_dx=32, block_n_dx=16, block_k_dx=16,
    block_m_dw=16, chunks_dw=3, block_cin_dw=16, block_cout_dw=16, num_warps=4, num_stages=2,
)  # fmt: skip

CASES = [
    Case(2, 9, 7, 3, 5, 3, padding=_pad(1)),
    Case(2, 9, 7, 3, 5, 3, stride=(2, 2), padding=_pad(1)),
    Case(2, 8, 7, 4, 6, 1, shared=True),
    Case(2, 6, 5, 3, 4, 3, padding=((3, 0), (0, 4)), shared=True),
    Case(1, 13, 11, 3, 2, 2, stride=(4, 3)),
    Case(1, 11, 10, 5, 3, 3, (2, 1), (2, 2), ((0, 2), (3, 0)), shared=True),
    Case(1, 12, 13, 17, 33, 5, (2, 2), (1, 2), ((2, 1), (0, 0))),
    Case(1, 10, 9, 3, 4, 7, padding=_pad(3)),
    Case(2, 10, 9, 20, 18, 3, (1, 2), (2, 1), ((1, 0), (2, 1)), block_sizes=SMALL_BLOCKS),
    Case(2, 9, 9, 8, 8, 3, dilation=(2, 2), padding=_pad(2), dtype=jnp.bfloat16),
    Case(1, 9, 7, 3, 5, 3, stride=(2, 2), padding=_pad(1), shared=True, dtype=jnp.float16),
]


def oracle(x, w, d, *, stride, dilation, padding):
    """Strided slices of the zero-padded input, one per tap, contracted in one fp32 einsum."""
    kh, kw = w.shape[:2]
    (sh, sw), (dh, dw) = stride, dilation
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    taps = [
        xp[:, m * dh : m * dh + (ho - 1) * sh + 1 : sh, n * dw : n * dw + (wo - 1) * sw + 1 : sw]
        for m in range(kh)
        for n in range(kw)
    ]
    patches = jnp.stack(taps, axis=3).reshape(*taps[0].shape[:3], kh, kw, x.shape[-1])
    d = d if d.ndim == 5 else d[None]
    return jnp.einsum("bijmnc,bijmn,mnco->bijo", patches, d, w, precision=HIGHEST)


def _inputs(case: Case, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(case.dtype)
    xs, ws, ds, ys = _shapes(case)
    x = jax.random.normal(keys[0], xs).astype(dt)
    w = jax.random.normal(keys[1], ws).astype(dt)
    d = jax.random.uniform(keys[2], ds, minval=-1.0, maxval=2.0).astype(dt)
    dy = jax.random.normal(keys[3], ys).astype(dt)
    return x, w, d, dy


# On CPU the kernels run in Pallas's interpreter; on a GPU machine the same tests run them
# compiled. Interpreter tests are compile-bound: XLA's optimisation passes only slow them down.
INTERPRET = jax.default_backend() != "gpu"
_FAST_COMPILE = {"xla_backend_optimization_level": 0} if INTERPRET else None


def _jit(fn, **kwargs):
    return jax.jit(functools.partial(fn, **kwargs), compiler_options=_FAST_COMPILE)


def _expected(case: Case, x, w, d, dy):
    """Oracle forward and vjp in fp32 from the same (rounded) inputs: (y, dx, dw, dd)."""

    def fwd_and_vjp(x, w, d, dy):
        y, vjp = jax.vjp(functools.partial(oracle, **_geometry(case)), x, w, d)
        return (y, *vjp(dy))

    return jax.jit(fwd_and_vjp, compiler_options=_FAST_COMPILE)(
        *(a.astype(jnp.float32) for a in (x, w, d, dy))
    )


def _call(case, out_shape, precision=HIGHEST, interpret=INTERPRET):
    return case.call(out_shape, interpret, precision)


def _kernels(case, **options):
    """The four kernels of `case`, each a function of its operands (slot order)."""
    xs, ws, ds, ys = _shapes(case)
    return {
        "forward": functools.partial(mk.forward, call=_call(case, ys, **options)),
        "grad_x": functools.partial(mk.grad_x, call=_call(case, xs, **options)),
        "grad_w": functools.partial(mk.grad_w, call=_call(case, ws, **options)),
        "grad_d": functools.partial(mk.grad_d, call=_call(case, ds, **options)),
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_match_oracle(case):
    """Forward and the three backward kernels against the oracle's value and vjp."""
    x, w, d, dy = _inputs(case)
    k = _kernels(case)
    operands = {"forward": (x, w, d), "grad_x": (w, d, dy), "grad_w": (x, d, dy)}
    operands["grad_d"] = (x, w, dy)
    got = {name: jax.jit(k[name], compiler_options=_FAST_COMPILE)(*operands[name]) for name in k}
    for (name, g), want in zip(got.items(), _expected(case, x, w, d, dy), strict=True):
        assert g.dtype == jnp.dtype(case.dtype), name
        assert_close(g, want, case.dtype, what=name)


ONES_CASES = [
    Case(2, 9, 7, 3, 5, 3, stride=(2, 1), dilation=(1, 2), padding=((1, 0), (2, 1))),
    Case(1, 10, 8, 6, 4, 5, stride=(2, 2), padding=_pad(2)),
]


@pytest.mark.parametrize("case", ONES_CASES, ids=lambda c: c.id)
def test_fwd_unmodulated_matches_lax_conv(case):
    """d == 1 must be lax.conv_general_dilated; also checks the loop oracle on the same case."""
    x, w, _, _ = _inputs(case)
    d = jnp.ones(_shapes(case)[2])
    want = lax.conv_general_dilated(
        x, w, case.geom().stride, case.geom().padding, rhs_dilation=case.geom().dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST,
    )  # fmt: skip
    assert_close(_jit(oracle, **_geometry(case))(x, w, d), want, case.dtype)
    assert_close(jax.jit(_kernels(case)["forward"])(x, w, d), want, case.dtype)


def test_vmap():
    case = Case(2, 9, 7, 3, 5, 3, stride=(2, 1), padding=_pad(1))
    xs, ws, ds = [], [], []
    for seed in range(2):
        x, w, d, _ = _inputs(case, seed)
        xs.append(x), ws.append(w), ds.append(d)
    x, w, d = jnp.stack(xs), jnp.stack(ws), jnp.stack(ds)
    fwd = _kernels(case)["forward"]
    got = jax.jit(jax.vmap(fwd), compiler_options=_FAST_COMPILE)(x, w, d)
    for i in range(2):
        assert_close(got[i], oracle(x[i], w[i], d[i], **_geometry(case)), case.dtype)


def test_unsupported_reason_and_bad_block_sizes():
    case = CASES[0]
    shapes = dict(zip("xwdy", _shapes(case), strict=True))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert mk.unsupported_reason(case.geom(), shapes, jnp.dtype(dtype)) is None
    assert "float64" in mk.unsupported_reason(case.geom(), shapes, np.dtype(np.float64))
    with pytest.raises(ValueError, match="block_m"):
        dataclasses.replace(SMALL_BLOCKS, block_m=48)


def test_block_size_heuristic_targets_wgmma_on_large_problems():
    geom = Geometry.of((128, 128), (3, 3), (1, 1), (1, 1), _pad(1))
    for dtype in (jnp.float32, jnp.bfloat16):
        bs = mk.modulated_block_sizes(geom, batch=8, cin=64, cout=64, dtype=dtype)
        assert bs.block_m >= 64 and bs.block_m_dx >= 64 and bs.num_warps % 4 == 0
        for f in dataclasses.fields(bs):
            if f.name not in ("num_warps", "num_stages", "chunks_dw"):
                v = getattr(bs, f.name)
                assert v >= 16 and v & (v - 1) == 0, (f.name, v)


# ---------------------------------------------------------------------------------------------
# Lowering for CUDA (abstract H100): builds the Triton IR of every kernel configuration.
# ---------------------------------------------------------------------------------------------

LOWER_CASES = [
    Case(2, 16, 16, 3, 5, 3, padding=_pad(1)),
    Case(2, 17, 15, 5, 7, 3, stride=(2, 2), padding=_pad(1), dtype=jnp.bfloat16),
    Case(1, 16, 16, 64, 64, 3, dilation=(2, 2), padding=_pad(2), shared=True, dtype=jnp.float16),
    Case(1, 12, 12, 24, 40, 1, stride=(2, 1), dtype=jnp.bfloat16),
    Case(2, 20, 18, 17, 33, 5, stride=(2, 2), padding=((2, 1), (0, 2))),
    Case(1, 16, 16, 96, 160, 7, padding=_pad(3), shared=True, dtype=jnp.bfloat16),
    Case(8, 128, 128, 64, 64, 3, padding=_pad(1), dtype=jnp.bfloat16),
    Case(2, 10, 9, 20, 18, 3, (1, 2), (2, 1), ((1, 0), (2, 1)), block_sizes=SMALL_BLOCKS),
]


def _operands(case, lead=()):
    """Abstract x, w, d, dy (with extra leading axes `lead`)."""
    dt = jnp.dtype(case.dtype)
    return [jax.ShapeDtypeStruct((*lead, *s), dt) for s in _shapes(case)]


def _lower_all(case, precision):
    x, w, d, dy = _operands(case)
    kernels = _kernels(case, precision=precision, interpret=False)
    operands = {"forward": (x, w, d), "grad_x": (w, d, dy), "grad_w": (x, d, dy)}
    operands["grad_d"] = (x, w, dy)
    return {
        f"svconv_modulated_{name}": lower_for_cuda(fn, *operands[name])
        for name, fn in kernels.items()
    }


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: c.id)
def test_lowers_for_cuda(case):
    # fp32 lowers twice: TF32 tensor cores (the default) and exact IEEE fp32 (HIGHEST).
    precisions = [None, HIGHEST] if jnp.dtype(case.dtype) == jnp.float32 else [None]
    for precision in precisions:
        lowered = _lower_all(case, precision)
        for name, text in lowered.items():
            assert triton_kernel_names(text) == [name]


def test_vmap_lowers_for_cuda():
    """vmap adds a grid axis to every kernel (6 axes for grad_w): the launch grid must fold."""
    case = Case(2, 12, 10, 5, 6, 3, stride=(2, 1), padding=_pad(1), dtype=jnp.bfloat16)
    x, w, d, dy = _operands(case, lead=(3,))
    kernels = _kernels(case, interpret=False)
    operands = {"forward": (x, w, d), "grad_x": (w, d, dy), "grad_w": (x, d, dy)}
    operands["grad_d"] = (x, w, dy)
    for name, fn in kernels.items():
        text = lower_for_cuda(jax.vmap(fn), *operands[name])
        assert triton_kernel_names(text) == [f"svconv_modulated_{name}"]
