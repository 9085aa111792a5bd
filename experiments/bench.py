"""Benchmark: svconv against plain convolution, patch formulations and PyTorch, side by side.

For every case it times, in one run and interleaved round by round, the svconv XLA path, the
Pallas kernels (on a GPU), the other XLA formulation (patch tensor + einsum, or
``lax.conv_general_dilated_local``), ``lax.conv_general_dilated`` on the same shape (the floor for
the modulated conv), the reference, PyTorch unfold + matmul/einsum and torchvision's
``deform_conv2d`` when they are available; forward, and forward+backward (the gradient of
``sum(y * g)`` for a random cotangent ``g`` with respect to every input). It then computes the
ratios of the design's performance targets and writes ``results/bench-<device>.{json,md}``.

Run ``make bench`` (or ``python -m experiments.bench``; ``--quick`` for a smoke test). PyTorch
runs in this interpreter when it imports here, else in ``.venv-torch/bin/python`` through
:mod:`experiments.bench_torch` as a subprocess; a missing column is reported with its reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

import svconv
from svconv import xla as svxla

ROOT = Path(__file__).resolve().parents[1]
NHWC = ("NHWC", "HWIO", "NHWC")
MODES = ("fwd", "fwd+bwd")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

# --------------------------------------------------------------------------------------- cases


def _case(op, n, h, w, cin, cout, k, dtype, modes=MODES):
    shape = f"N{n}-{h}x{w}-{cin}" + (f"to{cout}" if op != "pixel" else "") + f"-{k}x{k}"
    return {
        "id": f"{op}-{shape}-{dtype}",
        "op": op,
        "n": n,
        "h": h,
        "w": w,
        "cin": cin,
        "cout": cout,
        "kh": k,
        "kw": k,
        "dtype": dtype,
        "modes": list(modes),
    }


def make_cases(backend: str, quick: bool) -> list[dict]:
    """The design's cases: CPU-sized on the CPU, the GPU targets' shapes on a GPU."""
    if quick:
        return [
            _case("modulated", 2, 32, 32, 8, 8, 3, "float32"),
            _case("pixel", 2, 32, 32, 8, 8, 7, "float32"),
            _case("local", 2, 16, 16, 4, 4, 3, "float32"),
        ]
    if backend == "gpu":
        return [
            _case("modulated", 8, 128, 128, 64, 64, 3, "float32"),
            _case("modulated", 8, 128, 128, 64, 64, 3, "bfloat16"),
            _case("pixel", 8, 256, 256, 64, 64, 7, "float32"),
            _case("pixel", 8, 256, 256, 64, 64, 15, "float32"),
            _case("local", 8, 128, 128, 32, 32, 3, "float32"),
        ]
    return [
        _case("modulated", 4, 128, 128, 32, 32, 3, "float32"),
        _case("pixel", 4, 128, 128, 32, 32, 7, "float32"),
        _case("local", 4, 64, 64, 16, 16, 3, "float32"),
    ]


def _taps(c):
    return c["kh"] * c["kw"]


def case_flops(c) -> int:
    """Multiply-adds x 2 of the forward pass (a dense conv's count for the modulated op)."""
    per_pixel = {
        "modulated": c["cin"] * c["cout"],
        "local": c["cin"] * c["cout"],
        "pixel": c["cin"],
    }[c["op"]]
    return 2 * c["n"] * c["h"] * c["w"] * _taps(c) * per_pixel


def case_bytes(c, mode: str) -> int:
    """Fewest bytes: each input read once, each output written once (forward: inputs -> y;
    forward+backward: inputs and the cotangent -> y and every gradient)."""
    n, h, w, cin, cout, t = c["n"], c["h"], c["w"], c["cin"], c["cout"], _taps(c)
    x, y = n * h * w * cin, n * h * w * (cout if c["op"] != "pixel" else cin)
    params = {
        "modulated": t * cin * cout + n * h * w * t,
        "pixel": n * h * w * t,
        "local": h * w * t * cin * cout,
    }[c["op"]]
    elems = x + params + y if mode == "fwd" else 2 * (x + params + y)
    return elems * ITEMSIZE[c["dtype"]]


def patch_bytes(c) -> int:
    """Size of the ``kh*kw``-times patch tensor that the patch formulations build."""
    return c["n"] * c["h"] * c["w"] * c["cin"] * _taps(c) * ITEMSIZE[c["dtype"]]


# --------------------------------------------------------------------------- JAX columns


def make_inputs(c) -> dict[str, jax.Array]:
    """Fresh random inputs (never zeros), seeded by the case id."""
    keys = jax.random.split(jax.random.key(zlib.crc32(c["id"].encode())), 4)
    dt = jnp.dtype(c["dtype"])
    n, h, w, cin, cout, kh, kw = (c[k] for k in ("n", "h", "w", "cin", "cout", "kh", "kw"))
    fan_in = cin * kh * kw
    x = jax.random.normal(keys[0], (n, h, w, cin), dt)
    if c["op"] == "modulated":
        return {
            "x": x,
            "w": jax.random.normal(keys[1], (kh, kw, cin, cout), dt) / fan_in**0.5,
            "d": jax.random.uniform(keys[2], (n, h, w, kh, kw), dt, 0.5, 1.5),
            "g": jax.random.normal(keys[3], (n, h, w, cout), dt),
        }
    if c["op"] == "pixel":
        return {
            "x": x,
            "k": jax.random.uniform(keys[1], (n, h, w, kh, kw), dt, 0.5, 1.5) / (kh * kw),
            "g": jax.random.normal(keys[3], (n, h, w, cin), dt),
        }
    return {
        "x": x,
        "w": jax.random.normal(keys[1], (h, w, kh, kw, cin, cout), dt) / fan_in**0.5,
        "g": jax.random.normal(keys[3], (n, h, w, cout), dt),
    }


def _geometry(c) -> dict:
    ph, pw = (c["kh"] - 1) // 2, (c["kw"] - 1) // 2
    return {"stride": (1, 1), "dilation": (1, 1), "padding": ((ph, ph), (pw, pw))}


def jax_columns(c, backend: str, patch_limit: int) -> tuple[dict, dict[str, str]]:
    """``{column: (forward(inputs) -> y, names of the differentiated inputs)}`` and, for the
    columns left out, why."""
    op, geo, ks = c["op"], _geometry(c), (c["kh"], c["kw"])
    cols, missing = {}, {}
    if op == "modulated":

        def svc(impl):
            return lambda a: svconv.modulated_conv2d(a["x"], a["w"], a["d"], impl=impl)

        diff = ("x", "w", "d")
        cols["svconv xla"] = (svc("xla"), diff)
        cols["svconv pallas"] = (svc("pallas"), diff)
        cols["xla patches"] = (
            lambda a: svxla.modulated_conv2d_patches(a["x"], a["w"], a["d"], **geo),
            diff,
        )
        cols["lax conv"] = (
            lambda a: lax.conv_general_dilated(
                a["x"], a["w"], (1, 1), "SAME", dimension_numbers=NHWC
            ),
            ("x", "w"),
        )
        cols["reference"] = (svc("reference"), diff)
    elif op == "pixel":

        def svc(impl):
            return lambda a: svconv.pixel_filter2d(a["x"], a["k"], impl=impl)

        diff = ("x", "k")
        cols["svconv xla"] = (svc("xla"), diff)
        cols["svconv pallas"] = (svc("pallas"), diff)
        cols["xla patches"] = (
            lambda a: svxla.pixel_gather_patches(a["x"], a["k"][..., None], **geo),
            diff,
        )
        cols["reference"] = (svc("reference"), diff)
    else:

        def svc(impl):
            return lambda a: svconv.local_conv2d(a["x"], a["w"], impl=impl)

        diff = ("x", "w")

        def lax_local(a):
            # ConvLocal's weight layout [Ho, Wo, Cin*kh*kw (ordered (c, m, n)), Cout]; the
            # relayout is part of the timed function but fuses into the patch einsum.
            w = a["w"]
            w = w.transpose(0, 1, 4, 2, 3, 5).reshape(*w.shape[:2], -1, w.shape[-1])
            return lax.conv_general_dilated_local(
                a["x"], w, (1, 1), "SAME", ks, dimension_numbers=NHWC
            )

        cols["svconv xla"] = (svc("xla"), diff)
        cols["svconv pallas"] = (svc("pallas"), diff)
        cols["lax local"] = (lax_local, diff)
        cols["reference"] = (svc("reference"), diff)
    if backend != "gpu":
        cols.pop("svconv pallas")
        missing["svconv pallas"] = "no GPU (off a GPU, Pallas runs only in its slow interpreter)"
    patch_col = "lax local" if op == "local" else "xla patches"
    if patch_bytes(c) > patch_limit:
        cols.pop(patch_col)
        missing[patch_col] = (
            f"its patch tensor ({patch_bytes(c) / 2**30:.1f} GiB) exceeds the "
            f"memory budget ({patch_limit / 2**30:.1f} GiB)"
        )
    return cols, missing


def _fwd_bwd_fn(fwd, names):
    """The forward output and the VJP with cotangent ``g`` for every input in ``names``; ``y``
    is returned so that the forward pass cannot be dropped as dead code (the gradients of a
    multilinear op do not need it)."""

    def run(a):
        rest = {k: v for k, v in a.items() if k not in names}
        y, vjp = jax.vjp(lambda diff: fwd({**diff, **rest}), {k: a[k] for k in names})
        return y, vjp(a["g"].astype(y.dtype))

    return run


class JaxColumn:
    """One jitted function of a case; compiled on first use; samples seconds per call."""

    def __init__(self, fn, inputs, block_each: bool, mem_limit: int):
        self.fn, self.inputs, self.block_each = jax.jit(fn), inputs, block_each
        self.mem_limit, self.peak_bytes = mem_limit, None

    def prepare(self):
        compiled = self.fn.lower(self.inputs).compile()
        try:
            mem = compiled.memory_analysis()
            self.peak_bytes = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
        except Exception:  # not every backend reports it
            self.peak_bytes = None
        if self.peak_bytes is not None and self.peak_bytes > self.mem_limit:
            raise MemoryError(
                f"skipped: XLA plans {self.peak_bytes / 2**30:.1f} GiB of buffers, "
                f"over the {self.mem_limit / 2**30:.1f} GiB budget"
            )
        t0 = time.perf_counter()
        jax.block_until_ready(self.fn(self.inputs))
        if time.perf_counter() - t0 < 1.0:  # a slow call needs no second warm-up
            jax.block_until_ready(self.fn(self.inputs))

    def sample(self, inner: int) -> dict:
        t0 = time.perf_counter()
        if self.block_each:
            for _ in range(inner):
                jax.block_until_ready(self.fn(self.inputs))
        else:  # one in-order stream: blocking on the last call waits for all of them
            out = None
            for _ in range(inner):
                out = self.fn(self.inputs)
            jax.block_until_ready(out)
        return {"seconds": (time.perf_counter() - t0) / inner}


# -------------------------------------------------------------------------- torch columns


class TorchProxy:
    """:class:`experiments.bench_torch.TorchRunner` in a subprocess (another interpreter)."""

    def __init__(self, python: str, threads: int):
        script = str(Path(__file__).with_name("bench_torch.py"))
        # Idle OpenMP threads must sleep, not spin: they would steal the cores from JAX between
        # torch samples (and spinning barriers collapse on a loaded machine).
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        self.proc = subprocess.Popen(
            [python, script, "--serve", "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _call(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch subprocess exited (code {self.proc.poll()})")
        return json.loads(line)

    def info(self):
        return self._call("info")

    def setup(self, cases):
        return self._call("setup", cases=cases)

    def sample(self, case_id, column, mode, inner=1):
        return self._call("sample", case_id=case_id, column=column, mode=mode, inner=inner)

    def release(self, case_id):
        self._call("release", case_id=case_id)

    def close(self):
        try:
            self._call("quit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=30)


def torch_runner(args, backend: str):
    """``(runner, None)`` or ``(None, why there are no torch columns)``."""
    if args.no_torch:
        return None, "disabled with --no-torch"
    threads = os.cpu_count() or 1
    try:
        import torch  # noqa: F401
    except ImportError:
        python = (
            args.torch_python
            or os.environ.get("SVCONV_TORCH_PYTHON")
            or str(ROOT / ".venv-torch" / "bin" / "python")
        )
        shown = os.path.relpath(python, ROOT) if Path(python).is_relative_to(ROOT) else python
        if not Path(python).exists():
            return None, (
                f"torch does not import here and {shown} does not exist "
                "(`make bench` creates .venv-torch with a CPU build of torch)"
            )
        check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
        if check.returncode:
            return None, f"torch does not import in {shown}: {check.stderr.strip()[-200:]}"
        try:
            proxy = TorchProxy(python, threads)
            proxy.info()
            return proxy, None
        except (RuntimeError, OSError) as e:
            return None, f"the torch subprocess failed: {e}"
    from experiments.bench_torch import TorchRunner

    device = "cuda" if backend == "gpu" else "cpu"
    try:
        return TorchRunner(device=device, threads=threads), None
    except RuntimeError as e:
        return None, f"torch cannot use the {device}: {e}"


class TorchColumn:
    def __init__(self, runner, case_id, column, mode):
        self.runner, self.case_id, self.column, self.mode = runner, case_id, column, mode
        self.peak_bytes = None

    def prepare(self):
        res = self.runner.sample(self.case_id, self.column, self.mode, 1)
        if "error" in res:
            raise RuntimeError(res["error"])

    def sample(self, inner: int) -> dict:
        res = self.runner.sample(self.case_id, self.column, self.mode, inner)
        if "error" in res:
            raise RuntimeError(res["error"])
        if res.get("peak_bytes") is not None:
            self.peak_bytes = max(self.peak_bytes or 0, res["peak_bytes"])
        return res


# ------------------------------------------------------------------------------- timing


def time_interleaved(
    columns: dict, *, rounds: int, min_sample_s: float, budget_s: float, log
) -> dict:
    """Round-robin sampling (rotating the order each round) so that drifting machine load hits
    every column alike. A column stops early once it has used ``budget_s`` (>= 3 samples)."""
    stats, live, inner, spent, samples = {}, [], {}, {}, {}
    for name, col in columns.items():
        try:
            col.prepare()
            t1 = col.sample(1)["seconds"]
        except MemoryError as e:
            stats[name] = {"missing": str(e)}
            log(f"    {name}: {e}")
            continue
        except Exception as e:  # out of memory, unsupported case, ...
            stats[name] = {"missing": f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"[:300]}
            log(f"    {name}: {stats[name]['missing']}")
            continue
        inner[name] = max(1, min(100, math.ceil(min_sample_s / max(t1, 1e-7))))
        live.append(name)
        # A single call long enough for a sample of its own counts as the first sample.
        spent[name], samples[name] = t1, [t1] if inner[name] == 1 else []
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for name in order:
            if len(samples[name]) >= 3 and spent[name] > budget_s:
                continue
            s = columns[name].sample(inner[name])["seconds"]
            samples[name].append(s)
            spent[name] += s * inner[name]
    for name in live:
        xs = sorted(samples[name])
        q = np.percentile(xs, [25, 75])
        stats[name] = {
            "median_ms": 1e3 * statistics.median(xs),
            "min_ms": 1e3 * xs[0],
            "iqr_ms": 1e3 * float(q[1] - q[0]),
            "samples": len(xs),
            "calls_per_sample": inner[name],
        }
        if columns[name].peak_bytes is not None:
            stats[name]["peak_mib"] = columns[name].peak_bytes / 2**20
    return stats


def stream_bandwidth(backend: str, rounds: int) -> dict:
    """Device bandwidth of an in-place ``x = x + 1`` (read + write; the buffer is donated, so no
    fresh allocation is timed), the memory-bound ops' ceiling."""
    nbytes = 2**30 if backend == "gpu" else 2**27
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = step(jax.random.normal(jax.random.key(1), (nbytes // 4,), jnp.float32))
    x = step(x).block_until_ready()
    inner = 20 if backend == "gpu" else 3
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            x = step(x)
        x.block_until_ready()
        times.append((time.perf_counter() - t0) / inner)
    ms = 1e3 * statistics.median(times)
    return {"median_ms": ms, "bytes": 2 * nbytes, "gb_per_s": 2 * nbytes / (ms * 1e-3) / 1e9}


# ---------------------------------------------------------------------------- the report


def fast_column(case_stats: dict) -> str:
    """The column the targets are about: Pallas where it ran, else the XLA path."""
    return "svconv pallas" if "median_ms" in case_stats.get("svconv pallas", {}) else "svconv xla"


def _ms(case, mode, col, stat="median_ms"):
    return case["results"].get(mode, {}).get(col, {}).get(stat)


def compute_ratios(
    cases: list[dict], backend: str, stream: dict, quick: bool, stat: str = "median_ms"
) -> list[dict]:
    """The design's target ratios (and a few informational ones) from this run's medians (or
    another statistic of the samples, ``stat``)."""
    gpu = backend == "gpu"
    out = []

    def get(case, mode, col):
        return _ms(case, mode, col, stat)

    def add(name, num, den, target, kind, note=""):
        if quick:  # the targets are for the design's shapes, not the smoke test's
            kind, note = None, "quick shapes, no target"
        value = None if num is None or den is None else num / den
        met = None
        if value is not None and kind is not None:
            met = value <= target if kind == "<=" else value >= target
        out.append(
            {
                "ratio": name,
                "value": value,
                "target": None if kind is None else f"{kind} {target:g}",
                "met": met,
                "note": "a column is missing" if value is None else note,
            }
        )

    for c in cases:
        cid = c["id"]
        fast = fast_column(c["results"].get("fwd", {}))
        tag = "pallas" if fast == "svconv pallas" else "xla"
        if c["op"] == "modulated":
            add(
                f"{cid}: fwd, svconv {tag} / lax conv",
                get(c, "fwd", fast),
                get(c, "fwd", "lax conv"),
                1.25 if gpu else 4,
                "<=",
            )
            add(
                f"{cid}: fwd+bwd, svconv {tag} / lax conv",
                get(c, "fwd+bwd", fast),
                get(c, "fwd+bwd", "lax conv"),
                1.6 if gpu else 6,
                "<=",
            )
            for mode in MODES:
                add(
                    f"{cid}: {mode}, torch unfold / svconv {tag}",
                    get(c, mode, "torch unfold"),
                    get(c, mode, fast),
                    5 if gpu else 2.5,
                    ">=" if (gpu or mode == "fwd") else None,
                )
            if gpu:
                for mode in MODES:
                    add(
                        f"{cid}: {mode}, deform_conv2d / svconv {tag}",
                        get(c, mode, "deform_conv2d"),
                        get(c, mode, fast),
                        5,
                        ">=",
                    )
            for mode in MODES:
                add(
                    f"{cid}: {mode}, xla patches / svconv {tag}",
                    get(c, mode, "xla patches"),
                    get(c, mode, fast),
                    10 if gpu else 1,
                    ">=",
                    "" if gpu else "the XLA path should be the fastest XLA formulation",
                )
        elif c["op"] == "pixel":
            if c["kh"] == 7 and not gpu:
                add(
                    f"{cid}: fwd, torch unfold / svconv {tag}",
                    get(c, "fwd", "torch unfold"),
                    get(c, "fwd", fast),
                    50,
                    ">=",
                )
                add(
                    f"{cid}: fwd+bwd, torch unfold / svconv {tag}",
                    get(c, "fwd+bwd", "torch unfold"),
                    get(c, "fwd+bwd", fast),
                    50,
                    None,
                )
            for mode in MODES:
                add(
                    f"{cid}: {mode}, xla patches / svconv {tag}",
                    get(c, mode, "xla patches"),
                    get(c, mode, fast),
                    1,
                    ">=",
                    "the XLA path should be the fastest XLA formulation",
                )
        else:
            for mode in MODES:
                add(
                    f"{cid}: {mode}, lax local / svconv {tag}",
                    get(c, mode, "lax local"),
                    get(c, mode, fast),
                    1,
                    ">=",
                    "the XLA path should be the fastest XLA formulation",
                )
        if c["op"] in ("pixel", "local") and stream.get("gb_per_s"):
            ms = get(c, "fwd", fast)
            gbs = None if ms is None else case_bytes(c, "fwd") / (ms * 1e-3) / 1e9
            add(
                f"{cid}: fwd, svconv {tag} GB/s / stream GB/s",
                gbs,
                stream["gb_per_s"],
                0.7,
                ">=" if gpu else None,
            )
    return out


def _rate(c, mode, ms):
    if ms is None:
        return ""
    if c["op"] == "modulated":
        flops = case_flops(c) * (1 if mode == "fwd" else 3)
        return f"{flops / (ms * 1e-3) / 1e12:.3g} TFLOP/s"
    return f"{case_bytes(c, mode) / (ms * 1e-3) / 1e9:.3g} GB/s"


def _cell(st):
    if st is None:
        return "—"
    if "missing" in st:
        return "skipped" if st["missing"].startswith("skipped") else "failed"
    spread = 100 * st["iqr_ms"] / 2 / st["median_ms"]
    return f"{st['median_ms']:.3g} (±{spread:.0f}%)"


def _shape(c):
    base = f"x [{c['n']}, {c['h']}, {c['w']}, {c['cin']}]"
    if c["op"] == "modulated":
        return (
            f"{base}, w [{c['kh']}, {c['kw']}, {c['cin']}, {c['cout']}], "
            f"d [{c['n']}, {c['h']}, {c['w']}, {c['kh']}, {c['kw']}]"
        )
    if c["op"] == "pixel":
        return f"{base}, k [{c['n']}, {c['h']}, {c['w']}, {c['kh']}, {c['kw']}]"
    return f"{base}, w [{c['h']}, {c['w']}, {c['kh']}, {c['kw']}, {c['cin']}, {c['cout']}]"


_RATE_NOTE = {
    "modulated": "TFLOP/s (forward+backward counted as 3 convs)",
    "pixel": "GB/s, each input read once and each output written once",
    "local": "GB/s, each input read once and each output written once",
}
_OP_NAME = {"modulated": "modulated_conv2d", "pixel": "pixel_filter2d", "local": "local_conv2d"}


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# svconv benchmark — {meta['device']}", ""]
    lines += [
        f"* date: {meta['date']}",
        f"* machine: {meta['machine']}",
        f"* versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"* timing: {meta['timing']}",
        f"* torch: {meta['torch']}",
        "",
    ]
    if report.get("stream"):
        s = report["stream"]
        lines += [
            f"Stream bandwidth (in-place `x = x + 1`, float32, {s['bytes'] / 2**20:.0f} MiB "
            f"moved): "
            f"**{s['gb_per_s']:.3g} GB/s** ({s['median_ms']:.3g} ms).",
            "",
        ]
    for c in report["cases"]:
        lines += [
            f"## {_OP_NAME[c['op']]} {c['kh']}x{c['kw']}, {c['dtype']}",
            "",
            f"`{c['id']}`: {_shape(c)}; stride 1, SAME padding. Rate: {_RATE_NOTE[c['op']]}.",
            "",
        ]
        cols = []
        for mode in c["modes"]:
            cols += [k for k in c["results"].get(mode, {}) if k not in cols]
        lines.append(
            "| implementation | "
            + " | ".join(f"{m} ms | {m} rate" for m in c["modes"])
            + " | peak MiB (fwd / fwd+bwd) |"
        )
        lines.append("| --- " * (1 + 2 * len(c["modes"]) + 1) + "|")
        for col in cols:
            row = [col]
            peaks = []
            for mode in c["modes"]:
                st = c["results"].get(mode, {}).get(col)
                row += [_cell(st), _rate(c, mode, _ms(c, mode, col))]
                peaks.append(f"{st['peak_mib']:.0f}" if st and "peak_mib" in st else "–")
            lines.append("| " + " | ".join(row + [" / ".join(peaks)]) + " |")
        for col, why in c["missing"].items():
            lines.append(f"\n* no `{col}`: {why}")
        fails = [
            (m, col, st["missing"])
            for m in c["modes"]
            for col, st in c["results"].get(m, {}).items()
            if "missing" in st
        ]
        for m, col, why in fails:
            lines.append(f"\n* `{col}` {m} {why}")
        lines.append("")
    lines += [
        "## Targets (ratios of medians from this run)",
        "",
        "`met` judges the ratio of medians; the ratio of the fastest samples is shown beside it.",
        "",
        "| ratio | value | from minima | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["ratios"]:
        value, vmin = (
            "—" if v is None else f"{v:.3g}" for v in (r["value"], r.get("value_from_minima"))
        )
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['ratio']}{note} | {value} | {vmin} | {r['target'] or 'info'} | {met} |")
    return "\n".join(lines) + "\n"


def machine_info(backend: str) -> tuple[str, str]:
    """``(slug for file names, description)``."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores visible"
    if backend == "gpu":
        kind = jax.devices()[0].device_kind
        desc = f"{kind} (x{jax.device_count()}); host {desc}"
        return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-"), desc
    return backend, desc


# ------------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, few repeats, no files written (smoke test)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="samples per column")
    parser.add_argument(
        "--ops",
        default="modulated,pixel,local",
        help="comma-separated subset of modulated,pixel,local",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch columns")
    parser.add_argument(
        "--torch-python",
        default=None,
        help="interpreter for the torch baselines (default .venv-torch)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for bench-<device>.{json,md} (default results/; none for --quick)",
    )
    args = parser.parse_args(argv)

    # Let PyTorch share the GPU with JAX: no up-front reservation of most of its memory (read
    # when the backend starts, which is below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    backend = jax.default_backend()
    gpu = backend == "gpu"
    rounds = args.rounds or (3 if args.quick else (30 if gpu else 15))
    min_sample_s = 0.002 if args.quick else (0.02 if gpu else 0.05)
    budget_s = 2.0 if args.quick else 20.0
    ops = set(args.ops.split(","))
    cases = [c for c in make_cases(backend, args.quick) if c["op"] in ops]
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        mem_limit = int(0.5 * stats.get("bytes_limit", 16 * 2**30))
    else:
        mem_limit = 6 * 2**30
    patch_limit = mem_limit // 2  # the patch formulations' backward holds about two of them
    slug, machine = machine_info(backend)

    runner, torch_missing = torch_runner(args, backend)
    torch_info = runner.info() if runner else {}
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
    versions.update(
        {
            f"torch ({k})" if k == "python" else k: v
            for k, v in torch_info.get("versions", {}).items()
        }
    )
    torch_desc = torch_missing or f"{torch_info['device']}, {torch_info['threads']} threads" + (
        ", in this interpreter"
        if not isinstance(runner, TorchProxy)
        else ", in a subprocess with OMP_WAIT_POLICY=PASSIVE"
    )
    sync = "blocking on the last call (in-order stream)" if gpu else "blocking on every call"
    timing = (
        f"median over {rounds} interleaved rounds (order rotated each round; a column stops "
        f"after {budget_s:g} s with >= 3 samples), each sample >= {min_sample_s * 1e3:g} ms "
        f"of back-to-back calls after compilation and 2 warm-up calls (1 when a call takes "
        f"> 1 s); "
        f"{sync}; "
        f"± is half the interquartile range; peak MiB: XLA's planned temp + output buffers"
        f"{', torch.cuda.max_memory_allocated' if gpu else ''}"
    )
    if not gpu:
        timing += f"; JAX and torch each use the {os.cpu_count()} visible cores"
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": slug,
        "backend": backend,
        "machine": machine,
        "versions": versions,
        "timing": timing,
        "torch": torch_desc,
        "rounds": rounds,
        "quick": args.quick,
    }
    print(f"svconv benchmark on {machine}; backend {backend}")
    print(f"torch: {torch_desc}")

    stream = stream_bandwidth(backend, rounds)
    print(f"stream bandwidth: {stream['gb_per_s']:.3g} GB/s")
    torch_setup = {}
    if runner:
        torch_cases = [
            dict(
                c,
                skip={
                    "torch unfold": "its unfold tensor "
                    f"({patch_bytes(c) / 2**30:.1f} GiB) exceeds the memory "
                    "budget"
                }
                if patch_bytes(c) > patch_limit
                else {},
            )
            for c in cases
        ]
        torch_setup = runner.setup(torch_cases)

    results = []
    for c in cases:
        print(f"\n{c['id']}")
        inputs = make_inputs(c)
        jcols, missing = jax_columns(c, backend, patch_limit)
        if runner:
            missing.update(torch_setup[c["id"]]["missing"])
        else:
            missing["torch unfold"] = torch_missing
            if c["op"] == "modulated":
                missing["deform_conv2d"] = torch_missing
        for col, why in missing.items():
            print(f"  no {col}: {why}")
        res = {}
        for mode in c["modes"]:
            print(f"  {mode}")
            columns = {}
            for name, (fwd, diff) in jcols.items():
                fn = fwd if mode == "fwd" else _fwd_bwd_fn(fwd, diff)
                columns[name] = JaxColumn(fn, inputs, block_each=not gpu, mem_limit=mem_limit)
            if runner:
                for name in torch_setup[c["id"]]["columns"]:
                    columns[name] = TorchColumn(runner, c["id"], name, mode)
            res[mode] = time_interleaved(
                columns, rounds=rounds, min_sample_s=min_sample_s, budget_s=budget_s, log=print
            )
            for name, st in res[mode].items():
                if "median_ms" in st:
                    print(
                        f"    {name:14s} {st['median_ms']:10.3f} ms  "
                        f"{_rate(c, mode, st['median_ms'])}"
                    )
        if runner:
            runner.release(c["id"])
        del inputs
        results.append(
            dict(
                c,
                results=res,
                missing=missing,
                flops=case_flops(c),
                bytes={m: case_bytes(c, m) for m in MODES},
            )
        )
    if isinstance(runner, TorchProxy):
        runner.close()

    report = {
        "meta": meta,
        "stream": stream,
        "cases": results,
        "ratios": compute_ratios(results, backend, stream, args.quick),
    }
    # The same ratios from each column's fastest sample: on a loaded machine the medians and
    # the minima can disagree, and both are worth seeing.
    for r, r_min in zip(
        report["ratios"],
        compute_ratios(results, backend, stream, args.quick, stat="min_ms"),
        strict=True,
    ):
        r["value_from_minima"] = r_min["value"]
    md = render_markdown(report)
    print("\n" + md)
    out = args.out or (None if args.quick else str(ROOT / "results"))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        base = Path(out) / f"bench-{slug}"
        base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        base.with_suffix(".md").write_text(md)
        print(f"wrote {base}.json and {base}.md")
    return report


if __name__ == "__main__":
    main()
