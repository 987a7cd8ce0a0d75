"""Growth from below on a teacher-student problem: which ranks the integrator reaches, by growth rule and schedule.

    python benchmarks/teacher_growth.py [--tau 0.05] [--growth 0 0.25] [--patience 200] [--steps 400]

A ``TuckerLinear(64, 64)`` student starting at rank 2 learns a rank-10 teacher W* (y = W* x, x standard normal,
batch 128, squared error) with SGD (lr 2) and Adam (lr 1e-2), under the paper's schedule (1:1) and the default
(10:10). Per row: the final ranks after the closing truncation and the relative error ||W - W*||_F / ||W*||_F.
The integrator's float32 path, seeded: the same command prints the same table.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

import lightning_lowrank as ll


def train(optimizer: str, schedule: int, tau: float, growth: float, patience: int, steps: int) -> tuple[int, float]:
    torch.manual_seed(0)
    n = 64
    teacher = (torch.randn(n, 10, dtype=torch.float64) @ torch.randn(10, n, dtype=torch.float64)) / n
    torch.manual_seed(1)
    layer = ll.TuckerLinear(n, n, bias=False, ranks=(2, 2))
    config = ll.IntegratorConfig(tau=tau, interval=schedule, growth=growth, patience=patience)
    integrator = ll.TuckerIntegrator(nn.Sequential(layer), config)
    opt = torch.optim.SGD(layer.parameters(), lr=2.0) if optimizer == "SGD" else \
        torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(128, n)
        opt.zero_grad()
        ((layer(x) - x @ teacher.float().T) ** 2).mean().backward()
        integrator.step(opt)
    integrator.truncate(opt, final=True)
    with torch.no_grad():
        error = torch.linalg.norm(layer.dense_weight().double() - teacher) / torch.linalg.norm(teacher)
    return layer.ranks[0], float(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--growth", type=float, nargs="+", default=[0.0, ll.IntegratorConfig.growth])
    parser.add_argument("--patience", type=int, nargs="+", default=[ll.IntegratorConfig.patience])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    print(f"rank-2 student of a rank-10 teacher, 64 x 64, tau {args.tau}, {args.steps} steps")
    print(f"{'optimizer':>9} {'schedule':>8} {'growth':>6} {'patience':>8} {'rank':>4} {'rel. error':>10}")
    for optimizer, schedule, growth, patience in itertools.product(("SGD", "Adam"), (1, 10), args.growth,
                                                                  args.patience):
        if growth == 0 and patience != args.patience[0]:
            continue  # no margin: patience plays no part
        rank, error = train(optimizer, schedule, args.tau, growth, patience, args.steps)
        print(f"{optimizer:>9} {f'{schedule}:{schedule}':>8} {growth:6.2f} {patience:8d} {rank:4d} {error:10.3f}",
              flush=True)


if __name__ == "__main__":
    main()
