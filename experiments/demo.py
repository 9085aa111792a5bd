"""The svconv demo: every experiment in ``--quick`` mode, then a compact summary.

``make demo`` runs ``python -m experiments.demo``. Each experiment writes its figures and a
``results.json`` to ``out/<name>/``; the full-size runs behind the README's figures are
``python -m experiments.<name>`` (written to ``results/<name>/``).
"""

from __future__ import annotations

import argparse
import time

from experiments import (
    common,
    deformable_warp,
    gaussian_blur,
    kpn_denoiser,
    large_psf,
    learn_modulated_kernel,
    local_vs_conv,
)

EXPERIMENTS = (
    learn_modulated_kernel,
    gaussian_blur,
    kpn_denoiser,
    local_vs_conv,
    deformable_warp,
    large_psf,
)


def main() -> None:
    """Run the experiments one after another and print where their outputs are."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    started = time.perf_counter()
    done = []
    for module in EXPERIMENTS:
        print(f"-- {module.NAME} (quick)", flush=True)
        out = common.output_dir(module.NAME, quick=True, out_dir=None)
        done.append((module.run(quick=True, out_dir=out, seed=args.seed), out))
    print()
    for record, out in done:
        common.print_summary(record, out)
    print(
        f"\nall {len(done)} experiments in {time.perf_counter() - started:.0f} s; full-size "
        "runs: python -m experiments.<name> (figures in results/<name>/)"
    )


if __name__ == "__main__":
    main()
