"""Kernel-prediction denoiser vs a plain convolutional one.

Both networks see a noisy RGB image (Gaussian noise, sigma 0.1 of the [0, 1] range) and share
the same trunk: a few 3x3 ``nn.Conv`` + ReLU layers.

* KPN: the trunk's features are the guide of an ``svconv.KernelPredictionFilter``, which
  predicts a normalised 5x5 filter per pixel and applies it to the noisy image with
  ``svconv.pixel_filter2d``: the output is always a local weighted average of noisy pixels.
* CNN: the trunk ends in a 3x3 ``nn.Conv`` that predicts the residual (the noise to remove); its
  width is picked so that it has about as many parameters as the KPN.

Both train on noisy patches of the training photos with the same steps, batches and optimizer;
PSNR is measured on the held-out photos, which neither network has seen.
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
from scipy import ndimage

import svconv
from experiments import common

NAME = "kpn_denoiser"
NOISE = 0.1
DEPTH = 3
KPN_FEATURES = 16
FILTER = 5
LEARNING_RATE = 2e-3


class KPNDenoiser(nn.Module):
    """Conv trunk -> per-pixel 5x5 filters (softmax-normalised) applied to the noisy input."""

    features: int
    depth: int
    filter_size: int

    @nn.compact
    def __call__(self, noisy: jax.Array, *, return_kernels: bool = False):
        """``noisy [batch, h, w, 3]`` -> the denoised image (and the filters when asked)."""
        h = noisy
        for _ in range(self.depth):
            h = nn.relu(nn.Conv(self.features, (3, 3))(h))
        return svconv.KernelPredictionFilter(kernel_size=self.filter_size)(
            noisy, h, return_kernels=return_kernels
        )


class ConvDenoiser(nn.Module):
    """Conv trunk -> a 3x3 conv predicting the residual, added to the noisy input."""

    features: int
    depth: int

    @nn.compact
    def __call__(self, noisy: jax.Array) -> jax.Array:
        """``noisy [batch, h, w, 3]`` -> the denoised image."""
        h = noisy
        for _ in range(self.depth):
            h = nn.relu(nn.Conv(self.features, (3, 3))(h))
        return noisy + nn.Conv(noisy.shape[-1], (3, 3))(h)


def _matching_cnn(target: int, depth: int) -> ConvDenoiser:
    """The ``ConvDenoiser`` whose parameter count is closest to ``target``."""

    def count(width):  # 3x3 convs with bias: 3->w, (depth-1) x w->w, w->3
        return 9 * 3 * width + width + (depth - 1) * (9 * width**2 + width) + 9 * width * 3 + 3

    width = min(range(4, 129), key=lambda w: abs(count(w) - target))
    return ConvDenoiser(features=width, depth=depth)


@jax.jit
def _add_noise(clean: jax.Array, key: jax.Array) -> jax.Array:
    return clean + NOISE * jax.random.normal(key, clean.shape)


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Train both denoisers, evaluate on held-out photos, write figures and ``results.json``."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    patch, batch = (32, 8) if quick else (40, 16)
    steps = steps if steps is not None else (120 if quick else 1500)
    images = common.load_images(common.TRAIN_RGB)
    held_out = common.load_images(common.HELD_OUT_RGB, max_side=160 if quick else 384)

    key_init, key_test = jax.random.split(jax.random.key(seed))
    dummy = jnp.zeros((1, patch, patch, 3))
    kpn = KPNDenoiser(features=KPN_FEATURES, depth=DEPTH, filter_size=FILTER)
    kpn_params = kpn.init(key_init, dummy)
    cnn = _matching_cnn(common.count_params(kpn_params), DEPTH)
    cnn_params = cnn.init(key_init, dummy)
    models = {"KPN (svconv)": (kpn, kpn_params), "plain CNN": (cnn, cnn_params)}

    # common.train seeds a fresh generator per model, so both models see identical batches.
    def sample_batch(rng: np.random.Generator):
        clean = common.sample_patches(rng, images, batch, patch)
        return clean + NOISE * rng.standard_normal(clean.shape, dtype=np.float32), clean

    trained, curves = {}, {}
    for label, (model, params) in models.items():

        def loss_fn(p, data, model=model):
            noisy, clean = data
            return common.mse(model.apply(p, noisy), clean)

        trained[label], curves[label] = common.train(
            loss_fn,
            params,
            sample_batch,
            steps=steps,
            learning_rate=LEARNING_RATE,
            seed=seed,
            desc=label,
        )

    test_keys = jax.random.split(key_test, len(held_out))
    noisy_test = [
        _add_noise(jnp.asarray(im)[None], k) for im, k in zip(held_out, test_keys, strict=True)
    ]
    outputs = {
        label: [jax.jit(model.apply)(trained[label], x)[0] for x in noisy_test]
        for label, (model, _) in models.items()
    }
    outputs = {"noisy input": [x[0] for x in noisy_test], **outputs}
    scores = {
        label: [common.psnr(y, im) for y, im in zip(ys, held_out, strict=True)]
        for label, ys in outputs.items()
    }
    mean_psnr = {label: float(np.mean(v)) for label, v in scores.items()}

    with_kernels = jax.jit(functools.partial(kpn.apply, return_kernels=True))
    _, kernels = with_kernels(trained["KPN (svconv)"], noisy_test[0])
    figures = [
        _plot_crops(out, held_out, outputs, scores),
        _plot_training_and_kernels(out, curves, held_out[0], np.asarray(kernels[0, ..., 0])),
    ]
    counts = {label: common.count_params(trained[label]) for label in models}
    kpn_label, cnn_label = list(models)
    metrics = {
        "psnr_db": {
            label: dict(zip(common.HELD_OUT_RGB, v, strict=True)) for label, v in scores.items()
        },
        "mean_psnr_db": mean_psnr,
        "final_train_mse": {label: common.final_loss(c) for label, c in curves.items()},
        "parameters": counts,
    }
    summary = [
        "held-out PSNR (mean of "
        + ", ".join(common.HELD_OUT_RGB)
        + "): "
        + ", ".join(f"{label} {v:.2f} dB" for label, v in mean_psnr.items()),
        f"KPN - CNN: {mean_psnr[kpn_label] - mean_psnr[cnn_label]:+.2f} dB at "
        f"{counts[kpn_label]} vs {counts[cnn_label]} parameters",
        f"final training MSE (last 20 steps): KPN {metrics['final_train_mse'][kpn_label]:.2e}, "
        f"CNN {metrics['final_train_mse'][cnn_label]:.2e}",
    ]
    config = {
        "noise_std": NOISE,
        "patch": patch,
        "batch": batch,
        "depth": DEPTH,
        "kpn_features": KPN_FEATURES,
        "cnn_features": cnn.features,
        "filter": FILTER,
        "learning_rate": LEARNING_RATE,
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


def _plot_crops(
    out: Path, clean: list[np.ndarray], outputs: dict[str, list], scores: dict[str, list[float]]
) -> Path:
    """One row per held-out image: noisy / each model / clean, on a detailed crop."""
    columns = [*outputs, "clean"]
    fig, axes = plt.subplots(len(clean), len(columns), figsize=(3 * len(columns), 3.1 * len(clean)))
    for r, image in enumerate(clean):
        window = common.detailed_window(image, min(96, *image.shape[:2]))
        for c, label in enumerate(columns):
            shown = image if label == "clean" else np.asarray(outputs[label][r])
            title = label if label == "clean" else f"{label}\n{scores[label][r]:.2f} dB"
            common.show_image(axes[r, c], shown[window], title, interpolation="nearest")
        axes[r, 0].text(
            -0.08,
            0.5,
            common.HELD_OUT_RGB[r],
            rotation=90,
            va="center",
            ha="right",
            transform=axes[r, 0].transAxes,
            fontsize=10,
        )
    fig.suptitle(f"Held-out photos, noise sigma {NOISE} (PSNR of the whole image)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, out, "denoised_crops.png")


def _plot_training_and_kernels(
    out: Path, curves: dict[str, np.ndarray], clean: np.ndarray, kernels: np.ndarray
) -> Path:
    """Training losses, and the KPN's predicted filters at an edge and in a flat area."""
    window = common.detailed_window(clean, min(96, *clean.shape[:2]))
    crop = clean[window]
    gray = ndimage.gaussian_filter(crop.mean(axis=-1), 1.0)
    energy = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))
    margin = FILTER
    inner = energy[margin:-margin, margin:-margin]
    points = {
        "edge": np.unravel_index(np.argmax(inner), inner.shape),
        "flat": np.unravel_index(np.argmin(inner), inner.shape),
    }
    points = {k: (i + margin, j + margin) for k, (i, j) in points.items()}

    fig = plt.figure(figsize=(13, 3.4))
    grid = fig.add_gridspec(1, 4, width_ratios=[2.2, 1.3, 1, 1], wspace=0.3)
    common.plot_losses(fig.add_subplot(grid[0]), curves, reference={"noise variance": NOISE**2})
    ax = fig.add_subplot(grid[1])
    common.show_image(ax, crop, "clean crop (first held-out image)", interpolation="nearest")
    for k, (label, (i, j)) in enumerate(points.items()):
        ax.plot(
            j, i, "o", color=f"C{k + 2}", markersize=7, markerfacecolor="none", markeredgewidth=2
        )
        kernel = kernels[window][i, j]
        sub = fig.add_subplot(grid[2 + k])
        handle = sub.imshow(kernel, cmap="viridis", vmin=0)
        sub.set_title(f"predicted 5x5 filter: {label}", fontsize=9, color=f"C{k + 2}")
        sub.set_axis_off()
        fig.colorbar(handle, ax=sub, fraction=0.046)
    return common.save_figure(fig, out, "training_and_kernels.png")


if __name__ == "__main__":
    common.main(run, NAME, __doc__.splitlines()[0])
