"""Locally connected 2-D convolution (a different kernel at every output pixel) as Pallas (Triton)
kernels: forward, gradient in x, gradient in w.

    y[b, i, j, o] = sum_{m, n, c} xpad[b, i*sh + m*dh, j*sw + n*dw, c] * w[i, j, m, n, c, o]

x: [N, H, W, Cin], w: [Ho, Wo, kh, kw, Cin, Cout], y: [N, Ho, Wo, Cout]. The work is a tiny matmul
per pixel whose weights are used by that pixel only, so it is bound by reading (or, for grad_w,
writing) w once; every program owns one pixel and uses the whole batch as the dot's other side.

* forward: per pixel, `x_patch [N, K] @ w[i, j] [K, Cout]` with K = (m, n, c) flattened: w[i, j] is
  one contiguous [K, Cout] matrix, and the patch rows are gathered straight from x with index
  arrays and masks (zero padding, strides, dilation, odd Cin are masked lanes; no padded copy).
* grad_x: gather form. Input pixel (p, q) sums, over the taps that reach it (for stride > 1 only
  those of its phase, an arithmetic run of taps), `dy[:, i, j] @ w[i, j, m, n]^T`. No atomics.
* grad_w: per pixel, `x_patch^T [K, N] @ dy[:, i, j] [N, Cout]`, written once.

Dots accumulate in float32; `precision` is passed to them (DEFAULT/HIGH: TF32 for float32 inputs).
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

# ------------------------------------------------------------------------------------------------
# Tiling config
# ------------------------------------------------------------------------------------------------

_DOT_MIN = 16  # Triton's smallest dot dimension
_W_TILE_ELEMENTS = 8192  # w tile per pipeline stage: 16 KiB bf16 / 32 KiB fp32 of shared memory


@dataclasses.dataclass(frozen=True)
class LocalBlockSizes:
    """Work of one program (all powers of 2, >= 16 since each is a dot dimension).

    Attributes:
      block_batch: images per program (forward: dot M; grad_w: dot K; grad_x: dot M).
      block_k: forward / grad_w: flattened (m, n, cin) rows of w per step.
      block_in: grad_x: input channels per program.
      block_out: output channels per program (forward) or per step (grad_x, grad_w).
      num_warps, num_stages: Triton launch settings.

    Raises:
      ValueError: when constructed: a block size that is not a power of 2 at least 16, a
        ``num_warps`` that is not a power of 2, a count (``num_stages``) below 1; the
        message names the field.
    """

    block_batch: int
    block_k: int
    block_in: int
    block_out: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        cm.check_tiles(self, minimum=_DOT_MIN)


def local_block_sizes(
    *, batch: int, cin: int, cout: int, kernel_size: tuple[int, int], dtype
) -> LocalBlockSizes:
    """Tiles for the three local-conv kernels on an H100 (memory-bound on w)."""

    def fit(n: int, cap: int) -> int:
        return min(max(cm.next_pow2(n), _DOT_MIN), cap)

    # The whole batch in one program reads each w tile once; beyond 64 images the batch is split
    # over neighbouring programs (grid axis 0), which read the same w tile together from L2.
    block_batch = fit(batch, 64)
    # All output channels in one program: w[i, j] rows are Cout wide, so a [K, Cout] tile is one
    # contiguous chunk and the forward reads w exactly once.
    block_out = fit(cout, 128)
    # Rows of w per step (forward, grad_w: flattened taps; grad_x: input channels): as many as
    # keep a stage's w tile within _W_TILE_ELEMENTS; with three stages the loads of two steps
    # are in flight while one is multiplied.
    rows = max(_W_TILE_ELEMENTS // block_out, _DOT_MIN)
    block_k = fit(kernel_size[0] * kernel_size[1] * cin, rows)
    block_in = fit(cin, rows)
    del dtype  # Same tiles for every dtype: the dot is never the bottleneck here.
    return LocalBlockSizes(block_batch, block_k, block_in, block_out, num_warps=4, num_stages=3)


# ------------------------------------------------------------------------------------------------
# Kernel bodies
# ------------------------------------------------------------------------------------------------


def _dot(a, b, precision, contract=((1,), (0,))):
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _patch(x_ref, i, j, kk, g: Geometry):
    """Input rows, columns, channels and in-bounds mask of flattened taps kk = (m, n, c)."""
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    _, h, w, cin = x_ref.shape
    m = lax.div(kk, kw * cin)
    n = lax.rem(lax.div(kk, cin), kw)
    r = i * sh + m * dh - ptop
    q = j * sw + n * dw - pleft
    ok = (kk < kh * kw * cin) & (r >= 0) & (r < h) & (q >= 0) & (q < w)
    return r, q, lax.rem(kk, cin), ok


def _forward_kernel(x_ref, w_ref, *refs, g: Geometry, bs: LocalBlockSizes, precision):
    """``y = sum_tap x @ w``; with the tangent refs ``tx, tw`` (each None or not) before
    ``y``'s, its tangent ``sum_tap tx @ w + x @ tw``."""
    *tangents, y_ref = refs
    pairs = cm.products(x_ref, w_ref, tangents)  # (image, weights) refs whose products are summed
    n_img = x_ref.shape[0]
    _, wo, k_total, cout = w_ref.shape
    i, j = lax.div(pl.program_id(2), wo), lax.rem(pl.program_id(2), wo)
    imgs = pl.program_id(0) * bs.block_batch + jnp.arange(bs.block_batch)[:, None]  # [B, 1]
    outs = pl.program_id(1) * bs.block_out + jnp.arange(bs.block_out)[None, :]  # [1, O]

    def step(kb, acc):
        kk = kb * bs.block_k + jnp.arange(bs.block_k)
        r, q, c, ok = _patch(x_ref, i, j, kk[None, :], g)
        wmask = (kk[:, None] < k_total) & (outs < cout)
        for image_ref, weight_ref in pairs:
            xt = cm.gather(image_ref.at[imgs, r, q, c], ok & (imgs < n_img), cm.KEEP)
            wt = cm.gather(weight_ref.at[i, j, kk[:, None], outs], wmask, cm.STREAM)
            acc += _dot(xt, wt, precision)
        return acc

    acc = jnp.zeros((bs.block_batch, bs.block_out), jnp.float32)
    acc = lax.fori_loop(0, pl.cdiv(k_total, bs.block_k), step, acc)
    ok = (imgs < n_img) & (outs < cout)
    plt.store(y_ref.at[imgs, i, j, outs], acc.astype(y_ref.dtype), mask=ok)


