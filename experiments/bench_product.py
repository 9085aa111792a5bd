"""``python -m experiments.bench_product``: low-rank per-pixel filters (``product_filter2d``)
against the per-pixel route (``gaussian_filter2d`` on the same Gaussian field) and against
``deepinv.physics.SpaceVaryingBlur(use_fft=True)`` (PyTorch, in the benchmark's torch
environment), side by side in one run -> ``results/bench-product-<device>.{md,json}``.

Cases: a 512x512x3 image, rank 16, kernels 63x63, 127x127 and 255x255 (where the per-pixel route
does not run). The Gaussian field's widths vary smoothly over the image (up to a sixth of the
window); its decomposition is :func:`svconv.psf_grid_decomposition` of the Gaussians on a 16x16
grid at rank 16, and the error it leaves against ``gaussian_filter2d`` is reported. Modes:
forward, and forward+backward (the value and the gradient in every array argument). deepinv
computes the same filter form (``mask_first=False``) with ``padding="valid"``; it is compared with
``product_filter2d(padding="VALID")``, whose numbers it must match (checked on the run's inputs).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import svconv

ROOT = Path(__file__).resolve().parents[1]
RANK = 16
GRID = 16


def gaussian_field(size: int, kernel: int) -> jax.Array:
    """``sigma [1, size, size]``: a smooth field from a sixteenth to a sixth of the window."""
    t = jnp.linspace(0.0, 1.0, size)
    shape = 0.5 + 0.25 * (jnp.sin(3 * t)[:, None] + jnp.cos(2 * t)[None, :])
    return (kernel / 16 + (kernel / 6 - kernel / 16) * shape)[None]


def decomposition(sigma: jax.Array, kernel: int):
    """Rank-16 eigen-Gaussians from the field sampled at the centres of a 16x16 grid."""
    size = sigma.shape[1]
    centres = ((jnp.arange(GRID) + 0.5) * size / GRID - 0.5).astype(int)
    grid = sigma[0][centres[:, None], centres[None, :]]
    psfs = svconv.gaussian_kernels(grid, kernel)
    return svconv.psf_grid_decomposition(psfs, (size, size), rank=RANK)


def call_jax(fn, args) -> float:
    """Seconds of one call, to the result's completion."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def interleaved(columns: dict, rounds: int) -> dict:
    """``columns``: name -> mode -> ``() -> seconds`` (one call). One warm-up call each, then
    ``rounds`` rounds sampling every column once, the order rotating each round, so that the
    machine's drifting load hits every column alike. Medians in ms."""
    keys = [(name, mode) for name, modes in columns.items() for mode in modes]
    for name, mode in keys:
        columns[name][mode]()
    samples = {key: [] for key in keys}
    for r in range(rounds):
        for name, mode in keys[r % len(keys) :] + keys[: r % len(keys)]:
            samples[(name, mode)].append(columns[name][mode]())
    out = {}
    for (name, mode), xs in samples.items():
        out.setdefault(name, {})[mode] = 1e3 * statistics.median(xs)
    return out


def value_and_grads(op):
    def loss(*args):
        return jnp.sum(op(*args) ** 2)

    return jax.jit(lambda *a: jax.value_and_grad(loss, argnums=tuple(range(len(a))))(*a))


class TorchWorker:
    """The deepinv columns in ``python`` (a worker process answering one timed call at a time,
    so that its samples interleave with the JAX columns')."""

    def __init__(self, python: str, inputs: dict, threads: int):
        self.tmp = tempfile.TemporaryDirectory()
        arrays = Path(self.tmp.name) / "inputs.npz"
        np.savez(arrays, **inputs)
        self.out = Path(self.tmp.name) / "out.npz"
        cmd = [python, "-m", "experiments.bench_product_torch", str(arrays), str(self.out)]
        cmd += ["--threads", str(threads)]
        # Passive OpenMP waits: torch's threads must not spin on the cores after each call, into
        # the JAX samples that follow it.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._ask(None)  # ready

    def _ask(self, line: str | None) -> dict:
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the torch worker exited ({self.proc.wait()})")
        return json.loads(answer)

    def call(self, kernel: int, mode: str) -> float:
        return self._ask(f"{kernel} {mode}")["s"]

    def finish(self) -> tuple[dict, dict]:
        versions = self._ask("outputs")["versions"]
        with np.load(self.out) as data:
            outputs = {k: data[k] for k in data.files}
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()
        self.tmp.cleanup()
        return versions, outputs


