"""svconv across two JAX processes on this machine (a loopback coordinator, CPU collectives over
gloo, 4 CPU devices each, one global mesh of 8): batch- and batch x height-sharded gradients of
``modulated_conv2d`` and ``pixel_filter2d``, XLA and Pallas (interpreted), equal to one device's
and with no all-gather in the compiled HLO; and ``experiments.data_parallel --processes 2``. The
checks are in :mod:`tests.multiprocess_checks`; both processes run them once for the module.
Every run is bounded in time, and every process is gone (shut down, or killed at the limit)
before its results are read."""

import json
import sys
from pathlib import Path

import pytest

from tests import multiprocess_checks
from tests.conftest import run_bounded

REPO_ROOT = Path(__file__).resolve().parent.parent
# Each run takes 20-40 s on 2 CPU cores; the bound only stops a hung process.
TIMEOUT = 300


@pytest.fixture(scope="module")
def runs(request) -> list[tuple[int, str, str]]:
    """Each process's exit code, stdout and stderr."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_multiprocess" and hasattr(item, "callspec")
    ]
    return multiprocess_checks.launch(selected, cwd=REPO_ROOT, timeout=TIMEOUT)


def _report(runs: list[tuple[int, str, str]]) -> str:
    return "\n".join(
        f"process {i} (exit {code}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
        for i, (code, stdout, stderr) in enumerate(runs)
    )


@pytest.fixture(scope="module")
def results(runs) -> dict[str, list[dict]]:
    """Every check's records, one per process that reported it."""
    found: dict[str, list[dict]] = {}
    for _, stdout, _ in runs:
        for line in stdout.splitlines():
            if line.startswith(multiprocess_checks.MARK):
                record = json.loads(line[len(multiprocess_checks.MARK) :])
                found.setdefault(record["name"], []).append(record)
    if not found:
        pytest.fail(f"the checks did not run:\n{_report(runs)}")
    return found


@pytest.mark.parametrize("name", multiprocess_checks.NAMES)
def test_multiprocess(results, name):
    records = results.get(name, [])
    assert sorted(r["process"] for r in records) == list(range(multiprocess_checks.PROCESSES)), (
        f"{name} did not report from every process: {records}"
    )
    for record in records:
        assert record["ok"], f"process {record['process']}: {record.get('error')}"


def test_processes_shut_down(runs):
    # Exit 1 only says that a check failed (reported above); anything else is a crash, a wrong
    # device count or a process killed at the time limit.
    for code, stdout, _ in runs:
        assert code in (0, 1) and multiprocess_checks.SHUT_DOWN in stdout.splitlines(), (
            f"a process did not shut down cleanly:\n{_report(runs)}"
        )


def test_data_parallel_processes(tmp_path):
    for module in ("matplotlib", "skimage", "scipy", "tqdm"):
        pytest.importorskip(module, reason=f"the experiment needs {module} (`experiments` extra)")
    # The experiment as a user runs it: it starts its own 2 processes; a new session lets the
    # time limit stop them together with their launcher.
    command = [sys.executable, "-m", "experiments.data_parallel", "--quick", "--steps", "2"]
    command += ["--processes", "2", "--out", str(tmp_path)]
    returncode, output = run_bounded(command, TIMEOUT)
    assert returncode == 0, output[-6000:]
    assert output.count("== data_parallel") == 1, output[-6000:]  # process 0 reports

    record = json.loads((tmp_path / "results.json").read_text())
    metrics = record["metrics"]
    assert (metrics["processes"], metrics["devices"]) == (2, 8)
    for mesh in ("data_parallel", "batch_x_height"):
        assert metrics[f"max_relative_loss_gap_{mesh}"] <= metrics["loss_tolerance"]
        assert metrics[f"collectives_{mesh}"]["all-gather"] == 0
        assert metrics[f"collectives_{mesh}"]["all-reduce"] >= 1
    assert metrics["collectives_batch_x_height"]["collective-permute"] > 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(["results.json", *record["figures"]])  # nothing from process 1
