"""The ComfyUI nodes against real ComfyUI code (tests/comfyui_env.py finds it; CI must not skip these).

Every comparison is with the diffusers path: the same weights in a tiny diffusers denoiser, the same T-LoRA
file under ``tlora.attach``."""
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

import tlora
from comfyui_env import comfyui, load_node_package, loras_folder
from comfyui_models import FAMILIES, bind_sdxl, comfy_output, comfy_patcher, diffusers_denoiser, diffusers_output, inputs
from conftest import perturb
from tlora.families import FAMILIES as TABLE

FLUX_MLP = (r"single_transformer_blocks\.\d+\.proj_mlp",)   # the 4h rows of the fused linear1 after q, k, v


def make_tlora(den, family, path, variant="ortho", rank=8, min_rank=2, exponent=1.0, std=0.05):
    cfg = tlora.TLoRAConfig(rank=rank, min_rank=min_rank, exponent=exponent, variant=variant,
                            target_module=TABLE[family].target_module,
                            target_name=FLUX_MLP if family == "flux" else ())
    net = tlora.inject(den, cfg, generator=torch.Generator().manual_seed(0))
    perturb(net, std=std)
    net.family = family
    tlora.save(net, path)
    net.remove()
    return path


@pytest.fixture
def loras(tmp_path):
    loras_folder(tmp_path)
    return tmp_path


def sigmas(patcher, steps=10):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)


def twin(family):
    den = diffusers_denoiser(family)
    if family == "sdxl":
        bind_sdxl(den)
    return den, comfy_patcher(family, den)


def assert_node_equals_attach(family, den, base, patched, network):
    """At every sigma of ComfyUI's 10-step schedule the patched ComfyUI model's denoised output equals the diffusers
    denoiser's under ``tlora.attach(den, network)`` (1e-4), and the ranks recorded per call agree with
    active_rank(t) and with the diffusers hook's."""
    from tlora.comfyui import attached
    tl = attached(patched)[0]
    tl.record = True
    handle = tlora.attach(den, network, record=True)
    ms = patched.get_model_object("model_sampling")
    x, cond = inputs(family)
    moved = 0.0
    try:
        for s in sigmas(patched)[:-1]:
            got = comfy_output(patched, family, x, s, cond)
            want = diffusers_output(den, family, x, s, cond, ms)
            assert (got - want).abs().max().item() < 1e-4, f"sigma {float(s)}"
            moved = max(moved, (got - comfy_output(base, family, x, s, cond)).abs().max().item())
    finally:
        handle.detach()
    assert moved > 1e-3                                   # the adapter does act
    assert len(tl.steps) == 10
    for (ts, ranks), (dts, dranks) in zip(tl.steps, handle.steps):
        for sched, r in ranks.items():
            assert r == [tlora.active_rank(t, sched.max_rank, sched.min_rank, sched.exponent) for t in ts]
        assert next(iter(ranks.values())) == list(dranks)
    first = next(iter(tl.steps[0][1].values()))[0]
    last = next(iter(tl.steps[-1][1].values()))[0]
    assert first < last                                   # noisy steps get fewer ranks


def assert_node_equals_file(family, den, base, patched, path, **options):
    """:func:`assert_node_equals_attach` with the network ``tlora.load(path, den, **options)`` gives."""
    network = tlora.load(path, den, **options)
    try:
        assert_node_equals_attach(family, den, base, patched, network)
    finally:
        network.remove()


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
@pytest.mark.parametrize("family", FAMILIES)
def test_node_equals_diffusers_attach_at_every_sigma_of_a_10_step_schedule(family, variant, loras):
    den, base = twin(family)
    make_tlora(den, family, loras / f"{family}.safetensors", variant)
    (patched,) = load_node_package()["Load T-LoRA"]().load(base, f"{family}.safetensors", 1.0, True)
    assert_node_equals_file(family, den, base, patched, loras / f"{family}.safetensors")