def _grad_x_kernel(dy_ref, w_ref, dx_ref, *, g: Geometry, bs: LocalBlockSizes, precision):
    (kh, kw), (sh, sw), (dh, dw), (ptop, pleft) = cm.sweep(g)
    n_img, ho, wo, cout = dy_ref.shape
    _, h, w, cin = dx_ref.shape
    p, q = lax.div(pl.program_id(2), w), lax.rem(pl.program_id(2), w)
    imgs = pl.program_id(0) * bs.block_batch + jnp.arange(bs.block_batch)[:, None]  # [B, 1]
    chans = pl.program_id(1) * bs.block_in + jnp.arange(bs.block_in)[:, None]  # [C, 1]
    # Only the taps of this pixel's stride phase reach it, each from one source pixel (i, j).
    taps_h = cm.phase_taps(p, ptop, kh, sh, dh)
    taps_w = cm.phase_taps(q, pleft, kw, sw, dw)

    def tap(m, n, acc):
        i, j = taps_h.offset(m), taps_w.offset(n)
        src_ok = (i >= 0) & (i < ho) & (j >= 0) & (j < wo)

        def out_block(ob, acc):
            outs = ob * bs.block_out + jnp.arange(bs.block_out)[None, :]  # [1, O]
            dyt = cm.gather(
                dy_ref.at[imgs, i, j, outs], src_ok & (imgs < n_img) & (outs < cout), cm.KEEP
            )
            wt = cm.gather(
                w_ref.at[i, j, m, n, chans, outs], src_ok & (chans < cin) & (outs < cout), cm.STREAM
            )
            return acc + _dot(dyt, wt, precision, contract=((1,), (1,)))

        return lax.fori_loop(0, pl.cdiv(cout, bs.block_out), out_block, acc)

    acc = cm.phase_loop(taps_h, taps_w, tap, jnp.zeros((bs.block_batch, bs.block_in), jnp.float32))
    chans_row = chans.T  # [1, C]
    ok = (imgs < n_img) & (chans_row < cin)
    plt.store(dx_ref.at[imgs, p, q, chans_row], acc.astype(dx_ref.dtype), mask=ok)


