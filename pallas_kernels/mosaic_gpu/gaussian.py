"""Per-pixel Gaussian filters on Mosaic GPU, the weights computed in the kernel: the forward,
its fused tangent and the gradient in the scale.

The terms of :mod:`pallas_kernels.triton.gaussian`: tap ``(m, n)`` of output pixel ``p`` weighs
``w = exp(eta[p] . phi(m, n) - zeta[p]) * prod_q phi_q ** moments[q]``; the forward is
``y = s * sum_tap w * x``, its tangent ``sum_tap w * (s * (tx + x * f) + ts * x)`` with
``f = t_eta . phi - t_zeta``, the gradient in the scale ``ds[p] = sum_tap w sum_c x dy[p]``.
The tap features ``phi`` are constants of the unrolled tap loop; a program loads its row's
parameters once (``[64]`` vectors) and computes every tap's weights from them in registers.

The splat (the gradient in ``x``) is not written for this backend yet; the Triton kernel runs it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gaussian_taps import features
from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw


def _out_bytes(partial: str, out_itemsize: int):
    if partial == "s":  # float32 partial sums
        return lambda cb: 2 * sw.STRIP * 4
    return lambda cb: 2 * sw.STRIP * cb * out_itemsize


def unsupported_reason(
    partial: str, geom: Geometry, shapes, dtype, *, tangents: bool
) -> str | None:
    """Why the Mosaic kernels cannot compute ``partial`` of this case, or None."""
    if partial not in ("y", "s"):
        return f"no Mosaic kernel for the gradient in `{partial}` yet"
    channels = shapes["x"][3]
    out = _out_bytes(partial, jnp.dtype(dtype).itemsize)
    images = 2 if tangents else 1
    return sw.unsupported_reason(geom, channels, 1, dtype, out, images)


def tiles(geom: Geometry, *, batch: int, channels: int, dtype, partial: str = "y",
          images: int = 1, sm_count: int = 132) -> sw.SweepTiles:  # fmt: skip
    """The heuristic's tiles."""
    out = _out_bytes(partial, jnp.dtype(dtype).itemsize)
    return sw.sweep_tiles(
        geom, batch=batch, channels=channels, groups=1, dtype=dtype, out_bytes=out,
        images=images, sm_count=sm_count, widest=partial == "s",
    )  # fmt: skip


def _weights(eta, zeta, kernel_size, moments, m, n: int):
    """Tap ``(m, n)``'s weight ``[64]`` and its features (``m`` traced: the loop's window
    row; ``n`` a Python int)."""
    kh, kw = kernel_size
    u = m.astype(jnp.float32) - (kh - 1) / 2
    phi = features(u, n - (kw - 1) / 2, len(eta))
    logit = -zeta
    for e, f in zip(eta, phi, strict=True):
        logit = logit + e * f
    w = jnp.exp(logit)
    for f, power in zip(phi, moments, strict=True):
        for _ in range(power):
            w = w * f
    return w, phi


def _params(refs, b, i, j0):
    """A row's parameters ``(eta planes, zeta)`` from ``(eta_ref, zeta_ref)`` (None: none)."""
    eta_ref, zeta_ref = refs
    eta = None
    if eta_ref is not None:
        eta = [sw.pixel_row(eta_ref, b, i, j0, p) for p in range(eta_ref.shape[-1])]
    zeta = None if zeta_ref is None else sw.pixel_row(zeta_ref, b, i, j0)
    return eta, zeta


def _forward_body(*refs, layout, names, moments):
    """``names``: the operands' names in order (``x``, ``s``, ``eta``, ``zeta`` and the
    tangents ``tx``, ``ts``, ``teta``, ``tzeta``), the ones given."""
    n_in = len(names)
    ops = dict(zip(names, refs[:n_in], strict=True))
    out_ref, bufs, bars, obuf = refs[n_in:]
    (kh, kw), cb = layout.geom.kernel_size, layout.tiles.block_channels
    prog = sw.program(layout)
    images = [ops["x"]] + ([ops["tx"]] if "tx" in ops else [])
    ring = sw.Ring(layout, prog, images, bufs, bars)
    tangents = any(n.startswith("t") for n in names)

    def compute(i):
        b, j0 = prog.b, prog.j0
        eta, zeta = _params((ops["eta"], ops["zeta"]), b, i, j0)
        teta, tzeta = _params((ops.get("teta"), ops.get("tzeta")), b, i, j0)
        scale = sw.pixel_row(ops["s"], b, i, j0) if "s" in ops else None
        tscale = sw.pixel_row(ops["ts"], b, i, j0) if "ts" in ops else None

        def tap_row(m, accs):  # a loop over the window's rows, its columns unrolled
            plain, moved = accs
            for n in range(kw):
                w, phi = _weights(eta, zeta, (kh, kw), moments, m, n)
                xv = ring.window(0, i, m, n).astype(jnp.float32)
                if not tangents:
                    moved = moved + xv * w[:, None]
                    continue
                # f = t_eta . phi - t_zeta, the weight's relative tangent.
                terms = [t * f for t, f in zip(teta or (), phi, strict=False)]
                if tzeta is not None:
                    terms.append(-tzeta)
                change = None
                if terms:
                    change = xv * functools.reduce(jnp.add, terms)[:, None]
                if "tx" in ops:
                    txv = ring.window(1, i, m, n).astype(jnp.float32)
                    change = txv if change is None else change + txv
                if tscale is not None:
                    plain = plain + xv * w[:, None]
                if change is not None:
                    moved = moved + change * w[:, None]
            return plain, moved

        zeros = sw.zeros_tile(cb)
        plain, moved = lax.fori_loop(0, kh, tap_row, (zeros, zeros))
        acc = moved if scale is None else moved * scale[:, None]
        if tscale is not None:
            acc = acc + plain * tscale[:, None]
        return acc

    def store(i, value, u):
        sw.store_tile(out_ref, obuf, prog, i, value, u, cb)

    sw.sweep(layout, prog, ring, compute, store)


