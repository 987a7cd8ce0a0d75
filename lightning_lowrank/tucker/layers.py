"""Tucker-factorized layers.

A weight tensor W of shape (n_1, ..., n_d) is kept as W = core x_1 U_1 x_2 U_2 ... x_d U_d with orthonormal factors
U_i (n_i x r_i) and a core (r_1 x ... x r_d). Mode 0 is the output, mode 1 the input, further modes are the
kernel's spatial modes. The active rank of each mode is the tuple ``ranks`` (saved as the state entry ``rank``); the
parameters hold a storage
s_i >= r_i columns per mode (:func:`storage_size`: room for the next augmentation, 2 r_i columns capped by n_i, in
coarse steps), so storage follows the rank while most rank changes leave the parameter shapes as they are, and the
forward pass only touches the active block.

Where the factors would store more than the dense weight (a full-rank start), a layer can hold W itself instead
(:meth:`TuckerLayer.to_dense_storage`): the core is W, the factors store no columns (the identity, implicitly), and
the layer computes, stores and trains as the dense layer does, while ``ranks`` bounds W's multilinear rank (the
integrator's truncation projects W onto its HOSVD at the ranks it keeps, and factorizes it once the factors pay,
:meth:`TuckerLayer.factorize`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lowrank.tucker.algebra import (
    Init,
    compute_dtype,
    consistent_ranks,
    full_ranks,
    mode_dot,
    multi_mode_dot,
    tail_rank,
    tucker_decomposition,
    unfold,
)
from lightning_lowrank.tucker.forms import Grads, Product, with_passes
from lightning_lowrank.tucker.storage import ladder_size, replace_data, resized, storage_size, zero_outside
from lightning_lowrank.validation import check_int

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DenseConv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _check_ranks(name: str, ranks: Sequence[int], bounds: Sequence[int], bound_name: str) -> tuple[int, ...]:
    ranks = tuple(ranks)
    if any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in ranks):
        raise ValueError(f"`{name}` must be a sequence of ints, got {ranks!r}")
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != len(bounds):
        raise ValueError(f"`{name}` needs one rank per mode ({len(bounds)}), got {ranks}")
    for mode, (r, n) in enumerate(zip(ranks, bounds)):
        if not 1 <= r <= n:
            raise ValueError(f"`{name}` of mode {mode} must be in [1, {n}] ({bound_name}), got {r}")
    return ranks


class TuckerLayer(nn.Module):
    """Storage, active ranks and parameter counts shared by the Tucker layers.

    Args:
        shape: shape of the dense weight (n_1, ..., n_d); mode 0 is the output, mode 1 the input.
        ranks: active rank per mode, each in [1, max_ranks].
        max_ranks: largest rank per mode that truncation keeps, each in [1, min(n_i, prod_{j != i} n_j)] (default:
            that bound). Augmentation may exceed it for one interval (up to 2 r_i, capped by n_i).

    The parameters ``factors`` (n_i x s_i) and ``core`` (s_1 x ... x s_d) start at the storage s_i =
    ``storage_size(n_i, r_i)`` and are reallocated by :meth:`resize` (the integrator does, as ranks change). In dense
    storage (:attr:`dense_storage`) the core is W itself (n_1 x ... x n_d) and the factors are n_i x 0.
    With ``hold_bases`` True an eager forward treats the factors as constants, so backward computes no basis gradient
    (the integrator sets it for the steps that train the core only); compiled forwards ignore it.
    """

    mode_names: tuple[str, ...]

    def __init__(
        self,
        shape: Sequence[int],
        ranks: Sequence[int] | None,
        max_ranks: Sequence[int] | None,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        bounds = full_ranks(self.shape)
        max_ranks = _check_ranks("max_ranks", bounds if max_ranks is None else max_ranks, bounds, "full rank")
        ranks = _check_ranks("ranks", consistent_ranks(max_ranks) if ranks is None else ranks, max_ranks, "max_ranks")
        if ranks != consistent_ranks(ranks):
            raise ValueError(f"`ranks` {ranks} must satisfy r_i <= product of the other ranks, as "
                             f"{consistent_ranks(ranks)} does: a mode's extra directions would carry nothing")
        self.max_ranks = max_ranks
        storage = tuple(storage_size(n, r) for n, r in zip(self.shape, ranks))
        factory = dict(device=device, dtype=dtype)
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(n, s, **factory))
                                        for n, s in zip(self.shape, storage))
        self.core = nn.Parameter(torch.empty(storage, **factory))
        self.bias = nn.Parameter(torch.empty(self.shape[0], **factory)) if bias else None
        self.ranks = ranks
        self.hold_bases = False
        self.register_state_dict_post_hook(TuckerLayer._save_ranks)
        self.register_load_state_dict_pre_hook(TuckerLayer._load_pre_hook)
        self.register_load_state_dict_post_hook(TuckerLayer._zero_outside_ranks)
        self.reset_parameters()

    @property
    def storage(self) -> tuple[int, ...]:
        """Columns stored per mode, s_i: the core's shape."""
        return tuple(self.core.shape)

    @property
    def dense_storage(self) -> bool:
        """Whether the layer holds W itself as its core (the factors store no columns; :meth:`to_dense_storage`)."""
        return self.factors[0].shape[1] == 0

    @property
    def spanned_ranks(self) -> tuple[int, ...]:
        """Directions per mode that the weight can hold now, so the most a truncation keeps: the active ranks (after
        an augmentation, the augmented ones), or in dense storage the rank bound of each unfolding of W."""
        return full_ranks(self.shape) if self.dense_storage else self.ranks

    @torch.no_grad()
    def to_dense_storage(self) -> list[tuple[nn.Parameter, torch.Size]]:
        """Hold W itself: core <- W (``self.shape``), factors n_i x 0; ``ranks`` stay (they bound W's multilinear
        rank), and so do the Parameter objects. Forward, backward and the optimizer's state then cost what the dense
        layer's do. Call it before the optimizer's first step: the changed parameters are returned with their old
        shapes, as :meth:`resize` returns them, for state an optimizer made at its construction (Adagrad's sums)."""
        if self.dense_storage:
            return []
        compute = compute_dtype(self.core.dtype)  # float32 at least, never float64 for lower precisions (GPUs)
        weight = multi_mode_dot(self.active_core().to(compute), [u.to(compute) for u in self.active_factors()])
        changed = self._reallocate(self.shape, dense=True)
        self.core.copy_(weight)
        return changed

    @torch.no_grad()
    def factorize(self, bases: Sequence[Tensor]) -> list[tuple[nn.Parameter, torch.Size]]:
        """Leave dense storage: U_i <- ``bases[i]`` (n_i x r_i, orthonormal columns), core <- W x_i U_i^T (the
        ranks r_i), at the storage :func:`storage_size` gives them; W is unchanged where it lies in the bases'
        span. Returns the changed parameters with their old shapes, as :meth:`resize` does."""
        if not self.dense_storage:
            raise ValueError("`factorize` takes a layer in dense storage; this one stores factors already")
        ranks = _check_ranks("ranks", [u.shape[1] for u in bases], self.shape, "the mode size")
        core = multi_mode_dot(self.core, [u.to(self.core.dtype) for u in bases], transpose=True)
        storage = tuple(storage_size(n, r) for n, r in zip(self.shape, ranks))
        changed = self._reallocate(storage)  # the core's leading block is W's: overwritten below
        self.core.zero_()
        self.core[tuple(slice(r) for r in ranks)] = core
        for u, basis in zip(self.factors, bases):
            u[:, : basis.shape[1]] = basis
        self.ranks = ranks
        return changed

    @torch.no_grad()
    def resize(self, storage: Sequence[int]) -> list[tuple[nn.Parameter, torch.Size]]:
        """Reallocate factors (n_i x s_i) and core (``storage``) keeping their leading blocks, each s_i in
        [r_i, n_i]; the Parameter objects stay (an optimizer holding them goes on), and so do their gradients'
        leading blocks. Returns each changed parameter with its old shape, for its optimizer state
        (:func:`~lightning_lowrank.tucker.optimizer_state.resize_state`)."""
        if self.dense_storage:
            raise ValueError("a layer in dense storage has no factor storage to resize (`factorize` leaves it)")
        storage = _check_ranks("storage", storage, self.shape, "the mode size")
        if any(s < r for s, r in zip(storage, self.ranks)):
            raise ValueError(f"`storage` {storage} must hold the active ranks {self.ranks}")
        return self._reallocate(storage)

    def _reallocate(self, storage: tuple[int, ...], dense: bool = False) -> list[tuple[nn.Parameter, torch.Size]]:
        """Reallocate the core to ``storage`` and the factors to n_i x s_i (n_i x 0 for ``dense`` storage)."""
        changed = []
        shapes = [(n, 0 if dense else s) for n, s in zip(self.shape, storage)]
        for p, shape in [*zip(self.factors, shapes), (self.core, storage)]:
            if tuple(p.shape) != shape:
                changed.append((p, p.shape))
                grad = None if p.grad is None else resized(p.grad, shape)
                p.grad = None
                replace_data(p, resized(p.data, shape))
                p.grad = grad
        return changed

    def reset_parameters(self) -> None:
        """Random orthonormal factors; core and bias uniform in +-1/sqrt(fan_in), the core zero outside the active
        block."""
        bound = 1.0 / math.sqrt(math.prod(self.shape[1:]))
        with torch.no_grad():
            for u in self.factors:  # QR in float32 at least (CPU has none in half precision)
                u.copy_(nn.init.orthogonal_(torch.empty_like(u, dtype=torch.promote_types(u.dtype, torch.float32))))
            nn.init.uniform_(self.core, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
            zero_outside(self.core, self.ranks)

    @torch.no_grad()
    def set_ranks(self, ranks: Sequence[int]) -> None:
        """Set the active rank of every mode (each in [1, n_i]); core entries outside the active block become 0.
        A rank above the storage first grows it (:func:`storage_size`; the parameters are reallocated, and an
        optimizer's state for them is not: the integrator resizes both).

        So the weight is the same whatever rank at least the active one the forward uses: raising a rank extends
        the core by zeros (W unchanged), and a compiled forward can use the storage ranks. The core is 0 outside the
        active block at all times (initialisation, loading and the integrator keep it so), so only the part of the
        previous block outside the new one is cleared: the cost follows the ranks, not the storage.
        """
        old = self.ranks
        ranks = _check_ranks("ranks", ranks, self.shape, "the mode size")
        if self.dense_storage:  # W is stored whole: the ranks only bound its multilinear rank
            self.ranks = ranks
            return
        if any(r > s for r, s in zip(ranks, self.storage)):
            self._reallocate(tuple(storage_size(n, r, s) for n, r, s in zip(self.shape, ranks, self.storage)))
        self.ranks = ranks
        zero_outside(self.core, self.ranks, extent=[max(a, b) for a, b in zip(old, self.ranks)])

    @staticmethod
    def _save_ranks(module: TuckerLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """The state entry ``rank``: the active ranks as a long tensor (on the layer's device). ``ranks`` is the
        layer's one record of them (no buffer that a DDP buffer broadcast or an assignment could change apart)."""
        state_dict[prefix + "rank"] = torch.tensor(module.ranks, dtype=torch.long, device=module.core.device)

    @staticmethod
    def _zero_outside_ranks(module: TuckerLayer, incompatible_keys: object) -> None:
        if not module.dense_storage:
            with torch.no_grad():
                zero_outside(module.core, module.ranks)

    @torch.no_grad()
    def load_weight(self, weight: Tensor, init: Init = "hosvd") -> None:
        """Decompose the dense ``weight`` (shape ``self.shape``) into factors and core at the active ranks (the
        storage beyond them is zero).

        ``init="hosvd_scaled"``: the truncated HOSVD with the active core scaled to ||W||_F, so that a start below
        full rank keeps the scale of a random dense init (whose energy spreads over all directions: truncation alone
        would shrink every layer's output, and the signal layer by layer); ``"hosvd"`` keeps the best approximation
        (pretrained weights). Both are exact at full rank.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"`weight` must have shape {self.shape}, got {tuple(weight.shape)}")
        if self.dense_storage:  # W as it is, its multilinear rank bounded by the unfoldings' alone
            self.core.copy_(weight)
            self.ranks = consistent_ranks(full_ranks(self.shape))
            return
        core, factors = tucker_decomposition(weight, self.ranks, "random" if init == "random" else "hosvd")
        self.core.copy_(resized(core, self.storage))
        for u, new in zip(self.factors, factors):
            u.copy_(resized(new, u.shape))
        if init == "hosvd_scaled":
            self.scale_core_to(torch.linalg.vector_norm(weight.double()))

    @torch.no_grad()
    def scale_core_to(self, norm: Tensor) -> None:
        """Scale the core so that ||C||_F (= ||W||_F, the bases being orthonormal) is ``norm``."""
        kept = torch.linalg.vector_norm(self.active_core().double())
        self.core.mul_((norm / kept.clamp_min(1e-300)).to(self.core.dtype))

    @staticmethod
    def _load_pre_hook(module: TuckerLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Take the loaded ``rank`` as the active ranks after checking it against the loaded storage, reallocate the
        parameters to that storage, and take the state of the dense layer this one replaces (``weight``, ``bias``):
        the weight is decomposed keeping it up to its dtype's rounding."""
        weight = state_dict.get(prefix + "weight")
        if weight is not None and prefix + "core" not in state_dict and tuple(weight.shape) == module.shape:
            del state_dict[prefix + "weight"]
            state_dict.update(module._tucker_entries(weight, prefix))
        core = state_dict.get(prefix + "core")
        storage = module.storage if core is None else tuple(core.shape)
        factor = state_dict.get(prefix + "factors.0")
        dense = module.dense_storage if factor is None else factor.ndim == 2 and factor.shape[1] == 0
        try:
            storage = _check_ranks("storage", storage, module.shape, "the mode size")
            rank = state_dict.pop(prefix + "rank", None)  # torch loads from a copy of the caller's state_dict
            ranks = _check_ranks("rank", module.ranks if rank is None else rank.tolist(), storage,
                                 "the stored core's shape")
        except (ValueError, TypeError) as error:
            raise ValueError(f"state entry {prefix}{'core' if 'storage' in str(error) else 'rank'}: {error}") from None
        module._reallocate(storage, dense)
        module.ranks = ranks

    def _tucker_entries(self, weight: Tensor, prefix: str) -> dict[str, Tensor]:
        """State entries (core, factors, rank) of the dense ``weight``: in dense storage W itself; else each mode
        keeps the smallest rank whose discarded singular values have 2-norm <= delta ||W||_F with delta = max(eps,
        sqrt(n) eps_64), eps of the weight's dtype, n its largest size: what is cut is at the level of the rounding of
        W itself (one rounding to its dtype, <= eps/2 ||W||_F; a float64 weight formed by sums of n products, about
        sqrt(n) eps_64 ||W||_F), whatever the dtype and the layer's size."""
        if self.dense_storage:
            return {prefix + "core": weight, prefix + "rank": torch.tensor(consistent_ranks(full_ranks(self.shape))),
                    **{f"{prefix}factors.{i}": weight.new_empty(n, 0) for i, n in enumerate(self.shape)}}
        core, factors = tucker_decomposition(weight, self.max_ranks, "hosvd")
        dtype = weight.dtype if weight.is_floating_point() else core.dtype
        exact = core.double()
        delta = max(torch.finfo(dtype).eps, math.sqrt(max(self.shape)) * torch.finfo(torch.float64).eps)
        theta = delta * torch.linalg.vector_norm(exact)
        ranks = []
        for mode in range(exact.ndim):
            s = torch.linalg.svdvals(unfold(exact, mode))
            ranks.append(max(1, int(tail_rank(s, theta))))
        ranks = consistent_ranks(ranks)
        zero_outside(core, ranks)
        storage = [storage_size(n, r) for n, r in zip(self.shape, ranks)]
        return {prefix + "core": resized(core, storage), prefix + "rank": torch.tensor(ranks, dtype=torch.long),
                **{f"{prefix}factors.{i}": resized(u, (u.shape[0], s))
                   for i, (u, s) in enumerate(zip(factors, storage))}}

    def _copy_from(self, layer: nn.Linear | DenseConv, init: Init) -> None:
        """Take weight (decomposed), bias, ``requires_grad`` (factors and core follow the weight's) and train/eval
        mode from the dense ``layer``."""
        self.load_weight(layer.weight, init)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(layer.bias)
            self.bias.requires_grad_(layer.bias.requires_grad)
        for p in (*self.factors, self.core):
            p.requires_grad_(layer.weight.requires_grad)
        self.train(layer.training)

    def active_factors(self) -> list[Tensor]:
        """The orthonormal bases at the active ranks, U_i of shape (n_i, r_i) (in dense storage: none are stored,
        use :meth:`decomposition`)."""
        if self.dense_storage:
            raise ValueError("a layer in dense storage stores no factors; `decomposition()` gives W's HOSVD")
        return [u[:, :r] for u, r in zip(self.factors, self.ranks)]

    def active_core(self) -> Tensor:
        """The core at the active ranks, shape (r_1, ..., r_d); in dense storage W itself (``self.shape``)."""
        if self.dense_storage:
            return self.core
        return self.core[tuple(slice(r) for r in self.ranks)]

    def decomposition(self) -> tuple[Tensor, list[Tensor]]:
        """Core (r_1, ..., r_d) and orthonormal factors U_i (n_i, r_i) at the active ranks: the stored ones, or in
        dense storage the truncated HOSVD of W at its ranks (exact after a truncation, which leaves W at them, as the
        end of training does; the steps in between move W in every direction)."""
        if self.dense_storage:
            return tucker_decomposition(self.core.detach(), self.ranks, "hosvd")
        return self.active_core(), self.active_factors()

    def forward_ranks(self) -> tuple[int, ...]:
        """The widths an eager forward computes at: each active rank rounded up to the storage ladder
        (:func:`~lightning_lowrank.tucker.storage.ladder_size`: at most 1.5 r_i, at most n_i). The active factors
        and core are zero-padded to them, so output and gradients are those of the active ranks; the forward's tensor
        shapes change only when a rank crosses a ladder size, not with every rank change, so the allocator and
        oneDNN's primitive cache see a few shapes per layer over a run (with a shape per rank, glibc's heap kept 1.2x
        the dense process's memory on the VGG-style net)."""
        return tuple(ladder_size(r, n) for n, r in zip(self.shape, self.ranks))

    def _forward_factors(self) -> tuple[list[Tensor], Tensor]:
        """Factors and core the forward computes with: in eager mode the active ones zero-padded to
        :meth:`forward_ranks` (cost follows the rank; detached while ``hold_bases``); the stored ones under
        torch.compile, whose graph then never depends on a rank (the core is 0 outside the block) nor on
        ``hold_bases``; in dense storage no factors and W."""
        if self.dense_storage:
            return [], self.core
        if torch.compiler.is_compiling():
            return list(self.factors), self.core
        widths = self.forward_ranks()
        factors = [u if u.shape[1] == w else F.pad(u, (0, w - u.shape[1]))
                   for u, w in zip(self.active_factors(), widths)]
        core = self.active_core()
        if core.shape != widths:
            core = F.pad(core, [p for r, w in zip(reversed(core.shape), reversed(widths)) for p in (0, w - r)])
        return [u.detach() for u in factors] if self.hold_bases else factors, core

    @property
    def weight(self) -> Tensor:
        """The merged dense weight W (:meth:`dense_weight`, formed on every read; differentiable), for code that reads
        a dense layer's ``weight``: torch's Transformer inference fast path, initialisers and filters that inspect it.
        Read-only: writing into it changes nothing (use :meth:`load_weight`)."""
        return self.dense_weight()

    def dense_weight(self) -> Tensor:
        """W = core x_1 U_1 ... x_d U_d, shape ``self.shape``, formed in float64 and rounded once to the layer's dtype
        (for export, checkpoints and the ``weight`` property; the forward, where it merges, forms W in the layer's
        dtype with autograd)."""
        if self.dense_storage:
            return self.core.clone()
        weight = multi_mode_dot(self.active_core().double(), [u.double() for u in self.active_factors()])
        return weight.to(self.core.dtype)

    def num_parameters(self, ranks: Sequence[int] | None = None) -> int:
        """Parameters of the factorization at ``ranks`` (default: the active ranks): sum_i n_i r_i + prod_i r_i
        (+ bias)."""
        ranks = self.ranks if ranks is None else ranks
        bias = 0 if self.bias is None else self.bias.numel()
        return sum(n * r for n, r in zip(self.shape, ranks)) + math.prod(ranks) + bias

    def dense_num_parameters(self) -> int:
        """Parameters of the dense layer this one replaces: prod_i n_i (+ bias)."""
        return math.prod(self.shape) + (0 if self.bias is None else self.bias.numel())

    def arguments(self) -> dict[str, object]:
        """Constructor arguments that rebuild this layer's structure (sizes, options, ranks), for checkpoints."""
        raise NotImplementedError

    def _constructor_ranks(self) -> tuple[int, ...]:
        """Active ranks as the constructor accepts them (augmented ranks may exceed ``max_rank``; the loaded state
        then restores them)."""
        return consistent_ranks([min(r, m) for r, m in zip(self.ranks, self.max_ranks)])

    def forward_costs(self, input_shape: Sequence[int], ranks: Sequence[int] | None = None,
                      grads: Grads = Grads()) -> tuple[int, int]:
        """Cost of one forward pass on an input of ``input_shape`` at ``ranks`` (default: :meth:`forward_ranks`) and of
        the backward pass that ``grads`` asks for (default: every gradient, as in training), in multiply-adds plus
        ELEMENT_COST per element moved (:meth:`products`): (factor chain, merged weight W formed from the factors,
        then one dense product). The forward takes the cheaper (the chain on a tie)."""
        chain, merged = (sum(p.cost() for p in products) for products in self.products(input_shape, ranks, grads))
        return chain, merged

    def _uses_chain(self, x: Tensor, factors: Sequence[Tensor], core: Tensor) -> bool:
        """Whether the factor chain is at most as costly as the merged weight for this forward pass."""
        enabled = torch.is_grad_enabled()
        grads = Grads(enabled and x.requires_grad, enabled and factors[0].requires_grad, enabled and core.requires_grad)
        chain, merged = self.forward_costs(x.shape, core.shape, grads)
        return chain <= merged

    def products(self, input_shape: Sequence[int], ranks: Sequence[int] | None = None,
                 grads: Grads = Grads()) -> tuple[list[Product], list[Product]]:
        """The products of one pass at ``ranks`` (default: :meth:`forward_ranks`), each with the passes ``grads``
        asks of it (:func:`~lightning_lowrank.tucker.forms.with_passes`): (factor chain, merged form)."""
        if ranks is None:
            ranks = self.ranks if self.dense_storage else self.forward_ranks()
        chain, merged = self._product_sizes(input_shape, ranks)
        return with_passes(chain, merged, grads, kernel_from_factors=len(self.shape) > 2)

    def _product_sizes(self, input_shape: Sequence[int],
                       ranks: Sequence[int]) -> tuple[list[Product], list[Product]]:
        """The chain's three products and the merged form's three, forward only."""
        raise NotImplementedError

    def galerkin_gradient(self, factors: Sequence[Tensor], x: Tensor, dy: Tensor) -> Tensor:
        """dL/dW x_i U_i^T for orthonormal bases ``factors`` (n_i x s_i), shape (s_1, ..., s_d).

        Formed from the layer's input ``x`` and output gradient ``dy`` of a backward pass, never forming dL/dW.
        """
        raise NotImplementedError

    def to_compact(self) -> nn.Module:
        """Plain torch layers computing the same map with the fewest weights: the factor chain at exactly the
        active ranks, or the dense layer where the chain would hold as many weights or more."""
        chain = self._factor_chain()
        return chain if sum(p.numel() for p in chain.parameters()) < self.dense_num_parameters() else self.to_dense()

    def _factor_chain(self) -> nn.Sequential:
        """Plain torch layers applying the factors and the core at the active ranks."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """The dense torch layer with weight W."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, max_ranks={self.max_ranks}, storage={self.storage}, bias={self.bias is not None}"


class TuckerLinear(TuckerLayer):
    """Linear layer with W = U_out core U_in^T (the order-2 Tucker case); y = x W^T + b over any leading dims, as
    three small products or, where cheaper (:meth:`forward_costs`), one with the merged W.

    Args: as ``nn.Linear``, plus ``ranks`` and ``max_ranks`` (out, in) of :class:`TuckerLayer`.

    Shape:
        - Input: (*, in_features).
        - Output: (*, out_features).
        - ``factors``: (out_features, s_out), (in_features, s_in); ``core``: (s_out, s_in), the storage s of
          :class:`TuckerLayer`, active block (r_out, r_in).
    """

    mode_names = ("out", "in")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        ranks: Sequence[int] | None = None,
        max_ranks: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        super().__init__((out_features, in_features), ranks, max_ranks, bias, device, dtype)

    @classmethod
    def from_dense(
        cls, layer: nn.Linear, ranks: Sequence[int] | None = None, max_ranks: Sequence[int] | None = None,
        init: Init = "hosvd",
    ) -> TuckerLinear:
        """A TuckerLinear whose weight is the decomposition of ``layer.weight`` (exact at full rank)."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, ranks, max_ranks,
                  layer.weight.device, layer.weight.dtype)
        new._copy_from(layer, init)
        return new

    def forward(self, x: Tensor) -> Tensor:
        factors, core = self._forward_factors()
        if not factors:  # dense storage
            return F.linear(x, core, self.bias)
        u_out, u_in = factors
        if not self._uses_chain(x, factors, core):
            return F.linear(x, u_out @ (core @ u_in.T), self.bias)
        return F.linear(F.linear(F.linear(x, u_in.T), core), u_out, self.bias)

    def _product_sizes(self, input_shape: Sequence[int],
                       ranks: Sequence[int]) -> tuple[list[Product], list[Product]]:
        """For m input rows: chain x U_in (m n_in r_in), then C^T (m r_in r_out), then U_out^T (m r_out n_out);
        merged: W = U_out (C U_in^T) (r_out r_in n_in + n_out r_out n_in), then x W^T (m n_in n_out)."""
        r_out, r_in = ranks
        n_out, n_in = self.shape
        m = math.prod(input_shape[:-1])
        chain = [Product(m * n_in * r_in, m * n_in + n_in * r_in, m * r_in),
                 Product(m * r_in * r_out, m * r_in + r_in * r_out, m * r_out),
                 Product(m * r_out * n_out, m * r_out + r_out * n_out, m * n_out)]
        merged = [Product(r_out * r_in * n_in, r_out * r_in + n_in * r_in, r_out * n_in),
                  Product(n_out * r_out * n_in, n_out * r_out + r_out * n_in, n_out * n_in),
                  Product(m * n_in * n_out, m * n_in + n_out * n_in, m * n_out)]
        return chain, merged

    def arguments(self) -> dict[str, object]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "ranks": self._constructor_ranks(), "max_ranks": self.max_ranks}

    def galerkin_gradient(self, factors: Sequence[Tensor], x: Tensor, dy: Tensor) -> Tensor:
        """(dy U_out)^T (x U_in), summed over all leading dims."""
        u_out, u_in = factors
        return (dy.reshape(-1, dy.shape[-1]) @ u_out).T @ (x.reshape(-1, x.shape[-1]) @ u_in)

    def _factor_chain(self) -> nn.Sequential:
        """Two nn.Linear, the core merged into the side of larger rank: min(r_out, r_in) * (in + out) weights."""
        core, (u_out, u_in) = self.decomposition()
        first, second = (u_in.T, u_out @ core) if self.ranks[1] <= self.ranks[0] else (core @ u_in.T, u_out)
        return linear_chain([first, second], self.bias, self.training)

    def to_dense(self) -> nn.Linear:
        return linear_chain([self.dense_weight()], self.bias, self.training)[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


def linear_chain(weights: Sequence[Tensor], bias: Tensor | None, training: bool) -> nn.Sequential:
    """nn.Linear layers applying ``weights`` in order; ``bias`` goes on the last one."""
    layers = []
    for i, w in enumerate(weights):
        last = i == len(weights) - 1
        linear = nn.Linear(w.shape[1], w.shape[0], bias=last and bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if last and bias is not None:
                linear.bias.copy_(bias)
        layers.append(linear)
    return nn.Sequential(*layers).train(training)


class _TuckerConvNd(TuckerLayer):
    """Convolution with W = core x_1 U_out x_2 U_in x_3 U_k1 ..., computed as three convolutions or, where cheaper
    (:meth:`forward_costs`), as one with the merged W.

    The chain is y = conv_1x1(conv_kxk(conv_1x1(x, U_in^T), core x_3 U_k1 ...), U_out) + b; stride, padding,
    dilation and padding mode act on the middle (kxk) convolution, which commutes with the 1x1 channel maps.

    Args: as ``nn.ConvNd`` (``groups`` = 1), plus ``ranks`` and ``max_ranks`` (out, in, k_1, ...) of
    :class:`TuckerLayer`.

    Shape:
        - Input: (N, in_channels, *spatial) or unbatched (in_channels, *spatial).
        - Output: (N, out_channels, *spatial_out), spatial_out as ``nn.ConvNd`` computes it.
        - ``factors``: (out_channels, s_out), (in_channels, s_in), (k_i, s_ki); ``core``: (s_out, s_in, s_k1, ...).
    """

    _dense: type[DenseConv]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        ranks: Sequence[int] | None = None,
        max_ranks: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        n = len(self.mode_names) - 2
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.out_channels = check_int("out_channels", out_channels, 1)
        self.kernel_size, self.stride, self.dilation = (
            _ntuple(value, n, name)
            for value, name in ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation")))
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"`padding_mode` must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"`padding` must be an int, a tuple, 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("`padding='same'` is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _ntuple(padding, n, "padding", low=0)
        self.padding_mode = padding_mode
        self._explicit_padding = _explicit_padding(self.padding, self.kernel_size, self.dilation)
        super().__init__((out_channels, in_channels, *self.kernel_size), ranks, max_ranks, bias, device, dtype)
        letters = "ijklmn"[:n]
        spatial = ",".join(f"{x}{c}" for x, c in zip("pqr", letters))
        self._kernel_equation = f"ab{letters},{spatial}->ab{'pqr'[:n]}"
        self._merge_equations = (f"ab{letters},ya->yb{letters}", f"ab{letters},zb->az{letters}")  # x_1 U_out, x_2 U_in
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]

    @classmethod
    def from_dense(
        cls, layer: DenseConv, ranks: Sequence[int] | None = None,
        max_ranks: Sequence[int] | None = None, init: Init = "hosvd",
    ) -> _TuckerConvNd:
        """A Tucker convolution whose weight is the decomposition of ``layer.weight`` (exact at full rank)."""
        if layer.groups != 1:
            raise ValueError(f"grouped convolutions (groups={layer.groups}) cannot be Tucker-factorized")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.bias is not None, layer.padding_mode, ranks, max_ranks,
                  layer.weight.device, layer.weight.dtype)
        new._copy_from(layer, init)
        return new

    def kernel(self) -> Tensor:
        """The middle convolution's kernel, core x_3 U_k1 ..., shape (r_out, r_in, k_1, ...)."""
        core, (_, _, *spatial) = self.decomposition()
        return self._kernel(core, spatial)

    def _kernel(self, core: Tensor, spatial: Sequence[Tensor]) -> Tensor:
        return torch.einsum(self._kernel_equation, core, *spatial)

    def forward(self, x: Tensor) -> Tensor:
        factors, core = self._forward_factors()
        if not factors:  # dense storage
            return self._spatial_conv(x, core, self.bias)
        u_out, u_in, *spatial = factors
        kernel = self._kernel(core, spatial)
        if not self._uses_chain(x, factors, core):  # one convolution with W = (kernel x_2 U_in) x_1 U_out
            weight = torch.einsum(self._merge_equations[0], torch.einsum(self._merge_equations[1], kernel, u_in), u_out)
            return self._spatial_conv(x, weight, self.bias)
        x = self._channel_map(x, u_in.T)
        x = self._spatial_conv(x, kernel, None)
        return self._channel_map(x, u_out, self.bias)

    def _channel_map(self, x: Tensor, u: Tensor, bias: Tensor | None = None) -> Tensor:
        """The 1x1 convolution y = u x (+ b) at every position: x (..., c, *spatial), u (m, c) -> (..., m, *spatial).

        Where autograd records it (x, u or b needs a gradient), a convolution (oneDNN's backward is faster than the
        matrix products' at the small spatial sizes of deep layers). Otherwise (evaluation, the Galerkin gradient) a
        matrix product over the flattened positions, whatever x's memory format: it writes the output once, where
        oneDNN's convolution also holds input and output reordered to a blocked layout (at batch 1000 a peak of three
        to four times the output; README "What training costs")."""
        n = len(self.kernel_size)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, u, bias)):
            return self._conv(x, u.reshape(*u.shape, *(1,) * n), bias)
        y = torch.matmul(u, x.flatten(-n)).unflatten(-1, x.shape[-n:])
        return y if bias is None else y.add_(bias.view(-1, *(1,) * n))

    def _spatial_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution with this layer's stride, padding, dilation and padding mode."""
        if self.padding_mode == "zeros":
            return self._conv(x, weight, bias, self.stride, self.padding, self.dilation)
        x = F.pad(x, self._explicit_padding, mode=self.padding_mode)
        return self._conv(x, weight, bias, self.stride, 0, self.dilation)

    def _product_sizes(self, input_shape: Sequence[int],
                       ranks: Sequence[int]) -> tuple[list[Product], list[Product]]:
        """For S samples with P_in input and P_out output positions and K = prod(kernel_size): chain U_in^T
        (S P_in n_in r_in), the middle kernel (S P_out r_in r_out K), U_out (S P_out r_out n_out); merged: forming W
        from the middle kernel (r_out r_in K n_in + n_out r_out K n_in), then one convolution (S P_out n_in n_out K).
        The middle kernel itself costs both forms the same."""
        r_out, r_in, *_ = ranks
        n_out, n_in, *kernel = self.shape
        spatial = list(input_shape[-len(kernel):])
        samples = math.prod(input_shape[:-len(kernel) - 1])
        pads = self._explicit_padding[::-1]  # (right, left) per dimension, first dimension first
        out = [(size + pads[2 * i] + pads[2 * i + 1] - d * (k - 1) - 1) // s + 1
               for i, (size, k, s, d) in enumerate(zip(spatial, kernel, self.stride, self.dilation))]
        p_in, p_out, k = samples * math.prod(spatial), samples * math.prod(out), math.prod(kernel)
        chain = [Product(p_in * n_in * r_in, p_in * n_in + n_in * r_in, p_in * r_in),
                 Product(p_out * r_in * r_out * k, p_in * r_in + r_out * r_in * k, p_out * r_out),
                 Product(p_out * r_out * n_out, p_out * r_out + r_out * n_out, p_out * n_out)]
        merged = [Product(r_out * r_in * k * n_in, r_out * r_in * k + n_in * r_in, r_out * k * n_in),
                  Product(n_out * r_out * k * n_in, n_out * r_out + r_out * k * n_in, n_out * k * n_in),
                  Product(p_out * n_in * n_out * k, p_in * n_in + n_out * n_in * k, p_out * n_out)]
        return chain, merged

    def galerkin_gradient(self, factors: Sequence[Tensor], x: Tensor, dy: Tensor) -> Tensor:
        """Weight gradient of the middle convolution for inputs U_in^T x and output gradient U_out^T dy, times the
        transposed spatial factors."""
        u_out, u_in, *spatial = factors
        n = len(self.kernel_size)
        if x.dim() == n + 1:  # unbatched
            x, dy = x.unsqueeze(0), dy.unsqueeze(0)
        x = F.pad(self._channel_map(x, u_in.T), self._explicit_padding,
                  mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        dy = self._channel_map(dy, u_out.T)
        weight_grad = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[n - 1]
        grad = weight_grad(x, (u_out.shape[1], u_in.shape[1], *self.kernel_size), dy,
                           stride=self.stride, padding=0, dilation=self.dilation)
        for mode, u in enumerate(spatial, start=2):
            grad = mode_dot(grad, u.T, mode)
        return grad

    def _dense_layer(self, in_channels: int, out_channels: int, weight: Tensor, bias: Tensor | None,
                     **options: object) -> nn.Module:
        conv = self._dense(in_channels, out_channels, weight.shape[2:], bias=bias is not None,
                           device=weight.device, dtype=weight.dtype, **options)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv.train(self.training)

    def _options(self) -> dict[str, object]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "padding_mode": self.padding_mode}

    def arguments(self) -> dict[str, object]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": self.kernel_size,
                **self._options(), "bias": self.bias is not None, "ranks": self._constructor_ranks(),
                "max_ranks": self.max_ranks}

    def _factor_chain(self) -> nn.Sequential:
        """Three convolutions: 1x1 (C_in -> r_in), kxk (r_in -> r_out) with the spatial factors merged,
        1x1 (r_out -> C_out)."""
        core, (u_out, u_in, *spatial) = self.decomposition()
        r_out, r_in = u_out.shape[1], u_in.shape[1]
        ones = (1,) * len(self.kernel_size)
        return nn.Sequential(
            self._dense_layer(self.in_channels, r_in, u_in.T.reshape(r_in, self.in_channels, *ones), None),
            self._dense_layer(r_in, r_out, self._kernel(core, spatial), None, **self._options()),
            self._dense_layer(r_out, self.out_channels, u_out.reshape(self.out_channels, r_out, *ones), self.bias),
        ).train(self.training)

    def to_dense(self) -> nn.Module:
        return self._dense_layer(self.in_channels, self.out_channels, self.dense_weight(), self.bias, **self._options())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, padding_mode={self.padding_mode}, "
                f"{super().extra_repr()}")


