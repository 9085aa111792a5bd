"""Compile svconv's Mosaic GPU kernels to H100 machine code on a machine without a GPU.

The Triton kernels' machine code is checked by :mod:`experiments.static.machine_code`, with the
`triton` package's own compiler. The Mosaic GPU kernels (``impl="mosaic"``) have no such
stand-alone compiler: XLA's CUDA plugin lowers them to PTX and runs ptxas while it compiles the
program. That plugin compiles without a GPU too, for a device described by a target config
(:data:`H100_TARGET_CONFIG`, sm_90a), and with ``MOSAIC_GPU_DUMP_TO`` set it writes, for every
Mosaic kernel it compiles, the PTX, ptxas's report (registers, spills, stack frame) and the
kernel's shared-memory budget. This module compiles each case of :data:`CASES` that way, through
the public ops (``pixel_filter2d`` and ``gaussian_filter2d``: forward, forward mode through
``jax.jvp`` with the fused tangent kernels, and the Gaussian's gradient in ``sigma`` and ``rho``
through ``jax.vjp``; the gradients that the Triton kernels run are left out), and reads the
dumps: no register spills, shared memory within the 227 KiB a block may use on sm_90.

It needs the CUDA plugin (``jax-cuda13-plugin``, pinned with jax by ``make machine-code-mosaic``)
and a CUDA toolkit with ``ptxas`` where JAX looks for one (``CUDA_ROOT``, the ``nvidia`` CUDA
wheels, ``/usr/local/cuda``); without them it exits with status :data:`CANNOT_CHECK`. The figures
are those of the ptxas found, which may differ from a GPU machine's: a strong check, a GPU run
is the final word.

``python -m experiments.static.mosaic_machine_code`` compiles every case and writes
``results/mosaic-machine-code.md`` and ``.json``; exit status 1 when a kernel has a problem.
``--cases small --json-out FILE`` compiles the small cases only and writes the JSON record to
``FILE`` (the test suite's check, in a child process: the compile needs ``JAX_PLATFORMS=cpu``
before JAX starts its backends).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp

import svconv
from experiments.static.lowering import abstract_gpu

# Shared memory one block may use on sm_90 (the opt-in maximum, static reservations included).
SHARED_LIMIT = 227 * 1024
# Exit status when this machine cannot compile the kernels (no CUDA plugin, no ptxas).
CANNOT_CHECK = 3
PLUGIN_DISTRIBUTION = "jax-cuda13-plugin"
PLUGIN_MODULE = "jax_plugins.xla_cuda13"

# The H100 SXM description of XLA's GPU target configs (xla/backends/gpu/target_config/specs/
# h100_sxm.txtpb), trimmed to the device info: what the plugin needs to compile for sm_90a
# without a GPU. The `feature_extension` selects the `a` (architecture-specific) features that
# the Mosaic kernels' TMA copies and barriers use.
H100_TARGET_CONFIG = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  name: "NVIDIA H100 80GB HBM3"
  driver_version: "13.0.0"
  runtime_version: "13.0.0"
  compile_time_toolkit_version: "13.0.0"
  dnn_version: "9.10.0"
  cub_version: "3.1.2"
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 10
  patch: 0
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}
_SCRATCH = re.compile(r"smem_scratch_bytes=(\d+)")
# `Barrier(arrival_count=1, num_barriers=7, orders_tensor_core=False): 1` (8 bytes each)
_BARRIERS = re.compile(r"num_barriers=(\d+)[^)]*\): (\d+)")
# A dump's basename: the kernel's name and a counter, `svconv_pixel_forward_mosaic_0`.
_BASENAME = re.compile(r"^(.*)_\d+$")


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``family`` is ``filter`` (``pixel_filter2d``) or ``gaussian``
    (``gaussian_filter2d``, isotropic ``sigma``, with ``rho`` when ``rho``), ``stride`` and
    ``dilation`` as (rows, columns). ``modes``: the programs compiled, of ``forward``, ``jvp``
    (forward mode in every operand), ``vjp`` (reverse mode in every operand) and ``hvp``
    (forward mode of the reverse one in the image)."""

    family: str
    n: int
    h: int
    w: int
    c: int
    k: int
    dtype: str
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    rho: bool = False
    cout: int = 0  # the modulated conv's output channels

    @property
    def modes(self) -> tuple[str, ...]:
        """Every program, but the splat's tangent with a stride (no Mosaic kernel in it); the
        modulated conv's forward, forward mode and reverse mode (the gradients in the image, the
        modulation and, for 16-bit types with multiples of 64 channels, the weights; float32's
        gradient in the weights is the Triton kernel's)."""
        if self.family == "modulated":
            return ("forward", "jvp", "vjp")
        if self.family == "local":  # (its gradient in the image is the Triton kernel's)
            return ("forward", "jvp", "vjp")
        if self.stride != (1, 1):
            return ("forward", "jvp", "vjp")
        return ("forward", "jvp", "vjp", "hvp")

    @property
    def id(self) -> str:
        def pair(v: tuple[int, int]) -> str:
            return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"

        chans = f"C{self.c}" + (f"-{self.cout}" if self.family in ("modulated", "local") else "")
        parts = [self.family, f"N{self.n}", f"{self.h}x{self.w}", chans, f"k{self.k}"]
        parts += [f"s{pair(self.stride)}", f"d{pair(self.dilation)}"]
        if self.rho:
            parts.append("rho")
        return "-".join([*parts, self.dtype])

    @property
    def out_size(self) -> tuple[int, int]:
        """SAME padding: ``ceil(size / stride)`` pixels a side."""
        return -(-self.h // self.stride[0]), -(-self.w // self.stride[1])

    def op(self) -> Callable[..., jax.Array]:
        """The op on arrays: ``(x, k)`` for the filter, ``(x, sigma[, rho])`` for the
        Gaussian."""
        geometry = {"stride": self.stride, "dilation": self.dilation, "padding": "SAME"}
        if self.family == "filter":
            return functools.partial(svconv.pixel_filter2d, **geometry, impl="mosaic")
        if self.family == "local":
            return functools.partial(svconv.local_conv2d, **geometry, impl="mosaic")
        if self.family == "modulated":  # TF32 for float32: the default precision, explicitly
            return functools.partial(
                svconv.modulated_conv2d, **geometry, precision=jax.lax.Precision.DEFAULT,
                impl="mosaic",
            )  # fmt: skip

        def gaussian(x, sigma, rho=None):
            return svconv.gaussian_filter2d(x, sigma, self.k, rho=rho, **geometry, impl="mosaic")

        return gaussian

    def shapes(self) -> list[tuple[int, ...]]:
        grid = (self.n, *self.out_size)
        x = (self.n, self.h, self.w, self.c)
        if self.family == "filter":
            return [x, (*grid, self.k, self.k)]
        if self.family == "modulated":
            return [x, (self.k, self.k, self.c, self.cout), (*grid, self.k, self.k)]
        if self.family == "local":
            return [x, (*self.out_size, self.k, self.k, self.c, self.cout)]
        return [x, grid, grid] if self.rho else [x, grid]


def _cases(dtypes: Iterable[str]) -> list[Case]:
    """The DESIGN GPU shapes of the ops the Mosaic kernels run."""
    filters = [Case("filter", 8, 256, 256, 64, k, dtype) for dtype in dtypes for k in (7, 15)]
    modulated = [Case("modulated", 8, 128, 128, 64, 3, dtype, cout=64) for dtype in dtypes]
    local = [Case("local", 8, 128, 128, 32, 3, dtype, cout=32) for dtype in dtypes]
    return (
        filters
        + modulated
        + local
        + [Case("gaussian", 8, 256, 256, 64, 31, "f32", rho=rho) for rho in (False, True)]
    )


# Small shapes, strided (the splat then the Triton kernel's) and dilated: the geometry's code
# paths, quick to compile.
SMALL_CASES: list[Case] = [
    Case("filter", 1, 16, 64, 16, 3, "f32", stride=(2, 1), dilation=(2, 2)),
    Case("filter", 1, 16, 64, 16, 3, "bf16", dilation=(2, 2)),
    Case("gaussian", 1, 16, 64, 16, 5, "bf16", dilation=(2, 2), rho=True),
    Case("modulated", 1, 16, 64, 16, 3, "bf16", stride=(2, 1), dilation=(2, 2), cout=32),
    Case("modulated", 1, 16, 64, 64, 3, "f32", cout=16),
    # The weight gradient's kernel (16-bit, multiples of 64 channels).
    Case("modulated", 1, 16, 64, 64, 3, "bf16", dilation=(2, 1), cout=64),
    Case("local", 2, 8, 64, 8, 3, "f32", stride=(2, 1), dilation=(1, 2), cout=16),
]
CASES: list[Case] = _cases(_DTYPES) + SMALL_CASES
CASE_SETS = {"all": CASES, "small": SMALL_CASES}


def program(case: Case, mode: str) -> Callable[..., object]:
    """The function compiled for ``case`` in ``mode``, on :func:`arguments`."""
    fn, n = case.op(), len(case.shapes())
    if mode == "forward":
        return fn
    if mode == "jvp":

        def forward_mode(*primals_and_tangents):
            return jax.jvp(fn, primals_and_tangents[:n], primals_and_tangents[n:])

        return forward_mode
    if mode == "vjp":

        def reverse_mode(*operands_and_cotangent):
            y, pullback = jax.vjp(fn, *operands_and_cotangent[:-1])
            return y, pullback(operands_and_cotangent[-1])

        return reverse_mode
    if mode == "hvp":
        # The splat's tangent: forward mode, in the cotangent and the weights, of the
        # gradient in the image.
        def forward_of_reverse(x, *rest):
            weights, cotangent = rest[: n - 1], rest[n - 1]
            t_weights, t_cotangent = rest[n : 2 * n - 1], rest[2 * n - 1]

            def splat(cotangent, *weights):
                return jax.vjp(lambda x: fn(x, *weights), x)[1](cotangent)[0]

            return jax.jvp(splat, (cotangent, *weights), (t_cotangent, *t_weights))

        return forward_of_reverse
    raise ValueError(f"mode must be 'forward', 'jvp', 'vjp' or 'hvp', not {mode!r}")


def arguments(case: Case, mode: str, sharding: jax.sharding.Sharding) -> list[jax.ShapeDtypeStruct]:
    """Abstract arguments on the H100 of the topology: the program is compiled, never run."""
    dtype = _DTYPES[case.dtype]
    shapes = case.shapes()
    wide = case.family in ("modulated", "local")
    cotangent = (case.n, *case.out_size, case.cout if wide else case.c)
    if mode == "jvp":
        shapes = shapes * 2
    elif mode == "vjp":
        shapes = [*shapes, cotangent]
    elif mode == "hvp":  # x; the weights and the cotangent; their tangents
        shapes = [shapes[0], *shapes[1:], cotangent, *shapes[1:], cotangent]
    return [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]


# ------------------------------------------------------------------------------------------------
# Compiling and reading the dumps
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MachineCode:
    """What ptxas made of one Mosaic kernel for sm_90a (``error`` when its dumps are missing)."""

    registers: int = 0  # a thread
    spill_stores: int = 0  # bytes a thread
    spill_loads: int = 0
    stack: int = 0  # stack frame, bytes a thread
    scratch: int = 0  # the kernel's shared memory (rings, staging buffers), bytes a block
    barriers: int = 0  # mbarriers in shared memory, 8 bytes each
    static_shared: int = 0  # what the cubin reserves, bytes a block
    error: str | None = None

    @property
    def shared(self) -> int:
        """Shared memory a block: the scratch, the barriers and the static reservation."""
        return self.scratch + 8 * self.barriers + self.static_shared

    def problems(self) -> list[str]:
        """What is wrong with the kernel's machine code (empty when nothing is)."""
        if self.error:
            return [self.error]
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(
                f"spills: {self.spill_stores} bytes of spill stores, {self.spill_loads} of loads "
                f"({self.registers} registers)"
            )
        if self.shared > SHARED_LIMIT:
            found.append(f"{self.shared} bytes of shared memory, over sm_90's {SHARED_LIMIT}")
        return found


def read_dump(directory: Path, basename: str) -> MachineCode:
    """One kernel's figures from ``<basename>.ptxas`` and ``<basename>.resources.txt``."""
    ptxas, resources = directory / f"{basename}.ptxas", directory / f"{basename}.resources.txt"
    missing = [p.name for p in (ptxas, resources) if not p.exists()]
    if missing:
        return MachineCode(error=f"no {' or '.join(missing)} in the dumps")
    report = ptxas.read_text()
    figures = {name: pattern.search(report) for name, pattern in _PTXAS.items()}
    if figures["registers"] is None:
        return MachineCode(error=f"ptxas report not understood: {report.strip()[:200]!r}")
    text = resources.read_text()
    scratch = _SCRATCH.search(text)
    barriers = sum(int(n) * int(count) for n, count in _BARRIERS.findall(text))
    return MachineCode(
        **{name: int(m.group(1)) if m else 0 for name, m in figures.items()},
        scratch=int(scratch.group(1)) if scratch else 0,
        barriers=barriers,
    )


@dataclasses.dataclass
class Row:
    """One distinct kernel (same PTX) and the cases (and modes) that contain it."""

    name: str
    key: str
    code: MachineCode
    cases: list[str]

    def summary(self) -> dict:
        return {
            "kernel": self.name,
            "case": self.cases[0],
            "also_in": self.cases[1:],
            "key": self.key,
            **dataclasses.asdict(self.code),
            "shared": self.code.shared,
            "problems": self.code.problems(),
        }


def topology_sharding() -> jax.sharding.Sharding:
    """The one device of a deviceless H100 topology, which the CUDA plugin compiles for."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=H100_TARGET_CONFIG
    )
    return jax.sharding.SingleDeviceSharding(topology.devices[0])


def compile_case(
    case: Case, mode: str, sharding: jax.sharding.Sharding, dumps: Path
) -> dict[str, list[str]]:
    """Compile ``case`` in ``mode``; returns the basenames of the new dumps of the kernels in
    the compiled program by kernel name. Traced and lowered under the abstract H100 (svconv
    picks its kernels by the device's compute capability), compiled by the plugin for the
    topology's device. A kernel lowered but left out of the optimized program (the Gaussian's
    reverse mode lowers forward kernels whose results nothing uses) has no PTX: it is skipped."""
    before = {p.name for p in dumps.iterdir()}
    with abstract_gpu():
        lowered = jax.jit(program(case, mode)).trace(*arguments(case, mode, sharding)).lower()
    lowered.compile()
    found: dict[str, list[str]] = {}
    for path in sorted(dumps.iterdir()):
        if path.name in before:
            continue
        if path.name.endswith(".mlir-passes.log"):
            path.unlink()  # every pass's IR: tens of MB a kernel, not needed here
        elif path.name.endswith(".resources.txt"):
            basename = path.name.removesuffix(".resources.txt")
            if not (dumps / f"{basename}.ptx").exists():
                continue
            match = _BASENAME.match(basename)
            found.setdefault(match.group(1) if match else basename, []).append(basename)
    return found


def collect(
    cases: Iterable[Case], dumps: Path, log: Callable[[str], None] = print
) -> tuple[dict[str, Row], dict[str, str]]:
    """Compile every case in every mode; returns the distinct kernels by key, and the programs
    that did not compile with why."""
    sharding = topology_sharding()
    rows: dict[str, Row] = {}
    failed: dict[str, str] = {}
    for case in cases:
        for mode in case.modes:
            label = f"{case.id} ({mode})"
            start = time.perf_counter()
            try:
                kernels = compile_case(case, mode, sharding, dumps)
            except Exception as e:  # a finding, reported with the results
                failed[label] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                log(f"{label}: not compiled: {failed[label]}")
                continue
            if not kernels:
                failed[label] = "no Mosaic kernel in the compiled program"
            for name, basenames in kernels.items():
                for basename in basenames:
                    ptx = (dumps / f"{basename}.ptx").read_bytes()
                    key = hashlib.sha256(ptx).hexdigest()[:16]
                    row = rows.setdefault(key, Row(name, key, read_dump(dumps, basename), []))
                    if label not in row.cases:
                        row.cases.append(label)
            log(f"{label}: {', '.join(sorted(kernels))} ({time.perf_counter() - start:.1f} s)")
    return rows, failed


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _ptxas() -> Path:
    """The ptxas the plugin runs: ``$MOSAIC_GPU_CUDA_ROOT/bin/ptxas``, which JAX sets when
    ``jax.experimental.mosaic.gpu`` is imported."""
    import jax.experimental.mosaic.gpu  # noqa: F401

    return Path(os.environ.get("MOSAIC_GPU_CUDA_ROOT", "/usr/local/cuda"), "bin", "ptxas")


def versions() -> dict[str, str]:
    ptxas = subprocess.run(
        [str(_ptxas()), "--version"], check=True, capture_output=True, text=True
    ).stdout
    release = re.search(r"release ([\d.]+), (V[\d.]+)", ptxas)
    return {
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        PLUGIN_DISTRIBUTION: importlib.metadata.version(PLUGIN_DISTRIBUTION),
        "ptxas": " ".join(release.groups()) if release else ptxas.strip().splitlines()[-1],
        "python": platform.python_version(),
    }


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


TABLE_HEAD = (
    "| kernel | PTX | case | regs | spill B st/ld | stack B | scratch KiB | barriers "
    "| shared KiB | problems |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _ordered(rows: dict[str, Row]) -> list[Row]:
    return sorted(rows.values(), key=lambda r: (r.name, r.cases[0]))


def table(rows: Iterable[Row]) -> str:
    """Markdown table, one line per distinct kernel (:data:`TABLE_HEAD`)."""
    lines = [TABLE_HEAD]
    for row in rows:
        c = row.code
        numbers = (
            ["-"] * 6
            if c.error
            else [
                c.registers,
                f"{c.spill_stores}/{c.spill_loads}",
                c.stack,
                _kib(c.scratch),
                c.barriers,
                _kib(c.shared),
            ]
        )
        cells = [row.name, row.key[:8], row.cases[0], *numbers, "; ".join(c.problems())]
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return "\n".join(lines)


def record(cases: list[Case], rows: dict[str, Row], failed: dict[str, str], seconds: float) -> dict:
    """The JSON record: versions, date, every distinct kernel, the problems."""
    ordered = _ordered(rows)
    problems = [
        f"{r.name}, {r.cases[0]}: {'; '.join(p)}" for r in ordered if (p := r.code.problems())
    ]
    problems += [f"{label}: not compiled: {why}" for label, why in failed.items()]
    return {
        "target": "sm_90a (H100 SXM), compiled without a GPU by XLA's CUDA plugin",
        "shared_limit_bytes": SHARED_LIMIT,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "seconds": round(seconds),
        "cases": [c.id for c in cases],
        "not_compiled": failed,
        "kernels": [r.summary() for r in ordered],
        "problems": problems,
    }


def markdown(data: dict, rows: dict[str, Row]) -> str:
    """The markdown report of :func:`record`'s ``data`` on ``rows``."""
    v = data["versions"]
    ordered = _ordered(rows)
    lines = [
        "# Machine code of the Mosaic GPU kernels",
        "",
        f"Every Mosaic GPU kernel of svconv in {len(data['cases'])} cases (`pixel_filter2d` and "
        "`gaussian_filter2d`: forward, forward mode, reverse mode and forward mode of the "
        "reverse; `modulated_conv2d`: forward, forward mode and the gradients, TF32 for float32, "
        "whose gradient in the weights is the Triton kernel's; `local_conv2d`: forward, "
        "forward mode and the gradient in the weights (its gradient in the image is the Triton "
        "kernel's); "
        '`impl="mosaic"`), compiled for sm_90a (H100) on a machine '
        f"without a GPU by XLA's CUDA plugin ({PLUGIN_DISTRIBUTION} {v[PLUGIN_DISTRIBUTION]}, "
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, ptxas {v['ptxas']}) on {data['date']}. Written by "
        f"`python -m experiments.static.mosaic_machine_code` in {data['seconds']} s.",
        "",
        f"Checked: no register spills; shared memory within {_kib(SHARED_LIMIT)} KiB a block.",
        "",
        f"## Problems ({len(data['problems'])})",
        "",
        *([f"* {p}" for p in data["problems"]] or ["None."]),
        "",
        f"## Kernels ({len(ordered)} distinct)",
        "",
        "One line per distinct kernel (PTX: the start of its PTX's SHA-256); `case`: the "
        "first case (and program) that contains it, the JSON lists the others. Registers a "
        "thread; spill: ptxas's spill stores/loads, bytes a thread; stack: the stack frame; "
        "scratch: the kernel's shared memory (rings of input rows, weights, staged operands, "
        "output staging); shared: the scratch, the barriers (8 bytes each) and the cubin's "
        "static reservation.",
        "",
        table(ordered),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", choices=sorted(CASE_SETS), default="all")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--json-out", type=Path, help="write the JSON record here only (no results/ files)"
    )
    args = parser.parse_args(argv)
    try:
        importlib.import_module(PLUGIN_MODULE)
    except ImportError:
        print(f"no CUDA plugin ({PLUGIN_DISTRIBUTION}): cannot compile", file=sys.stderr)
        return CANNOT_CHECK
    if not _ptxas().exists():
        print(f"no ptxas at {_ptxas()}: cannot compile", file=sys.stderr)
        return CANNOT_CHECK
    # The plugin compiles for the topology's device; no GPU is used even where there is one.
    jax.config.update("jax_platforms", "cpu")
    cases = CASE_SETS[args.cases]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOSAIC_GPU_DUMP_TO"] = tmp
        try:
            rows, failed = collect(cases, Path(tmp))
        finally:
            del os.environ["MOSAIC_GPU_DUMP_TO"]
            shutil.rmtree(tmp, ignore_errors=True)
    data = record(cases, rows, failed, time.perf_counter() - start)
    if args.json_out:
        args.json_out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mosaic-machine-code.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "mosaic-machine-code.md").write_text(markdown(data, rows))
        print(f"wrote {args.out}/mosaic-machine-code.md and .json")
    print(table(_ordered(rows)))
    print(f"Problems ({len(data['problems'])})", *data["problems"], sep="\n")
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
