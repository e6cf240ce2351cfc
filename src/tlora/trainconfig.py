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
import math
import string
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

from .config import TLoRAConfig, check_fields
from .devices import check_device
from .errors import UsageError
from .fileio import read_mapping
from .quantize import BasePrecision


# diffusers.optimization.SchedulerType's values (a test keeps the two equal); not imported: --help stays fast
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")


@dataclass
class TrainConfig:
    model: str = ""                              # diffusers pipeline folder or hub id
    data_dir: str = ""                           # images (+ optional same-name .txt captions)
    output_dir: str = "tlora-output"
    placeholder: str = "sks"
    class_name: str = ""
    prompt_template: str = "a photo of {placeholder} {class_name}"
    one_image: Optional[str] = None              # train on this file of data_dir only
    resolution: Optional[int] = None             # None → the family's native resolution
    max_steps: int = 800                         # official recipe: 800
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4                  # official: AdamW lr 1e-4, weight decay 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optimizer: str = "adamw"                     # adamw | adamw8bit (needs bitsandbytes)
    lr_scheduler: str = "constant"               # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "no"                  # no | bf16 | fp16 (adapters stay float32)
    base_precision: str = "no"                   # frozen denoiser weights: no | int8 | nf4 (tlora.quantize)
    quantization_backend: Optional[str] = None   # quanto | torchao | bitsandbytes; None → the precision's default
    gradient_checkpointing: bool = False
    seed: int = 0
    prediction_type: Optional[str] = None        # DDPM families: epsilon | v_prediction; None → scheduler's
    ortho_reg_weight: float = 0.0                # × ‖PᵀP − I‖² + ‖QQᵀ − I‖² (ortho adapters)
    class_data_dir: Optional[str] = None         # prior preservation images ("a photo of {class_name}")
    prior_loss_weight: float = 1.0
    validation_prompts: List[str] = field(default_factory=list)   # "{0}" → "placeholder class_name"
    validation_steps: int = 100                  # every N steps (0: only at the end)
    num_validation_images: int = 1               # 0: no validation images
    validation_inference_steps: int = 25
    validation_guidance: Optional[float] = None  # None → the family's default
    validation_multiplier: float = 1.0
    eval_clip_model: Optional[str] = None        # set to compute IS / TS at each validation (tlora evaluate)
    eval_dino_model: Optional[str] = None        # optional DINO-IS
    official_flags: Optional[dict] = None        # started with the official flags: also writes logs/hparams.yml and
                                                 # checkpoint-N/pytorch_lora_weights.safetensors (tlora.official)
    best_metric: str = "TS"                      # IS | DINO_IS | TS | IS+TS: picks OUT/tlora-best.safetensors
    checkpointing_steps: int = 100
    checkpoints_total_limit: Optional[int] = 3   # keep the last K checkpoints
    resume: Optional[str] = None                 # latest | path to a checkpoint-N folder
    overwrite: bool = False                      # train a run of this config in output_dir again from step 0
    device: Optional[str] = None                 # None → accelerate's choice
    tlora: TLoRAConfig = field(default_factory=lambda: TLoRAConfig(target_module=()))

    def validate(self) -> None:
        """Everything that can be checked without touching the disk or the model."""
        self._validate_numbers()
        if not self.model:
            raise UsageError("no model given: set 'model' (a diffusers pipeline folder or hub id)")
        if not self.data_dir:
            raise UsageError("no data dir given: set 'data_dir' to a folder of images")
        if self.resolution is not None and not (0 < self.resolution <= 8192 and self.resolution % 8 == 0):
            raise UsageError(f"resolution must be a multiple of 8 in [8, 8192], got {self.resolution}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps",
                     "validation_inference_steps", "checkpointing_steps"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_validation_images < 0:
            raise UsageError(f"num_validation_images must be >= 0, got {self.num_validation_images}")
        if self.validation_steps < 0:
            raise UsageError(f"validation_steps must be >= 0, got {self.validation_steps}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise UsageError(f"checkpoints_total_limit must be >= 1 or null, got {self.checkpoints_total_limit}")
        if not 0 < self.learning_rate <= 1:
            raise UsageError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UsageError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise UsageError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if self.one_image is not None and (not self.one_image or Path(self.one_image).name != self.one_image):
            raise UsageError(f"one_image must be the file name of an image in data_dir, got {self.one_image!r}")
        self._validate_prompts()
        check_device(self.device, "device")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UsageError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        self.base().resolved()
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise UsageError(f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise UsageError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.best_metric not in ("IS", "DINO_IS", "TS", "IS+TS"):
            raise UsageError(f"best_metric must be IS, DINO_IS, TS or IS+TS, got {self.best_metric!r}")
        if self.best_metric == "DINO_IS" and self.eval_clip_model and not self.eval_dino_model:
            raise UsageError("best_metric DINO_IS needs eval_dino_model")
        if self.ortho_reg_weight < 0:
            raise UsageError(f"ortho_reg_weight must be >= 0, got {self.ortho_reg_weight}")

    def base(self) -> BasePrecision:
        """How the frozen denoiser is stored (:class:`tlora.quantize.BasePrecision`)."""
        return BasePrecision(self.base_precision, self.quantization_backend)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tlora"] = self.tlora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        try:
            check_fields(d, cls, "train config")
        except ValueError as e:
            raise UsageError(str(e)) from None
        d = dict(d)
        try:
            if "tlora" in d:
                t = d["tlora"]
                d["tlora"] = t if isinstance(t, TLoRAConfig) else TLoRAConfig.from_dict({"target_module": (), **t})
            for k in ("validation_prompts",):
                if isinstance(d.get(k), str):
                    d[k] = [d[k]]
            cfg = cls(**d)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
        _check_types(cfg)
        return cfg

    def _validate_numbers(self) -> None:
        """Every float field finite; the optimizer's numbers in their ranges (a NaN or negative value would train
        NaN weights or raise inside torch)."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            if float in (hints[f.name], *get_args(hints[f.name])) and isinstance(v, (int, float)) and \
                    not isinstance(v, bool) and not math.isfinite(v):
                raise UsageError(f"{f.name} must be a finite number, got {v}")
        rules = [(self.max_grad_norm is not None and not self.max_grad_norm > 0, "max_grad_norm", "> 0 or null"),
                 (self.weight_decay < 0, "weight_decay", ">= 0"),
                 (not 0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)"),
                 (not 0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)"),
                 (not self.adam_epsilon > 0, "adam_epsilon", "> 0"),
                 (self.lr_warmup_steps < 0, "lr_warmup_steps", ">= 0"),
                 (self.prior_loss_weight < 0, "prior_loss_weight", ">= 0")]
        for bad, name, allowed in rules:
            if bad:
                raise UsageError(f"{name} must be {allowed}, got {getattr(self, name)}")

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
                float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}


def _check_types(cfg: TrainConfig) -> None:
    """Every field's value against its annotation (int, float, bool, str; Optional[...] may be null)."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        v, t = getattr(cfg, f.name), hints[f.name]
        optional = get_origin(t) is Union and type(None) in get_args(t)
        base = next(a for a in get_args(t) if a is not type(None)) if optional else t
        if v is None:
            if not optional:
                raise UsageError(f"{f.name} must not be null")
            continue
        if get_origin(base) in (list, List):
            item = get_args(base)[0]
            if not isinstance(v, list) or not all(_TYPE_CHECKS[item](i) for i in v):
                raise UsageError(f"{f.name} must be a list of {item.__name__}, got {v!r}")
            continue
        check = _TYPE_CHECKS.get(base)
        if check is not None and not check(v):
            raise UsageError(f"{f.name} must be {base.__name__}, got {v!r}")


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
SIMPLETUNER_KEYS = {
    "pretrained_model_name_or_path": "model", "output_dir": "output_dir", "instance_data_dir": "data_dir",
    "learning_rate": "learning_rate", "max_train_steps": "max_steps", "train_batch_size": "batch_size",
    "resolution": "resolution", "validation_steps": "validation_steps", "seed": "seed",
    "mixed_precision": "mixed_precision", "gradient_checkpointing": "gradient_checkpointing",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "lr_scheduler": "lr_scheduler",
    "lr_warmup_steps": "lr_warmup_steps", "checkpointing_steps": "checkpointing_steps",
    "checkpoints_total_limit": "checkpoints_total_limit", "validation_num_inference_steps": "validation_inference_steps",
    "validation_guidance": "validation_guidance", "validation_lycoris_strength": "validation_multiplier",
    "num_validation_images": "num_validation_images", "max_grad_norm": "max_grad_norm",
    "adam_weight_decay": "weight_decay", "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon", "prediction_type": "prediction_type", "resume_from_checkpoint": "resume",
}
SIMPLETUNER_HANDLED = {"model_type", "lora_type", "lycoris_config", "validation_prompt", "validation_prompts",
                       "data_backend_config", "num_train_epochs", "optimizer", "use_8bit_adam", "model_family",
                       "instance_prompt", "user_prompt_library", "validation_resolution", "base_model_precision"}


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


def from_simpletuner(raw: dict, base_dir: Path) -> TrainConfig:
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
    try:
        tl = TLoRAConfig.from_lycoris(read_mapping(str(lyc_path), "lycoris_config", UsageError))
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"{lyc_path}: {_renamed(str(e), _LYCORIS_NAMES, '')}") from None
    out: dict = {"tlora": tl}
    for k, v in d.items():
        if k in SIMPLETUNER_KEYS:
            out[SIMPLETUNER_KEYS[k]] = v
    if isinstance(out.get("resolution"), float):     # 1024.0: an integer (checked above)
        out["resolution"] = int(out["resolution"])
    if "validation_prompts" in d or "validation_prompt" in d:
        vp = d.get("validation_prompts", d.get("validation_prompt"))
        out["validation_prompts"] = [vp] if isinstance(vp, str) else list(vp)
    if "data_dir" not in out and "data_backend_config" in d:
        out["data_dir"] = _data_dir_from_backend(_resolve(d["data_backend_config"], base_dir), base_dir)
    if "instance_prompt" in d:
        out["prompt_template"] = d["instance_prompt"]
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
    return TrainConfig.from_dict(out)


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
OFFICIAL_FLAGS = {
    "pretrained_model_name_or_path": str, "train_data_dir": str, "output_dir": str, "mixed_precision": str,
    "trainer_type": str, "trainer_class": str, "num_train_epochs": int, "checkpointing_steps": int,
    "resolution": int, "validation_prompts": str, "num_val_imgs_per_prompt": int, "placeholder_token": str,
    "class_name": str, "seed": int, "lora_rank": int, "min_rank": int, "alpha_rank_scale": float,
    "sig_type": str, "one_image": str, "wandb_api_key": str, "learning_rate": float, "train_batch_size": int,
}


_OFFICIAL_NAMES = {"rank": "lora_rank", "min_rank": "min_rank", "exponent": "alpha_rank_scale",
                   "trainer_type": "trainer_type", "sig_type": "sig_type", "max_steps": "num_train_epochs",
                   "num_validation_images": "num_val_imgs_per_prompt", "placeholder": "placeholder_token",
                   "batch_size": "train_batch_size", "seed": "seed", "learning_rate": "learning_rate",
                   "resolution": "resolution", "mixed_precision": "mixed_precision",
                   "checkpointing_steps": "checkpointing_steps", "validation_steps": "checkpointing_steps",
                   "one_image": "one_image", "class_name": "class_name", "device": "device"}


_LYCORIS_NAMES = {"rank": "linear_dim", "alpha": "linear_alpha", "min_rank": "tlora_min_rank",
                  "exponent": "tlora_alpha", "variant": "tlora_variant", "init": "tlora_init"}


def _renamed(msg: str, names: dict, dashes: str = "--") -> str:
    """A config error in the source's own key ("rank must be …" → "--lora_rank must be …")."""
    head, _, rest = msg.partition(" ")
    return f"{dashes}{names[head]} {rest}" if head in names else msg


def _official_message(msg: str) -> str:
    return _renamed(msg, _OFFICIAL_NAMES)


def _given(a: dict, key: str, default):
    """The flag's value when it was given (0 and "" included: absent and zero are different), else the default."""
    return a[key] if a.get(key) is not None else default


def from_official(a: dict) -> TrainConfig:
    """The official ``train.py`` flags (``trainer_class`` sdxl_tlora|sdxl_lora, '#'-separated prompts)."""
    trainer_class = _given(a, "trainer_class", "sdxl_tlora")
    if trainer_class not in ("sdxl_tlora", "sdxl_lora"):
        raise UsageError(f"--trainer_class must be sdxl_tlora or sdxl_lora, got {trainer_class!r}")
    rank = _given(a, "lora_rank", 64)
    # sdxl_lora is the official plain-LoRA baseline: all ranks at every step (min_rank = rank)
    min_rank = rank if trainer_class == "sdxl_lora" else _given(a, "min_rank", 32)
    try:
        tl = TLoRAConfig.from_official(_given(a, "trainer_type", "ortho_lora"), rank, min_rank,
                                       _given(a, "alpha_rank_scale", 1.0), _given(a, "sig_type", "last"))
    except ValueError as e:
        raise UsageError(_official_message(str(e))) from None
    flags = {"trainer_class": trainer_class, "trainer_type": _given(a, "trainer_type", "ortho_lora"), "lora_rank": rank,
             "min_rank": _given(a, "min_rank", 32), "alpha_rank_scale": float(_given(a, "alpha_rank_scale", 1.0)),
             "sig_type": _given(a, "sig_type", "last"), "revision": None,
             **{k: v for k, v in a.items() if v is not None and k not in ("output_dir", "wandb_api_key")}}
    d: dict = {"tlora": tl, "official_flags": flags, "model": _given(a, "pretrained_model_name_or_path", ""),
               "data_dir": _given(a, "train_data_dir", ""), "max_steps": _given(a, "num_train_epochs", 800)}
    simple = {"output_dir": "output_dir", "mixed_precision": "mixed_precision", "checkpointing_steps": "checkpointing_steps",
              "resolution": "resolution", "num_val_imgs_per_prompt": "num_validation_images",
              "placeholder_token": "placeholder", "class_name": "class_name", "seed": "seed",
              "one_image": "one_image", "learning_rate": "learning_rate", "train_batch_size": "batch_size"}
    for k, v in simple.items():
        if a.get(k) is not None:
            d[v] = a[k]
    if a.get("validation_prompts") is not None:
        d["validation_prompts"] = [p.strip() for p in a["validation_prompts"].split("#")]
        if not all(d["validation_prompts"]):
            raise UsageError(f"--validation_prompts {a['validation_prompts']!r} has an empty prompt: separate "
                             "non-empty prompts with #")
    if a.get("checkpointing_steps") is not None:
        d["validation_steps"] = a["checkpointing_steps"]   # the official script validates at each checkpoint
    try:
        cfg = TrainConfig.from_dict(d)
        cfg.validate()
    except UsageError as e:
        raise UsageError(_official_message(str(e))) from None
    return cfg


def load_config(path: Optional[str], sets: List[str], official: Optional[dict] = None) -> TrainConfig:
    """A TrainConfig from our JSON, a SimpleTuner config.json, or official flags, then --set overrides."""
    if official:
        cfg = from_official(official)
        return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), sets)) if sets else cfg
    if not path:
        raise UsageError("give --config FILE (tlora or SimpleTuner JSON) or the official flags")
    raw = read_mapping(path, "config file", UsageError)
    if is_simpletuner(raw):
        cfg = from_simpletuner(raw, Path(path).parent)
        return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), sets)) if sets else cfg
    return TrainConfig.from_dict(apply_overrides(raw, sets))
