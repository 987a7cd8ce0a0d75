"""Tucker layers under data parallelism.

A Tucker layer's factors and core change shape as its storage follows the rank, and DDP's reducer, which builds
its gradient buckets from the parameter shapes once, cannot follow. So they are kept out of DDP
(:func:`keep_out_of_ddp`, before wrapping), their gradients are averaged across processes in one coalesced call per
optimizer step (:func:`average_gradients`, which the integrator calls when it has a ``reduce``), and their initial
values are taken from the first process (:func:`broadcast_layers`), as DDP does for the parameters it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_lowrank.tucker.layers import TuckerLayer


def _tucker_state(module: nn.Module) -> list[str]:
    """Fully qualified names of the Tucker layers' factors, cores and rank buffers in ``module``."""
    return [f"{name}.{key}" if name else key
            for name, layer in module.named_modules() if isinstance(layer, TuckerLayer)
            for key, _ in [*layer.named_parameters(recurse=True), *layer.named_buffers(recurse=False)]
            if key != "bias"]


def keep_out_of_ddp(module: nn.Module) -> None:
    """Mark the Tucker layers' factors, cores and ranks of ``module`` for DDP to ignore (call before wrapping).

    torch has no public API for this; DDP reads the list that its static method
    ``_set_params_and_buffers_to_ignore_for_model`` stores on the module. The one private use, guarded by
    ``test_ddp_ignores_the_tucker_parameters``.
    """
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, _tucker_state(module))


def _parameters(layers: Iterable[TuckerLayer]) -> list[nn.Parameter]:
    return [p for layer in layers for p in (*layer.factors, layer.core)]


@torch.no_grad()
def average_gradients(layers: Iterable[TuckerLayer], reduce: Callable[[Tensor], Tensor]) -> Tensor | None:
    """Average the factors' and cores' gradients across processes in one ``reduce`` (a mean) of one flat buffer.

    As DDP does, a process on which a parameter got no gradient contributes zeros. Returns, per parameter (in
    :func:`drop_absent`'s order), the share of processes that had a gradient for it (a device tensor: the caller
    reads it with its own host sync and passes it to :func:`drop_absent`); None without parameters.
    """
    parameters = _parameters(layers)
    if not parameters:
        return None
    reference = parameters[0]
    present = torch.tensor([p.grad is not None for p in parameters], dtype=reference.dtype, device=reference.device)
    flat = reduce(torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                             for p in parameters] + [present]))
    for p, grad in zip(parameters, flat[:-len(parameters)].split([p.numel() for p in parameters])):
        p.grad = grad.view_as(p)
    return flat[-len(parameters):]


def drop_absent(layers: Iterable[TuckerLayer], present: Sequence[float]) -> None:
    """Set to None the gradients that no process had (``present`` from :func:`average_gradients`, read)."""
    for p, share in zip(_parameters(layers), present):
        if share == 0:
            p.grad = None


@torch.no_grad()
def broadcast_layers(layers: Mapping[str, TuckerLayer], broadcast: Callable[[Tensor], Tensor]) -> None:
    """Give every process the first process's factors, cores and ranks (their storage must agree already)."""
    parameters = _parameters(layers.values())
    flat = broadcast(torch.cat([p.reshape(-1) for p in parameters]))
    for p, value in zip(parameters, flat.split([p.numel() for p in parameters])):
        p.copy_(value.view_as(p))
    for layer in layers.values():
        layer.set_ranks(broadcast(torch.tensor(layer.ranks, device=layer.core.device)).tolist())
