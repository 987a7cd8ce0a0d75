"""Rank curves from a logger's files: one series per layer and mode, read from CSV or TensorBoard logs."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_RANK_METRIC = re.compile(r"^lowrank/(?P<series>.+/rank_[a-z]+)$")


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
                match = _RANK_METRIC.match(name or "")
                if match and value not in ("", None):
                    series.setdefault(match["series"], {})[int(row["step"])] = float(value)
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
        match = _RANK_METRIC.match(tag)
        if match:
            series[match["series"]] = {event.step: event.value for event in events.Scalars(tag)}
    return series


def rank_curves(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """``{"<layer>/rank_<mode>": (steps, ranks)}`` from the CSV or TensorBoard log of a run with ``TuckerCallback``.

    ``log_dir`` is a logger's ``log_dir`` (or any directory holding exactly one log, or a ``metrics.csv`` file).
    Steps are the logger's global steps, sorted; the last value logged at a step wins (step and epoch-end logs).
    """
    log = _find_log(Path(log_dir))
    series = _read_csv(log) if log.is_file() else _read_tensorboard(log)
    if not series:
        raise ValueError(f"{log} has no `lowrank/<layer>/rank_<mode>` metrics: was TuckerCallback in the Trainer?")
    return {name: (sorted(points), [points[step] for step in sorted(points)]) for name, points in series.items()}


def plot_ranks(log_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Figure:
    """Plot one line per layer and mode (rank over training steps) and save it as PNG.

    Reads the log with :func:`rank_curves`; writes ``path`` (default: ``rank_curves.png`` next to the log) and
    returns the matplotlib figure.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_ranks needs matplotlib: pip install 'lightning_lowrank[plot]'") from error
    curves = rank_curves(log_dir)
    log = _find_log(Path(log_dir))
    path = Path(path) if path is not None else (log.parent if log.is_file() else log) / "rank_curves.png"
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, (steps, ranks) in curves.items():
        axes.plot(steps, ranks, label=name, drawstyle="steps-post")
    axes.set(xlabel="optimizer step", ylabel="rank", yscale="log", title="Tucker ranks per layer and mode")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=120)
    return figure
