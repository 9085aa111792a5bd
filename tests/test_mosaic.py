"""The Mosaic GPU kernels (per-pixel filter and Gaussian filter: forward, splat, their fused
tangents, the gradients in the weights and in the scale; the modulated conv's forward, tangent
and gradients; the locally connected conv's forward, tangent and gradient in the weights) in
Pallas's GPU interpret mode, with race detection on and out-of-bounds reads
raising, against independent oracles at many geometries (borders, stride along the height,
dilation, asymmetric padding, groups, several row blocks, strips and channel blocks,
float32/bfloat16/float16); their support checks; the selection of backends by ``impl`` and by
device when lowering for CUDA (abstract H100 and A100); the ops with ``impl="mosaic"``.

GPU interpret mode simulates shared memory, barriers and the copy engine, but not the copy
engine's out-of-bounds fill: the kernels copy only inside the image (zeroing the rest), and the
border cases here check that. It also runs float32 wgmma exactly, where the GPU uses TF32.
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import svconv
from experiments.static.lowering import H100, lower
from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw
from pallas_kernels.mosaic_gpu import gaussian as mosaic_gaussian
from pallas_kernels.mosaic_gpu import local as mosaic_local
from pallas_kernels.mosaic_gpu import modulated as mosaic_modulated
from pallas_kernels.mosaic_gpu import pixel as mosaic_pixel
from svconv import _primitive, gaussian, reference, xla
from tests.conftest import assert_close, rands, tolerance

# On a GPU (make gpu-check) the kernels run compiled; elsewhere in GPU interpret mode, races
# detected, out-of-bounds reads raising, uninitialised shared memory read as NaN.
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = (
    False
    if ON_GPU
    else plgpu.InterpretGPUParams(
        detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan"
    )
)
A100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA A100-SXM4-80GB", platform="gpu", num_cores=108
)


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """After an exception inside GPU interpret mode its state must be reset."""
    yield
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    gpu_callbacks.reset_gpu_interpret_mode_state()


def _geom(h, w, k, stride=(1, 1), dilation=(1, 1), padding=None) -> Geometry:
    if padding is None:  # SAME
        padding = tuple(
            ((kk - 1) * d // 2, (kk - 1) * d - (kk - 1) * d // 2)
            for kk, d in zip(k, dilation, strict=True)
        )
    return Geometry.of((h, w), k, stride, dilation, padding)


# (id, N, H, W, C, G, window, stride, dilation, padding, tiles or None)
PIXEL_CASES = [
    ("3x3-same", 1, 5, 64, 8, 1, (3, 3), (1, 1), (1, 1), None, None),
    ("dilated-groups", 1, 6, 64, 16, 2, (3, 3), (1, 1), (2, 2), None, None),
    ("stride2-asym", 2, 7, 128, 8, 1, (5, 3), (2, 1), (1, 1), ((2, 1), (0, 2)), None),
    ("valid-wide", 1, 4, 70, 8, 1, (3, 7), (1, 1), (1, 1), ((0, 0), (0, 0)), None),
    # Rows of padding beyond the window above the image, a wider right padding.
    ("padded-beyond", 1, 3, 62, 8, 1, (3, 3), (1, 1), (1, 1), ((3, 2), (1, 3)), None),
    ("blocks", 2, 7, 128, 16, 2, (3, 3), (1, 1), (1, 1), None, sw.SweepTiles(2, 8)),
    ("1x1", 1, 3, 64, 16, 1, (1, 1), (1, 1), (1, 1), None, None),
]


def _pixel_inputs(case, dtype):
    _, n, h, w, c, g, k, stride, dil, pad, tiles = case
    geom = _geom(h, w, k, stride, dil, pad)
    ho, wo = geom.out_size
    x, kk, tx, tk = rands(70, (n, h, w, c), (n, ho, wo, *k, g), (n, h, w, c), (n, ho, wo, *k, g))
    call = KernelCall(geom=geom, out_shape=(n, ho, wo, c), block_sizes=tiles, interpret=INTERPRET)
    return geom, call, [a.astype(dtype) for a in (x, kk, tx, tk)]


@pytest.mark.parametrize("case", PIXEL_CASES, ids=[c[0] for c in PIXEL_CASES])
def test_pixel_forward_and_tangent(case):
    geom, call, (x, k, tx, tk) = _pixel_inputs(case, jnp.float32)
    shapes = {"x": x.shape, "k": k.shape, "y": call.out_shape}
    assert mosaic_pixel.unsupported_reason("y", geom, shapes, x.dtype, tangents=True) is None

    def oracle(x, k):
        return reference.pixel_filter2d(x, k, geom)

    assert_close(mosaic_pixel.forward(x, k, call), oracle(x, k), what="forward")
    want = jax.jvp(oracle, (x, k), (tx, tk))[1]
    assert_close(mosaic_pixel.forward_jvp(x, k, tx, tk, call), want, what="tangent of both")
    if case[0] == "3x3-same":  # one tangent at a time: one image or one weight operand
        want_x = jax.jvp(oracle, (x, k), (tx, jnp.zeros_like(k)))[1]
        assert_close(mosaic_pixel.forward_jvp(x, k, tx, None, call), want_x, what="tangent in x")
        want_k = jax.jvp(oracle, (x, k), (jnp.zeros_like(x), tk))[1]
        assert_close(mosaic_pixel.forward_jvp(x, k, None, tk, call), want_k, what="tangent in k")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_pixel_forward_16_bit(dtype):
    geom, call, (x, k, _, _) = _pixel_inputs(PIXEL_CASES[1], dtype)
    want = reference.pixel_filter2d(x.astype(jnp.float32), k.astype(jnp.float32), geom)
    got = mosaic_pixel.forward(x, k, call)
    assert got.dtype == dtype
    assert_close(got, want, dtype=dtype, terms=9, what=jnp.dtype(dtype).name)


# Stride 1 (the splats' sweep): (id, N, H, W, C, G, window, dilation, padding, tiles or None)
SPLAT_CASES = [
    ("3x3-same", 1, 5, 64, 8, 1, (3, 3), (1, 1), None, None),
    ("dilated-groups", 1, 6, 128, 16, 2, (3, 5), (2, 1), None, None),
    # Asymmetric padding: the mirrored window reaches only left of the strip.
    ("asym", 1, 5, 128, 8, 1, (5, 3), (1, 1), ((2, 1), (0, 2)), None),
    ("wide-left", 1, 4, 128, 8, 1, (3, 7), (1, 2), ((1, 1), (9, 3)), None),
    # Two channel blocks of one group (grad_k: partial sums), row blocks.
    ("blocks", 2, 5, 128, 16, 1, (3, 3), (1, 1), None, sw.SweepTiles(2, 8)),
    ("1x1", 1, 3, 64, 16, 1, (1, 1), (1, 1), None, None),
]


def _splat_inputs(case, dtype):
    _, n, h, w, c, g, k, dil, pad, tiles = case
    geom = _geom(h, w, k, (1, 1), dil, pad)
    ho, wo = geom.out_size
    kshape = (n, ho, wo, *k, g)
    x, kk, dy, tk, tdy = rands(73, (n, h, w, c), kshape, (n, ho, wo, c), kshape, (n, ho, wo, c))
    return geom, tiles, [a.astype(dtype) for a in (x, kk, dy, tk, tdy)]


@pytest.mark.parametrize("case", SPLAT_CASES, ids=[c[0] for c in SPLAT_CASES])
def test_pixel_splat_its_tangent_and_grad_k(case):
    """The splat (the gradient in x) and its fused tangent, the gradient in k, against the
    reference's reverse mode."""
    geom, tiles, (x, k, dy, tk, tdy) = _splat_inputs(case, jnp.float32)
    shapes = {"x": x.shape, "k": k.shape, "y": dy.shape}
    for partial in ("x", "k"):
        reason = mosaic_pixel.unsupported_reason(partial, geom, shapes, x.dtype, tangents=True)
        assert reason is None, (partial, reason)

    def oracle(x, k):
        return reference.pixel_filter2d(x, k, geom)

    _, vjp = jax.vjp(oracle, x, k)
    want_x, want_k = vjp(dy)
    call_x = KernelCall(geom, x.shape, block_sizes=tiles, interpret=INTERPRET)
    assert_close(mosaic_pixel.grad_x(k, dy, call_x), want_x, what="splat")
    call_k = KernelCall(geom, k.shape, block_sizes=tiles, interpret=INTERPRET)
    assert_close(mosaic_pixel.grad_k(x, dy, call_k), want_k, what="grad_k")
    want = vjp(tdy)[0] + jax.vjp(oracle, x, tk)[1](dy)[0]
    got = mosaic_pixel.grad_x_jvp(k, dy, tk, tdy, call_x)
    assert_close(got, want, what="splat's tangent")
    if case[0] == "3x3-same":  # one tangent at a time
        assert_close(mosaic_pixel.grad_x_jvp(k, dy, None, tdy, call_x), vjp(tdy)[0], what="in dy")
        want = jax.vjp(oracle, x, tk)[1](dy)[0]
        assert_close(mosaic_pixel.grad_x_jvp(k, dy, tk, None, call_x), want, what="in k")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_pixel_splat_and_grad_k_16_bit(dtype):
    geom, tiles, (x, k, dy, _, _) = _splat_inputs(SPLAT_CASES[1], dtype)
    f32 = [a.astype(jnp.float32) for a in (x, k, dy)]
    _, vjp = jax.vjp(lambda x, k: reference.pixel_filter2d(x, k, geom), *f32[:2])
    want_x, want_k = vjp(f32[2])
    got = mosaic_pixel.grad_x(k, dy, KernelCall(geom, x.shape, interpret=INTERPRET))
    assert got.dtype == dtype
    assert_close(got, want_x, dtype=dtype, terms=15, what="splat")
    got = mosaic_pixel.grad_k(x, dy, KernelCall(geom, k.shape, interpret=INTERPRET))
    assert got.dtype == dtype
    assert_close(got, want_k, dtype=dtype, terms=8, what="grad_k")


