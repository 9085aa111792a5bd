"""The deformable family: bilinear sampling at offset positions, its derivatives in the
positions, and the family's XLA partials.

The form is ``T(x, w, d, y; offsets) = <y, deformable_conv2d(x, w, offsets, mask=d)>``:

    y[b,i,j,o] = sum_{m,n,c} S_{m,n}(x)[b,i,j,c] * d[b,i,j,m,n,g(c)] * w[m,n,c',o]

with ``S_{m,n}(x)[b,i,j,c]`` the bilinear sample of channel ``c`` of image ``b`` at
``(pos(i, m) + dy, pos(j, n) + dx)``, ``(dy, dx) = offsets[b,i,j,m,n,g(c)]``, reading zero
outside the image, ``g(c) = c // (C / Go)`` the offset group, and ``w``'s channels in
``feature_groups`` groups as in ``lax.conv_general_dilated`` (``c'`` the channel within its
group, which meets only its group's output channels). It is linear in ``x``, ``w`` and ``d``
(the slots) and depends on ``offsets`` (the parameter) through the bilinear weights.

Sampling at ``(py, px)``: with ``y0 = floor(py)``, ``fy = py - y0`` (``x0``, ``fx`` alike), the
four pixels ``(y0 + a, x0 + b)`` weigh ``(1 - fy, fy)[a] * (1 - fx, fx)[b]``, pixels outside the
image reading zero (so a position with ``py <= -1``, ``py >= H``, ``px <= -1`` or ``px >= W``
samples zero): ``torchvision.ops.deform_conv2d``'s numbers. The derivative in ``py`` replaces
``(1 - fy, fy)`` with ``(-1, 1)``, so the partials take ``moments = (ay, ax)``, the orders of
the derivatives of the sample in ``py`` and ``px``: ``(0, 0)`` the op, ``(1, 0)`` and ``(0, 1)``
its derivatives in the offsets, ``(1, 1)`` the mixed second derivative; an order of 2 or more
along one axis is zero (the weights are piecewise linear). On integer positions the derivative
is the one from above (``y0 = py``), as torchvision's, also at ``py = -1`` (where the sample
is zero but rises with ``py``).

Without offsets (the parameter absent) the sample is the plain window, ``S_{m,n}(x) =
x[pos(i, m), pos(j, n)]``: ``modulated_conv2d`` with feature or modulation groups.

The XLA partials loop over the taps (a rolled loop: compile time independent of the window),
each step gathering the four neighbours of its samples (or slicing the window) for the whole
batch: temporaries of a few images' size, never a ``kh*kw``-times patch tensor. The gradient in
``x`` scatters each tap's column back through the transpose of its sampling.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.geometry import Geometry, KernelCall, vary_like
from svconv._checks import accumulation_dtype
from svconv._primitive import Spec, bind


def _real(dtype) -> jnp.dtype:
    """The real dtype of positions for arrays of ``dtype`` (float32, or float64)."""
    return jnp.finfo(dtype).dtype


def _axis_weights(frac: jax.Array, order: int):
    """The weights of the lower and the upper neighbour along one axis, or their derivative of
    ``order`` in the position (None: zero)."""
    if order == 0:
        return 1 - frac, frac
    if order == 1:
        one = jnp.ones_like(frac)
        return -one, one
    return None


def corners(geom: Geometry, t, offsets_t: jax.Array, moments=(0, 0)):
    """The four neighbours of tap ``t``'s samples: a list of ``(index, weight)``, ``index`` the
    flat pixel ``row * W + col`` (clipped into the image) and ``weight`` the bilinear weight (or
    its derivative of ``moments``), zero where the neighbour is outside the image; None when the
    derivative is zero.

    ``offsets_t [N, Ho, Wo, G, 2]`` (``(dy, dx)``, a real dtype); ``t`` the tap, row-major (an
    int or traced)."""
    (h, w), (ho, wo), (sh, sw), (dh, dw) = geom.in_size, geom.out_size, geom.stride, geom.dilation
    (pt, _), (pl, _) = geom.padding
    kw = geom.kernel_size[1]
    real = offsets_t.dtype
    m, n = t // kw, t % kw
    rows = (jnp.arange(ho) * sh + (m * dh - pt)).astype(real)
    cols = (jnp.arange(wo) * sw + (n * dw - pl)).astype(real)
    py = rows[:, None, None] + offsets_t[..., 0]
    px = cols[None, :, None] + offsets_t[..., 1]
    # Clamped where every neighbour is outside (nothing changes): huge or non-finite offsets
    # never reach the integer conversion.
    py, px = jnp.clip(py, -2, h + 1), jnp.clip(px, -2, w + 1)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    weights_y = _axis_weights(py - y0, moments[0])
    weights_x = _axis_weights(px - x0, moments[1])
    if weights_y is None or weights_x is None:
        return None
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    out = []
    for a in (0, 1):
        for b in (0, 1):
            yy, xx = y0 + a, x0 + b
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            weight = jnp.where(inside, weights_y[a] * weights_x[b], 0)
            index = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
            out.append((index, weight))
    return out


def _gather(xf: jax.Array, index: jax.Array) -> jax.Array:
    """``xf [N, H*W, G, Cg]`` at ``index [N, Ho, Wo, G]`` -> ``[N, Ho, Wo, G, Cg]``: rows of a
    ``[N*H*W*G, Cg]`` view at one flat index each (on XLA:CPU ``grad_d`` ran 2.4x faster than
    with three index arrays; the scatter of ``grad_x`` took as long either way)."""
    n, hw, g, cg = xf.shape
    b = jnp.arange(n, dtype=index.dtype).reshape(n, 1, 1, 1)
    flat = (b * hw + index) * g + jnp.arange(g, dtype=index.dtype)
    return xf.reshape(n * hw * g, cg).at[flat].get(mode="promise_in_bounds")


def _sampler(geom: Geometry, x_shape, offsets, groups: int, moments, acc):
    """``sample(x, t) -> [N, Ho, Wo, G, C / G]``, tap ``t``'s samples of ``x`` (``[N, H, W, C]``
    in ``acc``; ``G`` the offset groups), linear in ``x``; None when the derivative of
    ``moments`` is zero."""
    n, h, w, c = x_shape
    (ho, wo), kernel = geom.out_size, geom.kernel_size
    if offsets is None:
        if any(moments):
            return None
        (pt, pb), (pl, pr) = geom.padding

        def window(x, t):
            xp = lax.pad(
                x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0))
            )
            win = _tap_window(xp, t, kernel, geom.out_size, geom.stride, geom.dilation)
            return win.reshape(n, ho, wo, groups, c // groups)

        return window
    real = _real(acc)
    if max(moments) > 1:
        return None

    def sample(x, t):
        offsets_t = lax.dynamic_index_in_dim(offsets, t, axis=3, keepdims=False).astype(real)
        xf = x.reshape(n, h * w, groups, c // groups)
        out = 0
        for index, weight in corners(geom, t, offsets_t, moments):
            out = out + _gather(xf, index) * weight[..., None].astype(x.dtype)
        return out

    return sample


def _tap_window(xp, t, kernel_size, out_size, stride, dilation):
    """Tap ``t``'s (traced) strided window of the padded ``xp [N, H', W', C]``."""
    (ho, wo), (sh, sw), (dh, dw) = out_size, stride, dilation
    m, n = t // kernel_size[1], t % kernel_size[1]
    win = lax.dynamic_slice(
        xp, (0, m * dh, n * dw, 0), (xp.shape[0], (ho - 1) * sh + 1, (wo - 1) * sw + 1, xp.shape[3])
    )
    return lax.slice(win, (0, 0, 0, 0), win.shape, (1, sh, sw, 1))


