"""Model surgery out of Tucker form: plain torch layers at the learned ranks, or dense layers again."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from lightning_lowrank.deep_linear.layers import DeepLinear
from lightning_lowrank.tucker.attention import SplitAttention
from lightning_lowrank.tucker.layers import TuckerLayer


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
    compacted = _replace(module, (TuckerLayer, DeepLinear), lambda layer: layer.to_compact())
    _general_transformer_path(compacted)
    return compacted


def _general_transformer_path(module: nn.Module) -> None:
    """Turn torch's Transformer inference fast path off where it would read a dense ``weight`` that the compact
    export no longer has (it computes the same function as the general path, with dense kernels).

    The gates are the public attributes torch sets at construction: ``activation_relu_or_gelu`` of an encoder
    layer (0: no fast path) and ``use_nested_tensor`` of an encoder.
    """
    for layer in module.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and not all(
                isinstance(getattr(m, "weight", None), torch.Tensor)
                for m in (layer.linear1, layer.linear2, layer.self_attn.out_proj)):
            layer.activation_relu_or_gelu = 0
    for encoder in module.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(
                isinstance(layer, nn.TransformerEncoderLayer) and layer.activation_relu_or_gelu == 0
                for layer in encoder.layers):
            encoder.use_nested_tensor = False


def to_dense(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every structured module replaced by its ``to_dense()``: factorized layers merged
    back into the dense ``nn.Linear``/``nn.ConvNd``, split attention back into ``nn.MultiheadAttention``."""
    return _replace(module, (SplitAttention, TuckerLayer, DeepLinear), lambda layer: layer.to_dense())
