"""Side-by-side timings of svconv's XLA path on CPU: the ratios of the design's CPU targets, the
compile times at 31x31, and (``--baseline REV``) every XLA kernel against the same kernel at a
git revision.

    PYTHONPATH=. python experiments/notes/xla_cpu_ab.py [--baseline main] [--rounds 15]

Columns are jitted once, then sampled round-robin (the order rotating every round) so that
drifting machine load hits every column alike; each sample blocks on its result. Reported: the
median and the minimum over rounds, in ms, and their ratios. Notes: ``xla-cpu.md`` next to this
file.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

import svconv
from pallas_kernels.geometry import Geometry, KernelCall
from svconv import xla

NHWC = ("NHWC", "HWIO", "NHWC")
ROOT = Path(__file__).resolve().parents[2]


def timeit(columns: dict, rounds: int, min_sample_s: float = 0.05) -> dict:
    """``{name: (fn, args)}`` -> ``{name: (median ms, min ms)}``, interleaved."""
    jitted = {}
    for name, (fn, args) in columns.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        once = time.perf_counter() - t0
        jitted[name] = (f, args, max(1, int(min_sample_s / max(once, 1e-6))))
    samples = {name: [] for name in columns}
    names = list(columns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            f, args, inner = jitted[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                out = f(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {n: (1e3 * statistics.median(s), 1e3 * min(s)) for n, s in samples.items()}


def fwd_bwd(fwd):
    """``y`` and the VJP with cotangent ``g`` (the last argument) for every other argument."""

    def run(*args):
        y, vjp = jax.vjp(fwd, *args[:-1])
        return y, vjp(args[-1])

    return run


def rand(seed, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


def show(title, results, pairs):
    print(f"\n{title}")
    for name, (med, low) in results.items():
        print(f"  {name:28s} median {med:9.2f} ms   min {low:9.2f} ms")
    for label, a, b, goal in pairs:
        med = results[a][0] / results[b][0]
        low = results[a][1] / results[b][1]
        print(f"  {label:44s} {med:6.2f}x (min/min {low:5.2f}x)   goal {goal}")


def goal_ratios(rounds: int):
    n, h, c = 4, 128, 32
    x, w, g = rand(0, (n, h, h, c), (3, 3, c, c), (n, h, h, c))
    d = jax.random.uniform(jax.random.key(1), (n, h, h, 3, 3), jnp.float32, 0.5, 1.5)

    def mod(x, w, d):
        return svconv.modulated_conv2d(x, w, d, padding="SAME", impl="xla")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    res = timeit(
        {
            "modulated fwd": (mod, (x, w, d)),
            "lax conv fwd": (conv, (x, w)),
            "modulated fwd+bwd": (fwd_bwd(mod), (x, w, d, g)),
            "lax conv fwd+bwd": (fwd_bwd(conv), (x, w, g)),
        },
        rounds,
    )
    show(
        "modulated_conv2d 3x3, N=4, 128x128, 32->32, float32",
        res,
        [
            ("forward / lax conv forward", "modulated fwd", "lax conv fwd", "<= 1.5x"),
            ("fwd+bwd / lax conv fwd+bwd", "modulated fwd+bwd", "lax conv fwd+bwd", "<= 2.5x"),
        ],
    )
    for k in (7, 15):
        kk = jax.random.uniform(jax.random.key(2), (n, h, h, k, k), jnp.float32) / (k * k)

        def pix(x, kk):
            return svconv.pixel_filter2d(x, kk, padding="SAME", impl="xla")

        res = timeit(
            {"pixel fwd": (pix, (x, kk)), "pixel fwd+bwd": (fwd_bwd(pix), (x, kk, g))}, rounds
        )
        show(
            f"pixel_filter2d {k}x{k}, N=4, 128x128, C=32, float32",
            res,
            [("fwd+bwd / fwd", "pixel fwd+bwd", "pixel fwd", "<= 4x")],
        )
    xl, wl, gl = rand(3, (4, 64, 64, 16), (64, 64, 3, 3, 16, 16), (4, 64, 64, 16))

    def local(x, w):
        return svconv.local_conv2d(x, w, padding="SAME", impl="xla")

    def lax_local(x, w):
        rhs = w.transpose(0, 1, 4, 2, 3, 5).reshape(64, 64, -1, w.shape[-1])
        return lax.conv_general_dilated_local(
            x, rhs, (1, 1), "SAME", (3, 3), dimension_numbers=NHWC
        )

    res = timeit(
        {
            "local fwd": (local, (xl, wl)),
            "lax local fwd": (lax_local, (xl, wl)),
            "local fwd+bwd": (fwd_bwd(local), (xl, wl, gl)),
            "lax local fwd+bwd": (fwd_bwd(lax_local), (xl, wl, gl)),
        },
        rounds,
    )
    show(
        "local_conv2d 3x3, N=4, 64x64, 16->16, float32",
        res,
        [
            ("forward / lax local forward", "local fwd", "lax local fwd", "< 1x"),
            ("fwd+bwd / lax local fwd+bwd", "local fwd+bwd", "lax local fwd+bwd", "< 1x"),
        ],
    )


def compile_times():
    """``jax.jit(f).lower(*args).compile()`` wall time, forward and value_and_grad, 31x31."""
    k = 31
    cases = {
        "modulated (64x64, 4->4)": (
            lambda x, w, d: svconv.modulated_conv2d(x, w, d, padding="SAME", impl="xla"),
            rand(4, (1, 64, 64, 4), (k, k, 4, 4), (1, 64, 64, k, k)),
        ),
        "pixel_filter2d (256x256x3)": (
            lambda x, kk: svconv.pixel_filter2d(x, kk, padding="SAME", impl="xla"),
            rand(5, (1, 256, 256, 3), (1, 256, 256, k, k)),
        ),
        "local (32x32, 2->2)": (
            lambda x, w: svconv.local_conv2d(x, w, padding="SAME", impl="xla"),
            rand(6, (1, 32, 32, 2), (32, 32, k, k, 2, 2)),
        ),
    }
    print("\ncompile time at 31x31 (goal <= 2 s each)")
    for name, (f, args) in cases.items():
        grad = jax.value_and_grad(
            lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args)))
        )
        t0 = time.perf_counter()
        jax.jit(f).lower(*args).compile()
        t1 = time.perf_counter()
        jax.jit(grad).lower(*args).compile()
        t2 = time.perf_counter()
        print(f"  {name:28s} forward {t1 - t0:5.2f} s   value_and_grad {t2 - t1:5.2f} s")


def load_baseline(rev: str):
    """``svconv/xla.py`` at git revision ``rev`` as a module."""
    text = subprocess.run(
        ["git", "show", f"{rev}:svconv/xla.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "xla_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("xla_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel(fn, geom, out_shape, *args):
    """Call a kernel of either signature: with a ``KernelCall`` (the current one), or with
    ``geom`` and ``out_shape`` keywords (revisions before it)."""
    if "call" in inspect.signature(fn).parameters:
        return fn(*args, KernelCall(geom, tuple(out_shape)))
    return fn(*args, geom=geom, out_shape=out_shape)


def kernels_ab(baseline, rounds: int):
    """Every kernel of the benchmark shapes, the baseline's against the current one."""
    n, h, c = 4, 128, 32
    x, w, dy = rand(7, (n, h, h, c), (3, 3, c, c), (n, h, h, c))
    d = rand(8, (n, h, h, 3, 3))[0]
    g3 = Geometry.of((h, h), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    cases = {
        "modulated forward": ("modulated_forward", (x, w, d), {"out_shape": dy.shape}),
        "modulated grad_x": ("modulated_grad_x", (w, d, dy), {"out_shape": x.shape}),
        "modulated grad_w": ("modulated_grad_w", (x, d, dy), {"out_shape": w.shape}),
        "modulated grad_d": ("modulated_grad_d", (x, w, dy), {"out_shape": d.shape}),
    }
    for k in (7, 15):
        p = k // 2
        geom = Geometry.of((h, h), (k, k), (1, 1), (1, 1), ((p, p), (p, p)))
        kk = rand(9, (n, h, h, k, k, 1))[0]
        cases[f"pixel {k}x{k} forward"] = ("pixel_forward", (x, kk), {"out_shape": x.shape}, geom)
        cases[f"pixel {k}x{k} grad_x"] = ("pixel_grad_x", (kk, dy), {"out_shape": x.shape}, geom)
        cases[f"pixel {k}x{k} grad_k"] = ("pixel_grad_k", (x, dy), {"out_shape": kk.shape}, geom)
    print("\nkernels: baseline / current (median ms)")
    for label, (name, args, kw, *geom) in cases.items():
        geom = geom[0] if geom else g3
        cols = {
            which: (functools.partial(_kernel, getattr(m, name), geom, kw["out_shape"]), args)
            for which, m in (("baseline", baseline), ("current", xla))
        }
        res = timeit(cols, rounds)
        b, cur = res["baseline"][0], res["current"][0]
        print(f"  {label:24s} {b:9.2f} / {cur:9.2f}   {b / cur:5.2f}x faster")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--baseline", help="git revision to compare every kernel against")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile times")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, python {sys.version.split()[0]}")
    goal_ratios(args.rounds)
    if not args.no_compile:
        compile_times()
    if args.baseline:
        kernels_ab(load_baseline(args.baseline), max(5, args.rounds // 2))


if __name__ == "__main__":
    main()
