"""Channel groups through attention heads are kept whole, with the reason; the rest prunes and exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.prune import prune
from edgerep.prune._groups import build_groups


class Attention(nn.Module):
    """Hand-written ViT attention (Dosovitskiy et al. 2021, timm layout): one qkv Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class TokenNet(nn.Module):
    """stem -> embed -> attention block -> MLP block -> head, on (N, tokens, 8)."""

    def __init__(self, attention: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.embed = nn.Linear(16, dim)
        self.kind = attention
        self.attn: nn.Module = (
            nn.MultiheadAttention(dim, heads, batch_first=True)
            if attention == "mha"
            else Attention(dim, heads)
        )
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(torch.relu(self.stem(x)))
        if self.kind == "mha":
            x = x + self.attn(x, x, x, need_weights=False)[0]
        else:
            x = x + self.attn(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


@pytest.mark.parametrize("attention", ["mha", "vit"])
def test_head_groups_are_kept_whole_and_the_rest_prunes_and_exports(attention, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TokenNet(attention).eval()
    x = torch.randn(6, 5, 8)
    _, groups = build_groups(model, [x[:1]])
    heads = [g for g in groups if g.reason.startswith("attention heads")]
    expected = "nn.MultiheadAttention attn" if attention == "mha" else "unbound/expanded"
    assert heads and all(expected in g.reason and not g.prunable for g in heads)
    # the residual stream (embed, attention output, fc2) and, for ViT, qkv -> proj
    roots = {g.name for g in heads}
    assert ("attn.qkv" in roots) == (attention == "vit")
    if attention == "vit":
        # the residual stream feeds `c // heads` in forward(): no graph sees it, a trial
        # narrowing does, and the group is kept whole with that reason
        stream = next(
            g for g in groups if ("attn.proj", "out") in {(m.name, m.dim) for m in g.members}
        )
        assert not stream.prunable and "breaks the forward pass" in stream.reason
    pruned, report = prune(model, x[:1], target="macs=0.8", calib=x)
    widths = {g.name: (g.size, g.width) for g in report.groups}
    assert all(widths[g.name][1] == g.size for g in heads)
    assert any(w < s for s, w in widths.values())  # fc1 -> fc2 and the stem still prune
    path = tmp_path / "m.onnx"
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's eval fast path is a fused op the TorchScript exporter lacks
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            ref = pruned(x).numpy()
            torch.onnx.export(pruned, (x,), str(path), dynamo=False, input_names=["x"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
