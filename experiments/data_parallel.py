"""Data-parallel (and spatially parallel) training of an svconv network on a device mesh.

A small kernel-prediction denoiser (a guide convolution, ``svconv.KernelPredictionFilter`` and a
``svconv.ModulatedConv`` refinement) is trained three times from the same initial parameters on
the same batches: on one device; with the batch sharded over every device of the mesh and the
parameters replicated (data parallel); and with the batch sharded over 2 devices and the image
height over the rest (the svconv ops exchange only halo rows). The losses must agree to float32
rounding, and the compiled training step must gather no activation: the only collectives are
the gradient all-reduce (and, spatially, halo permutes).

On a CPU the mesh is 8 host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set
by ``python -m experiments.data_parallel`` before JAX starts); on GPUs it is every GPU.

Several processes (hosts): ``--processes N`` alone starts N processes of this experiment on this
machine's CPU, ``8 / N`` devices each, around a coordinator on the loopback address, with the CPU
collectives between processes over gloo. The meshes span the devices of every process; each
process draws the same batches and puts on its own devices their blocks of each. On N hosts, run
``--processes N --process-id I --coordinator HOST:PORT`` on host ``I`` (``HOST`` is host 0's).
The single-device run is repeated in every process; process 0 reports and writes the results.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import svconv
from experiments import common

NAME = "data_parallel"
CPU_DEVICES = 8
NOISE = 0.1
LEARNING_RATE = 3e-3
# Sharded and single-device losses differ only by float32 summation order.
LOSS_TOLERANCE = 1e-4


class Denoiser(nn.Module):
    """Guide features -> per-pixel 5x5 filters applied to the noisy image -> a modulated 3x3
    refinement whose per-pixel, per-tap modulation is predicted from the same guide."""

    features: int = 8
    kernel: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        guide = nn.relu(nn.Conv(self.features, (3, 3))(x))
        filtered = svconv.KernelPredictionFilter(kernel_size=self.kernel)(x, guide)
        d = nn.sigmoid(nn.Conv(9, (3, 3), name="modulation")(guide))
        d = d.reshape(*d.shape[:3], 3, 3)
        refine = svconv.ModulatedConv(
            features=x.shape[-1],
            kernel_size=3,
            use_bias=False,
            kernel_init=nn.initializers.zeros_init(),
        )
        return filtered + refine(filtered, d)


def _collectives(text: str) -> dict[str, int]:
    kinds = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")
    return {k: len(re.findall(rf" {k}(?:-start)?\(", text)) for k in kinds}


def _train(model: Denoiser, params, batches: np.ndarray, mesh, spec) -> tuple:
    """Adam on the MSE to the clean patches; the batch sharded by ``spec`` over ``mesh`` (or on
    one device when ``mesh`` is None), the parameters replicated. Returns the parameters, the
    loss per step and the compiled step's collectives."""
    optimizer = optax.adam(LEARNING_RATE)

    def step(params, opt_state, clean, noisy):
        def loss_fn(p):
            return jnp.mean(jnp.square(model.apply(p, noisy) - clean))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    if mesh is None:
        place = jax.device_put
    else:
        replicated, images = NamedSharding(mesh, P()), NamedSharding(mesh, spec)
        params, opt_state = jax.device_put((params, opt_state), replicated)

        def place(batch):
            # Every process holds the whole batch and gives each of its devices that device's
            # block; with several processes, no process can address the others' devices.
            return jax.make_array_from_callback(batch.shape, images, lambda index: batch[index])

    clean, noisy = place(batches[0, 0]), place(batches[0, 1])
    compiled = jax.jit(step).lower(params, opt_state, clean, noisy).compile()
    losses = np.empty(len(batches))
    for i, (clean, noisy) in enumerate(batches):
        params, opt_state, loss = compiled(params, opt_state, place(clean), place(noisy))
        losses[i] = float(loss)
    return params, losses, _collectives(compiled.as_text())


