"""SpatialClassifier: classifier checkpoints, class-map peaks, dense vs sliding, classmap.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from lightning.pytorch import Trainer
from torch import nn

from datamodules.detection import DetectionDataModule
from lit_modules.nets import DigitsCNN
from lit_modules.nets.backbones import split_classifier
from lit_modules.spatial import (
    PeakMatches,
    SpatialClassifier,
    build_classifier,
    dense_vs_sliding,
    find_peaks,
    match_peaks,
)


def _transfer_checkpoint(path: Path, model: DigitsCNN) -> Path:
    """`model` saved as a TransferClassifier checkpoint (net.stages.* and net.head.*)."""
    stages, head = split_classifier(model)
    state = {f"net.stages.{k}": v for k, v in nn.ModuleList(stages).state_dict().items()}
    state |= {f"net.head.{k}": v for k, v in head.state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


def test_build_classifier_from_a_transfer_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = DigitsCNN(num_classes=5).eval()
    path = _transfer_checkpoint(tmp_path / "source.ckpt", original)
    rebuilt = build_classifier(backbone="digits_cnn", weights=str(path)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))  # (3, 5): the checkpoint's 5 classes
    plain = tmp_path / "plain.pt"
    torch.save(original.state_dict(), plain)
    assert build_classifier(weights=str(plain)).classifier.out_features == 5
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_classifier(weights=str(tmp_path / "missing.pt"))


def test_peaks_are_local_maxima_above_the_threshold() -> None:
    logits = torch.zeros(1, 3, 10, 10)
    logits[0, 1, 2, 3] = 9.0  # a confident class-1 peak
    logits[0, 1, 2, 4] = 8.0  # its neighbour: suppressed by the NMS on the map
    logits[0, 2, 7, 7] = 9.5  # a class-2 peak far away
    logits[0, 0, 7, 8] = 9.0  # class 0 next to it: kept per class, suppressed across classes
    logits[0, 2, 0, 9] = 1.0  # a local maximum, but p = e / (e + 2) < 0.9
    kw = {"stride": 4, "offset": 14.0, "threshold": 0.9, "window": 3}
    (per_class,) = find_peaks(logits, **kw)
    assert per_class["labels"].tolist() == [2, 0, 1]  # by descending probability
    assert per_class["points"].tolist() == [[42.0, 42.0], [46.0, 42.0], [26.0, 22.0]]
    assert (per_class["scores"] >= 0.9).all()
    (across,) = find_peaks(logits, **kw, across_classes=True)
    assert across["labels"].tolist() == [2, 1]
    gate = torch.ones(1, 10, 10, dtype=torch.bool)
    gate[0, 2, 3] = False  # no ink there: its peak goes, and does not suppress its neighbour
    (gated,) = find_peaks(logits, **kw, gate=gate)
    ones = gated["labels"] == 1
    assert gated["points"][ones].tolist() == [[30.0, 22.0]]  # the neighbour (2, 4) is the peak


def test_matching_is_one_to_one_and_by_class() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    labels = torch.tensor([3, 5])
    peaks = {
        "points": torch.tensor([[5.0, 5.0], [6.0, 6.0], [25.0, 25.0], [50.0, 50.0]]),
        "labels": torch.tensor([3, 3, 4, 3]),  # a duplicate, a wrong class, a miss
        "scores": torch.tensor([0.99, 0.98, 0.97, 0.96]),
    }
    assert match_peaks(peaks, boxes, labels) == (1, 1)
    metric = PeakMatches()
    metric.update([peaks], [{"boxes": boxes, "labels": labels}])
    out = metric.compute()
    assert out["peak_precision"].item() == pytest.approx(0.25)
    assert out["peak_recall"].item() == pytest.approx(0.5)
    assert out["peak_f1"].item() == pytest.approx(2 * 0.25 * 0.5 / 0.75)


def test_module_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="peak_window must be an odd"):
        SpatialClassifier(peak_window=4)
    with pytest.raises(ValueError, match="score_threshold"):
        SpatialClassifier(score_threshold=1.5)


def test_validate_test_and_fit_without_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SpatialClassifier(score_threshold=0.3, min_ink=0.1, nms="across_classes")
    data = DetectionDataModule(
        canvas_size=64, num_digits=(1, 3), digit_size=(24, 32), train_length=2,
        eval_length=4, batch_size=2, eval_batch_size=2,
    )  # fmt: skip
    kw = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, enable_checkpointing=False, **kw)
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    assert set(metrics) == {"test/peak_precision", "test/peak_recall", "test/peak_f1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    before = [p.clone() for p in module.parameters()]
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, enable_checkpointing=False, **kw)
    trainer.fit(module, datamodule=data)
    assert "val/peak_recall" in trainer.callback_metrics  # fit validated, trained nothing
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert not module.net.training  # dropout stays off even after fit's train()


def _valid_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip


def test_dense_equals_sliding_crops_for_a_net_without_padding() -> None:
    torch.manual_seed(0)
    result = dense_vs_sliding(_valid_cnn(), torch.randn(1, 40, 36), repeats=1)
    assert result["crop"] == 16 and result["stride"] == 2
    assert result["map"] == [13, 11] and result["windows"] == 143
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0
    assert result["padded_layers"] == []
    assert result["dense_s"] > 0 and math.isclose(
        result["speedup"], result["sliding_s"] / result["dense_s"]
    )


def test_dense_vs_sliding_names_the_padding_of_the_digits_cnn() -> None:
    result = dense_vs_sliding(DigitsCNN().eval(), torch.randn(1, 48, 48), repeats=1)
    assert result["map"] == [6, 6] and result["crop"] == 28 and result["stride"] == 4
    assert "features.0.0" in result["padded_layers"]  # 3x3 convs padded by 1


def _config(tmp_path: Path, weights: Path) -> Path:
    cfg = {
        "model": {
            "class_path": "lit_modules.spatial.SpatialClassifier",
            "init_args": {"weights": str(weights), "score_threshold": 0.3},
        },
        "data": {"init_args": {"canvas_size": 64, "num_digits": [1, 2], "digit_size": [24, 28]}},
    }
    path = tmp_path / "classmap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_classmap_script_writes_a_new_png_each_time(tmp_path: Path) -> None:
    from scripts.classmap import main

    weights = tmp_path / "digits.pt"
    torch.save(DigitsCNN().state_dict(), weights)
    config = _config(tmp_path, weights)
    args = ["--scene", "1", "--config", str(config), "--out", str(tmp_path / "maps.png")]
    first, second = main(args), main(args)
    assert (first.name, second.name) == ("maps.png", "maps-v1.png")
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    small = tmp_path / "small.png"
    torchvision.io.write_png(torch.zeros(3, 20, 20, dtype=torch.uint8), str(small))
    with pytest.raises(SystemExit, match="input too small"):
        main(["--image", str(small), "--config", str(config), "--out", str(tmp_path / "x.png")])
