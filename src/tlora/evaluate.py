"""``tlora evaluate``: the paper's metrics on any folder of images.

* IS (image similarity): mean cosine similarity between CLIP image embeddings of every generated image and
  every reference image;
* DINO-IS: the same with a DINO / DINOv2 ViT (the CLS token, ``pooler_output`` when the model has one);
* TS (text similarity): mean CLIP cosine between each image and its prompt with the placeholder token
  removed ("a sks dog swimming" → "a dog swimming").

Defaults follow the usual choices of the personalisation literature: CLIP ViT-B/32
(``openai/clip-vit-base-patch32``) and DINO ViT-S/16 (``facebook/dino-vits16``). Models load once from a
local folder or hub id through transformers and run in batches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

from .errors import UsageError
from .devices import check_device
from .data import to_rgb
from .fileio import IMAGE_EXTS, check_output, first_line, looks_like_hub_id, read_mapping, write_json

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"

# The DreamBooth evaluation prompts (Ruiz et al. 2023), "{0}" = "placeholder class".
OBJECT_PROMPTS = [
    "a {0} in the jungle", "a {0} in the snow", "a {0} on the beach", "a {0} on a cobblestone street",
    "a {0} on top of pink fabric", "a {0} on top of a wooden floor", "a {0} with a city in the background",
    "a {0} with a mountain in the background", "a {0} with a blue house in the background",
    "a {0} on top of a purple rug in a forest", "a {0} with a wheat field in the background",
    "a {0} with a tree and autumn leaves in the background", "a {0} with the Eiffel Tower in the background",
    "a {0} floating on top of water", "a {0} floating in an ocean of milk",
    "a {0} on top of green grass with sunflowers around it", "a {0} on top of a mirror",
    "a {0} on top of the sidewalk in a crowded street", "a {0} on top of a dirt road", "a {0} on top of a white rug",
    "a red {0}", "a purple {0}", "a shiny {0}", "a wet {0}", "a cube shaped {0}",
]
LIVE_PROMPTS = [
    "a {0} in the jungle", "a {0} in the snow", "a {0} on the beach", "a {0} on a cobblestone street",
    "a {0} on top of pink fabric", "a {0} on top of a wooden floor", "a {0} with a city in the background",
    "a {0} with a mountain in the background", "a {0} with a blue house in the background",
    "a {0} on top of a purple rug in a forest", "a {0} wearing a red hat", "a {0} wearing a santa hat",
    "a {0} wearing a rainbow scarf", "a {0} wearing a black top hat and a monocle", "a {0} in a chef outfit",
    "a {0} in a firefighter outfit", "a {0} in a police outfit", "a {0} wearing pink glasses",
    "a {0} wearing a yellow shirt", "a {0} in a purple wizard outfit",
    "a red {0}", "a purple {0}", "a shiny {0}", "a wet {0}", "a cube shaped {0}",
]
PROMPT_SETS = {"live": LIVE_PROMPTS, "object": OBJECT_PROMPTS}


def prompt_set(name: str, placeholder: str, class_name: str) -> List[str]:
    if name not in PROMPT_SETS:
        raise UsageError(f"--prompt-set must be one of {sorted(PROMPT_SETS)}, got {name!r}")
    subject = f"{placeholder} {class_name}".strip()
    return [p.format(subject) for p in PROMPT_SETS[name]]


def strip_placeholder(prompt: str, placeholder: Optional[str]) -> str:
    """'a sks dog swimming' → 'a dog swimming' (whole-word removal, spaces collapsed)."""
    if not placeholder:
        return prompt
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(placeholder)}(?!\w)", " ", prompt)).strip()


def _check_model_dir(name: str, what: str) -> None:
    p = Path(name)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{what} model {name} is not a folder")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise UsageError(f"{what} model folder {name} has no weights (*.safetensors)")
    elif not looks_like_hub_id(name):
        raise UsageError(f"{what} model not found: {name}")
    elif not _cached(name) and not _hub_reachable():
        raise UsageError(f"{what} model {name} is not in the local Hugging Face cache and the hub cannot be reached"
                         f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}: download it once where the hub is "
                         "reachable, or give --clip / --dino a local model folder (--dino none skips DINO-IS)")


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _cached(repo: str) -> bool:
    """The hub model's config is in the local cache (so loading it needs no network)."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One connection attempt to the hub's host (never with HF_HUB_OFFLINE): an unreachable hub is said at once,
    not after the download library's retries (about a minute)."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if _offline():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


