"""``tlora generate``: images from a stock diffusers pipeline with a T-LoRA attached and masked.

The pipeline is whatever diffusers' auto pipeline loads for the model; nothing of it is replaced. The
per-step mask comes from the weights file's own header (rank, min_rank, exponent, T).
"""
from __future__ import annotations

import inspect
import json
import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, List, Literal, Optional

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .errors import UsageError
from .families import DENOISER_ATTRS, denoiser_of, detect
from .devices import check_device
from .fileio import check_output, first_line, looks_like_hub_id, model_path, read_text, show, write_files
from .masking import attach
from .quantize import BACKENDS, BasePrecision
from .quantize import PRECISIONS as BASE_PRECISIONS
from .settings import MAX_BATCH, MAX_RESOLUTION, MAX_SEED, check, setting
from .weights import WeightsFileError, read_header

IMAGE_NAME = re.compile(r"^\d{4}-seed\d+\.png$")   # what generate names its images
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GenerateSettings:
    """What ``tlora generate`` samples; each setting's type, range, default and help declared once
    (:mod:`tlora.settings`), the command-line flags derived from them."""
    model: str
    weights: Optional[str]
    prompts: List[str]
    out: str
    negative_prompt: Optional[str] = None
    num_images: Annotated[int, setting("images per prompt (seeds seed..seed+N-1)", ge=1, le=MAX_BATCH)] = 1
    steps: Annotated[int, setting("denoising steps (25, as the official inference)", ge=1, le=10000)] = 25
    guidance: Annotated[Optional[float], setting("guidance scale; null: the family's (SD1.5 7.5, SDXL 5.0, SD3 7.0, "
                                                 "Flux 3.5, Flux.2 4.0)", ge=0, le=1000)] = None
    seed: Annotated[int, setting("seed of the first image", ge=0, le=MAX_SEED)] = 0
    multiplier: Annotated[float, setting("adapter strength", ge=-1000, le=1000)] = 1.0
    height: Annotated[Optional[int], setting("image height in pixels; null: the pipeline's", ge=8,
                                             le=MAX_RESOLUTION, multiple_of=8)] = None
    width: Annotated[Optional[int], setting("image width in pixels; null: the pipeline's", ge=8,
                                            le=MAX_RESOLUTION, multiple_of=8)] = None
    dtype: Annotated[Literal[tuple(DTYPES)], setting("weights' dtype while sampling")] = "fp32"
    device: Annotated[str, setting("cpu, cuda, cuda:N, mps", min_length=1)] = "cpu"
    mask: bool = True
    seeds: List[int] = field(default_factory=list)
    base_precision: Annotated[Literal[BASE_PRECISIONS], setting("denoiser loaded quantized: no | int8 | nf4")] = "no"
    quantization_backend: Annotated[Optional[Literal[BACKENDS]], setting(
        "backend of base_precision; null: quanto for int8, bitsandbytes for nf4")] = None
    overwrite: bool = False                      # replace an earlier generate output in ``out``
    placeholder: Optional[str] = None            # the concept's token: a note when no prompt asks for it

    def __post_init__(self):
        check(self)

    def validate(self) -> None:
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise UsageError("no prompt given: pass --prompt TEXT or a non-empty --prompts-file")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UsageError(f"weights file not found: {show(self.weights)}")
        check_device(self.device)
        BasePrecision(self.base_precision, self.quantization_backend).check_runtime()
        out = check_output(self.out, "--out", folder=True, inputs=(self.model, self.weights),
                           writes=("grid.png", "generate.json"))
        earlier = sorted(q.name for q in out.glob("*") if q.name == "generate.json" or IMAGE_NAME.match(q.name)) \
            if out.is_dir() else []
        if earlier and not self.overwrite:
            raise UsageError(f"--out {show(self.out)} holds an earlier generate output ({earlier[0]}); give "
                             "another folder, or --overwrite to replace it")


