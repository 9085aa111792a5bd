"""The benchmark's parts: case arithmetic, that every JAX column computes the same function, the
interleaved timing, the targets table and the report. The whole run (``--quick``) is exercised
by ``tests/test_gpu_check.py``'s dry run."""

import sys

import jax
import numpy as np
import pytest

from experiments.bench import report, targets, timing
from experiments.bench.cases import (
    GRAD_MODES,
    MODES,
    Case,
    CompileCase,
    compile_cases,
    grad_input,
    make_cases,
)
from experiments.bench.columns import (
    fwd_bwd_fn,
    jax_columns,
    loss_and_grad_fn,
    make_inputs,
    mode_fn,
)
from experiments.bench.compile_time import measure as measure_compile
from experiments.bench.torch_proxy import start_torch


def test_case_flops_and_bytes():
    c = Case("modulated", 2, 4, 5, 3, 7, 3, "float32")
    assert c.id == "modulated-N2-4x5-3to7-3x3-float32"
    assert c.flops == 2 * 2 * 4 * 5 * 9 * 3 * 7
    x, w, d, y = 2 * 4 * 5 * 3, 9 * 3 * 7, 2 * 4 * 5 * 9, 2 * 4 * 5 * 7
    assert c.min_bytes("fwd") == 4 * (x + w + d + y)
    assert c.min_bytes("fwd+bwd") == 8 * (x + w + d + y)
    p = Case("pixel", 1, 8, 8, 4, 4, 5, "bfloat16")
    assert p.flops == 2 * 64 * 25 * 4 and p.patch_bytes == 64 * 4 * 25 * 2
    assert p.min_bytes("fwd") == 2 * (64 * 4 + 64 * 25 + 64 * 4)


@pytest.mark.parametrize("op", ["modulated", "local"])
def test_gradient_modes_time_one_gradient_each(op):
    """A one-gradient mode is the VJP in that array alone: the same numbers as that array's
    part of the forward+backward, as many bytes as the forward; columns without the array (the
    plain conv has no modulation) or without a backward have no such mode."""
    case = Case(op, 2, 6, 7, 3, 4, 3, "float32", modes=MODES + GRAD_MODES[op])
    inputs = make_inputs(case)
    cols, _ = jax_columns(case, "cpu", 2**30)
    fwd, diff = cols["svconv xla"]
    _, (grads,) = jax.jit(fwd_bwd_fn(fwd, diff))(inputs)
    for mode in GRAD_MODES[op]:
        name = grad_input(mode)
        assert case.min_bytes(mode) == case.min_bytes("fwd")
        got = jax.jit(mode_fn(fwd, diff, mode))(inputs)
        assert got.shape == inputs[name].shape
        np.testing.assert_allclose(got, grads[name], rtol=1e-5, atol=1e-6, err_msg=mode)
    assert mode_fn(fwd, None, "grad x") is None and mode_fn(fwd, None, "fwd") is fwd
    if op == "modulated":
        assert mode_fn(*cols["lax conv"], "grad d") is None
        assert mode_fn(*cols["xla patches"], "grad x", "xla patches") is None  # not timed
        assert mode_fn(*cols["svconv xla"], "grad x", "svconv xla") is not None
    with pytest.raises(ValueError, match="unknown mode"):
        case.min_bytes("grad")


def test_gpu_pixel_column_in_column_phases_is_forward_only():
    """On a GPU the pixel cases time the forward in interleaved column phases beside the default
    tiles: forward only, the same numbers (here in the interpreter)."""
    case = Case("pixel", 1, 8, 8, 4, 4, 3, "float32")
    cols, _ = jax_columns(case, "gpu", 2**30)
    fwd, diff = cols["svconv pallas, 4 column phases"]
    assert diff is None
    inputs = make_inputs(case)
    np.testing.assert_allclose(fwd(inputs), cols["svconv xla"][0](inputs), rtol=1e-5, atol=1e-5)


