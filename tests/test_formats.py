"""Other tools' files: LyCORIS and official T-LoRA in, LyCORIS / diffusers / kohya out."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tlora
from tlora import TLoRAConfig
from tlora.cli import main
from tlora.formats import detect_format, sgm_path
from tlora.testing import build_pipeline

from conftest import OFFICIAL, official_checkpoint, perturb, tiny_unet, unet_inputs

lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402
from lycoris.modules import tlora as lyc_tlora  # noqa: E402


@pytest.fixture(autouse=True)
def no_lycoris_gc(monkeypatch):
    # LyCORIS calls gc.collect() once per module at setup (REFERENCE §3.9): seconds per test, no effect on values
    monkeypatch.setattr(lyc_tlora.gc, "collect", lambda *a: 0)


def set_all_masks(net, k):
    for a in net.adapters.values():
        a.set_mask((torch.arange(a.rank) < k).float()[None])


@pytest.mark.parametrize("k", [2, 4])
def test_lycoris_made_file_loads_and_matches_lycoris_output(tmp_path, k):
    unet = tiny_unet()
    net = lycoris_tlora_file(unet, tmp_path / "lyc.safetensors", 4, 2, 1, 1.0, lambda_scale=1.2, restore=False)
    x, c = unet_inputs()
    lyc_tlora.set_timestep_mask((torch.arange(4) < k).float()[None])
    try:
        with torch.no_grad():
            expected = unet(x, 500, c).sample
    finally:
        lyc_tlora.clear_timestep_mask()
    fresh = tiny_unet()
    with pytest.warns(UserWarning, match="rebuilt") if not any(
            "base_q" in key for key in load_file(str(tmp_path / "lyc.safetensors"))) else _nothing():
        ours = tlora.load(tmp_path / "lyc.safetensors", fresh)
    assert len(ours.adapters) == len(net.loras)
    set_all_masks(ours, k)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500, c).sample, expected, atol=1e-5, rtol=1e-5)


def lycoris_tlora_file(model, path, linear_dim, linear_alpha, min_rank, exponent, lambda_scale=1.5, restore=True):
    """A LyCORIS ``algo: tlora`` file as SimpleTuner writes it (``create_lycoris``, trained-looking tensors, the
    LyCORIS JSON in the ``lycoris_config`` metadata). Returns the LyCORIS network (restored from ``model``
    unless ``restore=False``)."""
    LycorisNetwork.apply_preset({"target_module": ["Attention"]})
    net = create_lycoris(model, 1.0, linear_dim=linear_dim, linear_alpha=linear_alpha, algo="tlora")
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.loras:
            m.q_layer.weight.add_(torch.randn(m.q_layer.weight.shape, generator=g) * 0.05)
            m.p_layer.weight.add_(torch.randn(m.p_layer.weight.shape, generator=g) * 0.05)
            m.lambda_layer.mul_(lambda_scale)
    net.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(
        {"algo": "tlora", "linear_dim": linear_dim, "linear_alpha": linear_alpha, "tlora_min_rank": min_rank,
         "tlora_alpha": exponent})})
    if restore:
        net.restore()
    return net


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("form", ["lycoris", "lycoris-fast-svd", "paper", "vanilla"])
def test_our_lycoris_export_loads_in_lycoris_with_our_full_rank_output(tmp_path, form):
    unet = tiny_unet()
    cfg = {"lycoris": TLoRAConfig(rank=4, alpha=2.0, init="weight", sig_type="principal", svd="exact"),
           "lycoris-fast-svd": TLoRAConfig(rank=4, alpha=2.0, init="weight", sig_type="principal"),
           "paper": TLoRAConfig(rank=4), "vanilla": TLoRAConfig(rank=4, variant="vanilla")}[form]
    net = tlora.inject(unet, cfg)
    perturb(net)
    x, c = unet_inputs()
    with torch.no_grad():
        ours = unet(x, 500, c).sample
    tlora.save(net, tmp_path / "w.safetensors", metadata={"family": "sd15"})
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "lyc.safetensors"), "--to", "lycoris"]) == 0
    keys = load_file(str(tmp_path / "lyc.safetensors")).keys()
    assert any(k.endswith(".lambda_layer") for k in keys) == (form == "lycoris")
    fresh = tiny_unet()
    lnet, _ = create_lycoris_from_weights(1.0, str(tmp_path / "lyc.safetensors"), fresh)
    lnet.apply_to()
    assert len(lnet.loras) == len(net.adapters)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500, c).sample, ours, atol=1e-5, rtol=1e-4)


def official_delta(sd, attn, key, x, mask):
    """The official processor's LoRA term, written out: scale 1, mask (1, R) shared by the batch."""
    pre = f"{attn}.processor.{key}_lora"
    if f"{pre}.down.weight" in sd:
        return ((x @ sd[f"{pre}.down.weight"].T) * mask) @ sd[f"{pre}.up.weight"].T
    h = (x @ sd[f"{pre}.q_layer.weight"].T) * sd[f"{pre}.lambda_layer"] * mask
    h0 = (x @ sd[f"{pre}.base_q.weight"].T) * sd[f"{pre}.base_lambda"] * mask
    return h @ sd[f"{pre}.p_layer.weight"].T - h0 @ sd[f"{pre}.base_p.weight"].T


