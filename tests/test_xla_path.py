"""The XLA kernels on every code path: unrolled and rolled tap loops, one block and many blocks
of rows (ragged last blocks), 16-bit and float64 inputs, against the reference's autodiff; and
rolled loops whose program does not grow with the window."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.geometry import KernelCall
from svconv import reference, xla
from tests.conftest import Case, assert_close, random_cases, rands

CASES = random_cases(seed=21, count=2, max_k=5) + [
    Case(2, 9, 8, 3, 4, (3, 3), (2, 1), (1, 2), ((-1, 2), (1, -2))),  # crops, strides, dilation
    Case(1, 11, 13, 4, 2, (4, 2), (1, 3), 2, ((3, 1), (0, 2))),
]
# (taps unrolled up to, block bytes): rolled loops, tiny blocks of rows (tests/test_ops.py and
# the rest of the suite run the default path).
PATHS = {"rolled": (1, None), "blocks": (None, 4096)}


@pytest.fixture(params=list(PATHS), ids=list(PATHS))
def path(request, monkeypatch):
    setting = PATHS[request.param]
    if setting is not None:
        taps, block = setting
        if taps is not None:
            monkeypatch.setattr(xla, "_UNROLLED_TAPS", taps)
            monkeypatch.setattr(xla, "_UNROLLED_FILTER_TAPS", taps)
        if block is not None:
            monkeypatch.setattr(xla, "_BLOCK_BYTES", block)
    return request.param


def _grads(f, args, ct):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(ct)


def _inputs(case, seed, dtype=jnp.float32):
    geom = case.geom()
    groups = max(g for g in (1, 2, 3) if case.cin % g == 0)
    shapes = {
        "x": (case.n, case.h, case.w, case.cin),
        "w": (*case.k, case.cin, case.cout),
        "d": (case.n, *geom.out_size, *case.k),
        "ds": (*geom.out_size, *case.k),
        "dy": (case.n, *geom.out_size, case.cout),
        "k": (case.n, *geom.out_size, *case.k, groups),
        "dyc": (case.n, *geom.out_size, case.cin),
        "wl": (*geom.out_size, *case.k, case.cin, case.cout),
    }
    return geom, dict(zip(shapes, rands(seed, *shapes.values(), dtype=dtype), strict=True))


def _pairs(a, geom, oracles):
    """``(label, XLA kernel's result, oracle's)`` for every XLA kernel on the arrays ``a``, the
    oracles' values and gradients from ``oracles = (modulated, pixel, local)`` on ``ref``, the
    same arrays in the oracles' dtype."""
    modulated, pixel, local = oracles
    (ref, a), pairs = a, []

    def add(name, kernels, labels, want):
        for label, (kernel, operands), expected in zip(labels, kernels, want, strict=True):
            got = kernel(*(a[n] for n in operands), KernelCall(geom, expected.shape))
            pairs.append((f"{name} {label}", got, expected))

    for dname in ("d", "ds"):
        y, (gx, gw, gd) = _grads(modulated, (ref["x"], ref["w"], ref[dname]), ref["dy"])
        kernels = [
            (xla.modulated_forward, ("x", "w", dname)),
            (xla.modulated_grad_x, ("w", dname, "dy")),
            (xla.modulated_grad_w, ("x", dname, "dy")),
        ]
        add(f"modulated {dname}", kernels, ("forward", "dx", "dw"), (y, gx, gw))
        got = xla.modulated_grad_d(a["x"], a["w"], a["dy"], KernelCall(geom, gd.shape))
        pairs.append((f"modulated {dname} dd", got, gd))
    y, (gx, gk) = _grads(pixel, (ref["x"], ref["k"]), ref["dyc"])
    kernels = [
        (xla.pixel_forward, ("x", "k")),
        (xla.pixel_grad_x, ("k", "dyc")),
        (xla.pixel_grad_k, ("x", "dyc")),
    ]
    add("pixel", kernels, ("forward", "dx", "dk"), (y, gx, gk))
    y, (gx, gw) = _grads(local, (ref["x"], ref["wl"]), ref["dy"])
    kernels = [
        (xla.local_forward, ("x", "wl")),
        (xla.local_grad_x, ("wl", "dy")),
        (xla.local_grad_w, ("x", "dy")),
    ]
    add("local", kernels, ("forward", "dx", "dw"), (y, gx, gw))
    return pairs


def _reference_oracles(geom):
    return (
        lambda x, w, d: reference.modulated_conv2d(x, w, d, geom),
        lambda x, k: reference.pixel_filter2d(x, k, geom),
        lambda x, w: reference.local_conv2d(x, w, geom),
    )


