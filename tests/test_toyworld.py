"""The toy world: scenes read back from pixels, the tokenizer, the shipped model, the experiment's smoke run."""
import json
import random

import numpy as np
import pytest

from tlora.toyworld.world import NEW_SHAPES, SHAPES, Scene, aligned_iou, measure, render, sample_scene, vocabulary


def test_scenes_are_deterministic_and_read_back_from_pixels():
    a = [sample_scene(random.Random(7), shapes=SHAPES + NEW_SHAPES) for _ in range(3)]
    b = [sample_scene(random.Random(7), shapes=SHAPES + NEW_SHAPES) for _ in range(3)]
    assert a == b
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    rng = random.Random(0)
    for _ in range(300):
        s = sample_scene(rng, shapes=SHAPES + NEW_SHAPES)
        m = measure(render(s))
        assert (m.background, m.colour, m.position, m.size) == (s.background, s.colour, s.position, s.size), s


def test_pretraining_scenes_never_show_new_concepts():
    from tlora.toyworld.pretrain import dataset
    scenes, caps = dataset(2000, seed=0)
    assert not any(s.shape in NEW_SHAPES for s in scenes)
    assert not any(w in c for c in caps for w in NEW_SHAPES + ("sks",))
    assert any(" shape on " in c for c in caps)      # the class word is known


def test_aligned_iou():
    s = Scene("star", "yellow", "blue", "large", "top left")
    ref = measure(render(s)).mask
    moved = measure(render(Scene("star", "yellow", "green", "large", "bottom right"))).mask
    assert aligned_iou(ref, moved) > 0.9
    other = measure(render(Scene("square", "yellow", "green", "large", "bottom right"))).mask
    assert aligned_iou(ref, other) < aligned_iou(ref, moved)


def test_tokenizer_gives_one_token_per_word():
    from tlora.toyworld.pretrain import build_tokenizer
    tok = build_tokenizer()
    cap = "a large sks shape on a blue background, at the top left"
    toks = tok.convert_ids_to_tokens(tok(cap)["input_ids"])[1:-1]
    assert toks == [w + "</w>" for w in cap.replace(",", " ,").split()]
    assert {w.strip(",") + "</w>" for w in vocabulary()} <= set(tok.get_vocab())


def test_shipped_model_loads_with_stock_diffusers_and_is_small():
    from diffusers import DiffusionPipeline
    from tlora.toyworld.experiment import default_model
    path = default_model()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    pipe = DiffusionPipeline.from_pretrained(str(path))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    info = json.loads((path / "toyworld.json").read_text())
    assert info["caption_following"]["background_and_position"] >= 0.8


def test_quick_experiment_runs(tmp_path):
    from benchmarks.toyworld import main
    out = tmp_path / "tw.md"
    assert main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 4 | LoRA |" in text and "| 4 | T-LoRA |" in text and "smoke test" in text
