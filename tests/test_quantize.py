"""A quantized frozen base (tlora.quantize): training, sampling and the adapter math on int8 / nf4 layers.

The denoiser is quantized by diffusers' own quantization_config on tiny pipelines saved to disk (the real
from_pretrained path); bitsandbytes layers, whose diffusers integration refuses the CPU, are built directly."""
import json
import sys

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import tlora
from tlora.cli import main
from tlora.generate import load_pipeline
from tlora.quantize import BasePrecision, dense_weight, is_quantized, quantized_layers
from tlora.train import train
from tlora.trainconfig import load_config

from conftest import perturb
from safetensors.torch import load_file
from test_train import cfg_for, data, killed_at_3_then_resumed, models  # noqa: F401  (fixtures)

HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


def masked_grads_of(network, t):
    """[(active ranks of the batch, max |grad| of the masked ranks, max |grad| of the active ranks)] per tensor."""
    sched = next(iter(network.schedules()))
    r_max = max(sched.ranks(t.tolist()))
    rows = []
    for name, p in network.named_parameters():
        g = p.grad.movedim(1 if name.endswith((".lora_up", ".p")) else 0, 0)
        rows.append((r_max, g[r_max:].abs().max().item() if r_max < g.shape[0] else 0.0, g[:r_max].abs().max().item()))
    return rows


@pytest.mark.parametrize("family,backend", [("sd15", None), ("sdxl", None), ("flux", None), ("sd15", "torchao")])
def test_three_steps_on_an_int8_base(models, data, tmp_path, family, backend):
    seen, losses, kinds = {}, [], set()

    def on_grads(step, network, t):
        seen[step] = masked_grads_of(network, t)
        kinds.update(type(a.base_layer.weight).__name__ for a in network.adapters.values())
    cfg = cfg_for(models[family], data, tmp_path / "o", base_precision="int8", quantization_backend=backend,
                  batch_size=4, gradient_checkpointing=True, validation_steps=0,
                  tlora=tlora.TLoRAConfig(rank=8, min_rank=1, target_module=()))
    final = train(cfg, on_grads=on_grads, on_step=lambda s, l: losses.append(l))
    assert kinds == {"WeightQBytesTensor" if backend is None else "Int8Tensor"}     # trained on the int8 weights
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    partial = [s for s, rows in seen.items() if rows[0][0] < 8]
    assert partial, "no step had masked ranks"
    assert all(masked == 0.0 for s in partial for _, masked, _ in seen[s])
    assert any(active > 0 for rows in seen.values() for _, _, active in rows)
    # the file is the same as from an unquantized run: it loads on the plain base and generates there
    header = tlora.weights.read_header(final)
    assert header["training"]["config"]["base_precision"] == "int8"
    pipe = load_pipeline(models[family])
    assert not quantized_layers(tlora.families.denoiser_of(pipe))
    with tlora.attach(pipe, final) as h:
        assert len(h.network.adapters) > 0
        img = pipe("a sks toy", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(img)).all()


def test_generate_samples_masked_on_an_int8_base(models, data, tmp_path):
    final = train(cfg_for(models["sd15"], data, tmp_path / "o", validation_steps=0, max_steps=1))
    argv = ["generate", "--model", models["sd15"], "--weights", str(final), "--prompt", "a sks toy", "--steps", "2",
            "--height", "32", "--width", "32", "--out"]
    assert main(argv + [str(tmp_path / "q"), "--base-precision", "int8"]) == 0
    assert main(argv + [str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "q" / "generate.json").read_text())
    assert record["base_precision"] == "int8" and record["schedule"]["rank"] == 4
    assert (tmp_path / "q" / "grid.png").is_file()
    # int8 weights change the image a little (so they were used), not into something else
    a, b = (torch.from_numpy(np.asarray(Image.open(tmp_path / d / "0000-seed0.png"), dtype=np.float32)) for d in "qp")
    assert a.shape == b.shape and 0 < (a - b).abs().mean() < 2, (a - b).abs().mean()


