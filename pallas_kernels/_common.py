"""Low-level helpers shared by the Pallas (Triton) kernels: sizes, channel tiling, and the
stride-phase flat layout that turns every convolution tap into one contiguous, unmasked slice.

The flat layout. `x` is zero-padded, split into `sh * sw` stride phases (phase `(a, b)` holds the
padded rows `a::sh` and columns `b::sw`, each phase a `[Hq, Wq]` plane) and every phase is
flattened row-major. Outputs use the same row width `Wq` (columns `Wo..Wq-1` are junk that the
wrapper drops). Then output pixel `p = i * Wq + j` reads, for tap `(m, n)`, the element
`p + shift(m, n)` of phase `phase(m, n)`: one constant offset per tap, so a tile of `M`
consecutive output pixels reads `M` consecutive rows of one phase, for every tap.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.geometry import Geometry


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def channel_block(c: int, cap: int) -> int:
    """Largest power-of-2 channel block in [16, cap] that pads `c` by at most 1/8.

    Tiles must have power-of-2 sizes and tensor-core dots want >= 16, so channels are padded to a
    multiple of the block; a smaller block wastes less on counts like 48 or 96.
    """
    block = max(16, min(cap, next_pow2(c)))
    while block > 16 and round_up(c, block) - c > c // 8:
        block //= 2
    return block


def compiler_params(num_warps: int, num_stages: int) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class TapRange:
    """Taps along one axis that fall in one stride phase: `first + k * step`, k < count.

    In phase coordinates the tap sits `q_first + k * q_step` rows (or columns) below the output.
    """

    first: int
    count: int
    step: int
    q_first: int
    q_step: int


@dataclasses.dataclass(frozen=True)
class FlatGeometry(Geometry):
    """A :class:`Geometry` with the sizes of the stride-phase flat layout (module docstring)."""

    @classmethod
    def of(cls, geom: Geometry) -> "FlatGeometry":
        return cls(**{f.name: getattr(geom, f.name) for f in dataclasses.fields(Geometry)})

    @property
    def phase_size(self) -> tuple[int, int]:
        """(Hq, Wq): each phase plane of the padded input; Wq is also the flat row width."""
        return tuple(
            cdiv(n + lo + hi, s)
            for n, s, (lo, hi) in zip(self.in_size, self.stride, self.padding, strict=True)
        )

    @property
    def num_phases(self) -> int:
        return self.stride[0] * self.stride[1]

    @property
    def out_flat(self) -> int:
        """Flat length of the output (junk columns included)."""
        return self.out_size[0] * self.phase_size[1]

    @property
    def in_flat(self) -> int:
        """Flat length of one input phase."""
        return self.phase_size[0] * self.phase_size[1]

    @property
    def max_shift(self) -> int:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((kh - 1) * dh // sh) * self.phase_size[1] + (kw - 1) * dw // sw

    def tap_ranges(self, axis: int) -> list[TapRange]:
        """For each phase residue along `axis`, the taps that land in it (an arithmetic run)."""
        k, s, dl = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        step = s // math.gcd(s, dl)
        ranges = []
        for residue in range(s):
            taps = [m for m in range(k) if (m * dl) % s == residue]
            first = taps[0] if taps else 0
            ranges.append(TapRange(first, len(taps), step, first * dl // s, step * dl // s))
        return ranges

    def phase_tap_ranges(self) -> list[tuple[int, TapRange, TapRange]]:
        """(phase index, row taps, column taps) for every phase, row-major over phases."""
        rows, cols = self.tap_ranges(0), self.tap_ranges(1)
        return [
            (a * self.stride[1] + b, rows[a], cols[b])
            for a in range(self.stride[0])
            for b in range(self.stride[1])
        ]


def common_unsupported_reason(geom: Geometry, dtype) -> str | None:
    """The checks every kernel family shares: None when they pass, else a one-line reason."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} is not one of float32, bfloat16, float16"
    return None


