"""benchmarks/dreambooth.py end to end on a tiny SDXL pipeline, tiny CLIP / DINO and a made-up dataset of
three images laid out as the DreamBooth repository ships it."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tlora.testing import build_pipeline, save_clip, save_dinov2

CLASSES = "Classes\n\nsubject_name,class\nbackpack,backpack\ndog,dog\nteapot,teapot\n\nPrompts\n..."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    build_pipeline("sdxl").save_pretrained(root / "sdxl")
    save_clip(root / "clip")
    save_dinov2(root / "dino")
    data = root / "dataset"
    rng = np.random.default_rng(0)
    for name in ("backpack", "dog", "teapot"):
        (data / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / name / "00.jpg")
    (data / "prompts_and_classes.txt").write_text(CLASSES)
    return root


def args(root, out, *extra):
    return ["--dataset", str(root / "dataset"), "--model", str(root / "sdxl"), "--out", str(out), "--device", "cpu",
            "--clip", str(root / "clip"), "--dino", str(root / "dino"), "--rank", "8", "--min-rank", "4",
            "--steps", "2", "--resolution", "32", "--prompts", "11", "--images-per-prompt", "1",
            "--inference-steps", "2", *extra]


def test_protocol_runs_end_to_end_and_its_table_follows_from_the_images(setup, tmp_path, capsys):
    from benchmarks.dreambooth import main
    from tlora.evaluate import Embedder, scores
    from tlora.weights import read_header
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    assert main(args(setup, out)) == 0
    torch.set_num_threads(threads)
    emb = Embedder(str(setup / "clip"), str(setup / "dino"))
    per_method = {}
    for method, variant, rmin in (("LoRA", "vanilla", 8), ("T-LoRA", "ortho", 4)):
        per_method[method] = []
        for subject in ("backpack", "dog", "teapot"):
            where = out / method / subject
            h = read_header(where / "run" / "tlora.safetensors")
            assert h["variant"] == variant and {m["min_rank"] for m in h["modules"].values()} == {rmin}
            prompts = json.loads((where / "images" / "prompts.json").read_text())
            assert len(prompts) == 11
            # live subjects get the live prompt set, objects the object set (prompt 11 differs between them)
            eleventh = prompts["010.png"]
            assert eleventh == ("a sks dog wearing a red hat" if subject == "dog" else
                                f"a sks {subject} with a wheat field in the background")
            images = [Image.open(where / "images" / n).convert("RGB") for n in sorted(prompts)]
            ref = [Image.open(setup / "dataset" / subject / "00.jpg").convert("RGB")]
            again = scores(emb, images, [prompts[n] for n in sorted(prompts)], ref, "sks")["overall"]
            saved = json.loads((where / "scores.json").read_text())
            assert saved == pytest.approx(again, abs=1e-6)
            per_method[method].append(saved)
    table = (out / "table.md").read_text()
    for method, rows in per_method.items():
        line = re.search(rf"^\| {method} \| 3 \| ([-\d.]+) ± [\d.]+ \| ([-\d.]+) ± [\d.]+ \| ([-\d.]+) ± [\d.]+ \|", table, re.M)
        assert line, table
        means = [float(v) for v in line.groups()]
        assert means == pytest.approx([np.mean([r[k] for r in rows]) for k in ("IS", "DINO_IS", "TS")], abs=6e-4)
    assert "0.901 / 0.808 / 0.232" in table and "0.900 / 0.802 / 0.256" in table


def exit_code(argv):
    from benchmarks.dreambooth import main
    try:
        return main(argv)
    except SystemExit as e:          # argparse-style errors
        return e.code


@pytest.mark.parametrize("extra, says", [(["--min-rank", "9"], "--min-rank"), (["--subjects", "cat"], "'cat'"),
                                         (["--image", "3"], "--image 3"), (["--prompts", "26"], "--prompts")])
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, extra, says):
    out = tmp_path / "run"
    assert exit_code(args(setup, out, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err
    assert not out.exists()
