"""Hostile input, as a new user (or an attacker) would type it, across every subcommand and config source.

Each case runs ``tlora`` in this process and must give: exit code 2, exactly one line on stderr naming the key,
flag or file at fault, no traceback, and the output location byte-for-byte as it was before the call (absent
stays absent, a file stays the same file, a run folder keeps every byte).

Placeholders in arguments and file contents: ``{model}`` a tiny SD1.5 pipeline folder, ``{data}`` two training
images, ``{w}`` a good tlora weights file for it, ``{official}`` an official checkpoint + ``{hp}`` its hparams.yml,
``{in}`` this case's input folder, ``{out}`` the output location the case must leave alone.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tlora
from tlora.cli import main
from tlora.weights import write_native

from conftest import tiny_world, with_flags
from conftest import official_checkpoint

DROP = object()     # a key to leave out of a config (None stays: it is JSON null)
DEEP = '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    pipe = tiny_world(root)
    save_file(official_checkpoint(pipe.unet, "lora", 4), str(root / "official.safetensors"))
    linears = [(n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q")][:2]
    LYC_MODULES.update({"lycoris_" + n.replace(".", "_"): tuple(m.weight.shape) for n, m in linears})
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
    "generate weights of another model": gen("its header says", "--weights", "{in}/c.safetensors", files={
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
                                      "--out", "{out}", "--base-precision", "int4"], {}, "--base-precision"),
    "memory model missing": (["memory", "--model", "{in}/none"], {}, "model config not found"),
    "memory config not json": (["memory", "--model", "{in}/config.json"], {"config.json": "{not json"}, "JSON"),
    "memory config not a model": (["memory", "--model", "{in}/config.json"], {"config.json": {"a": 1}},
                                  "_class_name"),
    "memory config of a vae": (["memory", "--model", "{in}/config.json"],
                               {"config.json": {"_class_name": "AutoencoderKL"}}, "AutoencoderKL"),
    "memory batch 0": (["memory", "--model", "{model}", "--batch", "0"], {}, "--batch"),
    "memory backend bogus": (["memory", "--model", "{model}", "--base-precision", "int8",
                              "--quantization-backend", "gguf"], {}, "--quantization-backend"),
    # -- demo ----------------------------------------------------------------------------------------------------
    "demo steps 0": (["demo", "--steps", "0", "--out", "{out}"], {}, "--steps"),
    "demo rank -1": (["demo", "--rank", "-1", "--out", "{out}"], {}, "--rank"),
    "demo out is a file": (["demo", "--out", "{out}"], {"@out": b"a file"}, "--out"),
}


# -- kinds the first table did not have (issue 27): each a class closed by one owner ---------------------------------
def link_to(target: str):
    """``{out}`` (or a file of ``{in}``) as a symlink to ``target`` (placeholders filled at make time)."""
    def make(path, world):
        path.symlink_to(Path(str(target).replace("{w}", str(world / "w.safetensors")).replace("{in}", str(path.parent / "in"))
                             .replace("{data}", str(world / "data")).replace("{model}", str(world / "model"))))
    return make


def dangling(path, world):
    path.symlink_to(path.parent / "nowhere")


def loop(path, world):
    path.symlink_to(path)


def copy_of(name):
    def make(path, world):
        shutil.copy(world / name, path)
    return make


def raw_native(change):
    """A native file whose tensors ``change`` edits (dtype, shape, names kept or not), checksum recomputed, so
    only the structure check can catch it."""
    def make(path, world):
        tensors, meta = tlora.weights.read(world / "w.safetensors")
        header = json.loads(meta["tlora"])
        change(tensors, header)
        text = json.dumps(header, sort_keys=True)
        t = {k: v.contiguous() for k, v in tensors.items()}
        save_file(t, str(path), metadata={"tlora": text, "tlora_sha256": tlora.weights._checksum(text, t),
                                          "format": "pt"})
    return make


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def lyc_file(change=None, meta=None):
    """A LyCORIS tlora file (SimpleTuner's layout) for two attention projections of the tiny UNet."""
    def make(path, world):
        g = torch.Generator().manual_seed(0)
        t = {}
        for name, (out_f, in_f) in LYC_MODULES.items():
            t[f"{name}.q_layer.weight"] = torch.randn(4, in_f, generator=g)
            t[f"{name}.p_layer.weight"] = torch.randn(out_f, 4, generator=g)
            t[f"{name}.lambda_layer"] = torch.rand(1, 4, generator=g)
            t[f"{name}.alpha"] = torch.tensor(4.0)
        if change:
            change(t)
        m = {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": 4, "linear_alpha": 4, "tlora_min_rank": 2,
                                           "tlora_alpha": 1.0})}
        m.update(meta or {})
        save_file(t, str(path), metadata=m)
    return make


