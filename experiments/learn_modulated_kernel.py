"""Learn a convolution kernel seen through a known, spatially-varying modulation.

The forum question this library started from: given a known ``d[i, j, m, n]`` (per output pixel
and tap), learn ``w`` in ``y[i,j] = sum_{m,n,c} w[m,n,c] d[i,j,m,n] x[i+m, j+n, c]``.

Here ``d`` models a lens: the light reaching the sensor falls off towards the corners
(``cos^4`` vignetting), and off-axis the lens barrel clips the outer side of each blur spot
(mechanical vignetting), so taps pointing away from the image centre lose more light the
further out the pixel is. Pairs ``(x, y)`` are made with a hidden 7x7 RGB->1 kernel ``w``
(5x5 in quick runs) plus a little sensor noise, and an ``svconv.ModulatedConv`` given ``d`` is
trained with Adam.

Photos alone barely pin the kernel down: they hold little high-frequency energy and their RGB
channels are strongly correlated, so many kernels explain them almost equally well. As in a
real PSF calibration, half of every batch is therefore a random-noise chart, the other half
crops of bundled photos; a second ModulatedConv trained on photos only shows the difference,
and an ``nn.Conv`` blind to ``d`` shows what ignoring the modulation costs.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import svconv
from experiments import common

NAME = "learn_modulated_kernel"
NOISE = 0.01  # sensor noise on y, in units of the [0, 1] image range
LEARNING_RATE = 0.02


def lens_modulation(size: int, kernel: int, *, strength: float = 1.2) -> np.ndarray:
    """``d [size, size, kernel, kernel]`` for a square frame.

    ``d[i,j,m,n] = cos^4(theta_ij) * exp(-strength * r_ij * max(0, <t_mn, u_ij>))`` where
    ``theta`` is the field angle (the corner at 35 degrees), ``r`` the distance of pixel
    ``(i, j)`` from the centre (1 at the corners), ``u`` the unit vector pointing from the
    centre to it and ``t_mn`` the tap offset in units of the kernel radius.
    """
    centre = (size - 1) / 2
    yy, xx = np.meshgrid(np.arange(size) - centre, np.arange(size) - centre, indexing="ij")
    radius = np.hypot(yy, xx) / np.hypot(centre, centre)
    cos4 = np.cos(np.deg2rad(35.0) * radius) ** 4
    # Direction from the centre; the centre pixel itself has none (radius 0 zeroes its term).
    uy, ux = yy / np.maximum(np.hypot(yy, xx), 1e-9), xx / np.maximum(np.hypot(yy, xx), 1e-9)
    half = (kernel - 1) / 2
    ty, tx = np.meshgrid(np.arange(kernel) - half, np.arange(kernel) - half, indexing="ij")
    outward = uy[..., None, None] * ty / half + ux[..., None, None] * tx / half
    clip = np.exp(-strength * radius[..., None, None] * np.maximum(outward, 0.0))
    return (cos4[..., None, None] * clip).astype(np.float32)


def hidden_kernel(kernel: int) -> np.ndarray:
    """The kernel to recover, ``[kernel, kernel, 3, 1]``: a different, recognisable filter per
    input channel (R: a soft blob, G: an oriented Gabor, B: a centre-surround)."""
    half = (kernel - 1) / 2
    yy, xx = np.meshgrid(np.arange(kernel) - half, np.arange(kernel) - half, indexing="ij")
    r2 = yy**2 + xx**2
    blob = np.exp(-r2 / (2 * 1.3**2))
    angle = np.deg2rad(30.0)
    gabor = np.exp(-r2 / (2 * 1.8**2)) * np.cos(1.6 * (xx * np.cos(angle) + yy * np.sin(angle)))
    surround = np.exp(-r2 / (2 * 0.8**2)) - 0.45 * np.exp(-r2 / (2 * 2.0**2))
    w = np.stack([blob / blob.sum(), 0.3 * gabor, surround / np.abs(surround).sum()], axis=-1)
    return w[..., None].astype(np.float32)


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Train the three models, write the figures and ``results.json``; returns the record."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    # Quick runs use a smaller kernel: the XLA path unrolls a loop over taps, so compiling
    # costs time in proportion to kh*kw.
    size, batch, kernel = (48, 4, 5) if quick else (64, 8, 7)
    steps = steps if steps is not None else (150 if quick else 500)
    images = common.load_images(common.TRAIN_RGB)
    held_out = common.load_images(common.HELD_OUT_RGB)

    d = jnp.asarray(lens_modulation(size, kernel))
    w_true = jnp.asarray(hidden_kernel(kernel))
    observe = jax.jit(lambda x: svconv.modulated_conv2d(x, w_true, d))

    def sample_batch(rng: np.random.Generator, charts: bool = True):
        x = common.sample_patches(rng, images, batch, size)
        if charts:
            x[: batch // 2] = rng.random((batch // 2, size, size, 3), dtype=np.float32)
        # Centred inputs, the usual normalisation; it also takes the large mean (DC) component,
        # which would slow gradient descent down, out of this least-squares problem.
        x -= 0.5
        noise = NOISE * rng.standard_normal((batch, size, size, 1), dtype=np.float32)
        return x, observe(x) + noise

    modulated = svconv.ModulatedConv(features=1, kernel_size=kernel, use_bias=False)
    plain = nn.Conv(features=1, kernel_size=(kernel, kernel), use_bias=False)
    x0 = jnp.zeros((1, size, size, 3))
    key = jax.random.key(seed)

    def apply_modulated(params, x):
        return modulated.apply(params, x, d)

    models = {  # label: (apply, initial parameters, batches with noise charts?)
        "ModulatedConv": (apply_modulated, modulated.init(key, x0, d), True),
        "ModulatedConv, photos only": (apply_modulated, modulated.init(key, x0, d), False),
        "nn.Conv (ignores d)": (plain.apply, plain.init(key, x0), True),
    }
    learned, curves, heldout_mse = {}, {}, {}
    x_eval = np.concatenate([common.grid_patches(im, size, limit=16) for im in held_out]) - 0.5
    y_eval = observe(x_eval)
    for label, (apply, params, charts) in models.items():
        params, curves[label] = common.train(
            _loss_fn(apply),
            params,
            functools.partial(sample_batch, charts=charts),
            steps=steps,
            learning_rate=LEARNING_RATE,
            seed=seed,
            desc=label,
        )
        learned[label] = np.asarray(params["params"]["kernel"])
        heldout_mse[label] = float(_loss_fn(apply)(params, (x_eval, y_eval)))

    errors = {label: common.relative_error(w, w_true) for label, w in learned.items()}
    figures = [
        _plot_kernels(out, np.asarray(w_true), learned, errors),
        _plot_modulation_and_loss(out, np.asarray(d), curves),
    ]
    mod, photos, plain_label = list(models)
    metrics = {
        "kernel_relative_error": errors[mod],
        "kernel_relative_error_photos_only": errors[photos],
        "kernel_relative_error_plain_conv": errors[plain_label],
        "final_train_mse": common.final_loss(curves[mod]),
        "final_train_mse_photos_only": common.final_loss(curves[photos]),
        "final_train_mse_plain_conv": common.final_loss(curves[plain_label]),
        "heldout_mse": heldout_mse[mod],
        "heldout_mse_photos_only": heldout_mse[photos],
        "heldout_mse_plain_conv": heldout_mse[plain_label],
        "noise_mse_floor": NOISE**2,
    }
    summary = [
        f"recovered kernel relative error: {errors[mod]:.2%} (photos only: "
        f"{errors[photos]:.1%}; nn.Conv blind to d: {errors[plain_label]:.1%})",
        f"held-out photo MSE (noise-free targets): ModulatedConv {heldout_mse[mod]:.1e}, "
        f"photos only {heldout_mse[photos]:.1e}, nn.Conv {heldout_mse[plain_label]:.1e}",
    ]
    config = {
        "frame": size,
        "batch": batch,
        "kernel": kernel,
        "noise_std": NOISE,
        "learning_rate": LEARNING_RATE,
        "noise_chart_fraction": 0.5,
        "train_images": common.TRAIN_RGB,
        "heldout_images": common.HELD_OUT_RGB,
    }
    return common.finish(
        NAME,
        out,
        quick=quick,
        steps=steps,
        started=started,
        config=config,
        metrics=metrics,
        summary=summary,
        figures=figures,
    )


@functools.cache
def _loss_fn(apply):
    """Jitted MSE of ``apply(params, x)`` against ``y``; one function object per model
    structure, so the two ModulatedConv runs share their compilations."""

    @jax.jit
    def loss_fn(params, batch):
        x, y = batch
        return common.mse(apply(params, x), y)

    return loss_fn


def _plot_kernels(
    out: Path, w_true: np.ndarray, learned: dict[str, np.ndarray], errors: dict[str, float]
) -> Path:
    """True vs learned kernels, one column per input channel, on one colour scale."""
    rows = {"hidden w": w_true, **learned}
    limit = float(np.abs(w_true).max())
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.4 * len(rows)))
    for r, (label, w) in enumerate(rows.items()):
        for c, channel in enumerate("RGB"):
            handle = axes[r, c].imshow(w[:, :, c, 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"input channel {channel}", fontsize=9)
        err = f"\nrel. error {errors[label]:.2%}" if label in errors else ""
        axes[r, 0].set_ylabel(label + err, fontsize=9)
    fig.colorbar(handle, ax=axes, shrink=0.6)
    size = w_true.shape[0]
    fig.suptitle(
        f"{size}x{size} kernel (RGB -> 1) recovered through a known lens modulation d", fontsize=10
    )
    return common.save_figure(fig, out, "kernels.png")


def _plot_modulation_and_loss(out: Path, d: np.ndarray, curves: dict[str, np.ndarray]) -> Path:
    """The modulation (total gain map and per-tap patterns at three pixels) and the losses."""
    size = d.shape[0]
    spots = {
        "centre": (size // 2, size // 2),
        "edge (right)": (size // 2, size - 1),
        "corner (top left)": (0, 0),
    }
    fig = plt.figure(figsize=(12, 3.2))
    grid = fig.add_gridspec(1, 6, width_ratios=[1.25, 1, 1, 1, 0.15, 2.2], wspace=0.35)
    ax = fig.add_subplot(grid[0])
    handle = ax.imshow(d.sum(axis=(2, 3)) / d.shape[2] ** 2, cmap="magma", vmin=0, vmax=1)
    for _, (i, j) in spots.items():
        ax.plot(j, i, "c+", markersize=10, markeredgewidth=2)
    ax.set_title("mean of d over taps", fontsize=9)
    ax.set_axis_off()
    fig.colorbar(handle, ax=ax, fraction=0.046)
    for k, (label, (i, j)) in enumerate(spots.items()):
        ax = fig.add_subplot(grid[1 + k])
        ax.imshow(d[i, j], cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"d at {label}", fontsize=9)
        ax.set_axis_off()
    common.plot_losses(fig.add_subplot(grid[5]), curves, reference={"noise floor": NOISE**2})
    return common.save_figure(fig, out, "modulation_and_loss.png")


if __name__ == "__main__":
    common.main(run, NAME, __doc__.splitlines()[0])