class _Form:
    """The arrays of one partial, normalised: the slots in the accumulation dtype, the per-pixel
    arrays batched with their taps flattened, the sampler."""

    def __init__(self, call: KernelCall, x_shape, w, d, offsets, groups: int, dtype):
        self.geom = call.geom
        self.acc = accumulation_dtype(dtype)
        self.precision = call.precision
        self.moments = call.moments or (0, 0)
        kh, kw = call.geom.kernel_size
        self.taps = kh * kw
        self.x_shape = x_shape
        self.w = None if w is None else w.reshape(self.taps, *w.shape[2:]).astype(self.acc)
        if d is not None:
            d = d if d.ndim == 6 else d[None]
            d = d.reshape(*d.shape[:3], self.taps, d.shape[-1]).astype(self.acc)
        self.d = d
        if offsets is not None:
            offsets = offsets.reshape(*offsets.shape[:3], self.taps, *offsets.shape[5:])
        self.groups = groups  # offset (modulation) groups
        self.sample = _sampler(call.geom, x_shape, offsets, groups, self.moments, self.acc)
        self.feature_groups = 1 if w is None else x_shape[3] // w.shape[2]

    def mask(self, t):
        """``d`` of tap ``t``: ``[N or 1, Ho, Wo, G, 1]`` (None: ones)."""
        if self.d is None:
            return None
        return lax.dynamic_index_in_dim(self.d, t, axis=3, keepdims=False)[..., None]

    def weights(self, t):
        return lax.dynamic_index_in_dim(self.w, t, axis=0, keepdims=False)  # [C / Gf, Cout]

    def apply_w(self, s, t):
        """``s [N, Ho, Wo, C]`` times tap ``t``'s weights, by feature group -> ``[.., Cout]``."""
        w, gf = self.weights(t), self.feature_groups
        cg, cout = w.shape
        if cg == 1 and cout == gf:  # depthwise, one output a channel: a product
            return s * w[0]
        if gf == 1:  # one GEMM (a batched dot_general is a slow loop on XLA:CPU)
            return lax.dot_general(s, w, (((3,), (0,)), ((), ())), precision=self.precision,
                                   preferred_element_type=self.acc)  # fmt: skip
        s = s.reshape(*s.shape[:3], gf, cg)
        w = w.reshape(cg, gf, cout // gf)
        out = jnp.einsum("bhwgc,cgo->bhwgo", s, w, precision=self.precision,
                         preferred_element_type=self.acc)  # fmt: skip
        return out.reshape(*out.shape[:3], cout)

    def apply_w_t(self, dy, t):
        """The transpose of :meth:`apply_w`: ``dy [N, Ho, Wo, Cout]`` -> ``[N, Ho, Wo, C]``."""
        w, gf = self.weights(t), self.feature_groups
        cg, cout = w.shape
        if cg == 1 and cout == gf:
            return dy * w[0]
        if gf == 1:
            return lax.dot_general(dy, w, (((3,), (1,)), ((), ())), precision=self.precision,
                                   preferred_element_type=self.acc)  # fmt: skip
        dy = dy.reshape(*dy.shape[:3], gf, cout // gf)
        w = w.reshape(cg, gf, cout // gf)
        out = jnp.einsum("bhwgo,cgo->bhwgc", dy, w, precision=self.precision,
                         preferred_element_type=self.acc)  # fmt: skip
        return out.reshape(*out.shape[:3], gf * cg)

    def grouped(self, v):
        """``[N, Ho, Wo, C]`` -> ``[N, Ho, Wo, G, C / G]`` (offset groups)."""
        return v.reshape(*v.shape[:3], self.groups, -1)

    def flat(self, v):
        return v.reshape(*v.shape[:3], -1)


# The forward unrolls its tap loop up to this many taps (XLA:CPU, 3x3: 1.2-1.6x faster);
# every other loop is rolled (unrolled, the gradient in the image was 2x slower), as is the
# forward of larger windows (compile time independent of the window).
_UNROLLED_FORWARD_TAPS = 9


def _loop(count, body, init, *operands, unroll: bool = False):
    """The loop over the taps, rolled unless ``unroll``."""
    init = jax.tree.map(lambda v: vary_like(v, *operands), init)
    if unroll:
        for t in range(count):
            init = body(t, init)
        return init
    return lax.fori_loop(0, count, body, init)


def _zeros(shape, dtype, *operands):
    return vary_like(jnp.zeros(shape, dtype), *operands)


def forward(x, w, d, offsets, call: KernelCall) -> jax.Array:
    """``y [N, Ho, Wo, Cout]``."""
    f = _Form(call, x.shape, w, d, offsets, _groups(d, offsets), x.dtype)
    if f.sample is None:
        return _zeros(call.out_shape, x.dtype, x, w, d, offsets)
    xa = x.astype(f.acc)

    def body(t, y):
        s = f.sample(xa, t)
        if (dm := f.mask(t)) is not None:
            s = s * dm
        return y + f.apply_w(f.flat(s), t)

    unroll = f.taps <= _UNROLLED_FORWARD_TAPS
    y = _loop(f.taps, body, jnp.zeros(call.out_shape, f.acc), xa, w, d, offsets, unroll=unroll)
    return y.astype(x.dtype)


def grad_x(w, d, dy, offsets, call: KernelCall) -> jax.Array:
    """``dx [N, H, W, C]``: each tap's column scattered back through its sampling."""
    f = _Form(call, call.out_shape, w, d, offsets, _groups(d, offsets), dy.dtype)
    if f.sample is None:
        return _zeros(call.out_shape, dy.dtype, w, d, dy, offsets)
    dya = dy.astype(f.acc)
    # The sampling's transpose, taken at an image that varies over the manual axes the
    # operands vary over (inside shard_map a transpose from an invariant image would sum the
    # devices' scatters).
    at = _zeros(call.out_shape, f.acc, w, d, dy, offsets)

    def body(t, dx):
        col = f.grouped(f.apply_w_t(dya, t))
        if (dm := f.mask(t)) is not None:
            col = col * dm
        (back,) = jax.vjp(functools.partial(f.sample, t=t), at)[1](col)
        return dx + back

    dx = _loop(f.taps, body, jnp.zeros(call.out_shape, f.acc), dya, w, d, offsets)
    return dx.astype(dy.dtype)


def grad_w(x, d, dy, offsets, call: KernelCall) -> jax.Array:
    """``dw [kh, kw, C / Gf, Cout]``."""
    kh, kw, cg, cout = call.out_shape
    f = _Form(call, x.shape, None, d, offsets, _groups(d, offsets), x.dtype)
    gf = x.shape[3] // cg
    if f.sample is None:
        return _zeros(call.out_shape, x.dtype, x, d, dy, offsets)
    xa, dya = x.astype(f.acc), dy.astype(f.acc)
    dyg = dya.reshape(*dya.shape[:3], gf, cout // gf)

    def body(t, dw):
        s = f.sample(xa, t)
        if (dm := f.mask(t)) is not None:
            s = s * dm
        s = lax.optimization_barrier(f.flat(s))  # (a fusion of its own: see grad_d)
        if gf == 1:  # one GEMM over the pixels (a batched dot_general is slow on XLA:CPU)
            tap = lax.dot_general(s, dya, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                  precision=f.precision, preferred_element_type=f.acc)  # fmt: skip
            return lax.dynamic_update_index_in_dim(dw, tap, t, axis=0)
        s = s.reshape(*s.shape[:3], gf, cg)
        tap = jnp.einsum("bhwgc,bhwgo->cgo", s, dyg, precision=f.precision,
                         preferred_element_type=f.acc)  # fmt: skip
        return lax.dynamic_update_index_in_dim(dw, tap.reshape(cg, cout), t, axis=0)

    dw = _loop(f.taps, body, jnp.zeros((kh * kw, cg, cout), f.acc), xa, d, dya, offsets)
    return dw.reshape(call.out_shape).astype(x.dtype)


def grad_d(x, w, dy, offsets, call: KernelCall) -> jax.Array:
    """``dd [N, Ho, Wo, kh, kw, G]`` (or, for a batch-shared ``d``, summed over the batch)."""
    shared = len(call.out_shape) == 5
    groups = call.out_shape[-1]
    f = _Form(call, x.shape, w, None, offsets, groups, x.dtype)
    if f.sample is None:
        return _zeros(call.out_shape, x.dtype, x, w, dy, offsets)
    xa, dya = x.astype(f.acc), dy.astype(f.acc)
    n, (ho, wo) = x.shape[0], call.geom.out_size

    def body(t, dd):
        # Each operand a fusion of its own (fused into its consumer, the gathers would be
        # recomputed along the reduction: 2.5x slower on XLA:CPU).
        s = lax.optimization_barrier(f.sample(xa, t))
        col = lax.optimization_barrier(f.grouped(f.apply_w_t(dya, t)))
        tap = jnp.sum(s * col, axis=-1)  # [N, Ho, Wo, G]
        if shared:
            tap = jnp.sum(tap, axis=0, keepdims=True)
        return lax.dynamic_update_index_in_dim(dd, tap, t, axis=0)

    rows = 1 if shared else n
    dd = _loop(f.taps, body, jnp.zeros((f.taps, rows, ho, wo, groups), f.acc), xa, w, dya, offsets)
    dd = jnp.moveaxis(dd, 0, 3).reshape(rows, ho, wo, *call.geom.kernel_size, groups)
    return (dd[0] if shared else dd).astype(x.dtype)


def _groups(d, offsets) -> int:
    """The offset groups, from ``d`` or ``offsets`` (1 without either)."""
    if offsets is not None:
        return offsets.shape[-2]
    if d is not None:
        return d.shape[-1]
    return 1


# --------------------------------------------------------------- derivatives in the offsets


def param_jvp(spec: Spec, values: dict, name: str, tangent: jax.Array) -> jax.Array:
    """The tangent of a deformable partial for a tangent of the offsets ``[N, Ho, Wo, kh, kw,
    G, 2]``: for each axis ``p`` the same partial with the sample's derivative in that axis
    (``moments`` raised) and ``d`` scaled by the tangent's component (or, when ``d`` is the
    target, the result scaled); a second derivative along one axis is zero."""
    del name
    base = spec.moments or (0, 0)
    dtype = values[spec.slot_operands[0]].dtype
    batched = tuple(s for s in spec.shared if s != "d")
    total = None
    for p in (0, 1):
        moments = tuple(a + (q == p) for q, a in enumerate(base))
        if max(moments) > 1:
            continue
        per = tangent[..., p]
        sub = dataclasses.replace(spec, moments=moments, shared=batched)
        if spec.target == "d":
            term = bind(sub, *(values[n] for n in sub.operands)) * per.astype(dtype)
            if "d" in spec.shared:
                term = jnp.sum(term, axis=0, dtype=accumulation_dtype(dtype)).astype(dtype)
        else:
            d = values.get("d")
            scale = per if d is None else d * per if "d" not in spec.shared else d[None] * per
            sub = dataclasses.replace(sub, unit=tuple(u for u in spec.unit if u != "d"))
            args = {**values, "d": scale.astype(dtype)}
            term = bind(sub, *(args[n] for n in sub.operands))
        total = term if total is None else total + term
    if total is None:
        shapes = spec.shapes(tuple(values[n].shape for n in spec.operands))
        return _zeros(shapes[spec.target], dtype, *values.values())
    return total
