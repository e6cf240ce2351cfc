"""Hostile input, as a new user (or an attacker) would type it, across every subcommand and config source.

Each case runs ``tlora`` in this process and must give: exit code 2, exactly one line on stderr naming the key,
flag or file at fault, no traceback, and the output location byte-for-byte as it was before the call (absent
stays absent, a file stays the same file, a run folder keeps every byte).

Placeholders in arguments and file contents: ``{model}`` a tiny SD1.5 pipeline folder, ``{data}`` two training
images, ``{w}`` a good tlora weights file for it, ``{official}`` an official checkpoint + ``{hp}`` its hparams.yml,
``{in}`` this case's input folder, ``{out}`` the output location the case must leave alone.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tlora
from tlora.cli import main
from tlora.tiny import build_pipeline
from tlora.weights import write_native

from conftest import perturb, with_flags
from conftest import official_checkpoint

DROP = object()     # a key to leave out of a config (None stays: it is JSON null)
DEEP = '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    pipe = build_pipeline("sd15")
    pipe.save_pretrained(root / "model")
    (root / "data").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "data" / f"{i}.png")
    net = tlora.inject(pipe.unet, tlora.TLoRAConfig(rank=4))
    perturb(net)
    tlora.save(net, root / "w.safetensors", metadata={"family": "sd15", "base_model": "tiny"})
    net.remove()
    save_file(official_checkpoint(pipe.unet, "lora", 4), str(root / "official.safetensors"))
    (root / "hp.yml").write_text("lora_rank: 4\nmin_rank: 2\nalpha_rank_scale: 1.0\n")
    # a finished 2-step run with checkpoint-2, for the --resume cases
    run_cfg = dict(BASE, model=str(root / "model"), data_dir=str(root / "data"), output_dir=str(root / "run"),
                   max_steps=2, checkpointing_steps=2, num_validation_images=0)
    (root / "run.json").write_text(json.dumps(run_cfg))
    assert main(["train", "--config", str(root / "run.json")]) == 0
    return root


BASE = {"resolution": 32, "max_steps": 1, "device": "cpu", "validation_steps": 0, "tlora": {"rank": 4}}


def cfg(**change):
    """A tlora JSON config (the good one, with ``change`` applied; DROP removes the key)."""
    d = dict(BASE, model="{model}", data_dir="{data}", output_dir="{out}")
    for k, v in change.items():
        if v is DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def train_cfg(says, **change):
    return (["train", "--config", "{in}/c.json"], {"c.json": cfg(**change)}, says)


def tl(says, **change):
    return train_cfg(says, tlora={"rank": 4, **change})


LYC = {"algo": "tlora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 4, "tlora_min_rank": 1, "tlora_alpha": 1.0,
       "apply_preset": {"target_module": ["Attention"]}}


def simpletuner(says, lycoris=None, **change):
    st = {"model_type": "lora", "lora_type": "lycoris", "lycoris_config": "{in}/lyc.json",
          "pretrained_model_name_or_path": "{model}", "instance_data_dir": "{data}", "output_dir": "{out}",
          "max_train_steps": 1, "resolution": 32}
    for k, v in change.items():
        if v is DROP:
            st.pop(k, None)
        else:
            st[k] = v
    files = {"st.json": st, "lyc.json": dict(LYC, **(lycoris or {}))}
    return (["train", "--config", "{in}/st.json", "--device", "cpu"], files, says)


OFF = ["train", "--pretrained_model_name_or_path={model}", "--train_data_dir={data}", "--output_dir={out}",
       "--trainer_type=ortho_lora", "--class_name=dog", "--placeholder_token=sks", "--lora_rank=4", "--min_rank=2",
       "--resolution=32", "--num_train_epochs=1", "--device", "cpu"]


def official(says, *flags):
    return (OFF + list(flags), {}, says)


GEN = ["generate", "--model", "{model}", "--weights", "{w}", "--prompt", "a sks dog", "--steps", "1",
       "--height", "32", "--width", "32", "--out", "{out}"]


def gen(says, *flags, files=None, drop=()):
    return (with_flags(GEN, flags, drop), files or {}, says)


def conv(says, *flags, src="{w}", files=None):
    return (["convert", src, "{out}", "--to", "diffusers", *flags], files or {}, says)


EVAL = ["evaluate", "--images", "{in}/imgs", "--reference", "{data}", "--clip", "{in}/noclip", "--dino", "none",
        "--out", "{out}"]


def evaluate(says, *flags, files=None):
    return (with_flags(EVAL, flags), {"imgs/0.png": "PNG", **(files or {})}, says)


def crafted(header_change):
    """A native weights file whose header is well-formed JSON with a valid checksum but the wrong structure."""
    def make(path, world):
        tensors, meta = tlora.weights.read(world / "w.safetensors")
        header = json.loads(meta["tlora"])
        header_change(header)
        write_native(tensors, header, path)
    return make


def nan_weights(path, world):
    """A NaN in one tensor of ``path`` (or, for a new file, of the good weights), with a checksum that matches (as
    a training run that went NaN would write it)."""
    tensors, meta = tlora.weights.read(path if Path(path).exists() else world / "w.safetensors")
    k = next(iter(tensors))
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] = float("nan")
    write_native(tensors, json.loads(meta["tlora"]), path)


def no_checksum(path, world):
    tensors, meta = tlora.weights.read(world / "w.safetensors")
    meta.pop("tlora_sha256")
    save_file(tensors, str(path), metadata=meta)


def resume_from(change_state=None, change_weights=None):
    """The module's finished run copied to {out}, its checkpoint-2 optionally damaged."""
    def make(out, world):
        shutil.copytree(world / "run", out)
        ck = out / "checkpoint-2"
        if change_state:
            change_state(ck)
        if change_weights:
            change_weights(ck / "tlora.safetensors", world)
    return make


