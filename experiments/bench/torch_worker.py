"""PyTorch baselines for the benchmark: unfold + matmul/einsum, and torchvision's deform_conv2d.

Standalone (imports torch, never jax or svconv), so that it runs in an interpreter of its own
where torch and jax do not share one Python (``.venv-torch``). Started by
:mod:`experiments.bench.torch_proxy` as ``python -m experiments.bench.torch_worker --device
cpu|cuda`` from the repository root, it answers one JSON line on stdout per JSON request line
on stdin (``info``, ``setup``, ``sample``, ``release``, ``quit``), so the torch timings
interleave with the JAX ones in one run.

Layouts are PyTorch's own (NCHW, OIHW, taps ordered kh-major), so each library runs in its native
layout; the conversion is not timed. Random inputs are drawn fresh per case, never zeros.
``deform_conv2d`` runs with zero offsets and ``mask = d`` for the modulated convolution, and with
random offsets (one offset group) for the deformable one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zlib

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DIFF = {
    "modulated": ("x", "w", "d"),
    "pixel": ("x", "k"),
    "local": ("x", "w"),
    "deformable": ("x", "w", "offset", "mask"),
}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return out


def _modulated_unfold(x, w, d, *, k, padding):
    """``x [N,C,H,W]``, ``w [O,C,kh,kw]``, ``d [N,kh*kw,Ho,Wo]`` -> ``[N,O,Ho,Wo]``."""
    n, c = x.shape[:2]
    o = w.shape[0]
    ho, wo = d.shape[2:]
    cols = F.unfold(x, k, padding=padding).view(n, c, k * k, ho * wo)
    cols = (cols * d.view(n, 1, k * k, ho * wo)).view(n, c * k * k, ho * wo)
    return torch.matmul(w.reshape(o, c * k * k), cols).view(n, o, ho, wo)


def _pixel_unfold(x, kernels, *, k, padding):
    """``x [N,C,H,W]``, ``kernels [N,kh*kw,Ho,Wo]`` -> ``[N,C,Ho,Wo]``."""
    n, c = x.shape[:2]
    ho, wo = kernels.shape[2:]
    cols = F.unfold(x, k, padding=padding).view(n, c, k * k, ho * wo)
    return (cols * kernels.view(n, 1, k * k, ho * wo)).sum(2).view(n, c, ho, wo)


def _local_unfold(x, w, *, k, padding):
    """``x [N,C,H,W]``, ``w [Ho*Wo, C*kh*kw, O]`` (unfold's feature order) -> ``[N,O,Ho,Wo]``."""
    n = x.shape[0]
    ho, wo = x.shape[2:]  # "SAME" at stride 1
    cols = F.unfold(x, k, padding=padding)  # [N, C*kh*kw, L]
    y = torch.einsum("nkl,lko->nol", cols, w)
    return y.reshape(n, w.shape[2], ho, wo)


class TorchRunner:
    """Builds the torch columns of each case and times them on request."""

    def __init__(self, device: str, threads: int | None = None):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        self.device = device
        torch.set_num_threads(threads or os.cpu_count() or 1)
        if device == "cuda":
            # The JAX side uses TF32 for float32 dots at default precision; match it.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.cases: dict[str, dict] = {}
        self.fns: dict[tuple[str, str, str], object] = {}

    def info(self) -> dict:
        info = {"versions": _versions(), "threads": torch.get_num_threads(), "device": self.device}
        if self.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        return info

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _inputs(self, spec: dict) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(zlib.crc32(spec["id"].encode()))
        dt = _DTYPES[spec["dtype"]]
        n, h, w, k, cin, cout = (spec[key] for key in ("n", "h", "w", "k", "cin", "cout"))
        taps, fan_in = k * k, cin * k * k

        def rnd(*shape, positive=False):
            a = (
                torch.rand(shape, generator=gen) + 0.5
                if positive
                else torch.randn(shape, generator=gen)
            )
            return a.to(device=self.device, dtype=dt)

        x = rnd(n, cin, h, w)
        if spec["op"] == "modulated":
            return {
                "x": x,
                "w": rnd(cout, cin, k, k) / fan_in**0.5,
                "d": rnd(n, taps, h, w, positive=True),
                "g": rnd(n, cout, h, w),
            }
        if spec["op"] == "deformable":  # offsets of about a pixel, one offset group
            return {
                "x": x,
                "w": rnd(cout, cin, k, k) / fan_in**0.5,
                "offset": rnd(n, 2 * taps, h, w),
                "mask": rnd(n, taps, h, w, positive=True),
                "g": rnd(n, cout, h, w),
            }
        if spec["op"] == "pixel":
            return {"x": x, "k": rnd(n, taps, h, w, positive=True) / taps, "g": rnd(n, cin, h, w)}
        return {"x": x, "w": rnd(h * w, fan_in, cout) / fan_in**0.5, "g": rnd(n, cout, h, w)}

    def _forward(self, spec: dict, column: str, inputs: dict):
        k, op = spec["k"], spec["op"]
        pad = (k - 1) // 2  # the cases are "SAME" at stride 1 with odd kernels
        if column == "torch unfold":
            if op == "modulated":
                return lambda a: _modulated_unfold(a["x"], a["w"], a["d"], k=k, padding=pad)
            if op == "pixel":
                return lambda a: _pixel_unfold(a["x"], a["k"], k=k, padding=pad)
            return lambda a: _local_unfold(a["x"], a["w"], k=k, padding=pad)
        from torchvision.ops import deform_conv2d

        if op == "deformable":
            return lambda a: deform_conv2d(a["x"], a["offset"], a["w"], padding=pad, mask=a["mask"])
        x = inputs["x"]
        offset = torch.zeros(x.shape[0], 2 * k * k, *x.shape[2:], device=x.device, dtype=x.dtype)
        return lambda a: deform_conv2d(a["x"], offset, a["w"], padding=pad, mask=a["d"])

    def setup(self, cases: list[dict]) -> dict:
        """Registers ``cases`` (:meth:`experiments.bench.cases.Case.spec` dicts, plus an optional
        ``skip``: {column: reason}); returns each case's columns and why others are missing."""
        out = {}
        for spec in cases:
            cols, missing = ([] if spec["op"] == "deformable" else ["torch unfold"]), {}
            if spec["op"] in ("modulated", "deformable"):
                try:
                    from torchvision.ops import deform_conv2d  # noqa: F401

                    cols.append("deform_conv2d")
                except ImportError as e:
                    missing["deform_conv2d"] = f"torchvision is not installed ({e})"
                except Exception as e:  # a torchvision built for another torch
                    missing["deform_conv2d"] = f"torchvision does not load: {type(e).__name__}: {e}"
            missing.update({c: r for c, r in spec.get("skip", {}).items() if c in cols})
            self.cases[spec["id"]] = {"spec": spec, "inputs": None}
            out[spec["id"]] = {"columns": [c for c in cols if c not in missing], "missing": missing}
        return out

    def _prepare(self, case_id: str, column: str, mode: str):
        key = (case_id, column, mode)
        if key in self.fns:
            return self.fns[key]
        case = self.cases[case_id]
        if case["inputs"] is None:
            case["inputs"] = self._inputs(case["spec"])
        inputs = case["inputs"]
        fwd = self._forward(case["spec"], column, inputs)
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    return fwd(inputs)
        else:
            names = _DIFF[case["spec"]["op"]]
            leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in inputs.items()}

            def run():
                y = fwd(leaves)
                return torch.autograd.grad((y * leaves["g"]).sum(), [leaves[k] for k in names])

        t0 = time.perf_counter()
        run()  # warm up (allocator, kernel selection)
        self._sync()
        if time.perf_counter() - t0 < 1.0:  # a slow call needs no second warm-up
            run()
            self._sync()
        self.fns[key] = run
        return run

    def sample(self, case_id: str, column: str, mode: str, inner: int = 1) -> dict:
        """Seconds per call, averaged over ``inner`` back-to-back calls; peak memory on CUDA."""
        try:
            run = self._prepare(case_id, column, mode)
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            self._sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                out = run()
            self._sync()
            res = {"seconds": (time.perf_counter() - t0) / inner}
            del out
            if self.device == "cuda":
                res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            return res
        except Exception as e:  # out of memory, an unsupported dtype, ...: the reply says so
            self.fns.pop((case_id, column, mode), None)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    def release(self, case_id: str):
        """Frees a case's inputs and prepared closures."""
        for key in [k for k in self.fns if k[0] == case_id]:
            del self.fns[key]
        if case_id in self.cases:
            self.cases[case_id]["inputs"] = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


def serve(runner: TorchRunner | None, startup_error: str | None = None):
    """Answers one JSON line per request line until ``quit`` or the end of stdin. When the
    runner could not start, every request is answered with ``startup_error``."""
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            break
        if runner is None:
            reply = {"error": startup_error}
        elif cmd == "info":
            reply = runner.info()
        elif cmd == "setup":
            reply = runner.setup(req["cases"])
        elif cmd == "sample":
            reply = runner.sample(**req)
        elif cmd == "release":
            runner.release(req["case_id"])
            reply = {}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    try:
        runner, error = TorchRunner(args.device, args.threads), None
    except RuntimeError as e:
        runner, error = None, f"torch cannot use the {args.device}: {e}"
    serve(runner, error)


if __name__ == "__main__":
    main()