def test_design_cases():
    cpu = {c.id for c in make_cases("cpu", quick=False)}
    assert "modulated-N4-128x128-32to32-3x3-float32" in cpu
    assert {"pixel-N4-128x128-32-7x7-float32", "pixel-N4-128x128-32-15x15-float32"} <= cpu
    assert all(c.modes == MODES for c in make_cases("cpu", quick=False))
    gpu = make_cases("gpu", quick=False)
    assert {c.dtype for c in gpu if c.op == "modulated"} == {"float32", "bfloat16"}
    # The convolutions time each gradient on a GPU, at more than one shape.
    assert {c.modes for c in gpu if c.op in ("modulated", "local")} == {
        MODES + ("grad x", "grad w", "grad d"),
        MODES + ("grad x", "grad w"),
    }
    mod = [c for c in gpu if c.op == "modulated"]
    assert {c.cin for c in mod} == {16, 64, 256} and {c.k for c in mod} == {3, 5, 7}
    assert {c.h for c in mod} == {64, 128, 256}
    assert {c.k for c in gpu if c.op == "pixel"} == {7, 15}
    assert {c.op for c in compile_cases(quick=False)} == {"modulated", "pixel", "local", "gaussian"}
    assert {c.k for c in compile_cases(quick=False)} == {31}


@pytest.mark.parametrize("op", ["modulated", "pixel", "local", "gaussian"])
def test_columns_compute_the_same_function(op):
    case = Case(op, 2, 6, 7, 3, 4, 3, "float32")
    inputs = make_inputs(case)
    cols, missing = jax_columns(case, "cpu", patch_limit=2**30)
    assert "svconv pallas" in missing and "svconv pallas" not in cols
    expected = None
    with jax.default_matmul_precision("highest"):
        for name, (fwd, diff) in cols.items():
            if name == "lax conv":  # the plain conv: no modulation
                continue
            y, grads = jax.jit(fwd_bwd_fn(fwd, diff))(inputs)
            got = [np.asarray(y), *(np.asarray(grads[0][k]) for k in diff)]
            if expected is None:
                expected = got
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
            value, _ = jax.jit(loss_and_grad_fn(fwd, diff))(inputs)
            np.testing.assert_allclose(value, np.sum(got[0] * np.asarray(inputs["g"])), rtol=1e-4)


def test_patch_columns_are_left_out_over_the_memory_budget():
    cols, missing = jax_columns(Case("pixel", 1, 8, 8, 2, 2, 3, "float32"), "gpu", patch_limit=10)
    assert "xla patches" not in cols and "exceeds the memory budget" in missing["xla patches"]
    assert "svconv pallas" in cols and "reference" not in cols


class _FakeColumn:
    def __init__(self, seconds, fail=None, dies_after=None):
        self.seconds, self.fail, self.dies_after, self.samples = seconds, fail, dies_after, 0
        self.peak_bytes, self.temp_bytes = 2**20, None

    def prepare(self):
        if self.fail:
            raise self.fail

    def sample(self, inner):
        self.samples += 1
        if self.dies_after is not None and self.samples > self.dies_after:
            raise RuntimeError("the torch worker exited (code -9)")
        return self.seconds


def test_time_interleaved():
    cols = {
        "fast": _FakeColumn(0.001),
        "slow": _FakeColumn(0.01),
        "oom": _FakeColumn(0, MemoryError("skipped: too big")),
        "broken": _FakeColumn(0, RuntimeError("no kernel\nfor this")),
        "dies": _FakeColumn(0.01, dies_after=2),
    }
    stats = timing.time_interleaved(cols, rounds=4, min_sample_s=0.005, budget_s=10, log=print)
    assert stats["fast"]["median_ms"] == pytest.approx(1) and stats["fast"]["samples"] == 4
    assert stats["fast"]["calls_per_sample"] == 5 and stats["fast"]["peak_mib"] == 1
    # A call longer than a sample is its own first sample.
    assert stats["slow"]["samples"] == 5 and stats["slow"]["calls_per_sample"] == 1
    assert stats["oom"] == {"missing": "skipped: too big"}
    assert stats["broken"]["missing"] == "failed: RuntimeError: no kernel"
    assert stats["dies"]["missing"].startswith("failed while sampling: RuntimeError")


def _record(case, medians):
    """A case record with the given ``{mode: {column: median ms}}``."""
    results = {
        mode: {
            col: {"median_ms": ms, "min_ms": ms, "iqr_ms": 0.0, "temp_mib": 1.0}
            for col, ms in cols.items()
        }
        for mode, cols in medians.items()
    }
    return {
        **case.spec(),
        "shapes": case.describe(),
        "results": results,
        "missing": {},
        "flops": case.flops,
        "bytes": {m: case.min_bytes(m) for m in case.modes},
        "patch_bytes": case.patch_bytes,
    }


PEAKS = {
    "stream": {"gb_per_s": 100.0, "bytes": 2**27, "median_ms": 1.0},
    "matmul": {"float32": {"size": 1024, "tflop_per_s": 1.0, "median_ms": 1.0}},
}


