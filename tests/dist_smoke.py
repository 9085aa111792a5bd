"""Smoke test of an installed svconv (``make dist-check``): run by a fresh venv's Python from
outside the repository, after installing a built wheel or sdist into it.

Checks that svconv imports from the environment (not from a source tree), that the installed
version and files are the release's (``py.typed`` in both packages), and that every op runs,
matches its reference implementation and is differentiable, and that the layers run.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np


def main(artifact: str) -> None:
    from flax import nnx

    import pallas_kernels
    import svconv

    where = pathlib.Path(svconv.__file__).resolve()
    assert "site-packages" in where.parts, f"svconv imported from {where}, not an installed copy"
    assert importlib.metadata.version("svconv") == svconv.__version__
    metadata = importlib.metadata.metadata("svconv")
    assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
    installed = {f.name for f in importlib.metadata.files("svconv") or ()}
    assert "LICENSE" in installed, "the license file is not in the distribution"
    assert "dist_smoke.py" not in installed, "the tests were installed with the package"
    for package in (svconv, pallas_kernels):
        typed = pathlib.Path(package.__file__).parent / "py.typed"
        assert typed.is_file(), f"{typed} missing: the package does not declare its types"

    keys = iter(jax.random.split(jax.random.key(0), 16))
    x = jax.random.normal(next(keys), (2, 12, 12, 4))
    w = jax.random.normal(next(keys), (3, 3, 4, 6))
    d = jax.random.uniform(next(keys), (2, 12, 12, 3, 3))
    k = jax.random.uniform(next(keys), (2, 12, 12, 3, 3))
    w_local = jax.random.normal(next(keys), (12, 12, 3, 3, 4, 6))
    sigma = 0.5 + jax.random.uniform(next(keys), (2, 12, 12))
    offsets = jax.random.normal(next(keys), (2, 12, 12, 3, 3, 1, 2))
    filters = jax.random.normal(next(keys), (3, 5, 5))
    weights = jax.random.uniform(next(keys), (2, 12, 12, 3))

    cases = {
        "modulated_conv2d": (svconv.modulated_conv2d, (x, w, d)),
        "local_conv2d": (svconv.local_conv2d, (x, w_local)),
        "pixel_filter2d": (svconv.pixel_filter2d, (x, k)),
        "pixel_splat2d": (svconv.pixel_splat2d, (x, k)),
        "gaussian_filter2d": (lambda x, s, impl: svconv.gaussian_filter2d(x, s, 5, impl=impl),
                              (x, sigma)),
        "gaussian_splat2d": (lambda x, s, impl: svconv.gaussian_splat2d(x, s, 5, impl=impl),
                             (x, sigma)),
        "deformable_conv2d": (svconv.deformable_conv2d, (x, w, offsets)),
        "product_filter2d": (svconv.product_filter2d, (x, filters, weights)),
        "product_splat2d": (svconv.product_splat2d, (x, filters, weights)),
    }  # fmt: skip
    for name, (op, args) in cases.items():
        y = jax.jit(lambda *a, op=op: op(*a, impl=None))(*args)
        expected = op(*args, impl="reference")
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4, err_msg=name)
        grads = jax.grad(lambda *a, op=op: jnp.sum(op(*a, impl=None) ** 2), argnums=(0, 1))(*args)
        assert all(bool(jnp.isfinite(g).all()) for g in grads), name
        print(f"{name}: {tuple(y.shape)} matches the reference; gradients finite")

    layer = svconv.nnx.ModulatedConv(4, 6, (3, 3), rngs=nnx.Rngs(0))
    assert layer(x, d).shape == (2, 12, 12, 6)
    linen = svconv.LocalConv(features=6, kernel_size=(3, 3))
    assert linen.apply(linen.init(jax.random.key(1), x), x).shape == (2, 12, 12, 6)
    print(f"svconv {svconv.__version__} from {artifact}, installed at {where.parent}: all good")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "?")
