"""How a Tucker layer chooses between its factor chain and its merged weight, against the time of both, from one run.

    python benchmarks/layer_forms.py [--threads 2] [--fractions 0.05 0.1 0.25 0.5 1] [--device cuda]
                                     [--only NAME] [--repeats 15]

For Linear and Conv2d layers of LeNet5, the VGG-style net and a transformer block, at ranks a fraction of their
sizes, times one forward+backward pass in each form and in the dense layer it replaces (median of repeated runs; an
input that needs a gradient except for a network's first layer); "package / dense" is the time of the form the
package picks over the dense layer's. Fits time = a x multiply-adds + b x elements moved (each product's
multiply-adds and elements read and written, per pass: ``Product`` in lightning_lowrank/tucker/layers.py) by least
squares on relative error and prints b / a, the multiply-adds one element costs on this machine (``ELEMENT_COST``).
Then the regret of each rule: the time of the forms a rule picks over the time of the faster forms, summed over all
cases, for the package's rule (forward and backward, ``ELEMENT_COST`` per element) and the rule before it (forward
multiply-adds only).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from unittest import mock

import torch

from lightning_lowrank import TuckerConv2d, TuckerLinear
from lightning_lowrank.tucker import forms, layers
from lightning_lowrank.tucker.algebra import consistent_ranks

# (name, layer, input shape, whether the input needs a gradient)
CASES = [
    ("LeNet5 conv1 1->20 5x5", lambda: TuckerConv2d(1, 20, 5), (128, 1, 28, 28), False),
    ("LeNet5 conv2 20->50 5x5", lambda: TuckerConv2d(20, 50, 5), (128, 20, 12, 12), True),
    ("LeNet5 fc1 800->500", lambda: TuckerLinear(800, 500), (128, 800), True),
    ("VGG conv 3->64 3x3", lambda: TuckerConv2d(3, 64, 3, padding=1), (32, 3, 32, 32), False),
    ("VGG conv 64->64 3x3", lambda: TuckerConv2d(64, 64, 3, padding=1), (32, 64, 32, 32), True),
    ("VGG conv 128->256 3x3", lambda: TuckerConv2d(128, 256, 3, padding=1), (32, 128, 8, 8), True),
    ("VGG conv 512->512 3x3", lambda: TuckerConv2d(512, 512, 3, padding=1), (32, 512, 4, 4), True),
    ("VGG fc 2048->512", lambda: TuckerLinear(2048, 512), (32, 2048), True),
    ("transformer 512->2048", lambda: TuckerLinear(512, 2048), (8, 512, 512), True),
    ("transformer 1024->1024", lambda: TuckerLinear(1024, 1024), (256, 1024), True),
]


def step_ms(layer: torch.nn.Module, x: torch.Tensor, repeats: int = 15) -> float:
    """Median milliseconds of one forward and backward pass (on a GPU, from and to a synchronisation)."""
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    times = []
    for i in range(repeats + 3):
        sync()
        start = time.perf_counter()
        layer(x).sum().backward()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def form_ms(layer: layers.TuckerLayer, x: torch.Tensor, chain: bool, repeats: int) -> float:
    """:func:`step_ms` with the layer held to one form."""
    with mock.patch.object(layer, "forward_costs", return_value=(0, 1) if chain else (1, 0)):
        return step_ms(layer, x, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU)")
    parser.add_argument("--only", default="", help="the layers whose name contains this")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per form (their median counts)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, float32; ms per forward+backward")
    print(f"{'layer':<26} {'ranks':>9} {'chain ms':>9} {'merged ms':>9} {'dense ms':>9} {'package':>8} {'before':>8} "
          f"{'package / dense':>15}")
    rows = []
    cases = [case for case in CASES if args.only in case[0]]
    for (name, build, shape, input_grad), fraction in itertools.product(cases, args.fractions):
        layer = build().to(device)
        ranks = tuple(max(1, round(fraction * n)) for n in layer.shape[:2])
        if isinstance(layer, TuckerLinear):
            ranks = (min(ranks),) * 2
        layer.set_ranks(consistent_ranks((*ranks, *layer.ranks[2:])))
        x = torch.randn(shape, device=device, requires_grad=input_grad)
        times = [form_ms(layer, x, chain, args.repeats) for chain in (True, False)]
        dense = step_ms(layer.to_dense(), x, args.repeats)
        grads = forms.Grads(input=input_grad)
        products = layer.products(x.shape, grads=grads)
        work = [(sum(p.passes * p.macs for p in form), sum(p.passes * (p.read + p.written) for p in form))
                for form in products]
        chain_cost, merged_cost = layer.forward_costs(x.shape, grads=grads)
        before = sum(p.macs for p in products[0]) <= sum(p.macs for p in products[1])
        picks = ["chain" if chain_cost <= merged_cost else "merged", "chain" if before else "merged"]
        rows.append((times, work, picks))
        picked = times[0 if picks[0] == "chain" else 1]
        print(f"{name:<26} {'/'.join(map(str, layer.ranks[:2])):>9} {times[0]:9.2f} {times[1]:9.2f} {dense:9.2f} "
              f"{picks[0]:>8} {picks[1]:>8} {picked / dense:14.2f}x")
    samples = [(t, w) for times, work, _ in rows for t, w in zip(times, work)]
    design = torch.tensor([[m / t, e / t] for t, (m, e) in samples], dtype=torch.float64)
    a, b = torch.linalg.lstsq(design, torch.ones(len(samples), 1, dtype=torch.float64)).solution.flatten().tolist()
    print(f"\nfit: time = a x multiply-adds + b x elements; b / a = {b / a:.0f} multiply-adds per element "
          f"(package: ELEMENT_COST = {forms.ELEMENT_COST})")
    best = sum(min(times) for times, _, _ in rows)
    for i, rule in enumerate(("package (forward+backward, elements)", "before (forward multiply-adds)")):
        chosen = sum(times[0 if picks[i] == "chain" else 1] for times, _, picks in rows)
        print(f"regret of {rule}: {chosen / best:.3f} (time of the forms it picks / time of the faster forms)")


if __name__ == "__main__":
    main()
