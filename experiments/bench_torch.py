"""PyTorch baselines for the svconv benchmark: unfold + einsum, and torchvision's deform_conv2d.

Standalone (imports torch, never jax), so it can run in an interpreter of its own where torch and
jax do not share one Python. Three ways to use it:

* in-process: ``TorchRunner().setup(cases)`` then ``.sample(case_id, column, mode, inner)``;
* as a server for :mod:`experiments.bench` (``--serve``): JSON requests on stdin, one reply per
  line on stdout, so the torch timings interleave with the JAX ones in one run;
* on its own: ``python experiments/bench_torch.py --cases cases.json`` prints the medians as JSON.

Layouts are PyTorch's own (NCHW, OIHW, taps ordered kh-major), so each library runs in its native
layout; the conversion is not timed. Random inputs are drawn fresh per case, never zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import zlib

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return out


def _padding(spec: dict) -> tuple[int, int]:
    # The benchmark cases use odd kernels, stride 1 and "SAME" padding.
    return ((spec["kh"] - 1) // 2, (spec["kw"] - 1) // 2)


def _modulated_unfold(x, w, d, *, kernel_size, padding):
    """``x [N,C,H,W]``, ``w [O,C,kh,kw]``, ``d [N,kh*kw,Ho,Wo]`` -> ``[N,O,Ho,Wo]``."""
    n, c = x.shape[:2]
    o = w.shape[0]
    ho, wo = d.shape[2:]
    taps = kernel_size[0] * kernel_size[1]
    cols = F.unfold(x, kernel_size, padding=padding).view(n, c, taps, ho * wo)
    cols = (cols * d.view(n, 1, taps, ho * wo)).view(n, c * taps, ho * wo)
    return torch.matmul(w.reshape(o, c * taps), cols).view(n, o, ho, wo)


def _pixel_unfold(x, k, *, kernel_size, padding):
    """``x [N,C,H,W]``, ``k [N,kh*kw,Ho,Wo]`` -> ``[N,C,Ho,Wo]``."""
    n, c = x.shape[:2]
    ho, wo = k.shape[2:]
    taps = kernel_size[0] * kernel_size[1]
    cols = F.unfold(x, kernel_size, padding=padding).view(n, c, taps, ho * wo)
    return (cols * k.view(n, 1, taps, ho * wo)).sum(2).view(n, c, ho, wo)


def _local_unfold(x, w, *, kernel_size, padding):
    """``x [N,C,H,W]``, ``w [Ho*Wo, C*kh*kw, O]`` (unfold's feature order) -> ``[N,O,Ho,Wo]``."""
    n = x.shape[0]
    ho, wo = x.shape[2:]  # "SAME" at stride 1
    cols = F.unfold(x, kernel_size, padding=padding)  # [N, C*kh*kw, L]
    y = torch.einsum("nkl,lko->nol", cols, w)
    return y.reshape(n, w.shape[2], ho, wo)


def _deform(x, w, d, *, offset, padding):
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, w, padding=padding, mask=d)


