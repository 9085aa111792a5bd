"""The JAX columns of a case: svconv's implementations, the XLA path's patch formulation,
``lax.conv_general_dilated`` / ``conv_general_dilated_local``, the reference, and for the
Gaussian the explicit-kernel route; each a jitted function of one dict of inputs, forward or
forward+backward."""

from __future__ import annotations

import time
import zlib

import jax
import jax.numpy as jnp
from jax import lax

import svconv
from experiments.bench.cases import Case, grad_input
from pallas_kernels.geometry import Geometry
from pallas_kernels.triton import pixel
from svconv import xla as svxla

NHWC = ("NHWC", "HWIO", "NHWC")
# The arrays each op is differentiated with respect to (the plain conv: x and w).
DIFF = {
    "modulated": ("x", "w", "d"),
    "pixel": ("x", "k"),
    "local": ("x", "w"),
    "gaussian": ("x", "sigma"),
    "deformable": ("x", "w", "offsets", "mask"),
}


def make_inputs(case: Case) -> dict[str, jax.Array]:
    """Fresh random inputs (never zeros), seeded by the case id: normal ``x``, ``g`` and weights
    scaled by the fan-in, positive modulations and filters around their nominal value, sigmas
    from sharp to a sixth of the window."""
    shapes = case.shapes()
    seed = jax.random.key(zlib.crc32(case.id.encode()))
    keys = dict(zip(shapes, jax.random.split(seed, len(shapes)), strict=True))
    dt = jnp.dtype(case.dtype)
    fan_in = case.cin * case.taps
    out = {}
    for name, shape in shapes.items():
        if name in ("d", "mask"):
            out[name] = jax.random.uniform(keys[name], shape, dt, 0.5, 1.5)
        elif name == "k":
            out[name] = jax.random.uniform(keys[name], shape, dt, 0.5, 1.5) / case.taps
        elif name == "sigma":
            out[name] = jax.random.uniform(keys[name], shape, dt, 0.2, max(0.5, case.k / 6))
        elif name == "w":
            out[name] = jax.random.normal(keys[name], shape, dt) / fan_in**0.5
        else:
            out[name] = jax.random.normal(keys[name], shape, dt)
    return out


def op_fn(case: Case, impl: str | None):
    """``inputs -> y`` through the public op with ``impl``."""
    if case.op == "modulated":
        return lambda a: svconv.modulated_conv2d(a["x"], a["w"], a["d"], impl=impl)
    if case.op == "pixel":
        return lambda a: svconv.pixel_filter2d(a["x"], a["k"], impl=impl)
    if case.op == "gaussian":
        return lambda a: svconv.gaussian_filter2d(a["x"], a["sigma"], case.k, impl=impl)
    if case.op == "deformable":
        return lambda a: svconv.deformable_conv2d(
            a["x"], a["w"], a["offsets"], a["mask"], impl=impl
        )
    return lambda a: svconv.local_conv2d(a["x"], a["w"], impl=impl)


def _pixel_phased(case: Case):
    tiles = pixel.pixel_block_sizes(
        "forward",
        channels=case.cin,
        groups=1,
        out_hw=(case.h, case.w),
        batch=case.n,
        dtype=jnp.dtype(case.dtype),
        column_phases=4,
    )
    return lambda a: svconv.pixel_filter2d(a["x"], a["k"], impl="pallas", block_sizes=tiles)


def _depthwise(case: Case):
    """``lax.conv_general_dilated`` of ``x`` with one ``k x k`` filter per channel."""
    c = case.cin
    w = jnp.full((case.k, case.k, 1, c), 1.0 / case.taps, jnp.dtype(case.dtype))
    return lambda a: lax.conv_general_dilated(
        a["x"], w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=c
    )


def _geometry(case: Case) -> Geometry:
    p = (case.k - 1) // 2
    return Geometry.of((case.h, case.w), (case.k, case.k), (1, 1), (1, 1), ((p, p), (p, p)))


