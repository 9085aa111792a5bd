"""Timing: interleaved sampling of a case's columns, the machine's measured peaks (stream
bandwidth, matrix-product rate) and compile time."""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_interleaved(
    columns: dict, *, rounds: int, min_sample_s: float, budget_s: float, log
) -> dict[str, dict]:
    """Round-robin sampling (rotating the order each round) so that drifting machine load hits
    every column alike. Each column has ``prepare()`` (compile, warm up; raises to leave the
    column out) and ``sample(inner) -> seconds per call``; a column stops early once it has
    used ``budget_s`` (>= 3 samples). Returns per column the median, minimum and interquartile
    range in ms, or ``missing`` with the reason."""
    stats, live, inner, spent, samples = {}, [], {}, {}, {}
    for name, col in columns.items():
        try:
            col.prepare()
            t1 = col.sample(1)
        except MemoryError as e:
            stats[name] = {"missing": str(e)}
            log(f"    {name}: {e}")
            continue
        except Exception as e:  # out of memory, unsupported case, ...
            first = (str(e).splitlines() or [""])[0]
            stats[name] = {"missing": f"failed: {type(e).__name__}: {first}"[:300]}
            log(f"    {name}: {stats[name]['missing']}")
            continue
        inner[name] = max(1, min(100, math.ceil(min_sample_s / max(t1, 1e-7))))
        live.append(name)
        # A single call long enough for a sample of its own counts as the first sample.
        spent[name], samples[name] = t1, [t1] if inner[name] == 1 else []
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for name in order:
            if name in stats or (len(samples[name]) >= 3 and spent[name] > budget_s):
                continue
            try:
                s = columns[name].sample(inner[name])
            except Exception as e:  # a worker that died, memory that ran out midway, ...
                first = (str(e).splitlines() or [""])[0]
                stats[name] = {"missing": f"failed while sampling: {type(e).__name__}: {first}"}
                log(f"    {name}: {stats[name]['missing']}")
                continue
            samples[name].append(s)
            spent[name] += s * inner[name]
    for name in live:
        if name in stats:
            continue
        xs = sorted(samples[name])
        q = np.percentile(xs, [25, 75])
        stats[name] = {
            "median_ms": 1e3 * statistics.median(xs),
            "min_ms": 1e3 * xs[0],
            "iqr_ms": 1e3 * float(q[1] - q[0]),
            "samples": len(xs),
            "calls_per_sample": inner[name],
        }
        for key in ("peak", "temp"):
            if getattr(columns[name], f"{key}_bytes") is not None:
                stats[name][f"{key}_mib"] = getattr(columns[name], f"{key}_bytes") / 2**20
    return stats


def _median_seconds(step, state, *, inner: int, rounds: int):
    state = jax.block_until_ready(step(state))  # compile and warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            state = step(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def stream_bandwidth(backend: str, rounds: int, quick: bool = False) -> dict:
    """Device bandwidth of an in-place ``x = x + 1`` (read + write; the buffer is donated, so no
    fresh allocation is timed): the memory-bound ops' ceiling."""
    nbytes = 2**24 if quick else (2**30 if backend == "gpu" else 2**27)
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = jax.random.normal(jax.random.key(1), (nbytes // 4,), jnp.float32)
    s = _median_seconds(step, x, inner=20 if backend == "gpu" else 3, rounds=rounds)
    return {"median_ms": 1e3 * s, "bytes": 2 * nbytes, "gb_per_s": 2 * nbytes / s / 1e9}


def matmul_peak(backend: str, dtype: str, rounds: int, quick: bool = False) -> dict:
    """Rate of a large square matrix product at the default precision (float32 on TF32 tensor
    cores on a GPU): the dot-bound ops' ceiling."""
    size = 256 if quick else (8192 if backend == "gpu" else 1024)
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.normal(ka, (size, size), dtype)
    b = jax.random.normal(kb, (size, size), dtype) / size**0.5
    # Chained products (b is well conditioned enough for a few of them) keep one result live.
    step = jax.jit(lambda acc: (acc @ b).astype(dtype))
    s = _median_seconds(step, a, inner=10 if backend == "gpu" else 2, rounds=rounds)
    flops = 2 * size**3
    return {"dtype": dtype, "size": size, "median_ms": 1e3 * s, "tflop_per_s": flops / s / 1e12}


def compile_seconds(fn, args) -> float:
    """Wall time of ``jax.jit(fn).lower(*args).compile()`` (a fresh jit: nothing cached)."""
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0
