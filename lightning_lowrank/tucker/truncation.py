"""Truncation, the second half of the integrator's step: per adapted mode, the SVD of the core's unfolding keeps
the smallest rank whose discarded singular values have 2-norm <= tau ||C||_F (:func:`rank_candidates`); bases, core
and the core's optimizer state rotate with the kept singular vectors (:func:`rotate_layer`). A layer in dense storage
keeps W projected onto the kept directions until its factors would store less than W; then the kept vectors become
its factors; a layer whose factors grow to store more than W holds it whole again (:func:`store_dense`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_lowrank.tucker.algebra import compute_dtype, full_ranks, tail_rank, unfold
from lightning_lowrank.tucker.layers import TuckerLayer
from lightning_lowrank.tucker.optimizer_state import expand_state, resize_state, rotate, transport_state
from lightning_lowrank.tucker.storage import factors_pay


def rank_candidates(layer: TuckerLayer, old_ranks: Sequence[int], tau: float,
                    adapts: Callable[[int], bool]) -> tuple[list[Tensor | None], list[Tensor]]:
    """Singular vectors per mode (None: the mode keeps its basis) and the rank candidates, as 0-d tensors (no host
    sync): first whether the core is finite, then per mode the tail rank with tolerance tau (a mode that ``adapts``)
    or the rank before augmentation (a mode that only rotated). In dense storage every mode gets its vectors (they
    become its basis once the layer factorizes).

    The core is scaled by its largest entry first, so any finite core works (its Gram matrices cannot overflow).
    """
    core = layer.active_core().to(compute_dtype(layer.core.dtype))
    largest = core.abs().amax()
    core = torch.nan_to_num(core / largest.clamp_min(torch.finfo(core.dtype).tiny), 0.0, 0.0, 0.0)
    theta = tau * torch.linalg.vector_norm(core)
    rotates = [layer.dense_storage or adapts(mode) or old_ranks[mode] != r for mode, r in enumerate(layer.ranks)]
    pairs = matrix_pairs(core) if core.ndim == 2 and all(rotates) else [None] * core.ndim
    vectors: list[Tensor | None] = []
    candidates = [torch.isfinite(largest).long()]
    for mode, r in enumerate(layer.ranks):
        if not rotates[mode]:
            vectors.append(None)
            candidates.append(torch.tensor(r, device=core.device))
            continue
        p, s = pairs[mode] or singular_pairs(core, mode)
        vectors.append(p.to(layer.core.dtype))
        candidates.append(tail_rank(s, theta) if adapts(mode) else torch.tensor(old_ranks[mode], device=core.device))
    return vectors, candidates


@torch.no_grad()
def rotate_layer(layer: TuckerLayer, rotations: Sequence[Tensor | None],
                 optimizer: torch.optim.Optimizer | None) -> None:
    """U_i <- U_i P_i, C <- C x_i P_i^T for every mode with a rotation P_i (orthonormal columns); the core's
    optimizer state follows (:func:`~lightning_lowrank.tucker.optimizer_state.transport_state`). In dense storage
    (a P_i for every mode): :func:`truncate_dense`."""
    if layer.dense_storage:
        truncate_dense(layer, rotations, optimizer)
        return
    new_core = rotate(layer.active_core(), rotations)
    transport_state(optimizer, layer.core, layer.ranks, rotations)
    for u, p in zip(layer.factors, rotations):
        if p is not None:
            u[:, : p.shape[1]] = u[:, : p.shape[0]] @ p
    layer.core[tuple(slice(r) for r in new_core.shape)] = new_core
    layer.set_ranks(new_core.shape)


@torch.no_grad()
def store_dense(layer: TuckerLayer, optimizer: torch.optim.Optimizer | None) -> None:
    """Hold W itself (:meth:`~lightning_lowrank.TuckerLayer.to_dense_storage`), the core's state carried to W's
    coordinates (:func:`~lightning_lowrank.tucker.optimizer_state.expand_state`): for a layer whose factors came to
    store more than W."""
    factors, ranks = [u.clone() for u in layer.active_factors()], layer.ranks
    resize_state(optimizer, layer.to_dense_storage())
    expand_state(optimizer, layer.core, ranks, factors)


@torch.no_grad()
def truncate_dense(layer: TuckerLayer, bases: Sequence[Tensor], optimizer: torch.optim.Optimizer | None,
                   factorize: bool = False) -> None:
    """Truncate a layer in dense storage to the kept vectors P_i (n_i x r_i): where its factors at the ranks r_i
    store less than W (:func:`~lightning_lowrank.tucker.storage.factors_pay`) or ``factorize`` says so, factorize,
    U_i <- P_i and C <- W x_i P_i^T, the state rotated as :func:`rotate_layer` rotates it and resized with the
    storage; else keep W stored whole and project it, W <- W x_i P_i P_i^T (a mode at its unfolding's rank bound
    loses nothing and is not projected), a proximal step on the parameter the optimizer steps: its state stays the
    dense optimizer's (projected, Adam's second moments would keep about r_i / n_i of their mass, and every later
    step would be larger)."""
    ranks = tuple(p.shape[1] for p in bases)
    if factorize or factors_pay(layer.shape, ranks):
        transport_state(optimizer, layer.core, layer.shape, bases)
        resize_state(optimizer, layer.factorize(bases))
        return
    there = [p if r < bound else None for p, r, bound in zip(bases, ranks, full_ranks(layer.shape))]
    layer.core.copy_(rotate(rotate(layer.core, there), [None if p is None else p.T for p in there]))
    layer.set_ranks(ranks)


def matrix_pairs(core: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per mode of a matrix core C (r_0 x r_1), an orthonormal basis whose first k columns span its top k singular
    vectors on that side (for every k), and the singular values, from one eigen-decomposition.

    eigh of the smaller side's Gram matrix (:func:`singular_pairs`) gives that side's vectors P; the other side's
    first k columns are the QR of C^T P_k = V_k S_k (QR keeps the leading columns' span), a product and a QR in
    place of the larger Gram's eigh (for Linear(1024, 512) augmented to 512 x 1024: 1024 x 1024). The other side
    keeps at most min(r_0, r_1) directions, as many as C has.
    """
    small = 0 if core.shape[0] <= core.shape[1] else 1
    p, s = singular_pairs(core, small)
    other = torch.linalg.qr(unfold(core, small).T @ p).Q
    return [(p, s), (other, s)] if small == 0 else [(other, s), (p, s)]


def singular_pairs(tensor: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values (descending) of the mode unfolding M, by eigh of M M^T.

    The Gram matrix is only r x r, so this costs far less than an SVD of the r x prod(others) unfolding. In float32
    singular values are resolved down to about 3e-4 s_max, far below any useful truncation tolerance.
    """
    m = unfold(tensor, mode)
    eigenvalues, eigenvectors = torch.linalg.eigh(m @ m.T)
    return eigenvectors.flip(-1), eigenvalues.flip(-1).clamp_min(0).sqrt()
