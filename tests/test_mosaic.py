"""The Mosaic GPU kernels (per-pixel filter and Gaussian filter: forward, fused tangent, the
Gaussian's gradient in its scale) in Pallas's GPU interpret mode, with race detection on and
out-of-bounds reads raising, against independent oracles at many geometries (borders, stride
along the height, dilation, asymmetric padding, groups, several row blocks, strips and channel
blocks, float32/bfloat16/float16); their support check; the selection of backends by ``impl``
and by device when lowering for CUDA (abstract H100 and A100); the ops with ``impl="mosaic"``.

GPU interpret mode simulates shared memory, barriers and the copy engine, but not the copy
engine's out-of-bounds fill: the kernels copy only inside the image (zeroing the rest), and the
border cases here check that.
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
from pallas_kernels.mosaic_gpu import pixel as mosaic_pixel
from svconv import _primitive, gaussian, reference, xla
from tests.conftest import assert_close, rands

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


@pytest.mark.parametrize("parts", [1, 2, 3], ids=["isotropic", "axes", "rotated"])
@pytest.mark.parametrize("geom_id", list(GAUSSIAN_GEOMS))
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
    shapes = {"x": (1, *geom.in_size, 16), "k": (1, ho, wo, kh, kw, 1), "y": (1, ho, wo, 16)}
    assert "gradient in `x`" in mosaic_pixel.unsupported_reason(
        "x", geom, shapes, jnp.float32, tangents=False
    )


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)", text))


def _lower_under(device, fn, *args) -> str:
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _grad(fn):
    return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1))


def test_impl_selects_backends_when_lowering_for_each_gpu(caplog):
    """impl="mosaic" on an H100: the forward is a Mosaic GPU kernel, the gradients the Triton
    kernels (no Mosaic kernel for them: said at debug level); on an A100 (compute capability
    8.0) Triton throughout, with the reason; impl="pallas" and None: Triton (the Mosaic kernels
    are the default on no device yet); impl="triton": Triton."""
    x = jax.ShapeDtypeStruct((2, 8, 64, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((2, 8, 64, 3, 3), jnp.float32)
    op = functools.partial(svconv.pixel_filter2d)
    with caplog.at_level(logging.DEBUG, logger="svconv"):
        text = _lower_under(H100, _grad(functools.partial(op, impl="mosaic")), x, k)
    assert _custom_calls(text) == {"mosaic_gpu_v2", "__gpu$xla.gpu.triton"}
    assert "not mosaic: no mosaic kernel for the partial in `x`" in caplog.text
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
    """The Gaussian filter's forward, fused tangent and gradient in sigma are Mosaic GPU
    kernels on an H100; the gradient in the image (the splat) a Triton kernel."""
    x = jax.ShapeDtypeStruct((1, 8, 64, 16), jnp.bfloat16)
    sig = jax.ShapeDtypeStruct((1, 8, 64), jnp.float32)

    def op(x, sigma):
        return svconv.gaussian_filter2d(x, sigma, 7, impl="mosaic")

    grads = lower(jax.grad(lambda x, s: jnp.sum(op(x, s).astype(jnp.float32)), (0, 1)), x, sig)
    assert _custom_calls(grads.as_text()) >= {"mosaic_gpu_v2", "__gpu$xla.gpu.triton"}
    jvp = lower(lambda x, s: jax.jvp(op, (x, s), (x, s)), x, sig).as_text()
    assert "mosaic_gpu_v2" in _custom_calls(jvp)
    assert "__gpu$xla.gpu.triton" not in _custom_calls(jvp)


def test_ops_with_impl_mosaic():
    """impl="mosaic" (off a GPU: the Mosaic kernels in GPU interpret mode, the gradients in the
    Triton interpreter): the op, its gradients and its tangent equal the reference; a case no
    Pallas kernel takes raises when the op is called."""
    x, k = rands(72, (1, 6, 64, 8), (1, 6, 64, 3, 3))
    ops = {
        impl: functools.partial(svconv.pixel_filter2d, impl=impl)
        for impl in ("mosaic", "reference")
    }
    assert_close(jax.jit(ops["mosaic"])(x, k), ops["reference"](x, k))
    got, want = (_grad(ops[i])(x, k) for i in ("mosaic", "reference"))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, what="gradient")
    got, want = (jax.jvp(ops[i], (x, k), (x, k))[1] for i in ("mosaic", "reference"))
    assert_close(got, want, what="jvp")
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