GAUSSIAN_GEOMS = {
    "5x5": _geom(6, 64, (5, 5)),
    "7x3-stride2-dilated": _geom(9, 64, (7, 3), (2, 1), (1, 2), ((2, 3), (1, 3))),
}


def _gaussian_inputs(geom: Geometry, parts: int, c: int = 16, n: int = 1):
    (h, w), (ho, wo) = geom.in_size, geom.out_size
    x, dy, tx, s, ts, a, b, r = rands(
        71, (n, h, w, c), (n, ho, wo, c), (n, h, w, c), *[(n, ho, wo)] * 5
    )
    sigma = (0.5 + jnp.abs(a), 0.5 + jnp.abs(b))
    if parts == 1:
        eta = gaussian.parameters(sigma[0])
    elif parts == 2:
        eta = gaussian.parameters(sigma)
    else:
        eta = gaussian.parameters(sigma, jnp.tanh(r) * 0.8)
    zeta = gaussian.log_normalizer(eta, geom.kernel_size)
    return x, dy, tx, s, ts, eta, zeta


@pytest.mark.parametrize(
    ("geom_id", "parts"),
    [("5x5", 1), ("5x5", 2), ("7x3-stride2-dilated", 3)],
    ids=["5x5-isotropic", "5x5-axes", "strided-rotated"],
)
def test_gaussian_forward_tangent_and_grad_s(geom_id, parts):
    """Against the XLA path's kernels (tested against the explicit weights elsewhere): with and
    without the scale, with a moment (a derivative in the parameters), and the fused tangent
    of the image, the scale and the parameters at once."""
    geom = GAUSSIAN_GEOMS[geom_id]
    x, dy, tx, s, ts, eta, zeta = _gaussian_inputs(geom, parts)
    n, ho, wo, c = dy.shape
    for moments in ((0,) * parts, (1,) + (0,) * (parts - 1)):
        call = KernelCall(geom=geom, out_shape=dy.shape, moments=moments, interpret=INTERPRET)
        plain = KernelCall(geom=geom, out_shape=dy.shape, moments=moments)
        for scale in (s, None):
            want = xla.gaussian_forward(x, scale, eta, zeta, plain)
            got = mosaic_gaussian.forward(x, scale, eta, zeta, call)
            assert_close(got, want, what=f"forward, moments {moments}")
        # The second time in two channel blocks (their partial sums added) and row blocks.
        tiles = None if moments[0] == 0 else sw.SweepTiles(2, 8)
        ds_call = KernelCall(
            geom, (n, ho, wo), moments=moments, block_sizes=tiles, interpret=INTERPRET
        )
        want = xla.gaussian_grad_s(x, dy, eta, zeta, KernelCall(geom, (n, ho, wo), moments=moments))
        assert_close(mosaic_gaussian.grad_s(x, dy, eta, zeta, ds_call), want, what="grad_s")
    moments = (0,) * parts
    call = KernelCall(geom=geom, out_shape=dy.shape, moments=moments, interpret=INTERPRET)

    def f(x, s, eta, zeta):
        return xla.gaussian_forward(x, s, eta, zeta, KernelCall(geom, dy.shape, moments=moments))

    tangents = (tx, ts, 0.1 * eta, 0.1 * zeta)
    want = jax.jvp(f, (x, s, eta, zeta), tangents)[1]
    got = mosaic_gaussian.forward_jvp(x, s, eta, zeta, *tangents, call)
    assert_close(got, want, what="tangent of everything")
    want = jax.jvp(lambda e: f(x, None, e, zeta), (eta,), (0.1 * eta,))[1]
    got = mosaic_gaussian.forward_jvp(x, None, eta, zeta, None, None, 0.1 * eta, None, call)
    assert_close(got, want, what="tangent in eta alone")


