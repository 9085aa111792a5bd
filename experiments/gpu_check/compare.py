"""Randomized comparison of ``impl="pallas"`` and ``impl="xla"`` with ``impl="reference"``:
forward, ``jax.vjp`` with a random cotangent and ``jax.jvp`` with random tangents, for every op
(``modulated_conv2d`` with a per-image and a batch-shared ``d``, ``local_conv2d``,
``pixel_filter2d`` and ``pixel_splat2d`` with and without channel groups, ``gaussian_filter2d``
and ``gaussian_splat2d`` with and without ``rho``), on random geometries
(kernel sizes 1-7, strides, dilations, ``"SAME"``/``"VALID"``/int/explicit paddings including
negative ones, odd channel counts) and every dtype.

On a GPU the Pallas kernels are compiled; elsewhere they run in Pallas's interpreter (``--tiny``
shapes keep that short).

Tolerance, in the manner of FlashAttention's tests: for every result (the output, each gradient,
the JVP's tangent) the error of an implementation against the exact answer must be at most twice
the error of the reference computed in the low precision, plus a small floor (one unit roundoff
of the dtype). Errors are Frobenius-norm relative, ``||a - exact|| / ||exact||``. The exact
answer is the reference on the low-precision inputs upcast to float32, at ``HIGHEST`` precision;
the reference in low precision is the same reference on the bfloat16/float16 inputs themselves
(it accumulates in float32 and rounds its results, and the Gaussian's weights, to the dtype).
For float32 dots at the default precision on a GPU (TF32 tensor cores) it is the reference on
inputs rounded to TF32 (10 mantissa bits).

``python -m experiments.gpu_check.compare [--tiny] [--problems N] [--time-limit S] [--out F]``
prints one line per comparison and writes a JSON record; exit status 1 if any comparison failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import svconv

OPS = ("modulated", "modulated_shared", "local", "filter", "splat", "gaussian", "gaussian_splat")
PIXEL_OPS = ("filter", "splat", "gaussian", "gaussian_splat")
DOT_OPS = ("modulated", "modulated_shared", "local")
# (dtype, precision): each op at its default precision in every dtype, and the dot ops' exact
# float32 path.
VARIANTS = (("float32", None), ("bfloat16", None), ("float16", None), ("float32", "highest"))
# The floor: one unit roundoff of the dtype (float32: room for the sums' reassociation).
FLOOR = {"float32": 1e-5, "bfloat16": 2.0**-8, "float16": 2.0**-11}
TF32_MANTISSA_BITS = 10
IMPLS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One op call's shapes and geometry; ``groups`` is for the pixel ops (``None``: a 5-D
    kernel, one filter for all channels), ``rho`` for the Gaussian ones (rotated ellipses)."""

    op: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: object
    groups: int | None = None
    rho: bool = False

    @property
    def id(self) -> str:
        def fmt(v):
            if isinstance(v, str | int):
                return str(v)
            return "x".join(fmt(e) for e in v)

        chans = f"c{self.cin}" if self.op in PIXEL_OPS else f"c{self.cin}o{self.cout}"
        groups = "" if self.groups is None else f"-g{self.groups}"
        groups += "-rho" if self.rho else ""
        return (
            f"{self.op}-N{self.n}-H{self.h}W{self.w}-{chans}{groups}-k{fmt(self.kernel)}"
            f"-s{fmt(self.stride)}-d{fmt(self.dilation)}-p{fmt(self.padding)}"
        )

    def _out_size(self) -> tuple[int, int]:
        # lax.conv_general_dilated's output size, which the ops share (DESIGN).
        shape = jax.eval_shape(
            lambda x, w: lax.conv_general_dilated(
                x,
                w,
                self.stride,
                self.padding,
                rhs_dilation=self.dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ),
            jax.ShapeDtypeStruct((1, self.h, self.w, 1), jnp.float32),
            jax.ShapeDtypeStruct((*self.kernel, 1, 1), jnp.float32),
        ).shape
        return shape[1], shape[2]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The arrays the op is called with (``x`` first); the splat's ``x`` is its source."""
        n, kh, kw = self.n, *self.kernel
        x = (n, self.h, self.w, self.cin)
        if self.op in PIXEL_OPS:
            grid = self._out_size() if self.op in ("filter", "gaussian") else (self.h, self.w)
            if self.op in ("gaussian", "gaussian_splat"):
                return {"x": x, "sigma": (n, *grid)} | ({"rho": (n, *grid)} if self.rho else {})
            tail = () if self.groups is None else (self.groups,)
            return {"x": x, "k": (n, *grid, kh, kw, *tail)}
        ho, wo = self._out_size()
        if self.op == "local":
            return {"x": x, "w": (ho, wo, kh, kw, self.cin, self.cout)}
        d = (ho, wo, kh, kw) if self.op == "modulated_shared" else (n, ho, wo, kh, kw)
        return {"x": x, "w": (kh, kw, self.cin, self.cout), "d": d}

    def fn(self, impl: str, precision):
        kw = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        if self.op in DOT_OPS:
            kw["precision"] = precision
        op = {
            "modulated": svconv.modulated_conv2d,
            "modulated_shared": svconv.modulated_conv2d,
            "local": svconv.local_conv2d,
            "filter": svconv.pixel_filter2d,
            "splat": svconv.pixel_splat2d,
            "gaussian": svconv.gaussian_filter2d,
            "gaussian_splat": svconv.gaussian_splat2d,
        }[self.op]
        if self.op in ("gaussian", "gaussian_splat"):
            return lambda x, sigma, rho=None: op(x, sigma, self.kernel, rho=rho, impl=impl, **kw)
        return lambda *arrays: op(*arrays, impl=impl, **kw)


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def draw_problem(rng: np.random.Generator, op: str, tiny: bool) -> Problem:
    """A random valid problem for ``op`` (drawn again until the op accepts the geometry)."""
    odd = (1, 3, 5) if tiny else (1, 3, 5, 7, 9, 17)
    while True:
        kernel = tuple(int(v) for v in rng.integers(1, 6 if tiny else 8, 2))
        pads = lambda lo, hi: (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))  # noqa: E731
        padding = _choice(
            rng,
            [
                "SAME",
                "VALID",
                int(rng.integers(0, 3)),
                (pads(0, 3), pads(0, 3)),
                (pads(-2, 3), pads(-2, 3)),  # negative pads crop
            ],
        )
        groups, cin = None, _choice(rng, odd)
        rho = op in ("gaussian", "gaussian_splat") and rng.random() < 0.5
        if op in ("filter", "splat") and rng.random() < 0.6:
            groups = _choice(rng, (1, 2, 3))
            cin = groups * _choice(rng, odd)
        size = (5, 11) if tiny else (9, 41)
        problem = Problem(
            op=op,
            n=int(rng.integers(1, 3 if tiny else 4)),
            h=int(rng.integers(*size)),
            w=int(rng.integers(*size)),
            cin=cin,
            cout=_choice(rng, odd),
            kernel=kernel,
            stride=_choice(rng, [(1, 1), (2, 2), (2, 1), (1, 3)]),
            dilation=_choice(rng, [(1, 1), (2, 2), (1, 2)]),
            padding=padding,
            groups=groups,
            rho=rho,
        )
        try:
            shapes = problem.shapes()
            args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes.values()]
            out = jax.eval_shape(problem.fn("reference", None), *args)
        except (ValueError, TypeError):  # an empty output, a kernel larger than the input, ...
            continue
        if min(out.shape) > 0:
            return problem


