"""Training configuration: one typed, validated dataclass, read from three sources unchanged.

* our JSON (``tlora train --config run.json [--set key=value ...]``): keys are the TrainConfig fields,
  T-LoRA settings nested under ``"tlora"`` (``--set tlora.rank=16``); unknown keys are an error that
  suggests the right name;
* SimpleTuner's ``config.json`` (``model_type: lora``, ``lora_type: lycoris``, ``lycoris_config: PATH``
  pointing at a LyCORIS ``algo: tlora`` JSON); keys tlora does not use are listed in a warning;
* the official repository's command line (``--pretrained_model_name_or_path=... --trainer_type=ortho_lora``).
"""
from __future__ import annotations

import json
import string
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional

from pydantic import Field

from . import settings as S
from .config import TLoRAConfig
from .devices import check_device
from .errors import UsageError
from .fileio import read_mapping
from .quantize import BACKENDS, BasePrecision
from .quantize import PRECISIONS as BASE_PRECISIONS
from .settings import MAX_BATCH, MAX_RESOLUTION, MAX_SEED, MAX_STEPS, SettingError, check, setting


# diffusers.optimization.SchedulerType's values (a test keeps the two equal); not imported: --help stays fast
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")


OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("no", "bf16", "fp16")
BEST_METRICS = ("IS", "DINO_IS", "TS", "IS+TS")
Str = Annotated[str, Field(min_length=1)]


