"""Modulated 2-D convolution as Pallas (Triton) kernels: forward and the three backward products.

    y[b, i, j, o] = sum_{m, n, c} x[b, i*sh + m*dh - pt, j*sw + n*dw - pl, c] * w[m, n, c, o]
                                  * d[b, i, j, m, n]

Every kernel reads its inputs in the layouts the caller passes (``x [N, H, W, Cin]``,
``w [kh, kw, Cin, Cout]``, ``d [N, Ho, Wo, kh, kw]`` or batch-shared ``[Ho, Wo, kh, kw]``,
``dy [N, Ho, Wo, Cout]``) and writes its result in the layout returned: refs are whole arrays
addressed with index arrays and masks, so zero padding (and negative padding, a crop), strides,
dilation, ragged tiles and odd channel counts are masked lanes of the loads. XLA builds no copy
around the kernels; the only extra pass is the reduction of ``grad_w``'s few partial sums.

* forward: an implicit GEMM. A program owns ``block_m`` consecutive output pixels (row-major
  over ``(i, j)``) and ``block_n`` output channels and, per tap, gathers the shifted input tile,
  scales its rows by ``d[:, tap]`` and accumulates one tensor-core dot.
* grad_x: the gather form of the transposed conv. A program owns ``block_m_dx`` pixels of one
  stride phase of the input; only the taps of that phase reach them, each from one output pixel:
  ``(dy * d_tap) @ w_tap^T`` per tap. No zero insertion, no atomics.
* grad_w: ``(x_tap * d_tap)^T @ dy`` summed over a chunk of all ``N*Ho*Wo`` pixels by each
  program (one tap, one channel block); the chunks' fp32 partial sums are added in JAX.
* grad_d: ``dd[p, tap] = sum_o dy[p, o] * (x_tap @ w_tap)[p, o]``, the forward's loop with a row
  reduction instead of an accumulator; a batch-shared ``d`` sums over the images in the program.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.triton import _common as cm

_NUM_SMS = 132  # H100 SXM
_F32 = jnp.float32

# ----------------------------------------------------------------------------------------------
# Tiling configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModulatedBlockSizes:
    """Tile sizes (powers of 2 >= 16 except chunks_dw, num_warps, num_stages); the defaults come
    from `modulated_block_sizes`.

    Attributes:
      block_m: forward / grad_d: output pixels per program (dot M).
      block_n: forward: output channels per program (dot N); grad_d: per inner step.
      block_k: forward / grad_d: input channels per dot (dot K).
      block_m_dx: grad_x: input pixels of one stride phase per program (dot M).
      block_n_dx: grad_x: input channels per program (dot N).
      block_k_dx: grad_x: output channels per dot (dot K).
      block_m_dw: grad_w: pixels per dot (dot K).
      chunks_dw: grad_w: chunks of the pixels, one fp32 partial sum each (any positive int).
      block_cin_dw: grad_w: input channels per program (dot M).
      block_cout_dw: grad_w: output channels per program (dot N).
      num_warps: warps per program.
      num_stages: software-pipelining depth of the tap loops.

    Raises:
      ValueError: when constructed: a block size that is not a power of 2 at least 16, a
        ``num_warps`` that is not a power of 2, a count (``num_stages``, ``chunks_dw``) below 1; the
        message names the field.
    """

    block_m: int
    block_n: int
    block_k: int
    block_m_dx: int
    block_n_dx: int
    block_k_dx: int
    block_m_dw: int
    chunks_dw: int
    block_cin_dw: int
    block_cout_dw: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        cm.check_tiles(self, minimum=16, counts=("num_stages", "chunks_dw"))


def _pixel_block(pixels: int, channel_blocks: int) -> int:
    """Pixels per program (the dot's M) for `pixels` in all and `channel_blocks` programs
    sharing each pixel tile."""
    # M >= 64 with num_warps a multiple of 4 lets Triton use Hopper wgmma, and 128 amortises the
    # weight tile best: shrink from 128 only while the grid has fewer than 2 programs per SM,
    # and below 64 only for problems too small to fill the GPU anyway (down to 16, the smallest
    # tensor-core M).
    floor = 64 if pixels >= 64 * _NUM_SMS else 16
    block = 128
    while block > floor and pl.cdiv(pixels, block) * channel_blocks < 2 * _NUM_SMS:
        block //= 2
    return min(block, max(16, cm.next_pow2(pixels)))


def _exact_float32(dtype, precision) -> bool:
    """Whether float32 dots run exactly (FMA, no tensor cores): ``HIGHEST`` precision, given or
    the default."""
    if jnp.dtype(dtype) != jnp.float32:
        return False
    if precision is None:
        return jax.config.jax_default_matmul_precision in ("highest", "float32")
    return lax.Precision.HIGHEST in (precision if isinstance(precision, tuple) else (precision,))


def modulated_block_sizes(
    geom: Geometry, *, batch: int, cin: int, cout: int, dtype, precision=None
) -> ModulatedBlockSizes:
    """Tile sizes for a problem; a heuristic aimed at H100 (not yet tuned on hardware)."""
    (h, w), (ho, wo), (sh, sw) = geom.in_size, geom.out_size, geom.stride
    wide = jnp.dtype(dtype) == jnp.float32
    # fp32 tiles take twice the registers and shared memory of 16-bit ones: halve the channel
    # blocks so 3 pipeline stages of A and B tiles still fit in shared memory.
    ch_cap, k_cap = (64, 32) if wide else (128, 64)
    block_n = cm.channel_block(cout, ch_cap)
    block_n_dx = cm.channel_block(cin, ch_cap)
    # Exact float32 dots hold their operands in registers: half the pixels, or they spill.
    m_cap = 64 if _exact_float32(dtype, precision) else 128
    block_m = min(m_cap, _pixel_block(batch * ho * wo, pl.cdiv(cout, block_n)))
    phase_pixels = batch * pl.cdiv(h, sh) * pl.cdiv(w, sw)
    block_m_dx = min(m_cap, _pixel_block(phase_pixels, pl.cdiv(cin, block_n_dx)))
    # grad_w holds a [block_cin, block_cout] fp32 accumulator per program and contracts over
    # pixels, so its dot's M is input channels: 64 of them keep wgmma; 32 output channels keep
    # the accumulator at 16 registers a thread.
    block_cin_dw = cm.channel_block(cin, 64)
    block_cout_dw = cm.channel_block(cout, 32)
    block_m_dw = 64
    # One fp32 partial sum of dw per chunk, added in JAX: enough chunks for 2 programs per SM,
    # but their write and read at most 1/16 of the bytes of x and dy.
    programs = geom.num_taps * pl.cdiv(cin, block_cin_dw) * pl.cdiv(cout, block_cout_dw)
    partial = 2 * 4 * geom.num_taps * cin * cout
    budget = jnp.dtype(dtype).itemsize * batch * (h * w * cin + ho * wo * cout) // 16
    chunks_dw = max(1, min(pl.cdiv(2 * _NUM_SMS, programs), budget // max(partial, 1)))
    chunks_dw = min(chunks_dw, pl.cdiv(batch * ho * wo, block_m_dw))
    # 8 warps once the fp32 accumulator reaches 128 x 128 elements (64 KiB).
    big_acc = max(block_m * block_n, block_m_dx * block_n_dx) >= 128 * 128
    # Exact float32 dots with 3 stages: 96 registers and an 8-byte spill (sm_90, the ptxas of
    # triton 3.9; none with 3.8's); with 2 stages no spill with either.
    stages = 2 if _exact_float32(dtype, precision) else 3
    return ModulatedBlockSizes(
        block_m=block_m,
        block_n=block_n,
        block_k=cm.channel_block(cin, k_cap),
        block_m_dx=block_m_dx,
        block_n_dx=block_n_dx,
        block_k_dx=cm.channel_block(cout, k_cap),
        block_m_dw=block_m_dw,
        chunks_dw=chunks_dw,
        block_cin_dw=block_cin_dw,
        block_cout_dw=block_cout_dw,
        num_warps=8 if big_acc else 4,
        num_stages=stages,
    )


def unsupported_reason(geom: Geometry, shapes, dtype) -> str | None:
    """None when the kernels handle this case, else a one-line reason. ``shapes``: the shape
    of every slot (``x``, ``w``, ``d``, ``y``) by name."""
    del geom  # every geometry the API accepts
    return cm.common_unsupported_reason(shapes, dtype)


# ----------------------------------------------------------------------------------------------
# Kernel bodies
# ----------------------------------------------------------------------------------------------


def _dot(a, b, precision, contract=((1,), (0,))):
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=_F32
    )


def _arange(start, size):
    return start + jnp.arange(size)


def _modulated_tile(x_ref, d_ref, b, i, j, m, n, chans, ok, *, g: Geometry, shared: bool):
    """``x`` at tap ``(m, n)`` of output pixels ``(i, j)`` of image ``b`` (``[P, 1]`` each) and
    channels ``chans`` (``[1, K]``), its rows scaled by ``d``, in ``x``'s dtype; zero where
    ``ok`` is false or the tap falls in the padding."""
    _, h, w, cin = x_ref.shape
    _, (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    r, q = i * sh + m * dh - ptop, j * sw + n * dw - pleft
    xt = cm.gather(x_ref.at[b, r, q, chans], ok & cm.inside(r, q, h, w) & (chans < cin), cm.KEEP)
    d_at = d_ref.at[i, j, m, n] if shared else d_ref.at[b, i, j, m, n]
    dt = cm.gather(d_at, ok)
    return (xt.astype(_F32) * dt.astype(_F32)).astype(xt.dtype)


def _out_pixels(start, size: int, ho: int, wo: int):
    """Flat output pixels ``start + [0, size)`` of one image as row, column and validity, each
    ``[size, 1]``."""
    p = _arange(start, size)[:, None]
    return lax.div(p, wo), lax.rem(p, wo), p < ho * wo


def _forward_kernel(x_ref, w_ref, d_ref, *refs, g, bs, shared, precision):
    """``y = sum_tap (x * d) @ w``; with the tangent refs ``tx, tw, td`` (None where a slot has
    no tangent) before ``y``'s, the tangent ``sum_tap (tx * d + x * td) @ w + (x * d) @ tw``
    in one pass."""
    *tangents, y_ref = refs
    cin = x_ref.shape[3]
    _, ho, wo, cout = y_ref.shape
    (kh, kw), *_ = cm.sweep(g)
    b = pl.program_id(2)
    i, j, ok = _out_pixels(pl.program_id(1) * bs.block_m, bs.block_m, ho, wo)
    outs = _arange(pl.program_id(0) * bs.block_n, bs.block_n)[None, :]
    # (weight, [(image, modulation), ...]): each product's dot with its weight.
    if tangents:
        tx_ref, tw_ref, td_ref = tangents
        images = cm.products(x_ref, d_ref, (tx_ref, td_ref))
        terms = [(w_ref, images)] if images else []
        if tw_ref is not None:
            terms.append((tw_ref, [(x_ref, d_ref)]))
    else:
        terms = [(w_ref, [(x_ref, d_ref)])]

    def tap(t, acc):
        m, n = lax.div(t, kw), lax.rem(t, kw)
        for kb in range(pl.cdiv(cin, bs.block_k)):
            chans = _arange(kb * bs.block_k, bs.block_k)
            for weight_ref, images in terms:
                wt = cm.gather(
                    weight_ref.at[m, n, chans[:, None], outs],
                    (chans[:, None] < cin) & (outs < cout),
                )
                for a, c in images:  # one dot each: fewer live tiles than their sum
                    xs = _modulated_tile(
                        a, c, b, i, j, m, n, chans[None, :], ok, g=g, shared=shared
                    )
                    acc += _dot(xs, wt, precision)
        return acc

    acc = lax.fori_loop(0, kh * kw, tap, jnp.zeros((bs.block_m, bs.block_n), _F32))
    plt.store(y_ref.at[b, i, j, outs], acc.astype(y_ref.dtype), mask=ok & (outs < cout))


def _grad_x_kernel(w_ref, d_ref, dy_ref, dx_ref, *, g, bs, shared, precision, blocks):
    _, h, w, cin = dx_ref.shape
    _, ho, wo, cout = dy_ref.shape
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    b = pl.program_id(2)
    phase, block = lax.div(pl.program_id(1), blocks), lax.rem(pl.program_id(1), blocks)
    pa, pb = lax.div(phase, sw), lax.rem(phase, sw)
    # The program's input pixels (P * sh + pa, Q * sw + pb): only the taps of that phase reach
    # them, each from output pixel (P + const, Q + const).
    wq = pl.cdiv(w, sw)
    f = _arange(block * bs.block_m_dx, bs.block_m_dx)[:, None]
    big_p, big_q = lax.div(f, wq), lax.rem(f, wq)
    rows, cols = big_p * sh + pa, big_q * sw + pb
    chans = _arange(pl.program_id(0) * bs.block_n_dx, bs.block_n_dx)[None, :]
    taps_h = cm.phase_taps(pa, ptop, kh, sh, dh)
    taps_w = cm.phase_taps(pb, pleft, kw, sw, dw)

    def tap(m, n, acc):
        i, j = big_p + taps_h.offset(m), big_q + taps_w.offset(n)
        ok = (i >= 0) & (i < ho) & (j >= 0) & (j < wo)
        d_at = d_ref.at[i, j, m, n] if shared else d_ref.at[b, i, j, m, n]
        dt = cm.gather(d_at, ok).astype(_F32)
        for ob in range(pl.cdiv(cout, bs.block_k_dx)):
            outs = _arange(ob * bs.block_k_dx, bs.block_k_dx)
            dyt = cm.gather(dy_ref.at[b, i, j, outs[None, :]], ok & (outs[None, :] < cout), cm.KEEP)
            gs = (dyt.astype(_F32) * dt).astype(dyt.dtype)
            wt = cm.gather(
                w_ref.at[m, n, chans, outs[:, None]], (chans < cin) & (outs[:, None] < cout)
            )
            acc += _dot(gs, wt, precision)
        return acc

    acc = cm.phase_loop(taps_h, taps_w, tap, jnp.zeros((bs.block_m_dx, bs.block_n_dx), _F32))
    ok = (rows < h) & (cols < w) & (chans < cin)
    plt.store(dx_ref.at[b, rows, cols, chans], acc.astype(dx_ref.dtype), mask=ok)


def _grad_w_kernel(x_ref, d_ref, dy_ref, dw_ref, *, g, bs, shared, precision, chunk):
    # dw_ref: [chunks, kh * kw, Cin, Cout] fp32 partial sums.
    _, _, _, cin = x_ref.shape
    n_img, ho, wo, cout = dy_ref.shape
    (_, kw), *_ = cm.sweep(g)
    t = pl.program_id(2)
    m, n = lax.div(t, kw), lax.rem(t, kw)
    chans = _arange(pl.program_id(1) * bs.block_cin_dw, bs.block_cin_dw)
    outs = _arange(pl.program_id(0) * bs.block_cout_dw, bs.block_cout_dw)
    start = pl.program_id(3) * chunk
    total = n_img * ho * wo

    def step(s, acc):
        # Pixels of every image, flattened over (b, i, j).
        f = _arange(start + s * bs.block_m_dw, bs.block_m_dw)[:, None]
        ok = (f < total) & (f < start + chunk)
        b, p = lax.div(f, ho * wo), lax.rem(f, ho * wo)
        i, j = lax.div(p, wo), lax.rem(p, wo)
        xs = _modulated_tile(x_ref, d_ref, b, i, j, m, n, chans[None, :], ok, g=g, shared=shared)
        dyt = cm.gather(dy_ref.at[b, i, j, outs[None, :]], ok & (outs[None, :] < cout), cm.KEEP)
        # Contract over pixels (dim 0 of both): Triton transposes the A tile in registers.
        return acc + _dot(xs, dyt, precision, contract=((0,), (0,)))

    acc = jnp.zeros((bs.block_cin_dw, bs.block_cout_dw), _F32)
    acc = lax.fori_loop(0, pl.cdiv(chunk, bs.block_m_dw), step, acc)
    ok = (chans[:, None] < cin) & (outs[None, :] < cout)
    plt.store(dw_ref.at[pl.program_id(3), t, chans[:, None], outs[None, :]], acc, mask=ok)


def _grad_d_kernel(x_ref, w_ref, dy_ref, dd_ref, *, g, bs, shared, precision):
    n_img, _, _, cin = x_ref.shape
    _, ho, wo, cout = dy_ref.shape
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    _, h, w, _ = x_ref.shape
    i, j, ok = _out_pixels(pl.program_id(0) * bs.block_m, bs.block_m, ho, wo)
    r_base, q_base = i * sh - ptop, j * sw - pleft
    # (program ids are read at the top level: the interpreter knows them only there)
    b = pl.program_id(1)

    def image(b, total, m, n):
        r, q = r_base + m * dh, q_base + n * dw
        x_ok = ok & cm.inside(r, q, h, w)
        for ob in range(pl.cdiv(cout, bs.block_n)):
            outs = _arange(ob * bs.block_n, bs.block_n)
            z = jnp.zeros((bs.block_m, bs.block_n), _F32)
            for kb in range(pl.cdiv(cin, bs.block_k)):
                chans = _arange(kb * bs.block_k, bs.block_k)
                xt = cm.gather(
                    x_ref.at[b, r, q, chans[None, :]], x_ok & (chans[None, :] < cin), cm.KEEP
                )
                wt = cm.gather(
                    w_ref.at[m, n, chans[:, None], outs[None, :]],
                    (chans[:, None] < cin) & (outs[None, :] < cout),
                )
                z += _dot(xt, wt, precision)
            dyt = cm.gather(dy_ref.at[b, i, j, outs[None, :]], ok & (outs[None, :] < cout))
            total += jnp.sum(dyt.astype(_F32) * z, axis=1, keepdims=True)
        return total

    def tap(t, carry):
        m, n = lax.div(t, kw), lax.rem(t, kw)
        zero = jnp.zeros((bs.block_m, 1), _F32)
        if shared:  # the batch-shared d's gradient sums over the images
            total = lax.fori_loop(0, n_img, lambda b, acc: image(b, acc, m, n), zero)
            plt.store(dd_ref.at[i, j, m, n], total.astype(dd_ref.dtype), mask=ok)
        else:
            total = image(b, zero, m, n)
            plt.store(dd_ref.at[b, i, j, m, n], total.astype(dd_ref.dtype), mask=ok)
        return carry

    lax.fori_loop(0, kh * kw, tap, 0)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers
# ----------------------------------------------------------------------------------------------


def _sizes(call: KernelCall, x_shape, cout: int, dtype) -> ModulatedBlockSizes:
    n, _, _, cin = x_shape
    return call.block_sizes or modulated_block_sizes(
        call.geom, batch=n, cin=cin, cout=cout, dtype=dtype, precision=call.precision
    )


def _body(kernel, call: KernelCall, bs: ModulatedBlockSizes, shared: bool, **extra):
    """``kernel`` with the settings every modulated kernel takes, and ``extra``."""
    return functools.partial(
        kernel, g=call.geom, bs=bs, shared=shared, precision=call.precision, **extra
    )


def forward(x: jax.Array, w: jax.Array, d: jax.Array, call: KernelCall) -> jax.Array:
    """Modulated conv forward: x [N, H, W, Cin], w [kh, kw, Cin, Cout], d [N, Ho, Wo, kh, kw]
    or [Ho, Wo, kh, kw] -> y [N, Ho, Wo, Cout] (fp32 accumulation)."""
    n, ho, wo, cout = call.out_shape
    bs = _sizes(call, x.shape, cout, x.dtype)
    grid = (pl.cdiv(cout, bs.block_n), pl.cdiv(ho * wo, bs.block_m), n)
    body = _body(_forward_kernel, call, bs, d.ndim == 4)
    return cm.run(body, (x, w, d), call, name="modulated_forward", grid=grid, tiles=bs)


def forward_jvp(x, w, d, tx, tw, td, call: KernelCall) -> jax.Array:
    """The forward's tangent for tangents ``tx``, ``tw``, ``td`` (each the shape of its slot, or
    None), ``sum_tap (tx * d + x * td) @ w + (x * d) @ tw``, in one kernel: no sum of one
    forward per tangent. Tiles as the forward's."""
    n, ho, wo, cout = call.out_shape
    bs = _sizes(call, x.shape, cout, x.dtype)
    if call.block_sizes is None:
        # Two weight tiles and up to four image tiles per tap: two pipeline stages keep the
        # shared memory within sm_80's and the registers free of spills (one for exact float32
        # dots, whose operands stay in registers). A single 16 x 16 accumulator gets 2 warps:
        # with 4, ptxas keeps sm_90's register count at 48 by spilling a 64-bit address across
        # the tap loop (16-bit, stride 2).
        # Exact float32 (64 x 64 pixels x channels): 8 warps; with 4 its three products a tap
        # take 236 registers a thread (triton 3.8's ptxas) or 255 and 680 bytes of spills (3.9's),
        # with 8 229 and none.
        exact = _exact_float32(x.dtype, call.precision)
        stages = 1 if exact else 2
        warps = 8 if exact else bs.num_warps
        warps = 2 if bs.block_m * bs.block_n <= 16 * 16 else warps
        bs = dataclasses.replace(bs, num_stages=min(bs.num_stages, stages), num_warps=warps)
    grid = (pl.cdiv(cout, bs.block_n), pl.cdiv(ho * wo, bs.block_m), n)
    body = _body(_forward_kernel, call, bs, d.ndim == 4)
    operands = (x, w, d, tx, tw, td)
    return cm.run(body, operands, call, name="modulated_forward_jvp", grid=grid, tiles=bs)


