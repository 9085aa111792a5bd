"""Modulated 2-D convolution as Pallas (Triton) kernels: forward and the three backward products.

    y[b, i, j, o] = sum_{m, n, c} xpad[b, i*sh + m*dh, j*sw + n*dw, c] * w[m, n, c, o]
                                  * d[b, i, j, m, n]

Every kernel is an implicit GEMM over the stride-phase flat layout of `_common` (each tap is one
contiguous slice of a pre-padded input phase, so loads need no masks and no strided reads):

* forward: a program owns `block_m` flat output pixels x `block_n` output channels and, per tap,
  scales the rows of the shifted input tile by `d[:, tap]` and accumulates one tensor-core dot.
* grad_x: gather form of the transposed conv. A program owns `block_m_dx` flat positions of every
  input phase; the taps that land in a phase form a static arithmetic run, so each phase is one
  loop of `(dy * d_tap) @ w_tap^T` dots. No zero insertion, no atomics.
* grad_w: tap-per-program partial sums `(x_tap * d_tap)^T @ dy` over a chunk of pixel blocks,
  summed over chunks in JAX (deterministic; no `kh*kw` patch tensor).
* grad_d: `dd[p, tap] = sum_o dy[p, o] * (x_tap @ w_tap)[p, o]`, the forward's loop with a row
  reduction instead of an accumulator.

The wrappers pad (zero padding, stride phases, channels to power-of-2 multiples, flat lengths to
whole blocks) in JAX: one fused copy of `x` buys unmasked, always in-bounds tile loads, which
0.11.2 (no masking of non-dividing blocks) and 0.12 treat the same.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    FlatGeometry,
    cdiv,
    channel_block,
    common_unsupported_reason,
    compiler_params,
    from_out_flat,
    from_phases,
    is_pow2,
    next_pow2,
    round_up,
    to_out_flat,
    to_phases,
)
from pallas_kernels.geometry import Geometry

_H100_SMS = 132
_F32 = jnp.float32

# ----------------------------------------------------------------------------------------------
# Tiling configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModulatedBlockSizes:
    """Tile sizes (powers of 2 >= 16 except chunk_dw, num_warps, num_stages); the defaults come
    from `modulated_block_sizes`.

    Attributes:
      block_m: forward / grad_d: flat output pixels per program (dot M).
      block_n: forward: output channels per program (dot N); grad_d: per inner step.
      block_k: forward / grad_d: input channels per dot (dot K).
      block_m_dx: grad_x: flat positions of each input phase per program (dot M).
      block_n_dx: grad_x: input channels per program (dot N).
      block_k_dx: grad_x: output channels per dot (dot K).
      block_m_dw: grad_w: pixels per dot (dot K).
      chunk_dw: grad_w: `block_m_dw` pixel blocks summed per program before the JAX reduction
        (any positive int).
      block_cin_dw: grad_w: input channels per program (dot M).
      block_cout_dw: grad_w: output channels per program (dot N).
      num_warps: warps per program.
      num_stages: software-pipelining depth of the tap loops.
    """

    block_m: int
    block_n: int
    block_k: int
    block_m_dx: int
    block_n_dx: int
    block_k_dx: int
    block_m_dw: int
    chunk_dw: int
    block_cin_dw: int
    block_cout_dw: int
    num_warps: int
    num_stages: int


def _pixel_block(per_image: int, images: int, channel_blocks: int) -> int:
    """Flat pixels per program (the dot's M): `per_image` flat pixels in each of `images`, and
    `channel_blocks` programs sharing each pixel tile."""
    pixels = per_image * images
    # M >= 64 with num_warps a multiple of 4 lets Triton use Hopper wgmma, and 128 amortises the
    # weight tile best: shrink from 128 only while the grid has fewer than 2 programs per SM,
    # and below 64 only for problems too small to fill the GPU anyway (down to 16, the smallest
    # tensor-core M).
    floor = 64 if pixels >= 64 * _H100_SMS else 16
    block = 128
    while block > floor and cdiv(pixels, block) * channel_blocks < 2 * _H100_SMS:
        block //= 2
    return min(block, max(16, next_pow2(per_image)))


def modulated_block_sizes(
    geom: Geometry, *, batch: int, cin: int, cout: int, dtype
) -> ModulatedBlockSizes:
    """Tile sizes for a problem; a heuristic aimed at H100 (not yet tuned on hardware)."""
    g = FlatGeometry.of(geom)
    n = batch
    wide = jnp.dtype(dtype) == jnp.float32
    # fp32 tiles take twice the registers and shared memory of 16-bit ones: halve the channel
    # blocks so 3 pipeline stages of A and B tiles still fit in shared memory.
    ch_cap = 64 if wide else 128
    k_cap = 32 if wide else 64
    block_n = channel_block(cout, ch_cap)
    block_k = channel_block(cin, k_cap)
    block_n_dx = channel_block(cin, ch_cap)
    block_k_dx = channel_block(cout, k_cap)
    block_m = _pixel_block(g.out_flat, n, cdiv(cout, block_n))
    block_m_dx = _pixel_block(g.in_flat, n, cdiv(cin, block_n_dx))
    # grad_w holds a [block_cin, block_cout] fp32 accumulator per program; 64 x 64 keeps it at
    # 32 registers a thread with 4 warps. Its dot contracts over pixels, so M there is channels.
    block_cin_dw = channel_block(cin, 64)
    block_cout_dw = channel_block(cout, 64)
    block_m_dw = 64 if g.out_flat >= 64 else max(16, next_pow2(g.out_flat))
    # One fp32 partial sum per (image, chunk, tap, channel block): long chunks keep the partials
    # (and their JAX reduction) small; enough chunks to give ~4 programs per SM. The chunk need
    # not be a power of 2 (it is a loop count), so it is sized to pad the pixels by < 1 block.
    programs = n * g.num_taps * cdiv(cin, block_cin_dw) * cdiv(cout, block_cout_dw)
    blocks = cdiv(g.out_flat, block_m_dw)
    chunk_dw = cdiv(blocks, min(blocks, cdiv(4 * _H100_SMS, programs)))
    # 8 warps once the fp32 accumulator reaches 128 x 128 elements (64 KiB).
    big_acc = max(block_m * block_n, block_m_dx * block_n_dx) >= 128 * 128
    return ModulatedBlockSizes(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        block_m_dx=block_m_dx,
        block_n_dx=block_n_dx,
        block_k_dx=block_k_dx,
        block_m_dw=block_m_dw,
        chunk_dw=chunk_dw,
        block_cin_dw=block_cin_dw,
        block_cout_dw=block_cout_dw,
        num_warps=8 if big_acc else 4,
        num_stages=3,
    )


def unsupported_reason(geom: Geometry, shapes, dtype) -> str | None:
    """None when the kernels handle this case, else a one-line reason. ``shapes``: the shape
    of every slot (``x``, ``w``, ``d``, ``y``) by name."""
    reason = common_unsupported_reason(geom, dtype)
    if reason is not None:
        return reason
    g = FlatGeometry.of(_cropped(geom)[0])
    # Row arithmetic in the kernels is int32 and Triton picks 32-bit element offsets for arrays
    # under 4 GiB: refuse (rather than risk overflow) images of 2**31 padded elements or more.
    cin_p = round_up(shapes["x"][3], 128)
    cout_p = round_up(shapes["y"][3], 128)
    biggest = max(
        g.num_phases * (g.in_flat + g.max_shift + 128) * cin_p,
        (g.out_flat + g.max_shift + 256) * max(cout_p, g.num_taps),
    )
    if biggest >= 2**31:
        return f"one image needs {biggest} elements, beyond int32 offsets"
    return None


def _check_block_sizes(bs: ModulatedBlockSizes) -> None:
    for f in dataclasses.fields(bs):
        v = getattr(bs, f.name)
        if f.name in ("num_warps", "num_stages", "chunk_dw"):
            if v < 1:
                raise ValueError(f"block_sizes.{f.name} must be >= 1, got {v}")
        elif not (is_pow2(v) and v >= 16):
            raise ValueError(f"block_sizes.{f.name} must be a power of 2 >= 16, got {v}")


def _cropped(geom: Geometry):
    """Negative padding as a crop of the input: the geometry of the cropped input (non-negative
    padding) and the rows/columns cropped on each side."""
    crop = tuple((max(-lo, 0), max(-hi, 0)) for lo, hi in geom.padding)
    size = tuple(n - a - b for n, (a, b) in zip(geom.in_size, crop, strict=True))
    pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in geom.padding)
    return dataclasses.replace(geom, in_size=size, padding=pads), crop


def _crop(x: jax.Array, crop) -> jax.Array:
    (t, b), (l, r) = crop
    return x[:, t : x.shape[1] - b, l : x.shape[2] - r]


def _setup(geom: Geometry, batch: int, cin: int, cout: int, dtype, block_sizes):
    if block_sizes is None:
        block_sizes = modulated_block_sizes(geom, batch=batch, cin=cin, cout=cout, dtype=dtype)
    _check_block_sizes(block_sizes)
    return FlatGeometry.of(geom), block_sizes


# ----------------------------------------------------------------------------------------------
# Kernel bodies
# ----------------------------------------------------------------------------------------------


def _tap_loop(g: FlatGeometry, rows, cols, body, carry):
    """Runs `body(tap, shift, carry)` over the taps of one phase as one (pipelinable) loop."""
    kw, wq = g.kernel_size[1], g.phase_size[1]

    def step(k, carry):
        # lax.div / lax.rem: jnp's floor division lowers badly in Triton; k >= 0 so they agree.
        km, kn = lax.div(k, cols.count), lax.rem(k, cols.count)
        tap = (rows.first + km * rows.step) * kw + cols.first + kn * cols.step
        shift = (rows.q_first + km * rows.q_step) * wq + cols.q_first + kn * cols.q_step
        return body(tap, shift, carry)

    return lax.fori_loop(0, rows.count * cols.count, step, carry)


def _fwd_kernel(x_ref, w_ref, d_ref, y_ref, *, g, block_m, block_k, precision):
    # x_ref [P, Lx, Cin_p] (one image), w_ref [T, Cin_p, bn], d_ref [T, bm], y_ref [bm, bn].
    p0 = pl.program_id(1) * block_m
    n_k = x_ref.shape[-1] // block_k

    def tap_body(phase, tap, shift, acc):
        scale = d_ref[tap, :].astype(_F32)[:, None]
        for kb in range(n_k):
            ks = pl.ds(kb * block_k, block_k)
            xt = x_ref[phase, pl.ds(p0 + shift, block_m), ks]
            xs = (xt.astype(_F32) * scale).astype(xt.dtype)
            acc += jnp.dot(xs, w_ref[tap, ks, :], preferred_element_type=_F32, precision=precision)
        return acc

    acc = jnp.zeros(y_ref.shape, _F32)
    for phase, rows, cols in g.phase_tap_ranges():
        if rows.count and cols.count:
            acc = _tap_loop(g, rows, cols, functools.partial(tap_body, phase), acc)
    y_ref[...] = acc.astype(y_ref.dtype)


def _dx_kernel(dy_ref, wt_ref, d_ref, dx_ref, *, g, block_m, block_k, front, precision):
    # dy_ref [front + L, Cout_p], wt_ref [T, Cout_p, bn], d_ref [T, front + L],
    # dx_ref [P, bm, bn]. Position q of a phase gathers output pixel q - shift of each of the
    # phase's taps; `front` zero rows keep q - shift >= 0, and d (zero on junk columns and past
    # the last row) masks pixels that do not exist.
    q0 = pl.program_id(1) * block_m + front
    n_k = dy_ref.shape[-1] // block_k

    def tap_body(tap, shift, acc):
        rows = pl.ds(q0 - shift, block_m)
        scale = d_ref[tap, rows].astype(_F32)[:, None]
        for kb in range(n_k):
            ks = pl.ds(kb * block_k, block_k)
            gt = dy_ref[rows, ks]
            gs = (gt.astype(_F32) * scale).astype(gt.dtype)
            acc += jnp.dot(gs, wt_ref[tap, ks, :], preferred_element_type=_F32, precision=precision)
        return acc

    for phase, rows, cols in g.phase_tap_ranges():
        acc = jnp.zeros(dx_ref.shape[1:], _F32)
        if rows.count and cols.count:
            acc = _tap_loop(g, rows, cols, tap_body, acc)
        dx_ref[phase] = acc.astype(dx_ref.dtype)


def _dw_kernel(x_ref, dy_ref, d_ref, dw_ref, *, g, block_m, chunk, precision):
    # x_ref [P, Lx, bci], dy_ref [L, bco], d_ref [T, L], dw_ref [bci, bco] (fp32 partial sum of
    # one tap over `chunk` pixel blocks of one image).
    (_, kw), (sh, sw), (dh, dw), wq = g.kernel_size, g.stride, g.dilation, g.phase_size[1]
    tap = pl.program_id(2)
    m, n = lax.div(tap, kw), lax.rem(tap, kw)
    phase = lax.rem(m * dh, sh) * sw + lax.rem(n * dw, sw)
    shift = lax.div(m * dh, sh) * wq + lax.div(n * dw, sw)
    base = pl.program_id(3) * (chunk * block_m)

    def body(i, acc):
        p0 = base + i * block_m
        xt = x_ref[phase, pl.ds(p0 + shift, block_m), :]
        xs = (xt.astype(_F32) * d_ref[tap, pl.ds(p0, block_m)].astype(_F32)[:, None]).astype(
            xt.dtype
        )
        dyt = dy_ref[pl.ds(p0, block_m), :]
        # Contract over pixels (dim 0 of both): Triton transposes the A tile in registers.
        return acc + lax.dot_general(
            xs, dyt, (((0,), (0,)), ((), ())), preferred_element_type=_F32, precision=precision
        )

    dw_ref[...] = lax.fori_loop(0, chunk, body, jnp.zeros(dw_ref.shape, _F32))


def _dd_kernel(x_ref, w_ref, dy_ref, dd_ref, *, g, block_m, block_n, block_k, precision):
    # x_ref [P, Lx, Cin_p], w_ref [T, Cin_p, Cout_p], dy_ref [bm, Cout_p], dd_ref [T, bm] fp32.
    p0 = pl.program_id(0) * block_m
    n_k = x_ref.shape[-1] // block_k
    n_n = dy_ref.shape[-1] // block_n

    def tap_body(phase, tap, shift, carry):
        total = jnp.zeros((block_m,), _F32)
        for nb in range(n_n):
            ns = pl.ds(nb * block_n, block_n)
            z = jnp.zeros((block_m, block_n), _F32)
            for kb in range(n_k):
                ks = pl.ds(kb * block_k, block_k)
                xt = x_ref[phase, pl.ds(p0 + shift, block_m), ks]
                z += jnp.dot(
                    xt, w_ref[tap, ks, ns], preferred_element_type=_F32, precision=precision
                )
            total += jnp.sum(dy_ref[:, ns].astype(_F32) * z, axis=1)
        dd_ref[tap, :] = total
        return carry

    for phase, rows, cols in g.phase_tap_ranges():
        if rows.count and cols.count:
            _tap_loop(g, rows, cols, functools.partial(tap_body, phase), jnp.int32(0))


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers
# ----------------------------------------------------------------------------------------------


def _taps_flat(d, g: FlatGeometry, front: int, length: int):
    """d [N, Ho, Wo, kh, kw] or [Ho, Wo, kh, kw] -> tap-major flat [N or 1, T, front + length],
    zero on junk columns and padding so that it masks pixels that do not exist."""
    d = d if d.ndim == 5 else d[None]
    d = d.reshape(*d.shape[:3], g.num_taps)
    return to_out_flat(d, g, front, length, g.num_taps).transpose(0, 2, 1)


def _flat_lengths(g: FlatGeometry, bs: ModulatedBlockSizes) -> tuple[int, int]:
    """(output flat length, input phase length) shared by forward, grad_w and grad_d: under one
    jit XLA then builds the padded copies of x, d and dy once for all three."""
    lo = round_up(round_up(g.out_flat, bs.chunk_dw * bs.block_m_dw), bs.block_m)
    return lo, lo + g.max_shift


def _d_index(shared: bool):
    return (lambda b: 0) if shared else (lambda b: b)


_STATIC = ("geom", "out_shape", "precision", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(
    x: jax.Array,
    w: jax.Array,
    d: jax.Array,
    *,
    geom: Geometry,
    out_shape: tuple[int, ...],
    precision: lax.Precision | None = None,
    block_sizes: ModulatedBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Modulated conv forward.

    Args:
      x: [N, H, W, Cin]; w: [kh, kw, Cin, Cout]; d: [N, Ho, Wo, kh, kw] or [Ho, Wo, kh, kw].
      out_shape: [N, Ho, Wo, Cout].

    Returns:
      y: [N, Ho, Wo, Cout], x's dtype (fp32 accumulation).
    """
    n, _, _, cin = x.shape
    cout = out_shape[3]
    geom, crop = _cropped(geom)
    x = _crop(x, crop)
    g, bs = _setup(geom, n, cin, cout, x.dtype, block_sizes)
    bm, bk = bs.block_m, bs.block_k
    bn = bs.block_n
    cin_p, cout_p = round_up(cin, bk), round_up(cout, bn)
    lo, lx = _flat_lengths(g, bs)
    xp = to_phases(x, g, lx, cin_p)
    wp = jnp.pad(w.reshape(g.num_taps, cin, cout), ((0, 0), (0, cin_p - cin), (0, cout_p - cout)))
    dp = _taps_flat(d, g, 0, lo)
    m_blocks = cdiv(g.out_flat, bm)
    d_b = _d_index(d.ndim == 4)
    kernel = functools.partial(_fwd_kernel, g=g, block_m=bm, block_k=bk, precision=precision)
    y = pl.pallas_call(
        kernel,
        grid=(cout_p // bn, m_blocks, n),
        in_specs=[
            pl.BlockSpec((None, *xp.shape[1:]), lambda j, i, b: (b, 0, 0, 0)),
            pl.BlockSpec((g.num_taps, cin_p, bn), lambda j, i, b: (0, 0, j)),
            pl.BlockSpec((None, g.num_taps, bm), lambda j, i, b: (d_b(b), 0, i)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda j, i, b: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((n, m_blocks * bm, cout_p), x.dtype),
        compiler_params=compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="svconv_modulated_forward",
    )(xp, wp, dp)
    return from_out_flat(y, g, cout)


@functools.partial(jax.jit, static_argnames=_STATIC)
def grad_x(
    w: jax.Array,
    d: jax.Array,
    dy: jax.Array,
    *,
    geom: Geometry,
    out_shape: tuple[int, ...],
    precision: lax.Precision | None = None,
    block_sizes: ModulatedBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Gradient of the forward with respect to x.

    Args:
      w: [kh, kw, Cin, Cout]; d: [N, Ho, Wo, kh, kw] or [Ho, Wo, kh, kw]; dy: [N, Ho, Wo, Cout].
      out_shape: [N, H, W, Cin].

    Returns:
      dx: [N, H, W, Cin], dy's dtype.
    """
    n, _, _, cout = dy.shape
    cin = w.shape[2]
    geom, crop = _cropped(geom)
    g, bs = _setup(geom, n, cin, cout, dy.dtype, block_sizes)
    bm, bn, bk = bs.block_m_dx, bs.block_n_dx, bs.block_k_dx
    cin_p, cout_p = round_up(cin, bn), round_up(cout, bk)
    lq = round_up(g.in_flat, bm)
    front = g.max_shift
    dyp = to_out_flat(dy, g, front, lq, cout_p)
    wt = jnp.pad(
        w.reshape(g.num_taps, cin, cout).transpose(0, 2, 1),
        ((0, 0), (0, cout_p - cout), (0, cin_p - cin)),
    )
    dp = _taps_flat(d, g, front, lq)
    d_b = _d_index(d.ndim == 4)
    p = g.num_phases
    kernel = functools.partial(
        _dx_kernel, g=g, block_m=bm, block_k=bk, front=front, precision=precision
    )
    dxp = pl.pallas_call(
        kernel,
        grid=(cin_p // bn, lq // bm, n),
        in_specs=[
            pl.BlockSpec((None, *dyp.shape[1:]), lambda j, i, b: (b, 0, 0)),
            pl.BlockSpec((g.num_taps, cout_p, bn), lambda j, i, b: (0, 0, j)),
            pl.BlockSpec((None, *dp.shape[1:]), lambda j, i, b: (d_b(b), 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, p, bm, bn), lambda j, i, b: (b, 0, i, j)),
        out_shape=jax.ShapeDtypeStruct((n, p, lq, cin_p), dy.dtype),
        compiler_params=compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="svconv_modulated_grad_x",
    )(dyp, wt, dp)
    dx = from_phases(dxp, g, cin)
    return jnp.pad(dx, ((0, 0), *crop, (0, 0)))


@functools.partial(jax.jit, static_argnames=_STATIC)
def grad_w(
    x: jax.Array,
    d: jax.Array,
    dy: jax.Array,
    *,
    geom: Geometry,
    out_shape: tuple[int, ...],
    precision: lax.Precision | None = None,
    block_sizes: ModulatedBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Gradient of the forward with respect to w.

    Args:
      x: [N, H, W, Cin]; d: [N, Ho, Wo, kh, kw] or [Ho, Wo, kh, kw]; dy: [N, Ho, Wo, Cout].
      out_shape: [kh, kw, Cin, Cout].

    Returns:
      dw: [kh, kw, Cin, Cout], x's dtype (fp32 partial sums reduced in fp32).
    """
    n, _, _, cin = x.shape
    cout = dy.shape[-1]
    geom, crop = _cropped(geom)
    x = _crop(x, crop)
    g, bs = _setup(geom, n, cin, cout, x.dtype, block_sizes)
    bm, chunk = bs.block_m_dw, bs.chunk_dw
    bci, bco = bs.block_cin_dw, bs.block_cout_dw
    cin_p, cout_p = round_up(cin, bci), round_up(cout, bco)
    lo, lx = _flat_lengths(g, bs)
    n_chunks = cdiv(g.out_flat, chunk * bm)
    xp = to_phases(x, g, lx, cin_p)
    dyp = to_out_flat(dy, g, 0, lo, cout_p)
    dp = _taps_flat(d, g, 0, lo)
    d_b = _d_index(d.ndim == 4)
    t = g.num_taps
    kernel = functools.partial(_dw_kernel, g=g, block_m=bm, chunk=chunk, precision=precision)
    partial = pl.pallas_call(
        kernel,
        grid=(cout_p // bco, cin_p // bci, t, n_chunks, n),
        in_specs=[
            pl.BlockSpec(
                (None, g.num_phases, xp.shape[2], bci), lambda j, i, k, c, b: (b, 0, 0, i)
            ),
            pl.BlockSpec((None, lo, bco), lambda j, i, k, c, b: (b, 0, j)),
            pl.BlockSpec((None, t, lo), lambda j, i, k, c, b: (d_b(b), 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, bci, bco), lambda j, i, k, c, b: (b, c, k, i, j)),
        out_shape=jax.ShapeDtypeStruct((n, n_chunks, t, cin_p, cout_p), _F32),
        compiler_params=compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="svconv_modulated_grad_w",
    )(xp, dyp, dp)
    dw = partial.sum(axis=(0, 1))[:, :cin, :cout]
    return dw.reshape(out_shape).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def grad_d(
    x: jax.Array,
    w: jax.Array,
    dy: jax.Array,
    *,
    geom: Geometry,
    out_shape: tuple[int, ...],
    precision: lax.Precision | None = None,
    block_sizes: ModulatedBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Gradient of the forward with respect to d.

    Args:
      x: [N, H, W, Cin]; w: [kh, kw, Cin, Cout]; dy: [N, Ho, Wo, Cout].
      out_shape: [N, Ho, Wo, kh, kw], or [Ho, Wo, kh, kw] for a batch-shared d (summed over N).

    Returns:
      dd of ``out_shape``, x's dtype.
    """
    n, _, _, cin = x.shape
    kh, kw, _, cout = w.shape
    geom, crop = _cropped(geom)
    x = _crop(x, crop)
    g, bs = _setup(geom, n, cin, cout, x.dtype, block_sizes)
    bm, bk, bn = bs.block_m, bs.block_k, bs.block_n
    cin_p, cout_p = round_up(cin, bk), round_up(cout, bn)
    lo, lx = _flat_lengths(g, bs)
    m_blocks = cdiv(g.out_flat, bm)
    t = g.num_taps
    xp = to_phases(x, g, lx, cin_p)
    wp = jnp.pad(w.reshape(t, cin, cout), ((0, 0), (0, cin_p - cin), (0, cout_p - cout)))
    dyp = to_out_flat(dy, g, 0, lo, cout_p)
    kernel = functools.partial(
        _dd_kernel, g=g, block_m=bm, block_n=bn, block_k=bk, precision=precision
    )
    ddf = pl.pallas_call(
        kernel,
        grid=(m_blocks, n),
        in_specs=[
            pl.BlockSpec((None, *xp.shape[1:]), lambda i, b: (b, 0, 0, 0)),
            pl.BlockSpec((t, cin_p, cout_p), lambda i, b: (0, 0, 0)),
            pl.BlockSpec((None, bm, cout_p), lambda i, b: (b, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, t, bm), lambda i, b: (b, 0, i)),
        out_shape=jax.ShapeDtypeStruct((n, t, m_blocks * bm), _F32),
        compiler_params=compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="svconv_modulated_grad_d",
    )(xp, wp, dyp)
    dd = from_out_flat(ddf.transpose(0, 2, 1), g, t)
    dd = dd.reshape(*dd.shape[:3], kh, kw)
    return (dd if len(out_shape) == 5 else dd.sum(axis=0)).astype(x.dtype)
