"""A large field-dependent point-spread function by product convolution, and deconvolution.

An optics-style PSF that degrades toward the corners (astigmatism: an ellipse stretched along the
radius; coma: a flare thrown outward, growing with the distance from the centre), 127x127 taps on
a 512x512 photo: 16129 taps per pixel, beyond the per-pixel ops' memory (a kernel per pixel would
be 17 GB). It is calibrated the usual way, PSFs on a coarse grid, and applied three ways:

* exactly, every source pixel spreading its own PSF (``pixel_splat2d``), in bands of rows, on the
  bands where the error is measured (the whole image in the quick run);
* by product convolution, ``product_splat2d`` with ``psf_grid_decomposition``: the grid's eigen-PSFs
  at ranks 4, 8 and 16, and the full bilinear interpolation of the grid PSFs (Nagy-O'Leary);
* its error maps against the exact blur.

Then deconvolution: Tikhonov-regularised least squares ``min |A x - b|^2 + lam |x|^2`` solved by
conjugate gradients on the normal equations, ``A`` the rank-16 operator and ``A^T`` its
``jax.linear_transpose`` (the filter form, by the same FFTs).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import svconv
from experiments import common

NAME = "large_psf"
RANKS = (4, 8, 16)
NOISE = 0.003
LAM = 3e-4


def psfs_at(rows: jax.Array, cols: jax.Array, size: int, kernel: int) -> jax.Array:
    """``[P, kernel, kernel]``: the PSF of the sources at pixel positions ``(rows, cols)`` of a
    ``size x size`` image, each normalised to sum 1. A core ellipse of widths ``a`` (radial) and
    ``b`` (tangential) growing with the squared field radius, plus a coma flare of a quarter to a
    third of the energy thrown radially outward and wider still."""
    scale = kernel / 127
    centre = (size - 1) / 2
    dy, dx = (rows - centre) / centre, (cols - centre) / centre
    radius = jnp.sqrt(dy**2 + dx**2) / jnp.sqrt(2.0)  # 0 at the centre, 1 in the corners
    angle = jnp.arctan2(dy, dx)
    ry, rx = jnp.sin(angle), jnp.cos(angle)  # the radial unit vector (rows, cols)
    a = scale * (2.0 + 10.0 * radius**2)
    b = scale * (2.0 + 3.0 * radius**2)
    shift = scale * 28.0 * radius
    flare = 0.3 * radius
    taps = jnp.arange(kernel) - kernel // 2
    ty, tx = taps[None, :, None], taps[None, None, :]

    def ellipse(oy, ox, sa, sb):
        u = (ty - oy[:, None, None]) * ry[:, None, None] + (tx - ox[:, None, None]) * rx[
            :, None, None
        ]
        v = (
            -(ty - oy[:, None, None]) * rx[:, None, None]
            + (tx - ox[:, None, None]) * ry[:, None, None]
        )
        g = jnp.exp(-0.5 * ((u / sa[:, None, None]) ** 2 + (v / sb[:, None, None]) ** 2))
        return g / jnp.sum(g, axis=(1, 2), keepdims=True)

    zero = jnp.zeros_like(radius)
    core = ellipse(zero, zero, a, b)
    coma = ellipse(shift * ry, shift * rx, 1.6 * a, 1.6 * b)
    return (1 - flare)[:, None, None] * core + flare[:, None, None] * coma


def grid_psfs(size: int, kernel: int, grid: int) -> jax.Array:
    """``[grid, grid, kernel, kernel]``: the calibration, PSFs at the centres of a ``grid x grid``
    partition of the image (where ``psf_grid_decomposition`` places them)."""
    centres = (jnp.arange(grid) + 0.5) * size / grid - 0.5
    rows, cols = jnp.meshgrid(centres, centres, indexing="ij")
    return psfs_at(rows.ravel(), cols.ravel(), size, kernel).reshape(grid, grid, kernel, kernel)


def exact_band(x: jax.Array, start: int, stop: int, kernel: int, strip: int) -> jax.Array:
    """Rows ``[start, stop)`` of the exact blur of ``x [1, S, S, C]``: every source pixel within
    reach spreads its own PSF (``pixel_splat2d`` on strips of ``strip`` source rows)."""
    size, half = x.shape[1], kernel // 2
    out = jnp.zeros((1, stop - start + 2 * half, size + 2 * half, x.shape[3]))
    cols = jnp.arange(size, dtype=jnp.float32)
    for lo in range(max(0, start - half), min(size, stop + half), strip):
        hi = min(lo + strip, size, stop + half)
        rr, cc = jnp.meshgrid(jnp.arange(lo, hi, dtype=jnp.float32), cols, indexing="ij")
        k = psfs_at(rr.ravel(), cc.ravel(), size, kernel).reshape(1, hi - lo, size, kernel, kernel)
        # VALID: the source strip's full spread, rows lo - half ... hi + half - 1.
        spread = _splat_valid(x[:, lo:hi], k)
        top = lo - half - (start - half)  # row offset in `out`
        keep = slice(max(0, -top), min(spread.shape[1], out.shape[1] - top))
        out = out.at[:, top + keep.start : top + keep.stop].add(spread[:, keep])
    return out[:, half:-half, half:-half]


@jax.jit
def _splat_valid(x, k):
    return svconv.pixel_splat2d(x, k, padding="VALID")


def conjugate_gradients(apply, rhs, steps: int):
    """``steps`` iterations of CG for ``apply(v) = rhs`` (``apply`` symmetric positive)."""

    def body(_, state):
        v, r, p, rs = state
        ap = apply(p)
        alpha = rs / jnp.vdot(p, ap)
        v, r = v + alpha * p, r - alpha * ap
        new = jnp.vdot(r, r)
        return v, r, r + (new / rs) * p, new

    v0 = jnp.zeros_like(rhs)
    state = (v0, rhs, rhs, jnp.vdot(rhs, rhs))
    return jax.lax.fori_loop(0, steps, body, state)[0]


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Blur, compare, deconvolve; write the figures and ``results.json``; returns the record."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    size, kernel, grid = (128, 31, 5) if quick else (512, 127, 9)
    steps = steps if steps is not None else (30 if quick else 100)
    strip = 32 if quick else 8
    photo = common.load_image("astronaut", max_side=size)[:size, :size]
    x = jnp.asarray(photo)[None]
    # The exact blur on the bands where it is compared: the whole image when quick, else a band
    # along the top edge (the corners) and one through the centre.
    bands = [(0, size)] if quick else [(0, 48), (size // 2 - 24, size // 2 + 24)]
    exact = [exact_band(x, a, b, kernel, strip) for a, b in bands]
    psfs = grid_psfs(size, kernel, grid)
    models = {f"rank {r}": svconv.psf_grid_decomposition(psfs, (size, size), rank=r) for r in RANKS}
    models[f"interpolation ({grid * grid})"] = svconv.psf_grid_decomposition(psfs, (size, size))
    blur = jax.jit(functools.partial(svconv.product_splat2d, method="fft"))
    errors, outputs, seconds = {}, {}, {}
    for name, (filters, weights) in models.items():
        y = jax.block_until_ready(blur(x, filters, weights))
        t0 = time.perf_counter()
        y = jax.block_until_ready(blur(x, filters, weights))
        seconds[name] = time.perf_counter() - t0
        outputs[name] = y
        num = sum(
            float(jnp.sum((y[:, a:b] - e) ** 2)) for (a, b), e in zip(bands, exact, strict=True)
        )
        den = sum(float(jnp.sum(e**2)) for e in exact)
        errors[name] = float(np.sqrt(num / den))
    # Deconvolution of the exact blur plus noise with the rank-16 model.
    filters, weights = models["rank 16"]
    observed_full = outputs["rank 16"]
    for (a, b), e in zip(bands, exact, strict=True):  # the measured bands exactly
        observed_full = observed_full.at[:, a:b].set(e)
    key = jax.random.key(seed)
    observed = observed_full + NOISE * jax.random.normal(key, observed_full.shape)

    @jax.jit
    def solve(b, filters, weights):  # the operator's arrays as arguments, not constants
        def forward(v):
            return svconv.product_splat2d(v, filters, weights, method="fft")

        transpose = jax.linear_transpose(forward, x)
        rhs = transpose(b)[0]
        return conjugate_gradients(lambda v: transpose(forward(v))[0] + LAM * v, rhs, steps)

    t0 = time.perf_counter()
    restored = jax.block_until_ready(solve(observed, filters, weights))
    solve_s = time.perf_counter() - t0
    metrics = {
        "relative error vs exact": errors,
        "product_splat2d seconds": seconds,
        "psnr observed": common.psnr(jnp.clip(observed, 0, 1)[0], photo),
        "psnr restored": common.psnr(jnp.clip(restored, 0, 1)[0], photo),
        "cg seconds": solve_s,
    }
    figures = [
        _plot_psfs(out, psfs, models["rank 16"][0]),
        _plot_images(out, photo, observed[0], restored[0], outputs, exact, bands, errors),
    ]
    summary = [
        f"{kernel}x{kernel} PSF field on a {size}x{size} photo, {grid}x{grid} calibration grid",
        "relative error vs exact: "
        + ", ".join(f"{name} {err:.2e}" for name, err in errors.items()),
        f"deconvolution ({steps} CG steps, rank 16): PSNR {metrics['psnr observed']:.1f} -> "
        f"{metrics['psnr restored']:.1f} dB in {solve_s:.1f} s",
    ]
    config = {"size": size, "kernel": kernel, "grid": grid, "noise": NOISE, "lam": LAM}
    return common.finish(
        NAME, out, quick=quick, steps=steps, started=started, config=config, metrics=metrics,
        summary=summary, figures=figures,
    )  # fmt: skip


def _plot_psfs(out: Path, psfs: jax.Array, eigen: jax.Array) -> Path:
    """The calibration grid's PSFs (every other node) and the first eigen-PSFs."""
    grid = psfs.shape[0]
    picks = list(range(0, grid, 2)) if grid > 5 else list(range(grid))
    fig, axes = plt.subplots(2, len(picks) + 1, figsize=(2.2 * (len(picks) + 1), 4.6))
    for i, g in enumerate(picks):
        p = np.asarray(psfs[g, g])
        axes[0, i].imshow(p**0.5, cmap="inferno")
        axes[0, i].set_title(f"PSF at node ({g}, {g})", fontsize=8)
    p = np.asarray(psfs[0, grid - 1])
    axes[0, -1].imshow(p**0.5, cmap="inferno")
    axes[0, -1].set_title(f"node (0, {grid - 1})", fontsize=8)
    for i in range(len(picks) + 1):
        e = np.asarray(eigen[i])
        lim = np.abs(e).max()
        axes[1, i].imshow(e, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[1, i].set_title(f"eigen-PSF {i + 1}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("calibration PSFs (square root) and the grid's leading eigen-PSFs")
    return common.save_figure(fig, out, "psfs.png")


def _plot_images(out, photo, observed, restored, outputs, exact, bands, errors) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6))
    common.show_image(axes[0, 0], photo, "photo")
    common.show_image(axes[0, 1], np.clip(observed, 0, 1), "blurred (exact) + noise")
    common.show_image(axes[0, 2], np.clip(restored, 0, 1), "deconvolved (CG, rank 16)")
    (a, b), e = bands[0], exact[0]
    top = float(np.abs(np.asarray(outputs[f"rank {RANKS[0]}"][0, a:b] - e[0])).mean(-1).max())
    for ax, name in zip(axes[1], (f"rank {RANKS[0]}", "rank 16", list(outputs)[-1]), strict=True):
        diff = np.abs(np.asarray(outputs[name][0, a:b] - e[0])).mean(-1)
        handle = common.show_image(
            ax, diff, f"|{name} - exact|, rows {a}-{b} ({errors[name]:.1e})", cmap="magma",
            vmin=0, vmax=top,
        )  # fmt: skip
    fig.colorbar(handle, ax=axes[1, 2], fraction=0.046)
    return common.save_figure(fig, out, "blur_and_deconvolution.png")


if __name__ == "__main__":
    common.main(run, NAME, __doc__.splitlines()[0])
