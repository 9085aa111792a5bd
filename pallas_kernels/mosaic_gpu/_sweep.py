"""The window sweep of the per-pixel kernels on Mosaic GPU: input rows through shared memory.

A program (one warpgroup, 128 threads) owns one image, a block of ``block_h`` output rows, a
strip of 64 output columns and ``block_channels`` channels. Its output row ``i`` reads input
rows ``i * sh + m * dh - pad_top`` (``m < kh``), each over the strip's columns and their halo.
Every such row is copied from global memory once (TMA) into a ring of ``R`` row buffers in
shared memory; while row ``i`` is computed, the copies of the rows that row ``i + 1`` adds are
in flight. Every tap of row ``i`` then loads its ``[64, channels]`` window from shared memory
(the WGMMA register layout: pixels as rows), and the per-pixel weights of the tap arrive as a
``[64]`` vector per row (a strided load from global memory, which the L1 cache serves for all
taps of a pixel). The result row goes out through shared memory by a TMA copy.

Zero padding without relying on the copy engine's out-of-bounds fill (which the GPU interpret
mode does not model): the ring is zeroed when the program starts; a row above the image is
never copied (its slot is still zero when a tap reads it); a row below the image is zeroed
instead of copied; columns outside the image are never written. Every copy lies inside the
image: the strip's copy starts ``margin`` columns left of the strip (``margin >= pad_left``,
so the destination of every copy starts at a 128-byte boundary), clipped to the image at the
image's borders (the first and last strips are handled with their own static copy).

Requirements (:func:`unsupported_reason`): column stride 1; ``Wo`` a multiple of 64; channels
per group a multiple of 8 and ``C * itemsize`` a multiple of 16 bytes (TMA strides); the strip
with its halo at most 256 columns (a TMA box); the ring in shared memory.

A splat (a filter's transpose in the image) at stride 1 is the sweep of the mirrored window
(:func:`transposed`): its source rows through the ring, the per-pixel values of a tap row's
source pixels, a column shift away, through :class:`Staged`
(:func:`splat_unsupported_reason`). The modulated conv's implicit GEMM reuses the ring with
every input channel in it (:mod:`.modulated`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.geometry import Geometry, KernelCall, Padding

STRIP = 64  # output columns a program: the rows of one WGMMA-layout register tile
SMEM_BUDGET = 200 * 1024  # bytes of shared memory a program may take (227 KiB on sm_90)
_MAX_BOX = 256  # a TMA box's largest extent
MAX_BARRIERS = 32  # barriers a group (Mosaic GPU): one a slot of the ring
_F32 = jnp.float32
_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector: each thread holds its pixels' values


@dataclasses.dataclass(frozen=True)
class SweepTiles:
    """Tiles of the Mosaic per-pixel kernels.

    Attributes:
      block_h: output rows a program computes (its input rows come through the ring once).
      block_channels: channels a program computes (a multiple of 8 dividing the channels of a
        group: the weights are one vector per tap).

    Raises:
      ValueError: when constructed: a ``block_h`` below 1, a ``block_channels`` that is not a
        positive multiple of 8.
    """

    block_h: int
    block_channels: int

    def __post_init__(self) -> None:
        if self.block_h < 1:
            raise ValueError(f"SweepTiles.block_h must be >= 1, got {self.block_h}")
        if self.block_channels < 8 or self.block_channels % 8:
            raise ValueError(
                f"SweepTiles.block_channels must be a positive multiple of 8, got "
                f"{self.block_channels}"
            )


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static plan of one sweep: geometry, tiles, the ring and the column copies."""

    geom: Geometry
    tiles: SweepTiles
    images: int  # input-grid arrays through the ring (x, and its tangent)
    itemsize: int
    ring: int  # R: row buffers per image
    margin: int  # columns of a row buffer left of the strip
    width: int  # columns of a row buffer

    @property
    def span(self) -> int:
        (kh, _), (dh, _) = self.geom.kernel_size, self.geom.dilation
        return (kh - 1) * dh + 1

    @property
    def new_rows(self) -> int:
        """Input rows an output row adds to the previous one's."""
        return min(self.geom.stride[0], self.span)


