"""Pictures of predictions: written as PNGs in the run directory and logged to W&B when it is on.

Text is drawn with a TrueType font at FONT_PX pixels (digits 12 px high), on a filled tag, so
class names read at 100% zoom; torchvision's default bitmap font is a few pixels high. Small
images are upscaled (nearest: pixels stay crisp) to TILE_SIDE before anything is drawn on them.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_segmentation_masks, make_grid

if TYPE_CHECKING:  # for hints only: spatial imports this module
    from lit_modules.spatial import Peaks, SpatialClassifier

FONT_PX = 17  # DejaVu Sans at 17 px: digits and capitals 12 px high
TILE_SIDE = 192  # detection / segmentation tiles: a 96 px canvas is drawn 2x
PAD = 2  # between a tag's edge and its text, in pixels
GAP = 96  # grey between the tiles of a grid: most scenes are black at their edges
Colour = tuple[int, int, int]
TRUTH, DETECTION = (0, 255, 0), (255, 0, 0)
FONT = Path("mpl-data") / "fonts" / "ttf" / "DejaVuSans.ttf"


@functools.cache
def label_font(size: int = FONT_PX) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans, which ships inside matplotlib (a cnnlab dependency); Pillow's own otherwise."""
    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.origin).parent / FONT if spec and spec.origin else None
    if path is not None and path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)  # scalable (FreeType) in Pillow >= 10.1


def _tag_size(text: str, font: Any) -> tuple[int, int]:
    """Width and height of `text` on its tag; the height is the font's line, for every text."""
    ascent, descent = font.getmetrics()
    return int(font.getlength(text)) + 2 * PAD, ascent + descent + 2 * PAD


