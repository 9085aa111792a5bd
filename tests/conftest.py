"""Shared test utilities: random cases with readable ids, dtype tolerances, comparisons."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
from pathlib import Path

# The suite is dominated by XLA compile time of many small tap loops; LLVM's heavy optimisation
# buys nothing at these sizes. Set before the CPU backend starts.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.geometry import Geometry, KernelCall
from svconv import _checks

REPO_ROOT = Path(__file__).resolve().parent.parent


def unit_roundoff(dtype) -> float:
    """Half the distance from 1 to the next number: the largest relative error of one rounding."""
    return float(jnp.finfo(dtype).eps) / 2


def tolerance(dtype, terms: int = 4096) -> float:
    """The largest error, relative to the expected array's largest magnitude (at least 1), that a
    kernel in ``dtype`` may show against a float32 (or float64) reference of ``terms`` summed
    products, FlashAttention-style: about twice the error of a reference that rounds its result
    to ``dtype`` (2 roundings), one more rounding for the inputs the kernel rounds on the way
    (a modulated tile, a scaled cotangent), and the accumulation's own random walk over the
    terms in float32 (or the dtype itself when wider)."""
    accumulation = jnp.promote_types(dtype, jnp.float32)
    return 3 * unit_roundoff(dtype) + unit_roundoff(accumulation) * math.sqrt(terms)


_DTYPE_IDS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One test geometry: ``x [n, h, w, cin]``, ``cout`` output channels (the pixel ops use
    ``cin``), a ``k`` window, the geometry keywords as the ops take them, and the options some
    tests vary: filter groups, a batch-shared modulation, the dtype, Pallas block sizes."""

    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: int | tuple[int, int] = 3
    stride: tuple[int, int] | int = 1
    dilation: tuple[int, int] | int = 1
    padding: object = 0
    groups: int = 1
    shared: bool = False
    dtype: object = jnp.float32
    block_sizes: object = None

    @property
    def id(self) -> str:
        def fmt(v):
            if isinstance(v, str | int):
                return str(v)
            return "x".join(fmt(e) if not isinstance(e, int) else str(e) for e in v)

        parts = [
            f"N{self.n}-H{self.h}W{self.w}-c{self.cin}o{self.cout}-k{fmt(self.k)}",
            f"s{fmt(self.stride)}-d{fmt(self.dilation)}-p{fmt(self.padding)}",
        ]
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.shared:
            parts.append("dshared")
        dtype = jnp.dtype(self.dtype).name
        if dtype != "float32":
            parts.append(_DTYPE_IDS.get(dtype, dtype))
        if self.block_sizes is not None:
            parts.append("tiled")
        return "-".join(parts)

    def geom(self) -> Geometry:
        """The normalised geometry (pairs, explicit padding, the output size)."""
        return _checks.geometry(
            in_size=(self.h, self.w),
            kernel_size=_checks.pair("k", self.k),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def kw(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def call(self, out_shape, interpret: bool, precision=None) -> KernelCall:
        """The kernels' static description of a result of ``out_shape`` for this case."""
        return KernelCall(
            self.geom(),
            tuple(out_shape),
            precision=precision,
            block_sizes=self.block_sizes,
            interpret=interpret,
        )


def random_cases(seed: int, count: int, max_k: int = 7) -> list[Case]:
    """Random small geometries covering kernel sizes 1..max_k, strides 1-3, dilations 1-2 and
    every padding form."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        k = (int(rng.integers(1, max_k + 1)), int(rng.integers(1, max_k + 1)))
        stride = [1, 2, (2, 1), (1, 3)][rng.integers(4)]
        dilation = [1, 1, 2, (1, 2)][rng.integers(4)]
        padding = [
            "SAME",
            "VALID",
            int(rng.integers(0, 3)),
            (
                (int(rng.integers(0, 3)), int(rng.integers(0, 3))),
                (int(rng.integers(0, 3)), int(rng.integers(0, 3))),
            ),
        ][rng.integers(4)]
        case = Case(
            n=int(rng.integers(1, 3)),
            h=int(rng.integers(5, 13)),
            w=int(rng.integers(5, 13)),
            cin=int(rng.integers(1, 6)),
            cout=int(rng.integers(1, 6)),
            k=k,
            stride=stride,
            dilation=dilation,
            padding=padding,
        )
        try:
            case.geom()
        except ValueError:  # kernel larger than the padded input: drawn again
            continue
        cases.append(case)
    return cases


def rand(key_or_seed, shape, dtype=jnp.float32) -> jax.Array:
    key = jax.random.key(key_or_seed) if isinstance(key_or_seed, int) else key_or_seed
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def rands(seed: int, *shapes, dtype=jnp.float32) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [rand(k, s, dtype) for k, s in zip(keys, shapes, strict=True)]


def run_bounded(command: list[str], timeout: float, **kwargs) -> tuple[int, str]:
    """Run ``command`` in a new session (so that a time limit stops its children too); returns
    the exit status and the output, or fails the test at the limit with the output's end."""
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n{output[-4000:]}")
    return proc.returncode, output


def assert_close(actual, expected, dtype=jnp.float32, tol=None, what="", terms: int = 4096):
    """Max abs error relative to the expected array's largest magnitude (at least 1), within
    :func:`tolerance` of ``dtype`` and ``terms`` unless ``tol`` is given. Complex arrays compare
    as complex (the modulus of the difference)."""
    as_complex = jnp.iscomplexobj(actual) or jnp.iscomplexobj(expected)
    kind = jnp.complex64 if as_complex else jnp.float32
    actual = np.asarray(jnp.asarray(actual, kind))
    expected = np.asarray(jnp.asarray(expected, kind))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0
    limit = tolerance(dtype, terms) if tol is None else tol
    assert err <= limit, f"{what}: relative error {err:.3g} > {limit:.3g}"


@pytest.fixture(autouse=True, scope="session")
def _exact_reference_dots():
    # The oracles (lax convs, einsums) must be exact in float32 on every backend.
    with jax.default_matmul_precision("highest"):
        yield
