"""The op families: for each, its slots and their layouts, its kernels per implementation and per
target slot, and its Pallas support check (see :class:`svconv._primitive.Family`)."""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels import gaussian as pallas_gaussian
from pallas_kernels import local as pallas_local
from pallas_kernels import modulated as pallas_modulated
from pallas_kernels import pixel as pallas_pixel
from svconv import xla
from svconv._primitive import Family, Spec, bind

MODULATED = Family(
    name="modulated",
    dims={
        "x": ("b", "h", "w", "c"),
        "w": ("kh", "kw", "c", "o"),
        "d": ("b", "ho", "wo", "kh", "kw"),
        "y": ("b", "ho", "wo", "o"),
    },
    xla={
        "y": xla.modulated_forward,
        "x": xla.modulated_grad_x,
        "w": xla.modulated_grad_w,
        "d": xla.modulated_grad_d,
    },
    pallas={
        "y": pallas_modulated.forward,
        "x": pallas_modulated.grad_x,
        "w": pallas_modulated.grad_w,
        "d": pallas_modulated.grad_d,
    },
    pallas_unsupported=pallas_modulated.unsupported_reason,
    pallas_jvp={"y": pallas_modulated.forward_jvp},
    features={"o": None, "c": None},
)

LOCAL = Family(
    name="local",
    dims={
        "x": ("b", "h", "w", "c"),
        "w": ("ho", "wo", "kh", "kw", "c", "o"),
        "y": ("b", "ho", "wo", "o"),
    },
    xla={"y": xla.local_forward, "x": xla.local_grad_x, "w": xla.local_grad_w},
    pallas={"y": pallas_local.forward, "x": pallas_local.grad_x, "w": pallas_local.grad_w},
    pallas_unsupported=pallas_local.unsupported_reason,
    pallas_jvp={"y": pallas_local.forward_jvp},
    features={"o": None, "c": None},
)

PIXEL = Family(
    name="pixel",
    dims={
        "x": ("b", "h", "w", "c"),
        "k": ("b", "ho", "wo", "kh", "kw", "g"),
        "y": ("b", "ho", "wo", "c"),
    },
    xla={"y": xla.pixel_forward, "x": xla.pixel_grad_x, "k": xla.pixel_grad_k},
    pallas={"y": pallas_pixel.forward, "x": pallas_pixel.grad_x, "k": pallas_pixel.grad_k},
    pallas_unsupported=pallas_pixel.unsupported_reason,
    pallas_jvp={"y": pallas_pixel.forward_jvp, "x": pallas_pixel.grad_x_jvp},
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
    return total


GAUSSIAN = Family(
    name="gaussian",
    dims={"x": ("b", "h", "w", "c"), "s": ("b", "ho", "wo"), "y": ("b", "ho", "wo", "c")},
    xla={"y": xla.gaussian_forward, "x": xla.gaussian_grad_x, "s": xla.gaussian_grad_s},
    pallas={
        "y": pallas_gaussian.forward,
        "x": pallas_gaussian.grad_x,
        "s": pallas_gaussian.grad_s,
    },
    pallas_unsupported=pallas_gaussian.unsupported_reason,
    params={"eta": ("b", "ho", "wo", "p"), "zeta": ("b", "ho", "wo")},
    param_jvp=_gaussian_param_jvp,
    pallas_jvp={"y": pallas_gaussian.forward_jvp, "x": pallas_gaussian.grad_x_jvp},
    features={"c": None},
)
