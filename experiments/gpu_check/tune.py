"""Tile tuning on a GPU: each Pallas kernel at the DESIGN shapes, its tiling heuristic's choice
against neighbouring tilings, timed side by side.

    python3 -m experiments.gpu_check.tune [--time-limit 240] [--out results]
    python3 -m experiments.gpu_check.tune --dry-run     # on a CPU: tiny shapes, interpreter

For every kernel (a family's partial with respect to one slot: the forward ``y``, the
gradients), a coordinate search from the heuristic's tiles: each tile parameter in turn is set
to its neighbouring values (half and double a block size, other warp and stage counts, for the
per-pixel forward the column phases and unmasked interior programs) with the others at the
best so far; a change is kept when it is at least 3% faster. A tiling whose result differs
from the heuristic's (beyond a garbage threshold) or that does not compile is reported and
never kept. At the end the heuristic's tiles and the best are timed again, interleaved, and
both medians reported. The
kernels are bound with the public machinery (``svconv._primitive.bind`` with ``impl="pallas"``
and ``block_sizes``), so what is timed is what the ops run.

Writes ``tune-<device>.{json,md}`` (in ``results/`` by default): the best tiles per kernel and
their speed-up over the heuristic, to turn into the heuristics (``pallas_kernels``). Kernels
not reached within ``--time-limit`` are listed as such. Cases in order of their distance from
the DESIGN targets (the per-pixel forward first).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.report import machine_info
from experiments.gpu_check import installed_versions
from pallas_kernels.geometry import Geometry
from pallas_kernels.mosaic_gpu import gaussian as mosaic_gaussian
from pallas_kernels.mosaic_gpu import local as mosaic_local
from pallas_kernels.mosaic_gpu import modulated as mosaic_modulated
from pallas_kernels.mosaic_gpu import pixel as mosaic_pixel
from pallas_kernels.triton import deformable, local, modulated, pixel
from pallas_kernels.triton import gaussian as pallas_gaussian
from svconv import gaussian
from svconv._families import DEFORMABLE, GAUSSIAN, LOCAL, MODULATED, PIXEL
from svconv._primitive import Family, Spec, bind

ROOT = Path(__file__).resolve().parents[2]
KEEP_IF_FASTER = 0.97
GARBAGE = 2e-2  # relative difference from the heuristic's result that marks a tiling wrong

# The tile parameters each kernel reads (the others do not change it).
_WARPS = ("num_warps", "num_stages")
PARAMS = {
    ("pixel", "y"): (
        "block_h",
        "block_w",
        "block_channels",
        "column_phases",
        "unmasked_interior",
        *_WARPS,
    ),  # fmt: skip
    ("pixel", "x"): ("block_h", "block_w", "block_channels", *_WARPS),
    ("pixel", "k"): ("block_h", "block_w", "block_channels", *_WARPS),
    ("modulated", "y"): ("block_m", "block_n", "block_k", *_WARPS),
    ("modulated", "d"): ("block_m", "block_n", "block_k", *_WARPS),
    ("modulated", "x"): ("block_m_dx", "block_n_dx", "block_k_dx", *_WARPS),
    ("modulated", "w"): ("block_m_dw", "chunks_dw", "block_cin_dw", "block_cout_dw", *_WARPS),
    ("local", "y"): ("block_batch", "block_k", "block_out", *_WARPS),
    ("local", "x"): ("block_batch", "block_in", "block_out", *_WARPS),
    ("local", "w"): ("block_batch", "block_k", "block_out", *_WARPS),
    ("gaussian", "y"): ("block_h", "block_w", "block_channels", *_WARPS),
    ("gaussian", "x"): ("block_h", "block_w", "block_channels", *_WARPS),
    ("gaussian", "s"): ("block_h", "block_w", "block_channels", *_WARPS),
    ("deformable", "y"): ("block_p", "block_c", "block_out", *_WARPS),
    ("deformable", "d"): ("block_p", "block_c", "block_out", *_WARPS),
    ("deformable", "x"): ("block_p", "block_c", "block_out", *_WARPS),
    ("deformable", "w"): ("block_p", "block_c", "block_out", "chunks_dw", *_WARPS),
}
# The Mosaic kernels' tiles: the per-pixel sweeps' (pallas_kernels.mosaic_gpu._sweep.SweepTiles)
# and the modulated implicit GEMM's (pallas_kernels.mosaic_gpu.modulated.GemmTiles).
MOSAIC_PARAMS = ("block_h", "block_channels")
MOSAIC_GEMM_PARAMS = ("block_h", "block_n")
MOSAIC_LOCAL_PARAMS = ("block_batch", "block_out", "block_c", "stages")
KERNEL_NAMES = {
    "y": "forward", "x": "grad_x", "w": "grad_w", "d": "grad_d", "k": "grad_k", "s": "grad_s"
}  # fmt: skip
# The per-pixel tiling heuristic's kernel for each Gaussian kernel (their loops are alike).
_GAUSSIAN_TILES = {"y": "forward", "x": "grad_x"}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel to tune: ``family``'s partial with respect to ``target`` at one shape."""

    family: Family
    target: str
    shapes: dict  # slot -> shape (every slot, the target's included)
    dtype: str
    kernel_size: int
    backend: str = "triton"  # or "mosaic"

    @property
    def name(self) -> str:
        shape = "x".join(map(str, self.shapes["x"]))
        backend = " (mosaic)" if self.backend == "mosaic" else ""
        return (
            f"{self.family.name} {KERNEL_NAMES[self.target]}{backend} {self.kernel_size}x"
            f"{self.kernel_size} x[{shape}] {self.dtype}"
        )

    @property
    def params(self) -> tuple[str, ...]:
        """The tile parameters the search varies."""
        if self.backend == "mosaic":
            return {MODULATED: MOSAIC_GEMM_PARAMS, LOCAL: MOSAIC_LOCAL_PARAMS}.get(
                self.family, MOSAIC_PARAMS
            )
        return PARAMS[(self.family.name, self.target)]

    @property
    def geom(self) -> Geometry:
        h, w = self.shapes["x"][1:3]
        pad = (self.kernel_size - 1) // 2, self.kernel_size // 2
        return Geometry.of((h, w), (self.kernel_size,) * 2, (1, 1), (1, 1), (pad, pad))

    def spec(self, tiles) -> Spec:
        extra = {}
        if self.family is GAUSSIAN:  # the op's own partials: unit scale but for grad_s
            unit = () if self.target == "s" else ("s",)
            extra = {"unit": unit, "moments": (0,) * self.shapes["eta"][-1]}
        if self.family is DEFORMABLE:  # its Triton kernels are not yet the default: by name
            extra = {"groups": self.shapes["d"][-1], "feature_groups": 1}
        impl = "mosaic" if self.backend == "mosaic" else "pallas"
        if self.family is DEFORMABLE:
            impl = "triton"
        if self.backend == "mosaic" and self.family is MODULATED:
            # TF32 for float32, whatever the process's default (tests: HIGHEST): the Mosaic
            # kernels have no exact float32.
            extra["precision"] = jax.lax.Precision.DEFAULT
        return Spec(family=self.family, target=self.target, geom=self.geom, impl=impl,
                    block_sizes=tiles, **extra)  # fmt: skip

    def operands(self, seed: int = 0) -> list[jax.Array]:
        spec = self.spec(None)
        keys = jax.random.split(jax.random.key(seed), len(spec.operands))
        dtype = jnp.dtype(self.dtype)
        arrays = {
            name: jax.random.normal(key, self.shapes[name], jnp.float32).astype(dtype)
            for key, name in zip(keys, spec.operands, strict=True)
        }
        if self.family is DEFORMABLE:  # offsets of about a pixel
            arrays["offsets"] = arrays["offsets"].astype(jnp.float32)
        if self.family is GAUSSIAN:  # rotated ellipses, sigma 0.5-4, rho in (-0.6, 0.6)
            grid = self.shapes["zeta"]
            sr, sc, rho = jax.random.uniform(keys[0], (3, *grid), minval=0.5, maxval=4.0)
            eta = gaussian.parameters((sr, sc), (rho - 2.25) / 3)
            arrays["eta"] = eta
            arrays["zeta"] = gaussian.log_normalizer(eta, (self.kernel_size,) * 2)
        return [arrays[name] for name in spec.operands]

    def heuristic(self):
        """The tiles the kernel picks when given none (the same call the kernel makes)."""
        n, h, w, c = self.shapes["x"]
        dtype = jnp.dtype(self.dtype)
        if self.backend == "mosaic" and self.family is PIXEL:
            return mosaic_pixel.tiles(
                self.geom, batch=n, channels=c, groups=1, dtype=dtype, partial=self.target
            )
        if self.backend == "mosaic" and self.family is MODULATED:
            return mosaic_modulated.tiles(
                self.geom, batch=n, cin=c, cout=self.shapes["w"][-1], dtype=dtype,
                partial=self.target,
            )  # fmt: skip
        if self.backend == "mosaic" and self.family is LOCAL:
            return mosaic_local.tiles(
                self.geom, batch=n, cin=c, cout=self.shapes["w"][-1], dtype=dtype,
                partial=self.target,
            )  # fmt: skip
        if self.backend == "mosaic":
            return mosaic_gaussian.tiles(
                self.geom, batch=n, channels=c, dtype=dtype, partial=self.target
            )
        if self.family is GAUSSIAN and self.target == "s":
            return pallas_gaussian.grad_s_block_sizes(
                channels=c, out_hw=self.geom.out_size, batch=n, dtype=dtype
            )
        if self.family in (PIXEL, GAUSSIAN):  # stride 1: grad_x tiles the same grid
            op = KERNEL_NAMES[self.target] if self.family is PIXEL else _GAUSSIAN_TILES[self.target]
            ho, wo = self.geom.out_size
            return pixel.pixel_block_sizes(
                op, channels=c, groups=1, out_hw=(ho, wo), batch=n, dtype=dtype
            )
        if self.family is DEFORMABLE:
            _, _, cg, cout = self.shapes["w"]
            per_group = c // self.shapes["d"][-1]
            return deformable.deformable_block_sizes(
                cg, cout // (c // cg), n * h * w, per_group, self.target
            )
        if self.family is MODULATED:
            cout = self.shapes["w"][-1]
            return modulated.modulated_block_sizes(
                self.geom, batch=n, cin=c, cout=cout, dtype=dtype
            )
        cout = self.shapes["w"][-1]
        return local.local_block_sizes(
            batch=n, cin=c, cout=cout, kernel_size=(self.kernel_size,) * 2, dtype=dtype
        )


