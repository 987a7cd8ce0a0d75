"""TuckerCallback end to end with a Trainer: conversion, integration, metrics, checkpoints, strategies, composition."""

import csv
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning_models import Student
from reference import assert_orthonormal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowrank as ll

HERE = Path(__file__).parent


def trainer(**options):
    defaults = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    return pl.Trainer(**{**defaults, **options})


def tucker_layers(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, ll.TuckerLayer)}


def assert_healthy(module, atol=1e-5):
    for layer in tucker_layers(module).values():
        for u in layer.decomposition()[1]:
            assert_orthonormal(u.detach().double(), atol=atol)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def read_metrics(log_dir):
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        yield


def test_ranks_fall_and_metrics_reach_the_csv_logger(tmp_path):
    """From full rank on a rank-2 teacher, the linear ranks fall to 2 and every metric is a CSV column."""
    torch.manual_seed(0)
    model = Student(lr=0.02)
    fit = trainer(max_epochs=16, callbacks=[ll.TuckerCallback(tau=0.3, rank="full", interval=1)],
                  logger=CSVLogger(tmp_path, name="run"))
    fit.fit(model)
    rows = read_metrics(fit.logger.log_dir)
    names = {"lowrank/compression_rate", "lowrank/params", "lowrank/net.0/rank_out", "lowrank/net.0/rank_in",
             "lowrank/net.3/rank_out", "lowrank/net.3/rank_in", "lowrank/net.4/rank_out", "lowrank/net.4/rank_in"}
    assert names <= set(rows[0])
    assert not any("rank_h" in column for column in rows[0])  # spatial modes are not adapted by default
    steps = [row for row in rows if row["lowrank/net.3/rank_out"]]
    assert len(steps) >= fit.global_step  # every step, plus every epoch end
    ranks = [int(float(row["lowrank/net.3/rank_out"])) for row in steps]
    assert model.net[3].max_ranks == (16, 16) and ranks[-1] == 2, ranks  # from full rank (16) to the teacher's
    rates = [float(row["lowrank/compression_rate"]) for row in steps]
    report = ll.summary(model)
    assert rates[-1] == pytest.approx(report.compression_rate) and rates[-1] > 0.8
    assert float(steps[-1]["lowrank/params"]) == report.params
    assert_healthy(model)
    # the learned model is the dense model of the compact export
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(ll.compact(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_conversion_is_idempotent_across_stages():
    model = Student()
    callback = ll.TuckerCallback(tau=0.2)
    fit = trainer(max_epochs=1, callbacks=[callback])
    fit.fit(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fit.validate(model, verbose=False)
    fit.test(model, verbose=False)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class StartProbe(pl.Callback):
    """The Tucker layers' ranks and state when training starts (after TuckerCallback's fit start)."""

    def on_train_start(self, trainer, pl_module):
        self.ranks = {name: m.ranks for name, m in tucker_layers(pl_module).items()}
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.weights = {name: m.dense_weight() for name, m in tucker_layers(pl_module).items()}
        self.dense_storage = {name: m.dense_storage for name, m in tucker_layers(pl_module).items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_default_start_follows_the_optimizer(optimizer):
    """``rank=None``: under SGD the layers start as ``convert`` with the default start (a quarter, scaled) makes them
    from the dense model; under Adam at full rank, exactly the dense weights. Before fit starts (and in runs
    without fit) they are at full rank."""
    torch.manual_seed(0)
    model = Student(optimizer=optimizer)
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, (nn.Linear,
                                                                                                   nn.Conv2d))}
    reference = Student(optimizer=optimizer)
    reference.load_state_dict(model.state_dict())
    callback, probe = ll.TuckerCallback(), StartProbe()
    trainer(max_steps=1, callbacks=[callback, probe]).validate(model, verbose=False)
    assert all(m.ranks == m.max_ranks for m in tucker_layers(model).values())  # validate: full rank, exact
    trainer(max_steps=1, callbacks=[callback, probe]).fit(model)
    if optimizer == "adam":  # full rank, held as the dense weights (their factors would store more)
        assert all(probe.ranks[name] == m.max_ranks for name, m in tucker_layers(model).items())
        for name, weight in probe.weights.items():
            torch.testing.assert_close(weight, dense[name], rtol=1e-5, atol=1e-6)
        assert probe.dense_storage == {name: True for name in tucker_layers(model)}
        assert sorted(v.numel() for v in probe.state.values() if v.is_floating_point() and v.numel()) == sorted(
            p.numel() for p in Student().parameters())
        return
    ll.convert(reference, ll.TuckerConfig(rank=None, init="hosvd_scaled"))
    assert probe.ranks == {name: m.ranks for name, m in tucker_layers(reference).items()}
    assert probe.ranks["net.3"] == (1, 1)  # a quarter of 16 (4/4) stores 2,496 > 1,222, a quarter of all 4,888
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(probe.state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert [p.shape for p in model.parameters()] != [p.shape for p in Student().parameters()]


def test_the_adam_default_stores_at_most_the_dense_parameters_at_every_step():
    """Adam's default start is full rank, held as the dense weights where the factors would store more; a layer
    stores factors once its ranks pay for them. Reference: the dense model's parameter count, at every batch start."""
    class Stored(pl.Callback):
        def __init__(self):
            self.stored, self.dense_storage = [], []

        def on_train_batch_start(self, trainer, pl_module, *args):
            self.stored.append(sum(p.numel() for p in pl_module.parameters()))
            self.dense_storage.append([m.dense_storage for m in tucker_layers(pl_module).values()])

    torch.manual_seed(0)
    model, probe = Student(lr=0.02, optimizer="adam"), Stored()
    trainer(max_epochs=8, callbacks=[ll.TuckerCallback(tau=0.3), probe]).fit(model)
    assert probe.dense_storage[0] == [True, True, True] and not all(probe.dense_storage[-1])
    assert max(probe.stored) <= sum(p.numel() for p in Student().parameters()) > probe.stored[-1]
    assert_healthy(model)
    probe = Stored()  # dense_storage=False: the full-rank factors, as the paper's method stores them
    trainer(max_steps=1, callbacks=[ll.TuckerCallback(tau=0.3, dense_storage=False), probe]).fit(
        Student(lr=0.02, optimizer="adam"))
    assert probe.dense_storage == [[False, False, False]] and probe.stored[0] > sum(
        p.numel() for p in Student().parameters())
    probe = Stored()  # half rank: net.3's factors (16 x 16, 288 x 16, core 16 x 16) store more than its 16 x 288
    # weight, but it keeps a growth margin, under which it keeps its factors
    trainer(max_steps=1, callbacks=[ll.TuckerCallback(tau=0.3, rank=0.5), probe]).fit(Student(optimizer="adam"))
    assert probe.dense_storage == [[False, False, False]]


def test_scaled_steps_reach_the_integrator_and_move_the_core_further():
    """``scale_steps=True`` under Adam: the same run, one step at a quarter start, moves the cores s times as far as
    without it (s = sqrt(dense / active core entries) > 1 for every layer here; Adam's first step is lr * sign(g))."""
    class AfterStep(StartProbe):
        def on_train_batch_end(self, trainer, pl_module, *args):  # before the end of fit truncates
            self.moves = {name: (m.active_core() - self.state[f"{name}.core"][tuple(slice(r) for r in m.ranks)])
                          .detach().clone() for name, m in tucker_layers(pl_module).items()}
            self.scales = {name: math.sqrt(math.prod(m.shape) / math.prod(m.ranks))
                           for name, m in tucker_layers(pl_module).items()}

    probes = {}
    for scale in (False, True):
        torch.manual_seed(0)
        model, probes[scale] = Student(optimizer="adam", lr=0.01), AfterStep()
        callback = ll.TuckerCallback(rank=0.25, tau=0.0, interval=2, scale_steps=scale)
        trainer(max_steps=1, callbacks=[callback, probes[scale]]).fit(model)
        assert integrator_of(callback).config.scale_steps is scale
    for name, scale in probes[True].scales.items():
        assert scale > 1
        torch.testing.assert_close(probes[True].moves[name], scale * probes[False].moves[name], rtol=1e-4,
                                   atol=1e-7)


def test_the_default_start_lowers_a_layer_registered_under_two_names():
    """A module registered twice (one object, reported as "a = b") starts below full rank under SGD like any other."""
    class Shared(pl.LightningModule):
        def __init__(self):
            super().__init__()
            shared = nn.Linear(32, 32)
            self.body = nn.Sequential(shared, nn.Tanh(), shared)
            self.alias = shared

        def training_step(self, batch, batch_idx):
            return self.body(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 32)), batch_size=8)

    model, probe = Shared(), StartProbe()
    trainer(max_steps=1, callbacks=[ll.TuckerCallback(), probe]).fit(model)
    assert model.body[0] is model.alias
    assert probe.ranks == {"body.0": (1, 1)}  # stores 2 * 32 * 2 + 2^2 = 132 <= 32^2 / 4; rank 2 stores 272


def test_a_run_resumed_from_the_default_start_keeps_the_checkpoints_ranks(tmp_path):
    """Resuming (SGD, ``rank=None``) does not start the layers again: the run equals the uninterrupted one."""
    def run(epochs, ckpt_path=None):
        torch.manual_seed(0)
        model = Student(lr=0.03)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"{epochs}-{ckpt_path is not None}", save_last=True)
        fit = trainer(max_epochs=epochs, enable_checkpointing=True,
                      callbacks=[ll.TuckerCallback(tau=0.05), checkpoint])
        fit.fit(model, ckpt_path=ckpt_path)
        return model

    straight = run(2)
    run(1)
    resumed = run(2, ckpt_path=tmp_path / "1-False" / "last.ckpt")
    start = Student()
    ll.convert(start, ll.TuckerConfig(rank=None))
    stored = torch.load(tmp_path / "1-False" / "last.ckpt", weights_only=False)["lightning_lowrank"]["state_dict"]
    assert [tuple(stored[f"{name}.rank"].tolist()) for name in tucker_layers(start)] != \
        [m.ranks for m in tucker_layers(start).values()]  # grown since the start
    assert [m.ranks for m in tucker_layers(resumed).values()] == [m.ranks for m in tucker_layers(straight).values()]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("interval, core_steps", [(3, 1), (5, 5)])
