"""Model surgery for the deep linear method: replace a model's ``nn.Linear`` layers by DeepLinear blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_lowrank.deep_linear.layers import DeepLinear
from lightning_lowrank.selection import ConversionReport, check_patterns, pattern_reason
from lightning_lowrank.validation import check_int


@dataclass(frozen=True)
class DeepLinearConfig:
    """Which ``nn.Linear`` layers :func:`overparameterize` turns into DeepLinear blocks, and how they train.

    Args:
        depth: factors per block (>= 2; 3 is needed for exact recovery in completion).
        rank: the compressed block has width min(2 rank, in, out); None estimates the rank from the layer's
            weight with :func:`estimate_rank` (meaningful for trained weights; give it for fresh layers).
        compressed: False builds the wide block instead (width max(in, out), random orthogonal factors).
        init_scale: the scale eps of every factor at initialisation (the block starts near zero, eps^depth).
        alpha: the outer factors' learning rate is alpha times the others'.
        include, exclude: glob patterns on qualified module names; empty include means every nn.Linear.
    """

    depth: int = 3
    rank: int | None = None
    compressed: bool = True
    init_scale: float = 1e-2
    alpha: float = 5.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_int("depth", self.depth, 2)
        if self.rank is not None:
            check_int("rank", self.rank, 1)
        if not self.init_scale > 0:
            raise ValueError(f"`init_scale` must be > 0, got {self.init_scale}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"`alpha` must be a finite number > 0, got {self.alpha}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


def overparameterize(module: nn.Module, config: DeepLinearConfig | None = None, **options: Any) -> ConversionReport:
    """Replace the selected ``nn.Linear`` layers of ``module`` by DeepLinear blocks, in place; idempotent.

    A compressed block spans the top-2r singular subspaces of the layer's weight (its surrogate); a wide block is
    random orthogonal. Either starts at eps^depth scale (the method trains from near zero) and keeps the layer's
    bias, device and dtype. Every rank is checked before the first layer is replaced.
    """
    if config is None:
        config = DeepLinearConfig(**options)
    elif options:
        raise TypeError("pass either `config` or keyword options, not both")
    check_patterns(module, config.include, config.exclude)
    report = ConversionReport()
    plan = []
    for name, layer in module.named_modules():
        if type(layer) is not nn.Linear:
            continue
        reason = pattern_reason(name, config.include, config.exclude)
        if reason:
            report.skipped[name] = reason
            continue
        if config.compressed and config.rank is not None and config.rank > min(layer.weight.shape):
            raise ValueError(f"`rank` {config.rank} exceeds min(out, in) = {min(layer.weight.shape)} of layer "
                             f"{name!r}; give a smaller rank or exclude the layer")
        plan.append((name, layer))
    for name, layer in plan:
        weight = layer.weight.detach()
        if config.compressed:
            block = DeepLinear.compressed(weight, config.rank, config.depth, config.init_scale, layer.bias is not None)
        else:
            block = DeepLinear(layer.in_features, layer.out_features, config.depth, None, config.init_scale,
                               layer.bias is not None, weight.device, weight.dtype)
        if layer.bias is not None:
            with torch.no_grad():
                block.bias.copy_(layer.bias)
        module.set_submodule(name, block)
        report.converted.append(name)
    if not any(isinstance(m, DeepLinear) for m in module.modules()):
        raise ValueError(f"nothing to overparameterize in {type(module).__name__}: no nn.Linear passed the "
                         f"selection\n{report}")
    return report
