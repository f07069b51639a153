"""The main job on the embedded data: every lecture topic trained and measured, one report.

    python scripts/demo.py                       # what `make demo` runs
    python scripts/demo.py --topics transfer     # one topic

Writes runs/demo/REPORT.md, runs/demo/report.json (one object per topic: metrics, wall seconds)
and the PNG figures the report shows. Every number comes from the runs this command just made,
through the same configs and CLI as `scripts/train.py`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from scripts.train import main as cli_main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def quiet_lightning() -> None:
    """One line per run is enough when a script runs dozens: no Lightning banners or warnings."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def fit_args(config: str, name: str, root: Path, overrides: list[str]) -> list[str]:
    """train.py arguments of a quiet `fit` of one config (no progress bar, summary or W&B)."""
    return [
        "fit",
        f"--config={CONFIGS / config}",
        f"--name={name}",
        f"--trainer.default_root_dir={root}",
        "--wandb=disabled",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *overrides,
    ]


def run_config(
    config: str, name: str, root: Path, overrides: list[str], test: bool = True
) -> dict[str, float]:
    """`train.py fit` (then `test`) of one config in this process; returns its metrics.json."""
    cli = cli_main(fit_args(config, name, root, overrides))
    if test:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


TOPICS = {  # name -> module with `demo(out) -> dict` and `report(result) -> list[str]`
    "transfer": "scripts.demo_transfer",
    "detection": "scripts.demo_detection",
    "segmentation": "scripts.demo_segmentation",
    "gan": "scripts.demo_gan",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--topics",
        nargs="+",
        choices=list(TOPICS),
        default=list(TOPICS),
        help="topics to run (default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    args = parser.parse_args(argv)
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    lines = [
        "# cnnlab demo report",
        "",
        "Made by `make demo` (scripts/demo.py) on the embedded MNIST-5k digits.",
        "",
    ]
    for topic in args.topics:
        module = importlib.import_module(TOPICS[topic])  # imported here: topics import this file
        run, write = module.demo, module.report
        t0 = time.perf_counter()
        result = run(args.out)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report[topic] = result
        lines += [*write(result), "", f"Wall time of this topic: {result['seconds']:.0f} s.", ""]
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "REPORT.md").write_text("\n".join(lines))
    print(f"report: {args.out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
