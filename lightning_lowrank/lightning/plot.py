"""Rank curves from a logger's files: one series per layer and mode, read from CSV or TensorBoard logs."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_METRIC = re.compile(r"^lowrank/(?P<series>.+)$")
_RANK = re.compile(r"^(?P<layer>.+)/rank_(?P<mode>[a-z]+)$")
_LINE_STYLES = {"out": "-", "in": "--"}


def _find_log(log_dir: Path) -> Path:
    """The one ``metrics.csv`` file or directory of TensorBoard event files under ``log_dir``."""
    if log_dir.is_file():
        return log_dir
    logs = sorted({*log_dir.rglob("metrics.csv"), *(p.parent for p in log_dir.rglob("events.out.tfevents.*"))})
    if not logs:
        raise FileNotFoundError(f"no metrics.csv or TensorBoard event file under {log_dir}")
    if len(logs) > 1:
        raise ValueError(f"{len(logs)} logs under {log_dir} ({', '.join(map(str, logs))}): pass one of them, for "
                         "example `trainer.logger.log_dir`")
    return logs[0]


def _read_csv(path: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                match = _METRIC.match(name or "")
                if match and value not in ("", None):
                    series.setdefault(match["series"], {}).setdefault(int(row["step"]), float(value))
    return series


def _read_tensorboard(directory: Path) -> dict[str, dict[int, float]]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )
    except ImportError as error:
        raise ImportError("reading TensorBoard logs needs tensorboard: pip install tensorboard") from error
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    series: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        match = _METRIC.match(tag)
        if match:
            points = series.setdefault(match["series"], {})
            for event in events.Scalars(tag):
                points.setdefault(event.step, event.value)
    return series


def _lowrank_metrics(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Every ``lowrank/<name>`` series of the log: ``{name: (steps, values)}``, steps sorted; of several values
    logged at one step, the first (the one logged at the start of the batch; the epoch-end value comes later)."""
    log = _find_log(Path(log_dir))
    series = _read_csv(log) if log.is_file() else _read_tensorboard(log)
    return {name: (sorted(points), [points[step] for step in sorted(points)]) for name, points in series.items()}


def rank_curves(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """``{"<layer>/rank_<mode>": (steps, ranks)}`` from the CSV or TensorBoard log of a run with ``TuckerCallback``.

    ``log_dir`` is a logger's ``log_dir`` (or any directory holding exactly one log, or a ``metrics.csv`` file).
    Steps are the logger's global steps, sorted: step k holds the ranks after k optimizer steps (step 0 the initial
    ones), as logged at the start of each batch (the epoch-end value logged at the same step is skipped).
    """
    curves = {name: points for name, points in _lowrank_metrics(log_dir).items() if _RANK.match(name)}
    if not curves:
        raise ValueError(f"{_find_log(Path(log_dir))} has no `lowrank/<layer>/rank_<mode>` metrics: was "
                         "TuckerCallback in the Trainer?")
    return curves


def plot_ranks(log_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Figure:
    """Plot the ranks over training steps (one colour per layer, one line style per mode, each layer's maximum rank
    dotted, from the initial ranks at step 0) above the compression rate, and save it as PNG.

    Reads the log with :func:`rank_curves` (a CSV and a TensorBoard log of one run give the same figure); writes
    ``path`` (default: ``rank_curves.png`` next to the log) and returns the matplotlib figure.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_ranks needs matplotlib: pip install 'lightning_lowrank[plot]'") from error
    curves = rank_curves(log_dir)
    metrics = _lowrank_metrics(log_dir)
    log = _find_log(Path(log_dir))
    path = Path(path) if path is not None else (log.parent if log.is_file() else log) / "rank_curves.png"
    layers = sorted({_RANK.match(name)["layer"] for name in curves})
    palette = colormaps["tab10"]
    colours = {layer: palette(i % 10) for i, layer in enumerate(layers)}
    figure = Figure(figsize=(9, 6), layout="constrained")
    ranks, compression = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for name in sorted(curves):
        steps, values = curves[name]
        match = _RANK.match(name)
        style = dict(color=colours[match["layer"]], linestyle=_LINE_STYLES.get(match["mode"], "-."))
        ranks.plot(steps, values, label=name, drawstyle="steps-post", **style)
        maximum = metrics.get(f"{match['layer']}/max_rank_{match['mode']}")
        if maximum is not None:
            ranks.hlines(maximum[1][0], steps[0], steps[-1], colors=style["color"], linestyles=":", linewidth=1)
    ranks.plot([], [], color="grey", linestyle=":", label="maximum rank")
    ranks.set(ylabel="rank", yscale="log", title="Tucker ranks per layer (colour) and mode (line style)")
    ranks.grid(True, which="both", alpha=0.3)
    ranks.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    if "compression_rate" in metrics:
        compression.plot(*metrics["compression_rate"], color="black", drawstyle="steps-post")
    compression.set(xlabel="optimizer step", ylabel="compression")
    compression.grid(True, alpha=0.3)
    figure.savefig(path, dpi=120)
    return figure
