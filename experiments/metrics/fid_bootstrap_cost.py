"""What the paired FID bootstrap (ptq4dm/metrics/bootstrap.py, metrics.fid_bootstrap) costs: wall time of
paired_fid_difference on random 2048-dimensional features (the cost does not depend on their values), at the
default job's 32 images and at 10,000, on this machine's CPU threads (or a GPU with --device cuda).

    python experiments/metrics/fid_bootstrap_cost.py > experiments/results/fid_bootstrap_cost_cpu.txt
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from ptq4dm.metrics.bootstrap import paired_fid_difference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    ref = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}")
    print("| images | replicates | seconds |\n| --- | --- | --- |")
    for n, replicates in ((32, 100), (10_000, 2), (10_000, 6)):
        a = torch.randn(n, 2048, generator=g)
        b = a + 0.1 * torch.randn(n, 2048, generator=g)
        a, b = a.to(args.device), b.to(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        paired_fid_difference(a, b, ref, replicates)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"| {n} | {replicates} | {time.perf_counter() - t0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
