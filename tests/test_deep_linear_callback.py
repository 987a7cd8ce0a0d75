"""DeepLinearCallback with a Trainer, against the same blocks trained by hand with `param_groups`."""

import copy
import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowrank as ll
from lightning_lowrank.deep_linear.conversion import overparameterize
from lightning_lowrank.deep_linear.layers import param_groups


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    return TensorDataset(x, torch.tanh(x[:, :3] * 2))


class MLP(pl.LightningModule):
    def __init__(self, optimizer="sgd", lr=0.05):
        super().__init__()
        self.optimizer, self.lr = optimizer, lr
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        return cls(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(data(), batch_size=16)


def fit(module, callback, ckpt_path=None, **options):
    options = {"max_epochs": 3, "logger": False, **options}
    trainer = pl.Trainer(callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_callback_trains_like_param_groups_by_hand(optimizer, lr):
    """The callback's scaled updates equal an optimizer built on `param_groups(module, lr, alpha)`."""
    torch.manual_seed(0)
    module = MLP(optimizer, lr)
    reference = copy.deepcopy(module.net)
    fit(module, ll.DeepLinearCallback(rank=2, init_scale=0.5, alpha=3.0, include=["net.2"]))
    block = module.net[2]
    assert isinstance(block, ll.DeepLinear) and block.width == 4 and block.depth == 3
    assert all(type(m) is nn.Linear for m in (module.net[0], module.net[4]))  # not included: unchanged type

    overparameterize(reference, rank=2, init_scale=0.5, alpha=3.0, include=["2"])
    initial = copy.deepcopy(reference)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    by_hand = cls(param_groups(reference, lr, alpha=3.0))
    for epoch in range(3):
        for x, y in DataLoader(data(), batch_size=16):
            by_hand.zero_grad()
            nn.functional.mse_loss(reference(x), y).backward()
            by_hand.step()
    for (name, p), q in zip(module.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert (block.factors[0] - initial[2].factors[0]).norm() > 1e-2 * initial[2].factors[0].norm()  # it trained


def test_metrics_reach_the_logger(tmp_path):
    torch.manual_seed(0)
    module = MLP()
    trainer = fit(module, ll.DeepLinearCallback(rank=2, include=["net.2"]), logger=CSVLogger(tmp_path, name="run"))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["lowrank/net.2/width"]]
    assert len(rows) >= trainer.global_step
    assert float(rows[-1]["lowrank/net.2/width"]) == 4
    block_params = 4 * (16 + 16) + 4 * 4 + 16  # W_1 4x16, W_2 4x4, W_3 16x4, bias
    dense_params = 16 * 16 + 16  # the nn.Linear(16, 16) it replaced: the same meaning as TuckerCallback's
    assert float(rows[-1]["lowrank/compression_rate"]) == pytest.approx(1 - block_params / dense_params)
    assert float(rows[-1]["lowrank/params"]) == sum(p.numel() for p in module.parameters())


def test_wide_blocks_and_idempotent_setup():
    torch.manual_seed(0)
    module = MLP()
    callback = ll.DeepLinearCallback(compressed=False, alpha=1.0, include=["net.2"])
    trainer = fit(module, callback, max_epochs=1)
    block = module.net[2]
    assert block.width == 16
    callback.setup(trainer, module, "validate")  # a second setup changes nothing
    assert module.net[2] is block


def test_bad_input_is_refused_before_any_change():
    for options, match in (({"alpha": 0.0}, "`alpha` must be a finite number > 0"),
                           ({"depth": 1}, "`depth` must be an int >= 2"),
                           ({"rank": 0}, "`rank` must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            ll.DeepLinearCallback(**options)
    module = MLP()
    before = copy.deepcopy(module.net)
    with pytest.raises(ValueError, match=r"`rank` 5 exceeds min\(out, in\) = 3 of layer 'net.4'"):
        fit(module, ll.DeepLinearCallback(rank=5))
    assert all(type(a) is type(b) for a, b in zip(module.net, before))
    with pytest.raises(ValueError, match="`include` pattern 'head' matches no module"):
        fit(MLP(), ll.DeepLinearCallback(rank=2, include=["head"]))


def test_checkpoints_load_with_lightning_and_with_load_checkpoint(tmp_path):
    """Reference: the trained module's outputs. `Module.load_from_checkpoint` builds the dense model with the merged
    weights; `ll.load_checkpoint` rebuilds the exact blocks (or their compact export); a resumed fit restores them."""
    torch.manual_seed(0)
    module = MLP()
    trainer = fit(module, ll.DeepLinearCallback(rank=2, include=["net.2"]), max_epochs=2)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    x = torch.randn(5, 12)
    expected = module.net(x)
    dense = MLP.load_from_checkpoint(tmp_path / "model.ckpt")
    assert type(dense.net[2]) is nn.Linear
    torch.testing.assert_close(dense.net(x), expected, rtol=1e-5, atol=1e-6)
    exact = ll.load_checkpoint(tmp_path / "model.ckpt", MLP(), compact_layers=False)
    assert isinstance(exact.net[2], ll.DeepLinear)
    for p, q in zip(exact.net[2].parameters(), module.net[2].parameters()):
        assert torch.equal(p, q)
    compact = ll.load_checkpoint(tmp_path / "model.ckpt", MLP())
    assert not any(isinstance(m, ll.DeepLinear) for m in compact.modules())
    assert sum(p.numel() for p in compact.net[2].parameters()) == 4 * (16 + 16) + 16  # through the width 4
    torch.testing.assert_close(compact.net(x), expected, rtol=1e-5, atol=1e-6)
    resumed = MLP()
    callback = ll.DeepLinearCallback(rank=2, include=["net.2"])
    fit(resumed, callback, max_epochs=2, ckpt_path=tmp_path / "model.ckpt")
    for p, q in zip(resumed.net[2].parameters(), module.net[2].parameters()):
        assert torch.equal(p, q)


def test_a_dense_weight_loads_into_a_block_exactly():
    torch.manual_seed(0)
    weight = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 12, dtype=torch.float64)
    block = ll.DeepLinear(12, 10, depth=3, width=4, bias=True, dtype=torch.float64)
    block.load_state_dict({"weight": weight, "bias": torch.zeros(10, dtype=torch.float64)})
    torch.testing.assert_close(block.matrix(), weight, rtol=1e-12, atol=1e-12)
    norms = [float(f.norm(2)) for f in block.factors]
    assert max(norms) / min(norms) < 1 + 1e-9  # balanced: every factor has the same spectral norm
