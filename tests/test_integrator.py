"""The rank-adaptive integrator against the explicit BUG step, and the paper's properties."""

from __future__ import annotations

import copy
import math
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import assert_orthonormal, bug_step, mode_product, truncated_hosvd, tucker_to_dense
from reference import unfold as ref_unfold
from torch import nn

from lightning_lowrank import (
    IntegratorConfig,
    TuckerConv2d,
    TuckerIntegrator,
    TuckerLinear,
    convert,
)
from lightning_lowrank.tucker.algebra import unfold
from lightning_lowrank.tucker.storage import storage_size


@pytest.fixture(autouse=True)
def _float64():
    """The reference comparisons run in float64."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def dense_forward(layer, weight, bias, x):
    if isinstance(layer, TuckerLinear):
        return F.linear(x, weight, bias)
    pad = layer._explicit_padding
    x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation)


def active(tensor: torch.Tensor, ranks) -> torch.Tensor:
    """The leading block ``ranks`` of a core-shaped tensor."""
    return tensor[tuple(slice(r) for r in ranks)]


def make_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return TuckerLinear(12, 10, ranks=(4, 4), max_ranks=(10, 10)), (16, 12)
    if kind == "conv":
        return TuckerConv2d(6, 8, 3, padding=1, ranks=(3, 2, 3, 3)), (4, 6, 7, 7)
    return TuckerConv2d(5, 8, 3, stride=2, padding=1, padding_mode="reflect", ranks=(3, 2, 2, 2)), (4, 5, 9, 8)


def TuckerLayerLike(layer, rank):
    """A copy of ``layer`` at channel ranks ``rank`` with a scaled-up core: a low-rank teacher."""
    teacher = copy.deepcopy(layer)
    teacher.set_ranks((rank, rank, *layer.ranks[2:]))
    teacher.reset_parameters()
    with torch.no_grad():
        teacher.core.mul_(3)
    return teacher.requires_grad_(False)


def layer_state(layer):
    return (layer.active_core().detach().clone(), [u.detach().clone() for u in layer.active_factors()],
            layer.bias.detach().clone())


@pytest.mark.parametrize("kind, modes, method, tau", [
    ("linear", "channels", "augmented", 0.1), ("conv", "channels", "augmented", 0.05),
    ("conv_all", "all", "augmented", 0.1),
    # the parallel step's new blocks only see the gradient inside the core's row space: ranks grow at smaller tau
    ("linear", "channels", "parallel", 0.05), ("conv", "channels", "parallel", 0.005),
    ("conv_all", "all", "parallel", 0.005),
])
def test_agrees_with_the_explicit_bug_step(kind, modes, method, tau):
    """Several plain-SGD steps: ranks, W, the spanned subspaces and the bias agree with the reference to 1e-8."""
    layer, x_shape = make_layer(kind)
    teacher = TuckerLayerLike(layer, rank=3)
    layer.set_ranks((2, 2, *layer.ranks[2:]))  # ranks grow towards the teacher's, and (conv_all) fall again
    lr = 0.3
    config = IntegratorConfig(dense_storage=False, tau=tau, modes=modes, method=method, interval=1,
                              growth=0)  # the paper's step, every step
    integrator = TuckerIntegrator(nn.Sequential(layer), config)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    core, factors, bias = layer_state(layer)
    adapted = [config.adapts(i) for i in range(core.ndim)]
    generator = torch.Generator().manual_seed(1)
    ranks_seen = {layer.ranks}
    for _ in range(6):
        x = torch.randn(*x_shape, generator=generator)
        with torch.no_grad():  # a rank-3 teacher plus noise
            target = teacher(x) + 0.3 * torch.randn(teacher(x).shape, generator=generator)

        def loss_fn(weight, b, x=x, target=target):
            return ((dense_forward(layer, weight, b, x) - target) ** 2).mean()

        core, factors, bias = bug_step(core, factors, bias, loss_fn, lr, tau, layer.max_ranks, adapted, method)
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        assert integrator.step(optimizer)

        assert layer.ranks == tuple(core.shape)
        ranks_seen.add(layer.ranks)
        torch.testing.assert_close(layer.dense_weight(), tucker_to_dense(core, factors), rtol=0, atol=1e-8)
        for u, ref in zip(layer.active_factors(), factors):
            torch.testing.assert_close(u @ u.T, ref @ ref.T, rtol=0, atol=1e-8)
            assert_orthonormal(u, atol=1e-12)
        torch.testing.assert_close(layer.bias, bias, rtol=0, atol=1e-8)
    assert len(ranks_seen) > 1, "the test should exercise rank changes"


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_all"])
def test_one_pass_galerkin_gradient_equals_a_second_pass(kind):
    """dL/dC_hat from (x, dy) of the first pass equals core.grad of a second forward/backward at the augmented bases."""
    layer, x_shape = make_layer(kind)
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(modes="all", method="augmented", interval=1))
    x = torch.randn(*x_shape)
    layer.zero_grad()
    (layer(x) ** 3).sum().backward()
    weight = layer.dense_weight().detach()
    integrator.augment()
    one_pass = layer.core.grad[tuple(slice(r) for r in layer.ranks)].clone()
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=0, atol=1e-13)  # augmentation is exact
    layer.zero_grad()
    integrator.remove()
    (layer(x) ** 3).sum().backward()
    two_pass = layer.core.grad[tuple(slice(r) for r in layer.ranks)]
    torch.testing.assert_close(one_pass, two_pass, rtol=1e-10, atol=1e-12)


def test_augmentation_is_exact_orthonormal_and_capped():
    layer = TuckerConv2d(6, 8, 3, ranks=(3, 4, 3, 3), max_ranks=(5, 6, 3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(interval=1))
    weight = layer.dense_weight().detach()
    layer(torch.randn(2, 6, 6, 6)).sum().backward()
    integrator.augment()
    # 2r capped by the mode size (6 input channels), not by max_rank (out 5): a mode at max_rank still rotates
    assert layer.ranks == (6, 6, 3, 3)
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=0, atol=1e-13)
    for u in layer.active_factors():
        assert_orthonormal(u, atol=1e-12)
    assert all(u.grad is None for u in layer.factors)
    integrator.truncate()
    assert all(r <= m for r, m in zip(layer.ranks, layer.max_ranks))


@pytest.mark.parametrize("tau", [0.02, 0.1, 0.3])
def test_truncation_error_bound(tau):
    """||W_hat - W_truncated||_F <= sqrt(d) * tau * ||C_hat||_F (HOSVD), with d the number of truncated modes."""
    layer = TuckerConv2d(10, 12, 3, ranks=(6, 5, 3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=tau, modes="all", interval=1))
    layer(torch.randn(2, 10, 8, 8)).pow(2).sum().backward()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    integrator.augment()
    optimizer.step()
    before = layer.dense_weight().detach()
    core_norm = layer.active_core().norm()
    integrator.truncate(optimizer)
    error = (layer.dense_weight() - before).norm()
    assert error <= math.sqrt(4) * tau * core_norm
    assert layer.ranks[0] < 12 or tau == 0.02


@pytest.mark.parametrize("in_features, out_features", [(4, 12), (12, 4), (9, 9)])
def test_a_matrix_core_truncates_to_the_truncated_svd_of_w_on_either_side(in_features, out_features):
    """A TuckerLinear's core after augmentation is r_out x r_in, wider or taller when a side reaches its mode size;
    truncation (one eigen-decomposition, of the smaller side) leaves the truncated SVD of W at the tolerance rank:
    the smallest k whose discarded singular values have 2-norm <= tau ||W||_F."""
    torch.manual_seed(0)
    layer = TuckerLinear(in_features, out_features, ranks=(3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=0.3, interval=1,
                                                                         growth=0))
    optimizer = torch.optim.SGD([layer.core], lr=0.5)
    ((layer(torch.randn(16, in_features)) - torch.randn(16, out_features)) ** 2).sum().backward()
    integrator.augment(optimizer)
    optimizer.step()
    assert layer.ranks == (min(6, out_features), min(6, in_features))
    before = layer.dense_weight().detach()
    u, s, vh = torch.linalg.svd(before)
    k = next(k for k in range(1, len(s) + 1) if s[k:].norm() <= 0.3 * s.norm())
    integrator.truncate(optimizer)
    assert layer.ranks == (k, k) and 1 < k < min(in_features, out_features, 6)
    torch.testing.assert_close(layer.dense_weight(), u[:, :k] @ torch.diag(s[:k]) @ vh[:k], rtol=0, atol=1e-12)
    for factor in layer.active_factors():
        assert_orthonormal(factor, atol=1e-12)


def test_at_max_rank_the_step_is_the_augmented_step_truncated_back():
    """A layer at its max_rank still augments (storage beyond max_rank): with tau = 0 the step is the best
    rank-r approximation (truncated SVD) of W - lr dL/dW x_i U_hat_i U_hat_i^T, U_hat_i = orth([U_i | dL/dU_i])."""
    torch.manual_seed(0)
    layer = TuckerLinear(9, 7, ranks=(3, 3), max_ranks=(3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, method="augmented", interval=1))
    weight = layer.dense_weight().detach().requires_grad_(True)
    x, target = torch.randn(5, 9), torch.randn(5, 7)
    loss = ((F.linear(x, weight, layer.bias) - target) ** 2).sum()
    grad = torch.autograd.grad(loss, weight)[0]
    u_out, u_in = (u.detach() for u in layer.active_factors())
    hat_out = torch.linalg.qr(torch.cat([u_out, grad @ u_in], 1))[0]  # dL/dU_out = G U_in C^T spans G U_in
    hat_in = torch.linalg.qr(torch.cat([u_in, grad.T @ u_out], 1))[0]
    stepped = weight.detach() - 0.1 * (hat_out @ hat_out.T) @ grad @ (hat_in @ hat_in.T)
    u, s, vh = torch.linalg.svd(stepped)
    expected = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    ((layer(x) - target) ** 2).sum().backward()
    integrator.step(torch.optim.SGD([layer.core], lr=0.1))
    assert layer.ranks == (3, 3)
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=0, atol=1e-12)


def test_tau_zero_augmented_step_projects_onto_the_augmented_bases():
    """With tau = 0 nothing is truncated: W' = W - lr dL/dW x_i U_hat_i U_hat_i^T, U_hat_i = orth([U_i | dL/dU_i])."""
    layer = TuckerLinear(9, 7, ranks=(2, 2))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, method="augmented", interval=1))
    x, target = torch.randn(5, 9), torch.randn(5, 7)
    ((layer(x) - target) ** 2).sum().backward()
    hats = []
    for u in layer.factors:
        basis = u[:, :2].detach()
        q = torch.linalg.qr(torch.cat([basis, u.grad[:, :2]], dim=1))[0]
        hats.append(q @ q.T)
    weight = layer.dense_weight().detach().requires_grad_(True)
    grad = torch.autograd.grad(((F.linear(x, weight, layer.bias) - target) ** 2).sum(), weight)[0]
    expected = weight.detach() - 0.1 * hats[0] @ grad @ hats[1]
    integrator.step(torch.optim.SGD([layer.core], lr=0.1))
    assert layer.ranks == (4, 4)
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=0, atol=1e-12)


def teacher_student(student, teacher, x_shape, steps, lr, tau):
    integrator = TuckerIntegrator(nn.Sequential(student), IntegratorConfig(tau=tau, interval=1))
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randn(*x_shape)
        optimizer.zero_grad()
        ((student(x) - teacher(x)) ** 2).mean().backward()
        integrator.step(optimizer)
    return student