def kernels(dry_run: bool) -> list[Kernel]:
    """The DESIGN GPU shapes (tiny ones for a dry run), per-pixel filter first, the Gaussian
    filter (C=3, 31x31) last."""
    if dry_run:
        n, px, c, mod, cm, loc, cl = 1, 12, 4, 8, 4, 8, 4
        mpx, mc = 64, 8  # the Mosaic kernels' width and channels
    else:
        n, px, c, mod, cm, loc, cl = 8, 256, 64, 128, 64, 128, 32
        mpx, mc = px, c

    def pixel_kernels(size, dtype, targets):
        shapes = {"x": (n, px, px, c), "k": (n, px, px, size, size, 1), "y": (n, px, px, c)}
        return [Kernel(PIXEL, t, shapes, dtype, size) for t in targets]

    def modulated_kernels(dtype, targets, backend="triton", width=mod, cin=cm, cout=cm):
        shapes = {"x": (n, mod, width, cin), "w": (3, 3, cin, cout), "d": (n, mod, width, 3, 3),
                  "y": (n, mod, width, cout)}  # fmt: skip
        return [Kernel(MODULATED, t, shapes, dtype, 3, backend) for t in targets]

    def gaussian_kernels(size, targets, channels=3, backend="triton", rows=px):
        grid = (n, rows, px if backend == "triton" else mpx)
        shapes = {
            "x": (*grid, channels), "s": grid, "y": (*grid, channels), "eta": (*grid, 3),
            "zeta": grid,
        }  # fmt: skip
        return [Kernel(GAUSSIAN, t, shapes, "float32", size, backend) for t in targets]

    def mosaic_pixel_kernels(size, dtype, targets="y", rows=px):
        # The Mosaic kernels take widths of a multiple of 64 (the dry run: 4 rows of 64).
        shapes = {
            "x": (n, rows, mpx, mc),
            "k": (n, rows, mpx, size, size, 1),
            "y": (n, rows, mpx, mc),
        }
        return [Kernel(PIXEL, t, shapes, dtype, size, "mosaic") for t in targets]

    local_shapes = {"x": (n, loc, loc, cl), "w": (loc, loc, 3, 3, cl, cl), "y": (n, loc, loc, cl)}

    def deformable_kernels(dtype, targets):  # the modulated conv's shape, 2 offset groups
        grid = (n, mod, mod, 3, 3, 2)
        shapes = {"x": (n, mod, mod, cm), "w": (3, 3, cm, cm), "d": grid, "y": (n, mod, mod, cm),
                  "offsets": (*grid, 2)}  # fmt: skip
        return [Kernel(DEFORMABLE, t, shapes, dtype, 3) for t in targets]

    # The Mosaic kernel takes widths of a multiple of 64 (the dry run: 2 rows of 64).
    mloc = (loc, loc) if not dry_run else (2, 64)
    mosaic_local_shapes = {
        "x": (n, *mloc, cl), "w": (*mloc, 3, 3, cl, cl), "y": (n, *mloc, cl)
    }  # fmt: skip
    if dry_run:
        return [
            *pixel_kernels(3, "float32", "y"),
            *modulated_kernels("float32", "y"),
            Kernel(LOCAL, "y", local_shapes, "float32", 3),
            *gaussian_kernels(3, "y"),
            *mosaic_pixel_kernels(3, "float32", "yxk", rows=4),
            *modulated_kernels("float32", "y", "mosaic", width=mpx, cin=16, cout=16),
            Kernel(LOCAL, "y", mosaic_local_shapes, "float32", 3, "mosaic"),
            *deformable_kernels("float32", "y"),
            *gaussian_kernels(3, "ysx", channels=8, backend="mosaic", rows=4),
        ]
    return [
        *pixel_kernels(7, "float32", "y"),
        *mosaic_pixel_kernels(7, "float32"),
        *pixel_kernels(15, "float32", "y"),
        *mosaic_pixel_kernels(15, "float32"),
        *mosaic_pixel_kernels(7, "bfloat16"),
        *modulated_kernels("float32", "y"),
        *modulated_kernels("float32", "yxd", "mosaic"),
        *pixel_kernels(7, "bfloat16", "y"),
        *modulated_kernels("bfloat16", "y"),
        *modulated_kernels("bfloat16", "yxwd", "mosaic"),
        *pixel_kernels(7, "float32", "xk"),
        *mosaic_pixel_kernels(7, "float32", "xk"),
        *modulated_kernels("float32", "xwd"),
        *modulated_kernels("bfloat16", "xwd"),
        *[Kernel(LOCAL, t, local_shapes, "float32", 3) for t in "yxw"],
        *[Kernel(LOCAL, t, mosaic_local_shapes, "float32", 3, "mosaic") for t in "yw"],
        *pixel_kernels(15, "float32", "xk"),
        *gaussian_kernels(31, "yxs"),  # rotated elliptical Gaussians
        *gaussian_kernels(31, "yxs", channels=64, backend="mosaic"),
        *deformable_kernels("float32", "yxwd"),
        *deformable_kernels("bfloat16", "y"),
    ]


