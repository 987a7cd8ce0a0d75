"""Per-layer ranks, parameter counts and the compression rate of a model with Tucker layers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from lightning_lowrank.tucker.layers import TuckerLayer


@dataclass(frozen=True)
class LayerSummary:
    """One Tucker layer: its name, type, dense weight shape, active and maximum ranks, storage, and parameters:
    effective (the factorization at the active ranks), stored (the tensors it holds, at its storage) and dense."""

    name: str
    kind: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    max_ranks: tuple[int, ...]
    storage: tuple[int, ...]
    params: int
    dense_params: int
    stored_params: int

    @property
    def pays(self) -> bool:
        """Whether the factors hold fewer weights than the dense layer (else :func:`~lightning_lowrank.compact`
        exports the layer dense, and the compression rate counts it dense)."""
        return self.params < self.dense_params


@dataclass(frozen=True)
class Summary:
    """Ranks and parameters of a model; ``params`` counts the whole model with Tucker layers at active ranks,
    ``stored`` the tensors it holds (what Lightning's model summary counts, and what gradients and optimizer state
    follow)."""

    layers: tuple[LayerSummary, ...]
    params: int
    stored: int

    @property
    def factorized_params(self) -> int:
        """Parameters of the converted layers, each factorized or, where its factors cost more, dense."""
        return sum(min(layer.params, layer.dense_params) for layer in self.layers)

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def stored_params(self) -> int:
        """Parameters the converted layers hold: factors and core at their storage."""
        return sum(layer.stored_params for layer in self.layers)

    @property
    def compression_rate(self) -> float:
        """1 - factorized / dense parameters of the converted layers (0 when none is converted); a layer whose factors
        cost more than its dense form counts as dense, as :func:`~lightning_lowrank.compact` exports it."""
        return 1.0 - self.factorized_params / self.dense_params if self.layers else 0.0

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "rank", "max rank", "storage", "params", "stored", "dense")
        rows = [header] + [(s.name, s.kind, "x".join(map(str, s.shape)), str(s.ranks), str(s.max_ranks),
                            str(s.storage), f"{s.params:,}" + ("" if s.pays else " (dense)"), f"{s.stored_params:,}",
                            f"{s.dense_params:,}")
                           for s in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"converted layers: {self.factorized_params:,} of {self.dense_params:,} dense parameters, "
                     f"compression rate {self.compression_rate:.2%}; whole model: {self.params:,} parameters")
        lines.append(f"stored: {self.stored_params:,} parameters in the converted layers, {self.stored:,} in the whole "
                     "model (factors and core at their storage, room for the next augmentation: what Lightning's "
                     "model summary counts, and what gradients and optimizer state follow)")
        return "\n".join(lines)


def summary(module: nn.Module, ranks: Mapping[str, tuple[int, ...]] | None = None) -> Summary:
    """Summarize the Tucker layers of ``module`` (in registration order) and count its effective parameters.

    Args:
        ranks: ranks to count instead of the active ones, by layer name (for example
            :attr:`TuckerIntegrator.ranks <lightning_lowrank.TuckerIntegrator.ranks>`, the ranks the last truncation
            decided, while layers train at their augmented ranks).
    """
    ranks = {} if ranks is None else ranks
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, TuckerLayer)]
    in_tucker = {id(p) for _, m in layers for p in m.parameters()}
    other = sum(p.numel() for p in module.parameters() if id(p) not in in_tucker)
    rows = []
    for name, m in layers:
        r = tuple(ranks.get(name, m.ranks))
        rows.append(LayerSummary(name, type(m).__name__, m.shape, r, m.max_ranks, m.storage, m.num_parameters(r),
                                 m.dense_num_parameters(), sum(p.numel() for p in m.parameters())))
    return Summary(tuple(rows), other + sum(row.params for row in rows),
                   other + sum(row.stored_params for row in rows))
