"""Smoke test of the experiments: each trains for a couple of steps at its quick sizes and writes
its figures and results into a temporary folder."""

import importlib
import json
import math

import pytest

# `make test` installs the experiments' dependencies (`.[experiments]`) and these tests run; with
# `.[test]` alone they skip, saying which package is missing.
for _module in ("matplotlib", "skimage", "scipy", "tqdm"):
    pytest.importorskip(_module, reason=f"the experiments need {_module} (the `experiments` extra)")

EXPERIMENTS = [
    "learn_modulated_kernel",
    "gaussian_blur",
    "kpn_denoiser",
    "local_vs_conv",
    "deformable_warp",
    "large_psf",
    "data_parallel",
]


def _numbers(value):
    """Every number in a nested JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_writes_results(name, tmp_path):
    module = importlib.import_module(f"experiments.{name}")
    record = module.run(quick=True, steps=2, out_dir=tmp_path)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == record
    assert saved["experiment"] == name and saved["steps"] == 2
    metrics = _numbers(saved["metrics"])
    assert metrics and all(math.isfinite(n) for n in metrics)
    assert saved["figures"]
    for figure in saved["figures"]:
        path = tmp_path / figure
        assert path.suffix == ".png" and path.stat().st_size > 10_000
