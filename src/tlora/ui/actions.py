"""What the browser UI does, without Gradio: the form's settings checked field by field, the schedule plot, the
family and memory estimate of a model, the uploads as training sees them, a run's progress / charts / evaluation
read back from its folder, masked generation and comparison grids (saved with the settings that made them), exports.

Every function takes the :class:`~tlora.runs.Workspace` (or plain values) and returns plain values, so the pages
(:mod:`tlora.ui.pages`) are wiring only and the tests call these directly.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import UsageError
from ..runs import NAME, Workspace, check_name, metrics, state, twin_name

NAME_OK = NAME.fullmatch

# (label, TrainConfig fields): the paper's SDXL recipe, a Flux vanilla recipe, and the demo's toy-world recipe
PRESETS = {
    "toy world (CPU, minutes)": {"model": "toyworld", "max_steps": 100, "learning_rate": 3e-3, "batch_size": 4,
                                 "tlora": {"rank": 64, "min_rank": 16, "variant": "ortho",
                                           "target_module": ["Transformer2DModel", "ResnetBlock2D"]}},
    "paper: SDXL ortho (GPU)": {"model": "stabilityai/stable-diffusion-xl-base-1.0", "max_steps": 800,
                                "learning_rate": 1e-4, "batch_size": 1,
                                "tlora": {"rank": 64, "min_rank": 32, "variant": "ortho"}},
    "Flux.1 vanilla (GPU)": {"model": "black-forest-labs/FLUX.1-dev", "max_steps": 1000, "learning_rate": 1e-4,
                             "batch_size": 1, "tlora": {"rank": 16, "min_rank": 8, "variant": "vanilla"}},
}
MAIN = ("model", "placeholder", "class_name", "prompt_template", "max_steps", "learning_rate", "batch_size",
        "resolution", "num_validation_images", "validation_steps")
MAIN_TLORA = ("rank", "min_rank", "exponent", "variant")
INTEGERS = ("max_steps", "batch_size", "resolution", "num_validation_images", "validation_steps", "rank", "min_rank")
EXPORTS = ("tlora", "kohya", "diffusers", "lycoris", "official", "comfyui workflow")
CHARTS = ("loss", "lr", "mean_active_rank")
EVALUATION = ("IS", "DINO_IS", "TS")


# -- the form -------------------------------------------------------------------------------------------------------
def advanced_fields() -> List[Tuple[str, object]]:
    """(key, Spec) of every setting not on the main form: TrainConfig's, then ``tlora.``-prefixed TLoRAConfig's —
    the settings schema, not a second list."""
    from ..config import TLoRAConfig
    from ..settings import specs
    from ..trainconfig import TrainConfig
    skip = set(MAIN) | {"tlora", "output_dir", "data_dir", "one_image", "resume", "overwrite", "official_flags"}
    return [(k, s) for k, s in specs(TrainConfig).items() if k not in skip] + \
        [(f"tlora.{k}", s) for k, s in specs(TLoRAConfig).items() if k not in MAIN_TLORA]


class FormError(UsageError):
    """Bad values in the form: ``problems`` maps each field's key to its message (the first one is the message)."""

    def __init__(self, problems: Dict[str, str]):
        self.problems = problems
        key, text = next(iter(problems.items()))
        super().__init__(text if text.startswith(key) else f"{key}: {text}")


