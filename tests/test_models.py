"""The benchmark networks: the published LeNet5 sizes, VGG-style shapes, the classifier module's checks."""

import pytest
import torch
from classifiers import ImageClassifier, lenet5, vgg
from torch import nn


def test_lenet5_has_the_dlrt_layer_sizes():
    sizes = [sum(p.numel() for p in m.parameters()) for m in lenet5() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sizes == [20 * 25 + 20, 50 * 20 * 25 + 50, 500 * 800 + 500, 10 * 500 + 10]  # 431,080 in all
    assert lenet5()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert lenet5(3, 7, image_size=32)(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_vgg_shapes():
    net = vgg(widths=(8, "M", 16, "M"))
    assert [m.out_channels for m in net if isinstance(m, nn.Conv2d)] == [8, 16]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert vgg()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_classifier_rejects_bad_options():
    with pytest.raises(ValueError, match="`arch` must be 'lenet5', 'vgg' or 'mlp'"):
        ImageClassifier("resnet")
    with pytest.raises(ValueError, match="`lr` must be > 0"):
        ImageClassifier(lr=0)


def test_mlp_block_before_the_classifier():
    net = ImageClassifier("mlp").net
    assert [tuple(m.weight.shape) for m in net if isinstance(m, nn.Linear)] == [(1024, 784), (1024, 1024), (10, 1024)]
    assert net[3].weight.shape == (1024, 1024)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
