"""Forward+backward time of Tucker layers at several active ranks, as a ratio to the dense layer, from one run.

    python benchmarks/layer_speed.py [--threads 2]

Tucker layers store factors and core at a maximum rank and slice them to the active rank. The forward and backward
FLOPs follow the active rank; the gradient buffers (and the optimizer step) follow the storage. So the table shows
each active rank r twice: with storage at full rank (max_rank='full') and at 2r (room for the integrator's
augmentation), the setting to use when the rank is expected to stay low.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.benchmark import Timer

from lightning_lowrank import TuckerConv2d, TuckerLinear


def step_time(layer: nn.Module, x: torch.Tensor) -> float:
    """Median seconds of one forward and backward pass."""
    def step() -> None:
        layer(x).sum().backward()

    return Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=1.0).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("Conv2d 256->256 3x3, 16x16, batch 32", nn.Conv2d(256, 256, 3, padding=1), TuckerConv2d,
         torch.randn(32, 256, 16, 16)),
        ("Linear 2048->2048, batch 256", nn.Linear(2048, 2048), TuckerLinear, torch.randn(256, 2048)),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; time of forward+backward, "
          "ratio = Tucker / dense (below 1: faster than dense)")
    print(f"{'layer':<38} {'active rank':>12} {'ms (full)':>10} {'ratio':>6} {'ms (2r)':>9} {'ratio':>6}")
    for title, dense, tucker_cls, x in cases:
        dense_ms = step_time(dense, x) * 1e3
        print(f"{title:<38} {'dense':>12} {dense_ms:10.2f} {1.0:6.2f}")
        full = tucker_cls.from_dense(dense)
        channels = min(full.max_ranks[:2])
        for fraction in (1.0, 0.5, 0.25, 0.1, 0.05):
            r = max(1, round(fraction * channels))
            kernel = full.max_ranks[2:]
            full.set_ranks((r, r, *kernel))
            tight = tucker_cls.from_dense(dense, (r, r, *kernel), (min(2 * r, channels),) * 2 + kernel)
            full_ms, tight_ms = (step_time(layer, x) * 1e3 for layer in (full, tight))
            print(f"{'':<38} {f'{r} ({fraction:.0%})':>12} {full_ms:10.2f} {full_ms / dense_ms:6.2f} "
                  f"{tight_ms:9.2f} {tight_ms / dense_ms:6.2f}")


if __name__ == "__main__":
    main()
