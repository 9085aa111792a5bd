"""The GPU tile tuner: its dry run end to end on the CPU (interpreter), and its plumbing for
every kernel it tunes on a GPU (heuristic tiles, neighbouring tilings, operand shapes)."""

import dataclasses
import json
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from experiments.gpu_check import tune
from pallas_kernels.mosaic_gpu import _sweep as mosaic_sweep
from pallas_kernels.mosaic_gpu import local as mosaic_local
from pallas_kernels.mosaic_gpu import modulated as mosaic_modulated
from svconv import gaussian
from svconv._primitive import bind
from tests.conftest import assert_close


def _written(folder, suffix):
    """The report the tuner wrote, ``tune-<device><suffix>`` (``cpu`` here; on a GPU machine,
    where the suite also runs, the GPU's name)."""
    (path,) = folder.glob(f"tune-*{suffix}")
    return path


def test_dry_run_writes_a_report(tmp_path):
    assert tune.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads(_written(tmp_path, ".json").read_text())
    names = [r["kernel"] for r in report["kernels"]]
    assert names == [k.name for k in tune.kernels(dry_run=True)]
    for record in report["kernels"]:
        assert record["heuristic_ms"] > 0 and record["best_ms"] > 0
        assert record["trials"][0]["tiles"] == "(the heuristic's)"
    # The pixel forward's first two parameters have neighbours at the dry run's shape.
    assert len(report["kernels"][0]["trials"]) > 1
    text = _written(tmp_path, ".md").read_text()
    assert "| pixel forward 3x3 x[1x12x12x4] float32 |" in text


def test_a_time_limit_lists_the_kernels_not_reached(tmp_path, capsys):
    assert tune.main(["--dry-run", "--time-limit", "0", "--out", str(tmp_path)]) == 0
    report = json.loads(_written(tmp_path, ".json").read_text())
    assert report["kernels"] == []
    assert report["not_reached"] == [k.name for k in tune.kernels(dry_run=True)]
    assert "not reached (time limit)" in _written(tmp_path, ".md").read_text()


@pytest.mark.parametrize("kernel", tune.kernels(dry_run=False), ids=lambda k: k.name)
def test_every_gpu_kernel_binds_with_its_tiles(kernel):
    base = kernel.heuristic()
    spec = kernel.spec(base)
    args = [jax.ShapeDtypeStruct(kernel.shapes[n], kernel.dtype) for n in spec.operands]
    out = jax.eval_shape(lambda *a: bind(spec, *a), *args)
    assert out.shape == kernel.shapes[kernel.target] and out.dtype == kernel.dtype
    params = kernel.params
    changed = set()
    for param in params:
        assert hasattr(base, param), (kernel.name, param)
        for cand in tune.neighbours(base, param, dry_run=False):
            diff = [f.name for f in dataclasses.fields(base) if getattr(cand, f.name) !=
                    getattr(base, f.name)]  # fmt: skip
            assert diff == [param]
            changed.add(param)
    if kernel.backend == "triton":
        assert {"num_warps", "num_stages"} <= changed
    else:
        assert changed == set(kernel.params)


def test_a_tiling_with_other_numbers_is_rejected():
    kernel = tune.kernels(dry_run=True)[0]
    timer = tune.Timer(kernel, reps=1)
    base = kernel.heuristic()
    timer.prepare(base)
    timer.reference = timer.reference + 1.0
    timer.compiled.clear()
    with pytest.raises(ArithmeticError, match="differs from the heuristic's result"):
        timer.prepare(base)


def test_gaussian_operands_are_valid_parameters():
    """The Gaussian kernels are timed on parameters of real (rotated) Gaussians: finite, with a
    log-normalizer that matches them."""
    kernel = tune.kernels(dry_run=True)[-1]
    assert kernel.family.name == "gaussian"
    operands = dict(zip(kernel.spec(None).operands, kernel.operands(), strict=True))
    eta, zeta = operands["eta"], operands["zeta"]
    assert bool(jnp.isfinite(eta).all()) and bool(jnp.isfinite(zeta).all())
    assert_close(zeta, gaussian.log_normalizer(eta, (kernel.kernel_size,) * 2))
    assert float(jnp.abs(eta[..., 1]).max()) > 0  # the rotation term, rho / (sr sc)


def _heuristic_kernels():
    """Every kernel the tuner searches, at the DESIGN shapes but the Mosaic Gaussian kernels,
    which are at the dry run's (lowering their 31x31 windows took most of this test's time; the
    heuristic's call is the same)."""

    def mosaic_gaussian(k):
        return k.backend == "mosaic" and k.family.name == "gaussian"

    return [k for k in tune.kernels(dry_run=False) if not mosaic_gaussian(k)] + [
        k for k in tune.kernels(dry_run=True) if mosaic_gaussian(k)
    ]


@pytest.mark.parametrize("kernel", _heuristic_kernels(), ids=lambda k: k.name)
def test_the_heuristic_is_the_kernels_own_choice(kernel):
    """``Kernel.heuristic`` repeats the tiling call each kernel makes when given no tiles: lowered
    for CUDA, the kernel with those tiles and with none is the same Triton kernel (IR, grid,
    warps, stages), so the baseline the search starts from is what the ops run."""
    from experiments.static.lowering import lower, triton_kernels

    def lowered(tiles):
        spec = kernel.spec(tiles)
        args = [jax.ShapeDtypeStruct(kernel.shapes[n], kernel.dtype) for n in spec.operands]
        module = lower(lambda *a: bind(spec, *a), *args)
        (triton,) = triton_kernels(module)
        return triton.ttir, triton.grid, triton.num_warps, triton.num_stages

    if kernel.backend == "mosaic" and kernel.family.name in ("modulated", "local"):
        # The tiles the implicit GEMM (the weight stream) picks, given none (and that its
        # support check assumes).
        module = mosaic_modulated if kernel.family.name == "modulated" else mosaic_local
        picked = []
        real_tiles = module.tiles

        def tiles(*args, **kwargs):
            picked.append(real_tiles(*args, **kwargs))
            return picked[-1]

        spec = kernel.spec(None)
        args = [jax.ShapeDtypeStruct(kernel.shapes[n], kernel.dtype) for n in spec.operands]
        with mock.patch.object(module, "tiles", tiles):
            lower(lambda *a: bind(spec, *a), *args)
        assert picked and all(p == kernel.heuristic() for p in picked), picked
        return
    if kernel.backend == "mosaic":  # the tiles the kernel plans its sweep with, given none
        planned = []
        real_plan = mosaic_sweep.plan

        def plan(geom, tiles, *args, **kwargs):
            if "per_group" in kwargs:  # the kernel's own plan (not its support check's)
                planned.append(tiles)
            return real_plan(geom, tiles, *args, **kwargs)

        spec = kernel.spec(None)
        args = [jax.ShapeDtypeStruct(kernel.shapes[n], kernel.dtype) for n in spec.operands]
        with mock.patch.object(mosaic_sweep, "plan", plan):
            lower(lambda *a: bind(spec, *a), *args)
        assert planned == [kernel.heuristic()]
        return
    assert lowered(kernel.heuristic()) == lowered(None)