@pytest.mark.parametrize("kind, decades", [("linear", 7), ("conv", 5)])
def test_the_parallel_gradient_needs_no_float64_on_an_ill_conditioned_core(kind, decades):
    """float32, mode-0 unfolding with singular values 1 ... 10^-decades (condition 1e7 for the matrix core, 1e5 for
    the conv core; their Gram matrices' 1e14 and 1e10 are beyond float32). The parallel method's new block
    N^T dL/dU (M M^T)^+ M of each mode, computed from the SVD of M in float32, equals the same formula evaluated in
    float64 (pseudo-inverse of the Gram matrix, rtol 1e-12) from the same float32 inputs, to 3e-2 of the block on
    every new direction that carries a gradient (measured 1e-6 to 1.3e-2: float32 resolves the matrix core's 3e-6
    direction to about a percent). The conv core's unfoldings are wide (6 x 54: the SVD through the QR of M^T), the
    matrix core's square. Without the singular value cut-off (max(r, p) eps s_max) the 1e-7 direction's rounding
    noise dominates (errors 0.19-0.34); a cut-off at 1e-3 s_max loses the 6e-5 and 3e-6 directions (0.40-0.77):
    both fail, as does an SVD from the Gram matrix."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = TuckerLinear(16, 12, bias=False, ranks=(6, 6), dtype=torch.float32)
    else:
        layer = TuckerConv2d(16, 12, 3, bias=False, ranks=(6, 6, 3, 3), dtype=torch.float32)
    shape = layer.ranks
    left, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(math.prod(shape[1:]), 6, dtype=torch.float64))
    unfolding = left @ torch.diag(torch.logspace(0, -decades, 6, dtype=torch.float64)) @ right.T
    with torch.no_grad():
        layer.core.zero_()
        layer.core[tuple(slice(r) for r in shape)] = unfolding.reshape(shape).float()
    core = layer.active_core().detach().double()
    x = torch.randn((32, 16) if kind == "linear" else (4, 16, 6, 6), dtype=torch.float32)
    out = layer(x)
    ((out - torch.randn_like(out)) ** 2).sum().backward()
    basis_grads = [u.grad[:, :r].double() for u, r in zip(layer.factors, shape)]
    TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, interval=1, growth=0)).augment()
    for mode in (0, 1):
        m = unfold(core, mode)
        new = layer.factors[mode][:, 6:12].detach().double()
        expected = new.T @ basis_grads[mode] @ torch.linalg.pinv(m @ m.T, hermitian=True, rtol=1e-12) @ m
        index = [slice(r) for r in shape]
        index[mode] = slice(6, 12)
        block = unfold(layer.core.grad[tuple(index)], mode).double()
        carried = block.abs().sum(1) > 0  # new directions the QR found significant
        assert carried.sum() >= 3
        assert torch.linalg.norm(block[carried] - expected[carried]) <= 3e-2 * torch.linalg.norm(expected)


def test_a_mode_at_full_rank_still_rotates_its_basis():
    """A Linear(64, 8) student at full rank (8, 8) of a rank-8 teacher whose input subspace is another: the input
    basis augments beyond the rank bound (storage 16), so at tau = 0 it learns the teacher exactly as dense training
    does (same error, step for step: at full rank the integrator is dense gradient descent)."""
    torch.manual_seed(0)
    teacher = nn.Linear(64, 8, bias=False).requires_grad_(False)
    dense = nn.Linear(64, 8, bias=False)
    student = TuckerLinear.from_dense(dense)
    assert student.ranks == (8, 8) and student.storage == (8, 16)
    integrator = TuckerIntegrator(nn.Sequential(student), IntegratorConfig(tau=0.0, interval=1))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.25)
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=0.25)
    for _ in range(100):
        x = torch.randn(64, 64)
        for model, opt in ((student, optimizer), (dense, dense_optimizer)):
            opt.zero_grad()
            ((model(x) - teacher(x)) ** 2).mean().backward()
            integrator.step(opt) if model is student else opt.step()
    error = (student.dense_weight() - teacher.weight).norm() / teacher.weight.norm()
    assert error < 1e-2  # a basis that cannot rotate stays near 0.9
    torch.testing.assert_close(student.dense_weight(), dense.weight, rtol=0, atol=1e-10)


def test_a_run_whose_storage_follows_the_rank_equals_one_at_fixed_storage(monkeypatch):
    """Reallocating factors, core, gradients and Adam's state (storage shrinking as ranks fall) changes nothing:
    the same run with the storage held at the mode sizes gives the same weights and optimizer state."""
    def run(follows):
        torch.manual_seed(0)
        teacher = TuckerLinear(40, 30, ranks=(4, 4)).requires_grad_(False)
        student = TuckerLinear(40, 30)
        config = IntegratorConfig(dense_storage=False, tau=0.2, interval=2, core_steps=1, growth=0)
        integrator = TuckerIntegrator(nn.Sequential(student), config)
        optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
        storages = {student.storage}
        for _ in range(40):
            x = torch.randn(64, 40)
            optimizer.zero_grad()
            ((student(x) - teacher(x)) ** 2).mean().backward()
            integrator.step(optimizer)
            storages.add(student.storage)
            # right after each truncation: room for the next augmentation, nothing left to reallocate
            assert not follows or all(min(n, 2 * r) <= s == storage_size(n, r, s)
                                      for n, r, s in zip(student.shape, student.ranks, student.storage))
        return student, optimizer.state[student.core], storages

    follows, state, storages = run(True)
    assert min(storages) < (30, 40)  # it shrank
    monkeypatch.setattr("lightning_lowrank.tucker.integrator.storage_size", lambda size, rank, current=None: size)
    fixed, fixed_state, fixed_storages = run(False)
    assert fixed_storages == {(30, 40)}
    assert follows.ranks == fixed.ranks
    torch.testing.assert_close(follows.dense_weight(), fixed.dense_weight(), rtol=0, atol=1e-12)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(active(state[key], follows.ranks), active(fixed_state[key], fixed.ranks),
                                   rtol=0, atol=1e-12)


RELEASE = """
import os
import torch
from lightning_lowrank.tucker.storage import release_host_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

torch.ones(16 << 20, dtype=torch.uint8)  # freed at once: glibc's mmap threshold rises to 16 MiB
start = rss()
blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(64)]  # 256 MiB from the heap
del blocks[::2]  # 128 MiB freed between blocks in use
held = rss()
print(release_host_memory(), start, held, rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_host_memory_hands_the_heaps_free_pages_back():
    """Blocks freed between blocks in use stay in the process (glibc keeps them for later allocations); released,
    the process's resident memory falls by about their size. In a fresh process with glibc's default tunables (its
    dynamic mmap threshold puts the blocks in the heap): the test's own heap is not known."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    ran, start, held, released = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True,
                                                check=True, env=env).stdout.split()
    assert ran == "True"
    assert int(held) - int(start) > 200  # the freed half is still held: what the release is for
    assert int(held) - int(released) > 100


def test_host_memory_is_released_in_the_backward_after_each_step_that_changes_a_layers_shapes(monkeypatch):
    """``release_memory``: after a step at whose end some layer's tensors have other shapes than at the end of the
    step before (its storage, or the widths its forward computes at), the C heap is trimmed once, in the next
    backward pass (its activations still in use, the blocks of the shapes left free): not at steady shapes (frozen
    ranks; a layer in dense storage whose ranks move), not with the option off, not after ``remove()``."""
    calls, phase = [], []
    monkeypatch.setattr("lightning_lowrank.tucker.integrator.release_host_memory",
                        lambda: calls.append((integrator.steps, phase[-1])))

    def shapes(net):
        return [(layer.storage, () if layer.dense_storage else layer.forward_ranks()) for layer in net]

    def run(release, ranks=(2, 2), tau=0.1, freeze=False, steps=40):
        nonlocal integrator
        calls.clear()
        torch.manual_seed(0)
        teacher = nn.Sequential(TuckerLinear(40, 30, ranks=(4, 4)), TuckerLinear(30, 20, ranks=(3, 3)))
        student = nn.Sequential(TuckerLinear(40, 30, ranks=ranks), TuckerLinear(30, 20, ranks=ranks))
        teacher.requires_grad_(False)
        for layer in student if ranks is None else ():
            layer.to_dense_storage()
        integrator = TuckerIntegrator(student, IntegratorConfig(
            tau=tau, interval=1, dense_interval=2, release_memory=release))
        optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
        if freeze:
            integrator.freeze(optimizer)
        seen, ranks_seen = [shapes(student)], {tuple(layer.ranks for layer in student)}
        for _ in range(steps):
            x = torch.randn(64, 40)
            optimizer.zero_grad()
            phase.append("backward")
            ((student(x) - teacher(x)) ** 2).mean().backward()
            phase.append("step")
            integrator.step(optimizer)
            seen.append(shapes(student))
            ranks_seen.add(tuple(layer.ranks for layer in student))
        changed = [step for step in range(steps) if seen[step + 1] != seen[step]]
        return [(step + 1, "backward") for step in changed if step + 1 < steps], len(ranks_seen)

    integrator = None
    expected, distinct_ranks = run(True)
    assert 0 < len(expected) < 39  # the ranks grow from 2 toward the teacher's, then hold
    assert calls == expected
    assert run(False) == (expected, distinct_ranks) and calls == []
    assert run(True, freeze=True)[0] == [] and calls == []
    expected, distinct_ranks = run(True, ranks=None, tau=0.4)  # full rank, in dense storage until its factors pay
    assert len(expected) < distinct_ranks - 2  # ranks moved in dense storage, at unchanged shapes
    assert calls == expected and expected
    integrator.remove()
    calls.clear()
    x = torch.randn(64, 40)
    integrator._release_due = True  # as after a step that changed some widths
    integrator.layers["0"](x).sum().backward()
    assert calls == []


def test_a_release_waits_for_a_backward_that_reaches_a_core(monkeypatch):
    """Steps whose backward reaches no Tucker core (another loss) keep a due release for the next one that does."""
    calls = []
    monkeypatch.setattr("lightning_lowrank.tucker.integrator.release_host_memory", lambda: calls.append(1))
    torch.manual_seed(0)
    layer, other = TuckerLinear(40, 30, ranks=(2, 2)), nn.Linear(4, 1)
    teacher = TuckerLinear(40, 30, ranks=(4, 4)).requires_grad_(False)
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.1, interval=1))
    optimizer = torch.optim.SGD([*layer.parameters(), *other.parameters()], lr=0.5)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        integrator.step(optimizer)

    widths = layer.forward_ranks()
    for _ in range(50):  # until a step changes the widths: the ranks grow from 2 toward the teacher's 4
        x = torch.randn(64, 40)
        step(((layer(x) - teacher(x)) ** 2).mean())
        if layer.forward_ranks() != widths:
            break
    assert layer.forward_ranks() != widths
    calls.clear()
    for _ in range(2):
        step(other(torch.randn(8, 4)).sum())
    assert calls == []
    step(layer(torch.randn(8, 40)).sum())
    assert calls == [1]


def test_ranks_settle_at_the_teacher_ranks_linear():
    torch.manual_seed(0)
    teacher = TuckerLinear(24, 20, ranks=(3, 3)).requires_grad_(False)
    with torch.no_grad():
        teacher.core.mul_(8)
    student = TuckerLinear(24, 20)  # full rank start: (20, 20)
    teacher_student(student, teacher, (64, 24), steps=300, lr=2.0, tau=0.05)
    assert student.ranks == (3, 3)
    rel = (student.dense_weight() - teacher.dense_weight()).norm() / teacher.dense_weight().norm()
    assert rel < 0.05


def test_ranks_settle_at_the_teacher_ranks_conv():
    torch.manual_seed(0)
    teacher = TuckerConv2d(8, 10, 3, padding=1, ranks=(3, 2, 3, 3)).requires_grad_(False)
    with torch.no_grad():
        teacher.core.mul_(5)
    student = TuckerConv2d(8, 10, 3, padding=1)  # (10, 8, 3, 3)
    teacher_student(student, teacher, (16, 8, 6, 6), steps=300, lr=1.0, tau=0.05)
    assert student.ranks == (3, 2, 3, 3)


@pytest.mark.parametrize("optimizer_cls, options", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=3e-2)),
    (torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1)),
])
def test_bases_change_only_through_qr_and_svd(optimizer_cls, options):
    """After augment the bases have no gradient, so momentum and decoupled weight decay never move them."""
    torch.manual_seed(0)
    layer = TuckerLinear(16, 12, ranks=(4, 4))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=0.05, interval=1))
    optimizer = optimizer_cls(layer.parameters(), **options)
    losses = []
    x = torch.randn(32, 16)
    target = x @ (torch.randn(12, 3) @ torch.randn(3, 16)).T / 4
    for _ in range(100):
        optimizer.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        integrator.augment()
        bases = [u.detach().clone() for u in layer.factors]
        optimizer.step()
        assert all(torch.equal(u, b) for u, b in zip(layer.factors, bases))
        integrator.truncate(optimizer)
        for u in layer.active_factors():
            assert_orthonormal(u, atol=1e-10)
    assert losses[-1] < 0.3 * losses[0]


def test_momentum_follows_the_rotation():
    """With no truncation, the momentum expressed in weight space (m x_i U_i) is the same before and after."""
    torch.manual_seed(0)
    layer = TuckerLinear(40, 30, ranks=(3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, interval=1))
    optimizer = torch.optim.SGD([layer.core], lr=0.1, momentum=0.9)
    x, target = torch.randn(32, 40), torch.randn(32, 30)
    for _ in range(1):  # ranks 3 -> 6, nothing cut; the storage grows from 6 to 12 after the truncation
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).sum().backward()
        integrator.augment()
        optimizer.step()
        before = tucker_to_dense(active(optimizer.state[layer.core]["momentum_buffer"], layer.ranks),
                                 layer.active_factors())
        integrator.truncate(optimizer)
        after = tucker_to_dense(active(optimizer.state[layer.core]["momentum_buffer"], layer.ranks),
                                layer.active_factors())
        torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    assert layer.ranks == (6, 6) and layer.storage == (12, 12)


def test_second_moments_take_the_squared_rotation():
    """Adam's exp_avg_sq becomes diag(P^T diag(v) P), the diagonal of the rotated covariance; it stays >= 0."""
    torch.manual_seed(0)
    layer = TuckerLinear(10, 8, ranks=(3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=0.0, interval=1,
                                                                         growth=0))
    optimizer = torch.optim.Adam([layer.core], lr=0.01)
    ((layer(torch.randn(4, 10))) ** 2).sum().backward()
    integrator.augment()
    optimizer.step()
    v = active(optimizer.state[layer.core]["exp_avg_sq"], layer.ranks).clone()
    core = layer.active_core().detach().clone()
    integrator.truncate(optimizer)
    r_out, r_in = layer.ranks  # a rank-3 loss gradient: the 6 x 6 core has rank 4 and only zeros are cut
    p_out = torch.linalg.svd(core, full_matrices=False)[0][:, :r_out]
    p_in = torch.linalg.svd(core.T, full_matrices=False)[0][:, :r_in]
    expected = (p_out**2).T @ v @ (p_in**2)
    # singular vectors are defined up to sign, which the squares do not see
    state = optimizer.state[layer.core]["exp_avg_sq"]
    torch.testing.assert_close(active(state, layer.ranks), expected, rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(state) == torch.count_nonzero(active(state, layer.ranks))  # zero outside the block


def test_fresh_core_entries_take_a_steady_state_adam_step():
    """New entries start from m = g, v = g^2: their first update is lr * sign(g) * sqrt(1 - b2^t) / (1 - b1^t)."""
    torch.manual_seed(0)
    layer = TuckerLinear(10, 8, ranks=(2, 2))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, interval=1))
    lr, (b1, b2) = 0.01, (0.9, 0.999)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, betas=(b1, b2), eps=1e-30)
    x = torch.randn(16, 10)
    target = torch.randn(16, 8)
    for step in range(1, 4):
        optimizer.zero_grad()
        (layer(x) - target).pow(2).sum().backward()
        old = layer.ranks
        integrator.augment(optimizer)
        before = layer.core.detach().clone()
        grad = layer.core.grad.clone()
        optimizer.step()
        fresh = torch.ones(layer.ranks, dtype=torch.bool)
        fresh[tuple(slice(r) for r in old)] = False
        block = tuple(slice(r) for r in layer.ranks)
        update = (layer.core - before)[block][fresh & (grad[block] != 0)]
        if step > 1:  # at step 1 every entry is fresh for Adam itself
            bias_correction = (1 - b2**step) ** 0.5 / (1 - b1**step)
            expected = -lr * torch.sign(grad[block][fresh & (grad[block] != 0)]) * bias_correction
            torch.testing.assert_close(update, expected, rtol=1e-10, atol=0)
        integrator.truncate(optimizer)


