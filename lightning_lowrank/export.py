"""Model surgery out of Tucker form: plain torch layers at the learned ranks, or dense layers again."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from lightning_lowrank.attention import SplitAttention
from lightning_lowrank.deep_linear import DeepLinear
from lightning_lowrank.layers import TuckerLayer


def _replace(module: nn.Module, classes: tuple[type[nn.Module], ...],
             replacement: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``module`` with every module of ``classes`` replaced, under each of its names (one object per
    module), outermost first (the replacement of a module covers its children)."""
    module = copy.deepcopy(module)
    if isinstance(module, classes):
        return replacement(module)
    replaced: dict[int, nn.Module] = {}
    done: list[str] = []
    for name, layer in list(module.named_modules(remove_duplicate=False)):
        if isinstance(layer, classes) and not any(name.startswith(prefix + ".") for prefix in done):
            if id(layer) not in replaced:
                replaced[id(layer)] = replacement(layer)
            module.set_submodule(name, replaced[id(layer)])
            done.append(name)
    return module


def compact(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Tucker layer replaced by plain torch layers at exactly its active ranks.

    A convolution becomes ``nn.Sequential`` of three convolutions (1x1, kxk, 1x1), a linear layer two ``nn.Linear``;
    a :class:`~lightning_lowrank.DeepLinear` block two ``nn.Linear`` through its width (or one where that is
    smaller). The result computes the same outputs and ``torch.export`` takes it. It holds only torch modules, so
    it loads without lightning_lowrank, except split attention: torch has no attention with factorized projections,
    so :class:`~lightning_lowrank.SplitAttention` stays, with compact projections (its ``torch.export`` program loads
    without the package; :func:`to_dense` gives ``nn.MultiheadAttention``).
    """
    return _replace(module, (TuckerLayer, DeepLinear), lambda layer: layer.to_compact())


def to_dense(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every factorized layer merged back into the dense ``nn.Linear``/``nn.ConvNd``, and
    split attention back into ``nn.MultiheadAttention``."""
    return _replace(module, (SplitAttention, TuckerLayer, DeepLinear),
                    lambda layer: layer.to_torch() if isinstance(layer, SplitAttention) else layer.to_dense())
