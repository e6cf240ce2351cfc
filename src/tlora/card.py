"""The model card written beside a run's final weights (``OUT/README.md``), in the Hugging Face Hub's LoRA
conventions: YAML front matter (base model, tags, the instance prompt, the validation grids as a widget gallery)
rendered by ``huggingface_hub.ModelCard``, then what the adapter is, its schedule, how it was trained and how to
load it with ``tlora.attach`` and in ComfyUI.

A card is tlora's own when it carries :data:`MARK`; a README.md without it (the user's) is never replaced.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .fileio import atomic_write, looks_like_hub_id

CARD_NAME = "README.md"
MARK = "<!-- tlora model card: rewritten when this run finishes again -->"
TAGS = ["text-to-image", "diffusers", "lora", "t-lora", "template:sd-lora"]
FAMILY_TAGS = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux",
               "flux2": "flux"}

TEMPLATE = """---
{{ card_data }}
---

""" + MARK + """

# T-LoRA: {{ subject }}

A [T-LoRA](https://arxiv.org/abs/2507.05964) (timestep-dependent LoRA, Soboleva et al., AAAI 2026) of
{{ base_text }}, trained with tlora on {{ images }} to draw **{{ subject }}**.
Instance prompt: `{{ instance_prompt }}`.

At timestep t only the first r(t) = floor(((T - t)/T)^α · (R - Rmin)) + Rmin ranks are active; the schedule is
stored in the weights file, and the mask must be applied at every sampling step, as below.

| R | Rmin | α | T | variant | active ranks at t = 0 / 250 / 500 / 750 / 999 |
|---|---|---|---|---|---|
| {{ rank }} | {{ min_rank }} | {{ exponent }} | {{ timesteps }} | {{ variant }} | {{ ranks }} |

Training: {{ steps }} steps, batch {{ batch }}, lr {{ lr }}, {{ resolution }} px, seed {{ seed }}.

## Use it with diffusers

```python
import tlora
from diffusers import AutoPipelineForText2Image

pipe = AutoPipelineForText2Image.from_pretrained("{{ base_model }}")
with tlora.attach(pipe, "tlora.safetensors"):     # the rank mask at every denoising step
    image = pipe("{{ instance_prompt }}").images[0]
```

`tlora generate --model {{ base_model }} --weights tlora.safetensors --prompt "a {0} on the beach" --out samples/`
does the same from the command line.

## Use it in ComfyUI

Put `tlora.safetensors` into `ComfyUI/models/loras` and put the **Load T-LoRA** node (from the tlora custom node)
between Load Checkpoint and the sampler: it applies the mask at every step. A plain LoRA loader would run every
rank at every step; `tlora convert tlora.safetensors out.safetensors --to kohya` makes such a file on purpose.
"""


def _widget(run_dir: Path, prompts: List[str], steps: int) -> list:
    """The last validation grid, as the Hub's gallery shows it (one entry per prompt, its image path)."""
    grid = run_dir / "samples" / f"step-{steps}.png"
    if not grid.is_file():
        return []
    return [{"text": p, "output": {"url": f"samples/{grid.name}"}} for p in prompts]


def recorded_config(header: dict):
    """The run's ``TrainConfig`` as its weights file records it; None for a file without a (readable) record."""
    from .errors import UsageError
    from .trainconfig import TrainConfig
    try:
        return TrainConfig.from_dict(header["training"]["config"], "the weights' training record")
    except (KeyError, TypeError, ValueError, UsageError):
        return None


def model_card(header: dict, run_dir: Path, cfg=None):
    """A ``huggingface_hub.ModelCard`` for the final weights of the run in ``run_dir``: ``header`` is theirs,
    ``cfg`` the run's ``TrainConfig`` (None: read from the header's record, when it has one)."""
    from huggingface_hub import ModelCard, ModelCardData
    from .schedule import RankSchedule
    training = header.get("training") or {}
    cfg = cfg or recorded_config(header)
    c = header["config"]
    base = str(header.get("base_model") or "")
    on_hub = looks_like_hub_id(base)
    prompt = cfg.prompt() if cfg else ""
    sched = RankSchedule(c["rank"], c["min_rank"], c["exponent"], c["num_train_timesteps"])
    data = ModelCardData(base_model=base if on_hub else None, library_name="diffusers", instance_prompt=prompt or None,
                         tags=TAGS + [t for t in [FAMILY_TAGS.get(header.get("family"))] if t],
                         widget=_widget(run_dir, cfg.resolved_validation_prompts(), cfg.max_steps) if cfg else None)
    subject = f"{cfg.placeholder} {cfg.class_name}".strip() if cfg else "its concept"
    return ModelCard.from_template(
        data, template_str=TEMPLATE, subject=subject, instance_prompt=prompt, rank=c["rank"],
        min_rank=c["min_rank"], exponent=f"{c['exponent']:g}", timesteps=c["num_train_timesteps"],
        variant=header["variant"], ranks=" / ".join(str(r) for r in sched.ranks([0, 250, 500, 750, 999])),
        base_model=base if on_hub else "path/to/the/base/model",
        base_text=f"[{base}](https://huggingface.co/{base})" if on_hub else f"a local base model ({Path(base).name})",
        images="one image" if cfg and cfg.one_image else "its training images",
        steps=cfg.max_steps if cfg else "?", batch=cfg.batch_size if cfg else "?",
        lr=f"{cfg.learning_rate:g}" if cfg else "?", resolution=training.get("resolution", "?"),
        seed=cfg.seed if cfg else "?")


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a card tlora wrote (so a later run may replace it)."""
    try:
        return MARK in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def write_card(header: dict, run_dir: Path, cfg=None) -> Optional[Path]:
    """Write ``run_dir/README.md`` (see :func:`model_card`), atomically; None (nothing written) when a README.md
    that is not tlora's is there."""
    path = run_dir / CARD_NAME
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not is_ours(path):
            return None
    text = str(model_card(header, run_dir, cfg))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".md")
    return path
