"""What a native CPU kernel could do for ``pixel_filter2d``'s gradient in ``k``: compiles
``native_grad_k.c`` with the system's C compiler (``$CC``, default ``gcc``; ``-O3 -march=native
-fopenmp``), checks it against svconv's XLA path and times it beside the XLA path's forward and
gradients, interleaved, in one process. A measurement for ``xla-cpu.md``, not part of svconv.

    PYTHONPATH=. python experiments/notes/native_grad_k.py [--rounds 9]

Threads: OpenMP's default (the visible cores), like XLA:CPU's; ``OMP_WAIT_POLICY=PASSIVE`` so
that its idle threads do not spin on the cores the XLA columns then use.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import svconv

SOURCE = Path(__file__).with_name("native_grad_k.c")


def build() -> ctypes.CDLL:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the library is loaded
    out = Path(tempfile.mkdtemp()) / "native_grad_k.so"
    cc = os.environ.get("CC", "gcc")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    subprocess.run([cc, *flags, str(SOURCE), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.grad_k.argtypes = [ctypes.POINTER(ctypes.c_float)] * 3 + [ctypes.c_int] * 8
    return lib


def case(lib, size: int, rounds: int):
    """Check and time one kernel size."""
    ptr = ctypes.POINTER(ctypes.c_float)
    n, h, c = 4, 128, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, c), dtype=np.float32)
    dy = rng.standard_normal((n, h, h, c), dtype=np.float32)
    k = jnp.asarray(rng.uniform(size=(n, h, h, size, size)).astype(np.float32)) / size**2
    dk = np.empty((n, h, h, size, size), np.float32)
    xj, dyj = jnp.asarray(x), jnp.asarray(dy)

    def filt(x, k):
        return svconv.pixel_filter2d(x, k, impl="xla")

    forward = jax.jit(filt)
    grad_x = jax.jit(lambda k, g: jax.vjp(lambda x: filt(x, k), xj)[1](g)[0])
    grad_k = jax.jit(lambda x, g: jax.vjp(lambda k: filt(x, k), k)[1](g)[0])

    def native():
        args = (x.ctypes.data_as(ptr), dy.ctypes.data_as(ptr), dk.ctypes.data_as(ptr))
        lib.grad_k(*args, n, h, h, c, size, size, size // 2, size // 2)

    columns = {
        "XLA forward": lambda: forward(xj, k).block_until_ready(),
        "XLA grad_x": lambda: grad_x(k, dyj).block_until_ready(),
        "XLA grad_k": lambda: grad_k(xj, dyj).block_until_ready(),
        "native grad_k": native,
    }
    for f in columns.values():
        f()
    native()
    err = float(np.abs(np.asarray(grad_k(xj, dyj)) - dk).max())
    assert err < 1e-4, f"native grad_k differs from the XLA path by {err}"
    times = {name: [] for name in columns}
    names = list(columns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            columns[name]()
            times[name].append(1e3 * (time.perf_counter() - t0))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{size}x{size} (native against XLA: max abs difference {err:.1e})")
    for name, t in times.items():
        print(f"  {name:14s} {med[name]:8.2f} ({min(t):.2f})")
    fwd = med["XLA forward"]
    for label, gk in (("XLA", med["XLA grad_k"]), ("native", med["native grad_k"])):
        ratio = (fwd + med["XLA grad_x"] + gk) / fwd
        print(f"  forward + grad_x + {label} grad_k = {ratio:.1f} forwards (goal <= 4)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    lib = build()
    print(f"pixel_filter2d, N=4, 128x128, C=32, float32, SAME; ms, median (min) of {args.rounds}")
    for size in (7, 15):
        case(lib, size, args.rounds)


if __name__ == "__main__":
    main()
