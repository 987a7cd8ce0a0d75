"""DeepLinear and its compression, against dense references and the invariant-subspace property of the wide net."""

import math

import pytest
import torch

from lightning_lowrank.deep_linear.layers import (
    DeepLinear,
    completion_surrogate,
    estimate_rank,
    param_groups,
    sensing_surrogate,
)

f64 = torch.float64


def low_rank(m, n, r, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, r, dtype=f64, generator=g) @ torch.randn(r, n, dtype=f64, generator=g)


def orthonormal_complement(basis, seed):
    """Random orthonormal columns spanning the orthogonal complement of ``basis``' columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(basis.shape[0], basis.shape[0] - basis.shape[1], dtype=f64, generator=g)
    q, _ = torch.linalg.qr(x - basis @ (basis.T @ x))
    return q


def test_layer_is_the_product_of_its_factors():
    torch.manual_seed(0)
    layer = DeepLinear(6, 4, depth=4, width=5, init_scale=0.5, bias=True, dtype=f64)
    with torch.no_grad():
        layer.bias.normal_()
    w = layer.factors[3] @ layer.factors[2] @ layer.factors[1] @ layer.factors[0]
    x = torch.randn(3, 2, 6, dtype=f64)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
    torch.testing.assert_close(layer.matrix(), w)
    assert [tuple(f.shape) for f in layer.factors] == [(5, 6), (5, 5), (5, 5), (4, 5)]
    assert "depth=4, width=5" in repr(layer)


def test_factors_start_as_scaled_orthogonal_slices():
    layer = DeepLinear(7, 3, depth=3, width=5, init_scale=0.01, dtype=f64)
    for factor in layer.factors:
        small = min(factor.shape)
        gram = factor @ factor.T if factor.shape[0] == small else factor.T @ factor
        torch.testing.assert_close(gram, 1e-4 * torch.eye(small, dtype=f64))


def test_compressed_initialisation_spans_the_surrogates_top_subspace():
    surrogate = low_rank(30, 20, 3) + 0.01 * low_rank(30, 20, 20, seed=1)
    layer = DeepLinear.compressed(surrogate, rank=3, depth=4, init_scale=0.1)
    assert layer.width == 6 and layer.factors[0].dtype == f64
    u, _, vh = torch.linalg.svd(surrogate)
    right, left = layer.factors[0].T / 0.1, layer.factors[-1] / 0.1
    torch.testing.assert_close(right @ right.T, vh[:6].T @ vh[:6])  # same 6-dimensional subspaces
    torch.testing.assert_close(left @ left.T, u[:, :6] @ u[:, :6].T)
    for inner in layer.factors[1:-1]:
        torch.testing.assert_close(inner, 0.1 * torch.eye(6, dtype=f64))
    assert DeepLinear.compressed(surrogate, rank=12).width == 20  # 2r capped by the dimensions


@pytest.mark.parametrize("alpha, lr", [(1.0, 0.03), (5.0, 0.01)])
def test_compressed_and_wide_factorisations_agree_through_training(alpha, lr):
    """Matrix factorisation: the wide net (width d, orthogonal factors) learns inside the 2r-dimensional
    subspaces of the target, so its end-to-end matrix stays within eps^L of the compressed net's."""
    d, r, eps, depth = 24, 2, 1e-2, 3
    target = low_rank(d, d, r)
    target *= 6 / target.norm()
    compressed = DeepLinear.compressed(target, rank=r, depth=depth, init_scale=eps)
    u, _, vh = torch.linalg.svd(target)
    left = torch.cat([u[:, : 2 * r], orthonormal_complement(u[:, : 2 * r], 1)], dim=1)
    right = torch.cat([vh[: 2 * r].T, orthonormal_complement(vh[: 2 * r].T, 2)], dim=1)
    rotation = orthonormal_complement(torch.zeros(d - 2 * r, 0, dtype=f64), 3)  # a random (d-2r)-orthogonal matrix
    inner = torch.block_diag(torch.eye(2 * r, dtype=f64), rotation)
    wide = DeepLinear(d, d, depth, d, eps, dtype=f64)
    with torch.no_grad():  # a random orthogonal initialisation whose first 2r directions are the surrogate's
        wide.factors[0].copy_(eps * right.T)
        wide.factors[1].copy_(eps * inner)
        wide.factors[2].copy_(eps * left)
    optimizers = [torch.optim.SGD(param_groups(net, lr=lr, alpha=alpha)) for net in (wide, compressed)]
    worst = 0.0
    for step in range(1500):
        for net, optimizer in zip((wide, compressed), optimizers):
            optimizer.zero_grad()
            (0.5 * (net.matrix() - target).square().sum()).backward()
            optimizer.step()
        with torch.no_grad():
            worst = max(worst, float((wide.matrix() - compressed.matrix()).norm() / target.norm()))
    assert worst <= 1e-6
    fitted = float((compressed.matrix() - target).detach().norm() / target.norm())
    assert fitted < 1e-3  # it did train, from an end-to-end matrix of norm eps^L sqrt(2r)


