"""The official T-LoRA repository's run folder (ControlGenAI/T-LoRA): what its ``train.py`` writes and its
``inference.py`` reads, so the official workflow runs on tlora end to end.

Run folder (``output_dir`` in the hparams)::

    logs/hparams.yml                                   the run's flags (yaml), output_dir = this folder
    checkpoint-N/pytorch_lora_weights.safetensors      attention-processor keys (formats.to_official)

Inference (``tlora generate --config_path RUN/logs/hparams.yml --checkpoint_idx N --prompts "a {0} ...#..."``)
writes, as the official script does::

    <checkpoint>/samples/ns<steps>_gs<guidance>/version_<v>/<prompt, {0} → placeholder token>/<i>.png

with ``{0}`` → "placeholder class" in the prompt the model sees; batch ``b`` of a prompt is seeded with the
official ``get_seed``: the sum of the prompt's character codes + b + seed. A prompt whose folder already holds
``num_images_per_prompt`` files is skipped unless ``replace``. Differences from the official script: the
pipeline's own VAE (it loads madebyollin/sdxl-vae-fp16-fix), a CPU generator unless the device is CUDA, and a
prompt folder never holds more than ``num_images_per_prompt`` images (the official one can hold a last partial
batch's extra images, and then never counts as done).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import yaml

from .devices import check_device
from .errors import UsageError
from .fileio import atomic_write, check_output, read_mapping, safe_name, save_png
from .formats import check_hparams, read_state, to_official
from .weights import WeightsFileError, atomic_save_file, network_from_state

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINER_CLASSES = ("sdxl_tlora", "sdxl_lora")


# -- what a training run writes --------------------------------------------------------------------------------
def write_hparams(flags: dict, run_dir: Path) -> Path:
    """``run_dir/logs/hparams.yml``: the official flags of the run, ``output_dir`` = the run folder (absolute)."""
    hp = dict(flags, output_dir=str(Path(run_dir).resolve()), logging_dir=str((Path(run_dir) / "logs").resolve()))
    return atomic_write(Path(run_dir) / "logs" / "hparams.yml",
                        lambda tmp: Path(tmp).write_text(yaml.safe_dump(hp, sort_keys=True)), suffix=".yml")


def write_weights(tensors: dict, header: dict, checkpoint_dir: Path) -> Path:
    """``checkpoint_dir/pytorch_lora_weights.safetensors`` in the official layout."""
    out, meta = to_official(tensors, header)
    path = Path(checkpoint_dir) / WEIGHTS_NAME
    atomic_save_file(out, path, meta)
    return path


# -- what inference reads ----------------------------------------------------------------------------------------
def get_seed(prompt: str, batch: int, seed: int) -> int:
    """The official seed of batch ``batch`` of ``prompt``: sum of character codes + batch + seed."""
    return sum(ord(c) for c in prompt) + batch + seed


def read_hparams(path: str) -> dict:
    """The run's ``hparams.yml``, its values of the types the official inference relies on."""
    hp = read_mapping(path, "--config_path", UsageError, kind="yaml")
    try:
        check_hparams(hp, need=("pretrained_model_name_or_path", "output_dir", "trainer_class", "placeholder_token",
                                "class_name", "lora_rank"))
    except ValueError as e:
        raise UsageError(f"--config_path {path}: {e}") from None
    if hp["trainer_class"] not in TRAINER_CLASSES:
        raise UsageError(f"--config_path {path}: trainer_class {hp['trainer_class']!r} is not one of {TRAINER_CLASSES}")
    return hp


@dataclass
class InferenceSettings:
    """The official ``inference.py`` flags (same names, same defaults), plus tlora's device and dtype."""
    config_path: str
    prompts: str
    checkpoint_idx: Optional[str] = None
    num_images_per_prompt: int = 5
    batch_size: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    replace_inference_output: bool = False
    version: int = 0
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def validate(self) -> List[str]:
        """The '#'-separated prompts, after every flag is checked."""
        for name in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.guidance_scale):
            raise UsageError(f"--guidance_scale must be a finite number, got {self.guidance_scale}")
        if self.version < 0:
            raise UsageError(f"--version must be >= 0, got {self.version}")
        if not 0 <= self.seed < 2 ** 32:
            raise UsageError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        check_device(self.device)
        prompts = self.prompts.split("#")
        for p in prompts:
            try:
                p.format("x")
            except (IndexError, KeyError, ValueError, AttributeError):
                raise UsageError(f"--prompts: {p!r} is not a prompt template ('{{0}}' is the only field)") from None
            name = p.format("x")
            if not p.strip() or "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > 255:
                raise UsageError(f"--prompts: {p!r} cannot name a folder (empty, '/', or too long); "
                                 "separate prompts with #")
        return prompts


