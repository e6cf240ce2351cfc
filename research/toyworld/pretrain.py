"""Pretrain the toy world's base model: a stock diffusers StableDiffusionPipeline, small enough to ship.

    python -m research.toyworld.pretrain --out DIR --vae-steps 1225 --steps 3100 --seed 0 --threads 2   # the shipped model
    python -m research.toyworld.pretrain --out DIR --minutes 22     # a time budget instead of step counts
    python -m research.toyworld.pretrain --out /tmp/toyworld --reproduce src/tlora/assets/toyworld   # same seed, same steps
    python -m research.toyworld.pretrain --evaluate src/tlora/assets/toyworld      # caption-following figure

1. a BPE tokenizer over the world's words (one token per word; "sks" is in the vocabulary but never in a
   caption, as a rare token is in a real model), as a CLIPTokenizer;
2. a small AutoencoderKL (32×32×3 ↔ 8×8×4), trained first on renders of every shape;
3. a UNet2DConditionModel (blocks 32/64/64, cross-attention 128, text added to the time embedding) and a
   2-layer CLIPTextModel, trained together with v-prediction on captions of the pretraining shapes only
   (10 % of captions say "shape" instead of the shape's name; 10 % are empty, for guidance);
4. the pipeline saved with ``save_pretrained`` (DDIM scheduler, v-prediction, T = 1000).

``caption_following(pipe)`` measures what the issue asks: the share of generated images whose background
colour and position, read from the pixels, match the caption.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tlora.errors import OneLineParser
from tlora.generate import load_pipeline
from tlora.toyworld.world import CLASS_WORD, SHAPES, FlatWorld

from .textured import TexturedWorld

WORLDS = {w.name: w for w in (FlatWorld, TexturedWorld)}


def build_tokenizer(world=FlatWorld):
    """A CLIPTokenizer whose BPE merges (trained with the tokenizers library) make every world word one token."""
    words = sorted({w.strip(",") for w in world.vocabulary()}) + [","]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    bpe.train_from_iterator([" ".join(words)] * 50, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    # The trainer numbers tokens in hash-map order, which changes from call to call; number them in a fixed order
    # so the text encoder's embedding rows, and so a whole pretraining run, depend only on the seed.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    order = sorted(model["vocab"], key=lambda t: (specials.index(t) if t in specials else 2, len(t), t))
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(order)}, merges=merges, model_max_length=77)


def build_models(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                        norm_num_groups=16, sample_size=32)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                                        eos_token_id=eos, pad_token_id=eos))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64, 64),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16,
                                addition_embed_type="text", addition_embed_type_num_heads=4)
    return vae, text, unet


def to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae, seconds: float, batch: int = 32, seed: int = 0, log=print, steps: int = None, world=FlatWorld) -> int:
    """Train for ``steps`` steps, or, when None, for ``seconds``; returns the number of steps taken."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    t0, step = time.time(), 0
    while (step < steps) if steps is not None else (time.time() - t0 < seconds):
        x = to_tensor([world.render(world.sample_scene(rng, shapes=SHAPES + world.new_shapes)) for _ in range(batch)])
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f} ({(time.time() - t0) / 60:.1f} min)")
    vae.eval()
    return step