def collect(main: Dict, tl: Dict, advanced: Dict[str, str]) -> Dict:
    """The run's TrainConfig fields from the form: the main values, then each advanced text that differs from its
    default (parsed as ``--set`` parses it), every one checked by its own schema; FormError naming each bad field."""
    from ..config import TLoRAConfig
    from ..settings import SettingError, specs
    from ..trainconfig import TrainConfig
    schema = {**specs(TrainConfig), **{f"tlora.{k}": s for k, s in specs(TLoRAConfig).items()}}
    values = {k: v for k, v in main.items() if v not in (None, "")}
    values.update({f"tlora.{k}": v for k, v in tl.items() if v not in (None, "")})
    if values.get("resolution") == 0:
        values.pop("resolution")                              # 0 on the form: the model's own
    settings, problems = {"tlora": {}}, {}
    for key, text in advanced.items():
        text = "" if text is None else text.strip()
        if text and text != json.dumps(schema[key].default):
            try:
                values[key] = schema[key].parse_text(text)
            except SettingError as e:
                problems[key] = str(e)
    for key, value in values.items():
        if key.split(".")[-1] in INTEGERS and isinstance(value, float) and value.is_integer():
            value = int(value)                                # gr.Number gives floats
        try:
            value = schema[key].check(value)
        except SettingError as e:
            problems[key] = str(e)
            continue
        target = settings["tlora"] if key.startswith("tlora.") else settings
        target[key.split(".", 1)[-1]] = list(value) if isinstance(value, tuple) else value
    if problems:
        raise FormError(problems)
    return settings


def field_problem(key: str, value) -> str:
    """The message for one field's value on its own (its schema's check; ``name``: a run name), "" when fine."""
    if key == "name":
        try:
            check_name(value)
        except UsageError as e:
            return str(e)
        return ""
    short = key.split(".", 1)[-1]
    if key in MAIN:
        form = ({key: value}, {}, {})
    elif key.startswith("tlora.") and short in MAIN_TLORA:
        form = ({}, {short: value}, {})
    else:
        form = ({}, {}, {key: value})                 # an advanced field: text, parsed as --set parses it
    try:
        collect(*form)
    except FormError as e:
        return e.problems.get(key, "")
    return ""


def form_problems(ws: Workspace, name: str, images, main: Dict, tl: Dict, advanced: Dict[str, str],
                  twin: bool = False) -> Dict[str, str]:
    """Every problem that would refuse starting run ``name`` from this form, by field key (``name``, ``images``,
    a setting's key): each field's own check, then the whole recipe as ``Workspace.start`` checks it."""
    from ..settings import SettingError
    problems = {}
    try:
        check_name(name)
    except UsageError as e:
        problems["name"] = str(e)
    try:
        ws.check_uploads(images)
    except UsageError as e:
        problems["images"] = str(e)
    try:
        settings = collect(main, tl, advanced)
    except FormError as e:
        return {**problems, **e.problems}
    if problems:
        return problems
    try:
        ws.plan(name, settings, images, "new", twin)
    except SettingError as e:
        return {e.spelled: str(e)}
    except UsageError as e:          # a rule between fields, or the run's name: the field the message starts with
        known = [*main, *(f"tlora.{k}" for k in tl), *advanced]
        return {next((k for k in known if str(e).startswith(k + " ")), "name"): str(e)}
    return {}


def prompt_text(template: str, placeholder: str, class_name: str) -> str:
    """The training prompt the caption template gives (as the run will format it), or why there is none."""
    from ..trainconfig import TrainConfig
    try:
        cfg = TrainConfig.from_dict({"model": "toyworld", "data_dir": ".", "output_dir": ".",
                                     "placeholder": placeholder, "class_name": class_name,
                                     "prompt_template": template}, "the caption template")
        cfg.validate()
    except UsageError as e:
        return f"no training prompt: {str(e).splitlines()[0]}"
    return f"training prompt: {cfg.prompt()}"


def page_of(key: str) -> str:
    """The page (and section) a form field is on, for a message shown on another page."""
    if key in ("images", "placeholder", "class_name", "prompt_template"):
        return "page 1"
    if key in ("name", "overwrite", "twin"):
        return "this page"
    return "page 2" if key in MAIN or key.split(".", 1)[-1] in MAIN_TLORA and key.startswith("tlora.") \
        else "page 2, advanced"


