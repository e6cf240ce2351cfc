"""tlora generate: PNGs, grid and generate.json from a tiny pipeline saved to a temporary folder."""
import json

import numpy as np
import pytest
from PIL import Image

import tlora
from tlora.cli import main
from tlora.testing import build_pipeline

from conftest import perturb, with_flags


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    pipe = build_pipeline("sd15")
    pipe.save_pretrained(root / "model")
    net = tlora.inject(pipe.unet, tlora.TLoRAConfig(rank=8))
    perturb(net, std=0.3)
    tlora.save(net, root / "w.safetensors", metadata={"family": "sd15", "base_model": "tiny"})
    return root


def test_generate_writes_pngs_grid_and_json(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(setup / "model"), "--weights", str(setup / "w.safetensors"),
               "--prompt", "a sks dog on the beach", "--prompt", "a sks dog", "--num-images", "2", "--steps", "3",
               "--seed", "5", "--height", "32", "--width", "32", "--out", str(out)])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert len(pngs) == 4 and (out / "grid.png").is_file()
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))     # 2 × 2 tiles of 32 px enlarged 4×, labelled
    top, left = grid.shape[0] - 2 * 128, grid.shape[1] - 2 * 128
    assert top >= 12 and left >= 100
    for i, name in enumerate(pngs):      # row = prompt, column = seed
        r, c = divmod(i, 2)
        tile = grid[top + r * 128:top + (r + 1) * 128:4, left + c * 128:left + (c + 1) * 128:4]
        assert np.array_equal(tile, np.asarray(Image.open(out / name).convert("RGB"))), name
    rec = json.loads((out / "generate.json").read_text())
    assert rec["steps"] == 3 and rec["guidance"] == 7.5 and rec["family"] == "sd15" and rec["mask"] is True
    assert [i["seed"] for i in rec["images"]] == [5, 6, 5, 6]
    assert rec["schedule"] == {"rank": 8, "min_rank": 1, "exponent": 1.0, "num_train_timesteps": 1000}
    # --no-mask gives other pixels for the same seed
    rc = main(["generate", "--model", str(setup / "model"), "--weights", str(setup / "w.safetensors"),
               "--prompt", "a sks dog on the beach", "--steps", "3", "--seed", "5", "--height", "32", "--width", "32",
               "--no-mask", "--out", str(tmp_path / "nomask")])
    assert rc == 0
    a = np.asarray(Image.open(out / pngs[0]))
    b = np.asarray(Image.open(next((tmp_path / "nomask").glob("0*.png"))))
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("extra,match", [
    (["--num-images", "0"], "argument --num-images: must be an integer >= 1"),
    (["--steps", "-1"], "argument --steps: must be an integer >= 1"),
    (["--height", "30"], "a multiple of 8"),
    (["--weights", "/nope.safetensors"], "weights file not found"),
    (["--model", "/no/such/model"], "model not found"),
    (["--prompts-file", "EMPTY"], "prompts file is empty"),
    (["--multiplier", "nan"], "argument --multiplier: must be a finite number"),
    (["--multiplier", "inf"], "argument --multiplier: must be a finite number"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, extra, match):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = ["generate", "--model", str(setup / "model"), "--weights", str(setup / "w.safetensors"),
            "--prompt", "x", "--out", str(tmp_path / "out")]
    argv = with_flags(argv, [str(empty) if e == "EMPTY" else e for e in extra])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


def test_missing_required_option_is_one_line_exit_2(capsys):
    assert main(["generate", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required: --model, --weights, --out" in err[0]


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_write_failure_mid_run_is_one_line_exit_1_and_leaves_nothing_of_the_unit(setup, tmp_path, capsys,
                                                                                    monkeypatch, out_exists):
    """The disk fills after the images are written, at grid.png: one line naming the file, exit 1 (not bad
    input), no traceback; the images and generate.json are one unit, so none of them is left, no temporary file
    and no empty output folder; a user's file already in --out stays as it was."""
    import errno
    from PIL import Image
    real_save = Image.Image.save

    def full(self, fp, *args, **kw):
        if str(fp).endswith("grid.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kw)
    out = tmp_path / "o"
    if out_exists:
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    monkeypatch.setattr(Image.Image, "save", full)
    rc = main(["generate", "--model", str(setup / "model"), "--weights", str(setup / "w.safetensors"),
               "--prompt", "a sks dog", "--num-images", "2", "--steps", "1", "--height", "32", "--width", "32",
               "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("images:")]   # bar
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0] and "grid.png" in err[0], err
    if out_exists:
        assert [(q.name, q.read_text()) for q in out.iterdir()] == [("mine.txt", "mine")]
    else:
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_earlier_generate_output_is_kept_unless_overwrite(setup, tmp_path, capsys):
    """A second generate into the same --out is refused in one line and changes nothing; --overwrite replaces
    the earlier images and generate.json."""
    argv = ["generate", "--model", str(setup / "model"), "--weights", str(setup / "w.safetensors"), "--prompt",
            "a sks dog", "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    before = {q.name: q.read_bytes() for q in (tmp_path / "o").iterdir()}
    capsys.readouterr()
    assert main(argv + ["--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "earlier generate output" in err[0] and "--overwrite" in err[0], err
    assert {q.name: q.read_bytes() for q in (tmp_path / "o").iterdir()} == before
    assert main(argv + ["--seed", "3", "--overwrite"]) == 0
    record = json.loads((tmp_path / "o" / "generate.json").read_text())
    assert record["seeds"] == [3]
    assert sorted(q.name for q in (tmp_path / "o").iterdir()) == ["0000-seed3.png", "generate.json", "grid.png"]
