"""Tucker layers against the dense torch layers they replace."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import assert_orthonormal, truncated_hosvd, unfold
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_lowrank import TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerLinear
from lightning_lowrank.tucker.forms import Grads
from lightning_lowrank.tucker.layers import TUCKER_LAYERS
from lightning_lowrank.tucker.storage import storage_size

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = [torch.float32, torch.float64]


def _conv_cases():
    """Every padding with every padding mode (where they interact), and every stride and dilation with an asymmetric
    padding, each mode once: each pair of option values that can interact meets in some case; bias alternates."""
    paddings = [0, 1, (1, 2), "same", "valid"]
    modes = ["zeros", "reflect", "replicate", "circular"]
    cases = [(1, padding, 1, mode) for padding in paddings for mode in modes]
    cases += [(1, padding, (2, 1), modes[i % 4]) for i, padding in enumerate(paddings)]
    cases += [(stride, padding, dilation, modes[i % 4]) for i, (stride, padding, dilation) in enumerate(
        itertools.product([2, (2, 1)], [(1, 2), "valid"], [1, (2, 1)]))]
    return [(*case, i % 2 == 0) for i, case in enumerate(cases)]


@pytest.mark.parametrize(("stride", "padding", "dilation", "padding_mode", "bias"), _conv_cases())
def test_conv2d_full_rank_matches_dense(stride, padding, dilation, padding_mode, bias):
    for dtype in DTYPES:
        torch.manual_seed(0)
        dense = nn.Conv2d(5, 7, (3, 4), stride, padding, dilation, bias=bias, padding_mode=padding_mode, dtype=dtype)
        tucker = TuckerConv2d.from_dense(dense)
        x = torch.randn(2, 5, 11, 12, dtype=dtype, requires_grad=True)
        y_dense, y = dense(x), tucker(x)
        torch.testing.assert_close(y, y_dense, **TOL[dtype])
        # the input gradient is the same map transposed
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_dense,) = torch.autograd.grad(y_dense, x, g)
        torch.testing.assert_close(gx, gx_dense, **TOL[dtype])


@pytest.mark.parametrize("dense_cls, tucker_cls, kernel, spatial", [
    (nn.Conv1d, TuckerConv1d, 3, (13,)),
    (nn.Conv3d, TuckerConv3d, (3, 2, 3), (6, 7, 5)),
])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, "same"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1d_conv3d_full_rank_match_dense(dense_cls, tucker_cls, kernel, spatial, padding_mode, padding, dtype):
    torch.manual_seed(0)
    dense = dense_cls(4, 6, kernel, padding=padding, dilation=2, padding_mode=padding_mode, dtype=dtype)
    tucker = tucker_cls.from_dense(dense)
    x = torch.randn(3, 4, *spatial, dtype=dtype)
    torch.testing.assert_close(tucker(x), dense(x), **TOL[dtype])
    torch.testing.assert_close(tucker(x[0]), dense(x[0]), **TOL[dtype])  # unbatched input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_matches_dense_with_leading_dims(dtype, bias):
    torch.manual_seed(0)
    dense = nn.Linear(9, 6, bias=bias, dtype=dtype)
    tucker = TuckerLinear.from_dense(dense)
    for shape in [(9,), (4, 9), (2, 3, 9)]:
        x = torch.randn(*shape, dtype=dtype)
        torch.testing.assert_close(tucker(x), dense(x), **TOL[dtype])


@pytest.mark.parametrize("dense, ranks", [
    (nn.Conv2d(6, 8, 3, padding=1, dtype=torch.float64), (3, 2, 3, 2)),
    (nn.Linear(10, 7, dtype=torch.float64), (4, 3)),
])
def test_reduced_rank_is_the_truncated_hosvd(dense, ranks):
    """At active ranks r the layer computes the dense layer whose weight is W projected on the top-r subspaces."""
    torch.manual_seed(0)
    tucker = type_for(dense).from_dense(dense)
    tucker.set_ranks(ranks)
    reference = type(dense)(*_dense_args(dense), dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(truncated_hosvd(dense.weight, ranks))
        reference.bias.copy_(dense.bias)
    x = torch.randn(2, *_input_shape(dense), dtype=torch.float64)
    torch.testing.assert_close(tucker(x), reference(x), rtol=1e-10, atol=1e-10)


def type_for(dense):
    return TuckerConv2d if isinstance(dense, nn.Conv2d) else TuckerLinear


def _dense_args(dense):
    if isinstance(dense, nn.Conv2d):
        return dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding
    return dense.in_features, dense.out_features


def _input_shape(dense):
    return (dense.in_channels, 9, 9) if isinstance(dense, nn.Conv2d) else (dense.in_features,)


@pytest.mark.parametrize("init", ["hosvd", "random"])
def test_factors_are_orthonormal(init):
    torch.manual_seed(0)
    layers = [TuckerConv2d.from_dense(nn.Conv2d(16, 32, 3), (8, 4, 3, 3), (16, 8, 3, 3), init=init),
              TuckerLinear.from_dense(nn.Linear(40, 30), (5, 5), (20, 20), init=init),
              TuckerConv2d(16, 32, 3, ranks=(4, 4, 3, 3))]  # reset_parameters
    for layer in layers:
        for u in layer.active_factors():
            assert_orthonormal(u)


def test_random_init_core_is_the_projection_of_the_dense_weight():
    """With random orthonormal factors at full rank the decomposition is still exact: core = W x_i U_i^T."""
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3, dtype=torch.float64)
    tucker = TuckerConv2d.from_dense(dense, init="random")
    torch.testing.assert_close(tucker.dense_weight(), dense.weight, rtol=1e-10, atol=1e-12)


def test_set_rank_keeps_the_storage_and_rank_is_a_persistent_buffer():
    layer = TuckerConv2d(8, 12, 3, ranks=(6, 4, 3, 3), max_ranks=(10, 8, 3, 3))
    assert layer.storage == (12, 8, 3, 3)  # 2r capped by the mode size, beyond max_rank
    shapes = [p.shape for p in layer.parameters()]
    layer.set_ranks((2, 3, 2, 3))
    assert [p.shape for p in layer.parameters()] == shapes
    assert layer.ranks == (2, 3, 2, 3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert state["rank"].tolist() == [2, 3, 2, 3]
    fresh = TuckerConv2d(8, 12, 3, ranks=(6, 4, 3, 3), max_ranks=(10, 8, 3, 3))
    fresh.load_state_dict(state)
    assert fresh.ranks == (2, 3, 2, 3)
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(fresh(x), layer(x))


def test_storage_size_is_twice_the_rank_on_a_ladder_with_hysteresis():
    """Room for the augmented basis (2r, capped by the mode size) on the ladder 2, 3, 4, 6, 8, 12, 16, 24, ...;
    from a current storage: grow when 2r exceeds it, shrink only to half of it or less."""
    assert [storage_size(100, r) for r in (1, 2, 3, 5, 6, 9, 13, 40, 50)] == [2, 4, 6, 12, 12, 24, 32, 96, 100]
    assert storage_size(10, 8) == 10
    assert storage_size(100, 21, current=96) == 48  # 48 <= 96 / 2: shrink
    assert storage_size(100, 25, current=96) == 96  # 64 > 96 / 2: stay
    assert storage_size(100, 49, current=96) == 100  # 98 > 96: grow
    for size, rank, current in itertools.product((7, 64, 100), range(1, 64), (2, 12, 48, 64)):
        if rank <= current <= size:
            s = storage_size(size, rank, current)
            assert min(size, 2 * rank) <= s <= size


def test_resize_keeps_the_parameters_their_leading_blocks_and_the_function():
    torch.manual_seed(0)
    layer = TuckerConv2d(8, 12, 3, ranks=(3, 2, 3, 3))
    layer(torch.randn(1, 8, 5, 5)).sum().backward()
    params = list(layer.parameters())
    x = torch.randn(2, 8, 6, 6)
    expected, weight = layer(x).detach(), layer.dense_weight().detach()
    core, grad = layer.active_core().detach().clone(), layer.core.grad[:3, :2].clone()
    for storage in [(12, 8, 3, 3), (3, 2, 3, 3)]:
        changed = layer.resize(storage)
        assert layer.storage == storage and [p.shape[1] for p in layer.factors] == list(storage)
        assert all(a is b for a, b in zip(layer.parameters(), params)) and changed
        assert layer.core.grad.shape == storage
        torch.testing.assert_close(layer.active_core(), core, rtol=0, atol=0)
        torch.testing.assert_close(layer.core.grad[:3, :2], grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.dense_weight(), weight, rtol=0, atol=0)
        torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match=r"`storage` \(2, 2, 3, 3\) must hold the active ranks \(3, 2, 3, 3\)"):
        layer.resize((2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"`storage` of mode 0 must be in \[1, 12\] \(the mode size\)"):
        layer.resize((13, 2, 3, 3))


def test_resize_while_an_old_graph_is_alive():
    """A previous step's loss still alive holds the parameters' gradient accumulators: after a resize, a new
    backward must not check gradients against the old shapes (guards ``replace_data``'s reliance on torch)."""
    layer = TuckerLinear(10, 8, ranks=(2, 2))
    x = torch.randn(4, 10)
    old = layer(x).sum()
    old.backward(retain_graph=True)
    layer.resize((8, 10))
    layer.zero_grad()
    layer(x).sum().backward()
    assert layer.core.grad.shape == (8, 10) and layer.factors[1].grad.shape == (10, 10)
    del old


def test_a_state_dict_of_another_storage_loads_at_that_storage():
    torch.manual_seed(0)
    source = TuckerLinear(16, 12, ranks=(3, 3))
    source.resize((12, 16))
    target = TuckerLinear(16, 12, ranks=(6, 6))
    params = list(target.parameters())
    target.load_state_dict(source.state_dict())
    assert target.storage == (12, 16) and target.ranks == (3, 3)
    assert all(a is b for a, b in zip(target.parameters(), params))
    x = torch.randn(5, 16)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def flops(layer, x, backward=False):
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
        if backward:
            y.sum().backward()
    return counter.get_total_flops()


LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384)


