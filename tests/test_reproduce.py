"""scripts/reproduce.py: a table's rows run through the CLI and land beside the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import reproduce


def test_quick_transfer_table(tmp_path: Path) -> None:
    smoke = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--data.max_eval_samples=50",
    ]
    md = reproduce.reproduce("transfer", quick=True, out=tmp_path, extra=smoke)
    result = json.loads((tmp_path / "transfer.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    ran = [r for r in rows.values() if r["quick"]]
    assert len(ran) == 2 and all(0.0 <= r["metrics"]["test/acc"] <= 1.0 for r in ran)
    assert rows["Pets fine-tuned"]["skipped"] and rows["Pets fine-tuned"]["metrics"] == {}
    assert rows["CIFAR-10 linear probe"]["paper"] == {"test/acc": 93.6}
    text = md.read_text()
    ours = rows["CIFAR-10 linear probe"]["metrics"]["test/acc"] * 100
    assert f"93.6 / {ours:.1f}" in text and "not run" in text


def test_unknown_table_lists_the_known_ones() -> None:
    with pytest.raises(SystemExit, match="known tables: .*transfer"):
        reproduce.load_table("nope")


@pytest.mark.parametrize(
    ("ours", "lower", "shown", "wrong"),
    [
        ({"a": 0.9, "b": 0.8, "c": 0.7}, False, True, []),
        ({"a": 0.9, "b": 0.9, "c": 0.7}, False, False, ["a 0.9 vs b 0.9"]),  # a tie is not shown
        ({"a": 10.0, "b": 20.0}, True, True, []),  # c did not run: left out
        ({"a": 10.0}, True, None, []),  # one row: nothing to compare
    ],
)
def test_ordering_says_whether_our_rows_show_the_papers(
    ours: dict[str, float], lower: bool, shown: bool | None, wrong: list[str]
) -> None:
    table = {"ordering": {"metric": "m", "rows": ["a", "b", "c"], "lower_is_better": lower}}
    rows = [{"name": n, "metrics": {"m": v}} for n, v in ours.items()] + [
        {"name": n, "metrics": {}} for n in "abc" if n not in ours
    ]
    order = reproduce.ordering(table, rows)
    assert order is not None and order["shown"] is shown and order["out_of_order"] == wrong
    line = "".join(reproduce._ordering_line(order))
    assert ("NOT shown" in line) is (shown is False)


def test_scale_per_metric_and_setup_steps_with_overrides(tmp_path: Path) -> None:
    table = {"scale": {"test/map_50": 100}}
    assert reproduce.metric_scale(table, "test/map_50") == 100
    assert reproduce.metric_scale(table, "test/images_per_s") == 1  # speeds stay as measured
    assert reproduce.metric_scale({"scale": 100}, "test/acc") == 100
    assert reproduce.metric_scale({}, "test/acc") == 1
    assert reproduce.setup_step("a.yaml", tmp_path) == ("a.yaml", [])
    step = {"config": "b.yaml", "overrides": ["--model.weights={root}/weights/w.pt"]}
    assert reproduce.setup_step(step, tmp_path) == (
        "b.yaml",
        [f"--model.weights={tmp_path}/weights/w.pt"],
    )