def _ntuple(value: int | Sequence[int], n: int, name: str, low: int = 1) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        raise ValueError(f"`{name}` must be an int >= {low} or a tuple of {n} such ints, got {value!r}")
    return values


def _explicit_padding(padding: str | tuple[int, ...], kernel_size: tuple[int, ...],
                      dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Padding as F.pad takes it (last dimension first, (left, right) each), matching nn.Conv's 'same' split."""
    pads = []
    for i, (k, d) in enumerate(zip(kernel_size, dilation)):
        if padding == "valid":
            left = right = 0
        elif padding == "same":
            total = d * (k - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = padding[i]
        pads.append((left, right))
    return tuple(p for pair in reversed(pads) for p in pair)


class TuckerConv1d(_TuckerConvNd):
    """Tucker form of nn.Conv1d; input (N, C_in, L) or (C_in, L)."""

    _dense = nn.Conv1d
    mode_names = ("out", "in", "l")


class TuckerConv2d(_TuckerConvNd):
    """Tucker form of nn.Conv2d; input (N, C_in, H, W) or (C_in, H, W)."""

    _dense = nn.Conv2d
    mode_names = ("out", "in", "h", "w")


class TuckerConv3d(_TuckerConvNd):
    """Tucker form of nn.Conv3d; input (N, C_in, D, H, W) or (C_in, D, H, W)."""

    _dense = nn.Conv3d
    mode_names = ("out", "in", "d", "h", "w")


TUCKER_LAYERS: dict[type[nn.Module], type[TuckerLayer]] = {
    nn.Linear: TuckerLinear,
    nn.Conv1d: TuckerConv1d,
    nn.Conv2d: TuckerConv2d,
    nn.Conv3d: TuckerConv3d,
}
"""The Tucker layer that replaces each dense torch layer type."""
