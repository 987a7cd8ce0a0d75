"""Every Python example of README.md runs as written, on small stand-ins for the objects it leaves to the reader
(``model``, ``loss``, ``optimizer``, ``layer``, ``observed``/``mask``/``M``)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import Student
from torch import nn

import lightning_lowrank as ll

ROOT = Path(__file__).parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def block(first_line: str) -> str:
    """The README's Python example that starts with ``first_line``."""
    (found,) = [b for b in BLOCKS if b.startswith(first_line)]
    return found


def test_every_python_example_is_covered():
    starts = ("import lightning.pytorch", "integrator = ll.TuckerIntegrator", "import lightning_lowrank as ll",
              "from lightning_lowrank import DeepLinear", "ll.plot_ranks", "from mnist import")
    assert sorted(next(start for start in starts if b.startswith(start)) for b in BLOCKS) == sorted(starts)


def test_the_callback_and_the_rank_curves(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl, "Trainer", functools.partial(pl.Trainer, max_steps=3, accelerator="cpu",
                                                         enable_progress_bar=False, log_every_n_steps=1))
    namespace = {"model": Student()}
    exec(block("import lightning.pytorch"), namespace)
    assert any(isinstance(m, nn.Linear) for m in namespace["compact"].modules())
    exec(block("ll.plot_ranks"), namespace)
    assert "net.3/rank_out" in namespace["curves"]


def test_the_integrator_without_lightning():
    torch.manual_seed(0)
    model = nn.Sequential(ll.TuckerLinear(12, 8, ranks=(3, 3)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(16, 12)).pow(2).mean()
    namespace = {"ll": ll, "model": model, "loss": loss, "optimizer": optimizer}
    exec(block("integrator = ll.TuckerIntegrator"), namespace)
    assert namespace["integrator"].steps == 1


def test_layers_conversion_and_export():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(),
                          nn.Linear(16, 4))
    model.head = nn.Sequential(nn.Linear(4, 2))
    layer = ll.TuckerConv2d(8, 16, 3)
    namespace = {"model": model, "layer": layer}
    exec(block("import lightning_lowrank as ll"), namespace)
    assert isinstance(model[1], ll.TuckerConv2d) and layer.ranks == (8, 4, 3, 3) and layer.storage == (16, 8, 3, 3)


def test_deep_linear():
    torch.manual_seed(0)
    target = torch.randn(100, 5) @ torch.randn(5, 100)
    mask = torch.rand(100, 100) < 0.3
    namespace = {"torch": torch, "observed": target * mask, "mask": mask, "M": target}
    exec(block("from lightning_lowrank import DeepLinear"), namespace)
    assert namespace["model"].width == 10 and torch.isfinite(namespace["loss"])


def test_demo_data_and_models(monkeypatch):
    if not (ROOT / "data" / "mnist").exists() or not (ROOT / "data" / "fashion-mnist").exists():
        pytest.skip("data/mnist or data/fashion-mnist absent: run `make data` (CI does)")
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(block("from mnist import"), namespace)
    assert namespace["train"][0][0].shape == (1, 28, 28) and namespace["test"][0][0].shape == (3, 32, 32)