@pytest.mark.parametrize("ranks", [(2, 2), (10, 10)])
@pytest.mark.parametrize("scale_steps", [False, True])
def test_scaled_steps_move_a_small_core_as_adam_moves_a_full_rank_one(ranks, scale_steps):
    """Adam's first step moves every entry with a gradient by lr * sign(g) (closed form, eps negligible); with
    ``scale_steps`` a core at ranks r (here the augmented ones, r x r of a 10 x 12 layer) moves by s lr sign(g),
    s = sqrt(10 * 12 / prod r): the Frobenius norm of the dense weight's step. Augmented from full rank, the core
    (10 x 12) has as many entries as the dense weight: s = 1."""
    torch.manual_seed(0)
    layer = TuckerLinear(12, 10, ranks=ranks)
    config = IntegratorConfig(tau=0.0, interval=2, core_steps=2, scale_steps=scale_steps)
    integrator = TuckerIntegrator(nn.Sequential(layer), config)
    lr = 0.01
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, eps=1e-30)
    (layer(torch.randn(16, 12)) - torch.randn(16, 10)).pow(2).sum().backward()
    assert integrator.before_step(optimizer)  # augments: the step trains the core at the augmented ranks
    before, grad = layer.active_core().detach().clone(), layer.core.grad[
        tuple(slice(r) for r in layer.ranks)].clone()
    optimizer.step()
    integrator.after_step(optimizer)  # no truncation: the window has a second core step
    scale = max(1.0, math.sqrt(120 / math.prod(layer.ranks))) if scale_steps else 1.0
    assert scale_steps is False or scale == (math.sqrt(120 / 16) if ranks == (2, 2) else 1.0)
    moved = grad != 0
    expected = -scale * lr * torch.sign(grad[moved])
    torch.testing.assert_close((layer.active_core() - before)[moved], expected, rtol=1e-10, atol=0)
    assert torch.equal(layer.active_core()[~moved], before[~moved])


@pytest.mark.parametrize("decoupled", [True, False])
def test_scaled_steps_leave_weight_decay_at_the_dense_rate(decoupled):
    """Closed form of the first step with weight decay wd, s = sqrt(120 / 16): decoupled (AdamW) the core shrinks by
    1 - lr wd, the dense weight's rate, and only its gradient step is scaled, C = (1 - lr wd) C_0 - s lr sign(g);
    added to the gradient (Adam's ``weight_decay``) the decay is part of the normalized step, which is scaled whole,
    C = C_0 - s lr sign(g + wd C_0)."""
    torch.manual_seed(0)
    layer = TuckerLinear(12, 10, ranks=(2, 2))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, interval=2, core_steps=2,
                                                                         scale_steps=True))
    lr, wd = 0.01, 5.0
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)(layer.parameters(), lr=lr, eps=1e-30,
                                                                       weight_decay=wd)
    (layer(torch.randn(16, 12)) - torch.randn(16, 10)).pow(2).sum().backward()
    assert integrator.before_step(optimizer) and layer.ranks == (4, 4)  # augmented: s = sqrt(120 / 16)
    before = layer.active_core().detach().clone()
    grad = layer.core.grad[:4, :4].clone()
    optimizer.step()
    integrator.after_step(optimizer)
    scale = math.sqrt(120 / 16)
    if decoupled:
        expected = (1 - lr * wd) * before - scale * lr * torch.sign(grad)
    else:
        expected = before - scale * lr * torch.sign(grad + wd * before)
    torch.testing.assert_close(layer.active_core(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["augmented", "parallel"])
def test_directions_without_gradient_stay_out(method):
    """A gradient inside span(U) leaves nothing to augment: the candidate directions are rounding noise, their core
    gradient is exactly zero (so Adam cannot blow it up to lr-sized steps) and truncation drops them again."""
    torch.manual_seed(0)
    layer = TuckerLinear(10, 8, bias=False, ranks=(2, 2))  # a bias would add one genuinely new output direction
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=1e-6,
                                                                         method=method, interval=1, growth=0))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        # dL/dW = 2 W X^T X, so dL/dU_out = dL/dW U_in C^T = U_out (...) lies in span(U_out); dL/dU_in does not
        layer(torch.randn(16, 10)).pow(2).sum().backward()
        integrator.augment(optimizer)
        assert layer.ranks == (4, 4)
        assert torch.all(layer.core.grad[2:4, :4] == 0)  # new output directions: no gradient at all
        assert torch.any(layer.core.grad[:2, 2:4] != 0)  # new input directions carry gradient
        optimizer.step()
        integrator.truncate(optimizer)
        assert layer.ranks == (2, 2)  # the output rank stays 2, and the input rank cannot exceed it


@pytest.mark.parametrize("poison", ["nan input", "inf in one factor gradient"])
def test_non_finite_gradient_changes_nothing(poison):
    layer = TuckerConv2d(4, 6, 3, ranks=(3, 3, 3, 3))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    integrator = TuckerIntegrator(nn.Sequential(layer), optimizer=optimizer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 4, 5, 5)
    if poison == "nan input":
        x[0, 0, 2, 2] = float("nan")
    layer(x).sum().backward()
    if poison != "nan input":
        layer.factors[1].grad[3, 1] = float("inf")
    assert not integrator.step(optimizer)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    for u in layer.active_factors():
        assert_orthonormal(u)
    # the next finite step proceeds normally
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    assert integrator.step(optimizer)
    assert all(torch.isfinite(p).all() for p in layer.parameters())


@pytest.mark.parametrize("method", ["augmented", "parallel"])
def test_gradient_accumulation_sums_the_micro_batches(method):
    """Two micro-batches give the same step as one batch holding both (loss summed)."""
    def run(batches):
        torch.manual_seed(0)
        layer = TuckerLinear(10, 8, ranks=(3, 3))
        integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.1, method=method, interval=1))
        for x in batches:
            layer(x).pow(2).sum().backward()
        integrator.step(torch.optim.SGD(layer.parameters(), lr=0.01))
        return layer
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    whole, split = run([x]), run([x[:5], x[5:]])
    assert whole.ranks == split.ranks
    torch.testing.assert_close(split.dense_weight(), whole.dense_weight(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["augmented", "parallel"])
def test_interval_holds_bases_between_integrator_steps(method):
    """With interval=3, steps 0, 3, 6 augment and truncate; in between only the core moves, even under AdamW."""
    torch.manual_seed(0)
    layer = TuckerLinear(16, 12, ranks=(4, 4))
    config = IntegratorConfig(dense_storage=False, tau=0.05, method=method, interval=3, core_steps=1)
    integrator = TuckerIntegrator(nn.Sequential(layer), config)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, 16)
    target = x @ (torch.randn(12, 3) @ torch.randn(3, 16)).T / 4
    for step in range(8):
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        bases, ranks, core = [u.detach().clone() for u in layer.factors], layer.ranks, layer.core.detach().clone()
        captured = sum(len(c.pairs) for c in integrator._captures.values())
        assert captured == (1 if method == "augmented" and step % 3 == 0 else 0)
        assert integrator.step(optimizer)
        if step % 3:
            assert all(torch.equal(u, b) for u, b in zip(layer.factors, bases)) and layer.ranks == ranks
            assert not torch.equal(layer.core, core)
        for u in layer.active_factors():
            assert_orthonormal(u, atol=1e-10)
    assert integrator.steps == 8