def test_lycoris_file_made_by_lycoris_loads_without_typed_schedule_and_equals_tlora_load(loras, monkeypatch):
    """SimpleTuner's form: LyCORIS ``create_lycoris(algo="tlora")``, its JSON in the ``lycoris_config`` metadata."""
    pytest.importorskip("lycoris")
    from lycoris.modules import tlora as lyc_tlora
    from test_formats import lycoris_tlora_file
    monkeypatch.setattr(lyc_tlora.gc, "collect", lambda *a: 0)   # LyCORIS's per-module gc.collect(): seconds
    den, base = twin("sdxl")
    lycoris_tlora_file(den, loras / "lyc.safetensors", 8, 4, 3, 2.0)
    with pytest.warns(UserWarning, match="rebuilt"):
        (patched,) = load_node_package()["Load T-LoRA"]().load(base, "lyc.safetensors", 1.0, True)
    with pytest.warns(UserWarning, match="rebuilt"):
        network = tlora.load(loras / "lyc.safetensors", den)
    assert {(s.max_rank, s.min_rank, s.exponent) for s in network.schedules()} == {(8, 3, 2.0)}
    try:
        assert_node_equals_attach("sdxl", den, base, patched, network)
    finally:
        network.remove()


@pytest.mark.parametrize("trainer", ["lora", "ortho_lora"])
def test_official_checkpoint_with_hparams_beside_it_equals_tlora_load(trainer, loras):
    from conftest import official_checkpoint
    den, base = twin("sdxl")
    save_file(official_checkpoint(den, trainer, 4), str(loras / "official.safetensors"))
    hp = {"lora_rank": 4, "min_rank": 2, "alpha_rank_scale": 1.0, "trainer_type": trainer, "sig_type": "last"}
    (loras / "official.hparams.yml").write_text(yaml.safe_dump(hp))
    (patched,) = load_node_package()["Load T-LoRA"]().load(base, "official.safetensors", 1.0, True)
    assert_node_equals_file("sdxl", den, base, patched, loras / "official.safetensors",
                            hparams=str(loras / "official.hparams.yml"))


def test_official_checkpoint_without_hparams_needs_the_schedule_typed_in(loras):
    from conftest import official_checkpoint
    from tlora.comfyui import TLoRAComfyError, attached
    den, base = twin("sdxl")
    save_file(official_checkpoint(den, "ortho_lora", 4), str(loras / "bare.safetensors"))
    load = load_node_package()["Load T-LoRA"]()
    with pytest.raises(TLoRAComfyError, match="hparams.yml") as e:
        load.load(base, "bare.safetensors", 1.0, True)
    assert "\n" not in str(e.value)
    (patched,) = load.load(base, "bare.safetensors", 1.0, True, min_rank=3, exponent=2.0)
    assert {(s.max_rank, s.min_rank, s.exponent) for s in attached(patched)[0].schedules} == {(4, 3, 2.0)}


def ksample(patcher, family, seed=0, steps=5):
    """KSampler (euler, normal, CFG 3) through ComfyUI's own ``comfy.sample.sample`` on a 1×C×8×8 latent."""
    import comfy.sample
    x, cond = inputs(family, batch=2, seed=seed)
    extra = {} if family == "sd15" else {"pooled_output": cond["pooled"][:1]}
    pos = [[cond["context"][:1], dict(extra)]]
    neg = [[cond["context"][1:], dict(extra, **({"pooled_output": cond["pooled"][1:]} if extra else {}))]]
    latent = torch.zeros_like(x[:1])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(patcher, noise, steps, 3.0, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_ksampler_run_masked_differs_from_unmasked(family, loras):
    den, base = twin(family)
    make_tlora(den, family, loras / "t.safetensors", "ortho", std=0.2)
    load = load_node_package()["Load T-LoRA"]()
    masked = ksample(load.load(base, "t.safetensors", 1.0, True)[0], family)
    unmasked = ksample(load.load(base, "t.safetensors", 1.0, False)[0], family)
    plain = ksample(base, family)
    assert torch.isfinite(masked).all()
    assert (masked - unmasked).abs().max().item() > 1e-3
    assert (masked - plain).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_min_rank_equal_to_rank_equals_comfyui_lora_loader_on_our_plain_export(family, variant, loras):
    """Full rank at every step is a plain LoRA: ComfyUI's LoraLoaderModelOnly on `tlora convert --to kohya`
    (SD1.5) or `--to diffusers` (SD3, Flux) of the same file samples the same latent."""
    from tlora.formats import read_state, write_state
    den, base = twin(family)
    make_tlora(den, family, loras / "full.safetensors", variant, rank=8, min_rank=8)
    tensors, header = read_state(loras / "full.safetensors")
    write_state("kohya" if family == "sd15" else "diffusers", tensors, header, loras / "plain.safetensors")
    nodes = comfyui()
    ours = ksample(load_node_package()["Load T-LoRA"]().load(base, "full.safetensors", 1.0, True)[0], family)
    comfy_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "plain.safetensors", 1.0)[0]
    assert sum(len(p) for p in comfy_lora.patches.values()) == len(header["modules"])   # every module loaded
    theirs = ksample(comfy_lora, family)
    assert (ours - ksample(base, family)).abs().max().item() > 1e-3
    # within 1e-4 of the largest latent value: the random tiny SD1.5 UNet drifts to |x| ≈ 270 over the run, and
    # merged (W + ΔW)x vs unmerged Wx + ΔWx differ by fp32 rounding (measured 2e-4 there, 1e-6 for SD3 / Flux)
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(1.0, ours.abs().max().item())


