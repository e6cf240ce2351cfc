"""The paper's protocol on real models: LoRA vs T-LoRA from one image per DreamBooth subject.

    python -m benchmarks.dreambooth --dataset dreambooth/dataset --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --out runs/dreambooth --device cuda [--subjects dog backpack ...] [--rank 64] [--min-rank 32]

The dataset is laid out as the DreamBooth repository ships it (github.com/google/dreambooth): one folder of
images per subject and ``prompts_and_classes.txt``, whose "subject_name,class" lines give each subject's class.
For every subject, each method trains on one image (``--image``, default the first by name) with the official
recipe (rank 64, AdamW lr 1e-4, batch 1, 800 steps, the family's native resolution, prompt "a photo of sks
<class>"; T-LoRA: ortho, sig_type last, Rmin 32), generates the 25 DreamBooth prompts of its kind (live
subjects: cats and dogs) × ``--images-per-prompt`` with Euler, ``--inference-steps`` 25 and guidance 5, masked at
every step, and is scored with ``tlora evaluate``'s metrics against all of the subject's images: IS (CLIP image),
DINO-IS, TS (CLIP text, placeholder removed). Writes ``OUT/<method>/<subject>/`` (weights, images,
scores.json) and ``OUT/table.md`` (mean ± sd over subjects, beside the paper's SDXL numbers).
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

PAPER_SDXL = {"LoRA": {"IS": .901, "DINO_IS": .808, "TS": .232}, "T-LoRA": {"IS": .900, "DINO_IS": .802, "TS": .256}}
LIVE_CLASSES = {"dog", "cat"}


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    images: tuple            # every image of the subject (the references); images[index] is trained on

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES


def read_dataset(root: Path, only: List[str] = None) -> List[Subject]:
    """Subjects of a DreamBooth-layout dataset (folders + prompts_and_classes.txt), by name."""
    from tlora.errors import UsageError
    from tlora.fileio import IMAGE_EXTS, read_text
    listing = root / "prompts_and_classes.txt"
    if not listing.is_file():
        raise UsageError(f"--dataset {root}: no prompts_and_classes.txt (expected the DreamBooth repository's "
                         "dataset folder)")
    classes = dict(re.findall(r"^([\w-]+),([^,\n]+)$", read_text(listing, "prompts_and_classes.txt"), re.M))
    classes.pop("subject_name", None)
    names = only or sorted(classes)
    subjects = []
    for name in names:
        if name not in classes:
            raise UsageError(f"--subjects: {name!r} is not in {listing}")
        images = tuple(sorted(p for p in (root / name).glob("*") if p.suffix.lower() in IMAGE_EXTS))
        if not images:
            raise UsageError(f"--dataset: no images in {root / name}")
        subjects.append(Subject(name, classes[name].strip(), images))
    if not subjects:
        raise UsageError(f"--dataset {root}: prompts_and_classes.txt lists no subject_name,class lines")
    return subjects


def methods(rank: int, min_rank: int) -> Dict[str, "object"]:
    from tlora.config import TLoRAConfig
    return {"LoRA": TLoRAConfig(rank=rank, min_rank=rank, variant="vanilla", target_module=()),
            "T-LoRA": TLoRAConfig(rank=rank, min_rank=min_rank, variant="ortho", sig_type="last", target_module=())}


def train_one(a, subject: Subject, tl, out: Path) -> Path:
    """One image, the official recipe; returns the weights file."""
    from tlora.train import train
    from tlora.trainconfig import TrainConfig
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    image = subject.images[a.image]
    shutil.copyfile(image, data / image.name)
    cfg = TrainConfig(model=a.model, data_dir=str(data), output_dir=str(out / "run"), class_name=subject.class_name,
                      resolution=a.resolution, max_steps=a.steps, learning_rate=a.lr, seed=a.seed,
                      mixed_precision=a.mixed_precision, checkpointing_steps=a.steps, checkpoints_total_limit=1,
                      num_validation_images=0, device=a.device, tlora=tl)
    return train(cfg)


def generate_one(a, pipe, weights: Path, subject: Subject, out: Path) -> List[tuple]:
    """[(prompt, image path)] for the subject's prompt set, masked at every step."""
    from tlora.evaluate import prompt_set
    from tlora.fileio import save_png, write_json
    from tlora.generate import sample_images
    from tlora.masking import attach
    prompts = prompt_set("live" if subject.live else "object", "sks", subject.class_name)[:a.prompts]
    with attach(pipe, weights):
        made = sample_images(pipe, prompts, a.images_per_prompt, a.seed, a.inference_steps, a.guidance,
                             height=a.resolution, width=a.resolution, progress=False)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (prompt, seed, image) in enumerate(made):
        path = images / f"{i:03d}.png"
        save_png(image, path)
        rows.append((prompt, path))
    write_json({p.name: prompt for prompt, p in rows}, images / "prompts.json")
    return rows


