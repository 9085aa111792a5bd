"""Dispatch to the Pallas or XLA kernels, and the differentiation rule they share.

Each op family is a multilinear form in its arrays:

* ``modulated``: ``T(x, w, d, y) = <y, modulated_conv2d(x, w, d)>``
* ``local``:     ``T(x, w, y)    = <y, local_conv2d(x, w)>``
* ``pixel``:     ``T(x, k, y)    = <y, pixel_filter2d(x, k)>``

The forward op is the partial derivative of ``T`` with respect to ``y``; the gradients with
respect to ``x``, ``w``, ``d``, ``k`` are the other partials (``pixel_splat2d`` is the partial
with respect to ``x`` of the pixel form). Since ``T`` is linear in each argument, the VJP of
any partial ``P_t`` with cotangent ``g`` is, for every other argument ``j``, the partial ``P_j``
evaluated with ``g`` in slot ``t``. So one ``custom_vjp`` (:func:`apply`) covers every op and
every gradient, its backward pass is made of the same fused kernels, and it differentiates
again to any order.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Any

import jax

from svconv import sharding, xla
from svconv._checks import Geometry

logger = logging.getLogger("svconv")

SLOTS = {
    "modulated": ("x", "w", "d", "y"),
    "local": ("x", "w", "y"),
    "pixel": ("x", "k", "y"),
}

# Kernel function per (family, target slot) and the slots it takes, in order. The XLA module
# and the Pallas modules share these names and signatures.
_KERNELS = {
    ("modulated", "y"): ("modulated_conv2d_fwd", ("x", "w", "d")),
    ("modulated", "x"): ("modulated_conv2d_grad_x", ("y", "w", "d")),
    ("modulated", "w"): ("modulated_conv2d_grad_w", ("x", "y", "d")),
    ("modulated", "d"): ("modulated_conv2d_grad_d", ("x", "w", "y")),
    ("local", "y"): ("local_conv2d_fwd", ("x", "w")),
    ("local", "x"): ("local_conv2d_grad_x", ("y", "w")),
    ("local", "w"): ("local_conv2d_grad_w", ("x", "y")),
    ("pixel", "y"): ("pixel_gather", ("x", "k")),
    ("pixel", "x"): ("pixel_scatter", ("y", "k")),
    ("pixel", "k"): ("pixel_correlate", ("x", "y")),
}
_PALLAS_MODULES = {"modulated": "modulated", "local": "local", "pixel": "pixel"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static part of one kernel call (hashable: it is the custom_vjp's non-diff argument)."""

    family: str
    target: str
    geom: Geometry
    impl: str  # "xla" or "pallas"
    precision: Any = None
    batched_d: bool = True
    groups: int = 1
    block_sizes: Any = None
    interpret: bool = False  # Pallas without a GPU: part of the key of the jitted kernel call

    @property
    def operands(self) -> tuple[str, ...]:
        return tuple(s for s in SLOTS[self.family] if s != self.target)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _pallas_module(family: str):
    return importlib.import_module(f"pallas_kernels.{_PALLAS_MODULES[family]}")


def _kernel(spec: Spec, *operands: jax.Array) -> jax.Array:
    operands = dict(zip(spec.operands, operands, strict=True))
    name, order = _KERNELS[(spec.family, spec.target)]
    kwargs: dict[str, Any] = spec.geom.kwargs()
    if spec.family != "pixel":
        kwargs["precision"] = spec.precision
    match spec.target:
        case "x":
            kwargs["input_size"] = spec.geom.in_size
        case "w":
            kwargs["kernel_size"] = spec.geom.kernel_size
        case "d":
            kwargs["batched"] = spec.batched_d
        case "k":
            kwargs.update(kernel_size=spec.geom.kernel_size, groups=spec.groups)
    if spec.impl == "pallas":
        fn = getattr(_pallas_module(spec.family), name)
        kwargs.update(block_sizes=spec.block_sizes, interpret=spec.interpret)
    else:
        fn = getattr(xla, name)
    return fn(*(operands[s] for s in order), **kwargs)


_partitioned_kernel = sharding.partitioned(_kernel)


@functools.partial(jax.jit, static_argnums=0)
def _run_kernel(spec: Spec, *operands: jax.Array) -> jax.Array:
    # Jitted so that eager calls compile each tap loop once instead of dispatching it op by op;
    # partitioned so that operands sharded over a mesh stay sharded (svconv.sharding).
    return _partitioned_kernel(spec, *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def apply(spec: Spec, *operands: jax.Array) -> jax.Array:
    """The partial of ``spec.family``'s form with respect to ``spec.target``, given the other
    slots' arrays in ``spec.operands`` order (all of one dtype)."""
    return _run_kernel(spec, *operands)


def _apply_fwd(spec: Spec, *operands: jax.Array):
    return apply(spec, *operands), operands


def _apply_bwd(spec: Spec, operands: tuple[jax.Array, ...], g: jax.Array):
    slots = dict(zip(spec.operands, operands, strict=True))
    slots[spec.target] = g.astype(operands[0].dtype)
    grads = []
    for name in spec.operands:
        sub = dataclasses.replace(spec, target=name)
        grad = apply(sub, *(slots[s] for s in sub.operands)).astype(slots[name].dtype)
        # Under Explicit mesh axes a cotangent must carry its primal's sharding type; the
        # partitioning rule can leave it sharded differently (e.g. a batch-shared `d` sharded
        # over an axis that also splits the batch).
        want = jax.typeof(slots[name]).sharding
        if want.mesh.axis_names and jax.typeof(grad).sharding.spec != want.spec:
            grad = jax.sharding.reshard(grad, want.spec)
        grads.append(grad)
    return tuple(grads)


apply.defvjp(_apply_fwd, _apply_bwd)


def pallas_reason(family: str, **case: Any) -> str | None:
    """Why the Pallas kernels cannot take this case, or None when they can."""
    try:
        module = _pallas_module(family)
        check = getattr(module, f"{_PALLAS_MODULES[family]}_unsupported_reason")
    except (ImportError, AttributeError) as e:
        return f"the Pallas kernels for {family} are not available ({e})"
    return check(**case)


def choose_impl(impl: str, op: str, family: str, **case: Any) -> str:
    """Resolve ``impl`` ("auto", "pallas", "xla", "reference") for one call of ``op``."""
    if impl in ("xla", "reference"):
        return impl
    reason = pallas_reason(family, **case)
    if impl == "pallas":
        if reason is not None:
            raise NotImplementedError(f"{op}(impl='pallas') cannot run this case: {reason}")
        return "pallas"
    if not on_gpu():
        logger.debug("%s: using XLA, not Pallas: no GPU (backend %r)", op, jax.default_backend())
        return "xla"
    if reason is not None:
        logger.debug("%s: using XLA, not Pallas: %s", op, reason)
        return "xla"
    return "pallas"
