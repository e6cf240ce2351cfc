"""Model families: every per-family difference lives in this one table.

``timestep_scale`` turns what the pipeline passes to its denoiser into the training scale 0..T
(diffusers 0.42, measured; see ../shared/REFERENCE.md §4):

| family | denoiser                 | timestep argument                      | scale |
|--------|--------------------------|----------------------------------------|-------|
| sd15   | UNet2DConditionModel     | 2nd positional, 0-d int or float t     | 1     |
| sdxl   | UNet2DConditionModel (+text_time) | same                          | 1     |
| sd3    | SD3Transformer2DModel    | kwarg, σ·1000, shape (B,)              | 1     |
| flux   | FluxTransformer2DModel   | kwarg, σ in (0, 1], shape (B,)         | 1000  |
| flux2  | Flux2Transformer2DModel  | kwarg, σ in (0, 1], shape (B,)         | 1000  |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    denoiser_class: str
    denoiser_attr: str            # pipe.<attr>
    timestep_scale: float         # denoiser timestep × scale = training-scale t
    objective: str                # "ddpm" (ε / v prediction) or "flow" (rectified flow, t = σ·1000)
    target_module: tuple          # default targets (the official recipe: attention only)
    guidance: float               # default guidance scale for generation
    resolution: int               # native resolution

    @property
    def timestep_convention(self) -> str:
        return "t" if self.timestep_scale == 1 else f"sigma*{self.timestep_scale:g}"


FAMILIES = {f.name: f for f in (
    Family("sd15", "UNet2DConditionModel", "unet", 1.0, "ddpm", ("Attention",), 7.5, 512),
    Family("sdxl", "UNet2DConditionModel", "unet", 1.0, "ddpm", ("Attention",), 5.0, 1024),
    Family("sd3", "SD3Transformer2DModel", "transformer", 1.0, "flow", ("Attention",), 7.0, 1024),
    Family("flux", "FluxTransformer2DModel", "transformer", 1000.0, "flow", ("FluxAttention",), 3.5, 1024),
    Family("flux2", "Flux2Transformer2DModel", "transformer", 1000.0, "flow",
           ("Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"), 4.0, 1024),
)}


def detect(denoiser: nn.Module) -> Family:
    """The family of a denoiser, from its class (and for UNets, its added conditioning)."""
    cls = type(denoiser).__name__
    if cls == "UNet2DConditionModel":
        cfg = getattr(denoiser, "config", {})
        return FAMILIES["sdxl" if getattr(cfg, "addition_embed_type", None) == "text_time" else "sd15"]
    for fam in FAMILIES.values():
        if fam.denoiser_class == cls:
            return fam
    known = sorted({f.denoiser_class for f in FAMILIES.values()})
    raise ValueError(f"unknown denoiser class {cls}; tlora knows {known}")


def denoiser_of(pipe) -> nn.Module:
    """``pipe.unet`` or ``pipe.transformer`` (or the module itself when given a denoiser)."""
    if isinstance(pipe, nn.Module) and not hasattr(pipe, "components"):
        return pipe
    for attr in ("unet", "transformer"):
        m: Optional[nn.Module] = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' to attach T-LoRA to")