def grad_x(w: jax.Array, d: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Gradient in x: w [kh, kw, Cin, Cout], d, dy [N, Ho, Wo, Cout] -> dx [N, H, W, Cin]."""
    n, h, w_in, cin = call.out_shape
    (sh, sw), cout = call.geom.stride, dy.shape[3]
    bs = _sizes(call, call.out_shape, cout, dy.dtype)
    blocks = pl.cdiv(pl.cdiv(h, sh) * pl.cdiv(w_in, sw), bs.block_m_dx)
    grid = (pl.cdiv(cin, bs.block_n_dx), sh * sw * blocks, n)
    body = _body(_grad_x_kernel, call, bs, d.ndim == 4, blocks=blocks)
    out = jax.ShapeDtypeStruct(call.out_shape, dy.dtype)
    return cm.run(body, (w, d, dy), call, name="modulated_grad_x", grid=grid, tiles=bs, out=out)


def grad_w(x: jax.Array, d: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Gradient in w: x, d, dy -> dw [kh, kw, Cin, Cout] (fp32 partial sums added in fp32)."""
    kh, kw, cin, cout = call.out_shape
    n, ho, wo, _ = dy.shape
    bs = _sizes(call, x.shape, cout, x.dtype)
    pixels = n * ho * wo
    chunk = bs.block_m_dw * pl.cdiv(pl.cdiv(pixels, bs.block_m_dw), bs.chunks_dw)
    chunks = pl.cdiv(pixels, chunk)
    grid = (pl.cdiv(cout, bs.block_cout_dw), pl.cdiv(cin, bs.block_cin_dw), kh * kw, chunks)
    body = _body(_grad_w_kernel, call, bs, d.ndim == 4, chunk=chunk)
    out = jax.ShapeDtypeStruct((chunks, kh * kw, cin, cout), _F32)
    partial = cm.run(body, (x, d, dy), call, name="modulated_grad_w", grid=grid, tiles=bs, out=out)
    return partial.sum(axis=0).reshape(call.out_shape).astype(x.dtype)


def grad_d(x: jax.Array, w: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Gradient in d: x, w, dy -> dd [N, Ho, Wo, kh, kw], or [Ho, Wo, kh, kw] for a
    batch-shared d (summed over N)."""
    n, ho, wo, cout = dy.shape
    shared = len(call.out_shape) == 4
    bs = _sizes(call, x.shape, cout, x.dtype)
    grid = (pl.cdiv(ho * wo, bs.block_m), 1 if shared else n)
    body = _body(_grad_d_kernel, call, bs, shared)
    return cm.run(body, (x, w, dy), call, name="modulated_grad_d", grid=grid, tiles=bs)
