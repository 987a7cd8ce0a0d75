"""A character-level decoder-only transformer on the Python standard library's source: dense against TuckerCallback.

    python benchmarks/char_transformer.py [--steps 600] [--taus 0.1] [--layers 4] [--width 256] [--context 128]
                                          [--batch 32] [--rank full] [--max-rank full] [--init hosvd]
                                          [--growth 0.25] [--interval 10] [--core-steps 10] [--scale-steps]
                                          [--floor 0.15 ...]
                                          [--no-dense] [--no-cli]

Text: the files of ``FILES`` from this Python's standard library (present on every machine, nothing downloaded), read
as bytes (vocabulary 256); the last 10% of each file is validation. Model: byte embedding + learned positions,
``nn.TransformerEncoder`` with a causal mask (pre-norm, GELU, width 4x in the feed-forward block), linear head.
AdamW lr 1e-3 with a cosine schedule, random windows (seeded). Rows, from one run: the dense model; TuckerCallback
at every tau of ``--taus`` (every Linear and the attention converted; embeddings and norms stay dense); the callback
at the first tau configured through LightningCLI from a YAML file; with ``--floor``, the fixed-rank floor at each
fraction: every converted layer a plain chain of two ``nn.Linear`` at that rank, both trained by AdamW at every
step. Columns: validation bits per character, compression of the converted layers, median time per optimizer step
(steps 20 to the end) and its ratio to dense, final ranks per projection kind (mean over layers, out/in). Target
(issue 17): within 2% of dense bits per character at >= 70% compression.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_lowrank as ll

FILES = ("argparse.py", "ast.py", "configparser.py", "dataclasses.py", "difflib.py", "doctest.py", "enum.py",
         "functools.py", "inspect.py", "pathlib.py", "pickle.py", "random.py", "shutil.py", "statistics.py",
         "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "typing.py", "zipfile.py")
"""Standard-library files of the corpus (those missing in this Python are skipped and named)."""


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation bytes: the first 90% and the last 10% of every file of ``FILES``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, missing = [], [], []
    for name in FILES:
        path = root / name if (root / name).exists() else root / name.removesuffix(".py") / "__init__.py"
        if not path.exists():
            missing.append(name)
            continue
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        cut = int(0.9 * len(data))
        train.append(data[:cut])
        val.append(data[cut:])
    if missing:
        print(f"not in this Python's standard library: {missing}")
    return torch.cat(train).long(), torch.cat(val).long()


class Windows(Dataset):
    """``count`` windows of ``context + 1`` bytes; random starts (seeded), or evenly spaced with ``spread``."""

    def __init__(self, data: torch.Tensor, context: int, count: int, seed: int = 0, spread: bool = False) -> None:
        self.data, self.context = data, context
        last = len(data) - context - 1
        self.starts = (torch.linspace(0, last, count).long() if spread
                       else torch.randint(0, last, (count,), generator=torch.Generator().manual_seed(seed)))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.starts[index])
        return self.data[start: start + self.context + 1]


class CharData(pl.LightningDataModule):
    def __init__(self, context: int = 128, batch_size: int = 32, steps: int = 600, val_windows: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        self.train_bytes, self.val_bytes = corpus()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(Windows(self.train_bytes, h.context, h.steps * h.batch_size), batch_size=h.batch_size)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(Windows(self.val_bytes, h.context, h.val_windows, spread=True), batch_size=64)


class CharLM(pl.LightningModule):
    """Decoder-only transformer over bytes; logs ``val_bpc`` (validation loss in bits per character)."""

    def __init__(self, layers: int = 4, width: int = 256, heads: int = 4, context: int = 128, lr: float = 1e-3,
                 steps: int = 600) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.embedding(tokens) + self.position[:length]
        return self.head(self.blocks(x, mask=mask, is_causal=True))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_bpc", self.loss(batch) / math.log(2))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.hparams.steps)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class StepTimer(pl.Callback):
    """Wall time of every training step after the first ``skip``."""

    def __init__(self, skip: int = 20) -> None:
        self.skip, self.seconds = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.skip:
            self.seconds.append(time.perf_counter() - self._start)


def trainer_options(steps: int) -> dict:
    return dict(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0,
                val_check_interval=None, check_val_every_n_epoch=1, gradient_clip_val=1.0)


def ranks_by_kind(model: nn.Module) -> str:
    """Mean final ranks (out/in) of q, k, v, out, ff1, ff2 and head over the blocks."""
    kinds: dict[str, list[tuple[int, ...]]] = {}
    for layer in ll.summary(model).layers:
        kind = layer.name.rsplit(".", 1)[-1].replace("_proj", "").replace("linear1", "ff1").replace("linear2", "ff2")
        kinds.setdefault(kind, []).append(layer.ranks)
    return " ".join(f"{kind} {sum(r[0] for r in rs) / len(rs):.0f}/{sum(r[1] for r in rs) / len(rs):.0f}"
                    for kind, rs in kinds.items())


def run(args: argparse.Namespace, callbacks: list[pl.Callback],
        factorized_rank: float | None = None) -> tuple[float, float, float, str]:
    """One arm; ``factorized_rank``: the fixed-rank floor instead, every converted layer a plain chain of two
    ``nn.Linear`` (U and S V^T, both trained by the optimizer at every step) at that fraction of its sizes."""
    torch.manual_seed(args.seed)
    model = CharLM(args.layers, args.width, args.heads, args.context, args.lr, args.steps)
    compression, ranks = 0.0, "dense"
    if factorized_rank is not None:
        ll.convert(model, rank=factorized_rank, max_rank=factorized_rank, init="hosvd_scaled")
        compression, ranks = ll.summary(model).compression_rate, ranks_by_kind(model)
        model = ll.compact(model)
    data = CharData(args.context, args.batch, args.steps)
    timer = StepTimer()
    trainer = pl.Trainer(callbacks=[*callbacks, timer], **trainer_options(args.steps))
    trainer.fit(model, data)
    bpc = trainer.validate(model, data, verbose=False)[0]["val_bpc"]
    if any(isinstance(m, ll.TuckerLayer) for m in model.modules()):
        compression, ranks = ll.summary(model).compression_rate, ranks_by_kind(model)
    return bpc, compression, float(torch.tensor(timer.seconds).median()), ranks


CLI_CONFIG = """
seed_everything: {seed}
model:
  layers: {layers}
  width: {width}
  heads: {heads}
  context: {context}
  lr: {lr}
  steps: {steps}
