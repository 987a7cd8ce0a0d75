"""Deep linear factorizations and their compression to the subspace in which they learn (arXiv 2311.05061).

A deep linear network W = W_L ... W_1 with every factor initialised as ``init_scale`` times a random orthogonal
matrix learns a rank-r target inside 2r-dimensional subspaces of its factors. So it can be trained at width 2r:
W_1 = eps V^T, W_2 ... W_{L-1} = eps I, W_L = eps U, with U, V the top-2r singular vectors of a surrogate of the
target, and the outer factors stepped ``alpha`` times faster than the inner ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_lowrank.tucker.layers import linear_chain
from lightning_lowrank.validation import check_int


class DeepLinear(nn.Module):
    """y = x (W_L ... W_1)^T + b, a linear map ``in_features -> out_features`` as a product of ``depth`` factors.

    ``factors[0]``: (width, in_features); ``factors[1:-1]``: (width, width); ``factors[-1]``: (out_features, width).
    Each factor starts as ``init_scale`` times a random orthogonal matrix (rectangular: a slice of a square one),
    the bias at zero. Input (*, in_features), output (*, out_features); :meth:`matrix` is W (out, in).
    """

    def __init__(self, in_features: int, out_features: int, depth: int = 3, width: int | None = None,
                 init_scale: float = 1e-2, bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        check_int("depth", depth, 2)
        width = max(in_features, out_features) if width is None else width
        check_int("width", width, 1, max(in_features, out_features))
        if not init_scale > 0:
            raise ValueError(f"`init_scale` must be > 0, got {init_scale}")
        self.in_features, self.out_features, self.depth, self.width = in_features, out_features, depth, width
        self.init_scale = init_scale
        shapes = [(width, in_features)] + [(width, width)] * (depth - 2) + [(out_features, width)]
        options = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(shape, **options)) for shape in shapes)
        self.bias = nn.Parameter(torch.empty(out_features, **options)) if bias else None
        self.register_load_state_dict_pre_hook(DeepLinear._load_pre_hook)
        self.reset_parameters()

    @staticmethod
    def _load_pre_hook(module: DeepLinear, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Also load the state of the dense layer this block replaces: its ``weight`` W (out, in), of rank at most
        the width, is factorized exactly and balanced, W_1 = S^(1/L) V^T, W_l = S^(1/L), W_L = U S^(1/L)."""
        weight = state_dict.get(prefix + "weight")
        if weight is None or prefix + "factors.0" in state_dict or tuple(weight.shape) != (
                module.out_features, module.in_features):
            return
        del state_dict[prefix + "weight"]
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        width = module.width
        root = torch.zeros(width, dtype=torch.float64, device=weight.device)
        root[: min(width, len(s))] = s[:width] ** (1 / module.depth)
        u = F.pad(u[:, :width], (0, width - min(width, u.shape[1])))
        vh = F.pad(vh[:width], (0, 0, 0, width - min(width, vh.shape[0])))
        factors = [root[:, None] * vh] + [torch.diag(root)] * (module.depth - 2) + [u * root]
        state_dict.update({f"{prefix}factors.{i}": f.to(weight.dtype) for i, f in enumerate(factors)})
    def reset_parameters(self) -> None:
        for factor in self.factors:
            nn.init.orthogonal_(factor, gain=self.init_scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def outer_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """W_1 and W_L: the factors that meet the data, stepped ``alpha`` times faster by :func:`param_groups`."""
        return self.factors[0], self.factors[-1]

    def matrix(self) -> Tensor:
        """The end-to-end matrix W_L ... W_1, shape (out_features, in_features)."""
        product = self.factors[0]
        for factor in self.factors[1:]:
            product = factor @ product
        return product

    def dense_weight(self) -> Tensor:
        """W = W_L ... W_1 formed in float64 and rounded once to the factors' dtype (for export and checkpoints)."""
        product = self.factors[0].double()
        for factor in self.factors[1:]:
            product = factor.double() @ product
        return product.to(self.factors[0].dtype)

    def to_compact(self) -> nn.Module:
        """Plain torch layers computing the same map with the fewest weights: two nn.Linear through the width,
        W_L (W_{L-1} ... W_1), when width * (in + out) < in * out, else one nn.Linear with W."""
        if self.width * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            return self.to_dense()
        inner = self.factors[0]
        for factor in self.factors[1:-1]:
            inner = factor @ inner
        return linear_chain([inner.detach(), self.factors[-1].detach()], self.bias, self.training)

    def to_dense(self) -> nn.Linear:
        """The nn.Linear with weight W and this block's bias."""
        return linear_chain([self.dense_weight().detach()], self.bias, self.training)[0]

    def arguments(self) -> dict[str, object]:
        """Constructor arguments that rebuild this block's structure, for checkpoints."""
        return {"in_features": self.in_features, "out_features": self.out_features, "depth": self.depth,
                "width": self.width, "init_scale": self.init_scale, "bias": self.bias is not None}

    def forward(self, x: Tensor) -> Tensor:
        for factor in self.factors[:-1]:
            x = F.linear(x, factor)
        return F.linear(x, self.factors[-1], self.bias)

    @classmethod
    def compressed(cls, surrogate: Tensor, rank: int | None = None, depth: int = 3, init_scale: float = 1e-2,
                   bias: bool = False) -> DeepLinear:
        """A DeepLinear of width 2r spanning the top-2r singular subspaces of ``surrogate`` (out, in).

        W_1 = init_scale V^T, W_l = init_scale I, W_L = init_scale U, with U, V the top singular vectors; the width
        is min(2 rank, out, in). ``rank=None`` estimates it with :func:`estimate_rank`. Device and dtype follow the
        surrogate.
        """
        if surrogate.ndim != 2:
            raise ValueError(f"`surrogate` must be a matrix (out_features, in_features), got shape "
                             f"{tuple(surrogate.shape)}")
        out_features, in_features = surrogate.shape
        rank = estimate_rank(surrogate) if rank is None else rank
        check_int("rank", rank, 1, min(out_features, in_features))
        width = min(2 * rank, out_features, in_features)
        module = cls(in_features, out_features, depth, width, init_scale, bias, surrogate.device, surrogate.dtype)
        u, _, vh = torch.linalg.svd(surrogate.detach(), full_matrices=False)
        with torch.no_grad():
            module.factors[0].copy_(init_scale * vh[:width])
            for factor in module.factors[1:-1]:
                factor.copy_(init_scale * torch.eye(width, dtype=surrogate.dtype, device=surrogate.device))
            module.factors[-1].copy_(init_scale * u[:, :width])
        return module

    def num_parameters(self, width: int | None = None) -> int:
        """Parameters of this block, or of the same block at another ``width`` (the wide one: max(in, out))."""
        width = self.width if width is None else width
        bias = 0 if self.bias is None else self.out_features
        return width * (self.in_features + self.out_features) + (self.depth - 2) * width * width + bias

    def dense_num_parameters(self) -> int:
        """Parameters of the ``nn.Linear`` this block replaces: in * out (+ bias)."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"width={self.width}, init_scale={self.init_scale}, bias={self.bias is not None}")


def estimate_rank(surrogate: Tensor) -> int:
    """The number of singular values of ``surrogate`` above the optimal hard threshold for unknown noise,
    omega(beta) * median(s) with beta = min(m, n) / max(m, n) (Gavish and Donoho, arXiv 1305.5870); at least 1.

    A surrogate is its target plus spread-out noise (sampling, measurements), whose singular values form a bulk
    that the median locates; values under the numerical rank tolerance never count. Exact for a noiseless
    target; on noisy surrogates only an estimate (``benchmarks/deep_completion.py`` prints it). Too high costs
    width, too low loses part of the target: pass ``rank`` when you know it.
    """
    s = torch.linalg.svdvals(surrogate.detach())
    if s[0] == 0:
        raise ValueError("`surrogate` is zero: its rank cannot be estimated; pass `rank`")
    beta = min(surrogate.shape) / max(surrogate.shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    numerical = s[0] * max(surrogate.shape) * torch.finfo(s.dtype).eps  # the rank tolerance of matrix_rank
    return max(1, int((s > torch.maximum(omega * s.median(), numerical)).sum()))


def completion_surrogate(observed: Tensor, mask: Tensor) -> Tensor:
    """Matrix completion: the observed entries divided by the observed fraction, P_Omega(M) / p (unbiased for M)."""
    if observed.shape != mask.shape:
        raise ValueError(f"`observed` {tuple(observed.shape)} and `mask` {tuple(mask.shape)} must have one shape")
    mask = mask.to(observed.dtype)
    fraction = mask.mean()
    if fraction == 0:
        raise ValueError("`mask` observes no entry")
    return observed * mask / fraction


def sensing_surrogate(sensing_matrices: Tensor, measurements: Tensor) -> Tensor:
    """Matrix sensing with y_i = <A_i, M>: the average (1/m) sum_i y_i A_i of the measurement-weighted A_i."""
    if sensing_matrices.ndim != 3 or measurements.shape != sensing_matrices.shape[:1]:
        raise ValueError(f"`sensing_matrices` must be (m, rows, cols) and `measurements` (m,), got "
                         f"{tuple(sensing_matrices.shape)} and {tuple(measurements.shape)}")
    return torch.einsum("i,ijk->jk", measurements, sensing_matrices) / len(measurements)


def param_groups(module: nn.Module, lr: float, alpha: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the outer factors of every DeepLinear in ``module`` at ``alpha * lr``, every
    other parameter at ``lr``. Works with any torch optimizer: ``torch.optim.SGD(param_groups(model, 10, 5))``."""
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"`alpha` must be a finite number > 0, got {alpha}")
    outer = {id(p): p for m in module.modules() if isinstance(m, DeepLinear) for p in m.outer_factors}
    rest = [p for p in module.parameters() if id(p) not in outer]
    groups = [{"params": list(outer.values()), "lr": alpha * lr}, {"params": rest, "lr": lr}]
    return [group for group in groups if group["params"]]
