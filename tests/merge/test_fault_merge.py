"""Fault injection for `edgerep merge`: nothing to merge, and adapter specs with a bad weight."""

from __future__ import annotations

import pytest

from edgerep.cli import EXIT_USAGE, main
from edgerep.errors import ConfigError
from edgerep.merge import parse_adapter_spec

MODEL = """
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))

EDGEREP_INPUTS = ["x:Nx8"]
"""


@pytest.fixture
def source(tmp_path) -> str:
    (tmp_path / "model.py").write_text(MODEL)
    return f"{tmp_path / 'model.py'}:build"


def test_merge_without_any_adapter_fails_and_writes_nothing(source, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["merge", source, "-o", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no adapter found" in err and "--adapter" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_library_merge_without_adapter_still_returns_the_model_with_a_note() -> None:
    """Only callers that ask for an adapter (the `merge` command) get the error."""
    import torch

    from edgerep.merge import merge

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    _, report = merge(model)
    assert any("no adapter" in n for n in report.notes)
    with pytest.raises(ConfigError, match="no adapter found"):
        merge(model, require_adapter=True)


@pytest.mark.parametrize("weight", ["abc", "", "0.5x", "one"])
def test_adapter_weight_that_is_not_a_number_is_refused(weight, source, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "out"
    code = main(["merge", source, "--adapter", f"a={adapter}:{weight}", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert f"is {weight!r}, not a number" in err and f"a={adapter}:0.5" in err, err
    assert not out.exists()


def test_adapter_path_with_a_colon_is_still_a_path(tmp_path) -> None:
    odd = tmp_path / "run:3"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)).path == str(odd)
    assert parse_adapter_spec(f"a={odd}:0.25").path == str(odd)
    assert parse_adapter_spec(f"a={odd}:0.25").weight == 0.25
    # a colon inside a missing directory path is left to the loader ("does not exist")
    assert parse_adapter_spec(f"{tmp_path}/x:y/adapter").path == f"{tmp_path}/x:y/adapter"
