"""One-image personalisation in the toy world, measured from pixels.

A concept is a held-out shape in a fixed colour ("sks shape"). Each method trains on one image of it with
`tlora train`, then samples prompts that move it to other backgrounds and positions:

* text alignment: share of images whose background colour and position (read from the pixels) match the
  prompt — the paper's TS, measured exactly;
* concept fidelity: IoU of the generated object's mask with the reference object's after aligning their
  centroids, times 1 if the object's colour is the concept's colour else 0 — the paper's IS, measured exactly.
"""
from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List

import torch

from ..config import TLoRAConfig
from ..generate import load_pipeline
from ..masking import attach
from ..train import train
from ..trainconfig import TrainConfig
from .world import CLASS_WORD, COLOURS, PLACEHOLDER, POSITIONS, Scene, aligned_iou, measure, render

CONCEPTS = [Scene("star", "yellow", "blue", "large", "top left"),
            Scene("crescent", "white", "purple", "large", "bottom right"),
            Scene("hourglass", "red", "green", "large", "top right"),
            Scene("star", "purple", "white", "large", "bottom left")]

# method → TLoRAConfig fields (rank filled in per run). "LoRA" is the same adapter with every rank at every step.
METHODS = {"LoRA": dict(variant="vanilla", full=True), "Vanilla T-LoRA": dict(variant="vanilla"),
           "T-LoRA": dict(variant="ortho")}


def default_model() -> Path:
    """The shipped toy-world pipeline (diffusers format, inside the package)."""
    return Path(str(resources.files("tlora") / "assets" / "toyworld"))


def concept_prompt(concept: Scene, background: str = None, position: str = None) -> str:
    return (f"a {concept.size} {PLACEHOLDER} {CLASS_WORD} on a {background or concept.background} background, "
            f"at the {position or concept.position}")


def test_prompts(concept: Scene, n: int = 8, seed: int = 0) -> List[Scene]:
    """n (background, position) pairs that differ from the training image in both."""
    rng = random.Random(seed)
    bgs = [c for c in COLOURS if c not in (concept.background, concept.colour)]
    poss = [p for p in POSITIONS if p != concept.position]
    pairs = [(b, p) for b in bgs for p in poss]
    rng.shuffle(pairs)
    return [Scene(concept.shape, concept.colour, b, concept.size, p) for b, p in pairs[:n]]


TARGETS = ("Transformer2DModel", "ResnetBlock2D")   # the toy UNet is small: attention alone cannot draw a new shape
STEPS, LR = 400, 5e-3   # one image, batch 4: at 1e-3 × 200 steps neither method had learned the shape yet


def personalise(model: Path, concept: Scene, method: str, rank: int, steps: int, seed: int, out: Path,
                lr: float = LR, batch: int = 4, targets=TARGETS) -> Path:
    """Train one adapter on one image of ``concept``; returns the weights file."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    render(concept).save(data / "concept.png")
    (data / "concept.txt").write_text(concept_prompt(concept))
    m = METHODS[method]
    tl = TLoRAConfig(rank=rank, min_rank=rank if m.get("full") else 1, variant=m["variant"], target_module=targets)
    cfg = TrainConfig(model=str(model), data_dir=str(data), output_dir=str(out / "run"), resolution=32,
                      max_steps=steps, batch_size=batch, learning_rate=lr, seed=seed, checkpointing_steps=steps,
                      checkpoints_total_limit=1, num_validation_images=0, device="cpu", tlora=tl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg)


@torch.no_grad()
def sample(pipe, weights: Path, scenes: List[Scene], concept: Scene, seed: int, steps: int = 25,
           guidance: float = 3.0):
    prompts = [concept_prompt(concept, s.background, s.position) for s in scenes]
    with attach(pipe, weights):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed)).images


def score(images, scenes: List[Scene], concept: Scene) -> Dict[str, float]:
    ref = measure(render(concept)).mask
    align, fid = [], []
    for im, s in zip(images, scenes):
        m = measure(im)
        align.append(float(m.background == s.background and m.position == s.position))
        fid.append(aligned_iou(ref, m.mask) * float(m.colour == concept.colour))
    return {"text_alignment": statistics.mean(align), "concept_fidelity": statistics.mean(fid)}


@dataclass
class RunResult:
    method: str
    rank: int
    concept: int
    seed: int
    text_alignment: float
    concept_fidelity: float


@dataclass(frozen=True)
class Run:
    """One cell of the grid: train one adapter, sample the concept's test prompts, score them."""
    model: str
    concept: int
    seed: int
    rank: int
    method: str
    steps: int
    n_prompts: int
    lr: float
    workdir: str


_PIPES: Dict[str, object] = {}   # per process: the base pipeline, loaded once


def _pipe(model: str):
    if model not in _PIPES:
        _PIPES[model] = load_pipeline(model)
    return _PIPES[model]


def run_one(run: Run) -> RunResult:
    concept = CONCEPTS[run.concept]
    scenes = test_prompts(concept, run.n_prompts, seed=run.concept)
    out = Path(run.workdir) / f"c{run.concept}-s{run.seed}-r{run.rank}-{run.method.replace(' ', '_')}"
    w = personalise(Path(run.model), concept, run.method, run.rank, run.steps, run.seed, out, lr=run.lr)
    s = score(sample(_pipe(run.model), w, scenes, concept, run.seed), scenes, concept)
    return RunResult(run.method, run.rank, run.concept, run.seed, **s)


def _worker_init(threads: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def run_grid(model: Path, concepts: List[int], seeds: List[int], ranks: List[int], methods: List[str], steps: int,
             n_prompts: int, lr: float = LR, jobs: int = 1, log=print) -> List[RunResult]:
    """Every (concept index, seed, rank, method) run, in that order.

    ``jobs`` > 1 runs that many in separate processes, each with cpu_count // jobs torch threads: these
    models are too small for two threads to share one run well (on 2 cores, two one-thread pretraining
    processes did about 1.6× the steps of one two-thread process; the default benchmark grid, 36 runs, took
    22.9 min with jobs=2 where one run at a time took 51.8 min, on an earlier base model of the same size). A
    run's numbers depend on its seed only, not on which process ran it."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Run(str(model), ci, seed, rank, method, steps, n_prompts, lr, tmp)
                for ci in concepts for seed in seeds for rank in ranks for method in methods]
        jobs = max(1, min(jobs, len(runs)))
        t0 = time.time()

        def report(r: RunResult) -> RunResult:
            log(f"concept {r.concept} seed {r.seed} rank {r.rank:>2} {r.method:<15} TA {r.text_alignment:.2f} "
                f"CF {r.concept_fidelity:.2f} ({(time.time() - t0) / 60:.1f} min)")
            return r
        if jobs == 1:
            return [report(run_one(r)) for r in runs]
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            return [report(r) for r in pool.map(run_one, runs)]
