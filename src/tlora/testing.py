"""Test support (as ``transformers.testing_utils``): tiny, randomly initialised diffusers pipelines built offline
from configs. Not for training or generating anything real.

They run a full stock pipeline call in well under a second on a CPU. The tests and benchmarks use them in
place of real checkpoints, which this project never downloads; every loader in tlora is the same
``from_pretrained`` that real models go through (save a tiny pipeline, load it by path).

    pipe = build_pipeline("sdxl")                 # sd15 | sdxl | sd3 | flux | flux2 (Klein)
    denoiser = build_denoiser("flux2")            # the denoiser alone
"""
from __future__ import annotations

import string

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, DDPMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                          CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Dinov2Config, Dinov2Model,
                          Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM, T5Config, T5EncoderModel, T5TokenizerFast)

from .families import FAMILIES as FAMILY_TABLE
from .families import denoiser_of

FAMILIES = tuple(FAMILY_TABLE)                       # every family of the table has a tiny pipeline


def clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges: each character is one token)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def clip_text(vocab_size, hidden=32, projection=None, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_text(vocab_size, d_model=32, seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels=4, **kw):
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=32, **kw).eval()


def unet(sdxl=False, cross_attention_dim=32, **overrides):
    torch.manual_seed(0)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 1))
    cfg = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8, **extra)
    return UNet2DConditionModel(**{**cfg, **overrides}).eval()


def qwen_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) and a plain chat template."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def flux2_transformer(joint_attention_dim=48):
    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
                                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()


def build_denoiser(family: str):
    """The denoiser alone."""
    pipe = build_pipeline(family)
    return denoiser_of(pipe)


def _sd15():
    tok = clip_tokenizer()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae(), text_encoder=clip_text(len(tok)), tokenizer=tok, unet=unet(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sdxl():
    tok = clip_tokenizer()
    n = len(tok)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_text(n, 16), text_encoder_2=clip_text(n, 16, 32, 1),
                                     tokenizer=tok, tokenizer_2=clip_tokenizer(), unet=unet(sdxl=True),
                                     scheduler=sched, force_zeros_for_empty_prompt=True)


def _sd3():
    tok = clip_tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                               pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).eval()
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae(shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=clip_text(n, 16, 16), tokenizer=tok,
                                    text_encoder_2=clip_text(n, 16, 16, 1), tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=t5_text(len(t5_tokenizer())), tokenizer_3=t5_tokenizer())


def _flux():
    tok = clip_tokenizer()
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    t5tok = t5_tokenizer()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=clip_text(len(tok)), tokenizer=tok, text_encoder_2=t5_text(len(t5tok)),
                        tokenizer_2=t5tok, transformer=tr)


def _flux2():
    """Flux.2 Klein: Qwen3 text encoder (layers 9, 18, 27 are stacked), Flux.2 VAE."""
    tok = qwen_tokenizer()
    torch.manual_seed(0)
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=8, max_position_embeddings=512)).eval()
    torch.manual_seed(0)
    v = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                           sample_size=32, layers_per_block=1).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=v, text_encoder=te, tokenizer=tok,
                              transformer=flux2_transformer())


BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "flux2": _flux2}
assert tuple(BUILDERS) == FAMILIES, "one tiny pipeline per family of tlora.families"


def build_pipeline(family: str = "sd15"):
    """A complete stock diffusers pipeline with random weights; images are 32×32."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return BUILDERS[family]()


def save_clip(path) -> None:
    """A tiny random CLIPModel + CLIPProcessor saved to ``path`` (for evaluation tests)."""
    torch.manual_seed(0)
    tok = clip_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)


def save_dinov2(path) -> None:
    """A tiny random DINOv2 ViT and its image processor saved to ``path``."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
