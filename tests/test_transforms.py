"""jit, vmap over every argument, grad-of-grad, checkpoint, dtypes, NaN propagation."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svconv
from tests.conftest import Case, assert_close, rands

IMPLS = ["xla", "pallas"]
CASE = Case(2, 7, 6, 3, 4, (3, 3), (2, 1), 1, ((1, 0), (2, 1)))
GEOM = CASE.geom()


def _ops(impl, case: Case = CASE, dtype=jnp.float32, seed: int = 21):
    """Each op as a function of its arrays, with its random arguments (one filter group per
    channel for the pixel ops)."""
    kw = {**case.kw(), "impl": impl}
    (ho, wo), k, n = case.geom().out_size, case.geom().kernel_size, case.n
    x, w, d, wl, kg, v = rands(
        seed,
        (n, case.h, case.w, case.cin),
        (*k, case.cin, case.cout),
        (n, ho, wo, *k),
        (ho, wo, *k, case.cin, case.cout),
        (n, ho, wo, *k, case.cin),
        (n, ho, wo, case.cin),
        dtype=dtype,
    )
    return {
        "modulated": (functools.partial(svconv.modulated_conv2d, **kw), (x, w, d)),
        "local": (functools.partial(svconv.local_conv2d, **kw), (x, wl)),
        "filter": (functools.partial(svconv.pixel_filter2d, **kw), (x, kg)),
        "splat": (
            functools.partial(svconv.pixel_splat2d, **kw, output_size=(case.h, case.w)),
            (v, kg),
        ),
    }


def _reference(name):
    return _ops("reference")[name][0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_jit_and_vmap_over_each_argument(impl, name):
    f, args = _ops(impl)[name]
    ref = _reference(name)
    assert_close(jax.jit(f)(*args), ref(*args), what="jit")
    for axis_arg in range(len(args)):
        # A leading vmapped axis of size 2 on one argument; the others are shared.
        stacked = [a if i != axis_arg else jnp.stack([a, 0.5 * a]) for i, a in enumerate(args)]
        in_axes = [None if i != axis_arg else 0 for i in range(len(args))]
        got = jax.vmap(f, in_axes=in_axes)(*stacked)
        want = jax.vmap(ref, in_axes=in_axes)(*stacked)
        assert_close(got, want, what=f"vmap over arg {axis_arg}")


# (op, mapped argument) -> what the mapped axis folds into; every forward vmap folds.
_FOLDS = {
    ("modulated", 0): "batch",
    ("modulated", 1): "output channels",
    ("modulated", 2): "batch",
    ("local", 0): "batch",
    ("local", 1): "output channels",
    ("filter", 0): "channels (the filters shared by the stack)",
    ("filter", 1): "batch (x broadcast)",
    ("splat", 0): "channels (the filters shared by the stack)",
    ("splat", 1): "batch (x broadcast)",
}


def _loops(fn, *args) -> bool:
    return bool(re.search(r"\b(scan|while)\[", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize(("name", "arg"), list(_FOLDS), ids=[f"{n}-{a}" for n, a in _FOLDS])
def test_vmap_folds_into_one_call(name, arg):
    """vmap over one argument (a weight set per index: ensembles, per-example kernels) is one
    call of the op, no loop, with the numbers of the op called once per index; for the shared
    weights of modulated and local, so is the gradient in the weights under that vmap."""
    f, args = _ops("xla")[name]
    (scale,) = rands(30, (3,))
    stacked = [a if i != arg else scale.reshape(3, *(1,) * a.ndim) * a for i, a in enumerate(args)]
    in_axes = tuple(0 if i == arg else None for i in range(len(args)))
    mapped = jax.vmap(f, in_axes=in_axes)
    assert not _loops(mapped, *stacked), f"vmap over argument {arg} loops"
    one_by_one = jax.lax.map(
        lambda v: f(*(v if i == arg else a for i, a in enumerate(args))), stacked[arg]
    )
    assert_close(mapped(*stacked), one_by_one, what=f"vmap over argument {arg}")
    if name in ("modulated", "local") and arg == 1:

        def loss(w, *rest):
            return jnp.sum(jnp.sin(f(rest[0], w, *rest[1:])))

        grad_w = jax.vmap(jax.grad(loss), in_axes=(0, *(None,) * (len(args) - 1)))
        others = [a for i, a in enumerate(args) if i != 1]
        assert not _loops(grad_w, stacked[1], *others), "the gradient in w loops"
        want = jax.lax.map(lambda w: jax.grad(loss)(w, *others), stacked[1])
        assert_close(grad_w(stacked[1], *others), want, what="gradient in w")


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_with_a_batch_shared_modulation(impl):
    """A batch-shared ``d`` ``[Ho, Wo, kh, kw]`` mapped by vmap (one per mapped index, broadcast
    over the images), and its gradient under a vmap over ``x`` (summed over the images of each
    mapped index)."""
    kw = {**CASE.kw(), "impl": impl}
    (ho, wo), k = GEOM.out_size, GEOM.kernel_size
    x, w, d, xs = rands(
        5,
        (CASE.n, CASE.h, CASE.w, CASE.cin),
        (*k, CASE.cin, CASE.cout),
        (3, ho, wo, *k),
        (3, CASE.n, CASE.h, CASE.w, CASE.cin),
    )

    def loss(op, d, x):
        return jnp.sum(op(x, w, d) ** 2)

    op = functools.partial(svconv.modulated_conv2d, **kw)
    ref = functools.partial(svconv.modulated_conv2d, **{**kw, "impl": "reference"})
    # The reference (plain jnp, no batching rule of svconv's) under the same vmaps.
    for in_axes, args, what in (
        ((0, None), (d, x), "a shared d mapped"),
        ((None, 0), (d[0], xs), "x mapped, d shared"),
    ):
        got = jax.vmap(lambda d, x: op(x, w, d), in_axes)(*args)
        assert_close(got, jax.vmap(lambda d, x: ref(x, w, d), in_axes)(*args), what=what)
        grad_of = [jax.vmap(jax.grad(functools.partial(loss, f)), in_axes) for f in (op, ref)]
        assert_close(grad_of[0](*args), grad_of[1](*args), what=f"gradient in d, {what}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_grad_of_grad(impl, name):
    f, args = _ops(impl)[name]
    ref = _reference(name)
    (ct,) = rands(22, f(*args).shape)

    def inner(fn):
        # A scalar of the first-order gradients, differentiated again w.r.t. every argument.
        def loss(*a):
            grads = jax.grad(lambda *b: jnp.sum(fn(*b) * ct), argnums=tuple(range(len(a))))(*a)
            return sum(jnp.sum(jnp.sin(g)) for g in grads)

        return jax.grad(loss, argnums=tuple(range(len(args))))

    for got, want in zip(inner(f)(*args), inner(ref)(*args), strict=True):
        assert_close(got, want, tol=1e-4, what="grad of grad")


@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_checkpoint(name):
    f, args = _ops("xla")[name]
    loss = lambda *a: jnp.sum(jnp.tanh(f(*a)))  # noqa: E731
    want = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    got = jax.grad(jax.checkpoint(loss), argnums=tuple(range(len(args))))(*args)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_low_precision_dtypes(impl, dtype, name):
    f, args = _ops(impl)[name]
    low = [a.astype(dtype) for a in args]
    y, vjp = jax.vjp(f, *low)
    assert y.dtype == dtype
    # Compared with the float32 reference on the same (rounded) inputs.
    ref = _reference(name)
    exact = [a.astype(jnp.float32) for a in low]
    y_ref, vjp_ref = jax.vjp(ref, *exact)
    assert_close(y, y_ref, dtype, what="forward")
    (ct,) = rands(23, y.shape, dtype=dtype)
    for a, b, arg in zip(vjp(ct), vjp_ref(ct.astype(jnp.float32)), low, strict=True):
        assert a.dtype == dtype and a.shape == arg.shape
        assert_close(a, b, dtype, what="vjp")


def test_mixed_float_dtypes_promote():
    x, w, d = rands(24, (1, 5, 5, 2), (3, 3, 2, 2), (5, 5, 3, 3))
    y = svconv.modulated_conv2d(x.astype(jnp.bfloat16), w, d, impl="xla")
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter"])
def test_nan_reaches_exactly_the_covering_windows(impl, name):
    f, args = _ops(impl)[name]
    x = args[0]
    poisoned = x.at[1, 3, 2, 1].set(jnp.nan)
    y = f(poisoned, *args[1:])
    # The windows that cover the pixel: the output of an all-positive op on a one-hot input.
    indicator = jnp.zeros_like(x).at[1, 3, 2, 1].set(1.0)
    positive = [jnp.abs(a) + 1.0 for a in args[1:]]
    covered = _reference(name)(indicator, *positive) > 0
    np.testing.assert_array_equal(np.isnan(np.asarray(y)), np.asarray(covered))
    assert covered.any() and not covered.all()


# ------------------------------------------------------------------------ forward mode, transpose


# A tiny size, so that full Jacobians are cheap.
SMALL = Case(1, 5, 4, 2, 3, (3, 2), (2, 1), (1, 2), ((1, 1), (2, 0)))


def _small_ops(impl, dtype=jnp.float32):
    return _ops(impl, SMALL, dtype, seed=31)


def _tangents(args, seed):
    return tuple(rands(seed, *(a.shape for a in args), dtype=args[0].dtype))


def _multilinear_jvp(f, args, tangents):
    """The JVP of a multilinear f: the sum of f with each tangent in its slot."""
    total = 0.0
    for i, t in enumerate(tangents):
        total = total + f(*args[:i], t, *args[i + 1 :]).astype(jnp.float32)
    return total


# Every op, implementation and dtype of the forward-mode and transposition tests.
SMALL_PARAMS = [
    pytest.param(name, dtype, impl, id=f"{name}-{jnp.dtype(dtype).name}-{impl}")
    for name in ("modulated", "local", "filter", "splat")
    for dtype in (jnp.float32, jnp.bfloat16)
    for impl in IMPLS
]


def _with_reference(name, dtype, impl):
    """The small op, its arguments in ``dtype``, and the float32 reference."""
    f, args = _small_ops(impl, dtype)[name]
    return f, args, _small_ops("reference", jnp.float32)[name][0]


@pytest.mark.parametrize("name,dtype,impl", SMALL_PARAMS)
def test_jvp_and_linearize(name, dtype, impl):
    f, args, ref = _with_reference(name, dtype, impl)
    exact = [a.astype(jnp.float32) for a in args]
    tangents = _tangents(args, 32)
    y, ty = jax.jvp(f, args, tangents)
    assert y.dtype == ty.dtype == dtype
    want = _multilinear_jvp(ref, exact, [t.astype(jnp.float32) for t in tangents])
    assert_close(ty, want, dtype, what="jvp")
    assert_close(y, ref(*exact), dtype, what="primal")
    y_lin, f_jvp = jax.linearize(f, *args)
    assert_close(y_lin, y, dtype, what="linearize primal")
    assert_close(f_jvp(*tangents), ty, dtype, what="linearize tangent")
    if dtype == jnp.float32:
        # Central finite differences of a multilinear map: exact but for an eps^2 term.
        eps = 1e-2
        plus = f(*(a + eps * t for a, t in zip(args, tangents, strict=True)))
        minus = f(*(a - eps * t for a, t in zip(args, tangents, strict=True)))
        assert_close(ty, (plus - minus) / (2 * eps), tol=1e-3, what="finite differences")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "filter"])
def test_forward_over_forward_mode(impl, name):
    """The JVP of a JVP (a fused tangent kernel differentiated in forward mode again) of a
    nonlinear function of the op, against the reference's."""
    args = _small_ops(impl)[name][1]
    t1, t2 = _tangents(args, 33), _tangents(args, 34)

    def second(op):
        def inner(*a):
            return jax.jvp(lambda *b: op(*b) ** 2, a, t1)[1]

        return jax.jvp(inner, args, t2)[1]

    want = second(_small_ops("reference")[name][0])
    assert_close(second(_small_ops(impl)[name][0]), want, what="forward over forward")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_jacfwd_equals_jacrev(impl, name):
    f, args = _small_ops(impl)[name]
    argnums = tuple(range(len(args)))
    fwd = jax.jacfwd(f, argnums=argnums)(*args)
    rev = jax.jacrev(f, argnums=argnums)(*args)
    for a, b in zip(fwd, rev, strict=True):
        assert_close(a, b, what="jacfwd vs jacrev")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_hessian_against_finite_differences_of_the_gradient(impl, name):
    f, args = _small_ops(impl)[name]
    # A nonlinear loss in the last argument (the kernel or modulation), others fixed.
    *fixed, z = args

    def loss(z):
        return jnp.sum(jnp.tanh(f(*fixed, z)))

    hess = jax.hessian(loss)(z)
    (direction,) = rands(33, z.shape)
    grad = jax.grad(loss)
    eps = 1e-3
    fd = (grad(z + eps * direction) - grad(z - eps * direction)) / (2 * eps)
    hvp = jnp.tensordot(hess, direction, axes=z.ndim)
    assert_close(hvp, fd, tol=2e-3, what="Hessian-vector product")


