"""One agent job, run in a child process: ``python -m edgerep.devices._job JOB_DIR``.

Reads ``JOB_DIR/request.json`` (written by the agent after it checked the upload),
runs `edgerep.devices.local.run_request` on ``JOB_DIR/files/bundle`` and writes the
report to ``JOB_DIR/result.json``. A separate process, so that the agent can stop
a job on timeout or cancel by killing its process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from edgerep._json import finite
    from edgerep._quiet import quiet_third_party
    from edgerep.devices._archive import BUNDLE_DIR
    from edgerep.devices._base import BenchRequest
    from edgerep.devices.local import run_request

    directory = Path(argv[0])
    request = json.loads((directory / "request.json").read_text())
    with quiet_third_party(0):  # the job log keeps what matters when a job fails
        report = run_request(
            BenchRequest(
                bundle=str(directory / "files" / BUNDLE_DIR),
                variant=request["variant"],
                settings=request["settings"],
                data=request["data"],
            ),
            allowed_runtimes=request["allowed_runtimes"],
        )
    # the client does not see this machine's paths
    for row in report["rows"]:
        row["bundle"] = None
    tmp = directory / "result.json.tmp"
    tmp.write_text(json.dumps(finite(report), allow_nan=False))
    tmp.rename(directory / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
