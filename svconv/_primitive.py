"""svconv's op families as JAX operations: abstract evaluation, JVP, transpose, batching and
per-platform lowering rules, shared by every family.

Each family is a multilinear form in the arrays of its slots (its record in
:mod:`svconv._families` lists them):

* ``modulated``: ``T(x, w, d, y) = <y, modulated_conv2d(x, w, d)>``
* ``local``:     ``T(x, w, y)    = <y, local_conv2d(x, w)>``
* ``pixel``:     ``T(x, k, y)    = <y, pixel_filter2d(x, k)>``

* ``gaussian``:  ``T(x, s, y; eta, zeta) = <y, s * gaussian_filter2d(x)>`` with the Gaussian
  weights ``exp(eta . phi_tap - zeta)`` computed from per-pixel parameters (see
  :mod:`svconv.gaussian`)

One primitive per family computes the partial derivative of ``T`` with respect to one slot, the
*target* (``y``: the op itself; ``x``: its transpose in ``x``, which is also ``pixel_splat2d``;
``w``, ``d``, ``k``, ``s``: the other gradients), given the arrays of the other slots. Since
``T`` is linear in each slot:

* the JVP of a partial is the sum of the same partial with each tangent in its slot; where the
  backend has a fused kernel for it (``Backend.jvp``), the tangents of every slot go to
  that one kernel (a bind with ``Spec.tangents``), so no sum of full-size terms is built;
* its transpose with respect to slot ``j`` is the partial with respect to ``j``, with the
  cotangent in the target's slot.

A family may also take *parameters*: arrays the form depends on nonlinearly (the Gaussian's
``eta`` and ``zeta``), after the slots' arrays. Their tangents go through the family's own
rule, again in terms of the family's partials and linear in the tangent (or, with the slots'
tangents, to the fused kernel); the parameters themselves are never transposed. So every
derivative, in forward or reverse mode and to any order, is again one of the family's fused
kernels, and every partial is transposable in its slots (``jax.linear_transpose``).

The implementation is chosen when lowering, per platform and device (:class:`Target`): each
family holds an ordered tuple of :class:`Backend` s (Mosaic GPU, Triton, XLA last), and the
partial runs on the first one that ``impl`` admits (:meth:`Spec.candidates`) and that can take
the case (:meth:`Backend.reason`), the others' reasons logged at debug level. Lowered for
``cuda``, ``impl="auto"`` tries the Pallas backends that are the default on that GPU, then XLA;
lowered for any other platform, XLA. ``impl="pallas"``, ``"mosaic"`` and ``"triton"`` lowered
for a platform without GPU kernels run Pallas's interpreters.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import callback as jax_callback
from jax._src import config, dispatch
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from pallas_kernels.geometry import Geometry, KernelCall, after, match_varying
from svconv import sharding
from svconv._checks import accumulation_dtype

logger = logging.getLogger("svconv")

# The sizes of the dimensions that the geometry fixes.
_GEOMETRY_DIMS = {
    "h": lambda g: g.in_size[0],
    "w": lambda g: g.in_size[1],
    "ho": lambda g: g.out_size[0],
    "wo": lambda g: g.out_size[1],
    "kh": lambda g: g.kernel_size[0],
    "kw": lambda g: g.kernel_size[1],
}


@dataclasses.dataclass(frozen=True)
class Target:
    """The device a program is lowered for, computed once per lowering (:func:`target_of`).

    Attributes:
      platform: the lowering platform (``"cuda"``, ``"cpu"``, ...).
      device_kind: the device's kind (``"NVIDIA H100 80GB HBM3"``), None when unknown.
      compute_capability: ``(major, minor)`` of an NVIDIA GPU, None when unknown.
      sm_count: the GPU's multiprocessors, None when unknown.
      devices: the devices the program runs on (1 when not known).
    """

    platform: str
    device_kind: str | None = None
    compute_capability: tuple[int, int] | None = None
    sm_count: int | None = None
    devices: int = 1

    @property
    def gpu(self) -> bool:
        """Whether GPU kernels are compiled for it (else Pallas kernels are interpreted)."""
        return self.platform == "cuda"


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    """One implementation of a family's partials.

    Attributes:
      name: what ``impl=`` calls it (``"mosaic"``, ``"triton"``, ``"xla"``).
      kernels: target slot -> kernel. Every kernel takes the arrays of the other slots in slot
        order (None for a unit slot), the parameters' arrays, then a
        :class:`~pallas_kernels.geometry.KernelCall` (the geometry, the result's shape, the
        options).
      jvp: target slot -> fused forward-mode kernel: the partial's tangent for tangents in
        several slots (and parameters) at once, without a sum of one partial per tangent. It
        takes the arrays of the other slots and the parameters as the kernel does, then one
        tangent per such slot, then one per parameter (None where there is none), then the call.
      unsupported: ``(target, spec, shapes, dtype) -> reason or None``: why the backend cannot
        run the partial ``spec`` (its ``target`` slot, geometry, tangents) with slots of
        ``shapes`` and ``dtype`` on ``target`` (None: the device is not known yet, at call time;
        a target off a GPU: the kernels are interpreted), or None when it can.
      pallas: Pallas GPU kernels: compiled when lowered for CUDA, interpreted elsewhere.
      default: ``target -> bool``: whether ``impl=None`` (and ``"pallas"``) take the backend
        on that device.
      tiles: the tiling classes its kernels take (``block_sizes=`` of another backend's kernels
        never reaches them).
    """

    name: str
    kernels: Mapping[str, Callable[..., jax.Array]]
    jvp: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(default_factory=dict)
    unsupported: Callable[..., str | None] = lambda target, spec, shapes, dtype: None
    pallas: bool = True
    default: Callable[[Target], bool] = lambda target: True
    tiles: tuple[type, ...] = ()

    def reason(self, target: Target | None, spec: Spec, shapes, dtype) -> str | None:
        """Why this backend cannot run ``spec``, or None. A partial with tangents runs the
        backend's fused kernel where it has one, else the sum of its plain partials (each
        chosen again when lowered): the plain partial's kernel is what it needs."""
        if spec.target not in self.kernels:
            return f"no {self.name} kernel for the partial in `{spec.target}`"
        fused = bool(spec.tangents) and spec.target in self.jvp
        return self.unsupported(target, spec if fused else spec.plain, shapes, jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One op family: its slots and their layouts, its backends.

    Attributes:
      name: the primitive's name.
      dims: slot name -> dimension names of its array, in slot order; the last slot is the op's
        output. ``b`` batch, ``h``/``w`` input and ``ho``/``wo`` output height and width,
        ``kh``/``kw`` taps, ``c``/``o`` input/output channels, ``g`` filter groups.
      backends: the implementations, in the order ``impl=None`` tries them, XLA last (see
        :class:`Backend`).
      params: parameter name -> dimension names, in order: arrays the form depends on
        nonlinearly, passed after the slots (to the kernels too, with ``moments`` in the call).
        ``p`` is the parameters' own axis.
      param_jvp: ``(spec, values, name, tangent) -> tangent of the partial`` for a tangent of
        parameter ``name``; ``values`` maps every operand's name to its array.
      features: dimensions a ``vmap``-ped axis can fold into when every mapped array and the
        result have them, dimensions the form merely carries through (the channels of a shared
        kernel; see :func:`_batch`), each with the dimension of its groups or None: the mapped
        index becomes the major part of the dimension, or, with groups, the major part within
        each group (channel ``c`` of group ``c // (C / G)`` stays in its group).
      bounded: whether an output row reads only the input rows of its window (deformable
        offsets may reach any row): only then is the height split over devices with a halo
        exchange (:mod:`svconv.sharding`).
      serial: whether its kernels must not run at the same time as each other (the FFTs of
        the product family, which can hang XLA:CPU's thread pool when several run at once; see
        :func:`svconv.product._after`): the transposes of one forward-mode tangent (a
        backward pass) are then chained one after another.
    """

    name: str
    dims: Mapping[str, tuple[str, ...]]
    backends: tuple[Backend, ...]
    params: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    param_jvp: Callable[..., jax.Array] | None = None
    features: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    bounded: bool = True
    serial: bool = False
    primitive: Primitive = dataclasses.field(init=False)

    def __post_init__(self):
        names = [b.name for b in self.backends]
        if not names or names[-1] != "xla" or len(set(names)) != len(names):
            raise ValueError(f"{self.name}: backends {names} must be distinct and end with xla")
        object.__setattr__(self, "primitive", _define(self))

    def backend(self, name: str) -> Backend:
        """The backend called ``name``."""
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"{self.name} has no {name!r} backend")

    @property
    def pallas_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.pallas)

    def __repr__(self) -> str:  # the jaxprs print it in every Spec
        return f"Family({self.name!r})"

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.dims)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static parameters of one partial of a family (the primitive's only parameter).

    Attributes:
      family: the op family.
      target: the slot the partial is taken with respect to (its result).
      geom: the window geometry.
      impl: as bound, ``"auto"``, ``"pallas"`` or a backend's name; when lowering, the name of
        the backend that runs (``interpret`` says whether Pallas runs in an interpreter).
      precision: ``lax`` precision of the dots.
      shared: slots whose array has no batch dimension (shared over the batch).
      groups: filter groups (the size of dimension ``g``).
      feature_groups: ``lax.conv_general_dilated``'s ``feature_group_count``: dimension ``i``
        (a kernel's input channels) is ``c / feature_groups``.
      unit: slots whose array is all ones and not passed (the Gaussian's scale ``s``), and
        parameters that are absent (the deformable family's offsets, for ``modulated_conv2d``
        with groups).
      moments: for families with parameters, the powers of the tap features that weight the
        taps (the Gaussian's derivatives in its parameters).
      method: a family's static variant (the product family's ``"direct"`` or ``"fft"``), None
        where the family has one way only.
      block_sizes: Pallas tiling, or None for the family's heuristic.
      interpret: Pallas kernels run in the interpreter (set when lowering).
      tangents: slots and parameters whose tangents follow the operands (named ``name'``): the
        partial's tangent for those tangents (for a slot ``partial(slot := its tangent)``, for a
        parameter the family's ``param_jvp``, summed), in one kernel where the family has a
        fused one (see :func:`_jvp`).
    """

    family: Family
    target: str
    geom: Geometry
    impl: str
    precision: Any = None
    shared: tuple[str, ...] = ()
    groups: int = 1
    feature_groups: int = 1
    unit: tuple[str, ...] = ()
    moments: tuple[int, ...] = ()
    method: str | None = None
    block_sizes: Any = None
    interpret: bool = False
    tangents: tuple[str, ...] = ()

    @property
    def gpu_interpret(self) -> bool:
        """Whether the Mosaic kernels asked for run in Pallas's GPU interpret mode, in a
        process without a GPU: its simulation is an ordered effect (callbacks into the
        simulator), so the partial declares it and threads its token."""
        return self.impl == "mosaic" and not _process_has_gpu()

    @property
    def slot_operands(self) -> tuple[str, ...]:
        """The slots whose arrays the partial takes, in slot order."""
        return tuple(s for s in self.family.slots if s != self.target and s not in self.unit)

    @property
    def operands(self) -> tuple[str, ...]:
        """The names of the partial's arrays: its slots', the family's parameters, then the
        tangents'."""
        return self.slot_operands + self.params + tuple(t + "'" for t in self.tangents)

    @property
    def params(self) -> tuple[str, ...]:
        """The family's parameters that the partial takes (not absent)."""
        return tuple(p for p in self.family.params if p not in self.unit)

    @property
    def plain(self) -> Spec:
        """The partial itself (no tangents)."""
        return dataclasses.replace(self, tangents=())

    def dims(self, name: str) -> tuple[str, ...]:
        """The dimension names of a slot's, tangent's (``slot'``) or parameter's array."""
        name = name.rstrip("'")
        if name in self.family.params:
            return self.family.params[name]
        dims = self.family.dims[name]
        return tuple(d for d in dims if d != "b") if name in self.shared else dims

    def retarget(self, target: str) -> Spec:
        return dataclasses.replace(self, target=target)

    def sizes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Every dimension's size, from the geometry and the given slots' shapes."""
        sizes = {name: size(self.geom) for name, size in _GEOMETRY_DIMS.items()}
        sizes["g"] = self.groups
        for slot, shape in shapes.items():
            dims = self.dims(slot)
            if len(dims) != len(shape):
                raise ValueError(f"{self.family.name}: `{slot}` of shape {shape} is not {dims}")
            for name, size in zip(dims, shape, strict=True):
                if sizes.setdefault(name, size) != size:
                    raise ValueError(
                        f"{self.family.name}: dimension {name} of `{slot}` of shape {shape} is "
                        f"{size}, elsewhere {sizes[name]}"
                    )
        groups = self.feature_groups
        if "c" in sizes and "i" not in sizes:
            sizes["i"] = sizes["c"] // groups
        elif "i" in sizes and "c" not in sizes:
            sizes["c"] = sizes["i"] * groups
        elif "i" in sizes and sizes["c"] != sizes["i"] * groups:
            raise ValueError(
                f"{self.family.name}: {sizes['c']} input channels are not {groups} groups of "
                f"{sizes['i']}"
            )
        return sizes

    def shapes(self, operand_shapes: tuple[tuple[int, ...], ...]) -> dict[str, tuple[int, ...]]:
        """The shape of every slot (the target's included) and parameter from the operands'
        shapes."""
        given = dict(zip(self.operands, map(tuple, operand_shapes), strict=True))
        sizes = self.sizes(given)
        names = (*self.family.slots, *self.params)
        return {s: tuple(sizes[d] for d in self.dims(s)) for s in names}

    def candidates(self, target: Target | None) -> list[Backend]:
        """The backends that may run this partial as bound, in order of preference, on
        ``target`` (None: not known yet)."""
        family, impl = self.family, self.impl
        on_gpu = target is not None and target.gpu
        if impl == "auto":
            if not on_gpu and target is not None:
                return [family.backend("xla")]
            return [
                b for b in family.backends if not b.pallas or target is None or b.default(target)
            ]
        if impl == "pallas":
            return [b for b in family.pallas_backends if target is None or b.default(target)]
        if impl not in (b.name for b in family.backends):
            return []
        chosen = family.backend(impl)
        if impl == "mosaic":  # what the Mosaic kernels cannot take runs the Triton kernels
            return [chosen, *(b for b in family.pallas_backends if b.name == "triton")]
        return [chosen]

    def choose(self, target: Target | None, shapes, dtype) -> tuple[Backend | None, list[str]]:
        """The first of :meth:`candidates` that can run this partial, and why each one before it
        could not."""
        reasons: list[str] = []
        candidates = self.candidates(target)
        if not candidates:
            names = ", ".join(b.name for b in self.family.backends)
            if self.impl == "pallas" and not self.family.pallas_backends:
                return None, [f"the {self.family.name} family has no Pallas kernels ({names} only)"]
            if self.impl == "pallas":
                return None, [
                    f"none of the {self.family.name} family's Pallas kernels is the default on "
                    f"this device yet (its backends: {names}; impl=<backend> picks one)"
                ]
            return None, [f"the {self.family.name} family has {names} kernels only"]
        for b in candidates:
            reason = b.reason(target, self, shapes, dtype)
            if reason is None:
                return b, reasons
            reasons.append(f"{b.name}: {reason}")
        return None, reasons


def bind(spec: Spec, *operands: jax.Array) -> jax.Array:
    """The partial ``spec.target`` of ``spec.family``'s form at ``operands`` (in
    ``spec.operands`` order; the slots' arrays of one dtype, the result's). Inside
    ``jax.shard_map`` the operands are cast to vary over the same manual axes first (a replicated
    weight with a batch-split image: its cotangent is then summed over the axis by the cast's
    transpose), as JAX's own primitives do."""
    return spec.family.primitive.bind(*match_varying(*operands), spec=spec)


# ------------------------------------------------------------------------------------ rules


@functools.cache
def _process_has_gpu() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def _abstract_eval(*avals, spec: Spec):
    aval = _result_type(*avals, spec=spec)
    return aval, ({_ORDERED_IO} if spec.gpu_interpret else set())


_ORDERED_IO = jax_callback._OrderedIOEffect


def _result_type(*avals, spec: Spec):
    shape = spec.shapes(tuple(a.shape for a in avals))[spec.target]
    params = spec.family.params
    slots = [
        (n, a) for n, a in zip(spec.operands, avals, strict=True) if n.rstrip("'") not in params
    ]
    dtypes = {n: a.dtype for n, a in slots}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{spec.family.name}: the slots' arrays must share one dtype, got {dtypes}")
    varying = {n: a.manual_axis_type.varying for n, a in zip(spec.operands, avals, strict=True)}
    if len(set(varying.values())) > 1:
        raise ValueError(
            f"{spec.family.name}: the operands must vary over the same manual axes (bind casts "
            f"them), got {varying}"
        )
    return sharding.result_type(spec, avals, shape, avals[0].dtype)


def _expand(spec: Spec, *operands: jax.Array) -> jax.Array:
    """A partial with tangents as the sum of one term per tangent: the plain partial with the
    tangent in its slot, or the family's ``param_jvp`` for a parameter's."""
    plain = spec.plain
    primals, tangents = operands[: len(plain.operands)], operands[len(plain.operands) :]
    out_dtype = jax.eval_shape(functools.partial(bind, plain), *primals).dtype
    if len(tangents) > 1 and jnp.finfo(out_dtype).bits < 32:
        # Each term would be rounded to 16 bits before the sum: the terms in float32, summed and
        # rounded once, as the fused kernels do.
        up = functools.partial(_upcast, like=out_dtype)
        primals, tangents = tuple(map(up, primals)), tuple(map(up, tangents))
    values = dict(zip(plain.operands, primals, strict=True))
    terms = []
    for name, tangent in zip(spec.tangents, tangents, strict=True):
        if name in spec.family.params:
            param_jvp = cast(Callable[..., jax.Array], spec.family.param_jvp)  # (given params)
            terms.append(param_jvp(plain, values, name, tangent))
        else:
            terms.append(
                bind(plain, *(tangent if n == name else values[n] for n in plain.operands))
            )
    return functools.reduce(jnp.add, terms).astype(out_dtype)


def _upcast(v: jax.Array, *, like) -> jax.Array:
    """``v`` in float32 where it has ``like``'s (16-bit) dtype."""
    return v.astype(jnp.float32) if v.dtype == like else v


def _fuses_tangents(spec: Spec) -> bool:
    """Whether the tangents go to one fused kernel (else one term each)."""
    backends: Sequence[Backend]
    if spec.impl == "pallas":
        backends = spec.family.pallas_backends
    elif spec.impl == "auto":
        backends = (*spec.family.pallas_backends, spec.family.backend("xla"))
    else:
        backends = [spec.family.backend(spec.impl)]
    return any(spec.target in b.jvp for b in backends)


def _jvp(primals, tangents, *, spec: Spec):
    if spec.tangents:  # forward mode of a fused tangent: through its expansion
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        return jax.jvp(functools.partial(_expand, spec), tuple(primals), tuple(tangents))
    out = bind(spec, *primals)
    given = [(n, t) for n, t in zip(spec.operands, tangents, strict=True) if type(t) is not ad.Zero]
    if not given:
        # Not reached: JAX calls no JVP rule with only zero tangents.
        return out, ad.Zero(jax.typeof(out).to_tangent_aval())
    # One fused kernel where the family has one, else one term per tangent.
    with_tangents = dataclasses.replace(spec, tangents=tuple(n for n, _ in given))
    run = bind if _fuses_tangents(spec) else _expand
    if spec.family.serial:  # the tangent's kernel (or its transposes) after the primal's
        primals = [after(p, out) for p in primals]
    return out, run(with_tangents, *primals, *(t for _, t in given))


def _transpose(ct, *args, spec: Spec):
    if spec.tangents:
        return _transpose_tangents(ct, *args, spec=spec)
    linear = [i for i, a in enumerate(args) if ad.is_undefined_primal(a)]
    if len(linear) != 1:
        raise ValueError(
            f"{spec.family.name}: transposing in {len(linear)} arguments at once; the op is "
            "linear in each argument separately"
        )
    (i,) = linear
    slot, aval = spec.operands[i], args[i].aval
    if slot in spec.family.params:
        raise ValueError(f"{spec.family.name}: the op is not linear in its parameter `{slot}`")
    result: jax.Array | ad.Zero
    if type(ct) is ad.Zero:
        result = ad.Zero(aval.to_ct_aval())
    else:
        values = dict(zip(spec.operands, args, strict=True))
        values[spec.target] = ct.astype(aval.dtype)
        sub = spec.retarget(slot)
        result = bind(sub, *(values[s] for s in sub.operands))
        result = sharding.like_primal(result, aval)
    return [result if j == i else None for j in range(len(args))]


def _transpose_tangents(ct, *args, spec: Spec):
    """A partial with tangents is linear in the tangents jointly: its transpose in each is the
    plain partial's in that slot."""
    plain = spec.plain
    primals = args[: len(plain.operands)]
    if any(ad.is_undefined_primal(a) for a in primals):
        raise ValueError(
            f"{spec.family.name}: a forward-mode tangent is linear in the tangents only"
        )
    values = dict(zip(plain.operands, primals, strict=True))
    out: list[jax.Array | ad.Zero | None] = [None] * len(args)
    for k, name in enumerate(spec.tangents):
        tangent = args[len(plain.operands) + k]
        if not ad.is_undefined_primal(tangent):
            continue
        if name in plain.family.params and type(ct) is ad.Zero:
            out[len(plain.operands) + k] = ad.Zero(tangent.aval.to_ct_aval())
        elif name in plain.family.params:
            # param_jvp is linear in the tangent: its transpose is its VJP (at any point: zero,
            # typed as the tangent, varying over its manual axes inside shard_map, which
            # jax.linear_transpose's abstract inputs cannot say).
            param_jvp = cast(Callable[..., jax.Array], plain.family.param_jvp)  # (given params)
            term = functools.partial(param_jvp, plain, values, name)
            aval = tangent.aval
            at = jnp.zeros(aval.shape, aval.dtype)
            if varying := tuple(sorted(aval.manual_axis_type.varying)):
                at = lax.pcast(at, varying, to="varying")
            (out[len(plain.operands) + k],) = jax.vjp(term, at)[1](ct)
        else:
            point, i = list(primals), plain.operands.index(name)
            point[i] = tangent
            out[len(plain.operands) + k] = _transpose(ct, *point, spec=plain)[i]
        done = out[len(plain.operands) + k]
        if plain.family.serial and type(ct) is not ad.Zero and not isinstance(done, ad.Zero):
            ct = after(ct, cast(jax.Array, done))  # the next partial after this one
    return out


def _batch(args, axes, *, spec: Spec):
    """Fold the mapped axis into a dimension of the operands and the result, as
    ``lax.conv_general_dilated``'s rule folds a mapped kernel into its features: into the batch
    when every mapped array has one (a batch-shared array mapped gets one copy per image), or
    into one of the family's ``features`` that every mapped array and the result have (a mapped
    ``w``: its output channels). Arrays not mapped that have the dimension are broadcast along
    the mapped axis; the fold needing the fewest such copies is taken, and taken only when the
    copies are no larger than the mapped arrays and the result together
    (:data:`_BROADCAST_LIMIT`), else the partial is mapped over the axis one index at a time."""
    if spec.tangents:  # through the expansion, whose partials fold
        return jax.vmap(functools.partial(_expand, spec), in_axes=tuple(axes))(*args), 0
    size = next(a.shape[d] for a, d in zip(args, axes, strict=True) if d is not None)
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, axes, strict=True)]
    mapped = frozenset(s for s, d in zip(spec.operands, axes, strict=True) if d is not None)
    values = dict(zip(spec.operands, args, strict=True))
    folds = [
        f
        for f in (
            _batch_fold(spec, mapped, values, size),
            *(_feature_fold(spec, mapped, values, size, dim) for dim in spec.family.features),
        )
        if f is not None
    ]
    if folds:
        copies, fold = min(folds, key=lambda f: f[0])
        one = tuple(v.shape[1:] if s in mapped else v.shape for s, v in values.items())
        moved = size * math.prod(spec.shapes(one)[spec.target])
        moved += sum(values[s].size for s in mapped)
        if copies <= _BROADCAST_LIMIT * moved:
            return fold(), 0
    return _map(args, axes, spec), 0


