"""``python3 -m experiments.gpu_check [--dry-run] [--out DIR]``: see :mod:`experiments.gpu_check`.

Uses only the standard library itself (the stages import JAX, in their own processes), so a
broken JAX install is reported, not fatal. Exit status 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.gpu_check import installed_versions

ROOT = Path(__file__).resolve().parents[2]
# Seconds per stage on the GPU and in a dry run. The tests and the comparison run side by side,
# then the benchmark: 300 + 190 s, 9 minutes in all on an H100 with the start. The comparison and
# the benchmark stop starting new work a while before their limits, so that they write what
# they have.
LIMITS = {
    "gpu": {"pytest": 300, "compare": 300, "bench": 190},
    "dry": {"pytest": 120, "compare": 240, "bench": 240},
}
PYTEST_TIMEOUT = {"gpu": 120, "dry": 60}  # one test's limit, with pytest-timeout
# The dry run's comparison (the stage's plumbing; the kernels' own tests cover every op): a dot op
# with a per-image and one with a per-location kernel and a Gaussian, in float32, bfloat16 and
# float16 in turn.
DRY_RUN_OPS = ("modulated", "local", "gaussian")
WORKERS = 8


def _nvidia_smi() -> dict:
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi is not on the PATH"}
    fields = ("name", "driver_version", "memory.total")
    try:
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi: {e}"}
    if proc.returncode:
        return {"error": f"nvidia-smi exited {proc.returncode}: {proc.stderr.strip()[:300]}"}
    gpus = [
        dict(zip(fields, (v.strip() for v in line.split(",")), strict=False))
        for line in proc.stdout.strip().splitlines()
    ]
    return {"gpus": gpus}


def _env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    # pytest workers, the benchmark and torch share the GPU: no up-front reservation.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    return env


class _Stage:
    """One stage's process: its own process group, output to ``log``, killed at ``limit``."""

    def __init__(self, name: str, cmd: list[str], *, env, limit: float, log: Path):
        print(f"== {name}: {' '.join(cmd)} (limit {limit:g} s, log {log.name})", flush=True)
        self.name, self.cmd, self.limit, self.log = name, cmd, limit, log
        self.t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait(self) -> dict:
        remaining = max(0.0, self.limit - (time.perf_counter() - self.t0))
        try:
            rc = self.proc.wait(timeout=remaining)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        seconds = round(time.perf_counter() - self.t0, 1)
        print(f"   {self.name}: {status} in {seconds:g} s", flush=True)
        return {
            "name": self.name,
            "status": status,
            "returncode": rc,
            "seconds": seconds,
            "limit_s": self.limit,
            "command": " ".join(self.cmd),
            "log": self.log.name,
        }


