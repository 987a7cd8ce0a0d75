"""Optimizer state through rank changes: every torch.optim optimizer is carried or refused by name."""

import inspect
import warnings

import lightning.pytorch as pl
import pytest
import torch
from reference import assert_orthonormal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowrank as ll
from lightning_lowrank.tucker.optimizer_state import (
    OPTIMIZER_STATE,
    REFUSED,
    check_state,
    expand_state,
    rotate,
    state_rules,
    transport_state,
)

ALL_OPTIMIZERS = sorted((c for c in vars(torch.optim).values() if inspect.isclass(c)
                         and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer),
                        key=lambda c: c.__name__)
SUPPORTED = [c for c in ALL_OPTIMIZERS if c in OPTIMIZER_STATE]
OPTIONS = {torch.optim.SGD: dict(lr=0.1, momentum=0.9), torch.optim.RMSprop: dict(lr=0.01, momentum=0.5, centered=True),
           torch.optim.Adam: dict(lr=0.01, amsgrad=True), torch.optim.ASGD: dict(lr=0.01, t0=0)}


def test_every_torch_optimizer_is_supported_or_refused_by_name():
    for cls in ALL_OPTIMIZERS:
        if cls in OPTIMIZER_STATE:
            continue
        assert cls.__name__ in REFUSED, f"{cls.__name__} ships with torch but has neither rules nor a refusal"
        optimizer = cls([torch.zeros(3, 3, requires_grad=True)], lr=0.1) if cls.__name__ != "Muon" else None
        if optimizer is not None:
            with pytest.raises(ValueError, match=f"optimizer {cls.__name__} cannot train Tucker layers"):
                state_rules(optimizer)


def test_subclasses_inherit_their_base_rules_and_unknown_state_is_refused():
    class MyAdam(torch.optim.Adam):
        pass

    optimizer = MyAdam([torch.zeros(2, 2, requires_grad=True)])
    assert state_rules(optimizer) is OPTIMIZER_STATE[torch.optim.Adam]
    with pytest.raises(ValueError, match=r"MyAdam keeps state \['trace'\] for a Tucker core"):
        check_state(optimizer, {"step": torch.tensor(1.0), "trace": torch.zeros(2, 2)})


def run(cls, core, grads):
    """The optimizer's state after stepping ``core`` with ``grads``."""
    parameter = torch.nn.Parameter(core.clone())
    optimizer = cls([parameter], **OPTIONS.get(cls, dict(lr=0.01)))
    for grad in grads:
        parameter.grad = grad.clone()
        optimizer.step()
    return optimizer.state[parameter], parameter.detach()


@pytest.mark.parametrize("cls", SUPPORTED, ids=lambda c: c.__name__)
def test_rules_are_exact_for_signed_permutations(cls):
    """Reference: the same optimizer run in rotated coordinates. Elementwise optimizers commute with signed
    permutations P, so the rotated problem's state must equal the original state moved by each entry's rule; a
    squared state rotated linearly (RMSprop's square_avg, Adagrad's sum) would turn negative under the sign flips."""
    torch.manual_seed(0)
    core = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
    rotations = []
    for n in core.shape:
        p = torch.eye(n, dtype=torch.float64)[torch.randperm(n)] * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        rotations.append(p.to(torch.float64))
    state, _ = run(cls, core, grads)
    rotated_state, rotated_core = run(cls, rotate(core, rotations), [rotate(g, rotations) for g in grads])
    rules = OPTIMIZER_STATE[cls]
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != core.shape:
            continue
        torch.testing.assert_close(rotate(value, rotations, rules[key].kind), rotated_state[key], rtol=1e-12,
                                   atol=1e-14, msg=f"{cls.__name__}.{key} ({rules[key].kind})")
    torch.testing.assert_close(rotate(run(cls, core, grads)[1], rotations), rotated_core, rtol=1e-12, atol=1e-14)


