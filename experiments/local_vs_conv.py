"""Where position matters: ``svconv.nnx.LocalConv`` vs ``flax.nnx.Conv`` for undoing a blur
that changes across the frame.

A lens that is sharp in the centre and soft towards the corners: each frame is blurred with a
Gaussian whose width grows with the distance from the centre (``gaussian_kernels`` +
``pixel_filter2d``), plus a little noise. Two single-layer linear models learn to undo it, both
starting from the identity filter with the same kernel size:

* ``nnx.Conv``: one 9x9 kernel shared by every pixel, so one compromise sharpening for all blurs;
* ``svconv.nnx.LocalConv``: a 9x9 kernel per pixel, free to sharpen more where the blur is wider.

(Quick runs use 5x5 kernels.)

Written in Flax NNX: the models are built with their parameters, trained in place with
``nnx.Optimizer`` under ``nnx.jit`` (Adam with the cosine schedule and the batches of the other
experiments' ``common.train``). Both train on frames cropped from the training photos; losses
are reported on those and on frames from held-out photos.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import svconv
import svconv.nnx
from experiments import common

NAME = "local_vs_conv"
SIGMA_CENTRE, SIGMA_CORNER = 0.3, 2.5
NOISE = 0.002
LEARNING_RATE = 1e-2


def sigma_map(size: int) -> np.ndarray:
    """Blur width ``[size, size]`` in pixels, growing with the squared distance from the centre
    (``SIGMA_CENTRE`` there, ``SIGMA_CORNER`` in the corners), like a lens' field curvature."""
    centre = (size - 1) / 2
    yy, xx = np.meshgrid(np.arange(size) - centre, np.arange(size) - centre, indexing="ij")
    r2 = (yy**2 + xx**2) / (2 * centre**2)
    return (SIGMA_CENTRE + (SIGMA_CORNER - SIGMA_CENTRE) * r2).astype(np.float32)


def _loss(model: nnx.Module, data: tuple[np.ndarray, np.ndarray]) -> jax.Array:
    blurred, sharp = data
    return common.mse(model(blurred), sharp)


_eval_loss = nnx.jit(_loss)
_restore = nnx.jit(lambda model, blurred: model(blurred))


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, data) -> jax.Array:
    loss, grads = nnx.value_and_grad(_loss)(model, data)
    optimizer.update(model, grads)
    return loss