# (id, N, H, W, Cin, Cout, window, stride, dilation, padding, shared d, tiles or None)
MODULATED_CASES = [
    ("3x3", 1, 4, 64, 64, 32, (3, 3), (1, 1), (1, 1), None, False, None),
    # Two channel blocks, row blocks, a batch-shared modulation, stride, dilation, padding.
    ("blocks-shared-strided", 2, 7, 128, 16, 32, (3, 5), (2, 1), (1, 2), ((1, 2), (3, 5)),
     True, mosaic_modulated.GemmTiles(2, 16)),
    # Several wgmma steps along the input channels (128 16-bit / float32 channels a step).
    ("wide-cin", 1, 3, 64, 128, 16, (1, 3), (1, 1), (1, 1), None, False, None),
]  # fmt: skip


def _modulated_inputs(case, dtype):
    _, n, h, w, cin, cout, k, stride, dil, pad, shared, tiles = case
    geom = _geom(h, w, k, stride, dil, pad)
    ho, wo = geom.out_size
    dshape = (ho, wo, *k) if shared else (n, ho, wo, *k)
    arrays = rands(75, (n, h, w, cin), (*k, cin, cout), dshape, (n, h, w, cin), (*k, cin, cout),
                   dshape)  # fmt: skip
    call = KernelCall(geom, (n, ho, wo, cout), block_sizes=tiles, interpret=INTERPRET)
    return geom, call, [a.astype(dtype) for a in arrays]


def _tf32_tolerance(dtype, terms):
    """float32 runs as TF32 on the GPU (10 mantissa bits, like float16); interpret mode computes
    the products exactly."""
    return tolerance(jnp.float16 if dtype == jnp.float32 and ON_GPU else dtype, terms)


def _with_dtypes(cases):
    """Each case in float32 and bfloat16, but the blocks cases (the tiling's index arithmetic,
    the same in both) in bfloat16 only."""
    return [
        pytest.param(c, dt, id=f"{c[0]}-{name}")
        for c in cases
        for dt, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"))
        if not (c[0].startswith("blocks") and dt == jnp.float32)
    ]


@pytest.mark.parametrize(("case", "dtype"), _with_dtypes(MODULATED_CASES))
def test_modulated_forward_and_tangent(case, dtype):
    """The implicit GEMM and its fused tangent against the reference (float32 inputs rounded
    to ``dtype``): every tangent, and (at 3x3) each one alone."""
    geom, call, (x, w, d, tx, tw, td) = _modulated_inputs(case, dtype)
    shapes = {"x": x.shape, "w": w.shape, "d": d.shape, "y": call.out_shape}
    default = jax.lax.Precision.DEFAULT  # (the suite's default is HIGHEST: exact oracles)
    reason = mosaic_modulated.unsupported_reason(
        "y", geom, shapes, dtype, tangents=True, precision=default
    )
    assert reason is None, reason
    f32 = [a.astype(jnp.float32) for a in (x, w, d, tx, tw, td)]
    terms = geom.num_taps * x.shape[3]
    tol = _tf32_tolerance(dtype, terms)

    def oracle(x, w, d):
        return reference.modulated_conv2d(x, w, d, geom)

    got = mosaic_modulated.forward(x, w, d, call)
    assert got.dtype == dtype
    assert_close(got, oracle(*f32[:3]), tol=tol, what="forward")
    tangents = dict(zip(("tx", "tw", "td"), (tx, tw, td), strict=True))
    alone = (("tx",), ("tw",), ("td",)) if case[0] == "3x3" else ()  # each tangent alone once
    for given in (("tx", "tw", "td"), *alone):
        t32 = [f32[3 + i] if k in given else jnp.zeros_like(f32[i])
               for i, k in enumerate(("tx", "tw", "td"))]  # fmt: skip
        want = jax.jvp(oracle, tuple(f32[:3]), tuple(t32))[1]
        args = [tangents[k] if k in given else None for k in ("tx", "tw", "td")]
        got = mosaic_modulated.forward_jvp(x, w, d, *args, call)
        assert_close(got, want, tol=2 * tol, what=f"tangent in {given}")


