"""The main job on the embedded data: every lecture topic trained and measured, one report.

    python scripts/demo.py                       # what `make demo` runs
    python scripts/demo.py --topics transfer     # one topic

Writes runs/demo/REPORT.md, runs/demo/report.json (one object per topic: metrics, wall seconds)
and the PNG figures the report shows. Every number comes from the runs this command just made,
through the same configs and CLI as `scripts/train.py`. A previous report is not replaced: it
moves to runs/demo/archive/<its time>/ first. The runs themselves are in runs/demo/runs/ (a new
version_N each time; exported weights keep their previous file, see ExportWeights).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# What every pool worker imports anyway (~4.5 s of one core): loaded once, by the fork server
POOL_PRELOAD = ["torch", "torchvision", "lightning.pytorch", "sklearn.svm", "scripts.train"]


def cli_main(args: list[str]) -> Any:
    """`scripts/train.py` with `args`, in this process (imported on first use: `main` starts
    the pools' fork server before this process's own imports, so that the two overlap)."""
    from scripts.train import main

    return main(args)


def config_class(class_path: str) -> type:
    """The class a config's `class_path` names (`package.module.Class`)."""
    module_name, _, cls_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


def quiet_lightning() -> None:
    """One line per run is enough when a script runs dozens: no Lightning banners or warnings."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat's first line."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def free_cores(window: float = 0.5) -> int:
    """Cores idle right now (measured over `window` s), at least 1: the torch threads a run can
    use without oversubscribing a shared machine. The load average would lag by a minute and
    count the demo's own finished runs; /proc/stat's idle time does not."""
    cores = len(os.sched_getaffinity(0))
    if not Path("/proc/stat").is_file():
        return cores
    idle0, total0 = _cpu_times()
    time.sleep(window)
    idle1, total1 = _cpu_times()
    idle_fraction = (idle1 - idle0) / max(total1 - total0, 1)
    return max(1, min(cores, round(idle_fraction * os.cpu_count())))


def _worker_init(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    # numpy / scipy / scikit-learn's BLAS too (the linear probes' C path): it would start a
    # thread per core in every process and oversubscribe them (a probe took 5.7 s instead of 3)
    threadpool_limits(threads)
    quiet_lightning()  # a fresh process starts with no filters


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fork server that has imported POOL_PRELOAD and run nothing (no
    Lightning, OpenMP or CUDA state to inherit): a pool of two is ready in ~0.3 s, where two
    spawned interpreters importing torch and Lightning side by side took 5.3-6 s on 2 cores.
    Spawn where there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(POOL_PRELOAD)  # read when the server starts; later calls: no-op
    return ctx


def start_pool_server() -> None:
    """Start the fork server now, so that its imports run beside this process's own."""
    ctx = _pool_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def process_pool(workers: int, *, threads: int = 1) -> ProcessPoolExecutor:
    """`workers` fresh processes (see `_pool_context`), `threads` torch threads each: for
    topics whose jobs depend on one another (submit, wait, submit more)."""
    return ProcessPoolExecutor(
        workers, mp_context=_pool_context(), initializer=_worker_init, initargs=(threads,)
    )