def to_phases(x: jax.Array, g: FlatGeometry, length: int, channels: int) -> jax.Array:
    """[N, H, W, C] -> [N, sh*sw, length, channels]: zero-padded phase planes, flattened."""
    n, h, w, c = x.shape
    (sh, sw), (hq, wq) = g.stride, g.phase_size
    (pt, _), (pl_, _) = g.padding
    x = jnp.pad(x, ((0, 0), (pt, hq * sh - h - pt), (pl_, wq * sw - w - pl_), (0, channels - c)))
    x = x.reshape(n, hq, sh, wq, sw, channels).transpose(0, 2, 4, 1, 3, 5)
    # Rows past `length` are never read (large bottom padding or stride): drop them.
    x = x.reshape(n, sh * sw, hq * wq, channels)[:, :, :length]
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def from_phases(xp: jax.Array, g: FlatGeometry, channels: int) -> jax.Array:
    """Inverse of `to_phases` (length >= Hq * Wq): [N, sh*sw, length, C'] -> [N, H, W, channels]."""
    n, _, _, c = xp.shape
    (sh, sw), (hq, wq), (h, w) = g.stride, g.phase_size, g.in_size
    (pt, _), (pl_, _) = g.padding
    x = xp[:, :, : hq * wq].reshape(n, sh, sw, hq, wq, c).transpose(0, 3, 1, 4, 2, 5)
    x = x.reshape(n, hq * sh, wq * sw, c)
    return x[:, pt : pt + h, pl_ : pl_ + w, :channels]


def to_out_flat(y: jax.Array, g: FlatGeometry, front: int, length: int, channels: int):
    """[N, Ho, Wo, C] -> [N, front + length, channels], rows `Wq` wide, zeros elsewhere."""
    n, ho, wo, c = y.shape
    wq = g.phase_size[1]
    y = jnp.pad(y, ((0, 0), (0, 0), (0, wq - wo), (0, channels - c))).reshape(n, ho * wq, channels)
    return jnp.pad(y, ((0, 0), (front, length - ho * wq), (0, 0)))


def from_out_flat(yf: jax.Array, g: FlatGeometry, channels: int) -> jax.Array:
    """Inverse of `to_out_flat` with front = 0: [N, length, C'] -> [N, Ho, Wo, channels]."""
    (ho, wo), wq = g.out_size, g.phase_size[1]
    y = yf[:, : ho * wq].reshape(yf.shape[0], ho, wq, yf.shape[-1])
    return y[:, :, :wo, :channels]


SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ------------------------------------------------------------------------------------------------
# Index helpers of the masked-gather kernels (pixel.py, local.py)
# ------------------------------------------------------------------------------------------------


def contributing_taps(residue, k: int, stride: int, dilation: int):
    """Taps t with `t * dilation = residue (mod stride)`, as (first, count, step): the taps of a
    strided convolution that reach an output position of the given phase. `residue` is a traced
    int32 in [0, stride); first >= k (and count 0) when no tap does."""
    step = stride // math.gcd(stride, dilation)
    first = jnp.int32(k)
    # Solutions repeat every `step` taps, so the first one (if any) is below `step`.
    for cand in reversed(range(min(k, step))):
        hit = lax.rem(cand * dilation - residue + stride, stride) == 0
        first = jnp.where(hit, cand, first)
    count = lax.div(k - 1 - first + step, step)
    return first, count, step


def exact_div(num, stride: int, low: int):
    """`num // stride` for traced int32 `num >= low` known to be a multiple of `stride`."""
    bias = stride * pl.cdiv(max(-low, 0), stride)
    return lax.div(num + bias, stride) - bias // stride


def sweep(g: Geometry):
    """``(kh, kw), (sh, sw), (dh, dw), (pad_top, pad_left)`` of a geometry, for index arithmetic."""
    return g.kernel_size, g.stride, g.dilation, (g.padding[0][0], g.padding[1][0])
