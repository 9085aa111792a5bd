"""Compile every Pallas kernel of svconv to NVIDIA machine code on a machine without a GPU.

Each case of :data:`CASES` is an op at one shape and dtype, lowered for CUDA (abstract H100) with
``impl="pallas"``, forward and every gradient (``jax.vjp``) in one module, or forward mode
(``jax.jvp``). Every Triton kernel in the lowered module is compiled by the ``triton`` package
for sm_90 (H100/H200) and sm_80 (A100) with the ``num_warps``/``num_stages`` XLA would use, and
its cubin is read with the CUDA tools bundled with ``triton``: registers a thread, register
spills (ptxas's report), shared memory, and the count of tensor-core instructions (``HGMMA``:
Hopper warpgroup MMA; ``HMMA``: ``mma.sync``) and async copies (``LDGSTS``).

XLA compiles the same Triton IR with its own copy of Triton, close to but not the same as the
release used here: this is a strong check, a real GPU run is the final word.

``python -m experiments.static.machine_code`` runs the whole matrix and writes
``results/machine-code.md`` and ``results/machine-code.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp

import svconv
from experiments.static.lowering import TritonKernel, lower, triton_kernels
from pallas_kernels.triton import pixel

# Compute capability -> shared memory one block may use (the opt-in maximum; it includes the
# shared memory the cubin reserves statically, which the driver subtracts).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = tuple(SHARED_LIMIT)
GPU_NAMES = {90: "sm_90 (H100, H200)", 80: "sm_80 (A100)"}
# Triton uses Hopper's warpgroup MMA for a dot whose M tile is at least this, with num_warps a
# multiple of 4.
WGMMA_MIN_M = 64

_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
# `/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, ...` -> HGMMA
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``family`` is ``modulated``, ``local``, ``filter`` (``pixel_filter2d``),
    ``splat`` (``pixel_splat2d``), ``gaussian`` (``gaussian_filter2d`` with rotated elliptical
    Gaussians: its gradients run the splat and the scale-gradient kernels) or
    ``gaussian_splat`` (``gaussian_splat2d``, likewise) or ``deformable``
    (``deformable_conv2d``, its Triton kernels); ``groups`` applies to the pixel ops (and to
    ``deformable``: feature and offset groups alike), ``shared_d`` (one ``d``
    for the whole batch) to ``modulated``. The op is called with its default ``precision`` and
    lowered under JAX's default matmul precision ``precision``: ``"default"`` (float32 dots on
    TF32 tensor cores) or ``"highest"`` (exact float32 FMA dots)."""

    family: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: int
    dtype: str
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    shared_d: bool = False
    precision: str = "default"
    column_phases: int = 1  # ``filter``: the forward's tiles with this many column phases
    unmasked_interior: bool = False  # ``filter``: the forward's interior programs unmasked

    @property
    def id(self) -> str:
        pixel = self.family in ("filter", "splat", "gaussian", "gaussian_splat")
        channels = f"C{self.cin}" if pixel else f"{self.cin}to{self.cout}"
        parts = [
            self.family,
            f"N{self.n}",
            f"{self.h}x{self.w}",
            channels,
            f"k{self.k}",
            f"s{self.stride}",
            f"d{self.dilation}",
        ]
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.shared_d:
            parts.append("dshared")
        if self.precision != "default":
            parts.append(self.precision)
        if self.column_phases != 1:
            parts.append(f"J{self.column_phases}")
        if self.unmasked_interior:
            parts.append("U")
        return "-".join([*parts, self.dtype])

    def op(self) -> Callable[..., jax.Array]:
        geometry = {"stride": self.stride, "dilation": self.dilation, "padding": "SAME"}
        if self.family == "deformable":  # feature and offset groups: `groups` of each

            def deformable(x, w, offsets, mask):
                return svconv.deformable_conv2d(
                    x, w, offsets, mask, feature_group_count=self.groups, impl="triton",
                    **geometry,
                )  # fmt: skip

            return deformable
        if self.family in ("gaussian", "gaussian_splat"):
            op = svconv.gaussian_filter2d if self.family == "gaussian" else svconv.gaussian_splat2d

            def gaussian(x, sigma_rows, sigma_cols, rho):
                sigma = (sigma_rows, sigma_cols)
                return op(x, sigma, self.k, rho=rho, **geometry, impl="pallas")

            return gaussian
        fn = {
            "modulated": svconv.modulated_conv2d,
            "local": svconv.local_conv2d,
            "filter": svconv.pixel_filter2d,
            "splat": svconv.pixel_splat2d,
        }[self.family]
        if self.column_phases != 1 or self.unmasked_interior:
            # the forward's tiles (the gradients' kernels take them too)
            geometry["block_sizes"] = pixel.pixel_block_sizes(
                "forward",
                channels=self.cin,
                groups=self.groups,
                out_hw=(-(-self.h // self.stride), -(-self.w // self.stride)),
                batch=self.n,
                dtype=_DTYPES[self.dtype],
                column_phases=self.column_phases,
                unmasked_interior=self.unmasked_interior,
            )
        return functools.partial(fn, **geometry, impl="pallas")

    @property
    def kernels(self) -> int:
        """Distinct kernels in the forward and every gradient: the forward and one per slot it
        is differentiated in (the Gaussian's parameters share one kernel, for the scale)."""
        families = (
            "modulated", "local", "filter", "splat", "gaussian", "gaussian_splat", "deformable"
        )  # fmt: skip
        return dict(zip(families, (4, 3, 3, 3, 3, 3, 4), strict=True))[self.family]

    def args(self) -> list[jax.ShapeDtypeStruct]:
        """Abstract arguments: the kernels are compiled, never run, so no arrays are needed."""
        dtype = _DTYPES[self.dtype]
        # SAME padding: the output has ceil(size / stride) pixels a side (the splat's source).
        ho, wo = -(-self.h // self.stride), -(-self.w // self.stride)
        k, x = (self.k, self.k), (self.n, self.h, self.w, self.cin)
        tail = (self.groups,) if self.groups != 1 else ()
        shapes = {
            "modulated": [
                x,
                (*k, self.cin, self.cout),
                (ho, wo, *k) if self.shared_d else (self.n, ho, wo, *k),
            ],
            "local": [x, (ho, wo, *k, self.cin, self.cout)],
            "filter": [x, (self.n, ho, wo, *k, *tail)],
            "splat": [x, (self.n, self.h, self.w, *k, *tail)],
            "gaussian": [x, *[(self.n, ho, wo)] * 3],
            "gaussian_splat": [x, *[(self.n, self.h, self.w)] * 3],
            "deformable": [
                x,
                (*k, self.cin // self.groups, self.cout),
                (self.n, ho, wo, *k, self.groups, 2),
                (self.n, ho, wo, *k, self.groups),
            ],
        }[self.family]
        return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]


def _sweep(dtypes: Callable[[int], Iterable[str]]) -> list[Case]:
    """Small shapes for the geometry sweep: kernel sizes, strides, dilations, odd channel counts,
    groups, a batch-shared modulation. ``dtypes(i)`` gives the dtypes of the i-th geometry."""
    geometries = [
        Case(family, *shape, k, "")
        for k in (1, 3, 7, 15, 31)
        for family, shape in (
            ("modulated", (2, 32, 32, 16, 16)),
            ("local", (2, 16, 16, 8, 8)),
            ("filter", (2, 32, 32, 8, 8)),
        )
    ]
    geometries += [
        Case("modulated", 2, 33, 31, 3, 5, 3, "", stride=2),
        Case("modulated", 2, 32, 32, 16, 16, 3, "", dilation=2, shared_d=True),
        Case("local", 2, 17, 15, 3, 5, 3, "", stride=2, dilation=2),
        Case("filter", 2, 33, 31, 7, 7, 5, "", stride=2, groups=7),
        Case("filter", 2, 32, 32, 6, 6, 3, "", dilation=2, groups=3),
        Case("splat", 2, 16, 16, 5, 5, 5, "", stride=2),
        Case("gaussian", 2, 32, 32, 3, 3, 31, ""),
        Case("gaussian", 2, 33, 31, 5, 5, 7, "", stride=2, dilation=2),
        Case("deformable", 2, 33, 31, 32, 16, 3, "", stride=2, groups=2),
    ]
    return [
        dataclasses.replace(case, dtype=dtype)
        for i, case in enumerate(geometries)
        for dtype in dtypes(i)
    ]


def _design() -> list[Case]:
    """The DESIGN performance-target shapes, every dtype."""
    return [
        case
        for dtype in _DTYPES
        for case in (
            Case("modulated", 8, 128, 128, 64, 64, 3, dtype),
            Case("local", 8, 64, 64, 32, 32, 3, dtype),
            Case("filter", 8, 256, 256, 64, 64, 7, dtype),
            Case("filter", 8, 256, 256, 64, 64, 15, dtype),
            Case("gaussian", 8, 256, 256, 3, 3, 31, dtype),
            Case("deformable", 8, 128, 128, 64, 64, 3, dtype),
        )
    ]


# The pixel forward's variants not yet the default, at the DESIGN shapes: in interleaved column
# phases (the window's columns unrolled), and with interior programs unmasked.
_PHASED = [
    Case("filter", 8, 256, 256, 64, 64, 7, "f32", column_phases=4),
    Case("filter", 8, 256, 256, 64, 64, 15, "bf16", column_phases=4),
    Case("filter", 8, 256, 256, 64, 64, 7, "f32", unmasked_interior=True),
    Case("filter", 8, 256, 256, 64, 64, 7, "f32", column_phases=4, unmasked_interior=True),
]
# float32 with exact dots (``precision="highest"``): FMA, no tensor cores, the most registers.
_EXACT_F32 = [
    Case("modulated", 8, 128, 128, 64, 64, 3, "f32", precision="highest"),
    Case("local", 8, 64, 64, 32, 32, 3, "f32", precision="highest"),
]
# Every geometry in every dtype: the CLI's matrix.
CASES: list[Case] = _design() + _EXACT_F32 + _PHASED + _sweep(lambda i: _DTYPES)
# The test suite's: the DESIGN shapes in float32 and bfloat16 (the Gaussian's, whose kernels
# compile slowly at 31x31, in bfloat16; float16 compiles like bfloat16 and meets every family in
# the sweep), each sweep geometry in one dtype, taken in turn so that every op family meets every
# dtype across the kernel sizes.
TEST_CASES: list[Case] = (
    [c for c in _design() if c.dtype == "bf16" or (c.dtype == "f32" and c.family != "gaussian")]
    + _sweep(lambda i: [list(_DTYPES)[(i + i // 3) % 3]])
    + _PHASED
)
# Forward mode: one case per op (its kernels are the other cases' kernels with a tangent in
# another slot).
JVP_CASES: list[Case] = [
    Case("modulated", 8, 128, 128, 64, 64, 3, "bf16"),
    # The fused tangent kernel (two weight tiles and up to four image tiles per tap) in every
    # kind of dot, and with small tiles.
    Case("modulated", 8, 128, 128, 64, 64, 3, "f32"),
    Case("modulated", 8, 128, 128, 64, 64, 3, "f32", precision="highest"),
    Case("modulated", 2, 33, 31, 3, 5, 3, "f16", stride=2),
    Case("local", 8, 64, 64, 32, 32, 3, "bf16"),
    Case("filter", 8, 256, 256, 64, 64, 7, "bf16"),
    Case("splat", 2, 16, 16, 5, 5, 5, "bf16", stride=2),
    Case("gaussian", 2, 32, 32, 3, 3, 15, "bf16"),
    Case("gaussian_splat", 2, 16, 16, 3, 3, 7, "f16", stride=2),
]


def _lower_case(case: Case, mode: str) -> jax.stages.Lowered:
    fn, args = case.op(), case.args()
    n = len(args)
    if mode == "vjp":
        # Forward and every gradient in one module; the cotangent is abstract like the inputs.
        cotangent = jax.eval_shape(fn, *args)

        def program(*primals_and_cotangent):
            y, pullback = jax.vjp(fn, *primals_and_cotangent[:n])
            return y, pullback(primals_and_cotangent[n])

        args = [*args, cotangent]
    elif mode == "jvp":

        def program(*primals_and_tangents):
            return jax.jvp(fn, primals_and_tangents[:n], primals_and_tangents[n:])

        args = [*args, *args]
    else:
        raise ValueError(f"mode must be 'vjp' or 'jvp', not {mode!r}")
    with jax.default_matmul_precision(case.precision):
        return lower(program, *args)


def case_kernels(case: Case, mode: str = "vjp") -> list[TritonKernel]:
    """The Triton kernels of ``case`` lowered for CUDA (forward and gradients, or forward mode)."""
    return triton_kernels(_lower_case(case, mode))


# ------------------------------------------------------------------------------------------------
# Machine code
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MachineCode:
    """What ptxas made of one kernel for one architecture (``error`` when it did not compile)."""

    arch: int
    registers: int = 0  # a thread
    spill_stores: int = 0  # bytes a thread, from ptxas's report
    spill_loads: int = 0
    stack: int = 0  # stack frame, bytes a thread (where spills go)
    local: int = 0  # other local memory, bytes a thread
    shared: int = 0  # bytes a block: Triton's dynamic shared memory plus the cubin's static
    instructions: int = 0  # SASS instructions, NOPs excluded
    hgmma: int = 0
    hmma: int = 0
    ldgsts: int = 0
    error: str | None = None


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run_tool(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def compile_kernel(name: str, ttir: str, num_warps: int, num_stages: int, arch: int) -> MachineCode:
    """Compile one kernel's Triton IR for ``sm_<arch>`` and read its cubin.

    Runs Triton's own TTIR passes first (the ones XLA's Triton pipeline also runs: ``compile``
    skips the first stage of an IR file), all under a temporary cache directory. The spill
    figures come from the ``ptxas -v`` report Triton prints when asked to.
    """
    import triton
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    from triton.compiler.compiler import make_backend
    from triton.errors import TritonError

    target = GPUTarget("cuda", arch, 32)
    # Fused multiply-adds, as XLA compiles the kernels (triton 3.9 warns that its default
    # changes in 3.10).
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    backend = make_backend(target)
    ptxas_log = io.StringIO()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(triton.knobs.cache.scope())
        stack.enter_context(triton.knobs.nvidia.scope())
        triton.knobs.cache.dir = tmp
        triton.knobs.nvidia.dump_ptxas_log = True
        raw, source = Path(tmp, f"{name}.raw.ttir"), Path(tmp, f"{name}.ttir")
        raw.write_text(ttir)
        context = triton_ir.context()
        triton_ir.load_dialects(context)
        backend.load_dialects(context)
        try:
            module = triton_ir.parse_mlir_module(str(raw), context)
            module.context = context
            module = backend.make_ttir(module, {}, backend.parse_options(options), arch)
            source.write_text(str(module))
            with contextlib.redirect_stdout(ptxas_log):
                compiled = triton_compile(str(source), target=target, options=options)
        except (RuntimeError, TritonError) as e:  # a finding, reported in the kernel's row
            message = str(e).strip().splitlines() or [""]
            return MachineCode(arch, error=f"{type(e).__name__}: {message[0]}"[:300])
        cubin = Path(tmp, f"{name}.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _RESOURCES.search(
            _run_tool(_tool("cuobjdump"), "--dump-resource-usage", str(cubin))
        )
        sass = _run_tool(_tool("nvdisasm"), "-c", str(cubin))
    registers, stack, static_shared, local = (int(v) for v in usage.groups())
    spills = _SPILLS.search(ptxas_log.getvalue())
    opcodes = [op for op in _SASS_OPCODE.findall(sass) if op != "NOP"]
    return MachineCode(
        arch,
        registers=registers,
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        stack=stack,
        local=local,
        shared=compiled.metadata.shared + static_shared,
        instructions=len(opcodes),
        hgmma=opcodes.count("HGMMA"),
        hmma=opcodes.count("HMMA"),
        ldgsts=opcodes.count("LDGSTS"),
    )


def compile_triton_kernel(kernel: TritonKernel, arch: int) -> MachineCode:
    return compile_kernel(kernel.name, kernel.ttir, kernel.num_warps, kernel.num_stages, arch)


def problems(kernel: TritonKernel, code: MachineCode) -> list[str]:
    """What is wrong with one kernel's machine code (empty when nothing is)."""
    if code.error:
        return [f"does not compile: {code.error}"]
    found = []
    if code.spill_stores or code.spill_loads:
        found.append(
            f"spills: {code.spill_stores} bytes of spill stores, {code.spill_loads} of loads "
            f"({code.registers} registers)"
        )
    elif code.stack or code.local:
        found.append(f"local memory: {code.stack} bytes of stack frame, {code.local} other")
    if code.shared > SHARED_LIMIT[code.arch]:
        found.append(
            f"{code.shared} bytes of shared memory, over sm_{code.arch}'s {SHARED_LIMIT[code.arch]}"
        )
    if any(dot.tensor_cores for dot in kernel.dots) and not (code.hgmma or code.hmma):
        found.append("a dot without tensor-core instructions (no HGMMA, no HMMA)")
    wide = [d for d in kernel.dots if d.tensor_cores and d.m >= WGMMA_MIN_M]
    if code.arch >= 90 and wide and kernel.num_warps % 4 == 0 and not code.hgmma:
        found.append(f"a dot with M = {wide[0].m} >= {WGMMA_MIN_M} without HGMMA on sm_90")
    return found


# ------------------------------------------------------------------------------------------------
# The matrix
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One distinct kernel (IR and options) and its machine code per architecture."""

    kernel: TritonKernel
    cases: list[str]  # ids of the cases (and modes) that contain it
    code: dict[int, MachineCode] = dataclasses.field(default_factory=dict)

    def problems(self) -> dict[int, list[str]]:
        return {a: p for a, c in self.code.items() if (p := problems(self.kernel, c))}

    def summary(self) -> dict:
        k = self.kernel
        return {
            "kernel": k.name,
            "case": self.cases[0],
            "also_in": self.cases[1:],
            "key": k.key,
            "num_warps": k.num_warps,
            "num_stages": k.num_stages,
            "grid": list(k.grid),
            "dots": [dataclasses.asdict(d) for d in k.dots],
            "machine_code": {
                f"sm_{a}": {**dataclasses.asdict(c), "problems": problems(k, c)}
                for a, c in self.code.items()
            },
        }


def collect(
    cases: Iterable[tuple[Case, str]], log: Callable[[str], None] = print
) -> tuple[dict[str, Row], dict[str, str]]:
    """Lower every (case, mode); returns the distinct kernels by key, and the cases that did not
    lower with why."""
    rows: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    for case, mode in cases:
        label = f"{case.id} ({mode})"
        try:
            kernels = case_kernels(case, mode)
        except Exception as e:
            skipped[label] = f"{type(e).__name__}: {e}"
            log(f"{label}: not lowered: {skipped[label]}")
            continue
        for kernel in kernels:
            rows.setdefault(kernel.key, Row(kernel, [])).cases.append(label)
    return rows, skipped


def compile_rows(
    rows: Iterable[Row], archs=ARCHS, workers: int = 2, log: Callable[[str], None] = print
) -> None:
    """Compile every row for every arch, in ``workers`` processes."""
    jobs = [(row, arch) for row in rows for arch in archs]
    # Spawned, not forked: the parent runs JAX's threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {
            pool.submit(
                compile_kernel,
                row.kernel.name,
                row.kernel.ttir,
                row.kernel.num_warps,
                row.kernel.num_stages,
                arch,
            ): (row, arch)
            for row, arch in jobs
        }
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            row, arch = futures[future]
            row.code[arch] = future.result()
            if found := problems(row.kernel, row.code[arch]):
                log(f"{row.kernel.name} sm_{arch} ({row.cases[0]}): {'; '.join(found)}")
            if i % 50 == 0 or i == len(jobs):
                log(f"compiled {i}/{len(jobs)}")


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


TABLE_HEAD = (
    "| kernel | case | dots (M x N x K) | warps/stages | arch | regs | spill B st/ld | stack B "
    "| shared KiB | HGMMA | HMMA | LDGSTS | instrs | problems |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_line(kernel: TritonKernel, case: str, code: MachineCode) -> str:
    """One line of the markdown table (:data:`TABLE_HEAD`)."""
    dots = ", ".join(
        f"{d.m}x{d.n}x{d.k} {d.dtype}" + (f" {d.precision}" if d.precision else "")
        for d in sorted(set(kernel.dots), key=lambda d: (d.m, d.n, d.k))
    )
    if code.error:
        numbers = ["-"] * 8
    else:
        numbers = [
            code.registers,
            f"{code.spill_stores}/{code.spill_loads}",
            code.stack,
            _kib(code.shared),
            code.hgmma,
            code.hmma,
            code.ldgsts,
            code.instructions,
        ]
    cells = [
        kernel.name,
        case,
        dots or "-",
        f"{kernel.num_warps}/{kernel.num_stages}",
        f"sm_{code.arch}",
        *numbers,
        "; ".join(problems(kernel, code)),
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(rows: Iterable[Row], archs=ARCHS) -> str:
    """Markdown table, one line per kernel and arch."""
    lines = [TABLE_HEAD]
    for row in rows:
        lines += [table_line(row.kernel, row.cases[0], row.code[a]) for a in archs if a in row.code]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import triton

    ptxas = _run_tool(_tool("ptxas"), "--version")
    return {
        "triton": triton.__version__,
        "ptxas": re.search(r"release ([\d.]+)", ptxas).group(1),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def _span(values: Iterable) -> str:
    values = list(values)
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _summary(rows: list[Row]) -> list[str]:
    """One line per kernel function: ranges over its cases, per arch."""
    head = ["kernel", "distinct kernels"] + [
        f"{what} sm_{a}"
        for a in ARCHS
        for what in ("regs", "shared KiB", "spill B", "tensor cores")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted({r.kernel.name for r in rows}):
        mine = [r for r in rows if r.kernel.name == name]
        cells = [name, str(len(mine))]
        for arch in ARCHS:
            codes = [r.code[arch] for r in mine if arch in r.code and not r.code[arch].error]
            units = [
                ("HGMMA", sum(c.hgmma > 0 for c in codes)),
                ("HMMA", sum(c.hmma > 0 and not c.hgmma for c in codes)),
                ("none", sum(not (c.hmma or c.hgmma) for c in codes)),
            ]
            cells += [
                _span(c.registers for c in codes),
                _span(round(c.shared / 1024, 1) for c in codes),
                _span(c.spill_stores for c in codes),
                ", ".join(f"{unit} {n}" for unit, n in units if n),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(
    cases: list[Case], rows: dict[str, Row], skipped: dict[str, str], out: Path, seconds: float
) -> None:
    """``results/machine-code.{md,json}`` for the kernels of ``cases`` (see :func:`collect`)."""
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows.values(), key=lambda r: (r.kernel.name, r.cases[0]))
    versions = _versions()
    record = {
        "targets": {f"sm_{a}": GPU_NAMES[a] for a in ARCHS},
        "shared_limit_bytes": {f"sm_{a}": SHARED_LIMIT[a] for a in ARCHS},
        "versions": versions,
        "seconds": round(seconds),
        "cases": [c.id for c in cases],
        "not_lowered": skipped,
        "kernels": [r.summary() for r in ordered],
    }
    (out / "machine-code.json").write_text(json.dumps(record, indent=1) + "\n")
    found = [
        f"* {r.kernel.name}, {r.cases[0]}, sm_{arch}: {'; '.join(p)}"
        for r in ordered
        for arch, p in r.problems().items()
    ]
    lines = [
        "# Machine code of the Pallas kernels",
        "",
        f"Every Triton kernel of svconv's Pallas implementation in {len(cases)} cases (forward "
        "and every gradient, through `jax.vjp`), lowered for CUDA on a machine without a GPU and "
        f"compiled with the `triton` package {versions['triton']} (ptxas {versions['ptxas']}) "
        f"for {' and '.join(GPU_NAMES.values())}; JAX {versions['jax']}. Written by "
        f"`python -m experiments.static.machine_code` in {seconds:.0f} s.",
        "",
        f"Checked: no register spills; shared memory within {_kib(SHARED_LIMIT[90])} KiB on sm_90, "
        f"{_kib(SHARED_LIMIT[80])} KiB on sm_80; tensor-core instructions in every kernel with a "
        f"TF32 or 16-bit dot, HGMMA on sm_90 where the dot's M is {WGMMA_MIN_M} or more. Float32 "
        "cases use JAX's default precision (TF32 dots) unless their id ends in `highest` "
        "(exact float32: FMA, no tensor cores).",
        "",
        f"## Problems ({len(found)})",
        "",
        *(found or ["None."]),
        "",
    ]
    if skipped:
        lines += ["Not lowered:", ""]
        lines += [f"* {label}: {why}" for label, why in skipped.items()]
        lines.append("")
    lines += [
        f"## Summary: {len(ordered)} distinct kernels",
        "",
        "Ranges over the cases; tensor cores: how many of the kernels use HGMMA (Hopper "
        "warpgroup MMA), HMMA only (`mma.sync`), or neither.",
        "",
        *_summary(ordered),
        "",
        "## Kernels",
        "",
        "One line per distinct kernel (same IR and options) and architecture; `case`: the first "
        "case that contains it. Registers a thread; spill: ptxas's spill stores/loads, bytes a "
        "thread; stack: the stack frame; shared: Triton's dynamic shared memory plus the cubin's "
        "static reservation; LDGSTS: async copies; instrs: SASS instructions, NOPs excluded.",
        "",
        table(ordered),
        "",
    ]
    (out / "machine-code.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, skipped = collect([(c, "vjp") for c in CASES] + [(c, "jvp") for c in JVP_CASES])
    print(f"{len(rows)} distinct kernels; compiling for " + ", ".join(f"sm_{a}" for a in ARCHS))
    compile_rows(rows.values(), workers=args.workers)
    write_results(CASES, rows, skipped, args.out, time.perf_counter() - start)
    failing = [r for r in rows.values() if r.problems()]
    print(f"wrote {args.out}/machine-code.md and .json; {len(failing)} kernels with problems")
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())
