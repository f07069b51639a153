"""Demo topic `lineage`: R-CNN, SPP-net, Fast R-CNN beside Faster R-CNN and OverFeat, on the digit scenes.

    python scripts/demo.py --topics lineage

The story of the lecture as speed: R-CNN warps and runs every selective-search proposal through
the CNN; SPP-net and Fast R-CNN run the CNN once per image and pool each proposal from the shared
map; Faster R-CNN proposes inside the network. Each row is trained here on the same scenes from
the same digits 0-4 classifier (configs/rcnn/), except Faster R-CNN and OverFeat, whose runs the
detection and scale topics made (trained here only when those topics did not run). A figure
shows proposal recall against the number of proposals: selective search, sliding windows, and
the trained Faster R-CNN's RPN. One more row tests the Fast R-CNN on the boxes of the deepmask
topic's masks instead of selective search's. `demo(out)` returns the numbers, `report(result)`
the section.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from lit_modules.nets.proposals import sliding_windows  # noqa: E402
from scripts.demo import CONFIGS, config_class, fit_args, in_processes, run_config  # noqa: E402
from scripts.demo_detection import source_weights  # noqa: E402
from scripts.proposal_recall import COUNTS, digit_scenes, plot_recall, recall_curves  # noqa: E402
from scripts.train import main as cli_main  # noqa: E402

ROWS = {  # trained here, in this order
    "R-CNN": "rcnn/digits_rcnn.yaml",
    "SPP-net": "rcnn/digits_sppnet.yaml",
    "Fast R-CNN": "rcnn/digits_fast_rcnn.yaml",
}
DEEPMASK_ROW = "Fast R-CNN, DeepMask proposals"  # the SS-trained net, tested on DeepMask's boxes
PAPER_PROPOSALS = 2000  # per image, in R-CNN / Fast R-CNN
SPEED_SCENES = 5  # timed at that count: R-CNN runs ~1 image/s there
RECALL_SCENES = 50  # test scenes of the detection topic (same seed, size and digit range)
FIGURE = "lineage_recall.png"


def _newest(root: Path, name: str) -> Path | None:
    runs = sorted((root / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1] if runs else None


def _earlier_run(root: Path, name: str, make: Any) -> tuple[dict[str, float], Path]:
    """The metrics and folder of the newest run `name` with test metrics, made by `make` if none."""
    run = _newest(root, name)
    if run is None or "test/map_50" not in json.loads((run / "metrics.json").read_text()):
        make()
        run = _newest(root, name)
    return json.loads((run / "metrics.json").read_text()), run


def _faster_rcnn(out: Path) -> tuple[dict[str, float], Path]:
    from scripts.demo_detection import demo as detection_demo

    return _earlier_run(out / "runs", "detection_digits", lambda: detection_demo(out))


def _overfeat(out: Path) -> dict[str, float]:
    from scripts.demo_scale import demo as scale_demo

    return _earlier_run(out / "runs", "scale_overfeat", lambda: scale_demo(out))[0]


def _deepmask_checkpoint(out: Path) -> Path:
    """The deepmask topic's DeepMask (best checkpoint by val/ar_100), trained here if it did not run."""
    from scripts.demo_deepmask import demo as deepmask_demo

    run = _newest(out / "runs", "deepmask")
    if run is None or not any((run / "checkpoints").glob("*.ckpt")):
        deepmask_demo(out)
        run = _newest(out / "runs", "deepmask")
    return _best_checkpoint(run)


def with_deepmask_proposals(fast_run: Path, deepmask: Path, root: Path) -> dict[str, float]:
    """`train.py test` of the trained Fast R-CNN (best checkpoint) with the boxes of DeepMask's
    masks as its proposals instead of selective search's (issue 13): the same test scenes and
    metric; test/images_per_s counts DeepMask's dense inference."""
    overrides = [
        "--data.proposals=deepmask",
        f"--data.deepmask_checkpoint={deepmask}",
        "--data.max_proposals=300",  # what the model reads at test (test_max_proposals)
        f"--ckpt_path={_best_checkpoint(fast_run)}",
    ]
    config = ROWS["Fast R-CNN"]
    cli = cli_main(["test", *fit_args(config, "lineage_fast_rcnn_deepmask", root, overrides)[1:]])
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def _best_checkpoint(run: Path) -> Path:
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    return best[-1] if best else run / "checkpoints" / "last.ckpt"


def _fill_shard(config: str, shard: int, shards: int) -> tuple[int, int]:
    """One process's share of `fill_proposal_cache`: (images looked up, images computed)."""
    node = yaml.safe_load((CONFIGS / config).read_text())["data"]
    return config_class(node["class_path"])(**node.get("init_args", {})).fill_cache(shard, shards)


