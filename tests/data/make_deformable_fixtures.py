"""Writes ``deformable_torchvision.npz``: ``torchvision.ops.deform_conv2d``'s forward and
gradients (computed in float64 from float32 inputs) for the cases of ``test_deformable.py``.
Run in an environment with torch and torchvision (``make bench`` creates ``.venv-torch``):

    .venv-torch/bin/python tests/data/make_deformable_fixtures.py
"""

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import deform_conv2d

# name: (N, C, H, W, O, kh, kw, stride, padding, dilation, groups, offset groups)
CASES = {
    "plain": (2, 4, 7, 8, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1, 1),
    "groups": (1, 6, 9, 7, 4, 3, 2, (2, 1), (0, 1), (1, 2), 2, 3),
    "depthwise": (2, 4, 6, 6, 4, 2, 3, (1, 2), (2, 0), (2, 1), 4, 2),
}


def main():
    rng = np.random.default_rng(2026)
    out = {}
    for name, (n, c, h, w, o, kh, kw, stride, pad, dil, groups, go) in CASES.items():
        ho = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
        f32 = np.float32
        x = rng.standard_normal((n, c, h, w)).astype(f32)
        weight = rng.standard_normal((o, c // groups, kh, kw)).astype(f32)
        offset = (2.5 * rng.standard_normal((n, 2 * go * kh * kw, ho, wo))).astype(f32)
        integer = rng.random(offset.shape) < 0.2  # integer sample positions too
        offset = np.where(integer, np.round(offset), offset).astype(f32)
        mask = rng.random((n, go * kh * kw, ho, wo)).astype(f32)
        grad_out = rng.standard_normal((n, o, ho, wo)).astype(f32)
        t = [torch.tensor(a, dtype=torch.float64, requires_grad=True)
             for a in (x, offset, weight, mask)]  # fmt: skip
        y = deform_conv2d(t[0], t[1], t[2], stride=stride, padding=pad, dilation=dil, mask=t[3])
        y.backward(torch.tensor(grad_out, dtype=torch.float64))
        arrays = {
            "input": x, "weight": weight, "offset": offset, "mask": mask, "grad_out": grad_out,
            "out": y.detach().numpy(), "grad_input": t[0].grad.numpy(),
            "grad_offset": t[1].grad.numpy(), "grad_weight": t[2].grad.numpy(),
            "grad_mask": t[3].grad.numpy(), "stride": np.array(stride),
            "padding": np.array(pad), "dilation": np.array(dil), "groups": np.array([groups]),
        }  # fmt: skip
        out.update({f"{name}/{k}": v for k, v in arrays.items()})
    path = Path(__file__).with_name("deformable_torchvision.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