def pool_workers(jobs: int, threads: int = 1) -> int:
    """One process per `threads` cores this process may use, no more than there are jobs."""
    return max(1, min(jobs, len(os.sched_getaffinity(0)) // threads))


def in_processes(fn: Callable[..., Any], jobs: list[tuple], *, threads: int = 1) -> list[Any]:
    """`fn(*job)` for every job, over one process per core (`process_pool`), results in job order.

    Small runs are bound by Python and Lightning's per-run work, not by the math: one thread per
    process on every core beats one process with every thread. A fixed `threads` per run also
    keeps the numbers the same on any machine (oneDNN sums per-thread partial gradients).
    """
    with process_pool(pool_workers(len(jobs), threads), threads=threads) as pool:
        return [job.result() for job in [pool.submit(fn, *j) for j in jobs]]


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


def fit_and_test(
    config: str, name: str, root: Path, overrides: list[str], checkpoint: str = "best"
) -> tuple[dict[str, float], dict[str, Any]]:
    """`train.py fit`, then `test` of the checkpoint chosen on val (or the last weights).

    Returns the run's metrics.json (test/* of that checkpoint; val/* of the final epoch) and how
    the checkpoint was chosen: file, monitor, mode and its val score.
    """
    cli = cli_main(fit_args(config, name, root, overrides))
    trainer = cli.trainer
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    monitor = getattr(callback, "monitor", None)
    chosen: dict[str, Any] = {"checkpoint": "last weights", "monitor": None}
    ckpt_path = None
    if checkpoint == "best" and best:
        score = callback.best_model_score
        chosen = {
            "checkpoint": Path(best).name,
            "monitor": monitor,
            "mode": callback.mode,
            "val_score": None if score is None else float(score),
        }
        ckpt_path = best
    elif checkpoint == "best":
        print(f"[{name}] no best checkpoint by {monitor}: testing the last weights")
    trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
    metrics = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    return metrics, chosen


def run_config(
    config: str, name: str, root: Path, overrides: list[str], test: bool = True
) -> dict[str, float]:
    """`train.py fit` of one config in this process, then `test` of the checkpoint chosen on val.

    Returns the run's metrics.json. Without `test`, only the fit (and its val/* metrics).
    """
    if test:
        return fit_and_test(config, name, root, overrides)[0]
    cli = cli_main(fit_args(config, name, root, overrides))
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def test_only(config: str, name: str, root: Path, overrides: list[str]) -> dict[str, float]:
    """`train.py test` of a config whose module has nothing to train (a convolutionalized
    classifier, OverFeat over a trained regressor): a fit would only validate once more."""
    cli = cli_main(["test", *fit_args(config, name, root, overrides)[1:]])
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


REPORT_FILES = ("REPORT.md", "report.json", "*.png", "*.json")  # what a demo writes into `out`


def archive_previous(out: Path) -> Path | None:
    """Move the report an earlier demo left in `out` to `out/archive/<its time>/`; that folder.

    Only the report's own files (top level of `out`) move: `out/runs/` stays, where the runs
    are versioned already and the exported weights are reused by the next demo.
    """
    report = out / "REPORT.md"
    if not report.is_file() and not (out / "report.json").is_file():
        return None
    made = (report if report.is_file() else out / "report.json").stat().st_mtime
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(made))
    dest, k = out / "archive" / stamp, 0
    while dest.exists():  # two reports within one second
        k += 1
        dest = out / "archive" / f"{stamp}-v{k}"
    dest.mkdir(parents=True)
    for pattern in REPORT_FILES:
        for path in sorted(out.glob(pattern)):
            if path.is_file():
                shutil.move(path, dest / path.name)
    print(f"previous report moved to {dest}")
    return dest


BUDGETS = {  # seconds of the demo each topic may take on the 2-core CPU (issue 14): 10 min in all
    "transfer": 60,
    "scale": 60,
    "detection": 90,
    "segmentation": 90,
    "gan": 120,
    "deepmask": 60,
    "lineage": 120,
}
TOPICS = {  # name -> module with `demo(out) -> dict` and `report(result) -> list[str]`
    "transfer": "scripts.demo_transfer",
    "scale": "scripts.demo_scale",
    "detection": "scripts.demo_detection",
    "segmentation": "scripts.demo_segmentation",
    "gan": "scripts.demo_gan",
    "deepmask": "scripts.demo_deepmask",
    "lineage": "scripts.demo_lineage",  # last: it reuses the detection, scale and deepmask runs
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
    start_pool_server()
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)
    archive_previous(args.out)
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
        budget = BUDGETS.get(topic)
        over = "" if budget is None or result["seconds"] <= budget else " (over budget)"
        lines += [
            *write(result),
            "",
            f"Wall time of this topic: {result['seconds']:.0f} s (budget {budget} s){over}.",
            "",
        ]
        print(f"[{topic}] {result['seconds']:.0f} s (budget {budget} s){over}", flush=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "REPORT.md").write_text("\n".join(lines))
    total = sum(r["seconds"] for r in report.values())
    lines += [
        "## Times",
        "",
        "| topic | seconds | budget |",
        "|---|---:|---:|",
        *(f"| {t} | {r['seconds']:.0f} | {BUDGETS.get(t)} |" for t, r in report.items()),
        f"| all | {total:.0f} | {sum(BUDGETS.get(t, 0) for t in report)} |",
        "",
    ]
    (args.out / "REPORT.md").write_text("\n".join(lines))
    print(f"demo: {total:.0f} s in all; report: {args.out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