# A fold that broadcasts arrays along the mapped axis is taken when the copies hold at most this
# many times the elements of the mapped arrays and the vmapped result together (the memory
# traffic the vmapped op has whatever its form; the copies are written and read once more):
# above, the partial is mapped index by index, each call reading the arrays not mapped again
# instead (fewer bytes, one call per index).
_BROADCAST_LIMIT = 1.0


def _batch_fold(spec: Spec, mapped, values, size):
    """``(elements copied, fold)`` folding the mapped axis into the batch, or None."""
    has_batch = {
        s for s in (*spec.family.slots, *spec.family.params) if "b" in _family_dims(spec, s)
    }
    if not mapped <= has_batch or spec.target not in has_batch:
        return None
    n = next(
        v.shape[1 if s in mapped else 0]
        for s, v in values.items()
        if s not in spec.shared and "b" in spec.dims(s)
    )
    copies = sum(
        size * n * math.prod(v.shape[1:]) if s in mapped else size * v.size
        for s, v in values.items()
        if (s in mapped and s in spec.shared) or (s not in mapped and "b" in spec.dims(s))
    )

    def fold():
        shared = tuple(s for s in spec.shared if s not in mapped and s != spec.target)
        folded = []
        for s, a in values.items():
            if s in mapped and s in spec.shared:  # one copy per image
                a = jnp.broadcast_to(a[:, None], (size, n, *a.shape[1:]))
            elif s in mapped:
                pass
            elif "b" in spec.dims(s):
                a = jnp.broadcast_to(a[None], (size, *a.shape))
            else:  # no batch dimension, the same for every index of the mapped axis
                folded.append(a)
                continue
            folded.append(a.reshape(size * n, *a.shape[2:]))
        out = bind(dataclasses.replace(spec, shared=shared), *folded)
        out = out.reshape(size, n, *out.shape[1:])
        if spec.target in spec.shared:  # a batch-shared result sums over the batch
            out = jnp.sum(out, axis=1, dtype=accumulation_dtype(out.dtype)).astype(out.dtype)
        return out

    return copies, fold