def _runner(problem: Problem, impl: str, precision):
    """``(arrays, cotangent, tangents) -> {name: result}``: the output and every gradient
    through ``jax.vjp``, and the tangent of ``jax.jvp``, jitted."""
    f = problem.fn(impl, precision)
    names = list(problem.shapes())

    def run(arrays, cotangent, tangents):
        y, vjp = jax.vjp(f, *arrays)
        grads = vjp(cotangent)
        _, ty = jax.jvp(f, tuple(arrays), tuple(tangents))
        return {"y": y, **{f"d{n}": g for n, g in zip(names, grads, strict=True)}, "jvp": ty}

    return jax.jit(run)


def _rel(a: np.ndarray, exact: np.ndarray) -> float:
    norm = float(np.linalg.norm(exact))
    diff = float(np.linalg.norm(a.astype(np.float64) - exact))
    return diff / norm if norm > 0 else diff


def _f64(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in tree.items()}


def _inputs(problem: Problem, seed: int, dtype):
    """Random arrays, cotangent and tangents in ``dtype`` (never zeros): normal, but sigmas from
    sharp to wide and correlations within (-0.7, 0.7)."""
    shapes = problem.shapes()
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(shapes) + 1))
    bounds = {"sigma": (0.3, 2.5), "rho": (-0.7, 0.7)}
    arrays = [
        (
            jax.random.uniform(next(keys), s, jnp.float32, *bounds[name])
            if name in bounds
            else jax.random.normal(next(keys), s, jnp.float32)
        ).astype(dtype)
        for name, s in shapes.items()
    ]
    out = jax.eval_shape(problem.fn("reference", None), *arrays)
    cotangent = jax.random.normal(next(keys), out.shape, jnp.float32).astype(dtype)
    tangents = [jax.random.normal(next(keys), a.shape, jnp.float32).astype(dtype) for a in arrays]
    return arrays, cotangent, tangents


