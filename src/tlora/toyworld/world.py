"""A synthetic image world where T-LoRA's claim can be measured exactly on a CPU.

A 32×32 scene is one object — shape, colour, size, position — on a plain background, with a caption that
names them: "a large red circle on a blue background, at the top left". Some shapes never appear in
pretraining: they are the "new concepts" a user personalises with one image. Scenes are deterministic
from a seed, and everything a caption says can be read back from the pixels (:func:`measure`).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")   # seen in pretraining
NEW_SHAPES = ("star", "crescent", "hourglass")                        # held out: the new concepts
SIZES = {"small": 5.5, "large": 9.5}                                  # radius in pixels
POSITIONS = {"top left": (9, 9), "top right": (23, 9), "bottom left": (9, 23), "bottom right": (23, 23)}
CLASS_WORD = "shape"      # generic word used in 10 % of pretraining captions, the class word of new concepts
PLACEHOLDER = "sks"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def caption(self, shape_word: Optional[str] = None) -> str:
        return (f"a {self.size} {self.colour} {shape_word or self.shape} on a {self.background} background, "
                f"at the {self.position}")


def vocabulary() -> list[str]:
    """Every word a caption can use, plus the placeholder token (untrained in pretraining)."""
    words = {"a", "on", "background,", "at", "the", CLASS_WORD, PLACEHOLDER}
    for s in (*SHAPES, *NEW_SHAPES, *COLOURS, *SIZES, *POSITIONS):
        words.update(s.split())
    return sorted(words)


def sample_scene(rng: random.Random, shapes=SHAPES, **fixed) -> Scene:
    """A random scene (object colour ≠ background colour); ``fixed`` pins any field."""
    colour = fixed.get("colour") or rng.choice(list(COLOURS))
    bg = fixed.get("background") or rng.choice([c for c in COLOURS if c != colour])
    return Scene(shape=fixed.get("shape") or rng.choice(list(shapes)), colour=colour, background=bg,
                 size=fixed.get("size") or rng.choice(list(SIZES)),
                 position=fixed.get("position") or rng.choice(list(POSITIONS)))


def _polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "hourglass":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx, cy), (cx + r, cy + r), (cx - r, cy + r), (cx, cy)]
    raise ValueError(shape)


def render(scene: Scene, scale: int = 4) -> Image.Image:
    """The scene as a 32×32 RGB image (drawn 4× larger and downsampled, for smooth edges)."""
    n = SIZE * scale
    bg, fg = COLOURS[scene.background], COLOURS[scene.colour]
    im = Image.new("RGB", (n, n), bg)
    d = ImageDraw.Draw(im)
    cx, cy = (v * scale for v in POSITIONS[scene.position])
    r = SIZES[scene.size] * scale
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "circle":
        d.ellipse(box, fill=fg)
    elif scene.shape == "square":
        k = r * 0.85
        d.rectangle((cx - k, cy - k, cx + k, cy + k), fill=fg)
    elif scene.shape == "ring":
        d.ellipse(box, fill=fg)
        k = r * 0.5
        d.ellipse((cx - k, cy - k, cx + k, cy + k), fill=bg)
    elif scene.shape == "cross":
        k = r * 0.35
        d.rectangle((cx - r, cy - k, cx + r, cy + k), fill=fg)
        d.rectangle((cx - k, cy - r, cx + k, cy + r), fill=fg)
    elif scene.shape == "crescent":
        d.ellipse(box, fill=fg)
        off = r * 0.55
        d.ellipse((cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3), fill=bg)
    else:
        d.polygon(_polygon(scene.shape, cx, cy, r), fill=fg)
    return im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


@dataclass
class Measured:
    background: str
    colour: Optional[str]
    position: Optional[str]
    size: Optional[str]
    mask: np.ndarray            # (32, 32) bool: the object's pixels

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("mask")
        return d


def measure(image: Image.Image) -> Measured:
    """Read a scene back from pixels: background = median colour of the 2-pixel border; object = pixels far
    from it; position = quadrant of the object's centroid; size = its extent; colour = its median colour."""
    a = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = _nearest_colour(bg_rgb)
    mask = np.linalg.norm(a - bg_rgb, axis=-1) > 60
    if mask.sum() < 6:
        return Measured(bg, None, None, None, mask)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    pos = f"{'top' if cy < SIZE / 2 else 'bottom'} {'left' if cx < SIZE / 2 else 'right'}"
    extent = max(np.ptp(ys), np.ptp(xs)) + 1
    size = "small" if extent < 15 else "large"
    colour = _nearest_colour(np.median(a[mask], axis=0))
    return Measured(bg, colour, pos, size, mask)