def test_resume_equals_an_uninterrupted_run(tmp_path, interval, core_steps):
    """Checkpoint after epoch 1 (8 steps: with 5 core steps, 3 steps into a window at the augmented ranks), resume
    to epoch 3: ranks, parameters and optimizer state as if never stopped, though the storage (parameter and state
    shapes) at the checkpoint differs from the fresh module's and from the end's (Adam: the full start in dense
    storage, a layer held dense at the checkpoint and factorized by the end)."""
    def run(epochs, ckpt_path=None):
        torch.manual_seed(0)
        model = Student(lr=0.03, optimizer="adam")
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"{epochs}-{ckpt_path is not None}", save_last=True)
        callback = ll.TuckerCallback(tau=0.5, interval=interval, core_steps=core_steps)
        fit = trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[callback, checkpoint])
        fit.fit(model, ckpt_path=ckpt_path)
        return model, fit

    straight, straight_trainer = run(3)
    run(1)
    resumed, resumed_trainer = run(3, ckpt_path=tmp_path / "1-False" / "last.ckpt")
    fresh = Student()
    ll.convert(fresh)
    stored = torch.load(tmp_path / "1-False" / "last.ckpt", weights_only=False)["lightning_lowrank"]["state_dict"]
    at_start = [m.storage for m in tucker_layers(fresh).values()]
    at_checkpoint = [tuple(stored[f"{name}.core"].shape) for name in tucker_layers(fresh)]
    at_end = [m.storage for m in tucker_layers(straight).values()]
    assert at_checkpoint != at_end  # the resumed run reallocates parameters and optimizer state
    held_dense = [stored[f"{name}.factors.0"].shape[1] == 0 for name in tucker_layers(fresh)]
    at_end_dense = [m.dense_storage for m in tucker_layers(straight).values()]
    assert any(held_dense)  # the Adam-type default: the full start in dense storage
    assert core_steps > 1 or any(a and not b for a, b in zip(held_dense, at_end_dense))  # (3, 1): then factorized
    assert at_start != at_checkpoint or core_steps > 1  # (5, 5): the checkpoint is inside a window, storage as fresh
    assert resumed_trainer.fit_loop.epoch_loop._batches_that_stepped == 24 and resumed is not straight
    assert resumed_trainer.global_step == straight_trainer.global_step == 24
    assert [m.ranks for m in tucker_layers(resumed).values()] == [m.ranks for m in tucker_layers(straight).values()]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-6, msg=name)
    states = [fit.optimizers[0].state_dict()["state"] for fit in (straight_trainer, resumed_trainer)]
    for index, state in states[0].items():
        for key, value in state.items():
            assert (value.double() - states[1][index][key].double()).abs().max() <= 1e-6


class RanksAtBatchStart(pl.Callback):
    """The active ranks of every Tucker layer at the start of every training batch, by global step."""

    def __init__(self):
        self.ranks = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ranks[trainer.global_step] = {name: m.ranks for name, m in tucker_layers(pl_module).items()}


def test_delayed_truncation_logs_the_decided_ranks_and_ends_truncated(tmp_path):
    """interval = core_steps = 4: the layers train at their augmented ranks inside each window, but the logged ranks
    and compression are those of the window's start (the last truncation's decision), and the fit ends truncated
    (18 steps: in the middle of a window) at ranks the logs and ``ll.summary`` agree on."""
    torch.manual_seed(0)
    model = Student(lr=0.01, optimizer="adam")
    seen = RanksAtBatchStart()
    callback = ll.TuckerCallback(tau=0.2, rank=0.25, growth=0, interval=4, core_steps=4)  # stored as factors
    fit = trainer(max_steps=18, max_epochs=-1, callbacks=[callback, seen], logger=CSVLogger(tmp_path, name="run"))
    fit.fit(model)
    rows = [row for row in read_metrics(fit.logger.log_dir) if row["lowrank/net.3/rank_out"] and row["step"]]
    logged = {}  # the first row of a step is logged at its batch start (a second one at an epoch's end)
    for row in rows:
        logged.setdefault(int(row["step"]), row)
    assert any(seen.ranks[step]["net.3"] != seen.ranks[step - step % 4]["net.3"] for step in range(18))
    layers = tucker_layers(model)
    dense = sum(m.dense_num_parameters() for m in layers.values())
    for step, row in logged.items():
        if step < 18:
            decided = seen.ranks[step - step % 4]
            assert int(float(row["lowrank/net.3/rank_out"])) == decided["net.3"][0], step
            factorized = sum(min(sum(n * r for n, r in zip(m.shape, decided[name])) + math.prod(decided[name])
                                 + m.shape[0], m.dense_num_parameters()) for name, m in layers.items())
            assert float(row["lowrank/compression_rate"]) == pytest.approx(1 - factorized / dense), step
    integrator = next(iter(callback.integrators.values()))
    assert integrator.ranks == {name: m.ranks for name, m in tucker_layers(model).items()}
    grown = [name for name in integrator.ranks if seen.ranks[17][name] != seen.ranks[16][name]]
    assert grown and all(model.get_submodule(name).ranks < seen.ranks[17][name] for name in grown)