def fill_proposal_cache(config: str) -> None:
    """Selective search of every scene the rows read, over one process per core, before R-CNN
    trains: on a fresh clone its first pass would otherwise compute ~800 scenes one by one on
    one thread (~27 s). The same boxes (one thread each, deterministic); each entry records its
    own seconds, as when a loader computes it."""
    t0 = time.perf_counter()
    shards = len(os.sched_getaffinity(0))
    parts = in_processes(_fill_shard, [(config, k, shards) for k in range(shards)])
    seen, computed = (sum(p[i] for p in parts) for i in (0, 1))
    print(
        f"[lineage] selective search: {computed} of {seen} scenes computed over {len(parts)} "
        f"processes ({seen - computed} cached), {time.perf_counter() - t0:.0f} s"
    )


def speeds_at(
    runs: dict[str, Path], n: int = PAPER_PROPOSALS, scenes: int = SPEED_SCENES, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """Test-time images/s of trained R-CNN / SPP-net / Fast R-CNN runs (their best checkpoints)
    with `n` proposals per image, the count R-CNN's papers run: selective search finds only ~20
    boxes on a 96 px digit scene, where it finds ~2,000 on a 500 px photograph, and R-CNN's cost
    grows with the count. Sliding windows stand in for them (speed only: no mAP at this count).
    The nets take turns, `repeats` rounds of `scenes` images each, and each keeps its median
    round: their ratios then compare the nets at the same moment of a shared machine."""
    modules = {}
    for label, run in runs.items():
        path = yaml.safe_load((run / "config.yaml").read_text())["model"]["class_path"]
        cls = config_class(path)  # the run's own class
        module = cls.load_from_checkpoint(_best_checkpoint(run), map_location="cpu").eval()
        module.hparams.test_max_proposals = None  # every one of the n
        modules[label] = module
    images, _ = digit_scenes(scenes + 1)
    boxes = [sliding_windows(*img.shape[-2:])[:n] for img in images]
    for module in modules.values():
        module([images[0]], [boxes[0]])  # warm-up: allocations, oneDNN kernel choice
    rates: dict[str, list[float]] = {label: [] for label in modules}
    for _ in range(repeats):
        for label, module in modules.items():
            t0 = time.perf_counter()
            for img, b in zip(images[1:], boxes[1:], strict=True):
                module([img], [b])
            rates[label].append(scenes / (time.perf_counter() - t0))
    return {
        label: {
            "proposals": float(len(boxes[1])),
            "images_per_s": statistics.median(r),
            "rounds": r,
        }  # fmt: skip
        for label, r in rates.items()
    }


def demo(out: Path) -> dict[str, Any]:
    root = out / "runs"
    weights = source_weights(root)
    faster, faster_run = _faster_rcnn(out)
    fill_proposal_cache(ROWS["R-CNN"])  # the three rows read the same scenes and settings
    rows: dict[str, dict[str, Any]] = {}
    for label, config in ROWS.items():
        name = f"lineage_{Path(config).stem}"
        t0 = time.perf_counter()
        metrics = run_config(config, name, root, [f"--model.weights={weights}"])
        rows[label] = {"config": config, "seconds": round(time.perf_counter() - t0, 1), **metrics}
        print(
            f"[lineage] {label}: test/map_50 {metrics['test/map_50']:.3f}  "
            f"{metrics['test/images_per_s']:.1f} images/s with proposals, "
            f"{metrics.get('test/images_per_s_net', float('nan')):.1f} without"
        )
    runs = {label: _newest(root, f"lineage_{Path(config).stem}") for label, config in ROWS.items()}
    for label, speed in speeds_at(runs).items():  # side by side, after all three trained
        rows[label]["at_2000"] = speed
    t0 = time.perf_counter()
    fast_run = runs["Fast R-CNN"]
    deepmask = with_deepmask_proposals(fast_run, _deepmask_checkpoint(out), root)
    rows[DEEPMASK_ROW] = {
        "config": f"{ROWS['Fast R-CNN']} (test only, --data.proposals=deepmask)",
        "seconds": round(time.perf_counter() - t0, 1),
        **deepmask,
    }
    print(
        f"[lineage] {DEEPMASK_ROW}: test/map_50 {deepmask['test/map_50']:.3f}  "
        f"{deepmask['test/images_per_s']:.1f} images/s with proposals"
    )
    rows["Faster R-CNN"] = {"config": "detection/digits_faster_rcnn.yaml", **faster}
    rows["Faster R-CNN"].setdefault("test/images_per_s_net", faster["test/images_per_s"])
    rows["OverFeat"] = {"config": "localization/digits_overfeat.yaml", **_overfeat(out)}
    rows["OverFeat"].setdefault("test/images_per_s_net", rows["OverFeat"]["test/images_per_s"])
    curves = recall_curves(scenes=RECALL_SCENES, rpn_ckpt=_best_checkpoint(faster_run))
    plot_recall(curves, out / FIGURE)
    return {"rows": rows, "recall": curves, "figure": FIGURE}


def claims(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's targets, checked on this run's numbers."""
    r, curves = result["rows"], result["recall"]
    at = {k: v["at_2000"]["images_per_s"] for k, v in r.items() if "at_2000" in v}
    full = {k: v["test/images_per_s"] for k, v in r.items()}
    m50 = {k: v["test/map_50"] for k, v in r.items()}
    ss = curves["selective search (fast)"]["recall"]["0.5"][str(max(COUNTS))]
    return [
        (
            "Fast R-CNN >= 10x faster than R-CNN at test, 2,000 proposals per image",
            at["Fast R-CNN"] >= 10 * at["R-CNN"],
        ),
        (
            "Fast R-CNN's map_50 within 5 points of R-CNN's",
            m50["Fast R-CNN"] >= m50["R-CNN"] - 0.05,
        ),
        (
            "SPP-net's test speed within 2x of Fast R-CNN's (2,000 proposals per image)",
            at["Fast R-CNN"] / 2 <= at["SPP-net"] <= 2 * at["Fast R-CNN"],
        ),
        (
            "Faster R-CNN faster than Fast R-CNN with selective search (proposal time counted)",
            full["Faster R-CNN"] > full["Fast R-CNN"],
        ),
        ("Faster R-CNN's map_50 >= Fast R-CNN's", m50["Faster R-CNN"] >= m50["Fast R-CNN"]),
        (f"selective search recalls >= 95% of the digits at IoU 0.5 ({max(COUNTS)})", ss >= 0.95),
    ]


def report(result: dict[str, Any]) -> list[str]:
    lines = [
        "## The proposal lineage: R-CNN, SPP-net, Fast R-CNN, Faster R-CNN (and OverFeat)",
        "",
        "The detection topic's 96 px scenes (1-3 digits, 10 classes), every detector from the same",
        "digits 0-4 classifier; test on the fixed test scenes with the same mAP code. Images/s with",
        "proposals counts selective search's time (R-CNN, SPP-net, Fast R-CNN); without it is the",
        "net alone, as the papers time it. Selective search finds ~20 boxes on these 96 px scenes",
        "(~2,000 on a 500 px photograph), so R-CNN's per-proposal cost shows at the papers' count:",
        "the last speed column runs each trained net on 2,000 sliding windows per image. Faster",
        "R-CNN and OverFeat are the detection and scale topics' runs. The DeepMask row tests the",
        "Fast R-CNN trained on selective search with the boxes of the deepmask topic's top 300",
        "masks as its proposals instead (`--data.proposals=deepmask`); its speed counts DeepMask.",
        "",
        "| detector | test/map_50 | test/map | test/voc07_map_50 | images/s (with proposals) "
        "| images/s (net) | images/s (net, 2,000 proposals) | train + test s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in result["rows"].items():
        secs = r.get("seconds")
        lines.append(
            f"| {label} | {r['test/map_50']:.3f} | {r['test/map']:.3f} "
            f"| {r.get('test/voc07_map_50', float('nan')):.3f} | {r['test/images_per_s']:.1f} "
            f"| {r.get('test/images_per_s_net', float('nan')):.1f} "
            f"| {r['at_2000']['images_per_s'] if 'at_2000' in r else float('nan'):.2f} "
            f"| {'-' if secs is None else f'{secs:.0f}'} |"
        )
    lines += [
        "",
        "Proposal recall on 50 test scenes (IoU >= 0.5, at 100 / 2000 proposals per image):",
        "",
        "| proposals | recall @100 | recall @2000 | proposals per image | ms per image |",
        "|---|---|---|---|---|",
    ]
    for name, c in result["recall"].items():
        r = c["recall"]["0.5"]
        lines.append(
            f"| {name} | {r['100']:.3f} | {r[str(max(COUNTS))]:.3f} "
            f"| {c['proposals_per_image']:.0f} | {c['ms_per_image']:.1f} |"
        )
    lines += ["", f"![proposal recall]({result['figure']})", ""]
    lines += [f"- {'yes' if ok else 'NO'}: {claim}" for claim, ok in claims(result)]
    return lines
