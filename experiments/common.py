"""Helpers shared by the experiments: images, patches, metrics, the training loop, figures and
the output folder.

Every experiment module exposes ``run(*, quick, steps=None, out_dir=None, seed=0) -> dict`` and
calls :func:`main` from its ``__main__`` block, so the command line, the output layout and the
JSON schema are the same for all of them.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are only written to files; never needs a display

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage import color, data, transform, util  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Images whose files ship inside the scikit-image wheel; other ``skimage.data`` images are
# fetched with pooch on first use, which the experiments must never do.
BUNDLED_IMAGES = frozenset(
    {
        "astronaut",
        "brick",
        "camera",
        "cell",
        "chelsea",
        "clock",
        "coffee",
        "coins",
        "grass",
        "gravel",
        "hubble_deep_field",
        "immunohistochemistry",
        "moon",
        "page",
        "retina",
        "rocket",
        "text",
    }
)

# One train / held-out split for every experiment. Held-out images are never used for training.
TRAIN_RGB = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina")
HELD_OUT_RGB = ("coffee", "rocket")
TRAIN_GRAY = ("camera", "moon", "brick", "grass", "gravel", "clock", "cell", "page")
HELD_OUT_GRAY = ("coins", "text")

# Bundled images are 300-1400 px; shrinking them to this size puts more structure (edges,
# texture) into every small training patch and keeps CPU runs short.
DEFAULT_MAX_SIDE = 384


# --------------------------------------------------------------------------------------------
# Images and patches


@functools.cache
def load_image(
    name: str, *, gray: bool = False, max_side: int | None = DEFAULT_MAX_SIDE
) -> np.ndarray:
    """A bundled scikit-image image as float32 in ``[0, 1]`` (cached, so read-only).

    Args:
      name: one of :data:`BUNDLED_IMAGES`.
      gray: return luminance ``[height, width, 1]`` instead of RGB ``[height, width, 3]``
        (grayscale images are repeated over the three channels).
      max_side: shrink (with anti-aliasing) so that the longer side is at most this; ``None``
        keeps the original size.
    """
    if name not in BUNDLED_IMAGES:
        raise ValueError(
            f"{name!r} is not one of the images bundled with scikit-image: {sorted(BUNDLED_IMAGES)}"
        )
    img = util.img_as_float32(getattr(data, name)())
    if img.ndim == 2:
        img = img[..., None] if gray else np.repeat(img[..., None], 3, axis=-1)
    elif gray:
        img = color.rgb2gray(img)[..., None]
    if max_side is not None and max(img.shape[:2]) > max_side:
        scale = max_side / max(img.shape[:2])
        img = transform.rescale(img, scale, channel_axis=-1, anti_aliasing=True)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    img.setflags(write=False)  # cached and shared between callers
    return img


def load_images(names: Sequence[str], **kwargs: Any) -> list[np.ndarray]:
    """:func:`load_image` for several names."""
    return [load_image(n, **kwargs) for n in names]


def sample_patches(
    rng: np.random.Generator,
    images: Sequence[np.ndarray],
    count: int,
    size: int,
    *,
    flip: bool = True,
) -> np.ndarray:
    """``count`` random ``size x size`` crops ``[count, size, size, channels]``.

    Each crop picks an image with probability proportional to its area (so every pixel is
    equally likely), then a uniform position, then (with ``flip``) a random horizontal flip.
    """
    areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
    which = rng.choice(len(images), size=count, p=areas / areas.sum())
    out = np.empty((count, size, size, images[0].shape[-1]), np.float32)
    for k, i in enumerate(which):
        im = images[i]
        top = rng.integers(0, im.shape[0] - size + 1)
        left = rng.integers(0, im.shape[1] - size + 1)
        crop = im[top : top + size, left : left + size]
        out[k] = crop[:, ::-1] if flip and rng.random() < 0.5 else crop
    return out


def grid_patches(image: np.ndarray, size: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping ``size x size`` tiles of one image, row-major: a fixed evaluation set."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    tiles = [
        image[r * size : (r + 1) * size, c * size : (c + 1) * size]
        for r in range(rows)
        for c in range(cols)
    ]
    return np.stack(tiles[:limit])


def detailed_window(image: np.ndarray, size: int) -> tuple[slice, slice]:
    """The ``size x size`` window of ``image`` with the most edges (summed gradient magnitude):
    where a figure shows the most."""
    gray = image.mean(axis=-1)
    energy = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))
    summed = ndimage.uniform_filter(energy, size, mode="constant")
    half = size // 2
    inner = summed[half : image.shape[0] - size + half + 1, half : image.shape[1] - size + half + 1]
    i, j = np.unravel_index(np.argmax(inner), inner.shape)
    return slice(i, i + size), slice(j, j + size)


# --------------------------------------------------------------------------------------------
# Metrics and models


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean squared error over all elements."""
    return jnp.mean(jnp.square(a - b))