def test_clones_sharing_a_base_never_see_the_tlora_and_removal_leaves_the_state_dict_bit_identical(loras):
    import gc
    den, base = twin("sd15")
    make_tlora(den, "sd15", loras / "t.safetensors", std=0.2)
    other = base.clone()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    x, cond = inputs("sd15")
    s = 3.0
    ref_base, ref_other = comfy_output(base, "sd15", x, s, cond), comfy_output(other, "sd15", x, s, cond)
    (patched,) = load_node_package()["Load T-LoRA"]().load(base, "t.safetensors", 1.0, True)
    first = comfy_output(patched, "sd15", x, s, cond)
    ksample(patched, "sd15")
    assert torch.equal(comfy_output(base, "sd15", x, s, cond), ref_base)
    assert torch.equal(comfy_output(other, "sd15", x, s, cond), ref_other)
    assert torch.equal(comfy_output(patched, "sd15", x, s, cond), first)      # and back again
    assert torch.equal(comfy_output(base, "sd15", x, s, cond), ref_base)
    assert (first - ref_base).abs().max().item() > 1e-3
    assert not base.attachments and not base.wrappers.get("apply_model")
    del patched
    gc.collect()
    after = base.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m._forward_hooks for m in base.model.modules())


def test_two_tloras_stack_and_add_like_one_at_twice_the_strength(loras):
    den, base = twin("flux")
    make_tlora(den, "flux", loras / "t.safetensors")
    load = load_node_package()["Load T-LoRA"]()
    twice = load.load(load.load(base, "t.safetensors", 1.0, True)[0], "t.safetensors", 1.0, True)[0]
    double = load.load(base, "t.safetensors", 2.0, True)[0]
    x, cond = inputs("flux")
    for s in (0.9, 0.4):
        torch.testing.assert_close(comfy_output(twice, "flux", x, s, cond), comfy_output(double, "flux", x, s, cond),
                                   atol=1e-5, rtol=0)


def plain_lora(den, path, fold=False):
    """A kohya LoRA file for ComfyUI's LoraLoader (our export of a rank-4 vanilla adapter); ``fold``: also add its
    delta into ``den``'s weights, as a merged LoRA."""
    from tlora.formats import read_state, write_state
    net = tlora.inject(den, tlora.TLoRAConfig(rank=4, min_rank=4, variant="vanilla", target_module=("Attention",)))
    perturb(net, seed=7, std=0.2)
    net.family = "sd15"
    tlora.save(net, path.with_suffix(".src"))
    write_state("kohya", *read_state(path.with_suffix(".src")), path)
    if fold:
        with torch.no_grad():
            for a in net.adapters.values():
                a.base_layer.weight += a.delta_weight()
    net.remove()


@pytest.mark.parametrize("order", ["lora-then-tlora", "tlora-then-lora"])
def test_tlora_stacked_with_a_plain_lora_equals_diffusers_with_the_lora_folded_in(order, loras):
    """ComfyUI's LoraLoaderModelOnly (a kohya file) and our node in either order; diffusers: the same LoRA
    folded into the weights, the T-LoRA attached."""
    den, base = twin("sd15")
    make_tlora(den, "sd15", loras / "t.safetensors")
    plain_lora(den, loras / "lora.safetensors", fold=True)
    nodes, load = comfyui(), load_node_package()["Load T-LoRA"]()
    plain = nodes.LoraLoaderModelOnly().load_lora_model_only
    if order == "lora-then-tlora":
        model = load.load(plain(base, "lora.safetensors", 1.0)[0], "t.safetensors", 1.0, True)[0]
    else:
        model = plain(load.load(base, "t.safetensors", 1.0, True)[0], "lora.safetensors", 1.0)[0]
    assert_node_equals_file("sd15", den, base, model, loras / "t.safetensors")