def _probe(env) -> dict:
    """What JAX sees, from a process of its own."""
    code = (
        "import json, jax; d = jax.devices(); print(json.dumps({'backend': "
        "jax.default_backend(), 'devices': [x.device_kind for x in d], 'platform': "
        "d[0].platform}))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 300 s"}
    if proc.returncode:
        return {"error": proc.stderr.strip()[-1000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PYTEST_TOTALS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_PYTEST_LINE = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _pytest_details(log: Path) -> dict:
    """Counts from pytest's closing line, or from its per-test lines when it was stopped."""
    text = log.read_text(errors="replace")
    closing = [line for line in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    if closing:
        counts = {
            k.rstrip("s") if k.startswith("error") else k: int(n)
            for n, k in _PYTEST_TOTALS.findall(closing[-1])
        }
        source = "closing line"
    else:
        counts = {}
        for word in _PYTEST_LINE.findall(text):
            key = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(word, word.lower())
            counts[key] = counts.get(key, 0) + 1
        source = "per-test lines (no closing line)"
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    return {"counts": counts, "counted_from": source, "failed_tests": failed[:50]}


def _json_summary(path: Path, key: str) -> dict:
    try:
        return json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError) as e:
        return {"error": f"no {path.name}: {type(e).__name__}"}


def _bench_details(folder: Path, since: float) -> dict:
    """The report the stage wrote (a ``bench-*.json`` in ``folder`` modified after ``since``)."""
    reports = sorted(
        (p for p in folder.glob("bench-*.json") if p.stat().st_mtime >= since),
        key=lambda p: p.stat().st_mtime,
    )
    if not reports:
        return {"error": f"the benchmark wrote no bench-*.json into {folder.name}/"}
    report = json.loads(reports[-1].read_text())
    rows = report["targets"]
    return {
        "report": reports[-1].name,
        "cases": len(report["cases"]),
        "skipped_cases": report.get("skipped", {}),
        "targets_met": sum(r["met"] is True for r in rows),
        "targets_not_met": sum(r["met"] is False for r in rows),
        "targets_not_measured": sum(r["met"] is None and r["target"] is not None for r in rows),
        "not_met": [r["ratio"] for r in rows if r["met"] is False],
    }


def _markdown(summary: dict) -> str:
    lines = [
        f"# svconv GPU check{' (dry run on the CPU)' if summary['dry_run'] else ''}",
        "",
        f"* date: {summary['date']}",
        f"* result: **{summary['result']}** in {summary['seconds']:g} s",
    ]
    smi = summary["nvidia_smi"]
    for gpu in smi.get("gpus", []):
        lines.append(
            f"* GPU: {gpu.get('name')}, driver {gpu.get('driver_version')}, "
            f"{gpu.get('memory.total')}"
        )
    if "error" in smi:
        lines.append(f"* nvidia-smi: {smi['error']}")
    jax_sees = summary["jax"]
    lines.append(
        f"* JAX sees: {jax_sees.get('backend')} {jax_sees.get('devices')}"
        if "error" not in jax_sees
        else f"* JAX: {jax_sees['error'][-300:]}"
    )
    lines.append("* versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    lines += ["", "| stage | status | seconds (limit) | details |", "| --- | --- | --- | --- |"]
    for st in summary["stages"]:
        details = json.dumps(st.get("details", {}), separators=(", ", ": "))[:600]
        limit = st.get("limit_s")
        lines.append(
            f"| {st['name']} | {st['status']} | {st.get('seconds', 0):g}"
            + (f" ({limit:g})" if limit else "")
            + f" | {details} |"
        )
    lines += ["", "Logs: " + ", ".join(f"`{st['log']}`" for st in summary["stages"] if "log" in st)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m experiments.gpu_check",
        description="Tests, randomized comparison and benchmark on a GPU machine.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on the CPU: tiny shapes, the interpreter, a few tests, no torch, no results/",
    )
    parser.add_argument("--out", default=None, help="summary and logs (default out/gpu-check)")
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers")
    for stage in ("pytest", "compare", "bench"):
        parser.add_argument(
            f"--{stage}-limit", type=float, default=None, help=f"seconds for the {stage} stage"
        )
    args = parser.parse_args(argv)
    kind = "dry" if args.dry_run else "gpu"
    out = Path(args.out or ROOT / "out" / ("gpu-check-dry-run" if args.dry_run else "gpu-check"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out if args.dry_run else ROOT / "results"
    limits = {
        s: getattr(args, f"{s}_limit") or LIMITS[kind][s] for s in ("pytest", "compare", "bench")
    }
    started = time.perf_counter()
    env = _env(args.dry_run)
    py = sys.executable

    summary = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": args.dry_run,
        "python": platform.python_version(),
        "versions": {"python": platform.python_version()} | installed_versions(),
        "nvidia_smi": _nvidia_smi(),
    }
    print(f"svconv GPU check{' (dry run)' if args.dry_run else ''}; output in {out}")
    summary["jax"] = _probe(env)
    print(f"JAX sees: {summary['jax']}", flush=True)
    no_gpu = None
    if not args.dry_run and summary["jax"].get("backend") != "gpu":
        no_gpu = (
            f"JAX sees no GPU ({summary['jax']}): the kernels would run in the interpreter; "
            "use --dry-run on a machine without one"
        )

    # 1. The test suite, with the kernels compiled on the GPU.
    pytest_cmd = [py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        pytest_cmd += ["-n", str(args.workers or (1 if args.dry_run else WORKERS))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        pytest_cmd += [f"--timeout={PYTEST_TIMEOUT[kind]}"]
    if args.dry_run:  # a few fast tests: the stage's plumbing, not the suite
        pytest_cmd += ["tests/test_checks.py"]
    else:  # this script's own dry run is superseded by the real one
        pytest_cmd += ["tests", "--ignore=tests/test_gpu_check.py"]
    # 2. The randomized comparison.
    compare_cmd = [py, "-m", "experiments.gpu_check.compare", "--out", str(out / "compare.json")]
    compare_cmd += ["--time-limit", f"{0.75 * limits['compare']:g}"]
    if args.dry_run:
        compare_cmd += ["--tiny", "--problems", "1", "--rotate", "--ops", ",".join(DRY_RUN_OPS)]
    # 3. The benchmark.
    bench_cmd = [py, "-m", "experiments.bench", "--out", str(results)]
    bench_cmd += ["--time-limit", f"{limits['bench'] - 40:g}"]
    if args.dry_run:
        bench_cmd += ["--quick", "--no-torch"]

    def details(name: str, since: float) -> dict:
        if name == "pytest":
            return _pytest_details(out / "pytest.log")
        if name == "compare":
            return _json_summary(out / "compare.json", "summary")
        found = _bench_details(results, since)
        report = found.get("report")
        if report and results != out:  # a copy beside the logs, to take away in one folder
            for suffix in (".json", ".md"):
                shutil.copy((results / report).with_suffix(suffix), out)
        return found

    stages = []
    if no_gpu:
        stages = [
            {"name": n, "status": "not run", "details": {"why": no_gpu}} for n in LIMITS[kind]
        ]
    else:
        # The tests and the comparison share the machine (neither is timed); the benchmark
        # runs alone afterwards.
        for group in ((("pytest", pytest_cmd), ("compare", compare_cmd)), (("bench", bench_cmd),)):
            since = time.time()
            running = [
                _Stage(name, cmd, env=env, limit=limits[name], log=out / f"{name}.log")
                for name, cmd in group
            ]
            for stage in running:
                record = stage.wait()
                record["details"] = details(stage.name, since)
                stages.append(record)

    summary["stages"] = stages
    summary["seconds"] = round(time.perf_counter() - started, 1)
    ok = all(st["status"] == "passed" for st in stages)
    summary["result"] = (
        "passed"
        if ok
        else "failed: "
        + ", ".join(f"{st['name']} {st['status']}" for st in stages if st["status"] != "passed")
    )
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = _markdown(summary)
    (out / "gpu-check.md").write_text(md)
    print("\n" + md)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
