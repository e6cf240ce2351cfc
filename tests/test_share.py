"""Shared the field's way: the model card beside a run's final weights (Hub LoRA conventions) and ``tlora push``
(huggingface_hub's commit operations, built here without the network)."""
import hashlib

import pytest
import yaml
from PIL import Image

from tlora import card
from tlora.cli import main
from tlora.weights import read_header


def _snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    Image.new("RGB", (32, 32), (230, 200, 40)).save(root / "star.png")
    assert main(["train", "--model", "toyworld", "--image", str(root / "star.png"), "--placeholder", "sks", "--class",
                 "shape", "--steps", "2", "--out", str(root / "run"), "--set", "num_validation_images=1",
                 "--set", 'validation_prompts=["a {0} on a red background"]']) == 0
    return root / "run"


def test_the_model_card_is_front_matter_and_markdown_with_the_hubs_lora_fields(run):
    from huggingface_hub import ModelCard
    text = (run / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "diffusers" and front["instance_prompt"] == "a photo of sks shape"
    assert {"t-lora", "lora", "diffusers", "text-to-image"} <= set(front["tags"])
    assert front["widget"] == [{"text": "a sks shape on a red background", "output": {"url": "samples/step-2.png"}}]
    assert (run / "samples" / "step-2.png").is_file()
    assert "base_model" not in front            # a local base model is no Hub id: named in the text instead
    loaded = ModelCard.load(run / "README.md")   # huggingface_hub reads it back
    assert loaded.data.instance_prompt == "a photo of sks shape"
    body = loaded.text
    assert "tlora.attach(pipe, \"tlora.safetensors\")" in body and "**Load T-LoRA**" in body
    assert "| 64 | 1 | 1 | 1000 | ortho | 64 / 48 / 32 / 16 / 1 |" in body
    assert card.MARK in text
    # a Hub base model is the card's base_model (the field the Hub links the adapter to its base with)
    header = read_header(run / "tlora.safetensors")
    header["base_model"] = "stabilityai/stable-diffusion-xl-base-1.0"
    made = card.model_card(header, run)
    assert made.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert 'from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")' in made.text


def test_a_readme_that_is_not_tloras_is_kept_and_said(tmp_path, capsys):
    Image.new("RGB", (32, 32), (230, 200, 40)).save(tmp_path / "star.png")
    (tmp_path / "run").mkdir()
    mine = tmp_path / "run" / "README.md"
    mine.write_text("# my notes\n")
    assert main(["train", "--model", "toyworld", "--image", str(tmp_path / "star.png"), "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 0
    assert mine.read_text() == "# my notes\n"
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "README.md" in ln]
    assert notes == [f"tlora train: note: '{tmp_path / 'run'}' holds a README.md that is not tlora's; it is kept and "
                     "no model card was written (tlora push writes one into the upload)"]
    # push sends a card made for the upload, never the user's README
    plan = dict(__import__("tlora.hub", fromlist=["x"]).upload_plan(tmp_path / "run"))
    assert isinstance(plan["README.md"], bytes) and card.MARK.encode() in plan["README.md"]


def test_push_dry_run_builds_the_commit_operations_and_changes_nothing(run, capsys):
    from tlora import hub
    before = _snapshot(run)
    assert main(["push", str(run), "me/my-star", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert _snapshot(run) == before
    ops = hub.operations(hub.upload_plan(run))
    assert [op.path_in_repo for op in ops] == ["tlora.safetensors", "config.resolved.json", "samples/step-2.png",
                                               "README.md"]
    for op in ops:
        data = (run / op.path_in_repo).read_bytes()
        assert op.upload_info.sha256 == hashlib.sha256(data).digest() and op.upload_info.size == len(data)
    assert out[-1] == "dry run: 4 files would go to https://huggingface.co/me/my-star; nothing was sent"
    assert all(f"sha256 {op.upload_info.sha256.hex()[:12]}" in line for op, line in zip(ops, out))


def test_push_without_a_token_is_one_line_and_sends_nothing(run, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    before = _snapshot(run)
    assert main(["push", str(run), "me/my-star"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        "tlora push: error: no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access), "
        "or see what would be sent with --dry-run"]
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", ["symlinked sample", "bad repo id", "not a run"])
def test_push_refuses_what_is_not_the_runs_own(run, tmp_path, capsys, kind):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    repo = "me/my-star"
    if kind == "symlinked sample":
        (tmp_path / "secret.png").write_bytes(b"not yours")
        (copy / "samples" / "z.png").symlink_to(tmp_path / "secret.png")
    elif kind == "bad repo id":
        repo = "../etc"
    else:
        (copy / "tlora.safetensors").unlink()
    assert main(["push", str(copy), repo, "--dry-run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tlora push: error: ")
    assert {"symlinked sample": "z.png", "bad repo id": "REPO_ID", "not a run": "no tlora.safetensors"}[kind] in err[0]


def test_an_overwrite_rewrites_tloras_own_card(tmp_path):
    Image.new("RGB", (32, 32), (230, 200, 40)).save(tmp_path / "star.png")
    argv = ["train", "--model", "toyworld", "--image", str(tmp_path / "star.png"), "--out", str(tmp_path / "run")]
    assert main(argv + ["--steps", "1"]) == 0
    assert "Training: 1 steps" in (tmp_path / "run" / "README.md").read_text()
    assert main(argv + ["--steps", "2", "--overwrite"]) == 0
    text = (tmp_path / "run" / "README.md").read_text()
    assert "Training: 2 steps" in text and card.is_ours(tmp_path / "run" / "README.md")
