"""``TLoRAConfig``: what to inject where, validated on construction.

Defaults follow the source of a config, so each reproduces its own tool:

* ``TLoRAConfig()`` / our JSON: the paper's T-LoRA — ortho, init from the SVD of a random N(0, 1/r)
  matrix, ``sig_type="last"`` (official README), rank 64, min_rank 1, exponent 1, alpha = rank (scale 1).
* ``TLoRAConfig.from_lycoris(json)``: LyCORIS ``algo: tlora`` — ortho, SVD of the base weight,
  ``sig_type="principal"``, scale = linear_alpha / linear_dim (linear_alpha defaults to 1, as in LyCORIS).
  Our extra keys ``tlora_variant``, ``tlora_init``, ``sig_type`` select the others.
* ``TLoRAConfig.from_official(...)``: the official repository's flags — ``trainer_type`` ortho_lora → ortho
  with random-matrix SVD, lora → vanilla; scale 1; attention projections only.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from .functional import SIG_TYPES, SVD_METHODS
from .layers import INITS, VARIANTS


def _exact(d: dict, key: str, kind: type, default=None):
    """``d[key]`` (or ``default`` when absent) if it is exactly a ``kind``: no bool for a number, no 3.7 truncated
    to 3 for an int (an int is a fine float). A LyCORIS config value of another type is an error naming the key."""
    v = d.get(key, default)
    ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
        (isinstance(v, (int, float)) and not isinstance(v, bool))
    if not ok:
        raise ValueError(f"LyCORIS config {key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return v


def unknown_keys_error(what: str, keys, known) -> ValueError:
    """One line naming unknown keys and the closest known spelling of each."""
    parts = []
    for k in sorted(keys):
        close = difflib.get_close_matches(k, list(known), n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"unknown {what} key(s): {', '.join(parts)}")


def check_fields(d: dict, cls, what: str) -> None:
    """Refuse keys of ``d`` that are not fields of the dataclass ``cls`` (one line, closest spellings)."""
    known = {f.name for f in fields(cls)}
    bad = set(d) - known
    if bad:
        raise unknown_keys_error(what, bad, known)


# per-module overrides allowed in module_algo_map
OVERRIDE_KEYS = {"rank", "alpha", "variant", "min_rank", "exponent", "init", "sig_type", "svd"}


@dataclass
class TLoRAConfig:
    rank: int = 64                        # R = max_rank = linear_dim
    alpha: Optional[float] = None         # lora alpha; scale = alpha / rank; None or 0 → rank (scale 1)
    min_rank: int = 1                     # Rmin = tlora_min_rank
    exponent: float = 1.0                 # schedule exponent α = tlora_alpha = alpha_rank_scale
    variant: str = "ortho"                # "ortho" (paper's T-LoRA) or "vanilla"
    init: str = "random"                  # ortho init: "random" (paper) or "weight" (LyCORIS)
    sig_type: str = "last"                # ortho singular triplets: principal | last | middle
    svd: str = "auto"                     # "exact" full SVDs (LyCORIS-identical) or "auto" (fast, see functional)
    multiplier: float = 1.0
    num_train_timesteps: int = 1000
    conv_rank: Optional[int] = None       # rank of Conv2d layers; None → rank (LyCORIS conv_dim default)
    conv_alpha: Optional[float] = None    # None → alpha
    target_module: tuple = ("Attention",)  # class names; every Linear/Conv2d inside is wrapped
    target_name: tuple = ()               # module paths: exact or re.match pattern (fnmatch if use_fnmatch)
    exclude_name: tuple = ()              # same matching; excluded paths are never wrapped
    use_fnmatch: bool = False
    module_algo_map: dict = field(default_factory=dict)  # class name or module path → overrides (also targets)

    def __post_init__(self):
        for k in ("target_module", "target_name", "exclude_name"):
            v = getattr(self, k)
            if not isinstance(v, (list, tuple)) or not all(isinstance(i, str) for i in v):
                raise ValueError(f"{k} must be a list of strings, got {v!r}")
            setattr(self, k, tuple(v))
        if not isinstance(self.module_algo_map, dict) or not all(isinstance(v, dict) for v in self.module_algo_map.values()):
            raise ValueError(f"module_algo_map must map names to settings objects, got {self.module_algo_map!r}")
        if not isinstance(self.use_fnmatch, bool):
            raise ValueError(f"use_fnmatch must be true or false, got {self.use_fnmatch!r}")
        self.module_algo_map = {k: dict(v) for k, v in self.module_algo_map.items()}
        self.check_settings(self.__dict__, "")
        if self.conv_rank is not None and (not isinstance(self.conv_rank, int) or isinstance(self.conv_rank, bool)
                                           or self.conv_rank < 1):
            raise ValueError(f"conv_rank must be an int >= 1 or None, got {self.conv_rank!r}")
        if isinstance(self.multiplier, bool) or not (isinstance(self.multiplier, (int, float))
                                                       and math.isfinite(self.multiplier)):
            raise ValueError(f"multiplier must be a finite number, got {self.multiplier!r}")
        if not isinstance(self.num_train_timesteps, int) or isinstance(self.num_train_timesteps, bool) or \
                self.num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be an int > 0, got {self.num_train_timesteps!r}")
        for key, over in self.module_algo_map.items():
            bad = set(over) - OVERRIDE_KEYS
            if bad:
                raise unknown_keys_error(f"module_algo_map[{key!r}]", bad, OVERRIDE_KEYS)
            self.check_settings({**self.layer_kwargs(), **over}, f"module_algo_map[{key!r}].")

    @staticmethod
    def check_settings(d: dict, where: str) -> None:
        """One adapter's settings (rank, min_rank, exponent, alpha, variant, init, sig_type, svd) in range and of
        their exact types; ValueError naming ``where`` + the key otherwise."""
        rank, min_rank = d["rank"], d["min_rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{where}rank must be an int >= 1, got {rank!r}")
        if not isinstance(min_rank, int) or isinstance(min_rank, bool) or min_rank < 1:
            raise ValueError(f"{where}min_rank must be an int >= 1, got {min_rank!r}")
        if min_rank > rank:
            raise ValueError(f"{where}min_rank ({min_rank}) must not exceed rank ({rank})")
        e = d["exponent"]
        if not (isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e > 0):
            raise ValueError(f"{where}exponent must be a number > 0, got {e!r}")
        if d["alpha"] is not None and not (isinstance(d["alpha"], (int, float)) and math.isfinite(d["alpha"])):
            raise ValueError(f"{where}alpha must be a number or null, got {d['alpha']!r}")
        if d["variant"] not in VARIANTS:
            raise ValueError(f"{where}variant must be one of {VARIANTS}, got {d['variant']!r}")
        if d["init"] not in INITS:
            raise ValueError(f"{where}init must be one of {INITS}, got {d['init']!r}")
        if d["sig_type"] not in SIG_TYPES:
            raise ValueError(f"{where}sig_type must be one of {SIG_TYPES}, got {d['sig_type']!r}")
        if d["svd"] not in SVD_METHODS:
            raise ValueError(f"{where}svd must be one of {SVD_METHODS}, got {d['svd']!r}")

    # -- per-layer settings --------------------------------------------------------------------------
    def layer_kwargs(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, variant=self.variant, min_rank=self.min_rank,
                    exponent=self.exponent, init=self.init, sig_type=self.sig_type, svd=self.svd)

    def for_layer(self, keys, is_conv: bool) -> dict:
        """Settings of one layer: the defaults, conv settings for convs, then the first ``keys`` entry
        (innermost class name or path) found in ``module_algo_map``."""
        kw = self.layer_kwargs()
        if is_conv:
            kw["rank"] = self.conv_rank or self.rank
            kw["alpha"] = self.conv_alpha if self.conv_alpha is not None else self.alpha
        for k in keys:
            if k in self.module_algo_map:
                kw.update(self.module_algo_map[k])
                break
        kw["min_rank"] = min(kw["min_rank"], kw["rank"])
        return kw

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("target_module", "target_name", "exclude_name"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TLoRAConfig":
        check_fields(d, cls, "T-LoRA config")
        return cls(**d)

    def replace(self, **kw) -> "TLoRAConfig":
        return replace(self, **kw)

    def targets_or(self, target_module: tuple) -> "TLoRAConfig":
        """This config, or with ``target_module`` (a family's default targets) when it names no target at all."""
        if self.target_module or self.target_name or self.module_algo_map:
            return self
        return self.replace(target_module=tuple(target_module))

    @classmethod
    def from_lycoris(cls, d: dict) -> "TLoRAConfig":
        """The LyCORIS JSON (``algo: tlora``) as SimpleTuner's ``lycoris_config`` file holds it."""
        known = {"algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha",
                 "tlora_min_rank", "tlora_alpha", "apply_preset", "bypass_mode", "dropout",
                 "tlora_variant", "tlora_init", "sig_type", "use_data_init", "num_train_timesteps"}
        bad = set(d) - known
        if bad:
            raise unknown_keys_error("LyCORIS config", bad, known)
        algo = d.get("algo")
        if algo != "tlora":
            raise ValueError(f"LyCORIS algo {algo!r} is not supported: tlora reads only algo 'tlora'")
        if "linear_dim" not in d:
            raise ValueError("LyCORIS config needs 'linear_dim' (the T-LoRA rank)")
        if d.get("dropout"):
            raise ValueError("LyCORIS 'dropout' is not supported by tlora; remove it or set it to 0")
        preset = d.get("apply_preset") or {}
        if not isinstance(preset, dict):
            raise ValueError(f"LyCORIS apply_preset must be an object (target_module, module_algo_map, ...), got {preset!r}")
        for k in ("module_algo_map", "name_algo_map"):
            if not isinstance(preset.get(k, {}), dict) or not all(isinstance(v, dict) for v in preset.get(k, {}).values()):
                raise ValueError(f"LyCORIS apply_preset.{k} must map names to objects, got {preset[k]!r}")
        preset_known = {"target_module", "target_name", "exclude_name", "module_algo_map",
                        "name_algo_map", "use_fnmatch", "unet_target_module", "unet_target_name"}
        bad = set(preset) - preset_known
        if bad:
            raise unknown_keys_error("apply_preset", bad, preset_known)
        rename = {"linear_dim": "rank", "linear_alpha": "alpha", "tlora_min_rank": "min_rank",
                  "tlora_alpha": "exponent", "tlora_variant": "variant", "tlora_init": "init",
                  "sig_type": "sig_type"}
        algo_map = {}
        for key, over in {**preset.get("module_algo_map", {}), **preset.get("name_algo_map", {})}.items():
            over = dict(over)
            a = over.pop("algo", "tlora")
            if a != "tlora":
                raise ValueError(f"module_algo_map[{key!r}]: algo {a!r} is not supported (only 'tlora')")
            bad = set(over) - set(rename)
            if bad:
                raise unknown_keys_error(f"module_algo_map[{key!r}]", bad, rename)
            algo_map[key] = {rename[k]: v for k, v in over.items()}
        init = d.get("tlora_init")
        if init is None:
            init = "weight" if d.get("use_data_init", True) else "random"
        alpha = d.get("linear_alpha", 1)   # LyCORIS's default linear_alpha is 1
        return cls(
            rank=_exact(d, "linear_dim", int), alpha=float(_exact(d, "linear_alpha", float, alpha)) if alpha is not None else None,
            min_rank=_exact(d, "tlora_min_rank", int, 1), exponent=float(_exact(d, "tlora_alpha", float, 1.0)),
            variant=d.get("tlora_variant", "ortho"), init=init, sig_type=d.get("sig_type", "principal"),
            svd="exact",                                  # LyCORIS-identical frozen tensors
            multiplier=float(_exact(d, "multiplier", float, 1.0)),   # never int(): 0.5 stays 0.5
            num_train_timesteps=_exact(d, "num_train_timesteps", int, 1000),
            conv_rank=_exact(d, "conv_dim", int) if d.get("conv_dim") else None,      # LyCORIS: 0 = conv like linear
            conv_alpha=float(_exact(d, "conv_alpha", float)) if d.get("conv_alpha") is not None else None,
            target_module=tuple(preset.get("target_module", preset.get("unet_target_module", ("Attention",)))),
            target_name=tuple(preset.get("target_name", preset.get("unet_target_name", ()))),
            exclude_name=tuple(preset.get("exclude_name", ())),
            use_fnmatch=preset.get("use_fnmatch", False),
            module_algo_map=algo_map,
        )

    @classmethod
    def from_official(cls, trainer_type: str = "ortho_lora", lora_rank: int = 64, min_rank: int = 32,
                      alpha_rank_scale: float = 1.0, sig_type: str = "last") -> "TLoRAConfig":
        """The official repository's flags: LoRA on to_q/to_k/to_v/to_out.0 of every attention, scale 1."""
        variants = {"ortho_lora": "ortho", "lora": "vanilla"}
        if trainer_type not in variants:
            raise ValueError(f"trainer_type must be one of {sorted(variants)}, got {trainer_type!r}")
        return cls(rank=lora_rank, alpha=None, min_rank=min_rank, exponent=float(alpha_rank_scale),
                   variant=variants[trainer_type], init="random", sig_type=sig_type,
                   target_module=("Attention",), target_name=(), exclude_name=())
