"""Model sources: python factories with weights, exported programs, and every error."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError, SourceError
from edgerep.source import load_model
from edgerep.spec import parse_input_spec

NET = """
import torch
from torch import nn

EDGEREP_INPUTS = ["x:Nx3x8x8"]

class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

def build():
    return Net()

def build_wide():
    return Net(width=6)

def build_broken():
    raise RuntimeError("no GPU here")

def build_tensor():
    return torch.zeros(3)

NOT_CALLABLE = 3
"""


def _write(tmp_path, text, name="net.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture
def net_file(tmp_path):
    return _write(tmp_path, NET)


def test_factory_loads_in_eval_mode_with_description(net_file):
    model, desc = load_model(f"{net_file}:build")
    assert isinstance(model, nn.Module) and not model.training
    assert desc["kind"] == "python-factory"
    assert desc["factory"] == "build" and desc["class"] == "Net"
    assert desc["parameters"] == sum(p.numel() for p in model.parameters())
    assert desc["inputs"] == ["x:Nx3x8x8"]


def test_weights_round_trip(net_file, tmp_path):
    model, _ = load_model(f"{net_file}:build")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.5)
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    loaded, desc = load_model(f"{net_file}:build", weights=str(ckpt))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert len(desc["weights_sha256"]) == 64
    # a training checkpoint that keeps the state dict under 'state_dict' also loads
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "c.pt")
    _, desc = load_model(f"{net_file}:build", weights=str(tmp_path / "c.pt"))
    assert desc["weights_key"] == "state_dict"


def test_file_can_import_its_neighbours(tmp_path):
    _write(tmp_path, "WIDTH = 5\n", name="helpers_for_net.py")
    p = _write(
        tmp_path,
        """
        from torch import nn
        from helpers_for_net import WIDTH

        def build():
            return nn.Linear(2, WIDTH)
        """,
        name="uses_helper.py",
    )
    model, _ = load_model(f"{p}:build")
    assert model.out_features == 5


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist.*nope\.py"):
        load_model(f"{tmp_path / 'nope.py'}:build")


def test_file_that_fails_to_import(tmp_path):
    p = _write(tmp_path, "import torch\nx = 1 / 0\n")
    with pytest.raises(
        SourceError, match=r"importing .* failed: ZeroDivisionError: division by zero"
    ):
        load_model(f"{p}:build")


def test_factory_not_found_lists_callables(net_file):
    with pytest.raises(SourceError) as e:
        load_model(f"{net_file}:biuld")
    msg = str(e.value)
    assert "has no 'biuld'" in msg and "did you mean 'build'" in msg
    assert "build_wide" in msg and "Net" in msg
    assert "nn" not in msg.split("callables in the file:")[1].split(
        ", "
    )  # imported names are not listed


def test_no_factory_named(net_file):
    with pytest.raises(SourceError, match=r"names no factory.*build"):
        load_model(str(net_file))


def test_factory_not_callable(net_file):
    with pytest.raises(SourceError, match=r"'NOT_CALLABLE' .* is a int, not a callable"):
        load_model(f"{net_file}:NOT_CALLABLE")


def test_factory_that_raises(net_file):
    with pytest.raises(SourceError, match=r"build_broken\(\) .* failed: RuntimeError: no GPU here"):
        load_model(f"{net_file}:build_broken")


def test_factory_returning_non_module(net_file):
    with pytest.raises(SourceError, match=r"returned a Tensor, not a torch\.nn\.Module"):
        load_model(f"{net_file}:build_tensor")


def test_checkpoint_alone_is_not_a_source(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint alone does not define the model"):
        load_model(str(tmp_path / "model.pth"))


def test_missing_weights_file(net_file, tmp_path):
    with pytest.raises(SourceError, match=r"weights file .* does not exist"):
        load_model(f"{net_file}:build", weights=str(tmp_path / "nope.pt"))


def test_key_mismatch_lists_missing_and_unexpected(net_file, tmp_path):
    state = {f"extra.{i}": torch.zeros(1) for i in range(12)}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(SourceError) as e:
        load_model(f"{net_file}:build", weights=str(tmp_path / "w.pt"))
    msg = str(e.value)
    assert "7 missing key(s)" in msg and "conv.weight" in msg and "bn.running_var" in msg
    assert "12 unexpected key(s)" in msg and "extra.0" in msg and "(2 more)" in msg


def test_dataparallel_prefix_hint(net_file, tmp_path):
    model, _ = load_model(f"{net_file}:build")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(SourceError, match=r"starts with 'module\.'.*strip the prefix"):
        load_model(f"{net_file}:build", weights=str(tmp_path / "w.pt"))


def test_shape_mismatch(net_file, tmp_path):
    wide, _ = load_model(f"{net_file}:build_wide")
    torch.save(wide.state_dict(), tmp_path / "w.pt")
    with pytest.raises(SourceError) as e:
        load_model(f"{net_file}:build", weights=str(tmp_path / "w.pt"))
    assert "conv.weight: file (6, 3, 3, 3) vs model (4, 3, 3, 3)" in str(e.value)
    assert "other shapes" in str(e.value)


def test_weights_that_are_not_a_state_dict(net_file, tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "w.pt")
    with pytest.raises(SourceError, match=r"not a state dict.*'epoch' holds int"):
        load_model(f"{net_file}:build", weights=str(tmp_path / "w.pt"))
    torch.save([torch.zeros(1)], tmp_path / "l.pt")
    with pytest.raises(SourceError, match=r"not a state dict: it holds list"):
        load_model(f"{net_file}:build", weights=str(tmp_path / "l.pt"))


def test_pickled_module_is_refused(tmp_path):
    # a whole pickled module is refused by weights_only loading: nothing is unpickled
    torch.save(nn.Linear(2, 2), tmp_path / "w.pt")
    p = _write(
        tmp_path, "from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n", "lin.py"
    )
    with pytest.raises(SourceError, match=r"weights_only=True.*plain state dicts"):
        load_model(f"{p}:build", weights=str(tmp_path / "w.pt"))


def test_bad_declared_inputs(tmp_path):
    p = _write(
        tmp_path,
        "from torch import nn\nEDGEREP_INPUTS = ['x=1']\ndef build():\n    return nn.Linear(2, 2)\n",
    )
    with pytest.raises(SourceError, match=r"EDGEREP_INPUTS .*'x=1'"):
        load_model(f"{p}:build")


def test_exported_program_source(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    loaded, desc = load_model(str(path))
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))
    assert desc["kind"] == "exported-program"
    (spec,) = desc["inputs"]
    shape = spec.split(":")[1]
    assert shape.endswith("x4") and "[1..1..32]" in shape  # the symbol keeps its range
    with pytest.raises(ConfigError, match="carries its own weights"):
        load_model(str(path), weights="w.pt")
    # an unbounded dim (torch's int_oo as the upper bound) reads back without a max
    unbounded = torch.export.export(
        model, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    torch.export.save(unbounded, str(tmp_path / "u.pt2"))
    _, desc = load_model(str(tmp_path / "u.pt2"))
    (spec,) = desc["inputs"]
    parsed = parse_input_spec(spec)
    assert parsed.shape[1:] == (4,) and parsed.symbols
    assert parsed.range_of(parsed.symbols[0]).max is None
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match=r"torch\.export\.save"):
        load_model(str(tmp_path / "junk.pt2"))