class Embedder:
    """CLIP (image and text) and, optionally, DINO image embeddings; unit-normalised, batched."""

    def __init__(self, clip: str = DEFAULT_CLIP, dino: Optional[str] = DEFAULT_DINO, device: str = "cpu",
                 batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor   # only when evaluating
        _check_model_dir(clip, "CLIP")
        if dino:
            _check_model_dir(dino, "DINO")
        try:
            self.clip = CLIPModel.from_pretrained(clip).to(device).eval()
            self.clip_proc = CLIPProcessor.from_pretrained(clip)
            self.dino = AutoModel.from_pretrained(dino).to(device).eval() if dino else None
            self.dino_proc = AutoImageProcessor.from_pretrained(dino) if dino else None
        except Exception as e:
            raise UsageError(f"cannot load evaluation models: {first_line(e)}") from None
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def _batched(self, items: Sequence, fn) -> torch.Tensor:
        out = [fn(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        e = torch.cat(out).float()
        return e / e.norm(dim=-1, keepdim=True)

    def clip_images(self, images) -> torch.Tensor:
        def f(batch):
            px = self.clip_proc(images=list(batch), return_tensors="pt")["pixel_values"].to(self.device)
            return _features(self.clip.get_image_features(pixel_values=px))
        return self._batched(images, f)

    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        def f(batch):
            tok = self.clip_proc(text=list(batch), return_tensors="pt", padding=True, truncation=True)
            return _features(self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                         attention_mask=tok["attention_mask"].to(self.device)))
        return self._batched(texts, f)

    def dino_images(self, images) -> torch.Tensor:
        def f(batch):
            px = self.dino_proc(images=list(batch), return_tensors="pt")["pixel_values"].to(self.device)
            out = self.dino(pixel_values=px)
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out.last_hidden_state[:, 0]
        return self._batched(images, f)


def _features(x):
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


@dataclass
class Scores:
    n: int
    IS: float
    DINO_IS: Optional[float]
    TS: Optional[float]


def scores(emb: Embedder, images: list, prompts: Optional[List[Optional[str]]], references: list,
           placeholder: Optional[str]) -> Dict[str, dict]:
    """{"overall": {...}, "per_prompt": {prompt: {...}}}; each with n, IS, DINO_IS, TS."""
    ci, cr = emb.clip_images(images), emb.clip_images(references)
    di, dr = (emb.dino_images(images), emb.dino_images(references)) if emb.dino is not None else (None, None)
    is_per = (ci @ cr.T).mean(1)                                # each generated image vs all references
    dino_per = (di @ dr.T).mean(1) if di is not None else None
    ts_per = None
    if prompts and all(p is not None for p in prompts):
        texts = [strip_placeholder(p, placeholder) for p in prompts]
        uniq = sorted(set(texts))
        te = emb.clip_texts(uniq)
        idx = torch.tensor([uniq.index(t) for t in texts])
        ts_per = (ci * te[idx]).sum(-1)

    def summarise(sel: torch.Tensor) -> dict:
        return {"n": int(sel.numel()), "IS": float(is_per[sel].mean()),
                "DINO_IS": float(dino_per[sel].mean()) if dino_per is not None else None,
                "TS": float(ts_per[sel].mean()) if ts_per is not None else None}
    report = {"overall": summarise(torch.arange(len(images))), "per_prompt": {}}
    if prompts and all(p is not None for p in prompts):
        for p in dict.fromkeys(prompts):
            report["per_prompt"][p] = summarise(torch.tensor([i for i, q in enumerate(prompts) if q == p]))
    return report


def _open_images(paths: List[Path], what: str, same_size: bool):
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(to_rgb(im))
        except Exception:
            raise UsageError(f"cannot read {what} image {p}") from None
    if same_size and len({im.size for im in images}) > 1:
        sizes = sorted({im.size for im in images})
        raise UsageError(f"{what} images have mixed sizes {sizes[:3]}: evaluate one generation run at a time")
    return images


def collect(images_arg: str, prompts: Optional[List[str]]):
    """(image paths, prompt per image or None) from a folder, a folder holding generate.json, or the JSON."""
    p = Path(images_arg)
    gen = p if p.suffix == ".json" else p / "generate.json"
    if gen.is_file():
        items = read_mapping(gen, "generate file", UsageError).get("images", [])
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("file"), str) for i in items):
            raise UsageError(f"{gen}: 'images' must be a list of {{\"file\": name, \"prompt\": text}} entries")
        root = gen.parent.resolve()
        paths = [gen.parent / i["file"] for i in items]
        outside = [i["file"] for i, x in zip(items, paths) if root not in x.resolve().parents]
        if outside:
            raise UsageError(f"{gen} names {outside[0]!r}, outside its own folder: refused")
        missing = [x for x in paths if not x.is_file()]
        if missing:
            raise UsageError(f"{gen} lists {len(missing)} images that are missing (first: {missing[0]})")
        return paths, [i.get("prompt") for i in items]
    if not p.is_dir():
        raise UsageError(f"images not found: {images_arg} (a folder of images or a generate.json)")
    paths = sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_EXTS and x.name != "grid.png")
    if prompts and len(prompts) not in (1, len(paths)):
        raise UsageError(f"--prompts: give one prompt for all {len(paths)} images or one per image, got {len(prompts)}")
    per_image = (prompts * len(paths) if len(prompts) == 1 else list(prompts)) if prompts else None
    return paths, per_image


