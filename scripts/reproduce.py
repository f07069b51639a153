"""Reproduce a paper table: run its rows (configs + overrides), write ours beside the paper's.

    python scripts/reproduce.py transfer            # the real recipe (GPU cluster, real data)
    python scripts/reproduce.py transfer --quick    # each row's embedded stand-in (CPU, minutes)
    python scripts/reproduce.py all --quick

Reads configs/tables/TABLE.yaml and writes runs/tables/TABLE.md and runs/tables/TABLE.json
(`{"rows": [{"name", "metrics": {...}, "paper": {...}}], ...}`). A table file:

    title: ...                     # shown as the heading
    source: ...                    # where the paper numbers come from
    metrics: [test/acc]            # columns (metric names exactly as logged)
    scale: 100                     # ours x scale is printed beside the paper's (papers use %);
                                   #   or {metric: factor}, the others x 1 (speeds, seconds)
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
      - {config: localization/digits_box_regressor.yaml, overrides: [...]}  # with overrides
    selected_on: ...               # optional: the split that chooses the checkpoint (said in the
    reported_on: ...               #   table) and the split the compared metrics come from
    checkpoint: best               # optional (table or row): best (default) | last
    ordering:                      # optional: the paper's ordering of rows, best first; the
      metric: test/acc             #   table says whether ours shows it (adjacent pairs of the
      rows: [fine-tuned, linear probe]  # rows that ran, compared strictly)
      lower_is_better: false

`{root}` in an override is the folder the runs go to (runs/tables/runs).

`--wandb offline|online` also logs each table as a W&B Table (paper beside ours, one row per
experiment) in a run of its own, `table-TABLE` in runs/tables/wandb/ (offline: `wandb sync` it).

Each row runs `fit` then `test` through scripts/train.py's CLI; its metrics come from the
metrics.json that run wrote. The test metrics are those of the checkpoint CHOSEN ON VAL: the
run's `best-*.ckpt` by the module's monitor (`val/acc`, `val/miou`, `val/fid`, ...), not the last
weights, unless the table or row says `checkpoint: last` (a recipe that reports its final
weights). Each row records which checkpoint, by which val metric, with its val score; the
markdown says which split chose the checkpoint and which metrics are compared with the paper's. `--quick` rows are marked as such in the output: their numbers are
the embedded stand-in, not the paper's setting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import yaml  # noqa: E402

from lit_modules.callbacks import keep_previous  # noqa: E402
from scripts.demo import CONFIGS, fit_and_test, quiet_lightning, run_config  # noqa: E402

CHECKPOINTS = ("best", "last")
WANDB_MODES = ("disabled", "offline", "online")

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
    names = {row["name"] for row in table["rows"]}
    unknown = set((table.get("ordering") or {}).get("rows", [])) - names
    if unknown:
        raise SystemExit(f"error: {path}: ordering names rows the table lacks: {sorted(unknown)}")
    for row in [table, *table["rows"]]:
        if row.get("checkpoint", "best") not in CHECKPOINTS:
            raise SystemExit(
                f"error: {path}: checkpoint must be best or last, got {row['checkpoint']!r}"
            )
    return table


def run_row(
    row: dict[str, Any],
    quick: bool,
    root: Path,
    table: str,
    extra: list[str],
    checkpoint: str = "best",
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
    name = re.sub(r"[^\w.-]+", "_", f"{table}_{row['name']}")  # a folder name: runs/<name>/
    t0 = time.perf_counter()
    checkpoint = row.get("checkpoint", checkpoint)
    metrics, chosen = fit_and_test(config, name, root, [*overrides, *extra], checkpoint)
    return {
        "name": row["name"],
        "config": config,
        "quick": quick and "quick" in row,
        "metrics": metrics,
        "paper": row.get("paper", {}),
        "selection": chosen,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def protocol(table: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which split chose each row's checkpoint, and which metrics are compared with the paper."""
    monitors = sorted(
        {r["selection"]["monitor"] for r in rows if r.get("selection", {}).get("monitor")}
    )
    last = table.get("checkpoint", "best") == "last"
    default = (
        "none: the last weights are tested"
        if last
        else f"the val split, best checkpoint by {', '.join(monitors) or 'the module monitor'}"
    )
    return {
        "selected_on": table.get("selected_on", default),
        "reported_on": table.get("reported_on", "the test split, once, with the chosen checkpoint"),
        "compared": list(table["metrics"]),
        "checkpoint": table.get("checkpoint", "best"),
    }