@pytest.mark.parametrize("variant", ["ortho_lora", "lora"])
def test_official_sdxl_checkpoint_generates_like_the_official_masking_rule(tmp_path, variant):
    import numpy as np
    pipe = build_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    R, Rmin, alpha = 8, 2, 1.5
    sd = official_checkpoint(pipe.unet, variant, R)
    save_file(sd, str(tmp_path / "pytorch_lora_weights.safetensors"))
    (tmp_path / "hparams.yml").write_text(yaml.safe_dump({"lora_rank": R, "min_rank": Rmin, "alpha_rank_scale": alpha,
                                                          "trainer_type": variant, "sig_type": "last"}))
    assert detect_format(sd.keys(), {}) == "official"
    assert main(["convert", str(tmp_path / "pytorch_lora_weights.safetensors"), str(tmp_path / "t.safetensors"),
                 "--to", "tlora", "--hparams", str(tmp_path / "hparams.yml")]) == 0

    def run():
        return pipe(prompt="a sks dog", num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    with tlora.attach(pipe, tmp_path / "t.safetensors"):
        ours = run()
    # by hand: forward hooks add the official LoRA term with the official mask of each step's t
    hooks, calls = [], []

    def pre(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        r = int(((1000 - t) / 1000) ** alpha * (R - Rmin)) + Rmin      # the official get_mask_by_timestep
        m = torch.zeros((1, R))
        m[:, :r] = 1.0
        calls.append(r)
        for h in state["masks"]:
            state["masks"][h] = m
    state = {"masks": {}}
    hooks.append(pipe.unet.register_forward_pre_hook(pre, with_kwargs=True))
    for name, mod in pipe.unet.named_modules():
        if type(mod).__name__ != "Attention":
            continue
        for proj, key in OFFICIAL.items():
            lin = mod.get_submodule(proj)
            state["masks"][(name, key)] = None

            def add(m_, args, out, name=name, key=key):
                return out + official_delta(sd, name, key, args[0], state["masks"][(name, key)])
            hooks.append(lin.register_forward_hook(add))
    by_hand = run()
    for h in hooks:
        h.remove()
    assert len(set(calls)) > 1
    np.testing.assert_allclose(ours, by_hand, atol=1e-5)


def test_official_file_without_schedule_needs_options(tmp_path, capsys):
    sd = official_checkpoint(tiny_unet(), "lora", 4)
    save_file(sd, str(tmp_path / "o.safetensors"))
    assert main(["convert", str(tmp_path / "o.safetensors"), str(tmp_path / "t.safetensors"), "--to", "tlora"]) == 2
    assert "--min-rank" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


@pytest.fixture(params=["sd15", "sdxl"])
def trained(request, tmp_path):
    pipe = build_pipeline(request.param)
    net = tlora.inject(pipe.unet, TLoRAConfig(rank=4, alpha=2.0, min_rank=1, variant="ortho"))
    perturb(net, std=0.1)
    path = tlora.save(net, tmp_path / "w.safetensors", metadata={"family": request.param})
    return request.param, pipe, net, path


def unet_call(pipe, t=500):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 5, pipe.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6) * 32}
    with torch.no_grad():
        return pipe.unet(x, t, c, **kw).sample


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_plain_lora_export_loads_in_diffusers_with_our_full_rank_output(trained, tmp_path, fmt):
    family, pipe, net, path = trained
    ours = unet_call(pipe)
    with tlora.timestep_mask(net, 500):
        ours_at_500 = unet_call(pipe)
    net.remove()
    base = unet_call(pipe)
    for at, expected in ((None, ours), (500, ours_at_500)):
        out = tmp_path / f"{fmt}-{at}.safetensors"
        argv = ["convert", str(path), str(out), "--to", fmt] + (["--at-timestep", str(at)] if at else [])
        assert main(argv) == 0
        sd = load_file(str(out))
        if fmt == "kohya":
            assert all(k.startswith("lora_unet_") for k in sd)
            alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
            downs = {k[:-len(".lora_down.weight")]: v for k, v in sd.items() if k.endswith(".lora_down.weight")}
            assert {k[:-len(".alpha")] for k in alphas} == set(downs)
            assert all(float(alphas[n + ".alpha"]) == downs[n].shape[0] for n in downs)
            if family == "sdxl":
                assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
                assert any(k.startswith("lora_unet_middle_block_1_") for k in sd)
        pipe.load_lora_weights(str(out), adapter_name=f"a{fmt}{at}")
        got = unet_call(pipe)
        pipe.delete_adapters(f"a{fmt}{at}")
        assert not torch.allclose(got, base, atol=1e-4)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    header = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["tlora_export"])
    assert header["mask_dropped"] is True and header["at_timestep"] == 500 and header["schedule"]["rank"] == 4


