"""What each form of a Tucker layer's forward costs, so that the layer computes with the cheaper one.

A layer computes y from x either through its factor chain (x U_in, then the middle product with the core or the
convolution kernel C x_3 U_k1 ..., then U_out) or through the merged weight (kernel x_2 U_in, then x_1 U_out, then
one dense product x W^T). Each product costs its multiply-adds plus ``ELEMENT_COST`` per tensor element it reads or
writes, once forward and once more for each operand whose gradient autograd computes.
"""

from __future__ import annotations

from typing import NamedTuple

ELEMENT_COST = 64
"""Multiply-adds that reading or writing one tensor element costs (a small product moves more memory than it
computes). Fitted to forward+backward times of both forms of Linear and Conv2d layers on a 2-core CPU, float32 (55-82
in two fits: ``benchmarks/layer_forms.py``, docs/design.md); a GPU's ratio of arithmetic to memory bandwidth is of
the same order (about 30 multiply-adds per float32 element in FP32, more with tensor cores)."""


class Grads(NamedTuple):
    """Which tensors of a forward pass need a gradient: the layer's input, its factors, its core (all False under
    ``torch.no_grad``)."""

    input: bool = True
    factors: bool = True
    core: bool = True


class Product(NamedTuple):
    """One matrix product or convolution of a forward pass, a x b: multiply-adds, tensor elements read and written,
    and passes: 1 (the forward), plus one per operand that needs a gradient (its gradient costs another product of
    the same size)."""

    macs: int
    read: int
    written: int
    passes: int = 1

    def needing(self, a: bool, b: bool) -> Product:
        """This product with a pass for each operand's gradient: ``a``, ``b`` whether they need one."""
        return Product(self.macs, self.read, self.written, 1 + a + b)

    def cost(self) -> int:
        """passes x (macs + ELEMENT_COST x (read + written))."""
        return self.passes * (self.macs + ELEMENT_COST * (self.read + self.written))


def with_passes(chain: list[Product], merged: list[Product], grads: Grads,
                kernel_from_factors: bool) -> tuple[list[Product], list[Product]]:
    """The forward-only products of both forms (chain: into, middle, out; merged: kernel x_2 U_in, x_1 U_out, the
    dense product) with their passes under autograd: an operand needs a gradient when it is a tensor of ``grads``
    that needs one or is computed from one. ``kernel_from_factors``: the middle product's weight is formed from the
    core and (spatial) factors, as a convolution's kernel is."""
    into, middle, out = chain
    merge_in, merge_out, dense = merged
    kernel = grads.core or (grads.factors and kernel_from_factors)
    reduced = grads.input or grads.factors  # U_in^T x
    weight = kernel or grads.factors  # kernel x_2 U_in, and W
    return ([into.needing(grads.input, grads.factors), middle.needing(reduced, kernel),
             out.needing(reduced or kernel, grads.factors)],
            [merge_in.needing(kernel, grads.factors), merge_out.needing(weight, grads.factors),
             dense.needing(grads.input, weight)])