def _lax_local(a):
    # ConvLocal's weight layout [Ho, Wo, Cin*kh*kw (ordered (c, m, n)), Cout]; the relayout is
    # part of the timed function but fuses into the patch einsum.
    w = a["w"]
    kernel_size = w.shape[2:4]
    w = w.transpose(0, 1, 4, 2, 3, 5).reshape(*w.shape[:2], -1, w.shape[-1])
    return lax.conv_general_dilated_local(
        a["x"], w, (1, 1), "SAME", kernel_size, dimension_numbers=NHWC
    )


def jax_columns(
    case: Case, backend: str, patch_limit: int
) -> tuple[dict[str, tuple], dict[str, str]]:
    """``{column: (forward(inputs) -> y, names of the differentiated inputs)}`` and, for the
    columns left out, why."""
    geom, diff = _geometry(case), DIFF[case.op]
    cols = {
        "svconv xla": (op_fn(case, "xla"), diff),
        "svconv pallas": (op_fn(case, "pallas"), diff),
    }
    if case.op == "modulated":
        cols["xla patches"] = (
            lambda a: svxla.modulated_forward_patches(a["x"], a["w"], a["d"], geom=geom),
            diff,
        )
        cols["lax conv"] = (
            lambda a: lax.conv_general_dilated(
                a["x"], a["w"], (1, 1), "SAME", dimension_numbers=NHWC
            ),
            ("x", "w"),
        )
    elif case.op == "pixel":
        cols["xla patches"] = (
            lambda a: svxla.pixel_forward_patches(a["x"], a["k"][..., None], geom=geom),
            diff,
        )
    elif case.op == "gaussian":
        # The route gaussian_filter2d replaces: the [N, H, W, kh, kw] weights, then the filter
        # (both with the default implementation).
        cols["explicit kernels"] = (
            lambda a: svconv.pixel_filter2d(a["x"], svconv.gaussian_kernels(a["sigma"], case.k)),
            diff,
        )
    elif case.op == "local":
        cols["lax local"] = (_lax_local, diff)

    if case.op == "pixel" and backend == "gpu":
        # The forward in interleaved column phases (pallas_kernels.triton.pixel._forward_phased)
        # beside today's default tiles: forward only (its tiles are the forward's).
        cols["svconv pallas, 4 column phases"] = (_pixel_phased(case), None)
    if case.op == "deformable":  # its Pallas kernels are Triton's, not yet the default
        del cols["svconv pallas"]
        if backend == "gpu":
            cols["svconv triton"] = (op_fn(case, "triton"), diff)
    if backend == "gpu" and case.op != "deformable":
        # The Mosaic GPU kernels (the Triton kernels for the partials Mosaic has none of, or
        # for all of it where the case is not one the Mosaic kernels take).
        cols["svconv mosaic"] = (op_fn(case, "mosaic"), diff)
    if case.op in ("pixel", "gaussian") and backend == "gpu":
        # The spatially invariant filter of the same window: a depthwise cuDNN convolution.
        cols["lax depthwise"] = (_depthwise(case), ("x",))
    missing = {}
    if backend != "gpu" and "svconv pallas" in cols:
        del cols["svconv pallas"]
        missing["svconv pallas"] = "no GPU (off a GPU, Pallas runs only in its slow interpreter)"
    if backend == "gpu":
        missing["reference"] = "left out on the GPU: the tests' oracle, not a contender"
    elif case.op == "gaussian":
        missing["reference"] = "left out: the explicit-kernel route is the comparison here"
    else:
        cols["reference"] = (op_fn(case, "reference"), diff)
    patch_col = {"local": "lax local", "gaussian": None, "deformable": None}.get(
        case.op, "xla patches"
    )
    if patch_col and case.patch_bytes > patch_limit:
        del cols[patch_col]
        missing[patch_col] = (
            f"its patch tensor ({case.patch_bytes / 2**30:.1f} GiB) exceeds the "
            f"memory budget ({patch_limit / 2**30:.1f} GiB)"
        )
    return cols, missing


