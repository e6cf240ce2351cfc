"""One-image personalisation in a toy world, measured from the pixels (what ``tlora demo`` runs; the study in the
repository's ``research/toyworld`` runs it along whole training paths).

A concept is a held-out shape in a fixed colour ("sks shape"). :func:`personalise` trains one adapter on one image
of it with `tlora train`; :func:`sample` asks for prompts that change what the training image shows (background
colour and position, and in the repository's textured world its pattern and the second object); :func:`score`
reads from the pixels:

* text alignment: share of images showing every fact the prompt changed (``world.prompt_key``) —
  the paper's TS, measured exactly;
* shape IoU: IoU of the generated object's mask with the training image's after aligning their centroids
  (0 when no object is found) — the shape half of the paper's IS;
* colour distance: RGB distance of the generated object's median colour to the concept's, divided by the
  black-to-white distance (0 = the concept's colour; 1 when no object is found) — its colour half.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..config import TLoRAConfig
from ..masking import attach
from ..train import train
from ..trainconfig import TrainConfig
from .world import aligned_iou, object_rgb, rgb_distance

TARGETS = ("Transformer2DModel", "ResnetBlock2D")   # the toy UNet is small: attention alone cannot draw a new shape
STEPS, LR = 400, 5e-3
MAX_RGB = float(np.linalg.norm([255.0, 255.0, 255.0]))


@dataclass(frozen=True)
class Method:
    """An adapter recipe. ``min_rank`` None: every rank at every step (plain LoRA, stored as a vanilla adapter
    whose Rmin = R)."""
    label: str
    variant: str = "ortho"
    min_rank: Optional[int] = None

    def config(self, rank: int, targets=TARGETS) -> TLoRAConfig:
        return TLoRAConfig(rank=rank, min_rank=rank if self.min_rank is None else self.min_rank,
                           variant=self.variant, target_module=targets)

    @property
    def masked(self) -> bool:
        return self.min_rank is not None


LORA = Method("LoRA", variant="vanilla")


def tlora_method(min_rank: int) -> Method:
    return Method(f"T-LoRA Rmin {min_rank}", variant="ortho", min_rank=min_rank)


def personalise(model: Path, concept, method: Method, rank: int, steps: int, seed: int, out: Path, world,
                lr: float = LR, batch: int = 4, every: Optional[int] = None) -> Path:
    """Train one adapter on one image of ``concept`` (a scene of ``world``, e.g. :class:`FlatWorld`); returns the
    final weights file. ``every``: also keep a checkpoint every that many steps
    (``out/run/checkpoint-N/tlora.safetensors``)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    world.render(concept).save(data / "concept.png")
    (data / "concept.txt").write_text(world.prompt(concept))
    cfg = TrainConfig(model=str(model), data_dir=str(data), output_dir=str(out / "run"), resolution=32,
                      max_steps=steps, batch_size=batch, learning_rate=lr, seed=seed,
                      checkpointing_steps=every or steps, checkpoints_total_limit=None if every else 1,
                      num_validation_images=0, device="cpu", tlora=method.config(rank),
                      overwrite=True)      # the study owns its work folders: a rerun trains again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg)


@torch.no_grad()
def sample(pipe, weights: Optional[Path], scenes: list, world, seed: int, mask: bool = True, steps: int = 25,
           guidance: float = 3.0):
    """The scenes' prompts (concept as "sks shape"), DDIM ``steps`` steps; ``weights`` None: the base model."""
    prompts = [world.prompt(s) for s in scenes]
    run = lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,   # noqa: E731
                       generator=torch.Generator().manual_seed(seed)).images
    if weights is None:
        return run()
    with attach(pipe, weights, mask=mask):
        return run()


def score(images, scenes: list, concept, world) -> Dict[str, float]:
    """Mean text alignment, shape IoU and colour distance of the images (see the module docstring)."""
    ref = world.measure(world.render(concept)).mask
    align, iou, colour = [], [], []
    for im, s in zip(images, scenes):
        m = world.measure(im)
        align.append(float(world.followed(s, m)[world.prompt_key]))
        iou.append(aligned_iou(ref, m.mask))
        rgb = object_rgb(im, m.mask) if m.mask.sum() >= 6 else None
        colour.append(1.0 if rgb is None else min(rgb_distance(rgb, concept.colour) / MAX_RGB, 1.0))
    return {"text_alignment": statistics.mean(align), "shape_iou": statistics.mean(iou),
            "colour_distance": statistics.mean(colour)}
