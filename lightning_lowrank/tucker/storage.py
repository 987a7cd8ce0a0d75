"""Storage that follows the rank: how many columns a mode stores, reallocating a parameter to them, and handing the
memory of shapes a run left back to the operating system."""

from __future__ import annotations

import ctypes
import functools
import math
import platform
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def zero_outside(tensor: Tensor, ranks: Sequence[int], extent: Sequence[int] | None = None) -> None:
    """In place: zero the entries of ``tensor`` outside its leading block of shape ``ranks``, within the leading block
    ``extent`` (default: the whole tensor; beyond ``extent`` the caller knows the entries are 0 already)."""
    extent = tensor.shape if extent is None else extent
    for mode, r in enumerate(ranks):
        if r < extent[mode]:
            index = [slice(n) for n in extent]
            index[mode] = slice(r, extent[mode])
            tensor[tuple(index)] = 0


def storage_size(size: int, rank: int, current: int | None = None) -> int:
    """Columns to store for a mode of ``size`` at ``rank``: room for the augmented basis, need = min(size, 2 rank).

    Sizes come from the ladder 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5 times them, capped by ``size``):
    at most 1.5 need. From a ``current`` storage it grows to the ladder size above need when need exceeds it, and
    shrinks to that size only once that is at most half of ``current``; otherwise it stays, so the rank must
    change by a factor of about 1.4 or more before the parameters are reallocated again.
    """
    need = min(size, 2 * rank)
    fitted = ladder_size(need, size)
    if current is None or need > current or 2 * fitted <= current:
        return fitted
    return current


def ladder_size(need: int, size: int) -> int:
    """The smallest size of the ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) that is
    at least ``need``, capped by ``size``: at most 1.5 ``need``."""
    step = 1 << max(need - 1, 0).bit_length()  # smallest power of two >= need
    return min(size, 3 * step // 4 if 3 * step // 4 >= need and step >= 4 else step)


def stored_entries(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Entries a Tucker layer of ``shape`` stores at ``ranks``: factors n_i x s_i and the core prod_i s_i, the
    storage s_i = :func:`storage_size` (n_i, r_i)."""
    storage = [storage_size(n, r) for n, r in zip(shape, ranks)]
    return sum(n * s for n, s in zip(shape, storage)) + math.prod(storage)


def factors_pay(shape: Sequence[int], ranks: Sequence[int]) -> bool:
    """Whether a Tucker layer of ``shape`` at ``ranks`` stores fewer entries than its dense weight (else it keeps
    the weight in dense storage, :meth:`~lightning_lowrank.tucker.layers.TuckerLayer.to_dense_storage`)."""
    return stored_entries(shape, ranks) < math.prod(shape)


def resized(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """A new tensor of ``shape`` holding the leading block ``tensor`` and ``shape`` share, zero elsewhere."""
    new = tensor.new_zeros(tuple(shape))
    block = tuple(slice(min(a, b)) for a, b in zip(tensor.shape, shape))
    new[block] = tensor[block]
    return new


def replace_data(parameter: nn.Parameter, data: Tensor) -> None:
    """``parameter.data = data`` for ``data`` of another shape, keeping the Parameter object.

    Autograd reuses a parameter's gradient accumulator while any graph still holds it (a previous step's loss kept
    alive, say), and that accumulator checks gradients against the shape it was made for; assigning ``.data`` drops
    it only when dtype or device change (``VariableHooks::set_data``), so an empty tensor of another dtype goes in
    first. The one place that relies on this; ``test_resize_while_an_old_graph_is_alive`` fails if it changes.
    """
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    parameter.data = torch.empty(0, dtype=other, device=data.device)
    parameter.data = data


def release_host_memory() -> bool:
    """Hand the free pages of the C heap back to the operating system (glibc's ``malloc_trim(0)``); whether it ran
    (False where the C library is not glibc: nothing to call).

    Blocks that tensors of a shape the run no longer makes have freed (a layer's ranks moved its widths) stay in
    glibc's heap, counted in the process's memory, until allocations of their size come again; the integrator calls
    this in the backward pass after a step that changed some layer's shapes (``IntegratorConfig.release_memory``;
    README "What training costs": 4% of the VGG-style net's memory over training, about 7 ms a call).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``int malloc_trim(size_t pad)``, or None under another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    trim = ctypes.CDLL(None).malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
