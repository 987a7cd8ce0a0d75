"""What both callbacks share: metrics logged to every logger, checkpoints, and the checks of the trainer setup."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
)
from torch import nn
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from lightning_lowrank.lightning.checkpoint import CHECKPOINT_KEY, split_state

try:  # lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
    AVERAGING: tuple[type[Callback], ...] = (StochasticWeightAveraging, WeightAveraging)
except ImportError:
    AVERAGING = (StochasticWeightAveraging,)


_PROGRESS_BAR = ("compression_rate", "params", "stored_params")


class LowRankCallback(Callback):
    """What both callbacks share: metrics and checkpoints.

    Logs ``lowrank/<name>`` for every entry of :meth:`metrics` through ``pl_module.log``, at the start of every
    training batch whose step Lightning writes (``log_every_n_steps``; step k shows the state after k optimizer
    steps; the other steps skip the cost of forming the metrics) and at epoch end, so every logger,
    ModelCheckpoint and EarlyStopping see them; compression on the progress bar. The state training starts from goes
    to every logger at its first step (0, or the step a run resumes at), whatever ``log_every_n_steps``.
    Checkpoints hold the merged dense weights in ``state_dict`` (so ``Module.load_from_checkpoint`` builds the
    trained dense model) and the exact factorization under ``checkpoint["lightning_lowrank"]``.
    """

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def initial_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """What the first log of a fit holds: :meth:`metrics`, plus what does not change during the fit."""
        return self.metrics(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {f"lowrank/{name}": value for name, value in self.initial_metrics(pl_module).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if writes_logs(trainer):
            self._log(pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, on_step=False)

    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        for name, value in self.metrics(pl_module).items():
            pl_module.log(f"lowrank/{name}", value, prog_bar=name in _PROGRESS_BAR, on_step=on_step,
                          on_epoch=not on_step, batch_size=1)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = split_state(pl_module, checkpoint["state_dict"])

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Lightning has loaded the merged weights (factorized by the layers); restore the exact factorization."""
        if CHECKPOINT_KEY in checkpoint:
            result = pl_module.load_state_dict(checkpoint[CHECKPOINT_KEY]["state_dict"], strict=False)
            if result.unexpected_keys:
                raise ValueError(f"the checkpoint has factorized state the model lacks: {result.unexpected_keys[:5]}; "
                                 "convert the same layers (same `include`/`exclude`) as the run that saved it")


def start_method(strategy: pl.strategies.Strategy) -> str | None:
    """How a DDP strategy starts its processes: "popen" (the script launcher: every process runs the user's script)
    or a multiprocessing start method ("spawn", "fork", "forkserver": ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``),
    after which Lightning loads the trained state back into the main process's model; None for other strategies.

    Lightning has no public attribute for it: this is the one place that reads the private
    ``DDPStrategy._start_method`` (the other private read is :func:`writes_logs`);
    ``test_callback.py::test_start_method_of_each_launcher`` fails if it changes.
    """
    return getattr(strategy, "_start_method", "popen") if isinstance(strategy, DDPStrategy) else None


def writes_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the step metrics logged now (in ``on_train_batch_start``) to the loggers: every
    ``log_every_n_steps`` steps, counted in batches that stepped an optimizer.

    Lightning has no public attribute for it: this is the one place that reads the private
    ``trainer._logger_connector.should_update_logs``; ``test_callback.py::test_step_metrics_reach_the_logger_at_every_
    logging_step`` fails if it changes.
    """
    return bool(trainer._logger_connector.should_update_logs)


def averaged_models(trainer: pl.Trainer) -> list[nn.Module]:
    """The model copy of every averaging callback (:data:`AVERAGING`), which it made at its setup and averages into.

    Lightning has no public attribute for it: this is the one place that reads their private ``_average_model``;
    ``test_callback.py::test_placed_before_swa_it_works_and_after_it_is_refused`` and
    ``::test_weight_averaging_after_the_freeze_keeps_orthonormal_factors`` fail if it changes.
    """
    copies = []
    for callback in trainer.callbacks:
        if isinstance(callback, AVERAGING):
            if not hasattr(callback, "_average_model"):
                raise RuntimeError(f"{type(callback).__name__} keeps its model copy elsewhere than `_average_model` "
                                   f"in this Lightning version ({pl.__version__}): lightning_lowrank cannot match it "
                                   "to the trained layers' storage")
            copy = callback._average_model  # None until its setup for fit
            if copy is not None:
                copies.append(copy.module if isinstance(copy, AveragedModel) else copy)
    return copies


def check_conversion_reaches_main_process(strategy: pl.strategies.Strategy, function: str) -> None:
    """Refuse to convert in worker processes whose state Lightning copies back into a still-dense model."""
    method = start_method(strategy)
    if method not in (None, "popen"):
        raise ValueError(
            f"this DDP strategy (start method {method!r}: ddp_spawn, ddp_fork or ddp_notebook) trains in worker "
            "processes and loads their state back into the main process's model, whose layers are still dense "
            "there: the trained factorization would be lost. Convert before `fit` in the main process "
            f"(`{function}(model, ...)` with the callback's options; the callback then finds the layers converted), "
            "or use strategy='ddp'")


def check_checkpoint_callbacks(trainer: pl.Trainer) -> None:
    """Weights-only checkpoints skip the callback's checkpoint hook, so they would hold raw factors that neither
    ``Module.load_from_checkpoint`` nor :func:`~lightning_lowrank.load_checkpoint` can read: refuse them."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_weights_only:
            raise ValueError("ModelCheckpoint(save_weights_only=True) skips the low-rank callbacks' checkpoint hook: "
                             "its files would hold the raw factors without the structure that loads them. Use "
                             "save_weights_only=False (the default); for a small file of the trained model, save "
                             "`lightning_lowrank.compact(model)` or load the full checkpoint with "
                             "`lightning_lowrank.load_checkpoint`")


def check_strategy(callback: Callback, strategy: pl.strategies.Strategy) -> None:
    """Single device and DDP (any launcher) are supported; sharded strategies would split the factors."""
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(f"{type(callback).__name__} supports single-device and DDP strategies, not "
                         f"{type(strategy).__name__}: sharded parameters (FSDP, DeepSpeed, model parallel) would "
                         "split the factors it keeps whole (orthonormal bases, outer factors)")