def test_low_vram_partial_loading_gives_the_full_load_output(loras):
    """ComfyUI's partial load: every layer's weight cast per call and the plain LoRA applied as LowVramPatch."""
    import comfy.model_management
    den, base = twin("sd15")
    make_tlora(den, "sd15", loras / "t.safetensors", std=0.2)
    plain_lora(den, loras / "lora.safetensors")
    model = load_node_package()["Load T-LoRA"]().load(
        comfyui().LoraLoaderModelOnly().load_lora_model_only(base, "lora.safetensors", 1.0)[0], "t.safetensors", 1.0, True)[0]
    x, cond = inputs("sd15")
    full = [comfy_output(model, "sd15", x, s, cond) for s in (8.0, 1.0)]
    comfy.model_management.unload_all_models()
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        assert model.model.model_lowvram and model.model.lowvram_patch_counter > 0
        partial = [comfy_output(model, "sd15", x, s, cond, load=False) for s in (8.0, 1.0)]
    finally:
        model.unpatch_model(torch.device("cpu"))
    for a, b in zip(partial, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,manual_cast", [
    (torch.bfloat16, None), (torch.float16, None), (torch.float8_e4m3fn, torch.float32)])
def test_base_weights_in_comfyui_dtypes_keep_the_adapter_in_float32(dtype, manual_cast, loras):
    """A bf16 / fp16 / fp8 ComfyUI model against an fp32 one holding the same rounded weights, with and without
    the T-LoRA: its effect is kept (the low-precision patched output is nearer the fp32 patched output than the
    fp32 base output by ≥ 4×; measured 21×, 250×, 25×), the error stays of the base model's order (≤ 5× the base
    model's own error; measured 3.8×, 2.5×, 1.7× — a larger delta meets the same rounding again downstream),
    and the adapters stay float32."""
    from tlora.comfyui import attached
    den = diffusers_denoiser("sd3")
    with torch.no_grad():
        for p in den.parameters():
            p.copy_(p.to(dtype).float())                         # the fp32 twin holds the rounded weights
    make_tlora(den, "sd3", loras / "t.safetensors", std=0.5)
    load = load_node_package()["Load T-LoRA"]()
    x, cond = inputs("sd3")
    out = {}
    for name, dt, mc in (("fp32", torch.float32, None), ("low", dtype, manual_cast)):
        base = comfy_patcher("sd3", den, dt, mc)
        assert base.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == dt
        patched = load.load(base, "t.safetensors", 1.0, True)[0]
        for kind, m in (("base", base), ("patched", patched)):
            out[name, kind] = torch.stack([comfy_output(m, "sd3", x, s, cond).float() for s in (0.9, 0.3)])
        assert all(p.dtype == torch.float32 for p in attached(patched)[0].network.parameters())
    err = {k: (out["low", k] - out["fp32", k]).abs().max().item() for k in ("base", "patched")}
    effect = (out["fp32", "patched"] - out["fp32", "base"]).abs().max().item()
    assert err["patched"] <= 5 * err["base"] + 1e-5
    assert effect >= 4 * err["patched"]


class TinyCheckpoint:
    """Test-only stand-in for CheckpointLoaderSimple's *file* (no real checkpoint fits here): the same outputs."""
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "tests"
    made = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {})}}

    def load(self, ckpt_name):
        return TinyCheckpoint.made[:3]


@pytest.fixture
def workflow(loras):
    """The repository's API-format workflow, its checkpoint loader pointed at the tiny SD1.5 checkpoint, 64×64, 4 steps."""
    from comfyui_env import NODE_PACKAGE, register_test_node
    from comfyui_models import tiny_checkpoint
    load_node_package()
    TinyCheckpoint.made = tiny_checkpoint()
    register_test_node("tiny checkpoint (tests)", TinyCheckpoint)
    wf = json.loads((NODE_PACKAGE.parent / "example_workflows" / "tlora-sdxl-api.json").read_text())
    assert wf["1"]["class_type"] == "CheckpointLoaderSimple"
    wf["1"]["class_type"] = "tiny checkpoint (tests)"
    wf["5"]["inputs"].update(width=64, height=64)
    wf["6"]["inputs"]["steps"] = wf["9"]["inputs"]["steps"] = 4
    return wf


