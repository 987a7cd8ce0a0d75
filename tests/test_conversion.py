"""convert, compact, to_dense and summary on whole models, against the dense models they came from."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from reference import assert_orthonormal, truncated_hosvd
from torch import nn

import lightning_lowrank as ll


def small_cnn(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding="same", bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_full_rank_conversion_is_exact(dtype, tol):
    model = small_cnn(dtype)
    x = torch.randn(4, 3, 12, 12, dtype=dtype)
    expected = model(x)
    report = ll.convert(model)
    assert report.converted == ["0", "2", "4", "8", "10"]
    assert all(isinstance(model[i], ll.TuckerLayer) for i in (0, 2, 4, 8, 10))
    assert relative_error(model(x), expected) < tol
    for layer in (model[i] for i in (0, 2, 4, 8, 10)):
        for u in layer.active_factors():
            assert_orthonormal(u, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_convert_is_idempotent():
    model = small_cnn()
    ll.convert(model, rank=0.5, include=["2", "8"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    report = ll.convert(model, rank=0.5, include=["2", "8"])
    assert report.converted == []
    assert dict(model.named_modules()) == modules
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_ranks_from_int_fraction_and_full():
    model = small_cnn()
    ll.convert(model, rank=0.25, max_rank=0.5, include="4")
    assert model[4].ranks == (8, 8, 3, 3) and model[4].max_ranks == (16, 16, 3, 3)
    ll.convert(model, rank=5, max_rank=12, kernel_rank=2, include="8")
    assert model[8].ranks == (5, 5) and model[8].max_ranks == (12, 12)
    ll.convert(model, kernel_rank=2, include="2")
    assert model[2].ranks == (32, 16, 2, 2) and model[2].max_ranks == (32, 16, 3, 3)


def test_initial_rank_gives_the_truncated_hosvd_model():
    """Converting at reduced rank equals the dense model with every weight replaced by its truncated HOSVD."""
    model = small_cnn(torch.float64)
    reference = copy.deepcopy(model)
    ll.convert(model, rank=0.5, include=["2", "4", "8"])
    with torch.no_grad():
        for i in (2, 4, 8):
            reference[i].weight.copy_(truncated_hosvd(reference[i].weight, model[i].ranks))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


def test_selection_by_type_pattern_size_and_ends():
    model = small_cnn()
    report = ll.convert(model, layer_types=[nn.Conv2d], exclude=["4"], keep_first_last=True)
    assert report.converted == ["2"]
    assert report.skipped == {"0": "first or last layer (`keep_first_last`)", "4": "matched by `exclude`",
                              "8": "Linear is not among `layer_types`", "10": "Linear is not among `layer_types`"}

    model = small_cnn()
    report = ll.convert(model, min_size=5000)  # 16*32*9=4608 and 64*10 are too small
    assert report.converted == ["4", "8"]
    assert set(report.skipped) == {"0", "2", "10"}


def test_first_and_last_stay_the_same_on_reconversion():
    model = small_cnn()
    ll.convert(model, keep_first_last=True)
    report = ll.convert(model, keep_first_last=True)
    assert report.converted == [] and isinstance(model[0], nn.Conv2d) and isinstance(model[10], nn.Linear)


def test_grouped_conv_is_left_dense_with_a_warning():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3))
    with pytest.warns(UserWarning, match=r"layer '0' is not converted: grouped convolution \(groups=2\)"):
        report = ll.convert(model)
    assert report.converted == ["1"] and isinstance(model[0], nn.Conv2d)


def test_subclasses_with_their_own_forward_are_not_converted():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(8, 8), nn.Linear(8, 8))
    report = ll.convert(model)
    assert report.converted == ["1"] and report.skipped == {"0": "Scaled has no Tucker form"}


def test_device_and_dtype_follow_the_layer():
    model = small_cnn(torch.float64)
    ll.convert(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert {t.device for t in model.state_dict().values()} == {torch.device("cpu")}  # the saved ranks too


@pytest.mark.parametrize("options, message", [
    (dict(rank=0), "`rank` must be an int >= 1, a fraction in \\(0, 1\\] or 'full' or None \\(a quarter, within "
                   "`max_rank` and a storage budget\\), got 0"),
    (dict(rank=-3), "`rank` must be an int >= 1"),
    (dict(max_rank=1.5), "`max_rank` must be an int >= 1, a fraction in \\(0, 1\\]"),
    (dict(rank=0.0), "`rank` must be"),
    (dict(kernel_rank="half"), "`kernel_rank` must be"),
    (dict(rank=True), "`rank` must be"),
    (dict(rank=8, max_rank=4), "`rank` \\(8\\) must not exceed `max_rank` \\(4\\)"),
    (dict(include=["net.*", 3]), "`include` must be a glob pattern or a sequence of them"),
    (dict(min_size=-1), "`min_size` must be an int >= 0"),
    (dict(init="svd"), "`init` must be 'hosvd', 'hosvd_scaled' or 'random'"),
    (dict(layer_types=[nn.LSTM]), "`layer_types` must be among"),
])
def test_bad_options_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        ll.TuckerConfig(**options)


def test_bad_input_against_the_model():
    with pytest.raises(ValueError, match="`include` pattern 'features.*' matches no module"):
        ll.convert(small_cnn(), include="features.*")
    with pytest.raises(ValueError, match="`exclude` pattern 'head' matches no module"):
        ll.convert(small_cnn(), exclude=["head"])
    model = small_cnn()
    with pytest.raises(ValueError, match="layer '2', mode 1: rank 20 exceeds the mode size 16"):
        ll.convert(model, rank=20, include=["2"])
    assert isinstance(model[2], nn.Conv2d)
    with pytest.raises(ValueError, match="nothing to convert in Sequential"), pytest.warns(UserWarning, match="groups"):
        ll.convert(nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 3, groups=2)))
    with pytest.raises(TypeError, match="either `config` or keyword options"):
        ll.convert(small_cnn(), ll.TuckerConfig(), rank=2)


def test_rank_error_leaves_the_model_unchanged():
    """Ranks are resolved for every layer before any layer is replaced."""
    model = small_cnn()
    with pytest.raises(ValueError, match="layer '10', mode 0: rank 20 exceeds the mode size 10"):
        ll.convert(model, rank=20, exclude=["0", "2"])  # layers 4 and 8, planned before 10, would fit
    assert not any(isinstance(m, ll.TuckerLayer) for m in model.modules())


def trained_looking(model: nn.Module) -> nn.Module:
    """Convert at full rank, then cut ranks, so that compact/to_dense are tested at ranks below the maximum."""
    ll.convert(model)
    for layer in model.modules():
        if isinstance(layer, ll.TuckerLayer):
            layer.set_ranks([max(1, r // 2) if i < 2 else r for i, r in enumerate(layer.max_ranks)])
    return model


def test_compact_equals_the_factorized_model_with_plain_layers():
    model = trained_looking(small_cnn(torch.float64))
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    compact = ll.compact(model)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-10, atol=1e-10)
    assert all(type(m).__module__.startswith("torch.nn") for m in compact.modules())
    # the training model is untouched
    assert isinstance(model[2], ll.TuckerConv2d)
    # conv: C_in -> r_in (1x1), r_in -> r_out (kxk), r_out -> C_out (1x1); linear: two layers, min rank inside
    conv = compact[2]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in conv] == [
        (16, 8, (1, 1)), (8, 16, (3, 3)), (16, 32, (1, 1))]
    assert [(lin.in_features, lin.out_features) for lin in compact[8]] == [(128, 32), (32, 64)]


def test_compact_float32_to_1e5_and_torch_export():
    model = trained_looking(small_cnn())
    x = torch.randn(2, 3, 12, 12)
    compact = ll.compact(model).eval()
    assert relative_error(compact(x), model(x)) < 1e-5
    program = torch.export.export(compact, (x,))
    assert relative_error(program.module()(x), model(x)) < 1e-5


def test_compact_loads_without_lightning_lowrank(tmp_path):
    model = trained_looking(small_cnn())
    x = torch.randn(2, 3, 12, 12)
    torch.save({"model": ll.compact(model), "x": x, "y": model(x).detach()}, tmp_path / "compact.pt")
    script = (
        "import sys; sys.modules['lightning_lowrank'] = None\n"  # importing it would fail
        "import torch\n"
        f"data = torch.load({str(tmp_path / 'compact.pt')!r}, weights_only=False)\n"
        "torch.testing.assert_close(data['model'](data['x']), data['y'], rtol=1e-5, atol=1e-6)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)


def test_to_dense_merges_back():
    model = trained_looking(small_cnn(torch.float64))
    dense = ll.to_dense(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(dense(x), model(x), rtol=1e-10, atol=1e-10)
    assert [type(dense[i]) for i in (0, 2, 4, 8, 10)] == [nn.Conv2d] * 3 + [nn.Linear] * 2
    assert dense[2].padding_mode == "reflect" and dense[4].padding == "same" and dense[4].bias is None
    assert ll.to_dense(model[8]).weight.shape == (64, 128)  # a single layer converts too


def test_summary_counts_and_compression_rate():
    model = small_cnn()
    ll.convert(model, include=["4", "8"], rank=4)
    s = ll.summary(model)
    assert [row.name for row in s.layers] == ["4", "8"]
    tucker4 = 32 * 4 + 32 * 4 + 2 * 9 + 4 * 4 * 9  # no bias
    tucker8 = 64 * 4 + 128 * 4 + 16 + 64
    assert (s.layers[0].params, s.layers[1].params) == (tucker4, tucker8)
    assert s.dense_params == 32 * 32 * 9 + 128 * 64 + 64
    assert s.compression_rate == pytest.approx(1 - (tucker4 + tucker8) / s.dense_params)
    dense_rest = sum(p.numel() for i in (0, 2, 10) for p in small_cnn()[i].parameters())
    assert s.params == dense_rest + tucker4 + tucker8
    # stored: factors and core at the storage (2r = 8 columns per channel mode, the kernel modes at 3)
    stored4, stored8 = 32 * 8 + 32 * 8 + 2 * 9 + 8 * 8 * 9, 64 * 8 + 128 * 8 + 64 + 64
    assert (s.layers[0].storage, s.layers[1].storage) == ((8, 8, 3, 3), (8, 8))
    assert (s.layers[0].stored_params, s.layers[1].stored_params) == (stored4, stored8)
    assert s.stored == sum(p.numel() for p in model.parameters()) == dense_rest + stored4 + stored8
    text = str(s)
    assert "TuckerConv2d" in text and "(4, 4, 3, 3)" in text and f"{s.compression_rate:.2%}" in text
    assert ll.summary(nn.Linear(2, 2)).compression_rate == 0.0


def test_no_warning_on_a_clean_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.convert(small_cnn())


def test_max_rank_alone_sets_the_initial_rank():
    model = small_cnn()
    ll.convert(model, max_rank=0.5)
    assert model[0].max_ranks[:2] == model[0].ranks[:2] == (8, 2)  # ceil(0.5 * 16), ceil(0.5 * 3)
    assert model[8].max_ranks == (32, 64) and model[8].ranks == (32, 32)  # a linear layer's two ranks are equal


def test_the_callback_starts_at_a_quarter_at_most_max_rank_with_the_dense_norm():
    """TuckerCallback's defaults (``rank=None``, ``init="hosvd_scaled"``): ceil(n / 4) per channel mode, capped by a
    `max_rank` given alone (the smallest layer keeps it within the storage budget), each layer's weight at the dense
    weight's Frobenius norm; an explicit rank above `max_rank` is still refused."""
    torch.manual_seed(0)
    model = small_cnn()
    norms = {name: m.weight.norm() for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    config = ll.TuckerCallback().conversion
    ll.convert(model, config)
    assert model[0].ranks[:2] == (4, 1)  # ceil(16 / 4), ceil(3 / 4)
    assert config.ranks_for((64, 128), "fc")[0] == (16, 16)  # 64 / 4, equal: before the budget
    for name, norm in norms.items():
        torch.testing.assert_close(model.get_submodule(name).weight.norm(), norm)
    capped = small_cnn()
    ll.convert(capped, ll.TuckerCallback(max_rank=0.1).conversion)
    assert capped[0].ranks[:2] == capped[0].max_ranks[:2] == (2, 1)  # ceil(0.1 * 16): below a quarter
    wide = small_cnn()
    ll.convert(wide, ll.TuckerCallback(max_rank=0.5).conversion)
    assert wide[0].ranks[:2] == (4, 1) and wide[0].max_ranks[:2] == (8, 2)
    with pytest.raises(ValueError, match=r"`rank` \(0.5\) must not exceed `max_rank` \(0.25\)"):
        ll.TuckerCallback(rank=0.5, max_rank=0.25)


def stored(layer: ll.TuckerLayer) -> int:
    return sum(u.numel() for u in layer.factors) + layer.core.numel()


def test_the_default_start_stores_a_quarter_of_the_dense_weights_the_largest_layers_lowered():
    """``rank=None`` lowers the quarter start until each layer's factors and core (room for the augmentation
    included) fit in its dense weight and all of them in a quarter of the dense weights, lowering the layers that
    store most first (water-filling). Reference: entries counted from the parameters' shapes, and the ladder of
    storage sizes worked by hand."""
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(1024, 256), nn.Conv2d(1, 6, 5))
    dense = sum(math.prod(layer.weight.shape) for layer in model)  # 65,536 + 262,144 + 150
    ll.convert(model, ll.TuckerCallback().conversion)
    square, wide, small = model
    assert small.ranks[:2] == (1, 1)  # a quarter (2, 1) stores 6 * 4 + 1 + 2 * 25 + 4 * 25 = 175 > its 150
    assert square.ranks == (32, 32) and stored(square) == 2 * 256 * 64 + 64**2  # 36,864
    assert wide.ranks == (16, 16) and stored(wide) == 1280 * 32 + 32**2  # 41,984
    assert sum(stored(layer) for layer in model) <= dense / 4  # 78,978 <= 81,957
    # one storage step more in either large layer exceeds the budget: 2 * 256 * 96 + 96^2 = 58,368 and
    # 1280 * 48 + 48^2 = 63,744
    assert 58368 + stored(wide) + stored(small) > dense / 4 and stored(square) + 63744 + stored(small) > dense / 4
    alone = nn.Sequential(nn.Linear(256, 256))
    ll.convert(alone, ll.TuckerCallback().conversion)
    assert alone[0].ranks == (12, 12) and stored(alone[0]) == 2 * 256 * 24 + 24**2  # 12,864; storage 32: 17,408
    conv = nn.Sequential(nn.Conv2d(16, 64, 3))  # the larger channel rank falls first: a quarter (16, 4) stores 4,498
    ll.convert(conv, ll.TuckerCallback().conversion)
    assert conv[0].ranks[:2] == (6, 4) and stored(conv[0]) == 64 * 12 + 16 * 8 + 2 * 9 + 12 * 8 * 9  # 1,778 <= 2,304
    # at (8, 4) storage 16 x 8: 2,322 > 2,304, a quarter of 64 * 16 * 9
    fits = nn.Sequential(nn.Conv2d(64, 64, 5))  # spatial rank 1: a quarter stores 8,212 <= 102,400 / 4, kept
    ll.convert(fits, ll.TuckerCallback(kernel_rank=1).conversion)
    assert fits[0].ranks == (16, 16, 1, 1) and stored(fits[0]) == 2 * 64 * 32 + 2 * 5 * 2 + 32 * 32 * 2 * 2
    explicit = nn.Sequential(nn.Linear(256, 256))
    ll.convert(explicit, ll.TuckerCallback(rank=0.25).conversion)
    assert explicit[0].ranks == (64, 64)  # an explicit rank is taken as given


