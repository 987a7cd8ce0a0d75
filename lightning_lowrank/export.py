"""Model surgery out of Tucker form: plain torch layers at the learned ranks, or dense layers again."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from lightning_lowrank.layers import TuckerLayer


def _replace_tucker_layers(module: nn.Module, replacement: Callable[[TuckerLayer], nn.Module]) -> nn.Module:
    module = copy.deepcopy(module)
    if isinstance(module, TuckerLayer):
        return replacement(module)
    for name, layer in list(module.named_modules()):
        if isinstance(layer, TuckerLayer):
            module.set_submodule(name, replacement(layer))
    return module


def compact(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Tucker layer replaced by plain torch layers at exactly its active ranks.

    A convolution becomes ``nn.Sequential`` of three convolutions (1x1, kxk, 1x1), a linear layer two ``nn.Linear``.
    The result computes the same outputs, holds only torch modules and loads without lightning_lowrank.
    """
    return _replace_tucker_layers(module, lambda layer: layer.to_compact())


def to_dense(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Tucker layer merged back into the dense ``nn.Linear``/``nn.ConvNd``."""
    return _replace_tucker_layers(module, lambda layer: layer.to_dense())
