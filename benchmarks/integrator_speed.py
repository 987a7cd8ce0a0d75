"""Time per training step of the rank-adaptive integrator against fixed-rank training, as ratios from one run.

    python benchmarks/integrator_speed.py [--steps 30] [--batches 32 128] [--ranks 0.5 0.1]
                                          [--schedules 1:1 5:1 10:1 10:10] [--intervals k ...] [--device cuda]

For each model (LeNet5 and a VGG-style network, 32x32 inputs, random data), batch size, starting rank (a fraction
of the channels: 0.5 is the integrator's worst case, QR and eigen-decompositions of size up to the full channel
count; 0.1 is the regime of >= 90% compression) and integrator variant (method, schedule ``interval:core_steps``;
``--intervals k`` gives k:1; default 1:1 5:1 10:1 and the package's 10:10): convert at that rank, run
the integrator (SGD, tau=0.1) for the warm-up steps, then time its steps alternating with steps of the same model at
the ranks it reached trained without it (plain SGD on cores and factors: forward, backward, optimizer step). The
breakdown shows where the integrator's time goes. Its cost is per step, independent of the batch size; forward and
backward grow with it. ``--device cuda``: the same on a GPU, each phase timed after a device synchronisation.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections import defaultdict

import torch
from classifiers import lenet5, vgg
from torch import nn
from training import add_schedule_options, schedules

import lightning_lowrank as ll


class Clock:
    """Accumulates wall time per phase (on a GPU, from and to a synchronisation of the device)."""

    def __init__(self, device: torch.device) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def __call__(self, phase: str, fn, *args):
        self.sync()
        start = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.total[phase] += time.perf_counter() - start
        return out


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, integrator: ll.TuckerIntegrator | None,
         x: torch.Tensor, y: torch.Tensor, clock: Clock) -> None:
    """One training step; without an integrator, a plain optimizer step on cores and factors."""
    optimizer.zero_grad()
    clock("forward+backward", lambda: loss_fn(model, x, y).backward())
    if integrator is None:
        clock("optimizer step", optimizer.step)
    else:
        clock("before step", integrator.before_step, optimizer)
        clock("optimizer step", optimizer.step)
        clock("after step", integrator.after_step, optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--ranks", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--methods", nargs="+", default=["parallel", "augmented"], choices=["parallel", "augmented"])
    add_schedule_options(parser)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps; ms per step")
    variants = list(itertools.product(args.methods, schedules(args, [(1, 1), (5, 1), (10, 1), (10, 10)])))
    print(f"{'model':<10} {'batch':>5} {'rank':>5} {'method':<10} {'schedule':>8} {'fixed ms':>9} {'integr. ms':>10} "
          f"{'ratio':>6}  breakdown (ms)")
    models = (("LeNet5", lambda: lenet5(3, image_size=32)), ("VGG-style", vgg))
    for (name, build), batch, rank in itertools.product(models, args.batches, args.ranks):
        batches = [(torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device))
                   for _ in range(args.warmup + args.steps)]
        torch.manual_seed(0)
        start = build().to(device)
        ll.convert(start, rank=rank, keep_first_last=True)
        for method, (interval, core_steps) in variants:
            model = copy.deepcopy(start)
            config = ll.IntegratorConfig(tau=0.1, method=method, interval=interval, core_steps=core_steps)
            integrator = ll.TuckerIntegrator(model, config)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for x, y in batches[: args.warmup]:
                step(model, optimizer, integrator, x, y, Clock(device))
            fixed_model = copy.deepcopy(model)  # the ranks the integrator reached in the warm-up
            fixed_optimizer = torch.optim.SGD(fixed_model.parameters(), lr=0.01)
            for x, y in batches[: args.warmup]:
                step(fixed_model, fixed_optimizer, None, x, y, Clock(device))
            adaptive, fixed = Clock(device), Clock(device)
            for x, y in batches[args.warmup:]:  # alternating, so that both see the same machine
                step(model, optimizer, integrator, x, y, adaptive)
                step(fixed_model, fixed_optimizer, None, x, y, fixed)
            integrator.remove()
            adaptive_ms = sum(adaptive.total.values()) / args.steps * 1e3
            fixed_ms = sum(fixed.total.values()) / args.steps * 1e3
            breakdown = ", ".join(f"{k} {v / args.steps * 1e3:.1f}" for k, v in adaptive.total.items())
            print(f"{name:<10} {batch:>5} {rank:>5} {method:<10} {f'{interval}:{core_steps}':>8} {fixed_ms:9.1f} "
                  f"{adaptive_ms:10.1f} {adaptive_ms / fixed_ms:6.2f}  {breakdown}")


if __name__ == "__main__":
    main()
