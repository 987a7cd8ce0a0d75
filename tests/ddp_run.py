"""Two CPU processes (gloo) train a Student with TuckerCallback; each saves its rank history and final state.

    python tests/ddp_run.py OUT_DIR [RANK]   (run by test_callback.py::test_ddp_processes_end_every_step_identical;
                                              RANK: the callback's ``rank``, "full" or "default")
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning_models import Student

import lightning_lowrank as ll


class RankHistory(pl.Callback):
    def __init__(self):
        self.ranks = []
        self.storages = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        layers = [m for m in pl_module.modules() if isinstance(m, ll.TuckerLayer)]
        self.ranks.append([r for m in layers for r in m.ranks])
        self.storages.append([s for m in layers for s in m.storage])


def main(out: Path, rank: str) -> None:
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts it)
    history = RankHistory()
    # each process a different tolerance: only the broadcast of the first process's rank decision keeps them identical;
    # the full start falls at tau 0.3 (its storage shrinks); the default start grows at tau 0.02 (its storage too)
    taus = (0.3, 0.05) if rank == "full" else (0.02, 0.3)
    tau = taus[0] if os.environ.get("LOCAL_RANK", "0") == "0" else taus[1]
    callback = ll.TuckerCallback(tau=tau, interval=1, dense_interval=1, **({"rank": "full"} if rank == "full" else {}))
    # the full start holds dense storage until its ranks fall far enough for the factors to pay (about 40 steps,
    # truncated at each)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=6 if rank == "full" else 3,
                         logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, history])
    model = Student(lr=0.02, batch_size=16)
    trainer.fit(model)
    torch.save({"steps": trainer.global_step, "ranks": history.ranks, "storages": history.storages,
                "state_dict": model.state_dict()}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "full")