def width(rank, size):
    """The width an eager forward computes a mode at: the rank rounded up to the storage ladder, within the size."""
    return min(size, next(step for step in LADDER if step >= rank))


def force(monkeypatch, layer, form):
    """Make ``layer`` compute with ``form`` ('chain' or 'merged') whatever its costs."""
    costs = (1, 0) if form == "merged" else (0, 1)
    monkeypatch.setattr(type(layer), "forward_costs", lambda self, *args, **kwargs: costs)


@pytest.mark.parametrize("grads", [Grads(), Grads(input=False), Grads(factors=False), Grads(False, False, True),
                                   Grads(False, True, False), Grads(True, False, False), Grads(False, False, False)],
                         ids=["all", "no-input", "held-bases", "core-only", "factors-only", "frozen-layer", "no-grad"])
@pytest.mark.parametrize("form", ["chain", "merged"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_forward_costs_count_the_multiply_adds_of_each_form(monkeypatch, kind, form, grads):
    """With ELEMENT_COST 0 the costs are multiply-adds, which torch's FLOP counter counts independently (2 per
    multiply-add) in the forward and in the backward autograd runs: a product computes the gradient of each operand
    that needs one (the input, the factors, the core as ``grads`` says, or a tensor computed from one), so held
    bases, a frozen layer or an input without a gradient each drop some. The middle convolution's kernel, formed
    from the core and the spatial factors in both forms, is counted apart. The forward computes at the ranks rounded
    up to the storage ladder (5 -> 6), which the costs count by default."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = TuckerLinear(30, 20, ranks=(6, 6)), torch.randn(4, 6, 30)
    else:
        layer, x = TuckerConv2d(6, 8, 3, stride=2, padding=1, ranks=(5, 3, 3, 3)), torch.randn(2, 6, 9, 10)
    x.requires_grad_(grads.input)
    layer.core.requires_grad_(grads.core)
    layer.bias.requires_grad_(grads.core)
    for u in layer.factors:
        u.requires_grad_(grads.factors)
    backward = any(grads)
    with monkeypatch.context() as patch:
        patch.setattr("lightning_lowrank.tucker.forms.ELEMENT_COST", 0)
        costs = layer.forward_costs(x.shape, grads=grads)
    force(monkeypatch, layer, form)
    kernel = 0
    if kind == "conv2d":
        ranks = [width(r, n) for r, n in zip(layer.ranks, layer.shape)]  # 5 -> 6
        core = layer.core[tuple(slice(r) for r in ranks)]
        spatial = [u[:, :r] for u, r in zip(layer.factors[2:], ranks[2:])]
        with FlopCounterMode(display=False) as counter:
            out = layer._kernel(core, spatial)
            if out.requires_grad:
                out.sum().backward()
        kernel = counter.get_total_flops()
        layer.zero_grad()
    assert flops(layer, x, backward) == kernel + 2 * costs[("chain", "merged").index(form)]


def test_forward_costs_follow_the_closed_form_and_the_forward_switches_at_the_crossover():
    """Linear(300, 200) on 4 x 256 rows at ranks r_out = r_in = r, forward and backward: each product costs its
    multiply-adds plus 64 per element read or written, three times (forward, two gradients). The forward computes at
    the ranks rounded up to the storage ladder (the active block zero-padded: the same output) and takes the
    chain where its cost at those widths is at most the merged weight's, the merged weight beyond (FLOPs counted tell
    the forms apart); with its bases held the chain, whose factors then need no gradient, also past the crossover."""
    layer = TuckerLinear(300, 200)
    x = torch.randn(4, 256, 300, requires_grad=True)
    m, n_in, n_out = 1024, 300, 200

    def chain(o, i):
        macs = m * (n_in * i + i * o + o * n_out)
        elements = (m * n_in + n_in * i + m * i) + (m * i + i * o + m * o) + (m * o + o * n_out + m * n_out)
        return 3 * (macs + 64 * elements)

    def merged(o, i):
        macs = o * i * n_in + n_out * o * n_in + m * n_in * n_out
        elements = (o * i + n_in * i + o * n_in) + (n_out * o + o * n_in + n_out * n_in) + (
            m * n_in + n_out * n_in + m * n_out)
        return 3 * (macs + 64 * elements)

    def chain_flops(o, i):
        return 2 * m * (n_in * i + i * o + o * n_out)

    def merged_flops(o, i):
        return 2 * (m * n_in * n_out + o * i * n_in + n_out * o * n_in)

    crossover = next(r for r in range(1, 201) if merged(r, r) < chain(r, r))
    assert 64 < crossover <= 96  # ranks 49-64 compute at 64 and chain, 65-96 at 96 and merge
    assert layer.forward_costs(x.shape, (crossover,) * 2) == (chain(crossover, crossover),
                                                               merged(crossover, crossover))
    for rank, form in ((64, "chain"), (65, "merged"), (crossover - 1, "merged"), (10, "chain"), (200, "merged")):
        layer.set_ranks((rank, rank))
        o, i = width(rank, n_out), width(rank, n_in)
        assert layer.forward_costs(x.shape) == (chain(o, i), merged(o, i))
        assert (chain(o, i) <= merged(o, i)) == (form == "chain"), rank
        assert flops(layer, x) == (chain_flops(o, i) if form == "chain" else merged_flops(o, i)), rank
    # bases held (a window's core-only steps): the chain computes no factor gradients, the merged form still forms W
    layer.set_ranks((65, 65))
    layer.hold_bases = True
    assert flops(layer, x) == chain_flops(96, 96)


def test_a_thin_convolution_merges_where_its_chain_moves_more_memory_than_it_saves(monkeypatch):
    """LeNet5's first convolution (1 -> 20 channels, 5 x 5, on 28 x 28 inputs that need no gradient) at ranks 5/1:
    its chain has fewer multiply-adds, but writes and reads a 5-channel activation and computes the middle
    convolution's input gradient; measured 4-7x slower than the merged convolution on this package's CPU
    (docs/results.md, session 23). Counting the elements moved, the layer merges (the FLOP counter tells the forms
    apart). At ranks 1/1 the choice follows the input: merged without an input gradient, the chain with one (whose
    input gradient is the 1-channel map's, against the merged convolution's). A wide layer at a tenth of its ranks
    keeps the chain."""
    layer = TuckerConv2d(1, 20, 5, ranks=(5, 1, 5, 5))
    x = torch.randn(128, 1, 28, 28)
    with monkeypatch.context() as patch:
        patch.setattr("lightning_lowrank.tucker.forms.ELEMENT_COST", 0)
        chain_macs, merged_macs = layer.forward_costs(x.shape, grads=Grads(input=False))
    assert chain_macs < merged_macs
    chain, merged = layer.forward_costs(x.shape, grads=Grads(input=False))
    assert merged < chain
    # computed at r_out 6 (5 rounded up to the storage ladder, the active core zero-padded)
    merged_flops = 2 * (128 * 24 * 24 * 20 * 25 + 20 * 6 * 25)  # W = kernel x_1 U_out (x_2 U_in, 1 x 1: no FLOPs)
    kernel_flops = 2 * 2 * 6 * 25 * 5  # core x_3 U_h x_4 U_w
    assert flops(layer, x) == kernel_flops + merged_flops
    layer.set_ranks((1, 1, 5, 5))
    for input_grad, form in ((False, "merged"), (True, "chain")):
        x.requires_grad_(input_grad)
        with monkeypatch.context() as patch:
            force(patch, layer, form)
            expected = flops(layer, x, backward=True)
        layer.zero_grad()
        assert flops(layer, x, backward=True) == expected, input_grad
        layer.zero_grad()
    wide = TuckerConv2d(64, 128, 3, padding=1, ranks=(13, 6, 3, 3))
    chain, merged = wide.forward_costs((32, 64, 16, 16))
    assert chain < merged


@pytest.mark.parametrize("form", ["chain", "merged"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_dense", [
    lambda: nn.Linear(9, 6), lambda: nn.Conv2d(5, 7, (3, 4), 2, (1, 2), (2, 1), padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding="same", bias=False, padding_mode="circular"),
    lambda: nn.Conv1d(4, 6, 3, padding=1),
    lambda: nn.Conv3d(3, 5, (3, 2, 3), padding=1, dilation=2, padding_mode="replicate"),
], ids=["linear", "conv2d-reflect", "conv2d-circular", "conv1d", "conv3d-replicate"])
def test_either_form_gives_the_dense_layers_output_and_gradients(monkeypatch, form, dtype, make_dense):
    """Forced to either form at a reduced rank: output, input gradient and dL/dcore = dL/dW x_i U_i^T equal the dense
    layer with the same (merged) weight, and dL/dU_i equals dL/dW's contraction with the rest of the factorization.
    (The dense layer is made in the test, from the seed: weights made at import would depend on the tests imported
    before.)"""
    torch.manual_seed(0)
    dense = make_dense()
    tucker = {nn.Linear: TuckerLinear, nn.Conv1d: TuckerConv1d, nn.Conv2d: TuckerConv2d,
              nn.Conv3d: TuckerConv3d}[type(dense)].from_dense(dense.to(dtype))
    tucker.set_ranks((3, 2, *tucker.ranks[2:]))
    force(monkeypatch, tucker, form)
    reference = tucker.to_dense()
    reference.weight.requires_grad_(True)
    x = torch.randn(2, *_sizes(dense), dtype=dtype, requires_grad=True)
    y, y_dense = tucker(x), reference(x)
    torch.testing.assert_close(y, y_dense, **TOL[dtype])
    g = torch.randn_like(y)
    (gx, *grads) = torch.autograd.grad(y, [x, tucker.core, *tucker.factors], g)
    gx_dense, gw = torch.autograd.grad(y_dense, [x, reference.weight], g)
    torch.testing.assert_close(gx, gx_dense, **TOL[dtype])
    core, factors = tucker.core.detach(), [u.detach() for u in tucker.factors]
    expected_core = gw
    for mode, u in enumerate(factors):
        expected_core = torch.movedim(torch.tensordot(u.T, expected_core, dims=([1], [mode])), 0, mode)
    active = tuple(slice(r) for r in tucker.ranks)
    torch.testing.assert_close(grads[0][active], expected_core[active], **TOL[dtype])
    for mode in range(len(factors)):  # dL/dU_i = Mat_i(dL/dW) Mat_i(C x_{j != i} U_j)^T
        rest = core
        for other, u in enumerate(factors):
            if other != mode:
                rest = torch.movedim(torch.tensordot(u, rest, dims=([1], [other])), 0, other)
        unfold = lambda t: torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)  # noqa: E731
        expected = unfold(gw) @ unfold(rest).T
        r = tucker.ranks[mode]
        torch.testing.assert_close(grads[1 + mode][:, :r], expected[:, :r], **TOL[dtype])


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("layout", ["batched", "unbatched", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_dense", [
    lambda: nn.Conv2d(5, 7, (3, 4), 2, (1, 2), (2, 1), padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding="same", bias=False, padding_mode="circular"),
    lambda: nn.Conv1d(4, 6, 3, padding=1),
    lambda: nn.Conv3d(3, 5, (3, 2, 3), padding=1, dilation=2, padding_mode="replicate"),
], ids=["conv2d-reflect", "conv2d-circular", "conv1d", "conv3d-replicate"])
def test_the_chain_without_autograd_gives_the_dense_layers_output(monkeypatch, make_dense, dtype, layout, context):
    """Where autograd records nothing, the chain's channel maps are matrix products: the output equals the dense layer
    with the merged weight (any memory format in), and only the middle convolution runs as one (three while autograd
    records for the input; the middle and the last map when only the bias trains, whose gradient equals the dense
    layer's)."""
    torch.manual_seed(0)
    dense = make_dense().to(dtype)
    tucker = {nn.Conv1d: TuckerConv1d, nn.Conv2d: TuckerConv2d, nn.Conv3d: TuckerConv3d}[type(dense)].from_dense(dense)
    tucker.set_ranks((3, 2, *tucker.ranks[2:]))
    force(monkeypatch, tucker, "chain")
    reference = tucker.to_dense()
    x = torch.randn(2, *_sizes(dense), dtype=dtype)
    if layout == "unbatched":
        x = x[0]
    elif layout == "channels_last":  # channels in the last stride, for any number of spatial dimensions
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    convolutions = []
    monkeypatch.setattr(tucker, "_conv", lambda *args, conv=tucker._conv: convolutions.append(1) or conv(*args))
    with context():
        y = tucker(x)
    torch.testing.assert_close(y, reference(x), **TOL[dtype])
    assert len(convolutions) == 1
    convolutions.clear()
    tucker(x.requires_grad_(True)).sum().backward()
    assert len(convolutions) == 3
    if tucker.bias is not None:  # only the bias trains: autograd records the last map, a convolution
        convolutions.clear()
        tucker.requires_grad_(False).bias.requires_grad_(True)
        reference.requires_grad_(False).bias.requires_grad_(True)
        g = torch.randn_like(y)
        (bias_grad,) = torch.autograd.grad(tucker(x.detach()), [tucker.bias], g)
        torch.testing.assert_close(bias_grad, torch.autograd.grad(reference(x.detach()), [reference.bias], g)[0])
        assert len(convolutions) == 2


def _sizes(dense):
    spatial = {nn.Linear: (), nn.Conv1d: (13,), nn.Conv2d: (11, 12), nn.Conv3d: (6, 7, 5)}[type(dense)]
    return (dense.in_features,) if isinstance(dense, nn.Linear) else (dense.in_channels, *spatial)


def test_parameter_counts_and_repr():
    layer = TuckerLinear(200, 10, ranks=(4, 4), max_ranks=(8, 6))
    assert layer.num_parameters() == 10 * 4 + 200 * 4 + 4 * 4 + 10
    assert layer.dense_num_parameters() == 200 * 10 + 10
    conv = TuckerConv2d(16, 32, 3, bias=False, ranks=(8, 4, 3, 3))
    assert conv.num_parameters() == 32 * 8 + 16 * 4 + 2 * 3 * 3 + 8 * 4 * 3 * 3
    assert conv.dense_num_parameters() == 32 * 16 * 9
    assert "ranks=(4, 4)" in repr(layer) and "max_ranks=(8, 6)" in repr(layer)


def test_full_rank_is_capped_by_the_unfolding_rank():
    """A 10x200 weight has rank at most 10 in both modes; conv 64x3x3x3 at most 27 in the output mode."""
    assert TuckerLinear(200, 10).max_ranks == (10, 10)
    assert TuckerConv2d(3, 64, 3).max_ranks == (27, 3, 3, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranks=(0, 4)), r"`ranks` of mode 0 must be in \[1, 8\]"),
    (dict(ranks=(9, 4)), r"`ranks` of mode 0 must be in \[1, 8\]"),
    (dict(max_ranks=(11, 4)), r"`max_ranks` of mode 0 must be in \[1, 10\]"),
    (dict(ranks=(2,)), r"`ranks` needs one rank per mode \(2\)"),
])
def test_bad_ranks_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuckerLinear(20, 10, **({"max_ranks": (8, 8)} | kwargs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(padding_mode="mirror"), "`padding_mode` must be one of"),
    (dict(padding="full"), "`padding` must be an int, a tuple, 'same' or 'valid'"),
    (dict(padding="same", stride=2), "not supported for strided convolutions"),
    (dict(stride=(1, 2, 3)), r"`stride` must be an int >= 1 or a tuple of 2 such ints"),
    (dict(stride=0), r"`stride` must be an int >= 1"),
    (dict(padding=-1), r"`padding` must be an int >= 0"),
    (dict(kernel_size=2.5), r"`kernel_size` must be an int >= 1"),
    (dict(in_channels=0), r"`in_channels` must be an int >= 1, got 0"),
    (dict(out_channels=3.5), r"`out_channels` must be an int >= 1, got 3.5"),
])
def test_bad_conv_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuckerConv2d(**({"in_channels": 4, "out_channels": 4, "kernel_size": 3} | kwargs))


