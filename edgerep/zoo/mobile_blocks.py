"""Blocks of recent mobile CNN / ViT-hybrid families, written from their papers' equations.

Like `edgerep.zoo.blocks`, these are plain training-time modules with no deploy
code; their eval-mode forward mixes affine structure (conv/linear + BN, branch
sums) with non-affine parts (activations, concatenation, squeeze-excite), which
is what `edgerep.fold`'s sub-region fallback is for. The per-block deploy folds
the papers ship live in `bench/fold_reference.py`, only to compare against.

Notation as in `edgerep.zoo.blocks`: ``BN(z) = a ⊙ z + c`` in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgerep.errors import ConfigError
from edgerep.zoo._registry import register_block
from edgerep.zoo.blocks import ConvBN

__all__ = [
    "BNLinearHead",
    "EfficientViMBlock",
    "GhostModuleV3",
    "LCNetV2Block",
    "RegNetXBlock",
    "RepVGGDW",
    "RepViTBlock",
    "SHViTBlock",
    "TinyViTBlock",
]


# ------------------------------------------------------------------ GhostNetV3


@register_block("ghostnetv3")
class GhostModuleV3(nn.Module):
    """GhostNetV3's re-parameterizable ghost module (Liu et al., 2024).

    Primary features ``p = act(Σᵢ BNᵢ(Wᵢ * x) + BN_s(W_s * x) + BN_id(x))`` with
    `num_branches` kxk conv branches, a 1x1 scale branch (when k > 1) and an
    identity BN (when ``in_channels == c`` and stride 1); cheap features
    ``q = act(Σᵢ BN'ᵢ(Dᵢ * p) + BN'_s(D_s * p) + BN'_id(p))`` with depthwise
    `dw_size` convs ``Dᵢ``, a depthwise 1x1 scale branch and an identity BN; the
    output is ``cat(p, q)[:, :out_channels]``. Deploy form: one kxk conv and one
    depthwise `dw_size` conv (each with bias), concatenated.

    Args:
        in_channels: input channels.
        out_channels: output channels (``c = ceil(out/2)`` primary features).
        kernel_size: primary conv kernel (odd).
        dw_size: cheap depthwise kernel (odd).
        stride: primary conv stride.
        num_branches: parallel conv branches in each of the two parts.
        act: ReLU after each part (GhostNetV3 drops it in a bottleneck's second module).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        dw_size: int = 3,
        stride: int = 1,
        num_branches: int = 3,
        act: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or dw_size % 2 == 0:
            raise ConfigError(
                f"GhostModuleV3 needs odd kernels, got kernel_size={kernel_size}, "
                f"dw_size={dw_size}; use 1, 3, 5, ..."
            )
        c = math.ceil(out_channels / 2)
        self.out_channels = out_channels
        k = kernel_size
        self.primary = nn.ModuleList(
            ConvBN(in_channels, c, k, stride=stride, padding=k // 2) for _ in range(num_branches)
        )
        self.primary_scale = ConvBN(in_channels, c, 1, stride=stride) if k > 1 else None
        self.primary_skip = (
            nn.BatchNorm2d(in_channels) if in_channels == c and stride == 1 else None
        )
        self.cheap = nn.ModuleList(
            ConvBN(c, c, dw_size, padding=dw_size // 2, groups=c) for _ in range(num_branches)
        )
        self.cheap_scale = ConvBN(c, c, 1, groups=c)
        self.cheap_skip = nn.BatchNorm2d(c)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = sum(b(x) for b in self.primary)
        if self.primary_scale is not None:
            p = p + self.primary_scale(x)
        if self.primary_skip is not None:
            p = p + self.primary_skip(x)
        p = self.act(p)
        q = sum(b(p) for b in self.cheap) + self.cheap_scale(p) + self.cheap_skip(p)
        q = self.act(q)
        return torch.cat([p, q], dim=1)[:, : self.out_channels]


# ---------------------------------------------------------------------- RepViT


class RepVGGDW(nn.Module):
    """RepViT's token mixer: ``y = BN(BN₁(D₃ * x) + (D₁ * x + b) + x)`` with a
    depthwise 3x3 conv-BN, a biased depthwise 1x1 conv and the identity, summed,
    then a BatchNorm. Deploy form: one depthwise 3x3 conv with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ConvBN(channels, channels, 3, padding=1, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


@register_block("repvit")
class RepViTBlock(nn.Module):
    """RepViT block (Wang et al., CVPR 2024).

    Stride 1: token mixer ``t = RepVGGDW(x)`` (optionally times a squeeze-excite
    gate), channel mixer ``y = t + BN₂(W₂ * GELU(BN₁(W₁ * t)))`` with 1x1 convs.
    Stride 2: token mixer ``t = BN'(W' * BN(D * x))`` (a depthwise kxk conv-BN,
    then a 1x1 conv-BN to `out_channels`), same channel mixer with hidden 2·out.
    Deploy form: every conv-BN one conv, RepVGGDW one depthwise 3x3 conv: no BN.

    Args:
        in_channels: input channels.
        out_channels: output channels (must equal `in_channels` at stride 1).
        hidden: channel-mixer width (default 2·out).
        stride: 1 or 2.
        kernel_size: depthwise kernel of the stride-2 token mixer.
        se: squeeze-excite after the token mixer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden: int | None = None,
        stride: int = 1,
        kernel_size: int = 3,
        se: bool = False,
    ) -> None:
        super().__init__()
        if stride not in (1, 2) or (stride == 1 and in_channels != out_channels):
            raise ConfigError(
                f"RepViTBlock needs stride 1 with in_channels == out_channels, or stride 2; "
                f"got stride={stride}, in={in_channels}, out={out_channels}"
            )
        hid = hidden or 2 * out_channels
        mixer: list[nn.Module]
        if stride == 1:
            mixer = [RepVGGDW(in_channels)]
        else:
            mixer = [
                ConvBN(
                    in_channels,
                    in_channels,
                    kernel_size,
                    stride=2,
                    padding=kernel_size // 2,
                    groups=in_channels,
                ),
                ConvBN(in_channels, out_channels, 1),
            ]
        if se:
            mixer.insert(1, _SqueezeExcite(in_channels))
        self.token_mixer = nn.Sequential(*mixer)
        self.channel_mixer = nn.Sequential(
            ConvBN(out_channels, hid, 1), nn.GELU(), ConvBN(hid, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.token_mixer(x)
        return t + self.channel_mixer(t)


# --------------------------------------------------------------------- heads


@register_block("bn_linear")
class BNLinearHead(nn.Module):
    """LeViT / RepViT / SHViT classifier: ``y = W · BN(x) + b`` on pooled (N, C) features.

    Deploy form: one Linear, ``W' = W · diag(a)``, ``b' = b + W · c``.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


# -------------------------------------------------------------------- RegNetX


@register_block("regnetx")
class RegNetXBlock(nn.Module):
    """RegNetX's residual bottleneck (Radosavovic et al., 2020), plain conv-BN:
    ``y = ReLU(s(x) + BN₃(W₃ * ReLU(BN₂(G * ReLU(BN₁(W₁ * x))))))`` with 1x1
    convs W₁, W₃, a grouped 3x3 conv G (stride s), and ``s(x)`` the identity or a
    strided 1x1 conv-BN. No re-parameterization: deploy folds each conv-BN.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the grouped conv and the shortcut.
        group_width: channels per group of the 3x3 conv.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, group_width: int = 4
    ) -> None:
        super().__init__()
        if out_channels % group_width:
            raise ConfigError(
                f"RegNetXBlock out_channels={out_channels} is not a multiple of "
                f"group_width={group_width}"
            )
        self.conv1 = ConvBN(in_channels, out_channels, 1)
        self.conv2 = ConvBN(
            out_channels,
            out_channels,
            3,
            stride=stride,
            padding=1,
            groups=out_channels // group_width,
        )
        self.conv3 = ConvBN(out_channels, out_channels, 1)
        self.shortcut = (
            ConvBN(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        s = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(s + y)


# ---------------------------------------------------------------------- SHViT


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class _SingleHeadAttention(nn.Module):
    """SHViT's single-head attention on the first `partial` channels only."""

    def __init__(self, dim: int, partial: int, qk_dim: int) -> None:
        super().__init__()
        self.partial, self.qk_dim = partial, qk_dim
        self.scale = qk_dim**-0.5
        self.pre_norm = nn.GroupNorm(1, partial)
        self.qkv = ConvBN(partial, 2 * qk_dim + partial, 1)
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [self.partial, x.shape[1] - self.partial], dim=1)
        q, k, v = self.qkv(self.pre_norm(x1)).split([self.qk_dim, self.qk_dim, self.partial], 1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(b, self.partial, h, w)
        return self.proj(torch.cat([x1, x2], dim=1))


@register_block("shvit")
class SHViTBlock(nn.Module):
    """SHViT block (Yun & Ro, CVPR 2024): ``x + BN(D * x)`` (depthwise 3x3), then
    ``x + SHSA(x)`` (single-head attention on `partial` channels, conv-BN q/k/v and
    projection), then ``x + BN₂(W₂ * ReLU(BN₁(W₁ * x)))``. Deploy form: every
    conv-BN one conv, the first residual one depthwise conv: no BN.

    Args:
        dim: channels.
        partial: channels that attend (the rest pass through).
        qk_dim: query/key width.
        hidden: FFN width (default 2·dim).
    """

    def __init__(
        self, dim: int, *, partial: int = 4, qk_dim: int = 4, hidden: int | None = None
    ) -> None:
        super().__init__()
        if not 0 < partial <= dim:
            raise ConfigError(f"SHViTBlock partial={partial} must be in 1..dim={dim}")
        self.conv = _Residual(ConvBN(dim, dim, 3, padding=1, groups=dim))
        self.mixer = _Residual(_SingleHeadAttention(dim, partial, qk_dim))
        h = hidden or 2 * dim
        self.ffn = _Residual(nn.Sequential(ConvBN(dim, h, 1), nn.ReLU(), ConvBN(h, dim, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))


# --------------------------------------------------------------------- LCNetV2


@register_block("lcnetv2")
class LCNetV2Block(nn.Module):
    """PP-LCNetV2's re-parameterizable depthwise separable block: a depthwise
    part ``Σₖ BNₖ(Dₖ * x) (+ BN_id(x) at stride 1)`` over several kernel sizes
    (one per entry of `kernel_sizes`, centred), ReLU, then a 1x1 conv-BN and ReLU.
    Deploy form: one depthwise conv of the largest kernel and one 1x1 conv.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_sizes: odd kernel sizes of the depthwise branches.
        stride: depthwise stride.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_sizes: tuple[int, ...] = (5, 3, 1),
        stride: int = 1,
    ) -> None:
        super().__init__()
        if not kernel_sizes or any(k % 2 == 0 for k in kernel_sizes):
            raise ConfigError(f"LCNetV2Block kernel_sizes must be odd, got {kernel_sizes}")
        c = in_channels
        self.dw = nn.ModuleList(
            ConvBN(c, c, k, stride=stride, padding=k // 2, groups=c) for k in kernel_sizes
        )
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None
        self.pw = ConvBN(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(b(x) for b in self.dw)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(self.pw(torch.relu(y)))


# --------------------------------------------------------------------- TinyViT


class _MBConv(nn.Module):
    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.conv1 = ConvBN(c, h, 1)
        self.conv2 = ConvBN(h, h, 3, padding=1, groups=h)
        self.conv3 = ConvBN(h, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


@register_block("tinyvit")
class TinyViTBlock(nn.Module):
    """TinyViT-style stage (Wu et al., ECCV 2022): an MBConv (1x1 conv-BN, GELU,
    depthwise 3x3 conv-BN, GELU, 1x1 conv-BN, residual), then a transformer block
    ``x + Attn(LN(x))`` over windows of `window` x `window` tokens, a local
    depthwise 3x3 conv-BN, and ``x + MLP(LN(x))``. Deploy form: each conv-BN one
    conv (the LayerNorms and attention stay): no BN.

    Args:
        dim: channels.
        heads: attention heads.
        window: window size (the input's sides must be multiples of it).
        mlp_ratio: MLP width / dim.
    """

    def __init__(self, dim: int, *, heads: int = 2, window: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"TinyViTBlock dim={dim} is not a multiple of heads={heads}")
        self.heads, self.window = heads, window
        self.mbconv = _MBConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.local = ConvBN(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def _attention(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        qkv = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x)
        b, c, h, w = x.shape
        s = self.window
        # (b, c, h, w) -> windows (b·h/s·w/s, s·s, c)
        t = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1).reshape(-1, s * s, c)
        t = t + self._attention(self.norm1(t))
        x = t.reshape(b, h // s, w // s, s, s, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        x = self.local(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return t.transpose(1, 2).reshape(b, c, h, w)


# ----------------------------------------------------------------- EfficientViM


@register_block("efficientvim")
class EfficientViMBlock(nn.Module):
    """EfficientViM-style block (Lee et al., CVPR 2025): ``x + BN(D * x)``
    (depthwise 3x3), a hidden-state mixer, ``x + BN(D' * x)``, and a conv-BN FFN.

    The mixer (HSM-SSD, single head): ``B, C, Δ = split(BN(W * LN(x)))`` with a 1x1
    conv-BN projection; ``a = softmax(Δ)`` over tokens weights the input into
    `state` hidden states ``h = V (a ⊙ B)ᵀ``, mixed by a linear-BN ``h' = BN₁d(W_h h)``
    gated by SiLU, and read out ``y = h' C``, then a 1x1 conv-BN output
    projection; ``W_h`` is a 1x1 Conv1d on the (channels, states) layout, as in
    the paper's code. Deploy form: every conv-BN one layer: no BN.

    Args:
        dim: channels.
        state: number of hidden states.
        hidden: FFN width (default 2·dim).
    """

    def __init__(self, dim: int, *, state: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        self.state = state
        self.dw1 = _Residual(ConvBN(dim, dim, 3, padding=1, groups=dim))
        self.norm = nn.GroupNorm(1, dim)
        self.bcdt = ConvBN(dim, 3 * state, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.hidden_mix = nn.Conv1d(dim, dim, 1, bias=False)
        self.hidden_bn = nn.BatchNorm1d(dim)
        self.out = ConvBN(dim, dim, 1)
        self.dw2 = _Residual(ConvBN(dim, dim, 3, padding=1, groups=dim))
        h = hidden or 2 * dim
        self.ffn = _Residual(nn.Sequential(ConvBN(dim, h, 1), nn.ReLU(), ConvBN(h, dim, 1)))

    def _mixer(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        z = self.norm(x)
        bb, cc, dt = self.bcdt(z).flatten(2).split(self.state, dim=1)  # (b, state, n) each
        a = dt.softmax(dim=-1)
        v = self.value(z).flatten(2)  # (b, c, n)
        h = v @ (a * bb).transpose(1, 2)  # (b, c, state)
        h = self.hidden_bn(self.hidden_mix(h))
        h = h * torch.sigmoid(h)
        return self.out((h @ cc).reshape(b, c, hh, ww))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw1(x)
        x = x + self._mixer(x)
        return self.ffn(self.dw2(x))
