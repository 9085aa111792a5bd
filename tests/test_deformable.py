"""Deformable convolution (DCNv2 with groups and offset groups), the deformable per-pixel filter
and splat, and ``modulated_conv2d`` with groups: the XLA path against the reference, both
against an independent NumPy oracle written after ``torchvision.ops.deform_conv2d``'s kernel and
against numbers torchvision computed (``tests/data/deformable_torchvision.npz``); gradients in
every argument, forward mode, second order, transposition, vmap, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import svconv
from tests.conftest import assert_close, rands

FIXTURES = Path(__file__).parent / "data" / "deformable_torchvision.npz"


# ------------------------------------------------------------------------------ the oracle


def _np_bilinear(img, h, w):
    """torchvision's ``bilinear_interpolate``: ``img [H, W]`` at ``(h, w)``."""
    height, width = img.shape
    if h <= -1 or height <= h or w <= -1 or width <= w:
        return 0.0
    h_low, w_low = int(np.floor(h)), int(np.floor(w))
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = h - h_low, w - w_low
    hh, hw = 1 - lh, 1 - lw

    def at(r, c):
        return img[r, c] if 0 <= r < height and 0 <= c < width else 0.0

    return (
        hh * hw * at(h_low, w_low)
        + hh * lw * at(h_low, w_high)
        + lh * hw * at(h_high, w_low)
        + lh * lw * at(h_high, w_high)
    )


def np_deform_conv2d(x, w, offsets, mask, stride, pad, dilation, groups):
    """``y`` by the loops of torchvision's CPU kernel (im2col then a grouped product), in
    float64: ``x [N, H, W, C]``, ``w [kh, kw, C/G, O]``, ``offsets [N, Ho, Wo, kh, kw, Go, 2]``,
    ``mask [N, Ho, Wo, kh, kw, Go]``; symmetric ``pad``."""
    x, w, offsets, mask = (np.asarray(a, np.float64) for a in (x, w, offsets, mask))
    n, _, _, c = x.shape
    kh, kw, cg, cout = w.shape
    _, ho, wo, _, _, go, _ = offsets.shape
    per = c // go
    col = np.zeros((n, ho, wo, kh, kw, c))
    for b, i, j, m, q, ch in itertools.product(
        range(n), range(ho), range(wo), range(kh), range(kw), range(c)
    ):
        g = ch // per
        dy, dx = offsets[b, i, j, m, q, g]
        y = i * stride[0] - pad[0] + m * dilation[0] + dy
        xx = j * stride[1] - pad[1] + q * dilation[1] + dx
        col[b, i, j, m, q, ch] = mask[b, i, j, m, q, g] * _np_bilinear(x[b, :, :, ch], y, xx)
    out = np.zeros((n, ho, wo, cout))
    og = cout // groups
    for f in range(groups):
        part = col[..., f * cg : (f + 1) * cg]
        out[..., f * og : (f + 1) * og] = np.einsum(
            "bijmnc,mnco->bijo", part, w[:, :, :, f * og : (f + 1) * og]
        )
    return out


# Offsets that sample inside, across the border and well outside, and on integer positions.
def _offsets(seed, shape, spread=2.0):
    key = jax.random.key(seed)
    k1, k2 = jax.random.split(key)
    off = spread * jax.random.normal(k1, shape)
    integer = jnp.round(off)
    return jnp.where(jax.random.bernoulli(k2, 0.2, shape), integer, off)