def _layer_pair(kind: str):
    """(a quantized linear layer, a plain nn.Linear holding its dequantized weight and the same bias)."""
    torch.manual_seed(0)
    plain = nn.Linear(64, 48)
    if kind in ("torchao", "quanto"):
        den = tlora.families.denoiser_of(load_pipeline(_layer_pair.model, base=BasePrecision("int8", kind)))
        q = next(m for n, m in den.named_modules() if n.endswith("attn1.to_q"))
    elif kind == "nf4":
        q = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32)
        q.load_state_dict(plain.state_dict())
        q = q.to("cpu")
    else:
        q = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)
        q.load_state_dict(plain.state_dict())
        q = q.to("cpu")
    ref = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(dense_weight(q).float())
        if q.bias is not None:
            ref.bias.copy_(q.bias.float())
    return q, ref


@pytest.mark.parametrize("kind", ["torchao", "quanto", "nf4", "bnb-int8"])
@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_adapter_on_a_quantized_layer_equals_it_on_the_dequantized_layer(models, kind, variant):
    _layer_pair.model = models["sd15"]
    q, ref = _layer_pair(kind)
    assert is_quantized(q) and not is_quantized(ref)
    nets = []
    for layer in (q, ref):
        net = tlora.inject(nn.ModuleDict({"l": layer}), tlora.TLoRAConfig(
            rank=4, min_rank=1, variant=variant, init="weight", target_name=("l",)),
            generator=torch.Generator().manual_seed(3))
        perturb(net.adapters["l"], seed=5)
        nets.append(net)
    a, b = nets[0].adapters["l"], nets[1].adapters["l"]
    assert a.weight_shape == tuple(ref.weight.shape)
    for k, v in a.state_dict().items():          # the ortho SVD read the dequantized weight: same init, bit for bit
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(3, 7, ref.in_features, generator=torch.Generator().manual_seed(1))
    for r in (1, 2, 4):
        mask = tlora.schedule.mask_from_ranks([r], 4)
        a.set_mask(mask)
        b.set_mask(mask)
        with torch.no_grad():
            assert torch.allclose(a.delta(x), b.delta(x), atol=1e-5, rtol=0)
            assert torch.allclose(q(x).float(), ref(x), atol=1e-5, rtol=0)


def test_merge_and_fold_never_touch_a_quantized_weight(models):
    _layer_pair.model = models["sd15"]
    q, _ = _layer_pair("quanto")
    net = tlora.inject(nn.ModuleDict({"l": q}), tlora.TLoRAConfig(rank=4, target_name=("l",)))
    perturb(net.adapters["l"])
    before = dense_weight(q).clone()
    x = torch.randn(2, q.in_features)
    with torch.no_grad():
        unfolded = q(x)
    with pytest.raises(ValueError, match="cannot merge into a quantized base weight") as e:
        net.merge()
    assert len(str(e.value).splitlines()) == 1
    net.set_folding("always")
    with torch.no_grad():
        folded = q(x)
    assert net.folded_ranks() == {"l": None} and torch.equal(folded, unfolded)
    assert torch.equal(dense_weight(q), before) and not net.adapters["l"].merged


