"""A model whose repeated blocks regional compilation serves from the compile caches, and (run as
a script) one training step of it with the ``quartet_compile`` log on stderr, one message per
``@@`` line: what tests/test_report_cache.py runs in a fresh process after running the same step
itself."""

import logging

import torch
from torch import nn

import quartet_compile  # noqa: F401  (registers the quartet2 backend)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Blocks(nn.Module):
    """A head (one scaling) before the blocks: the first block's input is then computed, as the
    second's is, so both trace to the same graph and the second comes from the first's entry."""

    def __init__(self, dim: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = 2 * x
        for block in self.blocks:
            x = block(x)
        return x


def example() -> tuple[Blocks, torch.Tensor]:
    torch.manual_seed(0)
    return Blocks(), torch.randn(128, 128, requires_grad=True)


def train_step() -> None:
    """One training step of the example, compiled with quartet2."""
    model, x = example()
    torch.compile(model, backend="quartet2")(x).sum().backward()


if __name__ == "__main__":
    logging.basicConfig(format="@@ %(message)s")
    logging.getLogger("quartet_compile").setLevel(logging.INFO)
    train_step()
