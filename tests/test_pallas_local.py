"""Local-conv Pallas kernels: interpreter vs lax.conv_general_dilated_local; lowering for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.static.lowering import lower_for_cuda, triton_kernel_names
from pallas_kernels import local
from pallas_kernels.geometry import Geometry
from pallas_kernels.local import LocalBlockSizes
from tests.conftest import assert_close

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
HIGHEST = jax.lax.Precision.HIGHEST
OPS = ("forward", "grad_x", "grad_w")
# Kernels compile on a GPU and run in Pallas's interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(p):
    if isinstance(p, int):
        return ((p, p), (p, p))
    return tuple(_pair(a) for a in p)


class Case:
    def __init__(self, n, h, w, cin, cout, k, s=1, d=1, p=0, dtype=F32, bs=None):
        self.n, self.h, self.w, self.cin, self.cout = n, h, w, cin, cout
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
            f"N{self.n}-H{self.h}W{self.w}-C{self.cin}to{self.cout}-k{fmt(self.k)}-s{fmt(self.s)}"
            f"-d{fmt(self.d)}-p{p}-{jnp.dtype(self.dtype).name}{tiles}"
        )


CASES = [
    Case(2, 7, 6, 3, 5, 3, p=1),
    Case(1, 5, 6, 4, 3, 1, s=2),
    Case(2, 9, 8, 5, 4, 3, s=2, p=((1, 0), (0, 2))),
    Case(2, 9, 9, 3, 2, 5, s=(2, 1), d=2, p=((3, 2), (4, 1))),
    Case(1, 9, 8, 2, 3, 7, p=3),
    Case(2, 8, 7, 6, 5, 3, s=(1, 2), d=(2, 1), p=((2, 2), (0, 1)), dtype=BF16),
    Case(3, 7, 7, 3, 4, 5, s=2, p=2, dtype=F16),
    # Several batch, channel and K blocks per program.
    Case(
        18,
        5,
        4,
        20,
        18,
        3,
        s=(2, 1),
        d=(1, 2),
        p=((1, 1), (2, 0)),
        bs=LocalBlockSizes(block_batch=16, block_k=16, block_in=16, block_out=16),
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
        case.s,
        case.p,
        case.k,
        rhs_dilation=case.d,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )


def _loops(x, w, case):
    """Plain loops over taps on a zero-padded x: checks the oracle's weight layout."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = case.k, case.s, case.d, case.out
    xp = jnp.pad(x, ((0, 0), case.p[0], case.p[1], (0, 0)))
    y = 0.0
    for m in range(kh):
        for n in range(kw):
            rows = slice(m * dh, m * dh + (ho - 1) * sh + 1, sh)
            cols = slice(n * dw, n * dw + (wo - 1) * sw + 1, sw)
            y = y + jnp.einsum(
                "bijc,ijco->bijo", xp[:, rows, cols, :], w[:, :, m, n], precision=HIGHEST
            )
    return y


def _inputs(case, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    n, (ho, wo) = case.n, case.out
    x = jax.random.normal(keys[0], (n, case.h, case.w, case.cin), case.dtype)
    w = jax.random.normal(keys[1], (ho, wo, *case.k, case.cin, case.cout), case.dtype)
    dy = jax.random.normal(keys[2], (n, ho, wo, case.cout), case.dtype)
    return x, w, dy


@functools.cache
def _expected(case):
    """Oracle forward and its vjp in x and in w, from float32 copies of the inputs."""

    @jax.jit
    def oracle(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: _oracle(a, b, case), x, w)
        dx, dw = vjp(dy)
        return {"forward": y, "grad_x": dx, "grad_w": dw}

    return oracle(*(a.astype(F32) for a in _inputs(case)))


def _run(op, case, interpret, x, w, dy, precision=None):
    """Kernel `op` of `case` on its operands (slot order)."""
    n, (ho, wo) = case.n, case.out
    kwargs = dict(geom=case.geom, precision=precision, block_sizes=case.bs, interpret=interpret)
    if op == "forward":
        return local.forward(x, w, out_shape=(n, ho, wo, case.cout), **kwargs)
    if op == "grad_x":
        return local.grad_x(w, dy, out_shape=(n, case.h, case.w, case.cin), **kwargs)
    return local.grad_w(x, dy, out_shape=(ho, wo, *case.k, case.cin, case.cout), **kwargs)


def test_oracle_matches_tap_loops():
    case = Case(2, 8, 7, 3, 4, (3, 2), s=(2, 1), d=(1, 2), p=((1, 2), (0, 1)))
    x, w, _ = _inputs(case)
    np.testing.assert_allclose(_oracle(x, w, case), _loops(x, w, case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernels_match_oracle(op, case):
    out = _run(op, case, INTERPRET, *_inputs(case))
    assert out.dtype == case.dtype
    assert_close(out, _expected(case)[op], case.dtype)


def test_vmap():
    case = Case(2, 7, 6, 3, 4, 3, s=(1, 2), p=((1, 0), (1, 1)))
    xs, ws, dys = (jnp.stack(pair) for pair in zip(_inputs(case, 1), _inputs(case, 2), strict=True))
    for op in OPS:
        text = lower_for_cuda(jax.vmap(functools.partial(_run, op, case, False)), xs, ws, dys)
        assert triton_kernel_names(text) == [f"svconv_local_{op}"]
        got = jax.vmap(functools.partial(_run, op, case, INTERPRET))(xs, ws, dys)
        for i in range(2):
            y, vjp = jax.vjp(lambda a, b: _oracle(a, b, case), xs[i], ws[i])
            want = {"forward": y, "grad_x": vjp(dys[i])[0], "grad_w": vjp(dys[i])[1]}[op]
            assert_close(got[i], want, F32)


def test_precision_reaches_the_dot():
    case = Case(1, 5, 5, 3, 2, 3, p=1)
    x, w, _ = _inputs(case)
    texts = {
        precision: lower_for_cuda(
            functools.partial(_run, "forward", case, False, precision=precision), x, w, None
        )
        for precision in (jax.lax.Precision.DEFAULT, HIGHEST)
    }
    assert texts[jax.lax.Precision.DEFAULT] != texts[HIGHEST]  # TF32 vs IEEE float32 dots


def test_unsupported():
    geom = Geometry.of((5, 5), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    shapes = {"x": (1, 5, 5, 3), "w": (5, 5, 3, 3, 3, 4), "y": (1, 5, 5, 4)}
    for dtype in (F32, BF16, F16):
        assert local.unsupported_reason(geom, shapes, jnp.dtype(dtype)) is None
    assert "int32" in local.unsupported_reason(geom, shapes, jnp.dtype(jnp.int32))


LOWER_CASES = [
    Case(8, 16, 16, 64, 64, 3, p=1, dtype=BF16),
    Case(8, 16, 16, 64, 64, 3, p=1, dtype=F32),
    Case(2, 17, 15, 3, 5, 7, s=2, p=3, dtype=F16),
    Case(100, 12, 12, 32, 200, 5, d=2, p=((4, 3), (2, 5)), dtype=BF16),
    Case(4, 15, 16, 130, 7, 1, s=(2, 1), dtype=F32),
]


@pytest.mark.parametrize("case", LOWER_CASES + [c for c in CASES if c.bs], ids=repr)
def test_lowers_for_cuda(case):
    x, w, dy = (
        jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.eval_shape(lambda: _inputs(case))
    )
    for op in OPS:
        text = lower_for_cuda(lambda x, w, dy, op=op: _run(op, case, False, x, w, dy), x, w, dy)
        assert triton_kernel_names(text) == [f"svconv_local_{op}"]