# -- the recipe page ------------------------------------------------------------------------------------------------
def schedule_figure(rank: int, min_rank: int, exponent: float):
    """r(t) for t in [0, 1000] (matplotlib figure; labelled axes, the ranks' range with room above it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..schedule import RankSchedule
    s = RankSchedule(int(rank), int(min_rank), float(exponent), 1000)
    ts = list(range(0, 1001, 5))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.step(ts, s.ranks(ts), where="post", label=f"R={s.max_rank}, Rmin={s.min_rank}, α={s.exponent:g}")
    ax.set_ylim(0, s.max_rank * 1.15 + 1)
    ax.set_title("r(t): active ranks by timestep", fontsize=10)
    ax.set_xlabel("timestep t (0 = clean, 1000 = noise)")
    ax.set_ylabel("active ranks")
    ax.legend(loc="lower left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def local_resolution(model: str) -> Optional[int]:
    """A local diffusers folder's own image size (denoiser sample size × the VAE's scale, as diffusers computes
    it), read from its configs alone; None for a hub id or an unknown layout."""
    from ..fileio import model_path
    root = Path(model_path(model))
    try:
        den = next(json.loads((root / d / "config.json").read_text()) for d in ("unet", "transformer")
                   if (root / d / "config.json").is_file())
        vae = json.loads((root / "vae" / "config.json").read_text())
        return int(den["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (StopIteration, OSError, ValueError, KeyError, TypeError):
        return None


def family_text(model: str) -> str:
    """The family a model belongs to, as soon as it is typed: read from a local folder's or a shipped config (a hub
    id is read from the hub when the memory is estimated or the run starts)."""
    from ..families import detect_config
    from ..fileio import looks_like_hub_id, model_path
    from ..memory import CONFIGS, read_denoiser_config
    model = (model or "").strip()
    if not model:
        return "family: type a model (a short name, a diffusers folder or a hub id)"
    local = Path(model_path(model)).exists() or (CONFIGS / f"{model}.json").is_file()
    if not local:
        return (f"family: read from the hub when you estimate memory or start (`{model}`)" if looks_like_hub_id(model)
                else f"family: `{model}` is not a folder, a short name or a hub id")
    try:
        fam = detect_config(read_denoiser_config(model))
    except (UsageError, ValueError) as e:
        return f"family: {str(e).splitlines()[0]}"
    res = local_resolution(model) or fam.resolution
    return f"family: **{fam.name}** ({fam.denoiser_class}, {res} px)"


def memory_text(main: Dict, tl: Dict, advanced: Dict[str, str]) -> str:
    """The expected training peak (``tlora memory``) of the form's recipe — its checkpointing, precisions, optimizer
    — and whether it fits the chosen device, with what to change that is not already so."""
    from .. import memory
    from ..fileio import model_path
    from ..trainconfig import TrainConfig
    settings = collect(main, tl, advanced)
    cfg = TrainConfig.from_dict({**settings, "data_dir": ".", "output_dir": "."}, "the form")
    cfg.validate()
    res = cfg.resolution or local_resolution(cfg.model)
    e = memory.estimate(memory.read_denoiser_config(model_path(cfg.model)), cfg.tlora, res, cfg.batch_size,
                        cfg.gradient_checkpointing, cfg.mixed_precision, cfg.base().resolved(), cfg.optimizer)
    have, where = device_memory(cfg.device)
    need = e.total / 2**30
    changes = [c for c, applies in (("gradient_checkpointing true", not cfg.gradient_checkpointing),
                                    ("base_precision int8", cfg.base_precision == "no"),
                                    ("a smaller batch", cfg.batch_size > 1), ("a smaller rank", cfg.tlora.rank > 8))
               if applies]
    verdict = "fits" if need <= have * 0.9 else f"does not fit: try {', '.join(changes) or 'a smaller resolution'}"
    return (f"**{need:.2f} GiB** expected peak ({e.family}, {e.resolution} px, batch {cfg.batch_size}, rank "
            f"{cfg.tlora.rank}); this machine has {have:.1f} GiB ({where}): **{verdict}**")


def device_memory(device: Optional[str]) -> Tuple[float, str]:
    """(GiB, what) of the device a run would use: the GPU's memory for ``cuda[:N]`` (or None, accelerate's choice,
    with a GPU), else this machine's RAM."""
    import torch
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return torch.cuda.get_device_properties(index).total_memory / 2**30, f"cuda:{index}"
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "RAM"