LYC_MODULES = {}    # filled by the world fixture: lycoris name → (out, in) of two attention projections


def off_file(change):
    def make(path, world):
        from safetensors.torch import load_file
        t = load_file(str(world / "official.safetensors"))
        change(t)
        save_file(t, str(path))
    return make


def state_edit(change_json=None, change_tensors=None):
    """The finished run copied to {out}, checkpoint-2's state.json or state.safetensors edited (valid JSON,
    valid safetensors: only the resume checks can catch it)."""
    def edit(ck):
        if change_json:
            info = json.loads((ck / "state.json").read_text())
            change_json(info)
            (ck / "state.json").write_text(json.dumps(info))
        if change_tensors:
            from safetensors.torch import load_file
            t = load_file(str(ck / "state.safetensors"))
            change_tensors(t)
            save_file(t, str(ck / "state.safetensors"))
    return resume_from(edit)


def _first_moment(t):
    k = next(k for k in sorted(t) if k.endswith("exp_avg"))
    t[k] = torch.zeros(3, 3)


def bomb_png(path, world=None):
    """A PNG whose header claims 20000 × 20000 pixels (no pixel data needed for Pillow to refuse it)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""))


RESUME = ["train", "--config", "{in}/c.json", "--resume", "latest"]
LYC_CONV = ["convert", "{in}/l.safetensors", "{out}", "--to", "tlora", "--model", "{model}"]


def lyc_case(says, change=None, meta=None, *flags):
    return (LYC_CONV + list(flags), {"l.safetensors": lyc_file(change, meta)}, says)


NEW_CASES = {
    # -- symlinks ------------------------------------------------------------------------------------------------
    "convert out symlink to input": (["convert", "{in}/w.safetensors", "{out}", "--to", "diffusers"],
                                     {"w.safetensors": copy_of("w.safetensors"), "@out": link_to("{in}/w.safetensors")},
                                     "is the input"),
    "inspect plot symlink to input": (["inspect", "{in}/w.safetensors", "--plot", "{out}"],
                                      {"w.safetensors": copy_of("w.safetensors"),
                                       "@out": link_to("{in}/w.safetensors")}, "is the input"),
    "train output_dir dangling symlink": (["train", "--config", "{in}/c.json"], {"c.json": cfg(), "@out": dangling},
                                          "symlink to nothing"),
    "train output_dir symlink loop": (["train", "--config", "{in}/c.json"], {"c.json": cfg(), "@out": loop},
                                      "symlink"),
    "train output_dir symlink to data_dir": (["train", "--config", "{in}/c.json"],
                                             {"c.json": cfg(), "@out": link_to("{data}")}, "is the input"),
    "generate out dangling symlink": gen("symlink to nothing", files={"@out": dangling}),
    "generate out symlink loop": gen("symlink", files={"@out": loop}),
    "generate out symlink to the model": gen("is the input", files={"@out": link_to("{model}")}),
    "convert out dangling symlink": conv("symlink to nothing", files={"@out": dangling}),
    "inspect plot dangling symlink": (["inspect", "{w}", "--plot", "{out}"], {"@out": dangling}, "symlink"),
    "evaluate out dangling symlink": evaluate("symlink", files={"@out": dangling}),
    "demo out dangling symlink": (["demo", "--out", "{out}", "--steps", "1"], {"@out": dangling}, "symlink"),
    "train output_dir below a dangling symlink": (["train", "--config", "{in}/c.json"],
                                                  {"c.json": cfg(output_dir="{out}/run"), "@out": dangling},
                                                  "symlink to nothing"),
    # -- tlora push: only a run's own, readable files ----------------------------------------------------------------
    "push a folder without weights": (["push", "{in}", "me/x", "--dry-run"], {"config.resolved.json": "{}"},
                                      "no tlora.safetensors"),
    "push garbage weights": (["push", "{in}", "me/x", "--dry-run"], {"tlora.safetensors": b"\x00" * 64},
                             "not a readable safetensors file"),
    "push weights that are a symlink": (["push", "{in}", "me/x", "--dry-run"],
                                        {"tlora.safetensors": link_to("{w}")}, "symlink"),
    "push a sample symlinked elsewhere": (["push", "{in}", "me/x", "--dry-run"],
                                          {"tlora.safetensors": copy_of("w.safetensors"),
                                           "samples/z.png": link_to("{data}")}, "symlink"),
    "push a bad repo id": (["push", "{in}", "../../etc", "--dry-run"], {"tlora.safetensors": copy_of("w.safetensors")},
                           "REPO_ID"),
    "push a repo id without owner": (["push", "{in}", "x", "--dry-run"], {"tlora.safetensors": copy_of("w.safetensors")},
                                     "needs its owner"),
    "push a file as the run": (["push", "{w}", "me/x", "--dry-run"], {}, "no tlora.safetensors"),
    # -- tlora ui: refused before a server starts or a workspace is made ---------------------------------------------
    "ui on a non-local host without auth": (["ui", "--host", "0.0.0.0", "--workspace", "{out}"], {}, "--auth"),
    "ui auth without a password": (["ui", "--auth", "me", "--workspace", "{out}"], {}, "USER:PASSWORD"),
    "ui port 0": (["ui", "--port", "0", "--workspace", "{out}"], {}, "[1, 65535]"),
    "ui port 70000": (["ui", "--port", "70000", "--workspace", "{out}"], {}, "[1, 65535]"),
    "ui workspace is a file": (["ui", "--workspace", "{w}"], {}, "--workspace"),
    # -- output = input --------------------------------------------------------------------------------------------
    "convert onto itself (tlora)": (["convert", "{in}/w.safetensors", "{in}/w.safetensors", "--to", "tlora"],
                                    {"w.safetensors": copy_of("w.safetensors")}, "is the input"),
    "convert onto itself (kohya)": (["convert", "{in}/w.safetensors", "{in}/w.safetensors", "--to", "kohya"],
                                    {"w.safetensors": copy_of("w.safetensors")}, "is the input"),
    "convert onto its hparams": (["convert", "{in}/o.safetensors", "{in}/hp.yml", "--to", "tlora", "--hparams",
                                  "{in}/hp.yml"], {"o.safetensors": copy_of("official.safetensors"),
                                                   "hp.yml": "lora_rank: 4\nmin_rank: 2\nalpha_rank_scale: 1.0\n"},
                                 "is the input"),
    "inspect plot onto the file": (["inspect", "{in}/w.safetensors", "--plot", "{in}/w.safetensors"],
                                   {"w.safetensors": copy_of("w.safetensors")}, "is the input"),
    "evaluate out onto a generated image": evaluate("input", "--out", "{in}/imgs/0.png"),
    "evaluate out onto the reference": evaluate("is the input", "--reference", "{in}/ref.png", "--out",
                                                "{in}/ref.png", files={"ref.png": "PNG"}),
    "train output_dir is data_dir": train_cfg("is the input", output_dir="{in}/d", data_dir="{in}/d")[:1] + (
        {"c.json": cfg(output_dir="{in}/d", data_dir="{in}/d"), "d/a.png": "PNG"}, "is the input"),
    "train output_dir is the model": train_cfg("is the input", output_dir="{model}"),
    "generate out is the model": gen("is the input", "--out", "{model}"),
    # -- the run folder --------------------------------------------------------------------------------------------
    "rerun into a finished run": (["train", "--config", "{in}/c.json"], {"c.json": cfg(max_steps=2, checkpointing_steps=2,
                                  num_validation_images=0), "@out": resume_from()}, "holds a finished run"),
    "rerun with more steps into a finished run": (["train", "--config", "{in}/c.json"],
                                                  {"c.json": cfg(max_steps=5, checkpointing_steps=2,
                                                                 num_validation_images=0), "@out": resume_from()},
                                                  "--resume latest"),
    "resume latest with no checkpoint": (RESUME, {"c.json": cfg()}, "holds no checkpoint of this run"),
    "resume and overwrite": (RESUME + ["--overwrite"], {"c.json": cfg()}, "not both"),
    "overwrite another run": (["train", "--config", "{in}/c.json", "--overwrite"],
                              {"c.json": cfg(tlora={"rank": 8}), "@out": resume_from()}, "of another run"),
    "user folder named checkpoint": (["train", "--config", "{in}/c.json"],
                                     {"c.json": cfg(), "@out/": None, "@out/checkpoint-1/x.txt": b"mine"},
                                     "checkpoint-1"),
    "lock is a folder": (["train", "--config", "{in}/c.json"], {"c.json": cfg(), "@out/.tlora.lock/": None},
                         ".tlora.lock"),
    "demo over an earlier demo": (["demo", "--out", "{out}", "--steps", "1"], {"@out/": None}, "--overwrite"),
    "generate over an earlier output": gen("earlier generate output", files={"@out/": None,
                                                                              "@out/generate.json": b"{}"}),
    # -- crafted native files --------------------------------------------------------------------------------------
    "native bool tensor": conv("floating point", src="{in}/c.safetensors", files={"c.safetensors": raw_native(
        lambda t, h: t.update({_first(t, ".lam"): t[_first(t, ".lam")] > 0}))}),
    "native int8 tensor": conv("floating point", src="{in}/c.safetensors", files={"c.safetensors": raw_native(
        lambda t, h: t.update({_first(t, ".q"): t[_first(t, ".q")].to(torch.int8)}))}),
    "native tensor missing": conv("missing", src="{in}/c.safetensors", files={"c.safetensors": raw_native(
        lambda t, h: t.pop(_first(t, ".p0")))}),
    "native tensor extra": conv("unexpected", src="{in}/c.safetensors", files={"c.safetensors": raw_native(
        lambda t, h: t.update({"x.y": torch.zeros(1)}))}),
    "native tensor wrong shape": conv("has shape", src="{in}/c.safetensors", files={"c.safetensors": raw_native(
        lambda t, h: t.update({_first(t, ".q"): torch.zeros(3, 3)}))}),
    "native module min_rank above rank": conv("min_rank", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(min_rank=9) for m in h["modules"].values()])}),
    "native config min_rank above rank": conv("min_rank", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: h["config"].update(min_rank=9))}),
    "native module exponent string": conv("exponent", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(exponent="1") for m in h["modules"].values()])}),
    "native module kind bogus": conv("kind", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(kind="conv3d") for m in h["modules"].values()])}),
    "native base_shape of a conv": conv("base_shape", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(kind="conv2d") for m in h["modules"].values()])}),
    "native rank above the layer": conv("rank", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: [m.update(rank=4000) for m in h["modules"].values()])}),
    "native config rank bool": conv("rank", src="{in}/c.safetensors", files={"c.safetensors": crafted(
        lambda h: h["config"].update(rank=True))}),
    "native config target_name string": conv("target_name", src="{in}/c.safetensors", files={
        "c.safetensors": crafted(lambda h: h["config"].update(target_name="down"))}),
    "native config multiplier NaN-like": conv("multiplier", src="{in}/c.safetensors", files={
        "c.safetensors": crafted(lambda h: h["config"].update(multiplier=-1))}),
    "inspect native int8 tensor": (["inspect", "{in}/c.safetensors"], {"c.safetensors": raw_native(
        lambda t, h: t.update({_first(t, ".q"): t[_first(t, ".q")].to(torch.int8)}))}, "floating point"),
    "generate native tensor missing": gen("missing", "--weights", "{in}/c.safetensors", files={
        "c.safetensors": raw_native(lambda t, h: t.pop(_first(t, ".lam0")))}),
    "generate native bool tensor": gen("floating point", "--weights", "{in}/c.safetensors", files={
        "c.safetensors": raw_native(lambda t, h: t.update({_first(t, ".lam"): t[_first(t, ".lam")] > 0}))}),
    # -- crafted LyCORIS files ------------------------------------------------------------------------------------
    "LyCORIS file p_layer missing": lyc_case("p_layer", lambda t: t.pop(next(k for k in sorted(t) if "p_layer" in k))),
    "LyCORIS file lambda wrong size": lyc_case("do not fit", lambda t: t.update(
        {next(k for k in sorted(t) if "lambda" in k): torch.ones(1, 3)})),
    "LyCORIS file int tensor": lyc_case("floating point", lambda t: t.update(
        {next(k for k in sorted(t) if "q_layer" in k): torch.ones(4, 32, dtype=torch.int32)})),
    "LyCORIS file q of another width": lyc_case("do not fit", lambda t: t.update(
        {next(k for k in sorted(t) if "q_layer" in k): torch.ones(4, 7)})),
    "LyCORIS file base_q alone": lyc_case("come together", lambda t: t.update(
        {next(k for k in sorted(t) if "q_layer" in k).replace("q_layer.weight", "base_q"): torch.ones(4, 32)})),
    "LyCORIS file alpha a vector": lyc_case("alpha", lambda t: t.update(
        {next(k for k in sorted(t) if k.endswith(".alpha")): torch.ones(3)})),
    "LyCORIS file unknown leaf": lyc_case("not", lambda t: t.update(
        {next(k for k in sorted(t) if "q_layer" in k).replace("q_layer.weight", "hada_w1_a"): torch.ones(4, 32)})),
    "LyCORIS file metadata not JSON": lyc_case("not valid JSON", None, {"lycoris_config": "{nope"}),
    "LyCORIS file metadata min_rank above rank": lyc_case("min_rank", None, {"lycoris_config": json.dumps(
        {"algo": "tlora", "linear_dim": 4, "tlora_min_rank": 9, "tlora_alpha": 1.0})}),
    "LyCORIS file metadata tlora_alpha string": lyc_case("tlora_alpha", None, {"lycoris_config": json.dumps(
        {"algo": "tlora", "linear_dim": 4, "tlora_min_rank": 2, "tlora_alpha": "1"})}),
    "LyCORIS file metadata a list": lyc_case("JSON object", None, {"lycoris_config": "[1, 2]"}),
    "LyCORIS file min-rank above rank": lyc_case("min_rank", None, {"lycoris_config": json.dumps(
        {"algo": "tlora"})}, "--min-rank", "9"),
    # -- crafted official files and hparams ----------------------------------------------------------------------
    "official file up missing": conv("complete", "--hparams", "{hp}", src="{in}/o.safetensors", files={
        "o.safetensors": off_file(lambda t: t.pop(next(k for k in sorted(t) if k.endswith("up.weight"))))}),
    "official file int tensor": (["convert", "{in}/o.safetensors", "{out}", "--to", "diffusers", "--hparams", "{hp}"],
                                 {"o.safetensors": off_file(lambda t: t.update(
                                     {next(k for k in sorted(t) if k.endswith("down.weight")): torch.ones(
                                         4, 32, dtype=torch.int64)}))}, "floating point"),
    "official file shapes disagree": (["convert", "{in}/o.safetensors", "{out}", "--to", "diffusers", "--hparams",
                                       "{hp}"], {"o.safetensors": off_file(lambda t: t.update(
                                           {next(k for k in sorted(t) if k.endswith("up.weight")): torch.ones(32, 3)}))},
                                      "do not agree"),
    "official min-rank above rank": (["convert", "{official}", "{out}", "--to", "diffusers", "--min-rank", "9",
                                      "--exponent", "1"], {}, "min_rank"),
    "official hparams min_rank above lora_rank": conv("min_rank", "--hparams", "{in}/hp.yml", src="{official}",
                                                      files={"hp.yml": "lora_rank: 4\nmin_rank: 9\n"
                                                                       "alpha_rank_scale: 1.0\n"}),
    "official hparams lora_rank bool": conv("lora_rank", "--hparams", "{in}/hp.yml", src="{official}",
                                            files={"hp.yml": "lora_rank: true\nmin_rank: 2\nalpha_rank_scale: 1.0\n"}),
    "official hparams alpha_rank_scale 0": conv("alpha_rank_scale", "--hparams", "{in}/hp.yml", src="{official}",
                                                files={"hp.yml": "lora_rank: 4\nmin_rank: 2\nalpha_rank_scale: 0\n"}),
    # -- absurd sizes ----------------------------------------------------------------------------------------------
    "tlora rank 2^40": tl("rank", rank=2 ** 40),
    "tlora conv_rank 2^40": tl("conv_rank", conv_rank=2 ** 40),
    "train resolution 2^31": train_cfg("resolution", resolution=2 ** 31),
    "train batch_size 10^15": train_cfg("batch_size", batch_size=10 ** 15),
    "train max_steps 10^12": train_cfg("max_steps", max_steps=10 ** 12),
    "train gradient_accumulation 10^9": train_cfg("gradient_accumulation_steps", gradient_accumulation_steps=10 ** 9),
    "train validation_inference_steps 10^9": train_cfg("validation_inference_steps",
                                                       validation_inference_steps=10 ** 9),
    "train num_validation_images 10^9": train_cfg("num_validation_images", num_validation_images=10 ** 9),
    "memory rank 2^40": (["memory", "--model", "{model}", "--rank", str(2 ** 40)], {}, "--rank"),
    "memory resolution 2^31": (["memory", "--model", "{model}", "--resolution", str(2 ** 31)], {}, "--resolution"),
    "memory batch 10^15": (["memory", "--model", "{model}", "--batch", str(10 ** 15)], {}, "--batch"),
    "generate num-images 10^15": gen("--num-images", "--num-images", str(10 ** 15)),
    "generate height 2^31": gen("--height", "--height", str(2 ** 31)),
    "generate steps 10^9": gen("--steps", "--steps", str(10 ** 9)),
    "official --lora_rank 2^40": official("--lora_rank", f"--lora_rank={2 ** 40}"),
    # -- min_rank never clamped ----------------------------------------------------------------------------------
    "memory min-rank 0": (["memory", "--model", "{model}", "--min-rank", "0"], {}, "--min-rank"),
    "memory min-rank above rank": (["memory", "--model", "{model}", "--rank", "8", "--min-rank", "9"], {},
                                   "--min-rank"),
    "tlora conv_rank below min_rank": tl("conv_rank", conv_rank=1, min_rank=2),
    "tlora module_algo_map min_rank above rank": tl("min_rank", module_algo_map={"Attention": {"rank": 2,
                                                                                              "min_rank": 3}}),
    # -- booleans, nulls, wrong types: never a default --------------------------------------------------------------
    "tlora alpha bool": tl("alpha", alpha=True),
    "tlora conv_alpha NaN": tl("conv_alpha", conv_alpha=float("nan")),
    "tlora conv_alpha bool": tl("conv_alpha", conv_alpha=False),
    "tlora multiplier 0": tl("multiplier", multiplier=0),
    "tlora module_algo_map alpha bool": tl("alpha", module_algo_map={"Attention": {"alpha": True}}),
    "tlora module_algo_map unknown key": tl("ranks", module_algo_map={"Attention": {"ranks": 2}}),
    "tlora target_name a string": tl("target_name", target_name="down_blocks"),
    "tlora exclude_name bad regex": tl("exclude_name", exclude_name=["(unclosed"]),
    "tlora use_fnmatch string": tl("use_fnmatch", use_fnmatch="yes"),
    "tlora variant null": tl("variant", variant=None),
    "overwrite a string": train_cfg("overwrite", overwrite="yes"),
    "resume empty": train_cfg("resume", resume=""),
    "output_dir empty": train_cfg("output_dir", output_dir=""),
    "validation_prompts a string list mix": train_cfg("validation_prompts", validation_prompts=["a", 3]),
    "LyCORIS target_name a string": simpletuner("apply_preset.target_name", lycoris={"apply_preset": {
        "target_name": "down_blocks"}}),
    "LyCORIS exclude_name a string": simpletuner("apply_preset.exclude_name", lycoris={"apply_preset": {
        "target_module": ["Attention"], "exclude_name": "down_blocks"}}),
    "LyCORIS exclude_name bad regex": simpletuner("regular expressions", lycoris={"apply_preset": {
        "target_module": ["Attention"], "exclude_name": ["(unclosed"]}}),
    "LyCORIS linear_alpha null": simpletuner("linear_alpha", lycoris={"linear_alpha": None}),
    "LyCORIS linear_alpha bool": simpletuner("linear_alpha", lycoris={"linear_alpha": True}),
    "LyCORIS use_data_init string": simpletuner("use_data_init", lycoris={"use_data_init": "false"}),
    "LyCORIS conv_alpha NaN": simpletuner("conv_alpha", lycoris={"conv_alpha": float("nan")}),
    "LyCORIS conv_alpha string": simpletuner("conv_alpha", lycoris={"conv_alpha": "4"}),
    "LyCORIS tlora_min_rank above linear_dim": simpletuner("tlora_min_rank", lycoris={"tlora_min_rank": 9}),
    "LyCORIS module_algo_map alpha bool": simpletuner("module_algo_map", lycoris={"apply_preset": {
        "module_algo_map": {"Attention": {"linear_alpha": True}}}}),
    "LyCORIS bypass_mode string": simpletuner("bypass_mode", lycoris={"bypass_mode": "yes"}),
    "LyCORIS dropout 0.1": simpletuner("dropout", lycoris={"dropout": 0.1}),
    "LyCORIS conv_dim negative": simpletuner("conv_dim", lycoris={"conv_dim": -4}),
    "LyCORIS apply_preset unknown key": simpletuner("target_modules", lycoris={"apply_preset": {
        "target_modules": ["Attention"]}}),
    "LyCORIS use_fnmatch string": simpletuner("use_fnmatch", lycoris={"apply_preset": {"use_fnmatch": "true"}}),
    # -- resume-state edits --------------------------------------------------------------------------------------
    "state step negative": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(lambda i: i.update(step=-1))},
                            "step"),
    "state step bool": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(lambda i: i.update(step=True))},
                        "step"),
    "state step string": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(lambda i: i.update(step="2"))},
                          "step"),
    "state step of another checkpoint": (RESUME, {"c.json": cfg(max_steps=4),
                                                  "@out": state_edit(lambda i: i.update(step=1))}, "step 1"),
    "state lr a string": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        lambda i: i["optimizer"]["param_groups"][0].update(lr="high"))}, "lr"),
    "state betas one number": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        lambda i: i["optimizer"]["param_groups"][0].update(betas=[0.9]))}, "betas"),
    "state params not indices": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        lambda i: i["optimizer"]["param_groups"][0].update(params=["a"]))}, "params"),
    "state last_epoch string": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        lambda i: i["lr_scheduler"].update(last_epoch="2"))}, "last_epoch"),
    "state base_lrs strings": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        lambda i: i["lr_scheduler"].update(base_lrs=["x"]))}, "base_lrs"),
    "state moment of another shape": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        change_tensors=_first_moment)}, "exp_avg"),
    "state moment of no parameter": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        change_tensors=lambda t: t.update({"opt.9999.exp_avg": torch.zeros(1)}))}, "opt.9999"),
    "state rng missing": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        change_tensors=lambda t: t.pop("rng.torch"))}, "rng.torch"),
    "state moment NaN": (RESUME, {"c.json": cfg(max_steps=4), "@out": state_edit(
        change_tensors=lambda t: t.update({next(k for k in sorted(t) if k.endswith("exp_avg_sq")): torch.full_like(
            t[next(k for k in sorted(t) if k.endswith("exp_avg_sq"))], float("nan"))}))}, "non-finite"),
    # -- environment oddities -------------------------------------------------------------------------------------
    "newline in the output path": (["convert", "{in}/none\nx.safetensors", "{out}", "--to", "tlora"], {},
                                   "input file not found"),
    "newline in a config path": (["train", "--config", "{in}/a\nb.json"], {}, "b.json"),
    "output_dir not UTF-8": train_cfg("UTF-8", output_dir="{out}/\udcff"),
    "output_dir name too long": train_cfg("output_dir", output_dir="{out}/" + "x" * 300),
    "data_dir image bomb": (["train", "--config", "{in}/c.json"], {"c.json": cfg(data_dir="{in}/d"),
                                                                   "d/bomb.png": bomb_png}, "bomb.png"),
    "evaluate reference bomb": evaluate("ref.png", "--reference", "{in}/ref.png", files={"ref.png": bomb_png}),
    "16-bit caption-less image is fine but output is a file": (["train", "--config", "{in}/c.json"], {
        "c.json": cfg(data_dir="{in}/d"), "d/a.png": lambda p, w: Image.fromarray(
            (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)).save(p), "@out": b"file"}, "output_dir"),
    "prompts file only blank lines": gen("prompts file is empty", "--prompts-file", "{in}/p.txt",
                                         files={"p.txt": b"\n   \n\t\n"}, drop=("--prompt",)),
    "hparams not a mapping at all": conv("hp.yml", "--hparams", "{in}/hp.yml", src="{official}",
                                         files={"hp.yml": "just a string\n"}),
    "generate official form with our flag": (["generate", "--config_path", "{in}/hp.yml", "--prompts", "a {0}",
                                              "--multiplier", "2"], {"hp.yml": "x: 1\n"}, "--multiplier"),
}
CASES.update(NEW_CASES)


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
    """Every path under ``p`` with its bytes (files) and mode; a symlink as its target; None when ``p`` does not
    exist."""
    if p.is_symlink():
        return ("symlink", os.readlink(p))
    if not p.exists():
        return None
    if p.is_file():
        return {".": (p.read_bytes(), p.stat().st_mode)}
    return {str(q.relative_to(p)): (q.read_bytes() if q.is_file() else None, q.stat().st_mode)
            for q in sorted(p.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(world, tmp_path, capsys, monkeypatch, name):
    argv, files, says = CASES[name]
    if argv[0] == "ui":                 # a case that got through would serve forever: make that a failure instead
        import gradio

        def launched(*a, **k):
            raise AssertionError("tlora ui started a server: the input was not refused")
        monkeypatch.setattr(gradio.Blocks, "launch", launched)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    subs = {"model": str(world / "model"), "data": str(world / "data"), "w": str(world / "w.safetensors"),
            "official": str(world / "official.safetensors"), "hp": str(world / "hp.yml"), "in": str(inp),
            "out": str(out)}
    for rel, content in files.items():
        if rel.startswith("@out/") and len(rel) > 5:        # a file or folder inside {out}
            target = out / rel[5:]
            if rel.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            continue
        if rel.startswith("@out"):
            if rel == "@out/":
                out.mkdir(exist_ok=True)
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
    before, inputs = snapshot(out), snapshot(inp)
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
    assert snapshot(inp) == inputs, f"an input in {inp} changed"
    leftovers = [p.name for p in inp.rglob(".*") if p.name.startswith(".") and p.is_file()]
    assert not leftovers, leftovers


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100 and len(NEW_CASES) >= 100