@pytest.mark.parametrize("sizes, message", [
    ((6.5, 5), r"`in_features` must be an int >= 1, got 6.5"),
    ((0, 5), r"`in_features` must be an int >= 1, got 0"),
    ((6, True), r"`out_features` must be an int >= 1, got True"),
])
def test_bad_linear_sizes_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        TuckerLinear(*sizes)


@pytest.mark.parametrize("ranks", [(2.7, 2), (2, "2"), (True, 2)])
def test_set_ranks_takes_ints_only(ranks):
    layer = TuckerLinear(6, 5)
    with pytest.raises(ValueError, match="`ranks` must be a sequence of ints"):
        layer.set_ranks(ranks)
    assert layer.ranks == (5, 5) and layer.state_dict()["rank"].tolist() == [5, 5]


def test_inconsistent_ranks_are_refused_and_conversion_makes_them_consistent():
    message = r"`ranks` \(3, 4\) must satisfy r_i <= product of the other ranks, as \(3, 3\)"
    with pytest.raises(ValueError, match=message):
        TuckerLinear(12, 10, ranks=(3, 4))
    with pytest.raises(ValueError, match=r"as \(4, 2, 2, 1\)"):
        TuckerConv2d(4, 6, 3, ranks=(6, 2, 2, 1))
    assert TuckerLinear(200, 10).ranks == (10, 10)


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