def interval_problem(layer_seed=0):
    """A TuckerLinear (initialised from ``layer_seed``) and the backward pass of a fixed rank-5 regression through
    it (or through another module given to the backward)."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    target = x @ (torch.randn(12, 5) @ torch.randn(5, 16)).T / 4
    torch.manual_seed(layer_seed)
    layer = TuckerLinear(16, 12, ranks=(3, 3))
    return layer, lambda module=layer: ((module(x) - target) ** 2).mean().backward()


@pytest.mark.parametrize("method", ["augmented", "parallel"])
def test_interval_augments_with_the_basis_gradients_of_every_step(method):
    """interval=3: the due step's augmentation spans [U | sum_t dL/dU_t] over the 3 steps since the last one, while
    its core gradient is that of its own batch alone: the Galerkin gradient dL/dC on the augmented bases
    ("augmented", against autograd through the augmented layer), or the parallel step's blocks (an interval-1
    integrator given this batch's gradients, projected onto the augmented bases). A summed core step would be
    k steps in one, which overshoots under momentum."""
    layer, backward = interval_problem()
    config = IntegratorConfig(dense_storage=False, tau=0.05, method=method, interval=3, core_steps=1)
    integrator = TuckerIntegrator(nn.Sequential(layer), config)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    summed = [0, 0]
    for step in range(4):
        optimizer.zero_grad()
        backward()
        if step:
            summed = [s + u.grad[:, :r].clone() for s, u, r in zip(summed, layer.factors, layer.ranks)]
        if step < 3:
            assert integrator.step(optimizer)
    single = copy.deepcopy(layer)  # the same layer state, given this batch's gradients only
    for p, q in zip(single.parameters(), layer.parameters()):
        p.grad = q.grad.clone()
    old = layer.ranks
    bases = [u[:, :r].clone() for u, r in zip(layer.factors, old)]
    assert integrator.before_step(optimizer)
    new = layer.ranks
    augmented = [u[:, :r] for u, r in zip(layer.factors, new)]
    for u, basis, s in zip(augmented, bases, summed):
        q = torch.linalg.qr(torch.cat([basis, s], dim=1))[0]
        torch.testing.assert_close(u @ u.T, q @ q.T, rtol=0, atol=1e-10)
    grad = layer.core.grad[tuple(slice(r) for r in new)]
    if method == "augmented":
        dense = copy.deepcopy(layer)
        dense.zero_grad()
        backward(dense)
        expected = dense.core.grad[tuple(slice(r) for r in new)]
    else:  # both steps write the same K-step update N N^T dL/dU_i S^+ into W: map the reference's blocks to ours
        TuckerIntegrator(nn.Sequential(single), IntegratorConfig(dense_storage=False, tau=0.05, method=method,
                                                                 interval=1)).before_step()
        projections = [u.T @ v[:, :r] for u, v, r in zip(augmented, single.factors, single.ranks)]
        expected = torch.zeros_like(grad)
        expected[tuple(slice(r) for r in old)] = single.core.grad[tuple(slice(r) for r in old)]
        for mode in range(2):
            other, index, theirs = (1 - mode), [slice(r) for r in old], [slice(r) for r in old]
            index[mode], theirs[mode] = slice(old[mode], new[mode]), slice(old[mode], single.ranks[mode])
            block = single.core.grad[tuple(theirs)].movedim(mode, 0)
            mapped = projections[mode][old[mode]:, old[mode]:] @ block.reshape(block.shape[0], -1)
            expected[tuple(index)] = mapped.reshape(-1, old[other]).movedim(0, mode)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


def test_frozen_integrator_moves_only_the_core_and_keeps_no_basis_gradients():
    """After freeze() in the middle of an interval: bases and ranks stay, the core trains, no gradient is summed."""
    layer, backward = interval_problem()
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=0.05, interval=3,
                                                                         core_steps=1))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    for step in range(8):
        if step == 5:  # one basis gradient summed since the augmentation at step 3
            assert len(integrator.state_dict()["basis_grads"]) == 2
            integrator.freeze()
        bases, ranks, core = [u.detach().clone() for u in layer.factors], layer.ranks, layer.core.detach().clone()
        optimizer.zero_grad()
        backward()
        assert integrator.step(optimizer)
        if integrator.frozen:
            assert all(torch.equal(u, b) for u, b in zip(layer.factors, bases)) and layer.ranks == ranks
            assert not torch.equal(layer.core, core)
            assert integrator.state_dict()["basis_grads"] == {}


def test_integrator_state_resumes_in_the_middle_of_an_interval():
    """Saved after step 4 of interval 3 (one basis gradient summed) and loaded into a fresh copy, the next steps
    equal an uninterrupted run."""
    layer, backward = interval_problem()
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.05, interval=3, core_steps=1))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        backward()
        integrator.step(optimizer)
    saved = copy.deepcopy((layer.state_dict(), optimizer.state_dict(), integrator.state_dict()))
    other, other_backward = interval_problem(layer_seed=1)
    other.load_state_dict(saved[0])
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    other_optimizer.load_state_dict(saved[1])
    other_integrator = TuckerIntegrator(nn.Sequential(other), IntegratorConfig(tau=0.05, interval=3, core_steps=1))
    other_integrator.load_state_dict(saved[2])
    for _ in range(3):
        for opt, run, integ in ((optimizer, backward, integrator), (other_optimizer, other_backward, other_integrator)):
            opt.zero_grad()
            run()
            integ.step(opt)
    assert other.ranks == layer.ranks
    for a, b in zip(layer.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def delayed_problem(growth=0.0):
    """A rank-3 TuckerLinear learning a rank-5 map, its backward pass, Adam, and an integrator with interval 3 and
    core_steps 3: every window augments at its first step and truncates after its third."""
    layer, backward = interval_problem()
    config = IntegratorConfig(tau=0.1, interval=3, core_steps=3, growth=growth, dense_storage=False)
    integrator = TuckerIntegrator(nn.Sequential(layer), config)
    return layer, backward, integrator, torch.optim.Adam(layer.parameters(), lr=1e-2)


def test_delayed_truncation_trains_the_augmented_core_for_core_steps_then_applies_the_tolerance():
    """interval 3, core_steps 3. Augmentation leaves W unchanged. The two steps after it hold the augmented bases and
    ranks, and step the core exactly as a plain Adam on that core with the same gradients would (its state carried,
    not reset or rotated). Truncation after the third step: each rank is the smallest whose discarded singular
    values of the dense W's unfolding (float64 SVD) have norm <= tau ||W||, and W moves by at most that."""
    layer, backward, integrator, optimizer = delayed_problem()
    for window in range(3):
        optimizer.zero_grad()
        backward()
        before = layer.dense_weight()
        old = layer.ranks
        assert integrator.before_step(optimizer)
        augmented = layer.ranks
        assert all(a > o for a, o in zip(augmented, old))
        torch.testing.assert_close(layer.dense_weight(), before, rtol=0, atol=1e-12)
        optimizer.step()
        integrator.after_step(optimizer)
        assert layer.ranks == augmented and integrator.ranks == {"0": old}
        for _ in range(2):
            bases = [u.detach().clone() for u in layer.factors]
            optimizer.zero_grad()
            backward()
            reference = nn.Parameter(layer.core.detach().clone())
            reference_optimizer = torch.optim.Adam([reference], lr=1e-2)
            reference_optimizer.state[reference] = copy.deepcopy(optimizer.state[layer.core])
            assert integrator.before_step(optimizer)
            reference.grad = layer.core.grad.clone()
            reference_optimizer.step()
            optimizer.step()
            assert all(torch.equal(u, b) for u, b in zip(layer.factors, bases)) and layer.ranks == augmented
            torch.testing.assert_close(layer.core, reference, rtol=0, atol=0)
            w = layer.dense_weight()
            integrator.after_step(optimizer)
        theta = 0.1 * torch.linalg.norm(w)
        for mode, r in enumerate(layer.ranks):
            s = torch.linalg.svdvals(w.movedim(mode, 0).reshape(w.shape[mode], -1))
            assert torch.linalg.norm(s[r:]) <= theta < torch.linalg.norm(s[r - 1:])
        assert torch.linalg.norm(layer.dense_weight() - w) <= math.sqrt(2) * theta
        assert integrator.ranks == {"0": layer.ranks}


def test_delayed_truncation_resumes_exactly_in_the_middle_of_the_core_steps():
    """Saved after the first of three core steps (layers at their augmented ranks, above a growth margin) and loaded
    into a fresh layer, optimizer and integrator, the next steps, truncations included, equal an uninterrupted run."""
    layer, backward, integrator, optimizer = delayed_problem(growth=0.25)
    for _ in range(4):  # one window, then the augmenting step of the next
        optimizer.zero_grad()
        backward()
        integrator.step(optimizer)
    assert integrator.ranks["0"] != layer.ranks  # at the augmented ranks
    assert integrator.state_dict()["decided"]  # and keeping a growth margin
    saved = copy.deepcopy((layer.state_dict(), optimizer.state_dict(), integrator.state_dict()))
    other, other_backward = interval_problem(layer_seed=1)
    other.load_state_dict(saved[0])
    other_optimizer = torch.optim.Adam(other.parameters(), lr=1e-2)
    other_optimizer.load_state_dict(saved[1])
    other_integrator = TuckerIntegrator(nn.Sequential(other), integrator.config)
    other_integrator.load_state_dict(saved[2])
    assert other_integrator.ranks == integrator.ranks
    for _ in range(5):
        for opt, run, integ in ((optimizer, backward, integrator), (other_optimizer, other_backward, other_integrator)):
            opt.zero_grad()
            run()
            integ.step(opt)
        assert other.ranks == layer.ranks and other_integrator.ranks == integrator.ranks
    for a, b in zip(layer.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class _NeverHolds(TuckerIntegrator):
    """The reference of held bases: an integrator whose layers compute their basis gradients on every step."""

    def _arm(self):
        super()._arm()
        for layer in self.layers.values():
            layer.hold_bases = False


@pytest.mark.parametrize("method", ["parallel", "augmented"])
@pytest.mark.parametrize("interval, core_steps", [(1, 1), (3, 1), (3, 3), (4, 2)])
def test_backward_computes_the_basis_gradients_only_where_the_step_uses_them(monkeypatch, method, interval,
                                                                           core_steps):
    """A step inside a window (after its augmenting step, before its truncation) and every step after freeze()
    train the core only: their backward computes no basis gradient. The augmenting step and the steps outside the
    window (whose gradients the next augmentation sums) still get theirs. Reference: the same run computing every
    basis gradient, which the integrator then drops (equal to 1e-12, ranks and Adam state included). Both compute
    with the factor chain: held bases make the chain cheaper, and a form switched by them would round differently."""
    monkeypatch.setattr(TuckerLinear, "forward_costs", lambda self, *args, **kwargs: (0, 1))
    runs = []
    for integrator_cls in (TuckerIntegrator, _NeverHolds):
        layer, backward = interval_problem()
        config = IntegratorConfig(dense_storage=False, tau=0.1, method=method, interval=interval,
                                  core_steps=core_steps, growth=0.25)
        integrator = integrator_cls(nn.Sequential(layer), config)
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
        computed = []
        for step in range(14):
            if step == 11:
                integrator.freeze(optimizer)
            optimizer.zero_grad()
            backward()
            computed.append(all(u.grad is not None for u in layer.factors))
            assert integrator.step(optimizer)
        runs.append((layer, integrator, optimizer, computed))
    (layer, integrator, optimizer, computed), reference = runs[0], runs[1][:3]
    assert_same_run((layer, integrator, optimizer), reference)
    in_window = [1 <= step % interval < core_steps for step in range(14)]
    assert computed == [not held and step < 11 for step, held in enumerate(in_window)]
    assert runs[1][3] == [True] * 14
    integrator.remove()
    assert not any(layer.hold_bases for layer in integrator.layers.values())


def test_a_window_left_open_by_other_options_still_gives_the_next_augmentation_its_basis_gradients():
    """A state saved inside a window (interval 3, core_steps 3) and loaded under interval 2: the next step is due,
    closes that window and augments, so its backward computes the basis gradients the augmentation spans."""
    layer, backward, integrator, optimizer = delayed_problem()
    for _ in range(4):
        optimizer.zero_grad()
        backward()
        integrator.step(optimizer)
    assert integrator.state_dict()["augmented"]  # inside the window that step 3 opened
    other = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=0.1, interval=2,
                                                                    core_steps=2))
    other.load_state_dict(integrator.state_dict())
    optimizer.zero_grad()
    backward()
    assert other.due and all(u.grad is not None for u in layer.factors)