class DecidedAtBatchStart(pl.Callback):
    """The active ranks and the integrator's decided (tolerance) ranks at the start of every training batch."""

    def __init__(self, callback):
        self.callback, self.active, self.decided = callback, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active[trainer.global_step] = {name: m.ranks for name, m in tucker_layers(pl_module).items()}
        self.decided[trainer.global_step] = next(iter(self.callback.integrators.values())).ranks


def test_a_growth_margin_trains_while_logs_and_the_end_of_fit_show_the_tolerance_ranks(tmp_path):
    """From rank 1 under a rank-2 teacher the layers keep a growth margin above their tolerance ranks (they train at
    more than those ranks), yet every logged rank is the tolerance rank of that step, and the fit ends without the
    margin: the final ranks are the tolerance ranks of the last truncation, as ``ll.summary`` reports them."""
    torch.manual_seed(0)
    model = Student(lr=0.01, optimizer="adam")
    callback = ll.TuckerCallback(dense_storage=False, tau=0.2, rank=1, interval=2, core_steps=1, growth=1.0,
                                 init="hosvd")
    seen = DecidedAtBatchStart(callback)
    fit = trainer(max_steps=29, max_epochs=-1, callbacks=[callback, seen], logger=CSVLogger(tmp_path, name="run"))
    fit.fit(model)
    assert any(seen.active[step]["net.4"] > seen.decided[step]["net.4"] for step in seen.active)  # a margin
    assert seen.decided[28]["net.4"] == (2, 2)  # grew to the teacher's rank (growth 0 stays at 1)
    rows = {}
    for row in read_metrics(fit.logger.log_dir):
        if row["lowrank/net.4/rank_out"] and row["step"]:
            rows.setdefault(int(row["step"]), row)
    assert len(rows) > 10
    for step, row in rows.items():
        if step < 29:
            for name in ("net.3", "net.4"):
                assert int(float(row[f"lowrank/{name}/rank_out"])) == seen.decided[step][name][0], (step, name)
    integrator = next(iter(callback.integrators.values()))
    assert not integrator.unfinished
    assert integrator.ranks == {name: m.ranks for name, m in tucker_layers(model).items()}
    assert {layer.name: layer.ranks for layer in ll.summary(model).layers} == integrator.ranks


@pytest.mark.parametrize("options", [dict(interval=5, core_steps=5), dict(rank=1, interval=5, core_steps=5)],
                         ids=["window", "growth_margin"])
