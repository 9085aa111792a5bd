"""The direct/FFT crossover of ``product_filter2d`` (``experiments/notes/product.md``):
``PYTHONPATH=. python experiments/notes/product_crossover.py 128,16 512,16`` prints, per image
size and rank, each kernel size's forward and forward+backward medians (s) for both methods and
the method the cost model picks."""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import svconv
from svconv import product


def timed(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    for size, rank in [tuple(map(int, a.split(","))) for a in sys.argv[1:]]:
        for k in (3, 5, 7, 9, 11, 15):
            x, f = jnp.ones((1, size, size, 3)), jnp.ones((rank, k, k))
            u = jnp.ones((1, size, size, rank))
            res = {}
            for m in product.METHODS:

                def op(*a, m=m):
                    return svconv.product_filter2d(*a, method=m)

                fwd = jax.jit(op)
                both = jax.jit(jax.grad(lambda *a, op=op: jnp.sum(op(*a) ** 2), (0, 1, 2)))
                res[m] = (timed(fwd, x, f, u), timed(both, x, f, u))
            geom = svconv.ops._checks.geometry((size, size), (k, k), 1, "SAME", 1)
            direct, fft = res["direct"], res["fft"]
            print(
                f"{size} R{rank} {k}x{k}: direct {direct[0]:.4f} {direct[1]:.4f} "
                f"fft {fft[0]:.4f} {fft[1]:.4f} model: {product.choose_method(geom, rank)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