def ordering(table: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Whether our rows show the paper's ordering (`ordering` in the table) on its metric.

    Only rows that ran and logged the metric take part; each adjacent pair must be strictly in
    order. `shown` is None when fewer than two such rows ran.
    """
    spec = table.get("ordering")
    if not spec:
        return None
    metric, lower = spec["metric"], bool(spec.get("lower_is_better", False))
    ours = {r["name"]: r["metrics"].get(metric) for r in rows}
    ran = [(n, ours[n]) for n in spec["rows"] if isinstance(ours.get(n), float | int)]
    wrong = [
        f"{a} {va:.4g} vs {b} {vb:.4g}"
        for (a, va), (b, vb) in zip(ran, ran[1:], strict=False)
        if not (va < vb if lower else va > vb)
    ]
    return {
        "metric": metric,
        "rows": [n for n, _ in ran],
        "lower_is_better": lower,
        "shown": None if len(ran) < 2 else not wrong,
        "out_of_order": wrong,
    }


def _ordering_line(order: dict[str, Any] | None) -> list[str]:
    if order is None:
        return []
    sign = " < " if order["lower_is_better"] else " > "
    claim = f"{sign.join(order['rows'])} on {order['metric']}"
    if order["shown"] is None:
        return ["Paper's ordering: fewer than two rows ran; nothing to compare.", ""]
    if order["shown"]:
        return [f"Paper's ordering ({claim}): shown by our rows.", ""]
    return [
        f"Paper's ordering ({claim}): NOT shown by our rows ({'; '.join(order['out_of_order'])}).",
        "",
    ]


def metric_scale(table: dict[str, Any], metric: str) -> float:
    """`scale`: one factor for every metric, or {metric: factor} (others 1: speeds, seconds)."""
    scale = table.get("scale", 1)
    return scale.get(metric, 1) if isinstance(scale, dict) else scale


def markdown(table: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = table["metrics"]
    head = " | ".join(f"{c} (paper / ours)" for c in cols)
    proto = protocol(table, rows)
    lines = [
        f"# {table.get('title', 'table')}",
        "",
        f"Paper numbers: {table.get('source', '-')}",
        "",
        f"Checkpoint chosen on: {proto['selected_on']}.",
        f"Reported (compared with the paper): {', '.join(proto['compared'])} on "
        f"{proto['reported_on']}.",
        "",
        *_ordering_line(ordering(table, rows)),
        f"| row | config | {head} | chosen checkpoint (val score) | wall s |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in rows:
        cells = []
        for c in cols:
            ours = r["metrics"].get(c)
            paper = r["paper"].get(c)
            cells.append(
                f"{'-' if paper is None else paper} / "
                f"{'-' if ours is None else f'{ours * metric_scale(table, c):.1f}'}"
            )
        tag = " (quick: embedded stand-in)" if r["quick"] else ""
        tag = f" (not run: {r['skipped']})" if r.get("skipped") else tag
        lines.append(
            f"| {r['name']} | `{r['config']}`{tag} | {' | '.join(cells)} | {_chosen(r)} "
            f"| {r['seconds'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _chosen(row: dict[str, Any]) -> str:
    sel = row.get("selection")
    if not sel:
        return "-"
    if sel.get("monitor") is None:
        return sel["checkpoint"]
    score = sel.get("val_score")
    value = "-" if score is None else f"{score:.4g}"
    return f"{sel['checkpoint']} ({sel['monitor']} {value})"


def wandb_table(table: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], list[list]]:
    """The markdown table's columns and cells as values: paper and ours (x scale) per metric."""
    cols = table["metrics"]
    columns = ["row", "config", "quick"]
    for c in cols:
        columns += [f"{c} (paper)", f"{c} (ours)"]
    data = []
    for r in rows:
        cells = [r["name"], r["config"], r["quick"]]
        for c in cols:
            ours = r["metrics"].get(c)
            cells += [r["paper"].get(c), None if ours is None else ours * metric_scale(table, c)]
        data.append([*cells, _chosen(r), r["seconds"]])
    return [*columns, "chosen checkpoint", "wall s"], data


def log_wandb(result: dict[str, Any], table: dict[str, Any], out: Path, mode: str) -> Path | None:
    """Log the table as a W&B Table in a run of its own under `out`/wandb; its run folder.

    Offline (as scripts/train.py's default) needs no account and opens no connection.
    """
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    columns, data = wandb_table(table, result["rows"])
    run = wandb.init(
        project="cnnlab",
        name=f"table-{result['table']}",
        job_type="reproduce",
        dir=str(out),
        mode=mode,
        config={"table": result["table"], "quick": result["quick"], **result["protocol"]},
        reinit="create_new",  # a training run of this process may still be open
    )
    run.log({result["table"]: wandb.Table(columns=columns, data=data)})
    run.finish()
    return Path(run.dir).parent


def setup_step(step: str | dict[str, Any], root: Path) -> tuple[str, list[str]]:
    """A quick_setup entry: a config, or {config, overrides} (`{root}` as in the rows)."""
    if isinstance(step, str):
        return step, []
    return step["config"], [o.replace("{root}", str(root)) for o in step.get("overrides", [])]


def reproduce(
    name: str, quick: bool, out: Path, extra: list[str] | None = None, wandb: str = "disabled"
) -> Path:
    """Run table `name`; `extra` overrides go to every run (e.g. a smoke test's max_epochs)."""
    extra = extra or []
    table = load_table(name)
    root = out / "runs"
    for step in table.get("quick_setup", []) if quick else []:
        config, overrides = setup_step(step, root)
        run_config(config, f"{name}_setup_{Path(config).stem}", root, overrides + extra, test=False)
    checkpoint = table.get("checkpoint", "best")
    rows = [run_row(row, quick, root, name, extra, checkpoint) for row in table["rows"]]
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "table": name,
        "title": table.get("title"),
        "quick": quick,
        "protocol": protocol(table, rows),
        "ordering": ordering(table, rows),
        "rows": rows,
    }
    md = out / f"{name}.md"
    for path in (out / f"{name}.json", md):  # an earlier table is kept, never replaced
        keep_previous(path)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown(table, rows))
    print(md.read_text())
    logged = log_wandb(result, table, out, wandb)
    if logged is not None:
        print(f"W&B table ({wandb}): {logged}")
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
    parser.add_argument(
        "--wandb",
        choices=WANDB_MODES,
        default="disabled",
        help="also log each table as a W&B Table: offline (no account, no network; `wandb sync` "
        "later) or online (after `wandb login`)",
    )
    args = parser.parse_args(argv)
    quiet_lightning()
    names = sorted(p.stem for p in TABLES.glob("*.yaml")) if args.table == "all" else [args.table]
    for name in names:
        reproduce(name, args.quick, args.out, args.override, args.wandb)


if __name__ == "__main__":
    main()