def test_load_checkpoint_truncates_layers_saved_at_their_augmented_ranks(tmp_path, options):
    """A checkpoint written 3 steps into a 5-step window holds the layers at their augmented ranks (from full rank,
    or from rank 1 with ranks growing under a growth margin: what resuming needs); ``ll.load_checkpoint`` truncates
    them to their tolerance ranks, giving what the end of that fit gave (the callback truncated the same state at
    train end), and its compact export computes the same function."""
    torch.manual_seed(0)
    model = Student(lr=0.01, optimizer="adam")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit = trainer(max_epochs=1, enable_checkpointing=True,
                  callbacks=[ll.TuckerCallback(tau=0.2, growth=1.0, **options), checkpoint])
    fit.fit(model)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    pending = saved["lightning_lowrank"]["pending"]["ranks"]
    stored = {name: tuple(saved["lightning_lowrank"]["state_dict"][f"{name}.rank"].tolist()) for name in pending}
    loaded = ll.load_checkpoint(tmp_path / "last.ckpt", Student, compact_layers=False)
    assert any(loaded.get_submodule(name).ranks != stored[name] for name in pending)  # it truncated
    for name, layer in tucker_layers(model).items():
        assert loaded.get_submodule(name).ranks == layer.ranks, name
        torch.testing.assert_close(loaded.get_submodule(name).dense_weight(), layer.dense_weight(),
                                   rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(ll.load_checkpoint(tmp_path / "last.ckpt", Student).eval()(x), model.eval()(x),
                               rtol=1e-5, atol=1e-6)


FRESH_PROCESS = """
import sys, torch, lightning.pytorch as pl
sys.path.insert(0, {tests!r})
import lightning_lowrank as ll
from lightning_models import Student
checkpoint, expected = sys.argv[1], torch.load(sys.argv[2])
x = expected["x"]
compact = ll.load_checkpoint(checkpoint, Student).eval()          # no callback, plain torch layers
assert not any(isinstance(m, ll.TuckerLayer) for m in compact.modules())
torch.testing.assert_close(compact(x), expected["y"], rtol=1e-5, atol=1e-6)
tucker = ll.load_checkpoint(checkpoint, Student(), compact_layers=False)
assert [m.ranks for m in tucker.modules() if isinstance(m, ll.TuckerLayer)] == expected["ranks"]
dense = Student.load_from_checkpoint(checkpoint).eval()          # plain Lightning: the merged dense weights
assert not any(isinstance(m, ll.TuckerLayer) for m in dense.modules())
torch.testing.assert_close(dense(x), expected["y"], rtol=1e-5, atol=1e-6)
trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ll.TuckerCallback()])
result = trainer.test(Student(), ckpt_path=checkpoint, verbose=False)[0]
assert abs(result["test_loss"] - expected["test_loss"]) < 1e-5, (result, expected["test_loss"])
print("fresh process OK")
"""


def test_checkpoint_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = Student(lr=0.02)
    fit = trainer(max_epochs=3, callbacks=[ll.TuckerCallback(tau=0.3)], default_root_dir=tmp_path)
    fit.fit(model)
    fit.save_checkpoint(tmp_path / "model.ckpt")
    x = torch.randn(7, 3, 6, 6)
    model.eval()
    test_loss = fit.test(model, verbose=False)[0]["test_loss"]
    torch.save({"x": x, "y": model(x).detach(), "test_loss": test_loss,
                "ranks": [m.ranks for m in tucker_layers(model).values()]}, tmp_path / "expected.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS.format(tests=str(HERE)))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "model.ckpt"), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fresh process OK" in result.stdout


class ConfiguredStudent(Student):
    """Builds its layers in configure_model and converts them there."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.net
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                     nn.Linear(8 * 36, 16), nn.Linear(16, 4))
            ll.convert(self.net)


def test_module_converting_in_configure_model_loads_with_load_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ConfiguredStudent(lr=0.02)
    fit = trainer(max_epochs=2, callbacks=[ll.TuckerCallback(tau=0.3)])
    fit.fit(model)
    assert model.net[0].ranks != model.net[0].max_ranks or model.net[3].ranks != model.net[3].max_ranks
    fit.save_checkpoint(tmp_path / "model.ckpt")
    loaded = ConfiguredStudent.load_from_checkpoint(tmp_path / "model.ckpt")
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(loaded(x), model(x))
    assert [m.ranks for m in tucker_layers(loaded).values()] == [m.ranks for m in tucker_layers(model).values()]


@pytest.fixture
def in_process_ddp():
    """Lightning's DDP with one device runs in this process: restore the environment and the process group after."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def test_under_ddp_a_module_converting_in_configure_model_is_refused_at_fit_start(in_process_ddp):
    """Its layers are converted after the callback's setup kept the Tucker parameters out of DDP, so DDP would hold
    parameters whose shapes change: refused before the first step, naming the fix. Converted in __init__ it trains."""
    with pytest.raises(ValueError, match=r"Tucker layers \['net.0', 'net.3', 'net.4'\] were converted after "
                                         r"TuckerCallback's setup \(in `configure_model`\?\), so DDP holds"):
        trainer(strategy="ddp", max_epochs=1, callbacks=[ll.TuckerCallback()]).fit(ConfiguredStudent())
    model = Student()
    trainer(strategy="ddp", max_epochs=1, callbacks=[ll.TuckerCallback(interval=1, tau=0.3)]).fit(model)
    assert any(layer.storage != (8, 3, 3, 3) for layer in tucker_layers(model).values())


class CountingStudent(Student):
    """Counts the optimizer steps Lightning takes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.optimizer_steps = 0

    def optimizer_step(self, *args, **kwargs):
        self.optimizer_steps += 1
        super().optimizer_step(*args, **kwargs)


def integrator_of(callback):
    (integrator,) = callback.integrators.values()
    return integrator


def test_gradient_accumulation_runs_the_integrator_on_real_steps_only():
    """Reference: the integrator driven by hand from the callback's start, one step per four micro-batches (loss / 4
    each, as Lightning). From the same start the two runs are equal bit for bit; from a start equal only to rounding
    (``convert`` at the small start) a truncation among near-equal singular values may keep other directions."""
    torch.manual_seed(0)
    model = CountingStudent(lr=0.02)
    callback, start = ll.TuckerCallback(tau=0.3, interval=1), StartProbe()
    fit = trainer(max_epochs=2, accumulate_grad_batches=4, callbacks=[callback, start])
    fit.fit(model)
    assert model.optimizer_steps == fit.global_step == integrator_of(callback).steps == 4  # 2 x 8 batches / 4
    assert_healthy(model)

    reference = CountingStudent(lr=0.02)
    ll.convert(reference, callback.conversion)
    reference.load_state_dict(start.state)
    integrator = ll.TuckerIntegrator(reference, ll.IntegratorConfig(tau=0.3, interval=1))
    optimizer = reference.configure_optimizers()
    for _ in range(2):
        for index, (x, y) in enumerate(reference.train_dataloader()):
            (nn.functional.mse_loss(reference(x), y) / 4).backward()
            if index % 4 == 3:
                assert integrator.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
    integrator.truncate(optimizer, final=True)  # as the end of fit: the growth margin dropped
    assert [m.ranks for m in tucker_layers(model).values()] == [m.ranks for m in tucker_layers(reference).values()]
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_gradient_clipping_clips_the_galerkin_gradient():
    """Clipping by norm acts on the gradients the optimizer uses, the cores' Galerkin gradients included."""
    class Recording(Student):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    model = Recording(lr=0.5)
    norms = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms.append(math.sqrt(sum(float(m.core.grad.norm() ** 2) for m in tucker_layers(pl_module).values()
                                       if m.core.grad is not None)))

    fit = trainer(max_epochs=1, gradient_clip_val=0.01, gradient_clip_algorithm="norm",
                  callbacks=[ll.TuckerCallback(tau=0.2), Probe()])
    fit.fit(model)
    assert norms and max(norms) <= 0.01 * (1 + 1e-4)
    assert_healthy(model)


@pytest.mark.parametrize("interval", [10, 1])
def test_bf16_mixed_on_cpu(interval):
    torch.manual_seed(0)
    model = Student(lr=0.02)
    fresh = Student()
    ll.convert(fresh)
    callback = ll.TuckerCallback(tau=0.3, interval=interval)
    fit = trainer(max_epochs=3, precision="bf16-mixed", callbacks=[callback])
    fit.fit(model)
    assert integrator_of(callback).steps == fit.global_step == 24
    assert ll.summary(model).compression_rate > 0.1  # at full rank it is -0.06: ranks fell
    storages = [[m.storage for m in tucker_layers(module).values()] for module in (fresh, model)]
    assert interval == 10 or storages[0] != storages[1]  # every step: through a storage change
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_healthy(model)


def test_scheduler_and_composition_with_lightning_callbacks(tmp_path):
    """A StepLR scheduler, ModelCheckpoint and EarlyStopping on lowrank metrics, LearningRateMonitor, all at once."""
    class Scheduled(Student):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

    torch.manual_seed(0)
    model = Scheduled(lr=0.02)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="lowrank/compression_rate", mode="max")
    stopping = EarlyStopping(monitor="lowrank/compression_rate", mode="max", patience=100)
    fit = trainer(max_epochs=3, enable_checkpointing=True, logger=CSVLogger(tmp_path, name="run"),
                  callbacks=[ll.TuckerCallback(tau=0.3, interval=1), checkpoint, stopping, LearningRateMonitor()])
    fit.fit(model)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**3)
    best = ll.load_checkpoint(checkpoint.best_model_path, Scheduled(lr=0.02), compact_layers=False)
    assert float(checkpoint.best_model_score) == pytest.approx(ll.summary(best).compression_rate, abs=1e-6)
    assert "lowrank/compression_rate" in fit.callback_metrics and stopping.best_score > 0
    assert "lr-SGD" in read_metrics(fit.logger.log_dir)[0]
    assert_healthy(model)


