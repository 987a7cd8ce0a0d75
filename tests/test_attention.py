"""SplitAttention against nn.MultiheadAttention, and transformers trained through the callback."""

from __future__ import annotations

import itertools
import warnings

import lightning.pytorch as pl
import pytest
import torch
from reference import assert_orthonormal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowrank as ll


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*nested tensors is in prototype.*")
        warnings.filterwarnings("ignore", ".*enable_nested_tensor is True.*")
        yield


def attention_inputs(batch_first, kdim, vdim, unbatched=False, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    length, source, batch = 5, 7, 3

    def tensor(n, dim):
        shape = (n, dim) if unbatched else ((batch, n, dim) if batch_first else (n, batch, dim))
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return tensor(length, 8), tensor(source, kdim or 8), tensor(source, vdim or 8)


MASKS = {
    "none": dict(),
    "bool attn_mask": dict(attn_mask=torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=3)),
    "float attn_mask": dict(attn_mask=torch.randn(5, 7, generator=torch.Generator().manual_seed(2),
                                                  dtype=torch.float64)),
    "3-d attn_mask": dict(attn_mask=torch.rand(3 * 2, 5, 7, generator=torch.Generator().manual_seed(3)) < 0.3),
    "key_padding_mask": dict(key_padding_mask=torch.tensor([[False] * 7, [False] * 5 + [True] * 2,
                                                             [False] * 6 + [True]])),
    "both, causal hint": dict(attn_mask=torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=3), is_causal=True,
                              key_padding_mask=torch.tensor([[False] * 7] * 2 + [[False] * 6 + [True]])),
}


@pytest.mark.parametrize("batch_first, bias, dims", list(itertools.product(
    [True, False], [True, False], [(None, None), (4, 6)])))
@pytest.mark.parametrize("masks", list(MASKS), ids=str)
def test_split_attention_equals_torch(batch_first, bias, dims, masks):
    """Outputs and attention weights (averaged or per head, or none) equal nn.MultiheadAttention's (float64)."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, bias=bias, kdim=dims[0], vdim=dims[1], batch_first=batch_first,
                                      dtype=torch.float64).eval()
    split = ll.SplitAttention.from_torch(reference)
    query, key, value = attention_inputs(batch_first, *dims)
    for need_weights, average in ((True, True), (True, False), (False, True)):
        options = dict(MASKS[masks], need_weights=need_weights, average_attn_weights=average)
        expected, expected_weights = reference(query, key, value, **options)
        out, weights = split(query, key, value, **options)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-12)
        else:
            assert weights is None and expected_weights is None


def test_unbatched_input_and_the_causal_hint_without_a_mask():
    reference = nn.MultiheadAttention(8, 2, dtype=torch.float64).eval()
    split = ll.SplitAttention.from_torch(reference)
    query, key, value = attention_inputs(False, None, None, unbatched=True)
    for expected, got in zip(reference(query, key, value), split(query, key, value)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        split(query, key, value, is_causal=True)


@pytest.mark.parametrize("dims", [(None, None), (4, 6)])
def test_converted_attention_is_exact_at_full_rank_and_exports(dims, tmp_path):
    """convert splits the attention and factorizes its projections; compact and to_dense equal it, to_dense is a
    real nn.MultiheadAttention, and torch.export takes both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=dims[0], vdim=dims[1], batch_first=True)).eval()
    query, key, value = attention_inputs(True, *dims, dtype=torch.float32)
    expected = model[0](query, key, value)
    report = ll.convert(model)
    assert report.converted == ["0.q_proj", "0.k_proj", "0.v_proj", "0.out_proj"]
    assert isinstance(model[0], ll.SplitAttention) and isinstance(model[0].q_proj, ll.TuckerLinear)
    for got, want in zip(model[0](query, key, value), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dense = ll.to_dense(model)
    assert type(dense[0]) is nn.MultiheadAttention
    compact = ll.compact(model)
    assert not any(isinstance(m, ll.TuckerLayer) for m in compact.modules())
    for exported in (dense, compact):
        for got, want in zip(exported[0](query, key, value), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        program = torch.export.export(exported[0], (query, key, value))
        torch.testing.assert_close(program.module()(query, key, value)[0], expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_compact_export_of_a_transformer_below_full_rank_runs_in_eval_and_exports(batch_first):
    """Reference: the Tucker model. Below full rank the compact projections are chains of two nn.Linear; torch's
    encoder layer still reads ``self_attn.in_proj_bias`` (and may read ``in_proj_weight``) in eval mode, which must
    give the chains' bias and merged weight; ``to_dense`` of the compact model merges the chains back."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    ll.convert(model, rank=0.15, max_rank=0.15)
    compact = ll.compact(model).eval()
    attention, tucker = compact[0].layers[0].self_attn, model[0].layers[0].self_attn
    assert isinstance(attention.q_proj, nn.Sequential)
    torch.testing.assert_close(attention.in_proj_weight, tucker.in_proj_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention.in_proj_bias, tucker.in_proj_bias)
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.export.export(compact, (x,)).module()(x), model(x), rtol=1e-5, atol=1e-5)
        dense = ll.to_dense(compact).eval()  # merged from the compact chains
        assert type(dense[0].layers[0].self_attn) is nn.MultiheadAttention
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)


def test_attention_state_loads_both_ways():
    """The split module loads nn.MultiheadAttention's state (in_proj_weight) and writes it back in that layout."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2)
    split = ll.SplitAttention(8, 2)
    split.load_state_dict(reference.state_dict())
    assert set(split.torch_state()) == set(reference.state_dict())
    for key, value in split.torch_state().items():
        assert torch.equal(value, reference.state_dict()[key]), key


class Sequences(pl.LightningModule):
    """A small transformer regressing a function of a sequence; ``kind``: 'encoder' (TransformerEncoder) or
    'transformer' (nn.Transformer with a decoder)."""

    def __init__(self, kind: str = "encoder", batch_first: bool = True, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        if kind == "encoder":
            layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
            self.net = nn.TransformerEncoder(layer, 2)
        else:
            self.net = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(16, 1)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, 16, generator=generator)
        self.data = TensorDataset(x, x.cumsum(1)[..., :1].tanh())

    def forward(self, x, padding=None):
        x = x if self.hparams.batch_first else x.transpose(0, 1)
        if self.hparams.kind == "encoder":
            y = self.net(x, src_key_padding_mask=padding)
        else:
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[int(self.hparams.batch_first)])
            y = self.net(x, x, tgt_mask=causal)
        y = y if self.hparams.batch_first else y.transpose(0, 1)
        return self.head(y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)

    val_dataloader = predict_dataloader = train_dataloader


def run(**options):
    defaults = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **options})


