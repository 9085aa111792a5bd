"""Per-pixel Gaussian filters on Mosaic GPU, the weights computed in the kernel: the forward,
its fused tangent and the gradient in the scale.

The terms of :mod:`pallas_kernels.triton.gaussian`: tap ``(m, n)`` of output pixel ``p`` weighs
``w = exp(eta[p] . phi(m, n) - zeta[p]) * prod_q phi_q ** moments[q]``; the forward is
``y = s * sum_tap w * x``, its tangent ``sum_tap w * (s * (tx + x * f) + ts * x)`` with
``f = t_eta . phi - t_zeta``, the gradient in the scale ``ds[p] = sum_tap w sum_c x dy[p]``.
The tap features ``phi`` are constants of the unrolled tap loop; a program loads its row's
parameters once (``[64]`` vectors) and computes every tap's weights from them in registers:
without ``rho`` as a row factor times a column factor (``kh + kw`` exponentials a pixel,
:func:`_column_factors`), with it one exponential a tap.

The splat (the gradient in ``x``), ``dx[p] = sum_{q, tap} s[q] w[q, tap] dy[q]`` (stride 1), and
its fused tangent are the transposed geometry's sweep (:func:`._sweep.transposed`): the rows of
``dy`` through the ring; the parameters of a tap row's source pixels (a column shift away) pass
through shared memory (:class:`._sweep.Staged`), and each tap's weights are computed from them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gaussian_taps import features
from pallas_kernels.geometry import Geometry, KernelCall
from pallas_kernels.mosaic_gpu import _sweep as sw

# The splat's staged planes: s, P planes of eta, zeta and, with tangents, theirs (at most).
_SPLAT_PLANES = 2 * (1 + 3 + 1)


def _out_bytes(partial: str, out_itemsize: int):
    if partial == "s":  # float32 partial sums
        return lambda cb: 2 * sw.STRIP * 4
    staged = _SPLAT_PLANES if partial == "x" else 0
    return lambda cb: 2 * sw.STRIP * cb * out_itemsize + sw.staged_bytes(staged)


def unsupported_reason(
    partial: str, geom: Geometry, shapes, dtype, *, tangents: bool, precision=None
) -> str | None:
    """Why the Mosaic kernels cannot compute ``partial`` (``y`` the filter, ``x`` the splat,
    ``s`` the gradient in the scale) of this case, or None (``precision``: no dots, unused)."""
    del precision
    if partial not in ("y", "s", "x"):
        raise ValueError(f"no partial `{partial}` in the Gaussian family")
    channels = shapes["x"][3]
    out = _out_bytes(partial, jnp.dtype(dtype).itemsize)
    images = 2 if tangents else 1
    if partial == "x":

        def check(t: Geometry) -> str | None:
            return sw.unsupported_reason(t, channels, 1, dtype, out, images)

        return sw.splat_unsupported_reason(geom, check)
    return sw.unsupported_reason(geom, channels, 1, dtype, out, images)


def tiles(geom: Geometry, *, batch: int, channels: int, dtype, partial: str = "y",
          images: int = 1, sm_count: int = 132) -> sw.SweepTiles:  # fmt: skip
    """The heuristic's tiles (``geom``: the filter's geometry)."""
    out = _out_bytes(partial, jnp.dtype(dtype).itemsize)
    if partial == "x":
        geom = sw.transposed(geom)
    return sw.sweep_tiles(
        geom, batch=batch, channels=channels, groups=1, dtype=dtype, out_bytes=out,
        images=images, sm_count=sm_count, widest=partial == "s",
    )  # fmt: skip


def _weights(eta, zeta, kernel_size, moments, m, n: int, factors=None):
    """Tap ``(m, n)``'s weight ``[64]`` and its features (``m`` traced: the loop's window
    row; ``n`` a Python int). ``factors``: ``(row factor of m, column factors)`` of a separable
    Gaussian (:func:`_column_factors`, :func:`_row_factor`), whose weight is their product."""
    kh, kw = kernel_size
    u = m.astype(jnp.float32) - (kh - 1) / 2
    phi = features(u, n - (kw - 1) / 2, len(eta))
    if factors is not None:
        row, columns = factors
        w = row * columns[n]
    else:
        logit = -zeta
        for e, f in zip(eta, phi, strict=True):
            logit = logit + e * f
        w = jnp.exp(logit)
    for f, power in zip(phi, moments, strict=True):
        for _ in range(power):
            w = w * f
    return w, phi


def _column_factors(eta, kernel_size) -> list | None:
    """Without ``rho`` the weight ``exp(eta . phi(u, v) - zeta)`` is a row factor
    ``exp(-eta_0 u^2 / 2 - zeta)`` times a column factor ``exp(-eta_last v^2 / 2)``: the ``kw``
    column factors of a row's pixels (``[64]`` each), computed once for every window row, so a
    pixel takes ``kh + kw`` exponentials instead of ``kh * kw``. None with ``rho`` (the ``u v``
    term does not factor). Both factors are at most 1 (``eta >= 0``, ``zeta >= 0``: the
    normaliser's sum holds the centre tap's 1), so neither overflows where the product would
    not."""
    if len(eta) == 3:
        return None
    kw = kernel_size[1]
    return [jnp.exp(eta[-1] * (-((n - (kw - 1) / 2) ** 2) / 2)) for n in range(kw)]


def _row_factor(eta, zeta, kernel_size, m):
    u = m.astype(jnp.float32) - (kernel_size[0] - 1) / 2
    return jnp.exp(eta[0] * (-(u * u) / 2) - zeta)


def _factors(eta, zeta, kernel_size, columns, m):
    """The factors :func:`_weights` takes for window row ``m`` (None: not separable)."""
    return None if columns is None else (_row_factor(eta, zeta, kernel_size, m), columns)


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
        columns = _column_factors(eta, (kh, kw))

        def tap_row(m, accs):  # a loop over the window's rows, its columns unrolled
            plain, moved = accs
            factors = _factors(eta, zeta, (kh, kw), columns, m)
            for n in range(kw):
                w, phi = _weights(eta, zeta, (kh, kw), moments, m, n, factors)
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
        columns = _column_factors(eta, (kh, kw))

        def tap_row(m, acc):
            factors = _factors(eta, zeta, (kh, kw), columns, m)
            for n in range(kw):
                w, _ = _weights(eta, zeta, (kh, kw), moments, m, n, factors)
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


def _splat_body(*refs, layout, names, moments, parts: int, src_hw: tuple[int, int]):
    """``names``: the operands' names in order (``dy``, ``tdy``, then the per-pixel ones)."""
    n_in = len(names)
    ops = dict(zip(names, refs[:n_in], strict=True))
    out_ref, bufs, bars, obuf, pbuf = refs[n_in:]
    (kh, kw), (dh, dw) = layout.geom.kernel_size, layout.geom.dilation
    cb = layout.tiles.block_channels
    prog = sw.program(layout)
    images = [ops["dy"]] + ([ops["tdy"]] if "tdy" in ops else [])
    ring = sw.Ring(layout, prog, images, bufs, bars)
    staged = sw.Staged(pbuf, *src_hw, ring.pl, (kw - 1) * dw - ring.pl)
    # The staged planes: (name, plane of its last axis or None).
    planes: list[tuple[str, int | None]] = []
    for name in ("s", "eta", "zeta", "ts", "teta", "tzeta"):
        if name in ops:
            vector = name in ("eta", "teta")
            planes += [(name, q) for q in range(parts)] if vector else [(name, None)]
    tangents = "tdy" in ops or any(name.startswith("t") for name, _ in planes)

    def compute(i):
        def tap_row(mf, acc):  # mf: the flipped window row, kh - 1 - m
            q, m = i - ring.pt + mf * dh, kh - 1 - mf
            slot = lax.rem(mf, 2)
            for k, (name, part) in enumerate(planes):
                index = () if part is None else (part,)
                staged.fill(slot, k, ops[name], prog.b, q, prog.j0, *index)
            staged.ready()
            for nf in range(kw):
                shift = nf * dw - ring.pl
                v: dict[str, Any] = {}  # name -> vector, or a list of them (a vector plane)
                for k, (name, part) in enumerate(planes):
                    vec = staged.read(slot, k, shift)
                    v[name] = vec if part is None else [*v.get(name, []), vec]
                w, phi = _weights(v["eta"], v["zeta"], (kh, kw), moments, m, kw - 1 - nf)
                dyv = ring.window(0, i, mf, nf).astype(jnp.float32)
                scale = v.get("s")
                if not tangents:
                    acc = acc + dyv * (w if scale is None else w * scale)[:, None]
                    continue
                terms = [t * f for t, f in zip(v.get("teta", ()), phi, strict=False)]
                if "tzeta" in v:
                    terms.append(-v["tzeta"])
                change = None
                if terms:
                    change = dyv * functools.reduce(jnp.add, terms)[:, None]
                if "tdy" in ops:
                    tdyv = ring.window(1, i, mf, nf).astype(jnp.float32)
                    change = tdyv if change is None else change + tdyv
                if change is not None and scale is not None:
                    change = change * scale[:, None]
                if "ts" in v:
                    moved = dyv * v["ts"][:, None]
                    change = moved if change is None else change + moved
                if change is not None:
                    acc = acc + change * w[:, None]
            return acc

        return lax.fori_loop(0, kh, tap_row, sw.zeros_tile(cb))

    def store(i, value, u):
        sw.store_tile(out_ref, obuf, prog, i, value, u, cb)

    sw.sweep(layout, prog, ring, compute, store)


