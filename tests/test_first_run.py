"""A newcomer's first own run: the toy model by its short name, the model's own resolution, a start summary, no
raw warnings, no carriage-return lines in a log, and prompts written the way training wrote them."""
import json
from pathlib import Path

import pytest
from PIL import Image

import tlora
from tlora.cli import main


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """``tlora train --model toyworld --image my.png --placeholder sks --class shape --steps 3`` (no resolution),
    its stderr (pytest's capture is not a terminal, as CI and log files are not)."""
    root = tmp_path_factory.mktemp("first")
    Image.new("RGB", (48, 40), (250, 200, 0)).save(root / "my.png")
    import io
    import contextlib
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["train", "--model", "toyworld", "--image", str(root / "my.png"), "--placeholder", "sks",
                   "--class", "shape", "--steps", "3", "--out", str(root / "run"), "--device", "cpu",
                   "--set", "validation_inference_steps=2"])
    return root, rc, err.getvalue(), out.getvalue()


def test_the_toy_model_by_its_short_name_trains_at_its_own_resolution(first_run):
    root, rc, err, out = first_run
    assert rc == 0, err[-2000:]
    resolved = json.loads((root / "run" / "config.resolved.json").read_text())
    assert resolved["resolution"] == 32 and resolved["model"] == "toyworld"
    assert (resolved["data_dir"], resolved["one_image"]) == (str(root), "my.png")
    header = tlora.weights.read_header(root / "run" / "tlora.safetensors")
    assert header["training"]["resolution"] == 32 and header["family"] == "sd15"


def test_the_start_summary_and_progress_lines_a_log_can_hold(first_run):
    root, rc, err, out = first_run
    lines = err.splitlines()
    summary = next(ln for ln in lines if "px, steps" in ln)
    assert "toyworld (sd15), 32 px, steps 0 → 3, batch 1, rank 64 / Rmin 1 / ortho" in summary
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["1/3", "2/3", "3/3"]
    assert not any("\r" in ln or len(ln) > 1024 for ln in lines), [ln[:200] for ln in lines if len(ln) > 1024]


def test_warnings_are_one_readable_note_line(first_run):
    root, rc, err, out = first_run
    assert "UserWarning" not in err and "warnings.warn" not in err
    notes = [ln for ln in err.splitlines() if ": note: " in ln]
    assert any(n.startswith("tlora train: note: 24 layers are narrower than rank 64") for n in notes), notes
    # the default caption 'a photo of sks shape': the toy tokenizer knows neither 'photo' nor 'of'
    assert any("does not know 'photo', 'of' in 'a photo of sks shape'" in n for n in notes), notes