def test_ortho_exports_at_exactly_rank_2r(trained, tmp_path):
    _, _, net, path = trained
    main(["convert", str(path), str(tmp_path / "d.safetensors"), "--to", "diffusers"])
    sd = load_file(str(tmp_path / "d.safetensors"))
    assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")} == {8}


def test_sgm_names():
    assert sgm_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_path("up_blocks.0.attentions.2.proj_in", 2) == "output_blocks.2.1.proj_in"
    assert sgm_path("mid_block.attentions.0.proj_out", 2) == "middle_block.1.proj_out"
    assert sgm_path("down_blocks.2.resnets.1.conv1", 2) == "input_blocks.8.0.in_layers.2"


def test_inspect_prints_schedule_table_and_writes_plot(trained, tmp_path, capsys):
    _, _, _, path = trained
    assert main(["inspect", str(path), "--plot", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    assert "format:              tlora" in out and "variant:             ortho" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("R=4"))
    assert row.split()[-5:] == ["4", "3", "2", "1", "1"]
    from PIL import Image
    assert Image.open(tmp_path / "plot.png").size[0] > 100


def test_unknown_format_and_no_matching_module_are_one_line_exit_2(tmp_path, capsys):
    save_file({"foo.bar": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown weights format" in err
    unet = tiny_unet()
    net = tlora.inject(unet, TLoRAConfig(rank=4))
    tlora.save(net, tmp_path / "w.safetensors")
    other = tmp_path / "other"
    build_pipeline("sd3").save_pretrained(other)
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "o.safetensors"), "--to", "kohya",
                 "--model", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not have" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_kohya_export_carries_kohyas_ss_metadata_with_the_runs_values(tmp_path):
    # what A1111's, Forge's and Civitai's info panels read: base model, dim / alpha, resolution, steps, trigger words
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 180, 40)).save(tmp_path / "star.png")
    run = tmp_path / "run"
    assert main(["train", "--model", "toyworld", "--image", str(tmp_path / "star.png"), "--placeholder", "sks",
                 "--class", "shape", "--steps", "2", "--out", str(run), "--set", "tlora.rank=8",
                 "--set", "tlora.min_rank=2", "--set", "learning_rate=0.0005"]) == 0
    out = tmp_path / "my-star.safetensors"
    assert main(["convert", str(run / "tlora.safetensors"), str(out), "--to", "kohya"]) == 0
    meta = __import__("safetensors").safe_open(str(out), "pt").metadata()
    sd = load_file(str(out))
    assert {int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")} == {16}   # ortho: 2 × rank
    assert {k: meta[k] for k in ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                                 "ss_resolution", "ss_max_train_steps", "ss_output_name", "ss_sd_model_name",
                                 "ss_learning_rate", "ss_seed")} == {
        "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora", "ss_network_dim": "16",
        "ss_network_alpha": "16.0", "ss_resolution": "(32, 32)", "ss_max_train_steps": "2",
        "ss_output_name": "my-star", "ss_sd_model_name": "toyworld", "ss_learning_rate": "0.0005", "ss_seed": "0"}
    assert json.loads(meta["ss_tag_frequency"]) == {tmp_path.name: {"sks shape": 1}}
    assert json.loads(meta["tlora_export"])["schedule"] == {"rank": 8, "min_rank": 2, "exponent": 1.0,
                                                            "num_train_timesteps": 1000}
    assert all(isinstance(v, str) for v in meta.values())
