"""Model families: every per-family difference lives in this one table.

``timestep_scale`` turns what the pipeline passes to its denoiser into the training scale 0..T
(diffusers 0.42, measured):

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
from typing import Callable, Optional

import torch
import torch.nn as nn


class DDPMObjective:
    """ε / v prediction on a DDPM noise schedule; timesteps are integers t ~ U{0..T-1}."""
    name = "ddpm"

    def scheduler(self, pipe_scheduler):
        from diffusers import DDPMScheduler   # diffusers: only training needs it; `import tlora` stays light
        return DDPMScheduler.from_config(pipe_scheduler.config)

    def sample_timesteps(self, scheduler, b: int, gen: torch.Generator, T: int) -> torch.Tensor:
        return torch.randint(0, T, (b,), generator=gen)

    def noisy_and_target(self, scheduler, latents, noise, t, T: int, prediction_type: str):
        noisy = scheduler.add_noise(latents, noise, t)
        return noisy, noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)


class FlowObjective:
    """Rectified flow: x_σ = (1 − σ)·x + σ·ε, predict the velocity ε − x; σ from a uniform u, shifted like the
    pipeline's scheduler (σ = s·u / (1 + (s−1)·u)); t = σ·T."""
    name = "flow"

    def scheduler(self, pipe_scheduler):
        return pipe_scheduler

    def sample_timesteps(self, scheduler, b: int, gen: torch.Generator, T: int) -> torch.Tensor:
        u = torch.rand(b, generator=gen)
        s = float(getattr(scheduler.config, "shift", 1.0) or 1.0)
        return s * u / (1 + (s - 1) * u) * T

    def noisy_and_target(self, scheduler, latents, noise, t, T: int, prediction_type: str):
        sigma = (t / T).reshape(-1, 1, 1, 1).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise, noise - latents


OBJECTIVES = {o.name: o for o in (DDPMObjective(), FlowObjective())}


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
    kohya_prefix: str = "lora_unet_"   # kohya LoRA key prefix (ComfyUI / A1111 / Forge)
    sgm_names: bool = False            # kohya keys in SGM block names (input_blocks.4.1…) instead of diffusers paths
    kohya_version: str = ""            # kohya's ss_base_model_version (what A1111, Forge and Civitai read)

    @property
    def training(self):
        """The training objective's type (:class:`DDPMObjective` or :class:`FlowObjective`)."""
        return OBJECTIVES[self.objective]

    @property
    def timestep_convention(self) -> str:
        return "t" if self.timestep_scale == 1 else f"sigma*{self.timestep_scale:g}"


FAMILIES = {f.name: f for f in (
    Family("sd15", "UNet2DConditionModel", "unet", 1.0, "ddpm", ("Attention",), 7.5, 512, kohya_version="sd_v1"),
    Family("sdxl", "UNet2DConditionModel", "unet", 1.0, "ddpm", ("Attention",), 5.0, 1024, sgm_names=True,
           kohya_version="sdxl_base_v1-0"),
    Family("sd3", "SD3Transformer2DModel", "transformer", 1.0, "flow", ("Attention",), 7.0, 1024, "lora_transformer_",
           kohya_version="sd3"),
    Family("flux", "FluxTransformer2DModel", "transformer", 1000.0, "flow", ("FluxAttention",), 3.5, 1024,
           "lora_transformer_", kohya_version="flux1"),
    Family("flux2", "Flux2Transformer2DModel", "transformer", 1000.0, "flow",
           ("Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"), 4.0, 1024, "lora_transformer_",
           kohya_version="flux2"),
)}


def detect(denoiser: nn.Module) -> Family:
    """The family of a denoiser, from its class (and for UNets, its added conditioning)."""
    cfg = getattr(denoiser, "config", {})
    return detect_config({"_class_name": type(denoiser).__name__,
                          "addition_embed_type": getattr(cfg, "addition_embed_type", None)})


def detect_config(config: dict) -> Family:
    """The family of a denoiser's diffusers config (``_class_name``; for UNets, ``addition_embed_type``), read
    without building the model."""
    cls = config.get("_class_name")
    if cls == "UNet2DConditionModel":
        return FAMILIES["sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"]
    for fam in FAMILIES.values():
        if fam.denoiser_class == cls:
            return fam
    known = sorted({f.denoiser_class for f in FAMILIES.values()})
    raise ValueError(f"unknown denoiser class {cls}; tlora knows {known}")


DENOISER_ATTRS = ("unet", "transformer")     # where a diffusers pipeline keeps its denoiser