def compare_problem(problem: Problem, seed: int, variants, backend: str, log) -> list[dict]:
    """Every implementation in every variant against the exact answer; one record each."""
    records = []
    # One jitted reference: the exact answer (float32 inputs) and, traced again per dtype, the
    # reference in low precision.
    exact_run = _runner(problem, "reference", "highest")
    runners = {}
    for vi, (dtype_name, precision) in enumerate(variants):
        if precision is not None and problem.op not in DOT_OPS:
            continue
        dtype = jnp.dtype(dtype_name)
        arrays, cot, tans = _inputs(problem, seed + vi, dtype)

        def up(tree, rounding=None):
            tree = jax.tree.map(lambda a: a.astype(jnp.float32), tree)
            return tree if rounding is None else jax.tree.map(rounding, tree)

        with jax.default_matmul_precision("highest"):
            exact = _f64(exact_run(up(arrays), up(cot), up(tans)))
            tf32 = (
                backend == "gpu"
                and dtype_name == "float32"
                and precision is None
                and problem.op in DOT_OPS
            )
            if tf32:
                rnd = lambda a: lax.reduce_precision(a, 8, TF32_MANTISSA_BITS)  # noqa: E731
                low = _f64(exact_run(up(arrays, rnd), up(cot, rnd), up(tans, rnd)))
                low_what = "reference on TF32-rounded inputs"
            elif dtype_name == "float32":
                low, low_what = exact, "exact"
            else:
                low = _f64(exact_run(arrays, cot, tans))
                low_what = f"reference on the {dtype_name} inputs"
        err_low = {k: _rel(low[k], exact[k]) for k in exact}
        variant = dtype_name + ("" if precision is None else f"/{precision}")
        for impl in IMPLS:
            record = {
                "problem": problem.id,
                "op": problem.op,
                "variant": variant,
                "impl": impl,
                "low_precision_reference": low_what,
            }
            t0 = time.perf_counter()
            try:
                key = (impl, precision)
                if key not in runners:
                    runners[key] = _runner(problem, impl, precision)
                got = runners[key](arrays, cot, tans)
                got = _f64(jax.block_until_ready(got))
            except NotImplementedError as e:
                record.update(status="unsupported", reason=str(e).splitlines()[0][:300])
            except Exception as e:  # noqa: BLE001 - any failure is a finding, recorded
                first = (str(e).splitlines() or [""])[0]
                record.update(status="error", reason=f"{type(e).__name__}: {first}"[:300])
            else:
                results = {}
                for k in exact:
                    err = _rel(got[k], exact[k])
                    tol = 2 * err_low[k] + FLOOR[dtype_name]
                    finite = bool(np.all(np.isfinite(got[k])))
                    results[k] = {"err": err, "tol": tol, "ok": finite and err <= tol}
                worst = max(results.values(), key=lambda r: r["err"] / r["tol"])
                record.update(
                    status="ok" if all(r["ok"] for r in results.values()) else "fail",
                    results=results,
                    worst_err_over_tol=worst["err"] / worst["tol"],
                )
            record["seconds"] = round(time.perf_counter() - t0, 2)
            records.append(record)
            detail = (
                f"worst err/tol {record['worst_err_over_tol']:.3g}"
                if "results" in record
                else record["reason"]
            )
            bad = [k for k, r in record.get("results", {}).items() if not r["ok"]]
            log(
                f"{record['status']:11s} {impl:6s} {variant:16s} {problem.id}: {detail}"
                + (f" (failed: {', '.join(bad)})" if bad else "")
            )
    return records


def summarize(records: list[dict]) -> dict:
    counts = {s: 0 for s in ("ok", "fail", "error", "unsupported")}
    for r in records:
        counts[r["status"]] += 1
    measured = [r["worst_err_over_tol"] for r in records if "worst_err_over_tol" in r]
    return {
        **counts,
        "comparisons": len(records),
        "problems": len({r["problem"] for r in records}),
        "worst_err_over_tol": max(measured) if measured else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gpu_check.compare",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for the interpreter)")
    parser.add_argument("--problems", type=int, default=3, help="random problems per op")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the ops")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16,float16",
        help="comma-separated dtypes (the float32 variant includes the exact 'highest' path)",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="one dtype variant per problem, taking turns (every dtype still runs when "
        "there are at least as many problems as variants)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds: no new problem after this"
    )
    parser.add_argument("--out", default=None, help="JSON file for the records and summary")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    backend = jax.default_backend()
    dtypes = args.dtypes.split(",")
    variants = [v for v in VARIANTS if v[0] in dtypes]
    rng = np.random.default_rng(args.seed)
    print(
        f"backend {backend} ({jax.devices()[0].device_kind}); Pallas "
        + ("compiled" if backend == "gpu" else "interpreted"),
        flush=True,
    )
    ops = [op for op in OPS if op in args.ops.split(",")]
    records, stopped = [], None
    for round_ in range(args.problems):
        for i, op in enumerate(ops):
            if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                stopped = f"time limit ({args.time_limit:g} s) reached in round {round_ + 1}"
                break
            problem = draw_problem(rng, op, args.tiny)
            seed = 1000 * round_ + 10 * i + args.seed
            mine = variants
            if args.rotate:  # the dot ops take turns over every variant, the others over dtypes
                own = [v for v in variants if v[1] is None or op in DOT_OPS]
                mine = [own[(round_ * len(ops) + i) % len(own)]]
            records += compare_problem(problem, seed, mine, backend, lambda s: print(s, flush=True))
        if stopped:
            break
    summary = summarize(records)
    summary.update(
        backend=backend,
        device=jax.devices()[0].device_kind,
        seconds=round(time.perf_counter() - started, 1),
        stopped_early=stopped,
    )
    print(json.dumps(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    return 1 if summary["fail"] or summary["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
