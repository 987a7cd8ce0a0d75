"""Small LightningModules and data for the callback tests: a student learning a low-rank teacher."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def teacher_data(samples: int = 256, seed: int = 0) -> TensorDataset:
    """Inputs (N, 3, 6, 6) and targets (N, 4) of a network whose conv and linear weights have rank 2."""
    generator = torch.Generator().manual_seed(0)

    def low_rank(*shape):
        left = torch.randn(shape[0], 2, generator=generator)
        return left @ torch.randn(2, *shape[1:], generator=generator).flatten(1)

    conv = low_rank(8, 3, 3, 3).reshape(8, 3, 3, 3)
    linear = low_rank(4, 8 * 36) / 30
    x = torch.randn(samples, 3, 6, 6, generator=generator.manual_seed(seed + 1))
    y = torch.tanh(nn.functional.conv2d(x, conv, padding=1)).flatten(1) @ linear.T
    return TensorDataset(x, y)


class Student(pl.LightningModule):
    """conv(3->8) -> tanh -> linear(288->16) -> linear(16->4), MSE loss; ``optimizer`` 'sgd' or 'adam'."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd", batch_size: int = 32, samples: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(8 * 36, 16), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(teacher_data(self.hparams.samples), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(teacher_data(64, seed=1), batch_size=64)

    test_dataloader = val_dataloader