def test_cpu_targets():
    mod = _record(
        Case("modulated", 4, 128, 128, 32, 32, 3, "float32"),
        {
            "fwd": {"svconv xla": 10, "lax conv": 5, "torch unfold": 30, "xla patches": 40},
            "fwd+bwd": {"svconv xla": 20, "lax conv": 10, "torch unfold": 40, "xla patches": 50},
        },
    )
    pix = _record(
        Case("pixel", 4, 128, 128, 32, 32, 7, "float32"),
        {"fwd": {"svconv xla": 1, "torch unfold": 60}, "fwd+bwd": {"svconv xla": 5}},
    )
    compiled = [{"op": "local", "id": "local-x", "impl": "auto on cpu", "fwd_s": 1.0, "grad_s": 3}]
    rows = {
        r["ratio"]: r
        for r in targets.compute_targets([mod, pix], "cpu", PEAKS, compiled, quick=False)
    }
    m, p = mod["id"], pix["id"]
    assert rows[f"{m}: fwd, svconv xla / lax conv"]["value"] == 2
    assert rows[f"{m}: fwd, svconv xla / lax conv"]["target"] == "<= 1.5"
    assert rows[f"{m}: fwd, svconv xla / lax conv"]["met"] is False
    assert rows[f"{m}: fwd+bwd, svconv xla / lax conv"]["met"] is True  # 2 <= 2.5
    assert rows[f"{m}: fwd, torch unfold / svconv xla"]["met"] is True  # 3 >= 2.5
    assert rows[f"{m}: fwd+bwd, torch unfold / svconv xla"]["met"] is False  # 2 < 2.5
    assert rows[f"{p}: fwd, torch unfold / svconv xla"]["met"] is True  # 60 >= 50
    assert rows[f"{p}: svconv xla fwd+bwd / fwd"]["value"] == 5
    assert rows[f"{p}: svconv xla fwd+bwd / fwd"]["met"] is False  # > 4
    assert rows[f"{p}: fwd, xla patches / svconv xla"]["met"] is None  # no column
    assert rows["compile local-x, auto on cpu: forward, s"]["met"] is True
    assert rows["compile local-x, auto on cpu: value and gradient, s"]["met"] is False
    gauss = _record(
        Case("gaussian", 1, 256, 256, 3, 3, 31, "float32"),
        {
            "fwd": {"svconv xla": 1, "explicit kernels": 3},
            "fwd+bwd": {"svconv xla": 4, "explicit kernels": 6},
        },
    )
    gauss["results"]["fwd"]["explicit kernels"]["peak_mib"] = 1000.0
    gauss["results"]["fwd"]["svconv xla"]["peak_mib"] = 10.0
    rows = {r["ratio"]: r for r in targets.compute_targets([gauss], "cpu", PEAKS, [], quick=False)}
    g = gauss["id"]
    assert rows[f"{g}: fwd, svconv xla / explicit kernels"]["met"] is True  # 1/3 <= 1/2
    assert rows[f"{g}: fwd+bwd, svconv xla / explicit kernels"]["met"] is False  # 2/3
    assert rows[f"{g}: fwd, svconv xla peak buffers / explicit kernels'"]["value"] == 0.01
    assert rows[f"{g}: fwd+bwd, svconv xla peak buffers / explicit kernels'"]["met"] is None
    quick = targets.compute_targets([mod], "cpu", PEAKS, compiled, quick=True)
    assert all(r["target"] is None and r["met"] is None for r in quick)


def test_gpu_targets_judge_pallas():
    case = Case("modulated", 8, 128, 128, 64, 64, 3, "bfloat16")
    cols = {"svconv pallas": 1, "svconv xla": 9, "lax conv": 1, "deform_conv2d": 6}
    rec = _record(case, {"fwd": cols, "fwd+bwd": cols})
    rows = {r["ratio"]: r for r in targets.compute_targets([rec], "gpu", PEAKS, [], quick=False)}
    assert rows[f"{case.id}: fwd, svconv pallas / lax conv"]["target"] == "<= 1.25"
    assert rows[f"{case.id}: fwd, svconv pallas / lax conv"]["met"] is True
    assert rows[f"{case.id}: fwd, deform_conv2d / svconv pallas"]["met"] is True
    assert rows[f"{case.id}: fwd, torch unfold / svconv pallas"]["met"] is None
    assert rows[f"{case.id}: fwd, svconv mosaic / lax conv"]["met"] is None  # not timed


