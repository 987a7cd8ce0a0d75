"""Train neural networks directly in compressed low-rank (Tucker) form inside PyTorch Lightning."""

from lightning_lowrank.deep_linear.layers import DeepLinear
from lightning_lowrank.export import compact, to_dense
from lightning_lowrank.lightning.checkpoint import load_checkpoint
from lightning_lowrank.lightning.deep_linear_callback import DeepLinearCallback
from lightning_lowrank.lightning.plot import plot_ranks, rank_curves
from lightning_lowrank.lightning.tucker_callback import TuckerCallback
from lightning_lowrank.tucker.attention import SplitAttention
from lightning_lowrank.tucker.conversion import (
    ConversionReport,
    RankSpec,
    TuckerConfig,
    convert,
)
from lightning_lowrank.tucker.integrator import IntegratorConfig, TuckerIntegrator
from lightning_lowrank.tucker.layers import TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerLayer, TuckerLinear
from lightning_lowrank.tucker.optimizer_state import OPTIMIZER_STATE, StateRule
from lightning_lowrank.tucker.summary import LayerSummary, Summary, summary

__version__ = "0.1.0.dev0"

__all__ = [
    "ConversionReport",
    "DeepLinear",
    "DeepLinearCallback",
    "IntegratorConfig",
    "LayerSummary",
    "OPTIMIZER_STATE",
    "RankSpec",
    "SplitAttention",
    "StateRule",
    "Summary",
    "TuckerCallback",
    "TuckerConfig",
    "TuckerConv1d",
    "TuckerConv2d",
    "TuckerConv3d",
    "TuckerIntegrator",
    "TuckerLayer",
    "TuckerLinear",
    "compact",
    "convert",
    "load_checkpoint",
    "plot_ranks",
    "rank_curves",
    "summary",
    "to_dense",
]