def _feature_fold(spec: Spec, mapped, values, size, dim: str):
    """``(elements copied, fold)`` folding the mapped axis into dimension ``dim`` (a feature
    dimension: the mapped index becomes the major part of it), or None."""
    if dim not in spec.dims(spec.target) or any(dim not in spec.dims(s) for s in mapped):
        return None
    copies = sum(
        size * v.size for s, v in values.items() if s not in mapped and dim in spec.dims(s)
    )

    # With groups the dimension is split as (groups, per group) and the mapped index goes
    # between them.
    groups = 1 if spec.family.features[dim] is None else spec.groups

    def fold():
        folded = []
        for s, a in values.items():
            dims = spec.dims(s)
            if dim in dims:
                if s not in mapped:
                    a = jnp.broadcast_to(a[None], (size, *a.shape))
                at = dims.index(dim)
                a = a.reshape(size, *a.shape[1 : at + 1], groups, -1, *a.shape[at + 2 :])
                a = jnp.moveaxis(a, 0, at + 1)  # [..., groups, size, per group, ...]
                a = a.reshape(*a.shape[:at], -1, *a.shape[at + 3 :])
            folded.append(a)
        out = bind(spec, *folded)
        at = spec.dims(spec.target).index(dim)
        out = out.reshape(*out.shape[:at], groups, size, -1, *out.shape[at + 1 :])
        out = jnp.moveaxis(out, at + 1, 0)
        return out.reshape(*out.shape[: at + 1], -1, *out.shape[at + 3 :])

    return copies, fold