data:
  context: {context}
  batch_size: {batch}
  steps: {steps}
trainer:
  max_steps: {steps}
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  gradient_clip_val: 1.0
  callbacks:
    - class_path: lightning_lowrank.TuckerCallback
      init_args:
        tau: {tau}
        rank: {rank}
        max_rank: {max_rank}
        init: {init}
        growth: {growth}
        scale_steps: {scale_steps}
        interval: {interval}
        core_steps: {core_steps}
"""


def run_cli(args: argparse.Namespace) -> tuple[float, float, float, str]:
    """The callback configured from YAML through LightningCLI (``python script.py fit --config file`` in-process)."""
    from lightning.pytorch.cli import LightningCLI

    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "config.yaml"
        config.write_text(CLI_CONFIG.format(**{**vars(args), "tau": args.taus[0],
                                              "core_steps": "null" if args.core_steps is None else args.core_steps}))
        timer = StepTimer()
        cli = LightningCLI(CharLM, CharData, run=False, args=["--config", str(config)], save_config_callback=None,
                           trainer_defaults={"callbacks": [timer]})
        cli.trainer.fit(cli.model, cli.datamodule)
        bpc = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val_bpc"]
    return (bpc, ll.summary(cli.model).compression_rate, float(torch.tensor(timer.seconds).median()),
            ranks_by_kind(cli.model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--taus", type=float, nargs="*", default=[0.1])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", default="full", help="the callback's initial rank: 'full' or a fraction")
    parser.add_argument("--max-rank", default="full", help="the callback's max_rank: 'full' or a fraction")
    parser.add_argument("--init", default="hosvd", choices=["hosvd", "hosvd_scaled", "random"])
    parser.add_argument("--growth", type=float, default=0.25, help="the callback's growth margin")
    parser.add_argument("--interval", type=int, default=10, help="the callback's interval")
    parser.add_argument("--core-steps", type=int, default=None, help="the callback's core_steps (default: interval)")
    parser.add_argument("--scale-steps", action="store_true", help="the callback's scale_steps=True")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (ratios then read 'nan')")
    parser.add_argument("--floor", type=float, nargs="*", default=[],
                        help="fixed-rank floors: plain U, S V^T chains at these fractions, without the callback")
    parser.add_argument("--no-cli", action="store_true", help="skip the LightningCLI row")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    rank, max_rank = (spec if spec == "full" else float(spec) for spec in (args.rank, args.max_rank))
    options = dict(rank=rank, max_rank=max_rank, init=args.init, growth=args.growth, interval=args.interval,
                   core_steps=args.core_steps, scale_steps=args.scale_steps)
    arms = [] if args.no_dense else [("dense", lambda: run(args, []))]
    arms += [(f"TuckerCallback(tau={tau}, {', '.join(f'{k}={v}' for k, v in options.items())})",
              lambda tau=tau: run(args, [ll.TuckerCallback(tau=tau, **options)]))
             for tau in args.taus]
    arms += [(f"fixed-rank floor, rank {fraction}", lambda fraction=fraction: run(args, [], fraction))
             for fraction in args.floor]
    if not args.no_cli and args.taus:
        arms.append((f"LightningCLI, tau={args.taus[0]}", lambda: run_cli(args)))
    lines = [f"{args.layers} layers, width {args.width}, context {args.context}, batch {args.batch}, "
             f"{args.steps} steps, torch threads {torch.get_num_threads()}",
             "| run | val bits/char | vs dense | compression | step ms | vs dense | final ranks (out/in, mean) |",
             "|---|---|---|---|---|---|---|"]
    dense_bpc = dense_step = math.nan
    for name, arm in arms:
        bpc, compression, step, ranks = arm()
        if name == "dense":
            dense_bpc, dense_step = bpc, step
        lines.append(f"| {name} | {bpc:.4f} | {bpc / dense_bpc - 1:+.2%} | {compression:.1%} | {step * 1e3:.0f} | "
                     f"{step / dense_step:.2f} | {ranks} |")
        print("\n".join(lines), flush=True)  # the table so far, after every arm


if __name__ == "__main__":
    main()