def poisoned_run(skip, steps=7, steps_before=0):
    """delayed_problem (interval 3, core_steps 3) for ``steps`` steps; at step ``skip`` a NaN gradient (a skipped
    step), or with ``skip=None`` no skip. ``steps_before`` starts the integrator's count there (a loaded state)."""
    layer, backward, integrator, optimizer = delayed_problem()
    integrator.load_state_dict({"steps": steps_before, "frozen": False})
    taken = []
    for step in range(steps):
        optimizer.zero_grad()
        backward()
        if step == skip:
            with torch.no_grad():
                layer.core.grad[0, 0] = float("nan")
        taken.append(integrator.step(optimizer))
    return layer, integrator, optimizer, taken


def zero_update_run(skip, steps=7):
    """The reference of a skipped step: the same run, where step ``skip`` goes through the integrator with every
    gradient dropped after ``before_step`` (so the optimizer changes nothing)."""
    layer, backward, integrator, optimizer = delayed_problem()
    for step in range(steps):
        optimizer.zero_grad()
        backward()
        assert integrator.before_step(optimizer)
        if step == skip:
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        integrator.after_step(optimizer)
    return layer, integrator, optimizer


def assert_same_run(first, second):
    (layer, integrator, optimizer), (ref_layer, ref_integrator, ref_optimizer) = first, second
    assert layer.ranks == ref_layer.ranks and integrator.steps == ref_integrator.steps
    torch.testing.assert_close(layer.dense_weight(), ref_layer.dense_weight(), rtol=0, atol=1e-12)
    state, ref_state = optimizer.state[layer.core], ref_optimizer.state[ref_layer.core]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("skip", [1, 2, 4, 5])
def test_a_skipped_step_counts_as_a_step_that_changes_nothing(skip):
    """One definition of a step: every call of before_step, skipped ones included (Lightning's global_step). Reference:
    the same run where that step's gradients are dropped instead (steps 1 and 4 train the augmented core, 2 and 5
    also truncate, as a skipped truncating step still must)."""
    layer, integrator, optimizer, taken = poisoned_run(skip)
    assert taken == [step != skip for step in range(7)] and integrator.steps == 7
    assert_same_run((layer, integrator, optimizer), zero_update_run(skip))


def test_a_skipped_augmenting_step_leaves_its_window_unaugmented():
    """Reference: an integrator whose count starts after the skipped step, run on the same later batches (the
    skipped step changed nothing: no augmentation in that window, and the next one comes on schedule)."""
    layer, integrator, optimizer, _ = poisoned_run(skip=3)
    ref_layer, ref_integrator, ref_optimizer, _ = poisoned_run(skip=None, steps=3)
    ref_integrator.load_state_dict({**ref_integrator.state_dict(), "steps": 4})
    _, backward = interval_problem()
    for _ in range(3):
        ref_optimizer.zero_grad()
        backward(ref_layer)
        ref_integrator.step(ref_optimizer)
    assert_same_run((layer, integrator, optimizer), (ref_layer, ref_integrator, ref_optimizer))
    assert integrator.steps == 7 and integrator.due is False


def test_freeze_in_the_middle_of_the_core_steps_truncates_first():
    layer, backward, integrator, optimizer = delayed_problem()
    optimizer.zero_grad()
    backward()
    integrator.step(optimizer)
    augmented, w = layer.ranks, layer.dense_weight()
    integrator.freeze(optimizer)
    assert integrator.ranks == {"0": layer.ranks} and all(r < a for r, a in zip(layer.ranks, augmented))
    theta = 0.1 * torch.linalg.norm(w)
    assert torch.linalg.norm(layer.dense_weight() - w) <= math.sqrt(2) * theta
    bases = [u.detach().clone() for u in layer.factors]
    for _ in range(4):
        optimizer.zero_grad()
        backward()
        integrator.step(optimizer)
    assert all(torch.equal(u, b) for u, b in zip(layer.factors, bases))


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
])
def test_core_stays_zero_outside_the_active_block(make_optimizer):
    """What a storage-rank (compiled) forward relies on: through rank changes, steps in between augmentations and
    optimizer state, every core entry outside the active block stays exactly 0, and the storage-rank weight equals
    the active one."""
    torch.manual_seed(0)
    layer = TuckerConv2d(6, 8, 3, padding=1, ranks=(2, 2, 3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=1e-4, interval=2))
    optimizer = make_optimizer(layer.parameters())
    x = torch.randn(16, 6, 5, 5)
    target = torch.randn(16, 8, 5, 5)
    history = set()
    for _ in range(12):
        optimizer.zero_grad()
        # the storage-rank forward (what torch.compile runs): the core's gradient is not 0 outside the block
        weight = tucker_to_dense(layer.core, list(layer.factors))
        ((F.conv2d(x, weight, layer.bias, padding=1) - target) ** 2).mean().backward()
        assert integrator.step(optimizer)
        history.add(layer.ranks)
        outside = layer.core.detach().clone()
        outside[tuple(slice(r) for r in layer.ranks)] = 0
        assert torch.count_nonzero(outside) == 0
        torch.testing.assert_close(tucker_to_dense(layer.core, list(layer.factors)), layer.dense_weight(),
                                   rtol=0, atol=1e-12)
    assert len(history) > 1  # ranks did change


def test_evaluation_passes_are_not_captured():
    layer = TuckerLinear(6, 4, ranks=(2, 2))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(method="augmented", interval=1))
    with torch.no_grad():
        layer(torch.randn(3, 6))
    layer.eval()
    layer(torch.randn(3, 6)).sum().backward()
    assert all(not c.pairs for c in integrator._captures.values())


@pytest.mark.parametrize("options, message", [
    (dict(tau=1.0), r"`tau` must be a number in \[0, 1\), got 1.0"),
    (dict(tau=-0.1), r"`tau` must be a number in \[0, 1\)"),
    (dict(min_rank=0), "`min_rank` must be an int >= 1, got 0"),
    (dict(modes="spatial"), "`modes` must be 'channels' or 'all'"),
    (dict(method="exact"), "`method` must be 'parallel' or 'augmented'"),
    (dict(interval=0), "`interval` must be an int >= 1, got 0"),
    (dict(interval=3, core_steps=4), r"`core_steps` must be an int in \[1, interval\] = \[1, 3\], got 4"),
    (dict(interval=10, core_steps=0), r"`core_steps` must be an int in \[1, interval\] = \[1, 10\], got 0"),
    (dict(core_steps=5), r"`core_steps` \(5\) needs an `interval` \(an int >= 1\): with `interval=None`"),
    (dict(growth=-0.5), r"`growth` must be a number in \[0, 1\], got -0.5"),
    (dict(growth=True), r"`growth` must be a number in \[0, 1\], got True"),
    (dict(patience=-1), r"`patience` must be an int >= 0, got -1"),
    (dict(scale_steps=1), r"`scale_steps` must be True or False, got 1"),
    (dict(dense_storage="yes"), r"`dense_storage` must be True or False, got 'yes'"),
    (dict(dense_interval=0), r"`dense_interval` must be an int >= 1, got 0"),
    (dict(release_memory=None), r"`release_memory` must be True or False, got None"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        IntegratorConfig(**options)


def test_module_without_tucker_layers():
    with pytest.raises(ValueError, match="has no Tucker layers; call lightning_lowrank.convert first"):
        TuckerIntegrator(nn.Linear(2, 2))


@pytest.mark.parametrize("optimizer_cls, schedule", [
    (torch.optim.SGD, (1, 1)), (torch.optim.ASGD, (1, 1)), (torch.optim.Adam, (10, 10)),
    (torch.optim.AdamW, (10, 10)), (torch.optim.RMSprop, (10, 10)), (torch.optim.Adagrad, (10, 10)),
])
def test_the_default_schedule_follows_the_optimizer(optimizer_cls, schedule):
    """interval=None: the paper's step for the optimizers whose step follows the gradient's size, the authors'
    later 10:10 for those that normalize it (README "Schedules"); a schedule given explicitly is kept."""
    layer = TuckerLinear(8, 6, ranks=(2, 2))
    optimizer = optimizer_cls(layer.parameters(), lr=0.01)
    integrator = TuckerIntegrator(nn.Sequential(layer), optimizer=optimizer)
    assert (integrator.config.interval, integrator.config.core_steps) == schedule
    explicit = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(interval=4, core_steps=2), optimizer=optimizer)
    assert (explicit.config.interval, explicit.config.core_steps) == (4, 2)


def test_the_default_schedule_needs_the_optimizer():
    layer = TuckerLinear(8, 6, ranks=(2, 2))
    with pytest.raises(ValueError, match="`interval` None chooses the schedule from the optimizer: give the"):
        TuckerIntegrator(nn.Sequential(layer))
    TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(interval=1))  # an explicit schedule needs none


@pytest.mark.slow
def test_factors_stay_orthonormal_over_10000_float32_steps():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    layer = TuckerLinear(12, 10, ranks=(4, 4))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.05, interval=1,  # 10,000 rotations
                                                                         dense_storage=False))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    teacher = torch.randn(10, 12) / 4
    for _ in range(10_000):
        x = torch.randn(16, 12)
        optimizer.zero_grad()
        ((layer(x) - x @ teacher.T) ** 2).mean().backward()
        integrator.step(optimizer)
    for u in layer.active_factors():
        assert_orthonormal(u, atol=1e-5)


