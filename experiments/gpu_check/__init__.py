"""``make gpu-check``: everything worth knowing from a machine with an NVIDIA GPU, in one command.

Three stages, each in its own process with a time limit, each recorded whatever the others do:

1. the test suite with the Pallas kernels compiled (``jax.default_backend() == "gpu"``: the
   kernel tests and the public ops compile them; never the interpreter);
2. :mod:`experiments.gpu_check.compare`: a randomized comparison of the compiled kernels and
   the XLA path with the reference, forward, ``jax.vjp`` and ``jax.jvp``, in every dtype;
3. the GPU benchmark (:mod:`experiments.bench`), written to ``results/bench-<device>.{md,json}``.

It writes a summary (device, driver, versions, each stage's status and duration) and every
stage's log into ``--out`` (default ``out/gpu-check/``). ``--dry-run`` runs the same script on a
CPU (tiny shapes, the interpreter, no torch; nothing written to ``results/``), as the test suite
does, so that it works the first time a GPU is there.
"""

from __future__ import annotations

import importlib.metadata

# Python packages whose versions the GPU check and the tile tuner record (distribution names).
PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "triton",
    "torch",
    "torchvision",
    "flax",
    "numpy",
    "pytest",
    "pytest-xdist",
    "pytest-timeout",
)


def installed_versions(packages=PACKAGES) -> dict[str, str]:
    """The version of each of ``packages`` that is installed (standard library only)."""
    versions = {}
    for dist in packages:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
