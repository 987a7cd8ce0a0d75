"""The README's first command, examples/lenet5_mnist.py, in its one-batch smoke mode on the real MNIST files."""

import importlib.util
import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_demo_smoke_mode(tmp_path, capsys, caplog):
    if not (ROOT / "data" / "mnist").exists():
        pytest.skip("data/mnist absent: run `make data` (CI does)")
    spec = importlib.util.spec_from_file_location("lenet5_mnist", ROOT / "examples" / "lenet5_mnist.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        results = demo.main(["--smoke", "--data", str(ROOT / "data" / "mnist"), "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    png = next(tmp_path.rglob("rank_curves.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in out
    assert "net.7" in caplog.text and "TuckerLinear" in caplog.text  # the callback's rank table at the end of fit
    assert results["compact_test_acc"] == pytest.approx(results["test_acc"])  # the export is the trained model
    assert 0.0 <= results["test_acc"] <= 1.0
