"""Modulated convolution on Mosaic GPU: the forward and its fused tangent as an implicit GEMM on
the tensor cores (wgmma).

    y[b, i, j, o] = sum_{m, n, c} x[b, i*sh + m*dh - pt, j + n*dw - pl, c] * d[b, i, j, m, n]
                                  * w[m, n, c, o]

A program (one warpgroup) owns one image, a block of output rows, a strip of 64 output columns
and ``block_n`` output channels. The input rows of its strip come through the per-pixel
filters' ring (:mod:`._sweep`), every input channel; its weights ``w[:, :, :, o0:o0 + block_n]``
are copied once into shared memory (TMA, in the swizzled K-major tiles wgmma reads: the
weights transposed to ``[taps, Cout, Cin]`` first, a pass over a few KiB). Per output row
and tap, the ``[64, channels]`` window is loaded from the ring, its rows scaled by the tap's
``d`` (a ``[64]`` vector), and multiplied by the tap's weights into a ``[64, block_n]``
float32 accumulator: ``acc += (x_tap * d_tap) @ w_tap``, in chunks of the swizzle's width of
input channels (64 16-bit or 32 float32 channels). The scaled tile reaches wgmma through a
swizzled staging tile in shared memory: wgmma could take a 16-bit left operand from
registers, but GPU interpret mode models only operands in shared memory, and one tested path
is kept. float32 runs as TF32 (the default precision); exact float32 (``HIGHEST``) has no
tensor-core instruction: the Triton kernels run it.

The tangent ``sum_tap (tx * d + x * td) @ w + (x * d) @ tw`` is the same loop with up to two
products a tap, ``x`` and ``tx`` through the ring, ``w`` and ``tw`` in shared memory.

The gradients: ``grad_x`` (stride 1) is the mirrored window's sweep with ``dy`` through the
ring; ``grad_d`` the forward's sweep, each tap's product reduced against ``dy``; ``grad_w``
the forward's sweep with the products contracted over the pixels instead,
``dw[tap] += (x_tap * d_tap)^T @ dy``, a program's taps accumulated in registers over its rows
and written once as a float32 partial sum (summed after the kernel: deterministic, no atomics).
That contraction reads both operands transposed (pixels major), which wgmma does for 16-bit
types only: float32's weight gradient runs the Triton kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw

_F32 = jnp.float32
_BLOCK_N = (128, 64, 32, 16, 8)  # output channels a program, the widest that fits first


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Tiles of the Mosaic modulated kernels.

    Attributes:
      block_h: output rows a program computes.
      block_n: output channels a program computes (the wgmma's N, at most 256: dividing the
        output channels, a multiple of 32 bytes of them).

    Raises:
      ValueError: when constructed: a ``block_h`` below 1, a ``block_n`` that is not a
        multiple of 8 in [8, 256].
    """

    block_h: int
    block_n: int

    def __post_init__(self) -> None:
        if self.block_h < 1:
            raise ValueError(f"GemmTiles.block_h must be >= 1, got {self.block_h}")
        if self.block_n < 8 or self.block_n % 8 or self.block_n > 256:
            raise ValueError(
                f"GemmTiles.block_n must be a multiple of 8 in [8, 256], got {self.block_n}"
            )