def grad_fn(fwd, name):
    """The VJP with cotangent ``g`` with respect to ``name`` alone, without the forward's value:
    one gradient's kernel (a multilinear op's VJP does not need the forward)."""

    def run(a):
        rest = {k: v for k, v in a.items() if k != name}
        y, vjp = jax.vjp(lambda v: fwd({**rest, name: v}), a[name])
        return vjp(a["g"].astype(y.dtype))[0]

    return run


# The columns timed one gradient at a time: svconv's kernels and the plain conv (the others'
# gradients are in their forward+backward; timing them again would crowd the GPU run's time
# limit out of the later cases).
GRADIENT_COLUMNS = ("svconv pallas", "svconv mosaic", "svconv xla", "lax conv")


def mode_fn(fwd, diff, mode, column: str | None = None):
    """The timed function of a column in ``mode`` (``"fwd"``, ``"fwd+bwd"``, ``"grad x"``), or
    None where the column has no such mode (forward-only; not differentiated in that array;
    for one gradient, not one of :data:`GRADIENT_COLUMNS`)."""
    if mode == "fwd":
        return fwd
    if diff is None:
        return None
    if mode == "fwd+bwd":
        return fwd_bwd_fn(fwd, diff)
    name = grad_input(mode)
    if name not in diff or (column is not None and column not in GRADIENT_COLUMNS):
        return None
    return grad_fn(fwd, name)


def fwd_bwd_fn(fwd, names):
    """The forward output and the VJP with cotangent ``g`` for every input in ``names``; ``y``
    is returned so that the forward pass cannot be dropped as dead code (the gradients of a
    multilinear op do not need it)."""

    def run(a):
        rest = {k: v for k, v in a.items() if k not in names}
        y, vjp = jax.vjp(lambda diff: fwd({**diff, **rest}), {k: a[k] for k in names})
        return y, vjp(a["g"].astype(y.dtype))

    return run


class JaxColumn:
    """One jitted function of a case; compiled by :meth:`prepare`; samples seconds per call."""

    def __init__(self, fn, inputs, *, block_each: bool, mem_limit: int):
        self.fn, self.inputs, self.block_each = jax.jit(fn), inputs, block_each
        self.mem_limit, self.peak_bytes, self.temp_bytes = mem_limit, None, None

    def prepare(self):
        compiled = self.fn.lower(self.inputs).compile()
        try:
            mem = compiled.memory_analysis()
            self.temp_bytes = int(mem.temp_size_in_bytes)
            self.peak_bytes = self.temp_bytes + int(mem.output_size_in_bytes)
        except Exception:  # not every backend reports it
            self.peak_bytes = self.temp_bytes = None
        if self.peak_bytes is not None and self.peak_bytes > self.mem_limit:
            raise MemoryError(
                f"skipped: XLA plans {self.peak_bytes / 2**30:.1f} GiB of buffers, "
                f"over the {self.mem_limit / 2**30:.1f} GiB budget"
            )
        t0 = time.perf_counter()
        jax.block_until_ready(self.fn(self.inputs))
        if time.perf_counter() - t0 < 1.0:  # a slow call needs no second warm-up
            jax.block_until_ready(self.fn(self.inputs))

    def sample(self, inner: int) -> float:
        t0 = time.perf_counter()
        if self.block_each:
            for _ in range(inner):
                jax.block_until_ready(self.fn(self.inputs))
        else:  # one in-order stream: blocking on the last call waits for all of them
            out = None
            for _ in range(inner):
                out = self.fn(self.inputs)
            jax.block_until_ready(out)
        return (time.perf_counter() - t0) / inner


def loss_and_grad_fn(fwd, names):
    """``jax.value_and_grad`` of ``sum(y * g)`` with respect to every input in ``names``."""

    def run(a):
        rest = {k: v for k, v in a.items() if k not in names}

        def loss(diff):
            y = fwd({**diff, **rest})
            return jnp.sum(y.astype(jnp.float32) * a["g"].astype(jnp.float32))

        return jax.value_and_grad(loss)({k: a[k] for k in names})

    return run
