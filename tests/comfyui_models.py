"""Tiny denoisers twice: a diffusers model and the ComfyUI model holding the same weights through ComfyUI's
own key maps (``unet_to_diffusers`` for UNets, ``convert_diffusers_mmdit`` for SD3 / Flux), and one call of
each at a ComfyUI sigma. ComfyUI's model detection knows only real model sizes, so the UNet configs are
written here and the Flux head count / rope axes are set after detection. ComfyUI has no diffusers key map for
Flux.2: its twin is built the other way round, a ComfyUI model with seeded weights converted to diffusers by
diffusers' own single-file converter."""
import torch

from comfyui_env import comfyui

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "flux2")
FLUX2 = {"image_model": "flux2", "axes_dim": [4, 4, 4, 4], "num_heads": 2, "mlp_ratio": 3.0, "theta": 2000,
         "out_channels": 16, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
         "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3], "in_channels": 16,
         "hidden_size": 32, "context_in_dim": 48, "patch_size": 1, "vec_in_dim": None, "depth": 1,
         "depth_single_blocks": 1, "guidance_embed": False}


def diffusers_denoiser(family):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    if family == "flux2":
        return _flux2_pair()[0]
    torch.manual_seed(0)
    if family in ("sd15", "sdxl"):
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
                     projection_class_embeddings_input_dim=32 + 6 * 8) if family == "sdxl" else {}
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), norm_num_groups=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, **extra).eval()
    if family == "sd3":
        return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                     pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16).eval()
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 6, 6), guidance_embeds=True).eval()


def _unet_config(family):
    cfg = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
           "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1,
           "context_dim": 32, "use_linear_in_transformer": family == "sdxl", "adm_in_channels": None,
           "use_temporal_resblock": False, "use_temporal_attention": False}
    if family == "sdxl":
        cfg.update(adm_in_channels=80, num_classes="sequential")
    return cfg


def comfy_patcher(family, den, dtype=torch.float32, manual_cast_dtype=None):
    """A ComfyUI ModelPatcher (CPU) whose diffusion model holds ``den``'s weights; asserts every weight is set."""
    comfyui()
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    sd = {k: v.detach().clone() for k, v in den.state_dict().items()}
    if family == "flux2":
        return _flux2_pair(den, dtype, manual_cast_dtype)[1]
    if family in ("sd15", "sdxl"):
        config = (comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL)(_unet_config(family))
        config.unet_config.update(num_heads=8, num_head_channels=-1)   # SD1.5-style heads at every level
        keys = comfy.utils.unet_to_diffusers(config.unet_config)
        new_sd = {keys[k]: v for k, v in sd.items() if k in keys}
    else:
        new_sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
        unet_config = comfy.model_detection.detect_unet_config(new_sd, "")
        if family == "flux":
            unet_config.update(num_heads=2, axes_dim=[4, 6, 6], out_channels=4)
            config = comfy.supported_models.Flux(unet_config)
        else:
            config = comfy.supported_models.SD3(unet_config)
    config.set_inference_dtype(dtype, manual_cast_dtype)
    model = config.get_model(new_sd, "")
    missing = set(model.diffusion_model.state_dict()) - set(new_sd)
    assert not missing, f"ComfyUI's key map left {sorted(missing)[:3]} unset"
    model.load_model_weights(new_sd, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _flux2_pair(den=None, dtype=torch.float32, manual_cast_dtype=None):
    """(diffusers Flux2Transformer2DModel, ComfyUI ModelPatcher) with the same seeded weights (``den``, when given,
    must still hold them)."""
    import comfy.model_patcher
    import comfy.supported_models
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    comfyui()
    config = comfy.supported_models.Flux2(dict(FLUX2))
    config.set_inference_dtype(dtype, manual_cast_dtype)
    model = config.get_model({}, "")
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.ones(t.shape) if k.endswith("scale") else torch.randn(t.shape, generator=g) * 0.1)
          for k, t in model.diffusion_model.state_dict().items()}
    twin = Flux2Transformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                   timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    twin.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)
    if den is not None:     # the seeded weights again: ``den`` must still hold them
        mine = twin.state_dict()
        assert all(torch.equal(v, mine[k]) for k, v in den.state_dict().items()), "flux2 twins need the seeded weights"
    den = den if den is not None else twin
    model.load_model_weights(sd, "")
    cpu = torch.device("cpu")
    return den, comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def inputs(family, batch=2, seed=0):
    """(latent x (B, C, 8, 8) in ComfyUI's space, conditioning dict) for one denoiser call."""
    g = torch.Generator().manual_seed(seed)
    ch = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 4, "flux2": 16}[family]
    cond = {"context": torch.randn(batch, 7, 48 if family == "flux2" else 32, generator=g)}
    if family not in ("sd15", "flux2"):
        cond["pooled"] = torch.randn(batch, 32, generator=g)
    return torch.randn(batch, ch, 8, 8, generator=g), cond


