"""One-image personalisation in the toy worlds, measured from pixels along each method's training path.

A concept is a held-out shape in a fixed colour ("sks shape"). A *path* trains one adapter on one image of it
with `tlora train` at one learning rate, saving a checkpoint every few steps; every checkpoint samples prompts
that change what the training image shows (background colour, and in the textured world its pattern and the
second object, and the position) and is scored from the pixels:

* text alignment: share of images showing every fact the prompt changed (``world.prompt_key``) —
  the paper's TS, measured exactly;
* shape IoU: IoU of the generated object's mask with the training image's after aligning their centroids
  (0 when no object is found) — the shape half of the paper's IS;
* colour distance: RGB distance of the generated object's median colour to the concept's, divided by the
  black-to-white distance (0 = the concept's colour; 1 when no object is found) — its colour half.

T-LoRA paths are also sampled with the mask off (every rank at every step), from the same files.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import TLoRAConfig
from ..generate import load_pipeline
from ..masking import attach
from ..train import train
from ..trainconfig import TrainConfig
from .pretrain import WORLDS, world_of
from .textured import TexturedScene
from .world import Scene, aligned_iou, object_rgb, rgb_distance

CONCEPTS = {
    "flat": [Scene("star", "yellow", "blue", "large", "top left"),
             Scene("crescent", "white", "purple", "large", "bottom right"),
             Scene("hourglass", "red", "green", "large", "top right"),
             Scene("star", "purple", "white", "large", "bottom left")],
    "textured": [TexturedScene("star", "yellow", "blue", "striped", "top left", "circle", "red", "bottom right"),
                 TexturedScene("crescent", "white", "purple", "checked", "bottom right", "square", "green", "top left"),
                 TexturedScene("hourglass", "red", "green", "striped", "top right", "triangle", "white", "bottom left"),
                 TexturedScene("star", "purple", "white", "checked", "bottom left", "diamond", "blue", "top right")],
}
MODELS = {"flat": "toyworld", "textured": "toyworld-textured"}    # folders under tlora/assets
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


def default_model(world: str = "flat") -> Path:
    """A shipped toy-world pipeline (diffusers format, inside the package)."""
    return Path(str(resources.files("tlora") / "assets" / MODELS[world]))


def personalise(model: Path, concept, method: Method, rank: int, steps: int, seed: int, out: Path, lr: float = LR,
                batch: int = 4, every: Optional[int] = None, world=None) -> Path:
    """Train one adapter on one image of ``concept``; returns the final weights file. ``every``: also keep a
    checkpoint every that many steps (``out/run/checkpoint-N/tlora.safetensors``)."""
    world = world or world_of(model)
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


@dataclass(frozen=True)
class Point:
    """One scored checkpoint: method label (with " (no mask)" for T-LoRA sampled at full rank), step 0 = the
    base model, which every path starts from (adapters start at ΔW = 0)."""
    world: str
    concept: int
    seed: int
    method: str
    lr: float
    step: int
    text_alignment: float
    shape_iou: float
    colour_distance: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PathRun:
    """One training path: a method at one lr, scored at every ``every`` steps (``method`` None: the base
    model alone, step 0)."""
    model: str
    world: str
    concept: int
    seed: int
    method: Optional[Method]
    rank: int
    lr: float
    steps: int
    every: int
    n_prompts: int
    workdir: str


_PIPES: Dict[str, object] = {}   # per process: the base pipeline, loaded once


def _pipe(model: str):
    if model not in _PIPES:
        _PIPES[model] = load_pipeline(model)
    return _PIPES[model]


def run_path(run: PathRun) -> List[Point]:
    world = WORLDS[run.world]
    concept = CONCEPTS[run.world][run.concept]
    scenes = world.test_scenes(concept, run.n_prompts, seed=run.concept)
    pipe = _pipe(run.model)
    point = lambda label, step, images: Point(run.world, run.concept, run.seed, label, run.lr, step,  # noqa: E731
                                             **score(images, scenes, concept, world))
    if run.method is None:
        return [point("base", 0, sample(pipe, None, scenes, world, run.seed))]
    m = run.method
    out = Path(run.workdir) / f"{run.world}-c{run.concept}-s{run.seed}-{m.label.replace(' ', '_')}-lr{run.lr:g}"
    personalise(Path(run.model), concept, m, run.rank, run.steps, run.seed, out, lr=run.lr, every=run.every,
                world=world)
    points = []
    for step in range(run.every, run.steps + 1, run.every):
        weights = out / "run" / f"checkpoint-{step}" / "tlora.safetensors"
        points.append(point(m.label, step, sample(pipe, weights, scenes, world, run.seed)))
        if m.masked:
            points.append(point(f"{m.label} (no mask)", step, sample(pipe, weights, scenes, world, run.seed,
                                                                     mask=False)))
    return points


def _worker_init(threads: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def run_study(runs: List[PathRun], jobs: int = 1, log=print) -> List[Point]:
    """Every path's points, in the order of ``runs``.

    ``jobs`` > 1 runs that many paths in separate processes, each with cpu_count // jobs torch threads: these
    models are too small for two threads to share one run well (on 2 cores, two one-thread pretraining
    processes did about 1.6× the steps of one two-thread process). A path's numbers depend on its settings and
    seed only, not on which process ran it."""
    jobs = max(1, min(jobs, len(runs)))
    t0 = time.time()

    def report(points: List[Point]) -> List[Point]:
        last = points[-1]
        log(f"{last.world} concept {last.concept} seed {last.seed} {last.method:<26} lr {last.lr:g}: "
            f"{len(points)} points, last TA {last.text_alignment:.2f} IoU {last.shape_iou:.2f} "
            f"({(time.time() - t0) / 60:.1f} min)")
        return points
    if jobs == 1:
        return [p for r in runs for p in report(run_path(r))]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        return [p for pts in pool.map(run_path, runs) for p in report(pts)]


def study_runs(worlds: List[str], concepts: List[int], seeds: List[int], methods: List[Method], lrs: List[float],
               rank: int, steps: int, every: int, n_prompts: int, workdir: str,
               models: Optional[Dict[str, Path]] = None) -> List[PathRun]:
    """The base model once per (world, concept, seed), then every method × lr path."""
    models = models or {w: default_model(w) for w in worlds}
    runs = []
    for w in worlds:
        for c in concepts:
            for s in seeds:
                runs.append(PathRun(str(models[w]), w, c, s, None, rank, 0.0, 0, every, n_prompts, workdir))
                runs += [PathRun(str(models[w]), w, c, s, m, rank, lr, steps, every, n_prompts, workdir)
                         for m in methods for lr in lrs]
    return runs

