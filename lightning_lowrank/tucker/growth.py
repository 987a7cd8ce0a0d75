"""The growth rule: which ranks a truncation keeps beyond the tolerance ranks, so that ranks started low grow.

A new direction starts at zero, so under the paper's rule (``growth=0``) it survives only if it reaches tau ||C|| within
one window; a rank that starts below what the task needs then never grows (the directions the loss needs are found
again, from zero, every window). Keeping the next ceil(growth * d) singular directions above a mode's tolerance rank d
as well lets them go on training, with their optimizer state, into the next windows: one the loss needs grows until the
tolerance rule keeps it, and a new growth margin forms above it. A mode keeps its margin for ``patience`` optimizer
steps (counted at its truncations: ``interval`` steps each, ``dense_interval`` in dense storage; a new direction gets as
many steps to prove itself whatever the schedule), renewed whenever its tolerance rank has grown by a whole margin
(ceil(growth * low)) above the lowest it reached since the last renewal: a mode that needs rank fills its margin within
a few windows, while the noise of a flat spectrum moves the tolerance rank by a direction or two either way. A
truncation at which the tolerance rank fell keeps no margin (the mode holds more than the loss needs, and its storage
shrinks with it), but the fall does not end the margin: the next truncation that does not fall has one again, so a small
start keeps growing where the loss needs rank after a noisy fall. A mode that stops growing runs the paper's rule once
its margin expires. A mode that starts at its largest rank (a full-rank start) never keeps one: it has nothing to grow
into, and runs the paper's rule. A layer keeps its factors while it keeps a margin (the integrator's ``dense_storage``
waits for it to expire): held dense, every direction of W would train and the margin would keep noise, not a few new
directions. Keeping more directions only lowers the truncation error, so the paper's bound (discarded part <= tau
||C||_F per mode) holds at every step; the end of training drops the margin by the tolerance rule alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_lowrank.tucker.algebra import consistent_ranks
from lightning_lowrank.tucker.layers import TuckerLayer

if TYPE_CHECKING:
    from lightning_lowrank.tucker.integrator import IntegratorConfig


def clamp_rank(rank: int, size: int, max_rank: int, min_rank: int) -> int:
    """``rank`` clamped to [min_rank, max_rank] and to the ``size`` of the (augmented) mode."""
    return max(min(rank, max_rank, size), min(min_rank, size))


def starts_with_margin(layer: TuckerLayer, config: IntegratorConfig) -> bool:
    """Whether :meth:`GrowthMargin.add` gives ``layer`` a margin at its ranks now (a mode below its max_rank; growth
    and patience above 0)."""
    return config.growth > 0 and config.patience > 0 and any(r < n for r, n in zip(layer.ranks, layer.max_ranks))


class GrowthMargin:
    """The growth margins of a set of Tucker layers: per mode that started below its ``max_rank``, the lowest
    tolerance rank and the optimizer steps since its margin was last renewed; per layer keeping a margin, its tolerance
    ranks (:attr:`decided`).

    Args:
        config: the integrator's options with its schedule set: ``growth`` (margin above a tolerance rank d,
            ceil(growth * d) directions), ``patience`` (optimizer steps a margin lasts), ``min_rank`` and which modes
            adapt.
    """

    def __init__(self, config: IntegratorConfig) -> None:
        self.config = config
        self.decided: dict[str, tuple[int, ...]] = {}  # layer name -> tolerance ranks, while it keeps a margin
        self._margins: dict[tuple[str, int], tuple[int, int]] = {}  # (name, mode) -> (lowest rank, steps)

    def add(self, name: str, layer: TuckerLayer) -> None:
        """Give every mode of ``layer`` below its max_rank a margin from now on."""
        self._margins.update(((name, mode), (r, 0)) for mode, (r, n) in enumerate(zip(layer.ranks, layer.max_ranks))
                             if r < n)

    def keeps(self, name: str) -> bool:
        """Whether a mode of layer ``name`` still keeps its growth margin (its ranks may still grow by it)."""
        return self.config.growth > 0 and any(
            key[0] == name and steps < self.config.patience
            for key, (_, steps) in self._margins.items())

    def keep(self, name: str, layer: TuckerLayer, old_ranks: Sequence[int], tolerance: Sequence[int],
             final: bool, steps: int) -> tuple[int, ...]:
        """The ranks a truncation of ``layer`` (at its augmented ranks; ``old_ranks`` before augmentation) keeps,
        given the tolerance ranks the rule decided for it (clamped to [min_rank, max_rank]): each growing mode's
        rank plus its margin, the others' as decided; records the decision. ``steps``: optimizer steps since the
        layer's last truncation (its schedule's). ``final``: no margin (the end of training)."""
        before = self.decided.get(name, tuple(old_ranks))  # the last decision
        for mode, r in enumerate(tolerance):
            if (name, mode) in self._margins:
                low, since = self._margins[name, mode]
                renewed = r >= low + math.ceil(self.config.growth * low)  # grew by a whole margin above its low
                self._margins[name, mode] = (r, 0) if renewed else (min(low, r), since + steps)
        growth = self.config.growth
        grows = [self.config.adapts(mode) and not final and (name, mode) in self._margins
                 and self._margins[name, mode][1] < self.config.patience and r >= last
                 for mode, (r, last) in enumerate(zip(tolerance, before))]
        keep = consistent_ranks([clamp_rank(r + math.ceil(growth * r), size, layer.max_ranks[mode],
                                            self.config.min_rank) if grow else r
                                 for mode, (r, size, grow) in enumerate(zip(tolerance, layer.spanned_ranks, grows))])
        self.decided.pop(name, None)
        if keep != (tolerance_ranks := consistent_ranks(tolerance)):
            self.decided[name] = tolerance_ranks
        return keep

    def state_dict(self) -> dict[str, object]:
        """The tolerance ranks of the layers keeping a margin, and each mode's lowest rank and steps since renewal."""
        return {"decided": {name: list(ranks) for name, ranks in self.decided.items()},
                "margin_steps": {f"{name}:{mode}": list(margin) for (name, mode), margin in self._margins.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.decided = {name: tuple(ranks) for name, ranks in state.get("decided", {}).items()}
        if "margin_steps" in state:
            self._margins = {layer_mode(key): (int(low), int(steps))
                             for key, (low, steps) in state["margin_steps"].items()}
        elif "margins" in state:  # written before `dense_interval`: truncations of `interval` steps
            self._margins = {layer_mode(key): (int(low), int(count) * self.config.interval)
                             for key, (low, count) in state["margins"].items()}
        else:  # written before `patience`: the modes below their max_rank whose tolerance rank never fell keep one
            for key in state.get("settled", ()):
                self._margins.pop(layer_mode(key), None)


def layer_mode(key: str) -> tuple[str, int]:
    """``"<layer name>:<mode>"`` (a key of the integrator's state) as (layer name, mode)."""
    name, mode = key.rsplit(":", 1)
    return name, int(mode)