CASES = [
    # (N, H, W, C, O, k, stride, pad, dilation, groups, offset groups)
    (2, 7, 8, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    (1, 9, 7, 6, 4, (3, 2), (2, 1), (0, 1), (1, 2), 2, 3),
    (2, 6, 6, 4, 4, (2, 3), (1, 2), (2, 0), (2, 1), 4, 2),
]


def _case(c, seed=0, dtype=jnp.float32):
    n, h, w, cin, cout, (kh, kw), stride, pad, dil, groups, go = c
    ho = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    x, wt, mask = rands(
        seed, (n, h, w, cin), (kh, kw, cin // groups, cout), (n, ho, wo, kh, kw, go)
    )
    offsets = _offsets(seed + 1, (n, ho, wo, kh, kw, go, 2))
    kw_ = {
        "stride": stride,
        "padding": ((pad[0], pad[0]), (pad[1], pad[1])),
        "dilation": dil,
        "feature_group_count": groups,
    }
    return [a.astype(dtype) for a in (x, wt)] + [offsets, mask.astype(dtype)], kw_


@pytest.mark.parametrize("c", CASES, ids=lambda c: f"k{c[5]}-s{c[6]}-g{c[9]}-og{c[10]}")
def test_forward_equals_the_torchvision_loops(c):
    (x, w, offsets, mask), kw = _case(c)
    want = np_deform_conv2d(x, w, offsets, mask, kw["stride"], c[7], kw["dilation"], c[9])
    for impl in ("xla", "reference"):
        got = svconv.deformable_conv2d(x, w, offsets, mask, impl=impl, **kw)
        assert_close(got, want, tol=2e-6, what=impl)


@pytest.mark.parametrize("c", CASES[1:], ids=lambda c: f"k{c[5]}-s{c[6]}-g{c[9]}-og{c[10]}")
def test_gradients_in_every_argument(c):
    """(The plain case's gradients are checked against torchvision's own, below.)"""
    args, kw = _case(c, seed=3)
    ct = rands(9, svconv.deformable_conv2d(*args, **kw).shape)[0]

    def vjp(impl):
        return jax.vjp(lambda *a: svconv.deformable_conv2d(*a, impl=impl, **kw), *args)[1](ct)

    for name, got, want in zip(("x", "w", "offsets", "mask"), vjp("xla"), vjp("reference"),
                               strict=True):  # fmt: skip
        assert_close(got, want, tol=5e-6, what=name)


def test_matches_numbers_torchvision_computed():
    """The forward and every gradient, given torchvision's layouts through the converters."""
    data = np.load(FIXTURES)
    cases = sorted({k.split("/")[0] for k in data.files})
    assert len(cases) >= 3
    for case in cases:
        get = lambda k, case=case: data[f"{case}/{k}"]  # noqa: E731
        stride, pad, dil, groups = (tuple(int(v) for v in get(k)) for k in
                                    ("stride", "padding", "dilation", "groups"))  # fmt: skip
        x = jnp.asarray(get("input")).transpose(0, 2, 3, 1)
        w, offsets, mask = svconv.from_torch_deform_conv2d(get("weight"), get("offset"),
                                                            get("mask"))  # fmt: skip
        kw = {"stride": stride, "padding": ((pad[0], pad[0]), (pad[1], pad[1])), "dilation": dil,
              "feature_group_count": groups[0]}  # fmt: skip

        def f(x, w, offsets, mask, kw=kw):
            return svconv.deformable_conv2d(x, w, offsets, mask, impl="xla", **kw)

        y, vjp = jax.vjp(f, x, w, offsets, mask)
        assert_close(y.transpose(0, 3, 1, 2), get("out"), tol=1e-5, what=f"{case} y")
        gx, gw, goff, gmask = vjp(jnp.asarray(get("grad_out")).transpose(0, 2, 3, 1))
        back = svconv.to_torch_deform_conv2d(gw, goff, gmask)
        assert_close(gx.transpose(0, 3, 1, 2), get("grad_input"), tol=1e-5, what=f"{case} dx")
        for name, got in zip(("grad_weight", "grad_offset", "grad_mask"), back, strict=True):
            assert_close(got, get(name), tol=2e-5, what=f"{case} {name}")


def test_torch_layout_converters_round_trip():
    w, offsets, mask = rands(0, (3, 2, 4, 6), (2, 5, 7, 3, 2, 3, 2), (2, 5, 7, 3, 2, 3))
    tw, toff, tmask = svconv.to_torch_deform_conv2d(w, offsets, mask)
    assert tw.shape == (6, 4, 3, 2) and toff.shape == (2, 36, 5, 7) and tmask.shape == (2, 18, 5, 7)
    # torchvision's channel order: group, then tap (row-major), then (dy, dx).
    assert float(toff[1, (2 * 6 + 1 * 2 + 1) * 2 + 1, 3, 4]) == float(offsets[1, 3, 4, 1, 1, 2, 1])
    back = svconv.from_torch_deform_conv2d(tw, toff, tmask)
    for a, b in zip(back, (w, offsets, mask), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, none = svconv.from_torch_deform_conv2d(tw, toff, None)
    assert none is None


# --------------------------------------------------------------------- forward mode, order 2


def test_forward_mode_against_finite_differences():
    """float64 central differences along a random direction in every argument at once, the
    sample positions kept off the integer grid (where the derivative is one-sided)."""
    with jax.enable_x64(True):
        (x, w, offsets, mask), kw = _case(CASES[1], seed=5)
        x, w, mask = (a.astype(jnp.float64) for a in (x, w, mask))
        offsets = jnp.floor(offsets.astype(jnp.float64)) + 0.37
        tangents = rands(6, x.shape, w.shape, offsets.shape, mask.shape, dtype=jnp.float64)

        def f(*a):
            return svconv.deformable_conv2d(*a, impl="xla", **kw)

        args = (x, w, offsets, mask)
        _, jvp = jax.jvp(f, args, tuple(tangents))
        eps = 1e-6
        plus = f(*(a + eps * t for a, t in zip(args, tangents, strict=True)))
        minus = f(*(a - eps * t for a, t in zip(args, tangents, strict=True)))
        assert_close(jvp, (plus - minus) / (2 * eps), tol=1e-6, what="jvp")


def test_second_order_in_the_offsets_equals_the_reference():
    """A Hessian-vector product in the offsets (the mixed derivative of the bilinear weights
    is the only second derivative that is not zero) and the gradient of a JVP."""
    (x, w, offsets, mask), kw = _case(CASES[0], seed=7)
    v = rands(8, offsets.shape)[0]

    def loss(impl):
        return lambda o: jnp.sum(jnp.sin(svconv.deformable_conv2d(x, w, o, mask, impl=impl, **kw)))

    def hvp(impl):
        return jax.jvp(jax.grad(loss(impl)), (offsets,), (v,))[1]

    assert_close(hvp("xla"), hvp("reference"), tol=1e-5, what="hvp")

    def grad_of_jvp(impl):
        def f(xx):
            g = lambda o: svconv.deformable_conv2d(xx, w, o, mask, impl=impl, **kw)  # noqa: E731
            return jnp.sum(jax.jvp(g, (offsets,), (v,))[1] ** 2)

        return jax.grad(f)(x)

    assert_close(grad_of_jvp("xla"), grad_of_jvp("reference"), tol=1e-5, what="grad of jvp")


def test_linear_transpose_in_x_w_and_mask_equals_the_vjp():
    (x, w, offsets, mask), kw = _case(CASES[1], seed=11)
    ct = rands(12, svconv.deformable_conv2d(x, w, offsets, mask, **kw).shape)[0]
    full = jax.vjp(lambda x, w, m: svconv.deformable_conv2d(x, w, offsets, m, **kw), x, w, mask)
    expected = full[1](ct)
    fns = (
        lambda v: svconv.deformable_conv2d(v, w, offsets, mask, **kw),
        lambda v: svconv.deformable_conv2d(x, v, offsets, mask, **kw),
        lambda v: svconv.deformable_conv2d(x, w, offsets, v, **kw),
    )
    for fn, arg, want in zip(fns, (x, w, mask), expected, strict=True):
        (got,) = jax.linear_transpose(fn, arg)(ct)
        assert_close(got, want, tol=1e-6)


def test_vmap_over_the_offsets_and_over_the_weights():
    (x, w, offsets, mask), kw = _case(CASES[0], seed=13)
    stack = jnp.stack([offsets, -offsets, 0.5 * offsets])
    got = jax.vmap(lambda o: svconv.deformable_conv2d(x, w, o, mask, **kw))(stack)
    for i in range(3):
        assert_close(got[i], svconv.deformable_conv2d(x, w, stack[i], mask, **kw), tol=1e-6)
    ws = jnp.stack([w, 2 * w])
    got = jax.jit(jax.vmap(lambda v: svconv.deformable_conv2d(x, v, offsets, mask, **kw)))(ws)
    assert_close(got[1], 2 * got[0], tol=1e-6)


def test_no_mask_is_ones_and_bfloat16_is_close():
    (x, w, offsets, mask), kw = _case(CASES[2], seed=15)
    ones = jnp.ones_like(mask)
    a = svconv.deformable_conv2d(x, w, offsets, **kw)
    assert_close(a, svconv.deformable_conv2d(x, w, offsets, ones, **kw), tol=1e-6)
    ga = jax.grad(lambda o: jnp.sum(svconv.deformable_conv2d(x, w, o, **kw) ** 2))(offsets)
    gb = jax.grad(lambda o: jnp.sum(svconv.deformable_conv2d(x, w, o, ones, **kw) ** 2))(offsets)
    assert_close(ga, gb, tol=1e-5)
    x16, w16, m16 = (a.astype(jnp.bfloat16) for a in (x, w, mask))
    low = svconv.deformable_conv2d(x16, w16, offsets, m16, **kw)
    assert low.dtype == jnp.bfloat16
    up = [a.astype(jnp.float32) for a in (x16, w16, m16)]
    want = svconv.deformable_conv2d(up[0], up[1], offsets, up[2], **kw)
    assert_close(low, want, dtype=jnp.bfloat16, terms=64)


def test_zero_offsets_give_the_modulated_conv():
    x, w, d = rands(17, (2, 8, 9, 5), (3, 3, 5, 4), (2, 8, 9, 3, 3))
    zero = jnp.zeros((2, 8, 9, 3, 3, 1, 2))
    got = svconv.deformable_conv2d(x, w, zero, d[..., None])
    assert_close(got, svconv.modulated_conv2d(x, w, d), tol=1e-6)


# ---------------------------------------------------------------- modulated conv with groups


@pytest.mark.parametrize("groups", [2, 6], ids=["g2", "depthwise"])
def test_modulated_feature_groups_equal_lax(groups):
    x, w = rands(19, (2, 7, 9, 6), (3, 3, 6 // groups, 12))
    kw = {"stride": (1, 2), "padding": "SAME", "dilation": (2, 1)}
    want = lax.conv_general_dilated(
        x, w, kw["stride"], "SAME", rhs_dilation=kw["dilation"],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )  # fmt: skip
    d = jnp.ones((2, 7, 5, 3, 3))
    for impl in ("xla", "reference"):
        got = svconv.modulated_conv2d(x, w, d, feature_group_count=groups, impl=impl, **kw)
        assert_close(got, want, tol=1e-6, what=impl)


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_modulated_with_modulation_groups_and_its_gradients(shared):
    x, w = rands(21, (2, 6, 7, 6), (3, 3, 3, 4))
    d = rands(22, (6, 7, 3, 3, 3) if shared else (2, 6, 7, 3, 3, 3))[0]
    kw = {"feature_group_count": 2, "padding": 1}
    ct = rands(23, (2, 6, 7, 4))[0]

    def vjp(impl):
        f = lambda *a: svconv.modulated_conv2d(*a, impl=impl, **kw)  # noqa: E731
        y, back = jax.vjp(f, x, w, d)
        return (y, *back(ct))

    for got, want in zip(vjp("xla"), vjp("reference"), strict=True):
        assert_close(got, want, tol=2e-6)
    # Channel c is scaled by group c // 2: a modulation equal across the groups is one without.
    same = jnp.repeat(d[..., :1], 3, axis=-1)
    assert_close(svconv.modulated_conv2d(x, w, same, **kw),
                 svconv.modulated_conv2d(x, w, same[..., 0], **kw), tol=1e-6)  # fmt: skip


# --------------------------------------------------------------- the deformable pixel filter


def test_deformable_filter_and_splat():
    x, k = rands(25, (2, 7, 8, 6), (2, 7, 8, 3, 3, 3))
    offsets = _offsets(26, (2, 7, 8, 3, 3, 3, 2))
    for impl in ("xla", "reference"):
        zero = svconv.deformable_filter2d(x, k, jnp.zeros_like(offsets), impl=impl)
        assert_close(zero, svconv.pixel_filter2d(x, k), tol=1e-6, what=f"{impl} zero")
    got = svconv.deformable_filter2d(x, k, offsets)
    assert_close(got, svconv.deformable_filter2d(x, k, offsets, impl="reference"), tol=1e-6)
    # Per channel, the depthwise deformable conv with the filters as its mask.
    ones = jnp.ones((3, 3, 1, 6))
    assert_close(got, svconv.deformable_conv2d(x, ones, offsets, k, feature_group_count=6),
                 tol=1e-6)  # fmt: skip
    # The splat is the filter's transpose in the image: <splat(s), t> == <s, filter(t)>.
    s, t = rands(27, (2, 7, 8, 6), (2, 7, 8, 6))
    lhs = jnp.vdot(svconv.deformable_splat2d(s, k, offsets), t)
    rhs = jnp.vdot(s, svconv.deformable_filter2d(t, k, offsets))
    np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-5)

    # Gradients in the image, the filters and the offsets.
    def loss(impl):
        return lambda *a: jnp.sum(jnp.cos(svconv.deformable_filter2d(*a, impl=impl)))

    for got, want in zip(
        jax.grad(loss("xla"), (0, 1, 2))(x, k, offsets),
        jax.grad(loss("reference"), (0, 1, 2))(x, k, offsets),
        strict=True,
    ):
        assert_close(got, want, tol=5e-6)  # fmt: skip
    # One group: k and offsets without the groups axis.
    one = svconv.deformable_filter2d(x, k[..., 0], offsets[..., 0, :])
    assert_close(one, svconv.deformable_filter2d(x, k[..., :1], offsets[..., :1, :]), tol=1e-6)


# ------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    (x, w, offsets, mask), _ = _case(CASES[0])
    with pytest.raises(ValueError, match=r"`offsets` must be .* shape \(2, 7, 8, 3, 3, 1\)"):
        svconv.deformable_conv2d(x, w, offsets[..., 0])
    with pytest.raises(ValueError, match="`offsets` of shape .* is not"):
        svconv.deformable_conv2d(x, w, offsets[:, :5])
    with pytest.raises(ValueError, match=r"`mask` of shape \(2, 7, 8, 3, 3, 2\)"):
        svconv.deformable_conv2d(x, w, offsets, jnp.concatenate([mask, mask], -1))
    with pytest.raises(ValueError, match=r"offsets.shape\[5\]` 3 must .* divide the 4"):
        svconv.deformable_conv2d(x, w, jnp.zeros((2, 7, 8, 3, 3, 3, 2)))
    with pytest.raises(ValueError, match="`feature_group_count` 3 must"):
        svconv.deformable_conv2d(x, w, offsets, feature_group_count=3)
    with pytest.raises(ValueError, match="expects 4 input channels in each of 2 feature groups"):
        svconv.deformable_conv2d(x, w, offsets, feature_group_count=2)
    with pytest.raises(TypeError, match="`offsets` must have a floating dtype"):
        svconv.deformable_conv2d(x, w, offsets.astype(jnp.complex64))
    with pytest.raises(NotImplementedError, match="has triton, xla kernels only"):
        svconv.deformable_conv2d(x, w, offsets, impl="mosaic")
    with pytest.raises(NotImplementedError, match="impl='triton'"):
        svconv.modulated_conv2d(x, w[:, :, :2], mask[..., 0], feature_group_count=2, impl="pallas")
    with pytest.raises(ValueError, match=r"`d` of shape \(2, 7, 8, 2, 3, 1\) where"):
        svconv.modulated_conv2d(x, w, mask[:, :, :, :2])
    # At trace time, under jit as well.
    with pytest.raises(ValueError, match="`offsets` of shape"):
        jax.jit(lambda o: svconv.deformable_conv2d(x, w, o))(offsets[:, :5])


# ---------------------------------------------------------------------------------- layers


def test_deformable_conv_layers_start_at_dcnv2s_initialisation_and_agree():
    from flax import nnx

    x = rands(31, (2, 9, 10, 4))[0]
    kw = {"strides": (2, 1), "padding": "SAME", "kernel_dilation": (1, 2)}
    linen = svconv.DeformableConv(6, (3, 3), feature_group_count=2, offset_groups=2, **kw)
    params = linen.init(jax.random.key(0), x)
    y = linen.apply(params, x)
    p = params["params"]
    mask = jnp.full((2, 5, 10, 3, 3, 2), 0.5)
    want = svconv.modulated_conv2d(x, p["kernel"], mask, feature_group_count=2, stride=(2, 1),
                                   dilation=(1, 2)) + p["bias"]  # fmt: skip
    assert_close(y, want, tol=1e-6)
    # Its gradient reaches the offset predictor (the offsets' derivative is not zero).
    grads = jax.grad(lambda q: jnp.sum(jnp.sin(linen.apply(q, x))))(params)
    assert float(jnp.max(jnp.abs(grads["params"]["offset_predictor"]["kernel"]))) > 0
    # The NNX layer with the same parameters.
    layer = svconv.nnx.DeformableConv(4, 6, (3, 3), feature_group_count=2, offset_groups=2,
                                      rngs=nnx.Rngs(1), **kw)  # fmt: skip
    shifted = jax.tree.map(lambda v: v + 0.1, p)  # non-zero offsets
    layer.kernel[...] = shifted["kernel"]
    layer.bias[...] = shifted["bias"]
    layer.offset_predictor.kernel[...] = shifted["offset_predictor"]["kernel"]
    layer.offset_predictor.bias[...] = shifted["offset_predictor"]["bias"]
    assert_close(layer(x), linen.apply({"params": shifted}, x), tol=1e-6)
    # Offsets passed in: the op itself.
    offsets = _offsets(32, (2, 5, 10, 3, 3, 2, 2))
    got = layer(x, offsets)
    want = svconv.deformable_conv2d(x, shifted["kernel"], offsets, feature_group_count=2,
                                    stride=(2, 1), dilation=(1, 2)) + shifted["bias"]  # fmt: skip
    assert_close(got, want, tol=1e-6)
    with pytest.raises(ValueError, match="`mask` without `offsets`"):
        layer(x, None, mask)
    with pytest.raises(ValueError, match="`offset_groups`=3 does not divide 4"):
        svconv.nnx.DeformableConv(4, 6, 3, offset_groups=3, rngs=nnx.Rngs(0))


def test_deformable_filter_layers_start_as_a_box_filter_and_agree():
    from flax import nnx

    x = rands(33, (1, 8, 9, 6))[0]
    linen = svconv.DeformableFilter((3, 3), groups=3, use_projections=False)
    params = linen.init(jax.random.key(0), x)
    box = jnp.full((1, 8, 9, 3, 3), 1 / 9)
    assert_close(linen.apply(params, x), svconv.pixel_filter2d(x, box), tol=1e-6)
    layer = svconv.nnx.DeformableFilter(6, (3, 3), groups=3, rngs=nnx.Rngs(2))
    full = svconv.DeformableFilter((3, 3), groups=3)
    p = full.init(jax.random.key(1), x)["params"]
    p = {**p, "predictor": jax.tree.map(lambda v: v + 0.05, p["predictor"])}
    for name in ("input_projection", "output_projection", "predictor"):
        for leaf in ("kernel", "bias"):
            getattr(getattr(layer, name), leaf)[...] = p[name][leaf]
    y, k, offsets = layer(x, return_sampling=True)
    assert_close(y, full.apply({"params": p}, x), tol=1e-6)
    assert k.shape == (1, 8, 9, 3, 3, 3) and offsets.shape == (1, 8, 9, 3, 3, 3, 2)
    assert_close(jnp.sum(k, axis=(3, 4)), jnp.ones((1, 8, 9, 3)), tol=1e-6)


def test_complex_fields_with_real_offsets():
    (x, w, offsets, mask), kw = _case(CASES[1], seed=35)
    xi, wi, mi = rands(36, x.shape, w.shape, mask.shape)
    x, w, mask = x + 1j * xi, w + 1j * wi, mask + 1j * mi
    ct = rands(37, svconv.deformable_conv2d(x, w, offsets, mask, **kw).shape)[0] * (1 - 2j)

    def vjp(impl):
        f = lambda *a: svconv.deformable_conv2d(*a, impl=impl, **kw)  # noqa: E731
        y, back = jax.vjp(f, x, w, offsets, mask)
        return (y, *back(ct))

    for got, want in zip(vjp("xla"), vjp("reference"), strict=True):
        assert got.dtype == want.dtype
        assert_close(got, want, tol=5e-6)


# --------------------------------------------------------------- Triton kernels (interpreted)

TRITON_CASES = {
    # offset groups across the channel blocks: positions per pixel and channel
    "mixed-groups": (CASES[1], {}),
    # 32 channels in 2 offset groups: one offset group a channel block, positions per pixel
    "uniform": ((2, 9, 10, 32, 16, (3, 3), (2, 1), (1, 1), (1, 2), 2, 2), {}),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_kernels_equal_the_xla_path(name):
    """Forward, the gradient in every argument (the offsets' through the derivative
    sampling) and forward mode, in Pallas's interpreter."""
    case, _ = TRITON_CASES[name]
    args, kw = _case(case, seed=41)
    ct = rands(42, svconv.deformable_conv2d(*args, **kw).shape)[0]
    tangents = rands(43, *(a.shape for a in args))

    def run(impl):
        f = lambda *a: svconv.deformable_conv2d(*a, impl=impl, **kw)  # noqa: E731
        y, back = jax.vjp(f, *args)
        return (y, *back(ct), jax.jvp(f, tuple(args), tuple(tangents))[1])

    for what, got, want in zip(("y", "x", "w", "offsets", "mask", "jvp"), run("triton"),
                               run("xla"), strict=True):  # fmt: skip
        assert_close(got, want, tol=1e-5, what=what)


def test_triton_kernels_without_mask_or_offsets_and_in_bfloat16():
    case = (2, 6, 8, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2)
    (x, w, offsets, mask), kw = _case(case, seed=45)
    # No mask (DCNv1), bfloat16.
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got = svconv.deformable_conv2d(x16, w16, offsets, impl="triton", **kw)
    want = svconv.deformable_conv2d(x16, w16, offsets, impl="xla", **kw)
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, dtype=jnp.bfloat16, terms=9 * 16)
    # Grouped modulation without offsets, batch-shared: modulated_conv2d's groups.
    shared = mask[0]
    ct = rands(46, (2, 6, 8, 32))[0]

    def run(impl):
        f = lambda *a: svconv.modulated_conv2d(*a, feature_group_count=2, impl=impl)  # noqa: E731
        y, back = jax.vjp(f, x, w, shared)
        return (y, *back(ct))

    for got, want in zip(run("triton"), run("xla"), strict=True):
        assert_close(got, want, tol=1e-5)
    with pytest.raises(NotImplementedError, match="depthwise"):
        svconv.deformable_filter2d(x, mask, offsets, impl="triton")
    with pytest.raises(NotImplementedError, match="Pallas kernels is the default"):
        svconv.deformable_conv2d(x, w, offsets, feature_group_count=2, impl="pallas")


def test_modulated_conv_layers_take_feature_groups():
    """With ``d == 1`` and the same parameters: Flax's own grouped ``Conv``, linen and NNX."""
    import flax.linen as fnn
    from flax import nnx

    x = rands(51, (2, 7, 8, 6))[0]
    ones = jnp.ones((7, 8, 3, 3))
    layer = svconv.ModulatedConv(features=4, kernel_size=3, feature_group_count=2)
    params = layer.init(jax.random.key(0), x, ones)
    assert params["params"]["kernel"].shape == (3, 3, 3, 4)
    want = fnn.Conv(4, (3, 3), feature_group_count=2).apply(params, x)
    assert_close(layer.apply(params, x, ones), want, tol=1e-6)
    mod = svconv.nnx.ModulatedConv(6, 4, 3, feature_group_count=2, rngs=nnx.Rngs(0))
    mod.kernel[...] = params["params"]["kernel"]
    mod.bias[...] = params["params"]["bias"]
    assert_close(mod(x, ones), want, tol=1e-6)
    with pytest.raises(ValueError, match="`feature_group_count` 4 does not divide in_features=6"):
        svconv.nnx.ModulatedConv(6, 4, 3, feature_group_count=4, rngs=nnx.Rngs(0))
