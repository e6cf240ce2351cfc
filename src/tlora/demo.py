"""``tlora demo``: the main job end to end on a laptop CPU, with nothing downloaded.

Uses a toy-world pipeline shipped inside the package (a stock diffusers StableDiffusionPipeline trained on
synthetic scenes, see :mod:`tlora.toyworld.world`). Trains plain LoRA and T-LoRA (same rank, same steps, same lr)
on one image of a shape the base model never saw, then asks both to put it into other scenes, and writes a
side-by-side grid:

    row 1: what each prompt asks for (rendered by the world itself)
    row 2: LoRA, row 3: T-LoRA, both at the same lr and steps
    row 4: LoRA at a gentler lr                 (column 1: the training image)

The recipe is what the toy-world study (``docs/toyworld.md``) found: at one shared lr and step count (5e-3, 200 steps) LoRA
copies the training image's background and position while T-LoRA (Rmin = R/4, the study's best) keeps
following the prompt; at a gentler lr (2e-3) LoRA follows the prompt as well and learns as much of the shape,
so at matched fidelity T-LoRA has no edge in the toy world.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .fileio import save_png
from .generate import contact_sheet, load_pipeline
from .toyworld.experiment import LORA, personalise, sample, score, tlora_method
from .toyworld.world import CONCEPTS, FlatWorld, shipped_model

# what a demo writes into its --out folder (and all ``--overwrite`` may remove there)
OWN = ("LoRA", "T-LoRA", "LoRA-gentle", "lora-vs-tlora.png")
CONCEPT, RANK, LR, GENTLE_LR, STEPS = 0, 64, 5e-3, 2e-3, 200     # T-LoRA's Rmin: R / 4


def run_demo(out: Path, steps: int = None, rank: int = RANK, n_prompts: int = 6) -> Path:
    steps = steps or STEPS
    min_rank = max(1, rank // 4)
    model, world = shipped_model(), FlatWorld
    if not (model / "model_index.json").is_file():
        raise UsageError(f"the toy-world model is missing from {model}; reinstall tlora")
    out.mkdir(parents=True, exist_ok=True)
    concept = CONCEPTS[CONCEPT]
    scenes = world.test_scenes(concept, n_prompts, seed=CONCEPT)
    pipe = load_pipeline(str(model))
    reference = world.render(concept)
    rows = [reference] + [world.render(s) for s in scenes]
    report = {}
    runs = (("LoRA", LORA, LR), ("T-LoRA", tlora_method(min_rank), LR), ("LoRA-gentle", LORA, GENTLE_LR))
    for label, method, lr in runs:
        weights = personalise(model, concept, method, rank, steps, seed=0, out=out / label, world=world, lr=lr)
        images = sample(pipe, weights, scenes, world, seed=0)
        report[f"{label} (lr {lr:g})"] = score(images, scenes, concept, world)
        rows += [reference] + list(images)
    labels = ["asked for (drawn by the world)"] + [f"{label} (lr {lr:g})" for label, _, lr in runs]
    columns = ["training image"] + [world.prompt(s).replace("sks ", "") for s in scenes]
    sheet = contact_sheet(rows, cols=n_prompts + 1, rows=labels, columns=columns, min_tile=128)
    path = out / "lora-vs-tlora.png"
    save_png(sheet, path)
    print(f"concept: {concept.colour} {concept.shape} (never seen in pretraining), trained as "
          f"\"{world.prompt(concept)}\"; rank {rank} (T-LoRA Rmin {min_rank}), {steps} steps each")
    for label, s in report.items():
        print(f"  {label:<24} text alignment {s['text_alignment']:.2f}  shape IoU {s['shape_iou']:.2f}  "
              f"colour distance {s['colour_distance']:.2f}")
    return path