def _forward(operands: dict, call: KernelCall, name: str) -> jax.Array:
    n, ho, wo, c = call.out_shape
    x = operands["x"]
    images = 2 if "tx" in operands else 1
    bs = call.block_sizes or tiles(call.geom, batch=n, channels=c, dtype=x.dtype, images=images)
    layout = sw.plan(call.geom, bs, images, x.dtype, per_group=c)
    names = tuple(operands)
    body = functools.partial(_forward_body, layout=layout, names=names, moments=call.moments)
    staging = plgpu.SMEM((2, sw.STRIP, bs.block_channels), x.dtype)
    out = jax.ShapeDtypeStruct(call.out_shape, x.dtype)
    return sw.run(
        body, tuple(operands.values()), out, layout, call, name=name, batch=n, channels=c,
        out_scratch=staging,
    )  # fmt: skip


def _given(**arrays) -> dict:
    """The ones that are not None, images first (the ring takes ``x`` then ``tx``)."""
    order = ("x", "tx", "s", "eta", "zeta", "ts", "teta", "tzeta")
    return {k: arrays[k] for k in order if arrays.get(k) is not None}


def forward(x, s, eta, zeta, call: KernelCall) -> jax.Array:
    """The Gaussian filter: x [N, H, W, C] (scale s or None, parameters eta [N, Ho, Wo, P],
    zeta [N, Ho, Wo]) -> y [N, Ho, Wo, C]."""
    return _forward(_given(x=x, s=s, eta=eta, zeta=zeta), call, "gaussian_forward_mosaic")


def forward_jvp(x, s, eta, zeta, tx, ts, teta, tzeta, call: KernelCall) -> jax.Array:
    """The filter's tangent for tangents of x, s, eta and zeta (None for a zero one), in one
    kernel."""
    ops = _given(x=x, s=s, eta=eta, zeta=zeta, tx=tx, ts=ts, teta=teta, tzeta=tzeta)
    return _forward(ops, call, "gaussian_forward_jvp_mosaic")


def _grad_s_body(x_ref, dy_ref, eta_ref, zeta_ref, out_ref, bufs, bars, obuf, *, layout,
                 moments):  # fmt: skip
    (kh, kw), cb = layout.geom.kernel_size, layout.tiles.block_channels
    prog = sw.program(layout)
    ring = sw.Ring(layout, prog, [x_ref], bufs, bars)

    def compute(i):
        eta, zeta = _params((eta_ref, zeta_ref), prog.b, i, prog.j0)
        dyv = sw.pixel_tile(dy_ref, prog.b, i, prog.j0, prog.c0, cb)

        def tap_row(m, acc):
            for n in range(kw):
                w, _ = _weights(eta, zeta, (kh, kw), moments, m, n)
                xv = ring.window(0, i, m, n).astype(jnp.float32)
                acc = acc + w * jnp.sum(xv * dyv, axis=1)
            return acc

        return lax.fori_loop(0, kh, tap_row, sw.zeros_row())

    def store(i, value, u):  # this channel block's part of the sum
        block = lax.div(prog.c0, cb)
        sw.store_row(out_ref.at[block], obuf, prog, i, value, u)

    sw.sweep(layout, prog, ring, compute, store)


def grad_s(x, dy, eta, zeta, call: KernelCall) -> jax.Array:
    """The filter's gradient in its scale: ``ds[p] = sum_tap w sum_c x[pos] dy[p]``, [N, Ho,
    Wo]. Each channel block's programs write their part of the sum over the channels (float32,
    ``[blocks, N, Ho, Wo]``: a channel block's ``1 / block_channels`` of the bytes of ``x``);
    the parts are added after the kernel."""
    n, ho, wo = call.out_shape
    c = x.shape[3]
    bs = call.block_sizes or tiles(call.geom, batch=n, channels=c, dtype=x.dtype, partial="s")
    layout = sw.plan(call.geom, bs, 1, x.dtype, per_group=c)
    body = functools.partial(_grad_s_body, layout=layout, moments=call.moments)
    staging = plgpu.SMEM((2, sw.STRIP), jnp.float32)
    blocks = c // bs.block_channels
    out = jax.ShapeDtypeStruct((blocks, *call.out_shape), jnp.float32)
    parts = sw.run(
        body, (x, dy, eta, zeta), out, layout, call, name="gaussian_grad_s_mosaic", batch=n,
        channels=c, out_scratch=staging,
    )  # fmt: skip
    return jnp.sum(parts, axis=0).astype(x.dtype)