def test_completion_recovers_the_unobserved_entries():
    """d=100, r=5, 30% observed, depth 3, init scale 1e-2, float64, full-batch gradient descent (lr 10, alpha 5)."""
    d, r = 100, 5
    g = torch.Generator().manual_seed(0)
    u, s, vh = torch.linalg.svd(torch.randn(d, d, dtype=f64, generator=g))
    picked = torch.arange(r) * (d // (2 * r))
    target = u[:, picked] @ torch.diag(s[picked]) @ vh[picked]
    mask = (torch.rand(d, d, generator=g, dtype=f64) < 0.3).to(f64)
    model = DeepLinear.compressed(completion_surrogate(target * mask, mask), rank=r, depth=3, init_scale=1e-2)
    optimizer = torch.optim.SGD(param_groups(model, lr=10.0, alpha=5.0))
    for step in range(8000):
        optimizer.zero_grad()
        (0.5 * ((model.matrix() - target).square() * mask).sum() / mask.sum()).backward()
        optimizer.step()
    unobserved = 1 - mask
    test_error = 0.5 * ((model.matrix() - target).square() * unobserved).sum() / unobserved.sum()
    assert test_error < 1e-8, float(test_error)


def test_param_groups_step_outer_factors_alpha_times_faster():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), DeepLinear(5, 3, depth=3, width=4, init_scale=0.3))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, alpha=3.0))
    model(torch.randn(8, 4)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    outer = {id(p) for p in model[1].outer_factors}
    for p, p0, g in zip(model.parameters(), before, grads):
        rate = 0.3 if id(p) in outer else 0.1
        torch.testing.assert_close(p.detach(), p0 - rate * g)
    assert sum(len(group["params"]) for group in param_groups(model, 0.1, 3.0)) == len(list(model.parameters()))
    torch.optim.Adam(param_groups(model, lr=1e-3, alpha=2.0))  # any torch optimizer takes the groups


def test_rank_estimate():
    assert estimate_rank(low_rank(40, 30, 4)) == 4  # noiseless: exact, float64 and float32
    assert estimate_rank(low_rank(40, 30, 4).float()) == 4
    noise = torch.randn(80, 80, dtype=f64, generator=torch.Generator().manual_seed(5))
    noisy = low_rank(80, 80, 3) + 0.05 * noise
    assert estimate_rank(noisy) == 3


def test_surrogates_against_their_definitions():
    target = low_rank(6, 5, 2)
    mask = torch.zeros(6, 5, dtype=f64)
    mask[::2] = 1  # 15 of 30 entries
    torch.testing.assert_close(completion_surrogate(target * mask, mask), target * mask * 2)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, 5, dtype=f64, generator=g)
    y = (a * target).sum((1, 2))
    expected = sum(y[i] * a[i] for i in range(4000)) / 4000
    torch.testing.assert_close(sensing_surrogate(a, y), expected)
    assert (sensing_surrogate(a, y) - target).norm() < 0.1 * target.norm() * math.sqrt(30)  # unbiased for M


@pytest.mark.parametrize("make, match", [
    (lambda: DeepLinear(4, 4, depth=1), r"`depth` must be an int >= 2, got 1"),
    (lambda: DeepLinear(4, 3, width=5), r"`width` must be an int in \[1, 4\], got 5"),
    (lambda: DeepLinear(4, 3, init_scale=0.0), r"`init_scale` must be > 0"),
    (lambda: DeepLinear.compressed(torch.ones(2, 3, 4)), r"`surrogate` must be a matrix"),
    (lambda: DeepLinear.compressed(torch.ones(3, 4), rank=4), r"`rank` must be an int in \[1, 3\], got 4"),
    (lambda: estimate_rank(torch.zeros(3, 3)), r"`surrogate` is zero"),
    (lambda: completion_surrogate(torch.ones(3, 3), torch.ones(3, 2)), r"`observed` \(3, 3\) and `mask` \(3, 2\)"),
    (lambda: sensing_surrogate(torch.ones(5, 3, 3), torch.ones(4)), r"`sensing_matrices` must be \(m, rows, cols\)"),
    (lambda: param_groups(DeepLinear(3, 3), lr=0.1, alpha=0.0), r"`alpha` must be a finite number > 0, got 0.0"),
    (lambda: param_groups(DeepLinear(3, 3), lr=-1.0), r"`lr` must be > 0"),
])
def test_bad_input_is_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