def test_squared_and_magnitude_rules_on_a_general_rotation():
    """A general orthonormal P: squared state maps by (P * P)^T (the diagonal of the rotated diagonal covariance),
    magnitude state by the same map on its squares; both stay >= 0."""
    torch.manual_seed(0)
    v = torch.rand(5, 4, dtype=torch.float64)
    p, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(rotate(v, [p, None], "squared"), (p * p).T @ v)
    torch.testing.assert_close(rotate(v, [p, None], "magnitude"), ((p * p).T @ v**2).sqrt())
    torch.testing.assert_close(rotate(v, [p, None], "linear"), p.T @ v)


class Regression(pl.LightningModule):
    """x (8) -> linear 16 -> tanh -> linear 4, no biases (Muon takes matrices only), on a rank-2 teacher."""

    def __init__(self, optimizer_cls, options):
        super().__init__()
        self.optimizer_cls, self.options = optimizer_cls, options
        self.net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(128, 8, generator=generator)
        teacher = torch.randn(4, 2, generator=generator) @ torch.randn(2, 8, generator=generator) / 3
        self.data = TensorDataset(x, torch.tanh(x @ teacher.T))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), **self.options)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=32)

    def loss(self):
        x, y = self.data.tensors
        with torch.no_grad():
            return float(nn.functional.mse_loss(self.net(x), y))


LEARNING_RATES = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.01), "AdamW": dict(lr=0.01),
                  "NAdam": dict(lr=0.01), "RAdam": dict(lr=0.01), "Adamax": dict(lr=0.02),
                  "RMSprop": dict(lr=0.005), "Adagrad": dict(lr=0.1), "Adadelta": dict(lr=1.0),
                  "Rprop": dict(lr=0.001), "ASGD": dict(lr=0.1), "Muon": dict(lr=0.02)}


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS, ids=lambda c: c.__name__)
def test_every_optimizer_trains_through_the_callback_or_is_refused_at_setup(cls):
    """Reference: the optimizer's own dense run from the same initial weights (the full start is exact)."""
    def fit(callbacks):
        torch.manual_seed(0)
        module = Regression(cls, LEARNING_RATES.get(cls.__name__, dict(lr=0.01)))
        pl.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks).fit(module)
        return module

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        if cls not in OPTIMIZER_STATE:
            with pytest.raises(ValueError, match=f"optimizer {cls.__name__} cannot train Tucker layers"):
                fit([ll.TuckerCallback(tau=0.05, rank="full")])
            return
        dense = fit([]).loss()
        module = fit([ll.TuckerCallback(tau=0.05, rank="full")])
    print(f"{cls.__name__}: callback {module.loss():.2e}, dense {dense:.2e}, ratio {module.loss() / dense:.2f}")
    assert module.loss() <= 3 * dense, (module.loss(), dense)
    for layer in module.net:
        if isinstance(layer, ll.TuckerLayer):
            for u in layer.decomposition()[1]:
                assert_orthonormal(u.detach().double(), atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.3),
    lambda p: torch.optim.Adam([p], lr=0.1, weight_decay=0.3, decoupled_weight_decay=True),
    lambda p: torch.optim.NAdam([p], lr=0.1, weight_decay=0.3, decoupled_weight_decay=True),
    lambda p: torch.optim.RAdam([p], lr=0.1, weight_decay=0.3, decoupled_weight_decay=True),
])
def test_decay_factor_is_what_a_decoupled_step_does_to_a_parameter_without_gradient(make):
    """Reference: the optimizer's own step on a zero gradient, which only decays (1 - lr wd)."""
    from lightning_lowrank.tucker.optimizer_state import decay_factor

    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    optimizer = make(p)
    factor = decay_factor(optimizer, p)
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(p.detach(), factor * before, rtol=1e-15, atol=0)
    assert factor == pytest.approx(1 - 0.1 * 0.3)


