"""Compile time of one op, forward and value-and-gradient, in a process of its own.

``python -m experiments.bench.compile_time '<CompileCase as JSON>'`` warms the backend up, then
prints ``{"ready": true}``, ``{"fwd_s": ...}`` and ``{"grad_s": ...}``, one JSON line each:
:func:`measure` reads them with a limit per measurement, so that a compile that takes minutes
costs the benchmark only the limit (it is recorded as "at least the limit").
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.bench.cases import CompileCase

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 180  # importing JAX and starting the backend (a GPU's is slower)


def measure(cc: CompileCase, *, limit_s: float, startup_s: float = STARTUP_S) -> dict:
    """``fwd_s`` and ``grad_s`` of ``cc`` in a subprocess; a measurement over ``limit_s`` is
    stopped and recorded as ``limit_s`` with ``stopped`` naming it; ``error`` when the process
    failed or did not start in ``startup_s``."""
    cmd = [sys.executable, "-m", "experiments.bench.compile_time", json.dumps(cc.__dict__)]
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child never blocks
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=os.environ, stdout=subprocess.PIPE, stderr=errors, text=True
    )
    record: dict = {}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        for key, limit in (("ready", startup_s), ("fwd_s", limit_s), ("grad_s", limit_s)):
            deadline = time.monotonic() + limit
            line, ended = "", False
            while not line.endswith("\n"):
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break  # over the limit
                chunk = proc.stdout.readline()
                if not chunk:
                    ended = True
                    break
                line += chunk
            if line.endswith("\n"):
                record.update(json.loads(line))
            elif ended:  # the process failed
                proc.wait()
                errors.seek(0)
                err = errors.read().strip().splitlines() or [f"exit code {proc.returncode}"]
                record["error"] = f"failed: {err[-1]}"[:300]
                break
            elif key == "ready":
                record["error"] = f"the process did not start in {startup_s:g} s"
                break
            else:  # still compiling: stopped at the limit
                record[key] = limit_s
                record.setdefault("stopped", []).append(key)
                break
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        errors.close()
    record.pop("ready", None)
    return record


def main(spec: str) -> None:
    # Imported here: the parent (the benchmark) only needs measure().
    import jax

    from experiments.bench.columns import DIFF, loss_and_grad_fn, op_fn
    from experiments.bench.timing import compile_seconds

    cc = CompileCase(**json.loads(spec))
    case = cc.as_case()
    args = {
        k: jax.ShapeDtypeStruct(s, jax.numpy.dtype(case.dtype)) for k, s in case.shapes().items()
    }
    compile_seconds(lambda a: a["x"] + 1, (args,))  # the backend's own start-up, not the op's
    print(json.dumps({"ready": True}), flush=True)
    fwd = op_fn(case, None)  # the default implementation: Pallas on a GPU where it can
    print(json.dumps({"fwd_s": compile_seconds(fwd, (args,))}), flush=True)
    grad = loss_and_grad_fn(fwd, DIFF[cc.op])
    print(json.dumps({"grad_s": compile_seconds(grad, (args,))}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