def enlarged(image, at_least: int = 256):
    """A small image (the toy world's 32 px) enlarged by a whole factor to at least ``at_least`` px, nearest
    neighbour (sharp, every pixel kept); a large one as it is."""
    from PIL import Image
    k = max(1, -(-at_least // max(image.size)))
    return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST) if k > 1 else image


def preview(images, model: str, resolution) -> Tuple[List, str]:
    """Each upload as training sees it (the centred square at the model's resolution; a small image enlarged to be
    seen, nearest neighbour) and a line saying at what size."""
    from PIL import Image
    from ..data import square, to_rgb
    if not images:
        return [], ""
    res = int(resolution) if resolution else local_resolution(model)
    if res is None:
        return [], f"shown once the model's resolution is known (set resolution on page 2 for `{model}`)"
    out = []
    for path in images:
        with Image.open(path) as im:
            out.append(enlarged(square(to_rgb(im), res)))
    return out, f"{len(out)} image{'s' * (len(out) != 1)} at {res}×{res} px, as training sees them"


# -- the train page -------------------------------------------------------------------------------------------------
def current_run(ws: Workspace) -> str:
    """The run a page opens on: the one training, else the one changed last, else ``my-run``."""
    names = ws.names()
    latest = max(names, key=lambda n: ws.run_dir(n).stat().st_mtime_ns) if names else "my-run"
    return ws.busy() or latest


def run_table(ws: Workspace) -> List[List]:
    return [[s.name, s.status, f"{s.step}/{s.max_steps or '?'}", str(s.final or "")] for s in ws.states()]


def progress(ws: Workspace, name: str) -> Tuple:
    """(status line with the ETA, one chart frame per :data:`CHARTS` — the run and its LoRA twin, told apart by the
    ``run`` column —, the run's latest validation grid, its twin's) of run ``name``; the status line is
    ``<name>: <status>, step N of M``."""
    import pandas as pd
    twin = twin_name(name) if name and NAME_OK(name) else None
    runs = ([name] if twin else []) + ([twin] if twin and NAME_OK(twin) and ws.run_dir(twin).is_dir() else [])
    logged = {r: metrics(ws.run_dir(r)) for r in runs if ws.run_dir(r).is_dir()}     # each run's events read once
    frames = [pd.DataFrame([(step, v, r) for r, m in logged.items() for step, v in m.get(c, [])],
                           columns=["step", c, "run"]) for c in CHARTS]
    if not runs:
        return ("no run selected", *frames, None, None)
    if not ws.run_dir(name).is_dir():
        return (f"{name}: not started yet", *frames, None, None)
    states = [state(ws.run_dir(r)) for r in runs]
    s = states[0]
    line = f"{name}: {s.status}, step {s.step} of {s.max_steps or '?'}" + _eta(s)
    if s.status == "failed":
        line += f" — {s.log_tail.strip().splitlines()[-1] if s.log_tail.strip() else ''}"
    for t in states[1:]:
        line += f"; LoRA twin {t.name}: {t.status}, step {t.step} of {t.max_steps or '?'}"
    grids = [str(st.samples[-1]) if st.samples else None for st in states] + [None]
    return (line, *frames, grids[0], grids[1])


def _eta(s) -> str:
    """`` — about N min left`` from the run's own seconds per step (its log), while it trains."""
    found = re.findall(r"([\d.]+) s/step", s.log_tail) or re.findall(r"([\d.]+) s per step", s.log_tail)
    if s.status != "running" or not found or not s.max_steps:
        return ""
    from ..train import duration_text
    return f" — about {duration_text(float(found[-1]) * max(s.max_steps - s.step, 0))} left"


def evaluation_rows(ws: Workspace, name: str) -> List[List]:
    """[step, IS, DINO-IS, TS, best] per evaluated checkpoint (the run's ``eval/*`` logs), the one
    ``best.json`` names marked ``★ best``; empty when the run evaluates nothing (no ``eval_clip_model``)."""
    if not name or not NAME_OK(name) or not ws.run_dir(name).is_dir():
        return []
    m = metrics(ws.run_dir(name))
    by_step: Dict[int, Dict[str, float]] = {}
    for k in EVALUATION:
        for step, v in m.get(f"eval/{k}", []):
            by_step.setdefault(step, {})[k] = v
    best = None
    try:
        best = json.loads((ws.run_dir(name) / "best.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return [[step, *[round(row[k], 4) if k in row else None for k in EVALUATION], "★ best" if step == best else ""]
            for step, row in sorted(by_step.items())]


# -- generate and compare -------------------------------------------------------------------------------------------
def weight_choices(ws: Workspace, name: str) -> Dict[str, Path]:
    """Label → weights file of run ``name``: each checkpoint (``step N``), ``best``, ``final``, and its LoRA
    twin's final weights when it has them."""
    if not name or not NAME_OK(name) or not ws.run_dir(name).is_dir():
        return {}
    from ..checkpoint import CKPT_RE, list_checkpoints
    out = ws.run_dir(name)
    found = {f"step {int(CKPT_RE.match(p.name).group(1))}": p / "tlora.safetensors" for p in list_checkpoints(out)}
    for label, path in (("best", out / "tlora-best.safetensors"), ("final", out / "tlora.safetensors")):
        if path.is_file():
            found[label] = path
    twin = twin_name(name)
    if NAME_OK(twin) and (ws.run_dir(twin) / "tlora.safetensors").is_file():
        found["LoRA twin"] = ws.run_dir(twin) / "tlora.safetensors"
    return found


_PIPES: Dict[str, object] = {}


def _pipeline(model: str):
    from ..generate import load_pipeline
    return _PIPES.get(model) or _PIPES.setdefault(model, load_pipeline(model))


def _config_of(ws: Workspace, name: str) -> Dict:
    from ..fileio import read_mapping
    return read_mapping(ws.run_dir(name) / "config.json", f"run {name}'s config", UsageError)


def _model_of(ws: Workspace, name: str) -> str:
    from ..fileio import model_path
    model = _config_of(ws, name).get("model")
    if not isinstance(model, str):
        raise UsageError(f"run {name}'s config names no model")
    return model_path(model)


def _sample(pipe, weights: Path, prompt: str, seed: int, steps: int, guidance: float, mask: bool, strength: float):
    import torch
    from ..generate import native_resolution
    from ..masking import attach
    res = native_resolution(pipe)
    with attach(pipe, weights, multiplier=float(strength), mask=bool(mask)):
        return pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), height=res, width=res,
                    generator=torch.Generator().manual_seed(int(seed))).images[0]