def test_raising_a_rank_extends_the_core_by_zeros():
    """Lowering then raising a rank gives the truncated weight (W unchanged by the raise); storage outside the active
    block holds zeros, so a forward at the storage ranks (what torch.compile runs) equals the active-rank forward."""
    torch.manual_seed(0)
    layer = TuckerConv2d(6, 8, 3, padding=1)
    layer.set_ranks((3, 2, 3, 3))
    truncated = layer.dense_weight().detach().clone()
    layer.set_ranks((6, 5, 3, 3))
    torch.testing.assert_close(layer.dense_weight(), truncated, rtol=0, atol=1e-6)
    outside = layer.core.detach().clone()
    outside[:3, :2] = 0
    assert torch.count_nonzero(outside) == 0
    x = torch.randn(2, 6, 5, 5)
    storage = torch.nn.functional.conv2d(x, truncated, layer.bias, padding=1)
    torch.testing.assert_close(torch.compile(layer, backend="eager")(x), storage, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense, tucker, true_ranks", [
    (nn.Linear(20, 12), TuckerLinear(20, 12), (3, 3)),
    (nn.Conv2d(6, 8, 3, padding=1), TuckerConv2d(6, 8, 3, padding=1), (2, 6, 3, 3)),
])
def test_a_dense_layers_state_loads_at_its_numerical_ranks(dense, tucker, true_ranks):
    """The merged weights of a checkpoint load into a Tucker layer: W kept, ranks = the weight's Tucker ranks."""
    torch.manual_seed(0)
    with torch.no_grad():
        rank, (rows, cols) = true_ranks[0], dense.weight.flatten(1).shape
        dense.weight.copy_((torch.randn(rows, rank) @ torch.randn(rank, cols)).reshape(dense.weight.shape))
    assert not tucker.load_state_dict(dense.state_dict()).missing_keys  # strict by default: every entry matched
    assert tucker.ranks == true_ranks
    x = torch.randn(2, 6, 5, 5) if isinstance(dense, nn.Conv2d) else torch.randn(4, 20)
    torch.testing.assert_close(tucker(x), dense(x), rtol=1e-4, atol=1e-5)
    assert_orthonormal(tucker.factors[0].detach().double(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("true_rank", [None, 64])
def test_a_dense_state_in_any_precision_loads_within_its_dtypes_rounding(dtype, true_rank):
    """Reference: the dense weight itself. The numerical rank rule cuts only what lies below the rounding of W in its
    own dtype (bf16 eps x width used to exceed s_max: a bf16 256 x 256 layer loaded at rank 1, 99% weight error). A
    merged rank-64 weight (a trained low-rank layer's checkpoint) comes back at rank <= 64, exactly 64 in
    float32/float64."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 256, dtype=torch.float64)
    if true_rank is not None:
        with torch.no_grad():
            dense.weight.copy_(torch.randn(256, true_rank, dtype=torch.float64)
                               @ torch.randn(true_rank, 256, dtype=torch.float64) / 256)
    dense = dense.to(dtype)
    tucker = TuckerLinear(256, 256, dtype=dtype)
    tucker.load_state_dict(dense.state_dict())
    eps = torch.finfo(dtype).eps
    error = (tucker.dense_weight().double() - dense.weight.double()).norm() / dense.weight.double().norm()
    assert error <= max(2 * eps, 1e-13), (tucker.ranks, float(error))  # 1e-13: float64 arithmetic of the HOSVD
    if true_rank is None:
        assert min(tucker.ranks) >= 200, tucker.ranks
    else:
        assert max(tucker.ranks) <= true_rank
        if dtype in (torch.float32, torch.float64):
            assert tucker.ranks == (true_rank, true_rank)
    x = torch.randn(8, 256, dtype=torch.float64)
    y = nn.functional.linear(x, dense.weight.double(), dense.bias.double())
    assert (tucker.to(torch.float64)(x) - y).norm() / y.norm() <= max(4 * eps, 1e-13)


def test_a_checkpointed_low_rank_layer_reloads_at_its_ranks_in_bf16():
    """The checkpoint path of a module converting in `configure_model` after bf16-true training: merged weights
    (formed in float64, rounded once to bf16) load back at the trained ranks' scale of error, not at rank 1."""
    torch.manual_seed(0)
    trained = TuckerLinear(256, 256, ranks=(64, 64), dtype=torch.bfloat16)
    merged = {"weight": trained.dense_weight().detach(), "bias": trained.bias.detach()}
    loaded = TuckerLinear(256, 256, dtype=torch.bfloat16)
    loaded.load_state_dict(merged)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    expected = trained(x).double()
    assert (loaded(x).double() - expected).norm() / expected.norm() < 0.02  # bf16 arithmetic; was 0.81
    assert 56 <= min(loaded.ranks) and max(loaded.ranks) <= 64


def test_deferred_initialisation_keeps_the_active_ranks():
    """meta device -> to_empty -> reset_parameters (FSDP-style deferred init): the saved rank is the active rank."""
    with torch.device("meta"):
        layer = TuckerLinear(16, 12, ranks=(4, 4))
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.state_dict()["rank"].tolist() == [4, 4] and layer.ranks == (4, 4)
    assert_orthonormal(layer.factors[0].detach().double(), atol=1e-6)
    fresh = TuckerLinear(16, 12, ranks=(4, 4))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.ranks == (4, 4)


@pytest.mark.parametrize("rank, message", [
    ([0, 0], r"state entry rank: `rank` of mode 0 must be in \[1, 12\]"),
    ([13, 13], r"state entry rank: `rank` of mode 0 must be in \[1, 12\]"),
    ([4, 17], r"state entry rank: `rank` of mode 1 must be in \[1, 16\] \(the stored core's shape\)"),
    ([4, 4, 4], r"state entry rank: `rank` needs one rank per mode"),
])
def test_a_state_dict_with_impossible_ranks_is_refused(rank, message):
    source = TuckerLinear(16, 12).state_dict()
    source["rank"] = torch.tensor(rank)
    layer = TuckerLinear(16, 12)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(source)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_hosvd_scaled_keeps_the_scale_of_a_random_init_below_full_rank():
    """From torch's random init at 10% of the channels: the truncated HOSVD keeps a small part of W's energy and its
    output shrinks (about sqrt(r/n)); ``hosvd_scaled`` has ||W_r|| = ||W|| and an output of the dense layer's scale,
    in the span of the truncated HOSVD. At full rank both are exact."""
    torch.manual_seed(0)
    dense = nn.Conv2d(32, 64, 3, padding=1, dtype=torch.float64)
    x = torch.randn(8, 32, 10, 10, dtype=torch.float64)
    reference = dense(x).std()
    truncated = TuckerConv2d.from_dense(dense, ranks=(6, 4, 3, 3))
    scaled = TuckerConv2d.from_dense(dense, ranks=(6, 4, 3, 3), init="hosvd_scaled")
    assert float(torch.linalg.norm(truncated.dense_weight())) < 0.5 * float(torch.linalg.norm(dense.weight))
    torch.testing.assert_close(torch.linalg.norm(scaled.dense_weight()), torch.linalg.norm(dense.weight))
    no_bias = (dense.weight.detach(), truncated.dense_weight(), scaled.dense_weight())
    ratio = torch.linalg.norm(no_bias[2]) / torch.linalg.norm(no_bias[1])
    torch.testing.assert_close(no_bias[2], ratio * no_bias[1])  # the same directions, rescaled
    assert 0.7 < float(scaled(x).std() / reference) < 1.3 and float(truncated(x).std() / reference) < 0.6
    full = TuckerConv2d.from_dense(dense, init="hosvd_scaled")
    torch.testing.assert_close(full.dense_weight(), dense.weight.detach(), rtol=1e-10, atol=1e-12)


def test_the_ranks_have_one_record_that_the_state_round_trips():
    """No buffer holds the ranks (a DDP buffer broadcast or an assignment cannot set them apart from ``ranks``): the
    state entry ``rank`` is written from ``ranks``; loading it sets ``ranks`` and leaves the caller's dict as it was."""
    torch.manual_seed(0)
    layer, other = TuckerConv2d(6, 8, 3, ranks=(3, 2, 2, 3)), TuckerConv2d(6, 8, 3)
    assert dict(layer.named_buffers()) == {}
    state = layer.state_dict()
    assert state["rank"].tolist() == [3, 2, 2, 3]
    other.load_state_dict(state)
    assert other.ranks == (3, 2, 2, 3) and "rank" in state
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(other(x), layer(x))
    layer.set_ranks((2, 2, 1, 2))
    assert layer.state_dict()["rank"].tolist() == [2, 2, 1, 2]


def test_checkpoints_written_with_the_earlier_argument_names_rebuild():
    """The structure a checkpoint records under the constructor's earlier names (`rank`, `max_rank`) rebuilds the
    same layer as the current names."""
    from lightning_lowrank.lightning.checkpoint import rebuild

    layer = TuckerConv2d(4, 6, 3, ranks=(3, 2, 2, 3), max_ranks=(5, 4, 3, 3))
    current = layer.arguments()
    earlier = {{"ranks": "rank", "max_ranks": "max_rank"}.get(k, k): v for k, v in current.items()}
    for arguments in (current, earlier):
        model = rebuild(nn.Sequential(nn.Conv2d(4, 6, 3)), {"layers": {"0": {"type": "TuckerConv2d",
                                                                           "arguments": arguments}}})
        assert (model[0].ranks, model[0].max_ranks) == ((3, 2, 2, 3), (5, 4, 3, 3))


# --- dense storage (a start whose factors would store more than W) -------------------------------------------------

DENSE_CASES = [
    lambda dtype: nn.Linear(7, 5, dtype=dtype),
    lambda dtype: nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, padding_mode="reflect", dtype=dtype),
    lambda dtype: nn.Conv1d(2, 3, 3, dilation=2, padding="same", bias=False, dtype=dtype),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", DENSE_CASES, ids=["linear", "conv2d", "conv1d"])
def test_dense_storage_stores_computes_and_differentiates_as_the_dense_layer(make, dtype):
    """Reference: the dense layer itself: W kept (to the HOSVD round trip's rounding), its parameter count, and with
    the same W the same outputs, input gradients and weight gradient."""
    torch.manual_seed(0)
    dense = make(dtype)
    tucker = TUCKER_LAYERS[type(dense)].from_dense(dense)
    ranks = tucker.ranks
    tucker.to_dense_storage()
    assert tucker.dense_storage and tucker.ranks == ranks and tucker.storage == tuple(dense.weight.shape)
    assert [tuple(u.shape) for u in tucker.factors] == [(n, 0) for n in tucker.shape]
    assert sum(p.numel() for p in tucker.parameters()) == sum(p.numel() for p in dense.parameters())
    torch.testing.assert_close(tucker.core, dense.weight, **TOL[dtype])
    with torch.no_grad():
        dense.weight.copy_(tucker.core)
    x = torch.randn(2, *([7] if isinstance(dense, nn.Linear) else [dense.in_channels, 9, 8][:dense.weight.ndim - 1]),
                    dtype=dtype, requires_grad=True)
    y, y_dense = tucker(x), dense(x)
    torch.testing.assert_close(y, y_dense, rtol=0, atol=0)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, tucker.core), g)
    grads_dense = torch.autograd.grad(y_dense, (x, dense.weight), g)
    for a, b in zip(grads, grads_dense):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(tucker.to_compact()(x), y_dense, **TOL[dtype])  # the dense layer: no chain pays


