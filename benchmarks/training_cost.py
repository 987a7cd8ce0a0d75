"""What training costs: dense against TuckerCallback, each arm in its own process, ratios to dense from one run.

    python benchmarks/training_cost.py [--model lenet5] [--epochs 2] [--tau 0.15] [--ranks full 0.25]
                                       [--init hosvd] [--growth 0.25] [--patience 200] [--schedule 10:10]
                                       [--dense-interval 10] [--limit-batches N] [--optimizer sgd] [--scale-steps]
                                       [--plot docs/memory.png]

LeNet5 on MNIST (28x28) or the VGG-style net on Fashion-MNIST (32x32, 3 channels), SGD lr 0.05 momentum 0.9
(``--optimizer adamw``: AdamW lr 1e-3, weight decay 0), batch 128 (LeNet5) or 32 (VGG-style). Arms: dense, and
``TuckerCallback(tau, rank)`` for every ``--ranks`` (``full``: the full-rank start; a fraction: the start below it;
``default``: ``rank=None``, chosen from the optimizer; ``--schedule k:s``: ``interval=k, core_steps=s``, default the
package's: 1:1 for SGD, 10:10 for AdamW). Per arm: peak bytes of parameters + gradients + optimizer state over
the run (measured after backward, before the integrator drops the basis gradients, and after each step), the same at
the end, peak process RSS over the training steps (Linux: the peak is reset once the data and the layers are in
place, at ``on_train_start``) and over the whole run (each arm in a fresh process; loading the data set and the test
that follows the fit, in batches of 1000, included), median time per training step over the first 20 steps and over
the last epoch, compression rate and test accuracy; each with its ratio to the dense arm. The header names the
allocator that ``LD_PRELOAD`` puts in every arm's process (glibc's malloc when unset). ``--plot`` writes the state
bytes over steps of every arm. Needs ``make data``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from classifiers import ImageClassifier
from mnist import MNISTDataModule
from training import schedule

import lightning_lowrank as ll

OPTIMIZERS = {"sgd": "SGD lr 0.05 momentum 0.9", "adamw": "AdamW lr 1e-3"}
SETTINGS = {"lenet5": dict(data="data/mnist", batch_size=128, image_size=28, channels=1),
            "vgg": dict(data="data/fashion-mnist", batch_size=32, image_size=32, channels=3)}


def state_bytes(trainer: pl.Trainer, module: torch.nn.Module) -> int:
    """Bytes of the parameters, their gradients and every optimizer's state tensors."""
    tensors = [t for p in module.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for optimizer in trainer.optimizers for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_rss(reset: bool = False) -> int | None:
    """The process's peak resident bytes since it started or since the last reset (Linux's VmHWM; None elsewhere).
    ``reset``: start a new peak at the current RSS (``/proc/self/clear_refs``) and return None."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
            return None
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


class CostMeter(pl.Callback):
    """State bytes after backward (placed before TuckerCallback: the basis gradients still there) and after each
    step; wall time of each training step; peak RSS over the training steps."""

    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.seconds: list[float] = []
        self.epoch_starts: list[int] = []
        self.train_rss: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peak_rss(reset=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_rss = peak_rss()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_starts.append(len(self.seconds))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._start = time.perf_counter()
        self._after_backward = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._after_backward = state_bytes(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.bytes.append(max(self._after_backward, state_bytes(trainer, pl_module)))


def run_arm(args: argparse.Namespace, arm: str) -> dict[str, object]:
    setting = SETTINGS[args.model]
    pl.seed_everything(args.seed, verbose=False)
    data = MNISTDataModule(setting["data"], batch_size=setting["batch_size"], val_size=0, seed=args.seed,
                           image_size=setting["image_size"], channels=setting["channels"])
    optimizer = dict(lr=0.05, momentum=0.9) if args.optimizer == "sgd" else dict(lr=1e-3, optimizer="adamw")
    model = ImageClassifier(args.model, in_channels=setting["channels"], image_size=setting["image_size"], **optimizer)
    meter = CostMeter()
    callbacks: list[pl.Callback] = [meter]
    if arm != "dense":
        rank = arm if arm == "full" else None if arm == "default" else float(arm)
        interval, core_steps = args.schedule
        callbacks.append(ll.TuckerCallback(tau=args.tau, rank=rank, init=args.init, growth=args.growth,
                                           patience=args.patience, interval=interval, core_steps=core_steps,
                                           scale_steps=args.scale_steps, dense_interval=args.dense_interval))
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=args.limit_batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, data)
        accuracy = trainer.test(model, data, verbose=False)[0]["test_acc"]
    report = ll.summary(model)
    last_epoch = meter.seconds[meter.epoch_starts[-1]:]
    return {"arm": arm, "peak_bytes": max(meter.bytes), "end_bytes": meter.bytes[-1], "bytes": meter.bytes,
            "train_rss": meter.train_rss, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "first_ms": statistics.median(meter.seconds[:20]) * 1e3, "last_ms": statistics.median(last_epoch) * 1e3,
            "compression": report.compression_rate if report.layers else 0.0, "accuracy": accuracy,
            "ranks": " ".join("/".join(map(str, layer.ranks[:2])) for layer in report.layers) or "-"}


def plot(results: list[dict[str, object]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5))
    for result in results:
        label = "dense" if result["arm"] == "dense" else f"TuckerCallback, rank={result['arm']}"
        axes.plot([b / 2**20 for b in result["bytes"]], label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("MiB")
    axes.set_title(title)
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5", choices=sorted(SETTINGS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tau", type=float, default=0.15)
    parser.add_argument("--ranks", nargs="+", default=["full", "0.25"],
                        help="'full', 'default' (rank=None) or fractions in (0, 1]")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default all)")
    parser.add_argument("--init", default="hosvd", choices=["hosvd", "hosvd_scaled", "random"],
                        help="factors of a start below full rank (TuckerConfig.init)")
    parser.add_argument("--growth", type=float, default=ll.IntegratorConfig.growth,
                        help="the integrator's growth margin (0: the paper's rule)")
    parser.add_argument("--patience", type=int, default=ll.IntegratorConfig.patience,
                        help="optimizer steps a mode keeps its growth margin after the start or its last renewal")
    parser.add_argument("--dense-interval", type=int, default=ll.IntegratorConfig.dense_interval,
                        help="steps between truncations of a layer in dense storage")
    parser.add_argument("--schedule", type=schedule, default=(None, None), help="interval:core_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--scale-steps", action="store_true", help="the callback's scale_steps=True")
    parser.add_argument("--plot", default=None, help="write the state-bytes curves to this PNG")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # run one arm in this process
    args = parser.parse_args()
    if args.arm is not None:
        print("RESULT " + json.dumps(run_arm(args, args.arm)), flush=True)
        return

    results = []
    for arm in ["dense", *args.ranks]:
        command = [sys.executable, __file__, *sys.argv[1:], "--arm", arm]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
    dense = results[0]
    print(f"{args.model}, {args.epochs} epochs, tau {args.tau}, init {args.init}, growth {args.growth}, "
          f"patience {args.patience}, {OPTIMIZERS[args.optimizer]}, batches per epoch {args.limit_batches or 'all'}, "
          f"seed {args.seed}, allocator {os.environ.get('LD_PRELOAD') or 'glibc malloc'}")
    print(f"{'arm':>10} {'test acc':>8} {'compr.':>6} {'peak state':>14} {'end state':>14} {'RSS, train':>15} "
          f"{'RSS, run':>15} {'first 20 ms':>14} {'last ep. ms':>14}  final ranks")
    for r in results:
        def cell(key: str, scale: float, unit: str) -> str:
            if r[key] is None or dense[key] is None:
                return "n/a"
            return f"{r[key] / scale:7.1f}{unit} {r[key] / dense[key]:4.2f}x"

        print(f"{r['arm']:>10} {r['accuracy']:8.2%} {r['compression']:6.1%} {cell('peak_bytes', 2**20, 'M'):>14} "
              f"{cell('end_bytes', 2**20, 'M'):>14} {cell('train_rss', 2**20, 'M'):>15} "
              f"{cell('rss', 2**20, 'M'):>15} {cell('first_ms', 1, ''):>14} "
              f"{cell('last_ms', 1, ''):>14}  {r['ranks']}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.plot, f"{args.model}: parameters + gradients + optimizer state (tau {args.tau})")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