def _ink(fill: Colour) -> Colour:
    """Black text on light tags, white on dark ones."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 128 else (255, 255, 255)


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill: Colour) -> None:
    """`text` on a filled rectangle whose top-left corner is `xy`."""
    font = label_font()
    w, h = _tag_size(text, font)
    draw.rectangle((xy[0], xy[1], xy[0] + w - 1, xy[1] + h - 1), fill=fill)
    draw.text((xy[0] + PAD, xy[1] + PAD), text, fill=_ink(fill), font=font)


def upscale(image: torch.Tensor, side: int) -> tuple[torch.Tensor, float]:
    """(3, H, W) uint8 -> the longer side `side` px, and the factor (nearest up, antialiased down)."""
    scale = side / max(image.shape[-2:])
    up = scale >= 1
    x = F.interpolate(
        image[None].float(),
        scale_factor=scale,
        mode="nearest" if up else "bilinear",
        antialias=not up,
    )[0]
    return x.round().clamp(0, 255).to(torch.uint8), scale


def draw_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: list[str] | None = None,
    colour: Colour = DETECTION,
    width: int = 2,
) -> torch.Tensor:
    """(3, H, W) uint8 with (N, 4) xyxy boxes drawn; each label on a tag above its box (inside
    the box when the box touches the top edge), kept inside the image."""
    picture = to_pil_image(image.cpu().expand(3, -1, -1))  # grey images: drawn in colour
    draw = ImageDraw.Draw(picture)
    width_px, _ = picture.size
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        if labels is None:
            continue
        w, h = _tag_size(labels[i], label_font())
        top = y0 - h if y0 >= h else y0
        _tag(draw, (max(0, min(x0, width_px - w)), top), labels[i], colour)
    return pil_to_tensor(picture)


def draw_detections(
    images: list[torch.Tensor],
    preds: list[dict[str, torch.Tensor]],
    targets: list[dict[str, Any]] | None = None,
    *,
    names: dict[int, str] | None = None,
    threshold: float = 0.5,
    side: int = TILE_SIDE,
    nrow: int = 4,
) -> torch.Tensor:
    """A grid of images in [0, 1] with ground truth (green) and labelled detections scoring at
    least `threshold` (red): (3, H, W) uint8, every tile `side` px square."""
    names = names or {}
    tiles = []
    for i, (img, pred) in enumerate(zip(images, preds, strict=True)):
        img = img.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)  # (3, H, W)
        x, scale = upscale((img * 255).round(), side)
        if targets is not None and len(targets[i]["boxes"]):
            x = draw_boxes(x, targets[i]["boxes"].cpu() * scale, colour=TRUTH)
        keep = pred["scores"] >= threshold
        boxes, labels, scores = (
            pred[k][keep].detach().cpu() for k in ("boxes", "labels", "scores")
        )
        texts = [
            f"{names.get(int(c), int(c))} {s:.2f}"
            for c, s in zip(labels.tolist(), scores.tolist(), strict=True)
        ]
        if len(boxes):
            x = draw_boxes(x, boxes * scale, texts, colour=DETECTION)
        tiles.append(F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2])))
    return make_grid(torch.stack(tiles), nrow=min(nrow, len(tiles)), padding=2, pad_value=GAP)


def text_band(width: int, items: list[tuple[str, Colour | None]]) -> torch.Tensor:
    """A black band `width` px wide holding `items` in reading order, wrapped onto more lines
    as needed: a name with a colour gets a swatch of it (a legend), without one plain text."""
    font = label_font()
    _, h = _tag_size("", font)
    placed, x, y = [], PAD, 0
    for text, colour in items:
        w = _tag_size(text, font)[0] + (h + PAD if colour is not None else 0)
        if x > PAD and x + w > width:
            x, y = PAD, y + h
        placed.append((x, y, text, colour))
        x += w + 3 * PAD
    band = Image.new("RGB", (width, y + h), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for x, y, text, colour in placed:
        if colour is not None:
            draw.rectangle((x, y + PAD, x + h - 2 * PAD, y + h - PAD), fill=colour)
            x += h + PAD
        draw.text((x + PAD, y + PAD), text, fill=(255, 255, 255), font=font)
    return pil_to_tensor(band)


def class_legend(
    maps: list[torch.Tensor], names: list[str], palette: list[Colour]
) -> list[tuple[str, Colour | None]]:
    """The classes >= 1 that any of the (H, W) class maps holds, as (name, colour); 255 (ignore)
    and the background are left out."""
    present = sorted(set().union(*(m.unique().tolist() for m in maps)) - {0, 255})
    return [(names[c] if c < len(names) else str(c), palette[c]) for c in present]


def segmentation_grid(
    rows: dict[str, torch.Tensor],
    legend: list[tuple[str, Colour | None]],
    side: int = TILE_SIDE,
) -> torch.Tensor:
    """Rows of (B, 3, H, W) uint8 overlays, each under its title, tiles upscaled to `side`, and
    the legend of the classes shown below: (3, H', W) uint8."""
    parts = []
    for title, overlays in rows.items():
        tiles = torch.stack([upscale(o, side)[0] for o in overlays])
        grid = make_grid(tiles, nrow=len(tiles), padding=2, pad_value=GAP)
        parts += [text_band(grid.shape[-1], [(title, None)]), grid]
    width = parts[-1].shape[-1]
    parts.append(text_band(width, legend or [("no class shown", None)]))
    return torch.cat(parts, dim=1)


def labelled_grid(
    images: torch.Tensor, texts: list[str], correct: list[bool], *, side: int = 112
) -> torch.Tensor:
    """A grid of images, each above its caption on green (right) or red (wrong): (3, H, W) uint8."""
    x = F.interpolate(to_uint8(images).float(), size=(side, side), mode="nearest").to(torch.uint8)
    tiles = []
    for img, text, ok in zip(x, texts, correct, strict=True):
        caption = to_pil_image(
            torch.zeros(3, _tag_size(text, label_font())[1], side, dtype=torch.uint8)
        )
        _tag(ImageDraw.Draw(caption), (0, 0), text, (0, 200, 0) if ok else (220, 0, 0))
        tiles.append(torch.cat([img, pil_to_tensor(caption)], dim=1))
    return make_grid(torch.stack(tiles), nrow=min(8, len(tiles)), padding=2, pad_value=GAP)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised floats -> (B, 3, H, W) uint8, each image stretched to [0, 255]."""
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def run_dir(module: LightningModule) -> Path:
    """Where this run writes its files (the CSV logger's versioned folder, or default_root_dir)."""
    trainer = module.trainer
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_picture(
    module: LightningModule, key: str, picture: torch.Tensor, caption: str = ""
) -> Path | None:
    """Call on every rank. Write `picture` (3, H, W) uint8 to <run>/images/<key>_epochNNN.png; log it to W&B too."""
    trainer = module.trainer
    folder = run_dir(module)  # every rank: `trainer.log_dir` is a collective (broadcast) under DDP
    if not trainer.is_global_zero:
        return None
    path = folder / "images" / f"{key.replace('/', '_')}_epoch{trainer.current_epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_png(picture.cpu(), str(path))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], caption=[caption or key])
    return path


# ----------------------------------------------------------------------------- class maps


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A colour per class 0..K-1: tab10 for up to ten classes (digits), VOC's map beyond."""
    from datamodules.segmentation import DIGIT_PALETTE, voc_palette  # datamodules draw with us

    return DIGIT_PALETTE[1:] if num_classes <= 10 else voc_palette(num_classes + 1)[1:]


def argmax_overlay(
    image: torch.Tensor,
    logits: torch.Tensor,
    *,
    stride: int,
    offset: float,
    threshold: float,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """(3, H, W) uint8: the image with each confident (and gated) cell in its class's colour.

    Cell (i, j) covers the stride x stride square around its window's centre.
    """
    probs = logits.softmax(0)  # (K, h, w)
    score, cls = probs.max(0)  # (h, w)
    k, (h, w) = len(probs), image.shape[-2:]
    sure = score >= threshold if gate is None else (score >= threshold) & gate
    cells = torch.where(sure, cls, torch.full_like(cls, k))  # k: none
    full = torch.full((h, w), k, dtype=torch.long)
    up = cells.repeat_interleave(stride, 0).repeat_interleave(stride, 1).cpu()  # (h*s, w*s)
    y0 = x0 = int(round(offset - stride / 2))
    ys, xs = (
        slice(max(y0, 0), min(y0 + up.shape[0], h)),
        slice(max(x0, 0), min(x0 + up.shape[1], w)),
    )
    full[ys, xs] = up[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    masks = full[None] == torch.arange(k)[:, None, None]  # (K, H, W)
    return draw_segmentation_masks(to_uint8(image[None])[0], masks, alpha=0.5, colors=palette(k))


def heatmaps(logits: torch.Tensor, names: list[str], side: int = 96) -> torch.Tensor:
    """(3, H, W) uint8 grid: each class's probability map (white = 1), captioned with its name."""
    probs = logits.softmax(0)[:, None]  # (K, 1, h, w)
    tiles = F.interpolate(probs, size=(side, side), mode="nearest")
    tiles = (tiles * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).cpu()
    tiles = [
        torch.cat([text_band(side, [(n, None)]), t], 1) for n, t in zip(names, tiles, strict=True)
    ]
    return make_grid(torch.stack(tiles), nrow=min(5, len(tiles)), padding=2, pad_value=96)


def classmap_grid(
    images: list[torch.Tensor],
    logits: list[torch.Tensor],
    peaks: list[Peaks],
    targets: list[dict[str, torch.Tensor]] | None,
    *,
    module: SpatialClassifier,
) -> torch.Tensor:
    """Per scene: ground truth (green) and peaks (red, labelled), then the argmax overlay."""
    hp, tiles = module.hparams, []
    for n, (img, lg, pk) in enumerate(zip(images, logits, peaks, strict=True)):
        x = to_uint8(img[None].cpu())[0]
        if targets is not None and len(targets[n]["boxes"]):
            x = draw_boxes(x, targets[n]["boxes"].cpu(), colour=TRUTH)
        r = 2.0
        dots = torch.cat([pk["points"] - r, pk["points"] + r], 1).cpu()  # (N, 4) tiny boxes
        names = [str(int(c) - hp.label_offset) for c in pk["labels"].tolist()]
        x = draw_boxes(x, dots, names, width=2) if len(dots) else x
        over = argmax_overlay(
            img.cpu(), lg.cpu(), stride=module.stride, offset=module.offset,
            threshold=hp.score_threshold, gate=module.gate(img.cpu(), lg.cpu()),
        )  # fmt: skip
        tiles += [x, over]
    return make_grid(torch.stack(tiles), nrow=2, padding=2, pad_value=96)
