"""Loading adapters from disk: PEFT adapter directories and .safetensors LoRA files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import edgerep
from edgerep.errors import ConfigError, SourceError
from edgerep.merge import AdapterSource, load_adapters, parse_adapter_spec
from tests.merge import randomize_adapters, rel_error

pytest.importorskip("peft", reason="peft is an optional extra (pip install 'edgerep[peft]')")

from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

F64 = torch.float64


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, width, 3, padding=1)
        self.fc = nn.Linear(width, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.fc(torch.relu(h))


def base(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return Net(width)


IDS = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc", "conv"]))
    randomize_adapters(model)
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path, model.eval()


def test_peft_directory_round_trip(adapter_dir):
    path, trained = adapter_dir
    model = load_adapters(base(), [str(path)])
    with torch.no_grad():
        assert rel_error(trained(IDS), model(IDS)) <= 1e-6
    merged, report = edgerep.merge(model.to(F64))
    assert [r.path for r in report.merged] == ["conv", "fc"]
    with torch.no_grad():
        assert rel_error(model(IDS), merged(IDS)) <= 1e-9


def test_safetensors_lora_file(tmp_path):
    gen = torch.Generator().manual_seed(2)
    net = base()
    factors = {
        "fc.lora_A.weight": torch.randn(3, 16, generator=gen),
        "fc.lora_B.weight": torch.randn(4, 3, generator=gen),
        "base_model.model.conv.lora_A.weight": torch.randn(2, 8, 3, generator=gen),
        "base_model.model.conv.lora_B.weight": torch.randn(16, 2, 1, generator=gen),
        "emb.lora_embedding_A": torch.randn(5, 20, generator=gen),
        "emb.lora_embedding_B": torch.randn(8, 5, generator=gen),
        "emb.alpha": torch.tensor(2.5),
    }
    path = tmp_path / "lora.safetensors"
    save_file(factors, str(path), metadata={"lora_alpha": "6"})
    model = load_adapters(net, [AdapterSource(str(path))]).to(F64)
    merged, report = edgerep.merge(model)
    assert sorted(r.path for r in report.merged) == ["conv", "emb", "fc"]

    # independently: W' = W0 + (alpha / r)·B·A (alpha from the .alpha tensor where present)
    def f(k):
        return factors[k].to(F64)

    w0 = base().to(F64)
    want_fc = w0.fc.weight + 6 / 3 * f("fc.lora_B.weight") @ f("fc.lora_A.weight")
    b, a = f("base_model.model.conv.lora_B.weight"), f("base_model.model.conv.lora_A.weight")
    want_conv = w0.conv.weight + 6 / 2 * torch.einsum("or,rik->oik", b[..., 0], a)
    want_emb = w0.emb.weight + 2.5 / 5 * (f("emb.lora_embedding_B") @ f("emb.lora_embedding_A")).T
    torch.testing.assert_close(merged.fc.weight, want_fc, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.conv.weight, want_conv, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.emb.weight, want_emb, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert rel_error(model(IDS), merged(IDS)) <= 1e-9


def test_lora_alpha_argument_wins_and_is_needed_without_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(
        {"fc.lora_A.weight": torch.ones(2, 16), "fc.lora_B.weight": torch.ones(4, 2)}, str(path)
    )
    with pytest.raises(ConfigError, match=r"LoRA scale of 'fc' is unknown.*--lora-alpha"):
        load_adapters(base(), [str(path)])
    model = load_adapters(base(), [str(path)], lora_alpha=1.0)
    assert model.base_model.model.fc.scaling["default"] == 0.5


def test_several_adapters_by_name_then_combined(adapter_dir, tmp_path):
    path, _ = adapter_dir
    other = tmp_path / "other.safetensors"
    gen = torch.Generator().manual_seed(3)
    save_file(
        {
            "fc.lora_A.weight": torch.randn(2, 16, generator=gen),
            "fc.lora_B.weight": torch.randn(4, 2, generator=gen),
        },
        str(other),
        metadata={"lora_alpha": "2"},
    )
    specs = [parse_adapter_spec(f"one={path}:0.25"), parse_adapter_spec(f"two={other}:0.75")]
    model = load_adapters(base(), specs).to(F64)
    merged, report = edgerep.merge(model, combine={s.name: s.weight for s in specs})
    assert report.weights == {"one": 0.25, "two": 0.75}
    m = model.base_model.model.fc
    want = m.base_layer.weight + sum(
        w * m.scaling[n] * m.lora_B[n].weight @ m.lora_A[n].weight
        for n, w in (("one", 0.25), ("two", 0.75))
    )
    torch.testing.assert_close(merged.fc.weight, want, rtol=0, atol=1e-12)


def test_parse_adapter_spec():
    assert parse_adapter_spec("path/to/dir") == AdapterSource("path/to/dir")
    assert parse_adapter_spec("a=x.safetensors:0.5") == AdapterSource("x.safetensors", "a", 0.5)
    assert parse_adapter_spec("b=dir") == AdapterSource("dir", "b")
    assert parse_adapter_spec("dir:-1e-1") == AdapterSource("dir", None, -0.1)
    assert parse_adapter_spec("C:dir") == AdapterSource("C:dir")  # not a weight: part of the path
    with pytest.raises(ConfigError, match="names no path"):
        parse_adapter_spec("a=")
    with pytest.raises(ConfigError, match="not a finite number"):
        parse_adapter_spec("a=dir:inf")
    with pytest.raises(ConfigError, match="may hold only"):
        parse_adapter_spec("a b=dir")


# --- errors the user must act on ----------------------------------------------------------


def test_target_modules_missing_from_the_base(adapter_dir):
    path, _ = adapter_dir

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.convolution = nn.Conv1d(8, 16, 3)

    with pytest.raises(
        SourceError, match=r"targets module\(s\) missing .*'conv'.*did you mean 'convolution'"
    ):
        load_adapters(Other(), [str(path)])


def test_shape_mismatch_names_the_tensor_and_both_shapes(adapter_dir, tmp_path):
    path, _ = adapter_dir
    with pytest.raises(
        SourceError,
        match=r"base_model\.model\.fc\.lora_A\.default\.weight has shape \[4, 16\] in the adapter "
        r"but \[4, 12\] in the model",
    ):
        load_adapters(base(width=12), [str(path)])
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"fc.lora_A.weight": torch.ones(2, 15), "fc.lora_B.weight": torch.ones(4, 2)}, str(bad)
    )
    with pytest.raises(
        SourceError, match=r"fc\.lora_A has shape \[2, 15\] in the file but \[2, 16\] fits fc"
    ):
        load_adapters(base(), [str(bad)], lora_alpha=1)


def test_incomplete_adapter_directory(adapter_dir, tmp_path):
    path, _ = adapter_dir
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"incomplete: missing adapter_model\.safetensors"):
        load_adapters(base(), [str(path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"missing adapter_config\.json and adapter_model"):
        load_adapters(base(), [str(empty)])


def test_other_file_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_adapters(base(), [str(tmp_path / "nope")])
    half = tmp_path / "half.safetensors"
    save_file({"fc.lora_A.weight": torch.ones(2, 16)}, str(half))
    with pytest.raises(SourceError, match="without both lora_A and lora_B"):
        load_adapters(base(), [str(half)])
    missing = tmp_path / "missing.safetensors"
    save_file(
        {"fx.lora_A.weight": torch.ones(2, 16), "fx.lora_B.weight": torch.ones(4, 2)}, str(missing)
    )
    with pytest.raises(SourceError, match=r"missing from the base model: fx; did you mean 'fc'"):
        load_adapters(base(), [str(missing)], lora_alpha=1)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(SourceError, match="neither a PEFT adapter directory"):
        load_adapters(base(), [str(text)])
    with pytest.raises(ConfigError, match="need a name each"):
        load_adapters(base(), [str(half), str(missing)])


def test_adapter_config_is_read_not_evaluated(adapter_dir):
    path, _ = adapter_dir
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["fc", "head"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="'head'"):
        load_adapters(base(), [str(path)])
