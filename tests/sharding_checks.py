"""Multi-device checks of the partitioning rule (``svconv.sharding``) on 8 CPU devices.

Run as ``python -m tests.sharding_checks [NAME ...]`` (``tests/test_sharding.py`` does): the
device count is an XLA flag fixed when JAX starts its backend, and the rest of the suite runs on
one device, so these checks live in their own process. Each check jits an op and its gradient
with respect to every array argument on sharded inputs and compares with one device: the
numbers, the output shardings, and the collectives in the compiled HLO (no all-gather or
all-to-all of anything; height sharding moves only halo rows with collective-permutes). Prints
one JSON line per check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import traceback

DEVICES = 8
DEVICE_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
MARK = "SHARDING_CHECK "


def xla_flags(current: str | None) -> str:
    """``current`` XLA flags with the 8-device flag added."""
    current = current or ""
    return current if DEVICE_FLAG in current else f"{current} {DEVICE_FLAG}".strip()


@dataclasses.dataclass(frozen=True)
class Check:
    op: str  # modulated, modulated_shared, local, pixel, splat
    impl: str  # xla or pallas
    mode: str  # batch: 8-way batch; height: 2-way batch x 4-way height; cross: see CHECKS
    stride: int = 1
    dilation: int = 1
    padding: str = "SAME"
    kernel: int = 3
    split: bool = True  # False: the geometry does not split, height is replicated (gathered)
    explicit: bool = False  # Explicit mesh axes (jax.make_mesh's default) instead of Auto
    jvp: bool = False  # forward mode (tangents sharded like their arrays) instead of the vjp

    @property
    def name(self) -> str:
        extra = ""
        if (self.stride, self.dilation, self.padding, self.kernel) != (1, 1, "SAME", 3):
            extra = f"-k{self.kernel}s{self.stride}d{self.dilation}{self.padding}"
        explicit, jvp = "-explicit" if self.explicit else "", "-jvp" if self.jvp else ""
        return f"{self.op}-{self.impl}-{self.mode}{extra}{explicit}{jvp}"


OPS = ("modulated", "modulated_shared", "local", "pixel", "splat", "gaussian")
CHECKS = (
    *(Check("modulated", impl, "batch") for impl in ("xla", "pallas")),
    *(Check(op, impl, "height") for impl in ("xla", "pallas") for op in OPS),
    Check("modulated", "xla", "height", stride=2),
    Check("pixel", "xla", "height", kernel=2),  # halo only below
    Check("pixel", "xla", "height", kernel=1, stride=2),  # no halo; the last row is cropped
    Check("pixel", "pallas", "height", dilation=2),
    Check("modulated", "xla", "height", explicit=True),
    Check("local", "xla", "height", padding="VALID", split=False),
    Check("pixel", "xla", "height", dilation=5, split=False),  # halo of 5 rows > 4-row shards
    # A batch-shared d split over the axis that also splits the batch of x: d is gathered, and
    # its Explicit-typed gradient must come back with d's sharding.
    Check("modulated_shared", "xla", "cross", explicit=True, split=False),
    # Deformable offsets may reach any row: batch sharding stays, height sharding is gathered.
    Check("deformable", "xla", "batch"),
    Check("deformable", "xla", "height", split=False),
    # Product convolution (XLA only): FFTs per batch shard, then per height shard with a halo.
    Check("product", "xla", "batch"),
    Check("product_fft", "xla", "height"),
    # Forward mode: the fused tangent kernels (Pallas) take halos for the tangent of x too, and
    # the Gaussian's tangents of its parameters sharded like them.
    *(
        Check(op, "pallas", "height", jvp=True)
        for op in ("modulated", "local", "splat", "gaussian")
    ),
)
NAMES = tuple(c.name for c in CHECKS)

N, H, W, CIN, COUT, GROUPS = 8, 16, 6, 2, 3, 2


def _setup(check: Check):
    """The op as a function of its arrays, the arrays, and their PartitionSpecs."""
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import svconv

    k = check.kernel
    geo = {
        "stride": check.stride,
        "padding": check.padding,
        "dilation": check.dilation,
        "impl": check.impl,
    }
    span = (k - 1) * check.dilation + 1
    ho = H // check.stride if check.padding == "SAME" else (H - span) // check.stride + 1
    wo = W // check.stride if check.padding == "SAME" else (W - span) // check.stride + 1
    image = P("data") if check.mode in ("batch", "cross") else P("data", "rows")
    rows = P("rows") if check.mode == "height" and check.split else P()
    if check.mode == "cross":
        rows = P("data")
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    match check.op:
        case "modulated":
            return (
                lambda x, w, d: svconv.modulated_conv2d(x, w, d, **geo),
                [normal(N, H, W, CIN), normal(k, k, CIN, COUT), normal(N, ho, wo, k, k)],
                [image, P(), image],
            )
        case "modulated_shared":
            return (
                lambda x, w, d: svconv.modulated_conv2d(x, w, d, **geo),
                [normal(N, H, W, CIN), normal(k, k, CIN, COUT), normal(ho, wo, k, k)],
                [image, P(), rows],
            )
        case "local":
            return (
                lambda x, w: svconv.local_conv2d(x, w, **geo),
                [normal(N, H, W, CIN), normal(ho, wo, k, k, CIN, COUT)],
                [image, rows],
            )
        case "pixel":
            return (
                lambda x, f: svconv.pixel_filter2d(x, f, **geo),
                [normal(N, H, W, 2 * GROUPS), normal(N, ho, wo, k, k, GROUPS)],
                [image, image],
            )
        case "pixel_wide":  # a case the Mosaic kernels take: 64 columns, 8 channels
            return (
                lambda x, f: svconv.pixel_filter2d(x, f, **geo),
                [normal(N, 4, 64, 8), normal(N, 4, 64, k, k)],
                [image, image],
            )
        case "splat":
            return (
                lambda x, f: svconv.pixel_splat2d(x, f, **geo),
                [normal(N, H, W, 2 * GROUPS), normal(N, H, W, k, k, GROUPS)],
                [image, image],
            )
        case "deformable":
            # Offset groups, feature groups; the mask before the offsets (linear in the first 3).
            def deformable(x, w, m, o):
                return svconv.deformable_conv2d(x, w, o, m, feature_group_count=2, **geo)

            offsets = 1.5 * normal(N, ho, wo, k, k, 2, 2)
            return (
                deformable,
                [normal(N, H, W, 2), normal(k, k, 1, 4), normal(N, ho, wo, k, k, 2), offsets],
                [image, P(), image, image],
            )
        case "product" | "product_fft":
            # Two channel groups of filters, weights per pixel; direct or FFTs.
            method = "fft" if check.op == "product_fft" else "direct"

            def product(x, f, u):
                return svconv.product_filter2d(x, f, u, method=method, **geo)

            return (
                product,
                [normal(N, H, W, 2 * GROUPS), normal(3, k, k, GROUPS), normal(N, ho, wo, 3)],
                [image, P(), image],
            )
        case "gaussian_splat":
            # Axis-aligned elliptical Gaussians spread by every source pixel (stride 1).
            def gaussian_splat(x, sr, sc):
                return svconv.gaussian_splat2d(x, (sr, sc), k, **geo)

            sigma = [0.5 + np.abs(normal(N, H, W)) for _ in range(2)]
            return gaussian_splat, [normal(N, H, W, 2), *sigma], [image, image, image]
        case "gaussian":
            # Rotated elliptical Gaussians: sigmas and rho per output pixel, sharded like it.
            import jax.numpy as jnp

            def gaussian(x, sr, sc, r):
                return svconv.gaussian_filter2d(x, (sr, sc), k, rho=jnp.tanh(r), **geo)

            sigma = [0.5 + np.abs(normal(N, ho, wo)) for _ in range(2)]
            return (
                gaussian,
                [normal(N, H, W, 2), *sigma, normal(N, ho, wo)],
                [image, image, image, image],
            )
    raise ValueError(check.op)


def collectives(text: str) -> dict[str, list[list[int]]]:
    """Result shapes of every collective in compiled HLO text, by kind."""
    found: dict[str, list[list[int]]] = {}
    pattern = (
        r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]*? "
        r"(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\("
    )
    for dims, kind in re.findall(pattern, text):
        found.setdefault(kind, []).append([int(v) for v in dims.split(",") if v])
    return found


def forward_and_grad(fn):
    """``args -> (y, the gradient of sum(sin(y)) with respect to every array argument)``."""
    import jax
    import jax.numpy as jnp

    def run(*args):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(jnp.cos(y))

    return run


def on_mesh(fn, sharded, mesh):
    """``fn`` compiled for the sharded arrays on ``mesh`` and its result: ``(compiled, result,
    [(what, part of the result)])`` with the output and each gradient named."""
    import jax

    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*sharded).compile()
        got = compiled(*sharded)
    named = [("output", got[0]), *((f"grad {i}", g) for i, g in enumerate(got[1]))]
    return compiled, got, named


def run_check(check: Check) -> None:
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding

    fn, arrays, specs = _setup(check)
    one_axis = check.mode in ("batch", "cross")
    shape, names = ((DEVICES,), ("data",)) if one_axis else ((2, 4), ("data", "rows"))
    axis_type = AxisType.Explicit if check.explicit else AxisType.Auto
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))

    step = forward_and_grad(fn)
    if check.jvp:
        count = len(arrays)
        arrays = [*arrays, *(0.5 * jax.numpy.roll(a, 1) for a in arrays)]
        specs = [*specs, *specs]

        def step(*args):
            y, t = jax.jvp(fn, tuple(args[:count]), tuple(args[count:]))
            return y, [t]

    expected = jax.tree.leaves(jax.jit(step)(*arrays))
    sharded = [
        jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs, strict=True)
    ]
    compiled, got, named = on_mesh(step, sharded, mesh)
    for (what, a), b in zip(named, expected, strict=True):
        scale = max(1.0, float(np.max(np.abs(b))))
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
        assert err < 2e-5, f"{what}: relative error {err:.3g} against one device"

    coll = collectives(compiled.as_text())
    if not check.split:
        # The documented fallback: height is gathered (this also proves the HLO scan works).
        assert "all-gather" in coll, f"no all-gather in the fallback: {coll}"
        return
    y_sharding = got[0].sharding
    assert y_sharding.is_equivalent_to(sharded[0].sharding, 4), (
        f"output sharded as {y_sharding}, input as {sharded[0].sharding}"
    )
    like = [sharded[0]] if check.jvp else sharded  # the tangent is sharded like the output
    for i, (g, a) in enumerate(zip(got[1], like, strict=True)):
        assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (
            f"grad {i} sharded as {g.sharding.spec}, its input as {a.sharding.spec}"
        )
    halo = (check.kernel - 1) * check.dilation
    for kind in ("all-gather", "all-to-all"):
        assert kind not in coll, f"{kind} of shapes {coll[kind]}"
    permutes = coll.get("collective-permute", [])
    if check.mode == "height" and halo:
        assert permutes, "no halo exchange"
    for dims in permutes:
        assert len(dims) == 4 and dims[1] <= halo, f"collective-permute of {dims}"


@dataclasses.dataclass(frozen=True)
class ShardMapCheck:
    """An op inside ``jax.shard_map`` over 4 devices, the batch split and the shared arrays
    (``w``, a batch-shared ``d``) replicated, against the same program without ``shard_map``.

    ``transform``: ``vjp`` (the output and the gradient in every array argument), ``jvp`` (a
    tangent in every argument) or ``transpose`` (``jax.linear_transpose`` in each argument the
    op is linear in). With ``check_vma`` a replicated argument's gradient and transpose come
    back summed over the devices (JAX inserts the sum); without it, per device, and the check
    sums them."""

    op: str
    impl: str
    transform: str
    check_vma: bool = True

    @property
    def name(self) -> str:
        vma = "" if self.check_vma else "-novma"
        return f"shard_map-{self.op}-{self.impl}-{self.transform}{vma}"


SHARD_MAP_DEVICES = 4
SHARD_MAP_OPS = (*OPS, "gaussian_splat")
# Arguments each op is linear in (the Gaussians are linear in the image only).
_LINEAR = {"gaussian": 1, "gaussian_splat": 1, "deformable": 3}
SHARD_MAP_CHECKS = tuple(
    ShardMapCheck(op, impl, transform, check_vma)
    for op in SHARD_MAP_OPS
    for impl in ("xla", "pallas")
    for transform, check_vma in (
        ("vjp", True),
        ("vjp", False),
        ("jvp", True),
        ("transpose", True),
        ("transpose", False),
    )
    # Pallas (interpreted, slow): without check_vma only once (those programs ran before).
    if impl == "xla" or check_vma or (op, transform) == ("modulated", "vjp")
)
# impl="mosaic" off a GPU: GPU interpret mode takes one device; on several the Triton
# interpreter runs instead (the reason at debug level), with the same numbers.
SHARD_MAP_CHECKS += (ShardMapCheck("pixel_wide", "mosaic", "vjp"),)
SHARD_MAP_CHECKS += tuple(
    ShardMapCheck(op, "xla", transform)
    for op in ("deformable", "product_fft")
    for transform in ("vjp", "jvp", "transpose")
)
NAMES = (*NAMES, *(c.name for c in SHARD_MAP_CHECKS))


def run_shard_map_check(check: ShardMapCheck) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    fn, arrays, specs = _setup(Check(check.op, check.impl, "batch"))
    devices = jax.devices()[:SHARD_MAP_DEVICES]
    mesh = jax.make_mesh(
        (SHARD_MAP_DEVICES,), ("data",), axis_types=(AxisType.Auto,), devices=devices
    )
    count = len(arrays)
    replicated = [s == P() for s in specs]
    rng = np.random.default_rng(1)
    y_shape = jax.eval_shape(fn, *arrays).shape
    ct = rng.standard_normal(y_shape).astype(np.float32)

    # Each transform as (function of the arrays and extra inputs, extra inputs and their specs,
    # which results are per replicated argument).
    match check.transform:
        case "vjp":

            def step(*args):
                y, vjp = jax.vjp(fn, *args)
                return (y, *vjp(jnp.cos(y)))

            extra, extra_specs, per_arg = [], [], [False, *replicated]
        case "jvp":

            def step(*args):
                return jax.jvp(fn, tuple(args[:count]), tuple(args[count:]))

            extra = [0.5 * np.roll(a, 1) for a in arrays]
            extra_specs, per_arg = list(specs), [False, False]
        case "transpose":
            linear = range(_LINEAR.get(check.op, count))

            def step(*args):
                primal, cot = args[:count], args[count]
                out = []
                for i in linear:
                    part = jax.linear_transpose(
                        lambda v, i=i: fn(*primal[:i], v, *primal[i + 1 :]), primal[i]
                    )
                    out.append(*part(cot))
                return tuple(out)

            extra, extra_specs = [ct], [P("data")]
            per_arg = [replicated[i] for i in linear]

    expected = jax.jit(step)(*arrays, *extra)
    summed = [r and not check.check_vma for r in per_arg]

    def body(*args):
        out = step(*args)
        # Without check_vma a replicated argument's result is this device's part: one row each.
        return tuple(o[None] if s else o for o, s in zip(out, summed, strict=True))

    out_specs = tuple(
        P("data") if s or not r else P() for r, s in zip(per_arg, summed, strict=True)
    )
    mapped = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(*specs, *extra_specs),
            out_specs=out_specs,
            check_vma=check.check_vma,
        )
    )
    got = mapped(*arrays, *extra)
    for i, (a, b, s) in enumerate(zip(got, expected, summed, strict=True)):
        a = np.asarray(a).sum(axis=0) if s else np.asarray(a)
        scale = max(1.0, float(np.max(np.abs(b))))
        err = float(np.max(np.abs(a - np.asarray(b)))) / scale
        assert err < 2e-5, f"result {i}: relative error {err:.3g} against no shard_map"


def _run_any(check) -> None:
    if isinstance(check, ShardMapCheck):
        run_shard_map_check(check)
    else:
        run_check(check)


def main(names: list[str]) -> int:
    import jax

    if jax.device_count() < DEVICES:
        print(f"needs {DEVICES} devices: run with XLA_FLAGS={DEVICE_FLAG}", file=sys.stderr)
        return 2
    return run_checks((*CHECKS, *SHARD_MAP_CHECKS), names, _run_any, MARK)


def run_checks(checks, names, run, mark: str, **extra) -> int:
    """Run every check named in ``names`` (all when empty), printing one JSON line each after
    ``mark`` (with ``extra``); 1 when one failed. A failure is reported and the next check
    runs."""
    failed = 0
    for check in checks:
        if names and check.name not in names:
            continue
        start = time.perf_counter()
        try:
            run(check)
            result = {"name": check.name, "ok": True}
        except Exception:  # noqa: BLE001
            failed += 1
            result = {"name": check.name, "ok": False, "error": traceback.format_exc()}
        result.update(extra, seconds=round(time.perf_counter() - start, 2))
        print(mark + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # Before anything starts JAX's backend (jax itself is imported lazily above).
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS"))
    sys.exit(main(sys.argv[1:]))