def comfy_output(patcher, family, x, sigma, cond, load=True):
    """ComfyUI's denoised output (``BaseModel.apply_model``), with the patcher's wrappers as ComfyUI's sampler
    passes them."""
    import comfy.model_management
    if load:                                           # as a sampler does; load=False keeps a partial load
        comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    s = _per_sample(sigma, x.shape[0])
    kw = {}
    if family == "sdxl":
        kw["y"] = _sdxl_y(cond["pooled"])
    elif family in ("sd3", "flux"):
        kw["y"] = cond["pooled"]
    if family == "flux":
        kw["guidance"] = torch.full((x.shape[0],), 3.5)
    with torch.no_grad():
        return model.apply_model(x, s, c_crossattn=cond["context"], transformer_options={"wrappers": patcher.wrappers},
                                 **kw)


_Y = {}


def _per_sample(sigma, batch):
    """A float, a 0-d or a (B,) tensor → sigma (B,) float32."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    return s.expand(batch).clone() if s.numel() == 1 else s


def _sdxl_y(pooled):
    """SDXL's ``y``: pooled text + sinusoidal embeddings of the six size ids, as diffusers builds them."""
    return torch.cat([pooled, _Y["proj"](_Y["ids"].expand(pooled.shape[0], 6).flatten()).reshape(pooled.shape[0], -1)], 1)


def diffusers_output(den, family, x, sigma, cond, model_sampling):
    """The same from the diffusers model: fed what a diffusers pipeline feeds it at that sigma, its prediction
    (ε or flow velocity) turned into the denoised latent by ComfyUI's ``model_sampling``."""
    return model_sampling.calculate_denoised(_per_sample(sigma, x.shape[0]), _prediction(den, family, x, sigma, cond,
                                                                                         model_sampling), x)


def _prediction(den, family, x, sigma, cond, model_sampling):
    from tlora.families import _pack_flux
    s = _per_sample(sigma, x.shape[0])
    with torch.no_grad():
        if family in ("sd15", "sdxl"):
            t = model_sampling.timestep(s)
            xin = model_sampling.calculate_input(s, x)
            added = None
            if family == "sdxl":
                added = {"text_embeds": cond["pooled"], "time_ids": _Y["ids"].expand(x.shape[0], 6)}
            return den(xin, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added).sample
        if family == "sd3":
            return den(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond["context"],
                       pooled_projections=cond["pooled"]).sample
        if family == "flux2":
            from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as K
            ids = K._prepare_latent_ids(x)
            out = den(hidden_states=K._pack_latents(x), timestep=s, guidance=None, encoder_hidden_states=cond["context"],
                      txt_ids=K._prepare_text_ids(cond["context"]), img_ids=ids).sample
            return out.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        from diffusers import FluxPipeline
        b, c, h, w = x.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        out = den(hidden_states=_pack_flux(x), timestep=s, guidance=torch.full((b,), 3.5),
                  pooled_projections=cond["pooled"], encoder_hidden_states=cond["context"],
                  txt_ids=torch.zeros(cond["context"].shape[1], 3), img_ids=img_ids).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def bind_sdxl(den):
    """Remember the diffusers SDXL UNet's size-id projection (ComfyUI receives ``y`` already built)."""
    _Y["proj"] = den.add_time_proj
    _Y["ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])


def tiny_checkpoint():
    """(MODEL, CLIP, VAE) as CheckpointLoaderSimple returns them, for the tiny SD1.5 UNet: ComfyUI's own CLIP
    (its SD1 tokenizer, a 2-layer text model of width 32) and VAE (AutoencoderKL, 32 channels, 8× downscale);
    ComfyUI builds layers without initialising them, so the text model and VAE get seeded N(0, 0.02) weights
    (norm scales 1)."""
    comfyui()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    den = diffusers_denoiser("sd15")
    clip_cfg = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                "max_position_embeddings": 77, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 49407,
                "pad_token_id": 1, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": clip_cfg}
    torch.manual_seed(0)
    clip = comfy.sd.CLIP(target=target)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (clip.cond_stage_model, vae.first_stage_model):
            for name, t in module.state_dict(keep_vars=True).items():
                if t.is_floating_point():
                    t.copy_(torch.ones_like(t) if "norm" in name and name.endswith("weight") else
                            torch.randn(t.shape, generator=g) * 0.02)
    return comfy_patcher("sd15", den), clip, vae, den
