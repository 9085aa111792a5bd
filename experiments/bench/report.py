"""The report: the machine, versions and method; per case a table of medians and rates; the
compile times; the targets table. Written as ``bench-<device>.md`` and ``.json``."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from experiments.bench.cases import OP_NAMES

_RATE_NOTE = {
    "modulated": "TFLOP/s (forward+backward counted as 3 convs, one gradient as 1)",
    "pixel": "GB/s, each input read once and each output written once",
    "local": "GB/s, each input read once and each output written once",
    "gaussian": "GB/s, each input read once and each output written once",
    "deformable": "TFLOP/s of the equal plain conv (the sampling not counted), forward+backward "
    "as 3 convs; offsets normal (about a pixel), one offset group",
}


def machine_info(backend: str, devices) -> tuple[str, str]:
    """``(slug for file names, description)`` of this machine; ``devices``: ``jax.devices()``."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores visible"
    if backend == "gpu":
        kind = devices[0].device_kind
        desc = f"{kind} (x{len(devices)}); host {desc}"
        return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-"), desc
    return backend, desc


def rate(case: dict, mode: str, ms: float | None) -> str:
    if ms is None:
        return ""
    if case["op"] in ("modulated", "deformable"):
        flops = case["flops"] * (3 if mode == "fwd+bwd" else 1)  # one gradient: a forward's
        return f"{flops / (ms * 1e-3) / 1e12:.3g} TFLOP/s"
    return f"{case['bytes'][mode] / (ms * 1e-3) / 1e9:.3g} GB/s"


def _cell(st: dict | None) -> str:
    if st is None:
        return "—"
    if "missing" in st:
        return "skipped" if st["missing"].startswith("skipped") else "failed"
    spread = 100 * st["iqr_ms"] / 2 / st["median_ms"]
    return f"{st['median_ms']:.3g} (±{spread:.0f}%)"


def _seconds(record: dict, key: str) -> str:
    if record.get(key) is None:
        return "—"
    if key in record.get("stopped", ()):
        return f"> {record[key]:g} (stopped)"
    return f"{record[key]:.2f}"


def _case_section(c: dict) -> list[str]:
    lines = [
        f"## {OP_NAMES[c['op']]} {c['k']}x{c['k']}, {c['dtype']}",
        "",
        f"`{c['id']}`: {c['shapes']}; stride 1, SAME padding. Rate: {_RATE_NOTE[c['op']]}.",
        "",
    ]
    modes = [m for m in c["modes"] if m in c["results"]]
    cols = []
    for mode in modes:
        cols += [k for k in c["results"][mode] if k not in cols]
    lines.append(
        "| implementation | "
        + " | ".join(f"{m} ms | {m} rate" for m in modes)
        + f" | peak MiB ({' / '.join(modes)}) |"
    )
    lines.append("| --- " * (2 + 2 * len(modes)) + "|")
    for col in cols:
        row, peaks = [col], []
        for mode in modes:
            st = c["results"][mode].get(col)
            row += [_cell(st), rate(c, mode, (st or {}).get("median_ms"))]
            peaks.append(f"{st['peak_mib']:.0f}" if st and "peak_mib" in st else "–")
        lines.append("| " + " | ".join(row + [" / ".join(peaks)]) + " |")
    lines += [f"\n* no `{col}`: {why}" for col, why in c["missing"].items()]
    lines += [
        f"\n* `{col}` {m} {st['missing']}"
        for m in modes
        for col, st in c["results"][m].items()
        if "missing" in st
    ]
    return [*lines, ""]


def render_markdown(report: dict) -> str:
    meta, peaks = report["meta"], report["peaks"]
    lines = [f"# svconv benchmark — {meta['device']}", ""]
    lines += [
        f"* date: {meta['date']}",
        f"* machine: {meta['machine']}",
        f"* versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"* timing: {meta['timing']}",
        f"* torch: {meta['torch']}",
    ]
    if meta.get("load_average_at_start") is not None:
        lines.append(
            f"* load average (1 min) at the start and end: {meta['load_average_at_start']} / "
            f"{meta.get('load_average_at_end')}"
        )
    lines.append("")
    s = peaks["stream"]
    lines.append(
        f"Measured peaks: stream bandwidth (in-place `x = x + 1`, float32, "
        f"{s['bytes'] / 2**20:.0f} MiB moved) **{s['gb_per_s']:.3g} GB/s**; "
        + "; ".join(
            f"{m['size']}x{m['size']} matrix product in {dt} **{m['tflop_per_s']:.3g} TFLOP/s**"
            for dt, m in peaks["matmul"].items()
        )
        + " (default precision)."
    )
    lines.append("")
    for c in report["cases"]:
        lines += _case_section(c)
    if report["compile"]:
        lines += [
            "## Compile time",
            "",
            "Wall time of `jax.jit(f).lower(...).compile()`, for the forward pass and for "
            "`jax.value_and_grad` of `sum(y * g)` with respect to every array, in a fresh "
            "process (after the backend's start-up); stopped at 10x the 2 s target.",
            "",
            "| op | case | impl | forward s | value and gradient s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in report["compile"]:
            fwd, grad = (_seconds(r, k) for k in ("fwd_s", "grad_s"))
            lines.append(f"| {OP_NAMES[r['op']]} | `{r['id']}` | {r['impl']} | {fwd} | {grad} |")
        lines += [f"\n* `{r['id']}`: {r['error']}" for r in report["compile"] if r.get("error")]
        lines.append("")
    for case_id, why in report.get("skipped", {}).items():
        lines.append(f"* `{case_id}` not run: {why}")
    if report.get("skipped"):
        lines.append("")
    rows = report["targets"]
    met = sum(r["met"] is True for r in rows)
    missed = sum(r["met"] is False for r in rows)
    unmeasured = sum(r["met"] is None and r["target"] is not None for r in rows)
    lines += [
        "## Targets (DESIGN.md; ratios of medians from this run)",
        "",
        f"**{met} met, {missed} not met, {unmeasured} not measured.** `met` judges the ratio "
        "of medians; the ratio of the fastest samples is shown beside it. Rows without a "
        "target are for information.",
        "",
        "| quantity | value | from minima | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        value, vmin = (
            "—" if v is None else f"{v:.3g}" for v in (r["value"], r.get("value_from_minima"))
        )
        met = {True: "yes", False: "**no**", None: "—" if r["target"] else ""}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['ratio']}{note} | {value} | {vmin} | {r['target'] or 'info'} | {met} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> Path:
    """``out/bench-<device>.{json,md}``; returns the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench-{report['meta']['device']}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    base.with_suffix(".md").write_text(render_markdown(report))
    return base
