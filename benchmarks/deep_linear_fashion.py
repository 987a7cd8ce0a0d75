"""An MLP on Fashion-MNIST with a wide against a compressed deep linear block before the classifier, from one run.

    python benchmarks/deep_linear_fashion.py [--epochs 5] [--rank 16] [--depth 3]

The MLP (784 -> 1024 -> ReLU -> block 1024 -> 1024 -> ReLU -> 10) trains with SGD (lr 0.05, momentum 0.9, batch
128); DeepLinearCallback turns its hidden-to-hidden layer into a depth-3 DeepLinear block: wide (width 1024) or
compressed (width 2r from the layer's initial weights), orthogonal factors at scale 1, outer factors at alpha * lr.
Prints test accuracy, median epoch time and parameters of both, and the ratios. Published (arXiv 2311.05061,
Fashion-MNIST): ~0.902 wide vs ~0.901 compressed, ~260 s vs ~115 s. Needs ``make data``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from classifiers import ImageClassifier
from mnist import MNISTDataModule
from training import fit_and_test

import lightning_lowrank as ll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = MNISTDataModule(args.data, batch_size=128, val_size=0, seed=args.seed)
    print(f"MLP / Fashion-MNIST, SGD lr 0.05 momentum 0.9, batch 128, {args.epochs} epochs, depth {args.depth}, "
          f"alpha {args.alpha}, seed {args.seed}")
    print(f"{'block':<11} {'width':>5} {'test acc':>9} {'s/epoch':>8} {'params':>10}")
    results = {}
    for name, compressed in (("wide", False), ("compressed", True)):
        pl.seed_everything(args.seed, verbose=False)
        model = ImageClassifier("mlp", lr=0.05, momentum=0.9)
        callback = ll.DeepLinearCallback(args.depth, args.rank, compressed, init_scale=1.0, alpha=args.alpha,
                                         include=["net.3"])
        result = fit_and_test(model, data, args.epochs, [callback])
        params = sum(p.numel() for p in model.parameters())
        results[name] = result
        print(f"{name:<11} {model.net[3].width:>5} {result.test_acc:9.2%} {result.epoch_seconds:8.1f} {params:>10,}",
              flush=True)
    wide, compressed = results["wide"], results["compressed"]
    print(f"compressed vs wide: {wide.epoch_seconds / compressed.epoch_seconds:.2f}x faster per epoch, accuracy "
          f"{100 * (compressed.test_acc - wide.test_acc):+.2f} points")


if __name__ == "__main__":
    main()
