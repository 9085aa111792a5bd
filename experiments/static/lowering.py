"""Lower a function for CUDA on a machine without a GPU (abstract H100), and read the Triton
kernels out of the result."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import re

import jax
from jaxlib.mlir import ir
from jaxlib.triton import dialect as triton_dialect

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132
)
_TRITON_TARGET = "__gpu$xla.gpu.triton"
_TRITON_CALL = re.compile(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "([^"]+)"')
# `%r = tt.dot %a, %b, %c ... : tensor<MxKxT> * tensor<KxNxT> -> tensor<MxNxT>`
_DOT = re.compile(r"= tt\.dot .*?: tensor<(\d+)x(\d+)x(\w+)> \* tensor<\d+x(\d+)x\w+>")
_DOT_PRECISION = re.compile(r"inputPrecision = (\w+)")


@contextlib.contextmanager
def abstract_gpu():
    """Trace and lower as if for an H100 (Pallas reads the GPU's properties while lowering)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        yield


def lower(fn, *args, platforms=("cuda",), **kwargs) -> jax.stages.Lowered:
    """`jax.jit(fn, **kwargs)` lowered for CUDA (or for `platforms`, CUDA among them); args may
    be `jax.ShapeDtypeStruct`s.

    Builds the Triton IR of every Pallas kernel (catching tile-shape and op errors) but does not
    run ptxas: see :mod:`experiments.static.machine_code` for that.
    """
    with abstract_gpu():
        return jax.jit(fn, **kwargs).trace(*args).lower(lowering_platforms=platforms)


def lower_for_cuda(fn, *args, **kwargs) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for CUDA (see :func:`lower`)."""
    return lower(fn, *args, **kwargs).as_text()


def triton_kernel_names(hlo_text: str) -> list[str]:
    """Names of the Pallas/Triton kernels called in a lowered module, in order."""
    return _TRITON_CALL.findall(hlo_text)


@dataclasses.dataclass(frozen=True)
class Dot:
    """One `tt.dot`: `[m, k] @ [k, n]` on operands of `dtype`, with Triton's input precision
    (`tf32`, `ieee`, ...; None for 16-bit operands, where it does not apply)."""

    m: int
    n: int
    k: int
    dtype: str
    precision: str | None

    @property
    def tensor_cores(self) -> bool:
        """Whether Triton may run it on tensor cores (an `ieee` f32 dot is exact FMA)."""
        return self.precision != "ieee"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas kernel call of a lowered module, as XLA receives it."""

    name: str
    # Triton IR in MLIR's generic form, which Triton 3.8 and 3.9 both parse (3.9 rejects the
    # custom assembly JAX 0.11 prints for a `tt.load` with an eviction policy).
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    dots: tuple[Dot, ...]

    @property
    def has_dot(self) -> bool:
        return bool(self.dots)

    @functools.cached_property
    def key(self) -> str:
        """Identifies what gets compiled: the IR and the compiler options (not the grid)."""
        text = f"{self.ttir}\nnum_warps={self.num_warps}\nnum_stages={self.num_stages}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dots(ttir_text: str) -> tuple[Dot, ...]:
    """The `tt.dot`s of Triton IR in its custom assembly (where an `ieee` precision, the
    default, is left out)."""
    dots = []
    for line in ttir_text.splitlines():
        if match := _DOT.search(line):
            m, k, dtype, n = match.groups()
            precision = _DOT_PRECISION.search(line)
            if dtype != "f32":
                precision = None  # 16-bit operands: tensor cores whatever the attribute says
            else:
                precision = precision.group(1) if precision else "ieee"
            dots.append(Dot(int(m), int(n), int(k), dtype, precision))
    if len(dots) != ttir_text.count("tt.dot "):
        raise ValueError(f"could not read every tt.dot of:\n{ttir_text}")
    return tuple(dots)


def _custom_calls(op: ir.Operation, target: str):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                child = child.operation
                if (
                    child.name == "stablehlo.custom_call"
                    and ir.StringAttr(child.attributes["call_target_name"]).value == target
                ):
                    yield child
                yield from _custom_calls(child, target)


def triton_kernels(lowered: jax.stages.Lowered) -> list[TritonKernel]:
    """Every Triton kernel call of a module lowered for CUDA, in order.

    The `__gpu$xla.gpu.triton` custom call carries the kernel as MLIR bytecode (`ir` in its
    backend config, with `num_warps`, `num_stages` and the grid); it is printed here as text,
    which the `triton` package's compiler parses (its MLIR does not read JAX's bytecode).
    """
    module = lowered.compiler_ir("stablehlo")
    context = module.context
    triton_dialect.register_dialect(context)
    kernels = []
    with context:
        for call in _custom_calls(module.operation, _TRITON_TARGET):
            config = ir.DictAttr(call.attributes["mhlo.backend_config"])

            def integer(key, config=config):
                return ir.IntegerAttr(config[key]).value

            ttir = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation
            kernels.append(
                TritonKernel(
                    name=ir.StringAttr(config["name"]).value,
                    ttir=ttir.get_asm(print_generic_op_form=True),
                    num_warps=integer("num_warps"),
                    num_stages=integer("num_stages"),
                    grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
                    dots=_dots(ttir.get_asm()),
                )
            )
    return kernels
