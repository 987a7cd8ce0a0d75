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
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_lowrank.tucker.algebra import mode_dot
from lightning_lowrank.tucker.storage import resized, zero_outside

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


def decay_factor(optimizer: torch.optim.Optimizer | None, parameter: Tensor) -> float | Tensor:
    """The factor 1 - lr * weight_decay by which ``optimizer``'s next step multiplies ``parameter`` apart from its
    gradient step, where the weight decay is decoupled from the gradient (AdamW; Adam, NAdam, RAdam with
    ``decoupled_weight_decay=True``); 1 otherwise (no decay, or decay added to the gradient, as in SGD and Adam)."""
    group = _group_of(optimizer, parameter)
    if group is None or not group.get("weight_decay"):  # not stepped by this optimizer, or no decay
        return 1.0
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    return 1 - group["lr"] * group["weight_decay"] if decoupled else 1.0


def _group_of(optimizer: torch.optim.Optimizer | None, parameter: Tensor) -> dict[str, Any] | None:
    """The parameter group of ``optimizer`` that holds ``parameter`` (None: it holds none)."""
    groups = [] if optimizer is None else optimizer.param_groups
    return next((group for group in groups if any(p is parameter for p in group["params"])), None)


def _core_state(optimizer: torch.optim.Optimizer | None, core: Tensor) -> dict[str, object]:
    return {} if optimizer is None else optimizer.state.get(core, {})


def warm_start(optimizer: torch.optim.Optimizer | None, core: Tensor, old: Sequence[int],
               new: Sequence[int]) -> None:
    """State of the core entries that augmentation added (the block ``new`` outside ``old``) := its rule's fresh
    value, given the core's gradient: for Adam-type state the steady state of a constant gradient g, m = g, v = g^2.

    Zero state with the optimizer's global bias correction would give a fresh entry a first step of
    lr * sign(g) / sqrt(1 - beta2) (3.2 lr for Adam), however small its gradient, and noise directions would
    survive truncation; this way a fresh entry steps like an established one. SGD momentum is left at zero
    (its first step on a fresh entry is the plain gradient step). Before the optimizer's first step its state is
    empty and it initialises every entry itself.
    """
    state = _core_state(optimizer, core)
    if not state:
        return
    rules = check_state(optimizer, state)
    block = tuple(slice(r) for r in new)
    fresh = torch.ones(tuple(new), dtype=torch.bool, device=core.device)
    fresh[tuple(slice(r) for r in old)] = False
    grad = core.grad[block]
    lr = _group_of(optimizer, core)["lr"]
    step = state.get("step", 0)
    for key, value in state.items():
        fresh_state = fresh_value(rules[key], grad, lr, step)
        if fresh_state is not None and isinstance(value, Tensor) and value.shape == core.shape:
            value[block] = torch.where(fresh, fresh_state.to(value.dtype), value[block])


def clear_outside(optimizer: torch.optim.Optimizer | None, core: Tensor, ranks: Sequence[int]) -> None:
    """Zero the core's per-entry state outside the block ``ranks`` (an augmentation undone)."""
    for value in _core_state(optimizer, core).values():
        if isinstance(value, Tensor) and value.shape == core.shape:
            zero_outside(value, ranks)


def transport_state(optimizer: torch.optim.Optimizer | None, core: Tensor, ranks: Sequence[int],
                    rotations: Sequence[Tensor | None]) -> None:
    """Carry the core's per-entry state on its active block ``ranks`` through C <- C x_i P_i^T, each entry by its
    rule; the entries outside the new block become 0."""
    state = _core_state(optimizer, core)
    if not state or all(p is None for p in rotations):  # nothing moves
        return
    rules = check_state(optimizer, state)
    block = tuple(slice(r) for r in ranks)
    for key, value in state.items():
        if rules[key].kind != "scalar" and isinstance(value, Tensor) and value.shape == core.shape:
            new = rotate(value[block], rotations, rules[key].kind)
            value.zero_()
            value[tuple(slice(r) for r in new.shape)] = new


def expand_state(optimizer: torch.optim.Optimizer | None, core: Tensor, ranks: Sequence[int],
                 factors: Sequence[Tensor]) -> None:
    """Carry the core's per-entry state on its block ``ranks`` to W's coordinates, s x_i U_i (``factors`` U_i of
    n_i x r_i with orthonormal columns), for a layer whose core has just become W (its state already at W's shape):
    linear entries exactly; squared and magnitude entries as the average of the core entries each W entry is made
    of, weighted by U_i * U_i (carried by the rule alone, an entry of W would keep only about r_i / n_i of the core's
    second moment, and every later Adam step would be larger)."""
    state = _core_state(optimizer, core)
    if not state:
        return
    rules = check_state(optimizer, state)
    block = tuple(slice(r) for r in ranks)
    maps = [u.T for u in factors]
    weights = rotate(core.new_ones(tuple(ranks)), maps, "squared").clamp_min(torch.finfo(core.dtype).tiny)
    for key, value in state.items():
        kind = rules[key].kind
        if kind == "scalar" or not isinstance(value, Tensor) or value.shape != core.shape:
            continue
        if kind == "linear":
            value.copy_(rotate(value[block], maps))
        elif kind == "squared":
            value.copy_(rotate(value[block], maps, "squared") / weights)
        else:  # magnitude: the same average of the squares
            value.copy_((rotate(value[block].square(), maps, "squared") / weights).sqrt())


def resize_state(optimizer: torch.optim.Optimizer | None, changed: Sequence[tuple[Tensor, torch.Size]]) -> None:
    """Follow :meth:`~lightning_lowrank.tucker.layers.TuckerLayer.resize`: every per-entry state tensor of a resized
    parameter (shape ``old``) is reallocated at the parameter's new shape, keeping its leading block (zero beyond,
    where the core is zero too); scalar state stays."""
    for param, old in changed:
        state = _core_state(optimizer, param)
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == old:
                state[key] = resized(value, param.shape)