def aligned_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two object masks after moving b's centroid onto a's (position is the prompt's business)."""
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    ya, xa = (v.mean() for v in np.nonzero(a))
    yb, xb = (v.mean() for v in np.nonzero(b))
    shifted = np.roll(np.roll(b, int(round(ya - yb)), axis=0), int(round(xa - xb)), axis=1)
    return float((a & shifted).sum() / (a | shifted).sum())


def rgb_distance(rgb, colour: str) -> float:
    """Euclidean distance, in 0–255 RGB units, from a measured colour to a named world colour."""
    return float(np.linalg.norm(np.asarray(rgb, dtype=np.float64) - np.asarray(COLOURS[colour], dtype=np.float64)))


def object_rgb(image: Image.Image, mask: np.ndarray):
    """Median colour of the masked pixels (None for an empty mask)."""
    if mask.sum() == 0:
        return None
    a = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    return tuple(float(v) for v in np.median(a[mask], axis=0))


class FlatWorld:
    """The first world: one object on a plain background. Everything here is the module's functions, so a
    model pretrained before worlds were types reproduces bit for bit."""
    name = "flat"
    max_length = 24              # caption tokens seen in pretraining
    prompt_key = "background_and_position"   # the key of ``followed`` that says: every fact a test prompt changes
    new_shapes = NEW_SHAPES

    @staticmethod
    def sample_scene(rng: random.Random, shapes=SHAPES, **fixed) -> Scene:
        return sample_scene(rng, shapes=shapes, **fixed)

    @staticmethod
    def render(scene: Scene) -> Image.Image:
        return render(scene)

    @staticmethod
    def measure(image: Image.Image) -> Measured:
        return measure(image)

    @staticmethod
    def vocabulary() -> list[str]:
        return vocabulary()

    @staticmethod
    def prompt(scene: Scene) -> str:
        """The caption with the shape as the placeholder concept ("a large sks shape on ...")."""
        return (f"a {scene.size} {PLACEHOLDER} {CLASS_WORD} on a {scene.background} background, "
                f"at the {scene.position}")

    @staticmethod
    def followed(scene: Scene, m: Measured) -> dict:
        """Which of the caption's facts the image shows (``prompt_key``: every fact a test prompt changes)."""
        hits = {k: getattr(m, k) == getattr(scene, k) for k in ("background", "position", "size", "colour")}
        hits["background_and_position"] = hits["background"] and hits["position"]
        return hits

    @staticmethod
    def test_scenes(concept: Scene, n: int, seed: int) -> list:
        """n scenes of the concept that differ from its training image in background and position."""
        rng = random.Random(seed)
        bgs = [c for c in COLOURS if c not in (concept.background, concept.colour)]
        poss = [p for p in POSITIONS if p != concept.position]
        pairs = [(b, p) for b in bgs for p in poss]
        rng.shuffle(pairs)
        return [Scene(concept.shape, concept.colour, b, concept.size, p) for b, p in pairs[:n]]


# the held-out concepts the demo and the study train on (one image each)
CONCEPTS = [Scene("star", "yellow", "blue", "large", "top left"),
            Scene("crescent", "white", "purple", "large", "bottom right"),
            Scene("hourglass", "red", "green", "large", "top right"),
            Scene("star", "purple", "white", "large", "bottom left")]


def shipped_model() -> Path:
    """The flat world's base pipeline, shipped inside the package (diffusers format; ``--model toyworld``)."""
    return Path(str(resources.files("tlora") / "assets" / "toyworld"))
