"""Training images: a folder of images with optional same-name ``.txt`` captions.

Images are centre-cropped to a square and resized to the training resolution; every image is opened
and decoded before anything is written, so a bad file stops the run before it starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import UsageError
from .fileio import IMAGE_EXTS, first_line, read_text


@dataclass
class Example:
    path: Path
    caption: str
    pixels: torch.Tensor       # (3, H, W) float32 in [-1, 1]


def find_images(data_dir: str, one_image: Optional[str] = None, what: str = "data_dir") -> List[Path]:
    """The image files of ``data_dir`` (the config key ``what``), sorted; or just ``one_image``."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UsageError(f"{what} {data_dir} is not a folder" if d.exists() else f"{what} not found: {data_dir}")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if one_image:
        files = [p for p in files if p.name == one_image]
        if not files:
            raise UsageError(f"one_image {one_image!r} is not an image in {data_dir}")
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {data_dir}")
    return files


def check_images(paths: List[Path]) -> None:
    """Open every image header and read every caption; one clear line for the first that cannot be read."""
    for p in paths:
        if p.with_suffix(".txt").is_file():
            read_text(p.with_suffix(".txt"), "caption file")
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:
            raise UsageError(f"cannot read image {p}: {first_line(e)}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any image Pillow opens. 16- and 32-bit integer images (a 16-bit grayscale PNG opens as
    ``I;16`` or ``I``) are scaled down, not clipped: Pillow's own convert would turn every value above 255 white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray((a / top * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        top = 1.0 if a.max() <= 1.0 else 255.0
        im = Image.fromarray((a / top * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def square(im: Image.Image, resolution: int) -> Image.Image:
    """The image as training sees it: the centred square, resized to ``resolution`` px (bicubic)."""
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((resolution, resolution), Image.Resampling.BICUBIC)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Centre crop to a square, resize to ``resolution``; (3, res, res) float32 in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:
        raise UsageError(f"cannot read image {path}: {first_line(e)}") from None
    im = square(im, resolution)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def load_examples(data_dir: str, resolution: int, prompt: str, one_image: Optional[str] = None,
                  what: str = "data_dir") -> List[Example]:
    """Every image of ``data_dir`` (or just ``one_image``), with its ``.txt`` caption or ``prompt``."""
    out = []
    for p in find_images(data_dir, one_image, what):
        txt = p.with_suffix(".txt")
        caption = read_text(txt, "caption file").strip() if txt.is_file() else ""
        out.append(Example(p, caption or prompt, load_image(p, resolution)))
    return out


def batch_indices(step: int, micro: int, accum: int, batch: int, n: int, seed: int) -> List[int]:
    """Data order as a pure function of the position, so a resumed run continues exactly: epoch e visits
    the examples in the permutation drawn from seed + e."""
    out = []
    for b in range(batch):
        pos = (step * accum + micro) * batch + b
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out
