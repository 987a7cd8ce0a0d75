"""The deep linear method's Lightning glue: overparameterize at setup, scale the outer factors' updates, log widths."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_lowrank.deep_linear.conversion import DeepLinearConfig, overparameterize
from lightning_lowrank.deep_linear.layers import DeepLinear
from lightning_lowrank.lightning.base import (
    LowRankCallback,
    check_checkpoint_callbacks,
    check_conversion_reaches_main_process,
    check_strategy,
)


class DeepLinearCallback(LowRankCallback):
    """Train chosen Linear layers of a LightningModule as deep linear blocks, compressed to width 2r.

    At ``setup`` (idempotent) the selected ``nn.Linear`` layers become :class:`~lightning_lowrank.DeepLinear`
    blocks (:func:`~lightning_lowrank.deep_linear.conversion.overparameterize`): compressed to the top-2r singular
    subspaces of their weights, or wide. During fit every optimizer step moves the outer factors ``alpha`` times as
    far as the optimizer would: p <- p_before + alpha (p_after - p_before), which for SGD (with momentum), Adam and
    AdamW is exactly an ``alpha`` times larger learning rate, whatever the scheduler does to it; configure the
    optimizer on ``self.parameters()`` as usual. (:func:`~lightning_lowrank.deep_linear.layers.param_groups` builds
    the groups instead, for a loop without Lightning.) Logged like :class:`TuckerCallback`, with the same meanings:
    ``lowrank/compression_rate`` (1 - parameters of the blocks / parameters of the dense layers they replaced),
    ``lowrank/params`` and ``lowrank/<layer>/width``.

    Args: the fields of :class:`~lightning_lowrank.deep_linear.layers.DeepLinearConfig`.
    """

    def __init__(self, depth: int = 3, rank: int | None = None, compressed: bool = True, init_scale: float = 1e-2,
                 alpha: float = 5.0, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.config = DeepLinearConfig(depth, rank, compressed, init_scale, alpha, tuple(include), tuple(exclude))
        self._handles: list[RemovableHandle] = []
        self._before: dict[nn.Parameter, Tensor] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(self, trainer.strategy)
        check_checkpoint_callbacks(trainer)
        if any(type(m) is nn.Linear for m in pl_module.modules()) or not self._blocks(pl_module):
            report = overparameterize(pl_module, self.config)
            if report.converted and stage == "fit":
                check_conversion_reaches_main_process(trainer.strategy,
                                                       "lightning_lowrank.deep_linear.layers.overparameterize")
            if report.converted:
                rank_zero_info(f"DeepLinearCallback: {report}")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config.alpha == 1:
            return
        outer = {id(p): p for block in self._blocks(pl_module).values() for p in block.outer_factors}
        for optimizer in trainer.optimizers:
            mine = [p for group in optimizer.param_groups for p in group["params"] if id(p) in outer]
            if mine:
                self._handles.append(optimizer.register_step_pre_hook(
                    lambda opt, args, kwargs, mine=mine: self._before.update({p: p.detach().clone() for p in mine})))
                self._handles.append(optimizer.register_step_post_hook(
                    lambda opt, args, kwargs, mine=mine: self._scale_updates(mine)))

    @torch.no_grad()
    def _scale_updates(self, parameters: list[nn.Parameter]) -> None:
        """p <- p_before + alpha (p - p_before), in place."""
        for p in parameters:
            p.lerp_(self._before.pop(p), 1 - self.config.alpha)

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compression against the dense layers, parameters of the model, and the width of every block."""
        blocks = self._blocks(pl_module)
        params = sum(block.num_parameters() for block in blocks.values())
        dense = sum(block.dense_num_parameters() for block in blocks.values())
        metrics = {"compression_rate": 1 - params / dense,
                   "params": float(sum(p.numel() for p in pl_module.parameters()))}
        return metrics | {f"{name}/width": float(block.width) for name, block in blocks.items()}

    @staticmethod
    def _blocks(pl_module: pl.LightningModule) -> dict[str, DeepLinear]:
        return {name: m for name, m in pl_module.named_modules() if isinstance(m, DeepLinear)}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