def test_generate_fills_in_braces_zero_and_notes_a_prompt_without_the_concept(first_run, capsys):
    root, rc, err, out = first_run
    w = str(root / "run" / "tlora.safetensors")
    argv = ["generate", "--model", "toyworld", "--weights", w, "--steps", "2", "--out"]
    assert main(argv + [str(root / "g1"), "--prompt", "a {0} on red"]) == 0
    record = json.loads((root / "g1" / "generate.json").read_text())
    assert [i["prompt"] for i in record["images"]] == ["a sks shape on red"]    # the weights' own placeholder, class
    assert not [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert main(argv + [str(root / "g2"), "--prompt", "a circle on red"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "no prompt holds the placeholder 'sks'" in notes[0]
    assert main(argv + [str(root / "g3"), "--prompt", "a {0} on red", "--placeholder", "zwx", "--class", "toy"]) == 0
    assert json.loads((root / "g3" / "generate.json").read_text())["images"][0]["prompt"] == "a zwx toy on red"


@pytest.mark.parametrize("config,extra,line", [
    ({"model": "toyworld", "data_dir": ".", "max_step": 3}, [],
     "unknown c.json key(s): 'max_step' (did you mean 'max_steps'?)"),
    ({"model": "toyworld", "data_dir": ".", "max_steps": 3}, ["--set", "tlora.rank=0"],
     "tlora.rank in c.json with --set must be an integer >= 1 and <= 4096, got 0"),
    ({"model": "toyworld", "data_dir": "."}, ["--steps", "-1"],
     "argument --steps: must be an integer >= 1 and <= 10000000, got '-1' (see --help)"),
])
def test_a_config_mistake_is_refused_before_torch_is_imported(tmp_path, config, extra, line):
    """The config and the flags are read and checked before torch, diffusers, accelerate, transformers or the
    quantization backends are imported: the modules loaded at the refusal are listed, in a fresh interpreter."""
    import subprocess
    import sys
    (tmp_path / "c.json").write_text(json.dumps(config))
    code = ("import sys; from tlora.cli import main; rc = main(['train', '--config', 'c.json'] + sys.argv[1:]); "
            "print(rc, sorted(m for m in ('torch', 'diffusers', 'accelerate', 'transformers', 'optimum.quanto', "
            "'torchao', 'bitsandbytes') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *extra], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout.split("\n")[-2] == "2 []", r.stdout + r.stderr[-1000:]
    assert r.stderr.strip().splitlines() == [f"tlora train: error: {line}"]


def test_import_tlora_does_not_import_torch_until_a_name_is_used():
    import subprocess
    import sys
    code = ("import sys, tlora; a = 'torch' in sys.modules; tlora.attach; "
            "print(a, 'torch' in sys.modules, sorted(tlora.__all__) == sorted(dir(tlora)) or set(tlora.__all__) <= set(dir(tlora)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "True", "True"], r.stderr[-1000:]


@pytest.mark.parametrize("offline", [True, False])
def test_evaluate_without_its_models_says_so_at_once(tmp_path, capsys, monkeypatch, offline):
    """Models neither local nor cached: HF_HUB_OFFLINE, or a hub that cannot be reached (a closed local port here),
    is one line naming the model and the way out; no download retries (the connection is tried once)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "imgs" / "0.png")
    Image.new("RGB", (32, 32), (9, 2, 3)).save(tmp_path / "ref.png")
    rc = main(["evaluate", "--images", str(tmp_path / "imgs"), "--reference", str(tmp_path / "ref.png"),
               "--prompts", "a sks dog", "--out", str(tmp_path / "r.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "openai/clip-vit-base-patch32 is not in the local Hugging Face cache" in err[0]
    assert ("HF_HUB_OFFLINE is set" in err[0]) == offline and "--clip" in err[0]
    assert not (tmp_path / "r.json").exists()


def _label_bands(path, rows, cols, tile=128):
    """The label bands of a grid of ``rows`` × ``cols`` tiles of ``tile`` px (32 px images enlarged 4×): both exist
    and hold dark text pixels. Returns (grid as an array, left band width, top band height)."""
    import numpy as np
    a = np.asarray(Image.open(path).convert("RGB"))
    top, left = a.shape[0] - rows * tile, a.shape[1] - cols * tile
    assert top >= 12 and left >= 100, (a.shape, top, left)
    gray = a.mean(axis=2)
    assert (gray[:top, left:] < 100).any() and (gray[top:, :left] < 100).any()   # column and row labels
    assert (gray[:top, left:] > 250).mean() > 0.5 and (gray[top:, :left] > 250).mean() > 0.5   # bands, not tiles
    return a, left, top


def test_grids_are_labelled_with_tiles_a_person_can_see(first_run):
    import numpy as np
    root, rc, err, out = first_run
    _label_bands(root / "run" / "samples" / "step-3.png", rows=1, cols=1)
    assert main(["generate", "--model", "toyworld", "--weights", str(root / "run" / "tlora.safetensors"), "--steps",
                 "2", "--num-images", "2", "--prompt", "a {0} on red", "--prompt", "a {0} on blue",
                 "--out", str(root / "g4")]) == 0
    grid, left, top = _label_bands(root / "g4" / "grid.png", rows=2, cols=2)
    first = np.asarray(Image.open(root / "g4" / "0000-seed0.png").convert("RGB"))
    assert np.array_equal(grid[top:top + 128:4, left:left + 128:4], first)       # the tile is the image, 4× enlarged


def test_the_lazy_names_and_the_ones_type_checkers_see_agree():
    # tlora/__init__ names each public name twice (its owner for __getattr__, an import for type checkers and the
    # API reference): the two lists are the same
    import ast
    import tlora
    tree = ast.parse(Path(tlora.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.name: imp.module for imp in block.body for a in imp.names}
    assert seen == dict(tlora._OWNERS)
    assert all(getattr(tlora, name) is getattr(__import__(f"tlora.{mod}", fromlist=[name]), name)
               for name, mod in seen.items())