def score_one(emb, rows: List[tuple], subject: Subject) -> dict:
    from PIL import Image
    from tlora.evaluate import scores
    images = [Image.open(p).convert("RGB") for _, p in rows]
    refs = [Image.open(p).convert("RGB") for p in subject.images]
    return scores(emb, images, [prompt for prompt, _ in rows], refs, "sks")["overall"]


def table(results: Dict[str, Dict[str, dict]]) -> List[str]:
    """Markdown: per method, mean ± sd over subjects of IS, DINO-IS, TS, beside the paper's SDXL rank-64 row."""
    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")
    lines = ["| method | subjects | IS | DINO-IS | TS | paper SDXL r64 IS / DINO-IS / TS |", "|---|---|---|---|---|---|"]
    for m, per in results.items():
        p = PAPER_SDXL[m]
        lines.append(f"| {m} | {len(per)} | " + " | ".join(cell([s[k] for s in per.values()]) for k in ("IS", "DINO_IS", "TS"))
                     + f" | {p['IS']:.3f} / {p['DINO_IS']:.3f} / {p['TS']:.3f} |")
    return lines


def _parser():
    from tlora.errors import OneLineParser
    ap = OneLineParser(prog="python -m benchmarks.dreambooth", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="DreamBooth dataset folder (subject folders + prompts_and_classes.txt)")
    ap.add_argument("--model", required=True, help="diffusers pipeline folder or hub id (the paper: SDXL 1.0 base)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", nargs="+", help="subject folder names (default: every subject listed)")
    ap.add_argument("--image", type=int, default=0, help="index (by file name) of the one training image (default 0)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--min-rank", type=int, default=32, help="T-LoRA's Rmin (default 32, the paper's)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--resolution", type=int, help="default: the family's native resolution")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--prompts", type=int, default=25, help="first N prompts of the DreamBooth set (default all 25)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--inference-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", default="openai/clip-vit-base-patch32")
    ap.add_argument("--dino", default="facebook/dino-vits16")
    ap.add_argument("--device", default="cuda")
    return ap


def _checked(ap, argv):
    a = ap.parse_args(argv)
    for bad, rule in [(a.rank < 1, "--rank must be at least 1"),
                      (not 1 <= a.min_rank <= a.rank, "--min-rank must be in 1..--rank"),
                      (a.steps < 1, "--steps must be at least 1"), (not 0 < a.lr <= 1, "--lr must be in (0, 1]"),
                      (not 1 <= a.prompts <= 25, "--prompts must be in 1..25"),
                      (a.images_per_prompt < 1 or a.inference_steps < 1, "--images-per-prompt and --inference-steps must be at least 1"),
                      (a.image < 0, "--image must be at least 0")]:
        if bad:
            ap.error(rule)
    return a


def main(argv=None) -> int:
    from tlora.errors import UsageError
    ap = _parser()
    a = _checked(ap, argv)
    try:
        return run(a, " ".join(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2


def run(a, argv_text: str) -> int:
    from diffusers import EulerDiscreteScheduler
    from tlora.devices import check_device
    from tlora.evaluate import Embedder
    from tlora.fileio import check_output, write_json
    from tlora.generate import load_pipeline
    from tlora.errors import UsageError
    check_device(a.device)
    out = Path(a.out)
    check_output(str(out), "--out", folder=True)
    subjects = read_dataset(Path(a.dataset), a.subjects)
    for s in subjects:
        if a.image >= len(s.images):
            raise UsageError(f"--image {a.image}: subject {s.name} has {len(s.images)} images")
    emb = Embedder(a.clip, a.dino, a.device)
    pipe = load_pipeline(a.model, device=a.device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)   # as the official inference
    t0 = time.time()
    results: Dict[str, Dict[str, dict]] = {}
    for label, tl in methods(a.rank, a.min_rank).items():
        results[label] = {}
        for s in subjects:
            where = out / label / s.name
            weights = train_one(a, s, tl, where)
            rows = generate_one(a, pipe, weights, s, where)
            results[label][s.name] = score_one(emb, rows, s)
            write_json(results[label][s.name], where / "scores.json")
            print(f"{label} {s.name}: {json.dumps(results[label][s.name])} ({(time.time() - t0) / 60:.1f} min)", flush=True)
    lines = ["# DreamBooth protocol: LoRA vs T-LoRA", "",
             f"Command: `python -m benchmarks.dreambooth {argv_text}` ({(time.time() - t0) / 60:.1f} min); "
             f"model {a.model}; {len(subjects)} subjects; rank {a.rank}, T-LoRA Rmin {a.min_rank}; {a.steps} steps, "
             f"lr {a.lr:g}; {a.prompts} prompts × {a.images_per_prompt} images; Euler {a.inference_steps} steps, "
             f"guidance {a.guidance:g}; CLIP {a.clip}, DINO {a.dino}.", ""] + table(results)
    write_json(results, out / "scores.json")
    tmp = out / "table.md.partial"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "table.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