def _check_sampling(seed, steps, guidance, strength) -> None:
    """Each sampling number in its range (a whole number where one is meant); UsageError naming it otherwise."""
    for name, v, lo, hi, whole in (("seed", seed, 0, 2**32 - 1, True), ("steps", steps, 1, 1000, True),
                                   ("guidance", guidance, 0, 50, False), ("strength", strength, -4, 4, False)):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
        if not lo <= x <= hi or (whole and not x.is_integer()):
            raise UsageError(f"{name} must be {'a whole number' if whole else 'a number'} in [{lo}, {hi}], got {v!r}")


def _save(ws: Workspace, name: str, image, settings: Dict, kind: str) -> Path:
    """``image`` under ``generated/<run>/`` with the settings that made it in the PNG (``parameters``: one line as
    the A1111 / ComfyUI viewers show it; ``tlora``: the same as JSON)."""
    from ..fileio import save_png
    line = ", ".join(f"{k}: {v}" for k, v in settings.items())
    path = ws.folder("generated", name) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.png"
    return save_png(image, path, {"parameters": line, "tlora": json.dumps(settings)})


def generate(ws: Workspace, name: str, prompt: str, seed: int, steps: int, guidance: float, mask: bool = True,
             strength: float = 1.0, weights: str = "final") -> Path:
    """One image of run ``name``'s ``weights`` (a label of :func:`weight_choices`) through ``tlora.attach``, saved
    with its settings (:func:`_save`); a small image is enlarged to at least 256 px (nearest: sharp)."""
    choices = weight_choices(ws, name)
    if weights not in choices:
        raise UsageError(f"run {name} has no {weights} weights yet ({state(ws.run_dir(name)).status})"
                         if name and NAME_OK(name) else f"run name {name!r}: choose a run")
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty")
    _check_sampling(seed, steps, guidance, strength)
    image = _sample(_pipeline(_model_of(ws, name)), choices[weights], prompt, seed, steps, guidance, mask, strength)
    return _save(ws, name, enlarged(image), {"run": name, "weights": weights, "prompt": prompt, "seed": int(seed),
                                   "steps": int(steps), "guidance": float(guidance), "mask": bool(mask),
                                   "strength": float(strength)}, "image")


