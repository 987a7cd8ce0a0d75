"""Slow, obviously correct references for the tests: explicit unfoldings and SVDs in float64."""

from __future__ import annotations

import torch
from torch import Tensor


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding: shape (n_mode, prod of the other sizes)."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """tensor x_mode matrix: multiplies the mode-``mode`` fibres by ``matrix`` (m x n_mode)."""
    rest = tensor.movedim(mode, 0).shape[1:]
    return (matrix @ unfold(tensor, mode)).reshape(matrix.shape[0], *rest).movedim(0, mode)


def truncated_hosvd(weight: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """W x_i (U_i U_i^T) with U_i the leading ``ranks[i]`` left singular vectors of the mode-i unfolding."""
    w = weight.double()
    out = w
    for mode, r in enumerate(ranks):
        u = torch.linalg.svd(unfold(w, mode), full_matrices=False)[0][:, :r]
        out = mode_product(out, u @ u.T, mode)
    return out


def assert_orthonormal(u: Tensor, atol: float = 1e-5) -> None:
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    torch.testing.assert_close(u.T @ u, eye, atol=atol, rtol=0)
