"""Shared by the real-data benchmarks: fit a classifier, time its training epochs, test it."""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

import lightning_lowrank as ll


def schedule(text: str) -> tuple[int, int]:
    """An integrator schedule ``interval:core_steps`` from the command line (``10:10``), validated."""
    try:
        interval, core_steps = (int(part) for part in text.split(":"))
        ll.IntegratorConfig(interval=interval, core_steps=core_steps)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a schedule is interval:core_steps with 1 <= core_steps <= interval, for "
                                         f"example 10:10, got {text!r} ({error})") from None
    return interval, core_steps


def add_schedule_options(parser) -> None:
    parser.add_argument("--schedules", type=schedule, nargs="+", default=[],
                        help="interval:core_steps pairs (default, with no --intervals either: the package's)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[],
                        help="interval k as the schedule k:1 (what the tables run before core_steps existed ran)")


def schedules(args, default: list[tuple[int, int]] | None = None) -> list[tuple[int | None, int | None]]:
    """The ``--schedules`` pairs and the ``--intervals`` k as k:1; if neither, ``default`` (if None: the package's
    default, ``(None, None)``, which the optimizer chooses)."""
    return [*args.schedules, *((k, 1) for k in args.intervals)] or default or [(None, None)]


def schedule_label(interval: int | None, core_steps: int | None) -> str:
    """``k:s``, or ``default`` for the package's default schedule."""
    return "default" if interval is None else f"{interval}:{core_steps}"


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (without validation and testing) and the number of optimizer steps."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


@dataclass
class Result:
    test_acc: float
    compression_rate: float
    ranks: str
    epoch_seconds: float
    step_ms: float
    diverged: bool  # a parameter is NaN or inf after training

    @property
    def accuracy(self) -> str:
        return "diverged" if self.diverged else f"{self.test_acc:.2%}"


def fit_and_test(model: pl.LightningModule, data: pl.LightningDataModule, epochs: int,
                 callbacks: list[pl.Callback] = (), **trainer_options: object) -> Result:
    """Train for ``epochs`` (no validation), test; median epoch time and time per optimizer step.
    ``trainer_options`` go to the Trainer (for example ``gradient_clip_val``)."""
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[*callbacks, timer], limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, data)
        accuracy = trainer.test(model, data, verbose=False)[0]["test_acc"]
    report = ll.summary(model)
    ranks = " ".join(f"{'/'.join(map(str, layer.ranks[:2]))}" for layer in report.layers)
    epoch = float(torch.tensor(timer.seconds).median())
    diverged = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return Result(accuracy, report.compression_rate, ranks or "dense", epoch,
                  epoch / (trainer.global_step / epochs) * 1e3, diverged)
