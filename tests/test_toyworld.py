"""The toy world: scenes read back from pixels, the tokenizer, the shipped model, pretraining, the demo, the
experiment's smoke run."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
    from research.toyworld.pretrain import dataset
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
    from research.toyworld.pretrain import build_tokenizer
    tok = build_tokenizer()
    cap = "a large sks shape on a blue background, at the top left"
    toks = tok.convert_ids_to_tokens(tok(cap)["input_ids"])[1:-1]
    assert toks == [w + "</w>" for w in cap.replace(",", " ,").split()]
    assert {w.strip(",") + "</w>" for w in vocabulary()} <= set(tok.get_vocab())
    for w in {w.strip(",") for w in vocabulary()}:
        assert len(tok(w)["input_ids"]) == 3, w                # <start> word <end>
    # the tokenizers trainer numbers tokens in hash order; ours must not depend on it (it seeds embedding rows)
    assert all(build_tokenizer().get_vocab() == tok.get_vocab() for _ in range(3))


def test_textured_scenes_read_back_from_pixels():
    from research.toyworld.textured import TexturedWorld as W
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        s = W.sample_scene(rng, shapes=SHAPES + NEW_SHAPES)
        m = W.measure(W.render(s))
        assert all(W.followed(s, m).values()) and m.size == "large", (s, m.as_dict())
        seen.add(s.pattern)
    assert seen == {"plain", "striped", "checked"}
    # the test prompts change every fact of the training image a copying adapter could keep
    from research.toyworld.study import CONCEPTS
    c = CONCEPTS["textured"][0]
    for t in W.test_scenes(c, 8, seed=0):
        assert (t.shape, t.colour) == (c.shape, c.colour)
        assert t.background != c.background and t.pattern != c.pattern and t.position != c.position
        assert (t.second_colour, t.second_shape) != (c.second_colour, c.second_shape)


def test_textured_pretraining_captions_name_everything_and_fit_the_token_budget():
    from research.toyworld.pretrain import build_tokenizer, dataset
    from research.toyworld.textured import TexturedWorld as W
    scenes, caps = dataset(2000, seed=0, world=W)
    assert not any(s.shape in NEW_SHAPES for s in scenes)
    assert not any(w in c for c in caps for w in NEW_SHAPES + ("sks",))
    tok = build_tokenizer(W)
    lengths = [len(tok(c)["input_ids"]) for c in caps]
    assert max(lengths) <= W.max_length
    words = caps[0].replace(",", " ,").split()
    assert tok.convert_ids_to_tokens(tok(caps[0])["input_ids"])[1:-1] == [w + "</w>" for w in words]


@pytest.mark.parametrize("world", ["flat", "textured"])
def test_shipped_models_load_with_stock_diffusers_and_are_small(world):
    from diffusers import DiffusionPipeline
    from research.toyworld.study import default_model
    from research.toyworld.pretrain import WORLDS, world_of
    path = default_model(world)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    pipe = DiffusionPipeline.from_pretrained(str(path))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert world_of(path) is WORLDS[world]
    info = json.loads((path / "toyworld.json").read_text())
    assert info["caption_following"][WORLDS[world].prompt_key] >= 0.5


def test_quick_study_runs_and_its_report_is_recomputed_from_its_log(tmp_path):
    from benchmarks.toyworld import main, read_log
    out, log, plot = tmp_path / "tw.md", tmp_path / "points.jsonl", tmp_path / "tw.png"
    files = ["--out", str(out), "--log", str(log), "--plot", str(plot)]
    assert main(["--quick", *files]) == 0
    header, points = read_log(log)
    assert header["quick"] and header["worlds"] == ["flat", "textured"]
    got = {(p["world"], p["method"], p["step"]) for p in points}
    for w in ("flat", "textured"):
        assert (w, "base", 0) in got
        for m in ("LoRA", "T-LoRA Rmin 1", "T-LoRA Rmin 1 (no mask)"):
            assert {(w, m, 2), (w, m, 4)} <= got
    assert all(0 <= p[k] <= 1 for p in points for k in ("text_alignment", "shape_iou", "colour_distance"))
    text = out.read_text()
    assert "smoke test" in text and "### flat world" in text and "### textured world" in text
    first = plot.read_bytes()
    assert Image.open(plot).size[0] > 600
    # the report is a function of the log alone
    assert main(["--from-log", str(log), "--out", str(tmp_path / "again.md"), "--plot", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.md").read_text().replace("again.png", "tw.png") == text
    assert len(first) > 0


def test_paths_side_by_side_give_the_numbers_of_one_by_one(tmp_path):
    # each of 2 workers runs cpu_count // 2 threads; one-by-one here with as many threads must give the same numbers
    import os
    from research.toyworld.study import run_study, study_runs
    from tlora.toyworld.experiment import LORA, tlora_method
    runs = study_runs(["flat"], [1], [0], [LORA, tlora_method(1)], [5e-3], rank=4, steps=2, every=1, n_prompts=2,
                      workdir=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        alone = run_study(runs, jobs=1, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    together = run_study(runs, jobs=2, log=lambda s: None)
    assert [p.method for p in together] == ["base", "LoRA", "LoRA", "T-LoRA Rmin 1", "T-LoRA Rmin 1 (no mask)",
                                            "T-LoRA Rmin 1", "T-LoRA Rmin 1 (no mask)"]
    assert together == alone
    assert any(p.text_alignment > 0 for p in alone)     # the numbers compared are not all zero


def test_pretraining_script_writes_a_stock_pipeline_and_reproduce_reads_its_steps(tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from research.toyworld.pretrain import main
    out = tmp_path / "tw"
    threads = torch.get_num_threads()
    try:
        assert main(["--out", str(out), "--vae-steps", "2", "--steps", "3", "--eval", "0", "--seed", "5",
                     "--images", "64", "--high-noise", "0.25", "--noisy-from", "900", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    info = json.loads((out / "toyworld.json").read_text())
    assert (info["seed"], info["vae_steps"], info["denoiser_steps"], info["high_noise"], info["noisy_from"]) == \
        (5, 2, 3, 0.25, 900)
    assert (info["minutes"], info["threads"]) == (None, 1)     # step counts given: no time budget was used
    assert not (tmp_path / "tw.partial").exists()
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # --reproduce takes seed, step counts, timestep mix and thread count from the model's toyworld.json; with
    # the same torch build that is the same run, bit for bit (the tokenizer's ids no longer depend on hash order)
    again = tmp_path / "again"
    try:
        assert main(["--out", str(again), "--reproduce", str(out), "--eval", "0", "--images", "64"]) == 0
    finally:
        torch.set_num_threads(threads)
    redo = json.loads((again / "toyworld.json").read_text())
    assert (redo["seed"], redo["denoiser_steps"], redo["high_noise"], redo["noisy_from"], redo["threads"]) == \
        (5, 3, 0.25, 900, 1)
    from safetensors.torch import load_file
    for sub, name in (("vae", "diffusion_pytorch_model"), ("unet", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        a = load_file(str(out / sub / f"{name}.safetensors"))
        b = load_file(str(again / sub / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # same ids for the same words (the trainer may list merges of equal count in another order; world words are
    # one token either way)
    tok_a, tok_b = DiffusionPipeline.from_pretrained(str(again)).tokenizer, pipe.tokenizer
    assert tok_a.get_vocab() == tok_b.get_vocab()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x"), "--reproduce", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "toyworld.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [["--high-noise", "2"], ["--high-noise", "-0.1"], ["--eval-every", "-1"],
                                 ["--threads", "0"], ["--steps", "many"],
                                 ["--noisy-from", "1000"], ["--noisy-from", "-1"], ["--eval", "-1"],
                                 ["--images", "0"], ["--minutes", "0"], ["--vae-share", "1"], ["--steps", "0"],
                                 ["--vae-steps", "0"]])
def test_pretraining_rejects_bad_numbers_in_one_line_and_writes_nothing(tmp_path, capsys, bad):
    from research.toyworld.pretrain import main
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "tw"), "--vae-steps", "2", "--steps", "3"] + bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    flags = ("--high-noise", "--noisy-from", "--eval-every", "--threads", "--steps", "--eval ", "--images",
             "--minutes", "--vae-share", "--vae-steps")
    named = [f.strip() for f in flags if f in err]
    assert named == [bad[0]]                  # the line names the one flag that is wrong, not every rule
    assert list(tmp_path.iterdir()) == []


def test_evaluate_prints_the_shipped_models_caption_following(capsys):
    # Done-when: the caption-following figure is printed by a command; it is the one recorded beside the weights
    from research.toyworld.study import default_model
    from research.toyworld.pretrain import main
    assert main(["--evaluate", str(default_model())]) == 0           # 100 captions, DDIM 25 steps, guidance 3
    printed = json.loads(capsys.readouterr().out)
    recorded = json.loads((default_model() / "toyworld.json").read_text())["caption_following"]
    assert printed.keys() == recorded.keys()
    assert all(abs(printed[k] - recorded[k]) <= 0.02 for k in printed), (printed, recorded)
    assert printed["background"] >= 0.8 and printed["position"] >= 0.8     # the bar


SCORE = re.compile(r"^  (LoRA|T-LoRA) +text alignment ([\d.]+)  shape IoU ([\d.]+)  colour distance ([\d.]+)$", re.M)


def test_the_demo_at_full_length_prints_the_docs_numbers_under_1_and_2_threads(tmp_path):
    """``tlora demo`` as ``make demo`` runs it (the shipped model, the full recipe), once with 1 and once with 2
    torch threads side by side: both print the numbers docs/demo.md quotes, and the grids agree to a pixel level."""
    import os
    import subprocess
    import sys
    from tlora import demo
    from tlora.toyworld.world import CONCEPTS, FlatWorld, shipped_model
    from tlora.weights import read_header
    procs = {n: subprocess.Popen([sys.executable, "-m", "tlora", "demo", "--out", str(tmp_path / f"t{n}")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(n)}) for n in (1, 2)}
    printed = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
        printed[n] = SCORE.findall(out)
        assert "Traceback" not in err and "UserWarning" not in err
    quoted = SCORE.findall((Path(__file__).resolve().parents[1] / "docs" / "demo.md").read_text())
    assert [row[0] for row in quoted] == list(demo.RUNS)
    assert printed[1] == printed[2] == quoted
    # the grid: labelled rows and columns, tiles enlarged to at least 64 px, the training image in column 1
    sheets = [np.asarray(Image.open(tmp_path / f"t{n}" / "lora-vs-tlora.png").convert("RGB")) for n in (1, 2)]
    assert sheets[0].shape == sheets[1].shape
    assert np.abs(sheets[0].astype(int) - sheets[1]).max() <= 2
    shown = np.asarray(Image.open(Path(__file__).resolve().parents[1] / "docs" / "demo-grid.png").convert("RGB"))
    assert shown.shape == sheets[0].shape and np.abs(shown.astype(int) - sheets[0]).max() <= 2   # the docs' picture
    sheet = sheets[0]
    tile = 128
    left, top = sheet.shape[1] - 7 * tile, sheet.shape[0] - 3 * tile
    assert tile >= 64 and left >= 100 and top >= 12
    gray = sheet.mean(axis=2)
    assert (gray[:top, left:] < 100).any() and (gray[top:, :left] < 100).any()      # the labels are drawn
    reference = np.asarray(FlatWorld.render(CONCEPTS[demo.CONCEPT]).convert("RGB").resize((tile, tile),
                                                                                           Image.Resampling.NEAREST))
    for row in range(3):
        assert np.array_equal(sheet[top + row * tile:top + (row + 1) * tile, left:left + tile], reference), row
    # the two runs are the recipe the docs describe
    lora_h = read_header(tmp_path / "t1" / "LoRA" / "run" / "tlora.safetensors")
    tlora_h = read_header(tmp_path / "t1" / "T-LoRA" / "run" / "tlora.safetensors")
    for h in (lora_h, tlora_h):
        cfg = h["training"]["config"]
        assert (cfg["learning_rate"], cfg["max_steps"], cfg["seed"], h["config"]["rank"]) == (demo.LR, demo.STEPS, 0,
                                                                                               demo.RANK)
        assert Path(h["base_model"]) == shipped_model()
    assert all(m["min_rank"] == m["rank"] for m in lora_h["modules"].values())   # LoRA: every rank at every step
    assert tlora_h["variant"] == "ortho" and {m["min_rank"] for m in tlora_h["modules"].values()} == {demo.RANK // 4}


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--rank", "-1"]])
def test_demo_rejects_bad_numbers_in_one_line_and_writes_nothing(tmp_path, capsys, bad):
    from tlora.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)] + bad) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"tlora demo: error: {bad[0]} {bad[1]} must be at least 1"
    assert not out.exists()


def test_the_published_study_follows_from_its_log_and_the_readme_quotes_it(tmp_path):
    # Done-when: benchmarks/toyworld.md and the README hold the curves (a PNG) and the matched-fidelity tables of
    # both worlds, recomputed here from the run's per-point log
    from benchmarks.toyworld import plot, read_log, world_tables
    root = Path(__file__).resolve().parent.parent
    header, points = read_log(root / "benchmarks" / "toyworld-points.jsonl")
    assert header["worlds"] == ["flat", "textured"] and not header["quick"]
    assert (header["concepts"], header["seeds"], header["rank"], header["min_ranks"]) == (2, 2, 64, [1, 16, 32])
    methods = ["LoRA"] + [f"T-LoRA Rmin {r}{x}" for r in (1, 16, 32) for x in ("", " (no mask)")]
    steps = range(header["every"], header["steps"] + 1, header["every"])
    expected = {(w, c, s, "base", 0.0, 0) for w in header["worlds"] for c in (0, 1) for s in (0, 1)}
    expected |= {(w, c, s, m, lr, n) for w in header["worlds"] for c in (0, 1) for s in (0, 1) for m in methods
                 for lr in header["lrs"] for n in steps}
    got = [(p["world"], p["concept"], p["seed"], p["method"], p["lr"], p["step"]) for p in points]
    assert len(got) == len(set(got)) and set(got) == expected
    md = (root / "benchmarks" / "toyworld.md").read_text()
    readme = (root / "docs" / "toyworld.md").read_text()      # the study lives in the toy-world docs
    assert f"Command: `{header['command']}`" in md and "![trade-off curves](../docs/toyworld-study.png)" in md
    assert "![toy-world trade-off curves](toyworld-study.png)" in readme
    for w in header["worlds"]:
        lines = world_tables(points, w, header["levels"])
        assert all(line in md.splitlines() for line in lines if line), w
        matched = [line for line in lines if line.startswith("| ") and "TA at IoU" not in line][:len(methods)]
        assert len(matched) == len(methods) and all(line in readme.splitlines() for line in matched), w
    # the published plot is the one the log draws
    plot(points, tmp_path / "again.png", header["levels"])
    a = np.asarray(Image.open(root / "docs" / "toyworld-study.png").convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "again.png").convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape and (np.abs(a - b).max(-1) > 16).mean() < 0.01


@pytest.mark.parametrize("content", [None, "not json\n", '{"worlds": ["flat"]}\n{"method": "LoRA"}\n'])
def test_from_log_refuses_a_bad_log_in_one_line_and_writes_nothing(tmp_path, capsys, content):
    from benchmarks.toyworld import main
    log = tmp_path / "points.jsonl"
    if content is not None:
        log.write_text(content)
    out, plot = tmp_path / "tw.md", tmp_path / "tw.png"
    with pytest.raises(SystemExit) as e:
        main(["--from-log", str(log), "--out", str(out), "--plot", str(plot)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--from-log" in err
    assert not out.exists() and not plot.exists()
