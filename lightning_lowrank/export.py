"""Model surgery out of Tucker form: plain torch layers at the learned ranks, or dense layers again."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from lightning_lowrank.deep_linear import DeepLinear
from lightning_lowrank.layers import TuckerLayer

Factorized = TuckerLayer | DeepLinear


def _replace_factorized_layers(module: nn.Module, replacement: Callable[[Factorized], nn.Module]) -> nn.Module:
    """A copy of ``module`` with every factorized layer replaced, under each of its names (one object per layer)."""
    module = copy.deepcopy(module)
    if isinstance(module, (TuckerLayer, DeepLinear)):
        return replacement(module)
    replaced: dict[int, nn.Module] = {}
    for name, layer in list(module.named_modules(remove_duplicate=False)):
        if isinstance(layer, (TuckerLayer, DeepLinear)):
            if id(layer) not in replaced:
                replaced[id(layer)] = replacement(layer)
            module.set_submodule(name, replaced[id(layer)])
    return module


def compact(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Tucker layer replaced by plain torch layers at exactly its active ranks.

    A convolution becomes ``nn.Sequential`` of three convolutions (1x1, kxk, 1x1), a linear layer two ``nn.Linear``;
    a :class:`~lightning_lowrank.DeepLinear` block two ``nn.Linear`` through its width (or one where that is
    smaller). The result computes the same outputs, holds only torch modules and loads without lightning_lowrank.
    """
    return _replace_factorized_layers(module, lambda layer: layer.to_compact())


def to_dense(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every factorized layer merged back into the dense ``nn.Linear``/``nn.ConvNd``."""
    return _replace_factorized_layers(module, lambda layer: layer.to_dense())