def _chunk(cin: int, itemsize: int) -> tuple[int, int] | None:
    """``(channels, swizzle bytes)`` of one wgmma step along the input channels: the widest
    swizzle (128, 64, 32 bytes) whose width divides the channels."""
    for swizzle in (128, 64, 32):
        if cin % (swizzle // itemsize) == 0:
            return swizzle // itemsize, swizzle
    return None


def _transforms(minor: int, itemsize: int) -> tuple:
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    # JAX's Transform protocol has methods with empty bodies that mypy takes as abstract.
    return (
        plgpu.TilingTransform((8, swizzle // itemsize)),  # type: ignore[abstract]
        plgpu.SwizzleTransform(swizzle),  # type: ignore[abstract]
    )


def _exact_float32(dtype, precision) -> bool:
    if jnp.dtype(dtype) != jnp.float32:
        return False
    if precision is None:
        return jax.config.jax_default_matmul_precision in ("highest", "float32")
    return lax.Precision.HIGHEST in (precision if isinstance(precision, tuple) else (precision,))


def _load_weights(refs, w_smem, w_bar, n0, block_n: int, taps: int, chunks: int,
                  chunk: int) -> None:  # fmt: skip
    """Every tap's ``[block_n, chunk]`` K-major weight tiles of result channels ``n0 : n0 +
    block_n`` from each of ``refs`` (``[taps, N, K]``) into ``w_smem[k]``, waited for: the
    program's weights, copied once."""
    for k, ref in enumerate(refs):
        for t in range(taps):
            for c in range(chunks):
                plgpu.copy_gmem_to_smem(
                    ref.at[t, pl.ds(n0, block_n), pl.ds(c * chunk, chunk)],
                    w_smem.at[k, t * chunks + c],
                    w_bar.at[0],
                )
    plgpu.barrier_wait(w_bar.at[0])


def _staged_mma(acc, stage, a: jax.Array, b, *, transpose_a: bool = False) -> None:
    """``acc += a @ b`` (``a^T @ b`` with ``transpose_a``): ``a`` from registers through the
    swizzled staging tile ``stage`` (GPU interpret mode models only shared-memory operands),
    waited for before the tile is written again."""
    stage[...] = a.astype(stage.dtype)
    plgpu.commit_smem()
    plgpu.wgmma(acc, stage.transpose((1, 0)) if transpose_a else stage, b)
    plgpu.wgmma_wait(0)


# Shared memory a program of the gradient in the modulation may take: no output staging (its
# sums go to global memory from registers), so up to sm_90's 227 KiB less a reserve for the
# barriers and the cubin's static shared memory. One program an SM where it needs that much,
# which is what keeps its result whole: narrower output-channel blocks would each write a
# float32 partial sum of ``dd`` (0.15x of the backward's minimal bytes at 64->64, float32).
GRAD_D_SMEM = 223 * 1024


@dataclasses.dataclass(frozen=True)
class _Gemm:
    """One kernel's implicit GEMM: its sweep's geometry (the splat's: mirrored), the channels
    through the ring (K), the result channels (N), the extra shared memory (the splat's staged
    modulation), whether results are staged for a TMA store, the shared-memory budget."""

    geom: Geometry
    k_in: int
    n_out: int
    extra: int = 0
    out_staging: bool = True
    budget: int = sw.SMEM_BUDGET


# The weight gradient: 64 input channels a program (the wgmma's M, from the transposed
# 128-byte swizzled operand tile), output-channel blocks of 64 (the same swizzle), and at most
# 256 float32 accumulator columns a program (taps x output channels: 128 registers a thread).
_W_CHUNK_BYTES = 128
_W_ACC_COLUMNS = 256


def _w_chunk(dtype) -> int:
    return _W_CHUNK_BYTES // jnp.dtype(dtype).itemsize


def tap_groups(taps: int, block_n: int) -> tuple[int, int]:
    """``(groups, taps a group)`` of the weight gradient: the fewest groups whose taps' float32
    accumulators fit (:data:`_W_ACC_COLUMNS`), the taps spread evenly over them (the last group
    may hold fewer)."""
    most = max(1, _W_ACC_COLUMNS // block_n)
    groups = -(-taps // most)
    return groups, -(-taps // groups)


def _grad_w_smem(geom: Geometry, block_n: int, dtype) -> int:
    """The ring of 64 input channels, the operand tile, ``dy``'s two tiles, the float32
    output tile."""
    itemsize = jnp.dtype(dtype).itemsize
    chunk = _w_chunk(dtype)
    ring = sw.plan(geom, sw.SweepTiles(8, chunk), 1, dtype)
    tiles_ = sw.STRIP * chunk * itemsize + 2 * sw.STRIP * block_n * itemsize
    return sw.smem_bytes(ring, 0) + tiles_ + sw.STRIP * block_n * 4


def _grad_w_reason(geom: Geometry, cin: int, cout: int, dtype) -> str | None:
    if dtype.itemsize != 2:
        return (
            "float32 weight gradient: its products contract over the pixels, which wgmma reads "
            "transposed for 16-bit types only"
        )
    chunk = _w_chunk(dtype)
    if cin % chunk or cout % chunk:
        return (
            f"{cin} input and {cout} output channels: the Mosaic weight gradient takes "
            f"multiples of {chunk} (128-byte swizzled tiles)"
        )
    reason = sw.unsupported_reason(geom, cin, 1, dtype, lambda cb: 0, 1)
    if reason is not None:
        return reason
    if _grad_w_smem(geom, chunk, dtype) > sw.SMEM_BUDGET:
        return "the ring of input rows and the operand tiles do not fit in shared memory"
    return None


def _gemm(partial: str, geom: Geometry, cin: int, cout: int) -> _Gemm:
    """The forward sweeps ``x`` (K = Cin) into ``y`` (N = Cout); the splat ``grad_x`` sweeps
    ``dy`` (K = Cout) over the mirrored window into ``dx`` (N = Cin), ``d`` of its source
    pixels staged (``kw`` planes); ``grad_d`` is the forward's sweep with its sums stored from
    registers."""
    if partial == "x":
        staged = sw.staged_bytes(geom.kernel_size[1])
        return _Gemm(sw.transposed(geom), cout, cin, extra=staged)
    if partial == "d":
        return _Gemm(geom, cin, cout, out_staging=False, budget=GRAD_D_SMEM)
    return _Gemm(geom, cin, cout)


def _smem_bytes(g: _Gemm, block_n: int, dtype, images: int) -> int:
    """The ring of ``k_in`` channels, the weights (and their tangent's: ``images`` of each),
    the operand staging tile, the output staging, the extra bytes."""
    itemsize = jnp.dtype(dtype).itemsize
    kc, _ = cast(tuple[int, int], _chunk(g.k_in, itemsize))  # (a supported case)
    ring = sw.plan(g.geom, sw.SweepTiles(8, g.k_in), images, dtype)
    weights = images * g.geom.num_taps * g.k_in * block_n * itemsize
    staging = sw.STRIP * kc * itemsize
    out = 2 * sw.STRIP * block_n * itemsize if g.out_staging else 0
    return sw.smem_bytes(ring, 0) + weights + staging + out + g.extra


def choose_block_n(g: _Gemm, dtype, images: int) -> int | None:
    """The most result channels a program (of :data:`_BLOCK_N`, dividing ``n_out``, a multiple
    of 32 bytes) that fit, or None."""
    for nb in _BLOCK_N:
        if g.n_out % nb or (nb * jnp.dtype(dtype).itemsize) % 32:
            continue
        if _smem_bytes(g, nb, dtype, images) <= g.budget:
            return nb
    return None


def unsupported_reason(
    partial: str, geom: Geometry, shapes, dtype, *, tangents: bool, precision=None
) -> str | None:
    """Why the Mosaic kernels cannot compute ``partial`` (``y`` the forward, ``x`` the
    gradient in the image, ``w`` in the weights, ``d`` in the modulation: the forward's
    sweep) of this case, or None."""
    if partial not in ("y", "x", "w", "d"):
        raise ValueError(f"no Mosaic kernel for the modulated partial `{partial}`")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {dtype.name} is not one of float32, bfloat16, float16"
    if _exact_float32(dtype, precision):
        return "exact float32 (precision HIGHEST) has no tensor-core instruction"
    cin, cout = shapes["w"][2], shapes["w"][3]
    if partial == "w":
        return _grad_w_reason(geom, cin, cout, dtype)
    images = 2 if tangents else 1
    names = ("output", "input") if partial == "x" else ("input", "output")
    k_in, n_out = (cout, cin) if partial == "x" else (cin, cout)
    if _chunk(k_in, dtype.itemsize) is None:
        return (
            f"{k_in} {names[0]} channels: the Mosaic kernels take a multiple of "
            f"{32 // dtype.itemsize} (a 32-byte wgmma step)"
        )
    if (n_out * dtype.itemsize) % 32:
        return (
            f"{n_out} {names[1]} channels: the Mosaic kernels take a multiple of "
            f"{32 // dtype.itemsize} (32-byte swizzled weight tiles)"
        )

    def check(sweep_geom: Geometry) -> str | None:
        reason = sw.unsupported_reason(sweep_geom, k_in, 1, dtype, lambda cb: 0, images)
        if reason is not None:
            return reason
        if choose_block_n(_gemm(partial, geom, cin, cout), dtype, images) is None:
            return "the ring of input rows and the weights do not fit in shared memory"
        return None

    if partial == "x":
        return sw.splat_unsupported_reason(geom, check)
    return check(geom)


def tiles(geom: Geometry, *, batch: int, cin: int, cout: int, dtype, images: int = 1,
          partial: str = "y", sm_count: int = 132) -> GemmTiles:  # fmt: skip
    """The heuristic's tiles (not yet tuned on a GPU) for ``partial`` (``geom``: the
    forward's geometry): the most result channels that fit (the ring is copied once for each
    channel block), the tallest row block that still gives every multiprocessor a program."""
    if partial == "w":
        return _grad_w_tiles(geom, batch=batch, cin=cin, cout=cout, dtype=dtype,
                             sm_count=sm_count)  # fmt: skip
    g = _gemm(partial, geom, cin, cout)
    nb = cast(int, choose_block_n(g, dtype, images))  # (a supported case: a block fits)
    ho, wo = g.geom.out_size
    across = batch * (wo // sw.STRIP) * (g.n_out // nb)
    block_h = 8
    for rows in (64, 32, 16):
        if across * -(-ho // rows) >= sm_count:
            block_h = rows
            break
    return GemmTiles(min(block_h, ho), nb)


def _products(given: tuple[str, ...]) -> dict[str, tuple[tuple[str, str], ...]]:
    """For each weight operand, the (image, modulation) pairs summed into its left operand: the
    forward ``(x d) w``; the tangent ``(tx d + x td) w + (x d) tw`` for the tangents
    ``given``."""
    if given == ("x", "w", "d"):
        return {"w": (("x", "d"),)}
    left = tuple(p for p in (("tx", "d"), ("x", "td")) if p[0] in given and p[1] in given)
    products = {"w": left} if left else {}
    if "tw" in given:
        products["tw"] = (("x", "d"),)
    return products


def _body(*refs, layout: sw.Layout, names: tuple, products: dict, block_n: int, chunk: int,
          shared_d: bool):  # fmt: skip
    """``names``: the operands, in order: the images (``x``, ``tx``) the ring takes, then the
    weights and modulations the ``products`` use."""
    n_in = len(names)
    ops = dict(zip(names, refs[:n_in], strict=True))
    out_ref, bufs, bars, obuf, w_smem, w_bar, stage = refs[n_in:]
    (kh, kw), cin = layout.geom.kernel_size, layout.tiles.block_channels
    chunks = cin // chunk
    prog = dataclasses.replace(sw.program(layout), c0=0)  # the ring holds every input channel
    o0 = lax.axis_index("chans") * block_n
    images = [k for k in ("x", "tx") if k in ops]
    ring = sw.Ring(layout, prog, [ops[k] for k in images], bufs, bars)
    weights = list(products)

    # Every weight tile of the program's output channels, into shared memory once.
    _load_weights([ops[name] for name in weights], w_smem, w_bar, o0, block_n, kh * kw, chunks,
                  chunk)  # fmt: skip
    b_d = 0 if shared_d else prog.b

    def compute(i):
        def scoped(acc):
            def tap_row(m, carry):
                for n in range(kw):
                    t = m * kw + n
                    mods = {
                        k: sw.pixel_row(ops[k], b_d, i, prog.j0, t) for k in ("d", "td") if k in ops
                    }
                    for c in range(chunks):
                        wins = {
                            k: ring.window(idx, i, m, n, (c * chunk, chunk)).astype(_F32)
                            for idx, k in enumerate(images)
                        }
                        for k, name in enumerate(weights):
                            terms = [wins[img] * mods[mod][:, None] for img, mod in products[name]]
                            a = functools.reduce(jnp.add, terms)
                            b = w_smem.at[k, t * chunks + c].transpose((1, 0))
                            _staged_mma(acc, stage, a, b)
                return carry

            lax.fori_loop(0, kh, tap_row, 0)
            return acc[...]

        return pl.run_scoped(scoped, plgpu.ACC((sw.STRIP, block_n), _F32))

    out_prog = dataclasses.replace(prog, c0=o0)

    def store(i, value, u):
        sw.store_tile(out_ref, obuf, out_prog, i, value, u, block_n)

    sw.sweep(layout, prog, ring, compute, store)


def _run(operands: dict, call: KernelCall, name: str) -> jax.Array:
    """``operands``: by name, the ones given (None dropped)."""
    products = _products(tuple(operands))
    used = {k for pairs in products.values() for pair in pairs for k in pair} | set(products)
    order = ("x", "tx", "w", "tw", "d", "td")
    x = operands["x"]
    n, ho, wo, cout = call.out_shape
    cin, dtype = x.shape[3], x.dtype
    itemsize = jnp.dtype(dtype).itemsize
    images = sum(k in used for k in ("x", "tx"))
    bs = call.block_sizes or tiles(
        call.geom, batch=n, cin=cin, cout=cout, dtype=dtype, images=images
    )
    if cout % bs.block_n or (bs.block_n * itemsize) % 32:
        raise ValueError(
            f"GemmTiles.block_n ({bs.block_n}) must divide the {cout} output channels and span "
            f"a multiple of 32 bytes ({32 // itemsize} {jnp.dtype(dtype).name} channels)"
        )
    layout = sw.plan(call.geom, sw.SweepTiles(bs.block_h, cin), images, dtype)
    chunk, _ = cast(tuple[int, int], _chunk(cin, itemsize))  # (a supported case)
    taps = call.geom.num_taps
    ops = {}
    shared_d = False
    for k in order:
        if k not in used:
            continue
        v = operands[k]
        if k in ("w", "tw"):  # K-major tiles (input channels minor), as wgmma reads them
            v = jnp.swapaxes(v.reshape(taps, cin, cout), 1, 2)
        elif k in ("d", "td"):
            shared_d = v.ndim == 4
            v = v.reshape(-1, ho, wo, taps)
        ops[k] = v
    w_smem = plgpu.SMEM(
        (len(products), taps * (cin // chunk), bs.block_n, chunk), dtype,
        transforms=_transforms(chunk, itemsize),
    )  # fmt: skip
    w_bar = plgpu.Barrier(num_arrivals=len(products) * taps * (cin // chunk), num_barriers=1)
    stage = plgpu.SMEM((sw.STRIP, chunk), dtype, transforms=_transforms(chunk, itemsize))
    extra = [w_smem, w_bar, stage]
    body = functools.partial(
        _body, layout=layout, names=tuple(ops), products=products, block_n=bs.block_n,
        chunk=chunk, shared_d=shared_d,
    )  # fmt: skip
    grid = (cout // bs.block_n, n * -(-ho // bs.block_h), wo // sw.STRIP)
    staging = plgpu.SMEM((2, sw.STRIP, bs.block_n), dtype)
    out = jax.ShapeDtypeStruct(call.out_shape, dtype)
    return sw.run(
        body, tuple(ops.values()), out, layout, call, name=name, batch=n, channels=cout,
        out_scratch=staging, extra_scratch=extra, grid_shape=grid,
    )  # fmt: skip


def forward(x: jax.Array, w: jax.Array, d: jax.Array, call: KernelCall) -> jax.Array:
    """x [N, H, W, Cin], w [kh, kw, Cin, Cout], d [N, Ho, Wo, kh, kw] or [Ho, Wo, kh, kw] ->
    y [N, Ho, Wo, Cout]."""
    return _run({"x": x, "w": w, "d": d}, call, "modulated_forward_mosaic")


def forward_jvp(x, w, d, tx, tw, td, call: KernelCall) -> jax.Array:
    """The forward's tangent ``sum_tap (tx * d + x * td) @ w + (x * d) @ tw`` (each tangent
    None or its slot's shape), in one kernel."""
    given = {"x": x, "w": w, "d": d, "tx": tx, "tw": tw, "td": td}
    ops = {k: v for k, v in given.items() if v is not None}
    return _run(ops, call, "modulated_forward_jvp_mosaic")


def _grad_x_body(w_ref, d_ref, dy_ref, out_ref, bufs, bars, obuf, w_smem, w_bar, stage, dbuf, *,
                 layout: sw.Layout, block_n: int, chunk: int, shared_d: bool,
                 src_hw: tuple[int, int]):  # fmt: skip
    """The splat ``dx[p] = sum_tap (dy[q] d[q, tap]) @ w[tap]^T`` (``q = p + pad - tap``) as
    the mirrored window's sweep: ``dy``'s rows through the ring (every output channel), the
    source pixels' ``d`` staged per tap row (:class:`._sweep.Staged`), the weights
    ``w[tap, c0:c0 + block_n, :]`` (``[taps, Cin, Cout]``: already K-major) in shared
    memory."""
    (kh, kw), (dh, dw) = layout.geom.kernel_size, layout.geom.dilation
    cout = layout.tiles.block_channels
    chunks = cout // chunk
    prog = dataclasses.replace(sw.program(layout), c0=0)
    c0 = lax.axis_index("chans") * block_n
    ring = sw.Ring(layout, prog, [dy_ref], bufs, bars)
    staged = sw.Staged(dbuf, *src_hw, ring.pl, (kw - 1) * dw - ring.pl)
    _load_weights([w_ref], w_smem, w_bar, c0, block_n, kh * kw, chunks, chunk)
    b_d = 0 if shared_d else prog.b

    def compute(i):
        def scoped(acc):
            def tap_row(mf, carry):  # mf: the flipped window row, kh - 1 - m
                q, m = i - ring.pt + mf * dh, kh - 1 - mf
                slot = lax.rem(mf, 2)
                for n in range(kw):
                    staged.fill(slot, n, d_ref, b_d, q, prog.j0, m * kw + n)
                staged.ready()
                for nf in range(kw):
                    n = kw - 1 - nf
                    dv = staged.read(slot, n, nf * dw - ring.pl)
                    for c in range(chunks):
                        win = ring.window(0, i, mf, nf, (c * chunk, chunk)).astype(_F32)
                        b = w_smem.at[0, (m * kw + n) * chunks + c].transpose((1, 0))
                        _staged_mma(acc, stage, win * dv[:, None], b)
                return carry

            lax.fori_loop(0, kh, tap_row, 0)
            return acc[...]

        return pl.run_scoped(scoped, plgpu.ACC((sw.STRIP, block_n), _F32))

    out_prog = dataclasses.replace(prog, c0=c0)

    def store(i, value, u):
        sw.store_tile(out_ref, obuf, out_prog, i, value, u, block_n)

    sw.sweep(layout, prog, ring, compute, store)


def grad_x(w: jax.Array, d: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the image (stride 1): w [kh, kw, Cin, Cout], d [N, Ho, Wo, kh, kw] or
    [Ho, Wo, kh, kw], dy [N, Ho, Wo, Cout] -> dx [N, H, W, Cin]."""
    n, h, w_, cin = call.out_shape
    kh, kw, _, cout = w.shape
    _, ho, wo, _ = dy.shape
    dtype = dy.dtype
    itemsize = jnp.dtype(dtype).itemsize
    bs = call.block_sizes or tiles(call.geom, batch=n, cin=cin, cout=cout, dtype=dtype, partial="x")
    if cin % bs.block_n or (bs.block_n * itemsize) % 32:
        raise ValueError(
            f"GemmTiles.block_n ({bs.block_n}) must divide the {cin} input channels and span "
            f"a multiple of 32 bytes ({32 // itemsize} {jnp.dtype(dtype).name} channels)"
        )
    sweep_geom = sw.transposed(call.geom)
    layout = sw.plan(sweep_geom, sw.SweepTiles(bs.block_h, cout), 1, dtype)
    chunk, _ = cast(tuple[int, int], _chunk(cout, itemsize))  # (a supported case)
    taps = kh * kw
    w_smem = plgpu.SMEM(
        (1, taps * (cout // chunk), bs.block_n, chunk), dtype,
        transforms=_transforms(chunk, itemsize),
    )  # fmt: skip
    w_bar = plgpu.Barrier(num_arrivals=taps * (cout // chunk), num_barriers=1)
    stage = plgpu.SMEM((sw.STRIP, chunk), dtype, transforms=_transforms(chunk, itemsize))
    dbuf = plgpu.SMEM((2, kw, 3 * sw.STRIP), _F32)
    body = functools.partial(
        _grad_x_body, layout=layout, block_n=bs.block_n, chunk=chunk, shared_d=d.ndim == 4,
        src_hw=(ho, wo),
    )  # fmt: skip
    grid = (cin // bs.block_n, n * -(-h // bs.block_h), w_ // sw.STRIP)
    operands = (w.reshape(taps, cin, cout), d.reshape(-1, ho, wo, taps), dy)
    return sw.run(
        body, operands, jax.ShapeDtypeStruct(call.out_shape, dtype), layout, call,
        name="modulated_grad_x_mosaic", batch=n, channels=cin,
        out_scratch=plgpu.SMEM((2, sw.STRIP, bs.block_n), dtype),
        extra_scratch=(w_smem, w_bar, stage, dbuf), grid_shape=grid,
    )  # fmt: skip


def _grad_d_body(x_ref, w_ref, dy_ref, out_ref, bufs, bars, obuf, w_smem, w_bar, stage, *,
                 layout: sw.Layout, block_n: int, chunk: int):  # fmt: skip
    """``dd[p, tap] = sum_o dy[p, o] (x_tap @ w_tap)[p, o]``: the forward's sweep, each tap's
    ``[64, block_n]`` product reduced against ``dy``'s tile (loaded once a row) to a ``[64]``
    vector stored straight to ``dd`` (a strided column). The program's output channels give
    a partial sum (``out[block]``)."""
    del obuf  # the sums go to global memory from registers
    (kh, kw), cin = layout.geom.kernel_size, layout.tiles.block_channels
    chunks = cin // chunk
    prog = dataclasses.replace(sw.program(layout), c0=0)
    block = lax.axis_index("chans")
    o0 = block * block_n
    ring = sw.Ring(layout, prog, [x_ref], bufs, bars)
    _load_weights([w_ref], w_smem, w_bar, o0, block_n, kh * kw, chunks, chunk)

    def compute(i):
        dyv = sw.pixel_tile(dy_ref, prog.b, i, prog.j0, o0, block_n)

        def tap_row(m, carry):
            for n in range(kw):
                t = m * kw + n

                def scoped(acc, n=n, t=t):
                    for c in range(chunks):
                        win = ring.window(0, i, m, n, (c * chunk, chunk))
                        b = w_smem.at[0, t * chunks + c].transpose((1, 0))
                        _staged_mma(acc, stage, win, b)
                    return acc[...]

                product = pl.run_scoped(scoped, plgpu.ACC((sw.STRIP, block_n), _F32))
                total = jnp.sum(product * dyv, axis=1)
                dest = out_ref.at[block, prog.b, i, pl.ds(prog.j0, sw.STRIP), t]
                sw.store_global(dest, total.astype(out_ref.dtype))
            return carry

        lax.fori_loop(0, kh, tap_row, 0)

    sw.sweep(layout, prog, ring, compute, sw.reads_done)


def grad_d(x: jax.Array, w: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the modulation: x [N, H, W, Cin], w [kh, kw, Cin, Cout], dy [N, Ho, Wo,
    Cout] -> dd [N, Ho, Wo, kh, kw] (or [Ho, Wo, kh, kw], summed over the images, for a
    batch-shared modulation). Each output-channel block of a program gives a float32 partial
    sum (one block when the channels fit), added after the kernel with the images' for a
    shared modulation."""
    n, _, _, cin = x.shape
    kh, kw, _, cout = w.shape
    _, ho, wo, _ = dy.shape
    dtype = x.dtype
    itemsize = jnp.dtype(dtype).itemsize
    bs = call.block_sizes or tiles(call.geom, batch=n, cin=cin, cout=cout, dtype=dtype, partial="d")
    if cout % bs.block_n or (bs.block_n * itemsize) % 32:
        raise ValueError(
            f"GemmTiles.block_n ({bs.block_n}) must divide the {cout} output channels and span "
            f"a multiple of 32 bytes ({32 // itemsize} {jnp.dtype(dtype).name} channels)"
        )
    layout = sw.plan(call.geom, sw.SweepTiles(bs.block_h, cin), 1, dtype)
    chunk, _ = cast(tuple[int, int], _chunk(cin, itemsize))  # (a supported case)
    taps = kh * kw
    blocks = cout // bs.block_n
    shared = len(call.out_shape) == 4
    out_dtype = dtype if blocks == 1 and not shared else _F32
    w_smem = plgpu.SMEM(
        (1, taps * (cin // chunk), bs.block_n, chunk), dtype,
        transforms=_transforms(chunk, itemsize),
    )  # fmt: skip
    w_bar = plgpu.Barrier(num_arrivals=taps * (cin // chunk), num_barriers=1)
    stage = plgpu.SMEM((sw.STRIP, chunk), dtype, transforms=_transforms(chunk, itemsize))
    body = functools.partial(_grad_d_body, layout=layout, block_n=bs.block_n, chunk=chunk)
    grid = (blocks, n * -(-ho // bs.block_h), wo // sw.STRIP)
    out = jax.ShapeDtypeStruct((blocks, n, ho, wo, taps), out_dtype)
    weights = jnp.swapaxes(w.reshape(taps, cin, cout), 1, 2)  # K-major: [taps, Cout, Cin]
    parts = sw.run(
        body, (x, weights, dy), out, layout, call, name="modulated_grad_d_mosaic", batch=n,
        channels=cout, out_scratch=plgpu.SMEM((8,), _F32),
        extra_scratch=(w_smem, w_bar, stage), grid_shape=grid,
    )  # fmt: skip
    total = jnp.sum(parts, axis=(0, 1)) if shared else (parts[0] if blocks == 1 else parts.sum(0))
    return total.reshape(call.out_shape).astype(dtype)


# The weight gradient's float32 partial sums, read once more by the sum after the kernel: at
# most this fraction of the gradient's minimal bytes where a row block allows it.
_PARTS_BUDGET = 0.05


def _grad_w_tiles(geom: Geometry, *, batch: int, cin: int, cout: int, dtype,
                  sm_count: int) -> GemmTiles:  # fmt: skip
    """64 output channels a program (the most taps a program: each program reads its image
    rows once). Rows: the tallest block that still gives every multiprocessor a program, among
    those whose float32 partial sums (one ``[taps, Cin, Cout]`` set a program) stay within
    :data:`_PARTS_BUDGET` of the gradient's minimal bytes; failing that, the shortest block
    within it; failing that, whole images (the fewest partial sums; a program looping over
    images would cut them further)."""
    nb = _w_chunk(dtype)
    itemsize = jnp.dtype(dtype).itemsize
    taps = geom.num_taps
    groups, _ = tap_groups(taps, nb)
    (h, w), (ho, wo) = geom.in_size, geom.out_size
    strips = batch * (wo // sw.STRIP)
    across = groups * (cin // nb) * (cout // nb) * strips
    minimal = itemsize * (batch * (h * w * cin + ho * wo * (taps + cout)) + taps * cin * cout)

    def parts_bytes(rows: int) -> int:
        return strips * -(-ho // rows) * taps * cin * cout * 4

    heights = sorted({min(r, ho) for r in (ho, 256, 128, 64, 32, 16, 8)}, reverse=True)
    within = [r for r in heights if parts_bytes(r) <= _PARTS_BUDGET * minimal]
    filling = [r for r in within if across * -(-ho // r) >= sm_count]
    block_h = filling[0] if filling else (within[-1] if within else ho)
    return GemmTiles(block_h, nb)


def _grad_w_body(x_ref, d_ref, dy_ref, out_ref, bufs, bars, obuf, stage, dy_smem, dy_bar, *,
                 layout: sw.Layout, block_n: int, per_group: int, cin_chunks: int,
                 cout_blocks: int, shared_d: bool):  # fmt: skip
    """``dw[tap] += (x_tap * d_tap)^T @ dy`` over the program's rows for the taps of its group:
    the forward's sweep of 64 input channels (the ring), ``dy``'s ``[64, block_n]`` tile of
    each row in shared memory (copied a row ahead, two buffers), one float32 accumulator a tap,
    stored at the end as the program's partial sum ``out[part, tap, c0:c0 + 64, o0:o0 +
    block_n]``."""
    (kh, kw) = layout.geom.kernel_size
    taps, chunk = kh * kw, layout.tiles.block_channels
    idx = lax.axis_index("chans")
    ob, rest = lax.rem(idx, cout_blocks), lax.div(idx, cout_blocks)
    group = lax.div(rest, cin_chunks)
    c0, o0 = lax.rem(rest, cin_chunks) * chunk, ob * block_n
    prog = dataclasses.replace(sw.program(layout), c0=c0)
    strips = layout.geom.out_size[1] // sw.STRIP
    part = lax.axis_index("rows") * strips + lax.axis_index("strip")
    ring = sw.Ring(layout, prog, [x_ref], bufs, bars)
    b_d = 0 if shared_d else prog.b
    # The group's taps (the last group's missing ones repeat its last tap, never stored).
    firsts = [group * per_group + k for k in range(per_group)]
    tap_ids = [jnp.minimum(t, taps - 1) for t in firsts]

    def fetch_dy(i, slot):
        plgpu.copy_gmem_to_smem(
            dy_ref.at[prog.b, i, pl.ds(prog.j0, sw.STRIP), pl.ds(o0, block_n)],
            dy_smem.at[slot],
            dy_bar.at[slot],
        )

    def scoped(*accs):
        fetch_dy(prog.i0, 0)

        def compute(i):
            u = i - prog.i0
            slot = lax.rem(u, 2)

            @pl.when(u + 1 < prog.rows)
            def _():  # the other buffer's last reader, row i - 1's wgmma, has completed
                fetch_dy(i + 1, 1 - slot)

            plgpu.barrier_wait(dy_bar.at[slot])
            for k, t in enumerate(tap_ids):
                dv = sw.pixel_row(d_ref, b_d, i, prog.j0, t)
                win = ring.window(0, i, lax.div(t, kw), lax.rem(t, kw)).astype(_F32)
                _staged_mma(accs[k], stage, win * dv[:, None], dy_smem.at[slot], transpose_a=True)

        sw.sweep(layout, prog, ring, compute, sw.reads_done)
        for k, t in enumerate(tap_ids):

            @pl.when(firsts[k] < taps)
            def _(k=k, t=t):
                obuf[...] = accs[k][...]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    obuf, out_ref.at[part, t, pl.ds(c0, chunk), pl.ds(o0, block_n)]
                )
                plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, *[plgpu.ACC((sw.STRIP, block_n), _F32) for _ in range(per_group)])


def grad_w(x: jax.Array, d: jax.Array, dy: jax.Array, call: KernelCall) -> jax.Array:
    """The gradient in the weights (16-bit types): x [N, H, W, Cin], d [N, Ho, Wo, kh, kw] or
    [Ho, Wo, kh, kw], dy [N, Ho, Wo, Cout] -> dw [kh, kw, Cin, Cout]: each program's float32
    partial sum over its pixels, added after the kernel in a fixed order."""
    kh, kw, cin, cout = call.out_shape
    n, ho, wo, _ = dy.shape
    dtype = x.dtype
    chunk = _w_chunk(dtype)
    if jnp.dtype(dtype).itemsize != 2 or cin % chunk or cout % chunk:
        raise ValueError(
            f"the Mosaic weight gradient takes 16-bit types and multiples of {chunk} channels, "
            f"not {jnp.dtype(dtype).name} {cin}->{cout}"
        )
    bs = call.block_sizes or tiles(call.geom, batch=n, cin=cin, cout=cout, dtype=dtype, partial="w")
    if cout % bs.block_n or bs.block_n % chunk:
        raise ValueError(
            f"GemmTiles.block_n ({bs.block_n}) must divide the {cout} output channels and be a "
            f"multiple of {chunk} (128-byte swizzled tiles) for the weight gradient"
        )
    taps = kh * kw
    groups, per_group = tap_groups(taps, bs.block_n)
    layout = sw.plan(call.geom, sw.SweepTiles(bs.block_h, chunk), 1, dtype)
    row_blocks = -(-ho // bs.block_h)
    parts = n * row_blocks * (wo // sw.STRIP)
    cin_chunks, cout_blocks = cin // chunk, cout // bs.block_n
    swizzled = _transforms(chunk, jnp.dtype(dtype).itemsize)  # 128 bytes, both operands
    stage = plgpu.SMEM((sw.STRIP, chunk), dtype, transforms=swizzled)
    dy_smem = plgpu.SMEM((2, sw.STRIP, bs.block_n), dtype, transforms=swizzled)
    dy_bar = plgpu.Barrier(num_arrivals=1, num_barriers=2)
    body = functools.partial(
        _grad_w_body, layout=layout, block_n=bs.block_n, per_group=per_group,
        cin_chunks=cin_chunks, cout_blocks=cout_blocks, shared_d=d.ndim == 4,
    )  # fmt: skip
    grid = (groups * cin_chunks * cout_blocks, n * row_blocks, wo // sw.STRIP)
    out = jax.ShapeDtypeStruct((parts, taps, cin, cout), _F32)
    partial = sw.run(
        body, (x, d.reshape(-1, ho, wo, taps), dy), out, layout, call,
        name="modulated_grad_w_mosaic", batch=n, channels=cin,
        out_scratch=plgpu.SMEM((sw.STRIP, bs.block_n), _F32),
        extra_scratch=(stage, dy_smem, dy_bar), grid_shape=grid,
    )  # fmt: skip
    return partial.sum(axis=0).reshape(call.out_shape).astype(dtype)
