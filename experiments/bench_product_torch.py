"""The deepinv columns of ``experiments.bench_product``, run in the torch environment:
``python -m experiments.bench_product_torch INPUTS.npz OUT.npz [--rounds R] [--threads T]``.

For every kernel size in ``INPUTS`` (``x<k> [1, H, W, C]``, ``f<k> [R, k, k]``, ``u<k>
[Ho, Wo, R]`` as ``product_filter2d`` takes them), times
``deepinv.physics.SpaceVaryingBlur(use_fft=True, mask_first=False, padding="valid")`` forward,
and forward+backward (the gradient in the image, the filters and the multipliers), writes its
outputs to ``OUT`` and prints one JSON line of medians in ms. deepinv convolves (its filters
flipped), so the filters are passed flipped to compute ``product_filter2d``'s correlation."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import deepinv
    from deepinv.physics import SpaceVaryingBlur

    data = np.load(args.inputs)
    kernels = sorted(int(k[1:]) for k in data.files if k.startswith("x"))
    times, outputs = {}, {}
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

        entry = {}
        for mode, fn in (("fwd", forward), ("fwd+bwd", both)):
            fn()
            samples = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            entry[mode] = 1e3 * statistics.median(samples)
        times[str(k)] = entry
        outputs[f"y{k}"] = forward().permute(0, 2, 3, 1).numpy()
    np.savez(args.out, **outputs)
    versions = {"torch": torch.__version__, "deepinv": deepinv.__version__}
    versions["torch python"] = platform.python_version()
    print(json.dumps({"times": times, "versions": versions}))


if __name__ == "__main__":
    main()
