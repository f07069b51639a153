"""Run several `scripts/train.py` commands in one Python process (one per rank under DDP).

Importing torch, Lightning and torchvision costs seconds per process; tests that need many CLI
runs pay it once. Launched with torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ...), every rank runs the same commands and the process group stays
up between them, as it would in one long job.

    python tests/cli_batch.py RESULTS.json -- ARGS_OF_RUN_1 -- ARGS_OF_RUN_2 ...

RESULTS.json (rank 0): one entry per run, `"ok"` or the one-line error it stopped with.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.train import close_run, run, user_error  # noqa: E402


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for arg in argv:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def main(argv: list[str]) -> int:
    out, runs = Path(argv[0]), split_runs(argv[1:])
    sys.argv = sys.argv[:1]  # each run's arguments are passed explicitly
    results: list[str] = []
    for args in runs:
        try:
            run(args)
            results.append("ok")
        except Exception as err:  # keep going: the test reports every failing run
            cause = user_error(err) or err
            results.append(f"{type(cause).__name__}: {cause}")
    close_run(ok=all(r == "ok" for r in results))
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
