"""The deepinv columns of ``experiments.bench_product``, a worker in the torch environment:
``python -m experiments.bench_product_torch INPUTS.npz OUT.npz [--threads T]``.

For every kernel size in ``INPUTS`` (``x<k> [1, H, W, C]``, ``f<k> [R, k, k]``, ``u<k>
[Ho, Wo, R]`` as ``product_filter2d`` takes them), times single calls of
``deepinv.physics.SpaceVaryingBlur(use_fft=True, mask_first=False, padding="valid")`` forward,
and forward+backward (the gradient in the image, the filters and the multipliers), on request
(so that they interleave with the JAX columns), and writes its outputs to ``OUT``. deepinv
convolves, so the filters are passed flipped to compute ``product_filter2d``'s correlation."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch


def _columns(data, kernels):
    """Per kernel size, the forward and forward+backward closures."""
    from deepinv.physics import SpaceVaryingBlur

    columns = {}
    for k in kernels:
        x = torch.from_numpy(data[f"x{k}"]).permute(0, 3, 1, 2).contiguous()
        h = torch.from_numpy(data[f"f{k}"]).flip(-1, -2)[None, None].contiguous()
        w = torch.from_numpy(data[f"u{k}"]).permute(2, 0, 1)[None, None].contiguous()
        physics = SpaceVaryingBlur(use_fft=True, mask_first=False, padding="valid")

        def forward(x=x, h=h, w=w, physics=physics):
            with torch.no_grad():
                return physics.A(x, filters=h, multipliers=w)

        def both(x=x, h=h, w=w, physics=physics):
            xs, hs, ws = (t.clone().requires_grad_(True) for t in (x, h, w))
            y = physics.A(xs, filters=hs, multipliers=ws)
            (y**2).sum().backward()
            return y

        columns[k] = {"fwd": forward, "fwd+bwd": both}
    return columns


def main() -> None:
    """Serve timing requests on stdin, one per line: ``K MODE`` (one call of that column,
    answered with ``{"s": seconds}``), ``outputs`` (write the forward outputs, answer with the
    versions), ``quit``. Interleaved with the JAX columns by ``experiments.bench_product``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import deepinv

    data = np.load(args.inputs)
    kernels = sorted(int(k[1:]) for k in data.files if k.startswith("x"))
    columns = _columns(data, kernels)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "outputs":
            outputs = {f"y{k}": c["fwd"]().permute(0, 2, 3, 1).numpy() for k, c in columns.items()}
            np.savez(args.out, **outputs)
            versions = {"torch": torch.__version__, "deepinv": deepinv.__version__}
            versions["torch python"] = platform.python_version()
            print(json.dumps({"versions": versions}), flush=True)
            continue
        fn = columns[int(words[0])][words[1]]
        start = time.perf_counter()
        fn()
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