def test_dense_storage_round_trips_through_state_dicts_of_either_storage():
    """A dense-storage state loads into a layer storing factors (and the reverse), by the factors' stored columns;
    a plain dense ``weight`` entry loads into dense storage as it is."""
    torch.manual_seed(0)
    held = TuckerConv2d(3, 4, 3)
    held.to_dense_storage()
    held.set_ranks((2, 3, 3, 3))
    factored = TuckerConv2d(3, 4, 3, ranks=(2, 2, 3, 3))
    factored.load_state_dict(held.state_dict())
    assert factored.dense_storage and factored.ranks == (2, 3, 3, 3) and torch.equal(factored.core, held.core)
    other = TuckerConv2d(3, 4, 3, ranks=(2, 2, 3, 3))
    held.load_state_dict(other.state_dict())
    assert not held.dense_storage and held.ranks == (2, 2, 3, 3) and held.storage == other.storage
    torch.testing.assert_close(held.dense_weight(), other.dense_weight(), rtol=0, atol=0)
    dense = nn.Linear(6, 4)
    layer = TuckerLinear(6, 4)
    layer.to_dense_storage()
    layer.load_state_dict(dense.state_dict())
    assert layer.dense_storage and torch.equal(layer.core, dense.weight) and layer.ranks == (4, 4)


