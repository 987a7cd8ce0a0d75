"""A VGG-style network on Fashion-MNIST (32x32, 3 channels): dense against fixed-rank Tucker against TuckerCallback.

    python benchmarks/vgg_fashion.py [--epochs 3] [--tau 0.15] [--schedules 10:10] [--intervals 1 5]
                                     [--train-size 60000]
                                     [--widths 32 32 M 64 64 M 128 128 M 256 256 M] [--seed 0] [--no-fixed-rank]
                                     [--no-dense]

SGD lr 0.05, momentum 0.9, batch 128. Rows, from one run: the dense network; for every integrator schedule
(``k:s``: ``interval=k, core_steps=s``; ``--intervals k`` adds ``k:1``; the package's default without either),
TuckerCallback (full-rank start, rank adapted by the integrator) and the same network built directly at the ranks the
callback reached, trained with the plain optimizer on factors and core (Tucker layers rebuilt at those ranks,
re-initialised: the fixed-rank baseline). Test accuracy,
compression rate, median time per optimizer step and its ratio to the dense step. Target (issue 7): at >= 90%
compression the callback's step is faster than the dense step, accuracy within 1 point. Needs ``make data``.
"""

from __future__ import annotations

import argparse
import copy

import lightning.pytorch as pl
import torch
from classifiers import ImageClassifier, vgg
from mnist import MNISTDataModule
from torch import nn
from training import add_schedule_options, fit_and_test, schedule_label, schedules

import lightning_lowrank as ll


class Subset(MNISTDataModule):
    """The first ``train_size`` training images."""

    def __init__(self, train_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_size = train_size

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            x, y = self.train_set.tensors
            self.train_set = torch.utils.data.TensorDataset(x[: self.train_size], y[: self.train_size])


def fixed_rank(net: nn.Module) -> nn.Module:
    """A re-initialised copy of ``net`` whose Tucker layers are rebuilt with storage = their active ranks (random
    orthonormal factors, core at torch's dense scale): the fixed-rank network a plain optimizer trains."""
    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, ll.TuckerLayer):
            net.set_submodule(name, type(module)(**{**module.arguments(), "max_rank": module.ranks}))
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.15)
    add_schedule_options(parser)
    parser.add_argument("--method", default="parallel", choices=["parallel", "augmented"])
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--widths", nargs="+", default="32 32 M 64 64 M 128 128 M 256 256 M".split())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fixed-rank", action="store_true", help="skip the fixed-rank baseline rows")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (no step ratios then)")
    args = parser.parse_args()
    widths = [w if w == "M" else int(w) for w in args.widths]
    data = Subset(args.train_size, root=args.data, batch_size=128, image_size=32, channels=3, val_size=0,
                  seed=args.seed)

    def classifier() -> ImageClassifier:
        pl.seed_everything(args.seed, verbose=False)
        model = ImageClassifier("vgg", in_channels=3, image_size=32, lr=0.05, momentum=0.9)
        model.net = vgg(3, 10, 32, widths)
        return model

    print(f"VGG-style {widths} / Fashion-MNIST 32x32x3, {args.train_size} training images, SGD lr 0.05 momentum 0.9, "
          f"batch 128, {args.epochs} epochs, tau {args.tau}, {args.method}")
    print(f"{'training':<26} {'test acc':>9} {'compression':>11} {'ms/step':>8} {'vs dense':>8}  "
          "ranks (out/in per layer)")
    dense = None if args.no_dense else fit_and_test(classifier(), data, args.epochs)
    if dense is not None:
        print(f"{'dense':<26} {dense.accuracy:>9} {0:11.1%} {dense.step_ms:8.1f} {1:8.2f}  -", flush=True)

    for interval, core_steps in schedules(args):
        adaptive_model = classifier()
        adaptive = fit_and_test(adaptive_model, data, args.epochs, [ll.TuckerCallback(  # the full start of its rows
            tau=args.tau, rank="full", method=args.method, interval=interval, core_steps=core_steps)])
        rows = [(f"TuckerCallback, {schedule_label(interval, core_steps)}", adaptive)]
        if not args.no_fixed_rank:
            fixed_model = classifier()
            fixed_model.net = fixed_rank(adaptive_model.net)
            rows.append(("fixed rank (same ranks)", fit_and_test(fixed_model, data, args.epochs)))
        for name, result in rows:
            ratio = f"{result.step_ms / dense.step_ms:8.2f}" if dense else f"{'-':>8}"
            print(f"{name:<26} {result.accuracy:>9} {adaptive.compression_rate:11.1%} {result.step_ms:8.1f} "
                  f"{ratio}  {adaptive.ranks}", flush=True)


if __name__ == "__main__":
    main()