@dataclass
class TrainConfig:
    """Every training setting; its type, range, default, help and names in SimpleTuner's config.json and the
    official flags are declared here once (:mod:`tlora.settings`); ``__post_init__`` checks them."""
    model: Annotated[str, setting("diffusers pipeline: local folder or hub id", simpletuner="pretrained_model_name_or_path",
                                  official="pretrained_model_name_or_path")] = ""
    data_dir: Annotated[str, setting("folder of training images (+ same-name .txt captions)",
                                     simpletuner="instance_data_dir", official="train_data_dir")] = ""
    output_dir: Annotated[str, setting("run folder: weights, checkpoints, samples, logs", min_length=1,
                                       simpletuner="output_dir", official="output_dir")] = "tlora-output"
    placeholder: Annotated[str, setting("identifier token of the concept", official="placeholder_token")] = "sks"
    class_name: Annotated[str, setting("class word of the concept", official="class_name")] = ""
    prompt_template: Annotated[str, setting("training caption for images without a .txt; {placeholder} and "
                                            "{class_name} are filled in", simpletuner="instance_prompt")
                               ] = "a photo of {placeholder} {class_name}"
    one_image: Annotated[Optional[str], setting("train on this one file of data_dir", min_length=1,
                                                official="one_image")] = None
    resolution: Annotated[Optional[int], setting("square training size in pixels, a multiple of 8; null: the "
                                                 "model's", ge=8, le=MAX_RESOLUTION, multiple_of=8,
                                                 simpletuner="resolution", official="resolution")] = None
    max_steps: Annotated[int, setting("optimizer steps (official recipe: 800)", ge=1, le=MAX_STEPS,
                                      simpletuner="max_train_steps", official="num_train_epochs")] = 800
    batch_size: Annotated[int, setting("images per step", ge=1, le=MAX_BATCH, simpletuner="train_batch_size",
                                       official="train_batch_size")] = 1
    gradient_accumulation_steps: Annotated[int, setting("micro-batches per step", ge=1, le=MAX_BATCH,
                                                        simpletuner="gradient_accumulation_steps")] = 1
    learning_rate: Annotated[float, setting("AdamW learning rate (official: 1e-4)", gt=0, le=1,
                                            simpletuner="learning_rate", official="learning_rate")] = 1e-4
    weight_decay: Annotated[float, setting("AdamW weight decay", ge=0, le=1000,
                                           simpletuner="adam_weight_decay")] = 1e-4
    adam_beta1: Annotated[float, setting("AdamW β1", ge=0, lt=1, simpletuner="adam_beta1")] = 0.9
    adam_beta2: Annotated[float, setting("AdamW β2", ge=0, lt=1, simpletuner="adam_beta2")] = 0.999
    adam_epsilon: Annotated[float, setting("AdamW ε", gt=0, le=1, simpletuner="adam_epsilon")] = 1e-8
    optimizer: Annotated[Literal[OPTIMIZERS], setting("adamw, or adamw8bit (bitsandbytes)")] = "adamw"
    lr_scheduler: Annotated[Literal[LR_SCHEDULERS], setting("diffusers lr schedule",
                                                            simpletuner="lr_scheduler")] = "constant"
    lr_warmup_steps: Annotated[int, setting("lr warmup steps", ge=0, le=MAX_STEPS,
                                            simpletuner="lr_warmup_steps")] = 0
    max_grad_norm: Annotated[Optional[float], setting("gradient clipping norm; null: none", gt=0,
                                                      simpletuner="max_grad_norm")] = 1.0
    mixed_precision: Annotated[Literal[PRECISIONS], setting("frozen weights' dtype (adapters stay float32)",
                                                            simpletuner="mixed_precision",
                                                            official="mixed_precision")] = "no"
    base_precision: Annotated[Literal[BASE_PRECISIONS], setting("frozen denoiser stored as no | int8 | nf4 "
                                                                "(tlora.quantize)")] = "no"
    quantization_backend: Annotated[Optional[Literal[BACKENDS]], setting(
        "backend of base_precision; null: the precision's default")] = None
    gradient_checkpointing: Annotated[bool, setting("recompute activations in the backward",
                                                    simpletuner="gradient_checkpointing")] = False
    seed: Annotated[int, setting("random seed", ge=0, le=MAX_SEED, simpletuner="seed", official="seed")] = 0
    prediction_type: Annotated[Optional[Literal["epsilon", "v_prediction"]], setting(
        "DDPM families' target; null: the scheduler's", simpletuner="prediction_type")] = None
    ortho_reg_weight: Annotated[float, setting("weight of ‖PᵀP − I‖² + ‖QQᵀ − I‖² (ortho)", ge=0, le=1e6)] = 0.0
    class_data_dir: Annotated[Optional[str], setting("prior-preservation images (a photo of {class_name})",
                                                     min_length=1)] = None
    prior_loss_weight: Annotated[float, setting("weight of the prior-preservation loss", ge=0, le=1e6)] = 1.0
    validation_prompts: Annotated[List[str], setting("prompts sampled at each validation; {0}: placeholder "
                                                     "class")] = field(default_factory=list)
    validation_steps: Annotated[int, setting("validate every N steps; 0: only at the end", ge=0, le=MAX_STEPS,
                                             simpletuner="validation_steps")] = 100
    num_validation_images: Annotated[int, setting("images per validation prompt; 0: none", ge=0, le=MAX_BATCH,
                                                  simpletuner="num_validation_images",
                                                  official="num_val_imgs_per_prompt")] = 1
    validation_inference_steps: Annotated[int, setting("denoising steps of validation images", ge=1, le=10000,
                                                       simpletuner="validation_num_inference_steps")] = 25
    validation_guidance: Annotated[Optional[float], setting("validation guidance; null: the family's", ge=0,
                                                            le=1000, simpletuner="validation_guidance")] = None
    validation_multiplier: Annotated[float, setting("adapter strength at validation", ge=-1000, le=1000,
                                                    simpletuner="validation_lycoris_strength")] = 1.0
    eval_clip_model: Annotated[Optional[str], setting("CLIP model: IS / TS at each validation", min_length=1)] = None
    eval_dino_model: Annotated[Optional[str], setting("DINO model: DINO-IS at each validation", min_length=1)] = None
    official_flags: Annotated[Optional[dict], setting("the official flags a run was started with (also writes "
                                                      "logs/hparams.yml and the official checkpoint files)")] = None
    best_metric: Annotated[Literal[BEST_METRICS], setting("metric that picks tlora-best.safetensors")] = "TS"
    checkpointing_steps: Annotated[int, setting("save a checkpoint every N steps", ge=1, le=MAX_STEPS,
                                                simpletuner="checkpointing_steps",
                                                official="checkpointing_steps")] = 100
    checkpoints_total_limit: Annotated[Optional[int], setting("keep the last K checkpoints; null: all", ge=1,
                                                              simpletuner="checkpoints_total_limit")] = 3
    resume: Annotated[Optional[str], setting("latest, or a checkpoint-N folder: continue a run", min_length=1,
                                             simpletuner="resume_from_checkpoint")] = None
    overwrite: Annotated[bool, setting("train a run of this config in output_dir again from step 0")] = False
    device: Annotated[Optional[str], setting("cpu, cuda, cuda:N, mps; null: accelerate's choice",
                                             min_length=1)] = None
    tlora: TLoRAConfig = field(default_factory=lambda: TLoRAConfig(target_module=()))

    def __post_init__(self):
        check(self)
        if not isinstance(self.tlora, TLoRAConfig):
            raise SettingError("tlora", "a T-LoRA section (an object)", self.tlora)

    def validate(self) -> None:
        """What the schema cannot say of one field: that a model and data are given, the rules between fields,
        prompt templates, and the device against this machine. Nothing on disk or of the model is touched."""
        if not self.model:
            raise UsageError("no model given: set 'model' (a diffusers pipeline folder or hub id)")
        if not self.data_dir:
            raise UsageError("no data dir given: set 'data_dir' to a folder of images")
        if self.one_image is not None and Path(self.one_image).name != self.one_image:
            raise SettingError("one_image", "the file name of an image in data_dir", self.one_image)
        self._validate_prompts()
        check_device(self.device, "device")
        self.base().resolved()
        if self.best_metric == "DINO_IS" and self.eval_clip_model and not self.eval_dino_model:
            raise UsageError("best_metric DINO_IS needs eval_dino_model")

    def base(self) -> BasePrecision:
        """How the frozen denoiser is stored (:class:`tlora.quantize.BasePrecision`)."""
        return BasePrecision(self.base_precision, self.quantization_backend)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tlora"] = self.tlora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "train config") -> "TrainConfig":
        """Our JSON: the fields as keys, T-LoRA settings under ``tlora`` (a mapping, read by
        :meth:`TLoRAConfig.from_dict`); a string for ``validation_prompts`` is one prompt. Every error is one
        line naming the key (``tlora.rank``) and ``source``."""
        if not isinstance(d, dict):
            raise UsageError(f"{source} must hold an object of settings")
        d = dict(d)
        t = d.get("tlora")
        if isinstance(t, dict):
            try:
                d["tlora"] = TLoRAConfig.from_dict({"target_module": (), **t}, source)
            except SettingError as e:
                raise e.renamed("tlora." + e.key, source) from None
        if isinstance(d.get("validation_prompts"), str):
            d["validation_prompts"] = [d["validation_prompts"]]
        return S.parse(cls, d, source)

    def _validate_prompts(self) -> None:
        """prompt_template may use only {placeholder} and {class_name} (no positions, attributes or format specs);
        validation prompts are non-empty strings."""
        try:
            fields_used = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(self.prompt_template)
                           if f is not None]
        except ValueError as e:
            raise UsageError(f"prompt_template {self.prompt_template!r} is not a valid template: {e}") from None
        for f, conv, spec in fields_used:
            if f not in ("placeholder", "class_name") or conv or spec:
                raise UsageError(f"prompt_template {self.prompt_template!r} uses {{{f}}}: only {{placeholder}} "
                                 "and {class_name} are filled in")
        if not all(isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise UsageError(f"validation_prompts must be a list of non-empty strings, got {self.validation_prompts!r}")

    def prompt(self) -> str:
        return self.prompt_template.format(placeholder=self.placeholder, class_name=self.class_name).replace("  ", " ").strip()

    def resolved_validation_prompts(self) -> List[str]:
        """'{0}' → 'placeholder class_name' (the official convention)."""
        subject = f"{self.placeholder} {self.class_name}".strip()
        return [p.replace("{0}", subject) for p in self.validation_prompts] or [self.prompt()]


_TYPE_CHECKS = {dict: lambda v: isinstance(v, dict), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}


def parse_value(text: str) -> Any:
    """--set values: JSON when it parses (numbers, true/false/null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, sets: List[str]) -> dict:
    d = json.loads(json.dumps(d))
    for item in sets:
        if "=" not in item:
            raise UsageError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = parse_value(value)
    return d


# -- SimpleTuner ------------------------------------------------------------------------------------------
SIMPLETUNER_KEYS = S.foreign_names(TrainConfig, "simpletuner")     # SimpleTuner key → field, from the schema
SIMPLETUNER_HANDLED = {"model_type", "lora_type", "lycoris_config", "validation_prompt", "validation_prompts",
                       "data_backend_config", "num_train_epochs", "optimizer", "use_8bit_adam", "model_family",
                       "user_prompt_library", "validation_resolution", "base_model_precision"}


def is_simpletuner(d: dict) -> bool:
    keys = {k.lstrip("-") for k in d}
    return bool(keys & {"model_type", "lora_type", "lycoris_config", "pretrained_model_name_or_path", "model_family"})


SIMPLETUNER_TYPES = {"model_type": str, "lora_type": str, "lycoris_config": str, "data_backend_config": str,
                     "instance_prompt": str, "optimizer": str, "model_family": str, "num_train_epochs": int,
                     "use_8bit_adam": bool, "base_model_precision": str}


def _check_simpletuner_types(d: dict) -> None:
    """The SimpleTuner keys tlora reads itself, each of its exact type (the mapped ones are checked as TrainConfig
    fields)."""
    for k, t in SIMPLETUNER_TYPES.items():
        if k in d and not _TYPE_CHECKS[t](d[k]):
            raise UsageError(f"SimpleTuner {k} must be {t.__name__}, got {d[k]!r}")
    for k in ("validation_prompt", "validation_prompts"):
        v = d.get(k)
        if k in d and not (isinstance(v, str) or isinstance(v, list) and all(isinstance(i, str) for i in v)):
            raise UsageError(f"SimpleTuner {k} must be a string or a list of strings, got {v!r}")
    r = d.get("resolution")
    if isinstance(r, float) and not r.is_integer():
        raise UsageError(f"SimpleTuner resolution {r} is not a pixel size: tlora trains square images of an integer "
                         "resolution (resolution_type 'area' is not supported)")


def from_simpletuner(raw: dict, base_dir: Path, name: str = "the SimpleTuner config") -> TrainConfig:
    """A SimpleTuner config.json; as in SimpleTuner, a key set to null is a key not set."""
    d = {k.lstrip("-"): v for k, v in raw.items() if v is not None}
    _check_simpletuner_types(d)
    if d.get("model_type", "lora") != "lora":
        raise UsageError(f"SimpleTuner model_type {d['model_type']!r} is not supported: tlora trains model_type 'lora'")
    if d.get("lora_type", "lycoris") != "lycoris":
        raise UsageError(f"SimpleTuner lora_type {d['lora_type']!r} is not supported: use lora_type 'lycoris' "
                         "with a LyCORIS config of algo 'tlora'")
    if "lycoris_config" not in d:
        raise UsageError("SimpleTuner config has no 'lycoris_config': point it at a LyCORIS JSON with algo 'tlora'")
    lyc_path = _resolve(d["lycoris_config"], base_dir)
    tl = TLoRAConfig.from_lycoris(read_mapping(str(lyc_path), "lycoris_config", UsageError), lyc_path.name)
    out: dict = {"tlora": tl}
    for k, v in d.items():
        if k in SIMPLETUNER_KEYS:
            out[SIMPLETUNER_KEYS[k]] = v
    if isinstance(out.get("resolution"), float):     # 1024.0: an integer (checked above)
        out["resolution"] = int(out["resolution"])
    if out.get("resume") == "latest" and not _has_checkpoints(out.get("output_dir")):
        del out["resume"]       # SimpleTuner's resume_from_checkpoint 'latest' starts fresh when nothing is saved yet
    if "validation_prompts" in d or "validation_prompt" in d:
        vp = d.get("validation_prompts", d.get("validation_prompt"))
        out["validation_prompts"] = [vp] if isinstance(vp, str) else list(vp)
    if "data_dir" not in out and "data_backend_config" in d:
        out["data_dir"] = _data_dir_from_backend(_resolve(d["data_backend_config"], base_dir), base_dir)
    if "base_model_precision" in d:          # int8-torchao, nf4-bnb, …: (precision, backend)
        bp = BasePrecision.from_simpletuner(d["base_model_precision"])
        out["base_precision"], out["quantization_backend"] = bp.precision, bp.backend
    if d.get("use_8bit_adam") or "8bit" in str(d.get("optimizer", "")):
        out["optimizer"] = "adamw8bit"
    if out.get("mixed_precision") == "no" or out.get("mixed_precision") is None:
        out["mixed_precision"] = "no"
    if "max_steps" not in out and "num_train_epochs" in d:
        out["max_steps"] = int(d["num_train_epochs"])
    ignored = sorted(set(d) - set(SIMPLETUNER_KEYS) - SIMPLETUNER_HANDLED)
    if ignored:
        warnings.warn(f"SimpleTuner keys tlora does not use: {', '.join(ignored)}", stacklevel=2)
    for k in ("data_dir", "model"):
        if k in out and isinstance(out[k], str) and not Path(out[k]).is_absolute() and (base_dir / out[k]).exists():
            out[k] = str(base_dir / out[k])
    return S.build(TrainConfig, out, name, {f: k for k, f in SIMPLETUNER_KEYS.items()})


def _has_checkpoints(output_dir) -> bool:
    return isinstance(output_dir, str) and Path(output_dir).is_dir() and \
        any(p.name.startswith("checkpoint-") for p in Path(output_dir).iterdir())


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else base_dir / p


def _data_dir_from_backend(path: Path, base_dir: Path) -> str:
    backends = read_mapping(path, "data_backend_config", UsageError, lists=True)
    for b in backends if isinstance(backends, list) else [backends]:
        if isinstance(b, dict) and b.get("instance_data_dir") and b.get("dataset_type", "image") == "image":
            return str(_resolve(b["instance_data_dir"], base_dir))
    raise UsageError(f"{path} has no image backend with an instance_data_dir")


# -- the official repository's flags ------------------------------------------------------------------------
OFFICIAL_TRAIN = S.foreign_names(TrainConfig, "official")     # flag → TrainConfig field, from the schema
OFFICIAL_TLORA = S.foreign_names(TLoRAConfig, "official")     # flag → TLoRAConfig field
OFFICIAL_OWN = ("trainer_type", "trainer_class", "validation_prompts", "wandb_api_key")   # read here, strings
OFFICIAL_FLAGS = {**{f: (TrainConfig, n) for f, n in OFFICIAL_TRAIN.items()},
                  **{f: (TLoRAConfig, n) for f, n in OFFICIAL_TLORA.items()}, **{f: None for f in OFFICIAL_OWN}}
OFFICIAL_DEFAULTS = {"trainer_class": "sdxl_tlora", "trainer_type": "ortho_lora", "lora_rank": 64, "min_rank": 32,
                     "alpha_rank_scale": 1.0, "sig_type": "last", "num_train_epochs": 800}


def from_official(a: dict) -> TrainConfig:
    """The official ``train.py`` flags (``trainer_class`` sdxl_tlora|sdxl_lora, '#'-separated prompts); each
    value is checked against the schema of the field it sets, and an error names the flag."""
    a = {**OFFICIAL_DEFAULTS, **{k: v for k, v in a.items() if v is not None}}
    spelled = {f: "--" + k for k, f in OFFICIAL_TRAIN.items()} | {"validation_steps": "--checkpointing_steps"}
    if a["trainer_class"] not in ("sdxl_tlora", "sdxl_lora"):
        raise SettingError("trainer_class", "'sdxl_tlora' or 'sdxl_lora'", a["trainer_class"], spelled="--trainer_class")
    # sdxl_lora is the official plain-LoRA baseline: all ranks at every step (min_rank = rank)
    min_rank = a["lora_rank"] if a["trainer_class"] == "sdxl_lora" else a["min_rank"]
    tl = TLoRAConfig.from_official(a["trainer_type"], a["lora_rank"], min_rank, a["alpha_rank_scale"], a["sig_type"])
    flags = {"revision": None, **{k: v for k, v in a.items() if k not in ("output_dir", "wandb_api_key")}}
    d: dict = {n: a[f] for f, n in OFFICIAL_TRAIN.items() if f in a}
    if "validation_prompts" in a:
        d["validation_prompts"] = [p.strip() for p in str(a["validation_prompts"]).split("#")]
        if not all(d["validation_prompts"]):
            raise UsageError(f"--validation_prompts {a['validation_prompts']!r} has an empty prompt: separate "
                             "non-empty prompts with #")
    if "checkpointing_steps" in a:
        d["validation_steps"] = a["checkpointing_steps"]   # the official script validates at each checkpoint
    cfg = S.build(TrainConfig, {**d, "tlora": tl, "official_flags": flags}, None, spelled)
    try:
        cfg.validate()
    except SettingError as e:
        raise e.renamed(spelled.get(e.key, e.key), None) from None
    return cfg


def load_config(path: Optional[str], sets: List[str], official: Optional[dict] = None,
                from_flags: bool = False) -> TrainConfig:
    """A TrainConfig from our JSON, a SimpleTuner config.json, or official flags, then --set overrides;
    ``from_flags``: with no file, from the defaults and ``sets`` alone (``tlora train --model … --image …``)."""
    if not path and not official and from_flags:
        return TrainConfig.from_dict(apply_overrides({}, sets), "the command line")
    if official:
        cfg = from_official(official)
        return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), sets), "--set") if sets else cfg
    if not path:
        raise UsageError("give --config FILE (tlora or SimpleTuner JSON) or the official flags")
    raw = read_mapping(path, "config file", UsageError)
    name = Path(path).name
    if is_simpletuner(raw):
        cfg = from_simpletuner(raw, Path(path).parent, name)
        return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), sets), f"{name} with --set") if sets else cfg
    return TrainConfig.from_dict(apply_overrides(raw, sets), name + (" with --set" if sets else ""))
