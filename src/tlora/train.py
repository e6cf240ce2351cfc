"""``tlora train``: one-image personalisation with a T-LoRA, on accelerate.

Read :func:`train` top to bottom: load and check everything, cache latents and text embeddings, inject
the adapters, then the loop — per-sample timesteps → per-sample masks → loss → step — with validation
and checkpoints along the way.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import UsageError
from .trainconfig import OFFICIAL_FLAGS, TrainConfig, load_config


class TrainingError(RuntimeError):
    """The run had to stop (e.g. a non-finite loss); the message is one line."""


def _sample_timesteps(family, scheduler, b: int, gen: torch.Generator, T: int):
    """Per-sample training-scale timesteps t (B,), never one for the whole batch.
    DDPM families: integer t ~ U{0..T-1}. Flow families: σ from a uniform u, shifted like the
    scheduler (σ = s·u / (1 + (s−1)·u)); t = σ·T."""
    if family.objective == "ddpm":
        return torch.randint(0, T, (b,), generator=gen)
    u = torch.rand(b, generator=gen)
    s = float(getattr(scheduler.config, "shift", 1.0) or 1.0)
    sigma = s * u / (1 + (s - 1) * u)
    return sigma * T


def _noisy_and_target(family, scheduler, latents, noise, t, T, prediction_type):
    if family.objective == "ddpm":
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        return noisy, target
    sigma = (t / T).reshape(-1, 1, 1, 1).to(latents.dtype)
    return (1 - sigma) * latents + sigma * noise, noise - latents  # rectified flow: predict the velocity


def _digest(network) -> str:
    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig, on_grads: Optional[Callable] = None, on_step: Optional[Callable] = None) -> Path:
    """Train and return the path of the final weights file (``OUT/tlora.safetensors``).

    ``on_grads(step, network, timesteps)`` runs after the backward of a step, before the optimizer step
    (gradients in place); ``on_step(step, loss)`` after the step. Both are for logging and tests."""
    from accelerate.state import AcceleratorState
    try:
        return _train(cfg, on_grads, on_step)
    finally:  # accelerate keeps one global state; a second run in this process may use another precision
        AcceleratorState._reset_state()


def _train(cfg: TrainConfig, on_grads: Optional[Callable], on_step: Optional[Callable]) -> Path:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt
    from . import weights
    from .data import batch_indices, check_images, find_images, load_examples
    from .families import SHARED, TRAINING, denoiser_of, detect
    from .fileio import save_png, write_json
    from .generate import contact_sheet, load_pipeline, sample_images
    from .masking import attach, timestep_mask
    from .network import inject

    # -- 1. check everything before anything is written ------------------------------------------------
    cfg.validate()
    out = Path(cfg.output_dir)
    resume_from = None
    if cfg.resume:
        found = ckpt.list_checkpoints(out) if cfg.resume == "latest" else [Path(cfg.resume)]
        if cfg.resume != "latest" and not (found[0] / "state.json").is_file():
            raise UsageError(f"resume checkpoint not found: {cfg.resume}")
        resume_from = found[-1] if found else None
    check_images(find_images(cfg.data_dir, cfg.one_image))  # cheap checks before the model loads
    if cfg.class_data_dir:
        check_images(find_images(cfg.class_data_dir))
    pipe = load_pipeline(cfg.model)                       # float32 on the CPU; moved below
    den = denoiser_of(pipe)
    family = detect(den)
    if family.name not in TRAINING:
        raise UsageError(f"training {family.name} is not supported yet")
    spec = TRAINING[family.name]
    resolution = cfg.resolution or family.resolution
    examples = load_examples(cfg.data_dir, resolution, cfg.prompt(), cfg.one_image)
    class_examples = (load_examples(cfg.class_data_dir, resolution, f"a photo of {cfg.class_name}".strip())
                      if cfg.class_data_dir else [])
    tl = cfg.tlora
    if not tl.target_module and not tl.target_name and not tl.module_algo_map:
        tl = tl.replace(target_module=family.target_module)
    try:
        network = inject(den, tl, generator=torch.Generator().manual_seed(cfg.seed))
    except ValueError as e:
        raise UsageError(str(e)) from None
    network.family = family.name
    cfg.tlora = tl

    embedder = None
    if cfg.eval_clip_model:       # load the evaluation models now: a bad path stops the run before it writes
        from .evaluate import Embedder
        embedder = Embedder(cfg.eval_clip_model, cfg.eval_dino_model)

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=(cfg.device == "cpu"))
    device, main = accelerator.device, accelerator.is_main_process
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    T = network.config.num_train_timesteps
    train_sched = DDPMScheduler.from_config(pipe.scheduler.config) if family.objective == "ddpm" else pipe.scheduler
    prediction_type = cfg.prediction_type or getattr(train_sched.config, "prediction_type", "epsilon")

    # -- 2. cache latents and text embeddings once; then the VAE and text encoders leave the device ------
    text_modules = [m for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None]
    vae = pipe.vae.to(device)
    for m in text_modules:
        m.to(device)
    with torch.no_grad():
        def encode_images(exs):
            px = torch.stack([e.pixels for e in exs]).to(device)
            dist = vae.encode(px).latent_dist
            return dist.mean.float(), dist.std.float()
        lat_mean, lat_std = encode_images(examples)
        cond = spec.encode(pipe, [e.caption for e in examples], device)
        if class_examples:
            cls_mean, cls_std = encode_images(class_examples)
            cls_cond = spec.encode(pipe, [e.caption for e in class_examples], device)
    vae.to("cpu")
    for m in text_modules:
        m.to("cpu")

    # -- 3. the denoiser, the adapters, the optimizer -------------------------------------------------------
    den.requires_grad_(False)
    den.to(device, dtype=weight_dtype)                    # adapters stay float32 (TLoRAAdapter._apply)
    for p in network.parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        den.enable_gradient_checkpointing()
    den.train()
    params = network.trainable_parameters()
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    optimizer = opt_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                        eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    den, optimizer, lr_scheduler = accelerator.prepare(den, optimizer, lr_scheduler)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + accelerator.process_index)

    start = 0
    if resume_from is not None:
        start = ckpt.load_checkpoint(resume_from, network, optimizer, lr_scheduler, gen)

    # -- 4. outputs ------------------------------------------------------------------------------------------
    metadata = {"base_model": cfg.model, "family": family.name,
                "training": {"config": cfg.to_dict(), "resolution": resolution, "prediction_type": prediction_type}}
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "logs"))
    val_prompts = cfg.resolved_validation_prompts()
    val_guidance = cfg.validation_guidance if cfg.validation_guidance is not None else family.guidance

    best = {"value": None}

    def record_metrics(step: int, imgs: list) -> None:
        """IS / DINO-IS / TS of the validation images against the training images; keep the best weights."""
        from PIL import Image
        from .evaluate import scores
        refs = [Image.open(e.path).convert("RGB") for e in examples]
        rep = scores(embedder, [im for _, _, im in imgs], [p for p, _, _ in imgs], refs, cfg.placeholder)["overall"]
        for k in ("IS", "DINO_IS", "TS"):
            if rep[k] is not None:
                writer.add_scalar(f"eval/{k}", rep[k], step)
        value = rep["IS"] + rep["TS"] if cfg.best_metric == "IS+TS" else rep[cfg.best_metric]
        if best["value"] is None or value > best["value"]:
            best["value"] = value
            weights.save(network, out / "tlora-best.safetensors", metadata={**metadata, "training": {
                **metadata["training"], "step": step, "best_metric": cfg.best_metric, "scores": rep}})
            write_json({"step": step, "metric": cfg.best_metric, "value": value, "scores": rep,
                        "weights": "tlora-best.safetensors",
                        "checkpoint": f"checkpoint-{step}" if (out / f"checkpoint-{step}").is_dir() else None},
                       out / "best.json")

    def validate(step: int) -> None:
        if not main or cfg.num_validation_images == 0:
            return
        vae.to(device)
        for m in text_modules:
            m.to(device)
        den.eval()
        with torch.no_grad(), attach(pipe, network, multiplier=cfg.validation_multiplier):
            imgs = sample_images(pipe, val_prompts, cfg.num_validation_images, cfg.seed,
                                 cfg.validation_inference_steps, val_guidance, progress=False,
                                 height=resolution, width=resolution)
        den.train()
        vae.to("cpu")
        for m in text_modules:
            m.to("cpu")
        sheet = contact_sheet([im for _, _, im in imgs], cols=cfg.num_validation_images)
        save_png(sheet, out / "samples" / f"step-{step}.png")
        import numpy as np
        writer.add_image("validation", np.asarray(sheet), step, dataformats="HWC")
        if embedder is not None:
            record_metrics(step, imgs)

    def latents_of(mean, std, idx):
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)
        return spec.latents(vae, z)

    def cond_of(c, idx):
        return {k: (v if k in SHARED else v[idx]).to(device, weight_dtype) for k, v in c.items()}

    # -- 5. the loop -------------------------------------------------------------------------------------------
    accum, B = cfg.gradient_accumulation_steps, cfg.batch_size
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="train", disable=not main)
    t0 = time.time()
    last_ckpt = ckpt.list_checkpoints(out)[-1] if main and ckpt.list_checkpoints(out) else None
    for step in bar:
        total, ranks_sum = 0.0, 0.0
        for micro in range(accum):
            idx = batch_indices(step, micro, accum, B, len(examples), cfg.seed + accelerator.process_index)
            latents = latents_of(lat_mean, lat_std, idx)
            c = cond_of(cond, idx)
            if class_examples:
                cidx = batch_indices(step, micro, accum, B, len(class_examples), cfg.seed + 1)
                latents = torch.cat([latents, latents_of(cls_mean, cls_std, cidx)])
                cc = cond_of(cls_cond, cidx)
                c = {k: (v if k in SHARED else torch.cat([v, cc[k]])) for k, v in c.items()}
            n = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = _sample_timesteps(family, train_sched, n, gen, T)           # per sample, training scale
            noisy, target = _noisy_and_target(family, train_sched, latents, noise, t.to(device), T, prediction_type)
            t_model = (t / family.timestep_scale).to(device)
            sync = accelerator.no_sync(den) if micro < accum - 1 else nullcontext()
            with sync, timestep_mask(network, t):                       # masks hold through the backward
                pred = spec.call(den, noisy.to(weight_dtype), t_model, c).float()
                tgt = spec.to_layout(target).float()
                if class_examples:
                    loss = (F.mse_loss(pred[:B], tgt[:B])
                            + cfg.prior_loss_weight * F.mse_loss(pred[B:], tgt[B:]))
                else:
                    loss = F.mse_loss(pred, tgt)
                if cfg.ortho_reg_weight:
                    loss = loss + cfg.ortho_reg_weight * network.orthogonality_loss().to(loss.device)
                if not torch.isfinite(loss):
                    where = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written"
                    raise TrainingError(f"loss is {loss.item()} at step {step + 1}: stopped{where}")
                accelerator.backward(loss / accum)
            total += loss.item() / accum
            ranks = next(iter(network.schedules())).ranks(t.tolist())    # for the log only
            ranks_sum += sum(ranks) / len(ranks) / accum
        if on_grads is not None:
            on_grads(step + 1, network, t)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if main:
            bar.set_postfix(loss=f"{total:.4f}", it_s=f"{(done - start) / max(time.time() - t0, 1e-9):.2f}")
            writer.add_scalar("loss", total, done)
            writer.add_scalar("lr", lr_scheduler.get_last_lr()[0], done)
            writer.add_scalar("mean_active_rank", ranks_sum, done)
        if on_step is not None:
            on_step(done, total)
        if main and (done % cfg.checkpointing_steps == 0 or done == cfg.max_steps):
            last_ckpt = ckpt.save_checkpoint(out, done, network, optimizer, lr_scheduler, gen, metadata,
                                             cfg.checkpoints_total_limit)
        if cfg.validation_steps and done % cfg.validation_steps == 0 and done != cfg.max_steps:
            validate(done)
        accelerator.wait_for_everyone()

    # -- 6. final weights, resolved config, a last validation ---------------------------------------------------
    final = out / "tlora.safetensors"
    digests = accelerator.gather_for_metrics([_digest(network)], use_gather_object=True) \
        if accelerator.num_processes > 1 else [_digest(network)]
    if main:
        weights.save(network, final, metadata=metadata)
        write_json(cfg.to_dict(), out / "config.resolved.json")
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        write_json({"processes": accelerator.num_processes, "backend": backend, "digests": list(digests)},
                   out / "logs" / "ranks.json")
        validate(cfg.max_steps)
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


# -- CLI ------------------------------------------------------------------------------------------------------
def add_cli(sub) -> None:
    p = sub.add_parser("train", help="train a T-LoRA (tlora JSON, SimpleTuner config.json, or official flags)",
                       description="Train a T-LoRA. Give --config FILE (tlora or SimpleTuner JSON) with optional "
                                   "--set key=value, or the official repository's flags.")
    p.add_argument("--config", help="tlora JSON or SimpleTuner config.json (with lycoris_config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (nested: tlora.rank=16); repeatable")
    p.add_argument("--resume", help="latest | path to a checkpoint-N folder")
    p.add_argument("--device", help="cpu to force the CPU")
    off = p.add_argument_group("official T-LoRA flags (ControlGenAI/T-LoRA train.py)")
    for flag, typ in OFFICIAL_FLAGS.items():
        off.add_argument(f"--{flag}", type=typ, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    import sys

    official = {k: getattr(a, k) for k in OFFICIAL_FLAGS if getattr(a, k) is not None}
    if official and a.config:
        raise UsageError("give either --config or the official flags, not both")
    sets = list(a.set) + ([f"resume={json.dumps(a.resume)}"] if a.resume else []) + \
        ([f"device={json.dumps(a.device)}"] if a.device else [])
    cfg = load_config(a.config, sets, official or None)
    try:
        final = train(cfg)
    except TrainingError as e:
        print(f"tlora train: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {final}")
    return 0