GRAD_X_CASES = [
    MODULATED_CASES[0],
    # A batch-shared modulation, dilation, asymmetric padding, two channel blocks, row blocks.
    ("blocks-shared-dilated", 2, 6, 128, 32, 16, (3, 5), (1, 1), (2, 1), ((2, 2), (1, 3)),
     True, mosaic_modulated.GemmTiles(2, 16)),
    MODULATED_CASES[2],
]  # fmt: skip


@pytest.mark.parametrize(("case", "dtype"), _with_dtypes(GRAD_X_CASES))
def test_modulated_grad_x(case, dtype):
    """The gradient in the image (the mirrored window's implicit GEMM) against the reference's
    reverse mode."""
    geom, call, (x, w, d, _, _, _) = _modulated_inputs(case, dtype)
    dy = rands(77, call.out_shape)[0].astype(dtype)
    shapes = {"x": x.shape, "w": w.shape, "d": d.shape, "y": call.out_shape}
    reason = mosaic_modulated.unsupported_reason(
        "x", geom, shapes, dtype, tangents=False, precision=jax.lax.Precision.DEFAULT
    )
    assert reason is None, reason
    f32 = [a.astype(jnp.float32) for a in (x, w, d, dy)]
    _, vjp = jax.vjp(lambda x: reference.modulated_conv2d(x, *f32[1:3], geom), f32[0])
    call_x = KernelCall(geom, x.shape, block_sizes=call.block_sizes, interpret=INTERPRET)
    got = mosaic_modulated.grad_x(w, d, dy, call_x)
    assert got.dtype == dtype
    tol = _tf32_tolerance(dtype, geom.num_taps * w.shape[3])
    assert_close(got, vjp(f32[3])[0], tol=tol, what="grad_x")


@pytest.mark.parametrize(("case", "dtype"), _with_dtypes(MODULATED_CASES))
def test_modulated_grad_d(case, dtype):
    """The gradient in the modulation (per image, and summed over the images for a shared
    one; partial sums of two output-channel blocks) against the reference's reverse mode."""
    geom, call, (x, w, d, _, _, _) = _modulated_inputs(case, dtype)
    dy = rands(78, call.out_shape)[0].astype(dtype)
    shapes = {"x": x.shape, "w": w.shape, "d": d.shape, "y": call.out_shape}
    reason = mosaic_modulated.unsupported_reason(
        "d", geom, shapes, dtype, tangents=False, precision=jax.lax.Precision.DEFAULT
    )
    assert reason is None, reason
    f32 = [a.astype(jnp.float32) for a in (x, w, d, dy)]
    _, vjp = jax.vjp(lambda d: reference.modulated_conv2d(f32[0], f32[1], d, geom), f32[2])
    call_d = KernelCall(geom, d.shape, block_sizes=call.block_sizes, interpret=INTERPRET)
    got = mosaic_modulated.grad_d(x, w, dy, call_d)
    assert got.dtype == dtype
    terms = w.shape[2] * w.shape[3] * (x.shape[0] if d.ndim == 4 else 1)
    assert_close(got, vjp(f32[3])[0], tol=_tf32_tolerance(dtype, terms), what="grad_d")


GRAD_W_CASES = [
    ("3x3", 2, 5, 64, 64, 64, (3, 3), (1, 1), (1, 1), None, False, None),
    # Two input-channel chunks and two output-channel blocks, two tap groups (the last one
    # short), row blocks (the last one ragged), a batch-shared modulation, row stride,
    # dilation, asymmetric padding.
    ("blocks-shared-strided", 2, 7, 128, 128, 128, (3, 5), (2, 1), (2, 1), ((1, 2), (3, 1)),
     True, mosaic_modulated.GemmTiles(2, 64)),
]  # fmt: skip


@pytest.mark.parametrize("case", GRAD_W_CASES, ids=[c[0] for c in GRAD_W_CASES])
def test_modulated_grad_w(case):
    """The gradient in the weights (16-bit; per-program float32 partial sums, a tap group's
    accumulators) against the reference's reverse mode."""
    dtype = jnp.bfloat16
    geom, call, (x, w, d, _, _, _) = _modulated_inputs(case, dtype)
    dy = rands(79, call.out_shape)[0].astype(dtype)
    shapes = {"x": x.shape, "w": w.shape, "d": d.shape, "y": call.out_shape}
    reason = mosaic_modulated.unsupported_reason(
        "w", geom, shapes, dtype, tangents=False, precision=jax.lax.Precision.DEFAULT
    )
    assert reason is None, reason
    if case[-1] is not None:  # the taps fall in groups, the last one short
        groups, per_group = mosaic_modulated.tap_groups(geom.num_taps, case[-1].block_n)
        assert groups > 1 and groups * per_group > geom.num_taps
    f32 = [a.astype(jnp.float32) for a in (x, w, d, dy)]
    _, vjp = jax.vjp(lambda w: reference.modulated_conv2d(f32[0], w, f32[2], geom), f32[1])
    call_w = KernelCall(geom, w.shape, block_sizes=call.block_sizes, interpret=INTERPRET)
    got = mosaic_modulated.grad_w(x, d, dy, call_w)
    assert got.dtype == dtype
    terms = x.shape[0] * call.out_shape[1] * call.out_shape[2]
    assert_close(got, vjp(f32[3])[0], tol=tolerance(dtype, terms), what="grad_w")


