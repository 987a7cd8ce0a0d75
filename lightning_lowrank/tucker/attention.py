"""Multi-head attention with its four projections as separate layers, so that each can be factorized.

``nn.MultiheadAttention`` keeps the q, k and v projections in one ``in_proj_weight`` parameter and calls
``F.multi_head_attention_forward`` with it, so they cannot become Tucker layers in place. :class:`SplitAttention`
computes the same function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as modules of their own
(``nn.Linear``, then Tucker layers after :func:`~lightning_lowrank.convert`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (same arguments, forward and outputs) with separate projection modules.

    Shape: query (L, N, E) or (N, L, E) with ``batch_first`` (or unbatched (L, E)), key (S, N, kdim), value
    (S, N, vdim); returns the output (like query) and, with ``need_weights``, the attention weights (N, L, S) averaged
    over heads, or (N, H, L, S). ``in_proj_weight``, ``in_proj_bias`` and ``out_proj.weight`` read as torch's merged
    tensors (formed on each read), so torch's Transformer inference fast path computes the same function.

    Args: as ``nn.MultiheadAttention``, without ``add_bias_kv`` and ``add_zero_attn``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.register_load_state_dict_pre_hook(SplitAttention._load_pre_hook)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.kdim == self.vdim == self.embed_dim

    @property
    def in_proj_weight(self) -> Tensor | None:
        """torch's (3E, E) stack of the q, k, v weights (None unless kdim = vdim = embed_dim)."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([_merged_weight(getattr(self, f"{p}_proj")) for p in "qkv"])

    @property
    def in_proj_bias(self) -> Tensor | None:
        """torch's (3E,) stack of the q, k, v biases (None without bias)."""
        biases = [_last(getattr(self, f"{p}_proj")).bias for p in "qkv"]
        return None if biases[0] is None else torch.cat(biases)

    merge_masks = nn.MultiheadAttention.merge_masks

    @classmethod
    def from_torch(cls, attention: nn.MultiheadAttention) -> SplitAttention:
        """The same function as ``attention`` (weights copied, train/eval mode and ``requires_grad`` kept)."""
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("`add_bias_kv` and `add_zero_attn` are not supported")
        reference = attention.out_proj.weight
        new = cls(attention.embed_dim, attention.num_heads, attention.dropout, attention.in_proj_bias is not None,
                  attention.kdim, attention.vdim, attention.batch_first, reference.device, reference.dtype)
        new.load_state_dict(attention.state_dict())
        for name, p in new.named_parameters():
            p.requires_grad_(dict(attention.named_parameters())[_torch_name(name, attention)].requires_grad)
        return new.train(attention.training)

    def to_dense(self) -> nn.MultiheadAttention:
        """A real ``nn.MultiheadAttention`` with the merged weights."""
        reference = _merged_weight(self.out_proj)
        attention = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.in_proj_bias is not None,
                                          kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                          device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            attention.load_state_dict(self.torch_state())
        return attention.train(self.training)

    def arguments(self) -> dict[str, object]:
        """Constructor arguments that rebuild this module's structure, for checkpoints."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "dropout": self.dropout,
                "bias": self.in_proj_bias is not None, "kdim": self.kdim, "vdim": self.vdim,
                "batch_first": self.batch_first}

    def torch_state(self) -> dict[str, Tensor]:
        """This module's state in ``nn.MultiheadAttention``'s layout (merged weights)."""
        state = {"out_proj.weight": _merged_weight(self.out_proj).detach()}
        if self._qkv_same_embed_dim:
            state["in_proj_weight"] = self.in_proj_weight.detach()
        else:
            state |= {f"{p}_proj_weight": _merged_weight(getattr(self, f"{p}_proj")).detach() for p in "qkv"}
        if self.in_proj_bias is not None:
            state |= {"in_proj_bias": self.in_proj_bias.detach(), "out_proj.bias": _last(self.out_proj).bias.detach()}
        return state

    @staticmethod
    def _load_pre_hook(module: SplitAttention, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Also load ``nn.MultiheadAttention``'s state: ``in_proj_weight``/``in_proj_bias`` (or the separate
        ``q_proj_weight``, ...) become the projections' ``weight``/``bias`` entries."""
        weight, bias = state_dict.pop(prefix + "in_proj_weight", None), state_dict.pop(prefix + "in_proj_bias", None)
        weights = list(weight.chunk(3)) if weight is not None else [
            state_dict.pop(f"{prefix}{p}_proj_weight", None) for p in "qkv"]
        biases = list(bias.chunk(3)) if bias is not None else [None] * 3
        for p, w, b in zip("qkv", weights, biases):
            if w is not None:
                state_dict[f"{prefix}{p}_proj.weight"] = w
            if b is not None:
                state_dict[f"{prefix}{p}_proj.bias"] = b

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        (length, batch, _), source = query.shape, key.shape[0]
        q, k, v = (proj(x).reshape(x.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, batch, self.num_heads, length, source)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, dropout) if dropout > 0 else weights
            out = weights @ v
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, kdim={self.kdim}, "
                f"vdim={self.vdim}, batch_first={self.batch_first}")


def _torch_name(name: str, attention: nn.MultiheadAttention) -> str:
    """The ``nn.MultiheadAttention`` parameter a SplitAttention parameter comes from."""
    proj, _, kind = name.partition(".")
    if proj == "out_proj":
        return name
    if kind == "bias":
        return "in_proj_bias"
    return "in_proj_weight" if attention._qkv_same_embed_dim else f"{proj}_weight"


def _additive_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype, batch: int,
                   heads: int, length: int, source: int) -> Tensor | None:
    """attn_mask ((L, S) or (N * H, L, S)) and key_padding_mask ((N, S)) as one float mask added to the scores,
    broadcastable to (N, H, L, S); boolean masks mark the positions not attended (-inf)."""
    masks = []
    if attn_mask is not None:
        mask = attn_mask.reshape(batch, heads, length, source) if attn_mask.dim() == 3 else attn_mask
        masks.append(mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.reshape(batch, 1, 1, source))
    total = None
    for mask in masks:
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
            else mask.to(dtype)
        total = mask if total is None else total + mask
    return total


def _last(projection: nn.Module) -> nn.Module:
    """The layer that adds a projection's bias: the projection itself, or the last of a compact chain."""
    return projection[-1] if isinstance(projection, nn.Sequential) else projection


def _merged_weight(projection: nn.Module) -> Tensor:
    """A projection's (out, in) weight: a linear layer's (a Tucker layer's merged one), or the product of a compact
    chain of ``nn.Linear`` (x -> W_k ... W_1 x)."""
    if not isinstance(projection, nn.Sequential):
        return projection.weight
    weight = projection[0].weight
    for layer in projection[1:]:
        weight = layer.weight @ weight
    return weight