def psnr(estimate: np.ndarray | jax.Array, clean: np.ndarray | jax.Array) -> float:
    """PSNR in dB for images in ``[0, 1]``; the estimate is clipped to ``[0, 1]`` first, as a
    saved image would be."""
    err = np.mean(np.square(np.clip(np.asarray(estimate), 0, 1) - np.asarray(clean)))
    return float(10.0 * np.log10(1.0 / err))


def relative_error(estimate: np.ndarray | jax.Array, truth: np.ndarray | jax.Array) -> float:
    """``||estimate - truth|| / ||truth||`` (Frobenius norm over all elements)."""
    estimate, truth = np.asarray(estimate), np.asarray(truth)
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def delta_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Kernel initializer for ``[..., kh, kw, in, out]`` (HWIO, or per-location
    ``[h, w, kh, kw, in, out]``): the identity filter (1 at the centre tap from input ``c`` to
    output ``c``). The key is unused; the signature is Flax's."""
    del key
    kh, kw, cin, cout = shape[-4:]
    kernel = jnp.zeros((kh, kw, cin, cout), dtype)
    kernel = kernel.at[kh // 2, kw // 2].set(jnp.eye(cin, cout, dtype=dtype))
    return jnp.broadcast_to(kernel, tuple(shape))


# --------------------------------------------------------------------------------------------
# Training


@functools.cache
def _train_step(loss_fn: Callable[[Any, Any], jax.Array], learning_rate: float, steps: int):
    """The optimizer and its jitted update step; cached so that models trained with the same
    loss function and schedule share one compilation."""
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1))

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def train(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    sample_batch: Callable[[np.random.Generator], Any],
    *,
    steps: int,
    learning_rate: float,
    seed: int,
    desc: str,
) -> tuple[Any, np.ndarray]:
    """Minimise ``loss_fn(params, batch)`` with Adam and a cosine-decayed learning rate.

    Args:
      loss_fn: scalar loss of the parameters on one batch. Pass the same function object for
        models of the same structure to compile the update step once.
      params: the initial parameters (any pytree).
      sample_batch: draws one batch (a pytree of arrays) from a NumPy generator.
      steps: number of optimizer steps.
      learning_rate: peak learning rate; it decays to a tenth along a cosine.
      seed: seeds the batch generator, so runs are repeatable.
      desc: the progress bar's label.

    Returns:
      The trained parameters and the loss of every step ``[steps]``.
    """
    optimizer, step = _train_step(loss_fn, learning_rate, steps)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    losses = np.empty(steps, np.float64)
    with tqdm(range(steps), desc=desc, leave=False, mininterval=0.5) as bar:
        for i in bar:
            params, opt_state, loss = step(params, opt_state, sample_batch(rng))
            losses[i] = float(loss)
            if i % 20 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{losses[i]:.3g}")
    return params, losses


def final_loss(losses: np.ndarray, window: int = 20) -> float:
    """The mean of the last ``window`` per-step losses: less noisy than the very last one."""
    return float(np.mean(losses[-window:]))