# (id, N, H, W, Cin, Cout, window, stride, dilation, padding, dtype, tiles or None)
LOCAL_CASES = [
    ("3x3", 2, 3, 64, 8, 16, (3, 3), (1, 1), (1, 1), None, jnp.float32, None),
    # Two image blocks and two output-channel blocks, two input channels a stage, three
    # stages (the ring wraps), row stride, dilation, asymmetric and negative padding.
    ("blocks-strided", 4, 7, 128, 4, 16, (3, 2), (2, 1), (1, 3), ((2, -1), (2, 1)),
     jnp.float32, mosaic_local.LocalTiles(2, 8, 2, 3)),
    ("bf16", 3, 2, 64, 6, 8, (1, 3), (1, 1), (1, 1), None, jnp.bfloat16, None),
]  # fmt: skip


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_local_forward(case):
    """The locally connected forward (the weights streamed through the stages, the images of
    a block sharing them) and its fused tangent (both weight arrays streamed; each tangent
    alone in the first case) against the reference."""
    _, n, h, w, cin, cout, k, stride, dil, pad, dtype, tiles = case
    geom = _geom(h, w, k, stride, dil, pad)
    ho, wo = geom.out_size
    arrays = rands(80, *[(n, h, w, cin), (ho, wo, *k, cin, cout)] * 2)
    x, wt, tx, tw = (a.astype(dtype) for a in arrays)
    shapes = {"x": x.shape, "w": wt.shape, "y": (n, ho, wo, cout)}
    assert mosaic_local.unsupported_reason("y", geom, shapes, dtype, tangents=True) is None
    call = KernelCall(geom, (n, ho, wo, cout), block_sizes=tiles, interpret=INTERPRET)
    got = mosaic_local.forward(x, wt, call)
    assert got.dtype == dtype
    f32 = [a.astype(jnp.float32) for a in (x, wt, tx, tw)]

    def oracle(x, w):
        return reference.local_conv2d(x, w, geom)

    tol = tolerance(dtype, geom.num_taps * cin)
    assert_close(got, oracle(*f32[:2]), tol=tol, what="forward")
    for given in ("tx", "tw"), *((("tx",), ("tw",)) if case[0] == "3x3" else ()):
        t32 = [f32[2 + i] if name in given else jnp.zeros_like(f32[i])
               for i, name in enumerate(("tx", "tw"))]  # fmt: skip
        want = jax.jvp(oracle, tuple(f32[:2]), tuple(t32))[1]
        args = [a if name in given else None for a, name in ((tx, "tx"), (tw, "tw"))]
        got = mosaic_local.forward_jvp(x, wt, *args, call)
        assert got.dtype == dtype
        assert_close(got, want, tol=2 * tol, what=f"tangent in {given}")


# (id, N, H, W, Cin, Cout, window, stride, dilation, padding, dtype, tiles or None)
LOCAL_GRAD_W_CASES = [
    LOCAL_CASES[0],
    # Two image blocks (float32 partial sums), two output-channel blocks, three staging
    # buffers (the ring wraps), row stride, dilation, negative padding.
    ("blocks-strided", 4, 7, 128, 3, 16, (3, 2), (2, 1), (1, 3), ((2, -1), (2, 1)),
     jnp.float32, mosaic_local.LocalTiles(2, 8, 1, 3)),
    LOCAL_CASES[2],
]  # fmt: skip


@pytest.mark.parametrize("case", LOCAL_GRAD_W_CASES, ids=[c[0] for c in LOCAL_GRAD_W_CASES])
def test_local_grad_w(case):
    """The gradient in the per-location weights (each image block's ``dw`` tiles through the
    staging ring) against the reference's reverse mode."""
    _, n, h, w, cin, cout, k, stride, dil, pad, dtype, tiles = case
    geom = _geom(h, w, k, stride, dil, pad)
    ho, wo = geom.out_size
    x, wt, dy = (
        a.astype(dtype)
        for a in rands(82, (n, h, w, cin), (ho, wo, *k, cin, cout), (n, ho, wo, cout))
    )
    shapes = {"x": x.shape, "w": wt.shape, "y": dy.shape}
    assert mosaic_local.unsupported_reason("w", geom, shapes, dtype, tangents=False) is None
    f32 = [a.astype(jnp.float32) for a in (x, wt, dy)]
    _, vjp = jax.vjp(lambda w: reference.local_conv2d(f32[0], w, geom), f32[1])
    call = KernelCall(geom, wt.shape, block_sizes=tiles, interpret=INTERPRET)
    got = mosaic_local.grad_w(x, dy, call)
    assert got.dtype == dtype
    assert_close(got, vjp(f32[2])[0], tol=tolerance(dtype, n), what="grad_w")