def _family_dims(spec: Spec, name: str) -> tuple[str, ...]:
    """A slot's or parameter's dimensions as the family declares them (batch-shared or not)."""
    return spec.family.params.get(name) or spec.family.dims[name]


def _map(args, axes, spec: Spec):
    """The partial for each index of the mapped axis, one after the other."""
    mapped = [i for i, d in enumerate(axes) if d is not None]

    def one(slices):
        full = list(args)
        for i, v in zip(mapped, slices, strict=True):
            full[i] = v
        return bind(spec, *full)

    return lax.map(one, [args[i] for i in mapped])


# ---------------------------------------------------------------------------------- lowering


def target_of(platform: str, devices: int = 1) -> Target:
    """The device being lowered for, a program of ``devices`` devices: the abstract mesh's
    device when one is set (a program lowered for a GPU on a machine without one), else the
    platform's first device when this process has one."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    kind = cores = capability = None
    if device is not None and device.platform in ("gpu", "cuda") and platform == "cuda":
        kind, cores = device.device_kind, device.num_cores
    elif platform == "cuda":
        try:
            concrete = jax.devices("cuda")[0]
        except RuntimeError:  # no GPU in this process (lowering for export, say)
            concrete = None
        if concrete is not None:
            kind, cores = concrete.device_kind, getattr(concrete, "core_count", None)
            cc = getattr(concrete, "compute_capability", None)
            if isinstance(cc, str) and "." in cc:
                capability = cast(tuple[int, int], tuple(int(v) for v in cc.split(".")[:2]))
    if capability is None and kind is not None:
        capability = compute_capability(kind)
    return Target(platform, kind, capability, cores, devices)


# NVIDIA device kinds by compute capability (for abstract devices, which carry only a kind).
_CAPABILITIES = (
    (("B200", "B300", "GB200", "GB300"), (10, 0)),
    (("H100", "H200", "H800", "H20", "GH200"), (9, 0)),
    (("L4", "L40", "L40S", "RTX 6000 Ada", "RTX 4090"), (8, 9)),
    (("A10", "A40", "A6000", "RTX 3090"), (8, 6)),
    (("A100", "A800", "A30"), (8, 0)),
)


def compute_capability(device_kind: str) -> tuple[int, int] | None:
    """The compute capability of an NVIDIA device kind, None when not known."""
    words = device_kind.replace("-", " ").split()
    for names, capability in _CAPABILITIES:
        if any(name.split()[0] in words and name in device_kind for name in names):
            return capability
    return None


def _resolve(spec: Spec, shapes: Mapping[str, tuple[int, ...]], dtype: Any, target: Target):
    """The backend that runs ``spec`` when lowering for ``target``."""
    backend, reasons = spec.choose(target, shapes, dtype)
    name = spec.family.name
    if backend is None:
        device = target.device_kind or target.platform
        raise NotImplementedError(
            f"{name}(impl={spec.impl!r}) cannot run this case on {device}: {'; '.join(reasons)}"
        )
    if spec.impl == "auto" and not target.gpu:
        logger.debug("%s: using xla: no GPU kernels on platform %r", name, target.platform)
    elif reasons:
        logger.debug("%s: using %s, not %s", name, backend.name, "; not ".join(reasons))
    return dataclasses.replace(spec, impl=backend.name, interpret=backend.pallas and not target.gpu)


def run_kernel(spec: Spec, *operands: jax.Array) -> jax.Array:
    """The kernel of a resolved ``spec`` on whole (or per-device) arrays."""
    shapes = spec.shapes(tuple(v.shape for v in operands))
    out_shape, dtype = shapes[spec.target], operands[0].dtype
    if any(math.prod(s) == 0 for s in shapes.values()):
        # Empty inputs: an empty or all-zero result (a sum over nothing), as lax gives.
        return jnp.zeros(out_shape, dtype)
    backend = spec.family.backend(spec.impl)
    call = KernelCall(
        geom=spec.geom,
        out_shape=out_shape,
        precision=spec.precision,
        moments=spec.moments,
        method=spec.method,
        block_sizes=_tiles_for(spec.block_sizes, backend),
        interpret=spec.interpret,
    )
    # Every slot but the target, in slot order (None for a unit slot), then the parameters.
    values = dict(zip(spec.operands, operands, strict=True))
    others = [s for s in spec.family.slots if s != spec.target]
    args = [values.get(s) for s in others] + [values.get(p) for p in spec.family.params]
    if spec.tangents:  # the fused forward-mode kernel: one tangent per slot and parameter
        kernel = backend.jvp[spec.target]
        args += [values.get(s + "'") for s in (*others, *spec.family.params)]
    else:
        kernel = backend.kernels[spec.target]
    return kernel(*args, call)


def _tiles_for(tiles: Any, backend: Backend) -> Any:
    """The user's tiles where they belong to ``backend``'s kernels (a Triton tiling never
    reaches a Mosaic kernel), else None (the kernel's heuristic)."""
    return tiles if isinstance(tiles, backend.tiles) else None


_run_partitioned = sharding.partitioned(run_kernel)


def _lowering(cuda: bool):
    def rule(ctx, *values, spec: Spec):
        platform = "cuda" if cuda else (ctx.platforms or ctx.module_context.platforms)[0]
        shapes = spec.shapes(tuple(a.shape for a in ctx.avals_in))
        target = target_of(platform, _program_devices(ctx))
        resolved = _resolve(spec, shapes, ctx.avals_in[0].dtype, target)
        if spec.tangents and spec.target not in spec.family.backend(resolved.impl).jvp:
            # No fused kernel there: the sum of one partial per tangent.
            lower = mlir.lower_fun(functools.partial(_expand, spec), False)
            return lower(ctx, *values)
        if spec.gpu_interpret and resolved.impl == "mosaic":
            # The simulated GPU: one device, its ordered effect's token threaded through.
            return mlir.lower_fun(functools.partial(run_kernel, resolved), False)(ctx, *values)
        lower = mlir.lower_fun(functools.partial(_run_partitioned, resolved), False)
        if resolved.interpret and any(a.manual_axis_type.varying for a in ctx.avals_in):
            # Pallas's interpreter evaluates the kernel's loops, typed without manual axes, on
            # values that vary over those of the enclosing shard_map, and fails the type check.
            # The kernel runs per device: it is lowered as shard_map(check_vma=False) does.
            inner = ctx.replace(
                avals_in=[_invariant(a) for a in ctx.avals_in],
                avals_out=[_invariant(a) for a in ctx.avals_out],
            )
            with config._check_vma(False):
                out = lower(inner, *values)
            if inner.tokens_out is not None:  # an ordered effect's token, threaded through
                ctx.set_tokens_out(inner.tokens_out)
            return out
        return lower(ctx, *values)

    return rule


def _program_devices(ctx) -> int:
    """The devices of the program being lowered (1 when not known)."""
    axis_context = ctx.module_context.axis_context
    mesh = getattr(axis_context, "mesh", None)
    if mesh is not None:
        return mesh.size
    return getattr(axis_context, "num_devices", 1) or 1


def _invariant(aval):
    return aval.update(manual_axis_type=jax.sharding.ManualAxisType())


def _define(family: Family) -> Primitive:
    prim = Primitive(f"svconv_{family.name}")
    prim.def_impl(functools.partial(dispatch.apply_primitive, prim))
    prim.def_effectful_abstract_eval(_abstract_eval)
    ad.primitive_jvps[prim] = _jvp
    ad.primitive_transposes[prim] = _transpose
    batching.primitive_batchers[prim] = _batch
    mlir.register_lowering(prim, _lowering(cuda=True), platform="cuda")
    mlir.register_lowering(prim, _lowering(cuda=False))
    # The lowering holds custom_partitioning calls, which need the device assignment.
    dispatch.prim_requires_devices_during_lowering.add(prim)
    return prim
