"""Checks of svconv across several JAX processes: two processes on one machine, 4 CPU devices
each, one global mesh of 8.

Run one copy per process, ``python -m tests.multiprocess_checks --port PORT --process-id I
[NAME ...]`` for ``I`` in ``0 .. PROCESSES - 1`` (:func:`launch` starts them all;
``tests/test_multiprocess.py`` does). Process 0 hosts the coordinator on the loopback address;
the CPU collectives between processes go over gloo. Each check jits an op and its gradient with
respect to every array argument on global arrays sharded over the mesh, and compares every shard
this process holds with the same computation on one local device: the numbers, the output
shardings, and the collectives in the compiled HLO (no all-gather or all-to-all; height sharding
moves only halo rows with collective-permutes). Every process prints one JSON line per check,
then a last line once the distributed runtime has shut down.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.sharding_checks import collectives, forward_and_grad, on_mesh, run_checks

PROCESSES = 2
LOCAL_DEVICES = 4
DEVICES = PROCESSES * LOCAL_DEVICES
DEVICE_FLAG = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
MARK = "MULTIPROCESS_CHECK "
SHUT_DOWN = "MULTIPROCESS_SHUT_DOWN"
# Seconds a process waits for the others at start-up and at shutdown.
SYNC_TIMEOUT = 60


@dataclasses.dataclass(frozen=True)
class Check:
    op: str  # modulated (per-image d) or pixel (grouped per-pixel filters)
    impl: str  # xla or pallas
    # batch: 8-way batch. height: 2-way batch x 4-way height, each height group within one
    # process. across: the same, with each height group split over both processes, so halo rows
    # cross between processes.
    mode: str
    explicit: bool = False  # Explicit mesh axes (jax.make_mesh's default) instead of Auto

    @property
    def name(self) -> str:
        return f"{self.op}-{self.impl}-{self.mode}{'-explicit' if self.explicit else ''}"


CHECKS = (
    *(
        Check(op, impl, mode)
        for mode in ("batch", "height")
        for impl in ("xla", "pallas")
        for op in ("modulated", "pixel")
    ),
    Check("modulated", "xla", "across"),
    Check("pixel", "xla", "across"),
    Check("modulated", "xla", "height", explicit=True),
)
NAMES = tuple(c.name for c in CHECKS)

N, H, W, CIN, COUT, GROUPS, K = 8, 16, 6, 2, 3, 2, 3
HALO = K - 1


def xla_flags(current: str | None) -> str:
    """``current`` XLA flags with the per-process device count added."""
    current = current or ""
    return current if DEVICE_FLAG in current else f"{current} {DEVICE_FLAG}".strip()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(names: list[str], *, cwd: Path, timeout: float) -> list[tuple[int, str, str]]:
    """Run the checks in ``PROCESSES`` processes; returns each one's exit code, stdout and
    stderr. A process still running when another has failed or ``timeout`` seconds have passed
    is killed (exit code negative); none is left behind. Started again on a new port (twice at
    most) when the coordinator's port was taken between choosing it and binding it."""
    for _ in range(3):
        results = _launch_once(names, cwd=cwd, timeout=timeout, port=free_port())
        if not any("Address already in use" in err for _, _, err in results):
            break
    return results


