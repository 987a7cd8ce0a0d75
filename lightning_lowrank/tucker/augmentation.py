"""Augmentation, the first half of the integrator's step: the bases grow by the gradient's new directions, and the
core gets its gradient on the augmented bases (arXiv 2305.19059).

Per mode i of a Tucker layer W = C x_i U_i, the augmented basis is U_hat_i = [U_i | N_i] with N_i spanning
(I - U_i U_i^T) dL/dU_i (:func:`augmented_basis`); the core's gradient on the augmented bases comes either from the
K-step values recovered from dL/dU (:func:`parallel_gradient`) or from the layer's input and output gradient kept by
a :class:`Capture` (the exact Galerkin gradient, ``TuckerLayer.galerkin_gradient``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_lowrank.tucker.algebra import compute_dtype, fold, thin_svd, unfold
from lightning_lowrank.tucker.layers import TuckerLayer


class Capture:
    """Inputs and output gradients of one Tucker layer's training forward passes since the last step."""

    def __init__(self, layer: TuckerLayer) -> None:
        self.pairs: list[list[Tensor | None]] = []
        self.active = True
        self.handle: RemovableHandle = layer.register_forward_hook(self._forward_hook)

    def _forward_hook(self, layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not (self.active and layer.training and torch.is_grad_enabled() and output.requires_grad):
            return
        pair: list[Tensor | None] = [args[0].detach(), None]
        self.pairs.append(pair)

        def keep(grad: Tensor) -> None:
            pair[1] = grad.detach()

        output.register_hook(keep)

    def complete(self) -> Iterator[tuple[Tensor, Tensor]]:
        return ((x, dy) for x, dy in self.pairs if dy is not None)


def augmented_basis(layer: TuckerLayer, mode: int, earlier: Tensor | None,
                    adapts: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """QR of [U | G]: the augmented basis Q = [Q_1 | N], R_11 with U = Q_1 R_11 (diag(R_11) > 0), and which
    columns of N carry more than rounding noise of the gradient.

    G = dL/dU plus ``earlier`` (n x r, the basis gradients summed since the last augmentation); N spans
    (I - U U^T) G with min(r, n - r) columns (capped by the mode size n, not by ``max_rank``: a mode at its
    largest rank still rotates; the truncation brings it back to ``max_rank``); the layer's storage must hold
    them. Taking Q_1 (and C x_i R_11 as the core) instead of U keeps W exact and the basis orthonormal to working
    precision, so rounding never accumulates; R_11 is the identity up to rounding. A mode that neither ``adapts``
    nor has room to grow is never rotated: U as it is, R_11 None.
    """
    u = layer.factors[mode]
    r = layer.ranks[mode]
    extra = min(r, layer.shape[mode] - r) if u.grad is not None else 0
    if extra == 0 and not adapts:
        return u[:, :r], None, u.new_zeros(0, dtype=torch.bool)
    grad = None if extra == 0 else u.grad[:, :r] if earlier is None else u.grad[:, :r] + earlier
    columns = [u[:, :r]] if grad is None else [u[:, :r], grad[:, :extra]]
    dtype = compute_dtype(u.dtype)
    q, r_factor = torch.linalg.qr(torch.cat(columns, dim=1).to(dtype))
    diagonal = torch.diagonal(r_factor)
    signs = torch.where(diagonal < 0, -1.0, 1.0).to(dtype)
    # a new direction whose share of the gradient is rounding noise is arbitrary: mark it to carry no gradient
    floor = 100 * torch.finfo(dtype).eps * _norm(grad.to(dtype)) if extra else 0
    significant = diagonal[r:].abs() > floor
    return (q * signs).to(u.dtype), r_factor[:r, :r] * signs[:r, None], significant


def parallel_gradient(layer: TuckerLayer, core: Tensor, bases: tuple[Tensor, ...],
                      old: tuple[int, ...]) -> Tensor | None:
    """Core gradient on the augmented bases of the parallel BUG step.

    Old block: dL/dC. Block with mode i new (N_i) and the others old: N_i^T dL/dK_i Q_i^T, the K-step's new
    values divided by -lr, where Mat_i(C) = S_i Q_i^T and dL/dK_i = dL/dU_i S_i^{-T}, so
    N_i^T dL/dU_i (M M^T)^+ M = N_i^T dL/dU_i P S^-1 V^T with M = Mat_i(C) = P S V^T (SVD in the core's compute
    dtype). In exact arithmetic that is N_i^T G V V^T, the Galerkin block projected on M's row space (dL/dU_i =
    G M^T). Singular values below max(r, p) * eps * s_max (M is r x p) are at the rounding level of M and count as
    zero, the pseudo-inverse's usual cut-off. The SVD of M itself (:func:`thin_svd`), not an inverse of the Gram
    matrix M M^T, keeps the conditioning unsquared, so float32 gives what the float64 pseudo-inverse of M M^T gave
    (tested on cores of condition 1e7 and 1e5). Blocks with two or more new modes: zero. A matrix core's two
    unfoldings are C and C^T: one SVD serves both.
    """
    if layer.core.grad is None:
        return None
    grad = core.new_zeros(tuple(u.shape[1] for u in bases))
    grad[tuple(slice(r) for r in old)] = layer.core.grad[tuple(slice(r) for r in old)]
    svd = None
    for mode, (basis, r) in enumerate(zip(bases, old)):
        if basis.shape[1] == r:
            continue
        m = unfold(core, mode)
        if svd is not None and core.ndim == 2:  # C^T = V S P^T
            p, s, vh = svd[2].T, svd[1], svd[0].T
        else:
            p, s, vh = svd = thin_svd(m)
        inverse = torch.where(s > max(m.shape) * torch.finfo(s.dtype).eps * s[:1], 1 / s, 0)
        new_dirs = basis[:, r:].T.to(m.dtype) @ layer.factors[mode].grad[:, :r].to(m.dtype)
        values = (new_dirs @ p) * inverse @ vh
        index = [slice(rank) for rank in old]
        index[mode] = slice(r, basis.shape[1])
        grad[tuple(index)] = fold(values, mode, [basis.shape[1] - r if j == mode else n for j, n in enumerate(old)]
                                  ).to(grad.dtype)
    return grad


def _norm(tensor: Tensor) -> Tensor:
    """Frobenius norm, computed on the tensor scaled by its largest entry so that no square overflows."""
    largest = tensor.abs().amax().clamp_min(torch.finfo(tensor.dtype).tiny)
    return largest * torch.linalg.vector_norm(tensor / largest)
