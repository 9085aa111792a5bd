"""The PyTorch columns: :mod:`experiments.bench.torch_worker` in a subprocess, driven over
its JSON-lines protocol.

The worker runs in this interpreter's executable when torch is installed here (on the GPU
machines), else in ``.venv-torch/bin/python`` (``make bench`` creates it with a CPU build of
torch), or wherever ``--torch-python`` / ``SVCONV_TORCH_PYTHON`` point. A process of its own
either way: torch and JAX keep separate allocators and thread pools, and a crash in one leaves
the other's columns.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = "experiments.bench.torch_worker"


class TorchProxy:
    """One worker process; each method is one request and its reply."""

    def __init__(self, python: str, device: str, threads: int):
        # Idle OpenMP threads must sleep, not spin: they would steal the cores from JAX between
        # torch samples (and spinning barriers collapse on a loaded machine).
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        # As a module from the repository root (the packages on the way import nothing), so
        # that no file beside the worker can shadow a module torch imports.
        self.proc = subprocess.Popen(
            [python, "-m", WORKER, "--device", device, "--threads", str(threads)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _call(self, cmd: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise RuntimeError(f"the torch worker is gone (code {self.proc.poll()})") from e
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def info(self) -> dict:
        reply = self._call("info")
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def setup(self, cases: list[dict]) -> dict:
        return self._call("setup", cases=cases)

    def sample(self, case_id: str, column: str, mode: str, inner: int = 1) -> dict:
        return self._call("sample", case_id=case_id, column=column, mode=mode, inner=inner)

    def release(self, case_id: str):
        try:
            self._call("release", case_id=case_id)
        except RuntimeError:  # a dead worker has nothing left to free
            pass

    def close(self):
        try:
            self._call("quit")
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _interpreter(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("SVCONV_TORCH_PYTHON"):
        return os.environ["SVCONV_TORCH_PYTHON"]
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return str(ROOT / ".venv-torch" / "bin" / "python")


def start_torch(
    *, disabled: bool, python: str | None, device: str, threads: int
) -> tuple[TorchProxy | None, dict | str]:
    """``(proxy, the worker's info)`` or ``(None, why there are no torch columns)``."""
    if disabled:
        return None, "disabled with --no-torch"
    python = _interpreter(python)
    shown = os.path.relpath(python, ROOT) if Path(python).is_relative_to(ROOT) else python
    if not Path(python).exists():
        return None, (
            f"torch does not import here and {shown} does not exist "
            "(`make bench` creates .venv-torch with a CPU build of torch)"
        )
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if check.returncode:
        return None, f"torch does not import in {shown}: {check.stderr.strip()[-200:]}"
    proxy = TorchProxy(python, device, threads)
    try:
        return proxy, proxy.info()
    except RuntimeError as e:
        proxy.close()
        return None, f"the torch worker failed: {e}"


class TorchColumn:
    """One torch column of a case in one mode, sampled through the proxy."""

    def __init__(self, proxy: TorchProxy, case_id: str, column: str, mode: str):
        self.proxy, self.case_id, self.column, self.mode = proxy, case_id, column, mode
        self.peak_bytes = self.temp_bytes = None

    def _sample(self, inner: int) -> dict:
        res = self.proxy.sample(self.case_id, self.column, self.mode, inner)
        if "error" in res:
            raise RuntimeError(res["error"])
        return res

    def prepare(self):
        self._sample(1)

    def sample(self, inner: int) -> float:
        res = self._sample(inner)
        if res.get("peak_bytes") is not None:
            self.peak_bytes = max(self.peak_bytes or 0, res["peak_bytes"])
        return res["seconds"]
