"""Carrying a core's optimizer state through the integrator's rank changes.

When truncation rotates a core, C <- C x_i P_i^T (P_i with orthonormal columns), every per-entry state tensor of the
optimizer must follow, each by the rule its meaning asks for, and the entries that augmentation adds start fresh:

- ``"linear"``: state in the space of the gradient or of the parameter (momentum, Adam's m, Rprop's previous
  gradient, ASGD's average): s x_i P_i^T, exact.
- ``"squared"``: per-entry squares (Adam's v, RMSprop's and Adadelta's averages, Adagrad's sum): the diagonal of the
  rotated diagonal covariance, s x_i (P_i * P_i)^T; >= 0, exact for permutations and sign flips.
- ``"magnitude"``: per-entry magnitudes (Adamax's infinity norm, Rprop's step sizes): sqrt(s^2 x_i (P_i * P_i)^T),
  the same rule on the squares; >= 0, exact for permutations and sign flips.
- ``"scalar"``: shared by all entries (step counts, NAdam's mu product, ASGD's eta and mu): left as it is.

:data:`OPTIMIZER_STATE` lists every ``torch.optim`` optimizer whose state can be carried; subclasses inherit their
base's rules. Register your own optimizer by adding its class with a rule for each state entry it keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_lowrank.layers import mode_dot

Kind = Literal["linear", "squared", "magnitude", "scalar"]
Fresh = Literal["zero", "grad", "grad_squared", "grad_squared_sum", "grad_abs", "lr"]


@dataclass(frozen=True)
class StateRule:
    """How one state entry of the core moves: ``kind`` under a rotation, ``fresh`` its value on entries that
    augmentation adds ("zero", or the state that a constant gradient g would have built: "grad" g, "grad_squared"
    g^2, "grad_squared_sum" step * g^2 (a sum over the steps so far), "grad_abs" |g|; "lr" the parameter group's
    learning rate, Rprop's initial step size)."""

    kind: Kind
    fresh: Fresh = "zero"


_ADAM = {"step": StateRule("scalar"), "exp_avg": StateRule("linear", "grad"),
         "exp_avg_sq": StateRule("squared", "grad_squared"), "max_exp_avg_sq": StateRule("squared", "grad_squared")}

OPTIMIZER_STATE: dict[type[torch.optim.Optimizer], dict[str, StateRule]] = {
    torch.optim.SGD: {"momentum_buffer": StateRule("linear")},
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: {**_ADAM, "mu_product": StateRule("scalar")},
    torch.optim.RAdam: _ADAM,
    torch.optim.Adamax: {"step": StateRule("scalar"), "exp_avg": StateRule("linear", "grad"),
                         "exp_inf": StateRule("magnitude", "grad_abs")},
    torch.optim.RMSprop: {"step": StateRule("scalar"), "square_avg": StateRule("squared", "grad_squared"),
                          "momentum_buffer": StateRule("linear"), "grad_avg": StateRule("linear")},
    torch.optim.Adagrad: {"step": StateRule("scalar"), "sum": StateRule("squared", "grad_squared_sum")},
    torch.optim.Adadelta: {"step": StateRule("scalar"), "square_avg": StateRule("squared"),
                           "acc_delta": StateRule("squared")},
    torch.optim.Rprop: {"step": StateRule("scalar"), "prev": StateRule("linear"),
                        "step_size": StateRule("magnitude", "lr")},
    torch.optim.ASGD: {"step": StateRule("scalar"), "eta": StateRule("scalar"), "mu": StateRule("scalar"),
                       "ax": StateRule("linear")},
}
"""State rules per optimizer class, for every per-parameter state entry it keeps."""
if hasattr(torch.optim, "Muon"):  # torch >= 2.9
    OPTIMIZER_STATE[torch.optim.Muon] = {"momentum_buffer": StateRule("linear")}

REFUSED: dict[str, str] = {
    "LBFGS": "its state is one flat history over all parameters and a step evaluates the closure several times",
    "SparseAdam": "it needs sparse gradients, and a core's Galerkin gradient is dense",
    "Adafactor": "its second moments are factored into row and column averages, which do not rotate entry-wise",
}
"""Optimizers whose state cannot follow a rank change, with the reason."""


def state_rules(optimizer: torch.optim.Optimizer) -> dict[str, StateRule]:
    """The state rules of ``optimizer`` (the first class of its MRO in :data:`OPTIMIZER_STATE`).

    Raises:
        ValueError: the optimizer is not supported; the message names it, the reason and the supported ones.
    """
    for cls in type(optimizer).__mro__:
        if cls in OPTIMIZER_STATE:
            return OPTIMIZER_STATE[cls]
    name = type(optimizer).__name__
    reason = REFUSED.get(name, "its state entries are not known")
    supported = sorted(cls.__name__ for cls in OPTIMIZER_STATE)
    raise ValueError(f"optimizer {name} cannot train Tucker layers: {reason}. Supported: {supported}; another "
                     "optimizer can be registered in lightning_lowrank.OPTIMIZER_STATE with a rule per state entry")


def check_state(optimizer: torch.optim.Optimizer, state: dict[str, object]) -> dict[str, StateRule]:
    """The rules of ``optimizer``, after checking that each entry of a core's ``state`` has one."""
    rules = state_rules(optimizer)
    unknown = sorted(set(state) - set(rules))
    if unknown:
        raise ValueError(f"{type(optimizer).__name__} keeps state {unknown} for a Tucker core, which "
                         f"lightning_lowrank.OPTIMIZER_STATE has no rule for (known: {sorted(rules)})")
    return rules


def rotate(tensor: Tensor, rotations: Sequence[Tensor | None], kind: Kind = "linear") -> Tensor:
    """tensor x_i P_i^T for every mode with a rotation P_i, by the rule of ``kind`` (see the module docstring)."""
    if kind == "magnitude":
        return rotate(tensor.square(), rotations, "squared").clamp_min(0).sqrt()
    for mode, p in enumerate(rotations):
        if p is not None:
            tensor = mode_dot(tensor, (p * p if kind == "squared" else p).T, mode)
    return tensor


def fresh_value(rule: StateRule, grad: Tensor, lr: float | Tensor, step: Tensor | float) -> Tensor | None:
    """The state of entries that augmentation adds, given their gradient, the group's learning rate and the
    optimizer's step count; None for zero."""
    if rule.fresh == "grad":
        return grad
    if rule.fresh == "grad_squared":
        return grad.square()
    if rule.fresh == "grad_squared_sum":
        return grad.square() * step
    if rule.fresh == "grad_abs":
        return grad.abs()
    if rule.fresh == "lr":
        return torch.zeros_like(grad).add_(lr)
    return None
