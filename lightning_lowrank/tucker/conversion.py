"""Model surgery: replace a model's dense Conv/Linear layers by Tucker layers, in place."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

from lightning_lowrank.selection import ConversionReport, check_patterns, pattern_reason
from lightning_lowrank.tucker.algebra import Init, consistent_ranks, full_ranks
from lightning_lowrank.tucker.attention import SplitAttention
from lightning_lowrank.tucker.layers import TUCKER_LAYERS, TuckerLayer
from lightning_lowrank.tucker.storage import storage_size, stored_entries

RankSpec = Union[int, float, Literal["full"]]
"""A rank per mode: an int in [1, n], a fraction of the mode size n in (0, 1] (rounded up), or 'full' (= n).

Every rank is capped by the rank of the mode's unfolding, min(n_i, prod_{j != i} n_j), and the initial ranks by
r_i <= prod_{j != i} r_j (a linear layer's two ranks are equal): beyond that a mode's extra directions carry nothing.
"""


START = 0.25
"""The start ``rank=None`` takes: a quarter of each channel mode, at most its ``max_rank``, then lowered in the largest
layers until the layers starting together store at most :data:`START_BUDGET` of their dense weights
(:func:`start_ranks`; TuckerCallback's default; why, measured: README "What training costs")."""

START_BUDGET = 0.25
"""Share of their dense weights (entries) the layers of a ``rank=None`` start store together, the room for the
augmentation included (:func:`start_ranks`)."""


CONVERTIBLE: tuple[type[nn.Module], ...] = (*TUCKER_LAYERS, nn.MultiheadAttention)
"""Dense module types :func:`convert` replaces: Linear and Conv by Tucker layers, attention by
:class:`~lightning_lowrank.tucker.attention.SplitAttention` whose four projections become Tucker layers."""


def _check_rank_spec(name: str, spec: RankSpec | None) -> None:
    if spec is None and name == "rank":
        return
    if isinstance(spec, bool) or not (
        spec == "full" if isinstance(spec, str)
        else spec >= 1 if isinstance(spec, int)
        else isinstance(spec, float) and 0 < spec <= 1
    ):
        default = " or None (a quarter, within `max_rank` and a storage budget)" if name == "rank" else ""
        raise ValueError(f"`{name}` must be an int >= 1, a fraction in (0, 1] or 'full'{default}, got {spec!r}")


def resolve_rank(spec: RankSpec, size: int, bound: int) -> int:
    """The rank that ``spec`` gives a mode of ``size``, at most ``bound``; raises if an int rank exceeds the mode."""
    if isinstance(spec, int) and spec > size:
        raise ValueError(f"rank {spec} exceeds the mode size {size}")
    rank = size if spec == "full" else max(1, math.ceil(spec * size)) if isinstance(spec, float) else spec
    return min(rank, bound)


@dataclass(frozen=True)
class TuckerConfig:
    """Which layers become Tucker layers, and at which ranks.

    Args:
        rank: initial active rank of the channel modes (output and input); "full" starts at `max_rank` (exact:
            the default here); None starts at a quarter of each mode (:data:`START`), at most `max_rank`, the
            largest layers lower until the converted layers store at most a quarter of their dense weights
            (:func:`start_ranks`; TuckerCallback's default: a start that trains below the dense cost).
        max_rank: largest rank of the channel modes that truncation keeps (augmentation may exceed it for one
            interval); the storage follows the rank (:func:`~lightning_lowrank.tucker.storage.storage_size`).
        kernel_rank: initial rank of the spatial modes of convolutions.
        layer_types: dense module types to convert (exact type match, so subclasses with their own forward stay), as
            classes or class names (``"Conv2d"``): ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention``
            (split into four projections, each converted).
        include: glob patterns on qualified module names (``"features.*"``); empty means every layer.
        exclude: glob patterns of layers to keep dense.
        min_size: layers whose dense weight has fewer elements stay dense.
        keep_first_last: keep the first and the last candidate layer (in registration order) dense.
        init: ``"hosvd"`` (factors from the dense weights, exact at full rank; below it the best approximation, for
            pretrained weights), ``"hosvd_scaled"`` (the same with the core scaled to ||W||_F, so that a start below
            full rank keeps the norm of the dense init, which a truncation would cut) or ``"random"`` (random
            orthonormal factors, the dense weights projected onto them).
    """

    rank: RankSpec | None = "full"
    max_rank: RankSpec = "full"
    kernel_rank: RankSpec = "full"
    layer_types: tuple[type[nn.Module], ...] = CONVERTIBLE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 0
    keep_first_last: bool = False
    init: Init = "hosvd"

    def __post_init__(self) -> None:
        for name in ("rank", "max_rank", "kernel_rank"):
            _check_rank_spec(name, getattr(self, name))
        if self.max_rank != "full" and self.rank not in ("full", None) and (type(self.rank) is type(self.max_rank)
                                                                and self.rank > self.max_rank):
            raise ValueError(f"`rank` ({self.rank}) must not exceed `max_rank` ({self.max_rank})")
        for name in ("include", "exclude", "layer_types"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, type)) else tuple(value))
        for name in ("include", "exclude"):
            if not all(isinstance(p, str) for p in getattr(self, name)):
                raise ValueError(f"`{name}` must be a glob pattern or a sequence of them, got {getattr(self, name)!r}")
        by_name = {t.__name__: t for t in CONVERTIBLE}
        unsupported = [t for t in self.layer_types if t not in CONVERTIBLE and t not in by_name]
        if unsupported:
            raise ValueError(f"`layer_types` must be among {list(by_name)} (classes or names), got {unsupported}")
        object.__setattr__(self, "layer_types", tuple(by_name.get(t, t) for t in self.layer_types))
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"`min_size` must be an int >= 0, got {self.min_size!r}")
        if self.init not in ("hosvd", "hosvd_scaled", "random"):
            raise ValueError(f"`init` must be 'hosvd', 'hosvd_scaled' or 'random', got {self.init!r}")

    def ranks_for(self, shape: tuple[int, ...], layer_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Initial and maximum rank of every mode of a weight of ``shape`` (for ``rank=None`` before the budget of
        :func:`start_ranks`, which needs the other layers starting with it)."""
        ranks, max_ranks = [], []
        for mode, (size, bound) in enumerate(zip(shape, full_ranks(shape))):
            specs = (self.rank, self.max_rank) if mode < 2 else (self.kernel_rank, "full")
            try:
                max_rank = resolve_rank(specs[1], size, bound)
                rank = (max_rank if specs[0] == "full" else min(resolve_rank(START, size, bound), max_rank)
                        if specs[0] is None else resolve_rank(specs[0], size, bound))
            except ValueError as error:
                raise ValueError(f"layer {layer_name!r}, mode {mode}: {error}; give a smaller int, a fraction in "
                                 f"(0, 1] or 'full', or exclude the layer") from None
            if rank > max_rank:
                raise ValueError(f"layer {layer_name!r}, mode {mode}: `rank` resolves to {rank} > "
                                 f"`max_rank` {max_rank}")
            ranks.append(rank)
            max_ranks.append(max_rank)
        return consistent_ranks(ranks), tuple(max_ranks)

    def start(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Initial ranks of layers of ``shapes`` (by name) that start together: :meth:`ranks_for`, and for
        ``rank=None`` within the budget of :func:`start_ranks`."""
        ranks = {name: self.ranks_for(shape, name)[0] for name, shape in shapes.items()}
        return ranks if self.rank is not None else start_ranks(shapes, ranks)


def start_ranks(shapes: Mapping[str, tuple[int, ...]], ranks: Mapping[str, tuple[int, ...]],
                budget: float = START_BUDGET) -> dict[str, tuple[int, ...]]:
    """``ranks`` (by layer name) lowered until every layer stores at most its dense weight's prod_i n_i entries and
    the layers together at most ``budget`` of their dense weights, the largest layers lowered first.

    A layer stores sum_i n_i s_i + prod_i s_i entries, s_i = ``storage_size(n_i, r_i)`` (room for the augmented
    bases: a square linear layer at a quarter stores 1.25 n^2). Water-filling: each layer's channel ranks are
    lowered (the larger first, down to 1) until it stores at most a cap c, the largest c at which the total fits,
    so layers storing less than c keep their ranks; at c = 0 every layer is at rank 1 in its channel modes.
    """
    if not ranks:
        return {}
    paths = {name: _lowering(shapes[name], r) for name, r in ranks.items()}  # (stored, ranks), stored decreasing

    def capped(cap: int) -> dict[str, tuple[int, tuple[int, ...]]]:
        return {name: next((step for step in path if step[0] <= cap), path[-1]) for name, path in paths.items()}

    allowed = budget * sum(math.prod(shape) for shape in shapes.values())
    caps = sorted({stored for path in paths.values() for stored, _ in path})
    low, high = 0, len(caps) - 1  # the largest cap whose total fits (caps[0] if none does)
    while low < high:
        middle = (low + high + 1) // 2
        if sum(stored for stored, _ in capped(caps[middle]).values()) <= allowed:
            low = middle
        else:
            high = middle - 1
    return {name: step[1] for name, step in capped(caps[low]).items()}


def _lowering(shape: tuple[int, ...], ranks: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
    """Stored entries and ranks of a layer whose channel ranks fall from ``ranks``, the larger first, down to 1, from
    the first that stores at most the dense weight (or rank 1)."""
    path = [(stored_entries(shape, ranks), ranks)]
    current = list(ranks)
    while max(current[:2]) > 1:
        current[0 if current[0] >= current[1] else 1] -= 1
        lowered = consistent_ranks(current)
        path.append((stored_entries(shape, lowered), lowered))
    return [step for step in path if step[0] <= math.prod(shape)] or path[-1:]


@torch.no_grad()
def restart(layer: TuckerLayer, ranks: tuple[int, ...], init: Init) -> None:
    """Lower a layer converted with ``rank="full"`` to ``ranks`` (:meth:`TuckerConfig.start`), its storage fitted to
    them: the leading block of the core and of each factor, which for ``init="hosvd"`` and ``"hosvd_scaled"`` is the
    truncated HOSVD (:func:`~lightning_lowrank.tucker.algebra.tucker_decomposition`), the core scaled back to its
    norm before for ``"hosvd_scaled"``: the layer ``convert`` at these ranks with ``init`` would have made (the
    storage beyond the ranks zero).
    The parameters keep their identity; call it before the optimizer's first step (their optimizer state is not
    resized)."""
    norm = torch.linalg.vector_norm(layer.active_core().double())
    layer.set_ranks(ranks)
    layer.resize([storage_size(n, r) for n, r in zip(layer.shape, ranks)])
    for u, r in zip(layer.factors, ranks):
        u[:, r:] = 0  # as a conversion at these ranks leaves the storage beyond them
    if init == "hosvd_scaled":
        layer.scale_core_to(norm)


def convert(module: nn.Module, config: TuckerConfig | None = None, **options: object) -> ConversionReport:
    """Replace the selected dense layers of ``module`` by Tucker layers, in place; idempotent.

    The global random state is as before (the layers' construction and ``init="random"`` draw from a copy of it),
    so a converted model trains on the same random stream (batch order, dropout) as the dense one.

    Args:
        module: the model; its layers keep their names, device and dtype.
        config: a :class:`TuckerConfig`, or its fields as keyword ``options``.

    Raises:
        ValueError: a pattern in include/exclude matches no module, a rank does not fit a layer, or the model
            has no layer to convert and none converted already.
    """
    if config is None:
        config = TuckerConfig(**options)
    elif options:
        raise TypeError("pass either `config` or keyword options, not both")
    check_patterns(module, config.include, config.exclude)

    aliases: dict[int, list[str]] = {}  # a module registered under several names is replaced under all of them
    for name, m in module.named_modules(remove_duplicate=False):
        if type(m) in config.layer_types or isinstance(m, TuckerLayer):
            aliases.setdefault(id(m), []).append(name)
    owners = _parameter_owners(module)
    report = ConversionReport()
    splits, candidates = [], []  # attention is split first; its projections are candidates like any other layer
    for names in aliases.values():
        layer = module.get_submodule(names[0])
        if type(layer) is not nn.MultiheadAttention:
            candidates.append((names, layer))
            continue
        reason = _split_reason(names, layer, config, owners)
        if reason:
            report.skipped[names[0]] = reason
            continue
        split = SplitAttention.from_torch(layer)
        splits.append((names, split))
        candidates += [([f"{name}.{proj}" for name in names], getattr(split, proj))
                       for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
    ends = {id(candidates[0][1]), id(candidates[-1][1])} if config.keep_first_last and candidates else set()
    selected = []  # every rank is resolved before the first module is replaced, so a bad rank changes nothing
    for names, layer in candidates:
        reason = _skip_reason(names, layer, config, id(layer) in ends, owners)
        if reason is None:
            selected.append((names, layer))
        elif reason:
            report.skipped[names[0]] = reason
    shapes = {names[0]: tuple(layer.weight.shape) for names, layer in selected}
    starts = config.start(shapes)
    plan = [(names, layer, starts[names[0]], config.ranks_for(shapes[names[0]], names[0])[1])
            for names, layer in selected]
    for names, split in splits:
        for name in names:
            module.set_submodule(name, split)
    cuda = sorted({p.device.index or 0 for _, layer, _, _ in plan for p in layer.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the training's random stream is that of the dense model
        for names, layer, ranks, max_ranks in plan:
            tucker = TUCKER_LAYERS[type(layer)].from_dense(layer, ranks, max_ranks, config.init)
            for name in names:
                module.set_submodule(name, tucker)
            report.converted.append(" = ".join(names))
    if not any(isinstance(m, TuckerLayer) for m in module.modules()):
        raise ValueError(f"nothing to convert in {type(module).__name__}: no layer of type "
                         f"{[t.__name__ for t in config.layer_types]} passed the selection\n{report}")
    report.skipped |= _dense_modules(module, report, config)
    return report


def _dense_modules(module: nn.Module, report: ConversionReport, config: TuckerConfig) -> dict[str, str]:
    """Every other module holding parameters of its own, with why it stays dense (not inside a factorized layer,
    nor inside a module the report already names)."""
    known = report.names + list(report.skipped)
    dense = {}
    for name, m in module.named_modules():
        if any(name == k or name.startswith(k + ".") for k in known) or isinstance(m, TuckerLayer):
            continue
        if any(isinstance(parent, TuckerLayer) for parent in _parents(module, name)):
            continue
        if next(m.parameters(recurse=False), None) is not None:
            kind = type(m).__name__
            dense[name or kind] = (f"{kind} is not among `layer_types`" if type(m) in CONVERTIBLE
                                   else f"{kind} has no Tucker form")
    return dense


def _parents(module: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    return [module.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def _parameter_owners(module: nn.Module) -> dict[int, set[str]]:
    """The names of the modules that hold each parameter (more than one for tied weights)."""
    owners: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name.rpartition(".")[0])
    return owners


def _split_reason(names: list[str], attention: nn.MultiheadAttention, config: TuckerConfig,
                  owners: dict[int, set[str]]) -> str | None:
    """Why the attention module stays as it is, or None to split it (at least one projection is selected)."""
    projections = [f"{name}.{proj}" for name in names for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if all(pattern_reason(p, config.include, config.exclude) for p in projections):
        return pattern_reason(projections[0], config.include, config.exclude)
    if attention.bias_k is not None or attention.add_zero_attn:
        return "attention with `add_bias_kv` or `add_zero_attn` is not supported"
    shared = {o for p in attention.parameters() for o in owners.get(id(p), set())} - set(names) - {
        f"{name}.out_proj" for name in names}
    if shared:
        return f"its parameters are tied to {sorted(shared)}"
    return None


def _skip_reason(names: list[str], layer: nn.Module, config: TuckerConfig, end: bool,
                 owners: dict[int, set[str]]) -> str | None:
    """Why ``layer`` (registered under ``names``) stays as it is (empty string: already converted), or None to
    convert it."""
    if isinstance(layer, TuckerLayer):
        return ""
    for name in names:
        reason = pattern_reason(name, config.include, config.exclude)
        if reason:
            return reason if len(names) == 1 else f"{reason} (as {name!r})"
    if end:
        return "first or last layer (`keep_first_last`)"
    for p in (layer.weight, layer.bias):
        shared = set() if p is None else owners.get(id(p), set()) - set(names)
        if shared:
            reason = (f"its parameters are tied to {sorted(shared)}: factorizing it would untie them; untie them or "
                      "exclude the layer to silence this")
            warnings.warn(f"layer {names[0]!r} is not converted: {reason}", UserWarning, stacklevel=3)
            return reason
    if layer.weight.numel() < config.min_size:
        return f"{layer.weight.numel()} weights < `min_size` {config.min_size}"
    if getattr(layer, "groups", 1) != 1:
        reason = f"grouped convolution (groups={layer.groups}) is not supported"
        warnings.warn(f"layer {name!r} is not converted: {reason}", UserWarning, stacklevel=3)
        return reason
    return None
