"""The official workflow on tlora: ``tlora train`` with the official flags writes the official run layout, and
``tlora generate --config_path ... --checkpoint_idx ... --prompts ...`` (the official inference.py's flags) reads
it, or a folder the official train.py wrote, and puts images where the official script puts them."""

import numpy as np
import pytest
import torch
import yaml
from diffusers import EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import save_file

import tlora
from tlora.cli import main
from tlora.formats import read_state
from tlora.generate import load_pipeline
from tlora.official import get_seed
from tlora.testing import build_pipeline
from tlora.weights import network_from_state

from conftest import with_flags
from conftest import official_checkpoint

PROMPTS = "a {0} riding a bike#a {0} swimming"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    for fam in ("sd15", "sdxl"):
        build_pipeline(fam).save_pretrained(root / fam)
    (root / "data").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "data" / f"0{i}.jpg")
    return root


def infer(config_path, *extra):
    return main(["generate", "--config_path", str(config_path), "--prompts", PROMPTS, "--num_images_per_prompt", "2",
                 "--version", "0", "--seed", "0", "--num_inference_steps", "2", "--guidance_scale", "5.0", *extra])


def expected_image(model, weights, hp, prompt, batch):
    """One image the independent way: the stock pipeline with Euler, the official file read with the run's
    schedule, tlora.attach masking every step, the official seed of the batch."""
    pipe = load_pipeline(str(model))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    tensors, header = read_state(weights, min_rank=hp["min_rank"], exponent=hp["alpha_rank_scale"])
    with tlora.attach(pipe, network_from_state(pipe.unet, tensors, header)):
        g = torch.Generator().manual_seed(get_seed(prompt, batch, 0))
        return pipe(prompt=prompt.format(f"{hp['placeholder_token']} {hp['class_name']}"), generator=g,
                    num_inference_steps=2, guidance_scale=5.0).images[0]


def test_tlora_train_with_official_flags_then_official_inference(world, tmp_path):
    out = tmp_path / "trained-tlora_dog"
    assert main(["train", f"--pretrained_model_name_or_path={world / 'sd15'}", f"--train_data_dir={world / 'data'}",
                 f"--output_dir={out}", "--trainer_type=ortho_lora", "--trainer_class=sdxl_tlora",
                 "--num_train_epochs=2", "--checkpointing_steps=1", "--resolution=32", "--placeholder_token=sks",
                 "--class_name=dog", "--seed=0", "--lora_rank=4", "--min_rank=2", "--one_image=01.jpg",
                 "--num_val_imgs_per_prompt=0", "--device", "cpu"]) == 0
    hp = yaml.safe_load((out / "logs" / "hparams.yml").read_text())
    assert hp["output_dir"] == str(out.resolve()) and hp["trainer_class"] == "sdxl_tlora"
    assert (hp["lora_rank"], hp["min_rank"], hp["alpha_rank_scale"], hp["placeholder_token"]) == (4, 2, 1.0, "sks")
    assert "wandb_api_key" not in hp
    for n in (1, 2):
        off = out / f"checkpoint-{n}" / "pytorch_lora_weights.safetensors"
        native, _ = tlora.weights.read(out / f"checkpoint-{n}" / "tlora.safetensors")
        converted, header = read_state(off, min_rank=2, exponent=1.0)      # the official file holds the same adapter
        assert converted.keys() == native.keys() and all(torch.equal(converted[k], native[k]) for k in native)
    assert infer(out / "logs" / "hparams.yml", "--checkpoint_idx", "2") == 0
    root = out / "checkpoint-2" / "samples" / "ns2_gs5.0" / "version_0"
    assert sorted(p.name for p in root.iterdir()) == ["a sks riding a bike", "a sks swimming"]
    for folder in root.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
    got = np.asarray(Image.open(root / "a sks swimming" / "1.png"))
    want = np.asarray(expected_image(world / "sd15", out / "checkpoint-2" / "pytorch_lora_weights.safetensors", hp,
                                     "a {0} swimming", batch=1))
    assert np.array_equal(got, want)


def test_official_run_folder_images_land_at_official_paths_and_done_prompts_are_skipped(world, tmp_path):
    """A folder as the official train.py leaves it (SDXL, ortho, logs/hparams.yml + checkpoint-3), moved after
    training: hparams' output_dir no longer exists, the folder beside logs/ is used."""
    run = tmp_path / "00001-ab12-dog_example_tortho_lora4"
    unet = build_pipeline("sdxl").unet
    (run / "checkpoint-3").mkdir(parents=True)
    save_file(official_checkpoint(unet, "ortho_lora", 4), str(run / "checkpoint-3" / "pytorch_lora_weights.safetensors"))
    hp = {"pretrained_model_name_or_path": str(world / "sdxl"), "output_dir": "/gone/00001-ab12-dog_example_tortho_lora4",
          "trainer_class": "sdxl_tlora", "trainer_type": "ortho_lora", "lora_rank": 4, "min_rank": 2,
          "alpha_rank_scale": 1.0, "placeholder_token": "sks", "class_name": "dog", "revision": None,
          "sig_type": "last", "wandb_api_key": None}
    (run / "logs").mkdir()
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(hp))
    assert infer(run / "logs" / "hparams.yml", "--checkpoint_idx", "3", "--batch_size", "2") == 0
    root = run / "checkpoint-3" / "samples" / "ns2_gs5.0" / "version_0"
    bike = root / "a sks riding a bike"
    assert sorted(p.name for p in bike.iterdir()) == ["0.png", "1.png"]
    want = np.asarray(expected_image(world / "sdxl", run / "checkpoint-3" / "pytorch_lora_weights.safetensors", hp,
                                     "a {0} riding a bike", batch=0))
    assert np.array_equal(np.asarray(Image.open(bike / "0.png")), want)   # batch 0 of 2: its first image
    # a prompt already done is skipped; --replace_inference_output regenerates it
    good = (bike / "0.png").read_bytes()
    (bike / "0.png").write_bytes(b"left alone")
    assert infer(run / "logs" / "hparams.yml", "--checkpoint_idx", "3", "--batch_size", "2") == 0
    assert (bike / "0.png").read_bytes() == b"left alone"
    assert infer(run / "logs" / "hparams.yml", "--checkpoint_idx", "3", "--batch_size", "2",
                 "--replace_inference_output") == 0
    assert (bike / "0.png").read_bytes() == good


@pytest.mark.parametrize("extra,says", [
    (["--checkpoint_idx", "9"], "checkpoint_idx"),
    (["--prompts", "a {1} dog"], "--prompts"),
    (["--prompts", "a {0}/../../escape"], "--prompts"),
    (["--num_images_per_prompt", "0"], "--num_images_per_prompt"),
    (["--guidance_scale", "nan"], "--guidance_scale"),
    (["--model", "x"], "--model"),
])
def test_official_inference_bad_input_is_one_line(world, tmp_path, capsys, extra, says):
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    save_file(official_checkpoint(build_pipeline("sdxl").unet, "lora", 4),
              str(run / "checkpoint-3" / "pytorch_lora_weights.safetensors"))
    (run / "logs").mkdir()
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(
        {"pretrained_model_name_or_path": str(world / "sdxl"), "output_dir": str(run), "trainer_class": "sdxl_lora",
         "lora_rank": 4, "placeholder_token": "sks", "class_name": "dog"}))
    before = sorted(str(p) for p in run.rglob("*"))
    argv = ["generate", "--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "3",
            "--prompts", PROMPTS]
    assert main(with_flags(argv, extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert sorted(str(p) for p in run.rglob("*")) == before
