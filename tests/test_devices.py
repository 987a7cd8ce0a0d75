"""The integrator's step on the layers' own device and dtype: no float64 for float32 or bf16 layers (checked on any
device), and, on CUDA (skipped without it), every tensor stays on the GPU and the step synchronizes with the host
only where documented: the finiteness check of every step, the rank decision of a truncating step, and each
eigen- or singular value decomposition (``torch.linalg.eigh``/``svd`` synchronize on CUDA)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lightning_lowrank as ll
from lightning_lowrank.tucker.truncation import store_dense

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def small_net(dtype: torch.dtype, device: str, dense_storage: bool = False) -> nn.Module:
    """Three Tucker layers at half rank, or (``dense_storage``) at full rank holding their weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    ll.convert(net, ll.TuckerConfig(rank="full" if dense_storage else 0.5))
    net = net.to(device=device, dtype=dtype)
    for layer in net.modules():
        if dense_storage and isinstance(layer, ll.TuckerLayer):
            layer.to_dense_storage()
    return net


def train_step(net, integrator, optimizer, device, dtype):
    x = torch.randn(8, 3, 8, 8, device=device, dtype=dtype)
    optimizer.zero_grad()
    net(x).float().square().mean().backward()
    integrator.step(optimizer)


class Float64Ops(TorchFunctionMode):
    """Names the torch functions that return a float64 tensor with entries (storage's ``replace_data`` makes an empty
    one of another dtype to drop autograd's accumulator: no computation)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() for t in outputs):
            self.seen.append(getattr(func, "__name__", repr(func)))
        return out


@pytest.mark.parametrize("method, dense_storage", [("parallel", False), ("augmented", False), ("parallel", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_computes_nothing_in_float64_for_lower_precision_layers(method, dense_storage, dtype):
    """Float64 is slow on most GPUs: the augmenting and truncating steps of float32 and bf16 layers (QR, eigh, SVD,
    the parallel gradient, the optimizer-state rotation; in dense storage the projection, the factorization and the
    way back to W, the factorization at the freeze) compute in float32 at most."""
    net = small_net(dtype, "cpu", dense_storage)
    integrator = ll.TuckerIntegrator(net, ll.IntegratorConfig(tau=0.45 if dense_storage else 0.2, method=method,
                                                              interval=2, core_steps=1, dense_storage=dense_storage,
                                                              dense_interval=1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    train_step(net, integrator, optimizer, "cpu", dtype)  # Adam's state exists before the recorded steps
    layers = [m for m in net.modules() if isinstance(m, ll.TuckerLayer)]
    with Float64Ops() as mode:
        for _ in range(4):  # augmenting, truncating and plain steps
            train_step(net, integrator, optimizer, "cpu", dtype)
            if dense_storage and integrator.steps == 3:  # projected some layers, factorized the others
                held = [layer.dense_storage for layer in layers]
                assert any(held) and not all(held), held
        if dense_storage:
            store_dense(next(layer for layer in layers if not layer.dense_storage), optimizer)  # the way back to W
            integrator.freeze(optimizer)  # factorizes the layers held dense
            assert not any(layer.dense_storage for layer in layers)
    assert integrator.steps == 5 and not mode.seen


def synchronizations(fn) -> int:
    """How many synchronizing CUDA operations ``fn`` calls (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_stays_on_the_gpu_and_synchronizes_only_where_documented(monkeypatch, dtype):
    net = small_net(dtype, "cuda")
    integrator = ll.TuckerIntegrator(net, ll.IntegratorConfig(tau=0.2, interval=3, core_steps=2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    decompositions = []
    for name in ("eigh", "svd"):
        original = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _f=original, **k: decompositions.append(1) or _f(*a, **k))
    releases = []  # the host heap is not the layers' memory: no trim however their ranks move
    monkeypatch.setattr("lightning_lowrank.tucker.integrator.release_host_memory", lambda: releases.append(1))
    x = torch.randn(8, 3, 8, 8, device="cuda", dtype=dtype)
    for step in range(7):
        optimizer.zero_grad()
        net(x).float().square().mean().backward()
        torch.cuda.synchronize()
        decompositions.clear()
        truncating = integrator.truncation_due
        syncs = synchronizations(lambda: integrator.step(optimizer))
        assert syncs <= 1 + truncating + len(decompositions), (step, syncs, truncating, len(decompositions))
    tensors = [*net.parameters(), *(v for s in optimizer.state.values() for v in s.values() if v.dim())]
    assert all(t.device.type == "cuda" for t in tensors)
    assert all(p.dtype == dtype for p in net.parameters())
    assert not releases
