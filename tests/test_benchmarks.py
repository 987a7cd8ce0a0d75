"""Benchmarks end to end in tiny configurations: the transformer's every arm runs, and the LightningCLI arm reproduces
the callback arm (the same callback configured from YAML); the teacher-student growth table has every row."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
BENCHMARK = BENCHMARKS / "char_transformer.py"


@pytest.mark.slow
def test_char_transformer_runs_every_arm(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["char_transformer.py", "--steps", "4", "--layers", "1", "--width", "32",
                                      "--heads", "2", "--context", "16", "--batch", "4", "--taus", "0.1",
                                      "--floor", "0.25"])
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    table = capsys.readouterr().out.split("| run |")[-1]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"dense", "fixed-rank floor, rank 0.25", "LightningCLI, tau=0.1"}
    callback = next(row for name, row in rows.items() if name.startswith("TuckerCallback(tau=0.1"))
    assert rows["LightningCLI, tau=0.1"][1] == callback[1]  # the same bits per character
    assert float(rows["fixed-rank floor, rank 0.25"][3].rstrip("%")) > 0  # compressed


def test_teacher_growth_prints_a_row_per_optimizer_schedule_and_rule(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["teacher_growth.py", "--steps", "3", "--patience", "1", "5"])
    runpy.run_path(str(BENCHMARKS / "teacher_growth.py"), run_name="__main__")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    # growth 0 once (patience plays no part), the default growth once per patience
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (optimizer, schedule, growth, patience) for optimizer in ("SGD", "Adam") for schedule in ("1:1", "10:10")
        for growth, patience in (("0.00", "1"), ("0.25", "1"), ("0.25", "5"))]
    assert all(1 <= int(r[4]) <= 64 for r in rows)


def test_layer_forms_times_both_forms_and_fits_the_element_cost(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["layer_forms.py", "--only", "LeNet5 conv1", "--fractions", "0.25", "1",
                                      "--repeats", "2"])
    runpy.run_path(str(BENCHMARKS / "layer_forms.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("LeNet5 conv1")]
    assert [row[4] for row in rows] == ["5/1", "20/1"]  # ranks a quarter and all of the 20 output channels
    assert all(row[8] in ("chain", "merged") and row[10].endswith("x") for row in rows)
    assert "multiply-adds per element" in out and out.count("regret of") == 2