@pytest.mark.parametrize("method", ["parallel", "augmented"])
def test_a_huge_finite_gradient_steps_like_float64(method):
    """Gradients of 1e30 make every core entry ~1e29: its float32 Gram matrices (1e58) overflow. Reference: the same
    step of a float64 copy of the layer, where nothing overflows; the float32 step must agree with it."""
    torch.manual_seed(0)
    reference = TuckerConv2d(4, 6, 3, ranks=(3, 3, 3, 3))
    layer = copy.deepcopy(reference).to(torch.float32)
    x = torch.randn(2, 4, 5, 5)
    results = []
    for module in (reference, layer):
        integrator = TuckerIntegrator(nn.Sequential(module), IntegratorConfig(dense_storage=False, tau=0.1,
                                                                              method=method, interval=1))
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        (module(x.to(module.core.dtype)).sum() * 1e30).backward()
        assert integrator.step(optimizer)
        for u in module.active_factors():
            assert_orthonormal(u.detach().double(), atol=1e-5)
        results.append((module.ranks, module.dense_weight().detach().double()))
    (ranks64, weight64), (ranks32, weight32) = results
    assert ranks32 == ranks64
    assert (weight32 - weight64).norm() / weight64.norm() < 1e-5


def test_layers_without_a_gradient_stay_as_they_are():
    """A layer the loss does not reach (or whose parameters are frozen) keeps bases, core and ranks; momentum from
    earlier steps does not move it (the optimizer skips a parameter without gradient)."""
    torch.manual_seed(0)
    used, unused = TuckerLinear(8, 6, ranks=(4, 4)), TuckerLinear(8, 6, ranks=(4, 4))
    integrator = TuckerIntegrator({"used": used, "unused": unused}, IntegratorConfig(tau=0.2, interval=1))
    optimizer = torch.optim.SGD([*used.parameters(), *unused.parameters()], lr=0.1, momentum=0.9)
    x = torch.randn(16, 8)
    (used(x) + unused(x)).pow(2).sum().backward()
    assert integrator.step(optimizer)
    before = {k: v.clone() for k, v in unused.state_dict().items()}
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        used(x).pow(2).sum().backward()
        assert integrator.step(optimizer)
    assert all(torch.equal(v, before[k]) for k, v in unused.state_dict().items())
    assert integrator.steps == 4


def test_a_step_whose_after_step_never_came_is_undone_and_counted_at_the_next():
    """An optimizer that skips a step although its gradients were finite (after_step never comes): the next
    before_step undoes what was grown (the weight unchanged by the augmentation) and counts the skipped step."""
    torch.manual_seed(0)
    layer = TuckerLinear(10, 8, ranks=(3, 3), max_ranks=(5, 5))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, interval=1))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(6, 10)
    layer(x).pow(2).sum().backward()
    weight = layer.dense_weight().detach().clone()
    assert integrator.before_step(optimizer)  # augmented to (6, 6); the optimizer step is then skipped
    assert layer.ranks == (6, 6)
    optimizer.zero_grad(set_to_none=True)
    layer(x).pow(2).sum().backward()
    assert integrator.before_step(optimizer)
    assert integrator.steps == 1
    torch.testing.assert_close(layer.dense_weight(), weight)
    optimizer.step()
    integrator.after_step(optimizer)
    assert integrator.steps == 2
    integrator.after_step(optimizer)  # an optimizer step the integrator did not prepare changes and counts nothing
    assert integrator.steps == 2


def test_min_rank_holds_ranks_up_and_must_fit_the_storage():
    """Reference: the truncation rule alone takes a rank-1 target's layer to rank 1; min_rank 3 keeps 3."""
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    target = x @ torch.outer(torch.randn(8), torch.randn(10)).T
    ranks = {}
    for min_rank in (1, 3):
        layer = TuckerLinear(10, 8, ranks=(6, 6))
        config = IntegratorConfig(tau=0.3, min_rank=min_rank, interval=1, growth=0)
        integrator = TuckerIntegrator(nn.Sequential(layer), config)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(100):
            optimizer.zero_grad()
            (layer(x) - target).pow(2).mean().backward()
            integrator.step(optimizer)
        ranks[min_rank] = layer.ranks
    assert ranks == {1: (1, 1), 3: (3, 3)}
    with pytest.raises(ValueError, match=r"`min_rank` 5 exceeds the max_rank 4 of mode 0 of Tucker layer '0'"):
        TuckerIntegrator(nn.Sequential(TuckerLinear(10, 8, max_ranks=(4, 4))), IntegratorConfig(min_rank=5, interval=1))


# --- planted bugs that must fail a fast test (issue 18) ------------------------------------------------------------

def test_tail_rank_at_its_boundary():
    """Smallest r with ||s[r:]|| <= theta, with tails that are exact in floating point: s = (3, 2, 1) has tails
    sqrt(14), sqrt(5), 1, 0. A tail equal to theta is discarded (<=); one just above it is kept."""
    from lightning_lowrank.tucker.layers import tail_rank

    s = torch.tensor([3.0, 2.0, 1.0])
    assert int(tail_rank(s, torch.tensor(1.0))) == 2
    assert int(tail_rank(s, torch.tensor(1.0 - 1e-12))) == 3
    assert int(tail_rank(s, torch.tensor(math.sqrt(5.0)))) == 1
    assert int(tail_rank(s, torch.tensor(0.0))) == 3
    assert int(tail_rank(s, torch.tensor(4.0))) == 0


def test_truncation_keeps_the_smallest_rank_within_the_tolerance_on_both_sides_of_it():
    """A diagonal core with singular values 3, 2, 1 (and zeros): tau just above 1/||C|| cuts one direction, just
    below it cuts none of the three."""
    for tau, expected in ((1 / math.sqrt(14) * (1 + 1e-9), 2), (1 / math.sqrt(14) * (1 - 1e-9), 3)):
        layer = TuckerLinear(6, 6, bias=False, ranks=(3, 3), max_ranks=(6, 6))
        with torch.no_grad():
            layer.core.zero_()
            layer.core[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=tau, interval=1, growth=0))
        integrator._before_augmentation["0"] = layer.ranks
        integrator.truncate()
        assert layer.ranks == (expected, expected)


def test_the_rank_decision_is_the_broadcast_one():
    """Reference: the decision handed back by `broadcast` (here another process's: every rank 2), not the local
    one; the layer takes it exactly."""
    torch.manual_seed(0)
    calls = []

    def broadcast(decided):
        calls.append(decided.clone())
        return torch.full_like(decided, 2)

    layer = TuckerLinear(10, 8, ranks=(6, 6))
    config = IntegratorConfig(tau=0.0, interval=1, growth=0)
    integrator = TuckerIntegrator(nn.Sequential(layer), config, broadcast=broadcast)
    layer(torch.randn(16, 10)).pow(2).sum().backward()
    assert integrator.step(torch.optim.SGD(layer.parameters(), lr=0.01))
    assert calls and calls[0][1:].tolist() != [2, 2]  # locally, tau 0 would keep every direction
    assert layer.ranks == (2, 2)


def test_the_augmented_methods_galerkin_gradient_goes_through_reduce():
    """Reference: the same step without `reduce`. The hand-made Galerkin gradient is averaged across processes by
    `reduce`; a reduce that doubles makes the core gradient exactly twice the reference's."""
    def core_gradient(reduce):
        torch.manual_seed(0)
        layer = TuckerLinear(10, 8, ranks=(3, 3))
        config = IntegratorConfig(method="augmented", interval=1)
        integrator = TuckerIntegrator(nn.Sequential(layer), config, reduce=reduce)
        layer(torch.randn(16, 10)).pow(2).sum().backward()
        integrator.augment()
        return layer.core.grad.clone()

    reference = core_gradient(None)
    assert reference.abs().sum() > 0
    torch.testing.assert_close(core_gradient(lambda g: 2 * g), 2 * reference, rtol=1e-12, atol=0)


def test_augmentation_keeps_the_old_basis_columns_as_they_were():
    """The QR of [U | G] is sign-fixed so that its first r columns are U itself (R_11 = I up to rounding): no column
    flips sign, so the optimizer state of the old core block still matches it."""
    torch.manual_seed(0)
    layer = TuckerConv2d(4, 6, 3, ranks=(3, 3, 3, 3))
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.1, interval=1))
    old = [u[:, :r].detach().clone() for u, r in zip(layer.factors, layer.ranks)]
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    integrator.augment()
    for mode in range(2):
        torch.testing.assert_close(layer.factors[mode][:, : old[mode].shape[1]], old[mode], rtol=0, atol=1e-12)


def test_a_skipped_augmentation_is_undone_before_the_next_one():
    """Reference: a fresh integrator that never saw the skipped step. After an augmentation whose optimizer step never
    came, the next step must first undo it, so that its own augmentation spans [U | the new gradient], as the fresh
    integrator's does; left in place, the bases would keep the stale directions (the rank bound leaves no room to
    add the new ones)."""
    torch.manual_seed(0)
    layer = TuckerLinear(10, 8, ranks=(3, 3), max_ranks=(6, 6))
    fresh = copy.deepcopy(layer)
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.0, interval=1))
    reference = TuckerIntegrator(nn.Sequential(fresh), IntegratorConfig(tau=0.0, interval=1))
    (layer(torch.randn(6, 10)) - torch.randn(6, 8)).pow(2).sum().backward()  # (a target: gradients leave the span)
    assert integrator.before_step() and layer.ranks == (6, 6)  # augmented; the optimizer step is then skipped
    layer.zero_grad(set_to_none=True)
    x, target = torch.randn(6, 10), torch.randn(6, 8)
    for module, each in ((layer, integrator), (fresh, reference)):
        (module(x) - target).pow(2).sum().backward()
        assert each.before_step()
    for u, v in zip(layer.active_factors(), fresh.active_factors()):
        torch.testing.assert_close(u @ u.T, v @ v.T, rtol=0, atol=1e-10)


def diagonal_core_layer(values):
    """A TuckerLinear(12, 12) at rank len(values) whose core is diag(values)."""
    layer = TuckerLinear(12, 12, bias=False, ranks=(len(values), len(values)))
    with torch.no_grad():
        layer.core.zero_()
        layer.core[: len(values), : len(values)] = torch.diag(torch.tensor(values, dtype=layer.core.dtype))
    return layer


def lr_zero_steps(layer, integrator, steps):
    """Steps with a random loss at learning rate 0: bases augment and truncate, the core's values stay."""
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        (layer(torch.randn(16, 12)) - torch.randn(16, 12)).pow(2).sum().backward()
        integrator.step(optimizer)