class TorchRunner:
    """Builds the torch columns of each case and times them on request."""

    def __init__(self, device: str | None = None, threads: int | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(threads or os.cpu_count() or 1)
        if self.device == "cuda":
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

    def _inputs(self, spec: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        dt = _DTYPES[spec["dtype"]]
        n, h, w, kh, kw = spec["n"], spec["h"], spec["w"], spec["kh"], spec["kw"]
        cin, cout = spec["cin"], spec.get("cout", spec["cin"])

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
                "w": rnd(cout, cin, kh, kw) / (cin * kh * kw) ** 0.5,
                "d": rnd(n, kh * kw, h, w, positive=True),
                "g": rnd(n, cout, h, w),
            }
        if spec["op"] == "pixel":
            return {
                "x": x,
                "k": rnd(n, kh * kw, h, w, positive=True) / (kh * kw),
                "g": rnd(n, cin, h, w),
            }
        return {
            "x": x,
            "w": rnd(h * w, cin * kh * kw, cout) / (cin * kh * kw) ** 0.5,
            "g": rnd(n, cout, h, w),
        }

    def _forward(self, spec: dict, column: str, inputs: dict):
        ks, pad = (spec["kh"], spec["kw"]), _padding(spec)
        op = spec["op"]
        if column == "torch unfold":
            if op == "modulated":
                return lambda a: _modulated_unfold(
                    a["x"], a["w"], a["d"], kernel_size=ks, padding=pad
                ), ("x", "w", "d")
            if op == "pixel":
                return lambda a: _pixel_unfold(a["x"], a["k"], kernel_size=ks, padding=pad), (
                    "x",
                    "k",
                )
            return lambda a: _local_unfold(a["x"], a["w"], kernel_size=ks, padding=pad), ("x", "w")
        x = inputs["x"]
        offset = torch.zeros(
            x.shape[0], 2 * ks[0] * ks[1], *x.shape[2:], device=x.device, dtype=x.dtype
        )
        return lambda a: _deform(a["x"], a["w"], a["d"], offset=offset, padding=pad), (
            "x",
            "w",
            "d",
        )

    def _columns(self, spec: dict) -> tuple[list[str], dict[str, str]]:
        cols, missing = ["torch unfold"], {}
        if spec["op"] == "modulated":
            try:
                from torchvision.ops import deform_conv2d  # noqa: F401

                cols.append("deform_conv2d")
            except ImportError as e:
                missing["deform_conv2d"] = f"torchvision is not installed ({e})"
        return cols, missing

    def setup(self, cases: list[dict]) -> dict:
        """Registers ``cases`` (dicts with ``id``, ``op``, shape keys, ``dtype``, ``modes``,
        optional ``skip``: {column: reason}); returns the columns and why others are missing."""
        out = {}
        for spec in cases:
            gen = torch.Generator().manual_seed(zlib.crc32(spec["id"].encode()))
            cols, missing = self._columns(spec)
            missing.update({c: r for c, r in spec.get("skip", {}).items() if c in cols})
            cols = [c for c in cols if c not in missing]
            self.cases[spec["id"]] = {"spec": spec, "gen": gen, "inputs": None}
            out[spec["id"]] = {"columns": cols, "missing": missing}
        return out

    def _prepare(self, case_id: str, column: str, mode: str):
        key = (case_id, column, mode)
        if key in self.fns:
            return self.fns[key]
        case = self.cases[case_id]
        if case["inputs"] is None:
            case["inputs"] = self._inputs(case["spec"], case["gen"])
        inputs = case["inputs"]
        fwd, names = self._forward(case["spec"], column, inputs)
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    return fwd(inputs)
        else:
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
            dt = (time.perf_counter() - t0) / inner
            del out
            res = {"seconds": dt}
            if self.device == "cuda":
                res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            return res
        except (RuntimeError, MemoryError) as e:  # out of memory, unsupported dtype, ...
            self.fns.pop((case_id, column, mode), None)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    def release(self, case_id: str):
        """Frees a case's inputs and compiled closures."""
        for key in [k for k in self.fns if k[0] == case_id]:
            del self.fns[key]
        if case_id in self.cases:
            self.cases[case_id]["inputs"] = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


def serve(runner: TorchRunner):
    """Answers one JSON line per request line: setup / info / sample / release / quit."""
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            break
        if cmd == "setup":
            reply = runner.setup(req["cases"])
        elif cmd == "info":
            reply = runner.info()
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
    parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin")
    parser.add_argument("--cases", help="JSON file with a list of cases (standalone mode)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    runner = TorchRunner(threads=args.threads)
    if args.serve:
        serve(runner)
        return
    if not args.cases:
        parser.error("give --cases FILE or --serve")
    with open(args.cases) as f:
        cases = json.load(f)
    setup = runner.setup(cases)
    results = {"info": runner.info(), "cases": {}}
    for spec in cases:
        res = {}
        for mode in spec["modes"]:
            for column in setup[spec["id"]]["columns"]:
                samples = [runner.sample(spec["id"], column, mode) for _ in range(args.repeats)]
                errors = [s["error"] for s in samples if "error" in s]
                res[f"{column} {mode}"] = (
                    {"error": errors[0]}
                    if errors
                    else {"median_ms": 1e3 * statistics.median(s["seconds"] for s in samples)}
                )
        runner.release(spec["id"])
        results["cases"][spec["id"]] = {"results": res, "missing": setup[spec["id"]]["missing"]}
    json.dump(results, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
