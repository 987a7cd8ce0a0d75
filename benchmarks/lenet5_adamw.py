"""LeNet5 on MNIST with AdamW: the integrator's schedules side by side, dense as the baseline, from one run.

    python benchmarks/lenet5_adamw.py [--epochs 2] [--taus 0.1 0.2] [--seeds 0 1]
                                      [--schedules 1:1 10:1 10:10] [--method parallel]

The setting in which the package was compared with the authors' later code (issue 20): AdamW lr 1e-3, weight decay
0, gradient clipping 1.0, cosine schedule over the run, batch 128; the first conv and the last linear layer dense,
the middle conv (50x20x5x5) at storage rank 25/10 and the first linear layer (500x800) at 200/200, both converted
from the dense init at their storage ranks. A schedule ``k:s`` is ``interval=k, core_steps=s``: 1:1 the paper's
step, 10:1 truncation right after each augmenting step of every 10th, 10:10 ten core steps at the augmented ranks
before truncation (the authors' code). Per row: test accuracy, compression of the two converted layers, median
training step time and its ratio to the dense step of the same seed. Needs ``make data``.
Their code's figures (issue 20): tau 0.1, 98.61% / 98.71% at 78.2%; tau 0.2, 97.78% at 93.4%; 5 epochs at
tau 0.1, 99.03% at 78.5%; dense 98.98% / 98.93% (2 epochs), 99.31% (5); their step 0.74x dense.
"""

from __future__ import annotations

import argparse
import itertools

import lightning.pytorch as pl
import torch
from classifiers import ImageClassifier
from mnist import MNISTDataModule
from training import fit_and_test, schedule

import lightning_lowrank as ll


class AdamWClassifier(ImageClassifier):
    """LeNet5 trained with AdamW (lr 1e-3, no weight decay) and a cosine schedule over all optimizer steps."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--schedules", type=schedule, nargs="+", default=[(1, 1), (10, 1), (10, 10)],
                        help="interval:core_steps pairs")
    parser.add_argument("--method", default="parallel", choices=["parallel", "augmented"])
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline rows")
    args = parser.parse_args()

    print(f"LeNet5 / MNIST, AdamW lr 1e-3, clip 1.0, cosine, batch 128, {args.epochs} epochs, method {args.method}")
    print(f"{'seed':>4} {'tau':>5} {'schedule':>8} {'test acc':>9} {'compression':>11} {'ms/step':>8} "
          f"{'vs dense':>8}  final ranks (out/in: net.3 net.7)", flush=True)
    for seed in args.seeds:
        data = MNISTDataModule(args.data, batch_size=128, val_size=0, seed=seed)

        def run(arm):
            pl.seed_everything(seed, verbose=False)
            model = AdamWClassifier("lenet5")
            callbacks = []
            if arm is not None:
                ll.convert(model, ll.TuckerConfig(include=["net.3"], max_rank=0.5))
                ll.convert(model, ll.TuckerConfig(include=["net.7"], max_rank=200))
                tau, (interval, core_steps) = arm
                callbacks = [ll.TuckerCallback(tau=tau, method=args.method, interval=interval,
                                               core_steps=core_steps, exclude=["net.0", "net.9"])]
            return fit_and_test(model, data, args.epochs, callbacks, gradient_clip_val=1.0)

        dense = None if args.no_dense else run(None)
        if dense is not None:
            print(f"{seed:>4} {'-':>5} {'dense':>8} {dense.accuracy:>9} {0:11.1%} {dense.step_ms:8.1f} {1:8.2f}  -",
                  flush=True)
        for tau, (interval, core_steps) in itertools.product(args.taus, args.schedules):
            result = run((tau, (interval, core_steps)))
            ratio = f"{result.step_ms / dense.step_ms:8.2f}" if dense else f"{'-':>8}"
            print(f"{seed:>4} {tau:5.3g} {f'{interval}:{core_steps}':>8} {result.accuracy:>9} "
                  f"{result.compression_rate:11.1%} {result.step_ms:8.1f} {ratio}  {result.ranks}", flush=True)


if __name__ == "__main__":
    main()
