"""What a checkpoint carries to rebuild Tucker layers, and loading it without the callback."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lightning_lowrank.deep_linear.layers import DeepLinear
from lightning_lowrank.export import compact
from lightning_lowrank.tucker.attention import SplitAttention
from lightning_lowrank.tucker.integrator import IntegratorConfig, TuckerIntegrator
from lightning_lowrank.tucker.layers import TUCKER_LAYERS

CHECKPOINT_KEY = "lightning_lowrank"
"""The checkpoint entry ``{"layers": {name: {"type": class name, "arguments": {...}}}, "state_dict": {...}}``: the
factorized layers' structure and exact state, while the checkpoint's ``state_dict`` holds their merged dense
weights; ``"pending": {"config": IntegratorConfig fields, "ranks": {name: ranks before augmentation}}`` names the
Tucker layers saved at their augmented ranks or with a growth margin, awaiting the final truncation."""

FACTORIZED = (*TUCKER_LAYERS.values(), DeepLinear)
"""The factorized layer classes: each has ``arguments()`` and ``dense_weight()``."""
STRUCTURED = (*FACTORIZED, SplitAttention)
"""The module classes a checkpoint entry records and rebuilds (each has ``arguments()``), parents first."""


def _of_type(module: nn.Module, classes: tuple[type[nn.Module], ...]) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, classes)}


def layer_structure(module: nn.Module) -> dict[str, Any]:
    """The type and constructor arguments (sizes, options, ranks) of every structured module of ``module``."""
    return {"layers": {name: {"type": type(m).__name__, "arguments": m.arguments()}
                       for name, m in _of_type(module, STRUCTURED).items()}}


def split_state(module: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Move the factorized layers' entries (all but ``bias``: core, factors, rank) out of ``state_dict`` (in place),
    put each layer's merged weight W in their stead, write split attention in ``nn.MultiheadAttention``'s layout
    (``in_proj_weight``, ``in_proj_bias``), and return the checkpoint entry with the moved state.

    So ``state_dict`` is the one of the model with dense layers (``Module.load_from_checkpoint`` loads it), and
    the entry restores the exact factorization.
    """
    moved, merged = {}, set()
    for name, layer in _of_type(module, FACTORIZED).items():
        prefix = f"{name}." if name else ""
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] != "bias"]:
            moved[key] = state_dict.pop(key)
        state_dict[prefix + "weight"] = layer.dense_weight().detach()
        merged.add(prefix + "weight")
    for name, attention in _of_type(module, (SplitAttention,)).items():
        prefix = f"{name}." if name else ""
        for key in [f"{prefix}{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")]:
            if key in state_dict:
                value = state_dict.pop(key)
                if key not in merged:  # a projection's exact state (bias, or the weight of a dense projection)
                    moved[key] = value
        state_dict.update({prefix + k: v for k, v in attention.torch_state().items() if not k.startswith("out_proj")})
    return {**layer_structure(module), "state_dict": moved}


def rebuild(module: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Put factorized layers of the given ``structure`` into ``module`` in place (on its device and dtype)."""
    classes = {cls.__name__: cls for cls in STRUCTURED}
    for name, entry in structure["layers"].items():
        try:
            current = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint has a Tucker layer {name!r} that {type(module).__name__} lacks") from None
        reference = next(current.parameters(), None)
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        arguments = {_RENAMED.get(key, key): value for key, value in entry["arguments"].items()}
        module.set_submodule(name, classes[entry["type"]](**arguments, **factory))
    return module


_RENAMED = {"rank": "ranks", "max_rank": "max_ranks"}
"""Constructor arguments of Tucker layers under their earlier names (checkpoints written with them still load)."""


def load_checkpoint(checkpoint: str | os.PathLike | dict[str, Any], model: nn.Module | type[nn.Module],
                    compact_layers: bool = True, map_location: str | torch.device | None = "cpu",
                    weights_only: bool = True) -> nn.Module:
    """Load a checkpoint written with :class:`~lightning_lowrank.TuckerCallback` or
    :class:`~lightning_lowrank.DeepLinearCallback`, no callback needed.

    By default it returns the **compact** architecture, not the one you pass: every factorized layer becomes plain
    torch layers at the learned ranks (a ``Conv2d`` three convolutions, a ``Linear`` two), the smallest model that
    computes the trained function. ``compact_layers=False`` returns the Tucker layers (to go on training or
    inspect ranks); ``MyModule.load_from_checkpoint(path)`` gives the original dense architecture. Tucker layers
    saved in the middle of an integrator window (training at their augmented ranks) or keeping a growth margin are
    truncated to their tolerance ranks with the run's tolerance, as the end of training would; resuming with
    ``Trainer.fit(ckpt_path=...)`` keeps them exact.

    Args:
        checkpoint: a path (as saved by Lightning) or the loaded checkpoint dictionary.
        model: the module the checkpoint's ``state_dict`` belongs to (its layers still dense), or a LightningModule
            class, built from the checkpoint's hyper-parameters.
        compact_layers: return plain torch layers at the learned ranks (:func:`~lightning_lowrank.compact`), else
            the Tucker layers.
        map_location, weights_only: as in :func:`torch.load`.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=weights_only)
    if CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"the checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written with TuckerCallback or "
                         "DeepLinearCallback")
    if isinstance(model, type):
        model = model(**checkpoint.get("hyper_parameters", {}))
    entry = checkpoint[CHECKPOINT_KEY]
    rebuild(model, entry)
    merged = {f"{name}.{key}" if name else key for name, layer in entry["layers"].items()
              for key in (("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                          if layer["type"] == SplitAttention.__name__ else ("weight",))}
    model.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k not in merged} | entry["state_dict"])
    if "pending" in entry:
        pending = entry["pending"]
        layers = {name: model.get_submodule(name) for name in pending["ranks"]}
        config = {**pending["config"], "interval": 1, "core_steps": 1}  # the final truncation follows no schedule
        integrator = TuckerIntegrator(layers, IntegratorConfig(**config))
        integrator.load_state_dict({"steps": 0, "frozen": False, "augmented": pending["ranks"]})
        integrator.truncate(final=True)
        integrator.remove()  # no hooks stay on the returned model
    return compact(model) if compact_layers else model