def _splat(operands: dict, call: KernelCall, name: str) -> jax.Array:
    n, h, w, c = call.out_shape
    dy = operands["dy"]
    _, ho, wo, _ = dy.shape
    images = 2 if "tdy" in operands else 1
    bs = call.block_sizes or tiles(
        call.geom, batch=n, channels=c, dtype=dy.dtype, images=images, partial="x"
    )
    layout = sw.plan(sw.transposed(call.geom), bs, images, dy.dtype, per_group=c)
    parts = operands["eta"].shape[-1]
    names = tuple(operands)
    planes = sum(parts if k in ("eta", "teta") else 1 for k in names if k not in ("dy", "tdy"))
    body = functools.partial(
        _splat_body, layout=layout, names=names, moments=call.moments, parts=parts,
        src_hw=(ho, wo),
    )  # fmt: skip
    staging = plgpu.SMEM((2, sw.STRIP, bs.block_channels), dy.dtype)
    staged = plgpu.SMEM((2, planes, 3 * sw.STRIP), jnp.float32)
    out = jax.ShapeDtypeStruct(call.out_shape, dy.dtype)
    return sw.run(
        body, tuple(operands.values()), out, layout, call, name=name, batch=n, channels=c,
        out_scratch=staging, extra_scratch=(staged,),
    )  # fmt: skip


def _splat_operands(**arrays) -> dict:
    """The ones that are not None, images first (the ring takes ``dy`` then ``tdy``)."""
    order = ("dy", "tdy", "s", "eta", "zeta", "ts", "teta", "tzeta")
    return {k: arrays[k] for k in order if arrays.get(k) is not None}


def grad_x(s, dy, eta, zeta, call: KernelCall) -> jax.Array:
    """The filter's transpose in x (the splat): dy [N, Ho, Wo, C] -> [N, H, W, C] (stride 1)."""
    return _splat(_splat_operands(s=s, dy=dy, eta=eta, zeta=zeta), call, "gaussian_grad_x_mosaic")


def grad_x_jvp(s, dy, eta, zeta, ts, tdy, teta, tzeta, call: KernelCall) -> jax.Array:
    """The splat's tangent for tangents of s, dy, eta and zeta (None for a zero one), in one
    kernel."""
    ops = _splat_operands(s=s, dy=dy, eta=eta, zeta=zeta, ts=ts, tdy=tdy, teta=teta, tzeta=tzeta)
    return _splat(ops, call, "gaussian_grad_x_jvp_mosaic")
