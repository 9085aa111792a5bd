"""Per-pixel filter kernels (Pallas, Triton backend): gather, its transpose in x, its gradient in k.

Shapes (NHWC): x: [N, H, W, C], dy: [N, Ho, Wo, C]; k: [N, Ho, Wo, kh, kw, G], channel c in group
c // (C // G).

* `forward(x, k)[b, i, j, c] =
  sum_{m,n} xpad[b, i*sh + m*dh, j*sw + n*dw, c] * k[b, i, j, m, n, g(c)]` (a gather);
* `grad_x(k, dy)`: its transpose in x (a scatter: each source pixel spreads its own filter);
* `grad_k(x, dy)`: its transpose in k (a correlation).

Every program owns a tile of output pixels and a block of channels, held as a
[pixels, groups, channels-of-a-group] array: a per-(pixel, group) filter value then broadcasts over
the last axis, and the group reduction of `grad_k` is a reduction over it. Refs are whole arrays
addressed with integer index arrays and masks, so zero padding, strides, dilation, ragged tiles and
odd channel counts are all masked lanes: no padded copy of any input is ever made, and no
kh*kw-times patch tensor exists.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.triton import _common as cm

# ------------------------------------------------------------------------------------------------
# Tiling config
# ------------------------------------------------------------------------------------------------

_NUM_SMS = 132  # H100 SXM
_LANE_BYTES = 256  # contiguous bytes of one pixel's channels loaded per program
_TILE_ELEMENTS = 4096  # fp32 accumulator elements per program


@dataclasses.dataclass(frozen=True)
class PixelBlockSizes:
    """Work of one program.

    Attributes:
      block_h, block_w: output pixels per program (for `grad_x`: pixels of one stride phase).
      block_groups: groups per program.
      block_channels: channels of one group per program (a group wider than this is split).
      num_warps, num_stages: Triton launch settings.
      column_phases: ``forward`` only: output columns computed as this many interleaved sets,
        the window's columns unrolled, so that one loaded image vector serves several taps
        (``_forward_phased``). 1: one tap at a time (the default, the only form a GPU has
        timed so far).
      unmasked_interior: ``forward`` only: a program whose tile and window lie wholly inside
        the image and whose channel block is full runs its tap loop without bounds tests (a
        branch per program; the loads of the other programs stay masked). Not the default
        until a GPU has timed it.

    Raises:
      ValueError: when constructed: a block size that is not a power of 2, a ``num_warps``
        that is not a power of 2, a ``num_stages`` below 1, a ``column_phases`` that is not a
        power of 2 or exceeds ``block_w``, a ``unmasked_interior`` that is not a bool (the
        message names the field).
    """

    block_h: int
    block_w: int
    block_groups: int
    block_channels: int
    num_warps: int = 4
    num_stages: int = 2
    column_phases: int = 1
    unmasked_interior: bool = False

    def __post_init__(self) -> None:
        cm.check_tiles(self, minimum=1)
        if self.column_phases > self.block_w:
            raise ValueError(
                f"PixelBlockSizes.column_phases ({self.column_phases}) must be at most "
                f"block_w ({self.block_w})"
            )


def pixel_block_sizes(
    op: str,
    *,
    channels: int,
    groups: int,
    out_hw: tuple[int, int],
    batch: int,
    dtype,
    column_phases: int = 1,
    unmasked_interior: bool = False,
) -> PixelBlockSizes:
    """Tiles for `op` in ("forward", "grad_x", "grad_k") on an H100.

    `out_hw` is the grid of pixels the programs tile (for grad_x: one stride phase of the
    output) and `batch` the number of such grids (for grad_x: N * sh * sw). `column_phases`
    (forward only) asks for the column-phase forward, with at most the tile's width of phases;
    `unmasked_interior` (forward only) for interior programs without bounds tests.
    """
    if op not in ("forward", "grad_x", "grad_k"):
        raise ValueError(f"op must be 'forward', 'grad_x' or 'grad_k', got {op!r}")
    cpg = channels // groups
    # The kernels are memory-bound: a group's channels are contiguous in memory, so they get the
    # lanes first (one wide vector load per pixel), whole groups next.
    lanes = _LANE_BYTES // jnp.dtype(dtype).itemsize
    block_channels = min(cm.next_pow2(cpg), lanes)
    block_groups = min(cm.next_pow2(groups), max(lanes // block_channels, 1))
    channel_programs = pl.cdiv(groups, block_groups) * pl.cdiv(cpg, block_channels)
    # grad_k keeps every channel block of its groups live (the dy tiles); the others one.
    live = block_groups * block_channels
    if op == "grad_k":
        live *= pl.cdiv(cpg, block_channels)
        channel_programs = pl.cdiv(groups, block_groups)
    # 4096 fp32 accumulator elements is 32 registers a thread at 4 warps, leaving room for the
    # input tiles of the next tap in flight.
    pixels = max(_TILE_ELEMENTS // live, 1)
    h, w = out_hw
    # Pixels beyond the image are masked lanes: don't make tiles much larger than the image.
    pixels = min(pixels, cm.next_pow2(h) * cm.next_pow2(w))
    # At least two programs per SM so that one program's loads overlap another's arithmetic;
    # below 16 pixels a tile's halo (re-read for every tap) costs more than the idle SMs.
    while pixels > 16 and batch * pl.cdiv(h * w, pixels) * channel_programs < 2 * _NUM_SMS:
        pixels //= 2
    # Square tiles re-read the least halo per tap; the wider side goes along W, where a tile row
    # is one contiguous run of block_w * C elements.
    block_w = min(cm.next_pow2(w), cm.next_pow2(math.isqrt(pixels - 1) + 1))
    block_w = max(block_w, pixels // cm.next_pow2(h))
    block_h = pixels // block_w
    # The tap loop has independent loads every iteration: double buffering hides their latency.
    return PixelBlockSizes(
        block_h,
        block_w,
        block_groups,
        block_channels,
        num_warps=4,
        num_stages=2,
        column_phases=min(column_phases, block_w),
        unmasked_interior=unmasked_interior,
    )


def _tile_pixels(ti, tj, bs: PixelBlockSizes):
    """Row and column of every pixel of tile (ti, tj), each [P, 1]."""
    p = jnp.arange(bs.block_h * bs.block_w)[:, None]
    return ti * bs.block_h + lax.div(p, bs.block_w), tj * bs.block_w + lax.rem(p, bs.block_w)


def _block_channels(gb, sb, cpg: int, groups: int, bs: PixelBlockSizes):
    """Groups [1, TG, 1] and channels [1, TG, TS] of channel block (gb, sb), and which are real."""
    grp = gb * bs.block_groups + jnp.arange(bs.block_groups)[None, :, None]
    sub = sb * bs.block_channels + jnp.arange(bs.block_channels)[None, None, :]
    return grp, grp * cpg + sub, (grp < groups) & (sub < cpg)


def _interior(ti, tj, g: Geometry, bs: PixelBlockSizes, shapes, groups: int):
    """Whether program tile ``(ti, tj)`` needs no bounds test in the forward's tap loop: its
    output pixels inside the output, every tap's input inside the image, its channel block
    full. None when the tiles do not ask for it (or channel blocks are never full)."""
    (h, w), (ho, wo), c = shapes
    cpg = c // groups
    if not bs.unmasked_interior or groups % bs.block_groups or cpg % bs.block_channels:
        return None
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    r0, c0 = ti * bs.block_h, tj * bs.block_w
    r1, c1 = r0 + bs.block_h - 1, c0 + bs.block_w - 1  # the tile's last row and column
    return (
        (r1 < ho)
        & (c1 < wo)
        & (r0 * sh - ptop >= 0)
        & (c0 * sw - pleft >= 0)
        & (r1 * sh + (kh - 1) * dh - ptop < h)
        & (c1 * sw + (kw - 1) * dw - pleft < w)
    )


def _tap_loop(interior, loop):
    """``loop(masked)`` (a function of the accumulator) with bounds tests, or without them in a
    branch of its own where ``interior`` (a scalar) holds."""
    if interior is None:
        return loop(True)
    return lambda acc: lax.cond(interior, loop(False), loop(True), acc)


# ------------------------------------------------------------------------------------------------
# Kernel bodies
# ------------------------------------------------------------------------------------------------


def _forward_kernel(x_ref, k_ref, *refs, g: Geometry, bs: PixelBlockSizes, n_sub: int, n_th: int):
    """``y = sum_tap x * k``; with the tangent refs ``tx, tk`` before ``y``'s, its tangent."""
    *tangents, o_ref = refs
    pairs = cm.products(x_ref, k_ref, tangents)
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    _, h, w, c = x_ref.shape
    _, ho, wo, _, _, groups = k_ref.shape
    gb, sb = cm.split(pl.program_id(0), n_sub)
    b, ti = cm.split(pl.program_id(2), n_th)
    rows, cols = _tile_pixels(ti, pl.program_id(1), bs)
    rows, cols = rows[..., None], cols[..., None]  # [P, 1, 1]
    grp, chan, chan_ok = _block_channels(gb, sb, c // groups, groups, bs)
    pix_ok = (rows < ho) & (cols < wo)
    k_ok = pix_ok & (grp < groups)
    interior = _interior(ti, pl.program_id(1), g, bs, ((h, w), (ho, wo), c), groups)

    def loop(masked: bool):
        def tap(m, n, acc):
            r = rows * sh + m * dh - ptop
            q = cols * sw + n * dw - pleft
            x_ok = cm.inside(r, q, h, w) & chan_ok if masked else None
            for image_ref, filter_ref in pairs:
                xt = cm.gather(image_ref.at[b, r, q, chan], x_ok, cm.KEEP)
                kt = cm.gather(filter_ref.at[b, rows, cols, m, n, grp], k_ok if masked else None)
                acc += xt.astype(jnp.float32) * kt.astype(jnp.float32)
            return acc

        return lambda acc: lax.fori_loop(
            0, kh, lambda m, a: lax.fori_loop(0, kw, functools.partial(tap, m), a), acc
        )

    acc = jnp.zeros((rows.shape[0], bs.block_groups, bs.block_channels), jnp.float32)
    acc = _tap_loop(interior, loop)(acc)
    plt.store(o_ref.at[b, rows, cols, chan], acc.astype(o_ref.dtype), mask=pix_ok & chan_ok)


def _grad_x_kernel(
    dy_ref, k_ref, *refs, g: Geometry, bs: PixelBlockSizes, n_sub: int, n_th: int, n_tw: int
):
    """The splat of ``dy`` with ``k``; with the tangent refs ``tdy, tk`` before the result's,
    its tangent."""
    *tangents, o_ref = refs
    pairs = cm.products(dy_ref, k_ref, tangents)
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    _, ho, wo, c = dy_ref.shape
    _, h, w, _ = o_ref.shape
    groups = k_ref.shape[-1]
    gb, sb = cm.split(pl.program_id(0), n_sub)
    phw, tj = cm.split(pl.program_id(1), n_tw)
    b, rest = cm.split(pl.program_id(2), sh * n_th)
    phh, ti = cm.split(rest, n_th)
    # The program's pixels are (R * sh + phh, Q * sw + phw) for (R, Q) in its tile: only the taps
    # of that phase reach them, each from source pixel (R + const, Q + const).
    big_r, big_q = _tile_pixels(ti, tj, bs)
    big_r, big_q = big_r[..., None], big_q[..., None]
    rows, cols = big_r * sh + phh, big_q * sw + phw
    grp, chan, chan_ok = _block_channels(gb, sb, c // groups, groups, bs)
    taps_h = cm.phase_taps(phh, ptop, kh, sh, dh)
    taps_w = cm.phase_taps(phw, pleft, kw, sw, dw)

    def tap(m, n, acc):
        i, j = big_r + taps_h.offset(m), big_q + taps_w.offset(n)
        ok = cm.inside(i, j, ho, wo)
        for source_ref, filter_ref in pairs:
            dyt = cm.gather(source_ref.at[b, i, j, chan], ok & chan_ok, cm.KEEP)
            kt = cm.gather(filter_ref.at[b, i, j, m, n, grp], ok & (grp < groups))
            acc += dyt.astype(jnp.float32) * kt.astype(jnp.float32)
        return acc

    acc = jnp.zeros((rows.shape[0], bs.block_groups, bs.block_channels), jnp.float32)
    acc = cm.phase_loop(taps_h, taps_w, tap, acc)
    ok = (rows < h) & (cols < w) & chan_ok
    plt.store(o_ref.at[b, rows, cols, chan], acc.astype(o_ref.dtype), mask=ok)


def _grad_k_kernel(x_ref, dy_ref, o_ref, *, g: Geometry, bs: PixelBlockSizes, n_th: int):
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    _, h, w, c = x_ref.shape
    _, ho, wo, _, _, groups = o_ref.shape
    cpg = c // groups
    gb = pl.program_id(0)
    b, ti = cm.split(pl.program_id(2), n_th)
    rows, cols = _tile_pixels(ti, pl.program_id(1), bs)
    rows3, cols3 = rows[..., None], cols[..., None]
    pix_ok = (rows3 < ho) & (cols3 < wo)
    blocks = [
        _block_channels(gb, sb, cpg, groups, bs) for sb in range(pl.cdiv(cpg, bs.block_channels))
    ]
    # dy is the same for every tap: read it once.
    dyts = [
        cm.gather(dy_ref.at[b, rows3, cols3, chan], pix_ok & ok).astype(jnp.float32)
        for _, chan, ok in blocks
    ]
    grp = blocks[0][0][..., 0]  # [1, TG]
    out_ok = (rows < ho) & (cols < wo) & (grp < groups)

    def tap(m, n, carry):
        r = rows3 * sh + m * dh - ptop
        q = cols3 * sw + n * dw - pleft
        acc = jnp.zeros((rows.shape[0], bs.block_groups), jnp.float32)
        for (_, chan, ok), dyt in zip(blocks, dyts, strict=True):
            xt = cm.gather(x_ref.at[b, r, q, chan], cm.inside(r, q, h, w) & ok, cm.KEEP)
            acc += jnp.sum(xt.astype(jnp.float32) * dyt, axis=2)
        plt.store(o_ref.at[b, rows, cols, m, n, grp], acc.astype(o_ref.dtype), mask=out_ok)
        return carry

    lax.fori_loop(0, kh, lambda m, _: lax.fori_loop(0, kw, functools.partial(tap, m), 0), 0)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers
# ------------------------------------------------------------------------------------------------


def _forward_phased(x_ref, k_ref, *refs, g: Geometry, bs: PixelBlockSizes, n_sub: int, n_th: int):
    """:func:`_forward_kernel` computing ``J = bs.column_phases`` interleaved sets of output
    columns (column ``J * q + s`` of the tile in accumulator ``s``), the window's columns
    unrolled: an image vector loaded for input column offset ``u`` serves every ``(s, n)`` with
    ``s * sw + n * dw = u`` (stride 1, dilation 1: ``J + kw - 1`` loads a row of taps instead of
    ``J * kw``)."""
    *tangents, o_ref = refs
    pairs = cm.products(x_ref, k_ref, tangents)
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    _, h, w, c = x_ref.shape
    _, ho, wo, _, _, groups = k_ref.shape
    phases = bs.column_phases
    gb, sb = cm.split(pl.program_id(0), n_sub)
    b, ti = cm.split(pl.program_id(2), n_th)
    per_phase = bs.block_w // phases
    p = jnp.arange(bs.block_h * per_phase)[:, None, None]  # [P, 1, 1]
    rows = ti * bs.block_h + lax.div(p, per_phase)
    first_col = pl.program_id(1) * bs.block_w + phases * lax.rem(p, per_phase)
    cols = [first_col + s for s in range(phases)]
    grp, chan, chan_ok = _block_channels(gb, sb, c // groups, groups, bs)
    pix_ok = [(rows < ho) & (q < wo) for q in cols]
    k_ok = [ok & (grp < groups) for ok in pix_ok]
    # Input column of output column s and tap n: first_col * sw + (s * sw + n * dw) - pleft.
    uses: dict[int, list[tuple[int, int]]] = {}
    for s in range(phases):
        for n in range(kw):
            uses.setdefault(s * sw + n * dw, []).append((s, n))

    interior = _interior(ti, pl.program_id(1), g, bs, ((h, w), (ho, wo), c), groups)

    def loop(masked: bool):
        def row(m, accs):
            accs = list(accs)
            r = rows * sh + m * dh - ptop
            for u, pairs_at in sorted(uses.items()):
                q = first_col * sw + u - pleft
                x_ok = cm.inside(r, q, h, w) & chan_ok if masked else None
                for image_ref, filter_ref in pairs:
                    xt = cm.gather(image_ref.at[b, r, q, chan], x_ok, cm.KEEP).astype(jnp.float32)
                    for s, n in pairs_at:
                        view = filter_ref.at[b, rows, cols[s], m, n, grp]
                        kt = cm.gather(view, k_ok[s] if masked else None)
                        accs[s] = accs[s] + xt * kt.astype(jnp.float32)
            return tuple(accs)

        return lambda accs: lax.fori_loop(0, kh, row, accs)

    zero = jnp.zeros((p.shape[0], bs.block_groups, bs.block_channels), jnp.float32)
    accs = _tap_loop(interior, loop)((zero,) * phases)
    for q, ok, acc in zip(cols, pix_ok, accs, strict=True):
        plt.store(o_ref.at[b, rows, q, chan], acc.astype(o_ref.dtype), mask=ok & chan_ok)


def unsupported_reason(geom: Geometry, shapes, dtype) -> str | None:
    """None when the pixel kernels handle this case, else why not (one line). ``shapes``: the
    shape of every slot (``x``, ``k``, ``y``) by name."""
    del geom  # every geometry the API accepts
    return cm.common_unsupported_reason(shapes, dtype)


def forward(x: jax.Array, k: jax.Array, call: KernelCall) -> jax.Array:
    """Per-pixel filter (the gather): x [N, H, W, C], k [N, Ho, Wo, kh, kw, G] -> [N, Ho, Wo,
    C]; channel c uses group c // (C // G)."""
    return _forward(x, k, (), call)


def forward_jvp(x, k, tx, tk, call: KernelCall) -> jax.Array:
    """The forward's tangent ``forward(tx, k) + forward(x, tk)`` (None for a zero tangent) in
    one kernel."""
    return _forward(x, k, (tx, tk), call)


def _forward(x, k, tangents, call: KernelCall) -> jax.Array:
    n, _, _, c = x.shape
    _, ho, wo, _, _, groups = k.shape
    bs = call.block_sizes or pixel_block_sizes(
        "forward", channels=c, groups=groups, out_hw=(ho, wo), batch=n, dtype=x.dtype
    )
    n_sub = pl.cdiv(c // groups, bs.block_channels)
    n_th = pl.cdiv(ho, bs.block_h)
    grid = (pl.cdiv(groups, bs.block_groups) * n_sub, pl.cdiv(wo, bs.block_w), n * n_th)
    kernel = _forward_phased if bs.column_phases > 1 else _forward_kernel
    body = functools.partial(kernel, g=call.geom, bs=bs, n_sub=n_sub, n_th=n_th)
    name = "pixel_forward_jvp" if tangents else "pixel_forward"
    return cm.run(body, (x, k, *tangents), call, name=name, grid=grid, tiles=bs)


def grad_x(k: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Transpose of `forward` in x (the scatter): each source pixel spreads its own filter;
    k, dy [N, Ho, Wo, C] -> [N, H, W, C].

    Computed in gather form (each output pixel sums the source pixels that reach it), one program
    per stride phase of the output, so no atomics and no wasted taps.
    """
    return _grad_x(k, dy, (), call)


def grad_x_jvp(k, dy, tk, tdy, call: KernelCall) -> jax.Array:
    """The splat's tangent ``grad_x(tk, dy) + grad_x(k, tdy)`` (None for a zero tangent) in one
    kernel."""
    return _grad_x(k, dy, (tdy, tk), call)


def _grad_x(k, dy, tangents, call: KernelCall) -> jax.Array:
    n, h, w, c = call.out_shape
    groups = k.shape[-1]
    sh, sw = call.geom.stride
    hq, wq = pl.cdiv(h, sh), pl.cdiv(w, sw)
    bs = call.block_sizes or pixel_block_sizes(
        "grad_x", channels=c, groups=groups, out_hw=(hq, wq), batch=n * sh * sw, dtype=dy.dtype
    )
    n_sub = pl.cdiv(c // groups, bs.block_channels)
    n_th, n_tw = pl.cdiv(hq, bs.block_h), pl.cdiv(wq, bs.block_w)
    grid = (pl.cdiv(groups, bs.block_groups) * n_sub, sw * n_tw, n * sh * n_th)
    body = functools.partial(_grad_x_kernel, g=call.geom, bs=bs, n_sub=n_sub, n_th=n_th, n_tw=n_tw)
    name = "pixel_grad_x_jvp" if tangents else "pixel_grad_x"
    return cm.run(body, (dy, k, *tangents), call, name=name, grid=grid, tiles=bs)


def grad_k(x: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Transpose of `forward` in k (its gradient with respect to k): x, dy -> [N, Ho, Wo, kh, kw,
    G]; a program owns a pixel tile and whole groups, and sums each group's channels in
    registers."""
    n, _, _, c = x.shape
    _, ho, wo, _, _, groups = call.out_shape
    bs = call.block_sizes or pixel_block_sizes(
        "grad_k", channels=c, groups=groups, out_hw=(ho, wo), batch=n, dtype=x.dtype
    )
    n_th = pl.cdiv(ho, bs.block_h)
    grid = (pl.cdiv(groups, bs.block_groups), pl.cdiv(wo, bs.block_w), n * n_th)
    body = functools.partial(_grad_k_kernel, g=call.geom, bs=bs, n_th=n_th)
    return cm.run(body, (x, dy), call, name="pixel_grad_k", grid=grid, tiles=bs)
