"""Pixel-filter Pallas kernels: interpreter vs an independent oracle, and lowering for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.static.lowering import lower_for_cuda, triton_kernel_names
from pallas_kernels import pixel
from pallas_kernels.geometry import Geometry
from pallas_kernels.pixel import PixelBlockSizes
from tests.conftest import assert_close

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(p):
    if isinstance(p, int):
        return ((p, p), (p, p))
    return tuple(_pair(a) for a in p)


class Case:
    def __init__(self, n, h, w, c, g, k, s=1, d=1, p=0, dtype=F32, bs=None):
        self.n, self.h, self.w, self.c, self.g = n, h, w, c, g
        self.k, self.s, self.d, self.p = _pair(k), _pair(s), _pair(d), _pads(p)
        self.dtype, self.bs = dtype, bs
        self.out = tuple(
            (size + lo + hi - (kk - 1) * dd - 1) // ss + 1
            for size, kk, ss, dd, (lo, hi) in zip(
                (h, w), self.k, self.s, self.d, self.p, strict=True
            )
        )

    @property
    def geom(self):
        return Geometry.of((self.h, self.w), self.k, self.s, self.d, self.p)

    def __repr__(self):
        def fmt(v):
            return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

        pads = self.p[0] + self.p[1]
        p = str(pads[0]) if len(set(pads)) == 1 else "".join(map(str, pads))
        tiles = "-tiled" if self.bs else ""
        return (
            f"N{self.n}-H{self.h}W{self.w}-C{self.c}-G{self.g}-k{fmt(self.k)}-s{fmt(self.s)}"
            f"-d{fmt(self.d)}-p{p}-{jnp.dtype(self.dtype).name}{tiles}"
        )


CASES = [
    Case(2, 9, 7, 6, 3, 5, s=2, p=2),
    Case(1, 8, 8, 3, 1, 1),
    Case(2, 10, 9, 5, 1, 3, d=2, p=((2, 1), (0, 2))),
    Case(1, 11, 10, 4, 4, 7, s=(2, 1), p=((3, 2), (1, 4))),
    Case(1, 12, 12, 3, 1, 15, p=7),
    Case(1, 9, 9, 9, 3, 3, s=3, d=2, p=1),
    Case(2, 9, 8, 6, 2, 3, s=2, d=2, p=((1, 0), (2, 1)), dtype=BF16),
    Case(1, 8, 9, 5, 5, 5, p=((0, 3), (2, 2)), dtype=F16),
    Case(1, 10, 8, 8, 1, 7, p=3, dtype=BF16),
    # Several channel sub-blocks per group, several group blocks, ragged pixel tiles.
    Case(2, 10, 7, 12, 2, 3, s=(1, 2), d=(2, 1), p=1, bs=PixelBlockSizes(2, 4, 1, 4)),
    Case(1, 9, 11, 6, 3, 5, s=2, p=((2, 0), (1, 3)), dtype=F16, bs=PixelBlockSizes(4, 2, 2, 2)),
]


def _oracle_gather(x, k, case):
    """XLA's patch extraction and an einsum, in float32 (a test may build patches)."""
    n, _, _, c = x.shape
    ho, wo = case.out
    patches = jax.lax.conv_general_dilated_patches(
        x,
        case.k,
        case.s,
        case.p,
        rhs_dilation=case.d,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # [N, Ho, Wo, C * kh * kw], channel-major
    patches = patches.reshape(n, ho, wo, k.shape[-1], c // k.shape[-1], *case.k)
    return jnp.einsum("bijgcmn,bijmng->bijgc", patches, k, precision="highest").reshape(
        n, ho, wo, c
    )


def _loops_gather(x, k, case):
    """Plain loops over taps on a zero-padded x: checks the oracle's layout assumptions."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = case.k, case.s, case.d, case.out
    xp = jnp.pad(x, ((0, 0), case.p[0], case.p[1], (0, 0)))
    kc = jnp.repeat(k, x.shape[-1] // k.shape[-1], axis=-1)
    y = jnp.zeros((x.shape[0], ho, wo, x.shape[-1]), jnp.float32)
    for m in range(kh):
        for n in range(kw):
            rows = slice(m * dh, m * dh + (ho - 1) * sh + 1, sh)
            cols = slice(n * dw, n * dw + (wo - 1) * sw + 1, sw)
            y = y + xp[:, rows, cols, :] * kc[:, :, :, m, n, :]
    return y


def test_oracle_matches_tap_loops():
    case = Case(2, 9, 8, 6, 3, (3, 2), s=(2, 1), d=(1, 2), p=((1, 2), (0, 1)))
    x, k, _ = _inputs(case)
    want = _loops_gather(x, k, case)
    np.testing.assert_allclose(_oracle_gather(x, k, case), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want).min()) > 0 or float(jnp.abs(want).max()) > 1


def _inputs(case, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    n, (ho, wo) = case.n, case.out
    x = jax.random.normal(keys[0], (n, case.h, case.w, case.c), case.dtype)
    k = jax.random.normal(keys[1], (n, ho, wo, *case.k, case.g), case.dtype)
    v = jax.random.normal(keys[2], (n, ho, wo, case.c), case.dtype)
    return x, k, v


@functools.cache
def _expected(case):
    """Oracle gather, and its vjp in x (= scatter) and in k (= correlate), from float32 copies."""

    @jax.jit
    def oracle(x, k, v):
        y, vjp = jax.vjp(lambda a, b: _oracle_gather(a, b, case), x, k)
        dx, dk = vjp(v)
        return {"forward": y, "grad_x": dx, "grad_k": dk}

    return oracle(*(a.astype(F32) for a in _inputs(case)))


# Kernels compile on a GPU and run in Pallas's interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"


def _run(op, case, interpret, x, k, v):
    """Kernel `op` ("forward", "grad_x", "grad_k") of `case` on its operands (slot order)."""
    n, (ho, wo) = case.n, case.out
    options = dict(geom=case.geom, block_sizes=case.bs, interpret=interpret)
    if op == "forward":
        return pixel.forward(x, k, out_shape=(n, ho, wo, case.c), **options)
    if op == "grad_x":
        return pixel.grad_x(k, v, out_shape=(n, case.h, case.w, case.c), **options)
    return pixel.grad_k(x, v, out_shape=(n, ho, wo, *case.k, case.g), **options)


OPS = ["forward", "grad_x", "grad_k"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernels_match_oracle(op, case):
    out = _run(op, case, INTERPRET, *_inputs(case))
    assert out.dtype == case.dtype
    assert_close(out, _expected(case)[op], case.dtype)


def test_vmap():
    case = Case(2, 8, 7, 6, 2, 3, s=(2, 1), p=((1, 2), (0, 1)))
    xs, ks, vs = (jnp.stack(pair) for pair in zip(_inputs(case, 1), _inputs(case, 2), strict=True))
    for op in OPS:
        text = lower_for_cuda(jax.vmap(functools.partial(_run, op, case, False)), xs, ks, vs)
        assert triton_kernel_names(text) == [f"svconv_pixel_{op}"]
        got = jax.vmap(functools.partial(_run, op, case, INTERPRET))(xs, ks, vs)
        for i in range(2):
            y, vjp = jax.vjp(lambda a, b: _oracle_gather(a, b, case), xs[i], ks[i])
            want = {"forward": y, "grad_x": vjp(vs[i])[0], "grad_k": vjp(vs[i])[1]}[op]
            assert_close(got[i], want, F32)


def test_unsupported():
    geom = Geometry.of((5, 5), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    shapes = {"x": (1, 5, 5, 3), "k": (1, 5, 5, 3, 3, 1), "y": (1, 5, 5, 3)}
    for dtype in (F32, BF16, F16):
        assert pixel.unsupported_reason(geom, shapes, jnp.dtype(dtype)) is None
    assert "int32" in pixel.unsupported_reason(geom, shapes, jnp.dtype(jnp.int32))


LOWER_CASES = [
    Case(2, 32, 32, 64, 1, 3, p=1, dtype=BF16),
    Case(2, 32, 32, 64, 4, 7, s=2, p=3, dtype=BF16),
    Case(1, 64, 64, 3, 1, 15, p=7, dtype=F32),
    Case(1, 33, 31, 5, 5, 5, d=2, p=((4, 3), (2, 5)), dtype=F16),
    Case(2, 17, 16, 96, 3, 1, s=(2, 1), dtype=F32),
    Case(1, 20, 20, 256, 1, 3, s=2, d=2, p=2, dtype=BF16),
]


@pytest.mark.parametrize("case", LOWER_CASES + [c for c in CASES if c.bs], ids=repr)
def test_lowers_for_cuda(case):
    x, k, v = (
        jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.eval_shape(lambda: _inputs(case))
    )
    for op in OPS:
        text = lower_for_cuda(lambda x, k, v, op=op: _run(op, case, False, x, k, v), x, k, v)
        assert triton_kernel_names(text) == [f"svconv_pixel_{op}"]