@pytest.mark.parametrize("name,dtype,impl", SMALL_PARAMS)
def test_linear_transpose_in_each_argument_equals_the_vjp(name, dtype, impl):
    f, args, ref = _with_reference(name, dtype, impl)
    y, vjp = jax.vjp(f, *args)
    (ct,) = rands(34, y.shape, dtype=dtype)
    grads = vjp(ct)
    # The oracle: the reference's autodiff VJP on the same (rounded) inputs.
    _, vjp_ref = jax.vjp(ref, *(a.astype(jnp.float32) for a in args))
    want = vjp_ref(ct.astype(jnp.float32))
    for i, arg in enumerate(args):

        def in_slot(a, i=i):
            return f(*args[:i], a, *args[i + 1 :])

        (transposed,) = jax.linear_transpose(in_slot, arg)(ct)
        assert transposed.dtype == dtype and transposed.shape == arg.shape
        assert_close(transposed, grads[i], dtype, what=f"transpose in argument {i} vs vjp")
        assert_close(transposed, want[i], dtype, what=f"transpose in argument {i} vs reference")


@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_forward_mode_under_jit_vmap_and_scan(name):
    f, args = _small_ops("xla")[name]
    tangents = _tangents(args, 35)
    want = jax.jvp(f, args, tangents)[1]
    got = jax.jit(lambda a, t: jax.jvp(f, a, t)[1])(args, tangents)
    assert_close(got, want, what="jit(jvp)")
    stacked = [jnp.stack([a, a]) for a in args]
    batched = jax.vmap(lambda *a: jax.jvp(f, a, tangents)[1])(*stacked)
    assert_close(batched[1], want, what="vmap(jvp)")

    def body(carry, _):
        return carry, jax.jvp(f, args, tangents)[1]

    _, scanned = jax.lax.scan(body, 0.0, None, length=2)
    assert_close(scanned[1], want, what="scan(jvp)")