def run(
    *, quick: bool, steps: int | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> dict:
    """Train on one device, data parallel and spatially parallel; write the loss figure and
    ``results.json``; returns the record."""
    started = time.perf_counter()
    out = common.output_dir(NAME, quick=quick, out_dir=out_dir)
    size, batch = (32, 8) if quick else (64, 16)
    steps = steps if steps is not None else (30 if quick else 300)
    devices = jax.device_count()
    images = common.load_images(common.TRAIN_RGB)
    rng = np.random.default_rng(seed)
    batches = np.empty((steps, 2, batch, size, size, 3), np.float32)
    for i in range(steps):
        clean = common.sample_patches(rng, images, batch, size)
        batches[i] = clean, clean + NOISE * rng.standard_normal(clean.shape, np.float32)

    model = Denoiser()
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    rows = devices // 2 if devices % 2 == 0 and devices > 2 else 1
    runs = {
        "one device": (None, None),
        f"data parallel ({devices} devices)": (
            jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,)),
            P("data"),
        ),
        f"batch x height ({devices // rows} x {rows})": (
            jax.make_mesh(
                (devices // rows, rows), ("data", "rows"), axis_types=(AxisType.Auto,) * 2
            ),
            P("data", "rows"),
        ),
    }
    trained, curves, collectives = {}, {}, {}
    for label, (mesh, spec) in runs.items():
        trained[label], curves[label], collectives[label] = _train(
            model, params, batches, mesh, spec
        )
    single, parallel, spatial = runs
    scale = np.abs(curves[single])

    def loss_gap(label: str) -> float:
        return float(np.max(np.abs(curves[label] - curves[single]) / scale))

    def param_gap(label: str) -> float:
        # On the host: the sharded parameters may span processes, the others are on one device.
        diffs = jax.tree.map(
            lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
            trained[label],
            trained[single],
        )
        return max(jax.tree.leaves(diffs))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    common.plot_losses(ax, curves, smooth=1)
    ax.set_title("same loss on one device and sharded over the mesh", fontsize=9)
    figures = [common.save_figure(fig, out, "losses.png")]
    metrics = {
        "devices": devices,
        "processes": jax.process_count(),
        "loss_tolerance": LOSS_TOLERANCE,
        "initial_loss": curves[single][0],
        "final_loss_one_device": curves[single][-1],
        "final_loss_data_parallel": curves[parallel][-1],
        "final_loss_batch_x_height": curves[spatial][-1],
        "max_relative_loss_gap_data_parallel": loss_gap(parallel),
        "max_relative_loss_gap_batch_x_height": loss_gap(spatial),
        "max_param_gap_data_parallel": param_gap(parallel),
        "max_param_gap_batch_x_height": param_gap(spatial),
        "collectives_data_parallel": collectives[parallel],
        "collectives_batch_x_height": collectives[spatial],
    }
    matches = max(loss_gap(parallel), loss_gap(spatial)) <= LOSS_TOLERANCE
    summary = [
        f"losses {'match' if matches else 'DO NOT match'} one device's to {LOSS_TOLERANCE:g} "
        f"(relative) at every step",
        f"{devices} device(s) in {jax.process_count()} process(es); loss "
        f"{curves[single][0]:.4f} -> {curves[single][-1]:.4f} in {steps} steps on one device",
        f"{parallel}: largest relative loss gap {loss_gap(parallel):.1e}, parameter gap "
        f"{param_gap(parallel):.1e}; collectives {collectives[parallel]}",
        f"{spatial}: largest relative loss gap {loss_gap(spatial):.1e}, parameter gap "
        f"{param_gap(spatial):.1e}; collectives {collectives[spatial]}",
    ]
    config = {
        "frame": size,
        "batch": batch,
        "noise_std": NOISE,
        "learning_rate": LEARNING_RATE,
        "meshes": list(runs),
        "backend": jax.default_backend(),
        "train_images": common.TRAIN_RGB,
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


def _launch(processes: int, argv: list[str]) -> int:
    """Run this experiment with ``argv`` in ``processes`` processes on this machine's CPU, around
    a coordinator on a free loopback port; returns 0 when they all succeed. Process 0 reports and
    writes to the output folder, the others write to a scratch folder. When one fails, the others
    are stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={CPU_DEVICES // processes}")
    env = {
        **os.environ,
        "XLA_FLAGS": " ".join(flags),
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_BIND_ADDRESS": address,
    }
    command = [sys.executable, "-m", f"experiments.{NAME}", *argv]
    command += ["--processes", str(processes), "--coordinator", address]
    procs = []
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for i in range(processes):
                extra = ["--process-id", str(i)] + (["--out", f"{scratch}/{i}"] if i else [])
                procs.append(
                    subprocess.Popen(
                        command + extra, env=env, stdout=subprocess.DEVNULL if i else None
                    )
                )
            while None in (codes := [p.poll() for p in procs]) and not any(codes):
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    return 1 if any(p.returncode for p in procs) else 0


def _process_options() -> argparse.Namespace:
    """Parse (and remove from ``sys.argv``) the options for several processes; the others are
    :func:`common.main`'s."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", add_help=False)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--coordinator", default=None)
    options, sys.argv[1:] = parser.parse_known_args()
    if options.processes < 1:
        parser.error("--processes must be at least 1")
    if options.process_id is None and CPU_DEVICES % options.processes:
        parser.error(f"--processes must divide the {CPU_DEVICES} CPU devices")
    if options.process_id is not None and options.coordinator is None:
        parser.error("--process-id needs --coordinator HOST:PORT (the address of process 0)")
    return options


if __name__ == "__main__":
    options = _process_options()
    if options.processes > 1 and options.process_id is None:
        sys.exit(_launch(options.processes, sys.argv[1:]))
    # 8 host devices in all when there is no accelerator; must be set before JAX starts its
    # backend.
    flag = f"--xla_force_host_platform_device_count={max(1, CPU_DEVICES // options.processes)}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    description = (
        f"{__doc__.splitlines()[0]} Several processes: --processes N (on this machine's CPU), "
        "or --processes N --process-id I --coordinator HOST:PORT on each of N hosts."
    )
    if options.processes == 1:
        common.main(run, NAME, description)
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(options.coordinator, options.processes, options.process_id)
        try:
            common.main(run, NAME, description)
        finally:
            jax.distributed.shutdown()
