"""The documentation's examples run as doctests (``make test-docs``). Before JAX starts: the
CPU split into 4 devices for the multi-device guide, and XLA's CPU compiler set as in the test
suite (small programs compile faster)."""

import os

_FLAGS = (
    "--xla_force_host_platform_device_count=4",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
_current = os.environ.get("XLA_FLAGS", "")
_missing = [f for f in _FLAGS if f.split("=")[0] not in _current]
os.environ["XLA_FLAGS"] = " ".join([_current, *_missing]).strip()