def denoiser_of(pipe) -> nn.Module:
    """``pipe.unet`` or ``pipe.transformer`` (or the module itself when given a denoiser)."""
    if isinstance(pipe, nn.Module) and not hasattr(pipe, "components"):
        return pipe
    for attr in DENOISER_ATTRS:
        m: Optional[nn.Module] = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' to attach T-LoRA to")


# -- training-time differences: text conditioning, the denoiser call, latent packing --------------------
# Each family's pipeline encodes its own prompts (``pipe.encode_prompt``), so nothing of the text stack is
# re-implemented here. Conditioning is a dict of tensors with a batch dimension, except keys in SHARED.
SHARED = ("txt_ids",)


def _encode_sd15(pipe, prompts, device):
    pe, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": pe}


def _encode_sdxl(pipe, prompts, device):
    pe, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    return {"encoder_hidden_states": pe, "text_embeds": pooled}


def _encode_sd3(pipe, prompts, device):
    pe, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    return {"encoder_hidden_states": pe, "pooled_projections": pooled}


def _encode_flux(pipe, prompts, device):
    pe, pooled, txt_ids = pipe.encode_prompt(prompts, prompts, device=device, num_images_per_prompt=1)
    return {"encoder_hidden_states": pe, "pooled_projections": pooled, "txt_ids": txt_ids}


def _call_unet(den, x, t, cond):
    added = None
    if "text_embeds" in cond:  # SDXL: pooled text + (orig size, crop, target size) of a centre-cropped square
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
    return den(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


def _call_sd3(den, x, t, cond):
    return den(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
               pooled_projections=cond["pooled_projections"]).sample


def _pack_flux(x):
    """(B, C, H, W) latents → (B, H/2·W/2, 4C) tokens, as FluxPipeline packs them."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _call_flux(den, x, t, cond):
    from diffusers import FluxPipeline   # diffusers pipelines: only training needs them; `import tlora` stays light
    b, c, h, w = x.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    guidance = (torch.full((b,), 1.0, device=x.device, dtype=torch.float32)
                if getattr(den.config, "guidance_embeds", False) else None)
    return den(hidden_states=_pack_flux(x), timestep=t, guidance=guidance,
               pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
               txt_ids=cond["txt_ids"], img_ids=img_ids).sample


def _encode_flux2(pipe, prompts, device):
    pe, txt_ids = pipe.encode_prompt(prompts, device=device)
    return {"encoder_hidden_states": pe, "txt_ids": txt_ids}


def _flux2_pipeline_cls():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline   # as above
    return Flux2KleinPipeline


def _pack_flux2(x):
    """(B, C, H, W) patchified latents → (B, H·W, C) tokens (Flux2KleinPipeline._pack_latents)."""
    return _flux2_pipeline_cls()._pack_latents(x)


def _call_flux2(den, x, t, cond):
    img_ids = _flux2_pipeline_cls()._prepare_latent_ids(x).to(x.device)
    return den(hidden_states=_pack_flux2(x), timestep=t, guidance=None, encoder_hidden_states=cond["encoder_hidden_states"],
               txt_ids=cond["txt_ids"], img_ids=img_ids).sample


def _latents_scaled(vae, z):
    """VAE latent → denoiser space: (z − shift_factor) · scaling_factor."""
    return (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def _latents_flux2(vae, z):
    """Flux.2: 2×2 patchify, then the VAE's batch-norm statistics (as Flux2KleinPipeline encodes images)."""
    z = _flux2_pipeline_cls()._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
    return (z - mean) / std


def _identity(x):
    return x


@dataclass(frozen=True)
class TrainingSpec:
    encode: Callable         # (pipe, prompts, device) → conditioning dict
    call: Callable           # (denoiser, noisy latents, model timestep, conditioning) → prediction
    to_layout: Callable      # latent-shaped target → the prediction's layout
    latents: Callable        # (vae, raw VAE latents) → denoiser latent space


TRAINING = {
    "sd15": TrainingSpec(_encode_sd15, _call_unet, _identity, _latents_scaled),
    "sdxl": TrainingSpec(_encode_sdxl, _call_unet, _identity, _latents_scaled),
    "sd3": TrainingSpec(_encode_sd3, _call_sd3, _identity, _latents_scaled),
    "flux": TrainingSpec(_encode_flux, _call_flux, _pack_flux, _latents_scaled),
    "flux2": TrainingSpec(_encode_flux2, _call_flux2, _pack_flux2, _latents_flux2),
}