def test_decay_factor_is_one_where_the_decay_is_part_of_the_gradient():
    """Weight decay added to the gradient (SGD, Adam's default) is part of the step, and an optimizer that does not
    hold the parameter does not decay it; AdamW of a torch whose groups have no ``decoupled_weight_decay`` entry
    still decays apart from the gradient."""
    from lightning_lowrank.tucker.optimizer_state import decay_factor

    p = nn.Parameter(torch.randn(3))
    assert decay_factor(torch.optim.SGD([p], lr=0.1, weight_decay=0.3), p) == 1.0
    assert decay_factor(torch.optim.Adam([p], lr=0.1, weight_decay=0.3), p) == 1.0
    assert decay_factor(torch.optim.AdamW([p], lr=0.1, weight_decay=0.0), p) == 1.0
    assert decay_factor(None, p) == 1.0
    assert decay_factor(torch.optim.AdamW([nn.Parameter(torch.randn(3))], lr=0.1, weight_decay=0.3), p) == 1.0
    older = torch.optim.AdamW([p], lr=0.1, weight_decay=0.3)
    del older.param_groups[0]["decoupled_weight_decay"]
    assert decay_factor(older, p) == pytest.approx(1 - 0.1 * 0.3)


def test_transport_without_any_rotation_leaves_the_state_as_it_is():
    """No mode rotates: every state entry keeps its values (the rotated block is the state itself, which a copy must
    not clear first)."""
    core = nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.Adam([core], lr=0.1)
    core.grad = torch.randn(4, 3)
    optimizer.step()
    before = {key: value.clone() for key, value in optimizer.state[core].items()}
    transport_state(optimizer, core, (4, 3), [None, None])
    for key, value in optimizer.state[core].items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_expanding_a_core_state_to_the_dense_weight_keeps_the_second_moments_scale():
    """To W's coordinates (a layer taking W back): m x_i U_i exactly; each entry of v the average of the core's
    entries it is made of, weighted by U_0[a, k]^2 U_1[b, l]^2 (explicit sums), so a constant v stays that constant
    (carried by the squared rule alone it would shrink to about r / n of it); Adamax's magnitudes the same on their
    squares."""
    torch.manual_seed(0)
    u0, u1 = (torch.linalg.qr(torch.randn(n, r, dtype=torch.float64)).Q for n, r in ((6, 2), (5, 3)))
    for cls, key, kind in ((torch.optim.Adam, "exp_avg_sq", "squared"), (torch.optim.Adamax, "exp_inf", "magnitude")):
        core = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
        optimizer = cls([core], lr=0.1)
        core.grad = torch.randn(6, 5, dtype=torch.float64)
        optimizer.step()
        state = optimizer.state[core]
        linear = torch.zeros(6, 5, dtype=torch.float64)
        linear[:2, :3] = torch.randn(2, 3, dtype=torch.float64)
        second = torch.zeros(6, 5, dtype=torch.float64)
        second[:2, :3] = torch.rand(2, 3, dtype=torch.float64) + 0.5
        state["exp_avg"] = linear.clone()
        state[key] = second.clone()
        expand_state(optimizer, core, (2, 3), [u0, u1])
        torch.testing.assert_close(state["exp_avg"], u0 @ linear[:2, :3] @ u1.T, rtol=1e-12, atol=1e-14)
        w = torch.einsum("ak,bl->abkl", u0**2, u1**2)
        squares = second[:2, :3] if kind == "squared" else second[:2, :3] ** 2
        expected = torch.einsum("abkl,kl->ab", w, squares) / w.sum(dim=(2, 3))
        torch.testing.assert_close(state[key], expected if kind == "squared" else expected.sqrt(), rtol=1e-12,
                                   atol=1e-14)
        state[key] = torch.zeros(6, 5, dtype=torch.float64)
        state[key][:2, :3] = 0.7
        expand_state(optimizer, core, (2, 3), [u0, u1])
        torch.testing.assert_close(state[key], torch.full((6, 5), 0.7, dtype=torch.float64), rtol=1e-12, atol=0)
