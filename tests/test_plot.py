"""Rank curves read back from CSV and TensorBoard logs of a real run, against the ranks the layers had."""

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_models import Student

import lightning_lowrank as ll


class RecordRanks(pl.Callback):
    """The layers' own ranks before every optimizer step (the first: the initial ranks): the reference the logs are
    checked against."""

    def __init__(self):
        self.history = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.history.append({name: m.ranks for name, m in pl_module.named_modules() if isinstance(m, ll.TuckerLayer)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    record = RecordRanks()
    trainer = pl.Trainer(max_epochs=3, logger=[CSVLogger(root / "csv"), TensorBoardLogger(root / "tb")],
                         callbacks=[ll.TuckerCallback(tau=0.3, rank="full", interval=1), record], log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Student(lr=0.02))
    return trainer, record.history


@pytest.mark.parametrize("logger", [0, 1], ids=["csv", "tensorboard"])
def test_rank_curves_are_the_layer_ranks_at_every_step(run, logger):
    trainer, history = run
    curves = ll.rank_curves(trainer.loggers[logger].log_dir)
    expected = {f"{layer}/rank_{mode}": [float(ranks[layer][i]) for ranks in history]
                for layer in history[0] for i, mode in enumerate(("out", "in"))}
    assert set(curves) == set(expected)
    for name, (steps, ranks) in curves.items():
        assert steps == list(range(len(history))), name
        assert ranks == expected[name], name
    assert expected["net.3/rank_out"][0] > expected["net.3/rank_out"][-1]  # the curves do move
    assert curves["net.3/rank_out"][1][0] == 16  # from the initial (full) rank at step 0


def figure_data(figure):
    """Every line of every panel: label, points, colour and style."""
    return [[(line.get_label(), list(line.get_xdata()), list(line.get_ydata()), line.get_color(),
              line.get_linestyle()) for line in axes.lines] + [
             (c.get_label(), [s.tolist() for s in c.get_segments()]) for c in axes.collections]
            for axes in figure.axes]


@pytest.mark.parametrize("logger", [0, 1], ids=["csv", "tensorboard"])
def test_plot_ranks_one_colour_per_layer_one_style_per_mode(run, logger, tmp_path):
    trainer, history = run
    figure = ll.plot_ranks(trainer.loggers[logger].log_dir, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranks, compression = figure.axes
    lines = {line.get_label(): line for line in ranks.lines if "/rank_" in line.get_label()}
    assert len(lines) == 2 * len(history[0])  # out and in of every layer
    assert list(lines["net.4/rank_in"].get_ydata()) == [float(r["net.4"][1]) for r in history]
    for layer in history[0]:
        out, inp = lines[f"{layer}/rank_out"], lines[f"{layer}/rank_in"]
        assert out.get_color() == inp.get_color() and out.get_linestyle() != inp.get_linestyle()
    assert len({lines[f"{layer}/rank_out"].get_color() for layer in history[0]}) == len(history[0])
    maxima = sorted(segment[0][1] for c in ranks.collections for segment in c.get_segments())
    assert maxima == sorted([8.0, 3.0, 16.0, 16.0, 4.0, 4.0])  # net.0 (8, 3), net.3 (16, 16), net.4 (4, 4)
    steps, rates = compression.lines[0].get_xdata(), compression.lines[0].get_ydata()
    assert steps[0] == 0 and rates[-1] > rates[0]


def test_csv_and_tensorboard_logs_of_one_run_give_the_same_figure(run, tmp_path):
    trainer, _ = run
    csv_figure, tensorboard_figure = (ll.plot_ranks(logger.log_dir, tmp_path / f"{i}.png")
                                      for i, logger in enumerate(trainer.loggers))
    assert figure_data(csv_figure) == figure_data(tensorboard_figure)


def test_default_png_lands_next_to_the_log(run):
    trainer, _ = run
    ll.plot_ranks(trainer.loggers[0].log_dir)
    assert (Path(trainer.loggers[0].log_dir) / "rank_curves.png").stat().st_size > 1000


def test_unreadable_logs_are_clear_errors(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv or TensorBoard event file"):
        ll.rank_curves(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.csv").write_text("epoch,step,train_loss\n0,0,1.0\n")
    with pytest.raises(ValueError, match="no `lowrank/<layer>/rank_<mode>` metrics"):
        ll.rank_curves(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.csv").write_text("epoch,step\n")
    with pytest.raises(ValueError, match="2 logs under"):
        ll.rank_curves(tmp_path)


def test_curves_start_at_the_initial_ranks_whatever_the_logging_interval(tmp_path):
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[ll.TuckerCallback(tau=0.3, rank=0.25)],
                         log_every_n_steps=5, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Student(lr=0.02))
    steps, ranks = ll.rank_curves(trainer.logger.log_dir)["net.3/rank_out"]
    assert steps[0] == 0 and ranks[0] == 4 and 0 < len(steps) < trainer.global_step  # the start: 16 / 4
