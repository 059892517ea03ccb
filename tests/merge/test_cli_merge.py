"""`edgerep merge` and `edgerep convert --adapter`: outputs, exit codes and messages."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch

from edgerep.cli import EXIT_OK, EXIT_SOURCE, EXIT_USAGE, main
from tests.merge import rel_error

pytest.importorskip("peft", reason="peft is an optional extra (pip install 'edgerep[peft]')")

from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def build():
    torch.manual_seed(0)
    return Net()

def wide():
    torch.manual_seed(0)
    return Net(width=12)

EDGEREP_INPUTS = ["x:Nx8"]
"""


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "model.py"
    p.write_text(textwrap.dedent(MODEL))
    return p


def _namespace(model_file):
    ns: dict = {}
    exec(compile(model_file.read_text(), str(model_file), "exec"), ns)
    return ns


@pytest.fixture
def adapters(tmp_path, model_file):
    """Two PEFT adapter directories trained on build()'s model (random weights)."""
    ns = _namespace(model_file)
    paths = []
    for i, targets in enumerate((["fc1", "fc2"], ["fc1"])):
        model = get_peft_model(ns["build"](), LoraConfig(r=2, target_modules=targets))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
        path = tmp_path / f"adapter{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def test_merge_writes_a_verified_bundle(model_file, adapters, tmp_path, capsys):
    before = _sha(model_file)
    out = tmp_path / "out"
    code = main(["merge", f"{model_file}:build", "--adapter", str(adapters[0]), "-o", str(out)])
    assert code == EXIT_OK, capsys.readouterr().err
    assert _sha(model_file) == before  # the base model on disk is only read
    assert {p.name for p in out.iterdir()} >= {
        "model.pt2",
        "manifest.json",
        "merge_report.json",
        "report.txt",
    }
    report = json.loads((out / "merge_report.json").read_text())
    assert [m["path"] for m in report["merged"]] == ["fc1", "fc2"]
    assert report["max_rel_error"] <= 1e-9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"][0]["parity"]["passed"]
    assert manifest["source"]["adapters"][0]["name"] == "default"
    assert "adapter_model.safetensors" in manifest["source"]["adapters"][0]["sha256"]
    assert any(row["stage"] == "merge" and row["action"] == "merged" for row in manifest["ledger"])
    printed = capsys.readouterr().out
    assert "merge: active" in printed and "lora.Linear [default] -> Linear(" in printed

    # the saved program equals the adapter model
    from peft import PeftModel

    ns = _namespace(model_file)
    reference = PeftModel.from_pretrained(ns["build"](), str(adapters[0])).eval()
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert rel_error(reference(x), program(x)) <= 1e-5


def test_merge_combination_and_json(model_file, adapters, tmp_path, capsys):
    out = tmp_path / "mix"
    code = main(
        [
            "merge",
            f"{model_file}:build",
            "--adapter",
            f"a={adapters[0]}:0.6",
            "--adapter",
            f"b={adapters[1]}:0.4",
            "--combine-method",
            "ties",
            "--density",
            "0.5",
            "-o",
            str(out),
            "--json",
        ]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["merge_report"]["mode"] == "combine"
    assert result["merge_report"]["weights"] == {"a": 0.6, "b": 0.4}
    assert result["formats"][0]["status"] == "verified"
    assert any("parity reference: the merged model" in n for n in result["merge_report"]["notes"])


def test_convert_with_adapter_to_onnx(model_file, adapters, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(
        [
            "convert",
            f"{model_file}:build",
            "--adapter",
            str(adapters[0]),
            "--to",
            "onnx",
            "-o",
            str(out),
        ]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    stages = [row["stage"] for row in manifest["ledger"]]
    assert stages.index("merge") < stages.index("fold") < stages.index("export")
    assert (out / "merge_report.json").is_file()
    assert manifest["artifacts"][0]["parity"]["passed"]


def test_safetensors_file_needs_its_scale(model_file, tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    save_file(
        {"fc1.lora_A.weight": torch.ones(2, 8), "fc1.lora_B.weight": torch.ones(16, 2)}, str(path)
    )
    args = ["merge", f"{model_file}:build", "--adapter", str(path), "-o", str(tmp_path / "o")]
    assert main(args) == EXIT_USAGE
    assert "--lora-alpha" in capsys.readouterr().err
    assert main([*args, "--lora-alpha", "4"]) == EXIT_OK


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing-target", EXIT_SOURCE, "targets module(s) missing from the base model: 'fc2'"),
        ("shape", EXIT_SOURCE, "has shape [16, 2] in the adapter but [12, 2] in the model"),
        ("incomplete", EXIT_SOURCE, "is incomplete: missing adapter_config.json"),
        ("no-such-path", EXIT_SOURCE, "does not exist"),
        ("bad-method", EXIT_USAGE, "unknown --combine-method 'tie'; did you mean 'ties'"),
        ("method-without-combine", EXIT_USAGE, "apply when combining adapters"),
        ("unnamed-pair", EXIT_USAGE, "need a name each"),
    ],
)
def test_errors(case, code, message, model_file, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    source = f"{model_file}:build"
    extra: list[str] = ["--adapter", str(adapters[0])]
    if case == "missing-target":
        (model_file.parent / "small.py").write_text(
            "from torch import nn\n"
            "def build():\n    return nn.Sequential()\n"
            "class M(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.fc1 = nn.Linear(8, 16)\n"
            "    def forward(self, x):\n        return self.fc1(x)\n"
            "def one():\n    return M()\n"
            "EDGEREP_INPUTS = ['x:Nx8']\n"
        )
        source = f"{model_file.parent / 'small.py'}:one"
    elif case == "shape":
        source = f"{model_file}:wide"
    elif case == "incomplete":
        (adapters[0] / "adapter_config.json").unlink()
    elif case == "no-such-path":
        extra = ["--adapter", str(tmp_path / "nope")]
    elif case == "bad-method":
        extra += ["--combine-method", "tie"]
    elif case == "method-without-combine":
        extra += ["--combine-method", "ties"]
    elif case == "unnamed-pair":
        extra += ["--adapter", str(adapters[1])]
    assert main(["merge", source, *extra, "-o", str(out)]) == code
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()