def train(model: nnx.Module, sample_batch, *, steps: int, seed: int, desc: str) -> np.ndarray:
    """Train ``model`` in place: Adam, the learning rate decaying to a tenth along a cosine, on
    batches from a generator seeded with ``seed`` (as ``common.train``); returns the loss of
    every step ``[steps]``."""
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, max(steps, 1), alpha=0.1)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    losses = np.empty(steps, np.float64)
    with tqdm(range(steps), desc=desc, leave=False, mininterval=0.5) as bar:
        for i in bar:
            losses[i] = float(_train_step(model, optimizer, sample_batch(rng)))
            if i % 20 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{losses[i]:.3g}")
    return losses


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Train both models, evaluate, write figures and ``results.json``; returns the record."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    # Quick runs use 5x5 kernels: compiling svconv's XLA path costs time per tap.
    size, batch, kernel = (32, 16, 5) if quick else (40, 32, 9)
    steps = steps if steps is not None else (800 if quick else 3000)
    train_images = common.load_images(common.TRAIN_RGB + common.TRAIN_GRAY, gray=True, max_side=192)
    test_images = common.load_images(
        common.HELD_OUT_RGB + common.HELD_OUT_GRAY, gray=True, max_side=192
    )

    sigma = sigma_map(size)
    psf = jnp.asarray(svconv.gaussian_kernels(jnp.asarray(sigma), kernel))

    # The blur reads a margin around the frame (VALID padding on a larger crop), as a lens
    # would: zero padding would darken the borders, a second position-dependent effect.
    margin = kernel // 2

    @jax.jit
    def blur(wide):
        # pixel_filter2d takes filters per image; this lens' PSF is the same for every frame.
        kernels = jnp.broadcast_to(psf, (wide.shape[0], *psf.shape))
        return svconv.pixel_filter2d(wide, kernels, padding="VALID")

    def crop_pair(rng: np.random.Generator, images, count: int, flip: bool = True):
        wide = common.sample_patches(rng, images, count, size + 2 * margin, flip=flip)
        noise = NOISE * rng.standard_normal((count, size, size, 1), dtype=np.float32)
        sharp = wide[:, margin : margin + size, margin : margin + size]
        return np.asarray(blur(wide)) + noise, sharp

    def sample_batch(rng: np.random.Generator):
        return crop_pair(rng, train_images, batch)

    # Fixed evaluation sets: frames from the training photos and from the held-out ones.
    eval_rng = np.random.default_rng(seed + 1)
    eval_count = 64 if quick else 256
    sets = {
        split: crop_pair(eval_rng, imgs, eval_count, flip=False)
        for split, imgs in [("train", train_images), ("heldout", test_images)]
    }

    # Both start from the identity filter (the initializer ignores its key).
    rngs = nnx.Rngs(seed)
    models = {
        "nnx.Conv (shared kernel)": nnx.Conv(
            1, 1, (kernel, kernel), kernel_init=common.delta_init, rngs=rngs
        ),
        "svconv.nnx.LocalConv (per-pixel kernel)": svconv.nnx.LocalConv(
            1, 1, kernel, input_size=(size, size), kernel_init=common.delta_init, rngs=rngs
        ),
    }
    curves, losses = {}, {}
    for label, model in models.items():
        curves[label] = train(model, sample_batch, steps=steps, seed=seed, desc=label)
        losses[label] = {split: float(_eval_loss(model, data)) for split, data in sets.items()}
    losses["blurred input (identity)"] = {
        split: float(common.mse(blurred, sharp)) for split, (blurred, sharp) in sets.items()
    }

    conv_label, local_label = list(models)
    heldout_blurred, heldout_sharp = sets["heldout"]
    restored = {
        label: np.asarray(_restore(model, heldout_blurred)) for label, model in models.items()
    }
    # Examples: the most detailed frame of each of three held-out photos.
    wide = np.stack([im[common.detailed_window(im, size + 2 * margin)] for im in test_images[:3]])
    example_blurred = np.asarray(blur(wide)) + NOISE * eval_rng.standard_normal(
        (len(wide), size, size, 1), dtype=np.float32
    )
    example_sharp = wide[:, margin : margin + size, margin : margin + size]
    examples = {"blurred input": example_blurred}
    examples.update(
        {label: np.asarray(_restore(model, example_blurred)) for label, model in models.items()}
    )
    examples["sharp"] = example_sharp
    figures = [
        _plot_examples(out, examples, sigma),
        _plot_errors_and_kernels(
            out, heldout_blurred, heldout_sharp, restored, models, curves, losses
        ),
    ]
    metrics = {
        "mse": losses,
        "final_train_batch_mse": {label: common.final_loss(c) for label, c in curves.items()},
        "parameters": {
            label: common.count_params(nnx.state(model, nnx.Param))
            for label, model in models.items()
        },
    }
    summary = [
        f"held-out MSE: blurred input {losses['blurred input (identity)']['heldout']:.2e}, "
        f"nnx.Conv {losses[conv_label]['heldout']:.2e}, "
        f"LocalConv {losses[local_label]['heldout']:.2e}",
        f"train-image MSE: nnx.Conv {losses[conv_label]['train']:.2e}, "
        f"LocalConv {losses[local_label]['train']:.2e} "
        f"(LocalConv / nnx.Conv held-out: "
        f"{losses[local_label]['heldout'] / losses[conv_label]['heldout']:.2f}x)",
    ]
    config = {
        "frame": size,
        "batch": batch,
        "kernel": kernel,
        "sigma_centre": SIGMA_CENTRE,
        "sigma_corner": SIGMA_CORNER,
        "noise_std": NOISE,
        "learning_rate": LEARNING_RATE,
        "eval_frames": eval_count,
        "train_images": common.TRAIN_RGB + common.TRAIN_GRAY,
        "heldout_images": common.HELD_OUT_RGB + common.HELD_OUT_GRAY,
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


def _plot_examples(out: Path, examples: dict[str, np.ndarray], sigma: np.ndarray) -> Path:
    """Held-out frames (rows): blurred / each model / sharp, and the blur-width map."""
    sharp = examples["sharp"]
    columns = len(examples) + 1
    fig, axes = plt.subplots(len(sharp), columns, figsize=(2.6 * columns, 2.7 * len(sharp)))
    for r in range(len(sharp)):
        for c, (label, frames) in enumerate(examples.items()):
            err = (
                ""
                if label == "sharp"
                else (f"\nMSE {np.mean(np.square(frames[r] - sharp[r])):.1e}")
            )
            common.show_image(
                axes[r, c], frames[r], label.split(" (")[0] + err, interpolation="nearest"
            )
        if r == 0:
            handle = common.show_image(axes[r, -1], sigma, "blur sigma [px]", cmap="viridis")
            fig.colorbar(handle, ax=axes[r, -1], fraction=0.046)
        else:
            axes[r, -1].set_axis_off()
    fig.suptitle("Held-out photos: undoing a blur that widens towards the corners", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, out, "examples.png")


def _plot_errors_and_kernels(
    out: Path,
    blurred: np.ndarray,
    sharp: np.ndarray,
    restored: dict[str, np.ndarray],
    models: dict[str, nnx.Module],
    curves: dict[str, np.ndarray],
    losses: dict,
) -> Path:
    """Where each model errs (held-out MSE per pixel position), the learned kernels at the
    centre and a corner, and the training curves."""
    size = sharp.shape[1]
    error_maps = {"blurred input": np.mean(np.square(blurred - sharp), axis=(0, 3))}
    error_maps.update(
        {
            label.split(" (")[0]: np.mean(np.square(frames - sharp), axis=(0, 3))
            for label, frames in restored.items()
        }
    )
    vmax = float(max(m.max() for m in error_maps.values()))
    conv_label, local_label = list(restored)
    conv_kernel = np.asarray(models[conv_label].kernel[...])[..., 0, 0]
    local_kernel = np.asarray(models[local_label].kernel[...])[..., 0, 0]
    centre, corner = size // 2, 2
    kernels = {
        "nnx.Conv kernel (everywhere)": conv_kernel,
        "LocalConv kernel, centre": local_kernel[centre, centre],
        "LocalConv kernel, near corner": local_kernel[corner, corner],
    }
    # The centre taps (~1) would swamp the colour scale; the sharpening lives off-centre.
    off_centre = [np.delete(k.ravel(), k.size // 2) for k in kernels.values()]
    klim = float(max(np.abs(k).max() for k in off_centre))

    fig = plt.figure(figsize=(15, 6.6), layout="constrained")
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.7])
    maps = [fig.add_subplot(grid[0, c]) for c in range(3)]
    for ax, (label, emap) in zip(maps, error_maps.items(), strict=True):
        handle = common.show_image(
            ax, emap, f"held-out MSE per position:\n{label}", cmap="magma", vmin=0, vmax=vmax
        )
    fig.colorbar(handle, ax=maps, shrink=0.8)
    ax = fig.add_subplot(grid[0, 3])
    curves = {label.split(" (")[0]: c for label, c in curves.items()}
    common.plot_losses(
        ax, curves, reference={"blurred input": losses["blurred input (identity)"]["train"]}
    )
    panels = [fig.add_subplot(grid[1, c]) for c in range(3)]
    for ax, (label, kernel) in zip(panels, kernels.items(), strict=True):
        handle = common.show_image(ax, kernel, label, cmap="RdBu_r", vmin=-klim, vmax=klim)
    fig.colorbar(handle, ax=panels, shrink=0.8, label="weight (centre tap off scale)")
    ax = fig.add_subplot(grid[1, 3])
    names = ["blurred input (identity)", conv_label, local_label]
    x = np.arange(len(names))
    for k, split in enumerate(["train", "heldout"]):
        ax.bar(
            x + (k - 0.5) * 0.38,
            [losses[n][split] for n in names],
            width=0.38,
            label={"train": "training photos", "heldout": "held-out photos"}[split],
        )
    ax.set_xticks(x, [n.split(" (")[0] for n in names], fontsize=8)
    ax.set_ylabel("MSE (fixed evaluation frames)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return common.save_figure(fig, out, "errors_and_kernels.png")


if __name__ == "__main__":
    common.main(run, NAME, __doc__.splitlines()[0])