def neighbours(tiles, param: str, dry_run: bool) -> list:
    """Valid tilings that differ from ``tiles`` in ``param`` only."""
    value = getattr(tiles, param)
    if isinstance(value, bool):
        values = [not value]
    elif param == "num_warps":
        values = [2, 4, 8]
    elif param == "num_stages":
        values = [1, 2, 3, 4]
    elif param in ("column_phases", "chunks_dw"):
        values = [1, 2, 4, 8]
    else:
        values = [value // 2, value * 2]
    values = [v for v in values if v != value and v >= 1]
    if dry_run:
        values = values[:1]
    out = []
    for v in values:
        try:
            out.append(dataclasses.replace(tiles, **{param: v}))
        except ValueError:  # below a dot's minimum, more phases than columns, ...
            continue
    return out


class Timer:
    """Compiles and times one kernel's tilings on fixed operands."""

    def __init__(self, kernel: Kernel, reps: int):
        self.kernel, self.reps = kernel, reps
        self.args = kernel.operands()
        self.reference = None  # the heuristic's result
        self.compiled = {}

    def prepare(self, tiles):
        """Compile, run once and check against the heuristic's result; the jitted function."""
        if tiles in self.compiled:
            return self.compiled[tiles]
        spec = self.kernel.spec(tiles)
        f = jax.jit(lambda *a: bind(spec, *a))
        out = np.asarray(jax.block_until_ready(f(*self.args)), np.float32)
        if self.reference is None:
            self.reference = out
        else:
            scale = float(np.max(np.abs(self.reference))) or 1.0
            diff = float(np.max(np.abs(out - self.reference))) / scale
            if not diff <= GARBAGE:
                raise ArithmeticError(f"differs from the heuristic's result by {diff:.2e}")
        self.compiled[tiles] = f
        return f

    def sample(self, f) -> float:
        """Seconds per call over ``reps`` back-to-back calls."""
        t0 = time.perf_counter()
        out = None
        for _ in range(self.reps):
            out = f(*self.args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / self.reps

    def time(self, tiles, rounds: int = 3) -> float:
        f = self.prepare(tiles)
        return statistics.median(self.sample(f) for _ in range(rounds))


def _short(tiles, base) -> str:
    """The fields of ``tiles`` that differ from ``base``."""
    diff = [
        f"{f.name}={getattr(tiles, f.name)}"
        for f in dataclasses.fields(tiles)
        if getattr(tiles, f.name) != getattr(base, f.name)
    ]
    return ", ".join(diff) or "(the heuristic's)"


def tune(kernel: Kernel, *, deadline: float, dry_run: bool, log) -> dict:
    """Coordinate search from the heuristic's tiles; the record of every trial."""
    timer, rounds = Timer(kernel, reps=1 if dry_run else 20), 1 if dry_run else 3
    base = kernel.heuristic()
    record = {"kernel": kernel.name, "heuristic": dataclasses.asdict(base), "trials": []}
    best, best_t = base, timer.time(base, rounds)
    record["trials"].append({"tiles": _short(base, base), "ms": 1e3 * best_t})
    log(f"  {kernel.name}: heuristic {1e3 * best_t:.4g} ms")
    tried = {base}
    params = kernel.params
    for param in params[:2] if dry_run else params:  # a dry run tries the plumbing only
        if "stopped" in record:
            break
        for cand in neighbours(best, param, dry_run):
            if cand in tried:
                continue
            if time.monotonic() > deadline:
                record["stopped"] = "time limit"
                break
            tried.add(cand)
            trial = {"tiles": _short(cand, base)}
            try:
                t = timer.time(cand, rounds)
                trial["ms"] = 1e3 * t
                if t < KEEP_IF_FASTER * best_t:
                    best, best_t = cand, t
            except Exception as e:  # no compile (shared memory), wrong numbers, ...
                trial["failed"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]
            record["trials"].append(trial)
            log(
                f"    {trial['tiles']}: "
                + (f"{trial['ms']:.4g} ms" if "ms" in trial else trial["failed"])
            )
    # The heuristic's tiles and the best again, interleaved.
    finals = {"heuristic": base} | ({"best": best} if best != base else {})
    samples = {name: [] for name in finals}
    for _ in range(1 if dry_run else 5):
        for name, tiles in finals.items():
            samples[name].append(timer.sample(timer.prepare(tiles)))
    record["heuristic_ms"] = 1e3 * statistics.median(samples["heuristic"])
    record["best_ms"] = 1e3 * statistics.median(samples.get("best", samples["heuristic"]))
    record["best"] = dataclasses.asdict(best)
    record["best_changes"] = _short(best, base)
    record["speedup"] = record["heuristic_ms"] / record["best_ms"]
    log(
        f"  -> best {record['best_changes']}: {record['best_ms']:.4g} ms against "
        f"{record['heuristic_ms']:.4g} ms ({record['speedup']:.2f}x)"
    )
    return record


def render(report: dict) -> str:
    lines = [
        f"# Tile tuning — {report['device']}",
        "",
        f"* date: {report['date']}",
        f"* machine: {report['machine']}",
        f"* versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        "* method: per kernel, a coordinate search from the heuristic's tiles (each parameter "
        "in turn set to its neighbouring values, a change kept when >= 3% faster; medians of 3 "
        "samples of 20 back-to-back calls), then the heuristic's tiles and the best timed again "
        "interleaved (medians of 5 samples). `python3 -m experiments.gpu_check.tune`.",
        "",
        "| kernel | heuristic ms | best ms | speed-up | best tiles (changes) | trials |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["kernels"]:
        lines.append(
            f"| {r['kernel']} | {r['heuristic_ms']:.4g} | {r['best_ms']:.4g} | "
            f"{r['speedup']:.2f}x | {r['best_changes']} | {len(r['trials'])}"
            f"{' (stopped: time limit)' if r.get('stopped') else ''} |"
        )
    for name in report["not_reached"]:
        lines.append(f"| {name} | not reached (time limit) | | | | |")
    for name, why in report["failed"].items():
        lines.append(f"| {name} | failed: {why} | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m experiments.gpu_check.tune", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, interpreter")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds in all")
    parser.add_argument("--out", default=None, help="folder (default results/; dry run: none)")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    if backend != "gpu" and not args.dry_run:
        print(f"JAX's backend is {backend}, not a GPU: use --dry-run", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.time_limit
    slug, machine = machine_info(backend, jax.devices())
    report = {
        "device": slug,
        "machine": machine,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": installed_versions(
            ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton")
        ),  # fmt: skip
        "dry_run": args.dry_run,
        "kernels": [],
        "not_reached": [],
        "failed": {},
    }
    print(f"tile tuning on {machine}", flush=True)
    for kernel in kernels(args.dry_run):
        if time.monotonic() > deadline:
            report["not_reached"].append(kernel.name)
            continue
        try:
            report["kernels"].append(
                tune(kernel, deadline=deadline, dry_run=args.dry_run, log=print)
            )
        except Exception as e:  # the heuristic's own tiles failed
            report["failed"][kernel.name] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  {kernel.name}: failed: {report['failed'][kernel.name]}", flush=True)
    out = Path(args.out) if args.out else (None if args.dry_run else ROOT / "results")
    text = render(report)
    print("\n" + text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        base = out / f"tune-{slug}"
        base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        base.with_suffix(".md").write_text(text)
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
