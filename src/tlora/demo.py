"""``tlora demo``: the main job end to end on a laptop CPU, with nothing downloaded.

Uses the toy-world pipeline shipped inside the package (a stock diffusers StableDiffusionPipeline trained on
synthetic scenes, see :mod:`tlora.toyworld.world`). Trains plain LoRA and T-LoRA with one recipe (same rank,
steps, lr and seed) on one image of a shape the base model never saw, asks both to put it into other scenes, and
writes a labelled grid:

    row 1: what each prompt asks for (drawn by the world itself)
    row 2: LoRA, row 3: T-LoRA                  (column 1: the training image)

The recipe is one where neither run diverges, so the same numbers come out under any thread count (checked for
1 and 2 threads and two seeds). What it shows is the toy-world study's finding (``docs/toyworld.md``): here,
at a recipe LoRA trains well with, T-LoRA keeps no more prompt control than LoRA; its protection shows only at an
lr where LoRA breaks down, which is no recipe to reproduce.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .fileio import save_png
from .generate import contact_sheet, load_pipeline
from .toyworld.experiment import LORA, personalise, sample, score, tlora_method
from .toyworld.world import CONCEPTS, FlatWorld, shipped_model

CONCEPT, RANK, LR, STEPS, PROMPTS = 0, 64, 3e-3, 100, 6       # T-LoRA's Rmin: R / 4
RUNS = ("LoRA", "T-LoRA")
# what a demo writes into its --out folder, and all ``--overwrite`` may remove there ("LoRA-gentle": a row of
# earlier versions of the demo)
OWN = RUNS + ("LoRA-gentle", "lora-vs-tlora.png")


def run_demo(out: Path, steps: int = STEPS, rank: int = RANK, seed: int = 0) -> Path:
    """Train both adapters into ``out/<run>``, write ``out/lora-vs-tlora.png``, print the scores; returns the grid's
    path."""
    min_rank = max(1, rank // 4)
    model, world = shipped_model(), FlatWorld
    if not (model / "model_index.json").is_file():
        raise UsageError(f"the toy-world model is missing from {model}; reinstall tlora")
    out.mkdir(parents=True, exist_ok=True)
    concept = CONCEPTS[CONCEPT]
    scenes = world.test_scenes(concept, PROMPTS, seed=CONCEPT)
    pipe = load_pipeline(str(model))
    reference = world.render(concept)
    rows, report = [reference] + [world.render(s) for s in scenes], {}
    for label, method in zip(RUNS, (LORA, tlora_method(min_rank))):
        weights = personalise(model, concept, method, rank, steps, seed=seed, out=out / label, world=world, lr=LR)
        images = sample(pipe, weights, scenes, world, seed=seed)
        report[label] = score(images, scenes, concept, world)
        rows += [reference] + list(images)
    labels = ["asked for (drawn by the world)"] + [f"{label} (lr {LR:g}, {steps} steps)" for label in RUNS]
    columns = ["training image"] + [world.prompt(s).replace("sks ", "") for s in scenes]
    sheet = contact_sheet(rows, cols=PROMPTS + 1, rows=labels, columns=columns, min_tile=128)
    path = out / "lora-vs-tlora.png"
    save_png(sheet, path)
    print(f"concept: {concept.colour} {concept.shape} (never seen in pretraining), trained as "
          f"\"{world.prompt(concept)}\"; rank {rank} (T-LoRA Rmin {min_rank}), lr {LR:g}, {steps} steps, seed {seed}")
    for label, s in report.items():
        print(f"  {label:<8} text alignment {s['text_alignment']:.2f}  shape IoU {s['shape_iou']:.2f}  "
              f"colour distance {s['colour_distance']:.2f}")
    return path
