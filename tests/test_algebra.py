"""The package's tensor algebra (one implementation of each primitive) against tensorly's and explicit SVDs."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
from reference import assert_orthonormal, truncated_hosvd

from lightning_lowrank.tucker.algebra import fold, mode_dot, multi_mode_dot, thin_svd, tucker_decomposition, unfold

tl.set_backend("pytorch")


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 6), (6, 5, 3, 2)])
def test_unfold_and_mode_products_equal_tensorly(shape):
    torch.manual_seed(0)
    tensor = torch.randn(shape, dtype=torch.float64)
    matrices = [torch.randn(n + 1, n, dtype=torch.float64) for n in shape]
    for mode, matrix in enumerate(matrices):
        torch.testing.assert_close(unfold(tensor, mode), tl.unfold(tensor, mode), rtol=0, atol=0)
        torch.testing.assert_close(fold(tl.unfold(tensor, mode), mode, shape), tensor, rtol=0, atol=0)
        torch.testing.assert_close(mode_dot(tensor, matrix, mode), tl.tenalg.mode_dot(tensor, matrix, mode))
    torch.testing.assert_close(multi_mode_dot(tensor, matrices), tl.tenalg.multi_mode_dot(tensor, matrices))
    transposed = [m.T.contiguous() for m in matrices]
    torch.testing.assert_close(multi_mode_dot(tensor, transposed, transpose=True),
                               tl.tenalg.multi_mode_dot(tensor, matrices))


@pytest.mark.parametrize("init", ["hosvd", "random"])
def test_tucker_decomposition_is_exact_at_full_rank_with_orthonormal_factors(init):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    core, factors = tucker_decomposition(weight, (6, 4, 3, 3), init)
    for u in factors:
        assert_orthonormal(u.double())
    torch.testing.assert_close(tl.tucker_to_tensor((core, factors)), weight, rtol=0, atol=1e-5)


def test_the_truncated_decomposition_is_the_truncated_hosvd():
    """Reference: W x_i U_i U_i^T with U_i from an explicit SVD of each unfolding (tests/reference.py)."""
    torch.manual_seed(0)
    weight = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    core, factors = tucker_decomposition(weight, (4, 3, 2, 3))
    assert core.shape == (4, 3, 2, 3) and [u.shape for u in factors] == [(8, 4), (6, 3), (3, 2), (3, 3)]
    torch.testing.assert_close(tl.tucker_to_tensor((core, factors)), truncated_hosvd(weight, (4, 3, 2, 3)))


@pytest.mark.parametrize("shape", [(6, 54), (5, 10), (6, 11), (7, 7), (9, 4)])
def test_thin_svd_is_the_svd(shape):
    """P diag(s) V^T = M with orthonormal P and V and s the singular values, for wide matrices (from n >= 2m through
    the QR of M^T) and the others (LAPACK directly), against torch's svdvals."""
    torch.manual_seed(0)
    m = torch.randn(shape, dtype=torch.float64)
    p, s, vh = thin_svd(m)
    k = min(shape)
    assert p.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    torch.testing.assert_close(s, torch.linalg.svdvals(m), rtol=0, atol=1e-12)
    torch.testing.assert_close(p * s @ vh, m, rtol=0, atol=1e-12)
    assert_orthonormal(p)
    assert_orthonormal(vh.T)


def test_thin_svd_of_a_wide_ill_conditioned_matrix_is_as_accurate_as_lapacks():
    """float32, 6 x 54, singular values 1 ... 1e-7: every singular value within 10 eps s_max of the float64 ones,
    as LAPACK's direct SVD is (the QR path loses nothing to the conditioning), and M rebuilt as accurately."""
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(54, 6, dtype=torch.float64))
    exact = torch.logspace(0, -7, 6, dtype=torch.float64)
    m = (left * exact @ right.T).float()
    p, s, vh = thin_svd(m)
    eps = torch.finfo(torch.float32).eps
    assert (s.double() - exact).abs().max() <= 10 * eps
    assert torch.linalg.norm(p * s @ vh - m) <= 10 * eps * torch.linalg.norm(m)
    direct = torch.linalg.svdvals(m)
    assert (s.double() - exact).abs().max() <= 10 * max((direct.double() - exact).abs().max(), eps)