def test_the_growth_margin_lasts_patience_steps_and_renews_when_a_mode_fills_it():
    """Core diag(3, 2), tau 0.1, growth 1, patience 3 (at 1:1, three truncations): the tolerance rank stays 2 and
    the first two truncations keep ceil(growth * 2) = 2 more directions (the margin) while logged ranks say 2; the
    third drops it. Core
    diag(3, 2, 1, 1e-3): the truncation at which the tolerance rank falls to 3 keeps no margin, the next one has it
    again (a fall does not end it). A rise by one direction does not renew it (noise moves a rank that much), so the
    third truncation drops it; growing by a whole margin (3, to 6) renews it for three more truncations, also across a
    resume from the integrator's state."""
    torch.manual_seed(0)
    config = IntegratorConfig(dense_storage=False, tau=0.1, interval=1, growth=1.0, patience=3)
    layer = diagonal_core_layer([3.0, 2.0])
    integrator = TuckerIntegrator(nn.Sequential(layer), config)
    for _ in range(2):
        lr_zero_steps(layer, integrator, 1)
        assert layer.ranks == (4, 4) and integrator.ranks == {"0": (2, 2)}
    lr_zero_steps(layer, integrator, 1)
    assert layer.ranks == (2, 2) and integrator.ranks == {"0": (2, 2)} and not integrator.unfinished

    def fallen():
        layer = diagonal_core_layer([3.0, 2.0, 1.0, 1e-3])
        integrator = TuckerIntegrator(nn.Sequential(layer), config)
        lr_zero_steps(layer, integrator, 1)
        assert layer.ranks == (3, 3)  # fell: no margin at this truncation
        lr_zero_steps(layer, integrator, 1)
        assert layer.ranks == (6, 6) and integrator.ranks == {"0": (3, 3)}  # and again at the next
        return layer, integrator

    layer, integrator = fallen()
    with torch.no_grad():  # the loss grows one direction of the margin past the tolerance
        layer.core[3, 3] = 1.2
    lr_zero_steps(layer, integrator, 1)
    assert integrator.ranks == {"0": (4, 4)} and layer.ranks == (4, 4)  # not renewed: the third drops the margin

    layer, integrator = fallen()
    with torch.no_grad():  # the loss grows the whole margin past the tolerance
        layer.core[3, 3], layer.core[4, 4], layer.core[5, 5] = 1.2, 1.5, 1.4
    lr_zero_steps(layer, integrator, 1)
    assert integrator.ranks == {"0": (6, 6)} and layer.ranks == (12, 12)
    lr_zero_steps(layer, integrator, 1)
    resumed = TuckerIntegrator(nn.Sequential(layer), config)
    resumed.load_state_dict(copy.deepcopy(integrator.state_dict()))
    lr_zero_steps(layer, resumed, 1)
    assert layer.ranks == (12, 12)  # two truncations after the renewal: the margin stays
    lr_zero_steps(layer, resumed, 1)
    assert layer.ranks == (6, 6) and resumed.ranks == {"0": (6, 6)}  # the third drops it
    resumed.truncate(final=True)
    assert layer.ranks == (6, 6)


@pytest.mark.parametrize("interval, core_steps", [(1, 1), (2, 1), (2, 2), (3, 3)])
def test_patience_counts_optimizer_steps_whatever_the_schedule(interval, core_steps):
    """Core diag(3, 2), tau 0.1, growth 1, patience 6: the margin (2 more directions) is gone after the truncation
    that ends the 6th optimizer step or the one before it (truncations come every ``interval`` steps), on every
    schedule; counted in truncations it would last ``interval`` times longer."""
    torch.manual_seed(0)
    layer = diagonal_core_layer([3.0, 2.0])
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(dense_storage=False, tau=0.1,
                                                                         interval=interval,
                                                                         core_steps=core_steps, growth=1.0,
                                                                         patience=6))
    lr_zero_steps(layer, integrator, 1)
    steps = 1
    while layer.ranks != (2, 2) or integrator.unfinished:  # at the augmented ranks, or keeping the margin
        lr_zero_steps(layer, integrator, 1)
        steps += 1
        assert steps <= 6
    assert steps > 6 - interval


def test_a_layer_added_again_restarts_its_margin_and_keeps_one_capture():
    """``add_layers`` with a layer integrated already (a frozen layer restarted at a small start): its growth margin
    starts at its ranks now (none at full rank, one at rank 3 of 12), and ``method="augmented"`` keeps one forward
    hook on it (two would capture every pass twice)."""
    layer = TuckerLinear(12, 12)
    integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(method="augmented", interval=1))
    hooks = len(layer._forward_hooks)
    assert not integrator.margin.keeps("layer")
    layer.set_ranks((3, 3))
    integrator.add_layers({"layer": layer})
    assert integrator.margin.keeps("layer") and len(layer._forward_hooks) == hooks == 1


def test_patience_counts_the_steps_of_a_layer_in_dense_storage():
    """Core diag(3, 2) held dense, tau 0.1, growth 1, patience 6, 1:1 with dense_interval 3: the first truncation
    (step 3) keeps the margin (rank 4, still held dense); the second (step 6) drops it and factorizes the layer (at
    rank 2 its factors pay). Counted in truncations, three dense steps would count as one: it would last to step 18."""
    torch.manual_seed(0)
    layer = diagonal_core_layer([3.0, 2.0])
    layer.to_dense_storage()
    integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.1, interval=1, growth=1.0,
                                                                         patience=6, dense_interval=3))
    lr_zero_steps(layer, integrator, 3)
    assert layer.ranks == (4, 4) and layer.dense_storage and integrator.ranks == {"0": (2, 2)}
    steps = 3
    while layer.ranks != (2, 2) or integrator.unfinished:
        lr_zero_steps(layer, integrator, 1)
        steps += 1
        assert steps <= 6
    assert steps == 6 and not layer.dense_storage


def test_a_mode_that_starts_at_its_max_rank_never_keeps_a_growth_margin():
    """A full-rank start runs the paper's rule: TuckerLinear(12, 12) with max_rank 4, started at 4 on the core
    diag(3, 2, 1, 1e-3), falls to 3 and keeps 3, while the same layer started at 3 keeps a margin up to 4."""
    torch.manual_seed(0)
    config = IntegratorConfig(dense_storage=False, tau=0.1, interval=1, growth=1.0, patience=3)
    for start, values, ranks in ((4, [3.0, 2.0, 1.0, 1e-3], (3, 3)), (3, [3.0, 2.0, 1.0], (4, 4))):
        layer = TuckerLinear(12, 12, bias=False, ranks=(start, start), max_ranks=(4, 4))
        with torch.no_grad():
            layer.core.zero_()
            layer.core[:start, :start] = torch.diag(torch.tensor(values, dtype=layer.core.dtype))
        integrator = TuckerIntegrator(nn.Sequential(layer), config)
        for _ in range(2):  # within the patience
            lr_zero_steps(layer, integrator, 1)
            assert layer.ranks == ranks and integrator.ranks == {"0": (3, 3)}


def test_a_state_written_before_patience_keeps_its_settled_modes_without_margin():
    """Integrator states written before ``patience`` list the modes whose tolerance rank fell ("settled"); they
    resume without a growth margin, modes not listed with one."""
    for settled, ranks in (([], (6, 6)), (["0:0", "0:1"], (3, 3))):
        layer = diagonal_core_layer([3.0, 2.0, 1.0])
        integrator = TuckerIntegrator(nn.Sequential(layer), IntegratorConfig(tau=0.1, interval=1, growth=1.0))
        integrator.load_state_dict({"steps": 0, "frozen": False, "basis_grads": {}, "augmented": {}, "decided": {},
                                    "settled": settled})
        lr_zero_steps(layer, integrator, 1)
        assert layer.ranks == ranks


def test_a_state_written_before_dense_interval_counts_its_margins_in_windows():
    """Integrator states written before ``dense_interval`` count a margin's age in truncations ("margins"); with
    interval 3 and patience 6, the next truncation (3 steps more) keeps it after none, drops it after one."""
    for truncations, ranks in ((0, (4, 4)), (1, (2, 2))):
        layer = diagonal_core_layer([3.0, 2.0])
        config = IntegratorConfig(tau=0.1, interval=3, core_steps=1, growth=1.0, patience=6, dense_storage=False)
        integrator = TuckerIntegrator(nn.Sequential(layer), config)
        integrator.load_state_dict({"steps": 0, "frozen": False, "basis_grads": {}, "augmented": {}, "decided": {},
                                    "margins": {"0:0": [2, truncations], "0:1": [2, truncations]}})
        lr_zero_steps(layer, integrator, 1)
        assert layer.ranks == ranks


def test_the_growth_rule_grows_ranks_to_a_teacher_five_times_the_start():
    """Growth from below (no rank known in advance): a rank-(2, 2) student of a rank-10 teacher. Under the paper's
    rule (growth 0) with truncation after each augmenting step, a new direction must reach tau ||C|| within one step:
    the ranks stall (SGD at 6, Adam at the start's 2), far from the teacher. The growth margin keeps the next
    directions training across steps, so the ranks climb to the teacher's 10 and learn it, on either schedule, and
    the final truncation drops the margin."""
    torch.manual_seed(0)
    n = 64
    teacher = (torch.randn(n, 10) @ torch.randn(10, n)) / n

    def train(optimizer_cls, lr, schedule, growth):
        torch.manual_seed(1)
        layer = TuckerLinear(n, n, bias=False, ranks=(2, 2), dtype=torch.float32)
        config = IntegratorConfig(tau=0.05, interval=schedule, core_steps=schedule, growth=growth)
        integrator = TuckerIntegrator(nn.Sequential(layer), config)
        optimizer = optimizer_cls(layer.parameters(), lr=lr)
        for _ in range(400):
            x = torch.randn(128, n, dtype=torch.float32)
            optimizer.zero_grad()
            ((layer(x) - x @ teacher.float().T) ** 2).mean().backward()
            integrator.step(optimizer)
        assert not integrator.unfinished or layer.ranks != integrator.ranks["0"]
        integrator.truncate(optimizer, final=True)
        assert not integrator.unfinished and integrator.ranks["0"] == layer.ranks
        error = torch.linalg.norm(layer.dense_weight().double() - teacher) / torch.linalg.norm(teacher)
        return layer.ranks, float(error)

    sgd, adam = (torch.optim.SGD, 2.0), (torch.optim.Adam, 1e-2)
    for optimizer, schedule in ((sgd, 1), (sgd, 10), (adam, 1)):
        ranks, error = train(*optimizer, schedule, growth=0.25)
        assert ranks == (10, 10) and error < 0.05, (optimizer, schedule, ranks, error)
    for optimizer, stall in ((sgd, 6), (adam, 2)):
        ranks, error = train(*optimizer, 1, growth=0.0)
        assert max(ranks) <= stall and error > 0.4, (optimizer, ranks, error)


# --- dense storage -------------------------------------------------------------------------------------------------

def _tail_ranks(weight, tau):
    """Per mode the smallest rank (>= 1) whose discarded singular values have 2-norm <= tau ||W||_F."""
    norm = torch.linalg.vector_norm(weight)
    ranks = []
    for mode in range(weight.ndim):
        s = torch.linalg.svdvals(ref_unfold(weight, mode))
        ranks.append(next(r for r in range(1, len(s) + 1) if torch.linalg.vector_norm(s[r:]) <= tau * norm))
    return tuple(ranks)


def dense_storage_twin():
    """nn.Linear(16, 12) and a TuckerLinear in dense storage holding the same weight and bias (seed 0)."""
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    layer = TuckerLinear.from_dense(dense)
    layer.to_dense_storage()
    with torch.no_grad():
        dense.weight.copy_(layer.core)
    return dense, layer


@pytest.mark.parametrize("tau, factorizes", [(0.15, False), (0.7, True)])
def test_dense_storage_trains_as_the_dense_layer_and_truncates_by_the_hosvd(tau, factorizes):
    """Reference: nn.Linear trained by its own Adam on the same batches. Equal until the window's truncation, which
    is the truncated HOSVD of the dense weight at its tolerance ranks (explicit SVDs). Held dense (the factors would
    not pay at rank >= 3) it is a proximal step on W: Adam's state stays the reference's own; factorized, the state
    goes to the core's coordinates, m x_i U_i^T and v x_i (U_i * U_i)^T, at the storage of the ranks."""
    dense, layer = dense_storage_twin()
    teacher = torch.randn(12, 2) @ torch.randn(2, 16)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (layer, dense)]
    integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(tau=tau, interval=4, dense_interval=4),
                                  optimizer=optimizers[0])
    for step in range(4):
        x = torch.randn(32, 16)
        for module, optimizer in zip((layer, dense), optimizers):
            optimizer.zero_grad()
            F.mse_loss(module(x), x @ teacher.T).backward()
        integrator.step(optimizers[0])
        optimizers[1].step()
        if step < 3:
            torch.testing.assert_close(layer.core, dense.weight, rtol=1e-12, atol=1e-12)
    w = dense.weight.detach()
    ranks = _tail_ranks(w, tau)
    assert layer.ranks == ranks and layer.dense_storage is not factorizes and (ranks[0] < 3) is factorizes
    torch.testing.assert_close(layer.dense_weight(), truncated_hosvd(w, ranks), rtol=1e-10, atol=1e-10)
    state, reference = optimizers[0].state[layer.core], optimizers[1].state[dense.weight]
    m, v = reference["exp_avg"], reference["exp_avg_sq"]
    if not factorizes:
        assert layer.storage == (12, 16)
        torch.testing.assert_close(state["exp_avg"], m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-12, atol=1e-16)
        return
    assert layer.storage == tuple(storage_size(n, r) for n, r in zip(layer.shape, ranks))
    for mode, u in enumerate(layer.active_factors()):
        m = mode_product(m, u.T, mode)
        v = mode_product(v, (u * u).T, mode)
    for key, expected in (("exp_avg", m), ("exp_avg_sq", v)):
        assert state[key].shape == layer.core.shape
        torch.testing.assert_close(state[key][: ranks[0], : ranks[1]], expected, rtol=1e-10, atol=1e-14)
        outside = state[key].clone()
        outside[: ranks[0], : ranks[1]] = 0
        assert not outside.any()


