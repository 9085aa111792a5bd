"""Learn the sampling offsets that undo a smooth warp of real photos.

A camera looking through a wavy window, a rolling shutter, a misregistered scan: the observed
image is the true one sampled at displaced positions, ``observed(p) = image(p + u(p))`` with a
smooth, unknown displacement ``u`` (here sines of a few pixels; the same field for every image).
``svconv.deformable_filter2d`` with a 1x1 window is exactly that bilinear resampling, and it is
differentiable in its offsets, so the inverse warp is learned by gradient descent: offsets
``v`` (on a coarse grid of control points, bilinearly interpolated to every pixel) such that
``observed(p + v(p))`` matches the image, on batches of photo crops. The ideal ``v`` is the
inverse displacement, ``v(p) = -u(p + v(p))``; the figures compare the learned field with it.

The loss is the squared error of the images and of their Gaussian blurs
(``svconv.gaussian_filter2d``): the bilinear weights see only one pixel around each sample, and
the blurred images' gradients reach displacements of a few pixels.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

import svconv
from experiments import common

NAME = "deformable_warp"
LEARNING_RATE = 0.2
CELL = 8  # pixels between the control points of the learned offsets
BLUR = 2.0  # sigma (pixels) of the blurred images in the loss


def true_displacement(size: int, amplitude: float) -> np.ndarray:
    """``u [size, size, 2]`` (dy, dx) in pixels: smooth sines of about one period across."""
    t = np.arange(size) / size
    yy, xx = np.meshgrid(t, t, indexing="ij")
    dy = np.sin(2 * np.pi * (0.9 * xx + 0.1)) * np.cos(2 * np.pi * 0.6 * yy)
    dx = np.cos(2 * np.pi * (1.1 * yy + 0.2)) * np.sin(2 * np.pi * (0.7 * xx + 0.15))
    return (amplitude * np.stack([dy, dx], axis=-1)).astype(np.float32)


def inverse_displacement(u: np.ndarray, iterations: int = 50) -> np.ndarray:
    """``v`` with ``v(p) = -u(p + v(p))`` (fixed-point iterations, ``u`` bilinear)."""
    size = u.shape[0]
    grid = np.mgrid[0:size, 0:size].astype(np.float64)
    v = -u.astype(np.float64)
    for _ in range(iterations):
        at = grid + np.moveaxis(v, -1, 0)
        v = -np.stack(
            [ndimage.map_coordinates(u[..., a], at, order=1, mode="nearest") for a in (0, 1)],
            axis=-1,
        )
    return v.astype(np.float32)


def resample(x: jax.Array, offsets: jax.Array) -> jax.Array:
    """``x [N, H, W, C]`` sampled at ``p + offsets[p]`` (``[H, W, 2]``, or ``[N, H, W, 2]``):
    the 1x1 deformable filter with unit weights."""
    n, h, w, _ = x.shape
    offsets = jnp.broadcast_to(offsets, (n, h, w, 2)).reshape(n, h, w, 1, 1, 2)
    return svconv.deformable_filter2d(x, jnp.ones((n, h, w, 1, 1), x.dtype), offsets)


def dense_offsets(coarse: jax.Array, size: int) -> jax.Array:
    """The control points ``[size // CELL + 1, size // CELL + 1, 2]`` bilinearly interpolated
    to every pixel (the corners of the grid on the corners of the image)."""
    g = coarse.shape[0]
    t = jnp.arange(size) * (g - 1) / (size - 1)
    i0 = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, g - 2)
    f = (t - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # [size, g, 2]
    cols = rows[:, i0] * (1 - f[None, :, :]) + rows[:, i0 + 1] * f[None, :, :]
    return cols


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Learn the inverse warp, write the figures and ``results.json``; returns the record."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    size, batch, amplitude = (48, 4, 2.0) if quick else (128, 8, 3.0)
    steps = steps if steps is not None else (120 if quick else 600)
    images = common.load_images(common.TRAIN_RGB)
    held_out = common.load_images(common.HELD_OUT_RGB)
    u = jnp.asarray(true_displacement(size, amplitude))
    v_true = inverse_displacement(np.asarray(u))
    margin = int(np.ceil(amplitude)) + 2  # pixels whose samples may leave the frame
    inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
    observe = jax.jit(lambda x: resample(x, u))
    blur = jnp.full((batch, size, size), BLUR)

    def sample_batch(rng: np.random.Generator):
        x = common.sample_patches(rng, images, batch, size)
        return observe(x), x

    def loss_fn(params, data):
        observed, clean = data
        estimate = resample(observed, dense_offsets(params, size))
        sharp = common.mse(estimate[inner], clean[inner])
        smooth = common.mse(
            svconv.gaussian_filter2d(estimate, blur, 9)[inner],
            svconv.gaussian_filter2d(clean, blur, 9)[inner],
        )
        return sharp + smooth

    grid = size // CELL + 1
    params = jnp.zeros((grid, grid, 2))
    params, curve = common.train(
        loss_fn, params, sample_batch, steps=steps, learning_rate=LEARNING_RATE, seed=seed,
        desc="offsets",
    )  # fmt: skip
    v = np.asarray(dense_offsets(params, size))

    def endpoint_error(field):
        e = np.linalg.norm(field - v_true, axis=-1)[margin:-margin, margin:-margin]
        return float(np.mean(e)), float(np.max(e))

    mean_error, max_error = endpoint_error(v)
    zero_error, _ = endpoint_error(np.zeros_like(v))
    x_eval = np.concatenate([common.grid_patches(im, size, limit=8) for im in held_out])
    observed = observe(x_eval)
    restored = resample(observed, jnp.asarray(v))
    crop = (slice(None), slice(margin, -margin), slice(margin, -margin))
    psnr_before = common.psnr(observed[crop], x_eval[crop])
    psnr_after = common.psnr(restored[crop], x_eval[crop])
    figures = [
        _plot_fields(out, np.asarray(u), v_true, v, margin),
        _plot_images(out, x_eval[0], np.asarray(observed[0]), np.asarray(restored[0]), curve),
    ]
    metrics = {
        "endpoint_error_mean_px": mean_error,
        "endpoint_error_max_px": max_error,
        "endpoint_error_of_zero_offsets_px": zero_error,
        "heldout_psnr_warped_db": psnr_before,
        "heldout_psnr_restored_db": psnr_after,
        "final_train_loss": common.final_loss(curve),
    }
    summary = [
        f"learned inverse warp: mean endpoint error {mean_error:.3f} px (max {max_error:.2f}; "
        f"{zero_error:.2f} px for no correction), displacements up to {amplitude:g} px",
        f"held-out photos: PSNR {psnr_before:.1f} dB warped -> {psnr_after:.1f} dB restored",
    ]
    config = {
        "frame": size,
        "batch": batch,
        "amplitude_px": amplitude,
        "control_point_spacing_px": CELL,
        "blur_sigma_px": BLUR,
        "learning_rate": LEARNING_RATE,
        "train_images": common.TRAIN_RGB,
        "heldout_images": common.HELD_OUT_RGB,
    }
    return common.finish(
        NAME, out, quick=quick, steps=steps, started=started, config=config, metrics=metrics,
        summary=summary, figures=figures,
    )  # fmt: skip


def _plot_fields(out: Path, u: np.ndarray, v_true: np.ndarray, v: np.ndarray, margin: int):
    """The true warp, its inverse and the learned offsets (arrows, twice their length, on a
    coarse grid over the magnitude), and the endpoint error."""
    size = u.shape[0]
    step = max(1, size // 12)
    yy, xx = np.mgrid[0:size:step, 0:size:step]
    error = np.linalg.norm(v - v_true, axis=-1)
    panels = (
        ("true warp u", u),
        ("its inverse (ideal offsets)", v_true),
        ("learned offsets", v),
    )
    limit = float(np.abs(u).max()) * 1.5
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, (title, field) in zip(axes, panels, strict=False):
        magnitude = np.linalg.norm(field, axis=-1)
        handle = ax.imshow(magnitude, cmap="viridis", vmin=0, vmax=limit)
        # Image axes point down: (dx, dy) in data units is the displacement as drawn.
        ax.quiver(xx, yy, field[::step, ::step, 1], field[::step, ::step, 0], color="w",
                  angles="xy", scale_units="xy", scale=0.5, width=0.006)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(handle, ax=axes[:3], fraction=0.02, label="pixels")
    shown = np.where(
        np.pad(np.ones((size - 2 * margin,) * 2), margin) > 0, error, np.nan
    )  # the frame's margin is left out of the fit
    handle = axes[3].imshow(shown, cmap="magma", vmin=0)
    axes[3].set_title("endpoint error (margin left out)", fontsize=9)
    axes[3].set_axis_off()
    fig.colorbar(handle, ax=axes[3], fraction=0.046, label="pixels")
    return common.save_figure(fig, out, "fields.png")


def _plot_images(out: Path, clean, observed, restored, curve: np.ndarray):
    """A held-out photo: true, warped, restored with the learned offsets; the errors of the
    last two (the frame's margin included) and the training loss."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.4), gridspec_kw={"wspace": 0.55})
    common.show_image(axes[0, 0], clean, "held-out photo")
    common.show_image(axes[0, 1], observed, "warped (observed)")
    common.show_image(axes[0, 2], restored, "resampled at the learned offsets")
    errors = [np.abs(np.asarray(v) - clean).mean(axis=-1) for v in (observed, restored)]
    top = float(np.percentile(errors[0], 99))
    for ax, err, title in zip(axes[1, :2], errors, ("|warped - photo|", "|restored - photo|"),
                              strict=True):  # fmt: skip
        handle = common.show_image(ax, err, title, cmap="magma", vmin=0, vmax=top)
    fig.colorbar(handle, ax=axes[1, 1], fraction=0.046)
    common.plot_losses(axes[1, 2], {"offsets": curve})
    return common.save_figure(fig, out, "images_and_loss.png")


if __name__ == "__main__":
    common.main(run, NAME, __doc__.splitlines()[0])
