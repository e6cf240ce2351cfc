"""The textured world: scenes whose layout carries many facts, as a photograph's does.

A 32×32 scene is a large object on a patterned background (plain, striped or checked: the background colour
alternating with a darker shade of it in 4-pixel bands) with a small second object of another shape and colour
elsewhere, all named in the caption:

    "a large yellow star on a blue striped background, at the top left, and a small red circle at the bottom right"

Copying a training image of this world means copying its colour, its pattern and a second object: many more
directions of the image than a flat colour. Everything a caption says is read back from the pixels
(:meth:`TexturedWorld.measure`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from tlora.toyworld.world import (CLASS_WORD, COLOURS, NEW_SHAPES, PLACEHOLDER, POSITIONS, SHAPES, SIZE, Measured, Scene,
                                  render, vocabulary)

PATTERNS = ("plain", "striped", "checked")
BAND = 4                     # pixels per stripe / check
DARK = 0.55                  # the pattern's second tone: the background colour times this


@dataclass(frozen=True)
class TexturedScene:
    shape: str
    colour: str
    background: str
    pattern: str
    position: str
    second_shape: str
    second_colour: str
    second_position: str
    size: str = "large"       # the first object is always large, the second always small

    def caption(self, shape_word: Optional[str] = None) -> str:
        return (f"a large {self.colour} {shape_word or self.shape} on a {self.background} {self.pattern} background, "
                f"at the {self.position}, and a small {self.second_colour} {self.second_shape} at the "
                f"{self.second_position}")


@dataclass
class TexturedMeasured(Measured):
    pattern: Optional[str] = None
    second_colour: Optional[str] = None
    second_position: Optional[str] = None


def _tones() -> tuple:
    names = list(COLOURS)
    rgb = np.array([COLOURS[c] for c in names] + [[DARK * v for v in COLOURS[c]] for c in names], dtype=np.float32)
    return names, rgb


def _pattern_masks() -> dict:
    """(32, 32) bool: where each pattern shows the dark tone."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return {"plain": np.zeros((SIZE, SIZE), bool), "striped": (x // BAND) % 2 == 1,
            "checked": ((x // BAND) + (y // BAND)) % 2 == 1}


def _extent(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return int(max(np.ptp(ys), np.ptp(xs)) + 1)


def _quadrant(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    return f"{'top' if ys.mean() < SIZE / 2 else 'bottom'} {'left' if xs.mean() < SIZE / 2 else 'right'}"


class TexturedWorld:
    name = "textured"
    max_length = 32
    prompt_key = "prompt"
    new_shapes = NEW_SHAPES

    @staticmethod
    def sample_scene(rng: random.Random, shapes=SHAPES, **fixed) -> TexturedScene:
        """A random scene: three different colours (object, background, second object), two positions."""
        colour = fixed.get("colour") or rng.choice(list(COLOURS))
        bg = fixed.get("background") or rng.choice([c for c in COLOURS if c != colour])
        pos = fixed.get("position") or rng.choice(list(POSITIONS))
        return TexturedScene(
            shape=fixed.get("shape") or rng.choice(list(shapes)), colour=colour, background=bg,
            pattern=fixed.get("pattern") or rng.choice(PATTERNS), position=pos,
            second_shape=fixed.get("second_shape") or rng.choice(list(SHAPES)),
            second_colour=fixed.get("second_colour") or rng.choice([c for c in COLOURS if c not in (colour, bg)]),
            second_position=fixed.get("second_position") or rng.choice([p for p in POSITIONS if p != pos]))

    @staticmethod
    def render(scene: TexturedScene) -> Image.Image:
        """Background pattern, then the small object, then the large one (drawn by the flat world's renderer)."""
        flat = lambda shape, colour, size, position: np.asarray(   # noqa: E731
            render(Scene(shape, colour, scene.background, size, position)), dtype=np.float32)
        bg = np.asarray(COLOURS[scene.background], dtype=np.float32)
        dark = _pattern_masks()[scene.pattern]
        img = np.where(dark[..., None], DARK * bg, bg)
        for shape, colour, size, position in ((scene.second_shape, scene.second_colour, "small", scene.second_position),
                                              (scene.shape, scene.colour, "large", scene.position)):
            drawn = flat(shape, colour, size, position)
            # how much of the object covers each pixel, from its distance to the plain background
            cover = np.clip(np.linalg.norm(drawn - bg, axis=-1) / max(np.linalg.norm(np.asarray(COLOURS[colour]) - bg), 1.0),
                            0.0, 1.0)[..., None]
            img = img * (1 - cover) + np.asarray(COLOURS[colour], dtype=np.float32) * cover
        return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))

    @staticmethod
    def measure(image: Image.Image) -> TexturedMeasured:
        """Background = the colour most border pixels are a tone of; pattern = the template the dark-tone pixels
        of the background agree with most; objects = the two largest groups of non-background pixels by colour
        (the larger one is the first object: its mask, colour, position, size)."""
        a = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
        names, tones = _tones()
        dist = np.linalg.norm(a[..., None, :] - tones, axis=-1)          # (32, 32, 12)
        nearest = dist.argmin(-1)
        border = np.concatenate([nearest[:2].ravel(), nearest[-2:].ravel(), nearest[:, :2].ravel(), nearest[:, -2:].ravel()])
        bg_i = int(np.bincount(border % len(names), minlength=len(names)).argmax())
        bg_dist = np.minimum(dist[..., bg_i], dist[..., bg_i + len(names)])
        background = bg_dist < 60
        is_dark = dist[..., bg_i + len(names)] < dist[..., bg_i]
        agreement = {p: float((is_dark == t)[background].mean()) if background.any() else 0.0
                     for p, t in _pattern_masks().items()}
        pattern = max(PATTERNS, key=agreement.get)
        # object pixels: not background and close to one of the (light) world colours; anti-aliased edges between
        # two colours are neither and are left out
        light = dist[..., :len(names)]
        colour_of = light.argmin(-1)
        objects = ~background & (light.min(-1) < 40)
        groups = [(int((objects & (colour_of == i)).sum()), i) for i in range(len(names)) if i != bg_i]
        groups = [i for n, i in sorted(groups, reverse=True) if n >= 6]
        if not groups:
            return TexturedMeasured(names[bg_i], None, None, None, np.zeros((SIZE, SIZE), bool), pattern=pattern)
        extent = {i: _extent(objects & (colour_of == i)) for i in groups[:2]}
        groups[:2] = sorted(groups[:2], key=lambda i: -extent[i])        # the large object spans more pixels
        first = objects & (colour_of == groups[0])
        m = TexturedMeasured(names[bg_i], names[groups[0]], _quadrant(first),
                             "small" if extent[groups[0]] < 15 else "large", first, pattern=pattern)
        if len(groups) > 1:
            m.second_colour, m.second_position = names[groups[1]], _quadrant(objects & (colour_of == groups[1]))
        return m

    @staticmethod
    def vocabulary() -> list[str]:
        """The flat world's words, the patterns and "and"."""
        return sorted(set(vocabulary()) | {"and", *PATTERNS})

    @staticmethod
    def prompt(scene: TexturedScene) -> str:
        return (f"a large {PLACEHOLDER} {CLASS_WORD} on a {scene.background} {scene.pattern} background, at the "
                f"{scene.position}, and a small {scene.second_colour} {scene.second_shape} at the {scene.second_position}")

    @staticmethod
    def followed(scene: TexturedScene, m: TexturedMeasured) -> dict:
        """Which of the caption's facts the image shows. ``prompt`` (what text alignment counts): background
        colour, pattern and position. The second object stays in every caption and training image (it is part
        of the layout an adapter can copy) but not in ``prompt``: the shipped base model draws it as asked only
        part of the time (colour 55 %, position 33 % of captions), so it would mostly measure the base model."""
        keys = ("background", "pattern", "position", "colour", "second_colour", "second_position")
        hits = {k: getattr(m, k) == getattr(scene, k) for k in keys}
        hits["prompt"] = hits["background"] and hits["pattern"] and hits["position"]
        return hits

    @staticmethod
    def test_scenes(concept: TexturedScene, n: int, seed: int) -> list:
        """n scenes of the concept that differ from its training image in background colour, pattern, position
        and second object."""
        rng = random.Random(seed)
        out = []
        while len(out) < n:
            s = TexturedWorld.sample_scene(rng, shape=concept.shape, colour=concept.colour)
            if (s.background != concept.background and s.pattern != concept.pattern and s.position != concept.position
                    and (s.second_colour, s.second_shape) != (concept.second_colour, concept.second_shape)):
                out.append(s)
        return out


# the held-out concepts the study trains on (one image each)
CONCEPTS = [TexturedScene("star", "yellow", "blue", "striped", "top left", "circle", "red", "bottom right"),
            TexturedScene("crescent", "white", "purple", "checked", "bottom right", "square", "green", "top left"),
            TexturedScene("hourglass", "red", "green", "striped", "top right", "triangle", "white", "bottom left"),
            TexturedScene("star", "purple", "white", "checked", "bottom left", "diamond", "blue", "top right")]