def test_factorize_keeps_the_weight_in_its_bases_span_at_the_storage_of_its_ranks():
    """Reference: the truncated HOSVD (explicit SVDs) at the ranks of the given bases; the Parameter objects stay."""
    torch.manual_seed(0)
    layer = TuckerConv2d(6, 8, 3, dtype=torch.float64)
    layer.to_dense_storage()
    parameters = [id(p) for p in layer.parameters()]
    weight = layer.core.detach().clone()
    ranks = (3, 4, 3, 2)
    bases = [torch.linalg.svd(unfold(weight, mode), full_matrices=False)[0][:, :r] for mode, r in enumerate(ranks)]
    changed = layer.factorize(bases)
    assert not layer.dense_storage and layer.ranks == ranks
    assert layer.storage == tuple(storage_size(n, r) for n, r in zip(layer.shape, ranks))
    assert [id(p) for p in layer.parameters()] == parameters and {id(p) for p, _ in changed} == set(parameters) - {
        id(layer.bias)}
    torch.testing.assert_close(layer.dense_weight(), truncated_hosvd(weight, ranks), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="takes a layer in dense storage"):
        layer.factorize(bases)


def test_a_dense_storage_layer_exports_its_factor_chain_at_its_ranks():
    """W held whole at multilinear ranks whose chain pays: the export is that chain, computing W (reference: the
    dense layer with W)."""
    torch.manual_seed(0)
    layer = TuckerLinear(40, 30, dtype=torch.float64)
    layer.to_dense_storage()
    with torch.no_grad():
        layer.core.copy_(truncated_hosvd(layer.core, (3, 3)))
    layer.set_ranks((3, 3))
    compact = layer.to_compact()
    assert isinstance(compact, nn.Sequential) and sum(p.numel() for p in compact.parameters()) < 40 * 30
    x = torch.randn(5, 40, dtype=torch.float64)
    torch.testing.assert_close(compact(x), nn.functional.linear(x, layer.core, layer.bias), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_the_forward_computes_at_ladder_widths_and_stays_the_active_ranks_computation(kind):
    """Ranks 5 compute at 6 (the storage ladder), 13 and 16 both at 16 (one shape for the allocator where the rank
    moves between them), 17 at 24 or at the mode size 20; yet output and gradients are those of the active block
    alone, whatever the storage holds outside it: a dense reference at the active ranks (float64), and zero gradients
    outside the block."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = TuckerLinear(20, 30, ranks=(5, 5), max_ranks=(20, 20)), torch.randn(7, 20, dtype=torch.float64)
    else:
        layer = TuckerConv2d(20, 30, 3, padding=1, ranks=(5, 5, 3, 3), max_ranks=(20, 20, 3, 3))
        x = torch.randn(2, 20, 6, 6, dtype=torch.float64)
    layer.double()
    with torch.no_grad():  # garbage outside the active block, which the forward must not read
        for u, r in zip(layer.factors, layer.ranks):
            u[:, r:] = torch.randn_like(u[:, r:])
        block = tuple(slice(r) for r in layer.ranks)
        kept = layer.core[block].clone()
        layer.core.normal_()
        layer.core[block] = kept
    assert layer.forward_ranks()[:2] == (6, 6)
    x.requires_grad_(True)
    y = layer(x)
    weights = [u[:, :r].detach().clone().requires_grad_(True) for u, r in zip(layer.factors, layer.ranks)]
    core = kept.clone().requires_grad_(True)
    weight = core
    for mode, u in enumerate(weights):  # W = C x_1 U_1 ... x_d U_d
        weight = torch.movedim(torch.tensordot(weight, u, dims=([mode], [1])), -1, mode)
    reference = (nn.functional.linear(x, weight, layer.bias) if kind == "linear"
                 else nn.functional.conv2d(x, weight, layer.bias, padding=1))
    torch.testing.assert_close(y, reference)
    grad = torch.randn_like(y)
    y.backward(grad)
    reference.backward(grad)
    for u, ref, r in zip(layer.factors, weights, layer.ranks):
        torch.testing.assert_close(u.grad[:, :r], ref.grad)
        assert not u.grad[:, r:].any()
    torch.testing.assert_close(layer.core.grad[block], core.grad)
    outside = layer.core.grad.clone()
    outside[block] = 0
    assert not outside.any()
    for rank, widths in ((13, (16, 16)), (16, (16, 16)), (17, (24, 20))):  # out 30, in 20 channels
        layer.set_ranks((rank, rank, *layer.ranks[2:]))
        assert layer.forward_ranks()[:2] == widths
