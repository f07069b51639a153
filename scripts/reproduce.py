"""Reproduce a paper table: run its rows (configs + overrides), write ours beside the paper's.

    python scripts/reproduce.py transfer            # the real recipe (GPU cluster, real data)
    python scripts/reproduce.py transfer --quick    # each row's embedded stand-in (CPU, minutes)
    python scripts/reproduce.py all --quick

Reads configs/tables/TABLE.yaml and writes runs/tables/TABLE.md and runs/tables/TABLE.json
(`{"rows": [{"name", "metrics": {...}, "paper": {...}}], ...}`). A table file:

    title: ...                     # shown as the heading
    source: ...                    # where the paper numbers come from
    metrics: [test/acc]            # columns (metric names exactly as logged)
    scale: 100                     # ours x scale is printed beside the paper's (papers use %)
    rows:
      - name: linear probe
        config: transfer/cifar10_resnet50_linear.yaml
        overrides: [--trainer.max_epochs=100]
        paper: {test/acc: 93.6}
        quick:                     # optional: what --quick runs instead (embedded data)
          config: transfer/digits_linear_probe.yaml
          overrides: ["--model.weights={root}/weights/digits_source.pt"]
    quick_setup:                   # optional: configs fit (not tested) before the --quick rows
      - transfer/digits_pretrain_source.yaml

`{root}` in an override is the folder the runs go to (runs/tables/runs).

Each row runs `fit` then `test` through scripts/train.py's CLI; its metrics come from the
metrics.json that run wrote. `--quick` rows are marked as such in the output: their numbers are
the embedded stand-in, not the paper's setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import yaml  # noqa: E402

from lit_modules.callbacks import keep_previous  # noqa: E402
from scripts.demo import CONFIGS, quiet_lightning, run_config  # noqa: E402

TABLES = CONFIGS / "tables"


def load_table(name: str) -> dict[str, Any]:
    path = TABLES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLES.glob("*.yaml")))
        raise SystemExit(f"error: no table {path}; known tables: {known}")
    table = yaml.safe_load(path.read_text())
    for i, row in enumerate(table.get("rows") or []):
        missing = {"name", "config"} - row.keys()
        if missing:
            raise SystemExit(f"error: {path}: row {i} lacks {', '.join(sorted(missing))}")
    if not table.get("rows") or not table.get("metrics"):
        raise SystemExit(f"error: {path}: a table needs `metrics` and at least one row")
    return table


def run_row(
    row: dict[str, Any], quick: bool, root: Path, table: str, extra: list[str]
) -> dict[str, Any]:
    if quick and "quick" not in row:  # needs the real data: listed, not run
        return {
            "name": row["name"],
            "config": row["config"],
            "quick": False,
            "metrics": {},
            "paper": row.get("paper", {}),
            "seconds": None,
            "skipped": "no embedded stand-in",
        }
    spec = row.get("quick", row) if quick else row
    config = spec.get("config", row["config"])
    overrides = [o.replace("{root}", str(root)) for o in spec.get("overrides", [])]
    name = f"{table}_{row['name']}".replace(" ", "_").replace("/", "_")
    t0 = time.perf_counter()
    metrics = run_config(config, name, root, [*overrides, *extra])
    return {
        "name": row["name"],
        "config": config,
        "quick": quick and "quick" in row,
        "metrics": metrics,
        "paper": row.get("paper", {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(table: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    scale, cols = table.get("scale", 1), table["metrics"]
    head = " | ".join(f"{c} (paper / ours)" for c in cols)
    lines = [
        f"# {table.get('title', 'table')}",
        "",
        f"Paper numbers: {table.get('source', '-')}",
        "",
        f"| row | config | {head} | wall s |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for r in rows:
        cells = []
        for c in cols:
            ours = r["metrics"].get(c)
            paper = r["paper"].get(c)
            cells.append(
                f"{'-' if paper is None else paper} / {'-' if ours is None else f'{ours * scale:.1f}'}"
            )
        tag = " (quick: embedded stand-in)" if r["quick"] else ""
        tag = f" (not run: {r['skipped']})" if r.get("skipped") else tag
        lines.append(
            f"| {r['name']} | `{r['config']}`{tag} | {' | '.join(cells)} | {r['seconds'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def reproduce(name: str, quick: bool, out: Path, extra: list[str] | None = None) -> Path:
    """Run table `name`; `extra` overrides go to every run (e.g. a smoke test's max_epochs)."""
    extra = extra or []
    table = load_table(name)
    root = out / "runs"
    for config in table.get("quick_setup", []) if quick else []:
        run_config(config, f"{name}_setup_{Path(config).stem}", root, extra, test=False)
    rows = [run_row(row, quick, root, name, extra) for row in table["rows"]]
    out.mkdir(parents=True, exist_ok=True)
    result = {"table": name, "title": table.get("title"), "quick": quick, "rows": rows}
    md = out / f"{name}.md"
    for path in (out / f"{name}.json", md):  # an earlier table is kept, never replaced
        keep_previous(path)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown(table, rows))
    print(md.read_text())
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("table", help="a name in configs/tables/ (without .yaml), or `all`")
    parser.add_argument("--quick", action="store_true", help="run each row's embedded stand-in")
    parser.add_argument("--out", type=Path, default=Path("runs/tables"), help="output folder")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a train.py flag added to every run, e.g. --override=--trainer.max_epochs=1 (repeatable)",
    )
    args = parser.parse_args(argv)
    quiet_lightning()
    names = sorted(p.stem for p in TABLES.glob("*.yaml")) if args.table == "all" else [args.table]
    for name in names:
        reproduce(name, args.quick, args.out, args.override)


if __name__ == "__main__":
    main()