def plan(
    geom: Geometry, tiles: SweepTiles, images: int, dtype, per_group: int | None = None
) -> Layout:
    """The sweep's plan; ``per_group``: the channels of a filter group, which a program's
    channels must divide (checked when given)."""
    if per_group is not None and per_group % tiles.block_channels:
        raise ValueError(
            f"SweepTiles.block_channels ({tiles.block_channels}) must divide the {per_group} "
            "channels of a group"
        )
    itemsize = jnp.dtype(dtype).itemsize
    (kh, kw), (sh, _), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    pleft = geom.padding[1][0]
    span = (kh - 1) * dh + 1
    row_bytes = tiles.block_channels * itemsize
    # The copies' destinations start at multiples of 128 bytes: the margin is a whole number
    # of such steps, at least the left padding.
    step = max(1, 128 // math.gcd(128, row_bytes))
    margin = -(-max(pleft, 0) // step) * step
    width = margin + STRIP + (kw - 1) * dw - pleft
    return Layout(geom, tiles, images, itemsize, span + min(sh, span), margin, width)


def smem_bytes(layout: Layout, out_bytes: int) -> int:
    """Shared memory of one program: the rings and the output staging buffers."""
    ring = layout.images * layout.ring * layout.width * layout.tiles.block_channels
    return ring * layout.itemsize + out_bytes


def unsupported_reason(
    geom: Geometry, channels: int, groups: int, dtype, out_bytes: Callable[[int], int], images: int
) -> str | None:
    """Why the sweep cannot take this case (one line), or None. ``out_bytes(block_channels)``:
    the output staging buffers' bytes."""
    if jnp.dtype(dtype) not in (
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float16),
    ):
        return f"dtype {jnp.dtype(dtype).name} is not one of float32, bfloat16, float16"
    if geom.stride[1] != 1:
        return f"column stride {geom.stride[1]} (the Mosaic kernels take stride 1 along the width)"
    wo = geom.out_size[1]
    if wo % STRIP:
        return f"output width {wo} is not a multiple of {STRIP}"
    if min(geom.padding[1]) < 0 or min(geom.padding[0]) < 0:
        return "negative padding"
    itemsize = jnp.dtype(dtype).itemsize
    per_group = channels // groups
    if per_group % 8 or (channels * itemsize) % 16:
        return (
            f"{channels} channels in {groups} groups: the Mosaic kernels take a multiple of 8 "
            f"channels a group and rows of a multiple of 16 bytes"
        )
    ring = plan(geom, SweepTiles(8, 8), images, dtype).ring
    if ring > MAX_BARRIERS:
        return (
            f"a ring of {ring} input rows (a window {geom.kernel_size[0]} rows tall) needs more "
            f"than the {MAX_BARRIERS} barriers a kernel has"
        )
    if choose_channels(geom, per_group, dtype, out_bytes, images) is None:
        layout = plan(geom, SweepTiles(8, 8), images, dtype)
        if layout.width > _MAX_BOX:
            return f"a strip with its halo spans {layout.width} columns (TMA boxes: {_MAX_BOX})"
        return "the ring of input rows does not fit in shared memory"
    return None


def choose_channels(geom: Geometry, per_group: int, dtype, out_bytes, images: int) -> int | None:
    """The most channels a program (a divisor of ``per_group``, 64 at most) whose ring fits."""
    for cb in (64, 32, 16, 8):
        if per_group % cb:
            continue
        layout = plan(geom, SweepTiles(8, cb), images, dtype)
        if layout.width <= _MAX_BOX and smem_bytes(layout, out_bytes(cb)) <= SMEM_BUDGET:
            return cb
    return None


def sweep_tiles(
    geom: Geometry,
    *,
    batch: int,
    channels: int,
    groups: int,
    dtype,
    out_bytes,
    images: int,
    sm_count: int = 132,
    widest: bool = False,
) -> SweepTiles:
    """The heuristic's tiles (not yet tuned on a GPU).

    Channels: 32 bytes of a pixel a program (8 float32 or 16 16-bit channels) where they divide
    a group's channels and the ring fits, else the most that fit. A tap's window is a
    ``[64, channels]`` load from rows of the ring whose stride is the channels' bytes: with 32
    bytes the eight rows a warp reads at once fall in distinct banks, while 128 or 256 bytes
    (32 or 64 float32 channels) put them all in the same eight banks (8-way conflicts). The
    programs of one strip's channel blocks read the same weights: they run side by side (the
    channel blocks are the grid's first axis), so the weights come from L2.

    Rows: the tallest block (64 rows at most) that still gives every multiprocessor a program;
    a taller block re-reads fewer halo rows (``(span - stride) / block_h`` of its input).

    With ``widest``, the most channels that fit (a result summed over the channel blocks
    afterwards: fewer blocks, fewer partial sums)."""
    per_group, itemsize = channels // groups, jnp.dtype(dtype).itemsize
    cb = 32 // itemsize
    fits = per_group % cb == 0 and choose_channels(geom, cb, dtype, out_bytes, images) == cb
    fits = fits and not widest
    if not fits:
        cb = choose_channels(geom, per_group, dtype, out_bytes, images)
    ho, wo = geom.out_size
    across = batch * (wo // STRIP) * (channels // cb)
    block_h = 8
    for rows in (64, 32, 16):
        if across * -(-ho // rows) >= sm_count:
            block_h = rows
            break
    return SweepTiles(min(block_h, ho), cb)


def grid(layout: Layout, batch: int, channels: int) -> tuple[int, int, int]:
    """(channel blocks, images x row blocks, strips): the channel blocks of a strip, which
    read the same weights, adjacent; then the row blocks of one image, which share halo
    rows."""
    ho, wo = layout.geom.out_size
    return (
        channels // layout.tiles.block_channels,
        batch * -(-ho // layout.tiles.block_h),
        wo // STRIP,
    )


GRID_NAMES = ("chans", "rows", "strip")


@dataclasses.dataclass(frozen=True)
class Program:
    """Where one program is: its image, first output row and row count, strip and channels."""

    b: Any
    i0: Any
    rows: Any
    j0: Any
    c0: Any


def program(layout: Layout) -> Program:
    ho = layout.geom.out_size[0]
    th = layout.tiles.block_h
    blocks = -(-ho // th)
    rb = lax.axis_index("rows")
    b, tb = lax.div(rb, blocks), lax.rem(rb, blocks)
    i0 = tb * th
    return Program(
        b=b,
        i0=i0,
        rows=jnp.minimum(th, ho - i0),
        j0=lax.axis_index("strip") * STRIP,
        c0=lax.axis_index("chans") * layout.tiles.block_channels,
    )


class Ring:
    """The ring of input rows of one program, for each of its input-grid arrays."""

    def __init__(self, layout: Layout, prog: Program, images: Sequence[Any], bufs, bars):
        self.layout, self.prog, self.images, self.bufs, self.bars = layout, prog, images, bufs, bars
        g = layout.geom
        (self.h, self.w), (self.sh, _), (self.dh, self.dw) = g.in_size, g.stride, g.dilation
        self.pt, self.pl = g.padding[0][0], g.padding[1][0]
        # A non-negative stand-in for the (possibly negative) row index in the slot arithmetic.
        self.bias = layout.ring * (-(-max(self.pt, 0) // layout.ring) + 1)

    def slot(self, r):
        return lax.rem(r + self.bias, self.layout.ring)

    def _zero_slot(self, slot) -> None:
        """Zero one slot of every image, in [64, channels] pieces (the register layout of the
        windows; the last piece overlaps the one before)."""
        lay = self.layout
        zeros = zeros_tile(lay.tiles.block_channels).astype(self.bufs.dtype)
        starts = sorted({*range(0, lay.width - STRIP, STRIP), lay.width - STRIP})
        for k in range(lay.images):
            for start in starts:
                self.bufs[k, slot, pl.ds(start, STRIP)] = zeros

    def zero(self) -> None:
        """Every row buffer zero, before any copy into them (then the async proxy is fenced)."""
        for s in range(self.layout.ring):
            self._zero_slot(s)
        plgpu.commit_smem()

    def _strips(self):
        """The strips whose copy is clipped by the image: ``{strip: (first column, columns,
        destination column)}``; every other strip copies ``width`` columns from ``j0 -
        margin`` to column 0."""
        lay = self.layout
        special = {}
        for s in range(lay.geom.out_size[1] // STRIP):
            start = s * STRIP - lay.margin
            first, end = max(0, start), min(self.w, start + lay.width)
            if (first, end) != (start, start + lay.width):
                special[s] = (first, max(end - first, 0), first - start)
        return special

    def fetch(self, r) -> None:
        """Start the copies of input row ``r`` (traced) into its slot; below the image, zero the
        slot instead (above it, the slot is never written and still zero)."""
        lay, p = self.layout, self.prog
        slot = self.slot(r)
        cb = lay.tiles.block_channels
        chans = pl.ds(p.c0, cb)
        special = self._strips()

        def copy(first, count, dest):  # one barrier a slot, an arrival per image
            for k, image in enumerate(self.images):
                plgpu.copy_gmem_to_smem(
                    image.at[p.b, r, pl.ds(first, count), chans],
                    self.bufs.at[k, slot, pl.ds(dest, count)],
                    self.bars.at[slot],
                )

        @pl.when((r >= 0) & (r < self.h))
        def _():
            strip = lax.div(p.j0, STRIP)
            start: jax.Array | bool = True  # (typed: logical_and makes it an array)
            inside = functools.reduce(jnp.logical_and, [strip != s for s in special], start)

            @pl.when(inside)
            def _():
                copy(p.j0 - lay.margin, lay.width, 0)

            for s, (first, count, dest) in special.items():
                if count > 0:
                    pl.when(strip == s)(functools.partial(copy, first, count, dest))

        @pl.when(r >= self.h)
        def _():
            self._zero_slot(slot)

    def wait(self, r) -> None:
        """Wait for the copies of input row ``r`` (none outside the image)."""
        slot = self.slot(r)

        @pl.when((r >= 0) & (r < self.h))
        def _():
            plgpu.barrier_wait(self.bars.at[slot])

    def window(
        self,
        k: int,
        i,
        m: int | jax.Array,
        n: int | jax.Array,
        chans: tuple[int, int] | None = None,
    ) -> jax.Array:
        """Tap ``(m, n)``'s ``[64, channels]`` window of output row ``i`` from image ``k``
        (``chans``: ``(first, count)`` of the ring's channels, all by default)."""
        lay = self.layout
        r = i * self.sh + m * self.dh - self.pt
        start = lay.margin - self.pl + n * self.dw
        ref = self.bufs.at[k, self.slot(r), pl.ds(start, STRIP)]
        if chans is not None:
            ref = ref.at[:, pl.ds(*chans)]
        return plgpu.load(ref, layout=_WGMMA)


def pixel_row(ref, b, i, j0, *index) -> jax.Array:
    """A ``[64]`` vector of per-pixel values of output row ``i`` from a global ``[N, Ho, Wo,
    ...]`` array: ``ref[b, i, j0:j0 + 64, *index]`` in float32."""
    return plgpu.load(ref.at[b, i, pl.ds(j0, STRIP), *index], layout=_ROW, optimized=False).astype(
        _F32
    )


def pixel_tile(ref, b, i, j0, c0, cb) -> jax.Array:
    """``ref[b, i, j0:j0 + 64, c0:c0 + cb]`` of a global array on the output grid, float32."""
    tile = ref.at[b, i, pl.ds(j0, STRIP), pl.ds(c0, cb)]
    return plgpu.load(tile, layout=_WGMMA, optimized=False).astype(_F32)


def store_global(ref, value: jax.Array) -> None:
    """``ref[...] = value`` into global memory where the destination is strided (a ``[64]``
    column of a per-pixel array, each value in its own 32-byte sector): an unoptimised store.
    JAX 0.12 refuses the default (optimised) store there; JAX 0.11 has no ``plgpu.store`` and
    stores so by default."""
    store = getattr(plgpu, "store", None)
    if store is None:
        ref[...] = value
    else:
        store(ref, value, optimized=False)


def zeros_tile(cb: int) -> jax.Array:
    return plgpu.layout_cast(jnp.zeros((STRIP, cb), _F32), _WGMMA)


def zeros_row() -> jax.Array:
    return plgpu.layout_cast(jnp.zeros((STRIP,), _F32), _ROW)


def sweep(
    layout: Layout,
    prog: Program,
    ring: Ring,
    compute_row: Callable[[Any], jax.Array],
    store_row: Callable[[Any, jax.Array, Any], None],
) -> None:
    """The program's loop over its output rows: the ring refilled one row ahead,
    ``compute_row(i)`` on the rows in shared memory, ``store_row(i, value, u)``, which must end
    with a warpgroup barrier (:func:`store_tile`, :func:`store_row`: ``commit_smem``): it
    orders the row's reads of the ring before the copies that overwrite them."""
    span, new = layout.span, layout.new_rows
    ring.zero()
    first = prog.i0 * ring.sh - ring.pt
    for d in range(span):
        ring.fetch(first + d)

    def row(u, carry):
        i = prog.i0 + u
        top = i * ring.sh - ring.pt

        @pl.when(u == 0)
        def _():
            for d in range(span):
                ring.wait(top + d)

        @pl.when(u > 0)
        def _():
            for d in range(span - new, span):
                ring.wait(top + d)

        @pl.when(u + 1 < prog.rows)
        def _():
            # The slots these copies overwrite were last read by row i - 1, before its
            # store's warpgroup barrier (or the ring's zeroing, before row i0).
            for d in range(span - new, span):
                ring.fetch(top + ring.sh + d)

        store_row(i, compute_row(i), u)
        return carry

    lax.fori_loop(0, prog.rows, row, 0)
    plgpu.wait_smem_to_gmem(0)  # the last rows' copies out, before the program ends


def reads_done(i, value, u) -> None:
    """The ``store_row`` of a sweep whose results leave otherwise (a sum stored from registers,
    accumulators kept): only the warpgroup barrier that ends the row's reads of the ring."""
    del i, value, u
    plgpu.commit_smem()


def store_tile(out_ref, obuf, prog: Program, i, value: jax.Array, u, cb: int) -> None:
    """Write ``value`` ``[64, cb]`` to ``out_ref[b, i, j0:j0 + 64, c0:c0 + cb]`` through one of
    the two staging buffers ``obuf`` (a copy may still read the other)."""
    slot = lax.rem(u, 2)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    obuf[slot] = value.astype(obuf.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        obuf.at[slot], out_ref.at[prog.b, i, pl.ds(prog.j0, STRIP), pl.ds(prog.c0, cb)]
    )


def store_row(out_ref, obuf, prog: Program, i, value: jax.Array, u) -> None:
    """Write ``value`` ``[64]`` to ``out_ref[b, i, j0:j0 + 64]`` through ``obuf``."""
    slot = lax.rem(u, 2)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    obuf[slot] = value.astype(obuf.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(obuf.at[slot], out_ref.at[prog.b, i, pl.ds(prog.j0, STRIP)])


def transposed(geom: Geometry) -> Geometry:
    """The window sweep of a splat (the transpose in the image of a stride-1 filter of
    ``geom``): result row ``p``'s flipped tap ``m' = kh - 1 - m`` reads source row ``p - pt' +
    m' * dh`` with ``pt' = (kh - 1) * dh - pt`` (and so along the width), a filter of the
    source grid ``(Ho, Wo)`` onto the result grid ``(H, W)`` with the padding mirrored."""
    if geom.stride != (1, 1):
        raise ValueError(f"the splat's sweep takes stride (1, 1), not {geom.stride}")
    span = [(k - 1) * d for k, d in zip(geom.kernel_size, geom.dilation, strict=True)]
    padding = cast(
        Padding,
        tuple((s - top, s - bottom) for s, (top, bottom) in zip(span, geom.padding, strict=True)),
    )
    return Geometry(geom.out_size, geom.in_size, geom.kernel_size, (1, 1), geom.dilation, padding)


def splat_unsupported_reason(geom: Geometry, check: Callable[[Geometry], str | None]) -> str | None:
    """Why the splat of ``geom`` cannot run as a sweep (one line), or None. ``check``: the
    sweep's own check, applied to the transposed geometry. The per-pixel values of a source row
    come into shared memory as whole 64-column strips, the strip and its neighbours
    (:class:`Staged`), so the source width is a multiple of 64 and the window reaches at most
    64 columns beyond the strip on either side."""
    if geom.stride != (1, 1):
        return f"stride {geom.stride} (the Mosaic splats take stride 1)"
    if min(geom.padding[0]) < 0 or min(geom.padding[1]) < 0:
        return "negative padding"
    wo = geom.out_size[1]
    if wo % STRIP:
        return f"source width {wo} is not a multiple of {STRIP}"
    t = transposed(geom)
    left = t.padding[1][0]
    right = (geom.kernel_size[1] - 1) * geom.dilation[1] - left
    if left > STRIP or right > STRIP or left < 0:
        return f"a window reaching {max(left, right)} columns beyond its strip (at most {STRIP})"
    return check(t)


class Staged:
    """Per-pixel ``[64]`` vectors of one source row at column shifts, through shared memory.

    A splat's tap reads the weights of source pixels ``j0 + shift + t`` (``t < 64``): beyond the
    strip at its ends, and beyond the image at the image's. :meth:`fill` loads the strip's own
    ``[64]`` vector and its neighbours' (whole strips: always inside the image or wholly outside,
    where zeros are stored instead) into a ``[3 * 64]`` row of ``buf``; :meth:`read` loads the
    shifted ``[64]`` window from there. A row outside the image is stored as zeros (its loads
    clamped to a row inside, never used: the source image reads zero there too).

    ``buf``: float32 ``[2, planes, 3 * 64]``: two sets, so that one tap row's fills never
    overwrite what threads still read of the previous one's (each ends with a warpgroup barrier
    before it is read, :meth:`ready`)."""

    def __init__(self, buf, src_height: int, src_width: int, left: int, right: int):
        self.buf, self.h, self.w = buf, src_height, src_width
        self.left, self.right = left > 0, right > 0  # whether the neighbours are read

    def fill(self, slot, plane: int, ref, b, q, j0, *index) -> None:
        """Plane ``plane`` of set ``slot``: ``ref[b, q, j0 - 64 : j0 + 128, *index]`` (zeros
        outside the image)."""
        inside = (q >= 0) & (q < self.h)
        row = jnp.clip(q, 0, self.h - 1)
        parts = [(1, inside)]
        if self.left:
            parts.append((0, inside & (j0 > 0)))
        if self.right:
            parts.append((2, inside & (j0 + STRIP < self.w)))
        for part, ok in parts:
            dest = self.buf.at[slot, plane, pl.ds(part * STRIP, STRIP)]

            @pl.when(ok)
            def _(dest=dest, part=part):
                dest[...] = pixel_row(ref, b, row, j0 + (part - 1) * STRIP, *index)

            @pl.when(jnp.logical_not(ok))
            def _(dest=dest):
                dest[...] = zeros_row()

    @staticmethod
    def ready() -> None:
        """The fills visible to every thread of the warpgroup (a warpgroup barrier)."""
        plgpu.commit_smem()

    def read(self, slot, plane: int, shift: int) -> jax.Array:
        """The ``[64]`` vector of source columns ``j0 + shift + t``, float32."""
        ref = self.buf.at[slot, plane, pl.ds(STRIP + shift, STRIP)]
        return plgpu.load(ref, layout=_ROW)


def staged_bytes(planes: int) -> int:
    """Shared memory of :class:`Staged` with ``planes`` per-pixel vectors."""
    return 2 * planes * 3 * STRIP * 4


def interpret_params(call: KernelCall) -> Any:
    """``call.interpret`` as the kernel takes it: GPU interpret mode's parameters or None."""
    if call.interpret is True:
        return plgpu.InterpretGPUParams()
    return call.interpret or None


def run(
    body,
    operands: Sequence[jax.Array],
    out_type: jax.ShapeDtypeStruct,
    layout: Layout,
    call: KernelCall,
    *,
    name: str,
    batch: int,
    channels: int,
    out_scratch: Any,
    extra_scratch: Sequence[Any] = (),
    grid_shape: tuple[int, int, int] | None = None,
) -> jax.Array:
    """``body(*refs, bufs, bars, obuf, *extra)`` as a Mosaic GPU kernel over the sweep's
    grid (``grid_shape``: another grid of the same axes, :data:`GRID_NAMES`)."""
    lay = layout
    bufs = plgpu.SMEM(
        (lay.images, lay.ring, lay.width, lay.tiles.block_channels), operands[0].dtype
    )
    bars = plgpu.Barrier(num_arrivals=lay.images, num_barriers=lay.ring)
    kernel = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=[bufs, bars, out_scratch, *extra_scratch],
        grid=grid_shape or grid(lay, batch, channels),
        grid_names=GRID_NAMES,
        interpret=interpret_params(call),
        kernel_name=f"svconv_{name}",
    )
    return kernel(*operands)
