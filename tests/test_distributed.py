"""Tucker layers under data parallelism: kept out of DDP, gradients averaged in one call, initial state shared."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_lowrank import TuckerConv2d, TuckerLinear
from lightning_lowrank.tucker.distributed import average_gradients, broadcast_layers, drop_absent, keep_out_of_ddp


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(TuckerConv2d(3, 8, 3, ranks=(4, 2, 3, 3)), nn.Flatten(), TuckerLinear(8 * 4, 4, ranks=(2, 2)))


@pytest.mark.parametrize("ignored", [True, False])
def test_ddp_ignores_the_tucker_parameters(process_group, ignored):
    """Guards the one private torch use (``keep_out_of_ddp``): DDP built after it holds the biases only, so a layer
    whose storage is reallocated trains on; without it DDP's reducer fails on the new shapes."""
    module = model()
    if ignored:
        keep_out_of_ddp(module)
    ddp = DistributedDataParallel(module)
    x = torch.randn(2, 3, 4, 4)
    for _ in range(2):  # DDP rebuilds its buckets once, after the first step; then they are fixed
        ddp(x).sum().backward()
    module[2].resize((4, 8))
    module.zero_grad()
    if not ignored:  # the reducer's hooks sit on the old gradient accumulators: the resized ones never report
        with pytest.raises(RuntimeError, match="did not receive grad"):
            for _ in range(2):
                ddp(x).sum().backward()
        return
    for _ in range(2):
        ddp(x).sum().backward()
    assert module[2].core.grad.shape == (4, 8)


def test_average_gradients_is_the_mean_over_processes_with_zeros_for_absent_gradients():
    """Two simulated processes: each parameter's gradient becomes the mean of theirs (a process without one
    contributes zeros, as in DDP); a parameter without a gradient anywhere keeps None. One reduce call."""
    torch.manual_seed(0)
    first, second = TuckerLinear(6, 5, ranks=(2, 2)), TuckerLinear(6, 5, ranks=(2, 2))
    for layer in (first, second):
        for p in (*layer.factors, layer.core):
            p.grad = torch.randn_like(p)
    second.core.grad = None
    first.factors[0].grad = second.factors[0].grad = None
    expected = {"core": first.core.grad / 2, "in": (first.factors[1].grad + second.factors[1].grad) / 2}
    buffers = []
    average_gradients([second], lambda flat: buffers.append(flat.clone()) or flat)
    calls = []
    present = average_gradients([first], lambda flat: calls.append(1) or (flat + buffers[0]) / 2)
    assert calls == [1]
    assert present.tolist() == [0.0, 1.0, 0.5]  # factors.0 on neither, factors.1 on both, core on one
    drop_absent([first], present.tolist())
    torch.testing.assert_close(first.core.grad, expected["core"])
    torch.testing.assert_close(first.factors[1].grad, expected["in"])
    assert first.factors[0].grad is None


def test_broadcast_layers_takes_the_first_process_values():
    source, target = model(), model()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    target[0].set_ranks((3, 2, 3, 3))
    first = {name: m for name, m in source.named_modules() if isinstance(m, (TuckerConv2d, TuckerLinear))}
    mine = {name: m for name, m in target.named_modules() if isinstance(m, (TuckerConv2d, TuckerLinear))}
    flats = {}

    def from_first(tensor):  # what rank 0 sends, in the order it sends it
        key = len(flats)
        flats[key] = tensor
        return tensor

    broadcast_layers(first, from_first)
    sent = iter(list(flats.values()))
    broadcast_layers(mine, lambda tensor: next(sent))
    for name, layer in mine.items():
        assert layer.ranks == first[name].ranks
        torch.testing.assert_close(layer.dense_weight(), first[name].dense_weight(), rtol=0, atol=0)