# --------------------------------------------------------------------------------------------
# Figures


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> Path:
    """Write ``fig`` to ``out_dir / name`` (PNG) and close it."""
    path = out_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def show_image(ax: plt.Axes, image: np.ndarray | jax.Array, title: str, **kwargs: Any):
    """Draw an ``[h, w, 1|3]`` image in ``[0, 1]`` (or an ``[h, w]`` map with ``kwargs`` such as
    ``cmap``) without axes; returns the ``AxesImage`` for a colorbar."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image, kwargs = image[..., 0], {"cmap": "gray", "vmin": 0, "vmax": 1, **kwargs}
    elif image.ndim == 3:
        image = np.clip(image, 0, 1)
    handle = ax.imshow(image, **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return handle


def plot_losses(
    ax: plt.Axes,
    curves: dict[str, np.ndarray],
    *,
    smooth: int = 10,
    reference: dict[str, float] | None = None,
) -> None:
    """Training-loss curves on a log scale (a running mean over ``smooth`` steps), with
    optional horizontal reference levels."""
    for label, losses in curves.items():
        k = max(1, min(smooth, len(losses)))
        running = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(losses)), running, label=label)
    for label, level in (reference or {}).items():
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------------------------
# Output folder, results and the command line


def output_dir(name: str, *, quick: bool, out_dir: str | Path | None) -> Path:
    """Where an experiment writes: ``out_dir`` if given, else ``out/<name>`` for quick runs
    (git-ignored) and ``results/<name>`` for full ones (committed, shown in the README).
    Created if missing."""
    if out_dir is None:
        base = REPO_ROOT / "out" if quick else REPO_ROOT / "results"
        out_dir = base / name
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(value: Any) -> Any:
    """JSON-friendly copy: NumPy/JAX scalars and arrays to Python floats and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return _plain(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def finish(
    name: str,
    out_dir: Path,
    *,
    quick: bool,
    steps: int,
    started: float,
    config: dict[str, Any],
    metrics: dict[str, Any],
    summary: list[str],
    figures: Sequence[Path],
) -> dict[str, Any]:
    """Write ``results.json`` into ``out_dir`` and return the same record.

    Args:
      name: the experiment's module name.
      out_dir: its output folder.
      quick: whether this was a ``--quick`` run.
      steps: training steps per model.
      started: ``time.perf_counter()`` at the start of the run.
      config: the settings that produced the numbers (sizes, true parameters...).
      metrics: the numbers (floats, or lists of floats).
      summary: a few human-readable lines: what the numbers say.
      figures: the PNGs written.
    """
    record = {
        "experiment": name,
        "quick": quick,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "config": config,
        "metrics": metrics,
        "summary": summary,
        "figures": [p.name for p in figures],
    }
    record = _plain(record)
    (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def print_summary(record: dict[str, Any], out_dir: Path | None = None) -> None:
    """A one-screen summary of an experiment's record."""
    mode = "quick" if record["quick"] else "full"
    print(f"== {record['experiment']} ({mode}, {record['steps']} steps, {record['seconds']:.0f} s)")
    for line in record["summary"]:
        print(f"   {line}")
    if out_dir is not None:
        shown = out_dir.resolve()
        if shown.is_relative_to(Path.cwd()):
            shown = shown.relative_to(Path.cwd())
        print(f"   figures and results.json in {shown}/")


def main(run: Callable[..., dict[str, Any]], name: str, description: str) -> None:
    """The command line shared by the experiments:
    ``python -m experiments.<name> [--quick] [--steps N] [--out DIR] [--seed S]``."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small, fast settings (written to out/<name>/ by default)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per model (default: the mode's own)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: out/<name>/ quick, results/<name>/ full)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    out = output_dir(name, quick=args.quick, out_dir=args.out)
    record = run(quick=args.quick, steps=args.steps, out_dir=out, seed=args.seed)
    print_summary(record, out)
