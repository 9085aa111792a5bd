"""Intensity-dependent Gaussian blur, and recovering its law by gradient descent.

Every pixel gets a Gaussian whose width depends on its own brightness,
``sigma(I) = s_max * sigmoid(k * (I - t))``: dark pixels stay sharp, bright ones spread (a
crude model of blooming). ``svconv.gaussian_filter2d`` applies them (the same filter to the three
colour channels) with the weights computed inside the kernels: no per-pixel weight array.

Then the inverse problem: from sharp/blurred pairs of other photos (with a little sensor noise),
recover ``(s_max, t, k)`` by gradient descent through the op (Adam on unconstrained parameters).

Last, an optics-style field-dependent point-spread function: elliptical Gaussians stretched
along the radius and rotating with the angle around the centre (radial astigmatism), applied to
a grid of point sources as a splat (``gaussian_splat2d``: each source spreads its own PSF, the
physical model) and as a filter (``gaussian_filter2d``: each output gathers with its own PSF).
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

NAME = "gaussian_blur"
TRUE_LAW = {"s_max": 2.5, "t": 0.55, "k": 12.0}
INITIAL_LAW = {"s_max": 1.0, "t": 0.3, "k": 4.0}
LEARNING_RATE = 0.05
NOISE = 0.01  # sensor noise on the blurred observations, so the fit is not an exact one
SHOWCASE = "astronaut"  # white suit and flag on a dark background: both ends of the law


def luminance(rgb: jax.Array) -> jax.Array:
    """Rec. 709 luma ``[..., 3] -> [...]``, the intensity the law reads."""
    return rgb @ jnp.array([0.2125, 0.7154, 0.0721], rgb.dtype)


def sigma_law(intensity: jax.Array, law: dict[str, jax.Array]) -> jax.Array:
    """``s_max * sigmoid(k * (I - t))``: the blur width in pixels for each intensity."""
    return law["s_max"] * jax.nn.sigmoid(law["k"] * (intensity - law["t"]))


def intensity_blur(image: jax.Array, law: dict[str, jax.Array], kernel: int) -> jax.Array:
    """Blur ``image [batch, h, w, 3]`` with per-pixel ``kernel x kernel`` Gaussians of width
    ``sigma_law``."""
    return svconv.gaussian_filter2d(image, sigma_law(luminance(image), law), kernel)


def radial_astigmatism(size: int, *, core: float = 0.7, stretch: float = 2.0):
    """Per-pixel ``(sigma_rows, sigma_cols), rho`` of ellipses whose long axis points away from
    the image centre and grows with the distance to it: ``Sigma = a^2 r r^T + b^2 t t^T`` for the
    radial and tangential unit vectors ``r``, ``t``, ``a = core + stretch * radius``, ``b =
    core``."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    norm = np.hypot(yy, xx)
    radius = norm / (size / 2)
    # Unit radial vector (any at the very centre, where the ellipse is a circle).
    ry = np.where(norm > 0, yy / np.maximum(norm, 1e-9), 1.0)
    rx = np.where(norm > 0, xx / np.maximum(norm, 1e-9), 0.0)
    a, b = core + stretch * radius, core
    var_rows = a**2 * ry**2 + b**2 * rx**2
    var_cols = a**2 * rx**2 + b**2 * ry**2
    cov = (a**2 - b**2) * ry * rx
    rho = cov / np.sqrt(var_rows * var_cols)
    as_batch = lambda v: jnp.asarray(v, jnp.float32)[None]  # noqa: E731
    return (as_batch(np.sqrt(var_rows)), as_batch(np.sqrt(var_cols))), as_batch(rho)


# Adam works on unconstrained numbers: s_max and k are positive, so they are learned as logs.
# Explicit float32: weakly typed scalars would change type after the first update and make
# the jitted step compile again.
def _to_raw(law: dict[str, float]) -> dict[str, jax.Array]:
    raw = {"log_s_max": np.log(law["s_max"]), "t": law["t"], "log_k": np.log(law["k"])}
    return {k: jnp.array(v, jnp.float32) for k, v in raw.items()}