class TwoOptimizers(Student):
    """Manual optimization: one optimizer for the convolution, one for the linear layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        conv_opt, linear_opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        conv_opt.zero_grad()
        linear_opt.zero_grad()
        self.manual_backward(loss)
        conv_opt.step()
        linear_opt.step()
        return loss

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=self.hparams.lr),
                torch.optim.Adam([p for m in self.net[1:] for p in m.parameters()], lr=0.01))


def test_two_optimizers_with_manual_optimization():
    torch.manual_seed(0)
    model = TwoOptimizers(lr=0.02)
    callback = ll.TuckerCallback(tau=0.3)
    fit = trainer(max_epochs=3, callbacks=[callback])
    fit.fit(model)
    assert len(callback.integrators) == 2
    assert sorted(len(i.layers) for i in callback.integrators.values()) == [1, 2]
    # each optimizer's integrator runs the default schedule of its optimizer: SGD the paper's, Adam 10:10
    schedules = {type(o).__name__: (i.config.interval, i.config.core_steps) for o, i in callback.integrators.items()}
    assert schedules == {"SGD": (1, 1), "Adam": (10, 10)}
    assert all(i.steps == 24 for i in callback.integrators.values())
    assert model.net[3].ranks < model.net[3].max_ranks
    assert_healthy(model)


def test_factors_in_another_optimizer_than_the_core_are_refused():
    class Split(TwoOptimizers):
        def configure_optimizers(self):
            layer = self.net[3]
            return (torch.optim.SGD(list(layer.factors), lr=0.1),
                    torch.optim.SGD([p for n, p in self.named_parameters() if ".factors." not in n or "net.3" not in n],
                                    lr=0.1))

    with pytest.raises(ValueError, match="factors of Tucker layer 'net.3' are in another optimizer"):
        trainer(max_epochs=1, callbacks=[ll.TuckerCallback()]).fit(Split())


def test_torch_compile_recompiles_once_per_storage_not_per_rank():
    """A compiled forward computes at the storage (the core is 0 outside the active block), so a rank change within
    the storage reuses the graph; each reallocation of the storage compiles once more."""
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(len(graph.graph.nodes))
        return graph.forward

    class Compiled(Student):
        def configure_model(self):
            if not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):
                self.net = torch.compile(self.net, backend=counting_backend)

    class Storages(pl.Callback):
        def __init__(self):
            self.seen, self.ranks = set(), set()

        def on_train_batch_start(self, trainer, pl_module, *args):
            layers = tucker_layers(pl_module).values()
            self.seen.add(tuple(m.storage for m in layers))
            self.ranks.add(tuple(m.ranks for m in layers))

    torch.manual_seed(0)
    model = Compiled(lr=0.02)
    storages = Storages()
    fit = trainer(max_epochs=6, callbacks=[ll.TuckerCallback(tau=0.3, rank="full", interval=1, dense_interval=1),
                                                  storages],
                  num_sanity_val_steps=0, limit_val_batches=0)
    fit.fit(model)
    assert len(storages.ranks) > len(storages.seen) > 1  # ranks changed more often than the storage did
    assert len(compiles) <= len(storages.seen), (compiles, storages.seen)
    x = torch.randn(4, 3, 6, 6)
    eager = ll.compact(model.net._orig_mod)
    torch.testing.assert_close(model.net(x), eager(x), rtol=1e-5, atol=1e-6)
    assert_healthy(model)


def test_lightning_cli_configures_the_callback():
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(Student, run=False, args=[
        "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.callbacks+=lightning_lowrank.TuckerCallback", "--trainer.callbacks.tau=0.25",
        "--trainer.callbacks.interval=2"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.TuckerCallback)]
    assert callback.integration.tau == 0.25 and callback.integration.interval == 2


def test_a_nan_gradient_skips_the_step_and_harms_nothing():
    class Poisoned(Student):
        def on_after_backward(self):
            if self.global_step == 3:
                self.net[3].core.grad[0, 0] = float("nan")
                self.snapshot = {k: v.clone() for k, v in self.state_dict().items()}

    torch.manual_seed(0)
    model = Poisoned(lr=0.02)
    callback = ll.TuckerCallback(tau=0.3)
    after = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                after.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    with pytest.warns(UserWarning, match="non-finite gradient at global step 3"):
        trainer(max_epochs=1, callbacks=[callback, Probe()]).fit(model)
    assert callback.skipped_steps == 1
    assert all(torch.equal(after[k], v) for k, v in model.snapshot.items())  # the poisoned step changed nothing
    assert_healthy(model)


def test_placed_before_swa_it_works_and_after_it_is_refused():
    torch.manual_seed(0)
    model = Student(lr=0.02)
    fit = trainer(max_epochs=3, callbacks=[ll.TuckerCallback(tau=0.3, freeze_after_epochs=1),
                                           StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)])
    fit.fit(model)
    assert_healthy(model)
    with pytest.raises(ValueError, match="TuckerCallback must come before StochasticWeightAveraging"):
        trainer(callbacks=[StochasticWeightAveraging(swa_lrs=0.01), ll.TuckerCallback()]).fit(Student())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_swa_averages_the_frozen_layers_whose_storage_changed_since_its_copy(optimizer):
    """SWA copies the model at its setup, at the storage of the start; from a start below full rank (SGD) the storage
    grows before the freeze, from the full start in dense storage (Adam) the freeze factorizes what is still dense.
    Reference: the mean of the model's states where SWA averages (``swa_epoch_start=2``: at the starts of the second
    to the last epoch)."""

    class Snapshots(pl.Callback):
        def __init__(self):
            self.states, self.storage = [], {}

        def on_fit_start(self, trainer, pl_module):
            self.storage["setup"] = [m.storage for m in tucker_layers(pl_module).values()]

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch >= 1:
                self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
                self.storage["averaged"] = [m.storage for m in tucker_layers(pl_module).values()]

    torch.manual_seed(0)
    model, snapshots = Student(lr=0.02, optimizer=optimizer), Snapshots()
    trainer(max_epochs=4, callbacks=[ll.TuckerCallback(tau=0.3, freeze_after_epochs=1), snapshots,
                                     StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)]).fit(model)
    assert snapshots.storage["setup"] != snapshots.storage["averaged"]
    assert not any(m.dense_storage for m in tucker_layers(model).values())  # frozen: factors at fixed bases
    assert len(snapshots.states) == 3
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            expected = sum(state[key] for state in snapshots.states) / 3
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
    assert_healthy(model)


def test_freeze_after_steps_fixes_ranks_and_bases():
    torch.manual_seed(0)
    model = Student(lr=0.02)
    frozen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                frozen.update({n: (m.ranks, [u.clone() for u in m.active_factors()])
                               for n, m in tucker_layers(pl_module).items()})

    fit = trainer(max_epochs=2, callbacks=[ll.TuckerCallback(tau=0.3, freeze_after_steps=5), Probe()])
    fit.fit(model)
    for name, layer in tucker_layers(model).items():
        ranks, factors = frozen[name]
        assert layer.ranks == ranks
        assert all(torch.equal(u, v) for u, v in zip(layer.active_factors(), factors))


@pytest.mark.parametrize("options, message", [
    ({"tau": 1.0}, r"`tau` must be a number in \[0, 1\)"),
    ({"tau": -0.1}, r"`tau` must be a number in \[0, 1\)"),
    ({"min_rank": 0}, r"`min_rank` must be an int >= 1"),
    ({"min_rank": 5, "rank": 2, "max_rank": 3}, r"`min_rank` \(5\) must not exceed `max_rank` \(3\)"),
    ({"rank": -2}, r"`rank` must be an int >= 1"),
    ({"rank": 8, "max_rank": 4}, r"`rank` \(8\) must not exceed `max_rank` \(4\)"),
    ({"interval": 0}, r"`interval` must be an int >= 1"),
    ({"interval": 1.5}, r"`interval` must be an int >= 1"),
    ({"freeze_after_steps": -1}, r"`freeze_after_steps` must be None or an int >= 0"),
    ({"method": "exact"}, r"`method` must be 'parallel' or 'augmented'"),
])
def test_bad_options_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        ll.TuckerCallback(**options)


def test_bad_setup_is_refused_before_any_weight_changes():
    model = Student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`include` pattern 'features.*' matches no module"):
        trainer(callbacks=[ll.TuckerCallback(include=["features.*"])]).fit(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not tucker_layers(model)

    class Empty(Student):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))

    with pytest.raises(ValueError, match="has no Tucker layers at fit start"):
        trainer(callbacks=[ll.TuckerCallback()]).fit(Empty())


def test_a_second_tucker_callback_is_refused_when_the_trainer_is_built():
    """Two callbacks would both integrate every Tucker layer (two augmentations a step); the state key is the class
    name, whatever the options, so Lightning refuses the second, and a resumed run with other options restores the
    integrator."""
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `TuckerCallback`"):
        trainer(callbacks=[ll.TuckerCallback(include=["net.0"]), ll.TuckerCallback(include=["net.3"])])
    assert ll.TuckerCallback(tau=0.1).state_key == ll.TuckerCallback(tau=0.3, include=["net.1"]).state_key


def test_sharded_strategies_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    callback = ll.TuckerCallback()
    fsdp = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[callback])  # FSDP needs a GPU to build a Trainer
    with pytest.raises(ValueError, match="supports single-device and DDP strategies, not FSDPStrategy"):
        callback.setup(fsdp, Student(), "fit")


@pytest.mark.slow
@pytest.mark.parametrize("start", ["full", "default"])
def test_ddp_processes_end_every_step_identical(tmp_path, start):
    """Two processes with different tolerances: the full start's storage shrinks (dense storage, then factors), the
    default (quarter) start's grows with its ranks (a layer outgrowing its dense weight holds it whole), and both
    processes keep identical ranks, storage and parameters at every step."""
    result = subprocess.run([sys.executable, str(HERE / "ddp_run.py"), str(tmp_path), start], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0]["steps"] == states[1]["steps"] > 0
    assert states[0]["ranks"] == states[1]["ranks"]  # identical rank history, step by step
    assert len(set(map(tuple, states[0]["ranks"]))) > 1  # ranks did change
    assert states[0]["storages"] == states[1]["storages"]
    assert len(set(map(tuple, states[0]["storages"]))) > 1  # and the storage with them
    first, last = states[0]["storages"][0], states[0]["storages"][-1]
    assert all(a >= b for a, b in zip(first, last)) if start == "full" else any(a < b for a, b in zip(first, last))
    for key, value in states[0]["state_dict"].items():
        assert torch.equal(value, states[1]["state_dict"][key]), key


# --- nothing lost on any path (issue 16) ---------------------------------------------------------------------------

def test_step_metrics_reach_the_logger_at_every_logging_step(tmp_path):
    """With ``log_every_n_steps=3`` the callback forms its metrics only on the steps Lightning writes (the private
    read of ``writes_logs``): the CSV has rank columns exactly where it has the module's own step metric (plus the
    initial row and the epoch ends), each the layer's rank at that batch's start."""
    torch.manual_seed(0)
    model = Student(lr=0.02)
    seen = RanksAtBatchStart()
    callback = ll.TuckerCallback(tau=0.3, rank="full", interval=1)  # no growth margin: the active ranks are logged
    formed = []
    metrics = callback.metrics
    callback.metrics = lambda module: formed.append(1) or metrics(module)
    fit = trainer(max_epochs=2, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="run"),
                  callbacks=[callback, seen])
    fit.fit(model)
    assert len(formed) == 1 + 5 + 2  # initial state, 5 logging steps, 2 epoch ends: not at every step
    rows = read_metrics(fit.logger.log_dir)
    loss_steps = {int(row["step"]) for row in rows if row["train_loss"]}
    rank_rows = [row for row in rows if row["lowrank/net.3/rank_out"]]
    assert loss_steps == {2, 5, 8, 11, 14}
    assert {int(row["step"]) for row in rank_rows} == loss_steps | {0, 7, 15}  # initial state, epoch ends
    for row in rank_rows:
        step = int(row["step"])
        if step in loss_steps:
            assert int(float(row["lowrank/net.3/rank_out"])) == seen.ranks[step]["net.3"][0], step


def test_start_method_of_each_launcher():
    """The one private Lightning attribute the package reads (`DDPStrategy._start_method`) still tells the
    launchers apart; if Lightning renames it, this fails."""
    from lightning_lowrank.lightning.base import start_method

    expected = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
    for strategy, method in expected.items():
        assert start_method(trainer(strategy=strategy, devices=2).strategy) == method, strategy
    assert start_method(trainer().strategy) is None


@pytest.mark.slow
def test_ddp_spawn_refuses_a_dense_model_and_returns_a_converted_one_trained(tmp_path):
    """Under ddp_spawn Lightning copies the worker's state back into this process's model: a model still dense here
    is refused (the factorization would be lost); one converted before fit comes back exactly as the worker left it
    (reference: the worker's last checkpoint)."""
    with pytest.raises(Exception, match="trains in worker processes and loads their state back"):
        trainer(strategy="ddp_spawn", devices=1, max_epochs=1, callbacks=[ll.TuckerCallback()]).fit(Student())
    torch.manual_seed(0)
    model = Student(lr=0.02)
    ll.convert(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    storages = [m.storage for m in tucker_layers(model).values()]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(strategy="ddp_spawn", devices=1, max_epochs=2, enable_checkpointing=True,
            callbacks=[ll.TuckerCallback(tau=0.3, interval=1), checkpoint]).fit(model)
    worker = ll.load_checkpoint(tmp_path / "last.ckpt", Student(lr=0.02), compact_layers=False).state_dict()
    assert [m.ranks for m in tucker_layers(model).values()] != [m.max_ranks for m in tucker_layers(model).values()]
    assert [m.storage for m in tucker_layers(model).values()] != storages  # came back at the worker's storage
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items() if k.endswith("core"))
    for key, value in worker.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


class ExcludedHead(Student):
    """The last linear layer stays dense (excluded)."""

    def __init__(self, poison: str, **kwargs):
        super().__init__(**kwargs)
        self.poison = poison

    def on_after_backward(self):
        if self.global_step == 3:
            getattr(self.net[4], self.poison).grad[0] = float("nan")
            self.snapshot = {k: v.clone() for k, v in self.state_dict().items()}
            self.optimizer_state = {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                                    for i, s in self.trainer.optimizers[0].state_dict()["state"].items()}


@pytest.mark.parametrize("poison", ["weight", "bias"])
def test_a_nan_gradient_outside_the_tucker_layers_skips_the_whole_step(poison):
    """Reference: the state before the poisoned step; every parameter and every optimizer state entry keeps it."""
    torch.manual_seed(0)
    model = ExcludedHead(poison, lr=0.02)
    callback = ll.TuckerCallback(tau=0.3, exclude=["net.4"])
    after = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                after["model"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
                after["optimizer"] = {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                                      for i, s in trainer.optimizers[0].state_dict()["state"].items()}

    with pytest.warns(UserWarning, match="non-finite gradient at global step 3"):
        trainer(max_epochs=1, callbacks=[callback, Probe()]).fit(model)
    assert callback.skipped_steps == 1
    assert integrator_of(callback).steps == 8  # 8 batches, one skipped: a step like any other (Lightning counts it)
    assert all(torch.equal(after["model"][k], v) for k, v in model.snapshot.items())
    for index, state in model.optimizer_state.items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"][index][key], value), (index, key)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_frozen_tucker_layer_stays_exactly_as_it_was():
    """requires_grad=False on a converted layer whose parameters the optimizer holds (SGD momentum): no augmentation,
    no truncation, no zero gradient for momentum to act on; the other layers still adapt."""
    torch.manual_seed(0)
    model = Student(lr=0.02)
    ll.convert(model)
    model.net[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.net[0].state_dict().items()}
    trainer(max_epochs=2, callbacks=[ll.TuckerCallback(tau=0.3)]).fit(model)
    for key, value in model.net[0].state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert model.net[3].ranks != model.net[3].max_ranks


class Finetuned(Student):
    """`backbone` (the conv and the first linear layer) is frozen by BackboneFinetuning until epoch 1; the optimizer
    starts with the trainable parameters only, as BackboneFinetuning asks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backbone = self.net[:4]

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(trainable, lr=self.hparams.lr)
        return torch.optim.SGD(trainable, lr=self.hparams.lr, momentum=0.9)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_backbone_that_joins_later_starts_as_the_layers_at_fit_start(tmp_path, optimizer):
    """Frozen at fit start, the backbone's layers stay as converted (full rank); when BackboneFinetuning adds them
    to the optimizer (epoch 1) they start as the trained layers did at fit start, before their first forward: under
    SGD (``rank=None``) as ``convert(rank=None)`` makes them from the same weights, under Adam held as exactly those
    weights (dense storage). Resumed from a checkpoint before the join (the join happens after the resume), the run
    equals the uninterrupted one. (Resumed after the join, Lightning's BackboneFinetuning restores the parameter
    groups but leaves the backbone frozen: not a run to compare.)"""
    from lightning.pytorch.callbacks import BackboneFinetuning

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and trainer.current_epoch == 0:
                self.frozen = {k: v.clone() for k, v in pl_module.state_dict().items()}
            if batch_idx == 0 and trainer.current_epoch == 1:
                self.joined = {name: m for name, m in tucker_layers(pl_module).items() if name in ("net.0", "net.3")}
                self.joined = {name: (m.ranks, m.dense_storage, m.dense_weight().detach().clone(),
                                      {k: v.clone() for k, v in m.state_dict().items()})
                               for name, m in self.joined.items()}

    def run(epochs, ckpt_path=None, probe=None):
        torch.manual_seed(0)
        model = Finetuned(lr=0.01, optimizer=optimizer)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"{epochs}-{ckpt_path is not None}", save_top_k=-1)
        callbacks = [ll.TuckerCallback(tau=0.2), BackboneFinetuning(1, lambda epoch: 1.0), checkpoint]
        trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=callbacks + ([probe] if probe else [])).fit(
            model, ckpt_path=ckpt_path)
        return model

    probe = Probe()
    straight = run(3, probe=probe)
    frozen = Student()  # the backbone as frozen: converted at full rank (exact)
    ll.convert(frozen, ll.TuckerConfig(rank="full"))
    frozen.load_state_dict({k: v for k, v in probe.frozen.items() if k.startswith("net.")})
    reference = Student()  # the same as dense layers
    for name in probe.joined:
        dense, layer = dict(reference.named_modules())[name], dict(frozen.named_modules())[name]
        dense.load_state_dict({"weight": layer.dense_weight().detach(), "bias": layer.bias.detach()})
    ll.convert(reference, ll.TuckerConfig(rank=None, init="hosvd_scaled", include=list(probe.joined)))
    for name, (ranks, dense_storage, weight, state) in probe.joined.items():
        full, small = dict(frozen.named_modules())[name], dict(reference.named_modules())[name]
        if optimizer == "adam":
            assert dense_storage and ranks == full.max_ranks
            torch.testing.assert_close(weight, full.dense_weight(), rtol=1e-5, atol=1e-6)
            continue
        assert not dense_storage and ranks == small.ranks != small.max_ranks
        for key, value in small.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    resumed = run(3, ckpt_path=tmp_path / "3-False" / "epoch=0-step=8.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_layer_unfrozen_in_place_starts_before_its_first_forward(optimizer):
    """All parameters in the optimizer from the start, the first convolution frozen (``requires_grad=False``) until
    epoch 1: it stays as converted (full-rank factors) while frozen, and once unfrozen it starts as the other layers
    did at fit start, before its first forward: under Adam held dense as exactly its weight; under SGD (``rank=None``)
    at the quarter ``convert(rank=None)`` makes from that weight, with a growth margin as a small start has."""
    class Unfreeze(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.net[0].requires_grad_(True)

    class Probe(pl.Callback):
        seen = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                layer = pl_module.net[0]
                self.seen[trainer.current_epoch] = (layer.dense_storage, layer.ranks,
                                                    layer.dense_weight().detach().clone(),
                                                    {k: v.clone() for k, v in layer.state_dict().items()},
                                                    integrator_of(callback).margin.keeps("net.0"))

    torch.manual_seed(0)
    model = Student(lr=0.01, optimizer=optimizer)
    model.net[0].requires_grad_(False)
    probe, callback = Probe(), ll.TuckerCallback(tau=0.2, rank=None)
    trainer(max_epochs=2, callbacks=[callback, Unfreeze(), probe]).fit(model)
    (frozen, ranks, weight, _, _), (held, started_ranks, joined, state, margin) = probe.seen[0], probe.seen[1]
    assert not frozen and ranks == (8, 3, 3, 3)
    assert not torch.equal(model.net[0].dense_weight().detach(), joined)  # trained since
    if optimizer == "adam":
        assert held and started_ranks == ranks and not margin
        torch.testing.assert_close(joined, weight, rtol=1e-5, atol=1e-6)
        return
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    reference[0].load_state_dict({"weight": weight, "bias": state["bias"]})
    ll.convert(reference, ll.TuckerConfig(rank=None, init="hosvd_scaled"))
    assert not held and margin and started_ranks == reference[0].ranks == (1, 1, 3, 3)  # alone: (2, 1) stores 128 > 54
    for key, value in reference[0].state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_layer_unfrozen_after_the_freeze_keeps_its_storage():
    """Frozen (``requires_grad=False``) until epoch 1, when ``freeze_after_epochs=1`` has fixed ranks and bases: the
    layer keeps the storage and bases it was converted with (full-rank factors, not dense storage, which an
    averaging callback's copy would not match) and trains its core only."""
    class Unfreeze(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.net[0].requires_grad_(True)

    torch.manual_seed(0)
    model = Student(lr=0.01, optimizer="adam")
    model.net[0].requires_grad_(False)
    probe, callback = StartProbe(), ll.TuckerCallback(tau=0.2, freeze_after_epochs=1)
    trainer(max_epochs=2, callbacks=[callback, Unfreeze(), probe]).fit(model)
    layer = model.net[0]
    assert integrator_of(callback).frozen and not layer.dense_storage and layer.ranks == probe.ranks["net.0"]
    for mode, u in enumerate(layer.factors):
        assert torch.equal(u, probe.state[f"net.0.factors.{mode}"])
    assert not torch.equal(layer.core, probe.state["net.0.core"])  # trained


@pytest.mark.parametrize("order", ["tucker first", "finetuning first"])
def test_backbone_finetuning_in_either_order(order):
    """Frozen, the backbone's Tucker layers stay exactly as converted; unfrozen (added to the optimizer as a new
    parameter group), they join the integrator: ranks adapt, bases stay orthonormal, the optimizer never steps them."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    model = Finetuned(lr=0.02)
    tucker = ll.TuckerCallback(tau=0.3)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    seen = {}

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen["frozen"] = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

        def on_train_start(self, trainer, pl_module):
            seen["start"] = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

    callbacks = [tucker, finetuning, Probe()] if order == "tucker first" else [finetuning, tucker, Probe()]
    trainer(max_epochs=3, callbacks=callbacks).fit(model)
    assert all(torch.equal(v, seen["start"][k]) for k, v in seen["frozen"].items())  # frozen epoch: unchanged
    assert "net.3" in integrator_of(tucker).layers
    assert model.net[3].ranks != model.net[3].max_ranks  # integrated once unfrozen
    assert_healthy(model, atol=1e-5)


def test_weights_only_checkpoints_are_refused_at_setup():
    model = Student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_weights_only=True\) skips"):
        trainer(enable_checkpointing=True,
                callbacks=[ll.TuckerCallback(), ModelCheckpoint(save_weights_only=True)]).fit(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_averaging_without_fixed_ranks_is_refused():
    """SWA after the callback needs frozen ranks: refused at setup without a freeze option, and at the first
    averaging step if the freeze comes later than averaging starts."""
    with pytest.raises(ValueError, match="averages the parameters, which needs fixed ranks and bases"):
        trainer(callbacks=[ll.TuckerCallback(), StochasticWeightAveraging(swa_lrs=0.01)]).fit(Student())
    with pytest.raises(RuntimeError, match="StochasticWeightAveraging is about to average the parameters"):
        trainer(max_epochs=3, callbacks=[ll.TuckerCallback(freeze_after_epochs=2),
                                         StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)]).fit(Student())


def test_weight_averaging_after_the_freeze_keeps_orthonormal_factors():
    from lightning.pytorch.callbacks import WeightAveraging

    class AfterFreeze(WeightAveraging):
        def should_update(self, step_idx=None, epoch_idx=None):
            return step_idx is not None and step_idx >= 8

    torch.manual_seed(0)
    model = Student(lr=0.02)
    trainer(max_epochs=2, callbacks=[ll.TuckerCallback(tau=0.3, freeze_after_steps=8), AfterFreeze()]).fit(model)
    assert_healthy(model)
    for layer in tucker_layers(model).values():
        block = torch.zeros_like(layer.core, dtype=torch.bool)
        block[tuple(slice(r) for r in layer.ranks)] = True
        assert torch.all(layer.core[~block] == 0)
    with pytest.raises(RuntimeError, match="AfterFreeze is about to average"):
        trainer(max_epochs=2, callbacks=[ll.TuckerCallback(freeze_after_steps=12), AfterFreeze()]).fit(Student())


@pytest.mark.parametrize("options, converted", [
    (dict(layer_types="Conv2d"), ["net.0"]),
    (dict(layer_types=nn.Linear), ["net.3", "net.4"]),
    (dict(layer_types=["Linear", nn.Conv2d]), ["net.0", "net.3", "net.4"]),
    (dict(include="net.3"), ["net.3"]),
    (dict(exclude="net.3"), ["net.0", "net.4"]),
])
def test_single_values_are_taken_whole(options, converted):
    """A bare string or class is one pattern or type, not a sequence of characters."""
    model = Student()
    trainer(max_epochs=1, callbacks=[ll.TuckerCallback(**options)]).fit(model)
    assert sorted(tucker_layers(model)) == converted


@pytest.mark.parametrize("options, message", [
    (dict(min_rank=5, max_rank=0.25), r"`min_rank` 5 exceeds the max_rank 2 of mode 0 of Tucker layer 'net.0'"),
    (dict(min_rank=9), r"`min_rank` 9 exceeds the max_rank 8 of mode 0 of Tucker layer 'net.0'"),
    (dict(layer_types="Embedding"), r"`layer_types` must be among \['Linear', 'Conv1d', 'Conv2d', 'Conv3d', 'Multi"),
])
def test_options_that_fit_no_layer_are_refused_before_training(options, message):
    model = Student()
    with pytest.raises(ValueError, match=message):
        trainer(max_epochs=1, callbacks=[ll.TuckerCallback(**options)]).fit(model)


def test_bf16_true_training_reloads_at_its_ranks_with_load_from_checkpoint(tmp_path):
    """bf16 weights throughout; the merged bf16 weights of the checkpoint load into a module that converts in
    `configure_model` at the trained ranks (the old float-eps rule gave rank 1 and 81% output error)."""
    torch.manual_seed(0)
    model = ConfiguredStudent(lr=0.02)
    fit = trainer(max_epochs=3, precision="bf16-true", callbacks=[ll.TuckerCallback(tau=0.3)])
    fit.fit(model)
    assert model.net[3].core.dtype == torch.bfloat16
    fit.save_checkpoint(tmp_path / "model.ckpt")
    loaded = ConfiguredStudent.load_from_checkpoint(tmp_path / "model.ckpt")
    trained = [m.ranks for m in tucker_layers(model).values()]
    assert [m.ranks for m in tucker_layers(loaded).values()] == trained
    x = torch.randn(16, 3, 6, 6)
    expected = model.float()(x)
    assert (loaded(x) - expected).norm() / expected.norm() < 0.02


def test_progress_bar_shows_compression_and_the_effective_and_stored_parameters():
    torch.manual_seed(0)
    model = Student(lr=0.02)
    stored = []

    class Stored(pl.Callback):  # after TuckerCallback, whose epoch-end metrics are the last the bar shows
        def on_train_epoch_end(self, trainer, pl_module):
            stored.append(sum(p.numel() for p in pl_module.parameters()))

    fit = trainer(max_epochs=2, callbacks=[ll.TuckerCallback(tau=0.3, interval=1), Stored()])
    fit.fit(model)
    shown = fit.progress_bar_metrics
    report = ll.summary(model)
    assert shown["lowrank/stored_params"] == stored[-1]  # the end of fit drops the growth margin: less stored
    assert shown["lowrank/params"] == report.params < shown["lowrank/stored_params"]
    assert shown["lowrank/compression_rate"] == pytest.approx(report.compression_rate)


def test_fit_prints_the_stored_and_effective_parameters_and_the_final_ranks(caplog):
    """The setup line reconciles Lightning's model summary (stored parameters) with the compression (effective ones);
    at the end of fit the table is `ll.summary`'s, numbers included."""
    import logging

    class AtFitStart(pl.Callback):  # the stored parameters right after conversion (the storage follows the rank)
        def on_fit_start(self, trainer, pl_module):
            self.stored = sum(p.numel() for m in tucker_layers(pl_module).values() for p in m.parameters())

    torch.manual_seed(0)
    model = Student(lr=0.02)
    at_fit_start = AtFitStart()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(max_epochs=2, callbacks=[ll.TuckerCallback(tau=0.3), at_fit_start]).fit(model)
    text = caplog.text
    assert f"the converted layers store {at_fit_start.stored:,} parameters" in text
    assert f"ranks at the end of fit\n{ll.summary(model)}" in text
    assert f"{sum(p.numel() for p in model.parameters()):,} in the whole model" in text