MODULATED_REFUSED = [
    ("exact float32", jnp.float32, 64, 32, jax.lax.Precision.HIGHEST, "exact float32"),
    ("ragged channels", jnp.bfloat16, 24, 32, None, "multiple of 16"),
    ("output channels", jnp.bfloat16, 32, 24, None, "24 output channels"),
    ("float64", jnp.float64, 32, 32, None, "float64"),
    (
        "weight gradient in float32",
        jnp.float32,
        64,
        64,
        jax.lax.Precision.DEFAULT,
        "16-bit types only",
        "w",
    ),
    ("weight gradient of 32 channels", jnp.bfloat16, 32, 64, None, "multiples of 64", "w"),
]


@pytest.mark.parametrize("case", MODULATED_REFUSED, ids=[c[0] for c in MODULATED_REFUSED])
def test_modulated_support_check_refuses_with_a_reason(case):
    _, dtype, cin, cout, precision, words, *partial = case
    geom = _geom(8, 64, (3, 3))
    shapes = {"x": (1, 8, 64, cin), "w": (3, 3, cin, cout), "d": (1, 8, 64, 3, 3),
              "y": (1, 8, 64, cout)}  # fmt: skip
    reason = mosaic_modulated.unsupported_reason(
        partial[0] if partial else "y", geom, shapes, jnp.dtype(dtype), tangents=False,
        precision=precision,
    )  # fmt: skip
    assert reason is not None and words in reason, reason


SPLAT_GEOMS = {
    "5x5": _geom(6, 64, (5, 5)),
    "3x7-dilated-asym": _geom(5, 128, (3, 7), (1, 1), (2, 1), ((1, 3), (2, 4))),
}


@pytest.mark.parametrize(
    ("geom_id", "parts"), [("5x5", 1), ("3x7-dilated-asym", 3)], ids=["5x5-isotropic", "rotated"]
)
def test_gaussian_splat_and_its_tangent(geom_id, parts):
    """The Gaussian splat against the XLA path's kernels: isotropic with and without the
    scale, and its fused tangent in everything and in eta alone; rotated with a moment, and
    its tangent in everything."""
    geom = SPLAT_GEOMS[geom_id]
    x, dy, tx, s, ts, eta, zeta = _gaussian_inputs(geom, parts)
    shapes = {"x": x.shape, "s": s.shape, "y": dy.shape}
    assert mosaic_gaussian.unsupported_reason("x", geom, shapes, x.dtype, tangents=True) is None
    rotated = parts > 1
    moments = (1,) + (0,) * (parts - 1) if rotated else (0,)
    call = KernelCall(geom, x.shape, moments=moments, interpret=INTERPRET)
    plain = KernelCall(geom, x.shape, moments=moments)
    for scale in (s,) if rotated else (s, None):
        want = xla.gaussian_grad_x(scale, dy, eta, zeta, plain)
        got = mosaic_gaussian.grad_x(scale, dy, eta, zeta, call)
        assert_close(got, want, what=f"splat, moments {moments}")
    moments = (0,) * parts
    call = KernelCall(geom, x.shape, moments=moments, interpret=INTERPRET)

    def f(s, dy, eta, zeta):
        return xla.gaussian_grad_x(s, dy, eta, zeta, KernelCall(geom, x.shape, moments=moments))

    tangents = (ts, 0.3 * dy + 0.1, 0.1 * eta, 0.1 * zeta)
    want = jax.jvp(f, (s, dy, eta, zeta), tangents)[1]
    got = mosaic_gaussian.grad_x_jvp(s, dy, eta, zeta, *tangents, call)
    assert_close(got, want, what="tangent of everything")
    if not rotated:
        want = jax.jvp(lambda e: f(None, dy, e, zeta), (eta,), (0.1 * eta,))[1]
        got = mosaic_gaussian.grad_x_jvp(None, dy, eta, zeta, None, None, 0.1 * eta, None, call)
        assert_close(got, want, what="tangent in eta alone")


# (what, shapes, geometry, dtype, reason's words)
REFUSED = [
    ("column stride", _geom(8, 128, (3, 3), (1, 2)), 8, 1, jnp.float32, "column stride 2"),
    ("ragged width", _geom(8, 60, (3, 3)), 8, 1, jnp.float32, "not a multiple of 64"),
    ("3 channels", _geom(8, 64, (3, 3)), 3, 1, jnp.float32, "multiple of 8"),
    ("per-channel filters", _geom(8, 64, (3, 3)), 16, 16, jnp.float32, "multiple of 8"),
    ("float64", _geom(8, 64, (3, 3)), 8, 1, jnp.float64, "float64"),
    (
        "negative padding",
        _geom(8, 66, (3, 3), padding=((0, 0), (-1, 1))),
        8,
        1,
        jnp.float32,
        "negative",
    ),
    ("wide halo", _geom(8, 64, (3, 200)), 8, 1, jnp.float32, "TMA boxes"),
    ("tall window", _geom(8, 64, (33, 3)), 8, 1, jnp.float32, "barriers"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_support_check_refuses_with_a_reason(case):
    _, geom, c, g, dtype, words = case
    (ho, wo), (kh, kw) = geom.out_size, geom.kernel_size
    shapes = {"x": (1, *geom.in_size, c), "k": (1, ho, wo, kh, kw, g), "y": (1, ho, wo, c)}
    reason = mosaic_pixel.unsupported_reason("y", geom, shapes, jnp.dtype(dtype), tangents=False)
    assert reason is not None and words in reason, reason


SPLAT_REFUSED = [
    ("row stride", _geom(8, 64, (3, 3), (2, 1)), "stride (2, 1)"),
    ("ragged source", _geom(8, 128, (3, 5), padding=((1, 1), (0, 0))), "source width 124"),
    ("far right", _geom(8, 128, (3, 3), padding=((1, 1), (66, 0))), "66 columns"),
    ("negative", _geom(8, 128, (3, 3), padding=((1, 1), (-1, 3))), "negative"),
]


@pytest.mark.parametrize("case", SPLAT_REFUSED, ids=[c[0] for c in SPLAT_REFUSED])
def test_splat_support_check_refuses_with_a_reason(case):
    _, geom, words = case
    (ho, wo), (kh, kw) = geom.out_size, geom.kernel_size
    shapes = {"x": (1, *geom.in_size, 8), "k": (1, ho, wo, kh, kw, 1), "y": (1, ho, wo, 8)}
    reason = mosaic_pixel.unsupported_reason("x", geom, shapes, jnp.float32, tangents=False)
    assert reason is not None and words in reason, reason
    shapes = {"x": shapes["x"], "s": (1, ho, wo), "y": shapes["y"]}
    reason = mosaic_gaussian.unsupported_reason("x", geom, shapes, jnp.float32, tangents=True)
    assert reason is not None and words in reason, reason


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)", text))


def _lower_under(device, fn, *args) -> str:
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _grad(fn):
    return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1))