@pytest.mark.parametrize("init", ["hosvd", "random"])
def test_converting_leaves_the_global_random_state_as_it_was(init):
    """Reference: the random state before the conversion, so that a converted model trains on the dense model's
    random stream (batch order, dropout); ``init="random"`` draws the same factors again from the same seed."""
    def converted():
        torch.manual_seed(0)
        model = small_cnn()
        state = torch.get_rng_state()
        ll.convert(model, rank=0.5, init=init)
        assert torch.equal(torch.get_rng_state(), state)
        return model

    first, second = converted(), converted()
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_module_registered_under_two_names_becomes_one_tucker_layer_under_both():
    """Reference: the dense model's output; the shared module stays shared (one object, trained once)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            shared = nn.Linear(8, 8)
            self.body = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(8, 3))
            self.extra = shared

        def forward(self, x):
            return self.body(x) + self.extra(x)[:, :3]

    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(5, 8)
    expected = model(x)
    report = ll.convert(model)
    assert model.body[0] is model.body[2] is model.extra and isinstance(model.extra, ll.TuckerLinear)
    assert report.converted == ["body.0 = body.2 = extra", "body.4"]
    assert report.names == ["body.0", "body.2", "extra", "body.4"]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert len(ll.summary(model).layers) == 2
    exported = ll.compact(model)
    assert exported.body[0] is exported.body[2] is exported.extra
    torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


def test_an_alias_excluded_by_name_keeps_the_module_dense():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(8, 3))
    report = ll.convert(model, exclude=["2"])
    assert model[0] is model[2] and type(model[0]) is nn.Linear
    assert "matched by `exclude` (as '2')" in report.skipped["0"]


def test_tied_weights_stay_tied_and_dense():
    """Two layers sharing a weight (an encoder tied to a decoder, an embedding to its output layer) are left dense,
    with the reason in the report and a warning: factorizing each would untie them silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    model[2].weight = model[0].weight
    embedding = nn.Embedding(10, 8)
    model.head = nn.Linear(8, 10, bias=False)
    model.head.weight = embedding.weight
    model.embedding = embedding
    with pytest.warns(UserWarning, match="its parameters are tied to"):
        report = ll.convert(model)
    assert report.converted == ["3"]
    assert set(report.skipped) == {"0", "2", "head", "embedding"}
    assert report.skipped["embedding"] == "Embedding has no Tucker form"
    assert "tied to ['2']" in report.skipped["0"] and "tied to ['embedding']" in report.skipped["head"]
    assert model[0].weight is model[2].weight and model.head.weight is model.embedding.weight