@pytest.mark.parametrize("kind, batch_first", [("encoder", True), ("encoder", False), ("transformer", True)])
def test_transformers_fit_validate_predict_and_infer(kind, batch_first, tmp_path):
    """At full rank (tau 0) the converted transformer equals the dense one in train and eval, with and without
    grad (eval without grad takes torch's fast path, which reads the merged weights); then it trains, validates,
    predicts, and its checkpoint loads as the dense module and as the compact model."""
    torch.manual_seed(0)
    model = Sequences(kind, batch_first)
    x = model.data.tensors[0][:5]
    padding = torch.zeros(5, 6, dtype=torch.bool)
    padding[:, -2:] = True
    reference = {}
    for training in (True, False):
        model.train(training)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                reference[training, grad] = model(x).detach()
    model.eval()
    with torch.no_grad():
        padded = model(x, padding) if kind == "encoder" else None
    ll.convert(model)
    for (training, grad), expected in reference.items():
        model.train(training)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5, msg=str((training, grad)))
    if padded is not None:
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x, padding), padded, rtol=1e-5, atol=1e-5)
    callback = ll.TuckerCallback(tau=0.2)
    trainer = run(callbacks=[callback], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model)
    assert any(m.ranks != m.max_ranks for m in model.modules() if isinstance(m, ll.TuckerLayer))
    for layer in (m for m in model.modules() if isinstance(m, ll.TuckerLayer)):
        for u in layer.decomposition()[1]:
            assert_orthonormal(u.detach().double(), atol=1e-5)
    trainer.validate(model, verbose=False)
    predictions = torch.cat(trainer.predict(model))
    model.eval()
    with torch.no_grad():
        expected = model(model.data.tensors[0])
    torch.testing.assert_close(predictions, expected)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    dense = Sequences.load_from_checkpoint(tmp_path / "model.ckpt").eval()
    compact = ll.load_checkpoint(tmp_path / "model.ckpt", Sequences).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-5)