def test_impl_selects_backends_when_lowering_for_each_gpu(caplog):
    """impl="mosaic" on an H100: the forward and both gradients are Mosaic GPU kernels; with a
    row stride, the splat (stride 1 only) is the Triton kernel, the reason said at debug level;
    on an A100 (compute capability 8.0) Triton throughout, with the reason; impl="pallas" and
    None: Triton (the Mosaic kernels are the default on no device yet); impl="triton": Triton."""
    x = jax.ShapeDtypeStruct((2, 8, 64, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((2, 8, 64, 3, 3), jnp.float32)
    k_strided = jax.ShapeDtypeStruct((2, 4, 64, 3, 3), jnp.float32)
    op = functools.partial(svconv.pixel_filter2d)
    text = _lower_under(H100, _grad(functools.partial(op, impl="mosaic")), x, k)
    assert _custom_calls(text) == {"mosaic_gpu_v2"}
    strided = functools.partial(op, stride=(2, 1), impl="mosaic")
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        text = _lower_under(H100, _grad(strided), x, k_strided)
    assert _custom_calls(text) == {"mosaic_gpu_v2", "__gpu$xla.gpu.triton"}
    assert "not mosaic: stride (2, 1) (the Mosaic splats take stride 1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        text = _lower_under(A100, functools.partial(op, impl="mosaic"), x, k)
    assert _custom_calls(text) == {"__gpu$xla.gpu.triton"}
    assert "compute capability 8.0 is below the Mosaic kernels' 9.0" in caplog.text
    for impl in (None, "pallas", "triton"):
        for device in (H100, A100):
            text = _lower_under(device, _grad(functools.partial(op, impl=impl)), x, k)
            assert _custom_calls(text) == {"__gpu$xla.gpu.triton"}, (impl, device.device_kind)


def test_gaussian_mosaic_lowers_for_cuda():
    """The Gaussian filter's forward, fused tangent and gradients (the splat in the image, the
    gradient in sigma), and the splat's own tangent (forward mode of the gradient) are Mosaic
    GPU kernels on an H100."""
    x = jax.ShapeDtypeStruct((1, 8, 64, 16), jnp.bfloat16)
    sig = jax.ShapeDtypeStruct((1, 8, 64), jnp.float32)

    def op(x, sigma):
        return svconv.gaussian_filter2d(x, sigma, 7, impl="mosaic")

    grad = jax.grad(lambda x, s: jnp.sum(op(x, s).astype(jnp.float32)), (0, 1))
    assert _custom_calls(lower(grad, x, sig).as_text()) == {"mosaic_gpu_v2"}
    jvp = lower(lambda x, s: jax.jvp(op, (x, s), (x, s)), x, sig).as_text()
    assert _custom_calls(jvp) == {"mosaic_gpu_v2"}
    # Forward over reverse: the tangent of the splat is its fused Mosaic kernel.
    hvp = lower(lambda x, s: jax.jvp(lambda x: grad(x, s)[0], (x,), (x,)), x, sig).as_text()
    assert _custom_calls(hvp) == {"mosaic_gpu_v2"}


def test_modulated_mosaic_lowers_for_cuda(caplog):
    """impl="mosaic" on an H100: the modulated conv's forward, forward mode and gradients in
    the image and the modulation are Mosaic GPU kernels (TF32 for float32 at the default
    precision), its float32 gradient in the weights the Triton kernel, its bfloat16 one a
    Mosaic kernel; at precision HIGHEST (exact float32) the forward is the Triton kernel, the
    reasons said at debug level."""
    x = jax.ShapeDtypeStruct((2, 8, 64, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    d = jax.ShapeDtypeStruct((2, 8, 64, 3, 3), jnp.float32)

    def op(precision):
        return functools.partial(svconv.modulated_conv2d, precision=precision, impl="mosaic")

    default = op(jax.lax.Precision.DEFAULT)
    assert _custom_calls(_lower_under(H100, default, x, w, d)) == {"mosaic_gpu_v2"}

    def jvp(x, w, d):
        return jax.jvp(default, (x, w, d), (x, w, d))

    assert _custom_calls(_lower_under(H100, jvp, x, w, d)) == {"mosaic_gpu_v2"}
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        text = _lower_under(H100, _grad(default), x, w, d)
    assert _custom_calls(text) == {"mosaic_gpu_v2", "__gpu$xla.gpu.triton"}
    assert "float32 weight gradient" in caplog.text
    assert "no mosaic kernel for the partial" not in caplog.text
    shapes = ((2, 8, 64, 64), (3, 3, 64, 64), d.shape)
    bf16 = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    assert _custom_calls(_lower_under(H100, _grad(default), *bf16)) == {"mosaic_gpu_v2"}
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        text = _lower_under(H100, op(jax.lax.Precision.HIGHEST), x, w, d)
    assert _custom_calls(text) == {"__gpu$xla.gpu.triton"}
    assert "exact float32 (precision HIGHEST) has no tensor-core instruction" in caplog.text


def test_modulated_op_with_impl_mosaic():
    """modulated_conv2d with impl="mosaic" (GPU interpret mode; the gradient in the weights in
    the Triton interpreter): forward, gradients and tangent equal the reference's."""
    x, w, d = rands(76, (1, 4, 64, 16), (3, 3, 16, 16), (1, 4, 64, 3, 3))
    default = jax.lax.Precision.DEFAULT
    ops = {
        impl: functools.partial(svconv.modulated_conv2d, precision=default, impl=impl)
        for impl in ("mosaic", "reference")
    }
    tol = _tf32_tolerance(jnp.float32, 9 * 16)
    assert_close(jax.jit(ops["mosaic"])(x, w, d), ops["reference"](x, w, d), tol=tol)
    grads = [
        jax.grad(lambda *a, f=ops[i]: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(x, w, d)
        for i in ("mosaic", "reference")
    ]
    for g, want in zip(*grads, strict=True):
        assert_close(g, want, tol=4 * tol, what="gradient")
    got, want = (jax.jvp(ops[i], (x, w, d), (x, w, d))[1] for i in ("mosaic", "reference"))
    assert_close(got, want, tol=2 * tol, what="jvp")


def test_ops_with_impl_mosaic():
    """impl="mosaic" (off a GPU: the Mosaic kernels in GPU interpret mode): the filter, its
    gradients and its tangent, the splat and its gradients, the Gaussian splat, all equal the
    reference; a case no Pallas kernel takes raises when the op is called."""
    x, k = rands(72, (1, 6, 64, 8), (1, 6, 64, 3, 3))
    for op in (svconv.pixel_filter2d, svconv.pixel_splat2d):
        ops = {impl: functools.partial(op, impl=impl) for impl in ("mosaic", "reference")}
        assert_close(jax.jit(ops["mosaic"])(x, k), ops["reference"](x, k), what=op.__name__)
        got, want = (_grad(ops[i])(x, k) for i in ("mosaic", "reference"))
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, what=f"gradient of {op.__name__}")
        got, want = (jax.jvp(ops[i], (x, k), (x, k))[1] for i in ("mosaic", "reference"))
        assert_close(got, want, what=f"jvp of {op.__name__}")
    sigma = 0.6 + jnp.abs(rands(74, (1, 6, 64))[0])
    got, want = (
        svconv.gaussian_splat2d(x, sigma, 5, impl=impl) for impl in ("mosaic", "reference")
    )
    assert_close(got, want, what="gaussian_splat2d")
    with jax.enable_x64(True), pytest.raises(NotImplementedError, match="impl='mosaic'.*float64"):
        svconv.pixel_filter2d(x.astype(jnp.float64), k.astype(jnp.float64), impl="mosaic")


@pytest.mark.parametrize(
    ("kind", "capability"),
    [
        ("NVIDIA H100 80GB HBM3", (9, 0)),
        ("NVIDIA H200", (9, 0)),
        ("NVIDIA GH200 480GB", (9, 0)),
        ("NVIDIA B200", (10, 0)),
        ("NVIDIA A100-SXM4-80GB", (8, 0)),
        ("NVIDIA A10G", None),
        ("NVIDIA A10", (8, 6)),
        ("NVIDIA L40S", (8, 9)),
        ("NVIDIA L4", (8, 9)),
        ("Tesla T4", None),
    ],
)
def test_compute_capability_of_device_kinds(kind, capability):
    """Abstract devices carry only a kind: the Mosaic kernels need 9.0+, an unknown kind is
    refused (with the reason), never guessed."""
    assert _primitive.compute_capability(kind) == capability


def test_local_op_with_impl_mosaic(caplog):
    """local_conv2d with impl="mosaic": the forward, its fused tangent and the gradient in the
    weights are Mosaic kernels (GPU interpret mode here), the gradient in the image the Triton
    kernel (the Triton interpreter), all equal to the reference; lowered for an H100, Mosaic
    GPU and Triton custom calls, in bfloat16 with no float32 copy of the weights."""
    x, w = rands(81, (2, 3, 64, 8), (3, 64, 3, 3, 8, 8))
    ops = {
        impl: functools.partial(svconv.local_conv2d, impl=impl) for impl in ("mosaic", "reference")
    }
    assert_close(jax.jit(ops["mosaic"])(x, w), ops["reference"](x, w), what="forward")
    got, want = (_grad(ops[i])(x, w) for i in ("mosaic", "reference"))
    for g, ref in zip(got, want, strict=True):
        assert_close(g, ref, what="gradient")
    got, want = (jax.jvp(ops[i], (x, w), (x, w))[1] for i in ("mosaic", "reference"))
    assert_close(got, want, what="jvp")
    xs, ws = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w))
    assert _custom_calls(_lower_under(H100, ops["mosaic"], xs, ws)) == {"mosaic_gpu_v2"}
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        text = _lower_under(H100, _grad(ops["mosaic"]), xs, ws)
    assert _custom_calls(text) == {"mosaic_gpu_v2", "__gpu$xla.gpu.triton"}
    assert "no mosaic kernel for the partial in `x`" in caplog.text
    xs, ws = (jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) for a in (x, w))
    for fn in (_grad(ops["mosaic"]), lambda x, w: jax.jvp(ops["mosaic"], (x, w), (x, w))):
        text = _lower_under(H100, fn, xs, ws)
        assert not re.search(r"tensor<3x64x(3x3|9)x8x8xf32>", text), "a float32 copy of w"
