"""The benchmark's cases: shapes per platform, FLOPs and the fewest bytes each must move.

Every case is stride 1, ``"SAME"`` padding, an odd square kernel, NHWC. A case travels to the
PyTorch worker as the JSON of :meth:`Case.spec`.
"""

from __future__ import annotations

import dataclasses

MODES = ("fwd", "fwd+bwd")
# Each gradient on its own (the VJP with respect to that array alone, without the forward): the
# backward's cost per kernel. Timed for the convolutions on a GPU.
GRAD_MODES = {"modulated": ("grad x", "grad w", "grad d"), "local": ("grad x", "grad w")}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
OP_NAMES = {
    "modulated": "modulated_conv2d",
    "pixel": "pixel_filter2d",
    "local": "local_conv2d",
    "gaussian": "gaussian_filter2d",
    "deformable": "deformable_conv2d",
}
# The ops with one filter per pixel for every channel (cout is cin).
PIXEL_OPS = ("pixel", "gaussian")


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed problem: ``op`` is ``modulated``, ``pixel`` (``pixel_filter2d``, one filter per
    pixel for every channel), ``local`` or ``gaussian`` (``gaussian_filter2d``: a sigma per
    pixel); ``cout`` is ``cin`` for the last two."""

    op: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: int
    dtype: str
    modes: tuple[str, ...] = MODES

    @property
    def id(self) -> str:
        channels = f"{self.cin}" if self.op in PIXEL_OPS else f"{self.cin}to{self.cout}"
        return f"{self.op}-N{self.n}-{self.h}x{self.w}-{channels}-{self.k}x{self.k}-{self.dtype}"

    @property
    def taps(self) -> int:
        return self.k * self.k

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """NHWC shapes of the inputs and of the cotangent ``g`` (the output's shape)."""
        n, h, w, cin, cout, k = self.n, self.h, self.w, self.cin, self.cout, self.k
        x = (n, h, w, cin)
        if self.op == "modulated":
            return {"x": x, "w": (k, k, cin, cout), "d": (n, h, w, k, k), "g": (n, h, w, cout)}
        if self.op == "pixel":
            return {"x": x, "k": (n, h, w, k, k), "g": x}
        if self.op == "gaussian":
            return {"x": x, "sigma": (n, h, w), "g": x}
        if self.op == "deformable":
            return {
                "x": x, "w": (k, k, cin, cout), "offsets": (n, h, w, k, k, 1, 2),
                "mask": (n, h, w, k, k, 1), "g": (n, h, w, cout),
            }  # fmt: skip
        return {"x": x, "w": (h, w, k, k, cin, cout), "g": (n, h, w, cout)}

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of the forward pass (a dense conv's count for the modulated op; the
        filtering alone for the Gaussian)."""
        per_pixel = self.cin if self.op in PIXEL_OPS else self.cin * self.cout
        return 2 * self.n * self.h * self.w * self.taps * per_pixel

    def min_bytes(self, mode: str) -> int:
        """Fewest bytes: each input read once, each output written once (forward: inputs -> y;
        forward+backward: the inputs and the cotangent -> y and every gradient; one gradient:
        the other inputs and the cotangent -> that gradient, as many bytes as the forward)."""
        if mode not in MODES and grad_input(mode) is None:
            raise ValueError(f"unknown mode {mode!r}")
        elems = sum(_size(s) for s in self.shapes().values())  # the inputs and y (g's shape)
        return (2 * elems if mode == "fwd+bwd" else elems) * ITEMSIZE[self.dtype]

    @property
    def patch_bytes(self) -> int:
        """Size of the ``kh*kw``-times patch tensor that the patch formulations build (the
        channels' ``kh*kw``-times copy; the Gaussian's explicit weights are one per channel
        group of it)."""
        return self.n * self.h * self.w * self.cin * self.taps * ITEMSIZE[self.dtype]

    def describe(self) -> str:
        return ", ".join(
            f"{name} [{', '.join(map(str, s))}]" for name, s in self.shapes().items() if name != "g"
        )

    def spec(self) -> dict:
        """The case as plain JSON (for the report and the PyTorch worker)."""
        return {"id": self.id, **dataclasses.asdict(self), "modes": list(self.modes)}


def grad_input(mode: str) -> str | None:
    """The array a one-gradient mode (``"grad x"``) differentiates, or None."""
    return mode[5:] if mode.startswith("grad ") else None


def _size(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def make_cases(backend: str, quick: bool) -> list[Case]:
    """The design's cases: CPU-sized on the CPU, the GPU targets' shapes on a GPU (most
    important first: a run with a time limit drops the last ones)."""

    def conv(op, *args):  # a convolution: on a GPU (and in the smoke test) each gradient too
        modes = MODES + GRAD_MODES[op] if backend == "gpu" or quick else MODES
        return Case(op, *args, modes=modes)

    if quick:
        return [
            conv("modulated", 2, 32, 32, 8, 8, 3, "float32"),
            Case("pixel", 2, 32, 32, 8, 8, 7, "float32"),
            conv("local", 2, 16, 16, 4, 4, 3, "float32"),
            Case("gaussian", 1, 32, 32, 3, 3, 7, "float32"),
            Case("deformable", 1, 16, 16, 4, 4, 3, "float32"),
        ]
    if backend == "gpu":
        return [
            conv("modulated", 8, 128, 128, 64, 64, 3, "float32"),
            conv("modulated", 8, 128, 128, 64, 64, 3, "bfloat16"),
            Case("pixel", 8, 256, 256, 64, 64, 7, "float32"),
            conv("local", 8, 128, 128, 32, 32, 3, "float32"),
            Case("pixel", 8, 256, 256, 64, 64, 15, "float32"),
            Case("gaussian", 8, 256, 256, 3, 3, 31, "float32"),
            Case("pixel", 8, 256, 256, 64, 64, 7, "bfloat16"),
            Case("gaussian", 8, 256, 256, 64, 64, 31, "float32"),
            # More than one shape for the convolutions' tiling heuristics: few and many
            # channels, small and large images, larger windows (bfloat16: the tensor cores).
            conv("modulated", 8, 64, 64, 16, 16, 3, "bfloat16"),
            conv("modulated", 8, 256, 256, 16, 16, 3, "bfloat16"),
            conv("modulated", 8, 64, 64, 256, 256, 3, "bfloat16"),
            conv("modulated", 8, 256, 256, 256, 256, 3, "bfloat16"),
            conv("modulated", 8, 128, 128, 64, 64, 5, "bfloat16"),
            conv("modulated", 8, 128, 128, 64, 64, 7, "bfloat16"),
            conv("local", 8, 64, 64, 16, 16, 5, "float32"),
            conv("local", 8, 64, 64, 16, 16, 7, "float32"),
            # deformable_conv2d: its Triton kernels beside the XLA path and torchvision.
            Case("deformable", 8, 128, 128, 64, 64, 3, "float32"),
            Case("deformable", 8, 128, 128, 64, 64, 3, "bfloat16"),
        ]
    return [
        Case("modulated", 4, 128, 128, 32, 32, 3, "float32"),
        Case("pixel", 4, 128, 128, 32, 32, 7, "float32"),
        Case("pixel", 4, 128, 128, 32, 32, 15, "float32"),
        Case("local", 4, 64, 64, 16, 16, 3, "float32"),
        Case("gaussian", 1, 256, 256, 3, 3, 31, "float32"),
        Case("deformable", 4, 64, 64, 32, 32, 3, "float32"),
    ]


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """An op whose compile time is measured (forward, and value and gradient), with small
    arrays: compile time grows with the kernel size, not the image."""

    op: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: int
    dtype: str = "float32"

    @property
    def id(self) -> str:
        channels = f"{self.cin}" if self.op in PIXEL_OPS else f"{self.cin}to{self.cout}"
        return f"{self.op}-N{self.n}-{self.h}x{self.w}-{channels}-{self.k}x{self.k}"

    def as_case(self) -> Case:
        return Case(self.op, self.n, self.h, self.w, self.cin, self.cout, self.k, self.dtype)


def compile_cases(quick: bool) -> list[CompileCase]:
    """The design's compile-time cases: the ops at 31x31 (3x3 for the smoke test)."""
    if quick:
        return [CompileCase("modulated", 1, 16, 16, 2, 2, 3)]
    return [
        CompileCase("modulated", 1, 64, 64, 4, 4, 31),
        CompileCase("pixel", 1, 256, 256, 3, 3, 31),
        CompileCase("local", 1, 32, 32, 2, 2, 31),
        CompileCase("gaussian", 1, 256, 256, 3, 3, 31),
    ]
