"""The networks of the papers' benchmarks and a LightningModule that trains them as image classifiers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

VGG_WIDTHS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M")
"""A VGG-style stack for 32x32 inputs: 3x3 convolutions (int: output channels) and 2x2 max pools ("M")."""


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """LeNet5 of the DLRT experiments: conv 5x5 (20) - pool - conv 5x5 (50) - pool - linear 500 - linear classes."""
    side = ((image_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(50 * side * side, 500), nn.ReLU(), nn.Linear(500, num_classes),
    )


def vgg(in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
        widths: Sequence[int | str] = VGG_WIDTHS) -> nn.Sequential:
    """A VGG-style network: ``widths`` as 3x3 conv-BatchNorm-ReLU blocks and max pools, then linear 512 - classes."""
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for width in widths:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2
        else:
            layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.BatchNorm2d(int(width)), nn.ReLU()]
            channels = int(width)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, 512), nn.ReLU(),
                         nn.Linear(512, num_classes))


def mlp(in_features: int = 784, num_classes: int = 10, hidden: int = 1024) -> nn.Sequential:
    """An MLP with a hidden-to-hidden linear layer before the classifier (index 3: the block that
    :class:`~lightning_lowrank.DeepLinearCallback` overparameterizes in the paper's classifier experiment)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training of ``lenet5``, ``vgg`` or ``mlp`` with SGD (``optimizer="sgd"``, with ``momentum``) or
    AdamW; logs ``train_loss``, ``val_acc``, ``test_acc``.

    Input: (N, in_channels, image_size, image_size); output: (N, num_classes) logits.
    """

    def __init__(self, arch: Literal["lenet5", "vgg", "mlp"] = "lenet5", in_channels: int = 1, image_size: int = 28,
                 num_classes: int = 10, lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 0.0,
                 optimizer: Literal["sgd", "adamw"] = "sgd") -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adamw', got {optimizer!r}")
        if arch not in ("lenet5", "vgg", "mlp"):
            raise ValueError(f"`arch` must be 'lenet5', 'vgg' or 'mlp', got {arch!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        self.save_hyperparameters()
        if arch == "mlp":
            self.net = mlp(in_channels * image_size * image_size, num_classes)
        else:
            self.net = (lenet5 if arch == "lenet5" else vgg)(in_channels, num_classes, image_size)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)