def _grad_w_kernel(x_ref, dy_ref, dw_ref, *, g: Geometry, bs: LocalBlockSizes, precision):
    n_img, _, wo, cout = dy_ref.shape
    k_total = dw_ref.shape[2]
    i, j = lax.div(pl.program_id(2), wo), lax.rem(pl.program_id(2), wo)
    kk = pl.program_id(0) * bs.block_k + jnp.arange(bs.block_k)[:, None]  # [K, 1]
    outs = pl.program_id(1) * bs.block_out + jnp.arange(bs.block_out)[None, :]  # [1, O]
    r, q, c, ok = _patch(x_ref, i, j, kk, g)

    def batch_block(bb, acc):
        imgs = bb * bs.block_batch + jnp.arange(bs.block_batch)
        xt = cm.gather(x_ref.at[imgs[None, :], r, q, c], ok & (imgs < n_img), cm.KEEP)
        dmask = (imgs[:, None] < n_img) & (outs < cout)
        dyt = cm.gather(dy_ref.at[imgs[:, None], i, j, outs], dmask, cm.KEEP)
        return acc + _dot(xt, dyt, precision)

    acc = jnp.zeros((bs.block_k, bs.block_out), jnp.float32)
    acc = lax.fori_loop(0, pl.cdiv(n_img, bs.block_batch), batch_block, acc)
    ok = (kk < k_total) & (outs < cout)
    plt.store(dw_ref.at[i, j, kk, outs], acc.astype(dw_ref.dtype), mask=ok)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers
# ------------------------------------------------------------------------------------------------


def unsupported_reason(geom: Geometry, shapes, dtype) -> str | None:
    """None when the local-conv kernels handle this case, else why not (one line). ``shapes``:
    the shape of every slot (``x``, ``w``, ``y``) by name."""
    del geom  # every geometry the API accepts
    return cm.common_unsupported_reason(shapes, dtype)


def _sizes(call: KernelCall, batch: int, cin: int, cout: int, dtype) -> LocalBlockSizes:
    kernel_size = call.geom.kernel_size
    return call.block_sizes or local_block_sizes(
        batch=batch, cin=cin, cout=cout, kernel_size=kernel_size, dtype=dtype
    )


def forward(x: jax.Array, w: jax.Array, call: KernelCall) -> jax.Array:
    """Locally connected convolution (a different kernel at every output pixel): x [N, H, W,
    Cin], w [Ho, Wo, kh, kw, Cin, Cout] -> [N, Ho, Wo, Cout]."""
    return _forward(x, w, (), call)


def forward_jvp(x, w, tx, tw, call: KernelCall) -> jax.Array:
    """The forward's tangent ``forward(tx, w) + forward(x, tw)`` (None for a zero tangent) in one
    kernel: ``w`` and ``tw`` read once."""
    return _forward(x, w, (tx, tw), call)


def _forward(x, w, tangents, call: KernelCall) -> jax.Array:
    n, _, _, cin = x.shape
    ho, wo, kh, kw, _, cout = w.shape
    bs = _sizes(call, n, cin, cout, x.dtype)
    grid = (pl.cdiv(n, bs.block_batch), pl.cdiv(cout, bs.block_out), ho * wo)
    body = functools.partial(_forward_kernel, g=call.geom, bs=bs, precision=call.precision)

    def rows(v):  # [Ho, Wo, kh * kw * Cin, Cout]: one row per (tap, input channel)
        return None if v is None else v.reshape(ho, wo, kh * kw * cin, cout)

    tx, tw = tangents or (None, None)
    operands = (x, rows(w), *((tx, rows(tw)) if tangents else ()))
    name = "local_forward_jvp" if tangents else "local_forward"
    return cm.run(body, operands, call, name=name, grid=grid, tiles=bs)


def grad_x(w: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Transpose of `forward` in x (its gradient with respect to x), in gather form: w, dy
    [N, Ho, Wo, Cout] -> [N, H, W, Cin]."""
    n, h, w_in, cin = call.out_shape
    bs = _sizes(call, n, cin, w.shape[5], dy.dtype)
    grid = (pl.cdiv(n, bs.block_batch), pl.cdiv(cin, bs.block_in), h * w_in)
    body = functools.partial(_grad_x_kernel, g=call.geom, bs=bs, precision=call.precision)
    return cm.run(body, (dy, w), call, name="local_grad_x", grid=grid, tiles=bs)


def grad_w(x: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """Transpose of `forward` in w (its gradient with respect to w): x, dy -> [Ho, Wo, kh, kw,
    Cin, Cout]."""
    n, _, _, cin = x.shape
    ho, wo, kh, kw, _, cout = call.out_shape
    bs = _sizes(call, n, cin, cout, x.dtype)
    k_total = kh * kw * cin
    grid = (pl.cdiv(k_total, bs.block_k), pl.cdiv(cout, bs.block_out), ho * wo)
    body = functools.partial(_grad_w_kernel, g=call.geom, bs=bs, precision=call.precision)
    out = jax.ShapeDtypeStruct((ho, wo, k_total, cout), x.dtype)
    dw = cm.run(body, (x, dy), call, name="local_grad_w", grid=grid, tiles=bs, out=out)
    return dw.reshape(call.out_shape)
