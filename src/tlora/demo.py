"""``tlora demo``: the main job end to end on a laptop CPU, with nothing downloaded.

Uses the toy-world pipeline shipped inside the package (a stock diffusers StableDiffusionPipeline trained
on synthetic scenes, see :mod:`tlora.toyworld`). Trains plain LoRA and T-LoRA (same rank, same steps) on one
image of a shape the base model never saw, then asks both to put it on other backgrounds and in other
positions, and writes a side-by-side grid:

    row 1: what each prompt asks for (rendered by the world itself)
    row 2: LoRA        row 3: T-LoRA          (column 1: the training image)
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from .errors import UsageError
from .fileio import save_png
from .generate import contact_sheet, load_pipeline
from .toyworld.experiment import (CONCEPTS, STEPS, concept_prompt, default_model, personalise, sample, score,
                                  test_prompts)
from .toyworld.world import render


def run_demo(out: Path, steps: int = None, rank: int = 64, n_prompts: int = 6) -> Path:
    steps = steps or STEPS
    model = default_model()
    if not (model / "model_index.json").is_file():
        raise UsageError(f"the toy-world model is missing from {model}; reinstall tlora")
    out.mkdir(parents=True, exist_ok=True)
    concept = CONCEPTS[0]
    scenes = test_prompts(concept, n_prompts)
    pipe = load_pipeline(str(model))
    reference = render(concept)
    rows = [reference] + [render(s) for s in scenes]
    report = {}
    for method in ("LoRA", "T-LoRA"):
        weights = personalise(model, concept, method, rank, steps, seed=0, out=out / method.replace(" ", "_"))
        images = sample(pipe, weights, scenes, concept, seed=0)
        report[method] = score(images, scenes, concept)
        rows += [reference] + list(images)
    sheet = contact_sheet(rows, cols=n_prompts + 1)
    sheet = sheet.resize((sheet.width * 4, sheet.height * 4), Image.Resampling.NEAREST)
    path = out / "lora-vs-tlora.png"
    save_png(sheet, path)
    print(f"concept: {concept.colour} {concept.shape} (never seen in pretraining), trained as "
          f"\"{concept_prompt(concept)}\"; rank {rank}, {steps} steps each")
    for method, s in report.items():
        print(f"  {method:<7} text alignment {s['text_alignment']:.2f}  concept fidelity {s['concept_fidelity']:.2f}")
    return path