def _garbage(path, world=None):
    Path(path).write_bytes(b"\x00\x01not safetensors at all")


def _bad_state_json(ck):
    (ck / "state.json").write_text("{nope")


def _state_missing(ck):
    (ck / "state.safetensors").unlink()


CASES = {
    # -- tlora JSON config: numbers ------------------------------------------------------------------------------
    "max_grad_norm NaN": train_cfg("max_grad_norm", max_grad_norm=float("nan")),
    "max_grad_norm negative": train_cfg("max_grad_norm", max_grad_norm=-1.0),
    "adam_beta1 2": train_cfg("adam_beta1", adam_beta1=2.0),
    "adam_beta2 -0.1": train_cfg("adam_beta2", adam_beta2=-0.1),
    "adam_epsilon 0": train_cfg("adam_epsilon", adam_epsilon=0.0),
    "weight_decay -1": train_cfg("weight_decay", weight_decay=-1.0),
    "learning_rate 1e38": train_cfg("learning_rate", learning_rate=1e38),
    "learning_rate 0": train_cfg("learning_rate", learning_rate=0.0),
    "learning_rate inf": train_cfg("learning_rate", learning_rate=float("inf")),
    "learning_rate string": train_cfg("learning_rate", learning_rate="1e-4"),
    "learning_rate list": train_cfg("learning_rate", learning_rate=[]),
    "learning_rate null": train_cfg("learning_rate", learning_rate=None),
    "validation_prompts null": train_cfg("validation_prompts", validation_prompts=None),
    "model null": train_cfg("model", model=None),
    "lr_warmup_steps -5": train_cfg("lr_warmup_steps", lr_warmup_steps=-5),
    "lr_scheduler bogus": train_cfg("lr_scheduler", lr_scheduler="bogus"),
    "lr_scheduler number": train_cfg("lr_scheduler", lr_scheduler=3),
    "optimizer sgd": train_cfg("optimizer", optimizer="sgd"),
    "mixed_precision fp8": train_cfg("mixed_precision", mixed_precision="fp8"),
    "prediction_type bogus": train_cfg("prediction_type", prediction_type="x0"),
    "best_metric FID": train_cfg("best_metric", best_metric="FID"),
    "seed 10^25": train_cfg("seed", seed=10 ** 25),
    "seed negative": train_cfg("seed", seed=-1),
    "seed float": train_cfg("seed", seed=1.5),
    "seed bool": train_cfg("seed", seed=True),
    "max_steps 3.7": train_cfg("max_steps", max_steps=3.7),
    "max_steps true": train_cfg("max_steps", max_steps=True),
    "max_steps 0": train_cfg("max_steps", max_steps=0),
    "batch_size -1": train_cfg("batch_size", batch_size=-1),
    "gradient_accumulation_steps 0": train_cfg("gradient_accumulation_steps", gradient_accumulation_steps=0),
    "resolution 30": train_cfg("resolution", resolution=30),
    "resolution string": train_cfg("resolution", resolution="512"),
    "resolution huge": train_cfg("resolution", resolution=2 ** 40),
    "checkpointing_steps 0": train_cfg("checkpointing_steps", checkpointing_steps=0),
    "checkpoints_total_limit 0": train_cfg("checkpoints_total_limit", checkpoints_total_limit=0),
    "validation_steps -1": train_cfg("validation_steps", validation_steps=-1),
    "num_validation_images -1": train_cfg("num_validation_images", num_validation_images=-1),
    "validation_guidance NaN": train_cfg("validation_guidance", validation_guidance=float("nan")),
    "validation_guidance string": train_cfg("validation_guidance", validation_guidance="high"),
    "validation_multiplier inf": train_cfg("validation_multiplier", validation_multiplier=float("inf")),
    "ortho_reg_weight -1": train_cfg("ortho_reg_weight", ortho_reg_weight=-1.0),
    "prior_loss_weight NaN": train_cfg("prior_loss_weight", prior_loss_weight=float("nan")),
    "gradient_checkpointing 1": train_cfg("gradient_checkpointing", gradient_checkpointing=1),
    # -- tlora JSON config: strings, lists, paths ----------------------------------------------------------------
    "prompt_template bad field": train_cfg("prompt_template", prompt_template="a photo of {nope}"),
    "prompt_template positional": train_cfg("prompt_template", prompt_template="a photo of {0}"),
    "prompt_template unbalanced": train_cfg("prompt_template", prompt_template="a photo of {placeholder"),
    "prompt_template attribute": train_cfg("prompt_template", prompt_template="{placeholder.__class__}"),
    "validation_prompts number": train_cfg("validation_prompts", validation_prompts=5),
    "validation_prompts list of numbers": train_cfg("validation_prompts", validation_prompts=[1, 2]),
    "validation_prompts mapping": train_cfg("validation_prompts", validation_prompts={"a": 1}),
    "validation_prompts empty string": train_cfg("validation_prompts", validation_prompts=[""]),
    "placeholder number": train_cfg("placeholder", placeholder=7),
    "class_name list": train_cfg("class_name", class_name=["dog"]),
    "device bogus": train_cfg("device", device="bogus"),
    "device cuda without CUDA": train_cfg("device", device="cuda"),
    "device number": train_cfg("device", device=0),
    "unknown key": train_cfg("learning_rat", learning_rat=1e-4),
    "model missing": train_cfg("model", model="/no/such/model"),
    "model empty": train_cfg("model", model=""),
    "model not a pipeline": train_cfg("model", model="{data}"),
    "data_dir missing": train_cfg("data_dir", data_dir="/no/such/dir"),
    "data_dir is a file": train_cfg("data_dir", data_dir="{w}"),
    "one_image missing": train_cfg("one_image", one_image="nope.png"),
    "one_image escapes data_dir": train_cfg("one_image", one_image="../w.safetensors"),
    "class_data_dir missing": train_cfg("class_data_dir", class_data_dir="/no/such/dir"),
    "eval_clip_model missing": train_cfg("eval_clip_model", eval_clip_model="/no/clip"),
    "best_metric DINO_IS without dino": train_cfg("eval_dino_model", eval_clip_model="{in}", best_metric="DINO_IS"),
    "data_dir empty": (["train", "--config", "{in}/c.json"], {"c.json": cfg(data_dir="{in}/d"), "d/": None},
                       "no images"),
    "data_dir broken image": (["train", "--config", "{in}/c.json"],
                              {"c.json": cfg(data_dir="{in}/d"), "d/x.png": b"not a png"}, "x.png"),
    "caption not UTF-8": (["train", "--config", "{in}/c.json"],
                          {"c.json": cfg(data_dir="{in}/d"), "d/a.png": "PNG", "d/a.txt": b"\xff\xfe caption"},
                          "a.txt"),
    "output_dir is a file": (["train", "--config", "{in}/c.json"], {"c.json": cfg(), "@out": b"a file"},
                             "output_dir"),
    "output_dir below a file": (["train", "--config", "{in}/c.json"], {"c.json": cfg(output_dir="{out}/sub"),
                                                                        "@out": b"a file"}, "output_dir"),
    "output_dir in /proc": train_cfg("output_dir", output_dir="/proc/tlora-out"),
    # -- tlora JSON config: the T-LoRA section -------------------------------------------------------------------
    "tlora rank 0": tl("rank", rank=0),
    "tlora rank true": tl("rank", rank=True),
    "tlora rank 3.7": tl("rank", rank=3.7),
    "tlora min_rank true": tl("min_rank", min_rank=True),
    "tlora exponent true": tl("exponent", exponent=True),
    "tlora multiplier true": tl("multiplier", multiplier=True),
    "tlora min_rank above rank": tl("min_rank", min_rank=5),
    "tlora exponent NaN": tl("exponent", exponent=float("nan")),
    "tlora exponent -3": tl("exponent", exponent=-3.0),
    "tlora variant bogus": tl("variant", variant="dora"),
    "tlora unknown key": tl("ranks", ranks=4),
    "tlora not a mapping": train_cfg("tlora", tlora=[4]),
    "tlora target_module number": tl("target_module", target_module=5),
    "tlora matches nothing": tl("target_module", target_module=["NoSuchModule"]),
    # -- the config file itself, and --set -----------------------------------------------------------------------
    "config missing": (["train", "--config", "{in}/none.json"], {}, "none.json"),
    "config is a folder": (["train", "--config", "{in}"], {}, "config"),
    "config syntax": (["train", "--config", "{in}/c.json"], {"c.json": "{'model': 1"}, "c.json"),
    "config a list": (["train", "--config", "{in}/c.json"], {"c.json": [1, 2]}, "c.json"),
    "config 100k deep": (["train", "--config", "{in}/c.json"], {"c.json": DEEP}, "c.json"),
    "config not UTF-8": (["train", "--config", "{in}/c.json"], {"c.json": b'{"model": "\xff"}'}, "c.json"),
    "config empty": (["train", "--config", "{in}/c.json"], {"c.json": ""}, "c.json"),
    "--set without =": (["train", "--config", "{in}/c.json", "--set", "max_steps"], {"c.json": cfg()}, "--set"),
    "--set NaN": (["train", "--config", "{in}/c.json", "--set", "max_grad_norm=NaN"], {"c.json": cfg()},
                  "max_grad_norm"),
    "--set string for int": (["train", "--config", "{in}/c.json", "--set", "tlora.rank=abc"], {"c.json": cfg()},
                             "rank"),
    "--set into a value": (["train", "--config", "{in}/c.json", "--set", "seed.x=1"], {"c.json": cfg()}, "seed"),
    "--set unknown key": (["train", "--config", "{in}/c.json", "--set", "stpes=3"], {"c.json": cfg()}, "stpes"),
    "--config and official flags": (["train", "--config", "{in}/c.json", "--lora_rank=4"], {"c.json": cfg()},
                                    "--config"),
    "no config at all": (["train"], {}, "--config"),
    "--device bogus": (["train", "--config", "{in}/c.json", "--device", "tpu9"], {"c.json": cfg(device=DROP)},
                       "device"),
    # -- --resume ------------------------------------------------------------------------------------------------
    "resume missing": (["train", "--config", "{in}/c.json", "--resume", "{in}/checkpoint-9"], {"c.json": cfg()},
                       "checkpoint-9"),
    "resume a file": (["train", "--config", "{in}/c.json", "--resume", "{w}"], {"c.json": cfg()}, "resume"),
    "resume state.json corrupted": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                                    {"c.json": cfg(max_steps=4), "@out": resume_from(_bad_state_json)},
                                    "state.json"),
    "resume state tensors missing": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                                     {"c.json": cfg(max_steps=4), "@out": resume_from(_state_missing)},
                                     "state.safetensors"),
    "resume weights garbage": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                               {"c.json": cfg(max_steps=4), "@out": resume_from(change_weights=_garbage)},
                               "tlora.safetensors"),
    "resume weights NaN": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                           {"c.json": cfg(max_steps=4), "@out": resume_from(change_weights=nan_weights)},
                           "non-finite"),
    "resume other rank": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                          {"c.json": cfg(max_steps=4, tlora={"rank": 8}), "@out": resume_from()}, "rank"),
    "resume other learning rate": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                                   {"c.json": cfg(max_steps=4, learning_rate=1e-3), "@out": resume_from()},
                                   "learning_rate"),
    "resume past max_steps": (["train", "--config", "{in}/c.json", "--resume", "latest"],
                              {"c.json": cfg(max_steps=1), "@out": resume_from()}, "max_steps"),
    "new run into a folder of another run": (["train", "--config", "{in}/c.json"],
                                             {"c.json": cfg(max_steps=4, tlora={"rank": 8}), "@out": resume_from()},
                                             "of another run (tlora.rank: 4 → 8)"),
    # -- SimpleTuner config + LyCORIS JSON ------------------------------------------------------------------------
    "ST lycoris_config missing": simpletuner("lycoris_config", lycoris_config="{in}/none.json"),
    "ST lycoris_config list": simpletuner("lycoris_config", lycoris_config=["a.json"]),
    "ST lycoris_config empty list": simpletuner("lycoris_config", lycoris_config=[]),
    "ST lycoris_config null": simpletuner("lycoris_config", lycoris_config=None),
    "ST model_type number": simpletuner("model_type", model_type=5),
    "ST model_type full": simpletuner("model_type", model_type="full"),
    "ST lora_type standard": simpletuner("lora_type", lora_type="standard"),
    "ST resolution string": simpletuner("resolution", resolution="1024"),
    "ST resolution 1.5": simpletuner("resolution", resolution=1.5),
    "ST max_train_steps -1": simpletuner("max_train_steps", max_train_steps=-1),
    "ST learning_rate list": simpletuner("learning_rate", learning_rate=[1e-4]),
    "ST validation_prompt number": simpletuner("validation_prompt", validation_prompt=5),
    "ST instance_prompt list": simpletuner("instance_prompt", instance_prompt=["x"]),
    "ST num_train_epochs string": simpletuner("num_train_epochs", num_train_epochs="ten", max_train_steps=DROP),
    "ST data_backend_config missing": simpletuner("data_backend_config", data_backend_config="{in}/none.json",
                                                  instance_data_dir=DROP),
    "ST data_backend_config numbers": simpletuner("db.json", data_backend_config="{in}/db.json",
                                                  instance_data_dir=DROP)[:1] + (
        {**simpletuner("", data_backend_config="{in}/db.json", instance_data_dir=DROP)[1], "db.json": [1, 2]},
        "db.json"),
    "ST use_8bit_adam string": simpletuner("use_8bit_adam", use_8bit_adam="yes"),
    "LyCORIS algo lora": simpletuner("algo", lycoris={"algo": "lora"}),
    "LyCORIS linear_dim true": simpletuner("linear_dim", lycoris={"linear_dim": True}),
    "LyCORIS linear_dim 3.7": simpletuner("linear_dim", lycoris={"linear_dim": 3.7}),
    "LyCORIS linear_dim string": simpletuner("linear_dim", lycoris={"linear_dim": "8"}),
    "LyCORIS tlora_alpha NaN": simpletuner("tlora_alpha", lycoris={"tlora_alpha": float("nan")}),
    "LyCORIS tlora_min_rank list": simpletuner("tlora_min_rank", lycoris={"tlora_min_rank": []}),
    "LyCORIS tlora_min_rank null": simpletuner("tlora_min_rank", lycoris={"tlora_min_rank": None}),
    "LyCORIS linear_dim null": simpletuner("linear_dim", lycoris={"linear_dim": None}),
    "LyCORIS apply_preset list": simpletuner("apply_preset", lycoris={"apply_preset": ["Attention"]}),
    # -- the official repository's flags --------------------------------------------------------------------------
    "official --lora_rank 0": official("--lora_rank", "--lora_rank=0"),
    "official --min_rank 0": official("--min_rank", "--min_rank=0"),
    "official --min_rank above rank": official("--min_rank", "--min_rank=9"),
    "official --alpha_rank_scale 0": official("--alpha_rank_scale", "--alpha_rank_scale=0"),
    "official --alpha_rank_scale nan": official("--alpha_rank_scale", "--alpha_rank_scale=nan"),
    "official --num_train_epochs 0": official("num_train_epochs", "--num_train_epochs=0"),
    "official --trainer_type empty": official("--trainer_type", "--trainer_type="),
    "official --trainer_type bogus": official("--trainer_type", "--trainer_type=dora"),
    "official --sig_type empty": official("--sig_type", "--sig_type="),
    "official --trainer_class bogus": official("--trainer_class", "--trainer_class=flux_tlora"),
    "official --lora_rank abc": official("--lora_rank", "--lora_rank=abc"),
    "official --mixed_precision fp8": official("mixed_precision", "--mixed_precision=fp8"),
    "official --seed 10^25": official("seed", "--seed=10000000000000000000000000"),
    "official --learning_rate -1": official("learning_rate", "--learning_rate=-1"),
    "official --checkpointing_steps 0": official("checkpointing_steps", "--checkpointing_steps=0"),
    "official --num_val_imgs_per_prompt -2": official("num_val_imgs_per_prompt", "--num_val_imgs_per_prompt=-2"),
    "official --validation_prompts only #": official("--validation_prompts", "--validation_prompts=#"),
    # -- generate ------------------------------------------------------------------------------------------------
    "generate weights missing": gen("weights file not found", "--weights", "{in}/none.safetensors"),
    "generate weights garbage": gen("bad.safetensors", "--weights", "{in}/bad.safetensors",
                                    files={"bad.safetensors": b"\x00garbage"}),
    "generate weights NaN": gen("non-finite", "--weights", "{in}/nan.safetensors",
                                files={"nan.safetensors": nan_weights}),
    "generate weights without checksum": gen("checksum", "--weights", "{in}/nock.safetensors",
                                             files={"nock.safetensors": no_checksum}),
    "generate crafted modules": gen("modules", "--weights", "{in}/c.safetensors",
                                    files={"c.safetensors": crafted(lambda h: h.update(modules=5))}),
    "generate crafted config": gen("config", "--weights", "{in}/c.safetensors",
                                   files={"c.safetensors": crafted(lambda h: h.update(config="x"))}),
    "generate crafted rank": gen("rank", "--weights", "{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(rank="4") for m in h["modules"].values()])}),
    "generate crafted T": gen("num_train_timesteps", "--weights", "{in}/c.safetensors", files={
        "c.safetensors": crafted(lambda h: h.update(num_train_timesteps=-5))}),
    "generate header is a list": gen("header", "--weights", "{in}/c.safetensors", files={
        "c.safetensors": crafted(lambda h: (h.clear()))}),
    "generate weights of another model": gen("wrong base model", "--weights", "{in}/c.safetensors", files={
        "c.safetensors": crafted(lambda h: [m.update(base_shape=[7, 7]) for m in h["modules"].values()])}),
    "generate multiplier nan": gen("--multiplier", "--multiplier", "nan"),
    "generate guidance inf": gen("--guidance", "--guidance", "inf"),
    "generate multiplier inf": gen("--multiplier", "--multiplier", "inf"),
    "generate steps 0": gen("--steps", "--steps", "0"),
    "generate num-images 0": gen("--num-images", "--num-images", "0"),
    "generate height 30": gen("--height", "--height", "30"),
    "generate seed 10^25": gen("--seed", "--seed", str(10 ** 25)),
    "generate seed -1": gen("--seed", "--seed", "-1"),
    "generate device bogus": gen("--device", "--device", "tpu9"),
    "generate device cuda": gen("--device", "--device", "cuda"),
    "generate prompts file not UTF-8": gen("p.txt", "--prompts-file", "{in}/p.txt", files={"p.txt": b"\xff\xfe\n"}),
    "generate prompts file missing": gen("p.txt", "--prompts-file", "{in}/p.txt"),
    "generate prompts file is a folder": gen("prompts file", "--prompts-file", "{in}"),
    "generate prompt empty": gen("prompt", "--prompt", " ", drop=("--prompt",)),
    "generate out is a file": gen("--out", files={"@out": b"a file"}),
    "generate out below a file": (GEN[:-1] + ["{out}/sub"], {"@out": b"a file"}, "--out"),
    "generate model missing": gen("model not found", "--model", "/no/such/model"),
    "generate model not a pipeline": gen("model_index.json", "--model", "{data}"),
    "generate official file without schedule": gen("tlora convert", "--weights", "{official}"),
    # -- convert -------------------------------------------------------------------------------------------------
    "convert input missing": conv("input file not found", src="{in}/none.safetensors"),
    "convert input garbage": conv("bad.safetensors", src="{in}/bad.safetensors", files={"bad.safetensors": b"xx"}),
    "convert input NaN": conv("non-finite", src="{in}/nan.safetensors", files={"nan.safetensors": nan_weights}),
    "convert crafted modules": conv("modules", src="{in}/c.safetensors",
                                    files={"c.safetensors": crafted(lambda h: h.update(modules=[1]))}),
    "convert crafted variant": conv("variant", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(variant="dora") for m in h["modules"].values()])}),
    "convert at-timestep 2000": conv("--at-timestep", "--at-timestep", "2000"),
    "convert at-timestep nan": conv("--at-timestep", "--at-timestep", "nan"),
    "convert exponent -3": conv("--exponent", "--exponent", "-3", src="{official}"),
    "convert exponent nan": conv("--exponent", "--exponent", "nan", src="{official}"),
    "convert min-rank 0": conv("--min-rank", "--min-rank", "0", src="{official}"),
    "convert hparams a list": conv("hp.yml", "--hparams", "{in}/hp.yml", src="{official}",
                                   files={"hp.yml": "- 1\n- 2\n"}),
    "convert hparams not UTF-8": conv("hp.yml", "--hparams", "{in}/hp.yml", src="{official}",
                                      files={"hp.yml": b"lora_rank: \xff\n"}),
    "convert hparams min_rank string": conv("min_rank", "--hparams", "{in}/hp.yml", src="{official}",
                                            files={"hp.yml": "min_rank: two\nalpha_rank_scale: 1.0\n"}),
    "convert hparams alpha bool": conv("alpha_rank_scale", "--hparams", "{in}/hp.yml", src="{official}",
                                       files={"hp.yml": "min_rank: 2\nalpha_rank_scale: true\n"}),
    "convert hparams missing": conv("hparams", "--hparams", "{in}/none.yml", src="{official}"),
    "convert output is a folder": conv("{out}", files={"@out/": None}),
    "convert output below a file": (["convert", "{w}", "{out}/x.safetensors", "--to", "tlora"], {"@out": b"file"},
                                    "x.safetensors"),
    "convert lycoris without model": (["convert", "{in}/l.safetensors", "{out}", "--to", "tlora"],
                                      {"l.safetensors": lambda p, w: save_file(
                                          {"lycoris_a.q_layer.weight": torch.zeros(2, 2)}, str(p))}, "--model"),
    "convert plain LoRA": (["convert", "{in}/k.safetensors", "{out}", "--to", "tlora"],
                           {"k.safetensors": lambda p, w: save_file(
                               {"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(p))}, "k.safetensors"),
    # -- inspect -------------------------------------------------------------------------------------------------
    "inspect missing": (["inspect", "{in}/none.safetensors"], {}, "none.safetensors"),
    "inspect garbage": (["inspect", "{in}/b.safetensors"], {"b.safetensors": b"\xff" * 64}, "b.safetensors"),
    "inspect crafted schedule": (["inspect", "{in}/c.safetensors"], {"c.safetensors": crafted(
        lambda h: [m.update(min_rank=None) for m in h["modules"].values()])}, "min_rank"),
    "inspect crafted modules": (["inspect", "{in}/c.safetensors"],
                                {"c.safetensors": crafted(lambda h: h.update(modules="x"))}, "modules"),
    "inspect plot to a folder": (["inspect", "{w}", "--plot", "{out}"], {"@out/": None}, "--plot"),
    "inspect plot below a file": (["inspect", "{w}", "--plot", "{out}/p.png"], {"@out": b"file"}, "--plot"),
    # -- evaluate ------------------------------------------------------------------------------------------------
    "evaluate images missing": evaluate("none", "--images", "{in}/none"),
    "evaluate reference missing": evaluate("none", "--reference", "{in}/none"),
    "evaluate out is a folder": evaluate("--out", files={"@out/": None}),
    "evaluate out below a file": (EVAL[:-1] + ["{out}/r.json"], {"imgs/0.png": "PNG", "@out": b"file"}, "--out"),
    "evaluate batch-size 0": evaluate("--batch-size", "--batch-size", "0"),
    "evaluate device bogus": evaluate("--device", "--device", "tpu9"),
    "evaluate clip missing": evaluate("noclip", "--images", "{in}/imgs"),
    "evaluate generate.json escapes": evaluate("generate.json", "--images", "{in}/g/generate.json", files={
        "g/generate.json": {"images": [{"file": "../../../etc/hostname", "prompt": "p"}]}}),
    "evaluate generate.json wrong shape": evaluate("generate.json", "--images", "{in}/g/generate.json", files={
        "g/generate.json": {"images": 5}}),
    "evaluate generate.json deep": evaluate("generate.json", "--images", "{in}/g/generate.json", files={
        "g/generate.json": DEEP}),
    "evaluate prompts count": evaluate("--prompts", "--prompts", "a", "b", "c"),
    # -- quantized base, memory ------------------------------------------------------------------------------------
    "train base_precision int3": train_cfg("base_precision", base_precision="int3"),
    "train base_precision number": train_cfg("base_precision", base_precision=8),
    "train backend gguf": train_cfg("quantization_backend", base_precision="int8", quantization_backend="gguf"),
    "train backend without precision": train_cfg("quantization_backend", quantization_backend="quanto"),
    "train nf4 through quanto": train_cfg("quanto", base_precision="nf4", quantization_backend="quanto"),
    "train dry-run bad precision": (["train", "--config", "{in}/c.json", "--dry-run"],
                                    {"c.json": cfg(base_precision="fp4")}, "base_precision"),
    "generate base-precision int4": (["generate", "--model", "{model}", "--weights", "{w}", "--prompt", "x",
                                      "--out", "{out}", "--base-precision", "int4"], {}, "base_precision"),
    "memory model missing": (["memory", "--model", "{in}/none"], {}, "model config not found"),
    "memory config not json": (["memory", "--model", "{in}/config.json"], {"config.json": "{not json"}, "JSON"),
    "memory config not a model": (["memory", "--model", "{in}/config.json"], {"config.json": {"a": 1}},
                                  "_class_name"),
    "memory config of a vae": (["memory", "--model", "{in}/config.json"],
                               {"config.json": {"_class_name": "AutoencoderKL"}}, "AutoencoderKL"),
    "memory batch 0": (["memory", "--model", "{model}", "--batch", "0"], {}, "--batch"),
    "memory backend bogus": (["memory", "--model", "{model}", "--base-precision", "int8",
                              "--quantization-backend", "gguf"], {}, "quantization_backend"),
    # -- demo ----------------------------------------------------------------------------------------------------
    "demo steps 0": (["demo", "--steps", "0", "--out", "{out}"], {}, "--steps"),
    "demo rank -1": (["demo", "--rank", "-1", "--out", "{out}"], {}, "--rank"),
    "demo out is a file": (["demo", "--out", "{out}"], {"@out": b"a file"}, "--out"),
}


def _fill(x, subs):
    if isinstance(x, str):
        for k, v in subs.items():
            x = x.replace("{" + k + "}", v)
        return x
    if isinstance(x, list):
        return [_fill(i, subs) for i in x]
    if isinstance(x, dict):
        return {k: _fill(v, subs) for k, v in x.items()}
    return x


def _make(path: Path, content, world: Path, subs):
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(content):
        content(path, world)
    elif content == "PNG":
        Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(_fill(content, subs))
    else:
        path.write_text(json.dumps(_fill(content, subs)))


def snapshot(p: Path):
    """Every path under ``p`` with its bytes (files) and mode; None when ``p`` does not exist."""
    if not p.exists():
        return None
    if p.is_file():
        return {".": (p.read_bytes(), p.stat().st_mode)}
    return {str(q.relative_to(p)): (q.read_bytes() if q.is_file() else None, q.stat().st_mode)
            for q in sorted(p.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(world, tmp_path, capsys, name):
    argv, files, says = CASES[name]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    subs = {"model": str(world / "model"), "data": str(world / "data"), "w": str(world / "w.safetensors"),
            "official": str(world / "official.safetensors"), "hp": str(world / "hp.yml"), "in": str(inp),
            "out": str(out)}
    for rel, content in files.items():
        if rel.startswith("@out"):
            if rel == "@out/":
                out.mkdir()
                (out / "keep.txt").write_text("mine")
            elif callable(content):
                content(out, world)
            else:
                out.write_bytes(content)
            continue
        if rel.endswith("/"):
            (inp / rel).mkdir(parents=True)
        else:
            _make(inp / rel, content, world, subs)
    before = snapshot(out)
    try:
        rc = main(_fill(argv, subs))
    except SystemExit as e:      # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}, stderr: {err[-1500:]}"
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    assert _fill(says, subs) in lines[0], lines[0]
    assert snapshot(out) == before, f"{out} changed"
    leftovers = [p.name for p in inp.rglob(".*") if p.name.startswith(".") and p.is_file()]
    assert not leftovers, leftovers


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100