def dataset(n: int, seed: int, world=FlatWorld):
    """n pretraining scenes (new-concept shapes excluded) with their captions."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    caps = [s.caption(CLASS_WORD if rng.random() < 0.1 else None) for s in scenes]
    return scenes, caps


def train_denoiser(vae, text, unet, tokenizer, seconds: float, batch: int = 64, seed: int = 0, n_images: int = 16000,
                   log=print, steps: int = None, high_noise: float = 0.8, noisy_from: int = 800,
                   eval_every: int = 0, world=FlatWorld) -> int:
    """Train for ``steps`` steps (cosine decay over them), or, when None, for ``seconds`` (cosine decay over
    the number of steps estimated from the first 20).

    ``high_noise``: share of each batch whose timestep is drawn from [``noisy_from``, 1000) instead of
    [0, 1000). Where the object goes is decided at those steps (at lower t it is already visible in the
    noisy latent, so the caption is not needed to place it). Logged runs (README): uniform timesteps left
    position near chance in 3 of 4; 0.5 from 500 and 0.8 from 500 learnt it in 1 of 3 and 1 of 2; 0.8 from
    800 (the default, the shipped model's recipe, 2 threads) learnt it on all 3 seeds run (100, 96, 100 %).
    ``eval_every``: log the caption-following figure (40 captions) every that many steps (0 = never)."""
    scenes, caps = dataset(n_images, seed, world)
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_tensor([world.render(s) for s in scenes[i:i + 512]])).latent_dist.mean
                         for i in range(0, n_images, 512)])
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    lat = lat * scaling
    n_tok = world.max_length
    ids = tokenizer(caps, padding="max_length", max_length=n_tok, truncation=True, return_tensors="pt")["input_ids"]
    empty = tokenizer([""], padding="max_length", max_length=n_tok, return_tensors="pt")["input_ids"][0]
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="v_prediction", clip_sample=False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    est_steps = steps
    unet.train()
    text.train()
    t0, step = time.time(), 0
    while True:
        elapsed = time.time() - t0
        if (steps is not None and step >= steps) or (steps is None and elapsed >= seconds):
            break
        if step == 20 and steps is None:
            est_steps = int(seconds / (elapsed / 20))
        # cosine decay over the estimated number of steps in the time budget
        lr = 1e-3 * (0.5 * (1 + math.cos(math.pi * min(step / est_steps, 1.0))) if est_steps else 1.0)
        for group in opt.param_groups:
            group["lr"] = max(lr, 2e-5)
        idx = torch.randint(0, n_images, (batch,), generator=g)
        x = lat[idx]
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=g) < 0.1] = empty         # caption dropout, for guidance
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        if high_noise:
            from_noisy_end = torch.rand(batch, generator=g) < high_noise
            t = torch.where(from_noisy_end, noisy_from + t * (1000 - noisy_from) // 1000, t)
        noisy = sched.add_noise(x, noise, t)
        target = sched.get_velocity(x, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text(tok)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"denoiser step {step} loss {loss.item():.4f} lr {lr:.2e} ({elapsed / 60:.1f} min)")
        if eval_every and step % eval_every == 0:
            unet.eval()
            text.eval()
            log(f"denoiser step {step} caption following {json.dumps(caption_following(assemble(vae, text, unet, tokenizer), 40, world=world))}")
            unet.train()
            text.train()
    unet.eval()
    text.eval()
    return step


def assemble(vae, text, unet, tokenizer):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def caption_following(pipe, n: int = 100, seed: int = 1234, steps: int = 25, guidance: float = 3.0,
                      shapes=SHAPES, batch: int = 25, world=FlatWorld) -> dict:
    """Share of images showing each fact of their caption, read from the pixels (``world.followed``: for the
    flat world background colour / position / size / object colour; ``prompt`` = every fact a test prompt
    changes), over n random captions of the given shapes."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, shapes=shapes) for _ in range(n)]
    hits = {}
    for i in range(0, n, batch):
        chunk = scenes[i:i + batch]
        images = pipe([s.caption() for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed + i)).images
        for s, im in zip(chunk, images):
            for k, hit in world.followed(s, world.measure(im)).items():
                hits[k] = hits.get(k, 0) + int(hit)
    return {k: v / n for k, v in hits.items()}


def world_of(model) -> type:
    """The world a toy-world model was pretrained on (its toyworld.json; models from before worlds: flat)."""
    try:
        name = json.loads((Path(model) / "toyworld.json").read_text()).get("world", "flat")
    except (OSError, ValueError):
        return FlatWorld
    if name not in WORLDS:
        raise ValueError(f"{model}: toyworld.json names an unknown world {name!r} (known: {sorted(WORLDS)})")
    return WORLDS[name]


def _parser() -> OneLineParser:
    ap = OneLineParser(prog="python -m research.toyworld.pretrain",
                       description="pretrain the toy world's base pipeline")
    ap.add_argument("--out", help="folder for the trained pipeline")
    ap.add_argument("--minutes", type=float, default=22.0,
                    help="total time budget in minutes when no step counts are given (default 22)")
    ap.add_argument("--vae-share", type=float, default=0.32,
                    help="share of the time budget for the VAE (default 0.32)")
    ap.add_argument("--vae-steps", type=int, help="VAE steps instead of its time budget")
    ap.add_argument("--steps", type=int, help="denoiser steps instead of the time budget (cosine decay over them)")
    ap.add_argument("--reproduce", metavar="MODEL", help="take the seed, step counts, --high-noise, --noisy-from and "
                                                          "thread count from MODEL/toyworld.json (e.g. the shipped "
                                                          "model)")
    ap.add_argument("--evaluate", metavar="MODEL", help="only print the caption-following figure of a pipeline")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the scenes, the weights and the noise (default 0)")
    ap.add_argument("--images", type=int, default=16000,
                    help="pretraining scenes (captioned, encoded once; default 16000)")
    ap.add_argument("--eval", type=int, default=100, help="captions for the caption-following figure (default 100)")
    ap.add_argument("--high-noise", type=float, default=0.8,
                    help="share of timesteps drawn from [--noisy-from, 1000) (default 0.8; 0 = uniform, which "
                         "left position at chance in 3 of 4 logged runs)")
    ap.add_argument("--noisy-from", type=int, default=800,
                    help="the --high-noise share is drawn from [N, 1000) (default 800)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="log caption following on 40 captions every N denoiser steps (default 0: never)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--world", choices=sorted(WORLDS), default="flat",
                    help="flat: one object on a plain background (the shipped model); textured: patterned backgrounds and a second object (default flat)")
    return ap


def _checked_args(ap: OneLineParser, argv):
    """Parsed arguments, --reproduce applied, every number checked (one line and exit 2 on the first bad one)."""
    a = ap.parse_args(argv)
    if a.evaluate:
        return a
    if not a.out:
        ap.error("--out is required unless --evaluate is given")
    out = Path(a.out)
    if out.exists() and not (out / "toyworld.json").is_file() and any(out.iterdir()):
        ap.error(f"--out {out} is a non-empty folder that is not a toy-world model; give a new folder")
    if a.reproduce:
        try:
            shipped = json.loads((Path(a.reproduce) / "toyworld.json").read_text())
            a.seed, a.vae_steps, a.steps = shipped["seed"], shipped["vae_steps"], shipped["denoiser_steps"]
            a.images = shipped.get("images", a.images)
            a.high_noise = shipped.get("high_noise", 0.0)
            a.noisy_from = shipped.get("noisy_from", 500)
            a.threads = a.threads or shipped.get("threads")    # float sums depend on the thread count
            a.world = shipped.get("world", "flat")
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--reproduce {a.reproduce}: no readable toyworld.json with seed/vae_steps/denoiser_steps ({e})")
    for bad, rule in [(not 0.0 <= a.high_noise <= 1.0, f"--high-noise {a.high_noise} must be in [0, 1]"),
                      (not 0 <= a.noisy_from < 1000, f"--noisy-from {a.noisy_from} must be in [0, 1000)"),
                      (a.eval_every < 0, f"--eval-every {a.eval_every} must be at least 0"),
                      (a.threads is not None and a.threads < 1, f"--threads {a.threads} must be at least 1"),
                      (a.steps is not None and a.steps < 1, f"--steps {a.steps} must be at least 1"),
                      (a.vae_steps is not None and a.vae_steps < 1, f"--vae-steps {a.vae_steps} must be at least 1"),
                      (a.eval < 0, f"--eval {a.eval} must be at least 0"),
                      (a.images < 1, f"--images {a.images} must be at least 1"),
                      (not a.minutes > 0, f"--minutes {a.minutes} must be more than 0"),
                      (not 0 < a.vae_share < 1, f"--vae-share {a.vae_share} must be between 0 and 1")]:
        if bad:
            ap.error(rule)
    return a


def main(argv=None) -> int:
    a = _checked_args(_parser(), argv)
    warnings.filterwarnings("ignore")
    if a.evaluate:
        print(json.dumps(caption_following(load_pipeline(a.evaluate), a.eval or 100, world=world_of(a.evaluate)),
                         indent=1))
        return 0
    out = Path(a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    world = WORLDS[a.world]
    tok = build_tokenizer(world)
    vae, text, unet = build_models(tok, a.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731
    vae_steps = train_vae(vae, a.minutes * 60 * a.vae_share, seed=a.seed, log=log, steps=a.vae_steps,
                          world=world)
    steps = train_denoiser(vae, text, unet, tok, a.minutes * 60 * (1 - a.vae_share), seed=a.seed, log=log,
                           steps=a.steps, n_images=a.images, high_noise=a.high_noise, noisy_from=a.noisy_from,
                           eval_every=a.eval_every, world=world)
    pipe = assemble(vae, text, unet, tok)
    score = caption_following(pipe, a.eval, world=world) if a.eval else {}
    budget = a.minutes if a.vae_steps is None or a.steps is None else None    # only when a budget set steps
    info = {"world": a.world, "seed": a.seed, "minutes": budget, "images": a.images, "high_noise": a.high_noise,
            "noisy_from": a.noisy_from, "vae_steps": vae_steps, "denoiser_steps": steps,
            "train_seconds": round(time.time() - t0), "threads": torch.get_num_threads(),
            "caption_following": score, "torch": torch.__version__}
    # write next to the target and rename, so a killed run never leaves a half-saved pipeline behind
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    (partial / "toyworld.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
