"""Small plain nets for pruning tests: a chain, and one with add, concat, depthwise, grouped."""

from __future__ import annotations

import torch
from torch import nn


def chain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


class Coupled(nn.Module):
    """Residual add, concatenation, a depthwise conv and a grouped conv after the stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 24, 3, padding=1)  # residual: a + b(a)
        self.c = nn.Conv2d(24, 8, 1)  # concatenated with the residual sum
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.pw2 = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        a = torch.relu(self.a(x))
        r = a + torch.relu(self.b(a))
        cat = torch.cat([r, torch.relu(self.c(r))], 1)
        y = torch.relu(self.dw(cat))
        y = torch.relu(self.pw(y))
        y = torch.relu(self.g(y))
        y = torch.relu(self.pw2(y))
        return self.head(y.mean((2, 3)))


def coupled(seed: int = 0) -> Coupled:
    torch.manual_seed(seed)
    return Coupled().eval()
