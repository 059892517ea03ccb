"""`.ci/run` runs exactly the README's test line, and that line installs the browser
the HTML report test needs and adb (on a fresh machine, as root) before anything else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_line():
    readme = (ROOT / "README.md").read_text()
    tests_part = readme[readme.index("**Tests**") :]
    line = re.search(r"```bash\n(.+?)\n```", tests_part, re.DOTALL)[1].strip()
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert ci[-1].strip() == line
    assert line.startswith(
        "(command -v chromium >/dev/null && command -v chromedriver >/dev/null && "
        "command -v adb >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -qq chromium chromium-driver adb >/dev/null))"
    )
    assert line.endswith(".venv/bin/python -m pytest -q")
