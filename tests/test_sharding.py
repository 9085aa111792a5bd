"""Every op and gradient on a mesh of 8 CPU devices, batch- and height-sharded, XLA and Pallas
(interpreted): same numbers as one device, outputs keep the inputs' shardings, and the compiled
HLO moves only halo rows. The checks are in :mod:`tests.sharding_checks` and run in one child
process, because the device count is fixed when JAX starts and this process has one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import sharding_checks

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(request) -> dict[str, dict]:
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_sharding" and hasattr(item, "callspec")
    ]
    # The 8 devices are forced host (CPU) devices: on a GPU machine JAX would otherwise pick the
    # GPU, a single device.
    env = {
        **os.environ,
        "XLA_FLAGS": sharding_checks.xla_flags(os.environ.get("XLA_FLAGS")),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_checks", *selected],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith(sharding_checks.MARK):
            record = json.loads(line[len(sharding_checks.MARK) :])
            found[record["name"]] = record
    if not found:
        pytest.fail(
            f"the sharding checks did not run (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return found


@pytest.mark.parametrize("name", sharding_checks.NAMES)
def test_sharding(results, name):
    assert name in results, f"{name} did not report"
    record = results[name]
    assert record["ok"], record.get("error")
