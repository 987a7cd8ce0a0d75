"""Time per training step of the rank-adaptive integrator against fixed-rank training, as ratios from one run.

    python benchmarks/integrator_speed.py [--steps 30] [--batch 32]

For each model (LeNet5 and a VGG-style network, 32x32 inputs, random data): convert at half the channel ranks, run
the integrator (SGD, tau=0.1) and time its steps, then time the same model at the ranks the integrator reached,
trained without it (plain SGD on cores and factors: forward, backward, optimizer step). The breakdown shows where
the integrator's time goes.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict

import torch
from torch import nn

import lightning_lowrank as ll


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(50 * 5 * 5, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def vgg(widths=(64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")) -> nn.Module:
    layers, channels = [], 3
    for width in widths:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 2 * 2, 512), nn.ReLU(), nn.Linear(512, 10))


class Clock:
    """Accumulates wall time per phase."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def __call__(self, phase: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.total[phase] += time.perf_counter() - start
        return out


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def run(model: nn.Module, batches, integrator: ll.TuckerIntegrator | None, clock: Clock) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in batches:
        optimizer.zero_grad()
        clock("forward+backward", lambda: loss_fn(model, x, y).backward())
        if integrator is None:
            clock("optimizer step", optimizer.step)
        else:
            clock("augment", integrator.augment, optimizer)
            clock("optimizer step", optimizer.step)
            clock("truncate", integrator.truncate, optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps; ms per step")
    for name, build in (("LeNet5", lenet5), ("VGG-style", vgg)):
        model = build()
        ll.convert(model, rank=0.5, keep_first_last=True)
        batches = [(torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
                   for _ in range(args.warmup + args.steps)]
        integrator = ll.TuckerIntegrator(model, ll.IntegratorConfig(tau=0.1))
        run(model, batches[: args.warmup], integrator, Clock())
        adaptive = Clock()
        run(model, batches[args.warmup:], integrator, adaptive)
        integrator.remove()
        fixed_model = copy.deepcopy(model)
        run(fixed_model, batches[: args.warmup], None, Clock())
        fixed = Clock()
        run(fixed_model, batches[args.warmup:], None, fixed)
        adaptive_ms = sum(adaptive.total.values()) / args.steps * 1e3
        fixed_ms = sum(fixed.total.values()) / args.steps * 1e3
        print(f"\n{name}: compression {ll.summary(model).compression_rate:.1%} at the ranks reached "
              f"{[layer.ranks[:2] for layer in integrator.layers.values()]}")
        print(f"  fixed-rank step  {fixed_ms:8.1f}   " + ", ".join(
            f"{k} {v / args.steps * 1e3:.1f}" for k, v in fixed.total.items()))
        print(f"  integrator step  {adaptive_ms:8.1f}   " + ", ".join(
            f"{k} {v / args.steps * 1e3:.1f}" for k, v in adaptive.total.items()))
        print(f"  ratio integrator / fixed rank: {adaptive_ms / fixed_ms:.2f}")


if __name__ == "__main__":
    main()
