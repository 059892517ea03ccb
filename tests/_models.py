"""Model source files the CLI tests write to disk (one conv -> BN -> ReLU net)."""

from __future__ import annotations

#: ``build()``: conv 3->4 (3x3, padding 1) -> BN with randomized statistics -> ReLU
CONV_BN = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

def build():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m
"""
