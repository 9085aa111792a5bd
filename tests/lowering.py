"""Lower a function for CUDA on a machine without a GPU (abstract H100), and inspect the result."""

import contextlib
import re

import jax

_H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132
)
_TRITON_CALL = re.compile(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "([^"]+)"')


@contextlib.contextmanager
def abstract_gpu():
    """Trace and lower as if for an H100 (Pallas reads the GPU's properties while lowering)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        yield


def lower_for_cuda(fn, *args, platforms=("cuda",), **kwargs) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for CUDA (or for `platforms`, CUDA among them);
    args may be `jax.ShapeDtypeStruct`s.

    Builds the Triton IR of every Pallas kernel (catching tile-shape and op errors) but does not
    run ptxas: a real GPU run is still the final word.
    """
    with abstract_gpu():
        traced = jax.jit(fn, **kwargs).trace(*args)
        return traced.lower(lowering_platforms=platforms).as_text()


def triton_kernel_names(hlo_text: str) -> list[str]:
    """Names of the Pallas/Triton kernels called in a lowered module, in order."""
    return _TRITON_CALL.findall(hlo_text)
