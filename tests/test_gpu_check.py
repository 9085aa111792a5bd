"""``make gpu-check``: its dry run end to end on the CPU (tiny shapes, the Pallas interpreter, no
torch), so that the command works the first time it runs on a GPU machine; and the parts that a
dry run does not reach (a stage over its time limit, a machine where JAX sees no GPU, reading
pytest's output)."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.gpu_check import __main__ as gpu_check
from experiments.gpu_check import compare
from tests.conftest import run_bounded

REPO_ROOT = Path(__file__).resolve().parent.parent
# The dry run takes about a minute on 2 idle CPU cores; the bound only stops a hung run.
TIMEOUT = 600


def _child_env() -> dict[str, str]:
    # The nested pytest must not take this run's xdist worker variables for its own.
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST_"))}


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu-check"
    results_before = sorted(p.name for p in (REPO_ROOT / "results").iterdir())
    if shutil.which("make"):
        cmd = [
            "make",
            "--no-print-directory",
            "gpu-check",
            "DRY_RUN=1",
            f"GPU_CHECK_PY={sys.executable}",
            f"GPU_CHECK_ARGS=--out {out}",
        ]
    else:
        cmd = [sys.executable, "-m", "experiments.gpu_check", "--dry-run", "--out", str(out)]
    returncode, stdout = run_bounded(cmd, TIMEOUT, env=_child_env())
    summary = json.loads((out / "gpu-check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    comparison = json.loads((out / "compare.json").read_text())
    # The comparison's verdicts are what the check reports, not what this test is about (the
    # kernels' own tests hold their tolerances): a numerical miss fails the check's exit status
    # and is listed, while everything else must pass.
    misses = [r for r in comparison["records"] if r["status"] == "fail"]
    assert returncode == (1 if misses else 0), stdout[-4000:]
    assert summary["result"] == ("failed: compare failed" if misses else "passed"), misses
    assert summary["dry_run"] and summary["jax"]["backend"] == "cpu" and summary["versions"]["jax"]
    assert [s["name"] for s in summary["stages"]] == ["pytest", "compare", "bench"]
    assert stages["pytest"]["status"] == stages["bench"]["status"] == "passed"
    assert stages["compare"]["status"] == ("failed" if misses else "passed")
    assert stages["pytest"]["details"]["counts"]["passed"] > 0
    assert "-n" in stages["pytest"]["command"].split()

    assert comparison["summary"]["error"] == 0 and not comparison["summary"]["stopped_early"]
    assert {r["op"] for r in comparison["records"] if "results" in r} == set(gpu_check.DRY_RUN_OPS)
    assert {r["impl"] for r in comparison["records"]} == {"pallas", "xla"}
    assert {r["variant"] for r in comparison["records"]} >= {"float32", "bfloat16", "float16"}
    for r in comparison["records"]:
        assert set(r["results"]) >= {"y", "dx", "jvp"}, r

    bench = json.loads((out / "bench-cpu.json").read_text())
    assert stages["bench"]["details"]["report"] == "bench-cpu.json"
    assert {c["op"] for c in bench["cases"]} == {
        "modulated",
        "pixel",
        "local",
        "gaussian",
        "deformable",
    }
    for case in bench["cases"]:
        assert "median_ms" in case["results"]["fwd"]["svconv xla"], case["id"]
    assert bench["compile"] and bench["targets"]
    assert (out / "bench-cpu.md").read_text().startswith("# svconv benchmark")
    for name in ("gpu-check.md", "pytest.log", "compare.log", "bench.log"):
        assert (out / name).stat().st_size > 0, name
    # A dry run leaves the committed results alone.
    assert sorted(p.name for p in (REPO_ROOT / "results").iterdir()) == results_before


def test_a_stage_over_its_limit_is_stopped_with_its_children(tmp_path):
    child = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    )
    t0 = time.perf_counter()
    stage = gpu_check._Stage(
        "sleep", [sys.executable, "-c", code], env=None, limit=3, log=tmp_path / "sleep.log"
    )
    record = stage.wait()
    assert record["status"] == "timeout" and record["returncode"] is None
    assert time.perf_counter() - t0 < 60
    stat = Path(f"/proc/{child.read_text()}/stat")
    for _ in range(50):  # gone, or a zombie waiting for whoever adopted it
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stage's child ({stat.parent.name}) outlived the stage")


def test_without_a_gpu_the_real_check_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_probe", lambda env: {"backend": "cpu", "devices": ["cpu"]})
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["not run"] * 3
    assert "JAX sees no GPU" in summary["stages"][0]["details"]["why"]
    assert summary["result"].startswith("failed")


def test_pytest_counts(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(
        "[gw0] [ 50%] PASSED tests/test_a.py::test_one\n"
        "[gw1] [100%] FAILED tests/test_a.py::test_two\n"
        "FAILED tests/test_a.py::test_two - AssertionError\n"
        "==== 1 failed, 1 passed, 2 skipped, 1 error in 3.21s ====\n"
    )
    details = gpu_check._pytest_details(log)
    assert details["counts"] == {"failed": 1, "passed": 1, "skipped": 2, "error": 1}
    assert details["failed_tests"] == ["tests/test_a.py::test_two"]
    log.write_text(  # stopped at the time limit: no closing line
        "[gw0] [ 50%] PASSED tests/test_a.py::test_one\n"
        "[gw1] [ 60%] SKIPPED tests/test_a.py::test_two\n"
    )
    details = gpu_check._pytest_details(log)
    assert details["counts"] == {"passed": 1, "skipped": 1}
    assert details["counted_from"].startswith("per-test lines")


def test_compare_tolerates_tf32_where_the_gpu_uses_it():
    # The GPU's float32 default (TF32 dots) takes the emulated-TF32 tolerance: exercised here on
    # the CPU, where the float32 dots are exact and pass it with room to spare.
    problem = compare.Problem("modulated", 1, 6, 7, 3, 2, (3, 3), (1, 1), (1, 1), "SAME")
    records = compare.compare_problem(problem, 0, [("float32", None)], "gpu", log=print)
    assert [r["impl"] for r in records] == ["pallas", "xla"]
    for r in records:
        assert r["status"] == "ok", r
        assert r["low_precision_reference"] == "reference on TF32-rounded inputs"
        assert r["results"]["y"]["tol"] > 10 * compare.FLOOR["float32"]


def test_random_problems_are_valid_and_varied():
    rng = np.random.default_rng(0)
    problems = [compare.draw_problem(rng, op, tiny=True) for op in compare.OPS for _ in range(8)]
    assert any(
        not isinstance(p.padding, str | int) and min(min(p.padding)) < 0 for p in problems
    ), "no negative padding drawn"
    assert any(p.groups and p.groups > 1 for p in problems)
    assert {p.stride for p in problems} > {(1, 1)} and {p.dilation for p in problems} > {(1, 1)}


def test_the_real_check_records_every_failing_stage(tmp_path, monkeypatch):
    # The GPU path's plumbing without a GPU: a repository root with nothing in it, so that
    # every stage fails at once, and the check still reports each one.
    monkeypatch.setattr(gpu_check, "_probe", lambda env: {"backend": "gpu", "devices": ["fake"]})
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    (tmp_path / "results").mkdir()
    limits = ["--pytest-limit", "120", "--compare-limit", "120", "--bench-limit", "120"]
    assert gpu_check.main(["--out", str(tmp_path / "out"), *limits]) == 1
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["status"] for s in summary["stages"]] == ["failed"] * 3
    pytest_cmd = stages["pytest"]["command"].split()
    assert "--ignore=tests/test_gpu_check.py" in pytest_cmd and "tests" in pytest_cmd
    assert "--dry-run" not in pytest_cmd and "--tiny" not in stages["compare"]["command"]
    assert "--quick" not in stages["bench"]["command"]
    assert "no bench-*.json" in stages["bench"]["details"]["error"]
    assert "error" in stages["compare"]["details"]
    assert (tmp_path / "out" / "gpu-check.md").read_text().count("| failed |") == 3
