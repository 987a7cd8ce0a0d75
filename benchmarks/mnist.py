"""MNIST and Fashion-MNIST from the standard IDX files (gzipped or not) in a directory the user names."""

from __future__ import annotations

import gzip
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}
"""IDX type codes: unsigned byte, signed byte, short, int, float, double (big-endian)."""


def read_idx(path: str | os.PathLike) -> Tensor:
    """The array of an IDX file (``.gz`` read transparently): magic 0x0000 <type> <ndim>, ndim big-endian sizes,
    data."""
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: {len(body)} data bytes for shape {shape} of {dtype}")
    return torch.from_numpy(np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="))).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{stem}[.gz] not found in {root}; fetch the data with `bash scripts/fetch_data.sh DIR`")


def load_mnist(root: str | os.PathLike, train: bool = True, image_size: int = 28, channels: int = 1) -> TensorDataset:
    """MNIST-format images in [0, 1], shape (N, channels, image_size, image_size) float32, and int64 labels, from
    ``root`` (MNIST or Fashion-MNIST: the same file names). The 28x28 images are zero-padded to ``image_size``
    (centred) and repeated over ``channels`` (the 32x32, 3-channel input of CIFAR-style networks)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 28:
        raise ValueError(f"`image_size` must be an int >= 28, got {image_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"`channels` must be an int >= 1, got {channels!r}")
    prefix = "train" if train else "t10k"
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise ValueError(f"{root}: images {tuple(images.shape)} and labels {tuple(labels.shape)} are not MNIST-format")
    x = images.unsqueeze(1).float() / 255
    before = (image_size - 28) // 2
    after = image_size - 28 - before
    x = torch.nn.functional.pad(x, (before, after, before, after)).expand(-1, channels, -1, -1).contiguous()
    return TensorDataset(x, labels.long())


class MNISTDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST from ``root``: the last ``val_size`` training images validate, ``t10k`` tests.

    Batches: (batch_size, channels, image_size, image_size) float images in [0, 1] and int64 labels.
    """

    def __init__(self, root: str | os.PathLike, batch_size: int = 128, image_size: int = 28, channels: int = 1,
                 val_size: int = 5000, seed: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < 60000:
            raise ValueError(f"`val_size` must be an int in [0, 60000), got {val_size!r}")
        self.root, self.batch_size, self.image_size, self.channels = Path(root), batch_size, image_size, channels
        self.val_size, self.seed = val_size, seed

    def setup(self, stage: str) -> None:
        load = partial(load_mnist, self.root, image_size=self.image_size, channels=self.channels)
        if stage in ("fit", "validate"):
            x, y = load(train=True).tensors
            split = len(x) - self.val_size
            self.train_set, self.val_set = TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])
        if stage in ("test", "predict"):
            self.test_set = load(train=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 1000)