def test_gpu_targets_of_the_mosaic_kernels_and_each_gradient():
    modes = MODES + GRAD_MODES["modulated"]
    case = Case("modulated", 8, 128, 128, 64, 64, 3, "float32", modes=modes)
    cols = {"svconv pallas": 2, "svconv mosaic": 1.05, "lax conv": 1}
    grads = {"svconv pallas": 3, "svconv mosaic": 0.5}
    rec = _record(case, {"fwd": cols, "fwd+bwd": {**cols, "svconv mosaic": 1.6}, "grad w": grads})
    rows = {r["ratio"]: r for r in targets.compute_targets([rec], "gpu", PEAKS, [], quick=False)}
    assert rows[f"{case.id}: fwd, svconv mosaic / lax conv"]["target"] == "<= 1.1"  # TF32
    assert rows[f"{case.id}: fwd, svconv mosaic / lax conv"]["met"] is True
    assert rows[f"{case.id}: fwd+bwd, svconv mosaic / lax conv"]["met"] is False  # 1.6 > 1.5
    assert rows[f"{case.id}: grad w, svconv mosaic / lax conv fwd"]["value"] == 0.5
    assert rows[f"{case.id}: grad w, svconv pallas / lax conv fwd"]["target"] is None
    assert f"{case.id}: grad x, svconv pallas / lax conv fwd" not in rows  # not timed
    pix = Case("pixel", 8, 256, 256, 64, 64, 7, "float32")
    ms = pix.min_bytes("fwd") / (0.9 * PEAKS["stream"]["gb_per_s"] * 1e9) * 1e3  # at 90%
    rec = _record(pix, {"fwd": {"svconv pallas": 5 * ms, "svconv mosaic": ms}})
    rows = {r["ratio"]: r for r in targets.compute_targets([rec], "gpu", PEAKS, [], quick=False)}
    row = rows[f"{pix.id}: fwd, svconv mosaic GB/s / stream GB/s"]
    assert row["value"] == pytest.approx(0.9) and row["met"] is True


def test_report_renders_every_row():
    case = Case("local", 2, 8, 8, 2, 2, 3, "float32")
    rec = _record(case, {"fwd": {"svconv xla": 2, "lax local": 1}, "fwd+bwd": {"svconv xla": 4}})
    rec["results"]["fwd+bwd"]["lax local"] = {"missing": "failed: RuntimeError: boom"}
    rows = targets.compute_targets([rec], "cpu", PEAKS, [], quick=False)
    rep = {
        "meta": {
            "date": "today",
            "device": "cpu",
            "machine": "test",
            "versions": {"jax": jax.__version__},
            "timing": "t",
            "torch": "disabled",
        },
        "peaks": PEAKS,
        "cases": [rec],
        "compile": [],
        "skipped": {"other-case": "time limit"},
        "targets": rows,
    }
    md = report.render_markdown(rep)
    assert "| svconv xla | 2 (±0%) |" in md and "`lax local` fwd+bwd failed" in md
    assert "0 met, 1 not met, 1 not measured" in md and "`other-case` not run: time limit" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert all(any(line.startswith(f"| {r['ratio']}") for line in table) for r in rows)


def test_torch_columns_say_why_they_are_missing(tmp_path):
    assert start_torch(disabled=True, python=None, device="cpu", threads=1) == (
        None,
        "disabled with --no-torch",
    )
    proxy, why = start_torch(disabled=False, python=str(tmp_path / "py"), device="cpu", threads=1)
    assert proxy is None and "does not exist" in why
    fake = tmp_path / "python"  # an interpreter where torch does not import
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import no_such_module_torch' \n")
    fake.chmod(0o755)
    proxy, why = start_torch(disabled=False, python=str(fake), device="cpu", threads=1)
    assert proxy is None and "torch does not import" in why


def test_compile_time_is_stopped_at_its_limit():
    slow = CompileCase("modulated", 1, 64, 64, 4, 4, 31)  # compiles for about a minute on a CPU
    record = measure_compile(slow, limit_s=0.05)
    assert record == {"fwd_s": 0.05, "stopped": ["fwd_s"]}
    broken = measure_compile(CompileCase("pixel", 1, 8, 8, 1, 1, 3, "int32"), limit_s=30)
    assert broken["error"].startswith("failed: ") and "fwd_s" not in broken
