"""Convert a LeNet5 to Tucker form, cut its ranks, and export the compact model.

    python examples/quickstart.py
"""

import torch
from torch import nn

import lightning_lowrank as ll


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def main() -> None:
    torch.manual_seed(0)
    model = lenet5()
    x = torch.randn(8, 1, 28, 28)
    dense_out = model(x)

    print(ll.convert(model, keep_first_last=True))  # HOSVD of the dense weights: exact at full rank
    error = (model(x) - dense_out).norm() / dense_out.norm()
    print(f"relative change of the outputs by the conversion at full rank: {error:.1e}")

    for layer in model.modules():  # what training with the integrator does: lower the active ranks
        if isinstance(layer, ll.TuckerLayer):
            layer.set_rank([max(1, r // 5) if mode < 2 else r for mode, r in enumerate(layer.ranks)])
    print(ll.summary(model))

    compact = ll.compact(model).eval()  # plain torch layers at exactly the active ranks
    program = torch.export.export(compact, (x,))
    print(f"compact model: {sum(p.numel() for p in compact.parameters()):,} parameters, torch.export OK, "
          f"max |difference| to the Tucker model {(program.module()(x) - model(x)).abs().max():.1e}")
    print(compact)


if __name__ == "__main__":
    main()
