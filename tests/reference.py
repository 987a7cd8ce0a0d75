"""Slow, obviously correct references for the tests: explicit SVDs in float64, and tensorly's unfoldings and mode
products (an implementation independent of the package's)."""

from __future__ import annotations

import tensorly as tl
import torch
from torch import Tensor

tl.set_backend("pytorch")


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding: shape (n_mode, prod of the other sizes)."""
    return tl.unfold(tensor, mode)


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """tensor x_mode matrix: multiplies the mode-``mode`` fibres by ``matrix`` (m x n_mode)."""
    return tl.tenalg.mode_dot(tensor, matrix, mode)


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


def tucker_to_dense(core: Tensor, factors: list[Tensor]) -> Tensor:
    return tl.tucker_to_tensor((core, list(factors)))


def kron_all(matrices: list[Tensor]) -> Tensor:
    out = matrices[0]
    for m in matrices[1:]:
        out = torch.kron(out, m)
    return out


def orth(matrix: Tensor, scale: float) -> Tensor:
    """Orthonormal basis of the column space (SVD; singular values below 1e-10 * scale count as zero)."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, : int((s > scale * 1e-10).sum())]


def bug_step(core, factors, bias, loss_fn, lr, tau, max_ranks, adapted, method="augmented", min_rank=1):
    """One BUG step of arXiv 2305.19059 with explicit Euler sub-steps, written out in full (float64).

    K-step: Mat_i(C)^T = Q_i S_i^T, K_i = U_i S_i, V_i = (kron_{j != i} U_j) Q_i, K_i' = K_i - lr Mat_i(dL/dW) V_i,
    U_hat_i = [U_i | N_i], N_i = orth((I - U_i U_i^T) K_i').
    "augmented" S-step: C_hat = C x_i U_hat_i^T U_i, C_hat' = C_hat - lr dL/dW x_i U_hat_i^T.
    "parallel" (Ceruti, Kusch, Lubich): old block C - lr dL/dW x_i U_i^T, block with mode i new N_i^T K_i' Q_i^T,
    blocks with two or more new modes zero.
    Truncation: per adapted mode the SVD of Mat_i(C_hat'), tail 2-norm <= tau ||C_hat'||_F.
    Returns the new core, factors and bias.
    """
    weight = tucker_to_dense(core, factors).requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    grad_w, grad_b = torch.autograd.grad(loss_fn(weight, bias), (weight, bias))
    d = core.ndim
    new_dirs, k_values, qs = [], [], []
    for i in range(d):
        q, r = torch.linalg.qr(unfold(core, i).T)
        s = r.T
        k = factors[i] @ s
        v = kron_all([factors[j] for j in range(d) if j != i]) @ q
        assert torch.allclose(unfold(weight.detach(), i), k @ v.T, atol=1e-12)
        k_new = k - lr * unfold(grad_w, i) @ v
        u = factors[i]
        fresh = orth(k_new - u @ (u.T @ k_new), k_new.norm()) if u.shape[0] > u.shape[1] else u[:, :0]
        assert u.shape[1] + fresh.shape[1] <= max_ranks[i], "the reference does not cap (choose max_rank >= 2r)"
        new_dirs.append(fresh)
        k_values.append(k_new)
        qs.append(q)
    bases = [torch.cat([u, n], dim=1) for u, n in zip(factors, new_dirs)]
    if method == "augmented":
        core_hat, grad_hat = core, grad_w
        for i, u in enumerate(bases):
            core_hat = mode_product(core_hat, u.T @ factors[i], i)
            grad_hat = mode_product(grad_hat, u.T, i)
        assert torch.allclose(tucker_to_dense(core_hat, bases), weight.detach(), atol=1e-12)
        core_hat = core_hat - lr * grad_hat
    else:
        grad_old = grad_w
        for i, u in enumerate(factors):
            grad_old = mode_product(grad_old, u.T, i)
        core_hat = torch.zeros([u.shape[1] for u in bases], dtype=core.dtype)
        old = tuple(slice(u.shape[1]) for u in factors)
        core_hat[old] = core - lr * grad_old
        for i in range(d):
            r, e = factors[i].shape[1], new_dirs[i].shape[1]
            block = new_dirs[i].T @ k_values[i] @ qs[i].T  # (e, prod of the other old ranks)
            shape = [u.shape[1] for u in factors]
            shape[i] = e
            index = list(old)
            index[i] = slice(r, r + e)
            core_hat[tuple(index)] = block.reshape(e, *[shape[j] for j in range(d) if j != i]).movedim(0, i)
    theta = tau * core_hat.norm()
    ps = []
    for i in range(d):
        p, s, _ = torch.linalg.svd(unfold(core_hat, i), full_matrices=False)
        if adapted[i]:
            tails = torch.stack([s[r:].norm() for r in range(len(s) + 1)])
            rank = int(torch.nonzero(tails <= theta)[0])
            rank = min(max(rank, min_rank), max_ranks[i])
        else:
            rank = factors[i].shape[1]
        ps.append(p[:, :rank])
    new_core = core_hat
    for i, p in enumerate(ps):
        new_core = mode_product(new_core, p.T, i)
    return new_core, [u @ p for u, p in zip(bases, ps)], (bias - lr * grad_b).detach()
