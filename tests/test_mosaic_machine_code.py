"""The Mosaic GPU kernels compile to H100 (sm_90a) machine code with no register spills and
shared memory within the 227 KiB a block may use.

GPU interpret mode (tests/test_mosaic.py) checks what the kernels compute, not what ptxas makes
of them: a kernel that spills or asks for too much shared memory runs there and fails, or runs
slowly, only on a GPU. XLA's CUDA plugin compiles them without a GPU, for a described device;
:mod:`experiments.static.mosaic_machine_code` does that for the small cases (a strided, dilated
pixel filter in float32 and bfloat16, a rotated Gaussian: forward, forward mode, the Gaussian's
gradient in its parameters) and reads ptxas's reports. The compile needs ``JAX_PLATFORMS=cpu``
before JAX starts its backends, which this suite's process may have done already: it runs in a
child process. Needs the plugin (``make machine-code-mosaic`` installs it in .venv-mosaic) and
ptxas. The DESIGN shapes and the table: ``python -m experiments.static.mosaic_machine_code``
(results/mosaic-machine-code.md).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip(
    "jax_plugins.xla_cuda13",
    reason="compiling the Mosaic GPU kernels without a GPU needs XLA's CUDA plugin "
    "(jax-cuda13-plugin; `make machine-code-mosaic`)",
    exc_type=ImportError,
)

from experiments.static import mosaic_machine_code as mmc  # noqa: E402
from tests.conftest import run_bounded  # noqa: E402

# The kernels each small case's programs must contain.
EXPECTED_KERNELS = {
    "svconv_pixel_forward_mosaic",
    "svconv_pixel_forward_jvp_mosaic",
    "svconv_gaussian_forward_mosaic",
    "svconv_gaussian_forward_jvp_mosaic",
    "svconv_gaussian_grad_s_mosaic",
    "svconv_pixel_grad_x_mosaic",
    "svconv_pixel_grad_x_jvp_mosaic",
    "svconv_pixel_grad_k_mosaic",
    "svconv_gaussian_grad_x_mosaic",
    "svconv_gaussian_grad_x_jvp_mosaic",
    "svconv_modulated_forward_mosaic",
    "svconv_modulated_forward_jvp_mosaic",
    "svconv_modulated_grad_x_mosaic",
    "svconv_modulated_grad_w_mosaic",
    "svconv_modulated_grad_d_mosaic",
    "svconv_local_forward_mosaic",
    "svconv_local_forward_jvp_mosaic",
    "svconv_local_grad_w_mosaic",
}


def test_small_cases_compile_without_spills(tmp_path):
    out = tmp_path / "mosaic-machine-code.json"
    # As the module runs by itself: no GPU, and not this suite's XLA flags (which lower the
    # CPU backend's optimisation for speed).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", mmc.__name__, "--cases", "small", "--json-out", str(out)]
    status, output = run_bounded(command, timeout=600, env=env)
    if status == mmc.CANNOT_CHECK:
        pytest.skip(output.strip().splitlines()[-1])
    assert out.exists(), f"exit status {status}, no JSON written:\n{output[-4000:]}"
    data = json.loads(out.read_text())

    assert data["cases"] == [c.id for c in mmc.SMALL_CASES]
    assert not data["not_compiled"], data["not_compiled"]
    kernels = data["kernels"]
    assert {k["kernel"] for k in kernels} == EXPECTED_KERNELS
    for k in kernels:
        where = f"{k['kernel']} ({k['case']})"
        assert k["error"] is None, f"{where}: {k['error']}"
        assert k["registers"] > 0, f"{where}: no ptxas figures"
        assert (k["spill_stores"], k["spill_loads"]) == (0, 0), f"{where}: spills"
        assert k["shared"] <= mmc.SHARED_LIMIT, f"{where}: {k['shared']} bytes of shared memory"
    assert not data["problems"], data["problems"]
    assert status == 0, output[-4000:]
