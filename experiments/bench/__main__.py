"""``python -m experiments.bench``: run the benchmark and write ``results/bench-<device>``."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from pathlib import Path

# Let PyTorch share the GPU with JAX: no up-front reservation of most of its memory (read when
# the backend starts, after the imports).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jaxlib  # noqa: E402

from experiments.bench import report as rep  # noqa: E402
from experiments.bench.cases import MODES, compile_cases, make_cases  # noqa: E402
from experiments.bench.columns import JaxColumn, jax_columns, make_inputs, mode_fn  # noqa: E402
from experiments.bench.compile_time import measure as measure_compile  # noqa: E402
from experiments.bench.targets import COMPILE_LIMIT_S, compute_targets  # noqa: E402
from experiments.bench.timing import matmul_peak, stream_bandwidth, time_interleaved  # noqa: E402
from experiments.bench.torch_proxy import TorchColumn, start_torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TORCH_OPS = ("modulated", "pixel", "local", "deformable")  # the ops with a PyTorch formulation


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="svconv against plain convolution, patch formulations and PyTorch.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, few repeats, no files written"
    )
    parser.add_argument("--rounds", type=int, default=None, help="samples per column")
    parser.add_argument(
        "--ops",
        default="modulated,pixel,local,gaussian,deformable",
        help="comma-separated subset of the ops",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch columns")
    parser.add_argument(
        "--torch-python",
        default=None,
        help="interpreter for the torch columns (default: this "
        "one when torch imports here, else .venv-torch)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for bench-<device>.{json,md} (default results/; none for --quick)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds for the run, roughly: no new case starts after 80%% of it, no compile-time "
        "measurement runs past it (the report says what was left out)",
    )
    parser.add_argument(
        "--no-compile-times", action="store_true", help="leave out the compile-time cases"
    )
    return parser.parse_args(argv)


def _load() -> float | None:
    """The 1-minute load average: other work on the machine skews every column."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _compile_times(backend: str, quick: bool, deadline: float | None, log) -> list[dict]:
    """Compile time of each op's default implementation, forward and value and gradient, each
    in a fresh process and stopped at 10x the target (or at ``deadline``)."""
    out = []
    for cc in compile_cases(quick):
        record = {"op": cc.op, "id": cc.id, "impl": f"auto on {backend}"}
        left = math.inf if deadline is None else deadline - time.perf_counter()
        # A measurement stopped before 10x the target would still say "at least that".
        if left < 3 * 10 * COMPILE_LIMIT_S:
            record["error"] = "not measured: the run's time limit was reached"
        else:
            limit = 10 * COMPILE_LIMIT_S
            record.update(measure_compile(cc, limit_s=limit, startup_s=min(left - 2 * limit, 180)))
        log(
            f"  compile {cc.id}: "
            + ", ".join(f"{k} {record[k]:.2f} s" for k in ("fwd_s", "grad_s") if k in record)
            + (f" (stopped: {', '.join(record['stopped'])})" if "stopped" in record else "")
            + (f" {record['error']}" if "error" in record else "")
        )
        out.append(record)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    backend = jax.default_backend()
    gpu = backend == "gpu"
    rounds = args.rounds or (3 if args.quick else (20 if gpu else 15))
    min_sample_s = 0.002 if args.quick else (0.01 if gpu else 0.05)
    budget_s = 2.0 if args.quick else (5.0 if gpu else 20.0)
    ops = set(args.ops.split(","))
    cases = [c for c in make_cases(backend, args.quick) if c.op in ops]
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        mem_limit = int(0.5 * stats.get("bytes_limit", 16 * 2**30))
        patch_limit = mem_limit // 2  # the patch formulations' backward holds about two of them
    else:
        mem_limit = 6 * 2**30
        # A larger patch tensor costs tens of seconds a call on a CPU (15x15 case: 26 s forward).
        patch_limit = 2**30
    slug, machine = rep.machine_info(backend, jax.devices())
    threads = os.cpu_count() or 1

    proxy, torch_info = start_torch(
        disabled=args.no_torch,
        python=args.torch_python,
        device="cuda" if gpu else "cpu",
        threads=threads,
    )
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    versions["jaxlib"] = jaxlib.__version__
    if proxy:
        for k, v in torch_info["versions"].items():
            versions["torch (python)" if k == "python" else k] = v
        torch_desc = (
            f"{torch_info['device']}, {torch_info['threads']} threads, in a subprocess with "
            "OMP_WAIT_POLICY=PASSIVE"
        )
    else:
        torch_desc = torch_info
    sync = "blocking on the last call (in-order stream)" if gpu else "blocking on every call"
    timing = (
        f"median over {rounds} interleaved rounds (order rotated each round; a column stops "
        f"after {budget_s:g} s with >= 3 samples), each sample >= {min_sample_s * 1e3:g} ms "
        "of back-to-back calls after compilation and 2 warm-up calls (1 when a call takes "
        f"> 1 s); {sync}; ± is half the interquartile range; peak MiB: XLA's planned temp + "
        f"output buffers{', torch.cuda.max_memory_allocated' if gpu else ''}"
    )
    if not gpu:
        timing += f"; JAX and torch each use the {threads} visible cores"
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
        "load_average_at_start": _load(),
    }
    print(f"svconv benchmark on {machine}; backend {backend}")
    print(f"torch: {torch_desc}")

    dtypes = sorted({c.dtype for c in cases} | {"float32"})
    peaks = {
        "stream": stream_bandwidth(backend, rounds, args.quick),
        "matmul": {dt: matmul_peak(backend, dt, rounds, args.quick) for dt in dtypes},
    }
    print(f"stream bandwidth: {peaks['stream']['gb_per_s']:.3g} GB/s")
    for dt, m in peaks["matmul"].items():
        print(f"matrix product {dt}: {m['tflop_per_s']:.3g} TFLOP/s")

    torch_setup = {}
    if proxy:
        specs = []
        for c in (c for c in cases if c.op in TORCH_OPS):
            skip = {}
            if c.patch_bytes > patch_limit:
                skip["torch unfold"] = (
                    f"its unfold tensor ({c.patch_bytes / 2**30:.1f} GiB) exceeds the memory budget"
                )
            specs.append({**c.spec(), "skip": skip})
        try:
            torch_setup = proxy.setup(specs)
        except RuntimeError as e:
            proxy.close()
            proxy, torch_desc = None, f"the torch worker failed: {e}"
            meta["torch"] = torch_desc

    out = args.out or (None if args.quick else str(ROOT / "results"))
    results, skipped = [], {}

    def finish(compile_records: list[dict], pending=()) -> dict:
        """The report of what is measured so far, written to ``out``; ``pending``: the cases
        not reached yet (a report written while the run goes on)."""
        kw = dict(quick=args.quick)
        targets = compute_targets(results, backend, peaks, compile_records, **kw)
        # The same ratios from each column's fastest sample: on a loaded machine the medians
        # and the minima can disagree, and both are worth seeing.
        from_minima = compute_targets(results, backend, peaks, compile_records, stat="min_ms", **kw)
        for r, r_min in zip(targets, from_minima, strict=True):
            r["value_from_minima"] = r_min["value"]
        meta["seconds"] = round(time.perf_counter() - started, 1)
        meta["load_average_at_end"] = _load()
        report = {
            "meta": meta,
            "peaks": peaks,
            "cases": results,
            "compile": compile_records,
            "skipped": skipped | {c.id: "not reached: the run was stopped" for c in pending},
            "targets": targets,
        }
        if out:
            base = rep.write(report, Path(out))
            if not pending:
                print(f"wrote {base}.json and {base}.md")
        return report

    for i, c in enumerate(cases):
        if i:  # what is measured so far, in case the run is stopped (a compile can take minutes)
            finish([], pending=cases[i:])
        if args.time_limit is not None and time.perf_counter() - started > 0.8 * args.time_limit:
            skipped[c.id] = f"the run's time limit ({args.time_limit:g} s) was near"
            print(f"\n{c.id}: skipped, time limit")
            continue
        print(f"\n{c.id}")
        inputs = make_inputs(c)
        jcols, missing = jax_columns(c, backend, patch_limit)
        if proxy:
            missing.update(torch_setup.get(c.id, {}).get("missing", {}))
        elif c.op in TORCH_OPS:
            missing["deform_conv2d" if c.op == "deformable" else "torch unfold"] = torch_desc
            if c.op == "modulated" and gpu:
                missing["deform_conv2d"] = torch_desc
        for col, why in missing.items():
            print(f"  no {col}: {why}")
        res = {}
        for mode in c.modes:
            print(f"  {mode}")
            columns = {}
            for name, (fwd, diff) in jcols.items():
                fn = mode_fn(fwd, diff, mode, name)
                if fn is not None:  # None: forward-only, or not differentiated in that array
                    columns[name] = JaxColumn(fn, inputs, block_each=not gpu, mem_limit=mem_limit)
            if proxy and mode in MODES:  # the torch columns: forward, forward+backward
                for name in torch_setup.get(c.id, {}).get("columns", []):
                    columns[name] = TorchColumn(proxy, c.id, name, mode)
            res[mode] = time_interleaved(
                columns, rounds=rounds, min_sample_s=min_sample_s, budget_s=budget_s, log=print
            )
            for name, st in res[mode].items():
                if "median_ms" in st:
                    print(f"    {name:14s} {st['median_ms']:10.3f} ms")
        if proxy:
            proxy.release(c.id)
        del inputs
        results.append(
            {
                **c.spec(),
                "shapes": c.describe(),
                "results": res,
                "missing": missing,
                "flops": c.flops,
                "bytes": {m: c.min_bytes(m) for m in c.modes},
                "patch_bytes": c.patch_bytes,
            }
        )
    if proxy:
        proxy.close()

    report = finish([])  # written now too: the compile times can take minutes
    if not args.no_compile_times:
        print("\ncompile time")
        deadline = None if args.time_limit is None else started + args.time_limit
        report = finish(_compile_times(backend, args.quick, deadline, print))
    print("\n" + rep.render_markdown(report))
    return report


if __name__ == "__main__":
    main()
