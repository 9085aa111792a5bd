"""The op families: for each, its slots and their layouts and its backends, in the order
``impl=None`` tries them (see :class:`svconv._primitive.Family` and
:class:`svconv._primitive.Backend`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import cast

import jax

from pallas_kernels import mosaic_gpu
from pallas_kernels.mosaic_gpu import gaussian as mosaic_gaussian
from pallas_kernels.mosaic_gpu import local as mosaic_local
from pallas_kernels.mosaic_gpu import modulated as mosaic_modulated
from pallas_kernels.mosaic_gpu import pixel as mosaic_pixel
from pallas_kernels.mosaic_gpu._sweep import SweepTiles
from pallas_kernels.triton import deformable as triton_deformable
from pallas_kernels.triton import gaussian as triton_gaussian
from pallas_kernels.triton import local as triton_local
from pallas_kernels.triton import modulated as triton_modulated
from pallas_kernels.triton import pixel as triton_pixel
from svconv import deformable, product, xla
from svconv._primitive import Backend, Family, Spec, Target, bind


def _triton_unsupported(check, target: Target | None, spec: Spec, shapes, dtype) -> str | None:
    """The Triton kernels' own check, and the device's: Ampere (8.0) or newer."""
    if not triton_available():
        return "this JAX has no Pallas Triton backend (jax.experimental.pallas.triton)"
    cc = None if target is None or not target.gpu else target.compute_capability
    if cc is not None and cc < (8, 0):
        return f"compute capability {cc[0]}.{cc[1]} is below the Triton kernels' 8.0"
    return check(spec.geom, shapes, dtype)


@functools.cache
def triton_available() -> bool:
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton(kernels, jvp, check, tiles: type) -> Backend:
    unsupported = functools.partial(_triton_unsupported, check)
    return Backend("triton", kernels, jvp, unsupported, tiles=(tiles,))


def _mosaic_unsupported(check, target: Target | None, spec: Spec, shapes, dtype) -> str | None:
    """The Mosaic kernels' own check, and the device's: compute capability 9.0 or newer; off a
    GPU, what GPU interpret mode can run: one device (its simulator's state is global: a
    program on several trips over its own barriers), and only the partials that declared its
    ordered effect (bound with ``impl="mosaic"`` in a process without a GPU)."""
    if target is not None and not target.gpu:
        if not spec.gpu_interpret:
            return "GPU interpret mode needs impl='mosaic' traced in a process without a GPU"
        if target.devices > 1:
            return f"GPU interpret mode runs on one device, not {target.devices}"
    if target is not None and target.gpu:
        cc = target.compute_capability
        if cc is None:
            return f"compute capability of {target.device_kind!r} unknown (Mosaic kernels: 9.0+)"
        if cc < mosaic_gpu.MIN_CAPABILITY:
            return f"compute capability {cc[0]}.{cc[1]} is below the Mosaic kernels' 9.0"
    return check(
        spec.target, spec.geom, shapes, dtype, tangents=bool(spec.tangents),
        precision=spec.precision,
    )  # fmt: skip


def _mosaic_default(target: Target) -> bool:
    kind = target.device_kind or ""
    return any(kind.startswith(prefix) for prefix in mosaic_gpu.DEFAULT_ON)


def _mosaic(kernels, jvp, check, tiles: type = SweepTiles) -> Backend:
    return Backend(
        "mosaic",
        kernels,
        jvp,
        functools.partial(_mosaic_unsupported, check),
        default=_mosaic_default,
        tiles=(tiles,),
    )


def _xla(kernels) -> Backend:
    return Backend("xla", kernels, pallas=False)


MODULATED = Family(
    name="modulated",
    dims={
        "x": ("b", "h", "w", "c"),
        "w": ("kh", "kw", "c", "o"),
        "d": ("b", "ho", "wo", "kh", "kw"),
        "y": ("b", "ho", "wo", "o"),
    },
    backends=(
        _mosaic(
            {
                "y": mosaic_modulated.forward,
                "x": mosaic_modulated.grad_x,
                "w": mosaic_modulated.grad_w,
                "d": mosaic_modulated.grad_d,
            },
            {"y": mosaic_modulated.forward_jvp},
            mosaic_modulated.unsupported_reason,
            mosaic_modulated.GemmTiles,
        ),
        _triton(
            {
                "y": triton_modulated.forward,
                "x": triton_modulated.grad_x,
                "w": triton_modulated.grad_w,
                "d": triton_modulated.grad_d,
            },
            {"y": triton_modulated.forward_jvp},
            triton_modulated.unsupported_reason,
            triton_modulated.ModulatedBlockSizes,
        ),
        _xla(
            {
                "y": xla.modulated_forward,
                "x": xla.modulated_grad_x,
                "w": xla.modulated_grad_w,
                "d": xla.modulated_grad_d,
            }
        ),
    ),
    features={"o": None, "c": None},
)

LOCAL = Family(
    name="local",
    dims={
        "x": ("b", "h", "w", "c"),
        "w": ("ho", "wo", "kh", "kw", "c", "o"),
        "y": ("b", "ho", "wo", "o"),
    },
    backends=(
        _mosaic(
            {"y": mosaic_local.forward, "w": mosaic_local.grad_w},
            {"y": mosaic_local.forward_jvp},
            mosaic_local.unsupported_reason,
            mosaic_local.LocalTiles,
        ),
        _triton(
            {"y": triton_local.forward, "x": triton_local.grad_x, "w": triton_local.grad_w},
            {"y": triton_local.forward_jvp},
            triton_local.unsupported_reason,
            triton_local.LocalBlockSizes,
        ),
        _xla({"y": xla.local_forward, "x": xla.local_grad_x, "w": xla.local_grad_w}),
    ),
    features={"o": None, "c": None},
)

PIXEL = Family(
    name="pixel",
    dims={
        "x": ("b", "h", "w", "c"),
        "k": ("b", "ho", "wo", "kh", "kw", "g"),
        "y": ("b", "ho", "wo", "c"),
    },
    backends=(
        _mosaic(
            {"y": mosaic_pixel.forward, "x": mosaic_pixel.grad_x, "k": mosaic_pixel.grad_k},
            {"y": mosaic_pixel.forward_jvp, "x": mosaic_pixel.grad_x_jvp},
            mosaic_pixel.unsupported_reason,
        ),
        _triton(
            {"y": triton_pixel.forward, "x": triton_pixel.grad_x, "k": triton_pixel.grad_k},
            {"y": triton_pixel.forward_jvp, "x": triton_pixel.grad_x_jvp},
            triton_pixel.unsupported_reason,
            triton_pixel.PixelBlockSizes,
        ),
        _xla({"y": xla.pixel_forward, "x": xla.pixel_grad_x, "k": xla.pixel_grad_k}),
    ),
    features={"c": "g"},
)


def _gaussian_param_jvp(spec: Spec, values: dict, name: str, tangent: jax.Array) -> jax.Array:
    """The tangent of a Gaussian partial for a tangent of ``eta`` or ``zeta``.

    The weights are ``exp(eta . phi - zeta) * phi**moments``, so their derivative in ``eta[p]``
    is the weight with one more power of ``phi[p]``, and in ``zeta`` minus the weight: the same
    partial with ``moments`` raised, scaled per pixel by the tangent. The scale ``s`` is that
    per-pixel factor, so it takes the tangent (or, when ``s`` is the target, the result does).
    """
    if name == "zeta":
        terms = [(spec.moments, -tangent)]
    else:
        terms = [
            (tuple(a + (q == p) for q, a in enumerate(spec.moments)), tangent[..., p])
            for p in range(tangent.shape[-1])
        ]
    dtype = values[spec.slot_operands[0]].dtype
    total = None
    for moments, per_pixel in terms:
        sub = dataclasses.replace(spec, moments=moments, unit=())
        if spec.target == "s":
            term = bind(sub, *(values[n] for n in sub.operands)) * per_pixel.astype(dtype)
        else:
            scale = values.get("s")
            scale = per_pixel if scale is None else scale * per_pixel
            args = {**values, "s": scale.astype(dtype)}
            term = bind(sub, *(args[n] for n in sub.operands))
        total = term if total is None else total + term
    return cast(jax.Array, total)  # (a sum of at least one term)


GAUSSIAN = Family(
    name="gaussian",
    dims={"x": ("b", "h", "w", "c"), "s": ("b", "ho", "wo"), "y": ("b", "ho", "wo", "c")},
    backends=(
        _mosaic(
            {
                "y": mosaic_gaussian.forward,
                "x": mosaic_gaussian.grad_x,
                "s": mosaic_gaussian.grad_s,
            },
            {"y": mosaic_gaussian.forward_jvp, "x": mosaic_gaussian.grad_x_jvp},
            mosaic_gaussian.unsupported_reason,
        ),
        _triton(
            {
                "y": triton_gaussian.forward,
                "x": triton_gaussian.grad_x,
                "s": triton_gaussian.grad_s,
            },
            {"y": triton_gaussian.forward_jvp, "x": triton_gaussian.grad_x_jvp},
            triton_gaussian.unsupported_reason,
            triton_gaussian.PixelBlockSizes,
        ),
        _xla({"y": xla.gaussian_forward, "x": xla.gaussian_grad_x, "s": xla.gaussian_grad_s}),
    ),
    params={"eta": ("b", "ho", "wo", "p"), "zeta": ("b", "ho", "wo")},
    param_jvp=_gaussian_param_jvp,
    features={"c": None},
)


DEFORMABLE = Family(
    name="deformable",
    dims={
        "x": ("b", "h", "w", "c"),
        "w": ("kh", "kw", "i", "o"),
        "d": ("b", "ho", "wo", "kh", "kw", "g"),
        "y": ("b", "ho", "wo", "o"),
    },
    backends=(
        # Not yet run on a GPU: impl="triton" only (impl=None and "pallas" take the XLA path).
        dataclasses.replace(
            _triton(
                {
                    "y": triton_deformable.forward,
                    "x": triton_deformable.grad_x,
                    "w": triton_deformable.grad_w,
                    "d": triton_deformable.grad_d,
                },
                {},
                triton_deformable.unsupported_reason,
                triton_deformable.DeformableBlockSizes,
            ),
            default=lambda target: False,
        ),
        _xla(
            {
                "y": deformable.forward,
                "x": deformable.grad_x,
                "w": deformable.grad_w,
                "d": deformable.grad_d,
            }
        ),
    ),
    params={"offsets": ("b", "ho", "wo", "kh", "kw", "g", "p")},
    param_jvp=deformable.param_jvp,
    bounded=False,
)


# Low-rank per-pixel filters: y = sum_r u_r * (f_r correlated with x). XLA only (direct
# convolutions or FFTs, Spec.method).
PRODUCT = Family(
    name="product",
    dims={
        "x": ("b", "h", "w", "c"),
        "f": ("r", "kh", "kw", "g"),
        "u": ("b", "ho", "wo", "r"),
        "y": ("b", "ho", "wo", "c"),
    },
    backends=(
        Backend(
            "xla",
            {"y": product.forward, "x": product.grad_x, "f": product.grad_f, "u": product.grad_u},
            {"y": product.forward_jvp, "x": product.grad_x_jvp},
            pallas=False,
        ),
    ),
    features={"c": "g"},
    serial=True,
)
