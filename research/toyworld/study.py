"""The toy-world study: training paths of each method, scored at every checkpoint from the pixels.

A *path* trains one adapter on one image of a held-out concept with `tlora train` at one learning rate, saving a
checkpoint every few steps; every checkpoint samples prompts that change what the training image shows and is
scored by :func:`tlora.toyworld.experiment.score` (text alignment, shape IoU, colour distance). T-LoRA paths are
also sampled with the mask off (every rank at every step), from the same files. ``benchmarks/toyworld.py`` runs
the study and makes its tables.
"""
from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tlora.generate import load_pipeline
from tlora.toyworld import world as flat
from tlora.toyworld.experiment import Method, personalise, sample, score

from . import textured
from .pretrain import WORLDS

CONCEPTS = {"flat": flat.CONCEPTS, "textured": textured.CONCEPTS}
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def default_model(world: str = "flat") -> Path:
    """A world's base pipeline: the flat one shipped inside tlora, the textured one in ``research/models``."""
    if world == "flat":
        return flat.shipped_model()
    return MODELS_DIR / "toyworld-textured"


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
    personalise(Path(run.model), concept, m, run.rank, run.steps, run.seed, out, world, lr=run.lr,
                every=run.every)
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