def test_the_report_lists_every_module_left_dense_with_its_reason():
    """An LSTM, a grouped convolution, an embedding, a norm, a too-small and an excluded layer are all named."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(20, 8)
            self.lstm = nn.LSTM(8, 16)
            self.depthwise = nn.Conv1d(16, 16, 3, groups=16)
            self.norm = nn.LayerNorm(16)
            self.small = nn.Linear(16, 2)
            self.head = nn.Linear(16, 16)
            self.proj = nn.Linear(16, 16)

    with pytest.warns(UserWarning, match="grouped convolution"):
        report = ll.convert(Mixed(), min_size=40, exclude=["head"])
    assert report.converted == ["proj"]
    assert report.skipped == {
        "embedding": "Embedding has no Tucker form", "lstm": "LSTM has no Tucker form",
        "depthwise": "grouped convolution (groups=16) is not supported", "norm": "LayerNorm has no Tucker form",
        "small": "32 weights < `min_size` 40", "head": "matched by `exclude`"}
    assert "kept dense lstm: LSTM has no Tucker form" in str(report)


def test_compact_keeps_a_layer_dense_where_its_factors_cost_more():
    """Reference: the dense weights and parameter counts. A full-rank 8 x 8 linear layer would take 2 x 64 weights
    as two factors: compact exports it as one nn.Linear; a rank-2 layer as two; outputs equal either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64))
    ll.convert(model)
    model[1].set_ranks((2, 2))
    compact = ll.compact(model)
    assert type(compact[0]) is nn.Linear and compact[0].weight.shape == (8, 8)
    assert isinstance(compact[1], nn.Sequential) and sum(p.numel() for p in compact[1].parameters()) == 2 * 72 + 64
    x = torch.randn(4, 8)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-6)
    conv = nn.Sequential(nn.Conv2d(4, 4, 3))
    ll.convert(conv)
    assert type(ll.compact(conv)[0]) is nn.Conv2d  # full rank: 16 + 144 + 16 > 144 weights as three convolutions


def test_a_layer_whose_factors_cost_more_counts_as_dense_in_the_compression_rate():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64))
    ll.convert(model)
    model[1].set_ranks((2, 2))
    report = ll.summary(model)
    first, second = report.layers
    assert first.params == 8 * 8 + 8 * 8 + 8 * 8 + 8 and not first.pays  # factors 136 > dense 72
    assert second.params == 64 * 2 + 8 * 2 + 2 * 2 + 64 and second.pays
    assert report.compression_rate == pytest.approx(1 - (72 + second.params) / (72 + 8 * 64 + 64))
    assert "(dense)" in str(report).splitlines()[2]