def test_eight_bit_adam_trains_checkpoints_and_resumes_bit_identically_on_the_cpu(models, data, tmp_path):
    cfg = dict(optimizer="adamw8bit", validation_steps=0, max_steps=4, checkpointing_steps=2,
               tlora=tlora.TLoRAConfig(rank=64, variant="vanilla", target_module=()))
    straight, resumed = killed_at_3_then_resumed(models["sd15"], data, tmp_path, **cfg)
    state = load_file(tmp_path / "a" / "checkpoint-2" / "state.safetensors")
    eight = [k for k, v in state.items() if k.startswith("opt.") and v.dtype == torch.uint8]
    assert eight, "no optimizer state was stored in 8 bits"      # bitsandbytes' 8-bit state, not AdamW's float32
    a, _ = tlora.weights.read(straight)
    b, _ = tlora.weights.read(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,match", [
    (dict(base_precision="int3"), "base_precision in c.json must be one of 'no', 'int8', 'nf4', got 'int3'"),
    (dict(base_precision="int8", quantization_backend="gguf"), "quantization_backend in c.json must be one of"),
    (dict(base_precision="nf4", quantization_backend="torchao"), "nf4 is not available in torchao"),
    (dict(quantization_backend="torchao"), "needs base_precision int8 or nf4"),
])
def test_bad_precision_or_backend_is_one_line_exit_2_nothing_written(models, data, tmp_path, capsys, change, match):
    cfg = {"model": models["sd15"], "data_dir": data, "output_dir": str(tmp_path / "out"), "resolution": 32,
           "max_steps": 1, "device": "cpu", **change}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module,flags,match", [
    ("optimum.quanto", ["--set", "base_precision=int8"], "needs the package optimum-quanto: pip install optimum-quanto"),
    ("torchao", ["--set", "base_precision=int8", "--set", "quantization_backend=torchao"], "pip install torchao"),
])
def test_a_backend_that_is_not_installed_is_one_line(models, data, tmp_path, capsys, monkeypatch, module, flags,
                                                     match):
    monkeypatch.setitem(sys.modules, module, None)     # what Python does for a package that is not installed
    (tmp_path / "c.json").write_text(json.dumps({"model": models["sd15"], "data_dir": data, "resolution": 32,
                                                 "output_dir": str(tmp_path / "out"), "device": "cpu"}))
    assert main(["train", "--config", str(tmp_path / "c.json"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine nf4 runs; this checks the CPU-only refusal")
def test_nf4_on_a_cpu_only_machine_is_refused_in_one_line(models, data, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"model": models["sd15"], "data_dir": data, "resolution": 32,
                                                 "output_dir": str(tmp_path / "out"), "base_precision": "nf4"}))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a GPU" in err and "use base_precision int8 (quanto)" in err, err
    assert not (tmp_path / "out").exists()
    assert main(["generate", "--model", models["sd15"], "--weights", __file__, "--prompt", "x",
                 "--out", str(tmp_path / "g"), "--base-precision", "nf4"]) == 2
    assert "needs a GPU" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_nf4_config_is_diffusers_bitsandbytes_qlora_recipe():
    cfg = BasePrecision("nf4").diffusers_config(torch.bfloat16)
    assert type(cfg).__name__ == "BitsAndBytesConfig"
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert type(BasePrecision("int8").diffusers_config()).__name__ == "QuantoConfig"
    assert type(BasePrecision("int8", "torchao").diffusers_config()).__name__ == "TorchAoConfig"


@pytest.mark.parametrize("value,expect", [("int8-torchao", ("int8", "torchao")), ("int8-quanto", ("int8", "quanto")),
                                          ("nf4-bnb", ("nf4", "bitsandbytes")), ("no_change", ("no", None))])
def test_simpletuner_base_model_precision_maps_onto_base_precision(tmp_path, value, expect):
    (tmp_path / "lyc.json").write_text(json.dumps({"algo": "tlora", "linear_dim": 4}))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "lora", "lora_type": "lycoris", "lycoris_config": str(tmp_path / "lyc.json"),
        "pretrained_model_name_or_path": "x/y", "instance_data_dir": str(tmp_path), "base_model_precision": value}))
    cfg = load_config(str(tmp_path / "config.json"), [])
    assert (cfg.base_precision, cfg.quantization_backend) == expect


def test_simpletuner_precision_tlora_cannot_load_is_one_line(tmp_path, capsys):
    (tmp_path / "lyc.json").write_text(json.dumps({"algo": "tlora", "linear_dim": 4}))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "lora", "lora_type": "lycoris", "lycoris_config": str(tmp_path / "lyc.json"),
        "pretrained_model_name_or_path": "x/y", "instance_data_dir": str(tmp_path), "output_dir": str(tmp_path / "o"),
        "base_model_precision": "int4-quanto"}))
    assert main(["train", "--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "base_model_precision 'int4-quanto' is not supported" in err
    assert not (tmp_path / "o").exists()