@pytest.mark.parametrize("name", ["modulated", "local", "filter", "splat"])
def test_forward_mode_in_several_slots_is_one_fused_kernel(name):
    """Tangents in any two or more slots go to one fused kernel (Pallas, in the interpreter
    here), equal to the sum of one partial per slot; lowered for CUDA, the JVP holds the forward
    kernel and the fused one, nothing else."""
    from experiments.static.lowering import lower_for_cuda, triton_kernel_names

    f, args = _ops("pallas")[name]
    tangents = rands(24, *(a.shape for a in args))
    ref = _reference(name)
    count = len(args)
    subsets = [s for r in range(2, count + 1) for s in itertools.combinations(range(count), r)]
    for subset in subsets:

        def restricted(fn, *moving, subset=subset):
            full = list(args)
            for i, value in zip(subset, moving, strict=True):
                full[i] = value
            return fn(*full)

        primals = tuple(args[i] for i in subset)
        moving = tuple(tangents[i] for i in subset)
        got = jax.jvp(functools.partial(restricted, f), primals, moving)[1]
        want = jax.jvp(functools.partial(restricted, ref), primals, moving)[1]
        assert_close(got, want, what=f"jvp in slots {subset}")
    family = name if name in ("modulated", "local") else "pixel"
    kernel = "forward" if name != "splat" else "grad_x"
    text = lower_for_cuda(lambda *a: jax.jvp(f, a[:count], a[count:]), *args, *tangents)
    assert sorted(triton_kernel_names(text)) == [
        f"svconv_{family}_{kernel}",
        f"svconv_{family}_{kernel}_jvp",
    ]