@pytest.mark.parametrize("interval, core_steps", [(1, 1), (2, 1), (4, 4)])
def test_a_dense_storage_layer_is_truncated_every_dense_interval_steps(interval, core_steps):
    """Whatever the factorized layers' schedule, a layer in dense storage is truncated at the end of every third step
    (dense_interval 3): in between its dense steps move W off its ranks and it awaits truncation; after one, W is
    its own truncated HOSVD at the new ranks. The final truncation truncates a layer awaiting one."""
    torch.manual_seed(0)
    layer = TuckerLinear(16, 12)
    layer.to_dense_storage()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.2)
    config = IntegratorConfig(tau=0.3, interval=interval, core_steps=core_steps, dense_interval=3)
    integrator = TuckerIntegrator({"layer": layer}, config, optimizer=optimizer)
    teacher = torch.randn(12, 2) @ torch.randn(2, 16)
    for step in range(5):
        optimizer.zero_grad()
        x = torch.randn(32, 16)
        F.mse_loss(layer(x), x @ teacher.T).backward()
        integrator.step(optimizer)
        assert ("layer" in integrator.unfinished) is (step != 2)
        w = layer.dense_weight()
        assert layer.dense_storage and layer.ranks[0] > 2
        if step == 2:
            torch.testing.assert_close(w, truncated_hosvd(w, layer.ranks), rtol=1e-10, atol=1e-10)
            assert layer.ranks[0] < 12
    assert (w - truncated_hosvd(w, layer.ranks)).abs().max() > 1e-3
    integrator.truncate(optimizer, final=True)
    assert not integrator.unfinished and layer.dense_storage
    w = layer.dense_weight()
    torch.testing.assert_close(w, truncated_hosvd(w, layer.ranks), rtol=1e-10, atol=1e-10)


def test_freeze_factorizes_a_dense_storage_layer_at_its_ranks():
    """Fixed bases need factors: a layer held dense is factorized at its ranks at the freeze (W unchanged, already at
    them), whatever it stores then; later steps move the core only."""
    torch.manual_seed(0)
    layer = TuckerLinear(16, 12)
    layer.to_dense_storage()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(tau=0.15, interval=1, dense_interval=1),
                                  optimizer=optimizer)
    teacher = torch.randn(12, 2) @ torch.randn(2, 16)

    def step():
        optimizer.zero_grad()
        x = torch.randn(32, 16)
        F.mse_loss(layer(x), x @ teacher.T).backward()
        integrator.step(optimizer)

    step()
    assert layer.dense_storage and 3 <= layer.ranks[0] < 12
    w, ranks = layer.dense_weight(), layer.ranks
    integrator.freeze(optimizer)
    assert not layer.dense_storage and layer.ranks == ranks
    torch.testing.assert_close(layer.dense_weight(), w, rtol=1e-10, atol=1e-10)
    factors = [u.detach().clone() for u in layer.active_factors()]
    for u in factors:
        assert_orthonormal(u, atol=1e-10)
    step()
    assert layer.ranks == ranks and all(torch.equal(u, v) for u, v in zip(layer.active_factors(), factors))


def test_a_dense_storage_rank_grows_to_the_tolerance_rank_of_the_dense_step():
    """The dense gradient moves W in every direction, so truncation judges the whole weight: a layer held at rank 3
    whose step adds directions keeps the tolerance ranks of W after the step (explicit SVDs), above 3 (the paper's
    rule, growth 0; a growth margin keeps more)."""
    torch.manual_seed(0)
    layer = TuckerLinear(16, 12)
    layer.to_dense_storage()
    with torch.no_grad():
        layer.core.copy_(truncated_hosvd(layer.core, (3, 3)))
    layer.set_ranks((3, 3))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(tau=0.05, interval=1, growth=0, dense_interval=1),
                                  optimizer=optimizer)
    teacher = torch.randn(12, 8) @ torch.randn(8, 16)
    x = torch.randn(64, 16)
    F.mse_loss(layer(x), x @ teacher.T).backward()
    assert integrator.before_step(optimizer)
    optimizer.step()
    expected = _tail_ranks(layer.core.detach(), 0.05)
    integrator.after_step(optimizer)
    assert layer.ranks == expected and expected[0] > 3


def test_scaled_steps_leave_a_dense_storage_layer_at_the_optimizers_step():
    """``scale_steps`` scales a core of fewer entries than W; held dense, the core is W (s = 1), at any ranks."""
    cores = []
    for scale in (False, True):
        torch.manual_seed(0)
        layer = TuckerLinear(16, 12)
        layer.to_dense_storage()
        layer.set_ranks((3, 3))
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
        integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(interval=2, scale_steps=scale),
                                      optimizer=optimizer)
        layer(torch.randn(8, 16)).square().sum().backward()
        integrator.step(optimizer)
        cores.append(layer.core.detach().clone())
    torch.testing.assert_close(cores[0], cores[1], rtol=0, atol=0)


def test_at_tau_zero_a_dense_storage_layer_is_the_dense_layer_through_its_truncations():
    """Nothing is cut at tau = 0 (every mode keeps its unfolding's rank bound, 12 of the input's 16), so weights and
    Adam's state stay those of nn.Linear trained by its own Adam, truncation after truncation."""
    dense, layer = dense_storage_twin()
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (layer, dense)]
    integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(tau=0.0, interval=1), optimizer=optimizers[0])
    for _ in range(3):
        x = torch.randn(32, 16)
        for module, optimizer in zip((layer, dense), optimizers):
            optimizer.zero_grad()
            module(x).square().mean().backward()
        integrator.step(optimizers[0])
        optimizers[1].step()
    assert layer.dense_storage and layer.ranks == (12, 12)
    torch.testing.assert_close(layer.core, dense.weight, rtol=1e-12, atol=1e-12)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(optimizers[0].state[layer.core][key], optimizers[1].state[dense.weight][key],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dense_storage", [True, False])
def test_a_layer_whose_factors_outgrow_its_weight_holds_the_weight(dense_storage):
    """Ranks 2 of Linear(16, 12) store 128 entries (dense: 192); at tau 0 a truncation keeps the augmented ranks 4,
    whose factors would store 288: with ``dense_storage`` the layer holds W itself, W unchanged and Adam's state
    carried to W's coordinates (m x_i U_i exactly; each entry's v a weighted average of the core's, so within their
    range), so that the next step is dense Adam's (reference: torch's Adam on the dense weight with that state);
    without, it keeps its factors."""
    torch.manual_seed(0)
    layer = TuckerLinear(16, 12, ranks=(2, 2))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    integrator = TuckerIntegrator({"layer": layer}, IntegratorConfig(tau=0.0, interval=1, growth=0,
                                                                     dense_storage=dense_storage),
                                  optimizer=optimizer)
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    F.mse_loss(layer(x), target).backward()
    assert integrator.before_step(optimizer)
    optimizer.step()
    assert layer.ranks == (4, 4)
    w = layer.dense_weight()
    factors = [u.detach().clone() for u in layer.active_factors()]
    state = {key: value for key, value in optimizer.state[layer.core].items()}
    m, v = active(state["exp_avg"], (4, 4)).clone(), active(state["exp_avg_sq"], (4, 4)).clone()
    integrator.after_step(optimizer)
    assert layer.dense_storage is dense_storage
    torch.testing.assert_close(layer.dense_weight(), w, rtol=1e-10, atol=1e-12)
    if not dense_storage:
        assert layer.ranks == (4, 4) and layer.storage == (8, 8)
        return
    assert layer.storage == (12, 16) and sum(p.numel() for p in layer.parameters()) == 12 * 16 + 12
    for mode, u in enumerate(factors):
        m = mode_product(m, u, mode)
    torch.testing.assert_close(optimizer.state[layer.core]["exp_avg"], m, rtol=1e-10, atol=1e-14)
    carried = optimizer.state[layer.core]["exp_avg_sq"]  # the truncation's rotation and the expansion both average
    assert v.min() * (1 - 1e-9) <= carried.min() and carried.max() <= v.max() * (1 + 1e-9)
    dense = nn.Linear(16, 12)
    with torch.no_grad():
        dense.weight.copy_(layer.core)
        dense.bias.copy_(layer.bias)
    reference = torch.optim.Adam(dense.parameters(), lr=0.05)
    for mine, theirs in ((layer.core, dense.weight), (layer.bias, dense.bias)):
        reference.state[theirs] = {key: value.clone() for key, value in optimizer.state[mine].items()}
    for module, opt in ((layer, optimizer), (dense, reference)):
        opt.zero_grad()
        F.mse_loss(module(x), target).backward()
    integrator.step(optimizer)
    reference.step()
    assert layer.dense_storage
    torch.testing.assert_close(layer.core, dense.weight, rtol=1e-12, atol=1e-12)


class _Checkpointed(nn.Module):
    """Linear - ReLU - Linear, the first two under ``torch.utils.checkpoint`` (``reentrant`` None: not
    checkpointed)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.first, self.second, self.reentrant = nn.Linear(30, 40), nn.Linear(40, 10), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.second(torch.relu(self.first(x)))
        hidden = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.first(t)), x,
                                                   use_reentrant=self.reentrant)
        return self.second(hidden)


@pytest.mark.parametrize("method", ["parallel", "augmented"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_trains_as_the_run_without_it(method, reentrant):
    """Under activation checkpointing (as transformers' gradient checkpointing does) a checkpointed layer's forward
    runs twice, the first time without grad (reentrant) or with saved-tensor hooks (not reentrant). Three steps of
    the integrator give the weights and ranks of the same run without checkpointing, bit for bit: the augmented
    method's capture keeps one input and output gradient per forward that reaches the loss."""
    torch.manual_seed(0)
    start = _Checkpointed(None)
    convert(start, rank=0.5)
    x, y = torch.randn(64, 30), torch.randint(0, 10, (64,))
    runs = []
    for mode in (None, reentrant):
        model = copy.deepcopy(start)
        model.reentrant = mode
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        integrator = TuckerIntegrator(model, IntegratorConfig(tau=0.05, method=method, interval=1))
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x.clone().requires_grad_(mode is True)), y).backward()
            integrator.step(optimizer)
        runs.append((model.first.dense_weight(), model.second.dense_weight(), integrator.ranks))
    assert runs[1][2] == runs[0][2] and runs[0][2]["first"] != (30, 30)
    torch.testing.assert_close(runs[1][:2], runs[0][:2], rtol=0, atol=0)