def _from_raw(raw: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"s_max": jnp.exp(raw["log_s_max"]), "t": raw["t"], "k": jnp.exp(raw["log_k"])}


def _loss_fn(raw, batch, *, kernel):
    sharp, blurred = batch
    return common.mse(intensity_blur(sharp, _from_raw(raw), kernel), blurred)


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Blur the showcase image, recover the law, write figures and ``results.json``."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    # Full runs: 11x11 filters reach +-5 px, two sigmas at the largest sigma. Quick runs use
    # 7x7 (truncated, but the same for data and model): compile time grows with the taps.
    size, batch, kernel = (48, 4, 7) if quick else (96, 6, 11)
    steps = steps if steps is not None else (100 if quick else 250)
    true_law = {k: jnp.asarray(v) for k, v in TRUE_LAW.items()}

    # The showcase shows the forward op; the law is recovered from the other photos.
    showcase = jnp.asarray(common.load_image(SHOWCASE, max_side=192 if quick else 256))[None]
    blur = jax.jit(functools.partial(intensity_blur, kernel=kernel))
    shown = blur(showcase, true_law)

    names = tuple(n for n in common.TRAIN_RGB + common.TRAIN_GRAY if n != SHOWCASE)
    images = common.load_images(names)

    def sample_batch(rng: np.random.Generator):
        sharp = common.sample_patches(rng, images, batch, size)
        noise = NOISE * rng.standard_normal(sharp.shape, dtype=np.float32)
        return sharp, blur(sharp, true_law) + noise

    raw, losses = common.train(
        functools.partial(_loss_fn, kernel=kernel),
        _to_raw(INITIAL_LAW),
        sample_batch,
        steps=steps,
        learning_rate=LEARNING_RATE,
        seed=seed,
        desc="recover sigma law",
    )
    learned = {k: float(v) for k, v in _from_raw(raw).items()}
    errors = {k: abs(learned[k] - TRUE_LAW[k]) / abs(TRUE_LAW[k]) for k in TRUE_LAW}
    intensities = np.linspace(0, 1, 201)
    curve_error = float(
        np.max(
            np.abs(
                np.asarray(sigma_law(intensities, learned))
                - np.asarray(sigma_law(intensities, true_law))
            )
        )
    )

    psf_size = 96 if quick else 160
    points = np.zeros((1, psf_size, psf_size, 1), np.float32)
    step = psf_size // 8
    points[0, step // 2 :: step, step // 2 :: step, 0] = 1.0
    sigma, rho = radial_astigmatism(psf_size)
    psf_kernel = 15 if quick else 21
    splatted = svconv.gaussian_splat2d(jnp.asarray(points), sigma, psf_kernel, rho=rho)
    filtered = svconv.gaussian_filter2d(jnp.asarray(points), sigma, psf_kernel, rho=rho)
    figures = [
        _plot_showcase(out, showcase[0], shown[0], true_law),
        _plot_recovery(out, losses, learned, intensities),
        _plot_elliptical(out, points[0, ..., 0], splatted[0, ..., 0], filtered[0, ..., 0]),
    ]
    metrics = {
        "true": TRUE_LAW,
        "initial": INITIAL_LAW,
        "recovered": learned,
        "relative_error": errors,
        "max_sigma_error_px": curve_error,
        "initial_loss": float(losses[0]),
        "final_loss": common.final_loss(losses),
        # A splat conserves each source's energy (away from the borders); a filter need not.
        "psf_splat_energy": float(jnp.sum(splatted) / points.sum()),
        "psf_filter_energy": float(jnp.sum(filtered) / points.sum()),
    }
    fmt = ", ".join(f"{k} {learned[k]:.3f} (true {TRUE_LAW[k]:g})" for k in TRUE_LAW)
    summary = [
        f"recovered sigma = s_max*sigmoid(k*(I - t)): {fmt}",
        f"largest relative parameter error {max(errors.values()):.3%}; sigma(I) off by at most "
        f"{curve_error:.4f} px; loss {losses[0]:.1e} -> {common.final_loss(losses):.1e}",
    ]
    config = {
        "kernel": kernel,
        "patch": size,
        "batch": batch,
        "learning_rate": LEARNING_RATE,
        "noise_std": NOISE,
        "showcase_image": SHOWCASE,
        "train_images": names,
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


def _plot_showcase(out: Path, sharp: jax.Array, blurred: jax.Array, law) -> Path:
    """Input, sigma map and output, full frame on top and a zoom below."""
    sigma = np.asarray(sigma_law(luminance(sharp), law))
    h, w = sigma.shape
    # A zoom on the flag: white stripes (blurred) next to red ones and dark hair (sharp).
    rows, cols = slice(h // 8, h // 8 + h // 3), slice(0, w // 3)
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.6))
    for r, region in enumerate([(slice(None), slice(None)), (rows, cols)]):
        zoom = " (zoom)" if r else ""
        common.show_image(axes[r, 0], sharp[region], "input" + zoom)
        handle = common.show_image(
            axes[r, 1],
            sigma[region],
            "sigma(intensity) [px]" + zoom,
            cmap="viridis",
            vmin=0,
            vmax=TRUE_LAW["s_max"],
        )
        fig.colorbar(handle, ax=axes[r, 1], fraction=0.046)
        common.show_image(axes[r, 2], blurred[region], "output: per-pixel Gaussian" + zoom)
    axes[0, 0].add_patch(
        plt.Rectangle(
            (cols.start, rows.start),
            cols.stop - cols.start,
            rows.stop - rows.start,
            fill=False,
            edgecolor="yellow",
        )
    )
    fig.suptitle(
        "Intensity-dependent blur: gaussian_filter2d(x, sigma(I)) "
        "(dark pixels sharp, bright ones blurred)",
        fontsize=10,
    )
    fig.tight_layout()
    return common.save_figure(fig, out, "blur.png")


def _plot_recovery(
    out: Path, losses: np.ndarray, learned: dict[str, float], intensities: np.ndarray
) -> Path:
    """The loss, and the law before, after and true."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    common.plot_losses(axes[0], {"recovery loss": losses}, reference={"noise floor": NOISE**2})
    for label, law, style in [
        ("true", TRUE_LAW, "k-"),
        ("initial guess", INITIAL_LAW, "C1:"),
        ("recovered", learned, "C0--"),
    ]:
        text = ", ".join(f"{k}={v:.3g}" for k, v in law.items())
        axes[1].plot(intensities, sigma_law(intensities, law), style, label=f"{label}: {text}")
    axes[1].set_xlabel("pixel intensity I")
    axes[1].set_ylabel("sigma [px]")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[1].set_title("sigma(I) = s_max * sigmoid(k (I - t))", fontsize=9)
    fig.tight_layout()
    return common.save_figure(fig, out, "recovery.png")


def _plot_elliptical(out: Path, points: np.ndarray, splat: jax.Array, gather: jax.Array) -> Path:
    """Point sources, their splat and their filter under the rotating elliptical PSF."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    common.show_image(axes[0], points, "point sources", cmap="gray")
    for ax, image, title in [
        (axes[1], splat, "gaussian_splat2d: each source spreads its own PSF"),
        (axes[2], gather, "gaussian_filter2d: each output gathers with its own PSF"),
    ]:
        common.show_image(ax, np.asarray(image) ** 0.5, title + " (sqrt)", cmap="magma")
    fig.suptitle(
        "Field-dependent elliptical PSF (radial astigmatism): stretched along the radius, "
        "rotating around the centre",
        fontsize=10,
    )
    fig.tight_layout()
    return common.save_figure(fig, out, "elliptical_psf.png")


if __name__ == "__main__":
    common.main(run, NAME, __doc__.splitlines()[0])