def reference_paths(ref: str) -> List[Path]:
    p = Path(ref)
    if p.is_file():
        return [p]
    if p.is_dir():
        out = sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_EXTS)
        if out:
            return out
        raise UsageError(f"no reference images in {ref}")
    raise UsageError(f"reference not found: {ref}")


def format_table(report: dict) -> str:
    def f(v):
        return "   -  " if v is None else f"{v:6.3f}"
    rows = [f"{'prompt':<50} {'n':>4} {'IS':>6} {'DINO':>6} {'TS':>6}"]
    for name, s in list(report["per_prompt"].items()) + [("overall", report["overall"])]:
        rows.append(f"{name[:50]:<50} {s['n']:>4} {f(s['IS'])} {f(s['DINO_IS'])} {f(s['TS'])}")
    return "\n".join(rows)


def evaluate_folder(images: str, reference: str, out: str, prompts=None, placeholder="sks", clip=DEFAULT_CLIP,
                    dino: Optional[str] = DEFAULT_DINO, batch_size=32, device="cpu") -> dict:
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be > 0, got {batch_size}")
    check_device(device)
    paths, per_image = collect(images, prompts)
    if not paths:
        raise UsageError(f"no images in {images}")
    refs = reference_paths(reference)
    check_output(out, "--out", folder=False, inputs=(images, reference, clip, dino, *paths, *refs))
    imgs = _open_images(paths, "generated", same_size=True)
    ref_imgs = _open_images(refs, "reference", same_size=False)
    emb = Embedder(clip, None if dino in (None, "none") else dino, device, batch_size)
    report = scores(emb, imgs, per_image, ref_imgs, placeholder)
    report.update(images=[str(p) for p in paths], reference=[str(p) for p in refs], clip=clip, dino=dino,
                  placeholder=placeholder)
    write_json(report, out)
    return report
