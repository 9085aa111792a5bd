"""Locally connected convolution on Mosaic GPU: the forward, a stream of its per-location
weights.

    y[b, i, j, o] = sum_{m, n, c} x[b, i*sh + m*dh - pt, j + n*dw - pl, c] * w[i, j, m, n, c, o]

x [N, H, W, Cin], w [Ho, Wo, kh, kw, Cin, Cout], y [N, Ho, Wo, Cout]. Each pixel's weights are
used by that pixel only: the op is bound by reading ``w`` once (``taps * Cin * Cout`` elements a
pixel, against ``Cin`` a pixel and image of ``x``), and a pixel's product is a ``[images, K] @
[K, Cout]`` matmul far too small for wgmma's 64 rows. So a program owns one output row's strip
of 64 columns, a block of images and a block of output channels, and streams its weights
``w[i, j0:j0 + 64, tap, c0:c0 + block_c, o0:o0 + block_out]`` through a ring of ``stages``
shared-memory buffers, ``stages - 1`` TMA copies in flight while one is consumed (one input
channel a stage by default). Per input channel of a buffer: the ``[64, block_out]`` weights
(pixels as rows: the WGMMA register layout) and, for each image of the block, the ``[64]``
vector of that channel at the tap's input pixels (a strided load from global memory whose
other channels the L1 cache then holds), multiplied and added in float32 on the CUDA cores,
one ``[64, block_out]`` accumulator an image. The images of a block share every weight load;
the blocks of one strip are adjacent in the grid (the fastest axis), so a second image block
reads the weights from L2.

The gradient in the weights, ``dw[i, j, tap, c, o] = sum_b x_tap[b, i, j, c] dy[b, i, j, o]``,
is the same program run backwards: ``dy``'s ``[64, block_out]`` tiles of the block's images
held in registers, and for each (tap, input channel) the sum over the images of the ``[64]``
input vector times the image's tile, a ``[64, block_out]`` tile of ``dw`` written out through
a ring of ``stages`` shared-memory buffers (TMA stores in flight). Every image in one block
writes ``dw`` once; more images than a block gives float32 partial sums added after the kernel.

The image is zero-padded by XLA first (a copy of ``x``, small beside the weights) so that every
load lies inside it. The tangent ``local(tx, w) + local(x, tw)`` is one kernel streaming both
weight arrays (a 16-bit tangent summed in float32 and rounded once); the gradient in the image
runs the Triton kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw

_F32 = jnp.float32
_ACC_COLUMNS = 256  # float32 accumulator columns a program (images x outputs): 128 registers
_MAX_STAGES = 8
_SMEM = 200 * 1024


@dataclasses.dataclass(frozen=True)
class LocalTiles:
    """Tiles of the Mosaic locally connected kernels.

    Attributes:
      block_batch: images a program (dividing the batch): they share each weight load.
      block_out: output channels a program (dividing the output channels, a multiple of 8:
        the register layout's columns).
      block_c: input channels of one pipeline stage (dividing the input channels).
      stages: shared-memory buffers of the weight stream (``stages - 1`` copies in flight).

    Raises:
      ValueError: when constructed: a block below 1, ``stages`` outside [2, the barriers a
        program may hold].
    """

    block_batch: int
    block_out: int
    block_c: int
    stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_batch", "block_out", "block_c"):
            if getattr(self, name) < 1:
                raise ValueError(f"LocalTiles.{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.stages <= sw.MAX_BARRIERS:
            raise ValueError(
                f"LocalTiles.stages must be in [2, {sw.MAX_BARRIERS}], got {self.stages}"
            )


def _stage_bytes(tiles: LocalTiles, itemsize: int) -> int:
    return sw.STRIP * tiles.block_c * tiles.block_out * itemsize


def _smem_bytes(tiles: LocalTiles, itemsize: int, weights: int = 1) -> int:
    """The weight stages (of ``weights`` arrays: 2 for the fused tangent) and the output's two
    staging tiles."""
    out = 2 * sw.STRIP * tiles.block_out * itemsize
    return weights * tiles.stages * _stage_bytes(tiles, itemsize) + out


def _divisor_at_most(n: int, most: int, step: int = 1) -> int | None:
    """The largest multiple of ``step`` dividing ``n`` that is at most ``most``, or None."""
    for v in range(min(n, most), 0, -1):
        if n % v == 0 and v % step == 0:
            return v
    return None


def tiles(geom: Geometry, *, batch: int, cin: int, cout: int, dtype, partial: str = "y",
          weights: int = 1) -> LocalTiles:  # fmt: skip
    """The heuristic's tiles (not yet tuned on a GPU): up to 8 images a program (each weight
    read once for them), the most output channels their accumulators leave room for (a
    multiple of 8: the register layout's columns), one input channel a stage (a contiguous
    ``[64, block_out]`` tile: conflict-free vectorised loads), up to 8 stages within the
    shared memory."""
    itemsize = jnp.dtype(dtype).itemsize
    if partial == "w":  # every image in a block where their tiles fit: dw written once
        bb = _divisor_at_most(batch, _ACC_COLUMNS // 8) or 1
        bo = _divisor_at_most(cout, max(8, _ACC_COLUMNS // bb), 8) or cout
        return LocalTiles(bb, bo, 1, _MAX_STAGES)
    bb = _divisor_at_most(batch, 8) or 1
    bo = _divisor_at_most(cout, max(8, _ACC_COLUMNS // bb), 8) or cout  # (else refused)
    t = LocalTiles(bb, bo, 1, max(2, min(_MAX_STAGES, geom.num_taps * cin)))
    while t.stages > 2 and _smem_bytes(t, itemsize, weights) > _SMEM:
        t = dataclasses.replace(t, stages=t.stages - 1)
    return t


def unsupported_reason(
    partial: str, geom: Geometry, shapes, dtype, *, tangents: bool, precision=None
) -> str | None:
    """Why the Mosaic kernels cannot compute ``partial`` (``y``: the forward, or with
    ``tangents`` its fused tangent; ``w``: the gradient in the weights) of this case, or None.
    ``precision``: float32 products are exact here (no tensor cores), so every precision is
    met."""
    del precision
    if partial not in ("y", "w"):
        raise ValueError(f"no Mosaic kernel for the locally connected partial `{partial}`")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {dtype.name} is not one of float32, bfloat16, float16"
    if geom.stride[1] != 1:
        return f"column stride {geom.stride[1]} (the Mosaic kernels take stride 1 along the width)"
    wo = geom.out_size[1]
    if wo % sw.STRIP:
        return f"output width {wo} is not a multiple of {sw.STRIP}"
    cout = shapes["w"][-1]
    if cout % 8:
        return f"{cout} output channels: the Mosaic kernels take a multiple of 8"
    batch, cin = shapes["x"][0], shapes["x"][3]
    if partial == "w":
        return None  # (its staging: stages x [64, 8..256] float32 at most, within the budget)
    weights = 2 if tangents else 1
    t = tiles(geom, batch=batch, cin=cin, cout=cout, dtype=dtype, weights=weights)
    if _smem_bytes(t, dtype.itemsize, weights) > _SMEM:
        return "two stages of the weight stream do not fit in shared memory"
    return None


def _body(*refs, geom: Geometry, tiles_: LocalTiles, cin: int, cout_blocks: int,
          n_images: int, pairs: tuple):  # fmt: skip
    """One program: output row ``i``, strip ``j0``, images ``b0:b0 + block_batch``, output
    channels ``o0:o0 + block_out``. ``refs``: the padded images, the weights, then the output
    and scratch; ``pairs``: the (image, weights) products summed (one for the forward, two for
    its tangent ``tx w + x tw``), each weight array streamed through its own part of a
    stage."""
    n_in = len(refs) - 4
    images, weights = refs[:n_images], refs[n_images:n_in]
    out_ref, wbuf, wbars, obuf = refs[n_in:]
    (kh, kw), (sh, _), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    bb, bo, bc, stages = tiles_.block_batch, tiles_.block_out, tiles_.block_c, tiles_.stages
    chunks = cin // bc
    steps = kh * kw * chunks
    blk = lax.axis_index("block")
    b0, o0 = lax.div(blk, cout_blocks) * bb, lax.rem(blk, cout_blocks) * bo
    j0 = lax.axis_index("strip") * sw.STRIP
    i = lax.axis_index("row")

    def fetch(s):
        t, c0 = lax.div(s, chunks), lax.rem(s, chunks) * bc
        slot = lax.rem(s, stages)
        for k, w_ref in enumerate(weights):  # one barrier a stage, an arrival per array
            plgpu.copy_gmem_to_smem(
                w_ref.at[i, pl.ds(j0, sw.STRIP), t, pl.ds(c0, bc), pl.ds(o0, bo)],
                wbuf.at[slot, k],
                wbars.at[slot],
            )

    for s in range(min(stages - 1, steps)):
        fetch(s)

    def step(s, accs):
        slot = lax.rem(s, stages)

        @pl.when(s + stages - 1 < steps)
        def _():  # its slot was last read by step s - 1, before that step's barrier
            fetch(s + stages - 1)

        plgpu.barrier_wait(wbars.at[slot])
        t, c0 = lax.div(s, chunks), lax.rem(s, chunks) * bc
        r, col = i * sh + lax.div(t, kw) * dh, j0 + lax.rem(t, kw) * dw
        accs = list(accs)
        for c in range(bc):
            # Rows block_c * block_out apart: with more than one channel a stage, Mosaic finds
            # no conflict-free vectorised plan in general.
            wts = [
                plgpu.load(wbuf.at[slot, k, :, c, :], layout=plgpu.Layout.WGMMA,
                           optimized=bc == 1).astype(_F32)
                for k in range(len(weights))
            ]  # fmt: skip
            for b in range(bb):
                for image, weight in pairs:
                    xv = sw.pixel_row(images[image], b0 + b, r, col, c0 + c)
                    accs[b] = accs[b] + xv[:, None] * wts[weight]
        plgpu.commit_smem()  # every thread's reads of the slot done before a copy refills it
        return tuple(accs)

    accs = lax.fori_loop(0, steps, step, tuple(sw.zeros_tile(bo) for _ in range(bb)))
    for b in range(bb):
        slot = b % 2
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        obuf[slot] = accs[b].astype(obuf.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            obuf.at[slot], out_ref.at[b0 + b, i, pl.ds(j0, sw.STRIP), pl.ds(o0, bo)]
        )
    plgpu.wait_smem_to_gmem(0)


def _padded(x: jax.Array, geom: Geometry) -> jax.Array:
    """``x`` with the geometry's zero padding, extended (or cropped) to exactly the rows and
    columns the windows read."""
    (ho, wo), (kh, kw), (sh, _), (dh, dw) = (
        geom.out_size, geom.kernel_size, geom.stride, geom.dilation
    )  # fmt: skip
    (h, w), (pt, _), (pleft, _) = geom.in_size, *geom.padding
    rows = (ho - 1) * sh + (kh - 1) * dh + 1
    cols = (wo - 1) + (kw - 1) * dw + 1
    cfg = [(0, 0, 0), (pt, rows - h - pt, 0), (pleft, cols - w - pleft, 0), (0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _run(images, weights, pairs, call: KernelCall, name: str) -> jax.Array:
    n, ho, wo, cout = call.out_shape
    cin, dtype = images[0].shape[3], images[0].dtype
    geom = call.geom
    bs = call.block_sizes or tiles(
        geom, batch=n, cin=cin, cout=cout, dtype=dtype, weights=len(weights)
    )
    itemsize = jnp.dtype(dtype).itemsize
    if n % bs.block_batch or cout % bs.block_out or cin % bs.block_c:
        raise ValueError(
            f"LocalTiles {bs} must divide the batch ({n}), the output channels ({cout}) and the "
            f"input channels ({cin})"
        )
    if bs.block_out % 8:
        raise ValueError(f"LocalTiles.block_out ({bs.block_out}) must be a multiple of 8")
    if _smem_bytes(bs, itemsize, len(weights)) > _SMEM:
        raise ValueError(f"LocalTiles {bs}: its stages do not fit in shared memory")
    taps = geom.num_taps
    cout_blocks = cout // bs.block_out
    body = functools.partial(
        _body, geom=geom, tiles_=bs, cin=cin, cout_blocks=cout_blocks, n_images=len(images),
        pairs=pairs,
    )  # fmt: skip
    stage = (bs.stages, len(weights), sw.STRIP, bs.block_c, bs.block_out)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(call.out_shape, dtype),
        scratch_types=[
            plgpu.SMEM(stage, dtype),
            plgpu.Barrier(num_arrivals=len(weights), num_barriers=bs.stages),
            plgpu.SMEM((2, sw.STRIP, bs.block_out), dtype),
        ],
        grid=((n // bs.block_batch) * cout_blocks, wo // sw.STRIP, ho),
        grid_names=("block", "strip", "row"),
        interpret=sw.interpret_params(call),
        kernel_name=f"svconv_{name}",
    )
    padded = [_padded(x, geom) for x in images]
    flat = [w.reshape(ho, wo, taps, cin, cout) for w in weights]
    return kernel(*padded, *flat)


def forward(x: jax.Array, w: jax.Array, call: KernelCall) -> jax.Array:
    """x [N, H, W, Cin], w [Ho, Wo, kh, kw, Cin, Cout] -> y [N, Ho, Wo, Cout]."""
    return _run([x], [w], ((0, 0),), call, "local_forward_mosaic")


def forward_jvp(x, w, tx, tw, call: KernelCall) -> jax.Array:
    """The tangent ``local(tx, w) + local(x, tw)`` (either tangent None) in one kernel: both
    weight arrays streamed, the products summed in float32 and rounded once."""
    if tx is None:
        return _run([x], [tw], ((0, 0),), call, "local_forward_jvp_mosaic")
    if tw is None:
        return _run([tx], [w], ((0, 0),), call, "local_forward_jvp_mosaic")
    return _run([x, tx], [w, tw], ((1, 0), (0, 1)), call, "local_forward_jvp_mosaic")


def _grad_w_body(x_ref, dy_ref, out_ref, obuf, *, geom: Geometry, tiles_: LocalTiles,
                 cin: int, cout_blocks: int, parts: bool):  # fmt: skip
    """One program: row ``i``, strip ``j0``, images ``b0:b0 + block_batch`` (their ``dy``
    tiles in registers), output channels ``o0:o0 + block_out``; a ``dw`` tile a (tap, input
    channel), out through the staging ring."""
    (kh, kw), (sh, _), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    bb, bo, stages = tiles_.block_batch, tiles_.block_out, tiles_.stages
    blk = lax.axis_index("block")
    ib, o0 = lax.div(blk, cout_blocks), lax.rem(blk, cout_blocks) * bo
    b0 = ib * bb
    j0 = lax.axis_index("strip") * sw.STRIP
    i = lax.axis_index("row")
    dys = [sw.pixel_tile(dy_ref, b0 + b, i, j0, o0, bo) for b in range(bb)]
    dest = out_ref.at[ib] if parts else out_ref

    def step(s, carry):
        t, c = lax.div(s, cin), lax.rem(s, cin)
        r, col = i * sh + lax.div(t, kw) * dh, j0 + lax.rem(t, kw) * dw
        acc = sw.zeros_tile(bo)
        for b in range(bb):
            acc = acc + sw.pixel_row(x_ref, b0 + b, r, col, c)[:, None] * dys[b]
        slot = lax.rem(s, stages)
        plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)  # the slot's last store read
        obuf[slot] = acc.astype(obuf.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(obuf.at[slot], dest.at[i, pl.ds(j0, sw.STRIP), t, c, pl.ds(o0, bo)])
        return carry

    lax.fori_loop(0, kh * kw * cin, step, 0)
    plgpu.wait_smem_to_gmem(0)


def grad_w(x: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the weights: x [N, H, W, Cin], dy [N, Ho, Wo, Cout] -> dw [Ho, Wo, kh,
    kw, Cin, Cout] (float32 partial sums of the image blocks added after the kernel when the
    images take more than one block)."""
    ho, wo, kh, kw, cin, cout = call.out_shape
    n, dtype = x.shape[0], x.dtype
    geom = call.geom
    bs = call.block_sizes or tiles(geom, batch=n, cin=cin, cout=cout, dtype=dtype, partial="w")
    if n % bs.block_batch or cout % bs.block_out or bs.block_out % 8:
        raise ValueError(
            f"LocalTiles {bs} must divide the batch ({n}) and the output channels ({cout}) "
            "in blocks of a multiple of 8 channels"
        )
    blocks, taps = n // bs.block_batch, kh * kw
    cout_blocks = cout // bs.block_out
    parts = blocks > 1
    out_dtype = _F32 if parts else dtype
    body = functools.partial(
        _grad_w_body, geom=geom, tiles_=bs, cin=cin, cout_blocks=cout_blocks, parts=parts
    )
    shape = (ho, wo, taps, cin, cout)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((blocks, *shape) if parts else shape, out_dtype),
        scratch_types=[plgpu.SMEM((bs.stages, sw.STRIP, bs.block_out), out_dtype)],
        grid=(blocks * cout_blocks, wo // sw.STRIP, ho),
        grid_names=("block", "strip", "row"),
        interpret=sw.interpret_params(call),
        kernel_name="svconv_local_grad_w_mosaic",
    )
    out = kernel(_padded(x, geom), dy)
    if parts:
        out = out.sum(axis=0).astype(dtype)
    return out.reshape(call.out_shape)
