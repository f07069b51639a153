"""Render the dense class maps of a convolutionalized classifier for one image or digit scene.

    python scripts/classmap.py --scene 3                              # test scene 3, digits config
    python scripts/classmap.py --image photo.jpg --config configs/spatial/imagenet_vgg16_classmap.yaml
    python scripts/classmap.py --scene 0 --weights runs/weights/digits_classifier.pt --out maps.png

The model is the `model.init_args` of a SpatialClassifier config (`--config`, default the digits
one; `--weights` / `--threshold` override it). The PNG shows the image with its peaks (red,
labelled; ground-truth boxes in green for a scene), the argmax overlay (each confident map cell
in its class's colour) and one probability heat map per class (white = 1; for more than
`--classes` classes, those with the highest peak probability). An existing file is never
replaced: `--out maps.png` becomes maps-v1.png, maps-v2.png, ... if taken.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402

from datamodules.digits import DigitCanvas  # noqa: E402
from lit_modules.callbacks import free_path  # noqa: E402
from lit_modules.spatial import SpatialClassifier  # noqa: E402
from lit_modules.visual import TRUTH, argmax_overlay, draw_boxes, heatmaps, text_band, to_uint8  # noqa: E402  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "spatial" / "digits_classmap.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=Path, help="an image file (any format Pillow reads)")
    what.add_argument("--scene", type=int, help="index of a DigitCanvas scene (see --split)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="a SpatialClassifier config: its model and scene settings (default: %(default)s)")  # fmt: skip
    p.add_argument("--weights", help="override model.init_args.weights (a file or a weights name)")
    p.add_argument("--threshold", type=float, help="override the peaks' score_threshold")
    p.add_argument("--classes", type=int, default=10, help="heat maps shown at most (default 10)")
    p.add_argument("--out", type=Path, default=Path("classmap.png"),
                   help="PNG to write; a free name beside it if taken (default: %(default)s)")  # fmt: skip
    return p.parse_args(argv)


def load_config(path: Path) -> tuple[dict, dict]:
    """(model init_args, data init_args) of a SpatialClassifier config."""
    if not path.is_file():
        raise SystemExit(f"config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    model = cfg.get("model", {})
    if not str(model.get("class_path", "")).endswith("SpatialClassifier"):
        raise SystemExit(f"{path} is not a SpatialClassifier config (model.class_path)")
    return dict(model.get("init_args", {})), dict(cfg.get("data", {}).get("init_args", {}))


def load_image(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    if not path.is_file():
        raise SystemExit(f"image not found: {path}")
    try:
        img = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as err:
        raise SystemExit(f"cannot read image {path}: {err}") from err
    return img.float() / 255


def scene(index: int, split: str, data: dict) -> tuple[torch.Tensor, dict]:
    """DigitCanvas scene `index` with the config's scene settings (as DetectionDataModule)."""
    canvas = DigitCanvas(
        split,  # type: ignore[arg-type]
        length=index + 1,
        size=data.get("canvas_size", 224),
        num_digits=tuple(data.get("num_digits", (3, 8))),
        digit_size=tuple(data.get("digit_size", (24, 32))),
        background=data.get("background", "black"),
        clutter=data.get("clutter", 0),
        channels=3,
        seed=data.get("seed", 0),
    )
    s = canvas[index]
    return s["image"], {"boxes": s["boxes"], "labels": s["labels"]}


def class_names(module: SpatialClassifier) -> list[str]:
    """Digit k for the digits classifier, else ImageNet's names when the weights carry them."""
    k = module.num_classes
    if k == 1000:
        return [
            n.split(",")[0] for n in torchvision.models.VGG16_Weights.DEFAULT.meta["categories"]
        ]
    return [str(c + module.hparams.label_offset - 1) for c in range(k)]


def render(
    module: SpatialClassifier, image: torch.Tensor, target: dict | None, *, classes: int
) -> torch.Tensor:
    """(3, H, W) uint8: [peaks | argmax overlay] above the heat maps of the top `classes`."""
    with torch.no_grad():
        (logits,) = module([image])  # (K, h, w)
    (peaks,) = module.peaks([image], [logits])
    names = class_names(module)
    x = to_uint8(image[None])[0]
    if target is not None and len(target["boxes"]):
        x = draw_boxes(x, target["boxes"], colour=TRUTH)
    if len(peaks["points"]):
        dots = torch.cat([peaks["points"] - 2, peaks["points"] + 2], 1)  # (N, 4)
        texts = [names[int(c) - module.hparams.label_offset] for c in peaks["labels"]]
        x = draw_boxes(x, dots, texts)
    over = argmax_overlay(
        image, logits, stride=module.stride, offset=module.offset,
        threshold=module.hparams.score_threshold, gate=module.gate(image, logits),
    )  # fmt: skip
    top = torch.cat([x, torch.full((3, x.shape[1], 4), 96, dtype=torch.uint8), over], 2)
    best = logits.softmax(0).amax((1, 2)).argsort(descending=True)[:classes].sort().values
    maps = heatmaps(logits[best], [names[i] for i in best.tolist()])
    width = max(top.shape[2], maps.shape[2])
    parts = [
        text_band(width, [(f"class map {tuple(logits.shape[1:])}, stride {module.stride}", None)]),
        top,
        maps,
    ]
    return torch.cat([F.pad(p, (0, width - p.shape[2])) for p in parts], 1)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    model_args, data_args = load_config(args.config)
    if args.weights is not None:
        model_args["weights"] = args.weights
    if args.threshold is not None:
        model_args["score_threshold"] = args.threshold
    try:
        module = SpatialClassifier(**model_args).eval()
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise SystemExit(f"cannot build the classifier of {args.config}: {err}") from err
    if args.image is not None:
        image, target = load_image(args.image), None
    else:
        image, target = scene(args.scene, args.split, data_args)
    try:
        picture = render(module, image, target, classes=args.classes)
    except ValueError as err:  # e.g. an image smaller than the classifier's window
        raise SystemExit(f"{args.image or f'scene {args.scene}'}: {err}") from err
    out = free_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_png(picture, str(out))
    print(f"class maps: {out}")
    return out


if __name__ == "__main__":
    main()