def torch_python(given: str | None) -> str | None:
    for candidate in [given, sys.executable, str(ROOT / ".venv-torch" / "bin" / "python")]:
        if candidate and Path(candidate).exists():
            check = [candidate, "-c", "import deepinv"]
            if subprocess.run(check, capture_output=True).returncode == 0:
                return candidate
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_product")
    parser.add_argument("--quick", action="store_true", help="64x64, kernels 15 and 31")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--out", default=None, help="default results/ (none for --quick)")
    args = parser.parse_args(argv)
    quick = args.quick
    size, kernels, rounds = (64, (15, 31, 63), 2) if quick else (512, (63, 127, 255), 3)
    rounds = args.rounds or rounds
    threads = os.cpu_count() or 1
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((1, size, size, 3)), jnp.float32)
    rows, torch_inputs, cases = [], {}, []
    for kernel in kernels:
        row = {"kernel": kernel, "size": size, "channels": 3, "rank": RANK}
        sigma = gaussian_field(size, kernel)
        filters, weights = decomposition(sigma, kernel)
        product = jax.jit(lambda x, f, u: svconv.product_filter2d(x, f, u, method="fft"))
        approx = product(x, filters, weights)
        gauss_ok = kernel <= (127 if not quick else 31)  # the per-pixel route past that: hours
        jax_columns = {
            "svconv product fft": (product, value_and_grads(product), (x, filters, weights)),
        }
        if gauss_ok:
            gauss = jax.jit(lambda x, s, k=kernel: svconv.gaussian_filter2d(x, s, k))
            exact = gauss(x, sigma)
            scale = float(jnp.max(jnp.abs(exact)))
            row["rank error"] = float(jnp.max(jnp.abs(approx - exact))) / scale
            jax_columns["gaussian_filter2d"] = (gauss, value_and_grads(gauss), (x, sigma))
        # The deepinv comparison: the filter form, valid padding.
        vsize = size - kernel + 1
        wv = weights[kernel // 2 : kernel // 2 + vsize, kernel // 2 : kernel // 2 + vsize]
        valid = jax.jit(
            lambda x, f, u: svconv.product_filter2d(x, f, u, padding="VALID", method="fft")
        )
        jax_columns["svconv product fft valid"] = (valid, value_and_grads(valid), (x, filters, wv))
        torch_inputs[f"x{kernel}"] = np.asarray(x)
        torch_inputs[f"f{kernel}"] = np.asarray(filters)
        torch_inputs[f"u{kernel}"] = np.asarray(wv)
        row["valid output"] = np.asarray(valid(x, filters, wv))
        rows.append(row)
        cases.append(jax_columns)
    python = None if args.torch_python == "none" else torch_python(args.torch_python)
    torch_info = {"missing": "deepinv does not import in any torch environment"}
    worker = TorchWorker(python, torch_inputs, threads) if python else None
    for row, jax_columns in zip(rows, cases, strict=True):
        kernel = row["kernel"]
        columns = {
            name: {
                "fwd": functools.partial(call_jax, fwd, inputs),
                "fwd+bwd": functools.partial(call_jax, both, inputs),
            }
            for name, (fwd, both, inputs) in jax_columns.items()
        }
        if worker:
            columns["deepinv SpaceVaryingBlur fft"] = {
                mode: functools.partial(worker.call, kernel, mode) for mode in ("fwd", "fwd+bwd")
            }
        row.update(interleaved(columns, rounds))
        print(f"{size} {kernel}: {json.dumps({k: v for k, v in row.items() if k in columns})}")
    if worker:
        versions, outputs = worker.finish()
        torch_info = {"versions": versions}
    for row in rows:
        valid_output = row.pop("valid output")
        if worker:
            got = outputs[f"y{row['kernel']}"]
            diff = np.max(np.abs(got - valid_output)) / np.max(np.abs(valid_output))
            row["deepinv relative difference"] = float(diff)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "backend": backend,
        "cpu_count": threads,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            **{k: v for k, v in torch_info.get("versions", {}).items()},
        },
        "torch": torch_info.get("missing", "ran"),
        "rounds": rounds,
        "rows": rows,
    }
    text = render(report)
    print(text)
    if not quick or args.out:
        out = Path(args.out or ROOT / "results")
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench-product-{backend}"
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.md").write_text(text)


def _ms(entry, mode):
    return f"{entry[mode]:.0f}" if entry else "-"


def render(report: dict) -> str:
    lines = [
        f"# Low-rank per-pixel filters ({report['device']}, {report['date']})",
        "",
        f"`python -m experiments.bench_product` (in `make bench`): jax {report['versions']['jax']}"
        + (
            f", torch {report['versions']['torch']}, deepinv {report['versions']['deepinv']}"
            if "deepinv" in report["versions"]
            else f" (deepinv: {report['torch']})"
        )
        + f", {report['cpu_count']} CPU threads for both, median of {report['rounds']} calls, ms, "
        "every column (deepinv's in a worker process) sampled once per round, interleaved.",
        f"Image 1x{report['rows'][0]['size']}x{report['rows'][0]['size']}x3 (N, H, W, C), "
        "float32, rank 16. Forward+backward: the value and the "
        'gradient in every array argument. `product` is `product_filter2d(method="fft")` with the '
        "rank-16 decomposition of the same Gaussian field that `gaussian_filter2d` applies "
        "exactly; "
        "`rank error` is the largest difference of their outputs over the largest output. deepinv "
        'is `SpaceVaryingBlur(use_fft=True, mask_first=False, padding="valid")`, against '
        '`product_filter2d(padding="VALID")` (`valid`), with the same inputs; `agrees` is the '
        "largest difference of their outputs, relative. The per-pixel route is not timed at "
        "255x255 (65025 taps per pixel and channel: minutes per call; no per-pixel kernels array "
        "of that size fits in memory).",
        "",
        "| kernel | mode | product (SAME) | gaussian_filter2d | speed-up | rank error "
        "| product (valid) | deepinv | speed-up | agrees |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        for mode in ("fwd", "fwd+bwd"):
            ours = row["svconv product fft"]
            gauss = row.get("gaussian_filter2d")
            valid = row["svconv product fft valid"]
            deep = row.get("deepinv SpaceVaryingBlur fft")
            speed = f"{gauss[mode] / ours[mode]:.1f}x" if gauss else "not timed"
            err = f"{row['rank error']:.1e}" if "rank error" in row else "-"
            dspeed = f"{deep[mode] / valid[mode]:.1f}x" if deep else "-"
            agree = (
                f"{row['deepinv relative difference']:.0e}"
                if "deepinv relative difference" in row
                else "-"
            )
            lines.append(
                f"| {row['kernel']}x{row['kernel']} | {mode} | {_ms(ours, mode)} | "
                f"{_ms(gauss, mode)} | {speed} | {err} | {_ms(valid, mode)} | {_ms(deep, mode)} | "
                f"{dspeed} | {agree} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
