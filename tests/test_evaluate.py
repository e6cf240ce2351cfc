"""tlora evaluate on tiny random CLIP and DINOv2 models saved to temporary folders and loaded by path."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlora.cli import main
from tlora.evaluate import LIVE_PROMPTS, OBJECT_PROMPTS, Embedder, evaluate_folder, strip_placeholder
from tlora.testing import save_clip, save_dinov2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodels")
    save_clip(root / "clip")
    save_dinov2(root / "dino")
    return str(root / "clip"), str(root / "dino")


def write_images(folder, n, seed=0, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_identical_images_give_is_one(models, tmp_path):
    clip, dino = models
    write_images(tmp_path / "gen", 2, seed=1)
    write_images(tmp_path / "ref", 1, seed=1)          # the same pixels as gen/000.png
    (tmp_path / "gen" / "001.png").write_bytes((tmp_path / "gen" / "000.png").read_bytes())
    rep = evaluate_folder(str(tmp_path / "gen"), str(tmp_path / "ref" / "000.png"), str(tmp_path / "r.json"),
                          clip=clip, dino=dino)
    assert rep["overall"]["n"] == 2
    assert rep["overall"]["IS"] == pytest.approx(1.0, abs=1e-6)
    assert rep["overall"]["DINO_IS"] == pytest.approx(1.0, abs=1e-6)
    assert rep["overall"]["TS"] is None                 # a plain folder without --prompts
    other = evaluate_folder(str(tmp_path / "gen"), str(write_images(tmp_path / "o", 1, seed=9)[0]),
                            str(tmp_path / "r2.json"), clip=clip, dino=dino)
    assert other["overall"]["IS"] < 0.9999


def test_metric_math_matches_direct_computation(models, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor
    clip, dino = models
    gen = write_images(tmp_path / "gen", 4, seed=2)
    refs = write_images(tmp_path / "ref", 2, seed=3)
    prompts = ["a sks dog swimming", "a sks dog swimming", "a sks dog in the snow", "a sks dog in the snow"]
    (tmp_path / "gen" / "generate.json").write_text(json.dumps(
        {"images": [{"file": p.name, "prompt": q, "seed": 0} for p, q in zip(gen, prompts)]}))
    assert main(["evaluate", "--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                 "--clip", clip, "--dino", dino, "--placeholder", "sks", "--out", str(tmp_path / "report.json")]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    # direct: the same models, no tlora code
    m, proc = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    dm, dproc = AutoModel.from_pretrained(dino).eval(), AutoImageProcessor.from_pretrained(dino)
    G = [Image.open(p).convert("RGB") for p in gen]
    R = [Image.open(p).convert("RGB") for p in refs]
    with torch.no_grad():
        def img(x):
            f = m.get_image_features(pixel_values=proc(images=x, return_tensors="pt")["pixel_values"])
            f = f if isinstance(f, torch.Tensor) else f.pooler_output
            return torch.nn.functional.normalize(f, dim=-1)
        def dimg(x):
            f = dm(pixel_values=dproc(images=x, return_tensors="pt")["pixel_values"]).pooler_output
            return torch.nn.functional.normalize(f, dim=-1)
        tok = proc(text=["a dog swimming", "a dog in the snow"], return_tensors="pt", padding=True)
        t = m.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        t = torch.nn.functional.normalize(t if isinstance(t, torch.Tensor) else t.pooler_output, dim=-1)
    gi, ri = img(G).detach(), img(R).detach()
    assert rep["overall"]["IS"] == pytest.approx(float((gi @ ri.T).mean()), abs=1e-5)
    assert rep["overall"]["DINO_IS"] == pytest.approx(float((dimg(G) @ dimg(R).T).mean()), abs=1e-5)
    ts = torch.stack([gi[0] @ t[0], gi[1] @ t[0], gi[2] @ t[1], gi[3] @ t[1]])
    assert rep["overall"]["TS"] == pytest.approx(float(ts.mean()), abs=1e-5)
    assert rep["per_prompt"]["a sks dog swimming"]["TS"] == pytest.approx(float(ts[:2].mean()), abs=1e-5)
    assert rep["per_prompt"]["a sks dog in the snow"]["n"] == 2
    assert set(rep["overall"]) == {"n", "IS", "DINO_IS", "TS"}


def test_placeholder_is_stripped():
    assert strip_placeholder("a sks dog swimming", "sks") == "a dog swimming"
    assert strip_placeholder("sks, the dog", "sks") == ", the dog"
    assert strip_placeholder("a sksx dog", "sks") == "a sksx dog"
    assert len(LIVE_PROMPTS) == len(OBJECT_PROMPTS) == 25 and all("{0}" in p for p in LIVE_PROMPTS + OBJECT_PROMPTS)


def test_64_images_run_in_batches(models, tmp_path):
    clip, dino = models
    write_images(tmp_path / "gen", 64, seed=4)
    emb = Embedder(clip, dino, batch_size=32)
    calls = {"clip": 0, "dino": 0}
    emb.clip.vision_model.register_forward_hook(lambda *a: calls.__setitem__("clip", calls["clip"] + 1))
    emb.dino.register_forward_hook(lambda *a: calls.__setitem__("dino", calls["dino"] + 1))
    from tlora.evaluate import scores
    imgs = [Image.open(p) for p in sorted((tmp_path / "gen").glob("*.png"))]
    rep = scores(emb, imgs, ["a sks dog"] * 64, imgs[:1], "sks")
    assert rep["overall"]["n"] == 64
    assert calls == {"clip": 2 + 1, "dino": 2 + 1}   # 64 images in 2 batches, plus the reference


@pytest.mark.parametrize("case,match", [("noimages", "no images"), ("noref", "reference not found"),
                                        ("noweights", "has no weights"), ("mixed", "mixed sizes")])
def test_bad_input_one_line_exit_2(models, tmp_path, capsys, case, match):
    clip, dino = models
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    write_images(ref, 1)
    if case != "noimages":
        write_images(gen, 2)
    else:
        gen.mkdir()
    if case == "mixed":
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(gen / "big.png")
    if case == "noweights":
        (tmp_path / "empty_clip").mkdir()
        clip = str(tmp_path / "empty_clip")
    argv = ["evaluate", "--images", str(gen), "--reference", str(ref if case != "noref" else tmp_path / "nope"),
            "--clip", clip, "--dino", dino, "--out", str(tmp_path / "r.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "r.json").exists()


def test_generate_prompt_set(capsys):
    assert main(["evaluate", "--images", "x", "--reference", "y", "--out", "z", "--prompt-set", "live",
                 "--placeholder", "sks", "--class", "dog"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 25 and lines[0] == "a sks dog in the jungle"


@pytest.mark.parametrize("content,says", [
    ({"images": [{"file": "../../../etc/hostname", "prompt": "x"}]}, "outside its own folder"),
    ({"images": [{"prompt": "x"}]}, "'images' must be a list"),
    ({"images": "a.png"}, "'images' must be a list"),
    ("{not json", "is not valid JSON"),
])
def test_a_hostile_generate_json_is_one_line_and_exit_2(tmp_path, capsys, content, says):
    write_images(tmp_path / "gen", 1)
    write_images(tmp_path / "ref", 1)
    (tmp_path / "gen" / "generate.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["evaluate", "--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "report.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "report.json").exists()