def checkpoint_dir(hp: dict, config_path: str, idx: Optional[str]) -> Path:
    """The folder the official script reads: ``output_dir`` (or ``output_dir/checkpoint-<idx>``); when the run
    folder was moved, the same place beside ``logs/hparams.yml``."""
    sub = f"checkpoint-{idx}" if idx is not None else ""
    for root in (Path(hp["output_dir"]), Path(config_path).resolve().parent.parent):
        if (root / sub / WEIGHTS_NAME).is_file():
            return root / sub
    raise UsageError(f"no {WEIGHTS_NAME} in {Path(hp['output_dir']) / sub}"
                     + (" (is --checkpoint_idx right?)" if idx is not None else " (give --checkpoint_idx N)"))


def _network(pipe, weights: Path, hp: dict):
    """The checkpoint injected into the pipeline's UNet; ``sdxl_lora`` runs are plain LoRA (all ranks at every
    step), ``sdxl_tlora`` runs are masked with the hparams' schedule (min_rank 1, exponent 1 when absent, as in
    the official inferencer)."""
    plain = hp["trainer_class"] == "sdxl_lora"
    min_rank = hp["lora_rank"] if plain else hp.get("min_rank", 1)
    try:
        tensors, header = read_state(weights, min_rank=min_rank, exponent=float(hp.get("alpha_rank_scale", 1.0)),
                                     hparams=None)
        return network_from_state(pipe.unet, tensors, header, str(weights))
    except (ValueError, WeightsFileError) as e:
        raise UsageError(str(e)) from None


def run_inference(s: InferenceSettings) -> Path:
    """Generate every prompt into the official sample folders; returns ``.../version_<v>``."""
    from diffusers import EulerDiscreteScheduler
    from .generate import load_pipeline
    from .masking import attach
    prompts = s.validate()
    hp = read_hparams(s.config_path)
    ckpt = checkpoint_dir(hp, s.config_path, s.checkpoint_idx)
    root = ckpt / "samples" / f"ns{s.num_inference_steps}_gs{s.guidance_scale}" / f"version_{s.version}"
    check_output(root, "sample folder", folder=True, inputs=(s.config_path, ckpt / WEIGHTS_NAME))
    folders = {p: root / safe_name(p.format(hp["placeholder_token"]), "--prompts") for p in prompts}
    todo = [p for p in prompts if s.replace_inference_output or not _done(folders[p], s.num_images_per_prompt)]
    if not todo:
        return root
    pipe = load_pipeline(hp["pretrained_model_name_or_path"], s.dtype, s.device)
    if not hasattr(pipe, "unet"):
        raise UsageError(f"{hp['pretrained_model_name_or_path']} has no UNet: official runs are SDXL (UNet) runs")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)   # the official inferencer's scheduler
    with attach(pipe, _network(pipe, ckpt / WEIGHTS_NAME, hp)):
        for p in todo:
            images = _generate(pipe, p, hp, s)
            for i, im in enumerate(images):
                save_png(im, folders[p] / f"{i}.png")
    return root


def _done(folder: Path, n: int) -> bool:
    return folder.is_dir() and len(os.listdir(folder)) == n


def _generate(pipe, prompt: str, hp: dict, s: InferenceSettings) -> list:
    subject = f"{hp['placeholder_token']} {hp['class_name']}"
    images = []
    for b in range(math.ceil(s.num_images_per_prompt / s.batch_size)):
        g = torch.Generator(device="cuda" if str(s.device).startswith("cuda") else "cpu")
        g.manual_seed(get_seed(prompt, b, s.seed))
        images += pipe(prompt=prompt.format(subject), generator=g, num_images_per_prompt=s.batch_size,
                       num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale).images
    return images[:s.num_images_per_prompt]
