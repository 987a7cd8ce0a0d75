"""LeNet5 on MNIST trained in Tucker form with TuckerCallback: ranks, accuracy, compression, rank curves.

    python examples/lenet5_mnist.py [--epochs 3] [--tau 0.15] [--data data/mnist] [--log-dir logs]

Needs the MNIST files in ``--data`` (``make data`` fetches them). The callback prints the per-layer ranks at the end
of fit; then the test accuracy of the Tucker model and of its compact export, the compression rate, and
``rank_curves.png`` next to the logs.
``--smoke`` runs one batch of each loop (what the tests run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy

import lightning_lowrank as ll

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the demo data and models live there
from classifiers import ImageClassifier  # noqa: E402
from mnist import MNISTDataModule  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/mnist")
    parser.add_argument("--log-dir", default="logs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one batch of each loop")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    data = MNISTDataModule(args.data, batch_size=128)
    model = ImageClassifier("lenet5", lr=args.lr, momentum=args.momentum)
    limits = {"limit_train_batches": 1, "limit_val_batches": 1, "limit_test_batches": 1} if args.smoke else {}
    trainer = pl.Trainer(max_epochs=1 if args.smoke else args.epochs, callbacks=[ll.TuckerCallback(tau=args.tau)],
                         logger=CSVLogger(args.log_dir, name="lenet5_mnist"), log_every_n_steps=1 if args.smoke else 10,
                         enable_checkpointing=False, **limits)
    start = time.perf_counter()
    trainer.fit(model, data)
    minutes = (time.perf_counter() - start) / 60
    accuracy = trainer.test(model, data, verbose=False)[0]["test_acc"]

    report = ll.summary(model)
    compact = ll.compact(model.net).eval()
    compact_accuracy = MulticlassAccuracy(10, average="micro")
    with torch.no_grad():
        for batch_idx, (x, y) in enumerate(data.test_dataloader()):
            if batch_idx == trainer.num_test_batches[0]:
                break
            compact_accuracy.update(compact(x), y)
    figure_path = f"{trainer.logger.log_dir}/rank_curves.png"
    ll.plot_ranks(trainer.logger.log_dir, figure_path)

    print(f"test accuracy {accuracy:.2%} (compact export {compact_accuracy.compute():.2%}), compression rate "
          f"{report.compression_rate:.2%}, {sum(p.numel() for p in compact.parameters()):,} parameters in the "
          f"compact model, {minutes:.1f} min of training")
    print(f"rank curves: {figure_path}")
    return {"test_acc": accuracy, "compact_test_acc": float(compact_accuracy.compute()),
            "compression_rate": report.compression_rate}


if __name__ == "__main__":
    main()
