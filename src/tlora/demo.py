"""``tlora demo``: the main job end to end on a laptop CPU, with nothing downloaded.

Builds a tiny SD1.5-style pipeline offline and saves it (the real ``from_pretrained`` path loads it),
trains a T-LoRA on the image shipped with the package, then samples the same prompts and seeds with the
timestep mask and without it, side by side.
"""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path


def run_demo(out: Path, steps: int = 30) -> Path:
    import shutil

    import torch

    from .generate import contact_sheet, load_pipeline, sample_images, save_png
    from .masking import attach
    from .tiny import build_pipeline
    from .trainconfig import TrainConfig
    from .config import TLoRAConfig
    from .train import train

    out.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = out / "base-model", out / "data"
    if not (model_dir / "model_index.json").is_file():
        build_pipeline("sd15").save_pretrained(model_dir)
    data_dir.mkdir(exist_ok=True)
    with resources.as_file(resources.files("tlora") / "assets" / "concept.png") as src:
        shutil.copy(src, data_dir / "concept.png")
    prompts = ["a photo of sks toy", "a sks toy on the beach"]
    cfg = TrainConfig(model=str(model_dir), data_dir=str(data_dir), output_dir=str(out / "run"), class_name="toy",
                      resolution=32, max_steps=steps, learning_rate=1e-3, validation_prompts=prompts,
                      validation_steps=0, validation_inference_steps=10, checkpointing_steps=steps,
                      tlora=TLoRAConfig(rank=16, min_rank=1, target_module=()), device="cpu")
    weights = train(cfg)
    pipe = load_pipeline(str(model_dir))
    rows = []
    for mask in (True, False):
        with torch.no_grad(), attach(pipe, weights, mask=mask):
            rows += [im for _, _, im in sample_images(pipe, prompts, 2, 0, 10, 7.5, progress=False)]
    sheet = out / "masked-vs-unmasked.png"
    save_png(contact_sheet(rows, cols=4), sheet)
    return sheet


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="train and sample a T-LoRA on an embedded tiny pipeline (CPU, no downloads)")
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a: argparse.Namespace) -> int:
    from .errors import UsageError
    if a.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {a.steps}")
    sheet = run_demo(Path(a.out), a.steps)
    print(f"weights:  {Path(a.out) / 'run' / 'tlora.safetensors'}")
    print(f"samples:  {Path(a.out) / 'run' / 'samples'}")
    print(f"compare:  {sheet}  (top row: masked per step, as trained; bottom row: no mask)")
    return 0
