"""The Tucker method's Lightning glue: convert at setup, run the integrator around every optimizer step, log ranks,
checkpoint the exact factorization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.strategies import (
    DDPStrategy,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_lowrank.lightning.base import (
    AVERAGING,
    LowRankCallback,
    averaged_models,
    check_checkpoint_callbacks,
    check_conversion_reaches_main_process,
    check_strategy,
)
from lightning_lowrank.lightning.checkpoint import CHECKPOINT_KEY
from lightning_lowrank.tucker.conversion import RankSpec, TuckerConfig, convert, restart
from lightning_lowrank.tucker.distributed import broadcast_layers, keep_out_of_ddp
from lightning_lowrank.tucker.growth import starts_with_margin
from lightning_lowrank.tucker.integrator import (
    IntegratorConfig,
    TuckerIntegrator,
    gradients_finite,
    steps_follow_gradient,
)
from lightning_lowrank.tucker.layers import TuckerLayer
from lightning_lowrank.tucker.optimizer_state import resize_state, state_rules
from lightning_lowrank.tucker.storage import factors_pay
from lightning_lowrank.tucker.summary import summary


class TuckerCallback(LowRankCallback):
    """Train a LightningModule's Conv/Linear layers in Tucker form with the rank-adaptive integrator.

    At ``setup`` (fit, validate, test, predict; idempotent) the selected layers become Tucker layers, so the strategy
    wraps and the optimizer sees the factorized model. Around every real optimizer step the integrator augments the
    bases, lets the optimizer step the cores, and truncates with tolerance ``tau``. Logged through
    ``pl_module.log``: ``lowrank/compression_rate`` (progress bar), ``lowrank/params`` and
    ``lowrank/<layer>/rank_<mode>`` for every adapted mode, at every logging step and at epoch end.

    A module that builds its layers in ``configure_model`` calls :func:`lightning_lowrank.convert` there; the callback
    then finds them converted. Place it before StochasticWeightAveraging/WeightAveraging (they copy the model at their
    own setup), and freeze the ranks before averaging starts.

    Args:
        tau: relative truncation tolerance in [0, 1).
        rank, max_rank, kernel_rank, include, exclude, min_size, keep_first_last, init, layer_types: which layers
            are converted and at which initial and maximum ranks (:class:`~lightning_lowrank.TuckerConfig`).
            ``rank=None`` (the default) chooses the start from the optimizer at fit start: where its steps follow
            the gradient's size (SGD, ASGD), every channel mode starts at a quarter of its size (at most
            ``max_rank``), the largest layers lower until the layers starting together store at most a quarter of
            their dense weights (:func:`~lightning_lowrank.tucker.conversion.start_ranks`), with the core scaled to
            the dense weight's norm (``init="hosvd_scaled"``), so the run stays below the dense run's memory and
            step time from the first step and the ranks grow where the loss needs them; under every other
            optimizer (Adam-type, whose per-entry steps neither trained such a start nor grew its ranks) at full
            rank. A layer whose factors would store more than its dense weight at its start (every full-rank start)
            holds the weight itself (dense storage, with ``dense_storage``): the dense layer's memory and time until
            truncation lowers its ranks so far that the factors pay. Until fit starts, and in runs without fit, the
            converted layers are at full rank (exact). Why, measured: README "What training costs". Weights to keep
            as they are (pretrained): ``rank="full"`` (exact; the first truncations choose the ranks) or
            ``init="hosvd"`` (the best approximation at the start's ranks).
        min_rank, modes, method, interval, core_steps, growth, patience, scale_steps, dense_storage,
            dense_interval, release_memory: the integrator's options (:class:`~lightning_lowrank.IntegratorConfig`).
            Layers still at their augmented ranks or keeping a growth margin when training ends are truncated to
            their tolerance ranks then; logged ranks and compression are the tolerance ranks the last truncation
            decided.
        freeze_after_steps, freeze_after_epochs: from this optimizer step or epoch on, ranks and bases stay fixed
            and only the cores (and the other parameters) train.
    """

    def __init__(
        self,
        tau: float = 0.1,
        rank: RankSpec | None = None,
        max_rank: RankSpec = "full",
        min_rank: int = 1,
        kernel_rank: RankSpec = "full",
        modes: Literal["channels", "all"] = "channels",
        method: Literal["parallel", "augmented"] = "parallel",
        interval: int | None = None,
        core_steps: int | None = None,
        growth: float = 0.25,
        patience: int = 200,
        scale_steps: bool = False,
        dense_storage: bool = True,
        dense_interval: int = 10,
        release_memory: bool = True,
        freeze_after_steps: int | None = None,
        freeze_after_epochs: int | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        min_size: int = 0,
        keep_first_last: bool = False,
        init: Literal["hosvd", "hosvd_scaled", "random"] = "hosvd_scaled",
        layer_types: Sequence[type[nn.Module]] | None = None,
    ) -> None:
        conversion = {} if layer_types is None else {"layer_types": layer_types}
        self.conversion = TuckerConfig(rank=rank, max_rank=max_rank, kernel_rank=kernel_rank, include=include,
                                       exclude=exclude, min_size=min_size, keep_first_last=keep_first_last,
                                       init=init, **conversion)
        self.integration = IntegratorConfig(tau=tau, min_rank=min_rank, modes=modes, method=method, interval=interval,
                                           core_steps=core_steps, growth=growth, patience=patience,
                                           scale_steps=scale_steps, dense_storage=dense_storage,
                                           dense_interval=dense_interval, release_memory=release_memory)
        if isinstance(max_rank, int) and not isinstance(max_rank, bool) and min_rank > max_rank:
            raise ValueError(f"`min_rank` ({min_rank}) must not exceed `max_rank` ({max_rank})")
        for name, value in (("freeze_after_steps", freeze_after_steps), ("freeze_after_epochs", freeze_after_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"`{name}` must be None or an int >= 0, got {value!r}")
        self.freeze_after_steps, self.freeze_after_epochs = freeze_after_steps, freeze_after_epochs
        self.integrators: dict[torch.optim.Optimizer, TuckerIntegrator] = {}
        self.skipped_steps = 0  # optimizer steps skipped because of non-finite gradients
        self._handles: list[RemovableHandle] = []
        self._loaded_state: dict[str, Any] | None = None
        self._layers: dict[str, TuckerLayer] = {}
        self._membership: dict[torch.optim.Optimizer, int] = {}  # parameters per optimizer at the last look
        self._out_of_ddp: set[str] = set()  # Tucker layers kept out of DDP at setup
        self._unstarted: set[str] = set()  # layers converted at full rank whose start (`rank=None`) the optimizer picks
        self._started: set[str] = set()  # layers started when an optimizer first trained them (at fit start or later)
        self._frozen: set[str] = set()  # layers in an optimizer, not started: frozen (`requires_grad=False`) until now

    @property
    @override
    def state_key(self) -> str:
        """``"TuckerCallback"``, whatever the options: a run may resume with other options (the integrator closes a
        window its new schedule does not have), and a Trainer holds one (Lightning refuses a second with the same
        key when the Trainer is built: two would both integrate every Tucker layer their optimizers step)."""
        return type(self).__qualname__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(self, trainer.strategy)
        check_checkpoint_callbacks(trainer)
        index = trainer.callbacks.index(self)
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, AVERAGING)]
        if any(isinstance(c, AVERAGING) for c in trainer.callbacks[:index]):
            raise ValueError(f"TuckerCallback must come before {averaging[0]} in `Trainer(callbacks=...)`: that "
                             "callback copies the model at its setup, before the layers are converted")
        if averaging and stage == "fit" and self.freeze_after_steps is None and self.freeze_after_epochs is None:
            raise ValueError(f"{averaging[0]} averages the parameters, which needs fixed ranks and bases: set "
                             "TuckerCallback's `freeze_after_epochs` (or `freeze_after_steps`) to a point at or "
                             "before averaging starts")
        if any(type(m) in self.conversion.layer_types or isinstance(m, TuckerLayer) for m in pl_module.modules()):
            chosen_later = self.conversion.rank is None  # full rank until fit start
            report = convert(pl_module, replace(self.conversion, rank="full") if chosen_later else self.conversion)
            if chosen_later:
                self._unstarted.update(report.names)
            if report.converted and stage == "fit":
                check_conversion_reaches_main_process(trainer.strategy, "lightning_lowrank.convert")
            if report.converted:
                totals = summary(pl_module)
                rank_zero_info(f"TuckerCallback: {report}\nTuckerCallback: the converted layers store "
                               f"{totals.stored_params:,} parameters (factors and core at their storage, room for "
                               f"the next augmentation: what Lightning's model summary counts) for "
                               f"{totals.factorized_params:,} effective ones at the active ranks "
                               f"({totals.dense_params:,} dense); compression {totals.compression_rate:.1%}"
                               + (" (full rank until fit starts: the optimizer then chooses the start)"
                                  if chosen_later else ""))
        # else the module builds its layers in `configure_model` and converts them there (checked at fit start)
        if isinstance(trainer.strategy, DDPStrategy):  # before the strategy wraps the module
            keep_out_of_ddp(pl_module)
            self._out_of_ddp = {name for name, m in pl_module.named_modules() if isinstance(m, TuckerLayer)}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = {name: m for name, m in pl_module.named_modules() if isinstance(m, TuckerLayer)}
        if not layers:
            raise ValueError(f"{type(pl_module).__name__} has no Tucker layers at fit start: if it builds its layers "
                             "in `configure_model`, call `lightning_lowrank.convert` there")
        # resumed: the checkpoint holds the ranks and storage of the layers started before it (all, if it predates
        # the record)
        self._started = set() if self._loaded_state is None else set(self._loaded_state.get("started", layers))
        self._start(trainer, layers)
        if isinstance(trainer.strategy, DDPStrategy):
            wrapped = sorted(set(layers) - self._out_of_ddp)
            if wrapped:
                raise ValueError(f"Tucker layers {wrapped} were converted after TuckerCallback's setup (in "
                                 "`configure_model`?), so DDP holds their parameters, whose shapes change as the "
                                 "storage follows the rank: under DDP convert in the module's __init__ or setup, "
                                 "or let the callback convert")
            if trainer.world_size > 1:
                broadcast_layers(layers, lambda tensor: trainer.strategy.broadcast(tensor, src=0))
        self.integrators, self._layers, self._membership = {}, layers, {}
        for optimizer in trainer.optimizers:
            self._join(trainer, optimizer)
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        idle = sorted(set(layers) - {name for i in self.integrators.values() for name in i.layers})
        if idle:
            rank_zero_info(f"TuckerCallback: no optimizer steps {idle} yet; they stay as they are until one does")
        if self._loaded_state is not None:
            states = self._loaded_state["integrators"]
            if len(states) != len(self.integrators):
                raise ValueError(f"the checkpoint holds the integrator state of {len(states)} optimizer(s) with "
                                 f"Tucker layers, this run has {len(self.integrators)}: resume with the same "
                                 "optimizers")
            for integrator, state in zip(self.integrators.values(), states, strict=True):
                integrator.load_state_dict(state)
            self.skipped_steps = self._loaded_state["skipped_steps"]
            self._loaded_state = None

    def _start(self, trainer: pl.Trainer, layers: dict[str, TuckerLayer]) -> None:
        """Start the layers an optimizer trains now that have not started (at fit start, and when a frozen layer starts
        to train: a finetuning callback adds it to an optimizer, or sets its ``requires_grad``; a resumed run's
        checkpoint holds the ranks and storage of those started before it): those converted at full rank for
        ``rank=None`` below it (:func:`~lightning_lowrank.tucker.conversion.restart`) where the optimizer follows the
        gradient's size; then every one whose factors would store more than its dense weight and that keeps no growth
        margin (a full-rank start) holds the weight itself (:meth:`~lightning_lowrank.TuckerLayer.to_dense_storage`)
        until its ranks fall far enough for the factors to pay. Layers no optimizer trains stay as they are, and so
        do layers that start after their optimizer's freeze (fixed ranks and bases; averaging callbacks hold copies
        at that storage)."""
        members = {name: optimizer for optimizer, group in _layers_by_optimizer(layers, trainer.optimizers).items()
                   for name in group if name not in self._started}
        trained = {name: optimizer for name, optimizer in members.items() if layers[name].core.requires_grad}
        self._frozen = set(members) - set(trained)
        self._started.update(trained)
        # after the freeze a layer keeps its storage: ranks and bases are fixed, and averaged copies hold that storage
        fixed = {optimizer for optimizer, integrator in self.integrators.items() if integrator.frozen}
        trained = {name: optimizer for name, optimizer in trained.items() if optimizer not in fixed}
        unstarted = self._unstarted & set(trained)
        self._unstarted -= unstarted
        moved = {name: type(optimizer).__name__ for name, optimizer in trained.items()
                 if name in unstarted and steps_follow_gradient(optimizer)}
        starts = self.conversion.start({name: layers[name].shape for name in moved})
        for name in moved:
            restart(layers[name], starts[name], self.conversion.init)
            integrator = self.integrators.get(trained[name])
            if integrator is not None and name in integrator.layers:  # unfrozen in place: its margin starts now
                integrator.add_layers({name: layers[name]})
        dense = [name for name in trained if self.integration.dense_storage
                 and not factors_pay(layers[name].shape, layers[name].ranks)
                 and not starts_with_margin(layers[name], self.integration)]
        for name in dense:
            resize_state(trained[name], layers[name].to_dense_storage())
        if moved:
            rank_zero_info(f"TuckerCallback: {sorted(set(moved.values()))} steps follow the gradient's size: "
                           f"{len(moved)} layer(s) start below full rank")
        if unstarted - set(moved):
            rank_zero_info(f"TuckerCallback: {len(unstarted - set(moved))} layer(s) start at full rank: their "
                           "optimizer normalizes its steps per entry, under which a start below full rank did not "
                           "train (README \"What training costs\"); set `rank` to start them lower")
        if dense:
            rank_zero_info(f"TuckerCallback: {len(dense)} layer(s) would store more as factors than as a dense weight "
                           "at their start's ranks: they hold the weight itself (dense storage: the dense layer's "
                           "memory and time) until truncation lowers their ranks so far that the factors pay")
        if moved or dense:
            rank_zero_info(f"TuckerCallback: the converted layers store "
                           f"{summary(trainer.lightning_module).stored_params:,} parameters")

    def _join(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer``'s integrator the Tucker layers whose cores it steps now (a finetuning callback may add
        a frozen backbone's parameters later); refuse an optimizer whose state cannot follow a rank change."""
        self._membership[optimizer] = _parameter_count(optimizer)
        members = _layers_by_optimizer(self._layers, trainer.optimizers).get(optimizer, {})
        integrator = self.integrators.get(optimizer)
        new = {name: layer for name, layer in members.items() if integrator is None or name not in integrator.layers}
        if not new:
            return
        state_rules(optimizer)
        if integrator is not None:
            integrator.add_layers(new)
            return
        reduce = broadcast = None
        if trainer.world_size > 1:
            def reduce(tensor: Tensor) -> Tensor:
                return trainer.strategy.reduce(tensor, reduce_op="mean")

            def broadcast(tensor: Tensor) -> Tensor:
                return trainer.strategy.broadcast(tensor, src=0)

        self.integrators[optimizer] = TuckerIntegrator(new, self.integration, reduce, broadcast, optimizer=optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        integrator = self.integrators.get(optimizer)
        if integrator is not None:
            integrator.after_step(optimizer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_if_due(trainer)  # before an averaging callback (placed after this one) takes its epoch's copy

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        joined = [optimizer for optimizer in trainer.optimizers
                  if optimizer in self._membership and self._membership[optimizer] != _parameter_count(optimizer)]
        if joined or any(self._layers[name].core.requires_grad for name in self._frozen):
            self._start(trainer, self._layers)  # before the forward: a layer may change its storage at its start
            for optimizer in joined:
                self._join(trainer, optimizer)
        self._freeze_if_due(trainer)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _freeze_if_due(self, trainer: pl.Trainer) -> None:
        if (self.freeze_after_steps is not None and trainer.global_step >= self.freeze_after_steps
                or self.freeze_after_epochs is not None and trainer.current_epoch >= self.freeze_after_epochs):
            due = [(optimizer, integrator) for optimizer, integrator in self.integrators.items()
                   if not integrator.frozen]
            for optimizer, integrator in due:
                integrator.freeze(optimizer)
            if due:
                self._match_averaged_models(trainer, trainer.lightning_module)

    def _match_averaged_models(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the model into the averaging callbacks' copies (made at their setup, at the storage of the start), so
        that they hold parameters of the trained layers' shapes: nothing has been averaged into them before the
        freeze (refused), SWA's and WeightAveraging's first update copy the model anyway, and WeightAveraging swaps
        its copy in for every validation, also before averaging starts (it then validates the current model)."""
        for copy in averaged_models(trainer):
            copy.load_state_dict(pl_module.state_dict())

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not all(integrator.frozen for integrator in self.integrators.values()):
            self._match_averaged_models(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._membership.get(optimizer) != _parameter_count(optimizer):
            self._join(trainer, optimizer)
        integrator = self.integrators.get(optimizer)
        if integrator is not None:
            if integrator.before_step(optimizer):
                return
        else:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            if gradients_finite(parameters)[0]:
                return
            for p in parameters:  # the whole step becomes a no-op: nothing is lost
                p.grad = None
        self.skipped_steps += 1
        rank_zero_warn(f"TuckerCallback: non-finite gradient at global step {trainer.global_step}; the optimizer "
                       f"step is skipped ({self.skipped_steps} so far)")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._check_averaging(trainer, step_idx=trainer.global_step - 1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_averaging(trainer, epoch_idx=trainer.current_epoch)
        super().on_train_epoch_end(trainer, pl_module)

    def _check_averaging(self, trainer: pl.Trainer, step_idx: int | None = None, epoch_idx: int | None = None) -> None:
        """Refuse to let an averaging callback (after this one) average factors whose ranks and bases still move."""
        if all(integrator.frozen for integrator in self.integrators.values()):
            return
        for callback in trainer.callbacks:
            if isinstance(callback, StochasticWeightAveraging):
                averaging = callback.swa_start <= trainer.current_epoch
            elif isinstance(callback, AVERAGING):
                averaging = callback.should_update(step_idx=step_idx, epoch_idx=epoch_idx)
            else:
                continue
            if averaging:
                raise RuntimeError(f"{type(callback).__name__} is about to average the parameters while the ranks "
                                   "and bases still change (averaged factors are not orthonormal): set "
                                   "TuckerCallback's `freeze_after_epochs`/`freeze_after_steps` to a point at or "
                                   "before averaging starts")

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compression, parameters and the rank of every adapted mode, at the ranks the last truncation decided
        (Python numbers: no device sync)."""
        decided = {name: ranks for integrator in self.integrators.values() for name, ranks in integrator.ranks.items()}
        report = summary(pl_module, decided)
        metrics = {"compression_rate": report.compression_rate, "params": float(report.params),
                   "stored_params": float(report.stored)}
        for integrator in self.integrators.values():
            for name, layer in integrator.layers.items():
                for mode, (mode_name, rank) in enumerate(zip(layer.mode_names, decided[name])):
                    if self.integration.adapts(mode):
                        metrics[f"{name}/rank_{mode_name}"] = float(rank)
        return metrics

    @override
    def initial_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """:meth:`metrics` and the maximum rank of every adapted mode (``<layer>/max_rank_<mode>``)."""
        return self.metrics(pl_module) | {
            f"{name}/max_rank_{mode_name}": float(layer.max_ranks[mode])
            for name, layer in self._layers.items() for mode, mode_name in enumerate(layer.mode_names)
            if self.integration.adapts(mode)}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Also record the layers at their augmented ranks (inside a ``core_steps`` window) or keeping a growth
        margin, and the integrator's options, so that :func:`~lightning_lowrank.load_checkpoint` truncates them as
        the end of training would."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        pending = {name: ranks for integrator in self.integrators.values()
                   for name, ranks in integrator.unfinished.items()}
        if pending:
            checkpoint[CHECKPOINT_KEY]["pending"] = {"config": asdict(self.integration), "ranks": pending}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"integrators": [integrator.state_dict() for integrator in self.integrators.values()],
                "skipped_steps": self.skipped_steps, "started": sorted(self._started)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = state_dict  # applied at fit start, once the integrators exist

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Truncate the layers still at their augmented ranks or keeping a growth margin to their tolerance ranks,
        after the last checkpoint of the fit (which resumes in the middle of the schedule)."""
        for optimizer, integrator in self.integrators.items():
            integrator.truncate(optimizer, final=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print (process 0) the ranks reached, parameters and compression: the table of ``ll.summary``."""
        report = summary(pl_module)
        rank_zero_info(f"TuckerCallback: ranks at the end of fit\n{report}")
        dense = [layer.name for layer in report.layers if not layer.pays]
        if dense:
            rank_zero_info(f"TuckerCallback: {dense} ended with ranks at which the factors hold as many weights as the "
                           "dense layer or more: `compact` exports them dense, and the compression rate counts them so")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for integrator in self.integrators.values():
            integrator.remove()  # the integrators stay readable (steps, layers) until the next fit


def _parameter_count(optimizer: torch.optim.Optimizer) -> int:
    """Parameters in ``optimizer``'s groups: a change tells that a finetuning callback added (or removed) some."""
    return sum(len(group["params"]) for group in optimizer.param_groups)


def _layers_by_optimizer(layers: dict[str, TuckerLayer], optimizers: Sequence[torch.optim.Optimizer]
                         ) -> dict[torch.optim.Optimizer, dict[str, TuckerLayer]]:
    """The Tucker layers whose core each optimizer steps; a layer's factors must be in that optimizer or none."""
    owner = {id(p): optimizer for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    grouped: dict[torch.optim.Optimizer, dict[str, TuckerLayer]] = {}
    for name, layer in layers.items():
        optimizer = owner.get(id(layer.core))
        elsewhere = {owner[id(u)] for u in layer.factors if id(u) in owner} - {optimizer}
        if elsewhere:
            raise ValueError(f"the factors of Tucker layer {name!r} are in another optimizer than its core: put a "
                             "layer's parameters in one optimizer (`layer.parameters()`)")
        if optimizer is None:
            continue
        grouped.setdefault(optimizer, {})[name] = layer
    return grouped