def test_the_repository_workflow_runs_in_comfyuis_executor_and_the_mask_changes_the_image(workflow, loras, tmp_path):
    import numpy as np
    from PIL import Image
    from comfyui_env import run_prompt
    make_tlora(TinyCheckpoint.made[3], "sd15", loras / "tlora.safetensors", std=0.3)
    images = {}
    for mask in (True, False):
        workflow["2"]["inputs"]["mask"] = mask
        ok, messages, history = run_prompt(workflow, tmp_path / str(mask))
        assert ok and "execution_success" in messages, messages.get("execution_error")
        saved = history["outputs"]["8"]["images"][0]
        images[mask] = np.asarray(Image.open(tmp_path / str(mask) / saved["subfolder"] / saved["filename"]))
        preview = history["outputs"]["11"]["images"][0]
        plot = Image.open(tmp_path / str(mask) / "temp" / preview["subfolder"] / preview["filename"])
        assert plot.size == (600, 350)
    assert images[True].shape == (64, 64, 3)
    assert np.abs(images[True].astype(int) - images[False].astype(int)).max() > 0


def bad_files(loras):
    """name → (bytes or a writer, what the one-line error must say)."""
    import pickle
    den = diffusers_denoiser("sd15")
    make_tlora(den, "sd15", loras / "good.safetensors")
    good = (loras / "good.safetensors").read_bytes()
    wide = diffusers_denoiser("sd15")
    cfg = dict(wide.config)
    cfg["cross_attention_dim"] = 48
    from diffusers import UNet2DConditionModel
    make_tlora(UNet2DConditionModel(**cfg), "sd15", loras / "shapes.safetensors")
    save_file({"foo.bar.weight": torch.zeros(2, 2)}, str(loras / "foreign.safetensors"))
    (loras / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[-3] ^= 0xFF
    (loras / "corrupt.safetensors").write_bytes(bytes(corrupt))
    (loras / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    xl = diffusers_denoiser("sdxl")
    make_tlora(xl, "sdxl", loras / "sdxl.safetensors")
    path, lin = next((n, m) for n, m in den.named_modules() if n.endswith("attn1.to_q"))
    name = "lycoris_" + path.replace(".", "_")
    lyc = {f"{name}.q_layer.weight": torch.randn(4, lin.in_features), f"{name}.alpha": torch.tensor(4.0),
           f"{name}.p_layer.weight": torch.randn(lin.out_features, 4), f"{name}.lambda_layer": torch.ones(1, 4)}
    meta = {"algo": "tlora", "linear_dim": 4, "tlora_min_rank": 2, "tlora_alpha": 1.0}
    save_file({**lyc, f"{name}.lambda_layer": torch.ones(1, 3)}, str(loras / "lyc-lambda.safetensors"),
              metadata={"lycoris_config": json.dumps(meta)})
    save_file(lyc, str(loras / "lyc-minrank.safetensors"),
              metadata={"lycoris_config": json.dumps({**meta, "tlora_min_rank": 9})})
    save_file(lyc, str(loras / "lyc-meta.safetensors"), metadata={"lycoris_config": "{nope"})
    return {"lyc-lambda.safetensors": "do not fit its layer",      # the CLI's readers, the CLI's one line
            "lyc-minrank.safetensors": "min_rank",
            "lyc-meta.safetensors": "not valid JSON",
            "foreign.safetensors": "unknown weights format",
            "shapes.safetensors": "has weight shape",
            "truncated.safetensors": "not a readable safetensors file",
            "corrupt.safetensors": "checksum",
            "pickle.ckpt": "not a readable safetensors file",
            "sdxl.safetensors": "is a T-LoRA for sdxl, but this model is sd15"}


def test_bad_files_are_one_clear_error_in_comfyuis_error_path_and_patch_nothing(workflow, loras, tmp_path):
    from comfyui_env import run_prompt
    cases = bad_files(loras)
    base = TinyCheckpoint.made[0]
    for name, says in cases.items():
        workflow["2"]["inputs"]["lora_name"] = name
        ok, messages, _ = run_prompt(workflow, tmp_path / name)
        assert not ok
        err = messages["execution_error"]
        assert err["node_id"] == "2" and err["node_type"] == "Load T-LoRA"
        assert says in err["exception_message"] and "\n" not in err["exception_message"].strip(), name
        assert not base.attachments and not base.wrappers.get("apply_model")     # nothing patched
    assert not any(m._forward_hooks for m in base.model.modules())


def test_schedule_node_shows_the_ranks_the_sampler_runs(loras):
    """The preview for KSampler's own sigmas lists, step by step, the ranks the masked KSampler run used."""
    import comfy.samplers
    from tlora.comfyui import attached
    den, base = twin("sd3")
    make_tlora(den, "sd3", loras / "t.safetensors", rank=16, min_rank=4, exponent=2.0)
    nodes = load_node_package()
    (patched,) = nodes["Load T-LoRA"]().load(base, "t.safetensors", 1.0, True)
    tl = attached(patched)[0]
    tl.record = True
    ksample(patched, "sd3", steps=6)
    sig = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "normal", 6)
    image, table = nodes["T-LoRA schedule"]().preview(patched, sig)
    lines = table.splitlines()
    assert len(lines) == 7 and "R=16 Rmin=4 α=2" in lines[0]
    used = [next(iter(r.values()))[0] for _, r in tl.steps]         # one CFG-batched call per step (euler)
    shown = [int(line.split()[-1]) for line in lines[1:]]
    assert shown == used == [4, 4, 4, 5, 7, 15]
    assert [float(line.split()[2]) for line in lines[1:]] == [ts[0] for ts, _ in tl.steps]
    assert image.shape == (1, 350, 600, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
    with pytest.raises(ValueError, match="no T-LoRA"):
        nodes["T-LoRA schedule"]().preview(base, sig)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_per_sample_sigmas_in_one_call_equal_single_calls_with_per_module_ranks(family, loras):
    """One batch, two sigmas: each sample is masked by its own t (the community node masks the batch by
    the first sample's); modules of different ranks (module_algo_map) each follow their own schedule."""
    from tlora.comfyui import attached
    den, base = twin(family)
    net = tlora.inject(den, tlora.TLoRAConfig(rank=8, min_rank=2, target_module=TABLE[family].target_module,
                                              module_algo_map={("Attention" if family == "sdxl" else "FluxAttention"): {},
                                                               **({"transformer_blocks.0.attn.to_k": {"rank": 4, "min_rank": 1}}
                                                                  if family == "flux" else
                                                                  {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
                                                                   {"rank": 4, "min_rank": 1}})}))
    perturb(net, std=0.2)
    net.family = family
    tlora.save(net, loras / "t.safetensors")
    net.remove()
    (patched,) = load_node_package()["Load T-LoRA"]().load(base, "t.safetensors", 1.0, True)
    tl = attached(patched)[0]
    tl.record = True
    x, cond = inputs(family)
    ms = patched.get_model_object("model_sampling")
    pair = sigmas(patched)[[1, 8]]
    both = comfy_output(patched, family, x, pair, cond)
    for i in range(2):
        one = comfy_output(patched, family, x[i:i + 1], pair[i], {k: v[i:i + 1] for k, v in cond.items()})
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-4, rtol=0)
    ts, ranks = tl.steps[0]
    assert len(ranks) == 2 and ts == [float(round(v, 3)) for v in
                                      (ms.timestep(pair).double() * (1 if family == "sdxl" else 1000)).tolist()]
    for sched, r in ranks.items():
        assert r == [tlora.active_rank(t, sched.max_rank, sched.min_rank) for t in ts] and r[0] < r[1]


def test_an_unreadable_hparams_yml_is_one_line(loras):
    from conftest import official_checkpoint
    from tlora.comfyui import TLoRAComfyError
    den, base = twin("sdxl")
    save_file(official_checkpoint(den, "lora", 4), str(loras / "o.safetensors"))
    for text, says in (("lora_rank: [4\n", "not readable YAML"), ("- 4\n", "not a YAML mapping")):
        (loras / "o.hparams.yml").write_text(text)
        with pytest.raises(TLoRAComfyError, match=says) as e:
            load_node_package()["Load T-LoRA"]().load(base, "o.safetensors", 1.0, True)
        assert "\n" not in str(e.value)
