"""The installed package is typed (py.typed): a user script using the public API passes `mypy --strict`."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

USER_SCRIPT = '''
import lightning.pytorch as pl
import torch
from torch import nn

import lightning_lowrank as ll


def train(model: pl.LightningModule) -> nn.Module:
    callback = ll.TuckerCallback(tau=0.1, max_rank=0.5, exclude=["head"])
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(model)
    report: ll.Summary = ll.summary(model)
    rate: float = report.compression_rate
    ranks: tuple[int, ...] = report.layers[0].ranks
    print(rate, ranks, callback.skipped_steps)
    return ll.compact(model)


def by_hand(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    conversion: ll.ConversionReport = ll.convert(model, rank=0.5)
    print(conversion.converted, conversion.skipped)
    integrator = ll.TuckerIntegrator(model, ll.IntegratorConfig(tau=0.1), optimizer=optimizer)
    layer = ll.TuckerLinear(16, 8, ranks=(4, 4))
    layer.set_ranks((2, 2))
    weight: torch.Tensor = layer.weight
    print(weight.shape, ll.to_dense(model), ll.SplitAttention(8, 2))
    return integrator.step(optimizer)


def reload(path: str, model: nn.Module) -> nn.Module:
    return ll.load_checkpoint(path, model, compact_layers=False)
'''


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)")
def test_a_user_script_passes_mypy_strict(tmp_path):
    import lightning_lowrank

    assert (Path(lightning_lowrank.__file__).parent / "py.typed").exists()
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    # errors inside the package itself are not the user's (an installed package's never show); its annotations are
    # what the user's script is checked against
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir",
                             str(tmp_path / "cache"), str(script)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
