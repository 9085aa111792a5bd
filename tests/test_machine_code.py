"""Every Pallas kernel compiles to sm_90 and sm_80 machine code with no register spills, shared
memory within the architecture's limit, and tensor-core instructions wherever it has a dot
(HGMMA on sm_90 for dots with M >= 64).

The kernels are lowered for CUDA on the CPU (abstract H100) from the public ops, forward and
every gradient through `jax.vjp` and forward mode through `jax.jvp`, and compiled by the
`triton` package that the `machine-code` extra pins. A strong check, not a GPU run: XLA compiles
the same IR with its own Triton. The whole matrix and its table:
`python -m experiments.static.machine_code` (results/machine-code.md).
"""

from __future__ import annotations

import functools

import pytest

triton = pytest.importorskip(
    "triton",
    reason="the machine-code check needs the `triton` package (the `machine-code` extra)",
    exc_type=ImportError,
)
import jax  # noqa: E402

# The triton releases that parse the Triton IR each JAX's Pallas emits, and whose figures the
# check was written against: the `machine-code` extra pins 3.8.0 for jax 0.11 (the GPU
# machines' JAX); jax 0.12's IR fails to parse in 3.8 ("Parse MLIR file failed") and compiles
# with 3.9 (`make test-jax-next`). Older releases (a GPU machine's own, say) may not know every
# op and attribute of that IR, and their ptxas reports other figures.
SUPPORTED_TRITON = {"0.11": ("3.8.", "3.9."), "0.12": ("3.9.",)}
_JAX = ".".join(jax.__version__.split(".")[:2])
if not triton.__version__.startswith(SUPPORTED_TRITON.get(_JAX, ())):
    pytest.skip(
        f"the machine-code check of jax {_JAX} needs triton "
        f"{' or '.join(v.rstrip('.') for v in SUPPORTED_TRITON.get(_JAX, ('(none known)',)))}; "
        f"triton {triton.__version__} is installed",
        allow_module_level=True,
    )

from experiments.static import machine_code as mc  # noqa: E402
from experiments.static.lowering import TritonKernel  # noqa: E402

ARCH_IDS = [f"sm_{a}" for a in mc.ARCHS]


@functools.cache
def _kernels(case: mc.Case, mode: str) -> tuple[TritonKernel, ...]:
    return tuple(mc.case_kernels(case, mode))


# (kernel IR and options, arch) -> machine code: identical kernels of different cases compile once.
_COMPILED: dict[tuple[str, int], mc.MachineCode] = {}


def _compiled(kernel: TritonKernel, arch: int) -> mc.MachineCode:
    key = (kernel.key, arch)
    if key not in _COMPILED:
        _COMPILED[key] = mc.compile_triton_kernel(kernel, arch)
    return _COMPILED[key]


def _check(label: str, kernels: tuple[TritonKernel, ...], arch: int) -> None:
    lines = []
    for kernel in kernels:
        code = _compiled(kernel, arch)
        if mc.problems(kernel, code):
            lines.append(mc.table_line(kernel, label, code))
    assert not lines, "\n".join(["machine code with problems:", mc.TABLE_HEAD, *lines])


@pytest.mark.parametrize("arch", mc.ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("case", mc.TEST_CASES, ids=lambda c: c.id)
def test_forward_and_gradients(case, arch):
    kernels = _kernels(case, "vjp")
    # The forward kernel and one per gradient, all compiled (no XLA fallback in between).
    assert len({k.name for k in kernels}) == case.kernels, [k.name for k in kernels]
    _check(f"{case.id} (vjp)", kernels, arch)


@pytest.mark.parametrize("arch", mc.ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("case", mc.JVP_CASES, ids=lambda c: c.id)
def test_forward_mode(case, arch):
    kernels = _kernels(case, "jvp")
    assert kernels
    _check(f"{case.id} (jvp)", kernels, arch)
