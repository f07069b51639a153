"""Image files -> 8-bit RGB (or L) PIL images: the one reader every DataModule uses.

One reader, so every format treats odd files the same way (the README's bad-input table):
- grayscale, 1-bit and palette images are converted (PIL: channels repeated, palette looked up);
- RGBA / LA / palette-with-transparency images are composited on black, then converted: the
  hidden colour of a fully transparent pixel is arbitrary, black is not;
- CMYK JPEGs are converted by PIL (which also undoes Adobe's inverted CMYK);
- 16-bit images are scaled to 8 bits (v / 257, so 65535 -> 255). PIL already does this for
  16-bit RGB; its `convert` of 16-bit grayscale ("I;16") would clip everything above 255 to
  white, a silently wrong image, so those modes are scaled here;
- a file that is not an image, or is corrupt or truncated, raises `OSError` naming the file
  (and the record, when the caller gives one) instead of PIL's message without a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises on bad files
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale as PIL opens it


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit L, scaled (not clipped): 0..65535 -> 0..255."""
    values = np.asarray(image).astype(np.float64)  # (H, W)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_mode(image: Image.Image, channels: int = 3) -> Image.Image:
    """Any PIL image -> RGB (channels 3) or L (channels 1); transparency is composited on black."""
    want = "RGB" if channels == 3 else "L"
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode == want:
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image.alpha_composite(rgba)
    return image.convert(want)


def _where(path: str | Path, record: str) -> str:
    return f"{path} ({record})" if record else str(path)


def open_image(path: str | Path, *, channels: int = 3, record: str = "") -> Image.Image:
    """The decoded image at `path` as RGB / L, or an OSError naming the file and `record`."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a transform
            return to_mode(im, channels)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{_where(path, record)}: image file not found") from err
    except _READ_ERRORS as err:
        raise OSError(
            f"{_where(path, record)}: not a readable image ({type(err).__name__}: {err})"
        ) from err


def image_error(path: str | Path) -> str | None:
    """Why `path` is not a readable image, or None. Cheap: no full decode in the common case.

    `verify()` parses the header (and checks PNG chunk CRCs) without decoding pixels, which
    catches non-images and most broken files, but not a JPEG cut off mid-scan. A complete JPEG
    ends with the EOI marker, so only a JPEG without one is decoded (at 1/8 scale) to be sure.
    """
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, 2)
                complete = f.read() == b"\xff\xd9"
            if not complete:
                with Image.open(path) as im:
                    im.draft("RGB", (1, 1))
                    im.load()
    except _READ_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def find_bad_images(paths: Sequence[str]) -> dict[str, str]:
    """{path: reason} for every path that is not a readable image (threads: the work is I/O)."""
    with ThreadPoolExecutor() as pool:
        errors = list(pool.map(image_error, paths))
    return {p: e for p, e in zip(paths, errors, strict=True) if e is not None}


def image_mode(path: str | Path) -> str:
    """The PIL mode of `path` from its header, or `error: ...` when it is not a readable image."""
    reason = image_error(path)
    if reason is not None:
        return f"error: {reason}"
    with Image.open(path) as im:
        return im.mode


def scan_images(paths: Sequence[str]) -> dict[str, str]:
    """{path: mode} for every file (threads: header reads are I/O bound); `error: ...` if unreadable."""
    with ThreadPoolExecutor() as pool:
        return dict(zip(paths, pool.map(image_mode, paths), strict=True))