def compare(ws: Workspace, name: str, prompts: str, labels: List[str], seed: int, steps: int, guidance: float,
            masks: Tuple[bool, ...] = (True,), strength: float = 1.0) -> Path:
    """A labelled grid: rows are ``prompts`` (one per line), columns each of ``labels`` (weights of
    :func:`weight_choices`) with each of ``masks`` (mask on / off), every tile with ``seed``; saved with its
    settings."""
    from ..generate import contact_sheet
    choices = weight_choices(ws, name)
    rows = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    if not rows:
        raise UsageError("no prompts: one per line")
    if not labels or any(label not in choices for label in labels):
        missing = [label for label in labels if label not in choices] or ["(none chosen)"]
        raise UsageError(f"weights {missing[0]}: choose among {', '.join(choices) or 'none yet (train first)'}")
    if not masks:
        raise UsageError("choose mask on, mask off or both")
    _check_sampling(seed, steps, guidance, strength)
    if len(rows) * len(labels) * len(masks) > 64:
        raise UsageError(f"{len(rows)} prompts × {len(labels) * len(masks)} columns: at most 64 images per grid")
    pipe = _pipeline(_model_of(ws, name))
    columns = [(label, m) for label in labels for m in masks]
    tiles = [_sample(pipe, choices[label], p, seed, steps, guidance, m, strength) for p in rows for label, m in columns]
    heads = [f"{label}{'' if m else ', mask off'}" for label, m in columns]
    sheet = contact_sheet(tiles, cols=len(columns), rows=rows, columns=heads)
    return _save(ws, name, sheet, {"run": name, "weights": labels, "prompts": rows, "seed": int(seed),
                                   "steps": int(steps), "guidance": float(guidance), "masks": list(masks),
                                   "strength": float(strength)}, "grid")


# -- export ---------------------------------------------------------------------------------------------------------
def comfyui_workflow(lora_name: str, prompt: str, checkpoint: str = "sd_xl_base_1.0.safetensors") -> Dict:
    """A ComfyUI API-format workflow: Load Checkpoint → Load T-LoRA (``lora_name`` in models/loras) → KSampler."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "Load T-LoRA", "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength": 1.0,
                                                      "mask": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 25, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tlora"}},
    }


def export(ws: Workspace, name: str, fmt: str) -> Path:
    """The run's final weights as ``fmt`` (a file under ``exports/``), or the ComfyUI workflow JSON for them."""
    from ..fileio import write_json
    from ..formats import read_state, write_state
    s = state(ws.run_dir(name))
    if s.final is None:
        raise UsageError(f"run {name} has no final weights yet ({s.status})")
    out = ws.folder("exports", name)
    if fmt == "comfyui workflow":
        cfg = _config_of(ws, name)
        prompt = f"a photo of {cfg.get('placeholder', 'sks')} {cfg.get('class_name', '')}".strip()
        path = out / f"{name}-workflow-api.json"
        write_json(comfyui_workflow(f"{name}.safetensors", prompt), path)
        return path
    if fmt not in EXPORTS:
        raise UsageError(f"export format {fmt!r}: one of {', '.join(EXPORTS)}")
    model = None
    if fmt == "lycoris":
        from ..generate import load_denoiser
        model = load_denoiser(_model_of(ws, name))
    tensors, header = read_state(s.final, model)
    path = out / (f"{name}.safetensors" if fmt == "tlora" else f"{name}-{fmt}.safetensors")
    write_state(fmt, tensors, header, path)
    return path
