"""MNIST and Fashion-MNIST from the standard IDX files (gzipped or not) in a directory the user names."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}
"""IDX type codes: unsigned byte, signed byte, short, int, float, double (big-endian)."""


def read_idx(path: str | os.PathLike) -> Tensor:
    """The array of an IDX file (``.gz`` read transparently): magic 0x0000 <type> <ndim>, ndim big-endian sizes, data."""
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


def load_mnist(root: str | os.PathLike, train: bool = True) -> TensorDataset:
    """MNIST-format images in [0, 1], shape (N, 1, 28, 28) float32, and int64 labels, from ``root`` (MNIST or
    Fashion-MNIST: the same file names)."""
    prefix = "train" if train else "t10k"
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    return TensorDataset(images.unsqueeze(1).float() / 255, labels.long())
