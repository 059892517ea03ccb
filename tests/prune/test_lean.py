"""`import edgerep.prune` and the CLI parser load neither torch nor Torch-Pruning."""

from __future__ import annotations

import subprocess
import sys


def test_prune_package_and_cli_parser_are_lean() -> None:
    code = (
        "import sys, edgerep.prune\n"
        "from edgerep.cli import _parser\n"
        "_parser()\n"
        "edgerep.prune.parse_target('latency=0.5')\n"
        "print(','.join(m for m in ('torch', 'torch_pruning', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