def read_prompts_file(path: str) -> List[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    prompts = [line.strip() for line in read_text(path, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file is empty: {path}")
    return prompts


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  base: BasePrecision = BasePrecision(), denoiser_dtype: Optional[torch.dtype] = None):
    """A stock text-to-image pipeline from a local folder or hub id (diffusers' auto pipeline). ``base``: the
    denoiser loaded quantized through diffusers' ``quantization_config`` (:mod:`tlora.quantize`; checked with
    ``check_runtime`` by the caller); ``denoiser_dtype``: its compute dtype (default ``dtype``). A shipped model's
    short name (``toyworld``, ``toyworld-textured``) is its folder inside the package."""
    model = model_path(model)
    local = Path(model)
    if not local.exists() and not looks_like_hub_id(model):
        raise UsageError(f"model not found: {model} (a local pipeline folder or a hub id like org/name)")
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise UsageError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    import diffusers      # here, not at the top: the command line's --help and argument checks stay fast
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline
    from packaging.version import Version
    # diffusers 0.36 renamed torch_dtype to dtype
    dkw = {"dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype": dtype}
    if base.quantized or (denoiser_dtype is not None and denoiser_dtype != dtype):
        attr = _denoiser_attr(model)
        dkw = {next(iter(dkw)): {attr: denoiser_dtype or dtype, "default": dtype}}
        if base.quantized:
            dkw["quantization_config"] = base.pipeline_config(attr, denoiser_dtype or dtype)
    try:
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(model, **dkw)
        except ValueError as e:   # a pipeline class the auto pipeline has no mapping for
            if "AutoPipeline can't find" not in str(e) and "not supported" not in str(e):
                raise
            pipe = DiffusionPipeline.from_pretrained(model, **dkw)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot load model {model}: {first_line(e)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _denoiser_attr(model: str) -> str:
    """``unet`` or ``transformer``: where the pipeline's model_index.json keeps its denoiser."""
    from diffusers import DiffusionPipeline
    try:
        index = DiffusionPipeline.load_config(model)
    except Exception as e:
        raise UsageError(f"cannot load model {model}: {first_line(e)}") from None
    for attr in DENOISER_ATTRS:
        if index.get(attr) and index[attr][1]:
            return attr
    raise UsageError(f"{model} has no unet or transformer")


def load_denoiser(model: str):
    """Only the UNet / transformer of a pipeline (local folder, hub id or shipped short name), by its
    model_index.json."""
    model = model_path(model)
    if not Path(model).exists() and not looks_like_hub_id(model):
        raise UsageError(f"model not found: {model} (a local pipeline folder or a hub id like org/name)")
    import diffusers
    from diffusers import DiffusionPipeline
    try:
        index = DiffusionPipeline.load_config(model)
        for attr in DENOISER_ATTRS:
            if attr in index and index[attr] and index[attr][1]:
                return getattr(diffusers, index[attr][1]).from_pretrained(model, subfolder=attr)
    except Exception as e:
        raise UsageError(f"cannot load the denoiser of {model}: {first_line(e)}") from None
    raise UsageError(f"{model} has no unet or transformer")


def unknown_words(pipe, text: str) -> List[str]:
    """The words of ``text`` the pipeline's (first) tokenizer cannot represent: they become its unknown token
    (the toy world's small vocabulary; never for CLIP's byte-level BPE on ordinary text)."""
    tok = getattr(pipe, "tokenizer", None)
    unk = getattr(tok, "unk_token_id", None)
    if tok is None or unk is None:
        return []
    return [w for w in dict.fromkeys(text.split()) if unk in tok(w, add_special_tokens=False).input_ids]


def native_resolution(pipe) -> Optional[int]:
    """The image size the pipeline itself samples at by default (its denoiser's sample size × the VAE's scale, as
    diffusers' pipelines compute it): 512 for SD1.5, 1024 for SDXL and SD3, 32 for the toy world; None if unknown."""
    size = denoiser_of(pipe).config.get("sample_size") or getattr(pipe, "default_sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    return int(size * scale) if isinstance(size, int) and isinstance(scale, int) else None


def contact_sheet(images: list, cols: int, rows: Optional[List[str]] = None, columns: Optional[List[str]] = None,
                  min_tile: int = 128):
    """Images (PIL, same size) in a grid of ``cols`` columns. With ``rows`` / ``columns`` labels the grid gets a
    label band on the left and on top (text wrapped to fit), and tiles smaller than ``min_tile`` px are enlarged
    by a whole factor (nearest neighbour: 32 px tiles stay sharp), so a person can read and see it."""
    w, h = images[0].size
    n_rows = math.ceil(len(images) / cols)
    k = max(1, math.ceil(min_tile / max(w, h))) if rows or columns else 1
    tw, th = w * k, h * k
    font = ImageFont.load_default(size=max(12, min(18, tw // 9)))
    left = _band(rows, font, vertical=False, width=max(140, tw)) if rows else 0
    top = _band(columns, font, vertical=True, width=tw) if columns else 0
    sheet = Image.new("RGB", (left + cols * tw, top + n_rows * th), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        tile = im.convert("RGB").resize((tw, th), Image.Resampling.NEAREST) if k > 1 else im.convert("RGB")
        sheet.paste(tile, (left + (i % cols) * tw, top + (i // cols) * th))
    for j, label in enumerate(columns or []):
        draw.multiline_text((left + j * tw + 4, 4), _wrap(label, font, tw - 8), fill="black", font=font)
    for r, label in enumerate(rows or []):
        draw.multiline_text((6, top + r * th + 4), _wrap(label, font, left - 12), fill="black", font=font)
    return sheet


def _wrap(text: str, font, width: int) -> str:
    """``text`` broken into lines no wider than ``width`` px (a word wider than that stands alone)."""
    lines: List[str] = []
    for word in str(text).split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def _band(labels: List[str], font, vertical: bool, width: int) -> int:
    """The height (vertical: a top band over columns ``width`` px wide) or width (a left band) labels need."""
    if not vertical:
        return width
    line = font.getbbox("Ag")[3] + 4
    return 8 + line * max(_wrap(t, font, width - 8).count("\n") + 1 for t in labels)


def sample_images(pipe, prompts: List[str], num_images: int, seed: int, steps: int, guidance: float,
                  negative_prompt: Optional[str] = None, height: Optional[int] = None,
                  width: Optional[int] = None, progress: bool = True):
    """[(prompt, seed, PIL image)]: image j of every prompt uses seed + j, so prompts are comparable."""
    accepts = set(inspect.signature(pipe.__call__).parameters)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance)
    if negative_prompt and "negative_prompt" in accepts:
        kw["negative_prompt"] = negative_prompt
    if height:
        kw["height"] = height
    if width:
        kw["width"] = width
    out = []
    bar = tqdm(total=len(prompts) * num_images, desc="images", unit="img",
               disable=not progress or not sys.stderr.isatty())       # no carriage-return lines in a log file
    for prompt in prompts:
        for j in range(num_images):
            g = torch.Generator(device="cpu").manual_seed(seed + j)
            image = pipe(prompt=prompt, generator=g, **kw).images[0]
            out.append((prompt, seed + j, image))
            bar.update(1)
    bar.close()
    return out


def run_generate(s: GenerateSettings) -> Path:
    """Validate, load, attach, generate; writes PNGs, grid.png and generate.json into ``s.out``."""
    s.validate()
    header = None
    if s.weights:
        try:
            header = read_header(s.weights)
        except WeightsFileError as e:
            raise UsageError(str(e)) from None
    pipe = load_pipeline(s.model, DTYPES[s.dtype], s.device, BasePrecision(s.base_precision, s.quantization_backend))
    family = detect(denoiser_of(pipe))
    guidance = s.guidance if s.guidance is not None else family.guidance
    handle = None
    if s.weights:
        try:
            handle = attach(pipe, s.weights, multiplier=s.multiplier, mask=s.mask)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if s.placeholder and s.weights and not any(s.placeholder in p.split() for p in s.prompts):
        warnings.warn(f"no prompt holds the placeholder {s.placeholder!r}: the trained concept is not asked for "
                      "(write it, or '{0}', in a prompt)", stacklevel=2)
    try:
        results = sample_images(pipe, s.prompts, s.num_images, s.seed, s.steps, guidance, s.negative_prompt,
                                s.height, s.width)
    finally:
        if handle is not None:
            handle.detach()
    files, writers = [], {}
    for i, (prompt, seed, image) in enumerate(results):
        name = f"{i:04d}-seed{seed}.png"
        writers[name] = lambda tmp, im=image: im.save(tmp, format="PNG")
        files.append({"file": name, "prompt": prompt, "seed": seed})
    grid = contact_sheet([r[2] for r in results], cols=s.num_images, rows=list(s.prompts),
                         columns=[f"seed {s.seed + j}" for j in range(s.num_images)])
    writers["grid.png"] = lambda tmp: grid.save(tmp, format="PNG")
    record = asdict(s) | {"guidance": guidance, "family": family.name, "images": files,
                          "seeds": sorted({f["seed"] for f in files}),
                          "schedule": None if header is None else {
                              k: header["config"][k] for k in ("rank", "min_rank", "exponent", "num_train_timesteps")}}
    text = json.dumps(record, indent=2, default=str, allow_nan=False)
    writers["generate.json"] = lambda tmp: Path(tmp).write_text(text)
    earlier = [q for q in Path(s.out).glob("*.png") if IMAGE_NAME.match(q.name) and q.name not in writers]
    out = write_files(s.out, writers)       # the images and generate.json as one unit: all or nothing
    for q in earlier:                       # --overwrite: images of the earlier output this one did not replace
        q.unlink()
    return out
