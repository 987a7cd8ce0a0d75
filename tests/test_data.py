"""The IDX reader against hand-made files, and the real data sets when fetched."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from mnist import load_mnist, read_idx

DATA = Path(__file__).parent.parent / "data"


def write_idx(path, array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(header + body)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype, code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D)])
def test_read_idx_round_trips_hand_made_files(tmp_path, suffix, dtype, code):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, array, code)
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_read_idx_refuses_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x1f\x8b\x08\x00 not idx")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "x")
    write_idx(tmp_path / "y", np.zeros((2, 2), np.uint8), 0x08)
    (tmp_path / "y").write_bytes((tmp_path / "y").read_bytes()[:-1])
    with pytest.raises(ValueError, match="3 data bytes for shape"):
        read_idx(tmp_path / "y")


def test_load_mnist_from_hand_made_files_and_missing_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8), 0x08)
    x, y = load_mnist(tmp_path, train=False).tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0] * 255, torch.from_numpy(images).float())
    assert y.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, train=True)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_data_sets(name):
    if not (DATA / name).exists():
        pytest.skip(f"data/{name} absent: run `make data` (CI does)")
    train, test = load_mnist(DATA / name), load_mnist(DATA / name, train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert set(train.tensors[1].unique().tolist()) == set(range(10))
    assert 0.1 < train.tensors[0].mean() < 0.35


def test_load_mnist_pads_and_repeats_channels(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x08)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(3, dtype=np.uint8), 0x08)
    x, _ = load_mnist(tmp_path, image_size=32, channels=3).tensors
    assert x.shape == (3, 3, 32, 32)
    expected = torch.zeros(3, 32, 32)
    expected[:, 2:30, 2:30] = torch.from_numpy(images).float() / 255
    for c in range(3):
        assert torch.equal(x[:, c], expected)
    for kwargs, match in (({"image_size": 27}, "`image_size` must be an int >= 28"),
                          ({"channels": 0}, "`channels` must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            load_mnist(tmp_path, **kwargs)


def test_data_module_splits_and_batches(tmp_path):
    from mnist import MNISTDataModule

    rng = np.random.default_rng(2)
    for prefix, n in (("train", 10), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x08)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10, 0x08)
    data = MNISTDataModule(tmp_path, batch_size=4, val_size=3)
    data.setup("fit")
    data.setup("test")
    assert len(data.train_set) == 7 and len(data.val_set) == 3 and len(data.test_set) == 4
    assert data.val_set.tensors[1].tolist() == [7, 8, 9]  # the last training images validate
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
    for kwargs, match in (({"batch_size": 0}, "`batch_size` must be an int >= 1"),
                          ({"val_size": 60000}, r"`val_size` must be an int in \[0, 60000\)")):
        with pytest.raises(ValueError, match=match):
            MNISTDataModule(tmp_path, **kwargs)
