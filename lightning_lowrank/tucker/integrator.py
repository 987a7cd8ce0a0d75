"""One step of the rank-adaptive Tucker integrator (augmented BUG), independent of Lightning.

Around the user's optimizer step, for every Tucker layer W = C x_i U_i (arXiv 2305.19059):

1. :meth:`TuckerIntegrator.augment` (after backward): every mode's basis grows to U_hat_i = [U_i | N_i], N_i spanning
   (I - U_i U_i^T) dL/dU_i (= the span of the K-step, [K_i' | U_i]), at most 2 r_i columns. The core is zero-padded,
   so W is exactly unchanged, and its gradient becomes the Galerkin gradient dL/dW x_i U_hat_i^T, formed from the
   layer's input x and output gradient dy of the same pass (no second forward/backward).
2. The optimizer steps the core and every non-basis parameter; bases have no gradient, so it skips them.
3. :meth:`TuckerIntegrator.truncate` (after the step): per adapted mode, the SVD of the core's unfolding gives the
   tolerance rank d, the smallest whose discarded singular values have 2-norm <= tau * ||C||_F, clamped to
   [min_rank, max_rank] (non-adapted modes keep their rank); it keeps d + ceil(growth * d) directions (the growth
   rule, last paragraph) and rotates bases, core and the core's optimizer state with the kept vectors.

With ``interval`` k > 1 this happens every k-th step; the steps in between move the cores only and add their dL/dU_i
to a sum whose directions the next augmentation spans too, so the bases still see every batch. With ``core_steps``
s > 1 the core trains at the augmented ranks for s optimizer steps (the augmenting one and s - 1 more, bases held)
before step 3 judges it, so that a new direction has s steps to become significant (the schedule of the authors'
later code, s = k = 10); the paper's step is s = 1. A layer in dense storage (it holds W itself) takes the dense
layer's steps, which move every direction, and is truncated every ``dense_interval`` steps, whatever the schedule.

The growth rule (``growth``, ``patience``: which ranks a truncation keeps beyond the tolerance ranks, so that ranks
started low grow where the loss needs them) is :mod:`lightning_lowrank.tucker.growth`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_lowrank.tucker.algebra import compute_dtype, mode_dot
from lightning_lowrank.tucker.augmentation import Capture, augmented_basis, parallel_gradient
from lightning_lowrank.tucker.distributed import average_gradients, drop_absent
from lightning_lowrank.tucker.growth import GrowthMargin, clamp_rank, layer_mode
from lightning_lowrank.tucker.layers import TuckerLayer
from lightning_lowrank.tucker.optimizer_state import (
    check_state,
    clear_outside,
    decay_factor,
    resize_state,
    warm_start,
)
from lightning_lowrank.tucker.storage import release_host_memory, storage_size, zero_outside
from lightning_lowrank.tucker.truncation import rank_candidates, rotate_layer, store_dense, truncate_dense
from lightning_lowrank.validation import check_int


@dataclass(frozen=True)
class IntegratorConfig:
    """Options of the rank-adaptive integrator.

    Args:
        tau: relative truncation tolerance in [0, 1): discarded singular values of each core unfolding have 2-norm
            at most tau * ||core||_F.
        min_rank: smallest rank of an adapted mode.
        modes: ``"channels"`` adapts the output and input modes (the spatial modes keep their rank), ``"all"`` every
            mode.
        method: ``"parallel"``: the new core blocks come from the K-step values, recovered from dL/dU (blocks with
            two or more new modes start at zero); costs a few small matrix products per layer.
            ``"augmented"``: the exact Galerkin gradient on the augmented bases (the paper's step), formed from each
            layer's input and output gradient kept by forward hooks; costs about one more backward pass.
        interval: augment every ``interval`` optimizer steps; the steps in between train the cores with the bases
            held fixed (the optimizer never sees a basis gradient). 1 is the paper's method. The augmenting step's
            core gradient is the Galerkin gradient of its own batch (a summed step would overshoot under momentum).
            None (the default): chosen from the optimizer (:meth:`for_optimizer`): 1 (the paper's step) for
            SGD and ASGD, whose steps follow the gradient's size, so one step already tells a new direction's
            weight; 10 with ``core_steps`` 10 (the authors' later code) for every other optimizer (Adam-type,
            RMSprop, Adagrad, ...: steps normalized per entry, under which a new direction needs several steps to
            stand out from noise). Why, measured: README "Schedules".
        core_steps: optimizer steps the core takes at the augmented ranks before truncation, in [1, interval]
            (None, the default: ``interval``; with ``interval`` None it must be None): the augmenting step and
            ``core_steps - 1`` more with the augmented
            bases held (their basis gradients are dropped: those steps train the core only). The remaining
            ``interval - core_steps`` steps of the interval run at the truncated ranks and sum their basis gradients
            for the next augmentation. 1 truncates right after the augmenting step (the paper's schedule, and what
            ``interval=k`` meant before this option); ``interval`` truncates just before the next augmentation, so
            the layers always train at their augmented ranks and a new direction has ``interval`` steps to become
            significant.
        growth: directions kept beyond each adapted mode's tolerance rank d, ceil(growth * d) of them (within
            ``max_rank``), so that ranks started low grow where the loss needs them (module docstring); 0 is the
            paper's rule. Logged ranks, compression and the end of training use d.
        patience: optimizer steps a mode keeps its growth margin after the start or its last renewal (its tolerance rank
            grew by a whole margin above its lowest since; a mode that starts at its ``max_rank`` never keeps one),
            counted at its truncations (``interval`` steps each, ``dense_interval`` in dense storage): the margin is
            kept at truncations while the steps since < ``patience``. 0 is the paper's rule. The default, 200, is 20
            windows of 10:10 and 200 steps of 1:1 (README "What training costs": 20 steps of 1:1 left small starts of
            LeNet5 at rank 1-2).
        scale_steps: multiply each optimizer step of a core by s = sqrt(prod_i n_i / prod_i r_i) (n_i the dense
            weight's sizes, r_i the active ranks of the step; steps with s <= 1 stay): C <- C_before + s (C_after -
            C_before). An optimizer that moves every entry by about its learning rate (Adam-type) moves a core of
            few entries less, relative to its norm, than the dense weight its learning rate was tuned for; scaled,
            the step's Frobenius norm is the dense weight's. Decoupled weight decay (AdamW) is not scaled: a core
            shrinks at the dense weight's rate, C <- (1 - lr wd) C_before + s (gradient step). Default False.
        dense_storage: a layer whose factors come to store more than its dense weight (its ranks grew at a
            truncation) and that keeps no growth margin holds W itself from then on
            (:func:`~lightning_lowrank.tucker.truncation.store_dense`), until a truncation lowers its ranks so far
            that the factors pay again. False keeps every layer factorized (a layer already in dense storage still
            leaves it once its factors pay). Default True.
        dense_interval: optimizer steps between truncations of a layer in dense storage, whatever the schedule of
            the factorized layers. Its steps are the dense layer's (every direction of W moves: nothing to augment),
            and truncation projects W onto its tolerance ranks, which can wait: the eigen-decompositions of W's
            unfoldings cost about as much as the layer's step, so truncating every step (1) doubles a dense-storage
            layer's cost. Default 10 (the Adam-type schedule's window; why, measured: README "What training
            costs").
        release_memory: after a step that changed the widths a layer held in host memory computes at (and with
            them its activations' shapes and storage), hand the C heap's free pages back to the operating system in
            the next backward pass, from a gradient hook on the cores
            (:func:`~lightning_lowrank.tucker.storage.release_host_memory`: glibc's ``malloc_trim``; nothing under
            other C libraries), so that the blocks of the shapes it left do not stay in the process. Layers on an
            accelerator are left to its allocator. Default True (why, measured: README "What training costs").
    """

    tau: float = 0.1
    min_rank: int = 1
    modes: Literal["channels", "all"] = "channels"
    method: Literal["parallel", "augmented"] = "parallel"
    interval: int | None = None
    core_steps: int | None = None
    growth: float = 0.25
    patience: int = 200
    scale_steps: bool = False
    dense_storage: bool = True
    dense_interval: int = 10
    release_memory: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau < 1:
            raise ValueError(f"`tau` must be a number in [0, 1), got {self.tau!r}")
        check_int("min_rank", self.min_rank, 1)
        if self.modes not in ("channels", "all"):
            raise ValueError(f"`modes` must be 'channels' or 'all', got {self.modes!r}")
        if self.method not in ("parallel", "augmented"):
            raise ValueError(f"`method` must be 'parallel' or 'augmented', got {self.method!r}")
        if self.interval is None:
            if self.core_steps is not None:
                raise ValueError(f"`core_steps` ({self.core_steps!r}) needs an `interval` (an int >= 1): with "
                                 "`interval=None` the optimizer chooses both")
        else:
            check_int("interval", self.interval, 1)
        if isinstance(self.growth, bool) or not isinstance(self.growth, (int, float)) or not 0 <= self.growth <= 1:
            raise ValueError(f"`growth` must be a number in [0, 1], got {self.growth!r}")
        check_int("patience", self.patience, 0)
        check_int("dense_interval", self.dense_interval, 1)
        for name in ("scale_steps", "dense_storage", "release_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if self.interval is None:
            return
        if self.core_steps is None:
            object.__setattr__(self, "core_steps", self.interval)
        if isinstance(self.core_steps, bool) or not isinstance(self.core_steps, int) \
                or not 1 <= self.core_steps <= self.interval:
            raise ValueError(f"`core_steps` must be an int in [1, interval] = [1, {self.interval}], "
                             f"got {self.core_steps!r}")

    def adapts(self, mode: int) -> bool:
        return self.modes == "all" or mode < 2

    def for_optimizer(self, optimizer: torch.optim.Optimizer | None) -> IntegratorConfig:
        """This config with its schedule set: as given, or (``interval`` None) 1:1 for SGD and ASGD and 10:10 for
        every other optimizer.

        Raises:
            ValueError: ``interval`` is None and no ``optimizer`` is given.
        """
        if self.interval is not None:
            return self
        if optimizer is None:
            raise ValueError("`interval` None chooses the schedule from the optimizer: give the integrator its "
                             "optimizer, or set `interval` (1: the paper's step; 10: ten core steps per window)")
        interval = 1 if steps_follow_gradient(optimizer) else 10
        return replace(self, interval=interval)


def steps_follow_gradient(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s steps follow the gradient's size (SGD, ASGD and their subclasses), rather than being
    normalized per entry (Adam-type, RMSprop, Adagrad, ...: every entry moves by about the learning rate, signal or
    noise). It chooses the integrator's schedule (:meth:`IntegratorConfig.for_optimizer`) and TuckerCallback's
    default start."""
    return isinstance(optimizer, (torch.optim.SGD, torch.optim.ASGD))


class TuckerIntegrator:
    """The rank-adaptive integrator for Tucker layers.

    Call ``before_step(optimizer)`` after backward and, if it returns True, ``optimizer.step()``, then
    ``after_step(optimizer)``; or :meth:`step` for all three. Every ``interval`` steps they augment (:meth:`augment`),
    and ``core_steps`` optimizer steps later they truncate (:meth:`truncate`); otherwise, and for good after
    :meth:`freeze`, they only keep the optimizer off the bases. With ``method="augmented"``, forward hooks keep each
    layer's input and output gradient of the training passes before an augmenting step (one activation per layer;
    every micro-batch when gradients accumulate).

    Args:
        module: a module holding Tucker layers, or a mapping of names to the layers to integrate.
        config: the integrator's options.
        reduce: averages a tensor across data-parallel processes: the Tucker layers' gradients, which DDP does
            not hold (:mod:`lightning_lowrank.tucker.distributed`), at the start of every step, and the hand-made
            gradient of ``method="augmented"``; None: one process.
        broadcast: makes the rank decision (a 1-D integer tensor) the same on every process, for example by
            broadcasting it from the first one; None: identity.
        optimizer: the optimizer that steps the layers' cores; it chooses the schedule when ``config.interval`` is
            None (:meth:`IntegratorConfig.for_optimizer`), and must be given then.

    Raises:
        ValueError: ``module`` holds no Tucker layer; ``config.interval`` is None and no ``optimizer`` is given.
    """

    def __init__(self, module: nn.Module | Mapping[str, TuckerLayer], config: IntegratorConfig | None = None,
                 reduce: Callable[[Tensor], Tensor] | None = None,
                 broadcast: Callable[[Tensor], Tensor] | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        named = module.named_modules() if isinstance(module, nn.Module) else module.items()
        layers = {name: m for name, m in named if isinstance(m, TuckerLayer)}
        if not layers:
            raise ValueError(f"{type(module).__name__} has no Tucker layers; call lightning_lowrank.convert first")
        self.config = (config or IntegratorConfig()).for_optimizer(optimizer)
        self.reduce, self.broadcast = reduce, broadcast
        self.layers: dict[str, TuckerLayer] = {}
        self._captures: dict[str, Capture] = {}
        self._before_augmentation: dict[str, tuple[int, ...]] = {}  # layer name -> its ranks, until truncation
        self.margin = GrowthMargin(self.config)
        self._augmenting = False  # whether augment() readied the optimizer step in flight
        self._basis_grads: dict[tuple[str, int], Tensor] = {}  # dL/dU summed over the steps since the last augmentation
        self._prepared = False  # whether before_step readied the optimizer step that after_step completes
        self._cores_before: dict[str, tuple[Tensor, float, float | Tensor]] = {}  # scale_steps: core before, s, decay
        self.steps = 0  # steps of the schedule: calls of before_step, skipped ones included
        self.frozen = False
        self._host_widths: dict[str, tuple[int, ...]] = {}  # release_memory: the widths at the last step's end
        self._release_due = False  # release_memory: some widths changed since the last release
        self._release_hooks: dict[str, RemovableHandle] = {}
        self.add_layers(layers)

    def add_layers(self, layers: Mapping[str, TuckerLayer]) -> None:
        """Integrate these layers too, from the next step on; a layer integrated already is taken as new there (its
        growth margin starts again at its ranks now: a frozen layer restarted at other ranks).

        Raises:
            ValueError: ``min_rank`` exceeds the max_rank of an adapted mode.
        """
        for name, layer in layers.items():
            for mode, n in enumerate(layer.max_ranks):
                if self.config.adapts(mode) and n < self.config.min_rank:
                    raise ValueError(f"`min_rank` {self.config.min_rank} exceeds the max_rank {n} of mode {mode} "
                                     f"of Tucker layer {name!r}: lower `min_rank`, or exclude the layer")
        self.layers.update(layers)
        for name, layer in layers.items():
            self.margin.add(name, layer)
        if self.config.method == "augmented":
            self._captures.update((name, Capture(layer)) for name, layer in layers.items()
                                  if name not in self._captures)
        if self.config.release_memory:
            self._host_widths = self._widths_in_host_memory()
            self._release_hooks.update((name, layer.core.register_hook(self._release_in_backward))
                                       for name, layer in layers.items()
                                       if name not in self._release_hooks and layer.core.requires_grad)
        self._arm()

    @property
    def due(self) -> bool:
        """Whether the next optimizer step augments."""
        return not self.frozen and self.steps % self.config.interval == 0

    @property
    def truncation_due(self) -> bool:
        """Whether the next optimizer step ends with truncation (its ``core_steps``-th at the augmented ranks)."""
        return self.steps % self.config.interval == self.config.core_steps - 1

    @property
    def dense_truncation_due(self) -> bool:
        """Whether the next optimizer step ends with the truncation of the layers in dense storage (every
        ``dense_interval``-th step)."""
        return self.steps % self.config.dense_interval == self.config.dense_interval - 1

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """The tolerance ranks the last truncation decided, by layer name (without the growth margin; a layer still
        training at its augmented ranks shows the ranks before its augmentation)."""
        return {name: self.margin.decided.get(name, self._before_augmentation.get(name, layer.ranks))
                for name, layer in self.layers.items()}

    @property
    def unfinished(self) -> dict[str, tuple[int, ...]]:
        """The layers that ``truncate(final=True)`` truncates, by name, with their ranks before augmentation: those
        at their augmented ranks and those keeping a growth margin."""
        # dict order: the same on every process
        return {name: self._before_augmentation.get(name, self.layers[name].ranks)
                for name in {**self._before_augmentation, **self.margin.decided}}

    def freeze(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fix ranks and bases from now on (truncating the layers to their tolerance ranks first, rotating
        ``optimizer``'s state; a layer in dense storage is factorized at its ranks, whatever it stores then); later
        steps train the cores (and every non-basis parameter) only."""
        self.truncate(optimizer, final=True)
        for layer in self.layers.values():
            if layer.dense_storage:  # W is at its ranks: its leading singular vectors span it (in the compute dtype)
                vectors, _ = rank_candidates(layer, layer.ranks, self.config.tau, self.config.adapts)
                truncate_dense(layer, [p[:, :r] for p, r in zip(vectors, layer.ranks)], optimizer, factorize=True)
        self.frozen = True
        self._arm()
        self._basis_grads.clear()
        self.clear()

    def state_dict(self) -> dict[str, object]:
        """Step count, whether frozen, the basis gradients summed since the last augmentation, the ranks before
        augmentation of the layers awaiting truncation, the tolerance ranks of those keeping a growth margin and
        each mode's lowest tolerance rank and optimizer steps since its margin was last renewed."""
        return {"steps": self.steps, "frozen": self.frozen,
                "basis_grads": {f"{name}:{mode}": grad for (name, mode), grad in self._basis_grads.items()},
                "augmented": {name: list(ranks) for name, ranks in self._before_augmentation.items()},
                **self.margin.state_dict()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.steps = int(state["steps"])
        self._before_augmentation = {name: tuple(ranks) for name, ranks in state.get("augmented", {}).items()}
        self.margin.load_state_dict(state)
        self._basis_grads.clear()
        for key, grad in state.get("basis_grads", {}).items():
            name, mode = layer_mode(key)
            u = self.layers[name].factors[mode]
            self._basis_grads[name, mode] = grad.to(u.device, u.dtype)
        if state["frozen"]:
            self.freeze()
        self._arm()

    def before_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Augment if due, else take the bases off the optimizer; False if a gradient of the step is not finite.

        The finiteness check covers every gradient the optimizer is about to apply (its parameters, and the Tucker
        layers'); on failure all of them are dropped, so ``optimizer.step()`` changes nothing. A layer whose core has
        no gradient (frozen with ``requires_grad=False``, or unused by the loss) keeps its ranks, bases and core.

        Every call is one step of the schedule (:attr:`steps`, so under the callback with one optimizer it equals
        Lightning's ``global_step``), whether the optimizer applies it or not. A step skipped here (non-finite
        gradients: also how AMP's skipped steps arrive, unscaled, under Lightning) changes nothing and ends as any
        step does (a truncation due at it happens). A step whose :meth:`after_step` never came (an optimizer that
        skipped it although its gradients were finite) is ended at the next call: its augmentation undone, counted,
        its window closed by the next augmentation.
        """
        self._cores_before.clear()  # kept for a step whose after_step never came
        if self._prepared:  # the last step's after_step never came
            if self._augmenting:
                self._undo_augmentation(optimizer)
            self._end_step(optimizer, truncate=False)  # the gradients of this call are not those of a truncated core
        self._prepared = False
        present = None if self.reduce is None else average_gradients(self.layers.values(), self.reduce)
        parameters = [p for layer in self.layers.values() for p in layer.parameters()]
        if optimizer is not None:
            parameters += [p for group in optimizer.param_groups for p in group["params"]]
        finite, present = gradients_finite(parameters, present)  # one host sync for both
        if present:
            drop_absent(self.layers.values(), present)
        if not finite:
            for p in parameters:
                p.grad = None
            self.clear()
            self._end_step(optimizer)
            return False
        self._prepared = True
        if self.due:
            self.truncate(optimizer, dense=False)  # a window left open (resumed with other options) closes first
            self.augment(optimizer)
        else:
            for name, layer in self.layers.items():
                if layer.dense_storage and layer.core.grad is not None and not self.frozen:
                    self._before_augmentation.setdefault(name, layer.ranks)  # the step moves W off its ranks
                summed = layer.core.grad is not None and not self.frozen and name not in self._before_augmentation
                for mode, u in enumerate(layer.factors):
                    if u.grad is not None and summed:
                        self._accumulate(name, mode, u.grad[:, : layer.ranks[mode]])
                    u.grad = None
                _mask_outside_block(layer)
        if self.config.scale_steps:
            self._keep_cores(optimizer)
        return True

    def _keep_cores(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Keep the active core of every layer whose step :meth:`after_step` scales (s > 1, a gradient), with s and
        the factor ``optimizer``'s decoupled weight decay applies to it (1 - lr * weight_decay; 1 without)."""
        for name, layer in self.layers.items():
            scale = math.sqrt(math.prod(layer.shape) / layer.active_core().numel())
            if layer.core.grad is not None and scale > 1:
                self._cores_before[name] = (layer.active_core().detach().clone(), scale,
                                            decay_factor(optimizer, layer.core))

    @torch.no_grad()
    def _scale_steps(self) -> None:
        """Scale the gradient step of every core kept by :meth:`_keep_cores`, not its decoupled weight decay d:
        C = d C_before + D (D the gradient step) becomes d C_before + s D = s C + (1 - s) d C_before, so that decay
        shrinks a core at the dense weight's rate whatever its size."""
        for name, (before, scale, decay) in self._cores_before.items():
            self.layers[name].active_core().mul_(scale).add_(before.mul_((1 - scale) * decay))
        self._cores_before.clear()

    @torch.no_grad()
    def _undo_augmentation(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Back to the ranks before :meth:`augment`, whose optimizer step never came: the new core entries are still
        0, so W is unchanged, and the first r columns of each basis are the old basis (as the gradients of the
        current backward pass see it); the optimizer state warm-started for the new entries is cleared."""
        for name, old in self._before_augmentation.items():
            if not self.layers[name].dense_storage:  # else nothing was augmented
                self.layers[name].set_ranks(old)
                clear_outside(optimizer, self.layers[name].core, old)
        self._before_augmentation.clear()
        self._augmenting = False

    def _accumulate(self, name: str, mode: int, grad: Tensor) -> None:
        """Add a basis gradient dL/dU (n x r, the active columns) to the sum the next augmentation uses."""
        key = (name, mode)
        if key in self._basis_grads:
            self._basis_grads[key].add_(grad)
        else:
            self._basis_grads[key] = grad.clone()

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Truncate what :meth:`augment` grew and count the step; nothing for an optimizer step that
        :meth:`before_step` did not prepare (a skipped one, counted there, or a step taken around the integrator)."""
        if not self._prepared:
            return
        self._prepared = self._augmenting = False
        self._scale_steps()
        self._end_step(optimizer)

    def _end_step(self, optimizer: torch.optim.Optimizer | None, truncate: bool = True) -> None:
        """Truncate if due, count the step, and arm the captures for the next one."""
        if truncate and (self.truncation_due or self.dense_truncation_due):
            self.truncate(optimizer, factorized=self.truncation_due, dense=self.dense_truncation_due)
        if self.config.release_memory:
            widths = self._widths_in_host_memory()
            self._release_due |= widths != self._host_widths
            self._host_widths = widths
        self.steps += 1
        self._arm()

    def _release_in_backward(self, grad: Tensor) -> None:
        """A core's gradient hook: the first backward after a step that changed some widths hands the C heap's free
        pages back. In backward the pass's activations are still in use, so what is free then is mostly the blocks
        of the widths left; after the step every activation is free too, and the next step would fault all of them
        in again (VGG-style net: 92k page faults per release against 25k here)."""
        if self._release_due:
            self._release_due = False
            release_host_memory()

    def _widths_in_host_memory(self) -> dict[str, tuple[int, ...]]:
        """Per layer held in host memory, the widths its forward computes at
        (:meth:`~lightning_lowrank.tucker.layers.TuckerLayer.forward_ranks`; none in dense storage). Its activations'
        shapes follow them, and so does its storage (twice the width on the same ladder, both capped by the mode's
        size)."""
        return {name: () if layer.dense_storage else layer.forward_ranks()
                for name, layer in self.layers.items() if layer.core.device.type == "cpu"}

    def _arm(self) -> None:
        """Ready the layers for the next step: its backward computes the basis gradients only where they are used
        (the next step augments, or sums them for the next augmentation: the window is closed); the captures of
        ``method="augmented"`` only before an augmenting step."""
        for name, layer in self.layers.items():
            layer.hold_bases = self.frozen or (name in self._before_augmentation and not self.due)
        for name, capture in self._captures.items():
            capture.active = self.due and not self.layers[name].dense_storage

    def remove(self) -> None:
        """Remove the hooks (the captures' forward hooks, the cores' release hooks); the layers compute their basis
        gradients again."""
        for handle in (*(capture.handle for capture in self._captures.values()), *self._release_hooks.values()):
            handle.remove()
        self._captures.clear()
        self._release_hooks.clear()
        for layer in self.layers.values():
            layer.hold_bases = False

    @torch.no_grad()
    def augment(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Augment every layer's bases and set the core's gradient to the Galerkin gradient on the augmented bases.

        Args:
            optimizer: the optimizer of the cores; Adam-type state of the new core entries is warm-started.
        """
        for name, layer in self.layers.items():
            if layer.core.grad is None:  # no gradient reached the core: the layer stays as it is
                for u in layer.factors:
                    u.grad = None
                continue
            if optimizer is not None:  # unknown optimizer state is refused before anything changes
                check_state(optimizer, optimizer.state.get(layer.core, {}))
            if layer.dense_storage:  # the dense gradient moves W in every direction: nothing to augment
                self._before_augmentation[name] = layer.ranks
                continue
            old = layer.ranks
            earlier = [self._basis_grads.get((name, mode)) for mode in range(len(old))]
            bases, r_factors, significant = zip(*(augmented_basis(layer, mode, grad, self.config.adapts(mode))
                                                  for mode, grad in enumerate(earlier)))
            new = tuple(u.shape[1] for u in bases)
            core = layer.active_core().to(compute_dtype(layer.core.dtype))
            if name in self._captures:
                pairs = list(self._captures[name].complete())
                grad = sum(layer.galerkin_gradient(bases, x, dy) for x, dy in pairs) if pairs else None
                if grad is not None and self.reduce is not None:
                    grad = self.reduce(grad)
            else:
                grad = parallel_gradient(layer, core, bases, old)
            for mode, r_factor in enumerate(r_factors):
                if r_factor is not None:
                    core = mode_dot(core, r_factor, mode)
            block = tuple(slice(r) for r in new)
            fit_storage(layer, optimizer)  # room for the augmented bases (already there, unless ranks were set)
            layer.core[tuple(slice(r) for r in old)] = core.to(layer.core.dtype)
            layer.set_ranks(new)  # the new entries of the core are 0: W is unchanged
            for u, basis, r_factor in zip(layer.factors, bases, r_factors):
                if r_factor is not None:
                    u[:, : basis.shape[1]] = basis
                u.grad = None  # the optimizer skips bases: no momentum, no weight decay
            layer.core.grad.zero_()
            if grad is not None:
                for mode, mask in enumerate(significant):
                    if mask.numel() == 0:  # no new directions in this mode
                        continue
                    keep = torch.cat([mask.new_ones(old[mode]), mask]).to(grad.dtype)
                    grad = grad * keep.reshape(-1, *(1,) * (grad.ndim - mode - 1))
                layer.core.grad[block] = grad.to(layer.core.dtype)
                warm_start(optimizer, layer.core, old, new)
            self._before_augmentation[name] = old
        self._augmenting = True
        self._basis_grads.clear()
        self.clear()

    @torch.no_grad()
    def truncate(self, optimizer: torch.optim.Optimizer | None = None, final: bool = False, *,
                 factorized: bool = True, dense: bool = True) -> None:
        """Truncate every layer awaiting truncation by HOSVD of its core with tolerance tau (plus the growth margin)
        and rotate the optimizer state (nothing if none awaits).

        ``final``: the end of training (call it then): every layer in :attr:`unfinished` is truncated to its
        tolerance ranks, without a growth margin. Otherwise ``factorized`` and ``dense`` choose which of the awaiting
        layers are truncated: those storing factors (at the end of a window) and those in dense storage (every
        ``dense_interval`` steps).

        The ranks of all layers are decided together: one host sync, and one ``broadcast`` across processes. Each
        core is scaled by its largest entry first, so any finite core works (its Gram matrices cannot overflow).

        Raises:
            FloatingPointError: the optimizer step made a core non-finite (nothing is rotated).
        """
        plans = []  # per layer: name, ranks before augmentation, singular vectors per mode (None: keep the mode
        # as it is), rank candidates
        awaiting = self.unfinished if final else {
            name: ranks for name, ranks in self._before_augmentation.items()
            if (dense if self.layers[name].dense_storage else factorized)}
        for name, old_ranks in awaiting.items():
            plans.append((name, old_ranks, *rank_candidates(self.layers[name], old_ranks, self.config.tau,
                                                            self.config.adapts)))
        if not plans:
            return
        decided = torch.stack([c for *_, candidates in plans for c in candidates])
        if self.broadcast is not None:
            decided = self.broadcast(decided)
        decided = iter(decided.tolist())
        rotations = []
        for name, old_ranks, vectors, _ in plans:
            layer = self.layers[name]
            if not next(decided):
                raise FloatingPointError(f"the optimizer step made the core of Tucker layer {name!r} non-finite; its "
                                         "ranks cannot be decided (lower the learning rate, or clip gradients)")
            tolerance = [clamp_rank(next(decided), size, layer.max_ranks[mode], self.config.min_rank)
                         if self.config.adapts(mode) else next(decided)
                         for mode, size in enumerate(layer.spanned_ranks)]
            cadence = self.config.dense_interval if layer.dense_storage else self.config.interval
            keep = self.margin.keep(name, layer, old_ranks, tolerance, final, cadence)
            rotations.append((name, layer, [p if p is None else p[:, :r] for p, r in zip(vectors, keep)]))
        for name, layer, rotation in rotations:
            rotate_layer(layer, rotation, optimizer)
            fit_storage(layer, optimizer)
            if (self.config.dense_storage and not self.margin.keeps(name)
                    and sum(p.numel() for p in (*layer.factors, layer.core)) > math.prod(layer.shape)):
                store_dense(layer, optimizer)  # its factors came to store more than W
        for name, *_ in rotations:
            self._before_augmentation.pop(name, None)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """before_step, ``optimizer.step()``, after_step; False (nothing changed) on non-finite gradients."""
        if not self.before_step(optimizer):
            return False
        optimizer.step()
        self.after_step(optimizer)
        return True

    def clear(self) -> None:
        """Forget the captured inputs and output gradients."""
        for capture in self._captures.values():
            capture.pairs.clear()


def fit_storage(layer: TuckerLayer, optimizer: torch.optim.Optimizer | None) -> None:
    """Reallocate the layer's storage for its active ranks (:func:`~lightning_lowrank.tucker.storage.storage_size`: room
    for the next augmentation, changed only when the ranks moved far enough) and the optimizer's state with it."""
    if layer.dense_storage:  # W stored whole until its factors pay (truncation.truncate_dense)
        return
    storage = tuple(storage_size(n, r, s) for n, r, s in zip(layer.shape, layer.ranks, layer.storage))
    if storage != layer.storage:
        resize_state(optimizer, layer.resize(storage))


def gradients_finite(parameters: Sequence[Tensor], fetch: Tensor | None = None) -> tuple[bool, list[float]]:
    """Whether every gradient of ``parameters`` is finite, and the values of ``fetch`` (a 1-D tensor on the same
    device), read in one host sync.

    Checked on the sums of the gradients (accumulated in float32 at least): a NaN or inf entry makes its sum
    non-finite, and one reduction per gradient reads memory once, where ``isfinite`` writes a mask of its size. A
    huge finite gradient can overflow the float32 sum: it is then reported as non-finite too (its step is skipped).
    """
    sums = [p.grad.sum(dtype=torch.promote_types(p.grad.dtype, torch.float32))
            for p in {id(p): p for p in parameters}.values() if p.grad is not None]
    if not sums:
        return True, [] if fetch is None else fetch.tolist()
    finite = torch.isfinite(torch.stack(sums)).all().reshape(1)
    values = finite if fetch is None else torch.cat([finite.to(fetch.dtype), fetch.to(finite.device)])
    first, *rest = values.tolist()
    return bool(first), rest


def _mask_outside_block(layer: TuckerLayer) -> None:
    """Zero the core's gradient outside the active block (a compiled forward computes at the storage ranks)."""
    if layer.core.grad is not None and not layer.dense_storage:
        zero_outside(layer.core.grad, layer.ranks)
