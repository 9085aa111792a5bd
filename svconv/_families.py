"""The op families: for each, its slots and their layouts, its kernels per implementation and per
target slot, and its Pallas support check (see :class:`svconv._primitive.Family`)."""

from __future__ import annotations

from pallas_kernels import local as pallas_local
from pallas_kernels import modulated as pallas_modulated
from pallas_kernels import pixel as pallas_pixel
from svconv import xla
from svconv._primitive import Family

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
    dots=True,
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
    dots=True,
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
    dots=False,
)
