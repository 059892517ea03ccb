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


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), identity shortcut: relu(x + conv(relu(conv(x))))."""

    def __init__(self, c: int, *, linear_branch: bool = False) -> None:
        super().__init__()
        k, p = (1, 0) if linear_branch else (3, 1)
        self.conv1 = nn.Conv2d(c, 2 * c if linear_branch else c, k, padding=p)
        self.conv2 = nn.Conv2d(self.conv1.out_channels, c, k, padding=p)
        self.linear_branch = linear_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        if not self.linear_branch:
            h = torch.relu(h)
        return torch.relu(x + self.conv2(h))


class ResNetLike(nn.Module):
    """Stem, two identity-shortcut blocks, a strided projection block, head.

    The projection block (``down``: ``proj(x) + f(x)``) is not an identity residual.
    """

    def __init__(self, c: int = 16, *, linear_first: bool = False, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = BasicBlock(c, linear_branch=linear_first)
        self.block2 = BasicBlock(c)
        self.down_f = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down_p = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.block3 = BasicBlock(2 * c)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.block2(self.block1(x))
        x = torch.relu(self.down_p(x) + self.down_f(x))
        x = self.block3(x)
        return self.head(x.mean((2, 3)))


def resnet_like(seed: int = 0, **kw: object) -> ResNetLike:
    torch.manual_seed(seed)
    return ResNetLike(**kw).eval()  # type: ignore[arg-type]


class MixerBlock(nn.Module):
    """MLP-Mixer block (Tolstikhin et al. 2021): token mixing then channel mixing, pre-norm."""

    def __init__(self, tokens: int, dim: int, *, linear_channel_mlp: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tok1 = nn.Linear(tokens, 2 * tokens)
        self.tok2 = nn.Linear(2 * tokens, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.linear = linear_channel_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm1(x).transpose(1, 2)
        x = x + self.tok2(nn.functional.gelu(self.tok1(t))).transpose(1, 2)
        h = self.fc1(x if self.linear else self.norm2(x))
        return x + self.fc2(h if self.linear else nn.functional.gelu(h))


class Mixer(nn.Module):
    """Patch embedding (a strided conv), Mixer blocks, mean pool, head."""

    def __init__(self, dim: int = 16, depth: int = 2, *, linear_last: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(
            *[
                MixerBlock(9, dim, linear_channel_mlp=linear_last and i == depth - 1)
                for i in range(depth)
            ]
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, 9, dim) at 12x12
        x = self.blocks(x)
        return self.head(x.mean(1))


def mixer(seed: int = 0, **kw: object) -> Mixer:
    torch.manual_seed(seed)
    return Mixer(**kw).eval()  # type: ignore[arg-type]


class TokenBlock(nn.Module):
    """Pre-norm transformer-style MLP block on token features: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, dim: int, *, linear: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:  # an affine branch: a fitted map replaces it exactly
            return x + self.fc2(self.fc1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class TokenNet(nn.Module):
    """Token ids (int64, N x T) -> embedding -> residual MLP blocks -> mean pool -> head."""

    def __init__(self, vocab: int = 40, dim: int = 16, *, linear_last: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(TokenBlock(dim), TokenBlock(dim, linear=linear_last))
        self.head = nn.Linear(dim, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(ids)).mean(1))


def token_net(seed: int = 0, **kw: object) -> TokenNet:
    torch.manual_seed(seed)
    return TokenNet(**kw).eval()  # type: ignore[arg-type]


def token_ids(seed: int, n: int, tokens: int = 7, vocab: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, tokens), generator=g)


class PaperBlock(nn.Module):
    """ResNet basic block (He et al. 2016, Fig. 2; projection shortcut "option B").

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the
    identity, or ``bn(conv1x1, stride s)`` when the block changes width or size.
    ``affine_branch`` makes the branch 1x1 convs without the inner ReLU, so that
    the whole block before its ReLU is one strided 1x1 conv.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, *, affine_branch: bool = False):
        super().__init__()
        k, p = (1, 0) if affine_branch else (3, 1)
        self.conv1 = nn.Conv2d(cin, cout, k, stride=stride, padding=p, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, k, padding=p, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.affine_branch = affine_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        if not self.affine_branch:
            h = torch.relu(h)
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class PaperResNet(nn.Module):
    """A small CIFAR-style ResNet (He et al. 2016, Sec. 4.2): 3 stages, downsampling blocks."""

    def __init__(self, c: int = 8, *, affine_down: bool = False, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.layer1 = nn.Sequential(PaperBlock(c, c))
        self.layer2 = nn.Sequential(
            PaperBlock(c, 2 * c, 2, affine_branch=affine_down), PaperBlock(2 * c, 2 * c)
        )
        self.layer3 = nn.Sequential(PaperBlock(2 * c, 4 * c, 2))
        self.fc = nn.Linear(4 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def paper_resnet(seed: int = 0, **kw: object) -> PaperResNet:
    """A `PaperResNet` with random BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    net = PaperResNet(**kw)  # type: ignore[arg-type]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()
