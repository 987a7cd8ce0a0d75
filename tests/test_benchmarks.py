"""The transformer benchmark end to end in a tiny configuration: every arm runs, and the LightningCLI arm reproduces
the callback arm (the same callback configured from YAML)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "char_transformer.py"


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