def _check_all(a, geom, dtype):
    """Every XLA kernel against the reference's forward and VJP (computed in float32)."""
    f32 = {k: v.astype(jnp.float32) for k, v in a.items()}
    for label, got, want in _pairs((f32, a), geom, _reference_oracles(geom)):
        assert got.dtype == dtype, label
        assert_close(got, want, dtype, None, label)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_kernel_on_every_path(case, path):
    del path  # applied by the fixture
    geom, a = _inputs(case, seed=22)
    _check_all(a, geom, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_16_bit_inputs_accumulate_in_float32(dtype, path):
    del path
    case = Case(2, 10, 9, 4, 3, (3, 3), 1, 1, "SAME")
    geom, a = _inputs(case, seed=23, dtype=dtype)
    _check_all(a, geom, dtype)


def _oracles64(geom):
    """The ops in float64 (the reference computes in float32), from the reference's taps."""
    taps = [(m, n) for m in range(geom.kernel_size[0]) for n in range(geom.kernel_size[1])]
    hi = jax.lax.Precision.HIGHEST

    def modulated(x, w, d):
        d = d if d.ndim == 5 else d[None]
        return sum(
            jnp.einsum(
                "bhwc,co->bhwo",
                reference.tap(x, geom, m, n) * d[..., m, n, None],
                w[m, n],
                precision=hi,
            )
            for m, n in taps
        )

    def pixel(x, k):
        k = jnp.repeat(k, x.shape[-1] // k.shape[-1], axis=-1)
        return sum(reference.tap(x, geom, m, n) * k[:, :, :, m, n] for m, n in taps)

    def local(x, w):
        return sum(
            jnp.einsum("bhwc,hwco->bhwo", reference.tap(x, geom, m, n), w[:, :, m, n], precision=hi)
            for m, n in taps
        )

    return modulated, pixel, local


def test_float64_stays_exact(path):
    del path
    case = Case(1, 8, 7, 3, 2, (3, 2), (2, 1), 1, ((1, 0), (2, 1)))
    with jax.enable_x64(True):
        geom, a = _inputs(case, seed=24)
        a = {k: v.astype(jnp.float64) for k, v in a.items()}
        for label, got, want in _pairs((a, a), geom, _oracles64(geom)):
            assert got.dtype == jnp.float64, label
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(want), rtol=0, atol=1e-12, err_msg=label
            )


def _program_size(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return len(jax.jit(fn).lower(*args).as_text())


@pytest.mark.parametrize("op", ["modulated", "local", "pixel"])
def test_rolled_loops_do_not_grow_with_the_window(op, monkeypatch):
    """Past the unrolling threshold the program is a loop: its size does not grow with the
    number of taps (the compile time neither)."""
    monkeypatch.setattr(xla, "_UNROLLED_TAPS", 1)
    monkeypatch.setattr(xla, "_UNROLLED_FILTER_TAPS", 1)
    sizes = []
    for k in (5, 11):
        case = Case(1, 16, 16, 2, 2, (k, k), 1, 1, "SAME")
        geom = case.geom()
        if op == "modulated":
            f = functools.partial(xla.modulated_forward, call=KernelCall(geom, (1, 16, 16, 2)))

            def fwd_bwd(x, w, d, dy, f=f, geom=geom):
                return (
                    f(x, w, d),
                    xla.modulated_grad_x(w, d, dy, KernelCall(geom, x.shape)),
                    xla.modulated_grad_w(x, d, dy, KernelCall(geom, w.shape)),
                    xla.modulated_grad_d(x, w, dy, KernelCall(geom, d.shape)),
                )

            shapes = [(1, 16, 16, 2), (k, k, 2, 2), (1, 16, 16, k, k), (1, 16, 16, 2)]
        elif op == "local":

            def fwd_bwd(x, w, dy, geom=geom):
                return (
                    xla.local_forward(x, w, KernelCall(geom, dy.shape)),
                    xla.local_grad_x(w, dy, KernelCall(geom, x.shape)),
                    xla.local_grad_w(x, dy, KernelCall(geom, w.shape)),
                )

            shapes = [(1, 16, 16, 2), (16, 16, k, k, 2, 2), (1, 16, 16, 2)]
        else:

            def fwd_bwd(x, kk, dy, geom=geom):
                return (
                    xla.pixel_forward(x, kk, KernelCall(geom, x.shape)),
                    xla.pixel_grad_x(kk, dy, KernelCall(geom, x.shape)),
                    xla.pixel_grad_k(x, dy, KernelCall(geom, kk.shape)),
                )

            shapes = [(1, 16, 16, 2), (1, 16, 16, k, k, 1), (1, 16, 16, 2)]
        sizes.append(_program_size(fwd_bwd, *shapes))
    # 25 -> 121 taps; each row of taps of the filter is unrolled (5 -> 11 per row).
    assert sizes[1] < 1.6 * sizes[0], sizes


def test_filter_gradient_tiles_are_exact_on_ragged_tiles():
    """Output sizes that are not multiples of the tile: the last tile of each row and the last
    row of tiles overlap the ones before."""
    case = Case(2, 13, 19, 6, 6, (3, 5), 1, (2, 1), "SAME")
    geom, a = _inputs(case, seed=25)
    k = a["k"]
    _, vjp = jax.vjp(lambda k: reference.pixel_filter2d(a["x"], k, geom), k)
    want = vjp(a["dyc"])[0]
    got = xla.pixel_grad_k(a["x"], a["dyc"], KernelCall(geom, k.shape))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