def _launch_once(
    names: list[str], *, cwd: Path, timeout: float, port: int
) -> list[tuple[int, str, str]]:
    # The CPU devices even where there is an accelerator: the processes would share it.
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS")),
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-m", "tests.multiprocess_checks", "--port", str(port)]
    with tempfile.TemporaryDirectory() as tmp:
        # Files rather than pipes: a process blocked on a full pipe would stall the others.
        logs = [(Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err") for i in range(PROCESSES)]
        procs = []
        try:
            for i, (out, err) in enumerate(logs):
                with out.open("w") as stdout, err.open("w") as stderr:
                    procs.append(
                        subprocess.Popen(
                            [*command, "--process-id", str(i), *names],
                            cwd=cwd,
                            env=env,
                            stdout=stdout,
                            stderr=stderr,
                        )
                    )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if None not in codes or any(codes):
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        return [
            (p.returncode, out.read_text(), err.read_text())
            for p, (out, err) in zip(procs, logs, strict=True)
        ]


def _setup(check: Check):
    """The op as a function of its arrays, the arrays, and their PartitionSpecs."""
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import svconv

    image = P("data") if check.mode == "batch" else P("data", "rows")
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if check.op == "modulated":
        return (
            lambda x, w, d: svconv.modulated_conv2d(x, w, d, impl=check.impl),
            [normal(N, H, W, CIN), normal(K, K, CIN, COUT), normal(N, H, W, K, K)],
            [image, P(), image],
        )
    if check.op == "pixel":
        return (
            lambda x, f: svconv.pixel_filter2d(x, f, impl=check.impl),
            [normal(N, H, W, 2 * GROUPS), normal(N, H, W, K, K, GROUPS)],
            [image, image],
        )
    raise ValueError(check.op)


def _mesh(check: Check):
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    axis_type = AxisType.Explicit if check.explicit else AxisType.Auto
    if check.mode == "batch":
        return jax.make_mesh((DEVICES,), ("data",), axis_types=(axis_type,))
    # Process 0's devices, then process 1's.
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    if check.mode == "height":
        grid = devices.reshape(PROCESSES, LOCAL_DEVICES)
    else:  # across: each row of the grid takes half of its devices from each process
        grid = devices.reshape(2 * PROCESSES, LOCAL_DEVICES // 2).T
    return Mesh(grid, ("data", "rows"), axis_types=(axis_type,) * 2)


def run_check(check: Check) -> None:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    fn, arrays, specs = _setup(check)
    mesh = _mesh(check)
    if check.mode != "batch":
        spans = {len({d.process_index for d in group}) for group in mesh.devices}
        assert spans == {1 if check.mode == "height" else PROCESSES}, f"height groups {spans}"

    # One device of this process, no mesh: what a single process computes.
    step = forward_and_grad(fn)
    one = jax.local_devices()[0]
    expected = jax.jit(step)(*(jax.device_put(a, one) for a in arrays))
    expected = [np.asarray(e) for e in jax.tree.leaves(expected)]

    shardings = [NamedSharding(mesh, s) for s in specs]
    sharded = [
        jax.make_array_from_callback(a.shape, s, lambda index, a=a: a[index])
        for a, s in zip(arrays, shardings, strict=True)
    ]
    compiled, got, named = on_mesh(step, sharded, mesh)
    for (what, a), b in zip(named, expected, strict=True):
        assert not a.is_fully_addressable, f"{what} is not a global array"
        assert len(a.addressable_shards) == LOCAL_DEVICES, f"{what}: {a.addressable_shards}"
        scale = max(1.0, float(np.max(np.abs(b))))
        for shard in a.addressable_shards:
            err = float(np.max(np.abs(np.asarray(shard.data) - b[shard.index]))) / scale
            assert err < 2e-5, (
                f"{what}, shard {shard.index} on {shard.device}: relative error {err:.3g} "
                "against one device"
            )

    assert got[0].sharding.is_equivalent_to(sharded[0].sharding, 4), (
        f"output sharded as {got[0].sharding}, input as {sharded[0].sharding}"
    )
    for i, (g, a) in enumerate(zip(got[1], sharded, strict=True)):
        assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (
            f"grad {i} sharded as {g.sharding.spec}, its input as {a.sharding.spec}"
        )
    coll = collectives(compiled.as_text())
    for kind in ("all-gather", "all-to-all"):
        assert kind not in coll, f"{kind} of shapes {coll[kind]}"
    permutes = coll.get("collective-permute", [])
    if check.mode != "batch":
        assert permutes, "no halo exchange"
    for dims in permutes:
        assert len(dims) == 4 and dims[1] <= HALO, f"collective-permute of {dims}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the coordinator's port")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("names", nargs="*", help="checks to run (default: all)")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        coordinator_bind_address=f"127.0.0.1:{args.port}",
        num_processes=PROCESSES,
        process_id=args.process_id,
        initialization_timeout=SYNC_TIMEOUT,
        shutdown_timeout_seconds=SYNC_TIMEOUT,
    )
    failed = 0
    try:
        if (jax.device_count(), jax.local_device_count()) != (DEVICES, LOCAL_DEVICES):
            print(
                f"needs {LOCAL_DEVICES} devices per process, {DEVICES} in all: got "
                f"{jax.local_device_count()} of {jax.device_count()} (XLA_FLAGS={DEVICE_FLAG})",
                file=sys.stderr,
            )
            return 2
        failed = run_checks(CHECKS, args.names, run_check, MARK, process=args.process_id)
    finally:
        jax.distributed.shutdown()
    print(SHUT_DOWN, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # Before anything starts JAX's backend (jax itself is imported lazily above).
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS"))
    sys.exit(main(sys.argv[1:]))
